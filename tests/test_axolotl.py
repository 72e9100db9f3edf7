"""End-to-end tests of ``adapter: secura`` under axolotl 0.19's real training entry.

Every run is ``python -m axolotl.cli.train <yaml>`` (the module ``axolotl train``
launches) in a subprocess, on CPU and offline, with a tiny Llama and dataset written by
the test. A probe plugin (``tests/axolotl_helpers.py``) records what the run's model
looked like; the tests then check it from the outside and reload the saved adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("axolotl", reason="the axolotl extra is not installed")

import axolotl_helpers as H  # noqa: E402

N_LAYERS, N_TARGETS = 2, 7  # tiny Llama: 2 blocks x q/k/v/o/gate/up/down
MERGE_EVERY, MAX_STEPS = 3, 8  # from the tiny recipe: merges at steps 3 and 6


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> H.TinyWorkspace:
    return H.make_workspace(tmp_path_factory.mktemp("axolotl"))


@pytest.fixture(scope="module")
def runs(ws: H.TinyWorkspace) -> dict[str, tuple[Path, H.RunResult]]:
    """The two training runs.

    ``fp``: full precision, S-MagNorm off so that the merged export is exact.
    ``q4``: 4-bit base, with a fused LoRA kernel switched on that the plugin must turn off.
    """
    cfgs = {
        "fp": H.write_config(ws, "fp", {"secura": {"smagnorm": "off"}}),
        "q4": H.write_config(ws, "q4", {"load_in_4bit": True, "lora_qkv_kernel": True}),
    }
    return {name: (cfg, H.run_axolotl_train(cfg)) for name, cfg in cfgs.items()}


@pytest.fixture(scope="module")
def fp_run(runs: dict[str, tuple[Path, H.RunResult]]) -> tuple[Path, H.RunResult]:
    return runs["fp"]


@pytest.fixture(scope="module")
def q4_run(runs: dict[str, tuple[Path, H.RunResult]]) -> tuple[Path, H.RunResult]:
    return runs["q4"]


def _load_base(ws: H.TinyWorkspace, four_bit: bool) -> torch.nn.Module:
    """The base as axolotl loaded it: fp32, or NF4 with the plugin's BitsAndBytesConfig."""
    from transformers import AutoModelForCausalLM

    from secura_plugins.integrations.axolotl.plugin import bnb_4bit_config

    kwargs = {"quantization_config": bnb_4bit_config(torch.float32)} if four_bit else {}
    return AutoModelForCausalLM.from_pretrained(
        str(ws.model_dir), dtype=torch.float32, device_map="cpu", **kwargs
    ).eval()


def _check_trained_run(ws: H.TinyWorkspace, run: tuple[Path, H.RunResult], four_bit: bool):
    cfg, result = run
    assert result.returncode == 0, H.tail(result.output)
    out = Path(yaml_output_dir(cfg))
    report, logits = H.read_probe(out)

    # The adapted layers are SECURA layers on the expected base layers.
    layers = report["layers"]
    assert len(layers) == N_LAYERS * N_TARGETS
    want_base = "Linear4bit" if four_bit else "Linear"
    assert {layer["base_class"] for layer in layers} == {want_base}
    if four_bit:
        assert report["n_linear4bit"] >= N_LAYERS * N_TARGETS
        assert "loading the base model in bitsandbytes 4-bit" in result.output
        assert "prepare_model_for_kbit_training" in result.output
    else:
        assert report["n_linear4bit"] == 0

    # Only SECURA tensors are trainable, every layer's core trained, merges ran, and the
    # base is bit-identical (packed NF4 bytes included).
    trainable = report["trainable"]
    assert trainable and all(".lora_core." in name for name in trainable)
    changed = set(report["changed_adapter"])
    for layer in layers:
        prefix = layer["name"] + ".lora_core.default."
        assert any(k.startswith(prefix) and k in trainable for k in changed), layer["name"]
        assert prefix + "merges" in changed, f"no M1 merge ran in {layer['name']}"
    assert report["n_base_tensors"] > 0
    assert report["changed_base"] == []

    # The saved adapter is ours (plain PEFT refuses it) and reloads to the same logits.
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["peft_type"] == "SECURA"
    assert meta["secura"]["method"] == "secura"
    from secura_plugins import load_adapter

    model = load_adapter(_load_base(ws, four_bit), out)
    with torch.no_grad():
        again = model(input_ids=torch.tensor(H.PROBE_IDS)).logits.float()
    assert torch.equal(again, logits), (again - logits).abs().max()
    return out, logits


def yaml_output_dir(cfg: Path) -> str:
    return yaml.safe_load(cfg.read_text())["output_dir"]


def test_train_full_precision_reloads_same_logits(ws, fp_run):
    _check_trained_run(ws, fp_run, four_bit=False)


def test_train_4bit_base_is_linear4bit_and_reloads(ws, q4_run):
    _check_trained_run(ws, q4_run, four_bit=True)
    output = q4_run[1].output
    assert "turned off lora_qkv_kernel" in output


def test_secura_merge_command_exports_exact_dense_model(ws, fp_run):
    """Our merge path: a dense transformers checkpoint with the adapted model's logits."""
    from transformers import AutoModelForCausalLM

    cfg, result = fp_run
    assert result.returncode == 0, H.tail(result.output)
    out = Path(yaml_output_dir(cfg))
    _, logits = H.read_probe(out)
    merged = H.run_module(["secura_plugins.integrations.axolotl.cli", "merge", str(cfg)])
    assert merged.returncode == 0, H.tail(merged.output)
    dense = AutoModelForCausalLM.from_pretrained(str(out / "merged"), dtype=torch.float32)
    assert not any("lora" in name for name, _ in dense.named_parameters())
    with torch.no_grad():
        dense_logits = dense(input_ids=torch.tensor(H.PROBE_IDS)).logits
    torch.testing.assert_close(dense_logits, logits, atol=1e-5, rtol=1e-5)


GPU_RECIPES = {  # recipe -> model_type of its base model
    "qwen2-1.5b-secura-4bit.yml": "qwen2",
    "llama-3.1-8b-secura-4bit.yml": "llama",
    "gemma-2-2b-secura-4bit.yml": "gemma2",
}


def test_config_time_checks(ws, tmp_path):
    """In one interpreter, through axolotl's own config loading:

    * a misspelt field, a missing plugin, an unknown method, a misspelt ``secura:`` block
      and axolotl's own ``merge-lora`` are refused with messages that name the fix;
    * the 24 GB GPU recipes validate (base model swapped for a tiny local config of the
      same architecture, nothing downloaded): 4-bit on, fused kernels off, SECURA set.
    """
    errors = [  # (name, check kind, overrides, needles); the plugin-less config goes first
        (
            "no_plugin",
            "train",
            {"plugins": None},
            ["Adapter 'secura' is not built in", "Add the plugin", "plugins:"],
        ),
        ("typo", "train", {"secura": {"merge_evry": 2}}, ["secura.merge_evry", "'merge_every'"]),
        ("bad_method", "train", {"secura": {"method": "securra"}}, ["method", "'secura'"]),
        ("block_typo", "train", {"secrua": {"r": 4}}, ["secrua", "`secura:`"]),
        ("merge_lora", "merge-lora", {}, ["merge_lora", "integrations.axolotl.cli merge"]),
    ]
    checks = [
        (kind, H.write_config(ws, f"bad-{name}", overrides, probe=False))
        for name, kind, overrides, _ in errors
    ]
    for recipe, model_type in GPU_RECIPES.items():
        cfg = yaml.safe_load((H.TINY_RECIPE.parent / recipe).read_text())
        cfg["base_model"] = str(H.write_arch_config(tmp_path, model_type))
        cfg["output_dir"] = str(tmp_path / recipe)
        path = tmp_path / recipe
        path.write_text(yaml.safe_dump(cfg))
        checks.append(("train", path))

    result = H.check_configs(checks, tmp_path / "checks.json")
    assert result.returncode == 0, H.tail(result.output)
    outcomes = json.loads((tmp_path / "checks.json").read_text())
    assert len(outcomes) == len(errors) + len(GPU_RECIPES)

    for (name, _, _, needles), outcome in zip(errors, outcomes, strict=False):
        error = outcome["error"]
        assert error is not None, f"{name}: axolotl accepted the config"
        assert error.startswith("ValidationError"), f"{name}: {error}"
        for needle in needles:
            assert needle in error, f"{name}: {needle!r} not in {error}"

    for recipe, outcome in zip(GPU_RECIPES, outcomes[len(errors) :], strict=True):
        assert outcome["error"] is None, f"{recipe}: {outcome['error']}"
        assert outcome["adapter"] == "secura" and outcome["load_in_4bit"] is True
        assert not any(outcome["kernels"].values()), (recipe, outcome["kernels"])
        assert outcome["adapter_config"]["method"] == "secura"
        assert outcome["adapter_config"]["merge"] == "m1"
