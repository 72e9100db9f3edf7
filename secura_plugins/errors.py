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


def did_you_mean(
    value: object, choices: list[str] | tuple[str, ...], aliases: dict[str, str] | None = None
) -> str:
    """``"did you mean 'x'? "`` for the closest of ``choices`` (or ``aliases[value]``), else ``""``.

    Example:
        >>> did_you_mean("lamda", ["lam", "r"], {"lambda": "lam"})
        "did you mean 'lam'? "
        >>> did_you_mean("lambda", ["lam", "r"], {"lambda": "lam"})
        "did you mean 'lam'? "
        >>> did_you_mean("zzz", ["lam", "r"])
        ''
    """
    import difflib

    alias = (aliases or {}).get(str(value))
    hint = [alias] if alias in choices else difflib.get_close_matches(str(value), choices, n=1)
    return f"did you mean {hint[0]!r}? " if hint else ""
