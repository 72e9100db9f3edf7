"""Keep what the base knew without its data: self-rehearsal, a KL anchor, interpolation.

* :func:`~secura_plugins.keep.rehearsal.generate_rehearsal`: the model with its adapter
  disabled writes rehearsal examples in the task's shapes and in generic shapes.
* :class:`Keep`: mixes them into a Trainer's data and adds
  ``kl_lambda * KL(p_base || p_model)`` to its loss (logged as ``keep/kl``); reached
  through ``SecuraCallback(keep=...)``, ``SecuraSFTTrainer(keep=...)``, the axolotl
  plugin's ``secura: {keep: ...}`` and the recipes' ``keep:``.
* :func:`scale_update`: scale a trained update by ``alpha`` (``secura merge --scale``).

The ``keep`` preset (:data:`KEEP_PRESETS`) is the library's recommendation.
"""

from .config import KEEP_PRESETS, KeepConfig
from .interpolate import scale_update
from .kl import TeacherCache, kl_full, kl_topk
from .rehearsal import REHEARSAL_FILE, generate_rehearsal, load_rehearsal
from .runtime import Keep

__all__ = [
    "KEEP_PRESETS",
    "REHEARSAL_FILE",
    "Keep",
    "KeepConfig",
    "TeacherCache",
    "generate_rehearsal",
    "kl_full",
    "kl_topk",
    "load_rehearsal",
    "scale_update",
]
