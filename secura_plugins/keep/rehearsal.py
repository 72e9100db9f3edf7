"""Self-rehearsal: the base model writes its own rehearsal examples, no data needed.

Before a task, the model with its adapter disabled (PEFT's ``disable_adapter()``: the
base, on a 4-bit base too, with no second copy) writes prompts and answers them:

* **task-shaped prompts**: a seeded task prompt is cut where it first differs from
  another task prompt (the template they share, before the subject) and the base
  *samples* a new subject up to the ending the prompts share (``"The capital of
  Velmora is"`` -> ``"The capital of"`` -> ``"The capital of Brazil is"``), so the
  task's own subjects, whose answers the task changes, are not rehearsed. With
  ``task_layout`` (off in the preset, see :class:`KeepConfig`), an ending that
  spans lines keeps the task's layout around another question (``"Q: What is Zeno's
  job?\\nA:"`` -> ``"Q: What is the boiling point of water?\\nA:"``), and a finished line
  takes an ending that is only punctuation (``"Initials of the Integer Series?"``);
* **generic prompts**: a seeded stem from :data:`GENERIC_STEMS` (questions,
  instructions, statements) continued by sampling up to the end of the sentence.

Each prompt is answered **greedily** by the same model (the answer is what the base
would have said). Prompts are deduplicated (case and spacing ignored) and any prompt of
the task itself or of the ``exclude`` set (pass every evaluation probe's prompts) is
dropped. Rows can be bounded in tokens (``max_row_tokens: task``: as long as the task's
longest row, so a batch mixing both is not padded to long rehearsal rows; a greedy answer
cut short is still the base's own text; cheaper, but it kept less on the lab). The work is
bounded in rows, attempts and seconds, with a progress bar.

Example (tiny random model, so the text is noise; runs in a second):
    >>> from secura_plugins.keep.rehearsal import generate_rehearsal
    >>> from secura_plugins.keep import KeepConfig
    >>> from secura_plugins.tiny import build_tiny_model, build_tokenizer
    >>> tok = build_tokenizer()
    >>> rows = generate_rehearsal(build_tiny_model(vocab_size=len(tok)), tok, ["1+1=", "2+3="],
    ...                           KeepConfig(rehearsal=4, max_new_tokens=4), progress=False)
    >>> len(rows) <= 4 and all(set(r) == {"prompt", "completion", "kind"} for r in rows)
    True
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .._fs import atomic_open
from .config import KeepConfig

__all__ = [
    "GENERIC_STEMS",
    "REHEARSAL_FILE",
    "adapter_disabled",
    "generate_rehearsal",
    "load_rehearsal",
    "normalize_prompt",
    "row_budget",
    "row_is_chat",
    "save_rehearsal",
]

REHEARSAL_FILE = "keep_rehearsal.jsonl"
_HEADER = "__secura_keep__"

#: Openings of generic prompts (questions, instructions, statements) the base continues.
GENERIC_STEMS = (
    "What is", "What are", "Who was", "Who is", "Where is", "When did", "Why do", "How do",
    "How many", "Which", "Explain", "Describe", "Give an example of", "Write a sentence about",
    "Name a", "Tell me about", "Define", "Translate to French:", "Summarize:", "The",
    "In", "A", "Can you", "Is it true that", "List three",
)


#: Openings of statements, for task-shaped prompts that keep only the task's ending.
_OPENINGS = (
    "The main", "The best", "The most", "The first", "The only", "One of the", "A good",
    "My favorite", "Our goal", "The problem", "The result", "The answer", "The reason",
    "The key", "His", "Her", "Their",
)


def normalize_prompt(text: str) -> str:
    """Case- and whitespace-insensitive key used for deduplication and exclusion."""
    return re.sub(r"\s+", " ", str(text)).strip().lower()


@contextlib.contextmanager
def adapter_disabled(model: Any) -> Iterator[Any]:
    """``model.disable_adapter()`` for a PEFT model (the base, for every method of this
    library: each one adds its whole update, merged SECURA ``U_acc`` and SC-LoRA's
    ``- B0 A0`` included, inside the adapter path), a no-op for a plain model."""
    disable = getattr(model, "disable_adapter", None)
    if disable is None:
        yield model
        return
    with disable():
        yield model


def _tokens(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _chat_prompt(tokenizer: Any, prompt: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def _generate(
    model: Any, tokenizer: Any, texts: list[str], *, max_new_tokens: int, sample: bool,
    config: KeepConfig, seed: int,
) -> list[str]:
    """Continuations of ``texts`` (left-padded batch), decoded without special tokens."""
    side, pad_token = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
        if pad_token is None:
            tokenizer.pad_token = None
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    kwargs: dict[str, Any] = {"do_sample": sample, "max_new_tokens": max_new_tokens}
    if sample:
        kwargs.update(temperature=config.temperature, top_p=config.top_p, top_k=0)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        out = model.generate(**enc, pad_token_id=pad, **kwargs)
    new = out[:, enc["input_ids"].shape[1]:]
    return [tokenizer.decode(row, skip_special_tokens=True) for row in new]


def _first_sentence(text: str) -> str:
    """The first line of ``text`` up to its first sentence end ("3.14" is not one)."""
    line = text.split("\n", 1)[0]
    match = re.search(r"[?.!:](?=\s|$)", line)
    return line[: match.end()] if match else line


def generate_rehearsal(
    model: Any,
    tokenizer: Any,
    task_prompts: Iterable[str],
    config: KeepConfig,
    *,
    exclude: Iterable[str] = (),
    chat: bool = False,
    progress: bool = True,
    row_tokens: int | None = None,
) -> list[dict[str, str]]:
    """Up to ``config.rehearsal`` rows ``{"prompt", "completion", "kind"}`` written by
    ``model`` with its adapter disabled (see the module docstring).

    ``kind`` is ``"task"``, ``"generic"``, ``"text"`` or ``"chat"``. ``exclude``: prompts
    that must never be produced (evaluation probes); the task's own prompts are excluded
    too. With ``chat`` the prompts are answered through the tokenizer's chat template;
    ``config.generic_format`` may write generic rows in the other format (``"text"`` rows
    in plain text on a chat task, ``"chat"`` rows in the template on a plain task: see
    :func:`row_is_chat`). The model is put in eval mode for the generation and its mode
    restored afterwards. ``row_tokens``: the bound on a row's prompt + answer tokens (0:
    none); by default ``config.max_row_tokens``, whose ``"task"`` is resolved here as the
    longest task prompt + 4 tokens (``Keep`` passes the longest task row instead).
    """
    task_prompts = [str(p) for p in task_prompts if str(p).strip()]
    budget = row_budget(config, tokenizer, task_prompts) if row_tokens is None else row_tokens
    banned = {normalize_prompt(p) for p in exclude} | {normalize_prompt(p) for p in task_prompts}
    want = config.rehearsal
    n_generic = round(want * config.generic_share) if task_prompts else want
    quota = {"task": want - n_generic, "generic": n_generic}
    rng = random.Random(config.seed)
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    start = time.monotonic()
    was_training = model.training
    model.eval()
    bar = tqdm(total=want, desc="self-rehearsal", disable=not progress, unit="row")
    attempts, batch_no, n_generic = 0, 0, 0
    templated = bool(getattr(tokenizer, "chat_template", None))
    try:
        with adapter_disabled(model):
            while len(rows) < want and attempts < 8 * want:
                if time.monotonic() - start > config.max_seconds:
                    break
                kinds = [k for k in ("task", "generic") if quota[k] > 0]
                if not kinds:
                    break
                batch = _prompt_batch(rng, kinds, quota, task_prompts, tokenizer, config, budget)
                attempts += len(batch)
                batch_no += 1
                seed = config.seed * 1_000_003 + batch_no
                prompts = _sample_prompts(model, tokenizer, batch, config, seed, budget)
                fresh = []
                for (kind, *_), prompt in zip(batch, prompts):
                    key = normalize_prompt(prompt)
                    if len(key) < 3 or key in seen or key in banned or quota[kind] <= 0:
                        continue
                    if budget and len(_tokens(tokenizer, prompt)) > budget - 1:
                        continue  # no room left for an answer
                    seen.add(key)
                    quota[kind] -= 1
                    fresh.append((kind, prompt, _row_kind(kind, chat, config, n_generic,
                                                          templated)))
                    n_generic += kind == "generic"
                if not fresh:
                    continue
                in_chat = [row_is_chat(final, chat) for _, _, final in fresh]
                inputs = [_chat_prompt(tokenizer, p) if c else p
                          for (_, p, _), c in zip(fresh, in_chat)]
                room = [budget - len(_tokens(tokenizer, p)) if budget else 0 for _, p, _ in fresh]
                new_tokens = config.max_new_tokens
                if budget:
                    new_tokens = max(1, min(new_tokens, max(room)))
                answers = _generate(
                    model, tokenizer, inputs, max_new_tokens=new_tokens,
                    sample=False, config=config, seed=seed,
                )
                for (kind, prompt, final), answer, left, c in zip(fresh, answers, room, in_chat):
                    if budget:  # a prefix of the greedy answer: still the base's text
                        answer = tokenizer.decode(_tokens(tokenizer, answer)[:left])
                    # One sentence: short rows keep padded batches (and step time) small.
                    # (An answer that starts on a new paragraph is dropped as empty: keeping
                    # it measured worse on the demo, 82% kept against 88%, one seed.)
                    answer = answer if c else _first_sentence(answer)
                    if not answer.strip():
                        quota[kind] += 1
                        continue
                    rows.append({"prompt": prompt, "completion": answer, "kind": final})
                    bar.update(1)
                    if len(rows) >= want:
                        break
    finally:
        bar.close()
        model.train(was_training)
    return rows


def row_is_chat(kind: str, chat: bool) -> bool:
    """Whether a rehearsal row of ``kind`` goes through the chat template: on a chat task
    every row does, except ``"text"`` rows (generic rows kept in plain text); on a plain
    task only ``"chat"`` rows (generic rows written in the chat template) do.

    Example:
        >>> row_is_chat("generic", True), row_is_chat("text", True), row_is_chat("task", False)
        (True, False, False)
        >>> row_is_chat("chat", False)
        True
    """
    return kind == "chat" or (chat and kind != "text")


def _row_kind(kind: str, chat: bool, config: KeepConfig, n_generic: int,
              templated: bool = True) -> str:
    """A generic prompt's row kind, per ``config.generic_format``: on a chat task
    ``"text"`` (plain text) for every one with ``plain``, every other one with ``both``;
    on a plain task ``"chat"`` (the chat template) for every other one with ``both``
    when the tokenizer has a template (``templated``)."""
    fmt = config.generic_format
    if kind != "generic" or fmt == "task":
        return kind
    if chat:
        return "text" if fmt == "plain" or (fmt == "both" and n_generic % 2) else kind
    return "chat" if fmt == "both" and templated and n_generic % 2 else kind


def row_budget(config: KeepConfig, tokenizer: Any, task_prompts: list[str]) -> int:
    """``config.max_row_tokens`` as a number of tokens (0: no bound); ``"task"`` without
    the task's rows: the longest task prompt + 4 tokens. Never under 8 tokens."""
    bound = config.max_row_tokens
    if bound == "task":
        if not task_prompts:
            return 0
        bound = max(len(_tokens(tokenizer, p)) for p in task_prompts) + 4
    return max(int(bound), 8) if bound else 0


def _prompt_batch(
    rng: random.Random, kinds: list[str], quota: dict[str, int], task_prompts: list[str],
    tokenizer: Any, config: KeepConfig, budget: int = 0,
) -> list[tuple[str, str, int, str]]:
    """``(kind, prefix, tokens to sample, ending)`` for one generation batch."""
    batch = []
    for _ in range(config.batch_size):
        weights = [quota[k] for k in kinds]
        kind = rng.choices(kinds, weights=weights)[0]
        if kind == "task":
            ids = _tokens(tokenizer, rng.choice(task_prompts))
            other = _tokens(tokenizer, rng.choice(task_prompts))
            # Keep the template the task's prompts share, resample what varies (the
            # subject): rehearsing the task's own subjects would contradict the task.
            cut = next((i for i, (a, b) in enumerate(zip(ids, other)) if a != b), len(ids))
            cut = max(1, min(cut, len(ids) - 1))
            # ... and the ending they share (" is"): the sampled subject must reach it.
            tail = next(
                (i for i, (a, b) in enumerate(zip(ids[::-1], other[::-1])) if a != b),
                min(len(ids), len(other)),
            )
            tail = max(0, min(tail, len(ids) - cut - 1))
            ending = tokenizer.decode(ids[len(ids) - tail :]) if tail else ""
            word = ending.strip()
            if (config.ending_share > 0 and word.isalpha() and len(word) <= 12
                    and rng.random() < config.ending_share):
                # ... or only that ending, after a generic opening ("The Eiffel Tower is")
                batch.append((kind, rng.choice(_OPENINGS), 16, ending))
                continue
            batch.append((kind, tokenizer.decode(ids[:cut]), len(ids) - cut + 4, ending))
        else:
            stem = rng.choice(GENERIC_STEMS)
            n = 16
            if budget:  # leave room for an answer of a couple of tokens
                n = max(2, min(n, budget - len(_tokens(tokenizer, stem)) - 2))
            batch.append((kind, stem, n, ""))
    return batch


def _task_shaped(prefix: str, continuation: str, ending: str, layout: bool = True) -> str:
    """``prefix`` + ``continuation`` up to the task prompts' shared ``ending``, or ``""``
    when the sampled text does not take the task's shape.

    Without ``layout`` the exact ending must appear on the sampled first line (the
    ``keep`` preset). With it, an ending that spans lines (``"'s job?\\nA:"`` in a Q/A
    template) is matched on the sampled first line by its first line; a sampled line that
    instead ends with the same mark (another question) takes the rest of the ending too,
    and a finished line takes an ending that is only punctuation. Either way the prompt
    has the task's layout with another subject or question.

    >>> _task_shaped("The capital of", " Peru is Lima.", " is")
    'The capital of Peru is'
    >>> _task_shaped("Q: What is", " Ada Lovelace's job?\\nA: She", "'s job?\\nA:")
    "Q: What is Ada Lovelace's job?\\nA:"
    >>> _task_shaped("Q: What is", " the boiling point of water?", "'s job?\\nA:")
    'Q: What is the boiling point of water?\\nA:'
    >>> _task_shaped("Q: What is", " the boiling point of water?", "'s job?\\nA:", layout=False)
    ''
    >>> _task_shaped("Q: What is", " the", "'s job?\\nA:")  # not a question: no shape
    ''
    >>> _task_shaped("Initials of", " Ada Byron\\nThe", "?")  # a finished line, the task's "?"
    'Initials of Ada Byron?'
    """
    line = continuation.split("\n", 1)[0]
    head, newline, rest = ending.partition("\n") if layout else (ending, "", "")
    word = head.strip()
    if word:
        start = r"(?<!\w)" if word[:1].isalnum() else ""  # "is", not "This"
        found = re.search(start + re.escape(word) + r"(?=\W|$)", line)
        if found:
            return prefix + line[: found.end()] + newline + rest
    if not layout:
        return ""
    mark = word[-1:] if word and not word[-1].isalnum() else ""
    if newline and line.strip() and (line.rstrip().endswith(mark) if mark
                                     else "\n" in continuation):
        return prefix + line.rstrip() + newline + rest
    if word and not any(c.isalnum() for c in word) and line.strip() and "\n" in continuation:
        return prefix + line.rstrip(" .,:;") + head.lstrip()  # a finished line + the "?"
    return ""


def _sample_prompts(
    model: Any, tokenizer: Any, batch: list[tuple[str, str, int, str]], config: KeepConfig,
    seed: int, budget: int = 0,
) -> list[str]:
    longest = max(n for _, _, n, _ in batch)
    conts = _generate(
        model, tokenizer, [p for _, p, _, _ in batch], max_new_tokens=longest, sample=True,
        config=config, seed=seed,
    )
    prompts = []
    for (kind, prefix, n, ending), cont in zip(batch, conts):
        if kind == "task":
            line = cont.split("\n", 1)[0]
            if ending:  # up to the shared ending, or nothing (no task shape)
                text = _task_shaped(prefix, cont, ending, config.task_layout)
                if prefix in _OPENINGS and not line[:1].isspace():
                    text = ""  # "The-is": the opening must be followed by a new word
            else:
                text = prefix + tokenizer.decode(_tokens(tokenizer, line)[: n - 4])
        elif cont[:1].isspace():  # a new word after the stem, not "Explain-the-..."
            if budget:
                cont = tokenizer.decode(_tokens(tokenizer, cont)[:n])
            text = prefix + _first_sentence(cont)
        else:
            text = ""
        prompts.append(text.rstrip())
    return prompts


# --------------------------------------------------------------------------- files
def save_rehearsal(
    rows: list[dict[str, str]], path: str | os.PathLike, *, settings: dict[str, Any]
) -> Path:
    """Write ``rows`` as JSON lines after a header with ``settings`` (atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as fh:
        fh.write(json.dumps({_HEADER: 1, "settings": settings}) + "\n")
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def load_rehearsal(path: str | os.PathLike) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """``(rows, settings)`` of a file written by :func:`save_rehearsal`."""
    with open(path, encoding="utf-8") as fh:
        lines = [line for line in fh if line.strip()]
    header = json.loads(lines[0]) if lines else {}
    if header.get(_HEADER) != 1:
        raise ValueError(f"{path}: is not a secura self-rehearsal file (no header line)")
    return [json.loads(line) for line in lines[1:]], header.get("settings", {})
