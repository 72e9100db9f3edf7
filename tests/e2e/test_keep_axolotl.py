"""``secura: {keep: ...}`` under axolotl 0.19's real training entry (tiny model, CPU):
the KL term is logged and non-zero, rehearsal rows are saved with every checkpoint, and
a run resumed from a checkpoint ends with the same adapter as the uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("axolotl", reason="the axolotl extra is not installed")

from helpers import axolotl_helpers as H  # noqa: E402

KEEP = {"rehearsal": 6, "ratio": 0.3, "kl_lambda": 1.0, "max_new_tokens": 4, "batch_size": 8}


def _cfg(ws: H.TinyWorkspace, name: str, **extra) -> Path:
    overrides = {
        "secura": {"method": "lora", "keep": KEEP},
        "save_strategy": "steps",
        "save_steps": 4,
        **extra,
    }
    return H.write_config(ws, name, overrides, probe=False)


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(next(folder.glob("adapter_model*.safetensors"))))


def test_keep_block_logs_kl_saves_rows_and_resumes_exactly(tmp_path):
    ws = H.make_workspace(tmp_path)
    full = H.run_axolotl_train(_cfg(ws, "full"))
    assert full.returncode == 0, H.tail(full.output)
    out = ws.root / "full"
    state = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())
    kl = [h["keep/kl"] for h in state["log_history"] if "keep/kl" in h]
    assert len(kl) >= 3 and max(kl) > 0  # steps whose batch holds rehearsal rows
    files = {
        (folder / "keep_rehearsal.jsonl").read_text()
        for folder in (out, out / "checkpoint-4", out / "checkpoint-8")
    }
    assert len(files) == 1  # the same rows in the run folder and every checkpoint
    rows = [json.loads(line) for line in files.pop().splitlines()[1:]]
    assert 1 <= len(rows) <= KEEP["rehearsal"]  # a random tiny model: many are rejected

    resumed = H.run_axolotl_train(
        _cfg(ws, "resumed", resume_from_checkpoint=str(out / "checkpoint-4"))
    )
    assert resumed.returncode == 0, H.tail(resumed.output)
    a, b = _adapter(out), _adapter(ws.root / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
