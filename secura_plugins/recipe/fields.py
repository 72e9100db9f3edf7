"""Validation helpers of the recipe schema: every error names the field by its path.

Suggestions come from :func:`secura_plugins.errors.did_you_mean` (the one "did you mean"
of the package).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..errors import SecuraConfigError, did_you_mean


def _unknown(path: str, key: str, known: list[str], what: str = "field") -> SecuraConfigError:
    fix = did_you_mean(key, known)
    name = f"{path}.{key}" if path else str(key)
    return SecuraConfigError(name, f"unknown {what}; {fix}valid: {', '.join(known)}")


def _mapping(value: Any, path: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SecuraConfigError(path, f"must be a mapping (key: value), got {type(value).__name__}")
    return dict(value)


def _check_keys(data: Mapping[str, Any], path: str, known: list[str]) -> None:
    for key in data:
        if key not in known:
            raise _unknown(path, key, known)


def _int(value: Any, path: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SecuraConfigError(path, f"must be an integer >= {minimum}, got {value!r}")
    return value


def _str(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise SecuraConfigError(path, f"must be a non-empty string, got {value!r}")
    return value


def _reprefix(err: SecuraConfigError, prefix: str) -> SecuraConfigError:
    message = str(err)[len(err.field) + 2 :] if str(err).startswith(f"{err.field}: ") else str(err)
    return SecuraConfigError(f"{prefix}.{err.field}", message)


def _continual_block(continual: dict[str, Any], name: str, known: list[str]) -> dict | None:
    if continual.get(name) is None:
        return None
    block = _mapping(continual[name], f"continual.{name}")
    _check_keys(block, f"continual.{name}", known)
    for key, value in block.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SecuraConfigError(f"continual.{name}.{key}", f"must be a number, got {value!r}")
    return block


_SFT_FIELDS: list[str] | None = None


def _check_training(block: dict[str, Any], path: str) -> None:
    """Unknown ``SFTConfig`` keys are named with a suggestion (needs trl installed)."""
    global _SFT_FIELDS
    if not block:
        return
    if _SFT_FIELDS is None:
        try:
            from trl import SFTConfig
        except ImportError:  # validated later, when the run starts
            return
        _SFT_FIELDS = sorted(f.name for f in dataclasses.fields(SFTConfig))
    for key in block:
        if key == "output_dir":
            raise SecuraConfigError(f"{path}.output_dir", "set it in run.output_dir instead")
        if key not in _SFT_FIELDS:
            fix = did_you_mean(key, _SFT_FIELDS)
            raise SecuraConfigError(f"{path}.{key}", f"not a trl.SFTConfig field; {fix}".strip())
