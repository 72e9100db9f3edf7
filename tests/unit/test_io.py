"""Saving, loading and exporting: nothing lost, nothing mismatched taken for good."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.fixtures import load_base, train_steps, u_acc_total
from safetensors.torch import load_file, save_file

from secura_plugins import (
    AdapterConfig,
    AdapterLoadError,
    ExportError,
    SecuraConfigError,
    SecuraError,
    apply_adapter,
    export_merged,
    load_adapter,
    merge_adapter_into_base,
    save_adapter,
)
from secura_plugins.io import CONFIG_NAME, WEIGHTS_NAME, _sha256
from secura_plugins.tiny import save_tiny_checkpoint


@pytest.fixture
def trained(loader, ids, tmp_path):
    model = apply_adapter(loader("llama"), AdapterConfig(method="secura", r=4, merge_every=2))
    train_steps(model, ids, steps=3)  # the step hook merges at step 2
    assert u_acc_total(model) > 0
    folder = save_adapter(model, tmp_path / "adapter")
    return model, folder


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_saved_folder_holds_every_piece_of_state(trained):
    model, folder = trained
    meta = json.loads((folder / CONFIG_NAME).read_text())
    assert meta["peft_type"] == "SECURA"
    block = meta["secura"]
    assert block["config"]["merge_every"] == 2 and block["method"] == "secura"
    assert block["tensors_sha256"] == _sha256(folder / WEIGHTS_NAME)
    keys = load_file(str(folder / WEIGHTS_NAME)).keys()
    for part in (
        "lora_A.weight",
        "lora_B.weight",
        "lora_core.A",
        "lora_core.B",
        "lora_core.u_acc",
        "lora_core.merges",
        "lora_core.col_idx",
        "lora_core.row_idx",
        "lora_core.fingerprint",
    ):
        assert any(k.endswith(part) for k in keys), part
    assert len(block["layers"]) == 14
    # U_acc (non-zero after the merge at step 2) is saved as it is
    saved = [v for k, v in load_file(str(folder / WEIGHTS_NAME)).items() if k.endswith("u_acc")]
    live = [v for k, v in model.state_dict().items() if k.endswith("u_acc")]
    assert len(saved) == len(live) == 14 and all(v.abs().sum() > 0 for v in live)
    assert sorted(v.abs().sum().item() for v in saved) == sorted(v.abs().sum().item() for v in live)
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


def test_truncated_tensor_file_is_refused(trained, loader):
    _, folder = trained
    data = (folder / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterLoadError, match="interrupted or the file was altered"):
        load_adapter(loader("llama"), folder)


def test_torn_save_is_detected(trained, loader, ids, tmp_path):
    """A crash between the two renames leaves new tensors beside the old config."""
    model, folder = trained
    train_steps(model, ids, steps=1)
    newer = save_adapter(model, tmp_path / "newer")
    (folder / WEIGHTS_NAME).write_bytes((newer / WEIGHTS_NAME).read_bytes())
    with pytest.raises(AdapterLoadError, match="SHA-256 differs"):
        load_adapter(loader("llama"), folder)


def test_missing_tensors_are_named(trained, loader):
    _, folder = trained
    tensors = load_file(str(folder / WEIGHTS_NAME))
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, str(folder / WEIGHTS_NAME))
    meta = json.loads((folder / CONFIG_NAME).read_text())
    meta["secura"]["tensors_sha256"] = _sha256(folder / WEIGHTS_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(AdapterLoadError, match=f"1 missing \\(first: {dropped}\\)"):
        load_adapter(loader("llama"), folder)


def test_wrong_shapes_are_refused(trained, tmp_path):
    _, folder = trained
    wider = save_tiny_checkpoint(tmp_path / "wide", "llama", hidden_size=96, intermediate_size=160)
    with pytest.raises(AdapterLoadError, match=r"is 96 -> 96 in this base but 64 -> 64"):
        load_adapter(load_base(wider, "fp32"), folder)


def test_wrong_architecture_is_refused(trained, loader):
    _, folder = trained
    qwen = loader("qwen2")
    # Same layer names and shapes, but other weights: the fingerprint tells them apart.
    with pytest.raises(AdapterLoadError, match="trained on another base model.*cosine"):
        load_adapter(qwen, folder)


def test_another_base_of_the_same_shape_is_refused_unless_asked(trained, tmp_path, ids):
    model, folder = trained
    other = save_tiny_checkpoint(tmp_path / "other", "llama", seed=99)
    with pytest.raises(AdapterLoadError, match="check_base=False"):
        load_adapter(load_base(other, "fp32"), folder)
    forced = load_adapter(load_base(other, "fp32"), folder, check_base=False)
    assert forced.secura_config.method == "secura"


def test_a_4bit_trained_adapter_loads_on_the_dense_base(checkpoints, ids, tmp_path):
    """The QLoRA workflow: train on NF4, then merge onto the bf16/fp32 base."""
    model = apply_adapter(
        load_base(checkpoints["llama"], "4bit"), AdapterConfig(r=4, smagnorm="off")
    )
    train_steps(model, ids, steps=2)
    folder = save_adapter(model, tmp_path / "a")
    dense = load_adapter(load_base(checkpoints["llama"], "fp32"), folder)  # fingerprint ~0.99
    out = merge_adapter_into_base(folder, checkpoints["llama"], tmp_path / "merged")
    merged = load_base(out, "fp32")
    assert torch.allclose(_logits(merged, ids), _logits(dense, ids), atol=1e-4)
    assert (out / "tokenizer.json").is_file()


def test_missing_config_and_foreign_folders(tmp_path, loader):
    with pytest.raises(AdapterLoadError, match="adapter_config.json is missing"):
        load_adapter(loader("llama"), tmp_path)
    (tmp_path / CONFIG_NAME).write_text('{"peft_type": "LORA", "r": 8}')
    with pytest.raises(AdapterLoadError, match="not written by secura-plugins"):
        load_adapter(loader("llama"), tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(AdapterLoadError, match="not valid JSON"):
        load_adapter(loader("llama"), tmp_path)


def test_plain_peft_refuses_a_secura_adapter_loudly(trained, loader):
    from peft import PeftModel

    _, folder = trained
    with pytest.raises(Exception) as info:  # noqa: B017 - any loud failure will do
        PeftModel.from_pretrained(loader("llama"), str(folder))
    assert "SECURA" in str(info.value) or "secura" in str(info.value).lower()


def test_nan_adapter_is_not_saved_and_the_good_one_survives(trained, loader, ids):
    model, folder = trained
    before = (folder / WEIGHTS_NAME).read_bytes()
    core = next(m for m in model.modules() if hasattr(m, "u_acc"))
    with torch.no_grad():
        core.A[0, 0] = float("nan")
    with pytest.raises(SecuraError, match="NaN/inf.*refusing to save"):
        save_adapter(model, folder)
    assert (folder / WEIGHTS_NAME).read_bytes() == before
    load_adapter(loader("llama"), folder)  # still a good adapter


def test_saving_into_a_checkpoint_folder_keeps_other_files(trained, tmp_path):
    model, _ = trained
    ckpt = tmp_path / "checkpoint-10"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text("{}")
    model.save_pretrained(str(ckpt))  # what transformers.Trainer calls
    assert {p.name for p in ckpt.iterdir()} == {"trainer_state.json", CONFIG_NAME, WEIGHTS_NAME}
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".")]  # no temp files left


def test_reloading_weights_into_the_same_model(trained, ids):
    """What Trainer's resume_from_checkpoint calls: model.load_adapter(folder, name)."""
    model, folder = trained
    expected = _logits(model, ids)
    train_steps(model, ids, steps=2)
    assert not torch.equal(_logits(model, ids), expected)
    model.load_adapter(str(folder), "default", is_trainable=True)
    assert torch.equal(_logits(model, ids), expected)
    assert any(p.requires_grad for p in model.parameters())


def test_unwritable_output_is_a_config_error(trained, tmp_path):
    model, _ = trained
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SecuraConfigError, match="output_dir: cannot create"):
        save_adapter(model, blocker / "adapter")


def test_export_of_a_linear_adapter_with_output_bias(loader, ids, tmp_path):
    model = apply_adapter(
        loader("llama"), AdapterConfig(r=4, smagnorm="off", output_bias=True, merge_every=1)
    )
    train_steps(model, ids, steps=3)
    assert u_acc_total(model) > 0  # the export carries the merged updates too
    expected = _logits(model, ids)
    out = export_merged(model, tmp_path / "merged")
    merged = load_base(out, "fp32")
    assert merged.config.attention_bias and merged.config.mlp_bias
    assert torch.allclose(_logits(merged, ids), expected, atol=1e-5)


def test_export_with_smagnorm_is_the_ungated_update(loader, ids, tmp_path):
    model = apply_adapter(loader("llama"), AdapterConfig(r=4, smagnorm="normalized"))
    train_steps(model, ids, steps=3)
    gated = _logits(model, ids)
    for core in (m for m in model.modules() if hasattr(m, "smagnorm")):
        core.smagnorm = "off"
    ungated = _logits(model, ids)
    for core in (m for m in model.modules() if hasattr(m, "smagnorm")):
        core.smagnorm = "normalized"
    out = export_merged(model, tmp_path / "merged")
    exported = _logits(load_base(out, "fp32"), ids)
    assert torch.allclose(exported, ungated, atol=1e-5)
    assert not torch.allclose(exported, gated, atol=1e-5)


def test_export_refuses_what_it_cannot_write(loader, ids, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    model = apply_adapter(loader("llama"), AdapterConfig(r=4, smagnorm="off"))
    with pytest.raises(ExportError, match="not empty"):
        export_merged(model, tmp_path / "busy")
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]
    qwen = apply_adapter(loader("qwen2"), AdapterConfig(r=4, smagnorm="off", output_bias=True))
    train_steps(qwen, ids, steps=1)
    with pytest.raises(ExportError, match="output_bias: false"):
        export_merged(qwen, tmp_path / "qwen-merged")
    assert not (tmp_path / "qwen-merged").exists()


def test_an_adapter_saved_before_the_variant_fields_loads_as_saved(
    trained, loader, ids, monkeypatch
):
    """Configs written before a_scale/cr_select existed load with the options'
    saved_defaults (the behaviour they were trained with), whatever today's defaults are."""
    from secura_plugins.methods.secura_options import SecuraOptions

    SAVED_DEFAULTS = SecuraOptions.saved_defaults

    model, folder = trained
    meta = json.loads((folder / CONFIG_NAME).read_text())
    for key in SAVED_DEFAULTS:
        del meta["secura"]["config"][key]
    (folder / CONFIG_NAME).write_text(json.dumps(meta))
    loaded = load_adapter(loader("llama"), folder)
    assert {k: getattr(loaded.secura_config, k) for k in SAVED_DEFAULTS} == SAVED_DEFAULTS
    assert SAVED_DEFAULTS == {"a_scale": 1.0, "cr_select": "smallest"}
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    config = AdapterConfig.from_saved({"method": "secura", "r": 4, "cr_select": "largest"})
    assert config.cr_select == "largest"  # what was saved wins
    # Loading goes through saved_defaults, not the dataclass defaults of the day.
    monkeypatch.setattr(SecuraOptions, "saved_defaults", {"cr_select": "random"})
    assert load_adapter(loader("llama"), folder).secura_config.cr_select == "random"
