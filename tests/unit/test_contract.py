"""The contract every method keeps, on tiny Llama and Qwen2 models, dense and 4-bit.

In the style of PEFT's ``test_custom_models.py``: one matrix, the same checks. Checks
that could pass trivially (exact start) are paired with one that proves the adapter is
really in the forward path.
"""

from __future__ import annotations

import pytest
import torch
from helpers.fixtures import KINDS, METHODS, method_data, repack_for_cpu, train_steps

from secura_plugins import (
    AdapterConfig,
    apply_adapter,
    count_parameters,
    load_adapter,
    save_adapter,
)

MATRIX = [(k, m, q) for k in KINDS for m in METHODS for q in ("fp32", "4bit")]


def _id(case: tuple[str, str, str]) -> str:
    return "-".join(case)


@pytest.fixture(params=MATRIX, ids=[_id(c) for c in MATRIX])
def case(request, loader, ids):
    kind, method, quant = request.param
    base = loader(kind, quant)
    with torch.no_grad():
        reference = base(ids).logits.clone()
    model = apply_adapter(base, AdapterConfig(method=method, r=4), **method_data(method, ids))
    return kind, method, quant, model, reference


def _perturb_trainable(model: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.5)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_exact_start(case, ids):
    *_, model, reference = case
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference)


def test_adapter_is_in_the_forward_path(case, ids):
    *_, model, reference = case
    _perturb_trainable(model)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, reference, atol=1e-4)


def test_training_changes_only_adapter_parameters(case, ids):
    kind, method, quant, model, reference = case
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = _snapshot(model)
    train_steps(model, ids, steps=3)
    after = _snapshot(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "training changed nothing"
    assert changed <= trainable, f"non-adapter tensors changed: {sorted(changed - trainable)[:3]}"
    # Every trainable tensor moved (A needs a second step to move: B is zero at first).
    assert changed == trainable
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, reference)


def test_save_then_load_on_a_fresh_base_gives_identical_logits(case, ids, loader, tmp_path):
    kind, method, quant, model, _ = case
    train_steps(model, ids, steps=2)
    with torch.no_grad():
        expected = model(ids).logits
    save_adapter(model, tmp_path / "adapter")
    again = load_adapter(loader(kind, quant), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, expected)
    assert count_parameters(again)["adapter"] == count_parameters(model)["adapter"]
    assert count_parameters(again)["trainable"] == 0  # loaded for inference by default


@pytest.mark.parametrize("method", METHODS)
def test_save_then_load_after_bitsandbytes_repacked_the_base(method, loader, ids, tmp_path):
    """A 4-bit base repacked for bitsandbytes' AVX512-BF16 CPU kernel before adapting."""
    base = loader("llama", "4bit")
    assert repack_for_cpu(base) > 0
    model = apply_adapter(base, AdapterConfig(method=method, r=4), **method_data(method, ids))
    train_steps(model, ids, steps=2)
    with torch.no_grad():
        expected = model(ids).logits
    save_adapter(model, tmp_path / "adapter")
    # A fresh base repacked the same way gives the same logits, bit for bit ...
    repacked = loader("llama", "4bit")
    repack_for_cpu(repacked)
    with torch.no_grad():
        assert torch.equal(load_adapter(repacked, tmp_path / "adapter")(ids).logits, expected)
    # ... and a never-repacked one passes the fingerprint check and differs only by the
    # bfloat16 block scales the repack kept.
    fresh = load_adapter(loader("llama", "4bit"), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(fresh(ids).logits, expected, atol=5e-2)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["secura-off", "curlora", "sclora", "lora", "dora"])
def test_merge_reproduces_linear_adapters(kind, method, loader, ids):
    config = (
        AdapterConfig(method="secura", r=4, smagnorm="off", output_bias=True)
        if method == "secura-off"
        else AdapterConfig(method=method, r=4)
    )
    model = apply_adapter(loader(kind, "fp32"), config, **method_data(config.method, ids))
    _perturb_trainable(model, seed=1)
    with torch.no_grad():
        adapted = model(ids).logits
        merged = model.merge_and_unload()(ids).logits
    # fp32 rounding of W + delta (large, random deltas here): ~1e-4; a wrong merge is O(1).
    assert torch.allclose(merged, adapted, atol=5e-4, rtol=1e-4), (merged - adapted).abs().max()
    assert not torch.allclose(adapted, loader(kind, "fp32")(ids).logits, atol=1e-3)

