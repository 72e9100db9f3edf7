"""4-bit bases that bitsandbytes repacked for its AVX512-BF16 CPU kernel (issue 11).

On such CPUs a no-grad eval forward of ``Linear4bit`` repacks its weight in place. The
layout is produced here with bitsandbytes' own conversion (``helpers.fixtures.repack_for_cpu``),
which runs on any CPU; the end-to-end case at the bottom runs the real eval forward and
is skipped where the CPU lacks the instruction set.
"""

from __future__ import annotations

import pytest
import torch
from bitsandbytes.functional import has_avx512bf16
from bitsandbytes.nn import Linear4bit
from helpers.fixtures import method_data, repack_for_cpu
from peft import LoraConfig, get_peft_model
from peft.utils.integrations import dequantize_module_weight

from secura_plugins import AdapterConfig, apply_adapter, convert_peft_model
from secura_plugins.methods.base import base_weight, fingerprint, fingerprint_match
from secura_plugins.model import adapter_layers
from secura_plugins.quant import dequantized_weight, is_cpu_packed


def _linear4bit(model: torch.nn.Module) -> dict[str, Linear4bit]:
    return {
        n.removeprefix("base_model.model."): m
        for n, m in model.named_modules()
        if isinstance(m, Linear4bit)
    }


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _round_scales_to_bf16(model: torch.nn.Module) -> None:
    """The values a repacked layer computes with: its block scales rounded to bfloat16."""
    for module in _linear4bit(model).values():
        state = module.weight.quant_state
        assert not state.nested  # load_base loads without double quantization
        state.absmax = state.absmax.to(torch.bfloat16).to(state.absmax.dtype)


def _smallest(norms: torch.Tensor, chosen: torch.Tensor, rel_tol: float = 0.01) -> bool:
    """``chosen`` are the smallest ``norms``, to ``rel_tol`` (bfloat16 scales may swap ties)."""
    rest = torch.ones_like(norms, dtype=torch.bool)
    rest[chosen] = False
    return bool(norms[chosen].max() <= norms[rest].min() + rel_tol * norms.max())


def _grads(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return out


def test_the_repacked_layout_really_scrambles_the_usual_reading(loader):
    model = loader("llama", "4bit")
    layers = _linear4bit(model)
    before = {n: dequantize_module_weight(m).clone() for n, m in layers.items()}
    assert repack_for_cpu(model) == len(layers) > 0
    for name, module in layers.items():
        assert _rel(dequantize_module_weight(module), before[name]) > 0.5, name  # garbage
        # The library reads through the layout, to bfloat16 scale rounding, on a copy.
        assert _rel(dequantized_weight(module), before[name]) < 5e-3, name
        assert is_cpu_packed(module), "reading must not change the layer"


@pytest.mark.parametrize("method", ["secura", "curlora", "sclora"])
def test_selection_and_fingerprint_on_a_repacked_base(loader, ids, method):
    clean = apply_adapter(
        loader("llama", "4bit"), AdapterConfig(method=method, r=4), **method_data(method, ids)
    )
    packed_base = loader("llama", "4bit")
    repack_for_cpu(packed_base)
    packed = apply_adapter(
        packed_base, AdapterConfig(method=method, r=4), **method_data(method, ids)
    )
    clean_layers, packed_layers = (
        adapter_layers(clean, "default"),
        adapter_layers(packed, "default"),
    )
    for name, layer in packed_layers.items():
        base = layer.get_base_layer()
        assert not is_cpu_packed(base) and base.support_avx512bf16_for_cpu is False, name
        assert _rel(base_weight(layer), base_weight(clean_layers[name])) < 5e-3, name
        core, ref = layer.lora_core["default"], clean_layers[name].lora_core["default"]
        assert fingerprint_match(core.fingerprint, ref.fingerprint) > 0.999, name
        if method == "curlora":  # seeded sampling from (almost) the same norms
            assert torch.equal(core.col_idx, ref.col_idx), name
            assert torch.equal(core.row_idx, ref.row_idx), name
        elif method == "secura":  # C/R: the smallest-norm rows and columns of the true weight
            truth = base_weight(clean_layers[name])
            assert _smallest(truth.norm(dim=0), core.col_idx), name
            assert _smallest(truth.norm(dim=1), core.row_idx), name
        else:  # SC-LoRA: the same projection Q Q^T W (eigenvector signs aside)
            assert _rel(core.B0 @ core.A0, ref.B0 @ ref.A0) < 0.05, name


def test_training_after_eval_is_not_repacked_and_has_the_true_gradients(loader, ids):
    """A simulated AVX512-BF16 CPU: the per-layer flag bitsandbytes sets from lscpu is on."""
    reference = apply_adapter(loader("llama", "4bit"), AdapterConfig(method="secura", r=4))
    base = loader("llama", "4bit", keep_layout=False)
    for module in _linear4bit(base).values():
        module.support_avx512bf16_for_cpu = True
    model = apply_adapter(base, AdapterConfig(method="secura", r=4))
    model.eval()
    with torch.no_grad():  # an evaluation: the repack trigger
        model(ids)
    assert not any(is_cpu_packed(m) for m in _linear4bit(model).values())
    got, want = _grads(model, ids), _grads(reference, ids)
    assert got.keys() == want.keys() and got
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_training_a_base_repacked_before_apply_matches_the_unpacked_path(loader, ids):
    reference_base = loader("llama", "4bit")
    _round_scales_to_bf16(reference_base)  # same values as the repacked layers keep
    reference = apply_adapter(reference_base, AdapterConfig(method="secura", r=4))
    base = loader("llama", "4bit")
    repack_for_cpu(base)
    model = apply_adapter(base, AdapterConfig(method="secura", r=4))
    got, want = _grads(model, ids), _grads(reference, ids)
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=1e-5, atol=1e-7), name
    # The first layer learns only through the 4-bit layers after it.
    assert any(g.abs().sum() > 0 for n, g in got.items() if ".layers.0." in n)


def test_peft_qlora_model_converted_by_the_trl_path_is_unpacked(loader, ids):
    base = loader("llama", "4bit")
    repack_for_cpu(base)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model = convert_peft_model(peft_model, {"method": "lora", "r": 4})  # plain PEFT QLoRA
    for name, module in _linear4bit(model).items():
        assert not is_cpu_packed(module) and module.support_avx512bf16_for_cpu is False, name
    grads = _grads(model, ids)
    # LoRA B of the first layer learns only through the 4-bit layers after it.
    assert any(g.abs().sum() > 0 for n, g in grads.items() if ".layers.0." in n and "lora_B" in n)


@pytest.mark.skipif(
    not has_avx512bf16(),
    reason="needs a CPU with AVX512-BF16 (bitsandbytes.functional.has_avx512bf16() is False): "
    "only there does Linear4bit.forward repack its weight; covered above by repack_for_cpu",
)
def test_real_eval_forward_then_training_on_an_avx512_bf16_cpu(loader, ids):
    never = loader("llama", "4bit")
    truth = {n: dequantize_module_weight(m).clone() for n, m in _linear4bit(never).items()}
    reference = apply_adapter(never, AdapterConfig(method="secura", r=4))
    bare = loader("llama", "4bit", keep_layout=False)
    bare.eval()
    with torch.no_grad():
        bare(ids)  # bitsandbytes repacks here, on this CPU
    assert all(is_cpu_packed(m) for m in _linear4bit(bare).values())
    model = apply_adapter(bare, AdapterConfig(method="secura", r=4))
    for name, layer in adapter_layers(model, "default").items():
        assert _rel(base_weight(layer), truth[name]) < 5e-3, name
        assert fingerprint_match(fingerprint(truth[name]), fingerprint(base_weight(layer))) > 0.99
    model.eval()
    with torch.no_grad():
        model.generate(ids[:1, :4], max_new_tokens=2, do_sample=False)
    assert not any(is_cpu_packed(m) for m in _linear4bit(model).values())
    got, want = _grads(model, ids), _grads(reference, ids)
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=0.05, atol=1e-4), name


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_every_nf4_variant_is_read_and_unpacked_to_the_repacked_values(double_quant, storage):
    """nf4_config's double quantization + bf16 storage, and the plain config, on a layer
    wider than one quantization block (bitsandbytes' inverse leaves plain scales transposed)."""
    from secura_plugins.quant import keep_4bit_layout

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 256, generator=gen) * 0.05
    layer = Linear4bit(
        256,
        96,
        bias=False,
        compute_dtype=torch.float32,
        quant_type="nf4",
        compress_statistics=double_quant,
        quant_storage=storage,
    )
    layer.weight = type(layer.weight)(
        weight,
        requires_grad=False,
        quant_type="nf4",
        compress_statistics=double_quant,
        quant_storage=storage,
        module=layer,
    )
    layer = layer.to("cpu")  # quantizes
    truth = dequantize_module_weight(layer).clone()
    repack_for_cpu(layer)
    read = dequantized_weight(layer)
    assert is_cpu_packed(layer)
    assert _rel(read, truth) < 5e-3  # only the bfloat16 rounding of the block scales
    assert keep_4bit_layout(torch.nn.Sequential(layer)) == 1
    assert not is_cpu_packed(layer) and layer.weight.dtype == storage
    assert torch.equal(dequantize_module_weight(layer), read)  # unpacked = what was read
    x = torch.randn(3, 256, generator=gen, requires_grad=True)
    layer(x).sum().backward()  # the autograd path again
    assert torch.allclose(x.grad, read.sum(0).expand(3, -1), atol=1e-4)
