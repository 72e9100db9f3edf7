"""SC-LoRA: LoRA initialised in a subspace that favours new data and avoids preserved
knowledge (arXiv 2505.23724).

For each adapted layer, output second moments are collected on two small datasets, the
fine-tuning data (``positive``) and data whose knowledge must be preserved
(``negative``): ``cov = W Sigma_x W^T = Y^T Y / N`` with ``Y = x W^T`` the layer's
outputs over the unmasked tokens. Then::

    dcov = (1 - beta) cov_pos - beta cov_neg
    Q    = top-r eigenvectors of dcov             # d_out x r
    B    = Q,   A = Q^T W                         # trainable LoRA factors
    y    = x W^T + b + scaling * (x (B A)^T - x (B0 A0)^T)

``B0``/``A0`` are frozen copies of the initial factors: subtracting their product keeps
the start exact (bit-for-bit, the two products are computed the same way) and works on
4-bit bases, whose weights cannot hold ``W - B A`` exactly. Memory during calibration is
one ``d_out x d_out`` fp32 accumulator per layer of the current pass; pass
``layers_per_pass`` to :func:`secura_plugins.apply_adapter` to bound it.

Example:
    >>> import torch
    >>> from secura_plugins import AdapterConfig, apply_adapter
    >>> from secura_plugins.tiny import build_tiny_model
    >>> base = build_tiny_model("llama")
    >>> batch = {"input_ids": torch.randint(0, 128, (2, 16))}
    >>> model = apply_adapter(base, AdapterConfig(method="sclora", r=4, beta=0.7),
    ...                       positive=[batch], negative=[batch])
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.lora.layer import LoraVariant
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..hookspecs import hookimpl
from ..options import MethodOptions, option
from .base import (
    CORE_ATTR,
    FINGERPRINT_SIZE,
    AdapterMethod,
    base_weight,
    begin_attach,
    fingerprint,
    install_core,
    layer_device,
)

Batch = Mapping[str, torch.Tensor]


@dataclass
class SCLoRAOptions(MethodOptions):
    """SC-LoRA's settings."""

    beta: float = option(
        "SC-LoRA trade-off in [0, 1]: larger keeps more of the preserved knowledge.",
        0.5,
        low=0.0,
        high=1.0,
    )


class SCLoRACore(nn.Module):
    """Frozen initial factors ``A0``, ``B0`` and the base fingerprint."""

    def __init__(
        self, r: int, d_in: int, d_out: int, *, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.register_buffer("A0", torch.zeros(r, d_in, dtype=dtype, device=device))
        self.register_buffer("B0", torch.zeros(d_out, r, dtype=dtype, device=device))
        self.register_buffer("fingerprint", torch.zeros(FINGERPRINT_SIZE))


class SCLoRAVariant(LoraVariant):
    """``y = h0 + scaling * (B A - B0 A0) x``."""

    @staticmethod
    def init(module: Any, adapter_name: str, **kwargs: Any) -> None:
        return None

    @staticmethod
    def forward(
        module: Any, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        lora_A, lora_B = module.lora_A[active_adapter], module.lora_B[active_adapter]
        core = getattr(module, CORE_ATTR)[active_adapter]
        x = x.to(lora_A.weight.dtype)
        trained = lora_B(lora_A(module.lora_dropout[active_adapter](x)))
        initial = F.linear(F.linear(x, core.A0), core.B0)
        return result + ((trained - initial) * module.scaling[active_adapter]).to(result.dtype)

    @staticmethod
    def _delta(module: Any, adapter: str) -> torch.Tensor:
        core = getattr(module, CORE_ATTR)[adapter]
        B, A = module.lora_B[adapter].weight.float(), module.lora_A[adapter].weight.float()
        return (B @ A - core.B0.float() @ core.A0.float()) * module.scaling[adapter]

    @staticmethod
    def merge_safe(module: Any, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        delta = SCLoRAVariant._delta(module, active_adapter)
        return (orig_weight.float() + delta).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: Any, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += SCLoRAVariant._delta(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: Any, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        delta = SCLoRAVariant._delta(module, active_adapter)
        return (orig_weight.float() - delta).to(orig_weight.dtype)


def _count_tokens(batches: Iterable[Batch]) -> int:
    total = 0
    for batch in batches:
        mask = batch.get("attention_mask")
        total += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
    return total


def _check_batches(name: str, batches: Any) -> list[Batch]:
    from ..errors import SecuraConfigError

    if batches is None:
        raise SecuraConfigError(
            name,
            "SC-LoRA needs calibration data: pass positive=[batches of the new task] and "
            "negative=[batches of knowledge to preserve] to apply_adapter "
            "(each batch a dict with input_ids and optionally attention_mask)",
        )
    batches = list(batches)
    if not batches or not all(isinstance(b, Mapping) and "input_ids" in b for b in batches):
        raise SecuraConfigError(
            name, "must be a non-empty list of dicts with 'input_ids' (and 'attention_mask')"
        )
    return batches


@torch.no_grad()
def calibrate(
    model: nn.Module,
    layers: Mapping[str, Any],
    positive: Iterable[Batch],
    negative: Iterable[Batch],
    *,
    beta: float,
    layers_per_pass: int | None = None,
) -> dict[str, torch.Tensor]:
    """``dcov`` (``d_out x d_out``, fp32) for every layer in ``layers``.

    Runs the model with its adapters disabled; each pass hooks ``layers_per_pass``
    layers (all by default) and streams both datasets through the model once.
    """
    pos, neg = _check_batches("positive", positive), _check_batches("negative", negative)
    n_pos, n_neg = _count_tokens(pos), _count_tokens(neg)
    names = list(layers)
    step = layers_per_pass or len(names)
    device = next(model.parameters()).device
    result: dict[str, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    progress = tqdm(total=len(names), desc="SC-LoRA calibration", unit="layer", leave=False)
    try:
        for start in range(0, len(names), step):
            chunk = names[start : start + step]
            acc = {
                n: torch.zeros(
                    layers[n].get_base_layer().out_features,
                    layers[n].get_base_layer().out_features,
                    device=layer_device(layers[n]),
                )
                for n in chunk
            }
            current: dict[str, Any] = {}

            def make_hook(target: torch.Tensor, state: dict[str, Any]):
                def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
                    y = output.detach().float()
                    if module.bias is not None:
                        y = y - module.bias.float()
                    y = y.reshape(-1, y.shape[-1])
                    if state["mask"] is not None:
                        y = y[state["mask"].to(y.device)]
                    target.addmm_(y.T, y, alpha=state["coef"])

                return hook

            handles = [
                layers[n].get_base_layer().register_forward_hook(make_hook(acc[n], current))
                for n in chunk
            ]
            try:
                with model.disable_adapter():
                    for batches, coef in ((pos, (1 - beta) / n_pos), (neg, -beta / n_neg)):
                        current["coef"] = coef
                        for batch in batches:
                            mask = batch.get("attention_mask")
                            current["mask"] = mask.reshape(-1).bool() if mask is not None else None
                            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
                            model(**inputs)
            finally:
                for h in handles:
                    h.remove()
            result.update(acc)
            progress.update(len(chunk))
    finally:
        progress.close()
        model.train(was_training)
    return result


class SCLoRAMethod(AdapterMethod):
    """SC-LoRA (calibrated subspace initialisation of LoRA)."""

    name = "sclora"
    options_class = SCLoRAOptions
    needs_calibration = True

    def prepare(
        self,
        model: nn.Module,
        config: Any,
        layers: Mapping[str, Any],
        *,
        positive: Iterable[Batch] | None = None,
        negative: Iterable[Batch] | None = None,
        layers_per_pass: int | None = None,
        **data: Any,
    ) -> dict[str, Any]:
        if data:
            raise TypeError(f"sclora: unexpected calibration arguments {sorted(data)}")
        return calibrate(
            model,
            layers,
            positive,
            negative,
            beta=config.options.beta,
            layers_per_pass=layers_per_pass,
        )

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
        d_out, d_in, dtype, device = begin_attach(layer, adapter_name, config)
        r = config.r
        core = SCLoRACore(r, d_in, d_out, dtype=dtype, device=device)
        lora_A = nn.Linear(d_in, r, bias=False, device=device, dtype=dtype)
        lora_B = nn.Linear(r, d_out, bias=False, device=device, dtype=dtype)
        if init:
            weight = base_weight(layer)
            _, vecs = torch.linalg.eigh(prepared.double())  # ascending eigenvalues
            Q = vecs[:, -r:].flip(-1).to(torch.float32)  # top-r, largest first
            with torch.no_grad():
                lora_B.weight.copy_(Q.to(dtype))
                lora_A.weight.copy_((Q.T @ weight).to(dtype))
                core.B0.copy_(lora_B.weight)
                core.A0.copy_(lora_A.weight)
                core.fingerprint.copy_(fingerprint(weight))
        layer.lora_A[adapter_name] = lora_A
        layer.lora_B[adapter_name] = lora_B
        install_core(layer, adapter_name, core, SCLoRAVariant)


@hookimpl
def secura_register_methods(registry: Any) -> None:
    registry.add(SCLoRAMethod())
