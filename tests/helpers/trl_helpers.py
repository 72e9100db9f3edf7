"""Shared pieces of the TRL tests: tiny data, SFTConfig, 4-bit loading, adapter snapshots."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore", category=UserWarning)

TEXTS = [f"{a}+{b}={a + b}" for a in range(12) for b in range(12)]


def text_dataset(n: int = 64, offset: int = 0):
    from datasets import Dataset

    return Dataset.from_dict({"text": TEXTS[offset : offset + n]})


def reverse_dataset(n: int = 64):
    """A second 'task' with other data: reversed words."""
    from datasets import Dataset

    words = [f"w{i}x{i * 7 % 13}" for i in range(n)]
    return Dataset.from_dict({"text": [f"{w}>{w[::-1]}" for w in words]})


def sft_config(output_dir: Path, **overrides: Any):
    from trl import SFTConfig

    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        max_steps=6,
        per_device_train_batch_size=8,
        learning_rate=2e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        max_length=32,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        bf16=False,
    )
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


def load_4bit(path: Path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qc = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    return AutoModelForCausalLM.from_pretrained(str(path), quantization_config=qc)


def load_dense(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def adapter_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor (trainable cores, U_acc, merge count, C/R), cloned."""
    from secura_plugins.io import adapter_tensors

    return {k: v.detach().clone() for k, v in adapter_tensors(model, "default").items()}


def base_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every non-adapter tensor of the model (4-bit packed weights as stored).

    Keys are the plain model's (PEFT's ``.base_layer`` removed), so snapshots taken
    before and after wrapping compare directly.
    """
    out = {}
    for name, tensor in model.state_dict().items():
        if "lora_" not in name:
            out[name.replace(".base_layer", "")] = tensor.detach().clone()
    return out


def logged(trainer: Any, key: str) -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h]


def sample_ids(tok: Any) -> torch.Tensor:
    return tok(["3+4=7", "11+2=13"], return_tensors="pt", padding=True).input_ids
