"""Merge several ``secura bench`` result folders (run in parallel) into one table and plots.

Usage:
    python benchmarks/lab_merge.py --out results/lab4 results/lab4-a results/lab4-b ...

Runs and sweep points are concatenated in the order given (the folders must come from
the same lab: same base and settings); methods keep their first-seen order.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from secura_plugins.lab.bench import render


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    merged: dict = {"runs": [], "sweep": [], "lrs": {}, "sources": args.folders}
    for folder in args.folders:
        data = json.loads((Path(folder) / "results.json").read_text())
        for key in ("config", "base"):
            merged.setdefault(key, data.get(key))
        if data["config"]["base"] != merged["config"]["base"]:
            raise SystemExit(f"{folder}: a different lab base; not merged")
        merged["runs"] += data["runs"]
        merged["sweep"] += data.get("sweep", [])
        merged["lrs"].update(data.get("lrs", {}))
    methods = list(dict.fromkeys(r["method"] for r in merged["runs"]))
    tasks = merged["runs"][0]["tasks"] if merged["runs"] else merged["config"]["tasks"]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    render(merged, args.out, methods, tasks)
    print(Path(args.out, "table.md").read_text())


if __name__ == "__main__":
    main()
