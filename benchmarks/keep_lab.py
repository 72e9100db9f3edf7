"""The keep tools on the real-model lab: LoRA with and without self-rehearsal / KL anchor.

Uses the real-model lab (:mod:`secura_plugins.lab.real`: SmolLM2-135M-Instruct, its
knowledge probe filtered on the base, the bundled general text, the real tasks) and the
real training path (``trl.SFTTrainer`` + ``SecuraCallback(keep=...)``). Every
configuration trains the same task rows for the same number of *epochs* (so the task is
seen equally often; mixed-in rehearsal rows add steps), from the same base, per seed.

Reported per run: new-task accuracy (``learned``), share of the probe still answered
(``kept``, no probe prompt is ever produced by the rehearsal: they are excluded), the same
on the probe items whose answer appears nowhere in the rehearsal rows (``kept_untouched``),
general-text NLL rise, median step seconds and peak RSS of the run's process.

Usage (one configuration per process, results appended to a JSON-lines file)::

    python benchmarks/keep_lab.py --config lora --seed 0 --out docs/lab/keep-facts/runs.jsonl
    python benchmarks/keep_lab.py --config both --seed 0 --out docs/lab/keep-facts/runs.jsonl
    python benchmarks/keep_lab.py --config both-short --set kl_lambda=0.3 --name kl0.3 \
        --alphas 0.9 0.8 0.7          # a KeepConfig field overridden; interpolation evals
    python benchmarks/keep_lab.py --summary docs/lab/keep-facts/runs.jsonl   # table + ratios

The base's rehearsal rows are cached per seed in ``--rows-dir`` (``rehearsal-<task>-seed<s>``
+ ``-short`` for rows bounded by the task's longest row, + ``-n<N>`` for another count).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from speed import _status_kib  # benchmarks/ is sys.path[0] when run as a script

from secura_plugins.lab.real import untouched

#: name -> (adapter method, KeepConfig fields or None). Rehearsal rows = task rows at
#: ratio 0.5, so every rehearsal row is used once per epoch. ``-short``: rows bounded by
#: the task's longest row (``max_row_tokens: task``).
_FREE = {"max_row_tokens": 0}
CONFIGS: dict[str, tuple[str, dict | None]] = {
    "lora": ("lora", None),
    "rehearsal": ("lora", {"ratio": 0.5, "kl_lambda": 0.0, **_FREE}),
    "kl-task": ("lora", {"rehearsal": 0, "ratio": 0.0, "kl_lambda": 0.1, "kl_on_task": True}),
    "both": ("lora", {"ratio": 0.5, "kl_lambda": 1.0, **_FREE}),
    "both-short": ("lora", {"ratio": 0.5, "kl_lambda": 1.0, "max_row_tokens": "task"}),
    "both-cached": ("lora", {"ratio": 0.5, "kl_lambda": 1.0, "kl_mode": "cached", **_FREE}),
    "secura": ("secura", None),
    "secura-both": ("secura", {"ratio": 0.5, "kl_lambda": 1.0}),
    "sclora-keep": ("sclora", {"ratio": 0.5, "kl_lambda": 1.0}),
}


def rows_path(folder: str, task: str, seed: int, fields: dict, n_task: int) -> Path:
    """Cache file of the base's rehearsal rows for these settings."""
    name = f"rehearsal-{task}-seed{seed}"
    if fields.get("max_row_tokens", 0) != 0:
        name += "-short"
    if fields["rehearsal"] != n_task:
        name += f"-n{fields['rehearsal']}"
    if fields.get("generic_share", 0.5) != 0.5:
        name += f"-g{fields['generic_share']}"
    return Path(folder) / f"{name}.jsonl"




def run(args: argparse.Namespace) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from secura_plugins import AdapterConfig
    from secura_plugins.integrations.trl import SecuraCallback
    from secura_plugins.keep import Keep, KeepConfig
    from secura_plugins.keep.rehearsal import load_rehearsal
    from secura_plugins.lab.real import REAL_DEFAULT_LRS, RealSpec, _hits, real_base

    torch.set_num_threads(1)
    method, keep_fields = CONFIGS[args.config]
    if args.set:
        keep_fields = {**(keep_fields or {}), **dict(_setting(s) for s in args.set)}
    base = real_base(RealSpec(four_bit=args.four_bit, n_facts=args.n_facts))
    model, tok = base.load()
    rows = base.train_rows(args.task)
    probe = base.probe_pairs()
    keep = None
    gen_s = 0.0
    if keep_fields is not None:
        fields = {"rehearsal": len(rows), "seed": args.seed, **keep_fields}
        rows_file = rows_path(args.rows_dir, args.task, args.seed, fields, len(rows))
        cached = None
        if rows_file.is_file() and fields["rehearsal"] > 0:
            cached = load_rehearsal(rows_file)[0]
        keep = Keep(KeepConfig(**fields), exclude=[p for p, _ in probe], rows=cached)
        if cached is None and fields["rehearsal"] > 0:
            start = time.perf_counter()
            keep.ensure_rows(model, tok, Dataset.from_list(rows))
            gen_s = time.perf_counter() - start
            keep.save(rows_file.parent)
            (rows_file.parent / "keep_rehearsal.jsonl").replace(rows_file)
    wall: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            wall.append(time.perf_counter() - self.t)

    lr = args.lr or REAL_DEFAULT_LRS[method]
    sft = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="keep-lab-"), num_train_epochs=args.epochs,
        per_device_train_batch_size=8, learning_rate=lr, lr_scheduler_type="constant",
        logging_steps=5, save_strategy="no", report_to="none", seed=args.seed,
        max_length=128, use_cpu=True, disable_tqdm=True, loss_type="nll", bf16=False,
    )
    cb = SecuraCallback(AdapterConfig(method=method, r=8, seed=args.seed), keep=keep)
    trainer = SFTTrainer(model, args=sft, train_dataset=Dataset.from_list(rows),
                         processing_class=tok, callbacks=[cb, Clock()])
    trainer.train()
    peak_mib = _status_kib("VmHWM") / 1024
    scores = base.measure(trainer.model, tok, tasks=[args.task])
    rehearsed = keep.rows if keep is not None and keep.rows else []
    far = untouched(probe, rehearsed)
    far_kept = sum(_hits(trainer.model, far, tok)) / len(far) if far else None
    kl = [h["keep/kl"] for h in trainer.state.log_history if "keep/kl" in h]
    alphas = {}
    done = 1.0
    for alpha in args.alphas or []:  # interpolation after training: eval only
        from secura_plugins.keep import scale_update

        scale_update(trainer.model, alpha / done)
        done = alpha
        s = base.measure(trainer.model, tok, tasks=[args.task])
        alphas[str(alpha)] = {
            "learned": s["task_accuracy"][args.task], "kept": s["known_kept"],
            "kept_untouched": sum(_hits(trainer.model, far, tok)) / len(far) if far else None,
            "nll_rise": s["nll_rise"],
        }
    return {
        "config": args.name or args.config, "method": method, "keep": keep_fields, "seed": args.seed,
        "task": args.task, "lr": lr, "epochs": args.epochs, "n_facts": args.n_facts,
        "four_bit": args.four_bit, "steps": trainer.state.global_step,
        "learned": scores["task_accuracy"][args.task], "kept": scores["known_kept"],
        "kept_by_format": scores["known_kept_by_format"], "kept_untouched": far_kept,
        "n_probe": len(probe), "n_untouched": len(far), "nll_rise": scores["nll_rise"],
        "step_s_median": statistics.median(wall[1:] or wall), "peak_rss_mib": peak_mib,
        "rehearsal_rows": len(rehearsed), "generation_s": gen_s,
        "keep_kl_last": kl[-1] if kl else None, "alphas": alphas,
        "rehearsal_tokens": statistics.mean(
            len(tok(r["prompt"] + r["completion"])["input_ids"]) for r in rehearsed
        ) if rehearsed else None,
    }


def _setting(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def summary(path: Path) -> str:
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for r in list(runs):  # interpolated evaluations as rows of their own
        for alpha, scores in (r.get("alphas") or {}).items():
            runs.append({**r, **scores, "config": f"{r['config']} alpha {alpha}"})
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["config"], []).append(r)
    lora = by.get("lora", [])
    equal = by.get("lora-equal-steps", [])

    def mean(rs: list[dict], key: str) -> float | None:
        vals = [r[key] for r in rs if r.get(key) is not None]
        return statistics.mean(vals) if vals else None

    def cell(rs: list[dict], key: str, pct: bool = True) -> str:
        vals = [r[key] for r in rs if r.get(key) is not None]
        if not vals:
            return "-"
        m = statistics.mean(vals)
        spread = (max(vals) - min(vals)) / 2
        return f"{100 * m:.0f}% +-{100 * spread:.0f}" if pct else f"{m:+.3f} +-{spread:.3f}"

    lines = [
        "| config | seeds | learned | kept | kept (untouched) | NLL rise | learned / LoRA "
        "| learned / LoRA equal steps | step s / LoRA | peak RSS / LoRA |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rs in by.items():
        ratios = []
        for key, ref in (("learned", lora), ("learned", equal), ("step_s_median", lora),
                         ("peak_rss_mib", lora)):
            a, b = mean(rs, key), mean(ref, key)
            ratios.append(f"{a / b:.2f}" if a is not None and b else "-")
        seeds = ",".join(str(r["seed"]) for r in rs)
        lines.append(
            f"| {name} | {seeds} | {cell(rs, 'learned')} | {cell(rs, 'kept')} | "
            f"{cell(rs, 'kept_untouched')} | {cell(rs, 'nll_rise', pct=False)} | "
            + " | ".join(ratios) + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=list(CONFIGS))
    p.add_argument("--name", help="label of the run in the table (default: the config)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", default="facts-same")
    p.add_argument("--n-facts", type=int, default=32)
    p.add_argument("--epochs", type=float, default=10.0)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--four-bit", action="store_true")
    p.add_argument("--rows-dir", default="docs/lab/keep-facts")
    p.add_argument("--out", default="docs/lab/keep-facts/runs.jsonl")
    p.add_argument("--summary", help="print the table of a runs.jsonl file")
    p.add_argument("--set", nargs="+", metavar="FIELD=VALUE",
                   help="override KeepConfig fields of the config (JSON values)")
    p.add_argument("--alphas", nargs="+", type=float,
                   help="after training, also measure the update scaled by each alpha")
    args = p.parse_args(argv)
    if args.summary:
        print(summary(Path(args.summary)))
        return 0
    if args.config is None:
        p.error("--config is required (or --summary)")
    result = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(result) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
