"""EWC and replay as built-in pluggy plugins (``secura_register_continual``).

The plugin manager builds its continual registry from this hook, so the ``secura``
command and the recipes reach EWC and replay by name, exactly like a third-party mixin
registered through the ``secura_plugins`` entry-point group would be reached::

    factory = get_plugin_manager().continual.get("ewc")
    ewc = factory(lam=100.0, gamma=1.0)

Example:
    >>> from secura_plugins.continual.plugin import continual_registry
    >>> registry = continual_registry()
    >>> sorted(n for n in registry.names() if n in ("ewc", "replay"))
    ['ewc', 'replay']
    >>> registry.get("replay")(capacity=10, ratio=0.1)
    ReplayBuffer(capacity=10, ratio=0.1, size=0, seen=0)
"""

from __future__ import annotations

from typing import Any

from ..hookspecs import hookimpl
from .ewc import EWC
from .replay import ReplayBuffer


@hookimpl
def secura_register_continual(registry: Any) -> None:
    """Register ``ewc`` (:class:`EWC`) and ``replay`` (:class:`ReplayBuffer`)."""
    registry.add("ewc", EWC)
    registry.add("replay", ReplayBuffer)


def continual_registry() -> Any:
    """The plugin manager's continual registry (EWC, replay and any third-party mixin)."""
    from ..manager import get_plugin_manager

    return get_plugin_manager().continual
