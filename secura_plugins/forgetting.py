"""``secura forgetting``: how much a fine-tuned model forgot, measured with no data from you.

Given a base model and an adapter trained on it (by ``secura train``, TRL's
``SecuraCallback``, axolotl or plain PEFT LoRA), or a merged model, three probes compare
the two:

* **knowledge the base states itself.** The base writes short quiz questions on bundled
  topics (:data:`TOPICS`) and answers each twice, in two phrasings (a plain
  ``Question:/Answer:`` prompt, and its chat template, or a ``Q:/A:`` prompt without one).
  A question is kept only where the base is self-consistent: the key word of its first
  answer appears in the second, and its greedy answer is reproduced when scored as a
  probe. The fine-tuned model is then scored on the kept questions against the base's
  own answers (greedy exact match, and the NLL of those answers).
* **general text.** The mean token NLL on bundled English text neither model trained on
  (:func:`secura_plugins.lab.real.text_nll`); its rise is the forgetting metric PEFT's
  benchmark reports.
* **drift on your prompts.** The mean per-token KL(base || fine-tuned) of the next-token
  distributions over prompts you pass (``--prompts``, one per line or JSON lines with
  ``prompt``/``text``), or by default over the probe's questions.

Results: a table on stdout, ``forgetting.json`` and ``forgetting.png`` in ``--out``, and
the JSON on stdout with ``--json``.

Example:
    >>> from secura_plugins.forgetting import keyword, consistent
    >>> keyword(" Paris, the city of light."), consistent(" Paris.", "The capital is Paris.")
    ('paris', True)
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "TOPICS",
    "consistent",
    "forgetting_report",
    "format_report",
    "generate_probe",
    "keyword",
    "kl_to_base",
    "load_prompts",
    "plot_report",
    "score_probe",
]

#: Topics the base writes its quiz questions about (general knowledge, several kinds).
# fmt: off
TOPICS = [
    "France", "Japan", "Italy", "Germany", "Egypt", "Canada", "Brazil", "India", "China",
    "Russia", "Australia", "Mexico", "Spain", "Greece", "the Moon", "the Sun", "Mars", "Jupiter",
    "the Pacific Ocean", "the Nile", "Mount Everest", "the Amazon rainforest", "water", "gold",
    "oxygen", "iron", "photosynthesis", "gravity", "electricity", "the human heart", "DNA",
    "dinosaurs", "elephants", "penguins", "the piano", "Shakespeare", "Mozart",
    "Leonardo da Vinci", "Albert Einstein", "Isaac Newton", "the Roman Empire", "World War II",
    "the Olympic Games", "football", "chess", "the English language", "mathematics", "computers",
]
# fmt: on

_QUESTION_PROMPT = (
    "Short quiz questions, each with a one-word answer.\n"
    "Topic: Japan\nQuestion: What is the capital of Japan?\n"
    "Topic: the Sun\nQuestion: What type of celestial body is the Sun?\n"
    "Topic: {topic}\nQuestion:"
)
_STOP_WORDS = {"the", "a", "an", "is", "of", "it", "in", "to", "and", "its", "was", "are"}


def keyword(answer: str) -> str:
    """The first word of ``answer`` that is not a stop word, lower-cased ('' if none)."""
    words = re.findall(r"[\w'-]+", answer.lower())
    return next((w for w in words if w not in _STOP_WORDS), "")


def consistent(first: str, second: str) -> bool:
    """Whether the key word of ``first`` is among the words of ``second``."""
    key = keyword(first)
    return bool(key) and key in re.findall(r"[\w'-]+", second.lower())


def _bar(items: Sequence[Any], desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False, disable=not progress)


@torch.no_grad()
def _greedy(
    model: torch.nn.Module,
    tok: Any,
    prompts: list[str],
    max_new_tokens: int,
    *,
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "generating",
) -> list[str]:
    """Greedy continuations of ``prompts`` (left padding), each cut at its first newline."""
    side, tok.padding_side = tok.padding_side, "left"
    device = next(model.parameters()).device
    out: list[str] = []
    try:
        starts = list(range(0, len(prompts), batch_size))
        for i in _bar(starts, desc, progress):
            enc = tok(
                prompts[i : i + batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            ).to(device)
            ids = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
            for row in ids[:, enc["input_ids"].shape[1] :]:
                text = tok.decode(row, skip_special_tokens=True)
                out.append(text.split("\n", 1)[0])
    finally:
        tok.padding_side = side
    return out


def _second_phrasing(tok: Any, question: str) -> str:
    if getattr(tok, "chat_template", None):
        messages = [{"role": "user", "content": f"{question} Answer in a few words."}]
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"Q: {question}\nA:"


def generate_probe(
    base: torch.nn.Module, tok: Any, topics: Sequence[str] = TOPICS, *, progress: bool = False
) -> list[dict[str, Any]]:
    """Questions the base writes and answers itself; ``kept`` marks the self-consistent ones.

    Each item: ``topic``, ``question``, ``prompt`` (the plain phrasing), ``answer`` (the
    base's greedy answer to it, the probe's target), ``second`` (its answer in the other
    phrasing) and ``kept``.
    """
    from .continual.probe import RetentionProbe

    questions = _greedy(
        base,
        tok,
        [_QUESTION_PROMPT.format(topic=t) for t in topics],
        24,
        progress=progress,
        desc="base writes questions",
    )
    items = [
        {"topic": t, "question": q.strip(), "prompt": f"Question: {q.strip()}\nAnswer:"}
        for t, q in zip(topics, questions)
    ]
    items = [it for it in items if it["question"].endswith("?") and len(it["question"]) > 8]
    answers = _greedy(
        base, tok, [it["prompt"] for it in items], 8, progress=progress, desc="base answers"
    )
    seconds = _greedy(
        base,
        tok,
        [_second_phrasing(tok, it["question"]) for it in items],
        16,
        progress=progress,
        desc="base answers again",
    )
    for it, a, b in zip(items, answers, seconds):
        it.update(answer=a.rstrip(), second=b.strip(), kept=False)
    candidates = [
        it for it in items if it["answer"].strip() and consistent(it["answer"], it["second"])
    ]
    if candidates:  # the greedy answer must be reproduced when scored as a probe
        probe = RetentionProbe(
            [(it["prompt"], it["answer"]) for it in candidates], tok, add_special_tokens=False
        )
        for it, pair in zip(candidates, probe._encoded):
            it["kept"] = bool(probe._greedy_batch(base, [pair])[0])
    return items


def score_probe(model: torch.nn.Module, tok: Any, items: list[dict[str, Any]]) -> dict[str, Any]:
    """Exact match and answer NLL of ``model`` on the kept items (the base's answers)."""
    from .continual.probe import RetentionProbe

    kept = [it for it in items if it["kept"]]
    if not kept:
        return {"n": 0, "accuracy": None, "answer_nll": None}
    probe = RetentionProbe(
        [(it["prompt"], it["answer"]) for it in kept], tok, add_special_tokens=False
    )
    scores = probe.evaluate(model)
    return {"n": len(kept), "accuracy": scores["accuracy"], "answer_nll": scores["loss"]}


def load_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a text file (one per line) or JSON lines (``prompt`` or ``text``)."""
    from .errors import SecuraConfigError

    p = Path(path)
    if not p.is_file():
        raise SecuraConfigError("--prompts", f"{p} does not exist")
    prompts = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise SecuraConfigError("--prompts", f"{p}:{lineno}: not JSON ({err})") from None
            text = row.get("prompt", row.get("text")) if isinstance(row, dict) else None
            if not isinstance(text, str) or not text:
                raise SecuraConfigError(
                    "--prompts", f"{p}:{lineno}: a JSON line needs a 'prompt' or 'text' string"
                )
            prompts.append(text)
        else:
            prompts.append(line)
    if not prompts:
        raise SecuraConfigError("--prompts", f"{p} has no prompts; write one per line")
    return prompts


@torch.no_grad()
def kl_to_base(
    base: torch.nn.Module,
    model: torch.nn.Module,
    tok: Any,
    prompts: Sequence[str],
    *,
    max_length: int = 256,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """Mean per-token KL(base || model) of next-token distributions over ``prompts``.

    Every position of every prompt counts (padding excluded); ``max_prompt`` is the
    largest per-prompt mean.
    """
    device = next(model.parameters()).device
    base_device = next(base.parameters()).device
    total, count, per_prompt = 0.0, 0, []
    side, tok.padding_side = tok.padding_side, "right"
    try:
        starts = list(range(0, len(prompts), batch_size))
        for i in _bar(starts, "KL to the base", progress):
            enc = tok(
                list(prompts[i : i + batch_size]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            )
            mask = enc["attention_mask"].bool()
            p = base(**enc.to(base_device)).logits.float().log_softmax(-1).to(device)
            q = model(**enc.to(device)).logits.float().log_softmax(-1)
            kl = (p.exp() * (p - q)).sum(-1).cpu()  # (batch, length)
            for row, m in zip(kl, mask):
                per_prompt.append(float(row[m].mean()))
            total += float(kl[mask].sum())
            count += int(mask.sum())
    finally:
        tok.padding_side = side
    return {
        "prompts": len(per_prompt),
        "tokens": count,
        "mean_kl": total / max(count, 1),
        "max_prompt": max(per_prompt) if per_prompt else None,
    }


def forgetting_report(
    base: torch.nn.Module,
    model: torch.nn.Module,
    tok: Any,
    *,
    prompts: Sequence[str] | None = None,
    topics: Sequence[str] = TOPICS,
    max_text_tokens: int = 4096,
    progress: bool = False,
) -> dict[str, Any]:
    """All three probes; ``base`` and ``model`` share ``tok``. Returns the JSON report."""
    from .lab.real import text_nll

    steps = _bar(["probe", "base", "model", "text", "kl"], "forgetting", progress)
    report: dict[str, Any] = {}
    for step in steps:
        if step == "probe":
            items = generate_probe(base, tok, topics, progress=progress)
        elif step in ("base", "model"):
            report[f"knowledge_{step}"] = score_probe(base if step == "base" else model, tok, items)
        elif step == "text":
            nll_base = text_nll(base, tok, max_tokens=max_text_tokens)
            nll = text_nll(model, tok, max_tokens=max_text_tokens)
            report["general_text"] = {"nll_base": nll_base, "nll": nll, "rise": nll - nll_base}
        else:
            source = "--prompts" if prompts else "probe questions"
            texts = list(prompts) if prompts else [it["prompt"] for it in items]
            report["kl"] = {
                "source": source,
                **kl_to_base(base, model, tok, texts, progress=progress),
            }
    kb, km = report["knowledge_base"], report["knowledge_model"]
    report["knowledge"] = {
        "questions": len(topics),
        "written": len(items),
        "kept": kb["n"],
        "base_accuracy": kb["accuracy"],
        "accuracy": km["accuracy"],
        "retention": (km["accuracy"] / kb["accuracy"]) if kb["accuracy"] else None,
        "answer_nll_base": kb["answer_nll"],
        "answer_nll": km["answer_nll"],
    }
    report["items"] = items
    del report["knowledge_base"], report["knowledge_model"]
    return report


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_report(report: dict[str, Any]) -> str:
    """The report as a markdown table."""
    k, t, kl = report["knowledge"], report["general_text"], report["kl"]
    rows = [
        (
            "self-stated knowledge kept (exact match)",
            _fmt(k["base_accuracy"], ".0%"),
            _fmt(k["accuracy"], ".0%"),
            f"{k['kept']} of {k['written']} questions kept",
        ),
        (
            "NLL of the base's own answers (nats)",
            _fmt(k["answer_nll_base"], ".3f"),
            _fmt(k["answer_nll"], ".3f"),
            "rise "
            + _fmt(
                None if k["answer_nll"] is None else k["answer_nll"] - k["answer_nll_base"], "+.3f"
            ),
        ),
        (
            "general-text NLL (nats/token)",
            f"{t['nll_base']:.3f}",
            f"{t['nll']:.3f}",
            f"rise {t['rise']:+.3f}",
        ),
        (
            f"KL(base || model) on {kl['source']} (nats/token)",
            "0",
            f"{kl['mean_kl']:.4f}",
            f"{kl['prompts']} prompts, worst {_fmt(kl['max_prompt'], '.4f')}",
        ),
    ]
    lines = ["| probe | base | fine-tuned | note |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def plot_report(report: dict[str, Any], path: str | os.PathLike) -> Path | None:
    """Three bars, base vs fine-tuned: knowledge kept, answer NLL, general-text NLL; and
    the KL. Returns the PNG's path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    k, t, kl = report["knowledge"], report["general_text"], report["kl"]
    panels = [
        ("knowledge kept (%)", [100 * (k["base_accuracy"] or 0), 100 * (k["accuracy"] or 0)]),
        ("NLL of base's answers", [k["answer_nll_base"] or 0, k["answer_nll"] or 0]),
        ("general-text NLL", [t["nll_base"], t["nll"]]),
        (f"KL on {kl['source']}", [0.0, kl["mean_kl"]]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2))
    for ax, (title, values) in zip(axes, panels):
        ax.bar(["base", "fine-tuned"], values, color=["#888888", "#d62728"])
        ax.set_title(title, fontsize=9)
    fig.suptitle(report.get("model", "fine-tuned model"), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
