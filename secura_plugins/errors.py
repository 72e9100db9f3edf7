"""Exceptions raised by secura-plugins. Each message names what was wrong and the fix."""

from __future__ import annotations


class SecuraError(Exception):
    """Base class of every error this library raises on purpose."""


class SecuraConfigError(SecuraError, ValueError):
    """A configuration field has a bad value. The message names the field and the fix."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class AdapterLoadError(SecuraError, ValueError):
    """A saved adapter cannot be loaded onto the given base (corrupt, incomplete, mismatched)."""


class ExportError(SecuraError, RuntimeError):
    """A merged checkpoint cannot be written faithfully."""


class TrainingDivergedError(SecuraError, RuntimeError):
    """The loss or an adapter tensor became NaN/inf; training stopped before saving it."""
