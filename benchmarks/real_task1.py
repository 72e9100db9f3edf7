"""The real-model lab's first-task table: new facts learned vs known facts kept vs NLL rise.

The first task of the real lab (``facts-same``: new fictional capitals in the probe's own
"The capital of X is" format) is the issue's hard case. This script collects every
measurement of it from ``secura bench --base real`` result folders: the LR sweep's points
and the first task of every sequence run (the same computation: same seed, data and steps),
and prints one markdown row per (method, lr, seed), sorted by method and learning rate.

Usage:
    python benchmarks/real_task1.py docs/lab/real-sweep docs/lab/real-seq-s0 [--out FILE.md]
    python benchmarks/real_task1.py docs/lab/keep13/chat-* --task chat-initials
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _label(config: dict) -> str:
    """What sets a folder's runs apart: NF4, steps, keep overrides, equal task rows."""
    notes = []
    if config["base"].get("four_bit"):
        notes.append("NF4 base")
    settings = config["settings"]
    if settings["steps"] != 32:
        notes.append(f"{settings['steps']} steps")
    if settings.get("keep_equal_task_rows"):
        notes.append("+keep: equal task rows")
    notes += [f"{k}={v}" for k, v in sorted((config.get("keep") or {}).items())]
    return f" ({', '.join(notes)})" if notes else ""


def points(folder: Path, task: str = "facts-same") -> list[dict]:
    """Task-1 points of one results folder (sweep entries and sequence runs)."""
    data = json.loads((folder / "results.json").read_text())
    out = []
    seed = data["config"]["seeds"][0]
    nf4 = _label(data["config"])
    for s in data.get("sweep", []):
        if s["tasks"][0] == task and "nll_rise" in s:
            out.append(
                {
                    "method": s["family"] + nf4,
                    "lr": s["lr"],
                    "seed": seed,
                    "learned": s["learning_accuracy"] if len(s["tasks"]) == 1 else None,
                    "kept": s["retention"],
                    "capital": s["probe_by_format"].get("capital"),
                    "nll_rise": s["nll_rise"],
                    "source": f"{folder.name} (sweep)",
                }
            )
    for r in data.get("runs", []):
        if r["tasks"][0] == task and "nll_rise" in r:
            out.append(
                {
                    "method": r["method"] + nf4,
                    "lr": r["lr"],
                    "seed": r["seed"],
                    "learned": r["matrix"][0][0],
                    "kept": r["retention"][0],
                    "capital": r["probe_by_format"][0].get("capital"),
                    "nll_rise": r["nll_rise"][0],
                    "source": f"{folder.name} (task 1 of the sequence)",
                }
            )
    return out


def table(rows: list[dict]) -> str:
    lines = [
        "| method | lr | seed | new facts learned % | known kept % | known capitals kept % "
        "| NLL rise (nats) | from |",
        "|---|---|---|---|---|---|---|---|",
    ]
    seen = set()
    for p in sorted(rows, key=lambda p: (p["method"], p["lr"], p["seed"])):
        key = (p["method"], p["lr"], p["seed"])
        if key in seen:  # a sweep point and a sequence's first task: the same run
            continue
        seen.add(key)
        learned = "" if p["learned"] is None else f"{100 * p['learned']:.0f}"
        capital = "" if p["capital"] is None else f"{100 * p['capital']:.0f}"
        lines.append(
            f"| {p['method']} | {p['lr']:g} | {p['seed']} | {learned} | {100 * p['kept']:.1f} "
            f"| {capital} | {p['nll_rise']:+.3f} | {p['source']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--task", default="facts-same", help="the first task to collect")
    args = parser.parse_args()
    rows = [p for f in args.folders if (Path(f) / "results.json").is_file()
            for p in points(Path(f), args.task)]
    text = table(rows)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
