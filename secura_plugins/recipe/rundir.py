"""The run folder of a recipe: claimed for one recipe, resumed by the same one.

``output_dir/secura_run.json`` records which recipe the folder's progress is of (its
identity: everything that shapes the result). Rerunning that recipe resumes it; another
recipe is refused with the fields that differ. :func:`_clean_task_dir` removes
checkpoints a resumed task writes again and scratch folders of a killed save.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._fs import atomic_write_json
from ..errors import SecuraConfigError

if TYPE_CHECKING:
    from .schema import Recipe

logger = logging.getLogger(__name__)

__all__ = ["RUN_RECORD", "recipe_identity"]


#: Written into output_dir when a run starts: which recipe this folder's progress is of.
RUN_RECORD = "secura_run.json"


def recipe_identity(recipe: Recipe) -> dict[str, Any]:
    """Everything in ``recipe`` that shapes the result (not where it is written)."""
    data = dataclasses.asdict(recipe)
    for key in ("output_dir", "source"):
        data.pop(key, None)
    return json.loads(json.dumps(data, sort_keys=True, default=str))


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        out = {}
        for i, value in enumerate(data):
            out.update(_flat(value, f"{prefix}[{i}]"))
        return out
    return {prefix: data}


def _has_progress(out: Path) -> bool:
    return (out / "results.json").exists() or any(out.glob("task-*"))


def _claim_output_dir(out: Path, recipe: Recipe, resume: bool | None) -> bool:
    """Check that ``out`` is fresh or holds progress of this same recipe; record the
    recipe there. Returns whether to resume."""
    identity = recipe_identity(recipe)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    record_path = out / RUN_RECORD
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
        except json.JSONDecodeError:
            record = {}
        if record.get("recipe_sha256") != digest and _has_progress(out):
            old, new = _flat(record.get("recipe", {})), _flat(identity)
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            detail = (
                ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:3])
                or "unreadable record"
            )
            raise SecuraConfigError(
                "run.output_dir",
                f"{out} holds a run of a different recipe ({detail}); rerun the recipe it "
                "was started with to resume it, or choose another output_dir to start over",
            )
        if record.get("recipe_sha256") == digest:
            if resume is False and _has_progress(out):
                raise SecuraConfigError(
                    "run.output_dir",
                    f"{out} already holds this recipe's run and resume=False; pass "
                    "resume=None to continue it, or choose another output_dir",
                )
            logger.info("resuming the run in %s", out)
            return True
    if _has_progress(out) and not resume:
        raise SecuraConfigError(
            "run.output_dir",
            f"{out} holds outputs of a run without a {RUN_RECORD} record; pass --resume to "
            "continue it with this recipe, or choose another output_dir",
        )
    atomic_write_json(record_path, {"format": 1, "recipe_sha256": digest, "recipe": identity})
    return bool(resume)


def _writable_output_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SecuraConfigError(
            "run.output_dir",
            f"cannot create {path} ({err.strerror}); choose a folder you can write to",
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise SecuraConfigError(
            "run.output_dir", f"{path} is not writable; choose a folder you can write to"
        )
    return path


def _clean_task_dir(task_dir: Path, complete: str | None) -> None:
    """Delete checkpoint folders after ``complete`` (half-written ones, or ones the
    resumed run writes again) and scratch folders left by a killed save."""
    from ..integrations.trainer.checkpoint import checkpoint_folders

    keep = int(complete.rsplit("-", 1)[1]) if complete else -1
    stale = [path for step, path in checkpoint_folders(task_dir) if step > keep]
    stale += [
        path
        for path in task_dir.glob(".*")
        if path.is_dir() and (".tmp-" in path.name or ".old-" in path.name)
    ]
    for path in stale:
        logger.warning("removing %s (after the checkpoint resumed from)", path)
        shutil.rmtree(path, ignore_errors=True)
