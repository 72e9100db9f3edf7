"""Soak: thousands of steps with an M1 merge after every one, on the tiny model.

A plain training loop (AdamW on the SECURA cores, next-token loss on fixed batches of
the builtin ``add`` task) that calls the library's own step-end hook
(``get_plugin_manager().hook.secura_step_end``, what ``SecuraCallback.on_step_end`` and
the axolotl plugin call) with ``merge_every=1``, so every step folds ``A @ B`` into
``U_acc`` and zeroes ``B``. The Trainer is left out so that 2,000 steps take a minute,
not ten; the merge code path is the same.

Measured:

* process RSS (``/proc/self/statm``) at the start (after the first step, once the
  allocator has warmed up), every ``--every`` steps, and at the end; and the number of
  live tensors (``gc``), which a leak of per-step tensors would grow;
* drift: ``U_acc`` (fp32, the running sum the library keeps) against the same sum of
  every merged ``A @ B`` accumulated in fp64 beside it, and the dense weight update it
  stands for, ``scaling * C U_acc R`` against ``scaling * C sum(A B) R`` (fp64). Both as
  the largest absolute difference relative to the largest entry. The tolerance is the
  worst case of fp32 summation, ``steps * 2**-24`` (a rounding per added term).

Usage::

    python benchmarks/soak.py                    # 2,000 steps, prints a JSON report
    python benchmarks/soak.py --steps 200 --every 50
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
from typing import Any

import torch

from secura_plugins import AdapterConfig, apply_adapter, get_plugin_manager

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_mib() -> float:
    """Resident set size of this process in MiB (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE / 2**20


def live_tensors() -> int:
    return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def tolerance(steps: int) -> float:
    """Relative bound on fp32 summation error of ``steps`` terms (one rounding each)."""
    return steps * 2.0**-24


def _batches(tok: Any, n: int = 8, size: int = 8) -> list[dict[str, torch.Tensor]]:
    from secura_plugins.recipe import builtin_rows

    rows = builtin_rows("add", n * size, seed=0)
    out = []
    for i in range(n):
        texts = [r["prompt"] + r["completion"] for r in rows[i * size : (i + 1) * size]]
        enc = tok(texts, return_tensors="pt", padding=True)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        out.append({"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": labels})
    return out


def soak(steps: int = 2000, every: int = 200, lr: float = 1e-3, seed: int = 0) -> dict[str, Any]:
    """Run the soak and return its report (see the module docstring)."""
    from secura_plugins.methods.base import CORE_ATTR
    from secura_plugins.methods.secura import secura_cores
    from secura_plugins.model import adapter_layers
    from secura_plugins.tiny import build_tiny_model, build_tokenizer

    torch.manual_seed(seed)
    tok = build_tokenizer()
    config = AdapterConfig(method="secura", r=8, k=32, merge="m1", merge_every=1)
    model = apply_adapter(build_tiny_model(vocab_size=len(tok), seed=seed), config)
    layers = adapter_layers(model, "default")
    cores = secura_cores(model)
    reference = [torch.zeros_like(c.u_acc, dtype=torch.float64) for c in cores]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    batches = _batches(tok)
    hook = get_plugin_manager().hook
    model.train()
    samples: list[dict[str, float]] = []
    start_rss = start_tensors = None
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for ref, core in zip(reference, cores):
                ref += (core.A.double() @ core.B.double())
        hook.secura_step_end(model=model, step=step)  # M1: U_acc += A B, B = 0
        if step == 1:
            gc.collect()
            start_rss, start_tensors = rss_mib(), live_tensors()
        if step % every == 0 or step == steps:
            gc.collect()
            samples.append(
                {"step": step, "rss_mib": round(rss_mib(), 1), "live_tensors": live_tensors(),
                 "loss": round(float(loss.detach()), 4)}
            )
    seconds = time.perf_counter() - t0
    u_drift = dense_drift = 0.0
    with torch.no_grad():
        for ref, core in zip(reference, cores):
            u_drift = max(u_drift, float((core.u_acc.double() - ref).abs().max() / ref.abs().max()))
        for layer in layers.values():
            core = getattr(layer, CORE_ATTR)["default"]
            C = layer.lora_B["default"].weight.double()
            R = layer.lora_A["default"].weight.double()
            scaling = layer.scaling["default"]
            ref = reference[cores.index(core)]
            dense_ref = scaling * C @ ref @ R
            dense = scaling * C @ core.u_acc.double() @ R
            dense_drift = max(dense_drift, float((dense - dense_ref).abs().max() / dense_ref.abs().max()))
    merges = {int(c.merges) for c in cores}
    return {
        "steps": steps,
        "merge_every": 1,
        "merges": sorted(merges),
        "cores": len(cores),
        "rss_start_mib": round(start_rss, 1),
        "rss_end_mib": samples[-1]["rss_mib"],
        "rss_growth_mib": round(samples[-1]["rss_mib"] - start_rss, 1),
        "live_tensors_start": start_tensors,
        "live_tensors_end": samples[-1]["live_tensors"],
        "u_acc_rel_drift": u_drift,
        "dense_update_rel_drift": dense_drift,
        "tolerance": tolerance(steps),
        "seconds": round(seconds, 1),
        "samples": samples,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=200, help="RSS sample interval")
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(json.dumps(soak(args.steps, args.every, args.lr), indent=2))


if __name__ == "__main__":
    main()
