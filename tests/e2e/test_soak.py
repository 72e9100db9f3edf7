"""CI-sized soak (``benchmarks/soak.py``): 200 steps with an M1 merge after every step.

Memory stays flat (no tensor is leaked per step, RSS does not grow after warm-up) and
``U_acc`` stays within fp32 summation error of the fp64 sum of the merged ``A @ B``
products, also as the dense weight update ``scaling * C U_acc R``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from soak import soak  # noqa: E402


def test_soak_merges_every_step_without_leak_or_drift():
    report = soak(steps=200, every=50)
    assert report["merges"] == [200]  # every core merged at every step
    samples = report["samples"]
    # no per-step tensor leak: the live tensor count is the same at every sample
    assert {s["live_tensors"] for s in samples} == {report["live_tensors_start"]}
    # RSS flat after warm-up: at most 8 MiB between the first and the last sample
    assert samples[-1]["rss_mib"] - samples[0]["rss_mib"] <= 8.0, samples
    assert report["u_acc_rel_drift"] <= report["tolerance"]
    assert report["dense_update_rel_drift"] <= report["tolerance"]
