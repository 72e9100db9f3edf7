"""Adapter methods: one module per method; each module is a pluggy plugin."""

from .base import AdapterMethod, FrozenLinear
from .curlora import CURLoRAMethod
from .lora import LoraMethod
from .sclora import SCLoRAMethod, SCLoRAOptions
from .secura import SecuraMethod
from .secura_options import SecuraOptions

__all__ = [
    "AdapterMethod",
    "CURLoRAMethod",
    "FrozenLinear",
    "LoraMethod",
    "SCLoRAMethod",
    "SCLoRAOptions",
    "SecuraMethod",
    "SecuraOptions",
]
