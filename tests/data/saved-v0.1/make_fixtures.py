"""Write the v0.1 adapters of this folder (run once, with secura-plugins 0.1.0 as of
commit 46a6974, before the per-method options refactor; kept for the record).

Each ``<method>/`` holds an adapter saved by that code on the tiny model of
:func:`fixture_base`, with trained-looking (seeded random) tensors, plus
``expected.safetensors``: the token ids and the logits the adapted model gave.
``tests/unit/test_saved_v01.py`` loads them with today's code.

    PYTHONPATH=$PWD python tests/data/saved-v0.1/make_fixtures.py
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from secura_plugins import AdapterConfig, apply_adapter, get_plugin_manager, save_adapter
from secura_plugins.tiny import build_tiny_model

HERE = Path(__file__).parent
CONFIGS = {
    "secura": dict(
        method="secura",
        r=2,
        k=6,
        smagnorm="normalized",
        smagnorm_scale=5.0,
        merge="m2",
        merge_every=1,
        output_bias=True,
        a_init="orthogonal",
        eps=1e-5,
        lora_alpha=4.0,
        seed=3,
    ),
    "secura-m1": dict(method="secura", r=2, smagnorm="continuous", merge="m1", seed=1),
    "curlora": dict(method="curlora", r=2, seed=2),
    "sclora": dict(method="sclora", r=2, beta=0.7),
    "lora": dict(method="lora", r=2, lora_alpha=4.0),
    "dora": dict(method="dora", r=2),
}
TARGETS = ["q_proj", "v_proj"]


def fixture_base() -> torch.nn.Module:
    return build_tiny_model(
        "llama",
        seed=0,
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )


def main() -> None:
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    for name, cfg in CONFIGS.items():
        config = AdapterConfig(target_modules=TARGETS, **cfg)
        data = {}
        if config.method == "sclora":
            data = {"positive": [{"input_ids": ids}], "negative": [{"input_ids": ids.flip(0)}]}
        model = apply_adapter(fixture_base(), config, **data)
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.2 * torch.randn(p.shape, generator=gen))
            get_plugin_manager().hook.secura_step_end(model=model, step=1)
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.2 * torch.randn(p.shape, generator=gen))
            logits = model(ids).logits
        save_adapter(model, HERE / name)
        save_file(
            {"input_ids": ids, "logits": logits.contiguous()},
            str(HERE / name / "expected.safetensors"),
        )


if __name__ == "__main__":
    main()
