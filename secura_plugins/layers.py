"""Finding an adapter's layers and tensors in a model: the layer below building
(:mod:`secura_plugins.model`) and the adapter files (:mod:`secura_plugins.io`).

Example:
    >>> from secura_plugins import AdapterConfig, apply_adapter
    >>> from secura_plugins.tiny import build_tiny_model
    >>> model = apply_adapter(build_tiny_model(), AdapterConfig(r=4, target_modules=["q_proj"]))
    >>> sorted(adapter_layers(model, "default"))
    ['model.layers.0.self_attn.q_proj', 'model.layers.1.self_attn.q_proj']
    >>> adapted_method(model).name
    'secura'
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn

from .errors import SecuraError
from .methods.base import CORE_ATTR

if TYPE_CHECKING:  # pragma: no cover
    from .methods.base import AdapterMethod

#: Per-adapter containers of a PEFT LoRA layer that hold an adapter's tensors.
ADAPTER_CONTAINERS = ("lora_A", "lora_B", "lora_magnitude_vector", CORE_ATTR)


def adapter_layers(model: nn.Module, adapter_name: str) -> dict[str, LoraLayer]:
    """LoRA layers carrying ``adapter_name``, keyed by their path in the base model."""
    root = model.base_model.model if isinstance(model, PeftModel) else model
    return {
        name: module
        for name, module in root.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A
    }


def adapter_modules(model: nn.Module, adapter_name: str) -> Iterable[tuple[str, nn.Module]]:
    """(``<layer>.<container>``, module) of every container holding ``adapter_name``'s tensors."""
    for name, layer in adapter_layers(model, adapter_name).items():
        for attr in ADAPTER_CONTAINERS:
            container = getattr(layer, attr, None)
            if container is not None and adapter_name in container:
                yield f"{name}.{attr}", container[adapter_name]


def trainable_adapter_parameters(
    model: nn.Module, adapter_name: str
) -> Iterable[tuple[str, nn.Parameter]]:
    """(name, parameter) of every trainable tensor of ``adapter_name``."""
    for prefix, module in adapter_modules(model, adapter_name):
        for pname, param in module.named_parameters():
            yield f"{prefix}.{pname}", param


def freeze_all_but_adapter(model: nn.Module, adapter_name: str, *, trainable: bool) -> None:
    """Freeze every parameter; the adapter's become ``trainable``."""
    for param in model.parameters():
        param.requires_grad_(False)
    for _, param in trainable_adapter_parameters(model, adapter_name):
        param.requires_grad_(trainable)


def require_adapted(model: Any) -> tuple[Any, str]:
    """(``AdapterConfig``, adapter name) of a model built by this library, else an error."""
    config = getattr(model, "secura_config", None)
    if config is None or not isinstance(model, PeftModel):
        raise SecuraError(
            "this model carries no secura-plugins adapter; build it with apply_adapter, "
            "convert_peft_model or load_adapter"
        )
    return config, model.secura_adapter_name


def adapted_method(model: Any) -> AdapterMethod | None:
    """The :class:`~secura_plugins.methods.base.AdapterMethod` of the adapter ``model``
    carries (through DDP/accelerate ``module`` wrappers), or None for another model."""
    while not isinstance(model, PeftModel) and isinstance(
        getattr(model, "module", None), nn.Module
    ):
        model = model.module
    config = getattr(model, "secura_config", None)
    if config is None:
        return None
    return config.adapter_method
