"""What every adapter method shares.

A method is built on PEFT's LoRA layers (``peft.tuners.lora.Linear`` and the
bitsandbytes ``Linear4bit``/``Linear8bitLt`` ones): PEFT injects its layers, then the
method *attaches* to each of them: it fills ``lora_A``/``lora_B``, adds a per-adapter
``lora_core`` module with its own tensors, and installs a ``LoraVariant`` that PEFT calls
for forward, merge and unmerge. Everything an adapter needs to be rebuilt lives in
``lora_A``, ``lora_B`` and ``lora_core`` and is saved by :func:`secura_plugins.save_adapter`.

Methods that are plain PEFT (the LoRA and DoRA baselines) set ``native_peft = True`` and
attach nothing.

A method owns its options (``options_class``, a :class:`~secura_plugins.options.MethodOptions`
dataclass) and declares what hosts need to know about it (capabilities: calibration
data, statistics to log, whether export is exact, what to do before an EWC anchor, ...),
so that no host code branches on method names.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from ..options import MethodOptions

if TYPE_CHECKING:  # pragma: no cover
    from peft.tuners.lora import LoraLayer


class AdapterSettings(Protocol):
    """What a method reads of :class:`secura_plugins.AdapterConfig` (the common fields and
    its own ``options``). A protocol, so that methods do not import the config module."""

    method: str
    r: int
    target_modules: list[str] | str
    lora_alpha: float | None
    lora_dropout: float
    adapter_dtype: str
    seed: int
    options: Any

    @property
    def scaling(self) -> float: ...


#: Number of base-weight entries kept per layer to recognise the base later.
FINGERPRINT_SIZE = 64
#: Name of the per-adapter container that methods add to a PEFT LoRA layer.
CORE_ATTR = "lora_core"


class AdapterMethod:
    """Base class of adapter methods. Subclasses set ``name`` and override what they need.

    Lifecycle (driven by :func:`secura_plugins.apply_adapter` and friends):

    1. ``lora_config_kwargs(config)``: extra ``peft.LoraConfig`` fields.
    2. PEFT injects LoRA layers into the model.
    3. ``prepare(model, config, layers, **data)`` once, with every adapted layer: data-
       dependent set-up (SC-LoRA calibration). Returns per-layer data for ``attach``.
    4. ``attach(layer, adapter_name, config, init=..., prepared=...)`` for each layer.
       ``init=False`` (loading a saved adapter) allocates tensors of the right shapes only.
    """

    name: str = ""
    #: Plain PEFT: saved and loaded in PEFT's own format, nothing attached.
    native_peft: bool = False
    #: The dataclass of this method's own settings (none by default).
    options_class: type[MethodOptions] = MethodOptions
    #: ``prepare`` needs calibration data (``positive=``/``negative=`` batches: SC-LoRA).
    needs_calibration: bool = False
    #: The learned change is additive and can be scaled (``keep.scale_update``); DoRA's
    #: learned magnitude is not.
    scalable_update: bool = True

    # ----------------------------------------------------------------- capabilities
    def export_note(self, config: AdapterSettings) -> str | None:
        """Why a merged export differs from the adapted model under ``config``, or None
        when the export is exact."""
        return None

    def periodic_merge(self, config: AdapterSettings) -> str | None:
        """The merge this config runs every few optimizer steps (it needs the trainable
        tensors whole on every rank), or None."""
        return None

    def before_anchor(self, model: nn.Module) -> int:
        """Called before EWC takes its anchors at the end of a task; returns how many
        layers it changed (SECURA folds pending updates into its accumulator)."""
        return 0

    def stats(self, model: nn.Module) -> dict[str, float]:
        """Cheap statistics to log (SECURA: merge count and mean S-MagNorm gate)."""
        return {}

    def state_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Tensors that training changes besides the trainable parameters, by a name for
        messages (checked for NaN/inf with them; SECURA's merge accumulators)."""
        return {}

    # ----------------------------------------------------------------- lifecycle

    def lora_config_kwargs(self, config: AdapterSettings) -> dict[str, Any]:
        return {}

    def prepare(
        self,
        model: nn.Module,
        config: AdapterSettings,
        layers: Mapping[str, LoraLayer],
        **data: Any,
    ) -> dict[str, Any]:
        if data:
            raise TypeError(
                f"adapter method {self.name!r} takes no calibration data, got {sorted(data)}"
            )
        return {}

    def attach(
        self,
        layer: LoraLayer,
        adapter_name: str,
        config: AdapterSettings,
        *,
        layer_name: str,
        init: bool,
        prepared: Any = None,
    ) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class FrozenLinear(nn.Module):
    """A bias-free linear map whose weight is a buffer: saved, moved, never trained.

    It stands in for PEFT's ``lora_A``/``lora_B`` when they hold frozen rows/columns of
    W (SECURA's and CURLoRA's R and C), so no PEFT code path can make them trainable.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, frozen"


def base_weight(layer: LoraLayer) -> torch.Tensor:
    """The layer's frozen base weight as a dense fp32 ``d_out x d_in`` tensor.

    bitsandbytes 4-bit and 8-bit weights are dequantized (a copy); a plain weight is
    returned as an fp32 view or copy. Never write into the result. A 4-bit weight that
    bitsandbytes repacked for its AVX512-BF16 CPU kernel is read through
    :func:`secura_plugins.quant.dequantized_weight` (its usual dequantization reads the
    repacked bytes as garbage).
    """
    from ..quant import dequantized_weight

    base = layer.get_base_layer()
    if getattr(layer, "fan_in_fan_out", False):
        raise NotImplementedError(
            "fan_in_fan_out (Conv1D) layers are not supported; target nn.Linear layers"
        )
    weight = dequantized_weight(base)
    return weight.detach().to(torch.float32)


def layer_seed(seed: int, layer_name: str) -> int:
    """A per-layer seed that is stable across processes and Python versions."""
    return (seed * 1_000_003 + zlib.crc32(layer_name.encode())) % (2**63 - 1)


def fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """``FINGERPRINT_SIZE`` entries of ``weight`` at positions fixed by its shape."""
    gen = torch.Generator(device="cpu").manual_seed(zlib.crc32(str(tuple(weight.shape)).encode()))
    idx = torch.randint(0, weight.numel(), (FINGERPRINT_SIZE,), generator=gen)
    return weight.reshape(-1)[idx.to(weight.device)].to(torch.float32).cpu()


def fingerprint_match(saved: torch.Tensor, current: torch.Tensor) -> float:
    """Cosine similarity of two fingerprints (1.0 for the same base; ~0 for another)."""
    saved, current = saved.double().cpu(), current.double().cpu()
    denom = saved.norm() * current.norm()
    if denom == 0:
        return 1.0 if torch.equal(saved, current) else 0.0
    return float(saved @ current / denom)


def adapter_dtype(config: AdapterSettings) -> torch.dtype:
    return getattr(torch, config.adapter_dtype)


def layer_device(layer: LoraLayer) -> torch.device:
    return layer.get_base_layer().weight.device


def set_rank(layer: LoraLayer, adapter_name: str, config: AdapterSettings) -> None:
    """Make PEFT's per-adapter bookkeeping agree with ``config`` (rank and scaling)."""
    layer.r[adapter_name] = config.r
    layer.lora_alpha[adapter_name] = (
        config.lora_alpha if config.lora_alpha is not None else config.r
    )
    layer.scaling[adapter_name] = config.scaling
    layer.lora_dropout[adapter_name] = (
        nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
    )


def begin_attach(
    layer: LoraLayer, adapter_name: str, config: AdapterSettings
) -> tuple[int, int, torch.dtype, torch.device]:
    """Check that ``r`` fits the layer and sync PEFT's rank bookkeeping.

    Returns ``(d_out, d_in, adapter dtype, device)`` for the method to build its tensors.
    """
    base = layer.get_base_layer()
    d_out, d_in, r = base.out_features, base.in_features, config.r
    if r > min(d_out, d_in):
        raise ValueError(
            f"r={r} is larger than the layer ({d_out} x {d_in}); lower r or drop this layer "
            "from target_modules"
        )
    set_rank(layer, adapter_name, config)
    return d_out, d_in, adapter_dtype(config), layer_device(layer)


def install_core(layer: LoraLayer, adapter_name: str, core: nn.Module, variant: type) -> None:
    """Put ``core`` under ``layer.lora_core[adapter_name]`` and route PEFT through ``variant``."""
    if not hasattr(layer, CORE_ATTR):
        layer.add_module(CORE_ATTR, nn.ModuleDict())
    getattr(layer, CORE_ATTR)[adapter_name] = core
    if CORE_ATTR not in layer.adapter_layer_names:
        # Instance-level: PEFT's set_adapter/delete_adapter/device moves now see the core.
        layer.adapter_layer_names = (*layer.adapter_layer_names, CORE_ATTR)
    layer.lora_variant[adapter_name] = variant
    layer.merged_adapters = [a for a in layer.merged_adapters if a != adapter_name]
