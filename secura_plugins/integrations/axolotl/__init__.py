"""Axolotl integration: ``adapter: secura`` as an axolotl plugin.

Put ``secura_plugins.integrations.axolotl.SecuraPlugin`` under ``plugins:`` in an
axolotl YAML; see ``README.md`` in this folder for a copy-paste config.
"""

from .args import ADAPTER_NAME, PLUGIN_PATH, SecuraArgs, SecuraSettings
from .plugin import SecuraPlugin

__all__ = ["ADAPTER_NAME", "PLUGIN_PATH", "SecuraArgs", "SecuraPlugin", "SecuraSettings"]
