"""Per-method options: the base class, the field helper and the value checks.

Every adapter method owns a small dataclass of its own settings (SECURA's
:class:`~secura_plugins.methods.secura_options.SecuraOptions`, SC-LoRA's
:class:`~secura_plugins.methods.sclora.SCLoRAOptions`, ...), subclassing
:class:`MethodOptions` and declaring each field with :func:`option`. The metadata of those
fields (help text, choices, bounds, aliases) is the single source of the checks, the
``secura:`` schema of the axolotl plugin and the help of the ``secura`` command. The
settings every method shares (``r``, ``target_modules``, ...) stay in
:class:`~secura_plugins.AdapterConfig`.

This module imports nothing heavy (no torch), so configs can be read and checked cheaply.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class MyOptions(MethodOptions):
    ...     temperature: float = option("Softmax temperature.", 1.0, low=0.0, low_open=True)
    >>> MyOptions(temperature=0.5).temperature
    0.5
    >>> MyOptions(temperature=0)
    Traceback (most recent call last):
    ...
    secura_plugins.errors.SecuraConfigError: temperature: must be in (0.0, got 0
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import SecuraConfigError, did_you_mean

if TYPE_CHECKING:  # pragma: no cover
    from dataclasses import Field


def option(
    help: str,
    default: Any = MISSING,
    *,
    factory: Any = MISSING,
    choices: tuple[str, ...] | None = None,
    integer: bool = False,
    minimum: int | None = None,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    flag: bool = False,
    optional: bool = False,
    aliases: tuple[str, ...] = (),
) -> Any:
    """A dataclass field whose metadata says what it means and which values it takes.

    ``choices``: one of these strings; ``integer``: an int >= ``minimum``; ``low``/``high``
    (open or closed): a number in that range; ``flag``: true or false; ``optional``: None
    is allowed too. ``aliases``: other spellings users bring (answered with "did you mean").
    """
    meta = {
        "help": help,
        "choices": choices,
        "integer": integer,
        "minimum": minimum,
        "low": low,
        "high": high,
        "low_open": low_open,
        "high_open": high_open,
        "flag": flag,
        "optional": optional,
        "aliases": aliases,
    }
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def check_value(name: str, value: Any, meta: Any) -> Any:
    """Check ``value`` against :func:`option` metadata; return it (YAML's bare ``off``,
    read as false, becomes ``'off'`` for a field with that choice)."""
    if value is None and meta.get("optional"):
        return value
    choices = meta.get("choices")
    if choices:
        if value is False and "off" in choices:
            return "off"
        check_choice(name, value, choices)
    elif meta.get("integer"):
        check_int(name, value, minimum=meta.get("minimum") or 0)
    elif meta.get("flag"):
        if not isinstance(value, bool):
            raise SecuraConfigError(name, f"must be true or false, got {value!r}")
    elif meta.get("low") is not None or meta.get("high") is not None:
        check_number(
            name,
            value,
            low=meta.get("low"),
            high=meta.get("high"),
            low_open=meta.get("low_open", False),
            high_open=meta.get("high_open", False),
        )
    return value


@dataclass
class MethodOptions:
    """Base class of a method's own options (a dataclass of :func:`option` fields).

    Values are checked on construction from the fields' metadata; :meth:`check` sees
    the whole :class:`~secura_plugins.AdapterConfig` for checks across fields (SECURA's
    ``k >= r``). ``saved_defaults`` are values that reproduce adapters saved before a
    field existed (a saved config without the field loads with this value, not today's
    default).
    """

    saved_defaults: ClassVar[dict[str, Any]] = {}

    def __post_init__(self) -> None:
        for f in fields(self):
            value = check_value(f.name, getattr(self, f.name), f.metadata)
            object.__setattr__(self, f.name, value)

    def check(self, config: Any) -> None:
        """Checks that need the common settings (``config.r`` ...); raise
        :class:`~secura_plugins.errors.SecuraConfigError` naming the field."""

    @classmethod
    def option_fields(cls) -> tuple[Field[Any], ...]:
        return fields(cls)

    @classmethod
    def describe(cls) -> dict[str, str]:
        """Option name -> help text."""
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}

    @classmethod
    def aliases(cls) -> dict[str, str]:
        """Other spellings -> option name."""
        return {a: f.name for f in fields(cls) for a in f.metadata.get("aliases", ())}


def check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SecuraConfigError(name, f"must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise SecuraConfigError(name, f"must be an integer >= {minimum}, got {value}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        fix = did_you_mean(value, choices)
        raise SecuraConfigError(name, f"got {value!r}; {fix}choose one of {', '.join(choices)}")


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise SecuraConfigError(name, f"must be a number, got {value!r}")
    lo_ok = low is None or (value > low if low_open else value >= low)
    hi_ok = high is None or (value < high if high_open else value <= high)
    if not (lo_ok and hi_ok):
        lo = "" if low is None else ("(" if low_open else "[") + str(low)
        hi = "" if high is None else str(high) + (")" if high_open else "]")
        span = f"{lo}, {hi}" if low is not None and high is not None else (lo or hi)
        raise SecuraConfigError(name, f"must be in {span}, got {value}")
