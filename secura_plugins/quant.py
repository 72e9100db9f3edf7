"""bitsandbytes 4-bit: the one NF4 config, and the CPU repacking guard.

**The NF4 config.** :func:`nf4_config` is the only place a ``BitsAndBytesConfig`` is
built (recipes, ``secura eval --load-in-4bit``, the axolotl plugin), so a base is scored
on exactly the weights it was trained on.

**Upstream behaviour (bitsandbytes 0.50).** On a CPU with AVX512-BF16,
``Linear4bit.forward`` in eval mode with an input that does not require grad (any
``torch.no_grad()`` evaluation: the Trainer's eval loop, a retention probe, ``generate``)
*repacks the NF4 weight in place* into a CPU kernel layout
(``bitsandbytes.functional._convert_weight_packed_for_cpu``) and sets
``quant_state.packing_format_for_cpu = True``. Afterwards:

* ``dequantize_4bit`` (PEFT's ``dequantize_module_weight``, merges, fingerprints, C/R
  selection) reads the packed bytes as if they were the usual layout: garbage (relative
  error ~1.4);
* every later forward, in training too, takes ``gemv_4bit``, which has no autograd: no
  gradient flows through the layer, so the layers before it stop learning, silently;
* the repack is lossy: the block scales are rounded to bfloat16 and double-quantization
  statistics are expanded, so no inverse gives back the original bytes; and
  ``_convert_weight_packed_for_cpu_inverse`` leaves non-nested block scales transposed
  (relative error ~2% after "unpacking" a base loaded without double quantization).

**What this library does.** :func:`keep_4bit_layout` turns the repack off per layer
(``support_avx512bf16_for_cpu = False``) on every ``Linear4bit`` of a model the library
adapts (``apply_adapter``, ``convert_peft_model`` for TRL/PEFT QLoRA models,
``load_adapter``, the axolotl plugin) and on the bases it loads itself. Preventing the
repack, rather than undoing it on each read, is the choice because the repack is lossy
and breaks autograd: a prevented layer keeps the user's exact weights and trains with the
gradients of the standard path; the cost is bitsandbytes' faster CPU inference kernel.
A layer that was repacked *before* the library saw it (``base.eval()`` + a no-grad
forward on the bare base) is brought back with bitsandbytes' own inverse, with the
transposed-scale fix, keeping the bfloat16 scales the repacked layer computed with (so
its values are the ones the user's evaluation saw), and a warning says so. Readers of a
base weight go through :func:`dequantized_weight`, which unpacks a copy, never the layer.

Example:
    >>> import torch
    >>> from secura_plugins.quant import nf4_config
    >>> nf4_config(torch.float32).bnb_4bit_quant_type
    'nf4'
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


def nf4_config(compute_dtype: torch.dtype | str, overrides: dict[str, Any] | None = None):
    """The NF4 ``BitsAndBytesConfig`` used everywhere: axolotl's ``qlora`` settings.

    NF4, double quantization, compute in ``compute_dtype``, bfloat16 storage (what
    axolotl uses so FSDP can shard the packed weights; the stored values do not depend
    on it). ``overrides`` are extra ``BitsAndBytesConfig`` fields (axolotl's
    ``bnb_config_kwargs``) and win over these defaults.
    """
    from transformers import BitsAndBytesConfig

    if isinstance(compute_dtype, str):
        compute_dtype = getattr(torch, compute_dtype)
    kwargs: dict[str, Any] = {
        "load_in_4bit": True,
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_quant_storage": torch.bfloat16,
    }
    kwargs.update(dict(overrides or {}))
    return BitsAndBytesConfig(**kwargs)


def is_cpu_packed(module: nn.Module) -> bool:
    """True when bitsandbytes repacked ``module``'s 4-bit weight into its CPU layout."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def _unpack(data: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
    """bitsandbytes' inverse of the CPU repack, keeping the repacked layer's values.

    ``original_nested`` is cleared so the bfloat16 scales are not quantized a second
    time, and the scales the inverse leaves transposed are put back in block order.
    """
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    state.original_nested = False
    data, state = _convert_weight_packed_for_cpu_inverse(data, state)
    if state.absmax.dim() == 2:  # [K / blocksize, N] -> blocks in row-major order
        state.absmax = state.absmax.T.reshape(-1).to(torch.float32).contiguous()
    return data, state


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """``module``'s weight as a dense tensor, whatever layout bitsandbytes left it in.

    A CPU-repacked 4-bit weight is unpacked on a copy; the module is not touched.
    """
    from peft.utils.integrations import dequantize_module_weight

    if not is_cpu_packed(module):
        return dequantize_module_weight(module)
    from bitsandbytes.functional import dequantize_4bit

    data, state = _unpack(module.weight.data.clone(), copy.deepcopy(module.weight.quant_state))
    return dequantize_4bit(data, state)


def keep_4bit_layout(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking ``model``'s 4-bit layers for its CPU kernel.

    Call it right after loading a 4-bit base if you evaluate the bare base before
    adapting it (the library calls it when it adapts or loads a model). Layers already
    repacked are unpacked with bitsandbytes' inverse (see the module docstring).
    Returns how many layers had to be unpacked.

    Example:
        >>> from secura_plugins.tiny import build_tiny_model
        >>> keep_4bit_layout(build_tiny_model())  # a dense model: nothing to do
        0
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        return 0
    unpacked = 0
    for module in model.modules():
        if not isinstance(module, Linear4bit):
            continue
        module.support_avx512bf16_for_cpu = False
        if is_cpu_packed(module):
            data, state = _unpack(module.weight.data, module.weight.quant_state)
            module.weight.data, module.weight.quant_state = data, state
            module.quant_state = state
            unpacked += 1
    if unpacked:
        logger.warning(
            "bitsandbytes had repacked %d 4-bit layers for its AVX512-BF16 CPU inference kernel "
            "(a no-grad forward in eval mode before the adapter was applied); they were unpacked "
            "with bitsandbytes' inverse and keep the bfloat16 block scales that repack rounded "
            "them to. Call secura_plugins.quant.keep_4bit_layout(model) right after loading to "
            "keep the base's exact weights",
            unpacked,
        )
    return unpacked
