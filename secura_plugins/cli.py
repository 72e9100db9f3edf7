"""The ``secura`` command.

Subcommands::

    secura train RECIPE.yaml [--set training.max_steps=20] [--output-dir DIR] [--resume]
    secura merge ADAPTER --out DIR [--base BASE] [--dtype float32] [--scale ALPHA]
    secura eval ADAPTER --probe PAIRS.jsonl|builtin:NAME[:N] [--base BASE] [--load-in-4bit]
                        [--merged-gap]
    secura forgetting ADAPTER|MERGED [--base BASE] [--prompts FILE] [--out DIR] [--json]

``train`` runs a recipe (one task or a continual sequence; see
:mod:`secura_plugins.recipe`) with progress bars and prints a summary; rerun the same
command after a crash or preemption and it resumes from the last complete checkpoint; ``merge`` writes a
plain transformers checkpoint with the adapter merged in; ``eval`` scores an adapter on
(prompt, answer) pairs (loss and exact-match accuracy) and, with ``--merged-gap``, also
the merged export, reporting the largest logit difference between the two. Config
errors name the field and exit with status 2.

Example:
    >>> from secura_plugins.cli import main
    >>> main(["train", "does-not-exist.yaml"])  # the message goes to stderr
    2
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SecuraConfigError, SecuraError

EXIT_CONFIG = 2
EXIT_ERROR = 1


@dataclass(frozen=True)
class Command:
    """A subcommand: ``add_arguments(parser)`` and ``run(args) -> exit status``."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# --------------------------------------------------------------------------- train
def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML (see recipes/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe entry, e.g. --set training.max_steps=20 (repeatable)",
    )
    p.add_argument("--output-dir", help="override run.output_dir")
    p.add_argument(
        "--resume",
        action="store_true",
        help="also continue a folder that has no secura_run.json record (written by older "
        "versions); rerunning the same recipe into its output_dir always resumes",
    )
    p.add_argument("--dry-run", action="store_true", help="validate the recipe and stop")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _train(args: argparse.Namespace) -> int:
    from .recipe import load_recipe, run_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        names = ", ".join(t.name for t in recipe.tasks)
        print(f"recipe OK: {len(recipe.tasks)} task(s) [{names}], adapter {recipe.adapter.method}")
        return 0
    results = run_recipe(
        recipe, resume=True if args.resume else None, progress=not args.no_progress, output_dir=args.output_dir
    )
    _print_summary(results)
    return 0


def _print_summary(results: dict[str, Any]) -> None:
    print(f"\nrun written to {results['output_dir']} (adapter: {results['adapter']})")
    for row in results["tasks"]:
        acc = ", ".join("-" if v is None else f"{v:.3f}" for v in row["accuracy_row"])
        probe = row.get("probe") or {}
        extra = f" probe acc {probe['accuracy']:.3f} loss {probe['loss']:.3f}" if probe else ""
        print(f"  after {row['task']:<12} accuracy [{acc}]{extra}")
    for key in ("avg_accuracy", "bwt", "forgetting"):
        if key in results:
            print(f"  {key}: {results[key]:+.4f}")


# --------------------------------------------------------------------------- merge
def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="adapter folder written by save_adapter / secura train")
    p.add_argument("--out", required=True, help="new folder for the merged checkpoint")
    p.add_argument("--base", help="dense base checkpoint (default: the one the adapter names)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument(
        "--scale",
        type=float,
        default=None,
        help="multiply the learned update by this factor before merging (0: the base, "
        "1: the adapter; between: keep more of the base)",
    )


def _adapter_base(adapter: str, base: str | None) -> str:
    from .io import read_adapter_config
    from .real_model import resolve_model_path

    if base:
        return resolve_model_path(base)
    named = read_adapter_config(adapter)["secura"].get("base_model", {}).get("name_or_path")
    if not named:
        raise SecuraConfigError("--base", "the adapter does not name its base model; pass --base")
    return str(named)


def _merge(args: argparse.Namespace) -> int:
    from .export import merge_adapter_into_base

    base = _adapter_base(args.adapter, args.base)
    out = merge_adapter_into_base(
        args.adapter,
        base,
        args.out,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        scale=args.scale,
    )
    print(f"merged checkpoint written to {out}")
    return 0


# --------------------------------------------------------------------------- eval
def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="adapter folder")
    p.add_argument(
        "--probe",
        required=True,
        help="(prompt, answer) pairs: a JSON-lines file, or builtin:NAME[:N] (e.g. builtin:add:32)",
    )
    p.add_argument("--base", help="base checkpoint (default: the one the adapter names)")
    p.add_argument("--load-in-4bit", action="store_true", help="load the base in 4-bit (NF4)")
    p.add_argument(
        "--merged-gap",
        action="store_true",
        help="also score the merged export and report the largest logit difference",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-size", type=int, default=16)


def _pairs(spec: str) -> list[tuple[str, str]]:
    from .continual.probe import load_pairs
    from .synthetic import builtin_rows

    if spec.startswith("builtin:"):
        parts = spec.split(":")
        n = int(parts[2]) if len(parts) > 2 else 32
        return [(r["prompt"], r["completion"]) for r in builtin_rows(parts[1], n, seed=1000)]
    if not Path(spec).is_file():
        raise SecuraConfigError("--probe", f"{spec} is neither a file nor builtin:NAME")
    return load_pairs(spec)


def _eval(args: argparse.Namespace) -> int:
    import torch

    from .continual.probe import RetentionProbe
    from .loading import load_base, load_tokenizer
    from .model import load_adapter

    pairs = _pairs(args.probe)
    base_path = _adapter_base(args.adapter, args.base)
    tokenizer = load_tokenizer(base_path)
    probe = RetentionProbe(pairs, tokenizer, batch_size=args.batch_size, progress=True)
    four_bit = {"load_in_4bit": args.load_in_4bit, "field": "--load-in-4bit"}
    model = load_adapter(
        load_base(base_path, **four_bit, dtype=args.dtype, on_gpu=True), args.adapter
    )
    report: dict[str, Any] = {"adapter": probe.evaluate(model), "pairs": len(probe)}
    if args.merged_gap:
        if args.load_in_4bit:
            raise SecuraConfigError("--merged-gap", "needs a dense base; drop --load-in-4bit")
        dense = load_base(base_path, dtype=args.dtype, on_gpu=True)
        merged = load_adapter(dense, args.adapter)
        merged = merged.merge_and_unload(safe_merge=True).eval()
        report["merged"] = probe.evaluate(merged)
        gap = 0.0
        with torch.no_grad():
            for prompt, answer in probe.pairs:
                ids = tokenizer(prompt + answer, return_tensors="pt").input_ids
                diff = (model(ids).logits.float() - merged(ids).logits.float()).abs().max()
                gap = max(gap, float(diff))
        report["max_logit_gap"] = gap
    print(json.dumps(report, indent=2))
    return 0


# --------------------------------------------------------------------------- forgetting
def _forgetting_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="adapter folder (from any trainer) or merged model folder")
    p.add_argument(
        "--base",
        help="base checkpoint (default: the one the adapter names); "
        "'smollm2' is the offline SmolLM2-135M-Instruct",
    )
    p.add_argument(
        "--prompts",
        help="your prompts for the KL: one per line, or JSON lines with 'prompt' or 'text' "
        "(default: the probe's questions and bundled general text)",
    )
    four = p.add_mutually_exclusive_group()
    four.add_argument(
        "--load-in-4bit",
        dest="four_bit",
        action="store_const",
        const=True,
        help="load the base in NF4 (default: as the adapter was trained)",
    )
    four.add_argument(
        "--dense",
        dest="four_bit",
        action="store_const",
        const=False,
        help="load the base dense even if the adapter was trained on an NF4 base",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", help="folder for forgetting.json and forgetting.png")
    p.add_argument("--json", action="store_true", help="print the JSON report, not the table")
    p.add_argument(
        "--topics", type=int, default=None, help="how many bundled topics the base writes on"
    )
    p.add_argument(
        "--text-tokens", type=int, default=1024, help="tokens of bundled general text scored"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _forgetting_models(
    model_path: str, base: str | None, four_bit: bool | None, dtype: str
) -> tuple[Any, Any, Any, dict[str, Any]]:
    """(base, fine-tuned, tokenizer, info) for an adapter folder or a merged model folder.

    An adapter of this library (any method, any trainer) names its base and whether it
    was trained on an NF4 base (then both models load in NF4 unless ``four_bit`` says
    otherwise); a plain PEFT adapter names its base too; a merged model needs ``base``.
    """
    from .loading import load_base, load_tokenizer
    from .model import load_adapter
    from .real_model import resolve_model_path

    folder = Path(model_path)
    meta_path = folder / "adapter_config.json"
    if not meta_path.is_file() and not (folder / "config.json").is_file():
        raise SecuraConfigError(
            "model", f"{folder} holds neither adapter_config.json (an adapter) nor config.json"
        )
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    ours = isinstance(meta.get("secura"), dict)
    named = meta.get("base_model_name_or_path")
    if ours:
        recorded = meta["secura"].get("base_model") or {}
        named = recorded.get("name_or_path")
        four_bit = bool(recorded.get("quantized")) if four_bit is None else four_bit
    if not (base or named):
        raise SecuraConfigError("--base", f"{folder} does not name its base model; pass --base")
    base_path = _adapter_base(str(folder), base) if ours else resolve_model_path(base or named)
    four_bit = bool(four_bit)
    tokenizer = load_tokenizer(base_path)
    kwargs: dict[str, Any] = {"load_in_4bit": four_bit, "dtype": dtype, "on_gpu": True}
    reference = load_base(base_path, **kwargs)  # NF4 exactly as secura train loads it
    if ours:
        model = load_adapter(load_base(base_path, **kwargs), folder)
    elif meta:
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_base(base_path, **kwargs), str(folder))
    else:
        model = load_base(str(folder), **kwargs)
    kind = "adapter" if meta else "merged model"
    info = {"model": str(folder), "kind": kind, "base": base_path, "four_bit": four_bit}
    return reference, model.eval(), tokenizer, info


def _forgetting(args: argparse.Namespace) -> int:
    from ._fs import atomic_write_text
    from .forgetting import TOPICS, forgetting_report, format_report, load_prompts, plot_report

    topics = TOPICS if args.topics is None else TOPICS[: args.topics]
    if args.topics is not None and not 1 <= args.topics <= len(TOPICS):
        raise SecuraConfigError("--topics", f"must be between 1 and {len(TOPICS)}")
    if args.text_tokens < 16:
        raise SecuraConfigError("--text-tokens", "must be at least 16")
    prompts = load_prompts(args.prompts) if args.prompts else None
    base, model, tok, info = _forgetting_models(args.model, args.base, args.four_bit, args.dtype)
    report = info | forgetting_report(
        base,
        model,
        tok,
        prompts=prompts,
        topics=topics,
        max_text_tokens=args.text_tokens,
        progress=not args.no_progress,
    )
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        text = json.dumps(report, indent=2)
        atomic_write_text(out / "forgetting.json", text)
        plot_report(report, out / "forgetting.png")
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    nf4 = " (NF4)" if info["four_bit"] else ""
    print(f"{info['model']} ({info['kind']}) vs its base {info['base']}{nf4}:")
    print(format_report(report))
    if args.out:
        print(f"written to {Path(args.out) / 'forgetting.json'} and forgetting.png")
    return 0


# --------------------------------------------------------------------------- main
#: The subcommands, in help order. A new subcommand (e.g. ``demo``, kept in its own
#: module) adds one ``Command(name, help, add_arguments, run)`` entry here.
def _demo_args(p: argparse.ArgumentParser) -> None:
    from .demo import add_arguments

    add_arguments(p)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_cli

    return run_cli(args)


def _bench_args(p: argparse.ArgumentParser) -> None:
    from .lab.cli import add_bench_arguments

    add_bench_arguments(p)


def _bench(args: argparse.Namespace) -> int:
    from .lab.cli import run_bench

    return run_bench(args)


COMMANDS: list[Command] = [
    Command("train", "run a recipe (single task or continual sequence)", _train_args, _train),
    Command("merge", "merge an adapter into its dense base checkpoint", _merge_args, _merge),
    Command("eval", "score an adapter on (prompt, answer) pairs", _eval_args, _eval),
    Command("demo", "the real model learns new facts: LoRA vs LoRA + keep", _demo_args, _demo),
    Command("bench", "the continual-learning lab: forgetting of every method", _bench_args, _bench),
    Command(
        "forgetting",
        "what a fine-tuned model forgot vs its base, with no data from you",
        _forgetting_args,
        _forgetting,
    ),
]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="secura", description="Forgetting-resistant fine-tuning: SECURA, EWC, replay."
    )
    parser.add_argument("--version", action="version", version=f"secura-plugins {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show every third-party log line (import-time notices are hidden by default)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(_run=command.run)
    return parser


#: (logger, message start) of the import-time notices the ``secura`` command hides:
#: torchao's optional CUDA/MX extension ``.so`` files that fail to load on a CPU-only
#: torch (torchao is imported by ``transformers.quantizers.auto``), torch's pytree
#: deprecation for torchao's ``register_constant`` on Enum classes, and bitsandbytes'
#: optional ``kernels`` package on AVX512-BF16 CPUs. Nothing else on those loggers is
#: hidden, and ``secura -v`` shows these too.
IMPORT_NOISE: tuple[tuple[str, str], ...] = (
    ("torchao", "Failed to load "),
    ("torch.utils._pytree", "%s is an Enum subclass and is now natively supported"),
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-"),
)


class _DropImportNoise:
    """A ``logging`` filter dropping records whose format string starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def filter(self, record: Any) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_import_noise() -> None:
    """Hide :data:`IMPORT_NOISE` (idempotent; set only by the ``secura`` entry point)."""
    import logging

    for name, prefix in IMPORT_NOISE:
        logger = logging.getLogger(name)
        if not any(getattr(f, "prefix", None) == prefix for f in logger.filters):
            logger.addFilter(_DropImportNoise(prefix))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``secura`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.verbose:
        quiet_import_noise()
    try:
        return args._run(args)
    except SecuraConfigError as err:
        print(f"secura: config error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except SecuraError as err:
        print(f"secura: error: {err}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
