"""Step time and memory of every adapter, side by side, as ratios to PEFT LoRA.

Times full training steps (forward + backward + AdamW step + the SECURA merge hook) of
a causal LM with realistic layer shapes (default: a slice of Llama-3-8B: hidden 4096,
MLP 14336, 32 heads, 8 KV heads) with the same target modules and rank for every
method. Rounds alternate the methods in a shuffled order, so machine noise hits all of
them alike; the report gives the median step time and its ratio to LoRA's median from
the same run.

Clocks: ``--clock wall`` (default) times wall-clock seconds with every thread;
``--clock cpu`` runs one thread and times that thread's CPU seconds, which scheduling
noise from other processes on a shared machine does not inflate (the CI guard uses it).

Memory:

* ``saved MiB``: bytes autograd keeps for backward (activations), counted once per
  storage with ``torch.autograd.graph.saved_tensors_hooks`` (weights excluded);
* ``adapter MiB``: adapter tensors plus AdamW state of the trainable ones;
* with ``--memory``, every method also runs alone in a fresh process: ``peak MiB`` is
  that process's peak memory over two training steps (after one warm-up step that
  allocates the optimizer state): peak RSS on CPU (``VmHWM``, reset before the measured
  steps; glibc is told to return freed blocks so RSS tracks live memory) or
  ``torch.cuda.max_memory_allocated`` on CUDA; ``step peak MiB`` is that peak minus the
  memory held just before the measured steps (weights, adapter, optimizer state).

Usage::

    python benchmarks/speed.py                                  # 8B slice, fp32 + bf16, CPU
    python benchmarks/speed.py --memory --grad-ckpt             # + per-process peak memory
    python benchmarks/speed.py --quick --check 1.5              # CI guard (make bench-guard)
    python benchmarks/speed.py --device cuda --dtypes bf16 --quant 4bit --shape 8b \\
        --seq 2048 --grad-ckpt --memory --only lora secura-normalized-m1   # QLoRA vs SECURA
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
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
    "secura-normalized-none": dict(method="secura", smagnorm="normalized", merge="none"),
    "secura-released-m1": dict(method="secura", smagnorm="released", merge="m1"),
}
QUICK = ["lora", "curlora", "secura-off", "secura-normalized-m1", "secura-released-m1"]


@dataclass
class Shape:
    hidden: int
    mlp: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int


SHAPES = {
    # One decoder layer with Llama-3-8B's shapes (vocab cut to keep the head small).
    "slice": Shape(hidden=4096, mlp=14336, heads=32, kv_heads=8, layers=1, vocab=4096),
    # Llama-3.1-8B itself (random weights): for the 4-bit GPU run.
    "8b": Shape(hidden=4096, mlp=14336, heads=32, kv_heads=8, layers=32, vocab=128256),
    # A quarter of the 8B widths: enough work per step that timer noise does not dominate.
    "quick": Shape(hidden=1024, mlp=3584, heads=8, kv_heads=2, layers=1, vocab=1024),
    "tiny": Shape(hidden=128, mlp=384, heads=4, kv_heads=2, layers=1, vocab=256),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def llama_config(shape: Shape):
    """The library's Llama config builder (row norms like a real LLM's) at ``shape``."""
    from secura_plugins.tiny import tiny_config

    return tiny_config(
        "llama",
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.mlp,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=8192,
    )


def build_model(shape: Shape, dtype: torch.dtype, device: str, quant: str, cache: Path):
    """A random-weight Llama with ``shape``; 4-bit NF4 (bitsandbytes) when ``quant='4bit'``."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = llama_config(shape)
    if quant == "4bit":
        # bitsandbytes quantizes while loading, so a random checkpoint is saved once.
        path = cache / f"llama-{shape.hidden}-{shape.mlp}-{shape.layers}-{shape.vocab}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not (path / "config.json").is_file():
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
            model.save_pretrained(str(path))
            del model
        qc = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
        )
        return AutoModelForCausalLM.from_pretrained(
            str(path), quantization_config=qc, device_map=device, dtype=dtype
        )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)


def prepare(name: str, args: argparse.Namespace, shape: Shape, dtype: torch.dtype):
    """``(model, optimizer)`` for one method, gradient checkpointing as asked."""
    base = build_model(shape, dtype, args.device, args.quant, Path(args.cache))
    if args.quant == "4bit":
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    model = apply_adapter(base, AdapterConfig(r=args.r, **CONFIGS[name]))
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, opt


def train_step(model, opt, ids: torch.Tensor, step: int) -> None:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    get_plugin_manager().hook.secura_step_end(model=model, step=step)


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


def saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    counter = SavedBytes(model)
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    del loss
    return counter.total


def adapter_bytes(model: torch.nn.Module) -> int:
    n = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "lora_" in name:
            n += t.numel() * t.element_size()
            if getattr(t, "requires_grad", False):
                n += 2 * t.numel() * 4  # AdamW exp_avg + exp_avg_sq (fp32)
    return n


def make_ids(args: argparse.Namespace, shape: Shape) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, shape.vocab, (args.batch, args.seq), generator=gen).to(args.device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_methods(args: argparse.Namespace, shape: Shape, dtype_name: str) -> list[dict]:
    """Alternating timing of every method in one process; ratios to LoRA's median."""
    dtype = DTYPES[dtype_name]
    names = args.methods
    models, opts, info = {}, {}, {}
    for name in names:
        models[name], opts[name] = prepare(name, args, shape, dtype)
        info[name] = {
            "trainable": count_parameters(models[name])["trainable"],
            "adapter_bytes": adapter_bytes(models[name]),
        }
    ids = make_ids(args, shape)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {n: [] for n in names}
    order = list(names)
    rng = random.Random(0)
    for rnd in range(args.warmup + args.rounds):
        rng.shuffle(order)
        for name in order:
            _sync(args.device)
            start = clock()
            train_step(models[name], opts[name], ids, step=rnd + 1)
            _sync(args.device)
            if rnd >= args.warmup:
                times[name].append(clock() - start)
    for name in names:
        info[name]["saved_bytes"] = saved_bytes(models[name], ids)
    lora_time = statistics.median(times["lora"])
    rows = []
    for name in names:
        med = statistics.median(times[name])
        rows.append(
            {
                "dtype": dtype_name,
                "method": name,
                "trainable": info[name]["trainable"],
                "step_s": med,
                "time_ratio": med / lora_time,
                "saved_MiB": info[name]["saved_bytes"] / 2**20,
                "saved_ratio": info[name]["saved_bytes"] / info["lora"]["saved_bytes"],
                "adapter_MiB": info[name]["adapter_bytes"] / 2**20,
            }
        )
    return rows


# ------------------------------------------------------------------ peak memory (own process)
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(args: argparse.Namespace, shape: Shape) -> dict:
    """Runs in a fresh process: peak memory of two training steps of one method."""
    import gc

    name, dtype = args.child, DTYPES[args.dtypes[0]]
    model, opt = prepare(name, args, shape, dtype)
    ids = make_ids(args, shape)
    train_step(model, opt, ids, step=1)  # allocates AdamW state
    gc.collect()
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        held = _status_kib("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    for step in (2, 3):
        train_step(model, opt, ids, step=step)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_kib("VmHWM") * 1024
    return {"method": name, "held_bytes": held, "peak_bytes": peak}


def measure_memory(args: argparse.Namespace, dtype_name: str, argv: list[str]) -> dict[str, dict]:
    """Each method in its own fresh process, in a shuffled order."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")) if p
    )
    order = list(args.methods)
    random.Random(1).shuffle(order)
    out = {}
    for name in order:
        cmd = [sys.executable, __file__, *argv, "--child", name, "--dtypes", dtype_name]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"memory run of {name} failed:\n{proc.stderr[-3000:]}")
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def to_markdown(rows: list[dict]) -> str:
    cols = ["dtype", "method", "trainable", "step_s", "time_ratio", "saved_MiB", "saved_ratio"]
    cols += ["adapter_MiB"]
    if any("peak_MiB" in r for r in rows):
        cols += ["peak_MiB", "peak_ratio", "step_peak_MiB", "step_peak_ratio"]

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI guard: quarter-width shapes")
    p.add_argument(
        "--check",
        type=float,
        default=None,
        help="exit 1 if a SECURA/CURLoRA step takes more than this many times LoRA's",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--quant", default="none", choices=["none", "4bit"])
    p.add_argument("--shape", default="slice", choices=list(SHAPES))
    p.add_argument("--layers", type=int, default=0, help="override the shape's layer count")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--memory", action="store_true", help="peak memory, one process per method")
    p.add_argument("--no-timing", action="store_true", help="skip the timing rounds")
    p.add_argument("--only", nargs="*", default=None, help="methods to run (default: all)")
    p.add_argument("--cache", default=".bench-cache")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.shape, args.dtypes = "quick", ["fp32"]
        args.seq = min(args.seq, 128)
        args.clock = "cpu"
    args.methods = QUICK if args.quick and not args.only else list(args.only or CONFIGS)
    if "lora" not in args.methods:
        args.methods.insert(0, "lora")  # every ratio is to LoRA
    unknown = sorted(set(args.methods) - set(CONFIGS))
    if unknown:
        p.error(f"--only: unknown methods {unknown}; choose from {sorted(CONFIGS)}")
    if args.clock == "cpu":
        torch.set_num_threads(1)  # thread_time counts this thread only
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    shape = SHAPES[args.shape]
    if args.layers:
        shape = replace(shape, layers=args.layers)
    if args.child:
        print(json.dumps(memory_child(args, shape)))
        return 0
    rows: list[dict] = []
    for dtype_name in args.dtypes:
        if args.no_timing:
            dtype_rows = [{"dtype": dtype_name, "method": n} for n in args.methods]
        else:
            dtype_rows = time_methods(args, shape, dtype_name)
        if args.memory:
            child_argv = [a for a in argv if a not in ("--memory",)]
            mem = measure_memory(args, dtype_name, child_argv)
            lora = mem["lora"]
            for row in dtype_rows:
                m = mem[row["method"]]
                step_peak = m["peak_bytes"] - m["held_bytes"]
                row["peak_MiB"] = m["peak_bytes"] / 2**20
                row["peak_ratio"] = m["peak_bytes"] / lora["peak_bytes"]
                row["step_peak_MiB"] = step_peak / 2**20
                row["step_peak_ratio"] = step_peak / (lora["peak_bytes"] - lora["held_bytes"])
        rows += dtype_rows
    threads = torch.get_num_threads()
    header = (
        f"device={args.device} ({platform.processor() or platform.machine()}, {threads} "
        f"threads, clock={args.clock}) torch={torch.__version__} shape={args.shape} "
        f"layers={shape.layers} r={args.r} seq={args.seq} batch={args.batch} "
        f"quant={args.quant} grad_ckpt={args.grad_ckpt} rounds={args.rounds}"
    )
    if args.device.startswith("cuda"):
        header += f" gpu={torch.cuda.get_device_name()}"
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
        print(f"speed guard ok: worst {worst['method']} {worst['time_ratio']:.2f}x LoRA <= {args.check}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
