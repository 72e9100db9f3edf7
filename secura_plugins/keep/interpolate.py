"""Interpolation after training: scale the learned update by ``alpha``.

``alpha = 0`` is the base, ``alpha = 1`` the trained adapter, values between trade new
learning for kept knowledge (and ``alpha > 1`` extrapolates). Every method of this
library adds its whole update inside the adapter path as ``scaling * (...)`` (LoRA's
``B A``, SC-LoRA's ``B A - B0 A0``, SECURA's and CURLoRA's ``C (U_acc + A B) R``) plus
SECURA's output bias, so multiplying each layer's ``scaling`` and the bias by ``alpha``
scales exactly the update. SECURA's S-MagNorm gate is recomputed from the scaled
update (at ``alpha = 0`` the gate passes the base output unchanged). DoRA is refused:
its learned magnitude is not an additive update.

Used by ``load_adapter(..., scale=alpha)``, ``merge_adapter_into_base(..., scale=alpha)``
and ``secura merge --scale``.

Example:
    >>> import torch
    >>> from secura_plugins import AdapterConfig, apply_adapter
    >>> from secura_plugins.keep import scale_update
    >>> from secura_plugins.tiny import build_tiny_model
    >>> model = apply_adapter(build_tiny_model("llama"), AdapterConfig(method="lora", r=4))
    >>> scale_update(model, 0.5)
    14
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import SecuraConfigError
from ..methods.base import CORE_ATTR

__all__ = ["scale_update"]


def scale_update(model: Any, alpha: float) -> int:
    """Multiply the adapter's update by ``alpha`` in place; returns the layers scaled.

    Call it on a loaded (or trained) adapted model before evaluating or exporting; do
    not keep training after it (the optimizer would see rescaled tensors).
    """
    from ..layers import adapter_layers

    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise SecuraConfigError("scale", f"must be a finite number, got {alpha!r}")
    config = getattr(model, "secura_config", None)
    name = getattr(model, "secura_adapter_name", "default")
    if config is None:
        raise SecuraConfigError("scale", "the model carries no secura-plugins adapter")
    if not config.adapter_method.scalable_update:
        raise SecuraConfigError(
            "scale",
            f"method {config.method!r} learns no additive update (as DoRA's learned magnitude) "
            "and cannot be scaled; use lora, secura, curlora or sclora",
        )
    layers = adapter_layers(model, name)
    with torch.no_grad():
        for layer in layers.values():
            layer.scaling[name] = layer.scaling[name] * float(alpha)
            cores = getattr(layer, CORE_ATTR, None)
            core = cores[name] if cores is not None and name in cores else None
            bias = getattr(core, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias.mul_(float(alpha))
    return len(layers)
