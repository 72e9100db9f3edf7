"""Metrics for a sequence of tasks (continual learning).

``a[i][j]`` is the accuracy on task ``j`` measured after training on task ``i``
(0-based, ``T`` tasks, a ``T x T`` matrix; entries with ``j > i`` are optional and only
used by forward transfer). With ``T-1`` the last task:

* average accuracy after task ``i``:  ``ACC_i = mean_{j<=i} a[i][j]``
* backward transfer (Lopez-Paz & Ranzato 2017):
  ``BWT = mean_{j<T-1} (a[T-1][j] - a[j][j])`` (negative = forgetting)
* forgetting (Chaudhry et al. 2018):
  ``F = mean_{j<T-1} (max_{l<T-1} a[l][j] - a[T-1][j])`` with ``l >= j``
* retention of what the base model knew, on a fixed probe set:
  ``score_after / score_base`` (1.0 = fully kept).

Example:
    >>> from secura_plugins.continual.metrics import AccuracyMatrix
    >>> m = AccuracyMatrix(2)
    >>> m.record(0, 0, 0.9); m.record(1, 0, 0.6); m.record(1, 1, 0.8)
    >>> round(m.average_accuracy(), 3), round(m.backward_transfer(), 3), round(m.forgetting(), 3)
    (0.7, -0.3, 0.3)
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

__all__ = [
    "AccuracyMatrix",
    "average_accuracy",
    "backward_transfer",
    "forgetting",
    "forward_transfer",
    "retention",
]

Matrix = Sequence[Sequence[float | None]]


def _get(a: Matrix, i: int, j: int) -> float:
    value = a[i][j] if j < len(a[i]) else None
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise ValueError(f"a[{i}][{j}]: is not recorded but the metric needs it")
    return float(value)


def _tasks(a: Matrix) -> int:
    if not a:
        raise ValueError("matrix: is empty; record at least one task")
    return len(a)


def average_accuracy(a: Matrix, after: int | None = None) -> float:
    """``mean_{j<=i} a[i][j]`` for ``i = after`` (default: the last task)."""
    i = _tasks(a) - 1 if after is None else after
    return sum(_get(a, i, j) for j in range(i + 1)) / (i + 1)


def backward_transfer(a: Matrix) -> float:
    """``mean_{j<T-1} (a[T-1][j] - a[j][j])``; 0.0 for a single task."""
    t = _tasks(a)
    if t == 1:
        return 0.0
    return sum(_get(a, t - 1, j) - _get(a, j, j) for j in range(t - 1)) / (t - 1)


def forgetting(a: Matrix) -> float:
    """``mean_{j<T-1} (max_{j<=l<T-1} a[l][j] - a[T-1][j])``; 0.0 for a single task."""
    t = _tasks(a)
    if t == 1:
        return 0.0
    total = 0.0
    for j in range(t - 1):
        best = max(_get(a, l, j) for l in range(j, t - 1))  # noqa: E741
        total += best - _get(a, t - 1, j)
    return total / (t - 1)


def forward_transfer(a: Matrix, baseline: Sequence[float]) -> float:
    """``mean_{j>0} (a[j-1][j] - baseline[j])``: how earlier tasks help a task before training on it."""
    t = _tasks(a)
    if len(baseline) != t:
        raise ValueError(f"baseline: needs one score per task ({t}), got {len(baseline)}")
    if t == 1:
        return 0.0
    return sum(_get(a, j - 1, j) - float(baseline[j]) for j in range(1, t)) / (t - 1)


def retention(base_score: float, score: float) -> float:
    """``score / base_score``: the share of the base model's probe score that is kept."""
    if base_score <= 0:
        raise ValueError(f"base_score: must be > 0 to measure retention, got {base_score}")
    return float(score) / float(base_score)


class AccuracyMatrix:
    """A ``T x T`` accuracy matrix filled as a task sequence runs, with the metrics above.

    Args:
        num_tasks: number of tasks ``T``.
        names: optional task names (for ``to_dict`` and ``format``).
    """

    def __init__(self, num_tasks: int, names: Sequence[str] | None = None) -> None:
        if num_tasks < 1:
            raise ValueError(f"num_tasks: must be >= 1, got {num_tasks}")
        if names is not None and len(names) != num_tasks:
            raise ValueError(f"names: needs {num_tasks} names, got {len(names)}")
        self.num_tasks = num_tasks
        self.names = list(names) if names is not None else [f"task{i}" for i in range(num_tasks)]
        self.a: list[list[float | None]] = [[None] * num_tasks for _ in range(num_tasks)]

    def record(self, after: int, on: int, value: float) -> None:
        """Store the accuracy on task ``on`` after training on task ``after``."""
        for name, idx in (("after", after), ("on", on)):
            if not 0 <= idx < self.num_tasks:
                raise ValueError(f"{name}: must lie in [0, {self.num_tasks}), got {idx}")
        self.a[after][on] = float(value)

    def completed(self) -> list[list[float | None]]:
        """Rows of the tasks trained so far (the last row with any value)."""
        last = max(
            (i for i, row in enumerate(self.a) if any(v is not None for v in row)), default=-1
        )
        return self.a[: last + 1]

    def average_accuracy(self, after: int | None = None) -> float:
        return average_accuracy(self.completed(), after)

    def backward_transfer(self) -> float:
        return backward_transfer(self.completed())

    def forgetting(self) -> float:
        return forgetting(self.completed())

    def summary(self) -> dict[str, float]:
        """``{"avg_accuracy", "bwt", "forgetting"}`` over the tasks trained so far."""
        return {
            "avg_accuracy": self.average_accuracy(),
            "bwt": self.backward_transfer(),
            "forgetting": self.forgetting(),
        }

    def to_dict(self) -> dict:
        return {"names": self.names, "matrix": self.a, **self.summary()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def format(self) -> str:
        """A plain-text table (rows: after task i; columns: on task j)."""
        width = max(8, *(len(n) for n in self.names))
        head = " " * width + "".join(f"{n:>{width}}" for n in self.names)
        lines = [head]
        for name, row in zip(self.names, self.a, strict=True):
            cells = "".join(f"{'-':>{width}}" if v is None else f"{v:>{width}.3f}" for v in row)
            lines.append(f"{name:>{width}}{cells}")
        return "\n".join(lines)
