"""Registries filled by the ``secura_register_*`` hooks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .methods.base import AdapterMethod


class MethodRegistry:
    """Adapter methods by name. Two plugins registering one name is an error."""

    def __init__(self) -> None:
        self._methods: dict[str, AdapterMethod] = {}

    def add(self, method: AdapterMethod) -> None:
        name = getattr(method, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"an adapter method needs a non-empty str .name, got {method!r}")
        if name in self._methods and type(self._methods[name]) is not type(method):
            raise ValueError(
                f"adapter method {name!r} is registered twice "
                f"({type(self._methods[name]).__qualname__} and {type(method).__qualname__}); "
                "uninstall or rename one of the plugins"
            )
        self._methods[name] = method

    def get(self, name: str) -> AdapterMethod:
        return self._methods[name]

    def names(self) -> list[str]:
        return sorted(self._methods)

    def __contains__(self, name: object) -> bool:
        return name in self._methods

    def __iter__(self) -> Iterator[AdapterMethod]:
        return iter(self._methods.values())


class ContinualRegistry:
    """Continual-learning mixin factories by name (``factory(**settings) -> mixin``)."""

    def __init__(self) -> None:
        self._factories: dict[str, Callable[..., Any]] = {}

    def add(self, name: str, factory: Callable[..., Any]) -> None:
        if name in self._factories and self._factories[name] is not factory:
            raise ValueError(f"continual mixin {name!r} is registered twice")
        self._factories[name] = factory

    def get(self, name: str) -> Callable[..., Any]:
        return self._factories[name]

    def names(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories
