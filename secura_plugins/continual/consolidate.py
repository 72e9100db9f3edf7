"""End of a task: fold its Fisher into the EWC state and re-anchor (with SECURA's last merge).

Used by ``SecuraCallback.on_train_end``, by ``ContinualTrainerMixin.train`` when no
callback does it, and by the axolotl plugin.

Example:
    >>> import torch
    >>> from secura_plugins import AdapterConfig, apply_adapter
    >>> from secura_plugins.continual import EWC
    >>> from secura_plugins.tiny import build_tiny_model
    >>> model = apply_adapter(build_tiny_model(vocab_size=32), AdapterConfig(r=2))
    >>> ids = torch.randint(0, 32, (2, 6))
    >>> ewc = EWC(lam=1.0)
    >>> _ = consolidate_ewc(model, ewc, [{"input_ids": ids, "labels": ids}], progress=False)
    >>> ewc.num_tasks, ewc.is_empty
    (1, False)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn

from ..layers import adapted_method
from .ewc import EWC

__all__ = ["DEFAULT_FISHER_BATCHES", "consolidate_ewc", "prepare_for_m1"]

#: Batches used to estimate the Fisher at the end of a task, unless the EWC sets its own.
DEFAULT_FISHER_BATCHES = 32


def prepare_for_m1(model: nn.Module) -> int:
    """Run the adapter method's ``before_anchor`` before EWC re-anchors; returns the number
    of layers it changed.

    SECURA folds pending updates (``A @ B``) into ``U_acc`` so that ``B`` is zero: under
    M1/M2, ``B`` is reset to zero at every merge, so an anchor with ``B* != 0`` would pull
    ``B`` back to ``B*`` after each merge and the merge would add ``A B*`` to ``U_acc``
    again and again.
    """
    method = adapted_method(model)
    return method.before_anchor(model) if method is not None else 0


def consolidate_ewc(
    model: nn.Module,
    ewc: EWC,
    batches: Iterable[Any],
    *,
    max_batches: int | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """End of a task: Fisher of the trained model, final SECURA merge (see
    :func:`prepare_for_m1`), then ``ewc.consolidate`` (running sum and anchors).

    ``batches`` are collated training batches (dicts with ``labels``), e.g. a Trainer's
    train dataloader. At most ``max_batches`` (default: ``ewc.fisher_max_batches``, else
    ``DEFAULT_FISHER_BATCHES``) are used. ``model`` may be wrapped (DDP, DeepSpeed,
    ``torch.compile``). The CPU random state is left untouched.
    """
    limit = max_batches or ewc.fisher_max_batches or DEFAULT_FISHER_BATCHES
    model = extract_model_from_parallel(model)
    with torch.random.fork_rng(devices=[]):
        # The Fisher of the trained state (B still holds the pending update: with B = 0
        # the Fisher of A would be exactly zero), then the merge, then the anchors.
        fisher = ewc.estimate_fisher(model, batches, max_batches=limit, progress=progress)
    prepare_for_m1(model)
    return ewc.consolidate(model, fisher=fisher)
