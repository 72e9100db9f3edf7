"""A one-minute, offline tour of the core: every method on a tiny built-in model.

For each method it checks the exact start, trains a few steps on a toy task, reports
how far the model's predictions on unrelated text drifted from the base model (KL
divergence, lower keeps more of what the base knew), and round-trips the adapter
through disk. Run it with ``python -m secura_plugins.demo`` (or ``make demo``).

This is a smoke tour, not the forgetting benchmark: the continual-learning lab (issue 5)
pretrains a base on known facts and measures retention across task sequences.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from torch.nn import functional as F

from . import (
    AdapterConfig,
    apply_adapter,
    count_parameters,
    get_plugin_manager,
    load_adapter,
    save_adapter,
)
from .tiny import build_tiny_model, build_tokenizer

TASK = [f"{a}+{b}={a + b};" for a in range(10) for b in range(10)]
PROBE = ["the quick brown fox", "jumps over the lazy dog", "SECURA keeps knowledge!"]
#: CUR-shaped updates live in W's own (for SECURA: smallest) rows and columns, so their
#: steps are smaller than LoRA's at equal learning rate; each family gets its own.
LEARNING_RATES = {"lora": 5e-3, "dora": 5e-3, "sclora": 5e-3, "curlora": 2e-2, "secura": 2e-2}


def _batch(tok, texts: list[str]) -> dict[str, torch.Tensor]:
    enc = tok(texts, return_tensors="pt", padding=True)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": labels}


def _drift(model, base_logits: torch.Tensor, probe: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    mask = probe["attention_mask"].bool()
    kl = F.kl_div(
        logits.log_softmax(-1)[mask],
        base_logits.log_softmax(-1)[mask],
        log_target=True,
        reduction="batchmean",
    )
    return float(kl)


def run(steps: int = 30, lr_scale: float = 1.0, seed: int = 0) -> list[dict[str, object]]:
    tok = build_tokenizer()
    task, probe = _batch(tok, TASK), _batch(tok, PROBE)
    rows = []
    for method in ("lora", "dora", "curlora", "sclora", "secura"):
        base = build_tiny_model("llama", vocab_size=len(tok), seed=seed)
        with torch.no_grad():
            base_logits = base(
                input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]
            ).logits
        data = {}
        if method == "sclora":
            data = {
                "positive": [{k: task[k] for k in ("input_ids", "attention_mask")}],
                "negative": [{k: probe[k] for k in ("input_ids", "attention_mask")}],
            }
        torch.manual_seed(seed)
        model = apply_adapter(base, AdapterConfig(method=method, r=4), **data)
        exact = _drift(model, base_logits, probe) == 0.0
        lr = LEARNING_RATES[method] * lr_scale
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        start = time.perf_counter()
        model.train()
        losses = []
        for _ in range(steps):
            loss = model(**task).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            get_plugin_manager().hook.secura_step_end(model=model, step=len(losses) + 1)
            losses.append(loss.item())
        model.eval()
        elapsed = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            save_adapter(model, tmp)
            again = load_adapter(build_tiny_model("llama", vocab_size=len(tok), seed=seed), tmp)
            with torch.no_grad():
                same = torch.equal(
                    again(input_ids=task["input_ids"]).logits,
                    model(input_ids=task["input_ids"]).logits,
                )
        rows.append(
            {
                "method": method,
                "trainable": count_parameters(model)["trainable"],
                "lr": f"{lr:g}",
                "exact start": "yes" if exact else "NO",
                "task loss": f"{losses[0]:.2f} -> {losses[-1]:.2f}",
                "drift (KL)": f"{_drift(model, base_logits, probe):.4f}",
                "reload": "identical" if same else "DIFFERS",
                "s/step": f"{elapsed / steps:.3f}",
            }
        )
    return rows


def format_table(rows: list[dict[str, object]]) -> str:
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}

    def line(vals: list[object]) -> str:
        return "| " + " | ".join(str(v).ljust(widths[c]) for c, v in zip(cols, vals)) + " |"

    return "\n".join(
        [line(cols), "|" + "|".join("-" * (widths[c] + 2) for c in cols) + "|"]
        + [line([r[c] for c in cols]) for r in rows]
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr-scale", type=float, default=1.0, help="multiplies every method's lr")
    parser.add_argument("--seed", type=int, default=0)


def run_cli(args: argparse.Namespace) -> int:
    """``secura demo``: print the table, return the exit status."""
    print(f"Training every method for {args.steps} steps on a tiny offline Llama (CPU)...")
    print(format_table(run(args.steps, args.lr_scale, args.seed)))
    print(
        "drift = KL(adapted || base) on unrelated text: how far the model moved from what it knew."
    )
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(run_cli(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
