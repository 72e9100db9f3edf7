"""Step time and memory of every adapter, side by side, as ratios to PEFT LoRA.

Times full training steps (forward + backward + AdamW step) of a causal LM with
realistic layer shapes (default: a slice of Llama-3-8B: hidden 4096, MLP 14336, 32 heads,
8 KV heads) with the same target modules and rank for every method. Rounds alternate
the methods in a shuffled order, so machine noise hits all of them alike; the report
gives the median step time and its ratio to LoRA's median from the same run.

Memory, measured exactly rather than from a noisy process RSS:

* ``saved MiB``: bytes autograd keeps for backward (activations), counted once per
  storage with ``torch.autograd.graph.saved_tensors_hooks``;
* ``adapter MiB``: adapter tensors plus AdamW state of the trainable ones;
* on CUDA, ``peak MiB`` from ``torch.cuda.max_memory_allocated`` as well.

Usage::

    python benchmarks/speed.py                       # 8B slice, fp32 + bf16, CPU
    python benchmarks/speed.py --quick --check 1.5   # CI guard: tiny shapes, fails on ratio > 1.5
    python benchmarks/speed.py --device cuda --dtypes bf16 --quant 4bit --layers 2
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from secura_plugins import AdapterConfig, apply_adapter, count_parameters, get_plugin_manager

CONFIGS: dict[str, dict] = {
    "lora": dict(method="lora"),
    "dora": dict(method="dora"),
    "curlora": dict(method="curlora"),
    "secura-off": dict(method="secura", smagnorm="off", merge="m1"),
    "secura-normalized-m1": dict(method="secura", smagnorm="normalized", merge="m1"),
    "secura-normalized-m2": dict(method="secura", smagnorm="normalized", merge="m2"),
    "secura-released-m1": dict(method="secura", smagnorm="released", merge="m1"),
    "secura-normalized-none": dict(method="secura", smagnorm="normalized", merge="none"),
}
QUICK = ["lora", "dora", "secura-off", "secura-normalized-m1"]


@dataclass
class Shape:
    hidden: int
    mlp: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int


LLAMA3_8B_SLICE = Shape(hidden=4096, mlp=14336, heads=32, kv_heads=8, layers=1, vocab=4096)
TINY = Shape(hidden=256, mlp=768, heads=4, kv_heads=2, layers=2, vocab=512)


def build_model(shape: Shape, dtype: torch.dtype, device: str, quant: str, cache: Path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.mlp,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=8192,
        initializer_range=shape.hidden**-0.5,
        tie_word_embeddings=False,
    )
    if quant == "4bit":
        path = cache / f"llama-{shape.hidden}-{shape.mlp}-{shape.layers}"
        if not (path / "config.json").is_file():
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(config).save_pretrained(str(path))
        qc = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
        return AutoModelForCausalLM.from_pretrained(
            str(path), quantization_config=qc, device_map=device
        )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype)


class SavedBytes:
    """Counts the bytes autograd saves for backward (activations), once per storage.

    Weights and buffers of the model are held anyway and are not counted.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.held = {t.untyped_storage().data_ptr() for t in model.parameters()}
        self.held |= {t.untyped_storage().data_ptr() for t in model.buffers()}
        self.seen: set[int] = set()
        self.total = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in self.held and key not in self.seen:
            self.seen.add(key)
            self.total += t.untyped_storage().nbytes()
        return t


def adapter_bytes(model: torch.nn.Module) -> int:
    n = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "lora_" in name:
            n += t.numel() * t.element_size()
            if getattr(t, "requires_grad", False):
                n += 2 * t.numel() * 4  # AdamW exp_avg + exp_avg_sq (fp32)
    return n


def run(args: argparse.Namespace) -> list[dict]:
    shape = TINY if args.quick else LLAMA3_8B_SLICE
    if args.layers:
        shape.layers = args.layers
    names = QUICK if args.quick else [n for n in CONFIGS if not args.only or n in args.only]
    rows: list[dict] = []
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    for dtype_name in args.dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        models, opts, mem = {}, {}, {}
        for name in names:
            base = build_model(shape, dtype, args.device, args.quant, cache)
            model = apply_adapter(base, AdapterConfig(r=args.r, **CONFIGS[name]))
            if args.grad_ckpt:
                model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
                model.enable_input_require_grads()
            models[name] = model
            opts[name] = torch.optim.AdamW(
                [p for p in model.parameters() if p.requires_grad], lr=1e-4
            )
            mem[name] = {
                "trainable": count_parameters(model)["trainable"],
                "adapter_bytes": adapter_bytes(model),
            }
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, shape.vocab, (args.batch, args.seq), generator=gen).to(args.device)
        pm = get_plugin_manager()
        times: dict[str, list[float]] = {n: [] for n in names}
        order = list(names)
        rng = random.Random(0)
        for rnd in range(args.warmup + args.rounds):
            rng.shuffle(order)
            for name in order:
                model, opt = models[name], opts[name]
                counter = SavedBytes(model)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                pm.hook.secura_step_end(model=model, step=rnd + 1)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - start
                if rnd >= args.warmup:
                    times[name].append(elapsed)
                    mem[name]["saved_bytes"] = counter.total
                    if args.device == "cuda":
                        mem[name]["peak_bytes"] = torch.cuda.max_memory_allocated()
        lora_time = statistics.median(times["lora"])
        lora_saved = mem["lora"]["saved_bytes"]
        for name in names:
            med = statistics.median(times[name])
            row = {
                "dtype": dtype_name,
                "method": name,
                "trainable": mem[name]["trainable"],
                "step_s": med,
                "time_ratio": med / lora_time,
                "saved_MiB": mem[name]["saved_bytes"] / 2**20,
                "saved_ratio": mem[name]["saved_bytes"] / lora_saved,
                "adapter_MiB": mem[name]["adapter_bytes"] / 2**20,
            }
            if "peak_bytes" in mem[name]:
                row["peak_MiB"] = mem[name]["peak_bytes"] / 2**20
                row["peak_ratio"] = mem[name]["peak_bytes"] / mem["lora"]["peak_bytes"]
            rows.append(row)
        del models, opts
    return rows


def to_markdown(rows: list[dict]) -> str:
    cols = [
        "dtype",
        "method",
        "trainable",
        "step_s",
        "time_ratio",
        "saved_MiB",
        "saved_ratio",
        "adapter_MiB",
    ]
    if any("peak_MiB" in r for r in rows):
        cols += ["peak_MiB", "peak_ratio"]

    def fmt(v: object) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes and 4 methods (CI guard)")
    p.add_argument(
        "--check",
        type=float,
        default=None,
        help="fail if a SECURA/CURLoRA step takes more than this many times LoRA's",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--quant", default="none", choices=["none", "4bit"])
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layers", type=int, default=0)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--only", nargs="*", default=None)
    p.add_argument("--cache", default=".bench-cache")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.seq, args.rounds, args.dtypes = min(args.seq, 64), max(args.rounds, 3), ["fp32"]
    rows = run(args)
    header = (
        f"device={args.device} ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads) torch={torch.__version__} r={args.r} "
        f"seq={args.seq} batch={args.batch} quant={args.quant} grad_ckpt={args.grad_ckpt}"
    )
    print(header)
    print(to_markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    if args.check is not None:
        ours = [r for r in rows if r["method"].startswith(("secura", "curlora"))]
        worst = max(ours, key=lambda r: r["time_ratio"])
        if worst["time_ratio"] > args.check:
            print(
                f"REGRESSION: {worst['method']} step time is {worst['time_ratio']:.2f}x LoRA's "
                f"(limit {args.check})",
                file=sys.stderr,
            )
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
