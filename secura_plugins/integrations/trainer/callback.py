"""``SecuraCallback``: forgetting-resistant training for any ``transformers.Trainer``.

What the callback does, and when (``Trainer`` events):

* ``on_init_end``: finds its Trainer (:func:`.state.find_trainer`) and puts the adapter
  on the model (:mod:`.adapt`) before the optimizer exists.
* ``on_step_end``: the plugin hook ``secura_step_end`` (SECURA's M1/M2 merges; its
  metrics are kept), then a NaN/inf check of the loss, every trainable adapter tensor
  and ``U_acc`` (one host sync): a non-finite value raises
  :class:`~secura_plugins.errors.TrainingDivergedError` before anything of the step is saved.
* ``on_log``: adds ``secura/merges``, ``secura/gate_mean``, ``ewc/penalty`` and the
  retention probe's ``eval_retention_*`` to the Trainer's ``logs`` (the callback runs
  before the reporting callbacks, so TensorBoard, W&B and trackio record them, and
  ``trainer.state.log_history`` too). The probe runs on every evaluation, every
  ``probe_steps`` training steps, and at the end of training.
* ``on_pre_optimizer_step``: adds the EWC gradient ``lambda F (theta - theta*)`` to
  ``.grad`` (after gradient clipping: a callback cannot change the loss).
* ``on_save``: EWC state, replay buffer, then the completion marker, into every
  checkpoint (format: :mod:`.checkpoint`); under DDP after a barrier, so every rank's
  RNG file is in place first. ``trainer.train(resume_from_checkpoint=...)`` reads them
  back (``True`` picks the last complete checkpoint).
* ``on_train_end``: folds the task's Fisher into the EWC state and re-anchors
  (:func:`~secura_plugins.continual.consolidate.consolidate_ewc`) for the next task.

With a :class:`~.mixin.ContinualTrainerMixin` the two share ``callback.link`` (a
:class:`~.state.TrainerLink`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import DefaultFlowCallback

from ...config import AdapterConfig
from ...continual.consolidate import consolidate_ewc
from ...continual.ewc import EWC
from ...continual.probe import RetentionProbe
from ...continual.replay import ReplayBuffer
from ...errors import SecuraConfigError, SecuraError, TrainingDivergedError
from ...layers import adapted_method
from ...manager import get_plugin_manager
from ...model import is_adapted
from .adapt import adapt_model, as_config, as_keep, keep_calibration, restore_adapter_dtype
from .checkpoint import (
    CALLBACK_STATE_NAME,
    EWC_STATE_NAME,
    REPLAY_STATE_NAME,
    checkpoint_dir,
    checkpoint_problem,
    last_complete_checkpoint,
    read_marker,
    sharding_problem,
    trainer_sharding,
    write_marker,
)
from .state import TrainerLink, find_trainer, wait_for_everyone

logger = logging.getLogger(__name__)

__all__ = ["SecuraCallback", "find_secura_callback"]


def find_secura_callback(trainer: Trainer) -> SecuraCallback | None:
    """The ``SecuraCallback`` registered on ``trainer``, if any."""
    return secura_callback_in(trainer.callback_handler.callbacks)


def secura_callback_in(callbacks: Iterable[Any] | None) -> SecuraCallback | None:
    """The first ``SecuraCallback`` instance in ``callbacks``, if any."""
    return next((cb for cb in callbacks or () if isinstance(cb, SecuraCallback)), None)


class SecuraCallback(TrainerCallback):
    """Adapter, merges, EWC, retention probe and checkpoint state for a ``Trainer``.

    Args:
        config: the adapter (``AdapterConfig`` or a dict of its fields). ``None`` uses
            the adapter the model already carries, or ``AdapterConfig()`` (SECURA).
        ewc: an :class:`~secura_plugins.continual.EWC` (empty for the first task, or
            carried over from earlier tasks). ``None`` switches EWC off.
        probe: a :class:`~secura_plugins.continual.RetentionProbe`, or a list of
            ``(prompt, answer)`` pairs (the trainer's tokenizer is used).
        probe_steps: also run the probe on every training log whose step is a
            multiple of this (it always runs on evaluations and at the end).
        consolidate: fold the task's Fisher into ``ewc`` at the end of training.
        fisher_batches: batches of the train dataloader used for that Fisher.
        replay: a :class:`~secura_plugins.continual.ReplayBuffer` to save with every
            checkpoint (mixing happens before the trainer is built; see module doc).
        adapter_data: calibration data for ``apply_adapter``/``convert_peft_model``
            (SC-LoRA's ``positive=``/``negative=``).
        keep: self-rehearsal and the KL anchor to the base (a
            :class:`~secura_plugins.keep.Keep`, a ``KeepConfig``, a dict, or a preset
            name such as ``"keep"``); see :mod:`secura_plugins.keep.runtime`. With
            SC-LoRA and no ``negative=``, the rehearsal rows are its preserve side.
    """

    def __init__(
        self,
        config: AdapterConfig | Mapping[str, Any] | None = None,
        *,
        ewc: EWC | None = None,
        probe: RetentionProbe | Iterable[tuple[str, str]] | None = None,
        probe_steps: int | None = None,
        consolidate: bool = True,
        fisher_batches: int | None = None,
        replay: ReplayBuffer | None = None,
        adapter_data: Mapping[str, Any] | None = None,
        keep: Any = None,
    ) -> None:
        if probe_steps is not None and probe_steps < 1:
            raise SecuraConfigError("probe_steps", f"must be >= 1 or None, got {probe_steps}")
        self.config = as_config(config)
        self.ewc = ewc
        self.probe = probe
        self.probe_steps = probe_steps
        self.consolidate = consolidate
        self.fisher_batches = fisher_batches
        self.replay = replay
        self.adapter_data = dict(adapter_data or {})
        self.keep = as_keep(keep)
        #: Shared with a ``ContinualTrainerMixin`` (see :class:`TrainerLink`).
        self.link = TrainerLink()
        self.trainer: Trainer | None = None
        self.model: nn.Module | None = None
        self.probe_baseline: dict[str, float] | None = None
        self._pending: dict[str, float] = {}
        self._probe_cache: tuple[int, dict[str, float]] | None = None
        self._resume_dir: str | None = None

    # ------------------------------------------------------------------ binding
    def bind(self, trainer: Trainer) -> SecuraCallback:
        """Attach to ``trainer``: run before reporting callbacks, learn the resume folder.

        Called automatically from ``on_init_end``; call it yourself only if your host
        does not build the callback handler the way ``transformers.Trainer`` does.
        """
        if self.trainer is trainer:
            return self
        self.trainer = trainer
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
            at = 1 if callbacks and isinstance(callbacks[0], DefaultFlowCallback) else 0
            callbacks.insert(at, self)
        original_train = trainer.train

        def train(resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
            self._resume_dir = self._resolve_resume(trainer, resume_from_checkpoint)
            if self.keep is not None:
                self._keep_exclude_probe()
                self.keep.before_train(trainer, self._resume_dir)
            # True would let Trainer pick the newest folder, complete or not.
            return original_train(self._resume_dir, *args, **kwargs)

        train.__doc__ = original_train.__doc__
        trainer.train = train  # instance attribute: records where a resume reads from
        return self

    @staticmethod
    def _resolve_resume(trainer: Trainer, resume: str | bool | None) -> str | None:
        if resume is None or resume is False:
            return None
        if resume is True:
            max_steps = trainer.args.max_steps
            found = last_complete_checkpoint(
                trainer.args.output_dir, before_step=max_steps if max_steps > 0 else None
            )
            if found is None:
                raise SecuraError(
                    f"resume_from_checkpoint=True but {trainer.args.output_dir} holds no "
                    "complete checkpoint; train without resuming"
                )
            return found
        return str(resume)

    # ------------------------------------------------------------------ model
    def _prepare_model(self, model: nn.Module, args: Any) -> nn.Module:
        method = (self.config or AdapterConfig()).adapter_method
        if (
            self.keep is not None
            and method.needs_calibration
            and "negative" not in self.adapter_data
            and not is_adapted(model)
        ):  # SC-LoRA without privileged data: its preserve side is the self-rehearsal
            self._keep_exclude_probe()
            rows = keep_calibration(self.keep, model, self.trainer)
            self.adapter_data = {**rows, **self.adapter_data}
        model, self.config, carried = adapt_model(
            model, self.config, trainer=self.trainer, args=args, adapter_data=self.adapter_data
        )
        restore_adapter_dtype(model, self.config, self.link.saved_params, carried=carried)
        self.link.saved_params = None
        return model

    def _keep_exclude_probe(self) -> None:
        """Never let the self-rehearsal produce a retention-probe prompt."""
        if self.keep is None or self.probe is None:
            return
        if not isinstance(self.probe, RetentionProbe):
            self.probe = list(self.probe)
        pairs = self.probe.pairs if isinstance(self.probe, RetentionProbe) else self.probe
        self.keep.exclude |= {str(p["prompt"] if isinstance(p, Mapping) else p[0]) for p in pairs}

    # ------------------------------------------------------------------ events
    def on_init_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        processing_class: Any = None,
        **kwargs: Any,
    ) -> TrainerControl:
        trainer = self.trainer or find_trainer()
        if trainer is not None:
            self.bind(trainer)
        if model is None:
            raise SecuraError("SecuraCallback needs the Trainer's model at on_init_end")
        self.model = self._prepare_model(model, args)
        if self.probe is not None and not isinstance(self.probe, RetentionProbe):
            tokenizer = getattr(processing_class, "tokenizer", processing_class)
            if tokenizer is None:
                raise SecuraConfigError("probe", "give a RetentionProbe or a processing_class")
            self.probe = RetentionProbe(list(self.probe), tokenizer)
        return control

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> TrainerControl:
        if model is not None:
            self.model = extract_model_from_parallel(model)
        fsdp, stage = trainer_sharding(self.trainer)
        problem = sharding_problem(
            fsdp=fsdp,
            zero_stage=stage,
            merge=self.config.adapter_method.periodic_merge(self.config) if self.config else None,
            ewc=self.ewc is not None,
        )
        if problem is not None:
            raise SecuraConfigError("parallelism", problem)
        if self._resume_dir is not None and state.global_step > 0:
            self._load_state(Path(self._resume_dir))
        if self.probe is not None and self.probe_baseline is None and state.global_step == 0:
            self.probe_baseline = self.probe.evaluate(self.model)
            logger.info("retention probe before training: %s", self.probe_baseline)
        return control

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        if self.ewc is not None and not self.link.ewc_via_loss and not self.ewc.is_empty:
            self.link.record_penalty(self.ewc.penalty_grad_(self.model))
        return control

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        results = get_plugin_manager().hook.secura_step_end(
            model=self.model, step=state.global_step
        )
        self._check_finite(state.global_step)
        if control.should_save and args.should_save:
            # Trainer is about to write into checkpoint-<step>; if that folder exists
            # (a resumed run redoing steps), it is not complete until on_save says so.
            folder = checkpoint_dir(args.output_dir, state.global_step)
            (folder / CALLBACK_STATE_NAME).unlink(missing_ok=True)
        for metrics in results:
            if metrics:
                self._pending.update({k: float(v) for k, v in metrics.items()})
        if (
            self.probe is not None
            and self.probe_steps
            and state.global_step % self.probe_steps == 0
        ):
            control.should_log = True  # the probe rides on a training log at this step
        return control

    def _check_finite(self, step: int) -> None:
        """Raise ``TrainingDivergedError`` if the loss or an adapter tensor is NaN/inf.

        One host sync per step over the trainable tensors and ``U_acc`` (small). Runs
        in ``on_step_end``, before the Trainer saves anything of this step.
        """
        loss_ok = self.link.take_loss_ok()
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        method = adapted_method(self.model)
        named += list(method.state_tensors(self.model).items()) if method is not None else []
        flags = [torch.isfinite(t.detach()).all() for _, t in named]
        if loss_ok is not None:
            flags.append(loss_ok.reshape(()))
        if not flags:
            return
        # The flags stay on the device: reading their .all() is the step's one host sync.
        device = flags[0].device
        ok = torch.stack([f.to(device) for f in flags])
        if bool(ok.all()):
            return
        if loss_ok is not None and not bool(loss_ok):
            what = "the training loss"
        else:
            what = next(
                f"adapter tensor {n}" for (n, _), good in zip(named, ok.tolist()) if not good
            )
        raise TrainingDivergedError(
            f"step {step}: training diverged ({what} is NaN or inf). Stopped before anything "
            "of this step was saved: the checkpoints and adapters already on disk are intact. "
            "Lower the learning rate, enable gradient clipping (max_grad_norm), or check this "
            "step's data, then rerun"
        )

    def record_penalty(self, value: float) -> None:
        """Record an EWC penalty value for the next training log."""
        self.link.record_penalty(value)

    def _drain(self) -> dict[str, float]:
        out = dict(self._pending)
        out.update(self.link.drain_penalty())
        return out

    def _run_probe(self, step: int) -> dict[str, float]:
        """Probe metrics for ``step`` (computed once per step, reused by later logs)."""
        if self.probe is None:
            return {}
        if self._probe_cache is not None and self._probe_cache[0] == step:
            return dict(self._probe_cache[1])
        scores = self.probe.evaluate(self.model)
        out = {f"eval_retention_{k}": v for k, v in scores.items()}
        base = (self.probe_baseline or {}).get("accuracy")
        if base and "accuracy" in scores:
            out["eval_retention_kept"] = scores["accuracy"] / base
        self._probe_cache = (step, out)
        return dict(out)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> TrainerControl:
        if logs is None or self.model is None:
            return control
        before = dict(logs)
        is_train = "loss" in logs
        is_final = "train_runtime" in logs
        is_eval = any(k.startswith("eval_") for k in logs) and not is_final
        extra: dict[str, float] = {}
        if is_train or is_final:
            extra.update(self._drain())
            if self.keep is not None:
                extra.update(self.keep.drain())
        due = is_train and self.probe_steps and state.global_step % self.probe_steps == 0
        if is_eval or is_final or due:
            extra.update(self._run_probe(state.global_step))
        if not extra:
            return control
        logs.update(extra)
        if state.log_history:
            last = state.log_history[-1]
            if all(last.get(k) == v for k, v in before.items()):
                last.update(extra)
        return control

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        folder = checkpoint_dir(args.output_dir, state.global_step)
        wait_for_everyone(self.trainer)  # every rank's files (RNG states) are written
        if args.should_save and folder.is_dir():
            self.save_state(folder, manifest=True)
        return control

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        train_dataloader: Any = None,
        **kwargs: Any,
    ) -> TrainerControl:
        if self.ewc is not None and self.consolidate and train_dataloader is not None:
            consolidate_ewc(self.model, self.ewc, train_dataloader, max_batches=self.fisher_batches)
        return control

    # ------------------------------------------------------------------ state
    def save_state(self, folder: str | os.PathLike, *, manifest: bool = False) -> None:
        """Write the callback's state (EWC, replay, then the JSON marker) into ``folder``.

        The JSON is written last. With ``manifest`` (Trainer checkpoints, from
        ``on_save``) the files of ``folder`` are fsynced and the JSON lists each with its
        size, which marks the checkpoint complete (see :func:`checkpoint_problem`).
        """
        folder = Path(folder)
        state = {
            "format": 1,
            "config": None if self.config is None else self.config.to_dict(),
            "probe_baseline": self.probe_baseline,
            "ewc": self.ewc is not None,
            "replay": self.replay is not None,
        }
        if self.ewc is not None:
            self.ewc.save(folder / EWC_STATE_NAME)
        if self.replay is not None:
            self.replay.save(folder / REPLAY_STATE_NAME)
        if self.keep is not None:
            self.keep.save(folder)
        write_marker(folder, state, manifest=manifest)

    def _load_state(self, folder: Path) -> None:
        path = folder / CALLBACK_STATE_NAME
        if not path.is_file():
            logger.warning(
                "%s has no %s; resuming without SECURA callback state", folder, path.name
            )
            return
        problem = checkpoint_problem(folder, require_manifest=False)
        if problem is not None:
            raise SecuraError(
                f"{folder} is an incomplete checkpoint ({problem}); resume from an earlier "
                "one, or pass resume_from_checkpoint=True to pick the last complete one"
            )
        state = read_marker(folder)
        self.probe_baseline = state.get("probe_baseline")
        if state.get("ewc"):
            loaded = EWC.load(folder / EWC_STATE_NAME)
            if self.ewc is None:
                self.ewc = loaded
            else:
                self.ewc.load_state_dict(loaded.state_dict())
        if state.get("replay") and self.replay is not None:
            self.replay.load_state_dict(ReplayBuffer.load(folder / REPLAY_STATE_NAME).state_dict())
