"""SECURA's optimised forward equals the formula, and what it keeps for backward is small.

The reference below is the straightforward implementation of the S-MagNorm equations in
the module docstring of ``secura_plugins.methods.secura`` (``y = (h0 + (h0 + dh)) / S``
with autograd through every element-wise op). The optimised variant must give the same
outputs and gradients: exact up to float32 rounding in the forward, and within the float16
rounding of the saved gate (``2**-11`` relative) in the backward.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from helpers.fixtures import OneLinear
from torch.nn import functional as F

from secura_plugins import AdapterConfig, apply_adapter
from secura_plugins.methods.cur import CURVariant, cur_factors
from secura_plugins.methods.secura import _half_inverse_gate_, smagnorm_gate

D_IN, D_OUT, R, TOKENS = 96, 80, 4, 24
ROOT = Path(__file__).resolve().parents[2]


class ReferenceVariant(CURVariant):
    """SECURA's forward written as the formula, for comparison only."""

    @staticmethod
    def forward(module, active_adapter, x, result, **kwargs):
        C, R_, core = cur_factors(module, active_adapter)
        scaling = module.scaling[active_adapter]
        t = F.linear(x.to(R_.dtype), R_)
        h0 = result.to(C.dtype)
        fresh = core.A @ core.B
        u_acc = core.u_acc.to(fresh.dtype)
        if core.merge == "m1":
            h0 = h0 + F.linear(F.linear(t, u_acc), C) * scaling
            dh = F.linear(F.linear(t, fresh), C) * scaling
        else:
            dh = F.linear(F.linear(t, u_acc + fresh), C) * scaling
        if core.bias is not None:
            dh = dh + core.bias
        gate = smagnorm_gate(h0, dh, mode=core.smagnorm, scale=core.smagnorm_scale, eps=core.eps)
        return (h0 + (h0 + dh)) / gate


def _pair(**config):
    """The same adapted layer twice: optimised and reference, identical non-zero tensors."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = apply_adapter(
            OneLinear(D_IN, D_OUT),
            AdapterConfig(method="secura", r=R, target_modules=["proj"], **config),
        )
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            for core in (m for m in model.modules() if hasattr(m, "u_acc")):
                core.u_acc.copy_(torch.randn(core.u_acc.shape, generator=gen) * 0.3)
        models.append(model)
    models[1].get_base_model().proj.lora_variant["default"] = ReferenceVariant
    return models


def _run(model, x):
    x = x.clone().requires_grad_(True)
    y = model(x)
    gen = torch.Generator().manual_seed(2)
    y.backward(torch.randn(y.shape, generator=gen))
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return y.detach(), x.grad, grads


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("mode", ["normalized", "released"])
@pytest.mark.parametrize("merge", ["m1", "m2", "none"])
@pytest.mark.parametrize("output_bias", [False, True])
def test_optimised_forward_matches_the_formula(mode, merge, output_bias):
    fast, ref = _pair(smagnorm=mode, merge=merge, output_bias=output_bias, lora_alpha=8)
    x = torch.randn(2, TOKENS // 2, D_IN)
    x[0, 3] = 0.0  # a token whose dh is exactly zero (S = 2) when there is no bias
    y_fast, gx_fast, g_fast = _run(fast, x)
    y_ref, gx_ref, g_ref = _run(ref, x)
    assert torch.allclose(y_fast, y_ref, rtol=1e-5, atol=1e-6)
    # Gradients through the float16 gate: each term is off by <= 2**-11 relative, so
    # the norm-wise error of every gradient stays below 1e-3 (typically ~2e-4).
    assert _relative_error(gx_fast, gx_ref) < 1e-3
    assert g_fast.keys() == g_ref.keys() and g_fast
    for name in g_ref:
        assert _relative_error(g_fast[name], g_ref[name]) < 1e-3, name
    # Not vacuous: the gate really varies and the gradients are not zero.
    assert all(g.abs().sum() > 0 for g in g_fast.values())


@pytest.mark.parametrize("mode", ["normalized", "released"])
def test_fused_gate_equals_two_over_the_reference_gate(mode):
    gen = torch.Generator().manual_seed(0)
    h0 = torch.randn(7, 64, generator=gen)
    dh = torch.randn(7, 64, generator=gen) * torch.rand(7, 1, generator=gen)
    dh[2] = 0.0  # S = 2 exactly for this token
    reference = smagnorm_gate(h0, dh, mode=mode, scale=6.0, eps=1e-6)
    inv, mean = _half_inverse_gate_(
        h0.clone(), dh.clone(), mode=mode, scale=6.0, eps=1e-6, own_h0=True
    )
    assert torch.allclose(inv, 2.0 / reference, rtol=1e-6, atol=0)
    assert torch.equal(inv[2], torch.ones(64))
    assert torch.allclose(mean, reference.mean(), rtol=1e-6)
    # own_h0=False leaves h0 alone.
    kept = h0.clone()
    _half_inverse_gate_(h0, dh.clone(), mode=mode, scale=6.0, eps=1e-6, own_h0=False)
    assert torch.equal(h0, kept)


def _saved_bytes(model, x) -> int:
    """Bytes autograd keeps for backward, once per storage, weights and buffers excluded."""
    held = {t.untyped_storage().data_ptr() for t in model.parameters()}
    held |= {t.untyped_storage().data_ptr() for t in model.buffers()}
    seen: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in held:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(seen.values())


def test_the_gate_keeps_only_a_float16_tensor_for_backward():
    """With the gate on, SECURA keeps one float16 tokens x d_out tensor more than without."""
    x = torch.randn(TOKENS, D_IN, requires_grad=True)
    sizes = {}
    for name, config in {
        "off": dict(method="secura", smagnorm="off"),
        "secura": dict(method="secura"),
        "reference": dict(method="secura"),
    }.items():
        torch.manual_seed(0)
        model = apply_adapter(
            OneLinear(D_IN, D_OUT), AdapterConfig(r=R, target_modules=["proj"], **config)
        )
        if name == "reference":
            model.get_base_model().proj.lora_variant["default"] = ReferenceVariant
        sizes[name] = _saved_bytes(model, x)
    assert sizes["off"] < sizes["secura"] <= sizes["off"] + TOKENS * D_OUT * 2
    assert sizes["reference"] >= sizes["off"] + TOKENS * D_OUT * 4  # the float32 gate


def _speed_module():
    spec = importlib.util.spec_from_file_location("speed", ROOT / "benchmarks" / "speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["speed"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_speed_guard_reports_ratios_and_fails_over_its_limit(tmp_path, capsys):
    """The CI guard's quick mode runs end to end; a limit below the ratios makes it fail.

    No timing is asserted: ``--check 0.01`` is below any real ratio, so the exit status
    must be 1, and every row must carry a positive ratio to LoRA's median.
    """
    speed = _speed_module()
    threads = torch.get_num_threads()
    out = tmp_path / "rows.json"
    argv = ["--quick", "--rounds", "1", "--warmup", "0", "--seq", "8", "--json", str(out)]
    try:
        assert speed.main([*argv, "--check", "0.01"]) == 1
    finally:
        torch.set_num_threads(threads)
    assert "REGRESSION" in capsys.readouterr().err
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == speed.QUICK
    assert all(r["time_ratio"] > 0 and r["saved_MiB"] > 0 for r in rows)
