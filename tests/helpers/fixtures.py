"""Shared fixtures: tiny checkpoints saved on disk, dense and 4-bit loaders, batches.

Its fixtures reach every tier through ``pytest_plugins`` in ``tests/conftest.py``; tests import
its plain helpers with ``from helpers.fixtures import ...``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore", category=UserWarning)

KINDS = ("llama", "qwen2")
METHODS = ("secura", "curlora", "sclora", "lora", "dora")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved tiny checkpoint (model + tokenizer) per architecture."""
    from secura_plugins.tiny import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {kind: save_tiny_checkpoint(root / kind, kind, seed=7) for kind in KINDS}


class OneLinear(torch.nn.Module):
    """One ``nn.Linear`` named ``proj``: the smallest model an adapter can target."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def load_base(path: Path, quant: str, *, keep_layout: bool = True) -> torch.nn.Module:
    """Load a saved checkpoint dense (fp32) or as bitsandbytes 4-bit NF4 (CPU backend).

    4-bit bases get ``keep_4bit_layout`` (as a user who evaluates the bare base should), so
    the tests' reference forwards on the bare base never repack it on AVX512-BF16 CPUs;
    ``keep_layout=False`` leaves bitsandbytes' default.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from secura_plugins.quant import keep_4bit_layout

    if quant == "4bit":
        qc = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
        model = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=qc).eval()
        if keep_layout:
            keep_4bit_layout(model)
        return model
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def repack_for_cpu(model: torch.nn.Module) -> int:
    """Do to every ``Linear4bit`` what its no-grad eval forward does on an AVX512-BF16 CPU.

    bitsandbytes' own ``_convert_weight_packed_for_cpu`` runs on any CPU (only the kernel
    that reads the result needs the instruction set), so the packed layout can be tested
    everywhere. Returns the number of layers repacked.
    """
    from bitsandbytes.functional import _convert_weight_packed_for_cpu
    from bitsandbytes.nn import Linear4bit

    count = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.weight.data, state = _convert_weight_packed_for_cpu(
                module.weight.data, module.weight.quant_state
            )
            assert state.packing_format_for_cpu
            count += 1
    return count


@pytest.fixture(scope="session")
def loader(checkpoints: dict[str, Path]) -> Callable[[str, str], torch.nn.Module]:
    return lambda kind, quant="fp32", **kw: load_base(checkpoints[kind], quant, **kw)


@pytest.fixture
def ids() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(4, 90, (2, 12), generator=gen)


def calibration(ids: torch.Tensor) -> dict[str, list[dict[str, torch.Tensor]]]:
    """SC-LoRA calibration batches: the 'new task' and the 'knowledge to preserve'."""
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # padding must be ignored
    return {
        "positive": [{"input_ids": ids, "attention_mask": mask}],
        "negative": [{"input_ids": (ids * 7) % 90 + 4, "attention_mask": torch.ones_like(ids)}],
    }


def method_data(method: str, ids: torch.Tensor) -> dict:
    return calibration(ids) if method == "sclora" else {}


def train_steps(
    model: torch.nn.Module, ids: torch.Tensor, steps: int = 3, lr: float = 3e-2
) -> None:
    """A few real optimizer steps on a next-token loss, each followed by the host hook.

    Like a Trainer, every optimizer step ends with the plugin hook ``secura_step_end``
    (SECURA's M1/M2 merges run there, so ``U_acc`` fills up when ``merge_every`` is
    small). The step count continues across calls on the same model.
    """
    from secura_plugins import get_plugin_manager

    pm = get_plugin_manager()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    done = getattr(model, "_test_steps_done", 0)
    model.train()
    for step in range(done + 1, done + steps + 1):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        pm.hook.secura_step_end(model=model, step=step)
    model._test_steps_done = done + steps
    model.eval()


def u_acc_total(model: torch.nn.Module) -> float:
    """Sum of ``|U_acc|`` over every SECURA core (0.0 before the first merge)."""
    return sum(float(m.u_acc.abs().sum()) for m in model.modules() if hasattr(m, "u_acc"))
