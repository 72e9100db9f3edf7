"""Putting the adapter on a ``Trainer``'s model (``SecuraCallback.on_init_end``).

Three starting points are accepted: a plain model (``apply_adapter``; the Trainer's
``model`` is swapped for the ``PeftModel``), a ``PeftModel`` that TRL built from
``peft_config=LoraConfig(...)`` (converted in place with ``convert_peft_model``; the path
for a 4-bit base, which ``Trainer`` refuses without PEFT), or a model that already
carries a secura adapter (used as is). New tensors are created in the adapter dtype
(fp32 by default), also on 4-bit bases where TRL casts LoRA weights to bf16.

Example:
    >>> print(as_config({"method": "lora", "r": 4}).r)
    4
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from ...config import AdapterConfig
from ...errors import SecuraConfigError, SecuraError
from ...model import apply_adapter, convert_peft_model, is_adapted

logger = logging.getLogger(__name__)

__all__ = ["adapt_model", "as_config", "as_keep", "keep_calibration", "restore_adapter_dtype"]


def as_config(config: AdapterConfig | Mapping[str, Any] | None) -> AdapterConfig | None:
    """``config`` as an ``AdapterConfig`` (None stays None)."""
    if config is None or isinstance(config, AdapterConfig):
        return config
    if isinstance(config, Mapping):
        return AdapterConfig.from_dict(dict(config))
    raise SecuraConfigError(
        "config", f"must be an AdapterConfig or a dict of its fields, got {type(config).__name__}"
    )


def as_keep(keep: Any) -> Any:
    """``keep`` as a :class:`~secura_plugins.keep.Keep` (None/False: None)."""
    if keep is None or keep is False:
        return None
    from ...keep import Keep

    return keep if isinstance(keep, Keep) else Keep(keep)


def keep_calibration(keep: Any, model: nn.Module, trainer: Any) -> dict[str, Any]:
    """SC-LoRA's ``negative=`` (the self-rehearsal rows) and ``positive=`` (task rows)
    calibration batches for a run with ``keep`` and no privileged data."""
    if trainer is None:
        raise SecuraError("keep with sclora: bind the callback to its Trainer first")
    tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
    keep.ensure_rows(model, tokenizer, trainer.train_dataset, run_dir=trainer.args.output_dir)
    rows = trainer.train_dataset.select(range(min(64, len(trainer.train_dataset))))
    positive = [
        {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids))}
        for ids in rows["input_ids"]
    ]
    return {"negative": keep.negative_batches(tokenizer), "positive": positive}


def adapt_model(
    model: nn.Module,
    config: AdapterConfig | None,
    *,
    trainer: Any,
    args: Any,
    adapter_data: Mapping[str, Any],
) -> tuple[nn.Module, AdapterConfig, bool]:
    """``(adapted model, config in force, whether the model carried the adapter)``.

    ``config`` None means: the model's own adapter, or ``AdapterConfig()`` (SECURA). A
    plain model is wrapped and swapped into ``trainer`` (which must then be known).
    """
    if is_adapted(model):
        carried = model.secura_config
        if config is not None and config.method != carried.method:
            raise SecuraConfigError(
                "method",
                f"the model already carries a {carried.method!r} adapter but the callback "
                f"asks for {config.method!r}; pass the base model, or drop the config",
            )
        if config is not None and config.to_dict() != carried.to_dict():
            logger.warning("the model's own adapter settings are used: %s", carried)
        return model, carried, True
    config = config or AdapterConfig()
    if isinstance(model, PeftModel):
        # TRL's peft_config path (and the only way to train a 4-bit base).
        return convert_peft_model(model, config, **adapter_data), config, False
    if trainer is None:
        raise SecuraError(
            "SecuraCallback could not find its Trainer to swap in the adapted model. "
            "Pass apply_adapter(model, config) as the model, or call callback.bind(trainer)"
        )
    peft_model = apply_adapter(model, config, **adapter_data)
    trainer.model = trainer.model_wrapped = peft_model
    trainer.callback_handler.model = peft_model
    if getattr(args, "gradient_checkpointing", False):
        peft_model.enable_input_require_grads()
    return peft_model, config, False


def restore_adapter_dtype(
    model: nn.Module,
    config: AdapterConfig | None,
    saved: Mapping[str, torch.Tensor] | None,
    *,
    carried: bool,
) -> None:
    """Undo TRL's bf16 cast of trainable tensors on quantized bases.

    ``SFTTrainer.__init__`` casts every trainable parameter of a 4/8-bit model to
    bf16 before any callback runs. Tensors the callback creates come later and are
    unaffected; an adapter the model already carried was rounded. The mixin
    (``SecuraSFTTrainer``) snapshots those tensors first (``saved``) and they are
    restored exactly; otherwise they are cast back to the adapter dtype with a warning.
    """
    saved = saved or {}
    dtype = getattr(torch, config.adapter_dtype if config else "float32")
    rounded = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name in saved and saved[name].shape == param.shape:
            param.data = saved[name].to(param.device)
        elif param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            rounded.append(name)
    if rounded and carried:
        logger.warning(
            "TRL cast %d trainable adapter tensors of this quantized model to bf16 before the "
            "callback ran (first: %s); they are back in %s but were rounded. Use "
            "SecuraSFTTrainer (or pass the base with peft_config=) to keep them exact",
            len(rounded),
            rounded[0],
            dtype,
        )
