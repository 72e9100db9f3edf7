"""The lab's driver: learning-rate sweep, runs over methods x seeds, results folder.

:func:`run_lab` pretrains (or loads) the base, picks each method's learning rate, runs
every method with every seed through the task sequence, and writes into ``out``:

* ``results.json``: the settings, the sweep, every run's record (accuracy matrix,
  retention after each task, step times, ...) and the per-method summary. It is
  rewritten after every run, and a rerun with the same settings skips the runs it
  already holds (so an interrupted lab resumes);
* ``table.md``: the summary table (mean ± sd over seeds);
* ``retention.png`` and ``frontier.png``.

Learning rates ("equal learning"): CUR-style adapters (SECURA, CURLoRA) move much less
per step than LoRA at the same learning rate, so comparing them at one learning rate
compares different amounts of learning. With ``sweep=True`` every method family runs the
first ``sweep_tasks`` tasks at each learning rate of ``lr_grid``, and gets the *smallest*
learning rate whose learning accuracy (mean of the diagonal of the accuracy matrix)
reaches ``match`` x the best learning accuracy any method reached in the sweep (or its
best learning rate, if it never does). Every method thus learns about as well as the
others, at the gentlest learning rate that does it. Without a sweep, :data:`DEFAULT_LRS`
(picked that way on the 4-task lab, see BENCHMARKS.md) are used.

Example (``run_lab(cfg)`` then runs it; ``LabConfig.quick`` is the CI-sized lab):
    >>> from secura_plugins.lab.bench import LabConfig
    >>> cfg = LabConfig(tasks=4, methods=["lora", "secura"], seeds=[0, 1])
    >>> cfg.tasks, cfg.lr_for("secura") > cfg.lr_for("lora")
    (['first', 'up', 'last', 'cap'], True)
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._fs import atomic_write_json, atomic_write_text
from ..errors import SecuraConfigError
from .base import BaseSpec, pretrain_base
from .data import TASK_ORDER, task_sequence
from .real import REAL_DEFAULT_LRS, RealSpec, real_base
from .report import format_table, plot_frontier, plot_retention, summarize
from .runner import RunSettings, method_spec, run_sequence

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_LRS", "LabConfig", "MAIN_METHODS", "render", "run_lab"]

#: Learning rate per method family: the sweep's picks on the 4-task lab (BENCHMARKS.md;
#: ``secura-nomerge`` and ``secura-r16`` were not swept and take SECURA's).
DEFAULT_LRS: dict[str, float] = {
    "full": 3e-4,
    "lora": 3e-3,
    "dora": 3e-3,
    "curlora": 3e-2,
    "sclora": 1e-3,
    "secura": 3e-2,
    "secura-m2": 3e-2,
    "secura-released": 1e-2,
    "secura-off": 3e-2,
    "secura-nomerge": 3e-2,
    "secura-r16": 3e-2,
}
LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
#: The real-model lab's sweep grid (full fine-tuning needs ~30x smaller rates than LoRA).
REAL_LR_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
#: The real-model lab's methods (the issue's priority list).
REAL_METHODS = ["lora", "full", "secura", "curlora", "lora+ewc", "lora+replay"]
#: The methods of the issue (``secura bench`` runs these unless told otherwise).
MAIN_METHODS = [
    "full",
    "lora",
    "dora",
    "curlora",
    "sclora",
    "secura",
    "secura-m2",
    "secura-released",
    "secura-off",
    "lora+ewc",
    "lora+replay",
    "secura+ewc",
    "secura+replay",
]


@dataclass
class LabConfig:
    """Everything a lab run depends on (it is written into ``results.json``)."""

    tasks: list[str] = field(default_factory=lambda: task_sequence(4))
    methods: list[str] = field(default_factory=lambda: list(MAIN_METHODS))
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    settings: RunSettings = field(default_factory=RunSettings)
    base: BaseSpec | RealSpec = field(default_factory=BaseSpec)
    lrs: dict[str, float] = field(default_factory=dict)
    sweep: bool = False
    lr_grid: tuple[float, ...] | dict[str, tuple[float, ...]] = LR_GRID
    sweep_tasks: int = 1
    sweep_only: bool = False
    match: float = 0.9
    out: str = "results/lab"
    cache_dir: str | None = None
    threads: int | None = 1
    #: Overrides of the keep preset's fields for every ``<method>+keep`` method.
    keep: dict[str, Any] = field(default_factory=dict)
    #: Also measure each run's final model with its update scaled by these (0 < alpha).
    alphas: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        real = isinstance(self.base, RealSpec)
        names = self.base.task_names() if real else TASK_ORDER
        if isinstance(self.tasks, int):
            if real and not 1 <= self.tasks <= len(names):
                raise SecuraConfigError("tasks", f"must be in [1, {len(names)}], got {self.tasks}")
            self.tasks = names[: self.tasks] if real else task_sequence(self.tasks)
        for tag in self.tasks:
            if tag not in names:
                raise SecuraConfigError(
                    "tasks", f"unknown lab task {tag!r}; choose from {', '.join(names)}"
                )
        if not self.methods:
            raise SecuraConfigError("methods", "give at least one method")
        families = {name: method_spec(name, self.keep).family for name in self.methods}
        grids = self.lr_grid if isinstance(self.lr_grid, dict) else {}
        for what, keys in (("lrs", self.lrs), ("lr_grid", grids)):
            for key in keys:
                if key in families.values():
                    continue
                fix = (f"{key} trains at the rate of its family, so give {families[key]}=LR"
                       if key in families else "give a family of this run's methods")
                raise SecuraConfigError(  # it would be ignored, and the run use another rate
                    what, f"{key!r} is no method family of this run; {fix} (families: "
                    f"{', '.join(sorted(set(families.values())))})")
        for alpha in self.alphas:
            if not alpha > 0:
                raise SecuraConfigError("alphas", f"must be > 0 (0 is the base), got {alpha}")
        if not self.seeds:
            raise SecuraConfigError("seeds", "give at least one seed")
        if not 0 < self.match <= 1:
            raise SecuraConfigError("match", f"must be in (0, 1], got {self.match}")

    @classmethod
    def quick(cls, **overrides: Any) -> LabConfig:
        """A CI-sized lab: a small base (40 facts, width 64), 8 steps per task, one seed."""
        kwargs: dict[str, Any] = {
            "tasks": 2,
            "seeds": [0],
            "settings": RunSettings(steps=8, n_train=64, n_eval=16),
            "base": BaseSpec(
                n_facts=40,
                arithmetic=False,
                copy_probe=10,
                copy_batch=32,
                hidden_size=64,
                intermediate_size=128,
                min_steps=0,
                max_steps=600,
                check_every=50,
                recall_target=0.95,
            ),
            "lr_grid": (1e-3, 1e-2),
            "sweep_tasks": 1,
        }
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def real(cls, *, quick: bool = False, four_bit: bool = False, **overrides: Any) -> LabConfig:
        """The real-model lab (SmolLM2-135M-Instruct, :mod:`~secura_plugins.lab.real`).

        Full: the 4 real tasks, 32 steps x batch 8 per task. ``quick``: the first task
        only, 8 facts, 20 steps (a few minutes on one core, for the tests).
        """
        spec = RealSpec(four_bit=four_bit, n_facts=8, n_eval=8) if quick else None
        kwargs: dict[str, Any] = {
            "tasks": 1 if quick else 4,
            "methods": ["lora", "secura"] if four_bit else list(REAL_METHODS),
            "seeds": [0] if quick else [0, 1],
            "settings": RunSettings(
                steps=20 if quick else 32, batch_size=8, n_train=256, n_eval=16, max_length=96
            ),
            "base": spec or RealSpec(four_bit=four_bit),
            "lr_grid": (3e-4, 1e-3) if quick else REAL_LR_GRID,
        }
        kwargs.update(overrides)
        return cls(**kwargs)

    def grid_for(self, family: str) -> tuple[float, ...]:
        """The sweep's learning rates for ``family`` (a per-family grid, else the shared one)."""
        if isinstance(self.lr_grid, dict):
            return tuple(self.lr_grid.get(family, REAL_LR_GRID))
        return tuple(self.lr_grid)

    def lr_for(self, family: str) -> float:
        defaults = REAL_DEFAULT_LRS if isinstance(self.base, RealSpec) else DEFAULT_LRS
        return self.lrs.get(family, defaults.get(family, 1e-3))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        grid = self.lr_grid
        data["lr_grid"] = (
            {f: list(v) for f, v in grid.items()} if isinstance(grid, dict) else list(grid)
        )
        return data


def _pick_lrs(sweep: list[dict[str, Any]], match: float) -> dict[str, float]:
    """Per family: the smallest LR reaching ``match`` x the best learning accuracy."""
    best = max(s["learning_accuracy"] for s in sweep)
    picked = {}
    for family in dict.fromkeys(s["family"] for s in sweep):
        pts = sorted((s for s in sweep if s["family"] == family), key=lambda s: s["lr"])
        good = [s for s in pts if s["learning_accuracy"] >= match * best]
        chosen = good[0] if good else max(pts, key=lambda s: s["learning_accuracy"])
        picked[family] = chosen["lr"]
    return picked


def _threads(n: int | None):
    import contextlib

    import torch

    @contextlib.contextmanager
    def ctx():
        before = torch.get_num_threads()
        if n:
            torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    return ctx()


def run_lab(cfg: LabConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run the lab described by ``cfg``; write and return ``results.json``'s content."""
    from tqdm.auto import tqdm

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    config = cfg.to_dict()
    previous: dict[str, Any] = {}
    if results_path.is_file():
        previous = json.loads(results_path.read_text())
        if (
            previous.get("config", {}).get("base") != config["base"]
            or previous.get("config", {}).get("settings") != config["settings"]
        ):
            previous = {}  # different lab: start over (the file is rewritten below)
    with _threads(cfg.threads):
        if isinstance(cfg.base, RealSpec):
            base = real_base(cfg.base, cache_dir=cfg.cache_dir, progress=progress)
            base_info = {
                "path": str(base.path),
                "recall": base.recall,
                "probe_candidates": base.candidates,
                "probe_kept": {f: len(p) for f, p in base.probe.items()},
                "nll": base.base_nll,
            }
        else:
            base = pretrain_base(cfg.base, cache_dir=cfg.cache_dir, progress=progress)
            if base.recall < cfg.base.recall_target:
                logger.warning("the base recalls only %.3f of its knowledge", base.recall)
            base_info = {"path": str(base.path), "recall": base.recall, "steps": base.steps}
        results: dict[str, Any] = {"config": config, "base": base_info, "sweep": [], "runs": []}
        families = list(dict.fromkeys(method_spec(m, cfg.keep).family for m in cfg.methods))
        if cfg.sweep:
            done = {(s["family"], s["lr"]): s for s in previous.get("sweep", [])}
            jobs = [(f, lr) for f in families for lr in cfg.grid_for(f)]
            sweep_tasks = cfg.tasks[: cfg.sweep_tasks]
            for family, lr in tqdm(jobs, desc="lr sweep", disable=not progress):
                if (family, lr) in done and done[(family, lr)]["tasks"] == sweep_tasks:
                    results["sweep"].append(done[(family, lr)])
                    continue
                rec = run_sequence(
                    base,
                    method_spec(family, cfg.keep),
                    sweep_tasks,
                    lr=lr,
                    seed=cfg.seeds[0],
                    settings=cfg.settings,
                )
                point = {
                    "family": family,
                    "lr": lr,
                    "tasks": sweep_tasks,
                    "learning_accuracy": rec["learning_accuracy"],
                    "retention": rec["retention"][-1],
                    "step_seconds": sum(rec["step_seconds"]) / len(rec["step_seconds"]),
                    "steps": rec.get("steps"),
                }
                if "nll_rise" in rec:
                    point["nll_rise"] = rec["nll_rise"][-1]
                    point["probe_by_format"] = rec["probe_by_format"][-1]
                results["sweep"].append(point)
                atomic_write_json(results_path, results)
            picked = _pick_lrs(results["sweep"], cfg.match)
            cfg.lrs = {**picked, **cfg.lrs}
        results["lrs"] = {f: cfg.lr_for(f) for f in families}
        def run_key(name: str, seed: int, lr: float, tasks: Any, keep: Any) -> tuple:
            return (name, seed, lr, tuple(tasks), json.dumps(keep, sort_keys=True))

        done_runs = {
            run_key(r["method"], r["seed"], r["lr"], r["tasks"], r.get("keep")): r
            for r in previous.get("runs", [])
        }
        jobs = [] if cfg.sweep_only else [(m, s) for m in cfg.methods for s in cfg.seeds]
        bar = tqdm(jobs, desc="lab runs", disable=not progress)
        for name, seed in bar:
            method = method_spec(name, cfg.keep)
            lr = cfg.lr_for(method.family)
            bar.set_postfix_str(f"{name} seed {seed}")
            key = run_key(name, seed, lr, cfg.tasks, method.keep)
            if key in done_runs:
                results["runs"].append(done_runs[key])
                continue
            results["runs"].append(
                run_sequence(base, method, cfg.tasks, lr=lr, seed=seed, settings=cfg.settings,
                             alphas=tuple(cfg.alphas))
            )
            atomic_write_json(results_path, results)
    return render(results, out, cfg.methods, cfg.tasks)


def render(
    results: dict[str, Any], out: str | Path, methods: list[str], tasks: list[str]
) -> dict[str, Any]:
    """Summarize ``results["runs"]`` and write results.json, table.md and the plots."""
    out = Path(out)
    summary = summarize(results["runs"], methods)
    results["summary"] = summary
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "table.md", format_table(summary) + "\n")
    if summary:
        plot_retention(summary, tasks, out / "retention.png")
    plot_frontier(summary, results["sweep"], out / "frontier.png")
    return results
