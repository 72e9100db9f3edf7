"""Synthetic prompt/answer tasks for offline runs: recipes' ``data: {builtin: NAME}``,
``secura eval --probe builtin:NAME``, the DDP and soak tests.

Rows are generated from ``(name, seed)`` alone, fit a character-level tokenizer and need
no download. (The lab's own data, for its pretrained base, is :mod:`secura_plugins.lab.data`;
this module stays outside the ``lab`` package so that validating a recipe does not import
the lab's torch and plotting modules.)

Example:
    >>> from secura_plugins.synthetic import builtin_rows
    >>> builtin_rows("add", 2)
    [{'prompt': '19+31=', 'completion': '50'}, {'prompt': '49+28=', 'completion': '77'}]
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

from .errors import SecuraConfigError, did_you_mean

__all__ = ["BUILTIN_TASKS", "builtin_rows"]


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(50), rng.randrange(50)
    return f"{a}+{b}=", str(a + b)


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))


def _reverse(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return f"rev {w}=", w[::-1]


def _upper(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return f"up {w}=", w.upper()


def _successor(rng: random.Random) -> tuple[str, str]:
    letters = string.ascii_lowercase
    i = rng.randrange(len(letters) - 1)
    return f"next {letters[i]}=", letters[i + 1]


#: Synthetic prompt/answer tasks for offline runs (a character-level tokenizer suffices).
BUILTIN_TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add,
    "reverse": _reverse,
    "upper": _upper,
    "successor": _successor,
}


def builtin_rows(name: str, n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` deterministic ``{"prompt", "completion"}`` rows of the builtin task ``name``."""
    if name not in BUILTIN_TASKS:
        raise SecuraConfigError("builtin", unknown_builtin(name))
    rng = random.Random(f"{name}:{seed}")
    return [dict(zip(("prompt", "completion"), BUILTIN_TASKS[name](rng))) for _ in range(n)]


def unknown_builtin(name: object) -> str:
    """The error message for a builtin task name that does not exist (with a suggestion)."""
    fix = did_you_mean(name, list(BUILTIN_TASKS))
    return f"unknown builtin task {name!r}; {fix}choose one of {', '.join(BUILTIN_TASKS)}"
