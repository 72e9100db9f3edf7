"""``secura forgetting`` on adapters trained by ``secura train``, by TRL and by axolotl.

Tiny models (the real model's run is in ``test_real_model_e2e.py``). Each adapter comes
from a real training run of its host; the command is run through ``secura``'s own entry
point and its JSON, table and PNG are checked. A model compared with itself must show
no forgetting at all (KL 0, NLL rise 0, every kept answer kept).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from secura_plugins.cli import main
from secura_plugins.forgetting import consistent, keyword, load_prompts

FAST = ["--topics", "4", "--text-tokens", "256", "--no-progress"]


def _forgetting(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert main(["forgetting", *args, "--json", *FAST]) == 0
    return json.loads(capsys.readouterr().out)


def _check_report(report: dict, *, changed: bool) -> None:
    assert set(report) >= {"knowledge", "general_text", "kl", "items", "base", "model"}
    text, kl = report["general_text"], report["kl"]
    assert text["nll_base"] > 0 and text["rise"] == pytest.approx(text["nll"] - text["nll_base"])
    assert kl["prompts"] > 0 and kl["tokens"] > 0
    if changed:  # the adapter is really applied: the fine-tuned model differs from its base
        assert kl["mean_kl"] > 1e-6 and text["rise"] != 0.0
    assert report["knowledge"]["written"] == len(report["items"]) <= 4


@pytest.fixture(scope="module")
def recipe_adapter(tmp_path_factory) -> Path:
    """``secura train recipes/tiny.yaml`` for 4 steps (tiny base saved under the run)."""
    from secura_plugins.recipe import load_recipe, run_recipe

    out = tmp_path_factory.mktemp("recipe") / "run"
    recipe = load_recipe(
        Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml",
        ["training.max_steps=4", "training.save_steps=4", "probe.steps=4"],
    )
    return Path(run_recipe(recipe, output_dir=out, progress=False)["adapter"])


def test_secura_train_adapter(recipe_adapter, tmp_path, capsys):
    report = _forgetting(capsys, str(recipe_adapter), "--out", str(tmp_path / "f"))
    _check_report(report, changed=True)
    assert report["kind"] == "adapter" and report["base"].endswith("base")
    assert report["four_bit"] is False
    assert json.loads((tmp_path / "f" / "forgetting.json").read_text())["kl"] == report["kl"]
    assert (tmp_path / "f" / "forgetting.png").stat().st_size > 1000
    # the table, and the user's own prompts for the KL
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "12+7="}\n{"text": "rev abc="}\n\nnext q=\n')
    assert load_prompts(prompts) == ["12+7=", "rev abc=", "next q="]
    capsys.readouterr()
    assert main(["forgetting", str(recipe_adapter), "--prompts", str(prompts), *FAST]) == 0
    table = capsys.readouterr().out
    assert "| KL(base || model) on --prompts (nats/token) | 0 |" in table
    assert "3 prompts" in table and "general-text NLL" in table


def test_model_compared_with_itself_forgot_nothing(recipe_adapter, capsys):
    base = str(recipe_adapter.parent / "base")
    report = _forgetting(capsys, base, "--base", base)
    assert report["kind"] == "merged model"
    _check_report(report, changed=False)
    assert report["kl"]["mean_kl"] == pytest.approx(0.0, abs=1e-6)
    assert report["general_text"]["rise"] == pytest.approx(0.0, abs=1e-6)
    k = report["knowledge"]
    assert k["accuracy"] == k["base_accuracy"]


def test_trl_callback_adapter_and_its_merged_export(tmp_path, capsys, checkpoints):
    from helpers.trl_helpers import load_dense, sft_config, text_dataset
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    from secura_plugins import AdapterConfig
    from secura_plugins.export import merge_adapter_into_base
    from secura_plugins.integrations.trl import SecuraCallback

    base = checkpoints["llama"]
    trainer = SFTTrainer(
        load_dense(base),
        args=sft_config(tmp_path / "run", max_steps=4),
        train_dataset=text_dataset(32),
        processing_class=AutoTokenizer.from_pretrained(str(base)),
        callbacks=[SecuraCallback(AdapterConfig(method="secura", r=4, output_bias=True))],
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    adapter = _forgetting(capsys, str(tmp_path / "adapter"))
    _check_report(adapter, changed=True)
    assert adapter["base"] == str(base)
    merged = merge_adapter_into_base(tmp_path / "adapter", str(base), tmp_path / "merged")
    report = _forgetting(capsys, str(merged), "--base", str(base))
    assert report["kind"] == "merged model"
    _check_report(report, changed=True)


def test_axolotl_adapter(tmp_path, capsys):
    pytest.importorskip("axolotl", reason="the axolotl extra is not installed")
    from helpers import axolotl_helpers as H

    ws = H.make_workspace(tmp_path / "ws")
    cfg = H.write_config(ws, "run", {"max_steps": 3}, probe=False)
    result = H.run_axolotl_train(cfg)
    assert result.returncode == 0, H.tail(result.output)
    out = Path(yaml.safe_load(cfg.read_text())["output_dir"])
    report = _forgetting(capsys, str(out))
    _check_report(report, changed=True)
    assert report["base"] == str(ws.model_dir)


def test_bad_inputs_name_the_field(tmp_path, capsys):
    assert main(["forgetting", str(tmp_path), *FAST]) == 2
    assert "neither adapter_config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    assert main(["forgetting", str(tmp_path), *FAST]) == 2
    assert "--base: " in capsys.readouterr().err
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": 3}\n')
    assert main(["forgetting", str(tmp_path), "--base", "x", "--prompts", str(bad)]) == 2
    assert "p.jsonl:1: a JSON line needs a 'prompt' or 'text' string" in capsys.readouterr().err
    assert main(["forgetting", str(tmp_path), "--base", "x", "--topics", "0"]) == 2
    assert "--topics: must be between 1 and" in capsys.readouterr().err


def test_self_consistency_rule():
    q = "What is the capital of Japan?"
    assert keyword("The capital of Japan is Tokyo.", q) == "tokyo" and keyword("...") == ""
    assert consistent("Tokyo.", "The capital of Japan is Tokyo.", q)
    assert not consistent("Tokyo.", "It is Kyoto.", q)
    assert not consistent("The capital of Japan.", "The capital of Japan.", q)  # nothing new
