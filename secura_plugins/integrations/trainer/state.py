"""What ``SecuraCallback`` and ``ContinualTrainerMixin`` hand each other, and how the
callback reaches its ``Trainer``.

Nothing is stored on the ``Trainer``: the callback owns one :class:`TrainerLink`
(``callback.link``); the mixin finds the callback among the Trainer's ``callbacks=``
and writes into its link. Without a callback the mixin keeps a link of its own.

Example:
    >>> import torch
    >>> link = TrainerLink()
    >>> link.note_loss(torch.tensor(1.0)); link.note_loss(torch.tensor(float("nan")))
    >>> bool(link.take_loss_ok()), link.take_loss_ok() is None
    (False, True)
    >>> link.record_penalty(1.0); link.record_penalty(3.0)
    >>> link.drain_penalty()
    {'ewc/penalty': 2.0}
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import PartialState
from transformers import Trainer

__all__ = ["TrainerLink", "find_trainer", "loss_term_scale", "wait_for_everyone"]


@dataclass
class TrainerLink:
    """State shared by the callback and the trainer mixin during one run.

    Attributes:
        saved_params: trainable tensors of a model that already carries an adapter,
            snapshotted by the mixin before ``SFTTrainer.__init__`` casts them to bf16
            on quantized bases; the callback puts these exact values back at
            ``on_init_end`` and clears the snapshot.
        ewc_via_loss: set by the mixin when it adds the EWC penalty to the loss; the
            callback then does not add the penalty's gradient as well.
        loss_ok: whether every training loss since the last optimizer step was finite
            (a device tensor, read once per step by the callback's NaN/inf check).
        penalties: EWC penalty values since the last training log (``ewc/penalty``).
    """

    saved_params: dict[str, torch.Tensor] | None = None
    ewc_via_loss: bool = False
    loss_ok: torch.Tensor | None = None
    penalties: list[float] = field(default_factory=list)

    def note_loss(self, loss: torch.Tensor) -> None:
        """Fold ``isfinite(loss)`` into :attr:`loss_ok` (no host sync)."""
        ok = torch.isfinite(loss.detach()).all()
        self.loss_ok = ok if self.loss_ok is None else self.loss_ok & ok

    def take_loss_ok(self) -> torch.Tensor | None:
        """:attr:`loss_ok`, reset for the next step."""
        ok, self.loss_ok = self.loss_ok, None
        return ok

    def record_penalty(self, value: float) -> None:
        """Keep an EWC penalty value for the next training log."""
        self.penalties.append(float(value))

    def drain_penalty(self) -> dict[str, float]:
        """``{"ewc/penalty": mean}`` of the values since the last call (empty if none)."""
        if not self.penalties:
            return {}
        mean = sum(self.penalties) / len(self.penalties)
        self.penalties.clear()
        return {"ewc/penalty": mean}


def find_trainer(max_depth: int = 16) -> Trainer | None:
    """The ``Trainer`` whose method is on the call stack, or None.

    This is the only place the library reaches a ``Trainer`` it was not handed.
    ``TrainerCallback`` events receive the model, the arguments and the state but not
    the Trainer, and ``SecuraCallback`` needs it at ``on_init_end`` (to swap in the
    adapted model, reorder the callbacks and learn the resume folder). There,
    ``Trainer.__init__`` -> ``CallbackHandler.on_init_end`` -> callback is on the stack,
    so the first frame whose ``self`` is a ``Trainer`` is the one being built. A host
    that drives callbacks differently calls ``callback.bind(trainer)`` instead.
    """
    frame = inspect.currentframe()
    try:
        current = frame.f_back if frame is not None else None
        for _ in range(max_depth):
            if current is None:
                return None
            candidate = current.f_locals.get("self")
            if isinstance(candidate, Trainer):
                return candidate
            current = current.f_back
    finally:
        del frame
    return None


def loss_term_scale(trainer: Any, num_items_in_batch: Any) -> float:
    """Factor for a term added to ``compute_loss``'s loss (EWC penalty, KL anchor) so that
    it counts once per optimizer step under gradient accumulation.

    ``Trainer.training_step`` divides the loss by the accumulation steps only when the
    model does not normalise it itself (it gets ``num_items_in_batch``) and no
    ``compute_loss_func`` is set; in those two cases the added term is divided here.
    """
    steps = getattr(trainer, "current_gradient_accumulation_steps", 1) or 1
    model_normalises = (
        getattr(trainer, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None
    ) or getattr(trainer, "compute_loss_func", None) is not None
    return 1.0 / steps if model_normalises else 1.0


def wait_for_everyone(trainer: Any = None) -> None:
    """Barrier across processes (no-op in one process), through accelerate.

    Uses the Trainer's ``accelerator`` when there is one, else accelerate's
    ``PartialState`` (the same process group the Trainer set up).
    """
    accelerator = getattr(trainer, "accelerator", None)
    if accelerator is not None:
        accelerator.wait_for_everyone()
        return
    PartialState().wait_for_everyone()
