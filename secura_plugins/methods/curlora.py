"""CURLoRA: CUR decomposition with inverted-probability sampling; only U trains (arXiv 2408.14572).

Column and row probabilities ``p_j = ||W[:, j]||^2 / ||W||_F^2`` are inverted
(``1 / (p + 0.001)``, renormalised, as in the authors' code) and ``r`` columns ``J`` and
rows ``I`` are drawn **with replacement** from a seeded generator (seed and layer name),
so the draw is reproducible. ``C = W[:, J]`` and ``R = W[I, :]`` are frozen and saved with
the adapter, together with ``J`` and ``I``; ``U`` (``r x r``) starts at zero::

    y = x W^T + b + scaling * x (C U R)^T

Example:
    >>> import torch
    >>> from secura_plugins import AdapterConfig, apply_adapter, count_parameters
    >>> from secura_plugins.tiny import build_tiny_model
    >>> model = apply_adapter(build_tiny_model("llama"), AdapterConfig(method="curlora", r=4))
    >>> count_parameters(model)["trainable"]  # 7 layers x 2 blocks x r^2
    224
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..hookspecs import hookimpl
from .base import AdapterMethod, adapter_dtype, layer_device, layer_seed
from .cur import CURCore, CURVariant, attach_cur

#: The authors' offset in the inverted probabilities 1 / (p + offset).
INVERSE_OFFSET = 1e-3


class CURLoRACore(CURCore):
    """The trainable ``r x r`` core U."""

    def __init__(self, r: int, *, dtype: torch.dtype, device: torch.device | None = None) -> None:
        super().__init__(r, device=device)
        self.U = nn.Parameter(torch.zeros(r, r, dtype=dtype, device=device))

    def core_matrix(self) -> torch.Tensor:
        return self.U


def inverted_probabilities(sq_norms: torch.Tensor) -> torch.Tensor:
    """CURLoRA's sampling distribution from squared column (or row) norms."""
    p = sq_norms / sq_norms.sum().clamp_min(torch.finfo(sq_norms.dtype).tiny)
    inv = 1.0 / (p + INVERSE_OFFSET)
    return inv / inv.sum()


class CURLoRAMethod(AdapterMethod):
    """CURLoRA (seeded inverted-probability CUR; only U trains)."""

    name = "curlora"

    def attach(
        self,
        layer: Any,
        adapter_name: str,
        config: Any,
        *,
        layer_name: str,
        init: bool,
        prepared: Any = None,
    ) -> None:
        r = config.r
        core = CURLoRACore(r, dtype=adapter_dtype(config), device=layer_device(layer))

        def select(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            gen = torch.Generator(device="cpu").manual_seed(layer_seed(config.seed, layer_name))
            w = weight.cpu().double().pow(2)
            cols = torch.multinomial(inverted_probabilities(w.sum(0)), r, True, generator=gen)
            rows = torch.multinomial(inverted_probabilities(w.sum(1)), r, True, generator=gen)
            return cols.to(weight.device), rows.to(weight.device)

        attach_cur(layer, adapter_name, config, core, CURVariant, select=select, init=init)


@hookimpl
def secura_register_methods(registry: Any) -> None:
    registry.add(CURLoRAMethod())
