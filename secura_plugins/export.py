"""Export an adapted model as a plain transformers checkpoint: :func:`export_merged`,
:func:`merge_adapter_into_base` (what ``secura merge`` runs).

Example:
    >>> import tempfile
    >>> from secura_plugins import AdapterConfig, apply_adapter, export_merged
    >>> from secura_plugins.tiny import build_tiny_model
    >>> model = apply_adapter(build_tiny_model(), AdapterConfig(method="curlora", r=4))
    >>> out = export_merged(model, tempfile.mkdtemp() + "/merged")
    >>> (out / "config.json").is_file()
    True
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn

from .errors import ExportError
from .io import atomic_dir
from .layers import require_adapted
from .model import load_adapter

logger = logging.getLogger(__name__)


def export_merged(model: PeftModel, out_dir: str | os.PathLike, *, safe: bool = True) -> Path:
    """Merge the adapter into the base weights and write a plain transformers checkpoint.

    The model is consumed (its layers are merged in place). What is merged is the linear
    update ``scaling * C (U_acc + A B) R`` (and ``b_L`` into the layer bias): identical to
    the adapted model for linear configurations (``smagnorm='off'``, CURLoRA, SC-LoRA, the
    baselines); with S-MagNorm on, the exported model is the un-gated update and its
    outputs differ from the adapted model's (measure the gap with ``secura eval``).
    4-bit bases are refused: load the dense base, ``load_adapter`` onto it, then export.
    """
    config, _ = require_adapted(model)
    base = model.get_base_model()
    if getattr(base, "is_quantized", False) or getattr(base, "is_loaded_in_4bit", False):
        raise ExportError(
            "the base is quantized: merging into 4-bit weights loses the update. Load the "
            "dense base (bf16/fp32), load_adapter(base, adapter_dir), then export_merged; or run "
            "`secura merge ADAPTER --base BASE --out DIR`"
        )
    note = config.adapter_method.export_note(config)
    if note is not None:  # the method says its export is not exact (SECURA's gate)
        logger.warning("%s", note)
    out = Path(out_dir)
    with atomic_dir(out) as scratch:
        merged = model.merge_and_unload(safe_merge=safe)
        _sync_bias_flags(merged)
        merged.save_pretrained(str(scratch))
    return out


def _sync_bias_flags(model: nn.Module) -> None:
    """Make the config declare the biases that merging b_L created, or refuse to export."""
    from transformers import AutoModelForCausalLM

    config = model.config

    def linears_with_bias(root: nn.Module) -> set[str]:
        return {
            n for n, m in root.named_modules() if isinstance(m, nn.Linear) and m.bias is not None
        }

    def expected() -> set[str]:
        with torch.device("meta"):
            return linears_with_bias(AutoModelForCausalLM.from_config(config))

    have, want = linears_with_bias(model), expected()
    for flag in ("attention_bias", "mlp_bias"):
        if have - want and hasattr(config, flag) and not getattr(config, flag):
            setattr(config, flag, True)
            widened = expected()
            if len(have - widened) < len(have - want):
                want = widened
            else:
                setattr(config, flag, False)
    extra = sorted(have - want)
    if extra:
        raise ExportError(
            f"merging SECURA's output bias created biases ({extra[0]}, ...) that the "
            f"{config.model_type} architecture cannot store; train with output_bias: false"
        )
    for name in sorted(want - have):  # layers the widened config now gives a bias: zeros
        module = model.get_submodule(name)
        module.bias = nn.Parameter(
            torch.zeros(module.out_features, dtype=module.weight.dtype, device=module.weight.device)
        )


def merge_adapter_into_base(
    adapter_dir: str | os.PathLike,
    base: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    scale: float | None = None,
) -> Path:
    """Load the dense base checkpoint ``base``, apply the adapter (its update times
    ``scale``, if given), export a merged checkpoint."""
    from transformers import AutoTokenizer

    from .loading import load_base

    base_model = load_base(str(base), dtype=dtype, trust_remote_code=trust_remote_code)
    model = load_adapter(base_model, adapter_dir, scale=scale)
    out = export_merged(model, out_dir)
    with contextlib.suppress(OSError, ValueError):
        AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(out))
    return out
