"""Run one method through a task sequence with the real ``SecuraSFTTrainer`` path.

For every task the model (the pretrained lab base, with the method's adapter put on
once, before the first task) is trained by ``SecuraSFTTrainer`` (``trl.SFTTrainer`` +
the continual mixin) with a ``SecuraCallback`` (SECURA merges, EWC, replay state), for
the same number of optimizer steps and batch size for every method. After each task the
lab measures, with greedy exact match (:class:`~secura_plugins.continual.RetentionProbe`):

* the accuracy on every task seen so far (one row of the accuracy matrix);
* the base-knowledge probe (every pair the base was pretrained on), reported as
  retention = probe accuracy / the base model's probe accuracy.

The base is the tiny pretrained lab base (:class:`~secura_plugins.lab.base.BaseModel`)
or the real one (:class:`~secura_plugins.lab.real.RealBase`, SmolLM2-135M-Instruct): for
the real base the probe is the filtered knowledge probe (base score 1.0 by construction,
scored per format), the tasks are TRL prompt-completion or conversational rows, and the
record adds the general-text NLL and its rise after each task.

It also records trainable parameters, seconds per optimizer step (``train_runtime`` /
steps, from the Trainer) and the training state's memory: trainable parameters +
gradients + optimizer state, counted from the tensors themselves (on CUDA also the peak
allocated memory).

Methods (:data:`METHODS`) are named, e.g. ``lora``, ``secura``, ``secura-m2``,
``lora+ewc``; ``+replay`` replays earlier *tasks'* rows; ``+replay-base`` also puts the
base-knowledge pairs in the buffer first (privileged: it needs the pretraining data).
SC-LoRA's "preserve" calibration data are the base-knowledge pairs (also privileged,
by that method's design), except for ``sclora+keep``: its preserve side is the first
task's self-rehearsal rows, written by the base before the adapter exists (no
privileged data). ``alphas`` measures the final model again with its update scaled
(:func:`~secura_plugins.keep.scale_update`, what ``secura merge --scale`` exports).

Example:
    >>> from secura_plugins.lab.runner import METHODS, method_spec
    >>> method_spec("secura-m2").adapter["merge"], method_spec("lora+ewc").ewc > 0
    ('m2', True)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..sequence import SequenceHooks, TaskRun
from .base import BaseModel
from .data import task_pairs
from .methods import EWC_LAMBDA, METHODS, REPLAY_RATIO, MethodSpec, method_spec

logger = logging.getLogger(__name__)

__all__ = [
    "EWC_LAMBDA", "METHODS", "REPLAY_RATIO", "MethodSpec", "RunSettings", "method_spec",
    "run_sequence",
]


@dataclass
class RunSettings:
    """The budget every method gets (same for all methods in one lab run)."""

    steps: int = 64
    batch_size: int = 16
    n_train: int = 512
    n_eval: int = 32
    eval_seed: int = 1000
    lr_scheduler: str = "linear"
    max_length: int = 32
    extra: dict[str, Any] = field(default_factory=dict)
    #: ``<method>+keep`` trains ``steps / (1 - keep ratio)`` steps, so that it sees as many
    #: task rows as the other methods (its rehearsal rows take the rest of each batch).
    keep_equal_task_rows: bool = False


def _rows(pairs: list[tuple[str, str]] | list[dict[str, Any]]):
    from datasets import Dataset

    return Dataset.from_list(
        [r if isinstance(r, dict) else {"prompt": r[0], "completion": r[1]} for r in pairs]
    )


# One loop for both bases: the tiny synthetic base (BaseModel) and the real one
# (lab.real.RealBase, whose tasks are chat/prompt-completion rows and whose probe items
# are rendered text pairs).
def _train_rows(base: Any, tag: str, settings: RunSettings, seed: int, tok: Any, flat: bool):
    """The task's training rows. ``flat`` (replay on the real base) renders chat rows
    through the chat template to plain prompt/completion text, so that replayed rows of
    every task share one schema (TRL then ends the completion with eos, ``<|im_end|>``,
    as the template does)."""
    if isinstance(base, BaseModel):
        return _rows(task_pairs(tag, settings.n_train, seed=seed))
    rows = base.train_rows(tag)
    if flat:
        from .real import render_pairs

        return _rows(render_pairs(rows, tok))
    return _rows(rows)


def _task_pairs(base: Any, tag: str, settings: RunSettings, seed: int, tok: Any):
    if isinstance(base, BaseModel):
        return task_pairs(tag, settings.n_train, seed=seed)
    from .real import render_pairs

    return render_pairs(base.train_rows(tag), tok)


def _eval_pairs(base: Any, tag: str, settings: RunSettings, tok: Any):
    from ..continual.probe import RetentionProbe

    if isinstance(base, BaseModel):
        pairs = task_pairs(tag, settings.n_eval, seed=settings.eval_seed)
        return RetentionProbe(pairs, tok, batch_size=64)
    return base.eval_pairs(tag, tok)


def _accuracy(model: Any, probe: Any, tok: Any) -> float:
    """Greedy exact-match accuracy: a RetentionProbe (tiny) or rendered pairs (real)."""
    if isinstance(probe, list):
        from .real import _hits

        hits = _hits(model, probe, tok)
        return sum(hits) / len(hits)
    return probe.evaluate(model)["accuracy"]


def _state_bytes(model: torch.nn.Module, optimizer: Any) -> int:
    """Bytes of trainable parameters, their gradients (same size) and optimizer state."""
    total = 0
    for p in model.parameters():
        if p.requires_grad:
            total += 2 * p.numel() * p.element_size()
    if optimizer is not None:
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
    return total


def run_sequence(
    base: Any,
    method: MethodSpec,
    tasks: list[str],
    *,
    lr: float,
    seed: int = 0,
    settings: RunSettings | None = None,
    work_dir: str | Path | None = None,
    alphas: tuple[float, ...] = (),
) -> dict[str, Any]:
    """Train ``method`` on ``tasks`` in order from ``base``; return the measured record
    (with ``alphas``, also ``record["alphas"]``: the final model's measures with its
    update scaled by each alpha)."""
    from transformers import set_seed

    from ..config import AdapterConfig
    from ..continual.ewc import EWC
    from ..continual.metrics import AccuracyMatrix
    from ..continual.probe import RetentionProbe
    from ..continual.replay import ReplayBuffer
    from ..model import apply_adapter, count_parameters
    from ..sequence import SequenceTask, calibration_batches, train_sequence

    settings = settings or RunSettings()
    set_seed(seed)
    real = not isinstance(base, BaseModel)
    model, tok = base.load()
    if real and method.adapter is None and base.spec.four_bit:
        from ..errors import SecuraConfigError

        raise SecuraConfigError(
            "--methods",
            f"{method.name!r} trains every weight and cannot run on the 4-bit base; "
            "drop it or leave out --four-bit",
        )
    knowledge = base.probe_pairs() if real else base.spec.pairs()
    probe = RetentionProbe(knowledge, tok, batch_size=128)
    if real:  # the probe holds only items the base answers: its score is 1.0 by construction
        base_probe = {"accuracy": base.recall}
        base_extra = {"nll": base.base_nll}  # measured on this base when the probe was filtered
    config, first_keep = None, None
    if method.adapter is not None:
        config = AdapterConfig.from_dict({**method.adapter, "seed": seed})
        data = {}
        if config.adapter_method.needs_calibration:
            first = _task_pairs(base, tasks[0], settings, seed, tok)
            data = {
                "positive": calibration_batches([p + a for p, a in first], tok),
                "negative": calibration_batches([p + a for p, a in knowledge], tok),
            }
            if method.keep:  # preserve what the base itself writes, not the probe
                from ..keep import Keep

                first_keep = Keep(method.keep, exclude=[p for p, _ in knowledge], progress=False,
                                  steps_scaled=settings.keep_equal_task_rows)
                rows = _train_rows(base, tasks[0], settings, seed, tok, flat=bool(method.replay))
                first_keep.ensure_rows(model, tok, rows)
                data["negative"] = first_keep.negative_batches(tok)
        model = apply_adapter(model, config, **data)
    params = count_parameters(model)
    if not real:
        base_probe = probe.evaluate(model)
    ewc = EWC(lam=method.ewc) if method.ewc else None
    buffer = None
    if method.replay:
        buffer = ReplayBuffer(capacity=4 * settings.n_train, seed=seed, ratio=method.replay)
        if method.replay_base:
            buffer.add(_rows(knowledge), task="base")
    sequence = []
    for tag in tasks:
        rows = _train_rows(base, tag, settings, seed, tok, flat=bool(method.replay))
        evals = _eval_pairs(base, tag, settings, tok)
        sequence.append(SequenceTask(tag, rows, _scorer(evals, tok)))
    matrix = AccuracyMatrix(len(tasks), tasks)
    record: dict[str, Any] = {
        "method": method.name,
        "seed": seed,
        "lr": lr,
        "tasks": list(tasks),
        "keep": method.keep,
        "trainable_params": params["trainable"],
        "base_probe": base_probe["accuracy"],
        "probe": [],
        "retention": [],
        "train_loss": [],
        "step_seconds": [],
    }
    if real:
        record.update({"base_nll": base_extra["nll"], "nll": [], "nll_rise": []})
        record["probe_by_format"] = []
    if method.keep:
        record["keep_kl"] = []
        if real:  # retention on probe items no rehearsal row mentions (lab.real.untouched)
            record.update({"kept_untouched": [], "n_untouched": []})
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        hooks = _LabHooks(base, method, settings, lr, seed, Path(tmp), record, matrix)
        hooks.ewc, hooks.buffer, hooks.probe, hooks.tok = ewc, buffer, probe, tok
        hooks.exclude = [p for p, _ in knowledge]  # rehearsal never asks the probe
        hooks.adapted = config is not None
        hooks.first_keep = first_keep
        train_sequence(
            model, tok, sequence, hooks, ewc=ewc, replay=buffer, matrix=matrix, print_logs=False
        )
        if alphas and config is not None and config.adapter_method.scalable_update:
            record["alphas"] = {str(a): hooks.at_alpha(model, a, sequence) for a in alphas}
    record["matrix"] = matrix.a
    record.update(matrix.summary())
    record["learning_accuracy"] = sum(matrix.a[i][i] for i in range(len(tasks))) / len(tasks)
    record["state_mib"] = hooks.state_bytes / 2**20
    if any(math.isnan(v) for v in record["train_loss"] if v is not None):
        logger.warning("%s seed %d: NaN training loss", method.name, seed)
    return record


def _scorer(evals: Any, tok: Any):
    return lambda model: _accuracy(model, evals, tok)


@dataclass
class _LabHooks(SequenceHooks):
    """The lab's part of the task loop: the same budget for every method, scratch
    output folders, and the record (timing, memory, probe, retention, NLL)."""

    base: Any
    method: MethodSpec
    settings: RunSettings
    lr: float
    seed: int
    tmp: Path
    record: dict[str, Any]
    matrix: Any
    ewc: Any = None
    buffer: Any = None
    probe: Any = None
    tok: Any = None
    adapted: bool = True
    exclude: list[str] = field(default_factory=list)
    state_bytes: int = 0
    keeps: list[Any] = field(default_factory=list)  # each task's Keep (its rehearsal rows)
    first_keep: Any = None  # the first task's Keep, when written before the adapter (SC-LoRA)

    def args(self, run: TaskRun) -> Any:
        from trl import SFTConfig

        settings, seed = self.settings, self.seed
        from ..keep import KeepConfig

        extra = dict(settings.extra)
        steps = settings.steps
        if self.method.keep:
            keep = KeepConfig.coerce(self.method.keep)
            if keep.anchors:
                extra.setdefault("loss_type", "nll")  # the KL anchor needs the logits
            if settings.keep_equal_task_rows:
                steps = keep.steps_for_task_rows(steps)
        return SFTConfig(
            output_dir=str(self.tmp / f"task-{run.index}"),
            max_steps=steps,
            per_device_train_batch_size=settings.batch_size,
            learning_rate=self.lr,
            lr_scheduler_type=settings.lr_scheduler,
            warmup_steps=0,
            weight_decay=0.0,
            logging_steps=max(1, steps // 4),
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=seed,
            data_seed=seed,
            use_cpu=not torch.cuda.is_available(),
            max_length=settings.max_length,
            dataloader_num_workers=0,
            bf16=False,  # TRL defaults to bf16 autocast; these runs are fp32
            **extra,
        )

    def callbacks(self, run: TaskRun) -> list[Any]:
        from ..integrations.trl import SecuraCallback
        from ..keep import Keep

        if not self.adapted:
            return []
        keep = None
        if self.method.keep:  # a fresh Keep per task: the base rehearses each task's shapes
            keep = self.first_keep if run.index == 0 and self.first_keep else Keep(
                self.method.keep, exclude=self.exclude, progress=False,
                steps_scaled=self.settings.keep_equal_task_rows)
            self.keeps.append(keep)
        return [SecuraCallback(ewc=self.ewc, replay=self.buffer, keep=keep)]

    def trained(self, run: TaskRun) -> None:
        trainer, record = run.trainer, self.record
        steps = max(trainer.state.global_step, 1)
        record["step_seconds"].append(run.output.metrics["train_runtime"] / steps)
        record.setdefault("steps", []).append(trainer.state.global_step)
        record["train_loss"].append(run.output.training_loss)
        self.state_bytes = max(self.state_bytes, _state_bytes(trainer.model, trainer.optimizer))
        if self.method.keep:
            logs = [h["keep/kl"] for h in trainer.state.log_history if "keep/kl" in h]
            record["keep_kl"].append(sum(logs) / len(logs) if logs else None)
            # what the base wrote for this task, by kind: a time or attempt bound shows here
            kinds = Counter(r["kind"] for r in (self.keeps[-1].rows or [] if self.keeps else []))
            record.setdefault("keep_rows", []).append(dict(sorted(kinds.items())))
        if torch.cuda.is_available():
            record.setdefault("cuda_peak_mib", []).append(torch.cuda.max_memory_allocated() / 2**20)

    def finished(self, run: TaskRun) -> None:
        from ..continual.metrics import retention

        model, record, i = run.trainer.model, self.record, run.index
        if not isinstance(self.base, BaseModel):
            scores = self.base.measure(model, self.tok)
            score = scores["known_kept"]
            record["probe_by_format"].append(scores["known_kept_by_format"])
            record["nll"].append(scores["nll"])
            record["nll_rise"].append(scores["nll"] - record["base_nll"])
            record.setdefault("probe_hits", []).append(
                [int(h) for hits in scores["known_hits"].values() for h in hits]
            )
            if "kept_untouched" in record:
                self._kept_untouched(scores["known_hits"])
        else:
            score = self.probe.evaluate(model)["accuracy"]
        record["probe"].append(score)
        record["retention"].append(retention(record["base_probe"], score))
        logger.info(
            "%s seed %d lr %g after %s: acc %s retention %.3f",
            self.method.name,
            self.seed,
            self.lr,
            run.task.name,
            [round(v, 3) for v in self.matrix.a[i][: i + 1]],
            record["retention"][-1],
        )

    def at_alpha(self, model: Any, alpha: float, sequence: list[Any]) -> dict[str, Any]:
        """Accuracy on every task, known kept and NLL rise with the update scaled by
        ``alpha`` (the model is scaled back afterwards)."""
        from ..keep import scale_update

        scale_update(model, alpha)
        try:
            out: dict[str, Any] = {"accuracy": [task.evaluate(model) for task in sequence]}
            if not isinstance(self.base, BaseModel):
                scores = self.base.measure(model, self.tok)
                out.update(retention=scores["known_kept"],
                           nll_rise=scores["nll"] - self.record["base_nll"])
                if self.method.keep:
                    out["kept_untouched"] = self._untouched(scores["known_hits"])[1]
            else:
                out["retention"] = self.probe.evaluate(model)["accuracy"] / self.record[
                    "base_probe"]
        finally:
            scale_update(model, 1.0 / alpha)
        return out

    def _untouched(self, known_hits: dict[str, list[bool]]) -> tuple[int, float | None]:
        """``(n, share)`` of the probe items no rehearsal row so far mentions."""
        from .real import kept_untouched

        rows = [r for keep in self.keeps for r in keep.rows or []]
        return kept_untouched(self.base.probe, known_hits, rows)

    def _kept_untouched(self, known_hits: dict[str, list[bool]]) -> None:
        """Record the retention on probe items no rehearsal row so far mentions."""
        n, share = self._untouched(known_hits)
        self.record["n_untouched"].append(n)
        self.record["kept_untouched"].append(share)


def settings_dict(settings: RunSettings) -> dict[str, Any]:
    return dataclasses.asdict(settings)


def elapsed(start: float) -> float:
    return time.perf_counter() - start
