"""Mutation check: break one line of the library at a time and expect named tests to fail.

Each mutation replaces an exact piece of text in one file of a scratch copy of the
repository, then runs only the tests that guard that feature (one pytest process per
mutation, one torch thread). A mutation is *killed* when those tests fail, and
*SURVIVED* when they all pass: then the suite no longer notices the feature breaking.
The exit status is non-zero when any mutation survives, when its text is no longer in
the file (the code moved: update the table), or when the tests could not run.

Run it from the repository root (it takes several minutes; `make mutants` does the same)::

    python tools/mutants.py                 # every mutation
    python tools/mutants.py --list          # the table
    python tools/mutants.py --only ewc-off-loss,u-acc-saved-as-zeros
    python tools/mutants.py --skip-pending  # leave out mutations marked pending

Not part of CI: it reruns slow end-to-end tests (axolotl, SIGKILL resume) many times.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IGNORE = shutil.ignore_patterns(
    ".git", ".venv*", "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache", "*.egg-info"
)


@dataclass(frozen=True)
class Mutation:
    """Replace ``original`` (exactly once in ``path``) by ``replacement``."""

    name: str
    path: str
    original: str
    replacement: str
    tests: tuple[str, ...]
    why: str
    pending: str = ""  # non-empty: known to survive until that work lands (the reason)


MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "recipe-resume-ignored",
        "secura_plugins/recipe/runner.py",
        "        return checkpoint\n",
        "        return None\n",
        (
            "tests/integration/test_cli.py::test_continual_recipe_end_to_end_and_resume",
            "tests/e2e/test_resume.py::test_sigkill_mid_task_then_same_command_resumes",
        ),
        "issue 16.1: `secura train --resume` restarts the task instead of resuming",
    ),
    Mutation(
        "trl-resume-ignored",
        "secura_plugins/integrations/trainer/callback.py",
        "return original_train(self._resume_dir, *args, **kwargs)",
        "return original_train(None, *args, **kwargs)",
        ("tests/integration/test_trl.py::test_resume_gives_same_final_adapter",),
        "issue 16.1: trainer.train(resume_from_checkpoint=...) silently starts over",
    ),
    Mutation(
        "callback-state-not-loaded",
        "secura_plugins/integrations/trainer/callback.py",
        "    def _load_state(self, folder: Path) -> None:\n",
        "    def _load_state(self, folder: Path) -> None:\n        return\n",
        (
            "tests/integration/test_trl.py::test_replay_buffer_saved_in_checkpoints_and_restored",
            "tests/integration/test_trl.py::test_ewc_state_saved_in_checkpoints_and_restored",
        ),
        "issue 16.1: the callback's EWC/replay state is not read back from a checkpoint",
    ),
    Mutation(
        "ewc-off-loss",
        "secura_plugins/continual/ewc.py",
        "        return 0.5 * self.lam * total\n",
        "        return 0.0 * total\n",
        ("tests/unit/test_continual.py::test_large_lambda_keeps_parameters_near_anchor[loss]",),
        "issue 16.2: EWC.penalty returns 0",
    ),
    Mutation(
        "ewc-off-grad",
        "secura_plugins/continual/ewc.py",
        "            g = (self.lam * f * diff).to(p.dtype)",
        "            g = (0.0 * f * diff).to(p.dtype)",
        ("tests/unit/test_continual.py::test_large_lambda_keeps_parameters_near_anchor[grad]",),
        "issue 16.2: EWC.penalty_grad_ adds no gradient",
    ),
    Mutation(
        "lab-learning-rate-zero",
        "secura_plugins/lab/runner.py",
        "                learning_rate=lr,",
        "                learning_rate=0.0,",
        (
            "tests/integration/test_lab.py::test_quick_lab_writes_measured_results",
            "tests/integration/test_cli.py::test_demo_command_compares_lora_and_secura",
        ),
        "issue 16.3: the lab trains nothing",
    ),
    Mutation(
        "4bit-selection-oracle",
        "secura_plugins/methods/base.py",
        "    weight = dequantized_weight(base)\n",
        "    weight = dequantized_weight(base)\n"
        "    weight = weight.roll(1, 0).roll(1, 1) if hasattr(base.weight, 'quant_state') "
        "else weight\n",
        ("tests/unit/test_methods.py::test_cabr_keeps_the_smallest_norm_rows_and_columns[4bit]",),
        "issue 16.4: 4-bit dequantization is wrong (rows/columns shifted); the test's "
        "oracle must not be base_weight() itself",
    ),
    Mutation(
        "load-skips-trained-tensors",
        "secura_plugins/io.py",
        "            target.copy_(source.to(device=target.device, dtype=target.dtype))",
        "            None if key.endswith(('.A', '.B', '.u_acc')) else "
        "target.copy_(source.to(device=target.device, dtype=target.dtype))",
        ("tests/unit/test_safety.py::test_pickle_files_in_an_adapter_folder_are_never_opened",),
        "issue 16.5: the loader skips A, B and U_acc",
    ),
    Mutation(
        "gate-mean-of-inverse",
        "secura_plugins/methods/secura.py",
        "    mean = w.mean() + 1.0\n",
        "    mean = (2.0 / (w + 1.0)).mean()\n",
        ("tests/unit/test_methods.py::test_gate_mean_is_reported_after_a_forward",),
        "issue 16.6: the logged gate mean is mean(2/S), not mean(S)",
    ),
    Mutation(
        "unsafe-torch-load-alias",
        "secura_plugins/io.py",
        "def _load_tensor_file(",
        "def _unsafe(path):\n    from torch import load\n\n    return load(path)\n\n\n"
        "def _load_tensor_file(",
        ("tests/unit/test_safety.py::test_the_package_never_unpickles_or_loads_yaml_unsafely",),
        "issue 16.7: `from torch import load; load(path)` (unpickling) in io.py",
    ),
    Mutation(
        "u-acc-saved-as-zeros",
        "secura_plugins/io.py",
        '            k: v.detach().to("cpu").contiguous()\n',
        '            k: (v * 0 if k.endswith("u_acc") else v).detach().to("cpu").contiguous()\n',
        (
            "tests/unit/test_io.py::test_saved_folder_holds_every_piece_of_state",
            "tests/unit/test_io.py::test_reloading_weights_into_the_same_model",
            "tests/integration/test_reload.py::test_reload_in_a_fresh_process",
        ),
        "issue 16.8: save_adapter writes U_acc as zeros",
    ),
    Mutation(
        "axolotl-task2-fresh-adapter",
        "secura_plugins/integrations/axolotl/plugin.py",
        "peft_model = core.load_adapter(model, cfg.lora_model_dir, is_trainable=not inference)",
        "peft_model = core.apply_adapter(model, config)",
        ("tests/e2e/test_axolotl.py::test_continual_ewc_and_replay_across_two_axolotl_runs",),
        "issue 16.9: lora_model_dir is logged but a fresh adapter is trained",
    ),
)


def apply(mutation: Mutation, tree: Path) -> None:
    """Apply ``mutation`` in ``tree``; fail loudly unless its text occurs exactly once."""
    path = tree / mutation.path
    text = path.read_text()
    count = text.count(mutation.original)
    if count != 1:
        raise LookupError(
            f"{mutation.name}: the original text occurs {count} times in {mutation.path} "
            f"(expected once; did the code move?): {mutation.original!r}"
        )
    path.write_text(text.replace(mutation.original, mutation.replacement))


def run_tests(tree: Path, tests: tuple[str, ...], python: str, timeout: float) -> tuple[int, str]:
    """pytest on ``tests`` in ``tree`` (stop at the first failure); (exit status, output)."""
    env = dict(os.environ)
    env.update(PYTHONPATH=str(tree), OMP_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    venv_bin = str(Path(python).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")  # axolotl's CLI, secura
    cmd = [python, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", *tests]
    try:
        proc = subprocess.run(
            cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        return 124, f"timed out after {timeout:.0f} s: {exc}"
    return proc.returncode, proc.stdout + proc.stderr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated mutation names")
    parser.add_argument("--skip-pending", action="store_true", help="leave out pending ones")
    parser.add_argument("--list", action="store_true", help="print the table and exit")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="only check that every mutation applies and compiles (seconds, no tests)",
    )
    parser.add_argument(
        "--baseline", action="store_true", help="first run the named tests unmutated"
    )
    parser.add_argument("--python", default=sys.executable, help="the project's interpreter")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per mutation")
    args = parser.parse_args(argv)

    chosen = list(MUTATIONS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(names) - {m.name for m in MUTATIONS})
        if unknown:
            parser.error(f"--only: unknown mutation(s) {unknown}; see --list")
        chosen = [m for m in MUTATIONS if m.name in names]
    if args.skip_pending:
        chosen = [m for m in chosen if not m.pending]
    if args.list:
        for m in chosen:
            flag = f"  [pending: {m.pending}]" if m.pending else ""
            print(f"{m.name:30s} {m.path}: {m.why}{flag}")
            for test in m.tests:
                print(f"{'':30s}   {test}")
        return 0

    failures = 0
    with tempfile.TemporaryDirectory(prefix="secura-mutants-") as tmp:
        tree = Path(tmp) / "repo"
        shutil.copytree(ROOT, tree, ignore=IGNORE)
        if args.baseline:
            tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
            code, out = run_tests(tree, tests, args.python, args.timeout * len(chosen))
            print(f"baseline (unmutated): {'passed' if code == 0 else 'FAILED'}", flush=True)
            if code != 0:
                print(out[-3000:])
                return 2
        for m in chosen:
            start = time.monotonic()
            original = (tree / m.path).read_text()
            if args.dry_run:
                try:
                    apply(m, tree)
                    compile((tree / m.path).read_text(), m.path, "exec")
                    print(f"{m.name:30s} applies", flush=True)
                except (LookupError, SyntaxError) as exc:
                    print(f"{m.name:30s} ERROR   {exc}", flush=True)
                    failures += 1
                finally:
                    (tree / m.path).write_text(original)
                continue
            try:
                apply(m, tree)
            except LookupError as exc:
                print(f"{m.name:30s} ERROR   {exc}", flush=True)
                failures += 1
                continue
            try:
                code, out = run_tests(tree, m.tests, args.python, args.timeout)
            finally:
                (tree / m.path).write_text(original)
            took = f"{time.monotonic() - start:6.0f} s"
            if code == 1:
                verdict = "killed"
            elif code == 0:
                verdict = "SURVIVED"
                failures += 1
            else:  # 2-5: interrupted, internal or usage error, no tests collected; 124
                verdict = f"ERROR (pytest exit {code})"
                failures += 1
            pending = f"  (pending: {m.pending})" if m.pending else ""
            print(f"{m.name:30s} {verdict:8s} {took}  {m.why}{pending}", flush=True)
            if verdict.startswith("ERROR"):
                print(out[-2000:], flush=True)
            elif verdict == "killed":  # which test caught it, and how
                caught = [ln for ln in out.splitlines() if ln.startswith(("FAILED", "ERROR"))]
                print(f"{'':30s}   {caught[0][:150] if caught else '?'}", flush=True)
    if args.dry_run:
        print("all mutations apply" if not failures else f"{failures} mutation(s) do not apply")
    else:
        print("all mutations killed" if not failures else f"{failures} mutation(s) not killed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
