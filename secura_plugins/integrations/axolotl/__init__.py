"""Axolotl integration: ``adapter: secura`` as an axolotl plugin.

Put ``secura_plugins.integrations.axolotl.SecuraPlugin`` under ``plugins:`` in an
axolotl YAML; see ``README.md`` in this folder for a copy-paste config. Importing this
package does not import axolotl; ``SecuraPlugin`` (which subclasses axolotl's
``BasePlugin``) is loaded on first access.
"""

from typing import Any

from .args import ADAPTER_NAME, PLUGIN_PATH, SecuraArgs, SecuraSettings

__all__ = ["ADAPTER_NAME", "PLUGIN_PATH", "SecuraArgs", "SecuraPlugin", "SecuraSettings"]


def __getattr__(name: str) -> Any:
    if name == "SecuraPlugin":
        from .plugin import SecuraPlugin

        return SecuraPlugin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
