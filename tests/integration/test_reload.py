"""Save -> load in a new Python process -> identical logits, for every method (dense) and
SECURA on a 4-bit base: nothing the reload needs lives only in the process that trained.

Split from ``tests/unit/test_contract.py`` (the method contract matrix): this check runs a
second interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from helpers.fixtures import METHODS, method_data, train_steps, u_acc_total

from secura_plugins import AdapterConfig, apply_adapter, save_adapter

TESTS = Path(__file__).resolve().parents[1]  # holds the ``helpers`` package


def test_reload_in_a_fresh_process(loader, checkpoints, ids, tmp_path):
    """Save -> load in a new Python process -> identical logits (dense and 4-bit)."""
    cases = [("llama", m, "fp32") for m in METHODS] + [("qwen2", "secura", "4bit")]
    manifest = []
    for kind, method, quant in cases:
        config = AdapterConfig(method=method, r=4, merge_every=2)  # SECURA merges at step 2
        model = apply_adapter(loader(kind, quant), config, **method_data(method, ids))
        train_steps(model, ids, steps=3)
        assert (u_acc_total(model) > 0) == (method == "secura")
        folder = tmp_path / f"{kind}-{method}-{quant}"
        save_adapter(model, folder)
        with torch.no_grad():
            torch.save(model(ids).logits, folder.with_suffix(".pt"))
        manifest.append(
            {
                "adapter": str(folder),
                "logits": str(folder.with_suffix(".pt")),
                "base": str(checkpoints[kind]),
                "quant": quant,
            }
        )
    torch.save(ids, tmp_path / "ids.pt")
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    script = textwrap.dedent(
        f"""
        import json, sys, torch
        sys.path.insert(0, {str(TESTS)!r})
        from helpers.fixtures import load_base
        from secura_plugins import load_adapter
        ids = torch.load({str(tmp_path / "ids.pt")!r})
        bad = []
        for case in json.load(open({str(tmp_path / "manifest.json")!r})):
            model = load_adapter(load_base(case["base"], case["quant"]), case["adapter"])
            with torch.no_grad():
                if not torch.equal(model(ids).logits, torch.load(case["logits"])):
                    bad.append(case["adapter"])
        print("MISMATCH", bad) if bad else print("ALL-EQUAL", len(json.load(open({str(tmp_path / "manifest.json")!r}))))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"ALL-EQUAL {len(cases)}" in out.stdout, out.stdout + out.stderr[-2000:]
