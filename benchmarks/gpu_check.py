"""GPU check: the real model in 4-bit with LoRA and SECURA, the shipped recipe, a short
forgetting measurement and the 8B-shaped 4-bit memory row, into one results folder.

Run it through ``benchmarks/gpu_check.sh OUT_DIR`` (under 8 minutes on one recent GPU).
Sections, each timed and written to ``OUT_DIR/gpu_check.json`` as soon as it ends (a
failing section records its error and the next one still runs):

1. ``steps``: SmolLM2-135M-Instruct in NF4 (bf16 compute) with LoRA and with SECURA
   (r 8, all seven projections, the same batch): median step time over 20 steps after 3
   warm-up steps, ``torch.cuda.max_memory_allocated`` over those steps, trainable
   parameters.
2. ``recipe``: ``recipes/smollm2-135m-secura-4bit.yaml`` as shipped (SECURA) and with
   ``adapter.method=lora`` (lr 1e-3), through ``secura train``'s own runner on CUDA in
   bf16; then ``secura forgetting``'s probes on each adapter (self-stated knowledge kept,
   general-text NLL rise, KL to the base).
3. ``8b``: ``benchmarks/speed.py`` on Llama-3.1-8B shapes (random weights) in 4-bit,
   seq 2048, gradient checkpointing: peak memory of LoRA and SECURA, one process each.

Without CUDA it writes ``{"status": "skipped", ...}`` and says why. ``--smoke`` runs every
section on the CPU with tiny sizes (a check of the code paths; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

#: ``--smoke``: every section on the CPU with tiny sizes (checks the code paths, not speed).
SMOKE = False
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RECIPE = REPO / "recipes" / "smollm2-135m-secura-4bit.yaml"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _write(out: Path, results: dict[str, Any]) -> None:
    tmp = out / ".gpu_check.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, default=str))
    os.replace(tmp, out / "gpu_check.json")


def _dtype():
    import torch

    return torch.float32 if SMOKE else torch.bfloat16


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_mib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def _nf4_smollm2():
    import torch
    from transformers import AutoModelForCausalLM

    from secura_plugins.quant import nf4_config
    from secura_plugins.real_model import smollm2_checkpoint

    qc = nf4_config(_dtype())
    device_map = {"": 0} if torch.cuda.is_available() else None
    return AutoModelForCausalLM.from_pretrained(
        str(smollm2_checkpoint()), dtype=_dtype(), quantization_config=qc, device_map=device_map
    )


def section_steps(steps: int = 20, warmup: int = 3, batch: int = 16, seq: int = 256) -> dict:
    """Step time and peak memory of LoRA and SECURA on the NF4 real model."""
    import torch
    from peft import prepare_model_for_kbit_training

    from secura_plugins import AdapterConfig, apply_adapter, count_parameters, get_plugin_manager

    methods = {
        "lora": AdapterConfig(method="lora", r=8, target_modules=TARGETS),
        "secura": AdapterConfig(method="secura", r=8, k=32, merge_every=8, target_modules=TARGETS),
    }
    if SMOKE:
        steps, warmup, batch, seq = 2, 1, 2, 16
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (batch, seq), generator=gen).to(device)
    hook = get_plugin_manager().hook
    rows = {}
    for name, config in methods.items():
        model = prepare_model_for_kbit_training(_nf4_smollm2(), use_gradient_checkpointing=False)
        model = apply_adapter(model, config)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        times = []
        for step in range(1, warmup + steps + 1):
            if step == warmup + 1:
                _sync()
                _reset_peak()
            start = time.perf_counter()
            with torch.autocast(device, dtype=_dtype(), enabled=not SMOKE):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            hook.secura_step_end(model=model, step=step)
            _sync()
            if step > warmup:
                times.append(time.perf_counter() - start)
        rows[name] = {
            "median_step_s": statistics.median(times),
            "min_step_s": min(times),
            "max_memory_allocated_MiB": _peak_mib(),
            "trainable": count_parameters(model)["trainable"],
            "final_loss": float(loss.detach()),
        }
        del model, opt, params
        if device == "cuda":
            torch.cuda.empty_cache()
    rows["secura_over_lora_time"] = rows["secura"]["median_step_s"] / rows["lora"]["median_step_s"]
    rows["settings"] = {"batch": batch, "seq": seq, "steps": steps, "warmup": warmup, "r": 8}
    return rows


def section_recipe(out: Path) -> dict:
    """The shipped recipe (SECURA) and its LoRA variant on CUDA, then forgetting probes."""
    import torch

    from secura_plugins.cli import _forgetting_models
    from secura_plugins.forgetting import TOPICS, forgetting_report
    from secura_plugins.recipe import load_recipe, run_recipe

    device = ["training.use_cpu=false", "training.bf16=true", "model.dtype=bfloat16"]
    topics, text_tokens, dtype = TOPICS, 1024, "bfloat16"
    if SMOKE:
        device = ["training.max_steps=2", "training.save_steps=2", "probe.steps=2"]
        topics, text_tokens, dtype = TOPICS[:2], 64, "float32"
    variants = {
        "secura": device,
        "lora": [*device, "adapter.method=lora", "training.learning_rate=1.0e-3"],
    }
    rows: dict[str, Any] = {}
    for name, overrides in variants.items():
        recipe = load_recipe(RECIPE, overrides)
        _reset_peak()
        start = time.perf_counter()
        results = run_recipe(recipe, output_dir=out / f"recipe-{name}", progress=False)
        seconds = time.perf_counter() - start
        peak = _peak_mib()
        start = time.perf_counter()
        base, model, tok, info = _forgetting_models(results["adapter"], None, None, dtype)
        report = info | forgetting_report(
            base, model, tok, topics=topics, max_text_tokens=text_tokens
        )
        (out / f"forgetting-{name}.json").write_text(json.dumps(report, indent=2))
        del base, model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        task = results["tasks"][0]
        rows[name] = {
            "train_seconds": seconds,
            "max_memory_allocated_MiB": peak,
            "new_facts_learned": task["accuracy_row"][0],
            "probe_before": results["probe_before"],
            "probe_after": task["probe"],
            "forgetting_seconds": time.perf_counter() - start,
            "forgetting": {k: report[k] for k in ("knowledge", "general_text", "kl")},
        }
    return rows


def section_8b(out: Path, timeout: float) -> dict:
    """The 8B-shaped 4-bit memory row of benchmarks/speed.py (LoRA vs SECURA)."""
    path = out / "speed_8b_4bit.json"
    shape = ["--device", "cuda", "--dtypes", "bf16", "--shape", "8b", "--seq", "2048"]
    if SMOKE:
        shape = ["--device", "cpu", "--dtypes", "fp32", "--shape", "quick", "--seq", "16"]
    cmd = [
        sys.executable, str(HERE / "speed.py"), *shape, "--quant", "4bit", "--grad-ckpt",
        "--memory", "--no-timing", "--only", "lora", "secura-normalized-m1",
        "--json", str(path), "--cache", str(out / ".bench-cache"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(REPO))
    (out / "speed_8b_4bit.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"speed.py exited {proc.returncode}: {proc.stderr[-2000:]}")
    return {"command": " ".join(cmd), **json.loads(path.read_text())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder for gpu_check.json and the sections' files")
    p.add_argument("--only", nargs="*", default=["steps", "recipe", "8b"])
    p.add_argument("--budget", type=float, default=450.0, help="seconds; later sections skip")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="run every section on the CPU with tiny sizes: checks the code, measures nothing",
    )
    args = p.parse_args(argv)
    global SMOKE
    SMOKE = args.smoke
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    results: dict[str, Any] = {
        "command": " ".join([sys.executable, *sys.argv]),
        "host": platform.node(),
        "torch": torch.__version__,
    }
    if not torch.cuda.is_available() and not SMOKE:
        reason = (
            "no CUDA device: torch.cuda.is_available() is False (torch "
            f"{torch.__version__}, CUDA build {torch.version.cuda}); this check measures GPU "
            "step time and memory, so nothing was run"
        )
        print(f"gpu_check: skipped: {reason}")
        _write(out, {**results, "status": "skipped", "reason": reason})
        return 0
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (--smoke)"
    results.update(device=device, smoke=SMOKE, status="running", sections={})
    os.environ.setdefault("TQDM_DISABLE", "1")
    start = time.perf_counter()
    for name in args.only:
        elapsed = time.perf_counter() - start
        if elapsed > args.budget:
            results["sections"][name] = {"skipped": f"time budget spent ({elapsed:.0f} s)"}
            continue
        t0 = time.perf_counter()
        try:
            if name == "steps":
                row = section_steps()
            elif name == "recipe":
                row = section_recipe(out)
            elif name == "8b":
                row = section_8b(out, timeout=max(60.0, args.budget + 60 - elapsed))
            else:
                raise ValueError(f"unknown section {name!r}")
        except Exception as err:  # noqa: BLE001 - recorded, the next section still runs
            row = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        row["seconds"] = time.perf_counter() - t0
        results["sections"][name] = row
        print(f"gpu_check: {name} done in {row['seconds']:.0f} s", flush=True)
        _write(out, results)
    failed = [n for n, r in results["sections"].items() if "error" in r]
    results["status"] = "failed: " + ", ".join(failed) if failed else "ok"
    results["seconds"] = time.perf_counter() - start
    _write(out, results)
    print(json.dumps(results, indent=2, default=str)[:6000])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
