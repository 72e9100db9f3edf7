"""Shared machinery of the two CUR-shaped methods, SECURA and CURLoRA.

Both freeze ``C = W[:, J]`` (``d_out x r``) and ``R = W[I, :]`` (``r x d_in``) and train a
small core in between, so the update is ``delta_W = scaling * C @ U @ R`` with an
``r x r`` core matrix ``U``. PEFT's ``lora_A`` holds R and ``lora_B`` holds C (as frozen
buffers); the core lives in ``lora_core``. The forward never builds ``delta_W``::

    t  = x @ R.T            # (..., r)      r * d_in  per token
    u  = t @ U.T            # (..., r)      r * r     per token
    dh = u @ C.T            # (..., d_out)  r * d_out per token
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import LoraVariant
from torch import nn
from torch.nn import functional as F

from .base import (
    CORE_ATTR,
    FINGERPRINT_SIZE,
    FrozenLinear,
    base_weight,
    begin_attach,
    fingerprint,
    install_core,
)


class CURCore(nn.Module):
    """Frozen bookkeeping common to CUR cores: chosen indices and a base fingerprint."""

    def __init__(self, r: int, *, device: torch.device | None = None) -> None:
        super().__init__()
        self.register_buffer("col_idx", torch.zeros(r, dtype=torch.long, device=device))
        self.register_buffer("row_idx", torch.zeros(r, dtype=torch.long, device=device))
        self.register_buffer("fingerprint", torch.zeros(FINGERPRINT_SIZE))

    def core_matrix(self) -> torch.Tensor:
        """The ``r x r`` matrix U of ``delta_W = scaling * C U R``."""
        raise NotImplementedError

    def output_bias(self) -> torch.Tensor | None:
        return None


def cur_factors(layer: Any, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, CURCore]:
    """(C, R, core) of one adapted layer."""
    return (
        layer.lora_B[adapter_name].weight,
        layer.lora_A[adapter_name].weight,
        getattr(layer, CORE_ATTR)[adapter_name],
    )


def cur_delta_weight(layer: Any, adapter_name: str) -> torch.Tensor:
    """The dense ``d_out x d_in`` update (fp32). For merge and export only, never forward."""
    C, R, core = cur_factors(layer, adapter_name)
    U = core.core_matrix().to(torch.float32)
    return (C.float() @ U @ R.float()) * layer.scaling[adapter_name]


def _add_output_bias(layer: Any, adapter_name: str, sign: float) -> None:
    _, _, core = cur_factors(layer, adapter_name)
    bias = core.output_bias()
    if bias is None:
        return
    base = layer.get_base_layer()
    if base.bias is None:
        base.bias = nn.Parameter(
            torch.zeros(base.out_features, dtype=bias.dtype, device=bias.device),
            requires_grad=False,
        )
    with torch.no_grad():
        base.bias.add_(sign * bias.detach().to(base.bias.dtype))


class CURVariant(LoraVariant):
    """``y = h0 + scaling * x (C U R)^T``: the plain, linear CUR adapter."""

    @staticmethod
    def init(module: Any, adapter_name: str, **kwargs: Any) -> None:  # done by attach_cur
        return None

    @staticmethod
    def forward(
        module: Any, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        C, R, core = cur_factors(module, active_adapter)
        x = module.lora_dropout[active_adapter](x.to(R.dtype))
        t = F.linear(F.linear(x, R), core.core_matrix())
        delta = F.linear(t, C) * module.scaling[active_adapter]
        bias = core.output_bias()
        if bias is not None:
            delta = delta + bias
        return result + delta.to(result.dtype)

    @staticmethod
    def merge_safe(module: Any, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        delta = cur_delta_weight(module, active_adapter)
        _add_output_bias(module, active_adapter, +1.0)
        return (orig_weight.float() + delta).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: Any, active_adapter: str, orig_weight: torch.Tensor) -> None:
        delta = cur_delta_weight(module, active_adapter)
        _add_output_bias(module, active_adapter, +1.0)
        orig_weight.data += delta.to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: Any, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        delta = cur_delta_weight(module, active_adapter)
        _add_output_bias(module, active_adapter, -1.0)
        return (orig_weight.float() - delta).to(orig_weight.dtype)


def attach_cur(
    layer: Any,
    adapter_name: str,
    config: Any,
    core: CURCore,
    variant: type[LoraVariant],
    *,
    select: Any,
    init: bool,
) -> None:
    """Fill ``lora_A``/``lora_B`` with R/C and install ``core`` + ``variant`` on ``layer``.

    ``select(weight) -> (col_idx, row_idx)`` picks J and I from the dense fp32 weight;
    it runs only when ``init`` is true. ``select`` may instead return
    ``(col_idx, row_idx, C, R)`` with factors that are not columns/rows of W (SVD
    directions); the indices are then recorded as given (-1: no column of W). Otherwise
    zero tensors of the right shapes are allocated, to be filled from a saved adapter.
    """
    d_out, d_in, dtype, device = begin_attach(layer, adapter_name, config)
    r = config.r
    if init:
        weight = base_weight(layer)
        chosen = select(weight)
        cols, rows = chosen[0], chosen[1]
        if len(chosen) == 4:
            C, R = chosen[2].to(dtype).contiguous(), chosen[3].to(dtype).contiguous()
        else:
            C = weight[:, cols].to(dtype).contiguous()
            R = weight[rows, :].to(dtype).contiguous()
        with torch.no_grad():
            core.col_idx.copy_(cols)
            core.row_idx.copy_(rows)
            core.fingerprint.copy_(fingerprint(weight))
        del weight
    else:
        C = torch.zeros(d_out, r, dtype=dtype, device=device)
        R = torch.zeros(r, d_in, dtype=dtype, device=device)
    layer.lora_A[adapter_name] = FrozenLinear(R)
    layer.lora_B[adapter_name] = FrozenLinear(C)
    install_core(layer, adapter_name, core.to(device), variant)
