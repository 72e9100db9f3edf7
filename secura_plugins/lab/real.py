"""The real-model lab: SmolLM2-135M-Instruct as the base, probes of what it really knows.

Three measurements, usable on any model built from the real base (plain, a
``PeftModel``, a 4-bit base with an adapter):

* **known facts kept**: the :data:`~secura_plugins.lab.real_data.PROBE_CANDIDATES` the base
  answers correctly before training (greedy exact match of the answer tokens, batched,
  left padding: :class:`~secura_plugins.continual.probe.RetentionProbe`), asked again.
  The filtering is done once per base (fp32 or NF4) and cached as JSON in the lab cache;
* **general-text NLL rise**: mean token NLL on ``general_text.txt`` (bundled prose the
  lab never trains on: the Python Language Reference, PSF License; see the file's
  header), minus the base's;
* **new-task accuracy**: the tasks of :mod:`~secura_plugins.lab.real_data`, greedy
  exact match (fact tasks on the trained facts, skills on held-out inputs).

:func:`real_base` returns a :class:`RealBase` (what :func:`~secura_plugins.lab.runner.
run_sequence` trains from) and :meth:`RealBase.measure` gives all three at once.

Example (about 1 minute on one core the first time, then the filter is cached)::

    from secura_plugins.lab.real import real_base
    base = real_base()                      # RealSpec(four_bit=False) by default
    model, tok = base.load()                # fp32 SmolLM2-135M-Instruct + fixed tokenizer
    rows = base.train_rows("facts-same")    # TRL prompt-completion rows
    scores = base.measure(model, tok, tasks=["facts-same"])
    scores["known_kept"], scores["task_accuracy"]["facts-same"], scores["nll_rise"]
    # (1.0, 0.0, 0.0) before training
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._fs import atomic_write_json
from .real_data import PROBE_CANDIDATES, REAL_TASKS, task_examples

logger = logging.getLogger(__name__)

__all__ = [
    "REAL_DEFAULT_LRS",
    "RealBase",
    "RealSpec",
    "general_text",
    "load_real_model",
    "measure",
    "real_base",
    "render_pairs",
    "text_nll",
    "untouched",
]

#: Learning rates per method family on the real base (the issue's table, until a sweep
#: of this lab replaces them; BENCHMARKS.md "Real-model lab").
REAL_DEFAULT_LRS: dict[str, float] = {
    "full": 3e-5,
    "lora": 1e-3,
    "dora": 1e-3,
    "curlora": 3e-2,
    "sclora": 1e-3,
    "secura": 1e-3,
    "secura-m2": 1e-3,
    "secura-released": 1e-3,
    "secura-off": 1e-2,
    "secura-nomerge": 1e-3,
    "secura-r16": 1e-3,
}
_FORMAT = 1
#: SmolLM2-Instruct's end-of-turn token. The GGUF-converted tokenizer names
#: ``<|im_start|>`` as its eos and has no pad token; the lab uses ``<|im_end|>`` for both
#: (what the original checkpoint does), so TRL ends completions with it.
END_OF_TURN = "<|im_end|>"


@dataclass(frozen=True)
class RealSpec:
    """The real-model lab's base and data sizes (every field is in ``results.json``).

    Args:
        four_bit: load the base in bitsandbytes NF4 (compute in fp32); the probe is
            filtered on the 4-bit base itself.
        n_facts: facts per fact task (trained, then asked again).
        n_train: rows per skill task (fresh inputs).
        n_eval: held-out inputs per skill task.
        nll_tokens: tokens of the general text scored for the NLL.
        data_seed: seed of the task data (fixed across training seeds).
    """

    four_bit: bool = False
    n_facts: int = 32
    n_train: int = 256
    n_eval: int = 16
    nll_tokens: int = 1024
    data_seed: int = 0

    def task_names(self) -> list[str]:
        return list(REAL_TASKS)

    def key(self) -> str:
        blob = json.dumps(
            {
                "format": _FORMAT,
                "four_bit": self.four_bit,
                "nll_tokens": self.nll_tokens,
                "probe": PROBE_CANDIDATES,
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_real_model(four_bit: bool = False, cache_dir: str | os.PathLike | None = None):
    """``(model, tokenizer)``: SmolLM2-135M-Instruct in fp32 (or NF4), eval mode.

    The tokenizer's eos and pad are set to ``<|im_end|>`` (see :data:`END_OF_TURN`).
    """
    from transformers import AutoTokenizer

    from ..loading import load_base
    from ..real_model import smollm2_checkpoint

    folder = smollm2_checkpoint(cache_dir)
    model = load_base(str(folder), load_in_4bit=four_bit, on_gpu=True)
    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.eos_token = END_OF_TURN
    tok.pad_token = END_OF_TURN
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    if model.generation_config is not None:
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def render_pairs(rows: list[Any], tok: Any) -> list[tuple[str, str]]:
    """TRL rows (or ``(prompt, answer)`` pairs) -> ``(prompt text, answer text)`` pairs.

    Chat rows (message lists) go through the tokenizer's chat template with the
    generation prompt, as TRL renders them for training; the answer is the assistant's
    text. Plain pairs are returned as they are.
    """
    out = []
    for row in rows:
        prompt, answer = (row["prompt"], row["completion"]) if isinstance(row, dict) else row
        if isinstance(prompt, list):
            prompt = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            answer = answer[0]["content"]
        out.append((prompt, answer))
    return out


def _chat_rows(pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    return [
        {
            "prompt": [{"role": "user", "content": q}],
            "completion": [{"role": "assistant", "content": a}],
        }
        for q, a in pairs
    ]


def general_text() -> str:
    """The bundled general English text (header comment lines removed)."""
    path = Path(__file__).with_name("general_text.txt")
    lines = path.read_text(encoding="utf-8").splitlines()
    return "\n".join(line for line in lines if not line.startswith("#")).strip()


@torch.no_grad()
def text_nll(
    model: torch.nn.Module,
    tok: Any,
    *,
    max_tokens: int = 1024,
    window: int = 128,
    batch_size: int = 8,
) -> float:
    """Mean token NLL (nats) of ``model`` on the first ``max_tokens`` of :func:`general_text`.

    The text is cut into non-overlapping ``window``-token pieces (each scored on its own,
    first token unscored), so the number is comparable across models with the same
    tokenizer. The model's train/eval mode is restored.
    """
    ids = tok(general_text(), add_special_tokens=False)["input_ids"][:max_tokens]
    chunks = [ids[i : i + window] for i in range(0, len(ids) - 1, window)]
    chunks = [c for c in chunks if len(c) > 1]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(chunks), batch_size):
            batch = chunks[i : i + batch_size]
            length = max(map(len, batch))
            x = torch.full((len(batch), length), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(x)
            for row, c in enumerate(batch):
                x[row, : len(c)] = torch.tensor(c)
                mask[row, : len(c)] = 1
            logits = model(input_ids=x.to(device), attention_mask=mask.to(device)).logits
            labels = x[:, 1:].masked_fill(mask[:, 1:] == 0, -100).to(device)
            total += float(
                torch.nn.functional.cross_entropy(
                    logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                    labels.reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                )
            )
            count += int((labels != -100).sum())
    finally:
        model.train(was_training)
    return total / max(count, 1)


def untouched(
    probe: list[tuple[str, str]], rows: list[dict[str, Any]]
) -> list[tuple[str, str]]:
    """The ``probe`` pairs whose answer occurs in no rehearsal row's prompt or completion.

    Retention on these is retention the rehearsal did not produce by asking the item.

    Example:
        >>> untouched([("Capital of France:", " Paris"), ("hot ->", " cold")],
        ...           [{"prompt": "Where is Paris?", "completion": "In France."}])
        [('hot ->', ' cold')]
    """
    text = " ".join((str(r["prompt"]) + " " + str(r["completion"])).lower() for r in rows)
    return [(p, a) for p, a in probe if a.strip().lower() not in text]


def kept_untouched(
    probe: dict[str, list[tuple[str, str]]],
    known_hits: dict[str, list[bool]],
    rows: list[dict[str, Any]],
) -> tuple[int, float | None]:
    """``(n, share)``: how many probe items no rehearsal row mentions (:func:`untouched`)
    and the share of them still answered (``known_hits`` as :meth:`RealBase.measure`
    returns it, per format); ``share`` is None when every item is mentioned."""
    hit = {pair: h for fmt, pairs in probe.items() for pair, h in zip(pairs, known_hits[fmt])}
    far = untouched(list(hit), rows)
    return len(far), (sum(hit[p] for p in far) / len(far) if far else None)


def _probe(pairs: list[tuple[str, str]], tok: Any):
    from ..continual.probe import RetentionProbe

    return RetentionProbe(pairs, tok, batch_size=32, add_special_tokens=False)


def _hits(model: torch.nn.Module, pairs: list[tuple[str, str]], tok: Any) -> list[bool]:
    """Per-pair greedy exact match (the probe's own batched generation)."""
    probe = _probe(pairs, tok)
    was_training = model.training
    model.eval()
    hits: list[bool] = []
    try:
        with torch.no_grad():
            for i in range(0, len(probe), probe.batch_size):
                hits += probe._greedy_batch(model, probe._encoded[i : i + probe.batch_size])
    finally:
        model.train(was_training)
    return hits


def _candidates(tok: Any) -> dict[str, list[tuple[str, str]]]:
    out = {}
    for fmt, pairs in PROBE_CANDIDATES.items():
        out[fmt] = render_pairs(_chat_rows(pairs), tok) if fmt == "chat" else list(pairs)
    return out


@dataclass
class RealBase:
    """The real base of a lab run: its probe (filtered on it), base NLL and task data."""

    spec: RealSpec
    path: Path
    probe: dict[str, list[tuple[str, str]]]
    candidates: dict[str, int]
    base_nll: float
    cache_dir: str | None = None

    @property
    def recall(self) -> float:
        """Share of the probe the base answers: 1.0 by construction (kept items only)."""
        return 1.0

    def load(self):
        """``(model, tokenizer)`` fresh from the checkpoint (fp32 or NF4 per the spec)."""
        return load_real_model(self.spec.four_bit, self.cache_dir)

    def probe_groups(self, tok: Any) -> dict[str, list[tuple[str, str]]]:
        return self.probe

    def probe_pairs(self) -> list[tuple[str, str]]:
        return [p for pairs in self.probe.values() for p in pairs]

    def train_rows(self, tag: str, n: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
        """TRL rows of task ``tag`` (facts: the ``n_facts`` facts; skills: ``n_train`` rows).

        The data do not depend on the training seed (``spec.data_seed`` fixes them).
        """
        kind = REAL_TASKS[tag][0] if tag in REAL_TASKS else None
        size = n or (self.spec.n_facts if kind == "facts" else self.spec.n_train)
        return task_examples(tag, size, seed=self.spec.data_seed)

    def eval_pairs(self, tag: str, tok: Any) -> list[tuple[str, str]]:
        """Evaluation pairs of ``tag``: the trained facts, or held-out skill inputs."""
        if tag not in REAL_TASKS:
            raise ValueError(f"tag: unknown real-lab task {tag!r}; choose from {list(REAL_TASKS)}")
        if REAL_TASKS[tag][0] == "facts":
            rows = self.train_rows(tag)
        else:
            rows = task_examples(tag, self.spec.n_eval, seed=self.spec.data_seed, held_out=True)
        return render_pairs(rows, tok)

    def extra_metrics(self, model: torch.nn.Module, tok: Any) -> dict[str, float]:
        nll = text_nll(model, tok, max_tokens=self.spec.nll_tokens)
        return {"nll": nll, "nll_rise": nll - self.base_nll}

    def measure(
        self, model: torch.nn.Module, tok: Any, tasks: list[str] | None = None
    ) -> dict[str, Any]:
        """Known facts kept, new-task accuracy and NLL rise of ``model`` (any wrapper).

        Returns ``{"known_kept", "known_kept_by_format", "known_hits" (format -> one
        bool per probe item, in :meth:`probe_pairs` order), "task_accuracy" (tag -> acc),
        "new_learned" (mean over ``tasks``), "nll", "nll_rise"}``; ``known_kept`` is the
        share of the kept probe items still answered exactly (the base scores 1.0).
        """
        by_format, known_hits, hits_total, n_total = {}, {}, 0, 0
        for fmt, pairs in self.probe.items():
            hits = _hits(model, pairs, tok)
            known_hits[fmt] = hits
            by_format[fmt] = sum(hits) / len(hits)
            hits_total += sum(hits)
            n_total += len(hits)
        tasks = list(tasks or [])
        acc = {}
        for tag in tasks:
            pairs = self.eval_pairs(tag, tok)
            acc[tag] = sum(_hits(model, pairs, tok)) / len(pairs)
        out: dict[str, Any] = {
            "known_kept": hits_total / max(n_total, 1),
            "known_kept_by_format": by_format,
            "known_hits": known_hits,
            "task_accuracy": acc,
            "new_learned": sum(acc.values()) / len(acc) if acc else None,
        }
        out.update(self.extra_metrics(model, tok))
        return out


def real_base(
    spec: RealSpec | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> RealBase:
    """The real base of ``spec``, its probe filtered on it (cached after the first call).

    The first call loads the base, asks every probe candidate (about a minute on one
    core) and scores the general text, then writes ``real-probe-<key>.json`` next to the
    checkpoint; later calls read it.
    """
    from ..real_model import smollm2_checkpoint

    spec = spec or RealSpec()
    folder = smollm2_checkpoint(cache_dir)
    meta_path = folder.parent / f"real-probe-{spec.key()}.json"
    cache = str(cache_dir) if cache_dir is not None else None
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        probe = {f: [tuple(p) for p in pairs] for f, pairs in meta["probe"].items()}
        return RealBase(spec, folder, probe, meta["candidates"], meta["base_nll"], cache)
    from tqdm.auto import tqdm

    model, tok = load_real_model(spec.four_bit, cache_dir)
    probe, counts = {}, {}
    for fmt, pairs in tqdm(_candidates(tok).items(), desc="filtering probe", disable=not progress):
        hits = _hits(model, pairs, tok)
        probe[fmt] = [p for p, h in zip(pairs, hits) if h]
        counts[fmt] = len(pairs)
        logger.info("probe %s: base answers %d of %d", fmt, len(probe[fmt]), len(pairs))
    probe = {f: p for f, p in probe.items() if p}
    base_nll = text_nll(model, tok, max_tokens=spec.nll_tokens)
    if not math.isfinite(base_nll):
        raise RuntimeError(f"the real base's general-text NLL is {base_nll}")
    meta = {
        "spec": dataclasses.asdict(spec),
        "candidates": counts,
        "kept": {f: len(p) for f, p in probe.items()},
        "base_nll": base_nll,
        "probe": probe,
    }
    atomic_write_json(meta_path, meta, indent=1)
    return RealBase(spec, folder, probe, counts, base_nll, cache)


def measure(
    model: torch.nn.Module,
    tok: Any,
    tasks: list[str] | None = None,
    *,
    spec: RealSpec | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """:meth:`RealBase.measure` on the (cached) real base of ``spec``: the one-call API.

    ``model`` is anything built from SmolLM2-135M-Instruct (plain, ``PeftModel``, 4-bit);
    ``tok`` should be :func:`load_real_model`'s tokenizer (eos/pad ``<|im_end|>``). For a
    4-bit model pass ``spec=RealSpec(four_bit=True)`` (its probe is filtered on the
    4-bit base).
    """
    return real_base(spec, cache_dir=cache_dir, progress=False).measure(model, tok, tasks)
