"""TRL / transformers ``Trainer`` integration: one callback, plus a trainer mixin.

``SecuraCallback`` gives a ``trl.SFTTrainer`` (or any ``transformers.Trainer``)
forgetting-resistant training by adding one callback::

    trainer = SFTTrainer(model, args=SFTConfig(...), train_dataset=ds,
                         callbacks=[SecuraCallback(AdapterConfig(method="secura", r=16))])

What the callback does, and when (``Trainer`` events):

* ``on_init_end`` (the optimizer does not exist yet): puts the adapter on the model.
  Three starting points are accepted: a plain model (``apply_adapter``; the trainer's
  ``model`` is swapped for the ``PeftModel``), a ``PeftModel`` that TRL built from
  ``peft_config=LoraConfig(...)`` (converted in place with ``convert_peft_model``; this
  is the path for a 4-bit base, which ``Trainer`` refuses without PEFT), or a model that
  already carries a secura adapter (used as is). New tensors are created in the adapter
  dtype (fp32 by default), also on 4-bit bases where TRL casts LoRA weights to bf16.
* ``on_step_end``: calls the plugin hook ``secura_step_end`` (SECURA's M1/M2 merges) and
  keeps the metrics it returns.
* ``on_log``: adds ``secura/merges``, ``secura/gate_mean``, ``ewc/penalty`` and the
  retention probe's ``eval_retention_loss`` / ``eval_retention_accuracy`` to the
  Trainer's own ``logs`` dict. The callback moves itself in front of the reporting
  callbacks at ``on_init_end``, so TensorBoard, W&B and trackio record these keys, and
  the entry in ``trainer.state.log_history`` gets them too. The probe runs on every
  evaluation, every ``probe_steps`` training steps, and once at the end of training.
* ``on_pre_optimizer_step``: the EWC gradient ``lambda F (theta - theta*)`` is added to
  ``.grad`` (a callback cannot change the loss). This runs after gradient clipping,
  so the penalty's gradient is not clipped.
* ``on_step_end`` also checks the loss and every trainable adapter tensor (and
  ``U_acc``) for NaN/inf, one host sync per step; a non-finite value raises
  :class:`~secura_plugins.errors.TrainingDivergedError` naming the step, before the
  Trainer saves anything of that step.
* ``on_save``: writes ``secura_ewc.safetensors`` (Fisher and anchors) and
  ``secura_replay.jsonl`` (if a replay buffer is attached) into every checkpoint, then
  ``secura_callback.json`` (probe baseline, settings, and the size of every file of the
  checkpoint) *last*: it is the completion marker. ``Trainer`` writes a checkpoint
  folder file by file (model, optimizer, scheduler, RNG state, trainer state) and calls
  ``on_save`` only after all of them, so a checkpoint with a valid marker is complete;
  :func:`last_complete_checkpoint` skips any other. The adapter itself (SECURA's
  ``U_acc`` and merge count included) is written by ``Trainer`` through the model's
  ``save_pretrained``. ``trainer.train(resume_from_checkpoint=...)`` reads them back
  (``True`` picks the last complete checkpoint). Under DDP only the main process
  writes, after a barrier, so every rank's RNG file is in place before the marker.
* ``on_train_end``: folds this task's Fisher into the EWC state and re-anchors it
  (``consolidate``), so the same callback (or EWC object) protects the task in the
  next run.

The callback finds its ``Trainer`` by looking up the call stack when the Trainer calls
``on_init_end`` (``Trainer.__init__`` -> ``CallbackHandler`` -> callback). A host that
drives callbacks differently calls ``callback.bind(trainer)`` before training.

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
switches itself off), so the penalty is never applied twice.

Example (runs on CPU in a few seconds):
    >>> import tempfile
    >>> from datasets import Dataset
    >>> from trl import SFTConfig, SFTTrainer
    >>> from secura_plugins import AdapterConfig
    >>> from secura_plugins.integrations.trl import SecuraCallback
    >>> from secura_plugins.tiny import build_tiny_model, build_tokenizer
    >>> tok = build_tokenizer()
    >>> ds = Dataset.from_dict({"text": [f"{i}+{i}={2 * i}" for i in range(16)]})
    >>> args = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=2, report_to="none",
    ...                  per_device_train_batch_size=4, use_cpu=True, disable_tqdm=True,
    ...                  save_strategy="no")
    >>> cb = SecuraCallback(AdapterConfig(method="secura", r=4, merge_every=1))
    >>> trainer = SFTTrainer(build_tiny_model(vocab_size=len(tok)), args=args,
    ...                      train_dataset=ds, processing_class=tok, callbacks=[cb])
    >>> type(trainer.model).__name__
    'SecuraPeftModelForCausalLM'
    >>> _ = trainer.train()  # doctest: +ELLIPSIS
    {...'secura/merges': '2'...}
    >>> [h["secura/merges"] for h in trainer.state.log_history if "secura/merges" in h][-1]
    2.0
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers import (
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_callback import DefaultFlowCallback

from ..config import AdapterConfig
from ..continual.ewc import EWC
from ..continual.probe import RetentionProbe
from ..continual.replay import ReplayBuffer
from ..errors import SecuraConfigError, SecuraError, TrainingDivergedError
from ..faults import kill_point
from ..manager import get_plugin_manager
from ..model import apply_adapter, convert_peft_model, is_adapted

logger = logging.getLogger(__name__)

__all__ = [
    "CALLBACK_STATE_NAME",
    "ContinualTrainerMixin",
    "EWCTrainerMixin",
    "EWC_STATE_NAME",
    "REPLAY_STATE_NAME",
    "SecuraCallback",
    "SecuraSFTTrainer",
    "consolidate_ewc",
    "find_secura_callback",
    "last_complete_checkpoint",
    "sharding_problem",
]

CALLBACK_STATE_NAME = "secura_callback.json"
EWC_STATE_NAME = "secura_ewc.safetensors"
REPLAY_STATE_NAME = "secura_replay.jsonl"
#: Batches used to estimate the Fisher at the end of a task, unless the EWC sets its own.
DEFAULT_FISHER_BATCHES = 32


# --------------------------------------------------------------------------- helpers
def _checkpoint_files(folder: Path) -> dict[str, int]:
    """Relative path -> size of every file under ``folder`` except the marker."""
    return {
        p.relative_to(folder).as_posix(): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != CALLBACK_STATE_NAME and not p.name.endswith(".tmp")
    }


def checkpoint_problem(folder: str | os.PathLike, *, require_manifest: bool = True) -> str | None:
    """Why ``folder`` is not a complete checkpoint of a ``SecuraCallback`` run, or None.

    Complete means: ``secura_callback.json`` (written last) parses, and every file it
    lists is present with the size it had when the checkpoint was finished. With
    ``require_manifest=False`` a marker that lists no files (an older version's, or a
    state folder saved outside a Trainer checkpoint) is accepted as it is.
    """
    folder = Path(folder)
    marker = folder / CALLBACK_STATE_NAME
    if not marker.is_file():
        return f"no {CALLBACK_STATE_NAME} (the save was interrupted)"
    try:
        state = json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{CALLBACK_STATE_NAME} is not valid JSON"
    files = state.get("files")
    if not isinstance(files, dict):
        if not require_manifest:
            return None
        return f"{CALLBACK_STATE_NAME} lists no files (written by an older version)"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} when it was saved"
    return None


def checkpoint_folders(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-<step>`` folder under ``folder``, by step."""
    import re

    root = Path(folder)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def last_complete_checkpoint(
    folder: str | os.PathLike, *, before_step: int | None = None
) -> str | None:
    """The ``checkpoint-<step>`` folder of highest step under ``folder`` that is complete
    (see :func:`checkpoint_problem`), or None. Incomplete ones are skipped with a warning.

    ``before_step`` skips checkpoints at or after that step. Pass ``max_steps`` when
    training stops mid-epoch: transformers (5.16 to at least 5.23) resumed from a
    checkpoint *at* ``max_steps`` of a partial epoch runs one extra optimizer step, so
    the earlier checkpoint is the one that reproduces the uninterrupted run.

    Example:
        >>> import tempfile
        >>> last_complete_checkpoint(tempfile.mkdtemp()) is None
        True
    """
    for step, path in reversed(checkpoint_folders(folder)):
        if before_step is not None and step >= before_step:
            continue
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        logger.warning("skipping incomplete checkpoint %s: %s", path, problem)
    return None


def _fsync_files(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with contextlib.suppress(OSError), open(path, "rb") as fh:
                os.fsync(fh.fileno())


def sharding_problem(
    *, fsdp: bool, zero_stage: int | None, merge: str | None, ewc: bool
) -> str | None:
    """Why this combination of parameter sharding and features is refused, or None.

    SECURA's merges read whole ``A``/``B`` on each rank and EWC anchors whole tensors;
    FSDP and DeepSpeed ZeRO-3 shard parameters, and the library does not gather them
    yet (docs/scale-out.md).

    Example:
        >>> sharding_problem(fsdp=False, zero_stage=2, merge="m1", ewc=True) is None
        True
        >>> sharding_problem(fsdp=True, zero_stage=None, merge="none", ewc=False) is None
        True
        >>> print(sharding_problem(fsdp=True, zero_stage=None, merge="m1", ewc=False))
        FSDP shards SECURA's A and B, and merge 'm1' needs them whole on every rank (not supported yet); set merge: none, or train with DDP or DeepSpeed ZeRO-1/2 (docs/scale-out.md)
    """
    name = "FSDP" if fsdp else "DeepSpeed ZeRO-3" if zero_stage == 3 else None
    if name is None:
        return None
    fix = "train with DDP or DeepSpeed ZeRO-1/2 (docs/scale-out.md)"
    if merge not in (None, "none"):
        return (
            f"{name} shards SECURA's A and B, and merge {merge!r} needs them whole on every "
            f"rank (not supported yet); set merge: none, or {fix}"
        )
    if ewc:
        return (
            f"{name} shards the parameters EWC anchors and its gradients are not the "
            f"per-example ones the Fisher needs (not supported yet); drop continual.ewc, or {fix}"
        )
    return None


def _trainer_sharding(trainer: Trainer | None) -> tuple[bool, int | None]:
    if trainer is None:
        return False, None
    fsdp = bool(getattr(trainer, "is_fsdp_enabled", False))
    stage = None
    if getattr(trainer, "is_deepspeed_enabled", False):
        plugin = getattr(getattr(trainer.accelerator, "state", None), "deepspeed_plugin", None)
        stage = getattr(plugin, "zero_stage", None)
    return fsdp, stage


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _find_trainer(max_depth: int = 16) -> Trainer | None:
    """The ``Trainer`` whose method is on the call stack (``Trainer.__init__`` calling
    ``on_init_end``), or None."""
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


def _unwrap(model: nn.Module) -> nn.Module:
    """The model without accelerate/DDP wrappers (``module`` attribute chains)."""
    while not isinstance(model, PeftModel) and isinstance(
        getattr(model, "module", None), nn.Module
    ):
        model = model.module
    return model


def find_secura_callback(trainer: Trainer) -> SecuraCallback | None:
    """The ``SecuraCallback`` registered on ``trainer``, if any."""
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, SecuraCallback):
            return cb
    return None


def _prepare_for_m1(model: nn.Module) -> int:
    """What the adapter's method does before EWC re-anchors (its ``before_anchor``:
    SECURA folds pending updates ``A @ B`` into ``U_acc`` so that ``B`` is zero). Returns
    the number of layers changed."""
    from ..layers import adapted_method

    method = adapted_method(model)
    return method.before_anchor(model) if method is not None else 0


def consolidate_ewc(
    model: nn.Module,
    ewc: EWC,
    batches: Iterable[Any],
    *,
    max_batches: int | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """End of a task: Fisher of the trained model, final SECURA merge (see
    ``_prepare_for_m1``), then ``ewc.consolidate`` (running sum and anchors).

    ``batches`` are collated training batches (dicts with ``labels``), e.g. a Trainer's
    train dataloader. At most ``max_batches`` (default: ``ewc.fisher_max_batches``, else
    ``DEFAULT_FISHER_BATCHES``) are used. The CPU random state is left untouched.
    """
    limit = max_batches or ewc.fisher_max_batches or DEFAULT_FISHER_BATCHES
    model = _unwrap(model)
    with torch.random.fork_rng(devices=[]):
        # The Fisher of the trained state (B still holds the pending update: with B = 0
        # the Fisher of A would be exactly zero), then the merge, then the anchors.
        fisher = ewc.estimate_fisher(model, batches, max_batches=limit, progress=progress)
    _prepare_for_m1(model)
    return ewc.consolidate(model, fisher=fisher)


def _as_keep(keep: Any) -> Any:
    if keep is None or keep is False:
        return None
    from ..keep import Keep

    return keep if isinstance(keep, Keep) else Keep(keep)


def _as_config(config: AdapterConfig | Mapping[str, Any] | None) -> AdapterConfig | None:
    if config is None or isinstance(config, AdapterConfig):
        return config
    if isinstance(config, Mapping):
        return AdapterConfig.from_dict(dict(config))
    raise SecuraConfigError(
        "config", f"must be an AdapterConfig or a dict of its fields, got {type(config).__name__}"
    )


# --------------------------------------------------------------------------- callback
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
        self.config = _as_config(config)
        self.ewc = ewc
        self.probe = probe
        self.probe_steps = probe_steps
        self.consolidate = consolidate
        self.fisher_batches = fisher_batches
        self.replay = replay
        self.adapter_data = dict(adapter_data or {})
        self.keep = _as_keep(keep)
        #: Set by ``ContinualTrainerMixin``: the penalty is a loss term, not a gradient here.
        self.ewc_via_loss = False
        self.trainer: Trainer | None = None
        self.model: nn.Module | None = None
        self.probe_baseline: dict[str, float] | None = None
        self._pending: dict[str, float] = {}
        self._penalties: list[float] = []
        self._probe_cache: tuple[int, dict[str, float]] | None = None
        self._resume_dir: str | None = None
        self._carried = False

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
    def _restore_adapter_dtype(self, model: nn.Module, *, carried: bool) -> None:
        """Undo TRL's bf16 cast of trainable tensors on quantized bases.

        ``SFTTrainer.__init__`` casts every trainable parameter of a 4/8-bit model to
        bf16 before any callback runs. Tensors this callback creates come later and are
        unaffected; an adapter the model already carried was rounded. The mixin
        (``SecuraSFTTrainer``) snapshots those tensors first and they are restored
        exactly; otherwise they are cast back to the adapter dtype with a warning.
        """
        saved: dict[str, torch.Tensor] = getattr(self.trainer, "_secura_saved_params", None) or {}
        dtype = getattr(torch, self.config.adapter_dtype if self.config else "float32")
        rounded = []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if name in saved and saved[name].shape == param.shape:
                param.data = saved[name].to(param.device)
            elif param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
                rounded.append(name)
        if rounded and carried:
            logger.warning(
                "TRL cast %d trainable adapter tensors of this quantized model to bf16 before the "
                "callback ran (first: %s); they are back in %s but were rounded. Use "
                "SecuraSFTTrainer (or pass the base with peft_config=) to keep them exact",
                len(rounded),
                rounded[0],
                dtype,
            )
        if hasattr(self.trainer, "_secura_saved_params"):
            self.trainer._secura_saved_params = None

    def _prepare_model(self, model: nn.Module, args: Any) -> nn.Module:
        model = self._adapt(model, args)
        self._restore_adapter_dtype(model, carried=self._carried)
        return model

    def _adapt(self, model: nn.Module, args: Any) -> nn.Module:
        self._carried = is_adapted(model)
        if self._carried:
            carried = model.secura_config
            if self.config is not None and self.config.method != carried.method:
                raise SecuraConfigError(
                    "method",
                    f"the model already carries a {carried.method!r} adapter but the callback "
                    f"asks for {self.config.method!r}; pass the base model, or drop the config",
                )
            if self.config is not None and self.config.to_dict() != carried.to_dict():
                logger.warning("the model's own adapter settings are used: %s", carried)
            self.config = carried
            return model
        config = self.config or AdapterConfig()
        self.config = config
        self._keep_preserve_side(model, config)
        if isinstance(model, PeftModel):
            # TRL's peft_config path (and the only way to train a 4-bit base).
            return convert_peft_model(model, config, **self.adapter_data)
        if self.trainer is None:
            raise SecuraError(
                "SecuraCallback could not find its Trainer to swap in the adapted model. "
                "Pass apply_adapter(model, config) as the model, or call callback.bind(trainer)"
            )
        peft_model = apply_adapter(model, config, **self.adapter_data)
        trainer = self.trainer
        trainer.model = trainer.model_wrapped = peft_model
        trainer.callback_handler.model = peft_model
        if getattr(args, "gradient_checkpointing", False):
            peft_model.enable_input_require_grads()
        return peft_model

    def _keep_exclude_probe(self) -> None:
        """Never let the self-rehearsal produce a retention-probe prompt."""
        if self.keep is None or self.probe is None:
            return
        if not isinstance(self.probe, RetentionProbe):
            self.probe = list(self.probe)
        pairs = self.probe.pairs if isinstance(self.probe, RetentionProbe) else self.probe
        self.keep.exclude |= {str(p["prompt"] if isinstance(p, Mapping) else p[0]) for p in pairs}

    def _keep_preserve_side(self, model: nn.Module, config: AdapterConfig) -> None:
        """SC-LoRA without privileged data: its ``negative=`` side is the self-rehearsal."""
        if (
            self.keep is None
            or not config.adapter_method.needs_calibration
            or "negative" in self.adapter_data
        ):
            return
        self._keep_exclude_probe()
        trainer = self.trainer
        if trainer is None:
            raise SecuraError("keep with sclora: bind the callback to its Trainer first")
        tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
        self.keep.ensure_rows(
            model, tokenizer, trainer.train_dataset, run_dir=trainer.args.output_dir
        )
        self.adapter_data["negative"] = self.keep.negative_batches(tokenizer)
        if "positive" not in self.adapter_data:
            rows = trainer.train_dataset.select(range(min(64, len(trainer.train_dataset))))
            self.adapter_data["positive"] = [
                {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids))}
                for ids in rows["input_ids"]
            ]

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
        trainer = self.trainer or _find_trainer()
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
            self.model = _unwrap(model)
        fsdp, stage = _trainer_sharding(self.trainer)
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
        if self.ewc is not None and not self.ewc_via_loss and not self.ewc.is_empty:
            self._penalties.append(self.ewc.penalty_grad_(self.model))
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
            marker = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            with contextlib.suppress(FileNotFoundError):
                (marker / CALLBACK_STATE_NAME).unlink()
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
        from ..layers import adapted_method

        loss_ok = getattr(self.trainer, "_secura_loss_ok", None)
        if self.trainer is not None:
            self.trainer._secura_loss_ok = None  # type: ignore[attr-defined]
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
        """Record an EWC penalty value for the next training log (used by the mixin)."""
        self._penalties.append(float(value))

    def _drain(self) -> dict[str, float]:
        out = dict(self._pending)
        if self._penalties:
            out["ewc/penalty"] = sum(self._penalties) / len(self._penalties)
            self._penalties.clear()
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
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if _distributed():
            torch.distributed.barrier()  # every rank's files (RNG states) are written
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
        if (
            self.ewc is not None
            and self.consolidate
            and train_dataloader is not None
            and not getattr(self.trainer, "_secura_consolidates", False)
        ):
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
        if manifest:
            kill_point("checkpoint-marker")  # test-only crash point (secura_plugins.faults)
            _fsync_files(folder)
            state["files"] = _checkpoint_files(folder)
        tmp = folder / (CALLBACK_STATE_NAME + ".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, folder / CALLBACK_STATE_NAME)

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
        state = json.loads(path.read_text())
        self.probe_baseline = state.get("probe_baseline")
        if state.get("ewc"):
            loaded = EWC.load(folder / EWC_STATE_NAME)
            if self.ewc is None:
                self.ewc = loaded
            else:
                self.ewc.load_state_dict(loaded.state_dict())
        if state.get("replay") and self.replay is not None:
            self.replay.load_state_dict(ReplayBuffer.load(folder / REPLAY_STATE_NAME).state_dict())


# --------------------------------------------------------------------------- mixin
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
        model = kwargs.get("model", args[0] if args else None)
        if is_adapted(model):
            # SFTTrainer casts trainable tensors of quantized models to bf16 in __init__;
            # SecuraCallback puts these exact values back (see _restore_adapter_dtype).
            self._secura_saved_params = {
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
            callback.keep = _as_keep(keep)
        if ewc is None and callback is not None:
            ewc = callback.ewc
        if callback is not None and ewc is not None:
            callback.ewc = ewc
            callback.ewc_via_loss = True
        self.secura_ewc = ewc
        # Consolidation is done by the callback's on_train_end when there is one.
        self._secura_consolidates = callback is None

    def _penalty_scale(self, num_items_in_batch: Any) -> float:
        from ..continual.ewc import penalty_scale

        return penalty_scale(self, num_items_in_batch)

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
        if model.training:  # SecuraCallback halts the run on a NaN/inf loss
            ok = torch.isfinite(loss.detach()).all()
            prev = getattr(self, "_secura_loss_ok", None)
            self._secura_loss_ok = ok if prev is None else prev & ok
        ewc = self.secura_ewc
        if ewc is not None and not ewc.is_empty and model.training:
            penalty = ewc.penalty(self.model)  # type: ignore[attr-defined]
            loss = loss + penalty.to(loss.dtype) * self._penalty_scale(num_items_in_batch)
            self._secura_record(float(penalty.detach()))
        return (loss, outputs) if return_outputs else loss

    def _secura_record(self, value: float) -> None:
        callback = find_secura_callback(self)  # type: ignore[arg-type]
        if callback is not None:
            callback.record_penalty(value)
        else:
            self.__dict__.setdefault("_secura_penalties", []).append(value)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        values = self.__dict__.get("_secura_penalties")
        if values and "loss" in logs:
            logs["ewc/penalty"] = sum(values) / len(values)
            values.clear()
        super().log(logs, *args, **kwargs)  # type: ignore[misc]

    def train(self, *args: Any, **kwargs: Any):
        output = super().train(*args, **kwargs)  # type: ignore[misc]
        if self.secura_ewc is not None and self._secura_consolidates:
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
