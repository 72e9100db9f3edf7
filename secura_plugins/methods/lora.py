"""The baselines: PEFT's own LoRA and DoRA, on the same targets, for comparison.

They are plain PEFT adapters (saved in PEFT's format, loadable by ``PeftModel``), run
through the same API as the other methods so the lab compares like with like.
"""

from __future__ import annotations

from typing import Any

from ..hookspecs import hookimpl
from .base import AdapterMethod


class LoraMethod(AdapterMethod):
    """PEFT LoRA (``use_dora=False``) or DoRA (``use_dora=True``)."""

    native_peft = True

    def __init__(self, name: str = "lora", *, use_dora: bool = False) -> None:
        self.name = name
        self.use_dora = use_dora
        #: DoRA's learned magnitude is not an additive update.
        self.scalable_update = not use_dora

    def lora_config_kwargs(self, config: Any) -> dict[str, Any]:
        return {"use_dora": self.use_dora}

    def attach(self, layer: Any, adapter_name: str, config: Any, **kwargs: Any) -> None:
        return None  # PEFT built everything


@hookimpl
def secura_register_methods(registry: Any) -> None:
    registry.add(LoraMethod("lora"))
    registry.add(LoraMethod("dora", use_dora=True))
