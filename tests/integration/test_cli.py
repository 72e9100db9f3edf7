"""The ``secura`` command: recipes (validation, continual run, resume), merge, eval."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import helpers.trl_helpers  # noqa: F401  (environment: offline, quiet)
import pytest
import torch

pytest.importorskip("trl")

from secura_plugins import get_plugin_manager, hookimpl  # noqa: E402
from secura_plugins.cli import main  # noqa: E402
from secura_plugins.continual import EWC, ReplayBuffer, replay_count  # noqa: E402
from secura_plugins.recipe import Recipe, builtin_rows, load_recipe  # noqa: E402

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SHIPPED = sorted(p for p in RECIPES.glob("*.yaml"))

# Shrinks the shipped continual recipe to seconds (same blocks, fewer steps and layers).
SMALL = [
    "training.max_steps=4",
    "training.save_steps=2",
    "training.logging_steps=2",
    "training.per_device_train_batch_size=8",
    "tasks[2].training.max_steps=4",
    "adapter.target_modules=[q_proj, up_proj]",
    "continual.ewc.fisher_batches=2",
    "continual.replay.capacity=32",
    "probe.steps=2",
    "probe.data.n=6",
]


def _small_tasks(n: int = 64) -> list[str]:
    return [f"tasks[{i}].data.n={n}" for i in range(3)]


def _run(tmp_path: Path, *extra: str) -> int:
    args = ["train", str(RECIPES / "tiny-continual.yaml"), "--no-progress"]
    flags = [e for e in extra if e.startswith("--")]
    for item in SMALL + _small_tasks() + [e for e in extra if not e.startswith("--")]:
        args += ["--set", item]
    return main(args + flags)


@pytest.mark.parametrize("recipe", SHIPPED, ids=lambda p: p.name)
def test_shipped_recipes_validate_and_open_with_their_command(recipe, capsys):
    first = recipe.read_text().splitlines()[0]
    assert first == f"# secura train recipes/{recipe.name}"
    assert main(["train", str(recipe), "--dry-run"]) == 0
    assert "recipe OK" in capsys.readouterr().out


def test_shipped_recipe_set_has_what_the_issue_asks_for():
    names = {p.name for p in SHIPPED}
    assert {"tiny.yaml", "tiny-continual.yaml"} <= names
    real = [load_recipe(p) for p in SHIPPED if not p.name.startswith("tiny")]
    models = {r.model.name_or_path for r in real}
    assert {"Qwen/Qwen2-1.5B", "meta-llama/Llama-3.1-8B", "google/gemma-2-2b"} <= models
    assert all(r.model.load_in_4bit and r.adapter.method == "secura" for r in real)
    continual = [r for r in map(load_recipe, SHIPPED) if len(r.tasks) > 1]
    assert continual and all(r.ewc is not None and r.replay is not None for r in continual)


@pytest.mark.parametrize(
    "patch,field,hint",
    [
        ("training.max_stepz=3", "training.max_stepz", "max_steps"),
        ("adapter.rank=3", "adapter.rank", "'r'"),
        ("adapter.merge=m3", "adapter.merge", "m1"),
        ("continual.ewc.lamda=3", "continual.ewc.lamda", "lam"),
        ("tasks[0].data.builtin=ad", "tasks[0].data.builtin", "'add'"),
        ("tasks[1].data.path=missing.jsonl", "tasks[1].data", "exactly one"),
        ("model.tiny=gpt2", "model.tiny", "llama"),
        ("probe.steps=0", "probe.steps", ">= 1"),
        ("trainig.max_steps=3", "trainig", "training"),
    ],
)
def test_config_errors_name_the_field(patch, field, hint, capsys):
    code = main(["train", str(RECIPES / "tiny-continual.yaml"), "--dry-run", "--set", patch])
    err = capsys.readouterr().err
    assert code == 2
    assert f"config error: {field}:" in err and hint in err, err


def test_bad_values_rejected_when_the_run_starts(tmp_path, capsys):
    code = _run(tmp_path, f"run.output_dir={tmp_path / 'x'}", "continual.ewc.lam=-1")
    assert code == 2
    assert "continual.ewc.lam:" in capsys.readouterr().err


class StepLog:
    """A plugin recording every optimizer step a run executes (``secura_step_end``)."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    @hookimpl
    def secura_step_end(self, model, step):
        self.steps.append(step)


def test_continual_recipe_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(tmp_path, f"run.output_dir={out}") == 0
    summary = capsys.readouterr().out
    assert "avg_accuracy" in summary and "bwt" in summary

    results = json.loads((out / "results.json").read_text())
    matrix = results["accuracy_matrix"]
    assert len(matrix) == 3
    assert all(matrix[i][j] is not None for i in range(3) for j in range(i + 1))
    assert all(matrix[i][j] is None for i in range(3) for j in range(i + 1, 3))
    assert {"avg_accuracy", "bwt", "forgetting"} <= set(results)
    for i, name in enumerate(["add", "reverse", "upper"]):
        task_dir = out / f"task-{i}-{name}"
        metrics = json.loads((task_dir / "metrics.json").read_text())
        assert (task_dir / "adapter" / "adapter_config.json").is_file()
        assert EWC.load(task_dir / "ewc.safetensors").num_tasks == i + 1 == metrics["ewc_tasks"]
        buffer = ReplayBuffer.load(task_dir / "replay.jsonl")
        assert buffer.seen == 64 * (i + 1)
        assert metrics["replay_rows"] == (replay_count(64, 0.1) if i else 0)
        assert metrics["probe"] is not None
        assert (task_dir / "checkpoint-2" / "secura_callback.json").is_file()
    final = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    final_replay = (out / "task-2-upper" / "replay.jsonl").read_bytes()

    # interrupt the last task after its mid-run checkpoint (step 2 of 4), then --resume
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    last = resumed / "task-2-upper"
    for name in ("metrics.json", "ewc.safetensors", "replay.jsonl"):
        (last / name).unlink()
    for name in ("adapter", "checkpoint-4"):
        shutil.rmtree(last / name)
    shutil.rmtree(resumed / "adapter")
    (resumed / "results.json").unlink()
    log = StepLog()
    get_plugin_manager().register(log)
    try:
        assert _run(tmp_path, f"run.output_dir={resumed}", "--resume") == 0
    finally:
        get_plugin_manager().unregister(log)
    # training is deterministic, so the same adapter alone cannot tell a resume from a
    # restart: only the last task's steps after its checkpoint ran
    assert log.steps == [3, 4], log.steps
    # the same final adapter, bit for bit, and the same accuracy matrix
    assert (resumed / "adapter" / "adapter_model.safetensors").read_bytes() == final
    again = json.loads((resumed / "results.json").read_text())
    assert again["accuracy_matrix"] == matrix
    assert EWC.load(last / "ewc.safetensors").num_tasks == 3
    assert (last / "replay.jsonl").read_bytes() == final_replay


def test_merge_and_eval_commands(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            str(RECIPES / "tiny.yaml"),
            "--no-progress",
            "--set",
            f"run.output_dir={out}",
            "--set",
            "training.max_steps=3",
            "--set",
            "training.save_steps=3",
            "--set",
            "adapter.smagnorm=off",  # linear: the merged export must match exactly
            "--set",
            "adapter.merge_every=2",
            "--set",
            "tasks[0].data.n=32",
            "--set",
            "probe.data.n=4",
        ]
    )
    assert code == 0
    capsys.readouterr()
    adapter = out / "adapter"

    assert main(["eval", str(adapter), "--probe", "builtin:add:6", "--merged-gap"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pairs"] == 6
    assert report["adapter"]["loss"] == pytest.approx(report["merged"]["loss"], rel=1e-4)
    assert report["max_logit_gap"] < 1e-3

    merged = tmp_path / "merged"
    assert main(["merge", str(adapter), "--out", str(merged)]) == 0
    from transformers import AutoModelForCausalLM

    from secura_plugins import load_adapter

    ids = torch.tensor([[1, 20, 21, 22, 23, 24]])
    dense = AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    adapted = load_adapter(AutoModelForCausalLM.from_pretrained(str(out / "base")), adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-4)

    # merging into an existing folder is refused with a clear error
    assert main(["merge", str(adapter), "--out", str(merged)]) == 1
    assert "not empty" in capsys.readouterr().err


def test_eval_errors(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--probe", str(tmp_path / "missing.jsonl")]) == 2
    assert "config error: --probe:" in capsys.readouterr().err
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in builtin_rows("add", 3, seed=1)))
    assert main(["eval", str(tmp_path), "--probe", str(path)]) == 1
    assert "is not an adapter folder" in capsys.readouterr().err


def test_recipe_rows_and_path_sources(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n')
    recipe = Recipe.from_dict(
        {
            "model": {"tiny": "qwen2"},
            "tasks": [
                {"name": "file", "data": {"path": "train.jsonl"}},
                {"name": "inline", "data": {"rows": [{"text": "hello"}]}},
            ],
        },
        base_dir=tmp_path,
    )
    assert list(recipe.tasks[0].data.load()["prompt"]) == ["a", "c"]
    assert recipe.tasks[0].eval is None
    assert list(recipe.tasks[1].data.load()["text"]) == ["hello"]
    assert builtin_rows("add", 4, seed=2) == builtin_rows("add", 4, seed=2)
    assert builtin_rows("add", 4, seed=2) != builtin_rows("add", 4, seed=3)


def test_4bit_recipe_with_gradient_checkpointing(tmp_path, capsys):
    """The runner's QLoRA path: NF4 base, k-bit prep, checkpointing, fp32 adapter."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    sets = [
        f"run.output_dir={out}",
        "model.load_in_4bit=true",
        "model.gradient_checkpointing=true",
        "training.max_steps=3",
        "training.save_steps=3",
        "tasks[0].data.n=24",
        "probe.data.n=4",
        "adapter.target_modules=[q_proj, down_proj]",
    ]
    args = ["train", str(RECIPES / "tiny.yaml"), "--no-progress"]
    assert main(args + sum((["--set", s] for s in sets), [])) == 0
    meta = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert meta["secura"]["base_model"]["quantized"] is True
    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    cores = {k: v for k, v in tensors.items() if k.endswith((".A", ".B", "u_acc"))}
    assert cores and all(v.dtype == torch.float32 for v in cores.values())
    assert any(v.abs().sum() > 0 for k, v in cores.items() if k.endswith(".B"))


def test_demo_command_compares_lora_and_secura(capsys, tmp_path, tmp_path_factory):
    """`secura demo --tiny` (the tiny-base lab demo) in its CI-sized form (--quick)."""
    from secura_plugins.cli import main

    cache = tmp_path_factory.getbasetemp() / "lab-cache"  # shared with tests/integration/test_lab.py
    args = ["demo", "--tiny", "--quick", "--cache-dir", str(cache), "--out", str(tmp_path)]
    assert main([*args, "--no-progress"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "method" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["lora", "secura"]
    # measured, not the base twice: retention, ACC, learning acc, BWT, forgetting differ
    lora, secura = ([c.strip() for c in r.split("|")[4:9]] for r in rows)
    assert lora != secura, rows
    assert "base retention after each task" in out
    assert (tmp_path / "retention.png").is_file()


def test_train_and_eval_load_in_4bit_quantize_the_base_identically(tmp_path):
    """`secura train` (a recipe with load_in_4bit) and `secura eval --load-in-4bit` score
    the same NF4 weights: same bytes, scales and double-quantization statistics."""
    from bitsandbytes.nn import Linear4bit

    from secura_plugins.loading import load_base
    from secura_plugins.recipe import ModelSpec, _load_model

    spec = ModelSpec.from_dict({"tiny": "llama", "load_in_4bit": True, "seed": 3})
    trained, _ = _load_model(spec, tmp_path)
    scored = load_base(str(tmp_path / "base"), load_in_4bit=True, dtype=spec.dtype, on_gpu=True)

    def layers(model):
        return {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}

    a, b = layers(trained), layers(scored)
    assert a and a.keys() == b.keys()
    for name in a:
        wa, wb = a[name].weight, b[name].weight
        assert torch.equal(wa.data.view(torch.uint8), wb.data.view(torch.uint8)), name  # bytes
        sa, sb = wa.quant_state.as_dict(packed=True), wb.quant_state.as_dict(packed=True)
        assert sa.keys() == sb.keys(), name
        for key, value in sa.items():
            same = torch.equal(value, sb[key]) if torch.is_tensor(value) else value == sb[key]
            assert same, f"{name}.{key}"
        assert wa.quant_state.nested  # double quantization, as the recipes always had


def test_import_noise_is_hidden_from_the_secura_command_but_not_errors_or_verbose(tmp_path):
    """`secura` quiets the third-party import notices (torchao's .so loads, torch's pytree
    deprecation, bitsandbytes' optional kernels), keeps its own error and any other record
    of those loggers, and `secura -v` shows everything."""
    import logging
    import subprocess
    import sys

    from secura_plugins.cli import IMPORT_NOISE, quiet_import_noise

    def secura(*args: str) -> str:
        code = "import sys; from secura_plugins.cli import main; sys.exit(main(sys.argv[1:]))"
        run = subprocess.run(
            [sys.executable, "-c", code, *args], capture_output=True, text=True, check=False
        )
        assert run.returncode == 1, run.stderr
        return run.stderr

    cmd = ("eval", str(tmp_path / "missing"), "--probe", "builtin:add:2")
    quiet, loud = secura(*cmd), secura("-v", *cmd)
    for out in (quiet, loud):
        assert "secura: error:" in out and "adapter_config.json is missing" in out
    for noise in ("Failed to load", "is an Enum subclass"):
        assert noise not in quiet
    if "torchao" in loud:  # this environment's torchao cannot load its CUDA extensions
        assert "Failed to load" in loud
    # Only the listed notices are dropped: anything else on those loggers goes through.
    quiet_import_noise()
    for name, prefix in IMPORT_NOISE:
        logger = logging.getLogger(name)
        for msg, shown in ((prefix + "x", False), ("something else went wrong", True)):
            record = logger.makeRecord(name, logging.WARNING, "f", 1, msg, (), None)
            assert bool(logger.filter(record)) is shown, (name, msg)
