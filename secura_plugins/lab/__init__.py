"""The continual-learning lab: how much each method forgets, at equal learning, offline.

A tiny Llama is pretrained from scratch on synthetic knowledge (random facts, sums and
a copy skill; :mod:`~secura_plugins.lab.base`, cached), then fine-tuned on a sequence of
distinct string tasks (:mod:`~secura_plugins.lab.data`) with each method through the
real ``SecuraSFTTrainer`` path (:mod:`~secura_plugins.lab.runner`). The lab reports
base-knowledge retention, the accuracy matrix (ACC, BWT, forgetting), trainable
parameters, step time and training-state memory, over several seeds
(:mod:`~secura_plugins.lab.bench`, :mod:`~secura_plugins.lab.report`).

The real-model lab (:mod:`~secura_plugins.lab.real`, ``secura bench --base real``) runs
the same loop on SmolLM2-135M-Instruct with probes of what it really knows, the NLL rise
on bundled general text, and four tasks users run (new facts in the known and in another
format, a JSON skill, a chat skill).

Command line: ``secura bench`` (the full lab) and ``secura demo`` (the real model: LoRA
vs LoRA + the ``keep`` preset; ``--tiny`` for 3 tiny-base tasks, LoRA vs SECURA).
"""

from .base import BaseSpec, pretrain_base
from .bench import DEFAULT_LRS, LabConfig, run_lab
from .runner import METHODS, RunSettings, run_sequence

__all__ = [
    "BaseSpec",
    "DEFAULT_LRS",
    "LabConfig",
    "METHODS",
    "RunSettings",
    "pretrain_base",
    "run_lab",
    "run_sequence",
]
