"""Continual-learning pieces that work with any PyTorch model: EWC, replay, metrics, probe.

Nothing here depends on the adapter core or on a trainer: ``EWC`` protects whatever
parameters are trainable, ``ReplayBuffer`` mixes plain rows into a ``datasets.Dataset``,
``metrics`` scores an accuracy matrix and ``RetentionProbe`` measures what a model still
knows. ``secura_plugins.integrations.trl`` wires them into TRL's ``SFTTrainer``.
The one exception, :mod:`.consolidate` (end of a task: Fisher, SECURA's last merge,
re-anchoring), is imported on its own and not from here.
"""

from secura_plugins.continual.ewc import EWC, default_loss_fn, trainable_parameters
from secura_plugins.continual.metrics import (
    AccuracyMatrix,
    average_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
    retention,
)
from secura_plugins.continual.probe import RetentionProbe, load_pairs
from secura_plugins.continual.replay import ReplayBuffer, replay_count

__all__ = [
    "EWC",
    "AccuracyMatrix",
    "ReplayBuffer",
    "RetentionProbe",
    "average_accuracy",
    "backward_transfer",
    "default_loss_fn",
    "forgetting",
    "forward_transfer",
    "load_pairs",
    "replay_count",
    "retention",
    "trainable_parameters",
]
