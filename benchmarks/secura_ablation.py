"""SECURA ablations on the real base (SmolLM2-135M-Instruct), one factor at a time, LoRA beside.

The hard task of the real-model lab: new fictional capitals taught in the probe's own
capital format (``facts-same``). Every run starts from the fp32 base, trains one adapter
with AdamW (linear decay, grad-norm clip 1, loss on the answer tokens only; SECURA's merges
run through the same ``secura_step_end`` hook the Trainer callback calls), then measures
with the lab's own probes (:meth:`secura_plugins.lab.real.RealBase.measure`): the share of
the new facts learned, of the known probe items kept, and the general-text NLL rise.

A variant is ``lora``, ``secura`` (the library default) or ``secura`` with overrides joined
by ``+``, e.g. ``secura+smagnorm=continuous+a_scale=0.1``. Results are appended (atomic
rewrite) to ``--out`` after every run, each with a fingerprint of the task data and the
code commit; runs already there are skipped, so a killed grid
resumes where it stopped.

Usage (one torch thread; about 3-5 minutes a run on a shared core)::

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/secura_ablation.py \\
        --variants lora,secura,secura+smagnorm=off --lrs 1e-3,3e-3 --seeds 0 \\
        --out docs/lab/secura-ablation/results-v2.json
    python benchmarks/secura_ablation.py --table docs/lab/secura-ablation/results-v2.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from secura_plugins import AdapterConfig, adapter_stats, apply_adapter, get_plugin_manager
from secura_plugins._fs import atomic_write_json
from secura_plugins.lab.real import RealSpec, real_base, render_pairs

TASK = "facts-same"
R = 8


def variant_config(name: str, seed: int) -> dict[str, Any]:
    """``lora`` / ``secura[+key=value...]`` -> AdapterConfig fields (r = 8, all projections)."""
    head, *overrides = name.split("+")
    if head not in ("lora", "secura"):
        raise SystemExit(f"--variants: {name!r} must start with 'lora' or 'secura'")
    fields: dict[str, Any] = {"method": head, "r": R, "seed": seed}
    for item in overrides:
        key, _, raw = item.partition("=")
        if not raw:
            raise SystemExit(f"--variants: {item!r} in {name!r} is not key=value")
        try:
            fields[key] = json.loads(raw)
        except json.JSONDecodeError:
            fields[key] = raw
    AdapterConfig.from_dict(fields)  # a clear error now, not after an hour
    return fields


def encode(pairs: list[tuple[str, str]], tok: Any) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids + end of turn), as TRL tokenizes prompt-completion rows."""
    out = []
    for prompt, answer in pairs:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append((p, a))
    return out


def batch_of(rows: list[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    length = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, (p, a) in enumerate(rows):
        n = len(p) + len(a)
        ids[i, :n] = torch.tensor(p + a)
        labels[i, len(p) : n] = torch.tensor(a)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train(model: Any, data: list, *, lr: float, steps: int, batch: int, seed: int) -> dict:
    """Plain AdamW loop; the Trainer's defaults (linear decay, clip 1.0, no weight decay)."""
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    pm = get_plugin_manager()
    losses, stats = [], {}
    model.train()
    start = time.perf_counter()
    for step in tqdm(range(1, steps + 1), desc="train", leave=False):
        while len(order) < batch:
            order += torch.randperm(len(data), generator=gen).tolist()
        rows, order = [data[i] for i in order[:batch]], order[batch:]
        loss = model(**batch_of(rows, model.config.pad_token_id or 0)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        for found in pm.hook.secura_step_end(model=model, step=step):
            stats.update(found or {})
        losses.append(float(loss))
    model.eval()
    stats.update(adapter_stats(model))
    return {
        "loss_first": losses[0],
        "loss_last": sum(losses[-4:]) / len(losses[-4:]),
        "losses": [round(v, 4) for v in losses],
        "seconds_per_step": (time.perf_counter() - start) / steps,
        "adapter_stats": stats,
    }


def run_one(
    base: Any, variant: str, lr: float, seed: int, args: argparse.Namespace, data_fp: str
) -> dict:
    torch.manual_seed(seed)
    model, tok = base.load()
    fields = variant_config(variant, seed)
    model = apply_adapter(model, AdapterConfig.from_dict(fields))
    data = encode(render_pairs(base.train_rows(TASK), tok), tok)
    log = train(model, data, lr=lr, steps=args.steps, batch=args.batch, seed=seed)
    scores = base.measure(model, tok, tasks=[TASK])
    return {
        "variant": variant,
        "data_fingerprint": data_fp,
        "code_commit": git_commit(),
        "config": fields,
        "lr": lr,
        "seed": seed,
        "steps": args.steps,
        "batch": args.batch,
        "learned": scores["new_learned"],
        "kept": scores["known_kept"],
        "kept_by_format": scores["known_kept_by_format"],
        "nll_rise": scores["nll_rise"],
        **log,
    }


def fingerprint(base: Any, tok: Any) -> str:
    """Hash of what a run is measured on: the taught pairs, the probe, the base NLL, the spec.

    Runs with different fingerprints (e.g. before and after the lab changed its data) are
    never pooled into one table row or one LoRA reference.
    """
    blob = json.dumps(
        {
            "task": TASK,
            "pairs": render_pairs(base.train_rows(TASK), tok),
            "probe": base.probe,
            "base_nll": round(base.base_nll, 4),
            "spec": base.spec.__dict__,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def git_commit() -> str:
    """``HEAD`` of the checkout running the script, ``+dirty`` when its code has changes."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        [
            "git",
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            "secura_plugins",
            "benchmarks",
        ],
        capture_output=True,
        text=True,
    )
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def save(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, results, indent=1)


def lora_at(runs: list[dict], learned: float) -> tuple[float, float] | None:
    """LoRA's (kept, NLL rise) at ``learned``, linear between its seed-mean points sorted by
    learning, anchored at the untouched base (lr 0: nothing learned, all kept, no rise);
    None above the learning LoRA reached. ``runs`` share one data fingerprint."""
    by_lr: dict[float, list[dict]] = {}
    for run in runs:
        if run["variant"] == "lora":
            by_lr.setdefault(run["lr"], []).append(run)
    points = sorted(
        [(0.0, 1.0, 0.0)]
        + [
            tuple(sum(r[k] for r in runs) / len(runs) for k in ("learned", "kept", "nll_rise"))
            for runs in by_lr.values()
        ]
    )
    for (l0, k0, n0), (l1, k1, n1) in zip(points, points[1:]):
        if l0 <= learned <= l1 and l1 > l0:
            w = (learned - l0) / (l1 - l0)
            return k0 + w * (k1 - k0), n0 + w * (n1 - n0)
    return None


def table(results: dict) -> str:
    """Markdown: one table per data fingerprint (runs measured on different task data are
    never mixed), one row per (variant, lr) with mean and spread over seeds, and LoRA at the
    same learning (interpolated between LoRA's learning rates on the same data)."""
    by_fp: dict[str, list[dict]] = {}
    for run in results["runs"]:
        by_fp.setdefault(run.get("data_fingerprint", "unrecorded"), []).append(run)
    if len(by_fp) == 1:
        return _table(next(iter(by_fp.values())))
    return "\n\n".join(
        f"Data fingerprint `{fp}` ({len(runs)} runs):\n\n{_table(runs)}"
        for fp, runs in by_fp.items()
    )


def _table(all_runs: list[dict]) -> str:
    groups: dict[tuple[str, float], list[dict]] = {}
    for run in all_runs:
        groups.setdefault((run["variant"], run["lr"]), []).append(run)

    def cell(runs: list[dict], key: str, pct: bool) -> str:
        vals = [r[key] * (100 if pct else 1) for r in runs]
        mean = sum(vals) / len(vals)
        text = f"{mean:.0f}%" if pct else f"{mean:+.3f}"
        if len(vals) > 1:
            half = (max(vals) - min(vals)) / 2
            text += f" ± {half:.0f}" if pct else f" ± {half:.3f}"
        return text

    lines = [
        "| variant | lr | seeds | new facts learned | known kept | NLL rise (nats) "
        "| LoRA at equal learning: kept, NLL rise | s/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    first = {v: i for i, v in reversed(list(enumerate(v for v, _ in groups)))}
    for (variant, lr), runs in sorted(groups.items(), key=lambda g: (first[g[0][0]], g[0][1])):
        sps = sum(r["seconds_per_step"] for r in runs) / len(runs)
        ref = lora_at(all_runs, sum(r["learned"] for r in runs) / len(runs))
        same = "n/a" if ref is None or variant == "lora" else f"{ref[0]:.0%}, {ref[1]:+.3f}"
        lines.append(
            f"| {variant} | {lr:g} | {len(runs)} | {cell(runs, 'learned', True)} | "
            f"{cell(runs, 'kept', True)} | {cell(runs, 'nll_rise', False)} | {same} | {sps:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="lora,secura")
    parser.add_argument("--lrs", default="1e-3")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--facts", type=int, help="facts taught (default: the lab's n_facts)")
    parser.add_argument("--out", default="docs/lab/secura-ablation/results-v2.json")
    parser.add_argument("--table", metavar="RESULTS", help="print the table of a results file")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    torch.set_num_threads(1)
    spec = RealSpec(n_facts=args.facts) if args.facts else RealSpec()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"runs": []}
    results["setup"] = {
        "task": TASK,
        "spec": spec.__dict__,
        "r": R,
        "base": "SmolLM2-135M-Instruct fp32",
        "torch_threads": 1,
        "code_commit": git_commit(),
    }
    base = real_base(spec)
    data_fp = fingerprint(base, base.load()[1])
    old = {r.get("data_fingerprint", "unrecorded") for r in results["runs"]} - {data_fp}
    if old:
        raise SystemExit(
            f"--out: {out} holds runs on other task data (fingerprints {sorted(old)}, "
            f"this data: {data_fp}); write to a new file so rows are never mixed"
        )
    results["setup"]["data_fingerprint"] = data_fp
    results["setup"]["probe_items"] = {f: len(p) for f, p in base.probe.items()}
    done = {(r["variant"], r["lr"], r["seed"], r["steps"], r["batch"]) for r in results["runs"]}
    # both seeds of a (variant, lr) row before the next row: a cut-off grid leaves whole rows
    for variant in args.variants.split(","):
        for lr in [float(x) for x in args.lrs.split(",")]:
            for seed in [int(s) for s in args.seeds.split(",")]:
                if (variant, lr, seed, args.steps, args.batch) in done:
                    continue
                run = run_one(base, variant, lr, seed, args, data_fp)
                results["runs"].append(run)
                save(out, results)
                print(
                    f"{variant} lr={lr:g} seed={seed}: learned {run['learned']:.0%} "
                    f"kept {run['kept']:.0%} nll {run['nll_rise']:+.3f} "
                    f"loss {run['loss_last']:.3f} ({run['seconds_per_step']:.1f} s/step)",
                    flush=True,
                )
                if not math.isfinite(run["nll_rise"]):
                    print("  (non-finite NLL: the model diverged)", flush=True)


if __name__ == "__main__":
    main()
