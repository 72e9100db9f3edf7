"""The pluggy contract of secura-plugins.

Every adapter method and continual-learning mixin, the built-in ones included, is an
ordinary pluggy plugin implementing these hooks. Hosts (the TRL callback, the axolotl
plugin, the ``secura`` command) talk to methods only through them.

A third-party package adds a method without touching this package: it implements
``secura_register_methods`` and declares the module in its ``pyproject.toml``::

    [project.entry-points.secura_plugins]
    my_method = "my_package.secura_plugin"

Example (an in-process plugin):
    >>> from secura_plugins import get_plugin_manager, hookimpl
    >>> from secura_plugins.methods.lora import LoraMethod
    >>> class MyPlugin:
    ...     @hookimpl
    ...     def secura_register_methods(self, registry):
    ...         registry.add(LoraMethod(name="my-lora"))
    >>> pm = get_plugin_manager()
    >>> _ = pm.register(MyPlugin())
    >>> "my-lora" in pm.method_names()
    True
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from .registry import ContinualRegistry, MethodRegistry

PROJECT = "secura"
ENTRY_POINT_GROUP = "secura_plugins"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def secura_register_methods(registry: MethodRegistry) -> None:
    """Add adapter methods with ``registry.add(method)``.

    Called by the plugin manager whenever its method table is (re)built: at start-up
    and after a plugin is registered. ``method`` is an
    :class:`~secura_plugins.methods.base.AdapterMethod`. All implementations run.
    """


@hookspec
def secura_register_continual(registry: ContinualRegistry) -> None:
    """Add continual-learning mixins (EWC, replay, ...) with ``registry.add(name, factory)``.

    Same calling rule as ``secura_register_methods``.
    """


@hookspec
def secura_adapter_applied(model: Any, config: Any) -> None:
    """Called after an adapter was built on ``model`` (apply, convert or load).

    ``model`` is the ``peft.PeftModel``; ``config`` the
    :class:`~secura_plugins.config.AdapterConfig`. All implementations run; for
    logging or extra set-up, never to replace the model.
    """


@hookspec
def secura_step_end(model: Any, step: int) -> dict[str, float] | None:
    """Hosts call this after every optimizer step, with the global step (1-based).

    Methods do their periodic work here (SECURA's M1/M2 merges) and may return
    metrics to log. All implementations run; the host merges the returned dicts.
    """
