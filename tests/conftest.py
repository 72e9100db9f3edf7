"""Test tiers. Every test module lives in one tier folder, which gives it its marker:

- ``tests/unit/`` (``-m unit``): layer, config, save/load and error-message checks on tiny
  models built in the test, in this process, no subprocess. Kept with their subject
  although they train a few steps: the bad-input table and the NaN halt (``secura train``
  through the CLI's ``main``) and the speed guard's quick mode. The doctests in
  ``secura_plugins/`` belong here too. ``make test-quick`` runs this tier.
- ``tests/integration/`` (``-m integration``): the real TRL ``SFTTrainer``, PEFT and
  bitsandbytes through training runs on tiny models (``secura train``, the lab, the keep
  tools, ``secura forgetting``), a plugin installed for a fresh interpreter, the wheel.
- ``tests/e2e/`` (``-m e2e``): axolotl's CLI in subprocesses, ``torchrun``, SIGKILL
  resumes, the merge soak and the runs on the real SmolLM2 checkpoint.

A test module directly in ``tests/`` (or in any folder that is not a tier) stops the run
with a message saying where to move it. Shared fixtures and helpers are the
``tests/helpers`` package, imported as ``helpers`` (pyproject puts ``tests/`` on the path).
"""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path

import pytest

pytest_plugins = ["helpers.fixtures"]

TESTS = Path(__file__).resolve().parent
PACKAGE = TESTS.parent / "secura_plugins"
TIERS = ("unit", "integration", "e2e")
_UNTIERED = pytest.StashKey[list]()


def tier_of(path: Path) -> str | None:
    """The tier of a collected file: its tier folder under ``tests/``; ``unit`` for doctests."""
    path = Path(path).resolve()
    if path.is_relative_to(PACKAGE):
        return "unit"
    if path.is_relative_to(TESTS):
        parts = path.relative_to(TESTS).parts
        if len(parts) > 1 and parts[0] in TIERS:
            return parts[0]
    return None


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_UNTIERED] = []


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> None:
    """Note every test module under ``tests/`` that is outside the tier folders."""
    patterns = parent.config.getini("python_files")
    if (
        file_path.suffix == ".py"
        and file_path.resolve().is_relative_to(TESTS)
        and any(fnmatch(file_path.name, pattern) for pattern in patterns)
        and tier_of(file_path) is None
    ):
        parent.config.stash[_UNTIERED].append(file_path)


@pytest.hookimpl(tryfirst=True)  # before -m selects by the tier markers added here
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = TESTS.parent
    untiered = sorted({str(Path(p).resolve().relative_to(root)) for p in config.stash[_UNTIERED]})
    if untiered:
        raise pytest.UsageError(
            f"{', '.join(untiered)}: a test module must live in a tier folder. Move it with "
            "`git mv` into tests/unit/ (in-process math, no Trainer run, no subprocess), "
            "tests/integration/ (TRL/PEFT/bitsandbytes training runs on tiny models) or "
            "tests/e2e/ (axolotl CLI, torchrun, SIGKILL resumes, soak, the real model); "
            "tests/conftest.py describes the tiers"
        )
    for item in items:
        tier = tier_of(item.path)
        if tier is not None:
            item.add_marker(tier)
