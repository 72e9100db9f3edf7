"""A bounded, seeded replay buffer of earlier tasks' examples.

Rows (plain dicts, e.g. ``{"text": ...}`` or ``{"prompt": ..., "completion": ...}``) are
kept by reservoir sampling (Vitter's algorithm R): after ``n`` rows have been offered,
every one of them is in the buffer with probability ``capacity / n``, whatever task it
came from. Everything is driven by ``random.Random(seed)``, so the same sequence of
``add`` calls gives the same buffer, and ``save``/``load`` keep the generator state so a
resumed run continues identically.

The mixing rule (``mix``): ``ratio`` is the share of the *mixed* dataset that comes from
the buffer. For ``N`` new rows the mix holds ``n = round(ratio * N / (1 - ratio))``
replayed rows, so ``n / (N + n)`` equals ``ratio`` up to rounding (within
``1 / (N + n)``). Replayed rows are drawn without replacement; if the buffer is smaller
than ``n``, every buffered row is used ``n // len(buffer)`` times and the remainder is
drawn without replacement. The result is shuffled with the seed.

Example:
    >>> from datasets import Dataset
    >>> from secura_plugins.continual.replay import ReplayBuffer
    >>> buf = ReplayBuffer(capacity=100, seed=0)
    >>> buf.add(Dataset.from_dict({"text": [f"old {i}" for i in range(50)]}), task="t1")
    >>> new = Dataset.from_dict({"text": [f"new {i}" for i in range(90)]})
    >>> mixed = buf.mix(new, ratio=0.1)
    >>> len(mixed), sum(t.startswith("old") for t in mixed["text"])
    (100, 10)
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .._fs import atomic_open

__all__ = ["ReplayBuffer", "replay_count"]

_HEADER_KEY = "__secura_replay__"


def replay_count(num_new: int, ratio: float) -> int:
    """Number of replayed rows that make ``ratio`` the buffer's share of the mix."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio: must lie in [0, 1), got {ratio}; 0.01-0.1 is typical")
    return round(ratio * num_new / (1.0 - ratio))


class ReplayBuffer:
    """Reservoir buffer of ``(task, row)`` pairs with a fixed capacity.

    Args:
        capacity: most rows kept in memory (and on disk).
        seed: seed of the reservoir and of the default mixing generator.
        ratio: default share of replayed rows in ``mix`` (published runs use 0.01-0.1).
    """

    def __init__(self, capacity: int = 1000, seed: int = 0, ratio: float = 0.05) -> None:
        if capacity < 1:
            raise ValueError(f"capacity: must be >= 1, got {capacity}")
        replay_count(0, ratio)  # validates ratio
        self.capacity = int(capacity)
        self.seed = int(seed)
        self.ratio = float(ratio)
        self.seen = 0
        self._rng = random.Random(self.seed)
        self.items: list[tuple[str | None, dict[str, Any]]] = []

    def __len__(self) -> int:
        return len(self.items)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The buffered rows (without their task tags)."""
        return [row for _, row in self.items]

    def task_counts(self) -> dict[str | None, int]:
        """How many buffered rows came from each task."""
        counts: dict[str | None, int] = {}
        for task, _ in self.items:
            counts[task] = counts.get(task, 0) + 1
        return counts

    def add(self, rows: Iterable[Mapping[str, Any]], task: str | None = None) -> None:
        """Offer ``rows`` (a ``datasets.Dataset`` or any iterable of dicts) to the reservoir."""
        for row in rows:
            self.seen += 1
            item = (task, dict(row))
            if len(self.items) < self.capacity:
                self.items.append(item)
            else:
                j = self._rng.randrange(self.seen)
                if j < self.capacity:
                    self.items[j] = item

    def sample(self, n: int, seed: int | None = None) -> list[dict[str, Any]]:
        """``n`` rows by the rule in the module docstring (deterministic under ``seed``)."""
        if n < 0:
            raise ValueError(f"n: must be >= 0, got {n}")
        if n == 0:
            return []
        if not self.items:
            raise ValueError("buffer: is empty; add earlier tasks' rows before sampling")
        rng = random.Random(self.seed if seed is None else seed)
        full, rest = divmod(n, len(self.items))
        picked = list(range(len(self.items))) * full + rng.sample(range(len(self.items)), rest)
        return [dict(self.items[i][1]) for i in picked]

    def mix(
        self,
        new_dataset: Any,
        ratio: float | None = None,
        *,
        seed: int | None = None,
        tag_column: str | None = None,
    ):
        """A shuffled ``datasets.Dataset``: ``new_dataset`` plus replayed rows.

        ``ratio`` defaults to the buffer's ``ratio``.
        The columns are ``new_dataset``'s (extra keys of replayed rows are dropped; a
        missing one raises, naming it). With ``tag_column``, a boolean column of that
        name marks replayed rows. With nothing to replay (empty buffer, ``ratio`` 0) the
        new dataset comes back unshuffled (plus the tag column, if asked for).
        """
        from datasets import Dataset, concatenate_datasets

        n = replay_count(len(new_dataset), self.ratio if ratio is None else ratio)
        if n == 0 or not self.items:
            if tag_column is not None:
                return new_dataset.add_column(tag_column, [False] * len(new_dataset))
            return new_dataset
        columns = list(new_dataset.column_names)
        replayed = []
        for row in self.sample(n, seed=seed):
            missing = [c for c in columns if c not in row]
            if missing:
                raise ValueError(
                    f"column {missing[0]!r}: the new task's dataset has it but a buffered row "
                    f"(keys {sorted(row)}) does not; give every task the same columns"
                )
            replayed.append({c: row[c] for c in columns})
        old = Dataset.from_list(replayed, features=new_dataset.features)
        new = new_dataset
        if tag_column is not None:
            new = new.add_column(tag_column, [False] * len(new))
            old = old.add_column(tag_column, [True] * len(old))
        mixed = concatenate_datasets([new, old])
        return mixed.shuffle(seed=self.seed if seed is None else seed).flatten_indices()

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Settings, reservoir counter, generator state and items (JSON-serialisable)."""
        version, internal, gauss = self._rng.getstate()
        return {
            "capacity": self.capacity,
            "seed": self.seed,
            "ratio": self.ratio,
            "seen": self.seen,
            "rng_state": [version, list(internal), gauss],
            "items": [{"task": t, "row": r} for t, r in self.items],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        self.capacity = int(state["capacity"])
        self.seed = int(state["seed"])
        self.ratio = float(state.get("ratio", self.ratio))
        self.seen = int(state["seen"])
        version, internal, gauss = state["rng_state"]
        self._rng = random.Random()
        self._rng.setstate((version, tuple(internal), gauss))
        self.items = [(it["task"], dict(it["row"])) for it in state["items"]]

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON lines: a header line (settings, generator state), then one row per line.

        Atomic (see :mod:`secura_plugins._fs`). Rows must be JSON-serialisable.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        items = state.pop("items")
        with atomic_open(path) as fh:
            fh.write(json.dumps({_HEADER_KEY: 1, **state}) + "\n")
            for i, item in enumerate(items):
                try:
                    fh.write(json.dumps(item, ensure_ascii=False) + "\n")
                except TypeError as exc:
                    raise ValueError(f"row {i}: is not JSON-serialisable ({exc})") from exc
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReplayBuffer:
        """Read a file written by ``save``."""
        with open(path, encoding="utf-8") as fh:
            lines = [line for line in fh if line.strip()]
        if not lines:
            raise ValueError(f"{path}: is empty, not a replay buffer file")
        header = json.loads(lines[0])
        if header.pop(_HEADER_KEY, None) != 1:
            raise ValueError(f"{path}: first line is not a secura replay-buffer header")
        buf = cls(capacity=header["capacity"], seed=header["seed"])
        buf.load_state_dict({**header, "items": [json.loads(line) for line in lines[1:]]})
        return buf

    def __repr__(self) -> str:
        return (
            f"ReplayBuffer(capacity={self.capacity}, ratio={self.ratio}, size={len(self)}, "
            f"seen={self.seen})"
        )
