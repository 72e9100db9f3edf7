"""``secura forgetting``: how much a fine-tuned model forgot, measured with no data from you.

Given a base model and an adapter trained on it (by ``secura train``, TRL's
``SecuraCallback``, axolotl or plain PEFT LoRA), or a merged model, three probes compare
the two:

* **knowledge the base states itself.** The base writes short quiz questions on bundled
  topics (:data:`TOPICS`) and answers each twice, in two phrasings (through its chat
  template when it has one; plain ``Question:/Answer:`` and ``Q:/A:`` prompts when not).
  A question is kept only where the base is self-consistent: the key word of its first
  answer (a word the question does not contain) appears in the second, and its greedy
  answer is reproduced token for token when scored as a probe. The fine-tuned model is then scored on the kept questions against the base's
  own answers: does its greedy answer still contain the key word (and the whole answer,
  exactly), and the NLL of the base's answers.
* **general text.** The mean token NLL on bundled English text neither model trained on
  (:func:`secura_plugins.lab.real.text_nll`); its rise is the forgetting metric PEFT's
  benchmark reports.
* **drift on your prompts.** The mean per-token KL(base || fine-tuned) of the next-token
  distributions over prompts you pass (``--prompts``, one per line or JSON lines with
  ``prompt``/``text``), or by default over the probe's questions and bundled text.

Results: a table on stdout, ``forgetting.json`` and ``forgetting.png`` in ``--out``, and
the JSON on stdout with ``--json``.

Example:
    >>> from secura_plugins.forgetting import keyword, consistent
    >>> keyword("The capital of France is Paris.", "What is the capital of France?")
    'paris'
    >>> consistent("It is Paris.", "The capital is Paris."), consistent("Tokyo.", "Kyoto.")
    (True, False)
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ._fs import atomic_path

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

_WRITE = "Write one short quiz question about {topic}. Reply with the question only."
_WRITE_PLAIN = (
    "Short quiz questions.\nTopic: Japan\nQuestion: What is the capital of Japan?\n"
    "Topic: {topic}\nQuestion:"
)
_STOP_WORDS = {
    "a", "an", "the", "is", "are", "was", "were", "be", "of", "in", "on", "at", "to", "and",
    "or", "it", "its", "it's", "this", "that", "by", "for", "with", "as", "from", "which",
    "who", "what", "called", "known", "name", "named", "answer", "i", "yes", "no", "also",
    "about", "approximately", "around", "primarily", "mainly", "usually", "located", "not",
}  # fmt: skip


def _words(text: str) -> list[str]:
    return re.findall(r"[\w'-]+", text.lower())


def keyword(answer: str, question: str = "") -> str:
    """The first word of ``answer`` that is neither a stop word nor a word of ``question``
    (the new information the answer gives), lower-cased; '' if there is none."""
    known = set(_words(question)) | _STOP_WORDS
    return next((w for w in _words(answer) if w not in known), "")


def consistent(first: str, second: str, question: str = "") -> bool:
    """Whether the key word of ``first`` (see :func:`keyword`) is among ``second``'s words."""
    key = keyword(first, question)
    return bool(key) and key in _words(second)


def _bar(items: Sequence[Any], desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False, disable=not progress)


def _first_sentence(text: str) -> str:
    """``text`` up to its first line break or sentence end (kept), leading blanks dropped."""
    text = text.lstrip()
    text = text.split("\n", 1)[0]
    match = re.search(r"[.!?](\s|$)", text)
    return text[: match.end()].rstrip() if match else text.rstrip()


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
    """Greedy continuations of ``prompts`` (left padding), cut to their first sentence."""
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
                out.append(_first_sentence(tok.decode(row, skip_special_tokens=True)))
    finally:
        tok.padding_side = side
    return out


def _chat(tok: Any, text: str) -> str | None:
    if not getattr(tok, "chat_template", None):
        return None
    messages = [{"role": "user", "content": text}]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _phrasings(tok: Any, question: str) -> tuple[str, str]:
    """The probe's prompt for ``question`` and a second phrasing of it."""
    first = _chat(tok, question) or f"Question: {question}\nAnswer:"
    second = _chat(tok, f"Answer briefly. {question}") or f"Q: {question}\nA:"
    return first, second


def generate_probe(
    base: torch.nn.Module, tok: Any, topics: Sequence[str] = TOPICS, *, progress: bool = False
) -> list[dict[str, Any]]:
    """Questions the base writes and answers itself; ``kept`` marks the self-consistent ones.

    The base writes one question per topic (through its chat template when it has one),
    then answers each question in two phrasings. An item is kept when its first answer
    has a key word (a word that is not in the question), the second answer contains it,
    and the base reproduces the first answer token for token when it is scored as a
    probe. Each item: ``topic``, ``question``, ``prompt``, ``answer``, ``target`` (the
    answer as the probe scores it), ``key``, ``second``, ``kept``.
    """
    from .continual.probe import RetentionProbe

    asks = [_chat(tok, _WRITE.format(topic=t)) or _WRITE_PLAIN.format(topic=t) for t in topics]
    written = _greedy(base, tok, asks, 32, progress=progress, desc="base writes questions")
    items, seen = [], set()
    for topic, question in zip(topics, written):
        question = re.sub(r"^(question|q)\s*:\s*", "", question.strip(), flags=re.I)
        question = question.split("?", 1)[0].strip() + "?" if "?" in question else ""
        if len(question) > 8 and question.lower() not in seen:
            seen.add(question.lower())
            items.append({"topic": topic, "question": question})
    prompts = [_phrasings(tok, it["question"]) for it in items]
    answers = _greedy(base, tok, [p[0] for p in prompts], 24, progress=progress,
                      desc="base answers")  # fmt: skip
    seconds = _greedy(base, tok, [p[1] for p in prompts], 24, progress=progress,
                      desc="base answers again")  # fmt: skip
    for it, (prompt, _), answer, second in zip(items, prompts, answers, seconds):
        key = keyword(answer, it["question"])
        target = answer if prompt.endswith((" ", "\n")) else " " + answer  # as generated
        it.update(prompt=prompt, answer=answer, target=target, key=key, second=second)
        it["kept"] = bool(key) and key in _words(second)
    candidates = [it for it in items if it["kept"]]
    if candidates:  # the greedy answer must come back token for token when scored
        probe = RetentionProbe([(it["prompt"], it["target"]) for it in candidates], tok,
                               add_special_tokens=False)  # fmt: skip
        for it, pair in zip(candidates, probe._encoded):
            it["kept"] = bool(probe._greedy_batch(base, [pair])[0])
    return items


def score_probe(model: torch.nn.Module, tok: Any, items: list[dict[str, Any]]) -> dict[str, Any]:
    """On the kept items: how often ``model``'s greedy answer still contains the base's key
    word (``accuracy``), exact match of the whole answer, and the answers' mean NLL."""
    from .continual.probe import RetentionProbe

    kept = [it for it in items if it["kept"]]
    if not kept:
        return {"n": 0, "accuracy": None, "exact": None, "answer_nll": None}
    answers = _greedy(model, tok, [it["prompt"] for it in kept], 24)
    hits = [it["key"] in _words(a) for it, a in zip(kept, answers)]
    probe = RetentionProbe([(it["prompt"], it["target"]) for it in kept], tok,
                           add_special_tokens=False)  # fmt: skip
    scores = probe.evaluate(model)
    return {
        "n": len(kept),
        "accuracy": sum(hits) / len(kept),
        "exact": scores["accuracy"],
        "answer_nll": scores["loss"],
        "answers": answers,
    }


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
    max_text_tokens: int = 1024,
    progress: bool = False,
) -> dict[str, Any]:
    """All three probes; ``base`` and ``model`` share ``tok``. Returns the JSON report.

    Without ``prompts`` the KL is taken over the probe's questions and the first 16
    paragraphs of the bundled general text.
    """
    from .lab.real import general_text, text_nll

    report: dict[str, Any] = {}
    scores: dict[str, dict[str, Any]] = {}
    for step in _bar(["probe", "base", "model", "text", "kl"], "forgetting", progress):
        if step == "probe":
            items = generate_probe(base, tok, topics, progress=progress)
        elif step in ("base", "model"):
            scores[step] = score_probe(base if step == "base" else model, tok, items)
        elif step == "text":
            nll_base = text_nll(base, tok, max_tokens=max_text_tokens)
            nll = text_nll(model, tok, max_tokens=max_text_tokens)
            report["general_text"] = {
                "nll_base": nll_base,
                "nll": nll,
                "rise": nll - nll_base,
                "tokens": max_text_tokens,
            }
        else:
            source, texts = "--prompts", list(prompts or [])
            if not texts:
                paragraphs = [p for p in general_text().split("\n\n") if p.strip()][:16]
                source = "probe questions + general text"
                texts = [it["prompt"] for it in items] + paragraphs
            kl = kl_to_base(base, model, tok, texts, progress=progress)
            report["kl"] = {"source": source, **kl}
    kb, km = scores["base"], scores["model"]
    for it, answer in zip([it for it in items if it["kept"]], km.pop("answers", [])):
        it["model_answer"] = answer
    knowledge = {
        "topics": len(topics),
        "written": len(items),
        "kept": kb["n"],
        "base_accuracy": kb["accuracy"],
        "accuracy": km["accuracy"],
        "retention": km["accuracy"] / kb["accuracy"] if kb["accuracy"] else None,
        "base_exact": kb["exact"],
        "exact": km["exact"],
        "answer_nll_base": kb["answer_nll"],
        "answer_nll": km["answer_nll"],
    }
    return {"knowledge": knowledge, **report, "items": items}


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_report(report: dict[str, Any]) -> str:
    """The report as a markdown table."""
    k, t, kl = report["knowledge"], report["general_text"], report["kl"]
    nll_rise = None
    if k["answer_nll"] is not None:
        nll_rise = k["answer_nll"] - k["answer_nll_base"]
    rows = [
        ("self-stated knowledge kept (key word in the answer)",
         _fmt(k["base_accuracy"], ".0%"), _fmt(k["accuracy"], ".0%"),
         f"{k['kept']} of {k['written']} questions kept; exact answer {_fmt(k['exact'], '.0%')}"),
        ("NLL of the base's own answers (nats/token)",
         _fmt(k["answer_nll_base"], ".3f"), _fmt(k["answer_nll"], ".3f"),
         f"rise {_fmt(nll_rise, '+.3f')}"),
        ("general-text NLL (nats/token)", f"{t['nll_base']:.3f}", f"{t['nll']:.3f}",
         f"rise {t['rise']:+.3f}"),
        (f"KL(base || model) on {kl['source']} (nats/token)", "0", f"{kl['mean_kl']:.4f}",
         f"{kl['prompts']} prompts, worst {_fmt(kl['max_prompt'], '.4f')}"),
    ]  # fmt: skip
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
    try:
        with atomic_path(path, suffix=".tmp.png") as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    return path
