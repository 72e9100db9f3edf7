"""Save, load and export adapters. Safetensors + JSON only; nothing is unpickled.

Format of an adapter folder:

* ``adapter_model.safetensors``: every tensor of the adapter (trainable cores, frozen C/R,
  SECURA's ``U_acc`` and merge count, SC-LoRA's initial factors, the chosen indices and a
  base fingerprint), keyed ``<layer path>.<container>.<tensor>``.
* ``adapter_config.json``: ``peft_type`` (``"SECURA"`` for this library's methods, so
  plain PEFT and ``axolotl merge-lora`` refuse loudly instead of merging wrongly;
  ``"LORA"`` for the PEFT baselines, which stay loadable by PEFT) and a ``secura`` block:
  the :class:`~secura_plugins.AdapterConfig`, the adapted layers and their shapes, the
  base model's identity and the SHA-256 of the tensor file.

Writes are atomic. A new folder (or one holding only an adapter) is written into a
hidden scratch folder beside it and renamed into place, so the folder holds the old
adapter or the new one, never a mix. Inside a folder with other content (a Trainer
checkpoint) each file is atomic (temp file, fsync, rename) and the config is written
last and names the tensor file's SHA-256, so an interrupted save is detected at load
time and never taken for a good adapter. Only safetensors and JSON are read: a folder
holding pickle files (``.bin``, ``.pt``) is refused, never unpickled.

Example:
    >>> import tempfile, torch
    >>> from secura_plugins import AdapterConfig, apply_adapter, save_adapter, load_adapter
    >>> from secura_plugins.tiny import build_tiny_model
    >>> model = apply_adapter(build_tiny_model(seed=1), AdapterConfig(r=4))
    >>> folder = save_adapter(model, tempfile.mkdtemp() + "/adapter")
    >>> again = load_adapter(build_tiny_model(seed=1), folder)
    >>> ids = torch.randint(0, 128, (1, 5))
    >>> torch.equal(model(ids).logits, again(ids).logits)
    True
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from ._fs import atomic_path, atomic_write_json, staged_dir
from ._version import __version__
from .config import AdapterConfig
from .errors import AdapterLoadError, ExportError, SecuraConfigError, SecuraError
from .faults import kill_point
from .layers import adapter_layers, adapter_modules, freeze_all_but_adapter, require_adapted
from .manager import get_plugin_manager
from .methods.base import CORE_ATTR, base_weight, fingerprint, fingerprint_match

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1
PEFT_TYPE = "SECURA"
#: Fingerprint cosine below which a base is taken for another model (4-bit vs dense ~0.99).
FINGERPRINT_MIN_COSINE = 0.9


# --------------------------------------------------------------------------- files
def _prepare_dir(path: Path, field: str = "output_dir") -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SecuraConfigError(
            field, f"cannot create {path}: {err.strerror}; choose a writable folder"
        ) from err
    if not os.access(path, os.W_OK):
        raise SecuraConfigError(field, f"{path} is not writable; choose a writable folder")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- save
def adapter_tensors(
    model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor of the adapter, keyed ``<layer>.<container>.<tensor>``.

    With ``state_dict`` (a full-model state dict, as ``Trainer`` passes under FSDP or
    DeepSpeed), tensors are taken from it where present.
    """
    out: dict[str, torch.Tensor] = {}
    for prefix, module in adapter_modules(model, adapter_name):
        layer_name, attr = prefix.rsplit(".", 1)
        for tname, tensor in module.state_dict().items():
            full = f"base_model.model.{layer_name}.{attr}.{adapter_name}.{tname}"
            if state_dict is not None and full in state_dict:
                tensor = state_dict[full]
            out[f"{prefix}.{tname}"] = tensor
    return out


def _base_identity(model: nn.Module) -> dict[str, Any]:
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    cfg = getattr(base, "config", None)
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
    return {k: getattr(cfg, k, None) for k in keys} | {
        "name_or_path": getattr(cfg, "_name_or_path", None) or None,
        "quantized": bool(getattr(base, "is_quantized", False)),
    }


def save_adapter(
    model: nn.Module, path: str | os.PathLike, *, state_dict: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write the adapter of ``model`` into folder ``path`` (created if needed) and return it.

    Refuses to write an adapter holding NaN or inf, naming the layer, so a diverged run
    never overwrites a good adapter.
    """
    config, adapter_name = require_adapted(model)
    target = Path(path)
    if _is_new_or_adapter_dir(target):
        _prepare_dir(target.parent)
        with staged_dir(target) as stage:
            _write_adapter(model, config, adapter_name, stage, state_dict)
        return target
    _write_adapter(model, config, adapter_name, _prepare_dir(target), state_dict)
    return target


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def _is_new_or_adapter_dir(path: Path) -> bool:
    """True for a missing or empty folder, or one holding only an adapter's two files."""
    if not path.exists():
        return True
    if not path.is_dir():
        return False
    return {p.name for p in path.iterdir()} <= {CONFIG_NAME, WEIGHTS_NAME}


def _write_adapter(
    model: nn.Module,
    config: AdapterConfig,
    adapter_name: str,
    folder: Path,
    state_dict: dict[str, torch.Tensor] | None,
) -> None:
    from safetensors.torch import save_file

    method = get_plugin_manager().get_method(config.method)
    block: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "version": __version__,
        "method": config.method,
        "adapter_name": adapter_name,
        "config": config.to_dict(),
        "base_model": _base_identity(model),
        "layers": {
            name: {
                "in_features": layer.get_base_layer().in_features,
                "out_features": layer.get_base_layer().out_features,
            }
            for name, layer in adapter_layers(model, adapter_name).items()
        },
    }
    if method.native_peft:
        # PEFT's own files (loadable by PeftModel), written into a scratch folder first.
        with tempfile.TemporaryDirectory(dir=folder, prefix=".peft-save-") as scratch:
            PeftModel.save_pretrained(
                model, scratch, selected_adapters=[adapter_name], state_dict=state_dict
            )
            src = Path(scratch) / ("" if adapter_name == "default" else adapter_name)
            meta = json.loads((src / CONFIG_NAME).read_text())
            _check_finite(_load_tensor_file(src / WEIGHTS_NAME))
            with atomic_path(folder / WEIGHTS_NAME) as tmp:
                shutil.copyfile(src / WEIGHTS_NAME, tmp)
    else:
        tensors = {
            k: v.detach().to("cpu").contiguous()
            for k, v in adapter_tensors(model, adapter_name, state_dict).items()
        }
        _check_finite(tensors)
        with atomic_path(folder / WEIGHTS_NAME) as tmp:
            save_file(tensors, str(tmp), {"format": "pt"})
        meta = {
            "peft_type": PEFT_TYPE,
            "base_model_name_or_path": block["base_model"]["name_or_path"],
        }
    block["tensors_sha256"] = _sha256(folder / WEIGHTS_NAME)
    meta["secura"] = block
    kill_point("adapter-weights")  # test-only crash point (see secura_plugins.faults)
    atomic_write_json(folder / CONFIG_NAME, meta)


def _check_finite(tensors: dict[str, torch.Tensor]) -> None:
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise SecuraError(
            f"the adapter holds NaN/inf in {len(bad)} tensor(s), first {bad[0]}; refusing to "
            "save it (training diverged: lower the learning rate or enable gradient clipping)"
        )


# --------------------------------------------------------------------------- load
def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``adapter_config.json`` of an adapter folder, checked for our ``secura`` block."""
    folder = Path(path)
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise AdapterLoadError(
            f"{folder} is not an adapter folder: {CONFIG_NAME} is missing (an interrupted save "
            "never gets this far; pass the folder that save_adapter wrote)"
        )
    try:
        meta = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterLoadError(
            f"{cfg_path} is not valid JSON ({err}); the file is corrupted"
        ) from err
    if not isinstance(meta, dict) or not isinstance(meta.get("secura"), dict):
        raise AdapterLoadError(
            f"{cfg_path} was not written by secura-plugins (no 'secura' block); load plain "
            "PEFT adapters with peft.PeftModel.from_pretrained"
        )
    block = meta["secura"]
    if block.get("format", 0) > FORMAT_VERSION:
        raise AdapterLoadError(
            f"{folder} uses adapter format {block['format']}, newer than this secura-plugins "
            f"({__version__}) reads; upgrade secura-plugins"
        )
    return meta


def verified_weights(folder: Path, block: dict[str, Any]) -> Path:
    """The folder's safetensors file, checked against the SHA-256 its config names."""
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        _refuse_pickle(folder)
        raise AdapterLoadError(f"{weights} is missing; the adapter folder is incomplete")
    expected_hash = block.get("tensors_sha256")
    if expected_hash and _sha256(weights) != expected_hash:
        raise AdapterLoadError(
            f"{weights} does not match {CONFIG_NAME} (SHA-256 differs): the save was "
            "interrupted or the file was altered; use an earlier checkpoint"
        )
    return weights


def _refuse_pickle(folder: Path) -> None:
    pickles = sorted(p.name for p in folder.glob("*") if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise AdapterLoadError(
            f"{folder} holds pickle weights ({pickles[0]}) and no {WEIGHTS_NAME}; "
            "secura-plugins reads safetensors only and never unpickles (pickle files can "
            "run code when loaded). Re-save the adapter with save_adapter"
        )


def _load_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        _refuse_pickle(path.parent)
        raise AdapterLoadError(f"{path} is missing; the adapter folder is incomplete")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterLoadError(f"{path} is corrupted or truncated ({err}); save it again") from err


def load_adapter_weights(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    is_trainable: bool = False,
    check_base: bool = True,
) -> nn.Module:
    """Load the tensors of the adapter folder ``path`` into ``model``'s existing adapter.

    Every key must be present with the right shape; ``check_base`` compares the stored
    fingerprints of the base weights with ``model``'s (cosine >= 0.9 per layer).
    """
    config, adapter_name = require_adapted(model)
    folder = Path(path)
    meta = read_adapter_config(folder)
    block = meta["secura"]
    method = get_plugin_manager().get_method(config.method)
    if block["method"] != config.method:
        raise AdapterLoadError(
            f"{folder} holds a {block['method']!r} adapter but the model carries "
            f"{config.method!r}; load it onto a fresh base with load_adapter"
        )
    tensors = _load_tensor_file(verified_weights(folder, block))
    if method.native_peft:
        from peft.utils import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, tensors, adapter_name=adapter_name)
        if result.unexpected_keys:
            raise AdapterLoadError(f"{folder}: unexpected tensors {result.unexpected_keys[:3]}")
    else:
        _copy_into(model, adapter_name, tensors, folder)
        if check_base:
            _check_fingerprints(model, adapter_name, folder)
    freeze_all_but_adapter(model, adapter_name, trainable=is_trainable)
    return model


def _copy_into(
    model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor], folder: Path
) -> None:
    targets = adapter_tensors(model, adapter_name)
    missing = sorted(set(targets) - set(tensors))
    unexpected = sorted(set(tensors) - set(targets))
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (first: {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
        raise AdapterLoadError(
            f"{folder} does not fit this model: {'; '.join(detail)}. Was it saved from another "
            "model or configuration?"
        )
    for key, target in targets.items():
        source = tensors[key]
        if source.shape != target.shape:
            raise AdapterLoadError(
                f"{folder}: {key} has shape {tuple(source.shape)} but this model needs "
                f"{tuple(target.shape)}; the adapter was made for a model of other sizes"
            )
        with torch.no_grad():
            target.copy_(source.to(device=target.device, dtype=target.dtype))


def _check_fingerprints(model: nn.Module, adapter_name: str, folder: Path) -> None:
    for name, layer in adapter_layers(model, adapter_name).items():
        cores = getattr(layer, CORE_ATTR, None)
        saved = getattr(cores[adapter_name], "fingerprint", None) if cores is not None else None
        if saved is None:
            continue
        cosine = fingerprint_match(saved, fingerprint(base_weight(layer)))
        if cosine < FINGERPRINT_MIN_COSINE:
            raise AdapterLoadError(
                f"{folder} was trained on another base model: the weights of {name} do not match "
                f"(fingerprint cosine {cosine:.2f} < {FINGERPRINT_MIN_COSINE}). Load it onto the "
                "base it was trained on, or pass check_base=False if you know better"
            )


# --------------------------------------------------------------------------- export
@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a scratch folder beside ``path``; rename it to ``path`` on success only."""
    if path.exists() and any(path.iterdir()):
        raise ExportError(f"{path} exists and is not empty; choose a new output folder")
    _prepare_dir(path.parent)
    with staged_dir(path) as scratch:
        yield scratch
