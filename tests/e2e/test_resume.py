"""Kill ``secura train`` (SIGKILL) mid-task and mid-save; the same command resumes it to
the very adapter an uninterrupted run writes.

Every run is a real process running the ``secura train`` command on the tiny model (a
fresh ``python -m secura_plugins.cli`` interpreter for the preemption test, forked
processes calling the CLI's ``main`` elsewhere, to spare ~15 s of imports per run):
two tasks with SECURA (M1 merges every 2 steps), online EWC and replay, a checkpoint
every 2 steps. Kills come two ways: from outside at an arbitrary moment after a
checkpoint exists (a preemption), and from inside at named points of a save
(``SECURA_TEST_KILL_AT``, test-only, see :mod:`secura_plugins.faults`). The comparison
is bit for bit: CPU training here is deterministic (same seeds, same thread count),
and resume restores every piece of state exactly (adapter with ``U_acc`` and merge
count, optimizer, scheduler, RNG, EWC Fisher and anchors, replay buffer), so any
difference is a resume bug, not noise.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from secura_plugins import faults, hookimpl  # noqa: E402
from secura_plugins.faults import KILL_ENV  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

RECIPE = """\
run: {seed: 0}
model: {tiny: llama}
adapter: {method: secura, r: 4, k: 8, merge: m1, merge_every: 2,
          target_modules: [q_proj, up_proj]}
training: {max_steps: 4, per_device_train_batch_size: 4, learning_rate: 1.0e-2,
           lr_scheduler_type: constant, logging_steps: 2, save_steps: 2, max_length: 32,
           use_cpu: true, dataloader_num_workers: 0, save_total_limit: 2}
tasks:
  - {name: add, data: {builtin: add, n: 32}, eval: {builtin: add, n: 2, seed: 5}}
  - {name: upper, data: {builtin: upper, n: 32}, eval: {builtin: upper, n: 2, seed: 5},
     training: {max_steps: 6}}
continual:
  ewc: {lam: 1.0e+6, fisher_batches: 2}
  replay: {ratio: 0.25, capacity: 16}
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        OMP_NUM_THREADS="1",
        TQDM_DISABLE="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
    )
    env.pop(KILL_ENV, None)
    return env


def _argv(recipe: Path, out: Path) -> list[str]:
    return ["train", str(recipe), "--no-progress", "--output-dir", str(out)]


class _StepPrinter:
    """A plugin printing every optimizer step the run executes (``secura_step_end``).

    Training is deterministic, so the final adapter alone cannot tell a resume from a
    restart; the executed steps can.
    """

    @hookimpl
    def secura_step_end(self, model, step):
        print(f"{STEP_MARK}{step}", file=sys.stderr, flush=True)


STEP_MARK = "[test] optimizer step "


def _steps(log: str) -> list[int]:
    return [int(line[len(STEP_MARK) :]) for line in log.splitlines() if line.startswith(STEP_MARK)]


def _child(argv: list[str], kill_at: str | None, log: str) -> None:
    # A forked process runs the CLI's main(): a real process that SIGKILL really kills,
    # without paying the ~15 s of imports of a fresh interpreter for every run.
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    os.dup2(fd, 1)
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 (pytest's capture objects)
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    root = logging.getLogger()
    for handler in list(root.handlers):  # pytest's capture handlers
        root.removeHandler(handler)
    root.addHandler(logging.StreamHandler(sys.stderr))
    root.setLevel(logging.WARNING)
    torch.set_num_threads(1)  # the same thread count as the OMP_NUM_THREADS=1 subprocess
    faults._hits.clear()
    if kill_at:
        os.environ[KILL_ENV] = kill_at
    else:
        os.environ.pop(KILL_ENV, None)
    from secura_plugins import get_plugin_manager
    from secura_plugins.cli import main

    get_plugin_manager().register(_StepPrinter())  # this forked process only
    code = 1
    try:
        code = main(argv)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _train(recipe: Path, out: Path, kill_at: str | None = None) -> tuple[int, str]:
    """Run ``secura train`` in a forked process; (exit status, stderr + stdout)."""
    log = out.parent / f"{out.name}-{time.monotonic_ns()}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = multiprocessing.get_context("fork").Process(
        target=_child, args=(_argv(recipe, out), kill_at, str(log))
    )
    proc.start()
    proc.join(600)
    return proc.exitcode, log.read_text()


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _assert_same_run(out: Path, reference: Path) -> None:
    ours, theirs = _adapter(out), _adapter(reference)
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    assert any(k.endswith("u_acc") and v.abs().sum() > 0 for k, v in ours.items())
    for name in ("task-0-add", "task-1-upper"):
        a = json.loads((out / name / "metrics.json").read_text())
        b = json.loads((reference / name / "metrics.json").read_text())
        assert (a["steps"], a["accuracy_row"], a["ewc_tasks"]) == (
            b["steps"],
            b["accuracy_row"],
            b["ewc_tasks"],
        )
    from secura_plugins.continual import EWC

    ewc, ewc_ref = (EWC.load(d / "task-1-upper" / "ewc.safetensors") for d in (out, reference))
    assert ewc.num_tasks == ewc_ref.num_tasks == 2
    for key in ewc_ref.fisher:
        assert torch.equal(ewc.fisher[key], ewc_ref.fisher[key]), key
        assert torch.equal(ewc.anchors[key], ewc_ref.anchors[key]), key
    replay = Path("task-1-upper") / "replay.jsonl"
    assert (out / replay).read_bytes() == (reference / replay).read_bytes()


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "two-tasks.yaml"
    path.write_text(RECIPE)
    return path


@pytest.fixture(scope="module")
def reference(recipe: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    code, log = _train(recipe, out)
    assert code == 0, log[-3000:]
    return out


def test_sigkill_mid_task_then_same_command_resumes(recipe, reference, tmp_path):
    """A preemption: SIGKILL from outside, as soon as task 2 has a complete checkpoint.

    The killed run is a fresh ``python -m secura_plugins.cli train`` interpreter.
    """
    out = tmp_path / "run"
    marker = out / "task-1-upper" / "checkpoint-2" / "secura_callback.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "secura_plugins.cli", *_argv(recipe, out)],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    assert not (out / "results.json").exists() and not (out / "adapter").exists()
    assert not (out / "task-1-upper" / "metrics.json").exists()

    code, log = _train(recipe, out)
    assert code == 0, log[-3000:]
    _assert_same_run(out, reference)
    # task 1 was done; task 2 resumed after its last complete checkpoint (step 2 or 4)
    steps = _steps(log)
    assert steps and steps[0] in (3, 5) and steps == list(range(steps[0], 7)), steps


def test_sigkill_inside_saves_then_same_command_resumes(recipe, reference, tmp_path):
    """Killed inside three different saves in a row, each rerun picking up the pieces."""
    out = tmp_path / "run"
    task2 = out / "task-1-upper"
    # 1. task 2's second checkpoint is fully written except its completion marker
    code, _ = _train(recipe, out, kill_at="checkpoint-marker#4")
    assert code == -signal.SIGKILL
    assert (out / "task-0-add" / "metrics.json").is_file()
    ckpt4 = task2 / "checkpoint-4"
    assert (ckpt4 / "optimizer.pt").is_file() and not (ckpt4 / "secura_callback.json").exists()

    # 2. rerun: task 2 resumes from checkpoint-2 (checkpoint-4 is not taken), then the
    #    run dies while writing the adapter of checkpoint-6 (the middle of a Trainer save)
    code, log = _train(recipe, out, kill_at="adapter-weights#2")
    assert code == -signal.SIGKILL
    assert f"skipping incomplete checkpoint {ckpt4}: no secura_callback.json" in log
    assert not (task2 / "checkpoint-6" / "adapter_config.json").exists()
    assert any(p.name.startswith(".checkpoint-6.tmp-") for p in task2.iterdir())

    # 3. rerun: resumes from checkpoint-4, trains to the end and dies after writing the
    #    task's adapter, EWC and replay files but before metrics.json
    code, _ = _train(recipe, out, kill_at="task-metrics")
    assert code == -signal.SIGKILL
    assert (task2 / "adapter" / "adapter_config.json").is_file()
    assert not (task2 / "metrics.json").exists()
    assert not any(p.name.startswith(".checkpoint-6.tmp-") for p in task2.iterdir())

    # 4. rerun: resumes from checkpoint-4 again (the complete checkpoint-6 sits at
    #    max_steps, from which transformers would train one step too many), consolidates
    #    EWC, adds the replay rows, writes the outputs: the uninterrupted run's adapter
    code, log = _train(recipe, out)
    assert code == 0, log[-3000:]
    assert _steps(log) == [5, 6]  # from checkpoint-4: not a restart of task 2
    _assert_same_run(out, reference)


def test_a_different_recipe_in_the_same_folder_is_refused(recipe, reference, tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text(RECIPE.replace("learning_rate: 1.0e-2", "learning_rate: 2.0e-2"))
    before = _adapter(reference)
    code, log = _train(other, reference)
    assert code == 2
    assert log.strip().splitlines()[-1] == (
        f"secura: config error: run.output_dir: {reference} holds a run of a different "
        "recipe (training.learning_rate: 0.01 -> 0.02); rerun the recipe it was started "
        "with to resume it, or choose another output_dir to start over"
    )
    after = _adapter(reference)
    assert all(torch.equal(before[k], after[k]) for k in before)
