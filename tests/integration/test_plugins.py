"""Third parties add methods through pluggy, without touching this package."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from secura_plugins import AdapterConfig, apply_adapter, get_plugin_manager, hookimpl

# A complete third-party method: LoRA-FA (A frozen at a seeded random projection, only B
# trains), plus a step hook. It uses only the public contract.
THIRD_PARTY = """
import torch
from secura_plugins import hookimpl
from secura_plugins.methods.base import AdapterMethod, FrozenLinear, layer_seed, set_rank

CALLS = []


class LoraFA(AdapterMethod):
    name = "lora-fa"

    def attach(self, layer, adapter_name, config, *, layer_name, init, prepared=None):
        set_rank(layer, adapter_name, config)
        d_in = layer.get_base_layer().in_features
        gen = torch.Generator().manual_seed(layer_seed(config.seed, layer_name))
        A = torch.randn(config.r, d_in, generator=gen) / d_in**0.5 if init else torch.zeros(config.r, d_in)
        layer.lora_A[adapter_name] = FrozenLinear(A)


@hookimpl
def secura_register_methods(registry):
    registry.add(LoraFA())


@hookimpl
def secura_step_end(model, step):
    CALLS.append(step)
    return {"lora_fa/calls": float(len(CALLS))}
"""

DIST_INFO_METADATA = "Metadata-Version: 2.1\nName: thirdparty-lora-fa\nVersion: 0.1\n"
ENTRY_POINTS = "[secura_plugins]\nlora_fa = thirdparty_lora_fa\n"


@pytest.fixture(scope="module")
def third_party_run(tmp_path_factory: pytest.TempPathFactory):
    """Install the plugin as a real distribution on sys.path and drive it in a new process."""
    tmp_path = tmp_path_factory.mktemp("thirdparty")
    (tmp_path / "thirdparty_lora_fa.py").write_text(THIRD_PARTY)
    dist = tmp_path / "thirdparty_lora_fa-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(DIST_INFO_METADATA)
    (dist / "entry_points.txt").write_text(ENTRY_POINTS)
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(tmp_path)!r})
        from secura_plugins import AdapterConfig, apply_adapter, get_plugin_manager, save_adapter, load_adapter
        from secura_plugins.tiny import build_tiny_model
        pm = get_plugin_manager()
        assert "lora-fa" in pm.method_names(), pm.method_names()
        ids = torch.randint(4, 90, (2, 10))
        model = apply_adapter(build_tiny_model(seed=1), AdapterConfig(method="lora-fa", r=4))
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all(".lora_B." in n for n in trainable), trainable
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for step in (1, 2):
            model(input_ids=ids, labels=ids).loss.backward(); opt.step(); opt.zero_grad()
            logs = pm.hook.secura_step_end(model=model, step=step)
        assert {{"lora_fa/calls": 2.0}} in logs, logs
        save_adapter(model, {str(tmp_path / "adapter")!r})
        again = load_adapter(build_tiny_model(seed=1), {str(tmp_path / "adapter")!r})
        with torch.no_grad():
            assert torch.equal(again(ids).logits, model(ids).logits)
        print("THIRD-PARTY-OK")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    return tmp_path, out


def test_entry_point_plugin_is_discovered_and_used(third_party_run):
    _, out = third_party_run
    assert out.returncode == 0, out.stderr[-3000:]
    assert "THIRD-PARTY-OK" in out.stdout


def test_without_the_plugin_its_adapter_cannot_be_loaded_silently(third_party_run):
    """An adapter saved with a plugin method names the missing plugin when it is absent."""
    tmp_path, out = third_party_run
    assert out.returncode == 0, out.stderr[-3000:]
    from secura_plugins import AdapterLoadError, load_adapter
    from secura_plugins.tiny import build_tiny_model

    try:
        load_adapter(build_tiny_model(seed=1), tmp_path / "adapter")
    except AdapterLoadError as err:
        assert "install that plugin" in str(err)
    else:  # pragma: no cover - the assertion is the point
        raise AssertionError("loading an adapter of an unknown method must fail")


def test_in_process_plugins_and_the_applied_hook():
    seen = []

    class Recorder:
        @hookimpl
        def secura_adapter_applied(self, model, config):
            seen.append((type(model).__name__, config.method))

    pm = get_plugin_manager()
    plugin = Recorder()
    pm.register(plugin)
    try:
        from secura_plugins.tiny import build_tiny_model

        model = apply_adapter(build_tiny_model(), AdapterConfig(method="curlora", r=4))
        assert seen == [("SecuraPeftModelForCausalLM", "curlora")]
        assert model(torch.randint(4, 90, (1, 4))).logits.shape == (1, 4, 128)
    finally:
        pm.unregister(plugin)


def test_built_in_methods_are_ordinary_plugins():
    pm = get_plugin_manager()
    names = {pm.get_name(p) for p in pm.get_plugins()}
    assert {"secura_plugins.methods.secura", "secura_plugins.methods.curlora"} <= names
    assert pm.method_names() == ["curlora", "dora", "lora", "sclora", "secura"]
