"""Running a recipe: :func:`run_recipe` sets up the model, adapter and continual state,
then trains the tasks with the package's one task loop
(:func:`secura_plugins.sequence.train_sequence`); :class:`_RecipeHooks` holds what is
particular to a recipe: the run folder (per-task outputs, resume) and its records.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._fs import atomic_write_json
from ..errors import SecuraConfigError
from ..sequence import SequenceHooks, SequenceTask, TaskRun, calibration_batches, train_sequence
from .fields import _reprefix
from .rundir import _claim_output_dir, _clean_task_dir, _writable_output_dir
from .schema import ModelSpec, Recipe

logger = logging.getLogger(__name__)

__all__ = ["run_recipe"]


def _load_model(spec: ModelSpec, output_dir: Path):
    """(model, tokenizer) for a model spec; a tiny model is saved under output_dir/base."""
    from ..loading import load_base, load_tokenizer

    name = spec.name_or_path
    if spec.tiny is not None:
        from ..tiny import save_tiny_checkpoint

        base_dir = output_dir / "base"
        if not (base_dir / "config.json").is_file():
            save_tiny_checkpoint(base_dir, spec.tiny, seed=spec.seed)
        name = str(base_dir)
    assert name is not None  # ModelSpec.from_dict requires tiny or name_or_path
    model = load_base(
        name,
        load_in_4bit=spec.load_in_4bit,
        dtype=spec.dtype,
        trust_remote_code=spec.trust_remote_code,
        attn_implementation=spec.attn_implementation,
        field="model.load_in_4bit",
    )
    tokenizer = load_tokenizer(spec.tokenizer or name, trust_remote_code=spec.trust_remote_code)
    if spec.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=spec.gradient_checkpointing
        )
    return model, tokenizer


def _calibration_batches(rows, tokenizer, n: int = 8) -> list[dict[str, Any]]:
    """A few tokenized batches of ``rows`` (SC-LoRA's calibration data)."""
    texts = []
    for row in rows.select(range(min(len(rows), 4 * n))):
        if "text" in row:
            texts.append(row["text"])
        elif "prompt" in row:
            texts.append(f"{row['prompt']}{row.get('completion', row.get('answer', ''))}")
    return calibration_batches(texts, tokenizer, n)


def _check_datasets(recipe: Recipe) -> list[Any]:
    """Every task's training rows (a clear error for an empty file or no rows)."""
    for i, task in enumerate(recipe.tasks):
        if task.data.path is not None and not Path(task.data.path).read_text().strip():
            raise SecuraConfigError(
                f"tasks[{i}].data.path",
                f"{task.data.path} is empty; give the task at least one training example",
            )
    datasets = [task.data.load() for task in recipe.tasks]
    for i, ds in enumerate(datasets):
        if len(ds) == 0:
            raise SecuraConfigError(
                f"tasks[{i}].data", "has no rows; give the task at least one training example"
            )
    return datasets


def run_recipe(
    recipe: Recipe,
    *,
    resume: bool | None = None,
    progress: bool = True,
    output_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train the recipe's tasks in order and return (and write) ``results.json``'s content.

    Rerunning the same recipe into the same ``output_dir`` resumes it: the folder
    records which recipe it holds (``secura_run.json``); finished tasks (their
    ``metrics.json``, written last, exists) are skipped and their adapter, EWC and
    replay state reloaded; an interrupted task resumes from its last *complete* Trainer
    checkpoint (adapter with ``U_acc`` and merge count, optimizer, scheduler, RNG
    states, EWC Fisher and anchors, replay buffer); half-written checkpoints are
    deleted. The result equals an uninterrupted run's. A different recipe in the same
    folder is refused. ``resume=None`` (default) does this; ``True`` also continues a
    folder without a record (older versions); ``False`` refuses any existing run.
    """
    from transformers import set_seed

    from ..continual.metrics import AccuracyMatrix
    from ..continual.plugin import continual_registry
    from ..continual.probe import RetentionProbe
    from ..io import save_adapter
    from ..model import apply_adapter

    out = _writable_output_dir(Path(output_dir or recipe.output_dir))
    set_seed(recipe.seed)
    datasets = _check_datasets(recipe)
    base, tokenizer = _load_model(recipe.model, out)
    data: dict[str, Any] = {}
    probe_pairs = recipe.probe.data.pairs() if recipe.probe else None
    calibrated = recipe.adapter.adapter_method.needs_calibration
    if calibrated and recipe.keep is not None:
        keep = _task_keep(recipe.keep, probe_pairs, progress)
        keep.ensure_rows(base, tokenizer, datasets[0], run_dir=out)
        data = {
            "positive": _calibration_batches(datasets[0], tokenizer),
            "negative": keep.negative_batches(tokenizer),
        }
    elif calibrated:
        if probe_pairs is None:
            raise SecuraConfigError(
                "adapter.method", "sclora needs a probe (its knowledge-to-preserve data)"
            )
        data = {
            "positive": _calibration_batches(datasets[0], tokenizer),
            "negative": calibration_batches([p + a for p, a in probe_pairs], tokenizer),
        }
    try:
        model = apply_adapter(base, recipe.adapter, **data)
    except SecuraConfigError as err:
        raise _reprefix(err, "adapter") from None

    registry = continual_registry()
    ewc = None
    fisher_batches = None
    if recipe.ewc is not None:
        settings = dict(recipe.ewc)
        fisher_batches = settings.pop("fisher_batches", None)
        ewc = _build("ewc", registry.get("ewc"), settings)
    buffer = None
    if recipe.replay is not None:
        buffer = _build("replay", registry.get("replay"), {"seed": recipe.seed, **recipe.replay})
    probe = RetentionProbe(probe_pairs, tokenizer) if probe_pairs else None
    tasks = []
    for task, rows in zip(recipe.tasks, datasets, strict=True):
        scorer = None
        if task.eval is not None:
            scorer = _scorer(RetentionProbe(task.eval.pairs(), tokenizer))
        tasks.append(SequenceTask(task.name, rows, scorer))
    names = [t.name for t in recipe.tasks]
    matrix = AccuracyMatrix(len(names), names)
    results: dict[str, Any] = {"tasks": [], "output_dir": str(out)}
    resume = _claim_output_dir(out, recipe, resume)  # everything above validated the recipe
    base_probe = probe.evaluate(model) if probe else None
    results["probe_before"] = base_probe

    hooks = _RecipeHooks(recipe, out, bool(resume), progress, model, matrix, results)
    hooks.ewc, hooks.buffer, hooks.fisher_batches = ewc, buffer, fisher_batches
    hooks.probe, hooks.probe_pairs, hooks.base_probe = probe, probe_pairs, base_probe
    model = train_sequence(
        model, tokenizer, tasks, hooks, ewc=ewc, replay=buffer, matrix=matrix, progress=progress
    )
    save_adapter(model, out / "adapter")
    results["accuracy_matrix"] = matrix.a
    if all(t.evaluate is not None for t in tasks):
        results.update(matrix.summary())
    results["adapter"] = str(out / "adapter")
    atomic_write_json(out / "results.json", results)
    return results


def _scorer(probe: Any) -> Callable[[Any], float]:
    return lambda model: probe.evaluate(model)["accuracy"]


@dataclass
class _RecipeHooks(SequenceHooks):
    """A recipe's part of the task loop: ``task-<i>-<name>/`` folders, resume, records."""

    recipe: Recipe
    out: Path
    resume: bool
    progress: bool
    model: Any
    matrix: Any
    results: dict[str, Any]
    ewc: Any = None
    buffer: Any = None
    fisher_batches: int | None = None
    probe: Any = None
    probe_pairs: list[tuple[str, str]] | None = None
    base_probe: dict[str, float] | None = None

    def _dir(self, run: TaskRun) -> Path:
        return self.out / f"task-{run.index}-{run.task.name}"

    def restore(self, run: TaskRun) -> bool:
        from ..continual.replay import ReplayBuffer
        from ..io import load_adapter_weights

        task_dir = self._dir(run)
        metrics_path = task_dir / "metrics.json"
        if not (self.resume and metrics_path.is_file()):
            return False
        done = json.loads(metrics_path.read_text())
        load_adapter_weights(self.model, task_dir / "adapter", is_trainable=True)
        ewc, buffer = self.ewc, self.buffer
        if ewc is not None and (task_dir / "ewc.safetensors").is_file():
            ewc.load_state_dict(type(ewc).load(task_dir / "ewc.safetensors").state_dict())
        if buffer is not None and (task_dir / "replay.jsonl").is_file():
            buffer.load_state_dict(ReplayBuffer.load(task_dir / "replay.jsonl").state_dict())
        for j, value in enumerate(done.get("accuracy_row", [])):
            if value is not None:
                self.matrix.record(run.index, j, value)
        self.results["tasks"].append(done)
        return True

    def args(self, run: TaskRun) -> Any:
        keep_settings = {}
        if self.recipe.keep is not None and self.recipe.keep["kl_lambda"] > 0:
            keep_settings["loss_type"] = "nll"  # the KL anchor needs the logits
        return self.recipe.task_config(
            run.index, self._dir(run), disable_tqdm=not self.progress, **keep_settings
        )

    def callbacks(self, run: TaskRun) -> list[Any]:
        from ..integrations.trl import SecuraCallback

        recipe = self.recipe
        keep = recipe.keep
        callback = SecuraCallback(
            keep=None if keep is None else _task_keep(keep, self.probe_pairs, self.progress),
            ewc=self.ewc,
            probe=self.probe,
            probe_steps=recipe.probe.steps if recipe.probe else None,
            fisher_batches=self.fisher_batches,
            replay=self.buffer,
        )
        callback.probe_baseline = self.base_probe  # retention is relative to the base model
        return [callback]

    def checkpoint(self, run: TaskRun) -> str | None:
        from ..integrations.trl import last_complete_checkpoint

        task_dir = self._dir(run)
        if not (self.resume and task_dir.is_dir()):
            return None
        # Not the checkpoint at max_steps itself: transformers would train one step too
        # many from it (see last_complete_checkpoint); the one before reproduces the
        # uninterrupted run (or, with none, the task restarts from its start).
        max_steps = run.args.max_steps
        checkpoint = last_complete_checkpoint(
            task_dir, before_step=max_steps if max_steps > 0 else None
        )
        _clean_task_dir(task_dir, checkpoint)  # later ones are written again
        if checkpoint:
            logger.info("task %s resumes from %s", run.task.name, checkpoint)
        return checkpoint

    def trained(self, run: TaskRun) -> None:
        from ..faults import kill_point
        from ..io import save_adapter

        task_dir = self._dir(run)
        save_adapter(run.trainer.model, task_dir / "adapter")
        if self.ewc is not None:
            self.ewc.save(task_dir / "ewc.safetensors")
        if self.buffer is not None:
            self.buffer.save(task_dir / "replay.jsonl")
        kill_point("task-metrics")  # test-only crash point (see secura_plugins.faults)

    def finished(self, run: TaskRun) -> None:
        state = run.trainer.state
        done = {
            "task": run.task.name,
            "steps": state.global_step,
            "train_loss": next(
                (h["train_loss"] for h in reversed(state.log_history) if "train_loss" in h),
                None,
            ),
            "accuracy_row": run.row,
            "probe": self.probe.evaluate(run.trainer.model) if self.probe else None,
            "replay_rows": run.replayed,
            "ewc_tasks": self.ewc.num_tasks if self.ewc is not None else 0,
        }
        atomic_write_json(self._dir(run) / "metrics.json", done)
        self.results["tasks"].append(done)


def _task_keep(settings: dict[str, Any], probe_pairs: Any, progress: bool) -> Any:
    """A fresh :class:`~secura_plugins.keep.Keep` per task (the base rehearses each task's
    shapes), never producing a probe prompt."""
    from ..keep import Keep

    return Keep(settings, exclude=[p for p, _ in probe_pairs or []], progress=progress)


def _build(name: str, factory: Callable[..., Any], settings: dict[str, Any]) -> Any:
    try:
        return factory(**settings)
    except TypeError as err:
        raise SecuraConfigError(f"continual.{name}", str(err)) from None
    except ValueError as err:
        # the continual classes name the field first ("lam: must be >= 0 ...")
        field_name, _, message = str(err).partition(": ")
        raise SecuraConfigError(f"continual.{name}.{field_name}", message or str(err)) from None
