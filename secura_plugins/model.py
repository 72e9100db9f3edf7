"""Put an adapter on a model: :func:`apply_adapter`, :func:`convert_peft_model`.

The result is a ``peft.PeftModel`` (a subclass of the class PEFT would have built), so
``transformers.Trainer``, TRL, axolotl and accelerate treat it like any PEFT model,
4-bit bases included. The subclass only changes ``save_pretrained`` and
``load_adapter`` to this library's format (see :mod:`secura_plugins.io`), which is what
makes Trainer checkpoints and ``resume_from_checkpoint`` carry SECURA's state.

Example:
    >>> from secura_plugins import AdapterConfig, apply_adapter, count_parameters
    >>> from secura_plugins.tiny import build_tiny_model
    >>> model = apply_adapter(build_tiny_model("llama"), AdapterConfig(method="secura", r=4))
    >>> type(model).__name__
    'SecuraPeftModelForCausalLM'
    >>> count_parameters(model)["trainable"] > 0
    True
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from peft import LoraConfig, PeftModel, PeftModelForCausalLM, get_peft_model
from torch import nn
from tqdm.auto import tqdm

from .config import AdapterConfig
from .errors import AdapterLoadError, SecuraConfigError, SecuraError
from .io import load_adapter_weights, read_adapter_config, save_adapter, verified_weights
from .layers import (
    ADAPTER_CONTAINERS,
    adapter_layers,
    adapter_modules,
    freeze_all_but_adapter,
    trainable_adapter_parameters,
)
from .manager import get_plugin_manager
from .methods.base import AdapterMethod
from .quant import keep_4bit_layout

# adapter_layers & co. stay importable from here (their home is secura_plugins.layers).
__all__ = [
    "ADAPTER_CONTAINERS",
    "SecuraModelMixin",
    "adapter_layers",
    "adapter_modules",
    "adapter_stats",
    "apply_adapter",
    "convert_peft_model",
    "count_parameters",
    "is_adapted",
    "load_adapter",
    "trainable_adapter_parameters",
]


class SecuraModelMixin:
    """Added in front of PEFT's model class: our save/load, PEFT for everything else."""

    secura_config: AdapterConfig
    secura_adapter_name: str

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Save the adapter in secura-plugins' format (called by ``Trainer`` checkpoints)."""
        save_adapter(self, save_directory, state_dict=kwargs.get("state_dict"))

    def load_adapter(
        self, model_id: str, adapter_name: str = "default", is_trainable: bool = False, **kwargs
    ) -> Any:
        """Reload this model's adapter tensors from a folder (``Trainer`` resume)."""
        if adapter_name != self.secura_adapter_name:
            raise SecuraError(
                f"this model carries adapter {self.secura_adapter_name!r}; loading a second "
                f"adapter {adapter_name!r} onto it is not supported"
            )
        return load_adapter_weights(self, model_id, is_trainable=is_trainable)


class SecuraPeftModel(SecuraModelMixin, PeftModel):
    """A ``PeftModel`` carrying a secura-plugins adapter."""


class SecuraPeftModelForCausalLM(SecuraModelMixin, PeftModelForCausalLM):
    """A ``PeftModelForCausalLM`` carrying a secura-plugins adapter."""


_PROMOTED: dict[type, type] = {
    PeftModel: SecuraPeftModel,
    PeftModelForCausalLM: SecuraPeftModelForCausalLM,
}


def is_adapted(model: Any) -> bool:
    """True for a model returned by :func:`apply_adapter`, :func:`convert_peft_model` or
    :func:`~secura_plugins.load_adapter`."""
    return isinstance(model, SecuraModelMixin)


def _linear_suffixes(model: nn.Module) -> list[str]:
    return sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    )


def _inject(
    model: nn.Module,
    config: AdapterConfig,
    method: AdapterMethod,
    adapter_name: str,
    target_modules: list[str] | str | None = None,
) -> PeftModel:
    from transformers import GenerationMixin

    targets = target_modules if target_modules is not None else config.target_modules
    lora_config = LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha if config.lora_alpha is not None else config.r,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM" if isinstance(model, GenerationMixin) else None,
        **method.lora_config_kwargs(config),
    )
    try:
        return get_peft_model(model, lora_config, adapter_name=adapter_name)
    except ValueError as err:
        if "not found in the base model" in str(err) or "Target module" in str(err):
            raise SecuraConfigError(
                "target_modules",
                f"{targets!r} match no layer of this model; its linear layers are named "
                f"{', '.join(_linear_suffixes(model))}",
            ) from err
        raise


def _build(
    peft_model: PeftModel,
    config: AdapterConfig,
    method: AdapterMethod,
    adapter_name: str,
    *,
    init: bool,
    data: dict[str, Any] | None = None,
) -> PeftModel:
    keep_4bit_layout(peft_model)  # before calibration forwards and base reads; see quant.py
    layers = adapter_layers(peft_model, adapter_name)
    if not layers:
        raise SecuraConfigError(
            "target_modules", f"{config.target_modules!r} matched no layer of this model"
        )
    if not method.native_peft:
        prepared = method.prepare(peft_model, config, layers, **(data or {})) if init else {}
        for name, layer in tqdm(
            layers.items(),
            desc=f"{method.name}: {'building' if init else 'allocating'} adapter",
            unit="layer",
            leave=False,
            disable=len(layers) < 64,
        ):
            try:
                method.attach(
                    layer,
                    adapter_name,
                    config,
                    layer_name=name,
                    init=init,
                    prepared=prepared.get(name),
                )
            except ValueError as err:
                if "larger than the layer" in str(err):
                    raise SecuraConfigError("r", f"{name}: {err}") from err
                raise
    elif data:
        raise TypeError(f"adapter method {method.name!r} takes no calibration data")
    _promote(peft_model, config, adapter_name)
    freeze_all_but_adapter(peft_model, adapter_name, trainable=True)
    get_plugin_manager().hook.secura_adapter_applied(model=peft_model, config=config)
    return peft_model


def _promote(peft_model: PeftModel, config: AdapterConfig, adapter_name: str) -> None:
    cls = type(peft_model)
    if not isinstance(peft_model, SecuraModelMixin):
        if cls not in _PROMOTED:
            raise SecuraError(
                f"{cls.__name__} is not supported; build the model with task_type='CAUSAL_LM'"
            )
        peft_model.__class__ = _PROMOTED[cls]
    peft_model.secura_config = config
    peft_model.secura_adapter_name = adapter_name
    peft_config = peft_model.peft_config[adapter_name]
    peft_config.r = config.r
    peft_config.lora_alpha = config.lora_alpha if config.lora_alpha is not None else config.r


def apply_adapter(
    model: nn.Module,
    config: AdapterConfig | dict[str, Any],
    *,
    adapter_name: str = "default",
    **data: Any,
) -> PeftModel:
    """Wrap ``model`` (a transformers causal LM, dense or bitsandbytes 4/8-bit) with the
    adapter described by ``config`` and return the ``PeftModel``.

    Only adapter parameters are trainable afterwards; base weights are never written.
    ``data`` is passed to the method's ``prepare`` step: SC-LoRA needs ``positive=`` and
    ``negative=`` (lists of batch dicts with ``input_ids`` and ``attention_mask``) and
    accepts ``layers_per_pass=`` to bound calibration memory.

    Example:
        >>> import torch
        >>> from secura_plugins import AdapterConfig, apply_adapter
        >>> from secura_plugins.tiny import build_tiny_model
        >>> model = apply_adapter(build_tiny_model(), {"method": "curlora", "r": 4})
        >>> model(torch.randint(0, 128, (1, 6))).logits.shape
        torch.Size([1, 6, 128])
    """
    if isinstance(config, dict):
        config = AdapterConfig.from_dict(config)
    if isinstance(model, PeftModel):
        raise SecuraError(
            "the model is already a PeftModel: pass the base model, or use "
            "convert_peft_model(model, config) to turn its LoRA layers into this method"
        )
    method = get_plugin_manager().get_method(config.method)
    peft_model = _inject(model, config, method, adapter_name)
    return _build(peft_model, config, method, adapter_name, init=True, data=data)


def convert_peft_model(
    peft_model: PeftModel,
    config: AdapterConfig | dict[str, Any],
    *,
    adapter_name: str | None = None,
    **data: Any,
) -> PeftModel:
    """Turn the LoRA layers of an existing ``PeftModel`` into ``config``'s method, in place.

    For hosts that build the ``PeftModel`` themselves (TRL's ``peft_config=``, axolotl's
    adapter loader, a 4-bit base prepared for k-bit training): the LoRA layers and
    targets are kept, their tensors are replaced. The LoRA baselines cannot be converted
    (pass their ``LoraConfig`` to the host instead).
    """
    if isinstance(config, dict):
        config = AdapterConfig.from_dict(config)
    if not isinstance(peft_model, PeftModel):
        raise SecuraError("convert_peft_model needs a PeftModel; use apply_adapter for a base")
    adapter_name = adapter_name or peft_model.active_adapter
    method = get_plugin_manager().get_method(config.method)
    keep_4bit_layout(peft_model)
    if method.native_peft:
        if is_adapted(peft_model):
            return peft_model
        _promote(peft_model, config, adapter_name)
        return peft_model
    if is_adapted(peft_model) and peft_model.secura_config.method == config.method:
        return peft_model  # already converted (e.g. a model that carries a SECURA adapter)
    return _build(peft_model, config, method, adapter_name, init=True, data=data)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``trainable``, ``total`` and ``adapter`` (every adapter tensor, frozen C/R included).

    Packed 4-bit weights count their unpacked size, as PEFT does.
    """
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if type(param).__name__ == "Params4bit":
            n *= 2 * param.element_size()
        total += n
        if param.requires_grad:
            trainable += n
    adapter = 0
    if isinstance(model, SecuraModelMixin):
        for _, module in adapter_modules(model, model.secura_adapter_name):
            adapter += sum(t.numel() for t in module.state_dict().values())
    return {"trainable": trainable, "total": total, "adapter": adapter}


def adapter_stats(model: nn.Module) -> dict[str, float]:
    """Cheap adapter statistics for logging, as the adapter's method declares them
    (SECURA: merge count and mean S-MagNorm gate); empty for a model without an adapter."""
    config = getattr(model, "secura_config", None)
    return config.adapter_method.stats(model) if config is not None else {}


def load_adapter(
    base_model: nn.Module,
    path: str | os.PathLike,
    *,
    is_trainable: bool = False,
    check_base: bool = True,
    adapter_name: str = "default",
    scale: float | None = None,
) -> PeftModel:
    """Rebuild the adapter saved in ``path`` on ``base_model`` and return the ``PeftModel``.

    ``scale`` multiplies the learned update by that factor (0: the base, 1: the adapter
    as trained; see :func:`secura_plugins.keep.scale_update`).

    ``base_model`` is a fresh transformers model (dense or 4-bit). The adapter's layers,
    shapes, method and base fingerprint are checked; any mismatch raises
    :class:`~secura_plugins.errors.AdapterLoadError` with the reason.
    """
    folder = Path(path)
    meta = read_adapter_config(folder)
    block = meta["secura"]
    if isinstance(base_model, PeftModel):
        raise AdapterLoadError(
            "base_model is already a PeftModel; pass the plain transformers model "
            "(use model.load_adapter(path) to reload weights into an adapted model)"
        )
    try:
        config = AdapterConfig.from_saved(block["config"])
    except SecuraConfigError as err:
        raise AdapterLoadError(
            f"{folder}: its adapter config is not valid here ({err}). If it names a method from "
            "a plugin, install that plugin"
        ) from err
    method = get_plugin_manager().get_method(config.method)
    keep_4bit_layout(base_model)  # plain PEFT adapters skip _build, which does it too
    if method.native_peft:
        from peft import PeftConfig

        verified_weights(folder, block)  # PEFT would fall back to a pickle .bin

        peft_config = PeftConfig.from_peft_type(**{k: v for k, v in meta.items() if k != "secura"})
        model = PeftModel.from_pretrained(
            base_model,
            str(folder),
            adapter_name=adapter_name,
            is_trainable=is_trainable,
            config=peft_config,
        )
        _promote(model, config, adapter_name)
        return _scaled(model, scale)
    wanted = list(block["layers"])
    available = {n for n, _ in base_model.named_modules()}
    absent = [n for n in wanted if n not in available]
    if absent:
        raise AdapterLoadError(
            f"{folder} adapts {len(absent)} layer(s) this base does not have (first: {absent[0]}); "
            "it was made for another architecture"
        )
    for name, shape in block["layers"].items():
        layer = base_model.get_submodule(name)
        have = (getattr(layer, "in_features", None), getattr(layer, "out_features", None))
        if have != (shape["in_features"], shape["out_features"]):
            raise AdapterLoadError(
                f"{folder}: layer {name} is {have[0]} -> {have[1]} in this base but "
                f"{shape['in_features']} -> {shape['out_features']} in the adapter's base"
            )
    model = _inject(base_model, config, method, adapter_name, target_modules=wanted)
    model = _build(model, config, method, adapter_name, init=False)
    model = load_adapter_weights(model, folder, is_trainable=is_trainable, check_base=check_base)
    return _scaled(model, scale)


def _scaled(model: PeftModel, scale: float | None) -> PeftModel:
    if scale is not None:
        from .keep.interpolate import scale_update

        scale_update(model, scale)
    return model
