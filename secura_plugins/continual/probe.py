"""Retention probe: how much of "what the model already knew" survives fine-tuning.

A probe is a held-out list of ``(prompt, answer)`` pairs that the base model answers
(for example facts, arithmetic, or the previous tasks' questions). ``evaluate(model)``
reports, over the whole set:

* ``loss``: mean negative log-likelihood per answer token, teacher-forced
  (``-log p(answer | prompt)`` summed over answer tokens / number of answer tokens);
* ``accuracy``: exact match of the greedy continuation: the model generates as many
  tokens as the answer has, greedily, and a pair counts when every token matches.

Prompt and answer are tokenized separately and concatenated (the prompt with the
tokenizer's special tokens, e.g. BOS; the answer without), so the answer's tokens are
well defined. Greedy decoding is a plain argmax loop with the KV cache, written here so
that it behaves the same for every model wrapper (PEFT, 4-bit) and ``transformers``
version. The model's train/eval mode is restored afterwards.

Example:
    >>> from secura_plugins.tiny import build_tiny_model, build_tokenizer
    >>> from secura_plugins.continual.probe import RetentionProbe
    >>> tok = build_tokenizer()
    >>> model = build_tiny_model("llama", vocab_size=len(tok))
    >>> probe = RetentionProbe([("2+2=", "4"), ("3+3=", "6")], tok)
    >>> scores = probe.evaluate(model)
    >>> sorted(scores), 0.0 <= scores["accuracy"] <= 1.0
    (['accuracy', 'loss'], True)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["RetentionProbe", "load_pairs"]


def load_pairs(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Read ``(prompt, answer)`` pairs from a JSON-lines file with ``prompt``/``answer`` keys.

    ``completion`` is accepted in place of ``answer`` (TRL's prompt-completion format).
    """
    pairs = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            answer = row.get("answer", row.get("completion"))
            if "prompt" not in row or answer is None:
                raise ValueError(
                    f"{path}:{lineno}: needs 'prompt' and 'answer' (or 'completion') keys"
                )
            pairs.append((str(row["prompt"]), str(answer)))
    return pairs


class RetentionProbe:
    """Loss and exact-match accuracy of a model on fixed ``(prompt, answer)`` pairs.

    Args:
        pairs: ``(prompt, answer)`` tuples or dicts with ``prompt`` and ``answer``
            (or ``completion``) keys.
        tokenizer: the model's tokenizer (needs a pad or eos token).
        batch_size: pairs per forward pass.
        add_special_tokens: whether the prompt gets the tokenizer's special tokens.
        progress: show a tqdm bar.
    """

    def __init__(
        self,
        pairs: Iterable[tuple[str, str] | Mapping[str, str]],
        tokenizer: Any,
        *,
        batch_size: int = 16,
        add_special_tokens: bool = True,
        progress: bool = False,
    ) -> None:
        self.pairs: list[tuple[str, str]] = []
        for i, pair in enumerate(pairs):
            if isinstance(pair, Mapping):
                answer = pair.get("answer", pair.get("completion"))
                if "prompt" not in pair or answer is None:
                    raise ValueError(f"pairs[{i}]: needs 'prompt' and 'answer' keys")
                pair = (pair["prompt"], answer)
            self.pairs.append((str(pair[0]), str(pair[1])))
        if not self.pairs:
            raise ValueError("pairs: the retention probe needs at least one (prompt, answer) pair")
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.progress = progress
        pad = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        if pad is None:
            raise ValueError(
                "tokenizer: has neither a pad nor an eos token; set tokenizer.pad_token"
            )
        self.pad_id = int(pad)
        self._encoded = []
        for i, (prompt, answer) in enumerate(self.pairs):
            p = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
            a = tokenizer(answer, add_special_tokens=False)["input_ids"]
            if not p or not a:
                raise ValueError(f"pairs[{i}]: prompt and answer must both tokenize to >= 1 token")
            self._encoded.append((list(p), list(a)))

    def __len__(self) -> int:
        return len(self.pairs)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _device(model: nn.Module) -> torch.device:
        return next(model.parameters()).device

    def _loss_batch(self, model: nn.Module, batch: Sequence[tuple[list[int], list[int]]]):
        """Sum of answer-token NLL and answer-token count (right padding)."""
        device = self._device(model)
        length = max(len(p) + len(a) for p, a in batch)
        ids = torch.full((len(batch), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for row, (p, a) in enumerate(batch):
            seq = p + a
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            labels[row, len(p) : len(seq)] = torch.tensor(a)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
        shift_labels = labels[:, 1:].reshape(-1).to(device)
        nll = nn.functional.cross_entropy(
            shift_logits, shift_labels, ignore_index=-100, reduction="sum"
        )
        return float(nll), int((shift_labels != -100).sum())

    def _greedy_batch(
        self, model: nn.Module, batch: Sequence[tuple[list[int], list[int]]]
    ) -> list[bool]:
        """Exact match of greedy continuations (left padding, KV cache, argmax)."""
        device = self._device(model)
        plen = max(len(p) for p, _ in batch)
        steps = max(len(a) for _, a in batch)
        ids = torch.full((len(batch), plen), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (p, _) in enumerate(batch):
            ids[row, plen - len(p) :] = torch.tensor(p)
            mask[row, plen - len(p) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        generated = []
        past = None
        step_ids = ids
        step_pos = position_ids
        for _ in range(steps):
            out = model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=step_pos,
                past_key_values=past,
                use_cache=True,
            )
            nxt = out.logits[:, -1].argmax(-1)  # (batch,)
            generated.append(nxt)
            past = out.past_key_values
            step_ids = nxt[:, None]
            step_pos = step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
        gen = torch.stack(generated, dim=1).cpu()  # (batch, steps)
        return [gen[row, : len(a)].tolist() == a for row, (_, a) in enumerate(batch)]

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def evaluate(self, model: nn.Module, *, generate: bool = True) -> dict[str, float]:
        """``{"loss": ..., "accuracy": ...}`` over all pairs (accuracy only with ``generate``)."""
        was_training = model.training
        model.eval()
        nll, count, hits = 0.0, 0, 0
        chunks = [
            self._encoded[i : i + self.batch_size] for i in range(0, len(self), self.batch_size)
        ]
        iterator: Iterable = chunks
        if self.progress:
            from tqdm.auto import tqdm

            iterator = tqdm(chunks, desc="retention probe", leave=False)
        try:
            for batch in iterator:
                s, c = self._loss_batch(model, batch)
                nll += s
                count += c
                if generate:
                    hits += sum(self._greedy_batch(model, batch))
        finally:
            model.train(was_training)
        scores = {"loss": nll / max(count, 1)}
        if generate:
            scores["accuracy"] = hits / len(self)
        return scores
