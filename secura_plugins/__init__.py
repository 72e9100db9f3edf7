"""secura-plugins: forgetting-resistant fine-tuning for the trainers people already use.

SECURA, CURLoRA and SC-LoRA adapters on PEFT's LoRA layers (dense and bitsandbytes
4-bit bases), the PEFT LoRA/DoRA baselines, a pluggy contract for third-party methods,
and (in :mod:`secura_plugins.integrations`) a TRL callback and an axolotl plugin.

Example:
    >>> import torch
    >>> from secura_plugins import AdapterConfig, apply_adapter
    >>> from secura_plugins.tiny import build_tiny_model
    >>> model = apply_adapter(build_tiny_model(), AdapterConfig(method="secura", r=4))
    >>> model(torch.randint(0, 128, (1, 8))).logits.shape
    torch.Size([1, 8, 128])
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .config import AdapterConfig
from .errors import AdapterLoadError, ExportError, SecuraConfigError, SecuraError
from .hookspecs import hookimpl

# The rest imports torch, PEFT and transformers: loaded on first use (PEP 562), so the
# ``secura`` command can quiet their import-time notices before they print (cli.main).
_LAZY = {
    "export_merged": ".export",
    "load_adapter": ".model",
    "merge_adapter_into_base": ".export",
    "save_adapter": ".io",
    "get_plugin_manager": ".manager",
    "adapter_stats": ".model",
    "apply_adapter": ".model",
    "convert_peft_model": ".model",
    "count_parameters": ".model",
    "is_adapted": ".model",
}

if TYPE_CHECKING:  # pragma: no cover
    from .export import export_merged, merge_adapter_into_base
    from .io import save_adapter
    from .manager import get_plugin_manager
    from .model import (
        adapter_stats,
        apply_adapter,
        convert_peft_model,
        count_parameters,
        is_adapted,
        load_adapter,
    )


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AdapterConfig",
    "AdapterLoadError",
    "ExportError",
    "SecuraConfigError",
    "SecuraError",
    "__version__",
    "adapter_stats",
    "apply_adapter",
    "convert_peft_model",
    "count_parameters",
    "export_merged",
    "get_plugin_manager",
    "hookimpl",
    "is_adapted",
    "load_adapter",
    "merge_adapter_into_base",
    "save_adapter",
]
