"""One-off costs of the adapters: set-up per layer, SC-LoRA calibration, merges, export.

* ``attach``: :func:`secura_plugins.apply_adapter` on one ``d_in x d_out`` linear layer
  (C/R selection for SECURA and CURLoRA: column/row norms + top-k or sampling, copies of
  C and R); LoRA's own initialisation beside it.
* ``sclora``: SC-LoRA on one layer, split into the covariance pass over the calibration
  tokens and the eigendecomposition of the ``d_out x d_out`` matrix, with the extra peak
  memory of the whole set-up (peak RSS over the RSS before, ``VmHWM`` reset first).
* ``merge``: one M1/M2 merge step (``secura_step_end`` at a merge step) on a Llama model.
* ``export``: :func:`secura_plugins.export_merged` of that model (merge + save).

Usage::

    python benchmarks/setup_cost.py                      # Llama-3-8B layer shapes, CPU
    python benchmarks/setup_cost.py --sclora-widths 1024 4096
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from secura_plugins import AdapterConfig, apply_adapter, export_merged, get_plugin_manager

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from speed import SHAPES, build_model  # noqa: E402


class One(nn.Module):
    """A single linear layer fed by a float 'input_ids' batch (SC-LoRA's batch protocol)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        return self.proj(input_ids)


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def attach_costs(shapes: list[tuple[int, int]], r: int, repeats: int) -> list[str]:
    rows = ["| layer (d_in x d_out) | method | attach (s) |", "|---|---|---|"]
    for d_in, d_out in shapes:
        torch.manual_seed(0)
        layer = One(d_in, d_out)
        for method in ("lora", "secura", "curlora"):
            config = AdapterConfig(method=method, r=r, target_modules=["proj"])

            def attach(config=config, layer=layer):
                model = apply_adapter(layer, config)
                model.unload()  # back to the plain layer for the next repeat

            rows.append(f"| {d_in} x {d_out} | {method} | {timed(attach, repeats):.3f} |")
    return rows


def sclora_costs(widths: list[int], d_in: int, tokens: int, r: int) -> list[str]:
    from secura_plugins.methods.sclora import calibrate

    rows = [
        "| layer (d_in x d_out) | calibration tokens | covariance pass (s) | eigh (s) "
        "| whole apply_adapter (s) | extra peak memory (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for d_out in widths:
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(1)
        pos = [{"input_ids": torch.randn(1, tokens, d_in, generator=gen)}]
        neg = [{"input_ids": torch.randn(1, tokens, d_in, generator=gen)}]
        layer = One(d_in, d_out)
        # The two parts, timed alone.
        from peft import LoraConfig, get_peft_model

        probe = get_peft_model(One(d_in, d_out), LoraConfig(r=r, target_modules=["proj"]))
        layers = {"proj": probe.base_model.model.proj}
        start = time.perf_counter()
        dcov = calibrate(probe, layers, pos, neg, beta=0.5)["proj"]
        cov_s = time.perf_counter() - start
        start = time.perf_counter()
        torch.linalg.eigh(dcov.double())
        eigh_s = time.perf_counter() - start
        del probe, dcov
        # The whole set-up, with its extra peak memory.
        before = _kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        start = time.perf_counter()
        apply_adapter(
            layer,
            AdapterConfig(method="sclora", r=r, target_modules=["proj"]),
            positive=pos,
            negative=neg,
        )
        whole_s = time.perf_counter() - start
        extra = (_kib("VmHWM") - before) / 1024
        rows.append(
            f"| {d_in} x {d_out} | {tokens} | {cov_s:.2f} | {eigh_s:.2f} | {whole_s:.2f} "
            f"| {extra:.0f} |"
        )
    return rows


def merge_and_export(r: int, repeats: int) -> list[str]:
    rows = ["| what | model | time (s) |", "|---|---|---|"]
    shape = SHAPES["slice"]
    base = build_model(shape, torch.float32, "cpu", "none", Path("."))
    model = apply_adapter(base, AdapterConfig(method="secura", r=r, merge="m1", merge_every=1))
    pm = get_plugin_manager()
    step = timed(lambda: pm.hook.secura_step_end(model=model, step=1), repeats)
    rows.append(f"| M1 merge step (7 layers: U_acc += A B, B = 0) | 8B slice | {step:.5f} |")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        export_merged(model, Path(tmp) / "merged")
        rows.append(
            f"| export_merged (merge 7 layers + save {sum(p.numel() for p in base.parameters()) / 1e6:.0f}M "
            f"params, fp32) | 8B slice | {time.perf_counter() - start:.2f} |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sclora-widths", type=int, nargs="*", default=[1024, 4096])
    p.add_argument("--sclora-din", type=int, default=4096)
    p.add_argument("--sclora-tokens", type=int, default=2048)
    p.add_argument("--skip", nargs="*", default=[], choices=["attach", "sclora", "merge"])
    args = p.parse_args(argv)
    print(
        f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads) "
        f"torch={torch.__version__} r={args.r}"
    )
    if "attach" not in args.skip:
        shapes = [(4096, 14336), (14336, 4096), (4096, 4096)]
        print("\n".join(attach_costs(shapes, args.r, args.repeats)), "\n", flush=True)
    if "sclora" not in args.skip:
        rows = sclora_costs(args.sclora_widths, args.sclora_din, args.sclora_tokens, args.r)
        print("\n".join(rows), "\n", flush=True)
    if "merge" not in args.skip:
        print("\n".join(merge_and_export(args.r, args.repeats)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
