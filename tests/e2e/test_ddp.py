"""SECURA under DDP: ``torchrun --nproc_per_node 2`` on CPU (gloo), the real Trainer.

Both ranks must end with the same adapter (``U_acc`` and merge count included: M1
merges run in step on every rank), the same EWC Fisher and anchors (the Fisher is
all-reduced: the mean of the ranks' Fishers, each estimated on that rank's own shard of
the data), and the same replay buffer (each rank mixed the same replayed rows).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "helpers" / "ddp_worker.py"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory):
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ)
    path = [str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")]  # tests/: ``helpers``
    env["PYTHONPATH"] = os.pathsep.join(path).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        str(WORKER),
        str(out),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    tensors = [load_file(str(out / f"rank{r}.safetensors")) for r in range(2)]
    meta = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return tensors, meta


def _part(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def test_ranks_hold_the_same_adapter_with_merges_in_step(ranks):
    from helpers.ddp_worker import MERGE_EVERY, STEPS

    (t0, t1), _ = ranks
    a0, a1 = _part(t0, "adapter."), _part(t1, "adapter.")
    assert sorted(a0) == sorted(a1) and a0
    for key in a0:
        assert torch.equal(a0[key], a1[key]), key
    merges = {int(v) for k, v in a0.items() if k.endswith(".merges")}
    assert merges == {2 * STEPS // MERGE_EVERY}  # two tasks, a merge every MERGE_EVERY steps
    assert all(v.abs().sum() > 0 for k, v in a0.items() if k.endswith("u_acc"))


def test_ewc_fisher_is_the_mean_over_ranks(ranks):
    (t0, t1), meta = ranks
    assert meta[0]["ewc_tasks"] == meta[1]["ewc_tasks"] == 2
    for prefix in ("fisher.", "anchor.", "reduced."):
        p0, p1 = _part(t0, prefix), _part(t1, prefix)
        assert p0 and sorted(p0) == sorted(p1)
        for key in p0:
            assert torch.equal(p0[key], p1[key]), prefix + key
    local0, local1, reduced = _part(t0, "local."), _part(t1, "local."), _part(t0, "reduced.")
    # each rank saw other data, so their own Fishers differ; the reduced one is the mean
    assert any(not torch.equal(local0[k], local1[k]) for k in local0)
    for key in reduced:
        torch.testing.assert_close(reduced[key], (local0[key] + local1[key]) / 2, rtol=1e-6, atol=0)
    assert any(v.abs().sum() > 0 for v in reduced.values())


def test_replay_is_the_same_on_every_rank(ranks):
    _, (m0, m1) = ranks
    assert m0["mixed"] == m1["mixed"]  # the same mixed dataset (new rows + replayed rows)
    assert m0["replay"] == m1["replay"] and m0["replay"]["items"]
