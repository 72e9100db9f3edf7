"""Loading a base model and its tokenizer: one place for every caller.

``secura train`` (recipes), ``secura eval`` / ``secura forgetting`` and the real-model
lab all load their base through :func:`load_base`, so that a 4-bit base is quantized
with the same NF4 config (:func:`secura_plugins.quant.nf4_config`) and the same layout
(:func:`secura_plugins.quant.keep_4bit_layout`) everywhere: an adapter trained by one
command is scored on the very same weights by another. Names go through
:func:`secura_plugins.real_model.resolve_model_path` (``smollm2`` is the offline
SmolLM2-135M-Instruct).

Example:
    >>> import tempfile
    >>> from secura_plugins.loading import load_base, load_tokenizer
    >>> from secura_plugins.tiny import save_tiny_checkpoint
    >>> folder = tempfile.mkdtemp()
    >>> _ = save_tiny_checkpoint(folder, "llama")
    >>> load_base(folder).training, load_tokenizer(folder).pad_token is not None
    (False, True)
"""

from __future__ import annotations

from typing import Any

from .errors import SecuraConfigError

__all__ = ["load_base", "load_tokenizer"]


def load_base(
    path_or_name: str,
    *,
    load_in_4bit: bool = False,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    on_gpu: bool | None = None,
    field: str = "load_in_4bit",
):
    """The causal LM at ``path_or_name`` in eval mode, dense in ``dtype`` or in NF4.

    Args:
        load_in_4bit: quantize the linear layers to NF4 while loading (bitsandbytes);
            the layers keep the layout the adapters expect (``keep_4bit_layout``).
        dtype: ``float32``, ``bfloat16`` or ``float16`` (the NF4 compute dtype too).
        on_gpu: place the model on the current CUDA device when there is one. ``None``
            (default) does so only for a 4-bit base (bitsandbytes quantizes while
            placing); a dense base to be trained stays where the Trainer moves it.
        field: the setting named by the error when bitsandbytes is missing.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from .quant import keep_4bit_layout, nf4_config
    from .real_model import resolve_model_path

    kwargs: dict[str, Any] = {
        "dtype": getattr(torch, dtype),
        "trust_remote_code": trust_remote_code,
    }
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if load_in_4bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            off = f"drop {field}" if field.startswith("-") else f"set {field}: false"
            raise SecuraConfigError(
                field,
                "4-bit loading needs bitsandbytes, which is not installed; "
                f"pip install 'bitsandbytes>=0.45', or {off}",
            ) from None
        kwargs["quantization_config"] = nf4_config(dtype)
    if (load_in_4bit if on_gpu is None else on_gpu) and torch.cuda.is_available():
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(path_or_name), **kwargs)
    keep_4bit_layout(model)  # a no-op for a dense model
    return model.eval()


def load_tokenizer(path_or_name: str, *, trust_remote_code: bool = False):
    """The tokenizer at ``path_or_name``, with a pad token (the eos one when it has none)."""
    from transformers import AutoTokenizer

    from .real_model import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_path(path_or_name), trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
