"""SC-LoRA calibration data for ``adapter: secura`` + ``secura.method: sclora``.

SC-LoRA computes its starting subspace from two small datasets: the new task's text
(``positive``) and text whose knowledge must be preserved (``negative``). Axolotl builds
the adapter before it has tokenized anything for the trainer, so the plugin reads the
rows itself (JSON lines, or the run's own datasets for ``positive``), tokenizes them with
the run's tokenizer and hands ``apply_adapter`` lists of ``input_ids``/``attention_mask``
batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .args import CalibrationSettings
from .continual import task_rows


def row_text(row: dict[str, Any], text_field: str | None = None) -> str:
    """The text of one row: ``text_field``, else ``text``, else chat ``messages`` contents,
    else every string value joined by newlines (alpaca's instruction/input/output)."""
    if text_field:
        if text_field not in row:
            raise ValueError(
                f"secura.calibration.text_field: rows have no {text_field!r} field "
                f"(they have {sorted(row)})"
            )
        return str(row[text_field])
    if isinstance(row.get("text"), str):
        return row["text"]
    messages = row.get("messages") or row.get("conversations")
    if isinstance(messages, list):
        return "\n".join(str(m.get("content", m.get("value", ""))) for m in messages)
    return "\n".join(v for v in row.values() if isinstance(v, str) and v)


def read_jsonl(path: str | Path, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` rows of a JSON-lines file."""
    import json

    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                rows.append(json.loads(line))
                if len(rows) >= limit:
                    break
    return rows


def batches(
    texts: list[str], tokenizer: Any, batch_size: int, max_length: int
) -> list[dict[str, torch.Tensor]]:
    """Padded ``input_ids``/``attention_mask`` batches of ``texts``."""
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
        )
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def calibration_data(cfg: Any, settings: CalibrationSettings) -> dict[str, Any]:
    """``apply_adapter`` keyword arguments (``positive``, ``negative``, ``layers_per_pass``)."""
    from axolotl.loaders import load_tokenizer

    tokenizer = load_tokenizer(cfg)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    max_length = settings.max_length or int(cfg.sequence_len or 512)
    if settings.positive:
        positive_rows = read_jsonl(settings.positive, settings.max_rows)
    else:
        positive_rows = task_rows(cfg)[: settings.max_rows]
    negative_rows = read_jsonl(settings.negative, settings.max_rows)  # type: ignore[arg-type]
    data: dict[str, Any] = {
        name: batches(
            [row_text(r, settings.text_field) for r in rows],
            tokenizer,
            settings.batch_size,
            max_length,
        )
        for name, rows in (("positive", positive_rows), ("negative", negative_rows))
    }
    if settings.layers_per_pass:
        data["layers_per_pass"] = settings.layers_per_pass
    return data
