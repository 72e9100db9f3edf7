"""The lab and the demo on the real model, SmolLM2-135M-Instruct (``secura_plugins.real_model``,
installed by ``make``): ``secura bench --base real --quick`` and ``secura demo --quick``.

Split from ``tests/integration/test_lab.py`` and ``tests/integration/test_cli.py``, which
run the same commands on the tiny base.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.real_model

PNG = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- the real-model lab
# SmolLM2-135M-Instruct (secura_plugins.real_model, installed by `make`). Only the quick
# real lab is run here: one task (12 new fictional capitals in the probe's own format),
# 16 LoRA steps, then the probe of what the base knew, asked again by greedy generation.


@pytest.fixture(scope="module")
def real_quick(tmp_path_factory):
    from secura_plugins.cli import main

    out = tmp_path_factory.mktemp("real-lab")
    args = ["bench", "--base", "real", "--quick", "--methods", "lora", "--seeds", "0"]
    args += ["--lr", "lora=3e-3"]
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    return out, json.loads(Path(out, "results.json").read_text())


def test_real_quick_lab_learns_and_measures_what_the_base_knew(real_quick):
    from secura_plugins.lab.real import RealSpec, real_base

    out, result = real_quick
    cfg = result["config"]
    assert cfg["tasks"] == ["facts-same"] and cfg["base"]["four_bit"] is False
    base = real_base(RealSpec(**cfg["base"]), progress=False)
    model, tok = base.load()
    before = base.measure(model, tok, tasks=["facts-same"])
    assert before["known_kept"] == 1.0 and before["nll_rise"] == pytest.approx(0.0, abs=1e-6)
    (run,) = result["runs"]
    learned = run["matrix"][0][0]
    # real learning: the trained model answers new facts the base did not know
    assert learned > before["task_accuracy"]["facts-same"] + 0.2
    # retention comes from the probe's generations, format by format
    (by_format,) = run["probe_by_format"]
    assert set(by_format) == set(base.probe) and len(base.probe) >= 3
    total = sum(len(p) for p in base.probe.values())
    weighted = sum(by_format[f] * len(p) for f, p in base.probe.items()) / total
    assert run["retention"] == [pytest.approx(weighted)]
    assert 0.0 < run["retention"][0] <= 1.0
    assert run["nll"][0] == pytest.approx(base.base_nll + run["nll_rise"][0])
    assert result["base"]["probe_kept"] == {f: len(p) for f, p in base.probe.items()}
    table = Path(out, "table.md").read_text()
    assert "| lora |" in table and "known kept" in table
    assert Path(out, "retention.png").read_bytes().startswith(PNG)


def test_real_lab_data_and_chat_rendering():
    from transformers import AutoTokenizer

    from secura_plugins.lab.real import END_OF_TURN, render_pairs
    from secura_plugins.lab.real_data import PROBE_CANDIDATES, REAL_TASKS, task_examples
    from secura_plugins.real_model import smollm2_checkpoint

    prompts = [p for pairs in PROBE_CANDIDATES.values() for p, _ in pairs]
    assert len(prompts) == len(set(prompts)) and 200 <= len(prompts) <= 400
    assert len(PROBE_CANDIDATES) >= 3
    facts = task_examples("facts-same", 32)
    assert facts == task_examples("facts-same", 32)
    assert len({r["prompt"] for r in facts}) == 32
    # same format as the probe's capital items, but none of their countries
    known = {p for p, _ in PROBE_CANDIDATES["capital"]}
    assert all(r["prompt"].startswith("The capital of ") for r in facts)
    assert not known & {r["prompt"] for r in facts}
    train = {r["prompt"] for r in task_examples("json", 64)}
    held = {r["prompt"] for r in task_examples("json", 64, held_out=True)}
    assert not train & held
    tok = AutoTokenizer.from_pretrained(str(smollm2_checkpoint()))
    tok.eos_token = END_OF_TURN
    ((prompt, answer),) = render_pairs(task_examples("chat-initials", 1), tok)
    assert prompt.endswith("<|im_start|>assistant\n") and "Initials of" in prompt
    assert answer.count(".") == 3
    with pytest.raises(ValueError, match="tag"):
        task_examples("nope", 1)
    assert list(REAL_TASKS)[0] == "facts-same"


@pytest.mark.parametrize("task, head, tail", [
    ("facts-other", "Q: What is", "\nA:"),  # an ending that spans lines
    ("json", "Format as JSON:", "\nJSON:"),
])
def test_the_base_writes_rehearsal_prompts_in_a_multi_line_template(task, head, tail):
    """With ``task_layout``, self-rehearsal asks the base questions in the task's own
    layout even when the template's shared ending spans lines (Q/A, JSON), where the
    exact-ending search of the preset writes none."""
    from secura_plugins.keep import KeepConfig
    from secura_plugins.keep.rehearsal import generate_rehearsal
    from secura_plugins.lab.real import load_real_model
    from secura_plugins.lab.real_data import task_examples

    model, tok = load_real_model()
    rows = task_examples(task, 32)
    prompts = [r["prompt"] for r in rows]
    config = KeepConfig(rehearsal=6, generic_share=0.0, max_seconds=300, task_layout=True)
    out = generate_rehearsal(model, tok, prompts, config, progress=False)
    assert len(out) >= 4 and {r["kind"] for r in out} == {"task"}, out
    assert all(r["prompt"].startswith(head) and r["prompt"].endswith(tail) for r in out), out
    assert not {r["prompt"] for r in out} & set(prompts)  # other subjects than the task's


def test_demo_on_the_real_model_trains_both_runs_and_measures_them(capsys, tmp_path):
    """`secura demo --quick`: the README's main command on SmolLM2 (4 facts, 4 steps)."""
    import json

    pytest.importorskip("gguf", reason="the real model needs: pip install gguf")
    from secura_plugins.cli import main

    assert main(["demo", "--quick", "--threads", "2", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "results.json").read_text())
    lora, keep = result["runs"]["lora"], result["runs"]["lora+keep"]
    # keep trains 4 / (1 - 0.5) steps: every task row as often as LoRA, rehearsal on top
    assert (lora["train_log"]["steps"], keep["train_log"]["steps"]) == (4, 8)
    for run in (lora, keep):  # trained: the loss fell; measured: numbers from generations
        assert run["train_log"]["loss"][-1] < run["train_log"]["loss"][0]
        assert 0.0 <= run["kept"] <= 1.0 and run["kept_by_format"]
        assert set(run["answers"]) == set(result["before"])
    assert not lora["train_log"]["keep_kl"]  # plain LoRA has no anchor
    assert max(keep["train_log"]["keep_kl"]) > 0  # the KL anchor to the base is active
    assert (lora["kept"], lora["nll_rise"]) != (keep["kept"], keep["nll_rise"])
    assert result["before"]["The capital of France is"].startswith("Paris")
    assert "| lora+keep |" in out and (tmp_path / "demo.png").is_file()
