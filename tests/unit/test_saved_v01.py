"""Adapters saved by secura-plugins 0.1.0 (``tests/data/saved-v0.1``, written by that
code before the per-method options) load with today's code and compute what they did,
and the flat configs of that version still work.

Each folder's ``expected.safetensors`` holds the logits the 0.1.0 model gave; on top of
that, one adapted layer is recomputed by hand from the raw saved tensors with the
method's formula (docstrings of :mod:`secura_plugins.methods`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.nn import functional as F

from secura_plugins import AdapterConfig, load_adapter
from secura_plugins.model import adapter_layers
from secura_plugins.tiny import build_tiny_model

DATA = Path(__file__).parents[1] / "data" / "saved-v0.1"
METHODS = ["secura", "secura-m1", "curlora", "sclora", "lora", "dora"]
LAYER = "model.layers.0.self_attn.q_proj"


def fixture_base() -> torch.nn.Module:  # as in make_fixtures.py
    return build_tiny_model(
        "llama", seed=0, vocab_size=64, hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip


def _gate(h0: torch.Tensor, dh: torch.Tensor, scale: float, eps: float) -> torch.Tensor:
    """S = 2 - sigmoid(s (L / max L - 0.5)), L = |dh| / (|h0| + eps) (normalized modes)."""
    rel = dh.abs() / (h0.abs() + eps)
    return 2.0 - torch.sigmoid(scale * (rel / rel.amax(-1, keepdim=True) - 0.5))


def _by_hand(name: str, saved: dict, cfg: dict, x: torch.Tensor, h0: torch.Tensor):
    """The adapted layer's output from the raw saved tensors (None: PEFT's own DoRA)."""
    t = {k[len(LAYER) + 1 :]: v for k, v in saved.items() if k.startswith(LAYER + ".")}
    t |= {k.split(LAYER + ".", 1)[1]: v for k, v in saved.items() if "." + LAYER + "." in k}
    scaling = (cfg["lora_alpha"] or cfg["r"]) / cfg["r"]
    if name in ("lora", "sclora"):
        out = h0 + scaling * F.linear(F.linear(x, t["lora_A.weight"]), t["lora_B.weight"])
        if name == "sclora":
            out = out - scaling * F.linear(F.linear(x, t["lora_core.A0"]), t["lora_core.B0"])
        return out
    if name == "dora":
        return None
    C, R = t["lora_B.weight"], t["lora_A.weight"]
    if name == "curlora":
        return h0 + scaling * x @ R.T @ t["lora_core.U"].T @ C.T
    fresh = t["lora_core.A"] @ t["lora_core.B"]
    u_acc = t["lora_core.u_acc"]
    if cfg["merge"] == "m2":  # normalized gate, output bias: y = (2 h0 + dh) / S
        dh = scaling * x @ R.T @ (u_acc + fresh).T @ C.T + t["lora_core.bias"]
        return (2 * h0 + dh) / _gate(h0, dh, cfg["smagnorm_scale"], cfg["eps"])
    h0 = h0 + scaling * x @ R.T @ u_acc.T @ C.T  # m1: merged updates join the frozen path
    dh = scaling * x @ R.T @ fresh.T @ C.T  # continuous: y = h0 + dh / S
    return h0 + dh / _gate(h0, dh, cfg["smagnorm_scale"], cfg["eps"])


@pytest.mark.parametrize("name", METHODS)
def test_a_v01_adapter_loads_and_computes_what_it_did(name: str) -> None:
    folder = DATA / name
    meta = json.loads((folder / "adapter_config.json").read_text())
    assert meta["secura"]["version"] == "0.1.0"
    expected = load_file(str(folder / "expected.safetensors"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_adapter(fixture_base(), folder)
    # Loading an old adapter warns about nothing of ours (no deprecated or ignored option);
    # other libraries' deprecations (e.g. transformers' in its own code) are not ours.
    ours = [str(w.message) for w in caught if "site-packages" not in w.filename]
    assert ours == [], ours
    cfg = meta["secura"]["config"]
    assert model.secura_config.to_dict() == {
        k: v for k, v in model.secura_config.to_dict().items() if cfg.get(k, v) == v
    }, "a saved setting was not restored"
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)

    layer = adapter_layers(model, "default")[LAYER]
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h0 = fixture_base().get_submodule(LAYER)(x)
        got = layer(x)
        want = _by_hand(name, load_file(str(folder / "adapter_model.safetensors")), cfg, x, h0)
    assert not torch.allclose(got, h0, atol=1e-3), "the adapter changes nothing"
    if want is not None:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_flat_configs_of_v01_still_work() -> None:
    cfg = AdapterConfig(method="secura", r=4, k=12, smagnorm="off", merge="m2", merge_every=3)
    assert (cfg.k, cfg.smagnorm, cfg.merge, cfg.merge_every, cfg.core_width) == (
        12, "off", "m2", 3, 12,
    )  # fmt: skip
    flat = {"method": "secura", "r": 4, "k": 12, "smagnorm": "off", "output_bias": True}
    again = AdapterConfig.from_dict(flat)
    assert again.output_bias is True and again.k == 12
    assert {k: again.to_dict()[k] for k in flat} == flat
    assert AdapterConfig.from_dict(again.to_dict()) == again
    assert AdapterConfig.from_dict({"method": "sclora", "r": 4, "beta": 0.3}).beta == 0.3
    cfg.merge_every = 5  # flat writes reach the options
    assert cfg.merge_every == 5 and cfg.to_dict()["merge_every"] == 5
    # A recipe's and the axolotl plugin's flat adapter keys.
    import yaml

    from secura_plugins.integrations.axolotl.args import adapter_config_from_cfg
    from secura_plugins.recipe import Recipe

    recipe = Recipe.from_dict(
        yaml.safe_load(
            "model: {tiny: llama}\n"
            "adapter: {method: secura, r: 4, k: 8, smagnorm: off, merge: m2, merge_every: 3}\n"
            "training: {max_steps: 1}\n"
            "tasks: [{name: add, data: {builtin: add, n: 4}}]\n"
        )
    )
    assert (recipe.adapter.k, recipe.adapter.smagnorm, recipe.adapter.merge) == (8, "off", "m2")
    axo = adapter_config_from_cfg(
        yaml.safe_load("lora_r: 4\nsecura: {method: secura, k: 8, smagnorm: off, merge: m2}")
    )
    assert (axo.r, axo.k, axo.smagnorm, axo.merge) == (4, 8, "off", "m2")
    # 0.1.0 saved every field of every method flat; loading drops the other methods'.
    saved = json.loads((DATA / "lora" / "adapter_config.json").read_text())["secura"]["config"]
    assert {"k", "smagnorm", "beta"} <= set(saved)
    assert AdapterConfig.from_saved(saved).to_dict()["r"] == 2
