"""One task-sequence loop: train tasks in order with ``SecuraSFTTrainer`` and measure.

Both ``secura train`` (:func:`secura_plugins.recipe.run_recipe`) and the lab
(:func:`secura_plugins.lab.runner.run_sequence`) call :func:`train_sequence`. Per task it

1. asks ``hooks.restore`` whether the task was finished before (a resumed recipe);
2. builds the task's ``SFTConfig`` (``hooks.args``) and callbacks (``hooks.callbacks``)
   and a :class:`~secura_plugins.integrations.trl.SecuraSFTTrainer` with the shared EWC
   and replay state (the trainer adds the EWC loss term and mixes replayed rows in;
   EWC is consolidated and the task's rows are buffered when training ends);
3. trains, from ``hooks.checkpoint`` when resuming;
4. calls ``hooks.trained`` (save, time, count), then scores every task seen so far
   (one row of the accuracy matrix) and calls ``hooks.finished`` with it.

What differs between the callers (where outputs go, what is recorded, resume) lives in
their :class:`SequenceHooks` subclass, not in a copy of this loop.

Example:
    >>> from secura_plugins.sequence import SequenceHooks, SequenceTask, train_sequence
    >>> SequenceHooks().restore(None)
    False
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SequenceHooks", "SequenceTask", "TaskRun", "calibration_batches", "train_sequence"]


@dataclass
class SequenceTask:
    """One task: its name, training rows (a ``datasets.Dataset``) and, optionally, a
    scorer ``evaluate(model) -> accuracy`` used for the accuracy matrix."""

    name: str
    rows: Any
    evaluate: Callable[[Any], float] | None = None


@dataclass
class TaskRun:
    """What the loop knows about the task in progress (handed to every hook)."""

    index: int
    task: SequenceTask
    args: Any = None
    trainer: Any = None
    output: Any = None
    #: Rows replayed from earlier tasks in this task's training set.
    replayed: int = 0
    #: Accuracy on tasks 0..index (``None`` where a task has no scorer).
    row: list[float | None] = field(default_factory=list)


class SequenceHooks:
    """What a caller of :func:`train_sequence` decides; override what you need."""

    def restore(self, run: TaskRun) -> bool:
        """Return True when ``run``'s task was finished earlier and its state reloaded
        (the loop then skips it)."""
        return False

    def args(self, run: TaskRun) -> Any:
        """The task's ``trl.SFTConfig``."""
        raise NotImplementedError

    def callbacks(self, run: TaskRun) -> list[Any]:
        """Trainer callbacks of the task (e.g. a ``SecuraCallback``)."""
        return []

    def checkpoint(self, run: TaskRun) -> str | None:
        """A checkpoint folder to resume the task from."""
        return None

    def trained(self, run: TaskRun) -> None:
        """After training, before the accuracy row is measured."""

    def finished(self, run: TaskRun) -> None:
        """After the accuracy row is measured (``run.row``)."""


def train_sequence(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[SequenceTask],
    hooks: SequenceHooks,
    *,
    ewc: Any = None,
    replay: Any = None,
    matrix: Any = None,
    print_logs: bool = True,
    progress: bool = False,
) -> Any:
    """Train ``tasks`` in order on ``model``; returns the trained model.

    ``ewc`` (:class:`~secura_plugins.continual.EWC`) and ``replay``
    (:class:`~secura_plugins.continual.ReplayBuffer`) carry over from task to task;
    ``matrix`` (:class:`~secura_plugins.continual.metrics.AccuracyMatrix`) receives every
    measured accuracy. ``print_logs=False`` keeps the Trainer's logs in
    ``trainer.state.log_history`` only.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import PrinterCallback

    from .continual.replay import replay_count
    from .integrations.trl import SecuraSFTTrainer

    bar = tqdm(list(enumerate(tasks)), desc="tasks", unit="task", disable=not progress)
    for i, task in bar:
        bar.set_postfix_str(task.name)
        run = TaskRun(i, task)
        if hooks.restore(run):
            continue
        run.args = hooks.args(run)
        run.trainer = trainer = SecuraSFTTrainer(
            model=model,
            args=run.args,
            train_dataset=task.rows,
            processing_class=tokenizer,
            callbacks=hooks.callbacks(run),
            ewc=ewc,
            replay=replay,
            task_name=task.name,
        )
        if not print_logs:
            trainer.remove_callback(PrinterCallback)
        if replay is not None and len(replay):
            run.replayed = replay_count(len(task.rows), replay.ratio)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        run.output = trainer.train(resume_from_checkpoint=hooks.checkpoint(run))
        model = trainer.model
        hooks.trained(run)
        run.row = [None] * len(tasks)
        for j in range(i + 1):
            if tasks[j].evaluate is not None:
                run.row[j] = tasks[j].evaluate(model)
                if matrix is not None:
                    matrix.record(i, j, run.row[j])
        hooks.finished(run)
        run.trainer = None
        del trainer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return model


def calibration_batches(texts: Sequence[str], tokenizer: Any, n: int = 8) -> list[dict[str, Any]]:
    """Up to ``n`` tokenized batches of 4 of ``texts`` (SC-LoRA's calibration data)."""
    batches = []
    texts = list(texts[: 4 * n])
    for i in range(0, len(texts), 4):
        enc = tokenizer(texts[i : i + 4], return_tensors="pt", padding=True, truncation=True)
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return batches
