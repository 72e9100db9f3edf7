"""The lab's synthetic data: the base model's "knowledge" and the fine-tuning tasks.

Everything is generated from a seed, offline, and fits a character-level tokenizer.

* **Base knowledge** (:func:`knowledge_pairs`): ``n_facts`` random facts
  (``"fact zorb="`` -> ``"plk"``, names and values are random letter strings) plus
  single-digit sums (``"7+5="`` -> ``"12"``). The base model is pretrained on exactly
  these pairs until it recalls them (near) perfectly; the retention probe asks them again
  after every fine-tuning task. Facts are pure memory, the most fragile kind of knowledge.
* **Skill** (:func:`copy_pairs`): copy a random mixed-case word (``"say aBc="`` ->
  ``"aBc"``), trained on fresh words every step and probed on held-out ones.
* **Tasks** (:data:`TASKS`): 16 distinct string transforms of a random 3-4 letter word
  (``"up abc="`` -> ``"ABC"``), each with its own prompt tag, ordered roughly from
  copy-like to harder. They share the letters and the answer position with the facts,
  so fine-tuning on them interferes with the base.

Example:
    >>> from secura_plugins.lab.data import TASKS, knowledge_pairs, task_pairs
    >>> len(TASKS)
    16
    >>> knowledge_pairs(n_facts=2, seed=0)[:2]
    [('fact vouc=', 'gkp'), ('fact qjkl=', 'vpi')]
    >>> task_pairs("rev", 2, seed=0)
    [('rev vlyk=', 'kylv'), ('rev nxo=', 'oxn')]
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

__all__ = [
    "TASKS",
    "TASK_ORDER",
    "copy_pairs",
    "knowledge_pairs",
    "task_pairs",
    "task_sequence",
]

_LOWER = string.ascii_lowercase


def _shift(w: str, k: int) -> str:
    return "".join(_LOWER[(_LOWER.index(c) + k) % 26] for c in w)


def _swap_pairs(w: str) -> str:
    chars = list(w)
    for i in range(0, len(chars) - 1, 2):
        chars[i], chars[i + 1] = chars[i + 1], chars[i]
    return "".join(chars)


#: tag -> transform of a lowercase word. Order = the 16-task sequence.
TASKS: dict[str, Callable[[str], str]] = {
    "first": lambda w: w[0],
    "up": str.upper,
    "last": lambda w: w[-1],
    "cap": lambda w: w[0].upper() + w[1:],
    "dbl": lambda w: "".join(c + c for c in w),
    "drop": lambda w: w[:-1],
    "ends": lambda w: w[0] + w[-1],
    "snd": lambda w: w[1],
    "len": lambda w: str(len(w)),
    "rotl": lambda w: w[1:] + w[0],
    "rotr": lambda w: w[-1] + w[:-1],
    "swap": _swap_pairs,
    "rev": lambda w: w[::-1],
    "next": lambda w: _shift(w, 1),
    "prev": lambda w: _shift(w, -1),
    "sort": lambda w: "".join(sorted(w)),
}
TASK_ORDER: list[str] = list(TASKS)


def _word(rng: random.Random, low: int = 3, high: int = 4) -> str:
    return "".join(rng.choice(_LOWER) for _ in range(rng.randint(low, high)))


def knowledge_pairs(n_facts: int = 150, seed: int = 0, arithmetic: bool = True):
    """The base knowledge: ``n_facts`` unique random facts (+ the 100 single-digit sums)."""
    rng = random.Random(f"knowledge:{seed}")
    names: set[str] = set()
    pairs = []
    while len(pairs) < n_facts:
        name = _word(rng, 4, 4)
        if name in names:
            continue
        names.add(name)
        pairs.append((f"fact {name}=", _word(rng, 3, 3)))
    if arithmetic:
        pairs += [(f"{a}+{b}=", str(a + b)) for a in range(10) for b in range(10)]
    return pairs


def copy_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` copy pairs (``"say aBc="`` -> ``"aBc"``, mixed case): the base's one *skill*.

    Pretraining on them gives the base the copy circuits that the fine-tuning tasks
    build on, and trains the embeddings of every letter the tasks use.
    """
    rng = random.Random(f"copy:{seed}")
    out = []
    for _ in range(n):
        w = "".join(rng.choice(string.ascii_letters) for _ in range(rng.randint(3, 4)))
        out.append((f"say {w}=", w))
    return out


def task_pairs(tag: str, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` deterministic ``(prompt, answer)`` pairs of task ``tag``."""
    if tag not in TASKS:
        raise ValueError(f"tag: unknown lab task {tag!r}; choose one of {', '.join(TASKS)}")
    rng = random.Random(f"task:{tag}:{seed}")
    fn = TASKS[tag]
    return [(f"{tag} {w}=", fn(w)) for w in (_word(rng) for _ in range(n))]


def task_sequence(num_tasks: int) -> list[str]:
    """The first ``num_tasks`` tags of :data:`TASK_ORDER`."""
    if not 1 <= num_tasks <= len(TASK_ORDER):
        raise ValueError(f"tasks: must be in [1, {len(TASK_ORDER)}], got {num_tasks}")
    return TASK_ORDER[:num_tasks]
