"""``secura demo``: LoRA against the ``keep`` preset on the real model, SmolLM2-135M-Instruct.

Both runs teach the base the same new facts (capitals of invented countries, asked in the
very format of capitals the model already knows: the case where plain fine-tuning
forgets most) with every task row seen as often, through ``trl.SFTTrainer`` +
:class:`~secura_plugins.integrations.trl.SecuraCallback`:

* ``lora``: plain LoRA (r = 8, all seven projections);
* ``lora+keep``: the same LoRA with ``keep="keep"``: the base (adapter disabled) first
  writes its own rehearsal examples, mixed in at half the rows, and a KL anchor to the
  base on them (:mod:`secura_plugins.keep`). No data of the base's is used. It trains
  ``steps / (1 - ratio)`` steps, so that it sees every task row as often as LoRA (the
  rehearsal rows come on top), as the library advises for a fixed ``max_steps``.

Then the lab's measures (:meth:`~secura_plugins.lab.real.RealBase.measure`): share of the
new facts learned, share of the probe items the base knew that are still answered
exactly (the rehearsal never writes a probe prompt), and the rise of the mean token NLL on
bundled general English text. Three questions are asked before and after. Writes
``results.json``, ``table.md`` and ``demo.png`` to the output folder.

Run it with ``secura demo`` (``make demo``); ``secura demo --quick`` is the CI-sized
version (4 facts, 4 steps) and ``secura demo --tiny`` the older tiny-base lab demo.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from .._fs import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["DEMO_RUNS", "run_real_demo"]

#: name -> keep setting (``None`` = plain LoRA).
DEMO_RUNS: dict[str, str | None] = {"lora": None, "lora+keep": "keep"}
#: Questions the base answers before training (plus one of the new facts).
KNOWN_QUESTIONS = ("The capital of France is", "The opposite of hot is")
LEARNING_RATE = 1e-3


def _answer(model: torch.nn.Module, tok: Any, prompt: str) -> str:
    batch = tok(prompt, return_tensors="pt").to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    model.train(was_training)
    text = tok.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return text.strip().split("\n")[0]


def _train(base: Any, rows: list[dict], keep: str | None, *, steps: int, seed: int,
           progress: bool, work: Path):
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from ..config import AdapterConfig
    from ..integrations.trl import SecuraCallback
    from ..keep import Keep, KeepConfig

    model, tok = base.load()
    keeper = None
    if keep is not None:
        steps = KeepConfig.coerce(keep).steps_for_task_rows(steps)
        exclude = [p for p, _ in base.probe_pairs()]  # never rehearse a probe question
        settings = {"preset": keep, "rehearsal": len(rows), "seed": seed}
        keeper = Keep(settings, exclude=exclude, progress=progress, steps_scaled=True)
    args = SFTConfig(
        output_dir=str(work), max_steps=steps, per_device_train_batch_size=8,
        learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0,
        save_strategy="no", report_to="none", seed=seed, data_seed=seed, max_length=128,
        use_cpu=not torch.cuda.is_available(), bf16=False, loss_type="nll",
        logging_steps=max(1, steps // 4), disable_tqdm=not progress,
    )
    callback = SecuraCallback(AdapterConfig(method="lora", r=8, seed=seed), keep=keeper)
    trainer = SFTTrainer(model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok, callbacks=[callback])
    trainer.remove_callback(PrinterCallback)  # the logs stay in state.log_history
    trainer.train()
    logs = trainer.state.log_history
    return trainer.model, tok, {
        "loss": [h["loss"] for h in logs if "loss" in h],
        "keep_kl": [h["keep/kl"] for h in logs if "keep/kl" in h],
        "steps": trainer.state.global_step,
    }


def _plot(result: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    runs = result["runs"]
    names = list(runs)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    width = 0.38
    for i, (key, label) in enumerate((("learned", "new facts learned"),
                                      ("kept", "known facts kept"))):
        xs = [j + (i - 0.5) * width for j in range(len(names))]
        ax1.bar(xs, [100 * runs[n][key] for n in names], width, label=label)
    ax1.set_xticks(range(len(names)), names)
    ax1.set_ylim(0, 105)
    ax1.set_ylabel("%")
    ax1.legend(loc="lower right", fontsize=8)
    ax1.set_title("learned vs kept (higher is better)")
    ax2.bar(names, [runs[n]["nll_rise"] for n in names], color="tab:red")
    ax2.set_ylabel("nats / token")
    ax2.set_title("general-text NLL rise (lower is better)")
    fig.suptitle(f"SmolLM2-135M-Instruct, {result['n_facts']} new facts, "
                 f"each seen {result['steps'] * 8 // result['n_facts']} times, seed {result['seed']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _table(result: dict[str, Any]) -> str:
    lines = ["| run | steps | new facts learned | known facts kept | general-text NLL rise |",
             "|---|---|---|---|---|"]
    for name, r in result["runs"].items():
        lines.append(f"| {name} | {r['train_log']['steps']} | {100 * r['learned']:.0f}% "
                     f"| {100 * r['kept']:.0f}% | {r['nll_rise']:+.3f} nats |")
    lines += ["", "| question | base | " + " | ".join(result["runs"]) + " |",
              "|---|---|" + "---|" * len(result["runs"])]
    for q, before in result["before"].items():
        after = " | ".join(repr(r["answers"][q]) for r in result["runs"].values())
        lines.append(f"| {q} | {before!r} | {after} |")
    return "\n".join(lines) + "\n"


def run_real_demo(out: str | Path, *, quick: bool = False, seed: int = 0,
                  cache_dir: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Train LoRA and LoRA + ``keep`` on new facts; measure learned, kept and NLL rise.

    Args:
        out: folder for ``results.json``, ``table.md`` and ``demo.png``.
        quick: 4 facts and 4 steps (minutes; for tests), else 16 facts and 40 steps.
        seed: training seed (the facts are fixed).
        cache_dir: lab cache (the converted checkpoint and the filtered probe).
        progress: progress bars.

    Returns:
        The results dict also written to ``results.json``.
    """
    from .real import RealSpec, real_base

    n_facts, steps = (4, 4) if quick else (16, 40)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = real_base(RealSpec(n_facts=n_facts), cache_dir=cache_dir, progress=progress)
    rows = base.train_rows("facts-same")
    questions = [*KNOWN_QUESTIONS, rows[0]["prompt"]]
    model, tok = base.load()
    result: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct", "task": "facts-same", "n_facts": n_facts,
        "steps": steps, "seed": seed, "learning_rate": LEARNING_RATE,
        "probe_items": len(base.probe_pairs()), "base_nll": base.base_nll,
        "new_fact": {"prompt": rows[0]["prompt"], "answer": rows[0]["completion"].strip()},
        "before": {q: _answer(model, tok, q) for q in questions}, "runs": {},
    }
    del model
    with tempfile.TemporaryDirectory() as work:
        for name, keep in DEMO_RUNS.items():
            logger.info("demo: training %s", name)
            model, tok, logs = _train(base, rows, keep, steps=steps, seed=seed,
                                      progress=progress, work=Path(work) / name)
            scores = base.measure(model, tok, tasks=["facts-same"])
            result["runs"][name] = {
                "learned": scores["task_accuracy"]["facts-same"], "kept": scores["known_kept"],
                "kept_by_format": scores["known_kept_by_format"], "nll_rise": scores["nll_rise"],
                "answers": {q: _answer(model, tok, q) for q in questions},
                "train_log": logs,
            }
            del model
    atomic_write_json(out / "results.json", result)
    atomic_write_text(out / "table.md", _table(result))
    _plot(result, out / "demo.png")
    return result
