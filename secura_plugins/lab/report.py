"""Summaries of lab runs: mean and spread over seeds, a markdown table, PNG plots.

Example:
    >>> from secura_plugins.lab.report import mean_sd
    >>> mean_sd([1.0, 3.0])
    (2.0, 1.4142135623730951)
    >>> mean_sd([5.0])
    (5.0, 0.0)
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "format_table", "keep_pairs", "mean_sd", "plot_frontier", "plot_retention", "summarize",
]


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0.0 for a single value)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("values: need at least one value")
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return statistics.fmean(vals), sd


def summarize(records: list[dict[str, Any]], methods: Sequence[str]) -> list[dict[str, Any]]:
    """One row per method (in ``methods`` order): mean/sd over its seeds."""
    rows = []
    for name in methods:
        recs = [r for r in records if r["method"] == name]
        if not recs:
            continue
        row: dict[str, Any] = {
            "method": name,
            "lr": recs[0]["lr"],
            "seeds": len(recs),
            "trainable_params": recs[0]["trainable_params"],
        }
        for key in ("avg_accuracy", "learning_accuracy", "bwt", "forgetting", "state_mib"):
            row[key] = mean_sd([r[key] for r in recs])
        row["retention"] = mean_sd([r["retention"][-1] for r in recs])
        row["min_retention"] = mean_sd([min(r["retention"]) for r in recs])
        row["retention_curve"] = [
            mean_sd([r["retention"][i] for r in recs]) for i in range(len(recs[0]["retention"]))
        ]
        row["step_seconds"] = statistics.median(s for r in recs for s in r["step_seconds"])
        if all(r.get("steps") for r in recs):  # training time over the whole sequence
            row["train_seconds"] = mean_sd(
                [sum(s * n for s, n in zip(r["step_seconds"], r["steps"])) for r in recs])
        if all("nll_rise" in r for r in recs):  # the real-model lab
            row["nll_rise"] = mean_sd([r["nll_rise"][-1] for r in recs])
            row["first_learned"] = mean_sd([r["matrix"][0][0] for r in recs])
            row["first_kept"] = mean_sd([r["retention"][0] for r in recs])
            row["first_nll_rise"] = mean_sd([r["nll_rise"][0] for r in recs])
        untouched = [r["kept_untouched"][-1] for r in recs if r.get("kept_untouched")]
        if len(untouched) == len(recs) and None not in untouched:
            row["kept_untouched"] = mean_sd(untouched)
        if all(r.get("alphas") for r in recs):
            row["alphas"] = {
                alpha: {
                    key: mean_sd([_alpha_value(r["alphas"][alpha], key) for r in recs])
                    for key in ("accuracy", "retention", "nll_rise", "kept_untouched")
                    if all(r["alphas"][alpha].get(key) is not None for r in recs)
                }
                for alpha in recs[0]["alphas"]
                if all(alpha in r["alphas"] for r in recs)
            }
        rows.append(row)
    return rows


def _alpha_value(measures: dict[str, Any], key: str) -> float:
    """One measure at one alpha; ``accuracy`` (every task's) as its mean: the final ACC."""
    value = measures[key]
    return sum(value) / len(value) if key == "accuracy" else value


def _pm(value: tuple[float, float], scale: float = 100.0, digits: int = 1) -> str:
    mean, sd = value
    return f"{mean * scale:.{digits}f} ± {sd * scale:.{digits}f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of :func:`summarize`'s rows (percentages; mean ± sd over seeds).

    Real-model lab rows (with ``nll_rise``) get the real table: after the first task
    (new facts learned, known facts kept, NLL rise) and after the last.
    """
    if rows and all("nll_rise" in r for r in rows):
        return _real_table(rows)
    head = (
        "| method | lr | trainable params | base retention % | ACC % | learning acc % "
        "| BWT % | forgetting % | s/step | train state MiB | seeds |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {r['trainable_params']:,} | {_pm(r['retention'])} "
            f"| {_pm(r['avg_accuracy'])} | {_pm(r['learning_accuracy'])} | {_pm(r['bwt'])} "
            f"| {_pm(r['forgetting'])} | {r['step_seconds']:.3f} "
            f"| {r['state_mib'][0]:.2f} | {r['seeds']} |"
        )
    return "\n".join(lines)


def _real_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| method | lr | trainable params | task 1 learned % | known kept after task 1 % "
        "| NLL rise after task 1 (nats) | learning acc % | ACC % | BWT % "
        "| known kept at end % | NLL rise at end (nats) | s/step | seeds |"
    )
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {r['trainable_params']:,} "
            f"| {_pm(r['first_learned'])} | {_pm(r['first_kept'])} "
            f"| {_pm(r['first_nll_rise'], 1.0, 3)} | {_pm(r['learning_accuracy'])} "
            f"| {_pm(r['avg_accuracy'])} | {_pm(r['bwt'])} | {_pm(r['retention'])} "
            f"| {_pm(r['nll_rise'], 1.0, 3)} | {r['step_seconds']:.2f} | {r['seeds']} |"
        )
    scaled = [(r, a, m) for r in rows for a, m in (r.get("alphas") or {}).items()]
    if scaled or any("kept_untouched" in r for r in rows):
        lines += ["", "The final model, its update scaled by alpha (1 = as trained; "
                  "kept (untouched): probe items no rehearsal row mentions):", "",
                  "| method | alpha | ACC % | known kept % | kept (untouched) % | NLL rise |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            last = {"accuracy": r["avg_accuracy"], "retention": r["retention"],
                    "nll_rise": r["nll_rise"]}
            if "kept_untouched" in r:
                last["kept_untouched"] = r["kept_untouched"]
            for alpha, m in [("1", last)] + [(a, m) for q, a, m in scaled if q is r]:
                kept = _pm(m["kept_untouched"]) if "kept_untouched" in m else "-"
                lines.append(
                    f"| {r['method']} | {alpha} | {_pm(m['accuracy'])} | {_pm(m['retention'])} "
                    f"| {kept} | {_pm(m['nll_rise'], 1.0, 3)} |"
                )
    pairs = keep_pairs(rows)
    if pairs:
        lines += ["", "Each method beside its `+keep` (ratios to the method's own run; s/step: "
                  "median wall seconds per optimizer step; training time: every step of the "
                  "sequence, so it counts the extra steps of `--keep-equal-task-rows`):", "", pairs]
    return "\n".join(lines)


def keep_pairs(rows: list[dict[str, Any]]) -> str:
    """Each method beside its ``<method>+keep`` (real-model rows of :func:`summarize`).

    One line per method that has both: learning (right after each task) and its ratio to
    the method's own, the known facts kept at the end (and, with ``keep``, on probe items
    no rehearsal row mentions), the NLL rise at the end, and the keep run's median wall
    seconds per optimizer step and training seconds over the sequence against the
    method's. Empty when no method has both.

    Example:
        >>> row = {"learning_accuracy": (0.8, 0.0), "retention": (0.3, 0.0),
        ...        "nll_rise": (0.5, 0.0), "step_seconds": 2.0, "seeds": 2}
        >>> keep = dict(row, learning_accuracy=(0.84, 0.0), retention=(0.75, 0.0),
        ...             step_seconds=3.0, kept_untouched=(0.7, 0.0))
        >>> print(keep_pairs([dict(row, method="lora"), dict(keep, method="lora+keep")]))
        | method | learning acc % | x method's | known kept at end % | kept, never rehearsed % | NLL rise at end | s/step x | training time x | seeds |
        |---|---|---|---|---|---|---|---|---|
        | lora | 80.0 ± 0.0 | 1.00 | 30.0 ± 0.0 | - | +0.500 ± 0.000 | 1.00 | - | 2 |
        | lora+keep | 84.0 ± 0.0 | 1.05 | 75.0 ± 0.0 | 70.0 ± 0.0 | +0.500 ± 0.000 | 1.50 | - | 2 |
    """
    by_name = {r["method"]: r for r in rows}
    pairs = [(by_name[r["method"][: -len("+keep")]], r) for r in rows
             if r["method"].endswith("+keep") and r["method"][: -len("+keep")] in by_name]
    if not pairs:
        return ""
    lines = ["| method | learning acc % | x method's | known kept at end % "
             "| kept, never rehearsed % | NLL rise at end | s/step x | training time x "
             "| seeds |", "|" + "---|" * 9]
    for plain, keep in pairs:
        for r in (plain, keep):
            time = "-"
            if "train_seconds" in r and "train_seconds" in plain:
                time = f"{r['train_seconds'][0] / plain['train_seconds'][0]:.2f}"
            kept = _pm(r["kept_untouched"]) if "kept_untouched" in r else "-"
            nll = r["nll_rise"]
            lines.append(
                f"| {r['method']} | {_pm(r['learning_accuracy'])} "
                f"| {r['learning_accuracy'][0] / plain['learning_accuracy'][0]:.2f} "
                f"| {_pm(r['retention'])} | {kept} | {nll[0]:+.3f} ± {nll[1]:.3f} "
                f"| {r['step_seconds'] / plain['step_seconds']:.2f} | {time} | {r['seeds']} |"
            )
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_retention(rows: list[dict[str, Any]], tasks: Sequence[str], path: str | Path) -> Path:
    """Base-knowledge retention after each task, one line per method (band = ± sd)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9.5, 5), dpi=110)
    xs = list(range(0, len(tasks) + 1))
    for i, r in enumerate(rows):
        means = [1.0] + [m for m, _ in r["retention_curve"]]
        sds = [0.0] + [s for _, s in r["retention_curve"]]
        style = "-" if i < 10 else "--"  # the colour cycle repeats after 10 methods
        (line,) = ax.plot(xs, [100 * m for m in means], style, marker="o", ms=3, label=r["method"])
        ax.fill_between(
            xs,
            [100 * (m - s) for m, s in zip(means, sds)],
            [100 * (m + s) for m, s in zip(means, sds)],
            color=line.get_color(),
            alpha=0.15,
        )
    ax.set_xticks(xs)
    ax.set_xticklabels(["base", *tasks], rotation=45 if len(tasks) > 6 else 0)
    ax.set_xlabel("after task")
    ax.set_ylabel("base-knowledge retention (% of base probe accuracy)")
    ax.set_ylim(-2, 105)
    ax.axhline(90, color="grey", lw=0.8, ls="--")
    ax.grid(alpha=0.3)
    # Outside the axes: with a dozen methods a legend inside hides the curves.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.set_title("Retention of the base model's knowledge across the task sequence")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_frontier(
    rows: list[dict[str, Any]], sweep: list[dict[str, Any]], path: str | Path
) -> Path:
    """Left: learning-rate sweep (accuracy vs retention per LR, one line per method).
    Right: end of the sequence (ACC vs retention, mean ± sd over seeds)."""
    plt = _plt()
    panels = bool(sweep) + bool(rows) or 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 5), dpi=110, squeeze=False)
    if sweep:
        ax = axes[0][0]
        for family in dict.fromkeys(s["family"] for s in sweep):
            pts = sorted((s for s in sweep if s["family"] == family), key=lambda s: s["lr"])
            (line,) = ax.plot(
                [100 * s["learning_accuracy"] for s in pts],
                [100 * s["retention"] for s in pts],
                marker="o",
                ms=4,
                label=family,
            )
            for s in pts:
                ax.annotate(
                    f"{s['lr']:g}",
                    (100 * s["learning_accuracy"], 100 * s["retention"]),
                    fontsize=6,
                    color=line.get_color(),
                )
        ax.set_xlabel("learning accuracy on the sweep tasks (%)")
        ax.set_ylabel("base retention after them (%)")
        ax.set_title("LR sweep (labels: learning rate)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if not rows:
        return _save(fig, plt, path)
    ax = axes[0][panels - 1]
    for r in rows:
        (acc, acc_sd), (ret, ret_sd) = r["avg_accuracy"], r["retention"]
        ax.errorbar(100 * acc, 100 * ret, xerr=100 * acc_sd, yerr=100 * ret_sd, fmt="o", capsize=3)
        ax.annotate(
            r["method"],
            (100 * acc, 100 * ret),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set_xlabel("average task accuracy after the last task, ACC (%)")
    ax.set_ylabel("base-knowledge retention after the last task (%)")
    ax.set_title("End of the sequence (mean ± sd over seeds)")
    ax.grid(alpha=0.3)
    return _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
