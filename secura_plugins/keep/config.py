"""Settings of the keep tools (self-rehearsal and the KL anchor): :class:`KeepConfig`.

One object drives ``SecuraCallback(keep=...)``, ``SecuraSFTTrainer(keep=...)``, the
axolotl plugin (``secura: {keep: ...}``) and the recipes (``keep:``). A string names a
preset from :data:`KEEP_PRESETS`; a dict may name one under ``preset`` and override
fields.

Example:
    >>> from secura_plugins.keep import KeepConfig
    >>> KeepConfig.coerce("keep").rehearsal > 0
    True
    >>> KeepConfig.coerce({"preset": "keep", "kl_lambda": 0.5}).kl_lambda
    0.5
    >>> KeepConfig.from_dict({"lambda": 1.0})
    Traceback (most recent call last):
    ...
    secura_plugins.errors.SecuraConfigError: keep.lambda: unknown field; did you mean 'kl_lambda'? ...
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..errors import SecuraConfigError, did_you_mean

KL_MODES = ("in_step", "cached")
FORMATS = ("auto", "plain", "chat")
REHEARSAL_LOSSES = ("ce", "kl")
KL_POSITIONS = ("answer", "all")
GENERIC_FORMATS = ("task", "plain", "both")

#: Named settings. ``keep`` is the library's recommendation, chosen on the real-model lab
#: (BENCHMARKS.md, "Keep what the base knew"): 64 self-written rehearsal rows per task
#: mixed at ratio 0.5 plus the KL anchor on them (lambda 1), the teacher cached once per
#: row (as good as the in-step teacher there, and cheaper). Give the task its rows: train
#: by epochs, or ``max_steps / (1 - ratio)`` (a fixed ``max_steps`` halves them, and with
#: them the learning: 28% of 32 new facts instead of 97%). Generic rows stay in the task's
#: format. On the 4-task lab, ``generic_format: both`` (every other generic row through the
#: chat template on a plain task) kept the instruct base's chat answers (87 / 80% instead
#: of 0 / 7%) and 80.5% of what it knew instead of 74.8%, but raised the NLL rise from
#: +0.047 to +0.122 and the step from 1.58x to 3.06x LoRA's, and kept less on the demo's
#: single task (77%, on a generator variant, against 88%): set it when an instruct model's
#: chat answers must survive plain-format tasks.
KEEP_PRESETS: dict[str, dict[str, Any]] = {
    "keep": {
        "rehearsal": 64,
        "ratio": 0.5,
        "generic_share": 0.5,
        "kl_lambda": 1.0,
        "kl_on_task": False,
        "kl_mode": "cached",
        "max_row_tokens": 0,
    },
    "rehearsal-only": {"rehearsal": 64, "ratio": 0.5, "kl_lambda": 0.0},
}

_ALIASES = {"lambda": "kl_lambda", "lam": "kl_lambda", "n": "rehearsal", "mix": "ratio"}


@dataclass
class KeepConfig:
    """How the model keeps what its base knew, without the base's training data.

    Args:
        rehearsal: number of self-rehearsal examples the base writes before the task
            (0 switches self-rehearsal off; the KL anchor then needs ``kl_on_task``).
        ratio: share of rehearsal rows in the mixed training set, in [0, 1). 0 keeps the
            rows for the KL anchor and SC-LoRA only, without training on them.
        generic_share: share of rehearsal prompts in generic shapes (the rest follow the
            shapes of the task's prompts).
        task_layout: also write task-shaped prompts when the base never reaches the task
            prompts' exact shared ending: on templates whose ending spans lines (``"Q: ...'s
            job?\\nA:"``: another question in the task's layout) or is only punctuation
            (``"Initials of X?"``). Off in the preset, where such tasks get generic rows
            only (and fewer rows than ``rehearsal``): on the lab's four tasks (DoRA +
            ``keep``, 2 seeds) it learned more (96.1% against 91.8%) but kept less of
            what the base knew (70.3% against 78.2%) at a larger NLL rise (+0.195
            against +0.114; BENCHMARKS.md).
        ending_share: share of the task-shaped prompts that keep the *ending* the task's
            prompts share (a word such as " is") after a generic opening, instead of their
            template (``"The Eiffel Tower is"`` rather than ``"The capital of Brazil is"``):
            the base's answers to other sentences of that shape, which a task teaching
            "<subject> is <new answer>" otherwise overwrites.
        kl_lambda: weight of ``KL(p_base || p_model)``; 0 switches the anchor off.
        kl_on_task: also anchor on the task's own rows (not only on rehearsal rows). Off in
            the preset: on the lab's new-facts task it pulled the new answers back to the
            base's (59% learned against 97-100%) and kept no more (BENCHMARKS.md).
        kl_mode: ``in_step`` (teacher forward with the adapter disabled, every step) or
            ``cached`` (the base's top-``kl_topk`` log-probabilities of every rehearsal
            row, computed once after generation; task rows still use ``in_step``).
        kl_topk: tokens kept per position by the cache.
        kl_positions: where the anchor applies on rehearsal rows: ``answer`` (the trained
            answer tokens) or ``all`` (every next-token position of the row, prompt
            included: the teacher forward covers the row anyway). Task rows
            (``kl_on_task``) always use their trained tokens.
        rehearsal_loss: what the rehearsal rows train: ``ce`` (cross-entropy on the base's
            greedy answers, plus the KL anchor when on) or ``kl`` (the KL anchor only; the
            rows' labels are masked out of the task loss; needs ``kl_lambda > 0``).
        max_row_tokens: longest rehearsal row (prompt + answer, in tokens): 0 (no bound
            beyond ``max_new_tokens`` and the first sentence: the recommendation),
            ``"task"`` (the longest row of the task's training set, so mixed batches are
            not padded to long rehearsal rows: a step as cheap as LoRA's, but on the lab
            it kept far less, 61% of the probe against 78%), or a positive integer.
        max_new_tokens: longest answer the base writes.
        max_seconds: time bound of the generation (rows written so far are kept).
        temperature, top_p: sampling of new prompts (answers are greedy).
        batch_size: prompts generated per ``generate`` call.
        format: ``plain`` prompts, ``chat`` (the tokenizer's chat template), or ``auto``
            (chat when the task's rows are conversations).
        generic_format: the format of the generic rows: ``task`` (the task's: the chat
            template on a chat task, plain text otherwise), ``plain`` (plain text on a chat
            task too, the base continuing and answering in prose: what anchors the model's
            plain-text knowledge and general language while a chat task trains) or
            ``both`` (every other generic prompt in the other format than the task's:
            plain text on a chat task, the chat template on a plain task when the
            tokenizer has one, so an instruct model's chat answers are rehearsed while it
            learns a plain format; plain prompts the base answers with nothing are
            dropped, so templated rows outnumber plain ones, about 3 to 1 on the lab).
            Plain rows on a chat task have kind ``"text"``, templated rows on a plain task
            ``"chat"``; on a training set that is not tokenized yet they take the set's
            format anyway.
        seed: seed of every random choice of the generation.
    """

    rehearsal: int = 64
    ratio: float = 0.5
    generic_share: float = 0.5
    ending_share: float = 0.0
    task_layout: bool = False
    kl_lambda: float = 1.0
    kl_on_task: bool = False
    kl_mode: str = "in_step"
    kl_topk: int = 64
    kl_positions: str = "answer"
    rehearsal_loss: str = "ce"
    max_row_tokens: int | str = 0
    max_new_tokens: int = 16
    max_seconds: float = 600.0
    temperature: float = 0.7
    top_p: float = 0.9
    batch_size: int = 16
    format: str = "auto"
    generic_format: str = "task"
    seed: int = 0

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> SecuraConfigError:
            return SecuraConfigError(f"keep.{name}", why)

        for name in ("rehearsal", "kl_topk", "max_new_tokens", "batch_size", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise bad(name, f"must be a non-negative integer, got {value!r}")
        for name in ("kl_topk", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise bad(name, f"must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= float(self.ratio) < 1.0:
            raise bad("ratio", f"must lie in [0, 1), got {self.ratio}; 0.3-0.5 is typical")
        for name in ("generic_share", "ending_share"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise bad(name, f"must lie in [0, 1], got {getattr(self, name)}")
        if not isinstance(self.task_layout, bool):
            raise bad("task_layout", f"must be true or false, got {self.task_layout!r}")
        if float(self.kl_lambda) < 0:
            raise bad("kl_lambda", f"must be >= 0, got {self.kl_lambda}")
        if float(self.max_seconds) <= 0 or float(self.temperature) <= 0:
            raise bad("max_seconds/temperature", "must be > 0")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise bad("top_p", f"must lie in (0, 1], got {self.top_p}")
        if self.kl_mode not in KL_MODES:
            raise bad("kl_mode", f"must be one of {KL_MODES}, got {self.kl_mode!r}")
        if self.kl_positions not in KL_POSITIONS:
            raise bad("kl_positions", f"must be one of {KL_POSITIONS}, got {self.kl_positions!r}")
        if self.rehearsal_loss not in REHEARSAL_LOSSES:
            raise bad("rehearsal_loss",
                      f"must be one of {REHEARSAL_LOSSES}, got {self.rehearsal_loss!r}")
        if self.rehearsal_loss == "kl" and not self.kl_lambda > 0:
            raise bad("rehearsal_loss", "'kl' trains the rehearsal rows through the KL anchor "
                      "only; set kl_lambda > 0, or rehearsal_loss: ce")
        rows = self.max_row_tokens
        if rows != "task" and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 0):
            raise bad("max_row_tokens", f"must be 'task', 0 (no bound) or a positive integer, "
                      f"got {rows!r}")
        if isinstance(rows, int) and 0 < rows < 4:
            raise bad("max_row_tokens", f"must be >= 4 (a prompt and an answer), got {rows}")
        if self.format not in FORMATS:
            raise bad("format", f"must be one of {FORMATS}, got {self.format!r}")
        if self.generic_format not in GENERIC_FORMATS:
            raise bad("generic_format",
                      f"must be one of {GENERIC_FORMATS}, got {self.generic_format!r}")
        if self.rehearsal == 0 and self.kl_lambda > 0 and not self.kl_on_task:
            raise bad(
                "kl_lambda",
                "the anchor has no inputs: rehearsal is 0 and kl_on_task is false; "
                "set rehearsal > 0 or kl_on_task: true",
            )

    def steps_for_task_rows(self, steps: int) -> int:
        """Optimizer steps over the mixed set that train on as many task rows as ``steps``
        without rehearsal: ``ceil(steps / (1 - ratio))``.

        Example:
            >>> KeepConfig(ratio=0.5).steps_for_task_rows(40)
            80
            >>> KeepConfig(ratio=0.3).steps_for_task_rows(6)
            9
        """
        return math.ceil(steps / (1.0 - float(self.ratio)))

    @property
    def anchors(self) -> bool:
        """True when the KL term is on."""
        return self.kl_lambda > 0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> KeepConfig:
        """Build from a mapping, rejecting unknown keys by name; ``preset`` picks a base."""
        data = dict(data or {})
        preset = data.pop("preset", None)
        base: dict[str, Any] = {}
        if preset is not None:
            if preset not in KEEP_PRESETS:
                raise SecuraConfigError(
                    "keep.preset", f"unknown preset {preset!r}; choose one of {sorted(KEEP_PRESETS)}"
                )
            base = dict(KEEP_PRESETS[preset])
        names = [f.name for f in fields(cls)]
        for key in data:
            if key not in names:
                fix = did_you_mean(key, names, _ALIASES)
                raise SecuraConfigError(
                    f"keep.{key}", f"unknown field; {fix}valid fields: preset, {', '.join(names)}"
                )
        return cls(**{**base, **data})

    @classmethod
    def coerce(cls, value: KeepConfig | Mapping[str, Any] | str | bool | None) -> KeepConfig | None:
        """A ``KeepConfig`` from a config, a dict, a preset name, ``True`` (the ``keep``
        preset), or None/False (off)."""
        if value is None or value is False:
            return None
        if value is True:
            value = "keep"
        if isinstance(value, KeepConfig):
            return value
        if isinstance(value, str):
            return cls.from_dict({"preset": value})
        if isinstance(value, Mapping):
            return cls.from_dict(value)
        raise SecuraConfigError(
            "keep", f"must be a preset name, a dict of KeepConfig fields or a KeepConfig, got "
            f"{type(value).__name__}"
        )
