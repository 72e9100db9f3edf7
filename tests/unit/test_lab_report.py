"""The real lab's table of each method beside its ``+keep`` (``lab.report.keep_pairs``)."""

from __future__ import annotations

import pytest

from secura_plugins.lab.report import format_table, keep_pairs, summarize


def _run(method: str, seed: int, learned: float, kept: float, steps: int) -> dict:
    return {
        "method": method, "lr": 3e-3, "seed": seed, "trainable_params": 10,
        "avg_accuracy": learned, "learning_accuracy": learned, "bwt": 0.0, "forgetting": 0.0,
        "state_mib": 1.0, "retention": [0.5, kept], "step_seconds": [2.0, 4.0],
        "steps": [steps, steps], "nll_rise": [0.3, 0.2], "matrix": [[learned]],
    }


def test_each_method_is_set_beside_its_keep_run_with_ratios_to_its_own():
    runs = [_run("lora", s, 0.8, 0.3, 32) for s in (0, 1)]
    runs += [_run("lora+keep", s, 0.88, 0.7 + 0.1 * s, 64) for s in (0, 1)]
    runs += [_run("curlora+keep", 0, 0.5, 0.5, 64)]  # no curlora run: no pair
    rows = summarize(runs, ["lora", "lora+keep", "curlora+keep"])
    assert rows[0]["train_seconds"] == pytest.approx((32 * 2.0 + 32 * 4.0, 0.0))
    lines = keep_pairs(rows).splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| lora", "| lora+keep"]
    cells = [c.strip() for c in lines[3].strip("|").split("|")]
    # learning 0.88 / 0.8; kept 0.7 and 0.8 over the seeds; same s/step; twice the steps
    assert cells[1:4] == ["88.0 ± 0.0", "1.10", "75.0 ± 7.1"]
    assert cells[6:9] == ["1.00", "2.00", "2"]
    assert "beside its `+keep`" in format_table(rows)


def test_no_pair_no_table():
    rows = summarize([_run("lora", 0, 0.8, 0.3, 32)], ["lora"])
    assert keep_pairs(rows) == ""
    assert "beside its" not in format_table(rows)
