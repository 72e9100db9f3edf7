"""The plugin manager: built-in methods plus third-party plugins from entry points."""

from __future__ import annotations

import functools
from typing import Any

import pluggy

from . import hookspecs
from .registry import ContinualRegistry, MethodRegistry

#: Modules of the built-in plugins, registered like any third-party one.
BUILTIN_PLUGINS = (
    "secura_plugins.methods.secura",
    "secura_plugins.methods.curlora",
    "secura_plugins.methods.sclora",
    "secura_plugins.methods.lora",
    "secura_plugins.continual.plugin",
)


class SecuraPluginManager(pluggy.PluginManager):
    """A ``pluggy.PluginManager`` that also keeps the method and mixin tables."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self._methods: MethodRegistry | None = None
        self._continual: ContinualRegistry | None = None

    def register(self, plugin: Any, name: str | None = None) -> str | None:
        self._methods = self._continual = None  # rebuilt on next use
        return super().register(plugin, name)

    def unregister(self, plugin: Any = None, name: str | None = None) -> Any:
        self._methods = self._continual = None
        return super().unregister(plugin, name)

    @property
    def methods(self) -> MethodRegistry:
        """Every registered adapter method."""
        if self._methods is None:
            registry = MethodRegistry()
            self.hook.secura_register_methods(registry=registry)
            self._methods = registry
        return self._methods

    @property
    def continual(self) -> ContinualRegistry:
        """Every registered continual-learning mixin."""
        if self._continual is None:
            registry = ContinualRegistry()
            self.hook.secura_register_continual(registry=registry)
            self._continual = registry
        return self._continual

    def method_names(self) -> list[str]:
        return self.methods.names()

    def get_method(self, name: str):
        """The :class:`~secura_plugins.methods.base.AdapterMethod` called ``name``."""
        if name not in self.methods:
            raise KeyError(
                f"unknown adapter method {name!r}; known: {', '.join(self.method_names())}"
            )
        return self.methods.get(name)


@functools.cache
def get_plugin_manager() -> SecuraPluginManager:
    """The process-wide plugin manager (built-ins + the ``secura_plugins`` entry points)."""
    import importlib

    pm = SecuraPluginManager()
    for module_name in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
    pm.load_setuptools_entrypoints(hookspecs.ENTRY_POINT_GROUP)
    return pm
