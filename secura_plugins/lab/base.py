"""The lab's base model: a tiny Llama pretrained from scratch on the base knowledge.

:func:`pretrain_base` trains a char-level Llama (a real ``transformers`` model) with a
plain torch loop on :func:`~secura_plugins.lab.data.knowledge_pairs` (loss on the answer
tokens, full batch, AdamW) until the greedy recall of those pairs reaches
``recall_target`` (checked every ``check_every`` steps) after at least ``min_steps``
(memories trained past the first perfect recall are less brittle), or ``max_steps`` run
out. The
checkpoint is written as a normal Hugging Face folder under
``cache_dir/<key>/`` where ``key`` hashes the corpus, the model config, the schedule and
the seed, so a repeated run loads it instead of training again. Training is seeded and
single-process, so the same key gives the same weights on the same machine.

Example:
    >>> import tempfile
    >>> from secura_plugins.lab.base import BaseSpec, pretrain_base
    >>> spec = BaseSpec(n_facts=4, arithmetic=False, copy_probe=0, copy_batch=0,
    ...                 hidden_size=32, min_steps=0, max_steps=300)
    >>> base = pretrain_base(spec, cache_dir=tempfile.mkdtemp(), progress=False)
    >>> base.recall >= spec.recall_target, base.cached
    (True, False)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._fs import staged_dir
from ..real_model import default_cache_dir
from .data import copy_pairs, knowledge_pairs

logger = logging.getLogger(__name__)

__all__ = ["BaseModel", "BaseSpec", "default_cache_dir", "pretrain_base"]

#: Bumped when the pretraining procedure changes (invalidates cached bases).
_FORMAT = 1


@dataclass(frozen=True)
class BaseSpec:
    """What the base model knows and how it is built (every field enters the cache key)."""

    n_facts: int = 150
    arithmetic: bool = True
    copy_probe: int = 50
    copy_batch: int = 128
    corpus_seed: int = 0
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    lr: float = 3e-3
    min_steps: int = 800
    max_steps: int = 3000
    check_every: int = 100
    recall_target: float = 0.99
    seed: int = 0

    def key(self) -> str:
        """Hash of the corpus, config, schedule and seed (the cache folder's name)."""
        blob = json.dumps({"format": _FORMAT, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def pairs(self) -> list[tuple[str, str]]:
        """The probe: every fact and sum, plus ``copy_probe`` held-out copy pairs."""
        probe = knowledge_pairs(self.n_facts, self.corpus_seed, self.arithmetic)
        return probe + copy_pairs(self.copy_probe, seed=-1 - self.corpus_seed)


@dataclass
class BaseModel:
    """A pretrained base: its folder, its recall of the knowledge, and whether it was cached."""

    path: Path
    recall: float
    steps: int
    cached: bool
    spec: BaseSpec

    def load(self):
        """``(model, tokenizer)`` fresh from the folder (fp32, eval mode)."""
        from transformers import AutoTokenizer

        from ..loading import load_base

        return load_base(str(self.path)), AutoTokenizer.from_pretrained(str(self.path))


def _batch(tok: Any, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Right-padded ``prompt + answer + eos`` with labels on answer + eos only."""
    seqs, starts = [], []
    for prompt, answer in pairs:
        p = tok(prompt)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append(p + a)
        starts.append(len(p))
    length = max(map(len, seqs))
    ids = torch.full((len(seqs), length), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (seq, start) in enumerate(zip(seqs, starts)):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, start : len(seq)] = ids[i, start : len(seq)]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pretrain_base(
    spec: BaseSpec | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> BaseModel:
    """The cached base of ``spec``, pretrained now if the cache does not hold it."""
    from tqdm.auto import tqdm

    from ..continual.probe import RetentionProbe
    from ..tiny import build_tiny_model, build_tokenizer

    spec = spec or BaseSpec()
    folder = Path(cache_dir or default_cache_dir()) / spec.key()
    meta_path = folder / "lab_base.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        logger.info("lab base %s loaded from cache (recall %.3f)", folder, meta["recall"])
        return BaseModel(folder, meta["recall"], meta["steps"], True, spec)

    tok = build_tokenizer()
    pairs = spec.pairs()
    model = build_tiny_model(
        "llama",
        seed=spec.seed,
        vocab_size=len(tok),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
    )
    memory = knowledge_pairs(spec.n_facts, spec.corpus_seed, spec.arithmetic)
    probe = RetentionProbe(pairs, tok, batch_size=256)
    recall, step = 0.0, 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
        model.train()
        bar = tqdm(total=spec.max_steps, desc="pretraining lab base", disable=not progress)
        while step < spec.max_steps:
            batch = memory + copy_pairs(spec.copy_batch, seed=spec.corpus_seed * 10**6 + step)
            loss = model(**_batch(tok, batch)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % spec.check_every == 0 or step == spec.max_steps:
                recall = probe.evaluate(model)["accuracy"]
                bar.set_postfix(loss=f"{loss.item():.4f}", recall=f"{recall:.3f}")
                if recall >= spec.recall_target and step >= spec.min_steps:
                    break
        bar.close()
    model.eval()
    if recall < spec.recall_target:
        logger.warning(
            "lab base reached recall %.3f < target %.3f after %d steps; raise max_steps",
            recall,
            spec.recall_target,
            step,
        )
    meta = {"recall": recall, "steps": step, "spec": dataclasses.asdict(spec), "pairs": len(pairs)}
    with staged_dir(folder, keep_existing=True) as tmp:  # a concurrent run may finish first
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "lab_base.json").write_text(json.dumps(meta, indent=2))
    logger.info("lab base pretrained in %d steps, recall %.3f -> %s", step, recall, folder)
    return BaseModel(folder, recall, step, False, spec)
