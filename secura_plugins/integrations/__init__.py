"""Host integrations. Each imports its host lazily, so ``import secura_plugins`` stays light.

``from secura_plugins.integrations import SecuraCallback`` imports the TRL/transformers
integration on first use (see :mod:`secura_plugins.integrations.trl`).
"""

from __future__ import annotations

from typing import Any

_TRL_EXPORTS = (
    "ContinualTrainerMixin",
    "EWCTrainerMixin",
    "SecuraCallback",
    "SecuraSFTTrainer",
    "consolidate_ewc",
)

__all__ = list(_TRL_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _TRL_EXPORTS:
        from . import trl

        return getattr(trl, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
