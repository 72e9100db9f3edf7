"""Self-rehearsal and the KL anchor wired into a ``transformers.Trainer``: :class:`Keep`.

``SecuraCallback(keep=...)`` owns one :class:`Keep` (``ContinualTrainerMixin`` and the
axolotl plugin hand theirs to the callback). What happens, and when:

* ``before_train`` (first thing in ``trainer.train``, before the dataloader exists):
  the rehearsal rows are read from the resumed checkpoint, else from the run folder
  (same settings), else written by the model with its adapter disabled
  (:func:`~secura_plugins.keep.rehearsal.generate_rehearsal`) and saved in the run
  folder. They are tokenized like the task's rows (prompt masked when the task masks
  its prompts; the chat template for conversations) and mixed into
  ``trainer.train_dataset`` by :meth:`ReplayBuffer.mix` at ``ratio``. With
  ``kl_mode='cached'`` the base's top-k log-probabilities of every rehearsal row are
  computed here, once.
* ``compute_loss`` (wrapped): ``loss + kl_lambda * KL(p_base || p_model)`` over the
  rehearsal rows of the batch (recognised by their token ids) and, with
  ``kl_on_task``, the task's rows too. The mean KL is logged as ``keep/kl``. With
  ``rehearsal_loss='kl'`` the rehearsal rows' labels are masked out of the task loss
  (they are trained by the anchor only).
* checkpoints: the rehearsal file is saved in each one, so a resume trains on exactly
  the same mixed data.

Example:
    >>> from secura_plugins.keep import Keep
    >>> Keep("keep").config.kl_lambda > 0
    True
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import SecuraConfigError
from .config import KeepConfig
from .kl import TeacherCache, kl_full, kl_topk, row_key, teacher_logits, trained_positions
from .rehearsal import (
    REHEARSAL_FILE,
    generate_rehearsal,
    load_rehearsal,
    row_budget,
    row_is_chat,
    save_rehearsal,
)

logger = logging.getLogger(__name__)

__all__ = ["Keep", "task_prompts_of", "task_row_tokens"]


def _user_text(messages: Any) -> str | None:
    if isinstance(messages, list):
        for m in messages:
            if isinstance(m, Mapping) and m.get("role") == "user":
                return str(m.get("content", ""))
    return None


def task_prompts_of(dataset: Any, tokenizer: Any, limit: int = 256) -> tuple[list[str], bool]:
    """``(prompts, is_chat)`` of a training set: its ``prompt`` or ``messages`` column, its
    ``text``, else the decoded label-masked prefix of each tokenized row."""
    names = list(getattr(dataset, "column_names", []) or [])
    rows = dataset.select(range(min(limit, len(dataset))))
    if "prompt" in names:
        values = rows["prompt"]
        chat = [_user_text(v) for v in values]
        if all(c is not None for c in chat):
            return [str(c) for c in chat], True
        return [str(v) for v in values], False
    if "messages" in names:
        return [_user_text(v) or "" for v in rows["messages"]], True
    if "text" in names:
        return [str(v).split("\n", 1)[0] for v in rows["text"]], False
    if "input_ids" in names and "labels" in names:
        prompts = []
        for ids, labels in zip(rows["input_ids"], rows["labels"]):
            cut = next((i for i, lab in enumerate(labels) if lab != -100), len(ids))
            prompts.append(tokenizer.decode(ids[: max(cut, 1)], skip_special_tokens=True))
        return prompts, False
    raise SecuraConfigError(
        "keep", f"cannot find the task's prompts in a dataset with columns {names}; pass "
        "task_prompts= to Keep"
    )


def task_row_tokens(dataset: Any, tokenizer: Any, limit: int = 256) -> int | None:
    """Tokens of the longest of the first ``limit`` training rows: its ``input_ids``, else
    prompt + completion (or the messages' contents), else ``text``; None if unknown."""
    names = list(getattr(dataset, "column_names", []) or [])
    rows = dataset.select(range(min(limit, len(dataset))))

    def count(value: Any) -> int:
        if isinstance(value, list):  # a conversation
            return sum(count(m.get("content", "")) for m in value if isinstance(m, Mapping))
        return len(tokenizer(str(value), add_special_tokens=False)["input_ids"])

    if "input_ids" in names:
        lengths = [len(ids) for ids in rows["input_ids"]]
    elif "prompt" in names and "completion" in names:
        lengths = [count(p) + count(c) for p, c in zip(rows["prompt"], rows["completion"])]
    elif "messages" in names:
        lengths = [count(m) for m in rows["messages"]]
    elif "text" in names:
        lengths = [count(t) for t in rows["text"]]
    else:
        return None
    return max(lengths, default=None)


class Keep:
    """Self-rehearsal rows, their mixing, the KL anchor and their checkpoint state.

    Args:
        config: a :class:`KeepConfig`, a dict of its fields, or a preset name.
        task_prompts: prompts whose shapes the rehearsal follows (default: read from the
            trainer's dataset).
        exclude: prompts the rehearsal must never produce (every evaluation probe's).
        rows: ready rehearsal rows (``{"prompt", "completion"}``); no generation then.
        progress: show progress bars.
        steps_scaled: the trainer's ``max_steps`` already gives the task its rows
            (:meth:`KeepConfig.steps_for_task_rows`): no warning that it does not.
    """

    def __init__(
        self,
        config: KeepConfig | Mapping[str, Any] | str = "keep",
        *,
        task_prompts: Iterable[str] | None = None,
        exclude: Iterable[str] = (),
        rows: list[dict[str, str]] | None = None,
        progress: bool = True,
        steps_scaled: bool = False,
    ) -> None:
        coerced = KeepConfig.coerce(config)
        if coerced is None:
            raise SecuraConfigError("keep", "is off; pass a preset name or settings")
        self.config = coerced
        self.task_prompts = None if task_prompts is None else [str(p) for p in task_prompts]
        self.exclude = {str(p) for p in exclude}
        self.rows = None if rows is None else [dict(r) for r in rows]
        self.progress = progress
        self.steps_scaled = steps_scaled
        self.chat: bool | None = None
        self.keys: set[tuple[int, ...]] = set()
        self.cache: TeacherCache | None = None
        self._kl: list[torch.Tensor] = []
        self._prepared_for: int | None = None
        self.row_tokens: int | None = None

    # ------------------------------------------------------------------ rows
    def settings(self) -> dict[str, Any]:
        """What the rows depend on (a run-folder file is reused only if this matches)."""
        digest = hashlib.sha256(
            json.dumps([sorted(self.task_prompts or []), sorted(self.exclude)]).encode()
        ).hexdigest()[:16]
        keys = ("rehearsal", "generic_share", "max_new_tokens", "temperature", "top_p", "seed")
        out = {**{k: getattr(self.config, k) for k in keys}, "prompts": digest, "chat": self.chat,
               "row_tokens": self.row_tokens}
        if self.config.generic_format != "task":  # older run folders' settings stay valid
            out["generic_format"] = self.config.generic_format
        if self.config.ending_share:
            out["ending_share"] = self.config.ending_share
        if self.config.task_layout:
            out["task_layout"] = True
        return out

    def ensure_rows(
        self, model: Any, tokenizer: Any, dataset: Any = None, *,
        run_dir: str | Path | None = None, resume_dir: str | Path | None = None,
    ) -> list[dict[str, str]]:
        """The rehearsal rows: given, resumed, reused from ``run_dir``, or generated."""
        if self.task_prompts is None or self.chat is None:
            prompts, chat = (
                task_prompts_of(dataset, tokenizer) if dataset is not None else ([], False)
            )
            if self.task_prompts is None:
                self.task_prompts = prompts
            if self.chat is None:
                fmt = self.config.format
                self.chat = chat if fmt == "auto" else fmt == "chat"
        if self.row_tokens is None:
            longest = None
            if self.config.max_row_tokens == "task" and dataset is not None:
                longest = task_row_tokens(dataset, tokenizer)
            self.row_tokens = (
                max(longest, 8) if longest
                else row_budget(self.config, tokenizer, self.task_prompts or [])
            )
        if self.rows is not None:
            return self.rows
        for folder in (resume_dir, run_dir):
            path = None if folder is None else Path(folder) / REHEARSAL_FILE
            if path is not None and path.is_file():
                rows, settings = load_rehearsal(path)
                if folder == resume_dir or settings == self.settings():
                    self.rows = rows
                    logger.info("self-rehearsal: %d rows read from %s", len(rows), path)
                    return rows
        self.rows = generate_rehearsal(
            model, tokenizer, self.task_prompts, self.config, exclude=self.exclude,
            chat=bool(self.chat), progress=self.progress, row_tokens=self.row_tokens,
        )
        if len(self.rows) < self.config.rehearsal:
            shapeless = self.task_prompts and not self.config.task_layout and not any(
                r["kind"] == "task" for r in self.rows)
            logger.warning(
                "self-rehearsal wrote %d of %d rows (time or attempt bound)%s",
                len(self.rows), self.config.rehearsal,
                "; no sampled prompt reached the ending the task's prompts share, so every "
                "row is generic (task_layout: true writes prompts in the task's layout)"
                if shapeless else "",
            )
        if run_dir is not None:
            self.save(run_dir)
        return self.rows

    def save(self, folder: str | Path) -> Path | None:
        """Write the rows into ``folder`` (a run folder or a checkpoint)."""
        if self.rows is None:
            return None
        return save_rehearsal(self.rows, Path(folder) / REHEARSAL_FILE, settings=self.settings())

    def tokenized(self, tokenizer: Any, *, mask_prompt: bool = True, max_length: int | None = None,
                  ) -> list[dict[str, list[int]]]:
        """``input_ids``/``labels``/``attention_mask``/``completion_mask`` of every row."""
        out = []
        eos = tokenizer.eos_token_id
        for row in self.rows or []:
            if row_is_chat(row.get("kind", "task"), bool(self.chat)):
                user = [{"role": "user", "content": row["prompt"]}]
                prompt_ids = list(tokenizer.apply_chat_template(
                    user, tokenize=True, add_generation_prompt=True, return_dict=False))
                ids = list(tokenizer.apply_chat_template(
                    [*user, {"role": "assistant", "content": row["completion"]}],
                    tokenize=True, return_dict=False))
            else:
                prompt_ids = tokenizer(row["prompt"])["input_ids"]
                ids = prompt_ids + tokenizer(row["completion"], add_special_tokens=False)[
                    "input_ids"]
                if eos is not None:
                    ids.append(eos)
            ids = ids[:max_length] if max_length else ids
            n = min(len(prompt_ids), len(ids))
            labels = [-100] * n + ids[n:] if mask_prompt else list(ids)
            out.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids),
                        "completion_mask": [0] * n + [1] * (len(ids) - n)})
        return out

    def negative_batches(self, tokenizer: Any, batch_size: int = 8) -> list[dict[str, Any]]:
        """Padded batches of the rehearsal rows: SC-LoRA's ``negative=`` (what to keep)."""
        from ..integrations.axolotl.calibration import batches

        texts = [r["prompt"] + " " + r["completion"] for r in self.rows or []]
        if not texts:
            raise SecuraConfigError("keep.rehearsal", "SC-LoRA needs rehearsal rows; set > 0")
        return batches(texts, tokenizer, batch_size, 512)

    # ------------------------------------------------------------------ trainer
    def before_train(self, trainer: Any, resume_dir: str | None = None) -> None:
        """Rows (see :meth:`ensure_rows`), mixing into ``trainer.train_dataset``, cache."""
        if self._prepared_for == id(trainer.train_dataset):
            return
        if self.config.anchors and getattr(trainer.args, "loss_type", None) == "chunked_nll":
            raise SecuraConfigError(
                "keep.kl_lambda", "the KL anchor needs the model's logits, which TRL's "
                "loss_type='chunked_nll' (its default) never builds; pass "
                "SFTConfig(loss_type='nll'), or set kl_lambda: 0"
            )
        from ..continual.replay import ReplayBuffer

        tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
        model = trainer.model
        dataset = trainer.train_dataset
        self.ensure_rows(model, tokenizer, dataset, run_dir=trainer.args.output_dir,
                         resume_dir=resume_dir)
        names = list(dataset.column_names)
        first = dataset[0]
        masks = "labels" in first and -100 in first["labels"]
        max_length = getattr(trainer.args, "max_length", None)
        tokenized = self.tokenized(tokenizer, mask_prompt=masks, max_length=max_length)
        self.keys = {tuple(t["input_ids"]) for t in tokenized}
        if self.config.ratio > 0 and tokenized:
            rows = []
            for raw, tok in zip(self.rows or [], tokenized):
                row = {}
                for name in names:
                    if name in tok:
                        row[name] = tok[name]
                    elif name in ("prompt", "completion") and isinstance(first[name], list):
                        role = "user" if name == "prompt" else "assistant"  # conversational
                        row[name] = [{"role": role, "content": raw[name]}]
                    elif name in ("prompt", "completion"):
                        row[name] = raw[name]
                    elif name == "text":
                        row[name] = raw["prompt"] + " " + raw["completion"]
                    elif isinstance(first[name], str):
                        row[name] = ""
                    else:
                        raise SecuraConfigError(
                            "keep.ratio", f"the training set has a column {name!r} that "
                            "rehearsal rows cannot fill; drop it, or set keep.ratio: 0"
                        )
                rows.append(row)
            buffer = ReplayBuffer(capacity=len(rows), seed=self.config.seed)
            buffer.add(rows, task="keep")
            trainer.train_dataset = buffer.mix(dataset, self.config.ratio)
            if getattr(trainer.args, "max_steps", 0) > 0 and not self.steps_scaled:
                logger.warning(
                    "keep: rehearsal rows are %.0f%% of the mixed training set, so max_steps=%d "
                    "trains on %.0f%% as many task rows as without them; for as many task rows, "
                    "set max_steps to %d (or train by num_train_epochs)",
                    100 * self.config.ratio, trainer.args.max_steps, 100 * (1 - self.config.ratio),
                    self.config.steps_for_task_rows(trainer.args.max_steps),
                )
        if self.config.anchors and self.config.kl_mode == "cached":
            self.cache = TeacherCache(self.config.kl_topk)
            self.cache.fill(_peft(model), [t["input_ids"] for t in tokenized])
        self._prepared_for = id(trainer.train_dataset)
        self.wrap_loss(trainer)

    def wrap_loss(self, trainer: Any) -> None:
        """Add the KL term to ``trainer.compute_loss`` (once)."""
        if not self.config.anchors or getattr(trainer, "_secura_keep_wrapped", False):
            return
        from ..integrations.trainer.state import loss_term_scale

        original = trainer.compute_loss
        keep = self

        def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
            if not model.training:
                return original(model, inputs, return_outputs=return_outputs,
                                num_items_in_batch=num_items_in_batch)
            ids, mask = inputs["input_ids"], inputs.get("attention_mask")
            labels = inputs.get("labels")
            if keep.config.rehearsal_loss == "kl" and labels is not None:
                inputs = {**inputs, "labels": keep.mask_rehearsal(ids, mask, labels)}
            if labels is not None and not bool((inputs["labels"] != -100).any()):
                # only rehearsal rows, trained by the anchor alone: no task loss to take
                outputs = model(**{k: inputs[k] for k in ("input_ids", "attention_mask",
                                                          "position_ids") if k in inputs})
                loss = outputs.logits.sum() * 0.0
            else:
                loss, outputs = original(model, inputs, return_outputs=True,
                                         num_items_in_batch=num_items_in_batch)
            logits = getattr(outputs, "logits", None)
            if logits is None and isinstance(outputs, Mapping):
                logits = outputs.get("logits")
            if logits is None:
                raise SecuraConfigError(
                    "keep.kl_lambda", "the model returned no logits (Liger or a fused loss); "
                    "turn those off or set kl_lambda: 0")
            kl = keep.kl_term(model, ids, mask, labels, logits)
            if kl is not None:
                scale = loss_term_scale(trainer, num_items_in_batch)
                loss = loss + keep.config.kl_lambda * kl.to(loss.dtype) * scale
            return (loss, outputs) if return_outputs else loss

        trainer.compute_loss = compute_loss
        trainer._secura_keep_wrapped = True

    def mask_rehearsal(self, ids: torch.Tensor, mask: torch.Tensor | None,
                       labels: torch.Tensor) -> torch.Tensor:
        """``labels`` with every rehearsal row set to -100 (no cross-entropy on them)."""
        if mask is None:
            mask = torch.ones_like(ids)
        labels = labels.clone()
        for i in range(ids.shape[0]):
            if row_key(ids[i], mask[i]) in self.keys:
                labels[i] = -100
        return labels

    def kl_term(self, model: Any, ids: torch.Tensor, mask: torch.Tensor | None,
                labels: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor | None:
        """Mean ``KL(p_base || p_model)`` over the anchored rows of a batch, or None."""
        if mask is None:
            mask = torch.ones_like(ids)
        rehearsal = [row_key(ids[i], mask[i]) in self.keys for i in range(ids.shape[0])]
        pick = [self.config.kl_on_task or r for r in rehearsal]
        sel = torch.tensor(pick, device=ids.device)
        if not bool(sel.any()):
            return None
        ids, mask, logits = ids[sel], mask[sel], logits[sel]
        labels = None if labels is None else labels[sel]
        positions = trained_positions(labels, mask)
        if self.config.kl_positions == "all":  # the whole rehearsal row, prompt included
            whole = torch.tensor([r for r, p in zip(rehearsal, pick) if p], device=ids.device)
            positions[whole] = trained_positions(None, mask)[whole]
        hit = self.cache.lookup(ids, mask) if self.cache is not None else None
        if hit is not None:
            kl = kl_topk(logits, hit[0], hit[1], positions)
        else:
            kl = kl_full(logits, teacher_logits(_peft(model), ids, mask), positions)
        self._kl.append(kl.detach())
        return kl

    def drain(self) -> dict[str, float]:
        """``keep/kl`` (mean since the last log) for the Trainer's logs."""
        if not self._kl:
            return {}
        value = float(torch.stack([k.float().cpu() for k in self._kl]).mean())
        self._kl.clear()
        return {"keep/kl": value}


def _peft(model: Any) -> Any:
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)
