"""TRL / transformers ``Trainer`` integration: one callback, plus a trainer mixin.

``SecuraCallback`` gives a ``trl.SFTTrainer`` (or any ``transformers.Trainer``)
forgetting-resistant training by adding one callback::

    trainer = SFTTrainer(model, args=SFTConfig(...), train_dataset=ds,
                         callbacks=[SecuraCallback(AdapterConfig(method="secura", r=16))])

This module is the entry point; the code lives by concern in
:mod:`secura_plugins.integrations.trainer`:

* :mod:`~secura_plugins.integrations.trainer.callback`: ``SecuraCallback`` (what it does
  at each ``Trainer`` event);
* :mod:`~secura_plugins.integrations.trainer.mixin`: ``ContinualTrainerMixin`` /
  ``SecuraSFTTrainer`` (EWC as a loss term, replay mixing; a table there says which
  path each continual feature takes);
* :mod:`~secura_plugins.integrations.trainer.checkpoint`: the files added to each
  checkpoint, completeness (``last_complete_checkpoint``) and the sharding policy;
* :mod:`~secura_plugins.integrations.trainer.state`: what the callback and the mixin
  share, and how the callback finds its ``Trainer`` (``callback.bind(trainer)`` for a
  host that drives callbacks differently);
* :mod:`secura_plugins.continual.consolidate`: ``consolidate_ewc`` (end of a task).

Example (runs on CPU in a few seconds):
    >>> import tempfile
    >>> from datasets import Dataset
    >>> from trl import SFTConfig, SFTTrainer
    >>> from secura_plugins import AdapterConfig
    >>> from secura_plugins.integrations.trl import SecuraCallback
    >>> from secura_plugins.tiny import build_tiny_model, build_tokenizer
    >>> tok = build_tokenizer()
    >>> ds = Dataset.from_dict({"text": [f"{i}+{i}={2 * i}" for i in range(16)]})
    >>> args = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=2, report_to="none",
    ...                  per_device_train_batch_size=4, use_cpu=True, disable_tqdm=True,
    ...                  save_strategy="no")
    >>> cb = SecuraCallback(AdapterConfig(method="secura", r=4, merge_every=1))
    >>> trainer = SFTTrainer(build_tiny_model(vocab_size=len(tok)), args=args,
    ...                      train_dataset=ds, processing_class=tok, callbacks=[cb])
    >>> type(trainer.model).__name__
    'SecuraPeftModelForCausalLM'
    >>> _ = trainer.train()  # doctest: +ELLIPSIS
    {...'secura/merges': '2'...}
    >>> [h["secura/merges"] for h in trainer.state.log_history if "secura/merges" in h][-1]
    2.0
"""

from __future__ import annotations

import contextlib

from ..continual.consolidate import DEFAULT_FISHER_BATCHES, consolidate_ewc
from .trainer.callback import SecuraCallback, find_secura_callback
from .trainer.checkpoint import (
    CALLBACK_STATE_NAME,
    EWC_STATE_NAME,
    REPLAY_STATE_NAME,
    checkpoint_folders,
    checkpoint_problem,
    last_complete_checkpoint,
    sharding_problem,
)
from .trainer.mixin import ContinualTrainerMixin, EWCTrainerMixin
from .trainer.state import TrainerLink

with contextlib.suppress(ImportError):
    from .trainer.mixin import SecuraSFTTrainer

__all__ = [
    "CALLBACK_STATE_NAME",
    "DEFAULT_FISHER_BATCHES",
    "ContinualTrainerMixin",
    "EWCTrainerMixin",
    "EWC_STATE_NAME",
    "REPLAY_STATE_NAME",
    "SecuraCallback",
    "SecuraSFTTrainer",
    "TrainerLink",
    "checkpoint_folders",
    "checkpoint_problem",
    "consolidate_ewc",
    "find_secura_callback",
    "last_complete_checkpoint",
    "sharding_problem",
]
