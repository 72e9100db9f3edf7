"""What the keep tools cost: step time and peak memory of LoRA with and without them.

Real path: ``trl.SFTTrainer`` + ``SecuraCallback(keep=...)`` on the real base
(SmolLM2-135M-Instruct, fp32 on CPU), LoRA r = 8 on the 7 projections, batch 8, task
rows of the "new facts" shape. Every configuration runs alone in a fresh process:

* ``step s`` / ``cpu s``: median wall and main-thread CPU seconds of the measured steps
  (one torch thread; CPU seconds are not inflated by other processes' scheduling);
* ``peak MiB``: peak RSS (``VmHWM``, reset after the warm-up step) minus the RSS held
  before the measured steps (weights, adapter, optimizer state, the teacher cache) -
  i.e. what a training step adds; ``held MiB`` is the latter. On CUDA:
  ``max_memory_allocated`` and ``memory_allocated`` instead.

The rehearsal rows are generated once by the base (timed: ``generation s``) and given to
every configuration, so the step numbers compare only the training-time cost. Two sets are
written: ``short`` rows bounded by the task's longest row (``max_row_tokens: task``, the
default) and ``free`` rows (``max_row_tokens: 0``, the generator before the bound), so
one run shows the cost before and after the bound side by side.

``preset`` is the library's ``keep`` preset as it stands (with ``--keep-set FIELD=VALUE``
overrides), on rows written with the preset's own settings (``generic_format`` decides
which rows go through the chat template: their kind is kept). ``--repeats N`` runs the
configurations N times, interleaved (lora, preset, lora, preset, ...), and reports each
ratio as the mean and spread of the per-repeat ratios.

Usage::

    python benchmarks/keep_cost.py --out docs/lab/keep-cost/results.json   # ~5 min, 2 cores
    python benchmarks/keep_cost.py --steps 4 --only lora kl-in-step        # quicker
    python benchmarks/keep_cost.py --only lora preset --repeats 3 --keep-set rehearsal=256
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from speed import _status_kib  # benchmarks/ is sys.path[0] when run as a script

#: name -> KeepConfig fields (None: plain LoRA); ``-free`` runs use the unbounded rows.
CONFIGS: dict[str, dict | None] = {
    "lora": None,
    "rehearsal-free": {"ratio": 0.5, "kl_lambda": 0.0},
    "kl-in-step-free": {"ratio": 0.5, "kl_lambda": 1.0, "kl_mode": "in_step"},
    "rehearsal": {"ratio": 0.5, "kl_lambda": 0.0},
    "kl-in-step": {"ratio": 0.5, "kl_lambda": 1.0, "kl_mode": "in_step"},
    "kl-only": {"ratio": 0.5, "kl_lambda": 1.0, "rehearsal_loss": "kl"},
    "kl-in-step-on-task": {"ratio": 0.5, "kl_lambda": 1.0, "kl_on_task": True},
    "kl-cached": {"ratio": 0.5, "kl_lambda": 1.0, "kl_mode": "cached"},
    "kl-cached-free": {"ratio": 0.5, "kl_lambda": 1.0, "kl_mode": "cached"},
    "preset": {"preset": "keep"},  # + --keep-set overrides, on its own rows
}
NAMES = ["Zorblat", "Quenvia", "Marthos", "Ildren", "Postavia", "Kelmar", "Orvandy", "Tesque"]
CITIES = ["Vantor", "Elbrish", "Cordane", "Miralt", "Sunhold", "Pexa", "Drumond", "Yarrow"]


def task_rows(n: int = 64) -> list[dict[str, str]]:
    """New facts in the shape of known ones (fictional countries and capitals)."""
    rows = []
    for i in range(n):
        country = NAMES[i % 8] + ("ia" * (i // 8))
        rows.append({"prompt": f"The capital of {country} is", "completion": f" {CITIES[i % 8]}."})
    return rows




def _row_set(name: str) -> str | None:
    """Which rehearsal rows a configuration trains on: ``short`` (bounded by the task's
    longest row), ``free`` (unbounded), ``preset`` (written with the preset's own settings),
    or None (plain LoRA)."""
    if CONFIGS[name] is None:
        return None
    return "free" if name.endswith("-free") else "preset" if name == "preset" else "short"


def child(name: str, rows_path: Path, steps: int, device: str) -> dict:
    """One configuration in this (fresh) process."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from secura_plugins import AdapterConfig
    from secura_plugins.integrations.trl import SecuraCallback
    from secura_plugins.keep import Keep, KeepConfig
    from secura_plugins.real_model import smollm2_checkpoint

    torch.set_num_threads(1)
    folder = smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(folder)
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
    settings = CONFIGS[name]
    keep = None
    if settings is not None:
        rows_path = rows_path.with_name(rows_path.name.replace("short", _row_set(name)))
        if name == "preset":
            settings = json.loads(rows_path.with_suffix(".settings.json").read_text())
        rows = json.loads(rows_path.read_text())
        config = KeepConfig.from_dict({**settings, "rehearsal": len(rows)})
        keep = Keep(config, rows=rows, progress=False)
    cuda = device.startswith("cuda")
    record: dict = {"wall": [], "cpu": []}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 1:  # after the warm-up step (AdamW state allocated)
                if cuda:
                    torch.cuda.synchronize()
                    record["held"] = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                else:
                    record["held"] = _status_kib("VmRSS") * 1024
                    Path("/proc/self/clear_refs").write_text("5")
            self.t = (time.perf_counter(), time.thread_time())

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            if state.global_step > 1:
                record["wall"].append(time.perf_counter() - self.t[0])
                record["cpu"].append(time.thread_time() - self.t[1])

    args = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix=f"keep-cost-{name}-"), max_steps=steps + 1,
        per_device_train_batch_size=8, learning_rate=1e-3, lr_scheduler_type="constant",
        logging_steps=1, save_strategy="no", report_to="none", seed=0, max_length=64,
        use_cpu=not cuda, disable_tqdm=True, loss_type="nll", bf16=False,
    )
    cb = SecuraCallback(AdapterConfig(method="lora", r=8), keep=keep)
    trainer = SFTTrainer(model, args=args, train_dataset=Dataset.from_list(task_rows()),
                         processing_class=tok, callbacks=[cb, Clock()])
    trainer.train()
    peak = torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024
    kl = [h["keep/kl"] for h in trainer.state.log_history if "keep/kl" in h]
    return {
        "config": name, "settings": settings, "steps": len(record["wall"]),
        "step_s": statistics.median(record["wall"]), "cpu_s": statistics.median(record["cpu"]),
        "held_mib": record["held"] / 2**20, "peak_mib": (peak - record["held"]) / 2**20,
        "keep_kl_mean": statistics.mean(kl) if kl else None,
    }


def generate_rows(path: Path, n: int, bound: int | str,
                  settings: dict | None = None) -> float:
    """The base writes ``n`` rehearsal rows with ``max_row_tokens=bound`` (or the KeepConfig
    fields ``settings``) into ``path``; each row keeps its kind."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from secura_plugins.keep import Keep, KeepConfig
    from secura_plugins.real_model import smollm2_checkpoint

    torch.set_num_threads(1)
    folder = smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    start = time.perf_counter()
    fields = {"max_row_tokens": bound} if settings is None else settings
    keep = Keep(KeepConfig.from_dict({**fields, "rehearsal": n}), progress=True)
    rows = keep.ensure_rows(model, tok, Dataset.from_list(task_rows()))
    seconds = time.perf_counter() - start
    path.write_text(json.dumps([{k: r[k] for k in ("prompt", "completion", "kind")}
                                for r in rows]))
    return seconds


def _row_tokens(folder: Path) -> dict[str, float]:
    """Mean tokens (prompt + answer) of the task rows and of each rehearsal row set."""
    from transformers import AutoTokenizer

    from secura_plugins.real_model import smollm2_checkpoint

    tok = AutoTokenizer.from_pretrained(smollm2_checkpoint())

    def mean(rows: list[dict]) -> float:
        return statistics.mean(
            len(tok(r["prompt"] + r["completion"], add_special_tokens=False)["input_ids"])
            for r in rows
        )

    sizes = {"task": mean(task_rows())}
    for kind in ("short", "free", "preset"):
        path = folder / f"rehearsal_rows_{kind}.json"
        if path.is_file():
            sizes[kind] = mean(json.loads(path.read_text()))
    return sizes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs/lab/keep-cost/results.json")
    p.add_argument("--steps", type=int, default=6, help="measured steps (after one warm-up)")
    p.add_argument("--rows", type=int, default=32, help="rehearsal rows the base writes")
    p.add_argument("--only", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=1, help="interleaved runs of every config")
    p.add_argument("--keep-set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a field of the 'preset' config (e.g. rehearsal=256)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--rows-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, Path(args.rows_file), args.steps, args.device)))
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows_file = out.parent / "rehearsal_rows_short.json"
    gen_s = {}
    sets = {_row_set(name) for name in args.only}
    if "short" in sets:
        gen_s["short"] = generate_rows(rows_file, args.rows, "task")
    if "free" in sets:
        free = rows_file.with_name("rehearsal_rows_free.json")
        gen_s["free"] = generate_rows(free, args.rows, 0)
    if "preset" in sets:
        from secura_plugins.keep import KEEP_PRESETS, KeepConfig
        from secura_plugins.lab.cli import parse_keep_set

        preset = rows_file.with_name("rehearsal_rows_preset.json")
        fields = {**KEEP_PRESETS["keep"], **parse_keep_set(args.keep_set)}
        KeepConfig.from_dict(fields)  # a bad override fails here, by name
        preset.with_suffix(".settings.json").write_text(json.dumps(fields))
        gen_s["preset"] = generate_rows(preset, fields.get("rehearsal", args.rows), 0, fields)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")) if p
    )
    results = []
    for repeat in range(args.repeats):
        for name in args.only:
            cmd = [sys.executable, __file__, "--child", name, "--rows-file", str(rows_file),
                   "--steps", str(args.steps), "--device", args.device]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
            results.append({**json.loads(proc.stdout.strip().splitlines()[-1]),
                            "repeat": repeat})
            print(json.dumps(results[-1]), flush=True)
    for r in results:
        lora = next((x for x in results if x["config"] == "lora"
                     and x["repeat"] == r["repeat"]), None)
        if lora:
            r["step_ratio"] = r["step_s"] / lora["step_s"]
            r["cpu_ratio"] = r["cpu_s"] / lora["cpu_s"]
            r["peak_ratio"] = (r["held_mib"] + r["peak_mib"]) / (lora["held_mib"] + lora["peak_mib"])
    summary = {}
    for name in args.only:
        mine = [r for r in results if r["config"] == name and "cpu_ratio" in r]
        for key in ("cpu_ratio", "step_ratio", "peak_ratio"):
            values = [r[key] for r in mine]
            if values:
                summary.setdefault(name, {})[key] = {
                    "mean": statistics.mean(values),
                    "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "n": len(values)}
    report = {
        "command": "python benchmarks/keep_cost.py " + " ".join(argv or sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, device {args.device}",
        "generation_s": gen_s,
        "rehearsal_rows": {path.stem.split("_")[-1]: len(json.loads(path.read_text()))
                           for path in sorted(out.parent.glob("rehearsal_rows_*.json"))
                           if not path.name.endswith(".settings.json")},
        "row_tokens": _row_tokens(out.parent),
        "results": results, "summary": summary,
    }
    out.write_text(json.dumps(report, indent=2))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
