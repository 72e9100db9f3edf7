"""End-to-end tests of ``adapter: secura`` under axolotl 0.19's real training entry.

Every run is ``python -m axolotl.cli.train <yaml>`` (the module ``axolotl train``
launches) in a subprocess, on CPU and offline, with a tiny Llama and dataset written by
the test. A probe plugin (``tests/helpers/axolotl_helpers.py``) records what the run's model
looked like; the tests then check it from the outside and reload the saved adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("axolotl", reason="the axolotl extra is not installed")

from helpers import axolotl_helpers as H  # noqa: E402

N_LAYERS, N_TARGETS = 2, 7  # tiny Llama: 2 blocks x q/k/v/o/gate/up/down
MERGE_EVERY, MAX_STEPS = 3, 8  # from the tiny recipe: merges at steps 3 and 6


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> H.TinyWorkspace:
    return H.make_workspace(tmp_path_factory.mktemp("axolotl"))


@pytest.fixture(scope="module")
def runs(ws: H.TinyWorkspace) -> dict[str, tuple[Path, H.RunResult]]:
    """The two training runs.

    ``fp``: full precision, S-MagNorm off so that the merged export is exact; it is also
    task 1 of the continual test (EWC and replay on).
    ``q4``: 4-bit base, with a fused LoRA kernel switched on that the plugin must turn off.
    """
    continual = {"ewc": {"lam": 1000.0}, "replay": {"ratio": 0.25, "task": "add"}}
    cfgs = {
        "fp": H.write_config(ws, "fp", {"secura": {"smagnorm": "off", **continual}}),
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
    assert_same_logits(again, logits)
    return out, logits


def assert_same_logits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float rounding (the axolotl run used one thread, pytest may use more)."""
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=1e-6)


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


def test_continual_ewc_and_replay_across_two_axolotl_runs(ws, fp_run):
    """Task 2 starts from task 1's adapter, replays its rows and feels its EWC penalty."""
    from secura_plugins.continual import EWC, ReplayBuffer, replay_count

    cfg1, result1 = fp_run
    assert result1.returncode == 0, H.tail(result1.output)
    task1 = Path(yaml_output_dir(cfg1))
    # Task 1 handed on a consolidated EWC state and a buffer with its rows.
    ewc1 = EWC.load(task1 / "secura_ewc.safetensors")
    assert ewc1.num_tasks == 1 and ewc1.fisher
    assert any(float(f.sum()) > 0 for f in ewc1.fisher.values())
    assert ReplayBuffer.load(task1 / "secura_replay.jsonl").task_counts() == {"add": 32}

    data2 = H.write_task2_data(ws)
    cfg2 = H.write_config(
        ws,
        "task2",
        {
            "datasets": [{"path": str(data2), "ds_type": "json", "type": "alpaca"}],
            "lora_model_dir": str(task1),
            "secura": {"smagnorm": "off", "ewc": {"lam": 1000.0}, "replay": {"ratio": 0.25}},
        },
    )
    result = H.run_axolotl_train(cfg2)
    assert result.returncode == 0, H.tail(result.output)
    out = Path(yaml_output_dir(cfg2))
    report, _ = H.read_probe(out)

    assert f"loading the adapter saved in {task1}" in result.output
    # ... and the adapter task 2 started from (at post_model_load) is task 1's saved one,
    # tensor for tensor (U_acc and merge count included), not a fresh adapter.
    from safetensors.torch import load_file

    saved = load_file(str(task1 / "adapter_model.safetensors"))
    at_load = load_file(str(out / "probe" / "adapter_at_load.safetensors"))
    assert sorted(at_load) == sorted(saved)
    for key, value in saved.items():
        assert torch.equal(at_load[key], value), key
    assert any(k.endswith("u_acc") and v.abs().sum() > 0 for k, v in saved.items())
    # Replay: task 1 rows were tokenized by axolotl with task 2's rows.
    mix = [json.loads(line) for line in (out / "secura_replay_mix.jsonl").read_text().splitlines()]
    assert len(mix) == replay_count(24, 0.25) == 8
    assert all(row["instruction"].startswith("add") for row in mix)
    assert report["train_rows"] == 24 + 8
    # EWC: the penalty was live inside axolotl's trainer (logged), and task 2 was folded in.
    penalties = [float(v) for v in _logged(result.output, "ewc/penalty")]
    assert penalties and max(penalties) > 0, "no EWC penalty in axolotl's training logs"
    assert EWC.load(out / "secura_ewc.safetensors").num_tasks == 2
    counts = ReplayBuffer.load(out / "secura_replay.jsonl").task_counts()
    assert counts == {"add": 32, "task2": 24}


def test_sclora_calibrates_from_files_and_trains(ws, tmp_path):
    """method: sclora builds its start from calibration rows read and tokenized by the plugin."""
    negative = tmp_path / "keep.jsonl"
    negative.write_text(
        "".join(json.dumps({"text": f"fact {i}: the sky is blue."}) + "\n" for i in range(12))
    )
    cfg = H.write_config(
        ws,
        "sclora",
        {"secura": {"method": "sclora", "calibration": {"negative": str(negative)}}},
    )
    result = H.run_axolotl_train(cfg)
    assert result.returncode == 0, H.tail(result.output)
    assert "SC-LoRA calibration on 8 positive and 3 negative batches" in result.output
    out = Path(yaml_output_dir(cfg))
    report, logits = H.read_probe(out)
    assert len(report["layers"]) == N_LAYERS * N_TARGETS
    assert report["changed_base"] == []
    changed = set(report["changed_adapter"])
    for layer in report["layers"]:
        assert any(k.startswith(layer["name"] + ".lora_") for k in changed), layer["name"]
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["secura"]["method"] == "sclora"
    from secura_plugins import load_adapter

    model = load_adapter(_load_base(ws, four_bit=False), out)
    with torch.no_grad():
        again = model(input_ids=torch.tensor(H.PROBE_IDS)).logits.float()
    assert_same_logits(again, logits)


def _logged(output: str, key: str) -> list[str]:
    """Values of ``key`` in the training-log dicts axolotl prints."""
    import re

    return re.findall(rf"'{re.escape(key)}': '?([-0-9.e]+)'?", output)


GPU_RECIPES = {  # recipe -> model_type of its base model
    "qwen2-1.5b-secura-4bit.yml": "qwen2",
    "llama-3.1-8b-secura-4bit.yml": "llama",
    "gemma-2-2b-secura-4bit.yml": "gemma2",
}


def test_config_time_checks(ws, tmp_path):
    """In one interpreter, through axolotl's own config loading:

    * a misspelt field, a missing plugin, an unknown method, a misspelt ``secura:`` block
      and axolotl's own ``merge-lora`` are refused with messages that name the fix;
    * with ``adapter: lora`` the listed plugin changes nothing (kernels stay auto-enabled);
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
        (
            "sclora_no_data",
            "train",
            {"secura": {"method": "sclora"}},
            ["secura.calibration.negative", "JSON-lines"],
        ),
        ("ewc_typo", "train", {"secura": {"ewc": {"lambda": 5}}}, ["secura.ewc.lambda", "'lam'"]),
        ("merge_lora", "merge-lora", {}, ["merge_lora", "integrations.axolotl.cli merge"]),
    ]
    checks = [
        (kind, H.write_config(ws, f"bad-{name}", overrides, probe=False))
        for name, kind, overrides, _ in errors
    ]
    lora = {"adapter": "lora", "lora_r": 4, "lora_alpha": 8, "secura": None}
    lora["lora_target_modules"] = ["q_proj", "v_proj"]
    checks.append(("train", H.write_config(ws, "plain-lora", lora, probe=False)))
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
    assert len(outcomes) == len(errors) + 1 + len(GPU_RECIPES)

    for (name, _, _, needles), outcome in zip(errors, outcomes, strict=False):
        error = outcome["error"]
        assert error is not None, f"{name}: axolotl accepted the config"
        assert error.startswith("ValidationError"), f"{name}: {error}"
        for needle in needles:
            assert needle in error, f"{name}: {needle!r} not in {error}"

    # Listed but not used (adapter: lora): the plugin leaves the config alone, so axolotl
    # still auto-enables its fused LoRA kernels.
    plain = outcomes[len(errors)]
    assert plain["error"] is None and plain["adapter"] == "lora", plain["error"]
    assert all(plain["kernels"].values()), plain["kernels"]

    for recipe, outcome in zip(GPU_RECIPES, outcomes[len(errors) + 1 :], strict=True):
        assert outcome["error"] is None, f"{recipe}: {outcome['error']}"
        assert outcome["adapter"] == "secura" and outcome["load_in_4bit"] is True
        assert not any(outcome["kernels"].values()), (recipe, outcome["kernels"])
        assert outcome["adapter_config"]["method"] == "secura"
        assert outcome["adapter_config"]["merge"] == "m1"
