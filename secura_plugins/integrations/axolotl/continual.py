"""Continual learning under axolotl: EWC and replay from the ``secura:`` block.

A task sequence is a sequence of axolotl runs. Run ``t`` reads the state of run ``t-1``
from its ``lora_model_dir`` (the adapter, ``secura_ewc.safetensors``,
``secura_replay.jsonl``) and writes its own into ``output_dir``:

* **EWC** (``secura.ewc``) runs inside axolotl's trainer through the library's
  ``SecuraCallback``: the penalty's gradient ``lambda F (theta - theta*)`` is added in
  ``on_pre_optimizer_step``, and at ``on_train_end`` the task's Fisher is folded in.
* **Replay** (``secura.replay``) cannot mix rows inside the trainer: axolotl tokenizes
  its datasets before any trainer exists. So the plugin's ``load_datasets`` hook draws
  ``round(ratio N / (1 - ratio))`` rows from the buffer (``N`` = this task's rows),
  writes them to ``<output_dir>/secura_replay_mix.jsonl`` and appends that file to
  ``datasets:`` with the first dataset's prompt format; axolotl then tokenizes them like
  the task's own rows. After training, the task's rows join the buffer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..._fs import atomic_write_text
from ..trainer.checkpoint import EWC_STATE_NAME, REPLAY_STATE_NAME
from .args import ReplaySettings, SecuraSettings

REPLAY_MIX_NAME = "secura_replay_mix.jsonl"
#: Keys of an axolotl dataset entry that say where rows come from (not how to format them).
_SOURCE_KEYS = (
    "path",
    "data_files",
    "name",
    "split",
    "revision",
    "field",
    "shards",
    "shards_idx",
    "preprocess_shards",
)


def state_file(explicit: str | None, cfg: Any, name: str) -> Path | None:
    """``explicit`` if given, else ``<lora_model_dir>/<name>`` if that exists, else None."""
    if explicit:
        return Path(explicit)
    if cfg.get("lora_model_dir"):
        candidate = Path(cfg["lora_model_dir"]) / name
        if candidate.is_file():
            return candidate
    return None


def _is_mix_entry(entry: Any) -> bool:
    return Path(str(entry.get("path", ""))).name == REPLAY_MIX_NAME


def task_rows(cfg: Any) -> list[dict[str, Any]]:
    """The raw rows of this task's datasets (replayed rows excluded), as plain dicts."""
    from datasets import load_dataset

    rows: list[dict[str, Any]] = []
    for entry in cfg.get("datasets") or []:
        if _is_mix_entry(entry):
            continue
        path = str(entry.get("path"))
        local = Path(path)
        if local.is_file() or entry.get("data_files"):
            files = entry.get("data_files") or str(local)
            kind = entry.get("ds_type") or ("json" if local.suffix in (".json", ".jsonl") else None)
            if kind is None:
                raise ValueError(
                    f"secura.replay: cannot read the rows of dataset {path!r}; give it "
                    "`ds_type:` (json, csv, parquet) or use a .json/.jsonl file"
                )
            kwargs = {"field": entry["field"]} if entry.get("field") else {}
            data = load_dataset(kind, data_files=files, split="train", **kwargs)
        else:
            data = load_dataset(
                path,
                name=entry.get("name"),
                split=entry.get("split") or "train",
                revision=entry.get("revision"),
            )
        rows.extend(dict(row) for row in data)
    return rows


def prepare_replay_mix(cfg: Any, settings: ReplaySettings) -> Path | None:
    """Write the replayed rows for this task and append them to ``cfg.datasets``.

    Returns the mix file, or None when there is nothing to replay (first task, empty
    buffer or ``ratio: 0``). Idempotent: a config that already lists the mix file is
    left alone.
    """
    from secura_plugins.continual import ReplayBuffer, replay_count

    datasets = cfg.get("datasets") or []
    if any(_is_mix_entry(entry) for entry in datasets):
        return None
    source = state_file(settings.buffer, cfg, REPLAY_STATE_NAME)
    if source is None:
        return None
    buffer = ReplayBuffer.load(source)
    n = replay_count(len(task_rows(cfg)), settings.ratio)
    if n == 0 or len(buffer) == 0:
        return None
    rows = buffer.sample(n, seed=settings.seed)
    out = Path(cfg["output_dir"]) / REPLAY_MIX_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    template = {k: v for k, v in dict(datasets[0]).items() if k not in _SOURCE_KEYS}
    entry = {**template, "path": str(out), "ds_type": "json"}
    datasets.append(type(datasets[0])(entry) if isinstance(datasets[0], dict) else entry)
    return out


def build_ewc(cfg: Any, settings: SecuraSettings):
    """The EWC of this run: earlier tasks' state (if any) with this config's settings."""
    if settings.ewc is None:
        return None
    from secura_plugins.continual import EWC

    source = state_file(settings.ewc.state, cfg, EWC_STATE_NAME)
    ewc = EWC.load(source) if source is not None else EWC()
    ewc.lam = settings.ewc.lam
    ewc.gamma = settings.ewc.gamma
    ewc.fisher_max_batches = settings.ewc.fisher_batches
    return ewc


def build_replay_buffer(cfg: Any, settings: SecuraSettings):
    """The replay buffer this run hands on: earlier tasks' buffer, or a new one."""
    if settings.replay is None:
        return None
    from secura_plugins.continual import ReplayBuffer

    source = state_file(settings.replay.buffer, cfg, REPLAY_STATE_NAME)
    if source is not None:
        return ReplayBuffer.load(source)
    replay = settings.replay
    return ReplayBuffer(capacity=replay.capacity, seed=replay.seed, ratio=replay.ratio)


def task_name(cfg: Any, settings: SecuraSettings) -> str:
    """Tag of this task's rows in the buffer."""
    if settings.replay is not None and settings.replay.task:
        return settings.replay.task
    return Path(str(cfg.get("output_dir") or "task")).name
