"""The recipe schema: :class:`Recipe` and its blocks, validated field by field, and
:func:`load_recipe` (YAML + ``--set`` overrides). See :mod:`secura_plugins.recipe` for
the YAML layout.

Example:
    >>> from secura_plugins.recipe.schema import Recipe
    >>> Recipe.from_dict({"model": {"tiny": "llama"},
    ...                   "tasks": [{"data": {"builtin": "add", "n": 8}}]}).tasks[0].name
    'add'
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import AdapterConfig
from ..errors import SecuraConfigError
from ..synthetic import BUILTIN_TASKS, builtin_rows, unknown_builtin
from .fields import (
    _check_keys,
    _check_training,
    _continual_block,
    _int,
    _mapping,
    _reprefix,
    _str,
    _unknown,
)

__all__ = ["DataSpec", "ModelSpec", "ProbeSpec", "Recipe", "TaskSpec", "load_recipe"]


@dataclass
class DataSpec:
    """Where a task's rows come from: exactly one of ``builtin``, ``path``, ``hub`` or
    ``rows`` (an inline list of row mappings).

    Rows are ``{"text"}``, ``{"prompt", "completion"}`` or ``{"messages"}`` (TRL's
    formats); ``columns`` renames source columns (``{prompt: instruction}``).
    """

    builtin: str | None = None
    path: str | None = None
    hub: str | None = None
    rows: list[dict[str, Any]] | None = None
    name: str | None = None
    split: str = "train"
    n: int | None = None
    seed: int = 0
    columns: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, path: str, base_dir: Path | None = None) -> DataSpec:
        data = _mapping(data, path)
        _check_keys(data, path, [f.name for f in dataclasses.fields(cls)])
        sources = [k for k in ("builtin", "path", "hub", "rows") if data.get(k) is not None]
        if len(sources) != 1:
            raise SecuraConfigError(
                path,
                "give exactly one of builtin (synthetic task), path (JSON lines file), hub "
                f"(dataset id) or rows (inline list); got {sources or 'none'}",
            )
        spec = cls(**data)
        if spec.rows is not None and (
            not isinstance(spec.rows, list)
            or not spec.rows
            or not all(isinstance(r, Mapping) for r in spec.rows)
        ):
            raise SecuraConfigError(f"{path}.rows", "must be a non-empty list of mappings")
        if spec.builtin is not None and spec.builtin not in BUILTIN_TASKS:
            raise SecuraConfigError(f"{path}.builtin", unknown_builtin(spec.builtin))
        if spec.builtin is not None and spec.n is None:
            spec.n = 256
        if spec.n is not None:
            _int(spec.n, f"{path}.n", 1)
        _int(spec.seed, f"{path}.seed", 0)
        if spec.path is not None:
            p = Path(spec.path)
            if not p.is_absolute() and base_dir is not None and (base_dir / p).exists():
                p = base_dir / p
            if not p.exists():
                raise SecuraConfigError(f"{path}.path", f"{spec.path} does not exist")
            spec.path = str(p)
        if not isinstance(spec.columns, dict):
            raise SecuraConfigError(f"{path}.columns", "must map new column names to source names")
        return spec

    def load(self):
        """The rows as a ``datasets.Dataset``."""
        from datasets import Dataset, load_dataset

        if self.builtin is not None:
            return Dataset.from_list(builtin_rows(self.builtin, self.n or 256, self.seed))
        if self.rows is not None:
            ds = Dataset.from_list([dict(r) for r in self.rows])
        elif self.path is not None:
            ds = load_dataset("json", data_files=self.path, split="train")
        else:
            ds = load_dataset(self.hub, self.name, split=self.split)
        for new, old in self.columns.items():
            if old not in ds.column_names:
                raise SecuraConfigError(
                    f"columns.{new}", f"source column {old!r} not in {ds.column_names}"
                )
            ds = ds.rename_column(old, new)
        if self.n is not None:
            ds = ds.shuffle(seed=self.seed).select(range(min(self.n, len(ds))))
        return ds

    def pairs(self) -> list[tuple[str, str]]:
        """``(prompt, answer)`` pairs (rows need ``prompt`` and ``completion``/``answer``)."""
        rows = self.load()
        cols = rows.column_names
        answer = "completion" if "completion" in cols else "answer" if "answer" in cols else None
        if "prompt" not in cols or answer is None:
            raise SecuraConfigError(
                "eval", f"evaluation data needs 'prompt' and 'completion' columns, got {cols}"
            )
        return [(str(r["prompt"]), str(r[answer])) for r in rows]


@dataclass
class ModelSpec:
    """The base model: ``tiny`` (offline, seeded) or ``name_or_path`` (a checkpoint;
    ``smollm2`` is SmolLM2-135M-Instruct from :mod:`secura_plugins.real_model`)."""

    tiny: str | None = None
    name_or_path: str | None = None
    load_in_4bit: bool = False
    dtype: str = "float32"
    tokenizer: str | None = None
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    seed: int = 0

    @classmethod
    def from_dict(cls, data: Any) -> ModelSpec:
        data = _mapping(data, "model")
        _check_keys(data, "model", [f.name for f in dataclasses.fields(cls)])
        spec = cls(**data)
        if (spec.tiny is None) == (spec.name_or_path is None):
            raise SecuraConfigError(
                "model", "give exactly one of tiny (llama|qwen2) or name_or_path (a checkpoint)"
            )
        if spec.tiny is not None and spec.tiny not in ("llama", "qwen2"):
            raise SecuraConfigError("model.tiny", f"must be 'llama' or 'qwen2', got {spec.tiny!r}")
        if spec.dtype not in ("float32", "bfloat16", "float16"):
            raise SecuraConfigError(
                "model.dtype", f"must be float32, bfloat16 or float16, got {spec.dtype!r}"
            )
        for flag in ("load_in_4bit", "trust_remote_code", "gradient_checkpointing"):
            if not isinstance(getattr(spec, flag), bool):
                raise SecuraConfigError(f"model.{flag}", "must be true or false")
        return spec


@dataclass
class TaskSpec:
    """One task of the sequence."""

    name: str
    data: DataSpec
    eval: DataSpec | None = None
    training: dict[str, Any] = field(default_factory=dict)


@dataclass
class ProbeSpec:
    """The retention probe: held-out (prompt, answer) pairs of what the model knew."""

    data: DataSpec
    steps: int | None = None


@dataclass
class Recipe:
    """A validated recipe (see the module docstring for the YAML layout)."""

    model: ModelSpec
    tasks: list[TaskSpec]
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    training: dict[str, Any] = field(default_factory=dict)
    output_dir: str = "runs/secura"
    seed: int = 0
    ewc: dict[str, Any] | None = None
    replay: dict[str, Any] | None = None
    keep: dict[str, Any] | None = None
    probe: ProbeSpec | None = None
    source: str | None = None

    BLOCKS = ("run", "model", "adapter", "training", "tasks", "continual", "probe")

    @classmethod
    def from_dict(cls, data: Any, base_dir: Path | None = None) -> Recipe:
        data = _mapping(data, "recipe")
        for key in data:
            if key not in cls.BLOCKS:
                raise _unknown("", key, list(cls.BLOCKS), "block")
        run = _mapping(data.get("run"), "run")
        _check_keys(run, "run", ["output_dir", "seed"])
        if "model" not in data:
            raise SecuraConfigError("model", "missing; e.g. model: {tiny: llama}")
        model = ModelSpec.from_dict(data["model"])
        adapter_block = _mapping(data.get("adapter"), "adapter")
        try:
            adapter = AdapterConfig.from_dict(adapter_block)
        except SecuraConfigError as err:
            raise _reprefix(err, "adapter") from None
        training = _mapping(data.get("training"), "training")
        _check_training(training, "training")
        raw_tasks = data.get("tasks")
        if not isinstance(raw_tasks, list) or not raw_tasks:
            raise SecuraConfigError("tasks", "must be a non-empty list of tasks (name, data)")
        tasks = []
        for i, raw in enumerate(raw_tasks):
            path = f"tasks[{i}]"
            raw = _mapping(raw, path)
            _check_keys(raw, path, ["name", "data", "eval", "training"])
            if "data" not in raw:
                raise SecuraConfigError(f"{path}.data", "missing; e.g. data: {path: train.jsonl}")
            task_training = _mapping(raw.get("training"), f"{path}.training")
            _check_training(task_training, f"{path}.training")
            data_spec = DataSpec.from_dict(raw["data"], f"{path}.data", base_dir)
            eval_spec = None
            if raw.get("eval") is not None:
                eval_spec = DataSpec.from_dict(raw["eval"], f"{path}.eval", base_dir)
            elif data_spec.builtin is not None:  # held-out rows of the same builtin task
                eval_spec = DataSpec(builtin=data_spec.builtin, n=32, seed=data_spec.seed + 1000)
            name = _str(raw.get("name", data_spec.builtin or f"task{i}"), f"{path}.name")
            tasks.append(TaskSpec(name, data_spec, eval_spec, task_training))
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise SecuraConfigError("tasks", f"task names must be unique, got {names}")
        continual = _mapping(data.get("continual"), "continual")
        _check_keys(continual, "continual", ["ewc", "replay", "keep"])
        ewc = _continual_block(continual, "ewc", ["lam", "gamma", "fisher_batches"])
        replay = _continual_block(continual, "replay", ["ratio", "capacity", "seed"])
        from ..keep import KeepConfig

        keep = KeepConfig.coerce(continual.get("keep"))  # errors name keep.<field>
        probe = None
        if data.get("probe") is not None:
            raw = _mapping(data["probe"], "probe")
            _check_keys(raw, "probe", ["data", "steps"])
            if "data" not in raw:
                raise SecuraConfigError("probe.data", "missing; e.g. data: {path: probe.jsonl}")
            steps = raw.get("steps")
            if steps is not None:
                _int(steps, "probe.steps", 1)
            probe = ProbeSpec(DataSpec.from_dict(raw["data"], "probe.data", base_dir), steps)
        output_dir = _str(run.get("output_dir", "runs/secura"), "run.output_dir")
        return cls(
            model=model,
            tasks=tasks,
            adapter=adapter,
            training=training,
            output_dir=output_dir,
            seed=_int(run.get("seed", 0), "run.seed"),
            ewc=ewc,
            replay=replay,
            keep=None if keep is None else keep.to_dict(),
            probe=probe,
        )

    def task_config(self, index: int, output_dir: Path, **overrides: Any):
        """The ``trl.SFTConfig`` of task ``index`` (recipe training + task overrides)."""
        from trl import SFTConfig

        kwargs: dict[str, Any] = {
            "report_to": "none",
            "logging_steps": 10,
            "save_strategy": "steps",
            "save_steps": 100,
            "save_total_limit": 2,
        }
        kwargs.update(self.training)
        kwargs.update(self.tasks[index].training)
        kwargs.update(overrides)
        kwargs["output_dir"] = str(output_dir)
        kwargs.setdefault("seed", self.seed)
        if self.model.gradient_checkpointing:
            kwargs.setdefault("gradient_checkpointing", True)
        try:
            return SFTConfig(**kwargs)
        except (TypeError, ValueError) as err:
            block = f"tasks[{index}].training" if self.tasks[index].training else "training"
            raise SecuraConfigError(block, f"trl.SFTConfig rejected it: {err}") from None


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """``a.b[1].c = value`` on nested dicts/lists (``--set`` on the command line)."""
    import re

    parts = [p for p in re.split(r"\.|\[(\d+)\]", dotted) if p]
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        key: Any = int(part) if part.isdigit() and isinstance(node, list) else part
        if last:
            if isinstance(node, list) and isinstance(key, int) and key == len(node):
                node.append(value)  # tasks[2]=... adds a third task
            elif isinstance(node, list) and not (isinstance(key, int) and key < len(node)):
                raise SecuraConfigError(dotted, f"no such entry: the list has {len(node)} items")
            else:
                node[key] = value
            return
        if isinstance(node, dict) and key not in node:
            node[key] = {}
        try:
            node = node[key]
        except (IndexError, KeyError, TypeError):
            raise SecuraConfigError(dotted, "no such entry in the recipe") from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe YAML (``yaml.safe_load``), apply ``key.path=value`` overrides, validate."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SecuraConfigError("recipe", f"{path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.constructor.ConstructorError as err:
        raise SecuraConfigError(
            "recipe",
            f"{path} uses a YAML tag that builds Python objects ({err.problem}, line "
            f"{err.problem_mark.line + 1 if err.problem_mark else '?'}); recipes are read with "
            "yaml.safe_load, which never constructs objects: write plain values instead",
        ) from None
    except yaml.YAMLError as err:
        raise SecuraConfigError("recipe", f"{path} is not valid YAML: {err}") from None
    data = copy.deepcopy(data) if data is not None else {}
    for item in overrides or []:
        if "=" not in item:
            raise SecuraConfigError("--set", f"expected key.path=value, got {item!r}")
        key, raw = item.split("=", 1)
        _set_path(data, key.strip(), yaml.safe_load(raw))
    recipe = Recipe.from_dict(data, base_dir=path.parent)
    recipe.source = str(path)
    return recipe
