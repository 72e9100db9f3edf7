"""Third parties add methods through pluggy, without touching this package."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from secura_plugins import AdapterConfig, apply_adapter, get_plugin_manager, hookimpl

# A complete third-party method: LoRA-FA (A frozen at a seeded random projection, only B
# trains), with an option of its own (a_std) and a capability (stats), plus a step hook.
# It uses only the public contract.
THIRD_PARTY = """
from dataclasses import dataclass

import torch
from secura_plugins import hookimpl
from secura_plugins.methods.base import AdapterMethod, FrozenLinear, layer_seed, set_rank
from secura_plugins.options import MethodOptions, option

CALLS = []


@dataclass
class LoraFAOptions(MethodOptions):
    a_std: float = option("Std of LoRA-FA's frozen A, times 1/sqrt(d_in).", 1.0, low=0.0, low_open=True)


class LoraFA(AdapterMethod):
    name = "lora-fa"
    options_class = LoraFAOptions

    def stats(self, model):
        return {"lora_fa/a_std": float(model.secura_config.options.a_std)}

    def attach(self, layer, adapter_name, config, *, layer_name, init, prepared=None):
        set_rank(layer, adapter_name, config)
        d_in = layer.get_base_layer().in_features
        gen = torch.Generator().manual_seed(layer_seed(config.seed, layer_name))
        std = config.options.a_std / d_in**0.5
        A = torch.randn(config.r, d_in, generator=gen) * std if init else torch.zeros(config.r, d_in)
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
        from secura_plugins import AdapterConfig, SecuraConfigError, adapter_stats, apply_adapter
        from secura_plugins import get_plugin_manager, save_adapter, load_adapter
        from secura_plugins.integrations.axolotl.args import adapter_config_from_cfg, SecuraSettings
        from secura_plugins.tiny import build_tiny_model
        pm = get_plugin_manager()
        assert "lora-fa" in pm.method_names(), pm.method_names()
        ids = torch.randint(4, 90, (2, 10))
        # Its own option: checked by its metadata, in the axolotl schema, flat like ours.
        try:
            AdapterConfig(method="lora-fa", r=4, a_std=0)
        except SecuraConfigError as err:
            assert str(err).startswith("a_std: must be in (0.0"), err
        else:
            raise AssertionError("a_std=0 must be refused")
        assert "frozen A" in SecuraSettings.model_fields["a_std"].description
        assert "frozen A" in AdapterConfig.describe("lora-fa")["a_std"]
        yaml_cfg = adapter_config_from_cfg({{"secura": {{"method": "lora-fa", "a_std": 3.0}}}})
        assert yaml_cfg.a_std == 3.0 and yaml_cfg.options.a_std == 3.0
        config = AdapterConfig.from_dict({{"method": "lora-fa", "r": 4, "a_std": 3.0}})
        model = apply_adapter(build_tiny_model(seed=1), config)
        small = apply_adapter(build_tiny_model(seed=1), AdapterConfig(method="lora-fa", r=4))
        a_big = next(m.weight for n, m in model.named_modules() if n.endswith("lora_A.default"))
        a_one = next(m.weight for n, m in small.named_modules() if n.endswith("lora_A.default"))
        assert torch.allclose(a_big, 3.0 * a_one), "the option did not reach attach"
        assert adapter_stats(model) == {{"lora_fa/a_std": 3.0}}
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all(".lora_B." in n for n in trainable), trainable
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for step in (1, 2):
            model(input_ids=ids, labels=ids).loss.backward(); opt.step(); opt.zero_grad()
            logs = pm.hook.secura_step_end(model=model, step=step)
        assert {{"lora_fa/calls": 2.0}} in logs, logs
        save_adapter(model, {str(tmp_path / "adapter")!r})
        again = load_adapter(build_tiny_model(seed=1), {str(tmp_path / "adapter")!r})
        assert again.secura_config.a_std == 3.0
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
