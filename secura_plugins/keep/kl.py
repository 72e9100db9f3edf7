"""The KL anchor to the base: ``KL(p_base || p_model)`` on the trained positions.

The teacher is the same model with its adapter disabled (:func:`teacher_logits`, a
no-grad forward: no second copy of the model, 4-bit bases included), or the base's
top-k log-probabilities cached once per rehearsal row (:class:`TeacherCache`), which
spares the teacher forward at every step.

Positions: ``logits[:, t]`` predicts token ``t + 1``, so position ``t`` is anchored
where ``labels[:, t + 1] != -100`` (the tokens the task loss trains).

Example:
    >>> import torch
    >>> from secura_plugins.keep.kl import kl_full, kl_topk
    >>> s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    >>> mask = torch.ones(2, 5, dtype=torch.bool)
    >>> float(kl_full(t, t, mask)) == 0.0
    True
    >>> idx, logp = torch.log_softmax(t, -1).topk(11, dim=-1)[::-1]  # all tokens: exact
    >>> torch.allclose(kl_topk(s, idx, logp, mask), kl_full(s, t, mask), atol=1e-5)
    True
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.nn import functional as F

from .rehearsal import adapter_disabled

__all__ = ["TeacherCache", "kl_full", "kl_topk", "row_key", "teacher_logits", "trained_positions"]


def trained_positions(labels: torch.Tensor | None, attention_mask: torch.Tensor) -> torch.Tensor:
    """Boolean ``(B, T)`` mask of the positions whose next token is trained."""
    mask = torch.zeros_like(attention_mask, dtype=torch.bool)
    if labels is None:
        mask[:, :-1] = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    else:
        mask[:, :-1] = labels[:, 1:] != -100
    return mask


def kl_full(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over ``mask`` of ``KL(softmax(teacher) || softmax(student))`` (fp32)."""
    s = F.log_softmax(student[mask].float(), dim=-1)
    t = F.log_softmax(teacher[mask].float(), dim=-1)
    if s.numel() == 0:
        return student.sum() * 0.0
    return (t.exp() * (t - s)).sum(-1).mean()


def kl_topk(
    student: torch.Tensor, idx: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """KL with the teacher known on its top-k tokens only; the rest is one "tail" bucket.

    ``idx``/``logp`` are ``(B, T, k)`` teacher token ids and log-probabilities. Exact
    when k is the vocabulary size; otherwise the KL of the (k + 1)-bucket distributions,
    a lower bound of the full KL.
    """
    s_all = F.log_softmax(student[mask].float(), dim=-1)
    if s_all.numel() == 0:
        return student.sum() * 0.0
    s = s_all.gather(-1, idx[mask].long())
    t = logp[mask].float()
    head = (t.exp() * (t - s)).sum(-1)
    tiny = torch.finfo(torch.float32).tiny
    t_tail = (1 - t.exp().sum(-1)).clamp_min(tiny)
    s_tail = (1 - s.exp().sum(-1)).clamp_min(tiny)
    tail = t_tail * (t_tail.log() - s_tail.log())
    return (head + tail).mean()


@torch.no_grad()
def teacher_logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
    """Logits of ``model`` with its adapter disabled (the base), without gradients."""
    with adapter_disabled(model):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


def row_key(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[int, ...]:
    """The unpadded token ids of one row: how rehearsal rows are recognised in a batch."""
    return tuple(input_ids[attention_mask.bool()].tolist())


class TeacherCache:
    """The base's top-k log-probabilities of each rehearsal row, keyed by its token ids.

    Memory: ``k`` int32 ids + ``k`` fp32 log-probabilities per token (64 rows of 40
    tokens at k = 64: 1.3 MB), on the CPU.
    """

    def __init__(self, topk: int) -> None:
        self.topk = int(topk)
        self.rows: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def fill(self, model: Any, rows: Iterable[list[int]], *, batch_size: int = 8) -> None:
        """One teacher forward per batch of ``rows`` (lists of token ids)."""
        rows = [list(r) for r in rows if tuple(r) not in self.rows]
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                width = max(len(r) for r in chunk)
                ids = torch.zeros(len(chunk), width, dtype=torch.long)
                mask = torch.zeros(len(chunk), width, dtype=torch.long)
                for i, r in enumerate(chunk):
                    ids[i, : len(r)] = torch.tensor(r)
                    mask[i, : len(r)] = 1
                logits = teacher_logits(model, ids.to(device), mask.to(device))
                logp, idx = F.log_softmax(logits.float(), -1).topk(self.topk, dim=-1)
                for i, r in enumerate(chunk):
                    n = len(r)
                    self.rows[tuple(r)] = (idx[i, :n].int().cpu(), logp[i, :n].cpu())
        finally:
            model.train(was_training)

    def lookup(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(idx, logp)`` of shape ``(B, T, k)`` aligned with the batch, or None if a row
        is not cached."""
        b, t = input_ids.shape
        idx = torch.zeros(b, t, self.topk, dtype=torch.int32)
        logp = torch.full((b, t, self.topk), -1e4)
        for i in range(b):
            hit = self.rows.get(row_key(input_ids[i], attention_mask[i]))
            if hit is None:
                return None
            where = attention_mask[i].bool().nonzero().squeeze(-1).cpu()
            idx[i, where], logp[i, where] = hit
        return idx.to(input_ids.device), logp.to(input_ids.device)
