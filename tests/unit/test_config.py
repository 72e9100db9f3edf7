"""Bad configuration fails early, naming the field and the fix."""

from __future__ import annotations

import pytest

from secura_plugins import AdapterConfig, SecuraConfigError, apply_adapter

BAD = [
    ({"r": 0}, "r", "integer >= 1"),
    ({"r": "8"}, "r", "integer >= 1"),
    ({"r": True}, "r", "integer"),
    ({"k": 2, "r": 4}, "k", "must be >= r"),
    ({"k": -1}, "k", "integer >= 1"),
    ({"merge_every": 0}, "merge_every", "integer >= 1"),
    ({"smagnorm": "normalised"}, "smagnorm", "did you mean 'normalized'"),
    ({"merge": "M1"}, "merge", "choose one of m1, m2, none"),
    ({"a_init": "svd"}, "a_init", "orthogonal, released"),
    ({"beta": 1.5}, "beta", r"\[0.0, 1.0\]"),
    ({"lora_dropout": 1.0}, "lora_dropout", r"\[0.0, 1.0\)"),
    ({"smagnorm_scale": 0}, "smagnorm_scale", r"\(0.0"),
    ({"lora_alpha": -2}, "lora_alpha", r"\(0.0"),
    ({"output_bias": "yes"}, "output_bias", "true or false"),
    ({"target_modules": []}, "target_modules", "non-empty list"),
    ({"adapter_dtype": "fp32"}, "adapter_dtype", "float32"),
    ({"method": "secrua"}, "method", "did you mean 'secura'"),
    ({"method": "qlora"}, "method", "known methods: curlora, dora, lora, sclora, secura"),
    ({"rank": 8}, "rank", "unknown field; did you mean 'r'"),
]


@pytest.mark.parametrize(
    ("data", "field", "message"), BAD, ids=[b[1] + "-" + str(i) for i, b in enumerate(BAD)]
)
def test_bad_field_names_field_and_fix(data, field, message):
    with pytest.raises(SecuraConfigError, match=message) as info:
        AdapterConfig.from_dict(data)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


def test_good_config_round_trips():
    cfg = AdapterConfig(method="secura", r=8, k=24, smagnorm="released", merge="m2")
    assert AdapterConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.core_width == 24 and AdapterConfig(r=8).core_width == 32
    assert AdapterConfig(r=8, lora_alpha=16).scaling == 2.0


def test_every_field_is_documented():
    assert all(len(text) > 10 for text in AdapterConfig.describe().values())


def test_unmatched_target_modules_list_the_real_layer_names(loader):
    with pytest.raises(SecuraConfigError, match="target_modules.*named .*down_proj.*q_proj"):
        apply_adapter(loader("llama"), AdapterConfig(target_modules=["query", "value"]))


@pytest.mark.parametrize("method", ["secura", "curlora", "sclora"])
def test_rank_larger_than_a_layer_names_r(loader, method, ids):
    from helpers.fixtures import method_data

    with pytest.raises(SecuraConfigError, match=r"^r: .*k_proj.*larger than the layer"):
        apply_adapter(
            loader("llama"), AdapterConfig(method=method, r=40), **method_data(method, ids)
        )


def test_applying_twice_is_refused(loader):
    from secura_plugins import SecuraError

    model = apply_adapter(loader("llama"), AdapterConfig(r=4))
    with pytest.raises(SecuraError, match="already a PeftModel.*convert_peft_model"):
        apply_adapter(model, AdapterConfig(r=4))


def test_each_method_owns_its_options():
    from dataclasses import replace

    from secura_plugins.methods import SCLoRAOptions, SecuraOptions
    from secura_plugins.options import MethodOptions

    assert type(AdapterConfig(method="secura").options) is SecuraOptions
    assert type(AdapterConfig(method="sclora", beta=0.2).options) is SCLoRAOptions
    assert type(AdapterConfig(method="curlora").options) is MethodOptions
    assert "beta" not in AdapterConfig(method="secura").to_dict()
    assert set(AdapterConfig.describe("sclora")) - set(AdapterConfig.describe("lora")) == {"beta"}
    # Another method's option: still checked, then ignored with a warning naming its owner.
    with pytest.warns(UserWarning, match="'merge_every' is an option of method 'secura'"):
        cfg = AdapterConfig(method="curlora", merge_every=4)
    with pytest.raises(AttributeError, match="option of method 'secura'"):
        _ = cfg.merge_every
    with pytest.raises(SecuraConfigError, match="merge_every"):
        AdapterConfig(method="curlora", merge_every=0)
    # Copies never share their options.
    first = AdapterConfig(method="secura", r=4)
    second = replace(first, r=8)
    second.merge = "m2"
    assert (first.merge, second.merge, second.r) == ("m1", "m2", 8)


def test_an_options_class_cannot_redefine_a_common_field():
    from dataclasses import dataclass

    from secura_plugins import get_plugin_manager, hookimpl
    from secura_plugins.methods.lora import LoraMethod
    from secura_plugins.options import MethodOptions, option

    @dataclass
    class Clash(MethodOptions):
        r: int = option("a second rank", 2, integer=True, minimum=1)

    class Plugin:
        @hookimpl
        def secura_register_methods(self, registry):
            method = LoraMethod("clash-lora")
            method.options_class = Clash
            registry.add(method)

    pm = get_plugin_manager()
    plugin = Plugin()
    pm.register(plugin)
    try:
        with pytest.raises(TypeError, match="redefines the common field"):
            AdapterConfig(method="clash-lora")
    finally:
        pm.unregister(plugin)
