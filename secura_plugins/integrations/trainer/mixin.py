"""``ContinualTrainerMixin``: EWC as a loss term and replay mixing, for any ``Trainer``.

Which path each continual feature uses:

============================  ==========================  =============================
feature                       ``SecuraCallback``          ``ContinualTrainerMixin``
============================  ==========================  =============================
EWC penalty                   gradient added in           loss term in ``compute_loss``
                              ``on_pre_optimizer_step``   (clipped with the task loss)
EWC consolidation (Fisher)    ``on_train_end``            after ``train()`` (if no callback)
replay mixing                 not possible: the Trainer   mixes ``train_dataset`` before
                              tokenizes the dataset in    ``Trainer.__init__``; adds the
                              ``__init__``, before any    task's rows to the buffer
                              callback runs               after ``train()``
============================  ==========================  =============================

With both present, the mixin takes over the EWC penalty (the callback's gradient path
switches itself off), so the penalty is never applied twice. The two talk through the
callback's :class:`~.state.TrainerLink`, never through attributes of the Trainer.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

from torch import nn

from ...continual.consolidate import consolidate_ewc
from ...continual.ewc import EWC
from ...continual.replay import ReplayBuffer
from ...errors import SecuraConfigError
from ...model import is_adapted
from .adapt import as_keep
from .callback import find_secura_callback, secura_callback_in
from .state import TrainerLink, loss_term_scale

__all__ = ["ContinualTrainerMixin", "EWCTrainerMixin", "SecuraSFTTrainer"]


class ContinualTrainerMixin:
    """EWC as a loss term and replay mixing for any ``transformers.Trainer`` subclass.

    Put it first in the bases: ``class MyTrainer(ContinualTrainerMixin, SFTTrainer)``
    (``SecuraSFTTrainer`` is exactly that). Extra keyword arguments:

    * ``ewc``: an :class:`~secura_plugins.continual.EWC`; ``compute_loss`` returns
      ``task_loss + penalty`` (scaled so the penalty counts once per optimizer step
      under gradient accumulation). If a ``SecuraCallback`` is registered and no
      ``ewc`` is given, the callback's EWC is used, and the callback stops adding the
      gradient itself.
    * ``replay`` (a :class:`~secura_plugins.continual.ReplayBuffer`) and
      ``replay_ratio``: ``train_dataset`` is mixed with the buffer before the Trainer
      tokenizes it; after ``train()`` the task's own rows are added to the buffer.
    * ``task_name``: the tag of this task's rows in the buffer.
    * ``fisher_batches``: batches for the end-of-task Fisher when no callback does it.
    * ``keep``: self-rehearsal and the KL anchor (see :mod:`secura_plugins.keep`),
      handed to the ``SecuraCallback`` (required), which runs them.

    Example:
        >>> from secura_plugins.integrations.trl import SecuraSFTTrainer
        >>> issubclass(SecuraSFTTrainer, ContinualTrainerMixin)
        True
    """

    def __init__(
        self,
        *args: Any,
        ewc: EWC | None = None,
        replay: ReplayBuffer | None = None,
        replay_ratio: float | None = None,
        task_name: str | None = None,
        fisher_batches: int | None = None,
        keep: Any = None,
        **kwargs: Any,
    ) -> None:
        self._secura_task_rows = None
        try:
            bound = inspect.signature(super().__init__).bind_partial(*args, **kwargs).arguments
        except TypeError:  # let Trainer.__init__ report bad arguments
            bound = kwargs
        early = secura_callback_in(bound.get("callbacks"))
        model = bound.get("model")
        if early is not None and is_adapted(model):
            # SFTTrainer casts trainable tensors of quantized models to bf16 in __init__;
            # the callback puts these exact values back (adapt.restore_adapter_dtype).
            early.link.saved_params = {
                n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
            }
        if replay is not None:
            if "train_dataset" not in kwargs:
                raise TypeError("pass train_dataset= as a keyword argument when using replay=")
            self._secura_task_rows = kwargs["train_dataset"]
            kwargs["train_dataset"] = replay.mix(kwargs["train_dataset"], replay_ratio)
        super().__init__(*args, **kwargs)
        self.secura_replay = replay
        self.secura_task_name = task_name
        self.secura_fisher_batches = fisher_batches
        callback = find_secura_callback(self)  # type: ignore[arg-type]
        if keep is not None:
            if callback is None:
                raise SecuraConfigError(
                    "keep", "needs a SecuraCallback in callbacks= (it runs the rehearsal)"
                )
            callback.keep = as_keep(keep)
        if ewc is None and callback is not None:
            ewc = callback.ewc
        #: Shared with the callback (its link); a link of the mixin's own without one.
        self.secura_link = callback.link if callback is not None else TrainerLink()
        if callback is not None and ewc is not None:
            callback.ewc = ewc
            self.secura_link.ewc_via_loss = True
        self.secura_ewc = ewc
        #: The SecuraCallback, if any: it then consolidates EWC, checks for NaN/inf and
        #: logs the penalty; without one the mixin consolidates and logs itself.
        self.secura_callback = callback

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        loss, outputs = super().compute_loss(  # type: ignore[misc]
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        if model.training and self.secura_callback is not None:
            self.secura_link.note_loss(loss)  # SecuraCallback halts the run on NaN/inf
        ewc = self.secura_ewc
        if ewc is not None and not ewc.is_empty and model.training:
            penalty = ewc.penalty(self.model)  # type: ignore[attr-defined]
            loss = loss + penalty.to(loss.dtype) * loss_term_scale(self, num_items_in_batch)
            self.secura_link.record_penalty(float(penalty.detach()))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.secura_callback is None and "loss" in logs:  # no callback logs the penalty
            logs.update(self.secura_link.drain_penalty())
        super().log(logs, *args, **kwargs)  # type: ignore[misc]

    def train(self, *args: Any, **kwargs: Any):
        output = super().train(*args, **kwargs)  # type: ignore[misc]
        if self.secura_ewc is not None and self.secura_callback is None:
            consolidate_ewc(
                self.model,  # type: ignore[attr-defined]
                self.secura_ewc,
                self.get_train_dataloader(),  # type: ignore[attr-defined]
                max_batches=self.secura_fisher_batches,
            )
        if self.secura_replay is not None and self._secura_task_rows is not None:
            self.secura_replay.add(self._secura_task_rows, task=self.secura_task_name)
        return output


#: The same mixin under the name the EWC docs use.
EWCTrainerMixin = ContinualTrainerMixin


def _sft_trainer_class() -> type:
    from trl import SFTTrainer

    class SecuraSFTTrainer(ContinualTrainerMixin, SFTTrainer):
        """``trl.SFTTrainer`` with :class:`ContinualTrainerMixin` (EWC loss term, replay)."""

    return SecuraSFTTrainer


with contextlib.suppress(ImportError):
    SecuraSFTTrainer = _sft_trainer_class()
