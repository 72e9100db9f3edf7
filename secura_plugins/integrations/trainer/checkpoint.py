"""Checkpoint format of a ``SecuraCallback`` run, completeness, and the sharding policy.

A ``Trainer`` checkpoint folder (``checkpoint-<step>``) of a run with the callback holds,
besides the Trainer's own files:

* ``secura_ewc.safetensors`` (:data:`EWC_STATE_NAME`): EWC Fisher and anchors;
* ``secura_replay.jsonl`` (:data:`REPLAY_STATE_NAME`): the replay buffer;
* ``secura_callback.json`` (:data:`CALLBACK_STATE_NAME`), written *last*: probe baseline,
  settings and the size of every other file of the folder. It is the completion marker:
  ``Trainer`` writes a checkpoint file by file and calls ``on_save`` after all of them,
  so a folder whose marker parses and whose files all have the listed sizes is complete
  (:func:`checkpoint_problem`). :func:`last_complete_checkpoint` skips any other.

The same names are used by the axolotl plugin, which reads the previous task's state
from ``lora_model_dir``.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> root = Path(tempfile.mkdtemp())
    >>> folder = checkpoint_dir(root, 4)
    >>> folder.mkdir()
    >>> _ = (folder / "model.safetensors").write_bytes(b"weights")
    >>> print(checkpoint_problem(folder))
    no secura_callback.json (the save was interrupted)
    >>> write_marker(folder, {"format": 1}, manifest=True)
    >>> checkpoint_problem(folder) is None, last_complete_checkpoint(root) == str(folder)
    (True, True)
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..._fs import atomic_write_json, fsync_tree, is_temp_name
from ...faults import kill_point

logger = logging.getLogger(__name__)

__all__ = [
    "CALLBACK_STATE_NAME",
    "EWC_STATE_NAME",
    "REPLAY_STATE_NAME",
    "checkpoint_dir",
    "checkpoint_folders",
    "checkpoint_problem",
    "last_complete_checkpoint",
    "read_marker",
    "sharding_problem",
    "trainer_sharding",
    "write_marker",
]

CALLBACK_STATE_NAME = "secura_callback.json"
EWC_STATE_NAME = "secura_ewc.safetensors"
REPLAY_STATE_NAME = "secura_replay.jsonl"


# --------------------------------------------------------------------------- folders
def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    """The folder ``Trainer`` writes the checkpoint of ``step`` into."""
    return Path(output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"


def checkpoint_folders(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-<step>`` folder under ``folder``, by step.

    Names must match exactly (``checkpoint-12.old`` is not a checkpoint), as in
    ``transformers.trainer_utils.get_last_checkpoint``, which returns only the newest
    folder, complete or not.
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    pattern = re.compile(rf"{re.escape(PREFIX_CHECKPOINT_DIR)}-(\d+)")
    found = []
    for path in root.iterdir():
        match = pattern.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


# --------------------------------------------------------------------------- marker
def _checkpoint_files(folder: Path) -> dict[str, int]:
    """Relative path -> size of every file under ``folder`` except the marker and temps."""
    return {
        p.relative_to(folder).as_posix(): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != CALLBACK_STATE_NAME and not is_temp_name(p.name)
    }


def write_marker(folder: str | os.PathLike, state: dict[str, Any], *, manifest: bool) -> None:
    """Write ``secura_callback.json`` into ``folder`` (atomically, after everything else).

    With ``manifest`` (Trainer checkpoints) every file of ``folder`` is fsynced first and
    the marker lists each with its size, which marks the checkpoint complete.
    """
    folder = Path(folder)
    state = dict(state)
    if manifest:
        kill_point("checkpoint-marker")  # test-only crash point (secura_plugins.faults)
        fsync_tree(folder)
        state["files"] = _checkpoint_files(folder)
    atomic_write_json(folder / CALLBACK_STATE_NAME, state)


def read_marker(folder: str | os.PathLike) -> dict[str, Any]:
    """The content of ``folder``'s ``secura_callback.json`` (see :func:`checkpoint_problem`)."""
    return json.loads((Path(folder) / CALLBACK_STATE_NAME).read_text())


def checkpoint_problem(folder: str | os.PathLike, *, require_manifest: bool = True) -> str | None:
    """Why ``folder`` is not a complete checkpoint of a ``SecuraCallback`` run, or None.

    Complete means: ``secura_callback.json`` (written last) parses, and every file it
    lists is present with the size it had when the checkpoint was finished. With
    ``require_manifest=False`` a marker that lists no files (an older version's, or a
    state folder saved outside a Trainer checkpoint) is accepted as it is.
    """
    folder = Path(folder)
    marker = folder / CALLBACK_STATE_NAME
    if not marker.is_file():
        return f"no {CALLBACK_STATE_NAME} (the save was interrupted)"
    try:
        state = read_marker(folder)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{CALLBACK_STATE_NAME} is not valid JSON"
    files = state.get("files")
    if not isinstance(files, dict):
        if not require_manifest:
            return None
        return f"{CALLBACK_STATE_NAME} lists no files (written by an older version)"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} when it was saved"
    return None


def last_complete_checkpoint(
    folder: str | os.PathLike, *, before_step: int | None = None
) -> str | None:
    """The ``checkpoint-<step>`` folder of highest step under ``folder`` that is complete
    (see :func:`checkpoint_problem`), or None. Incomplete ones are skipped with a warning.

    ``before_step`` skips checkpoints at or after that step. Pass ``max_steps`` when
    training stops mid-epoch: transformers (5.16 to at least 5.23) resumed from a
    checkpoint *at* ``max_steps`` of a partial epoch runs one extra optimizer step, so
    the earlier checkpoint is the one that reproduces the uninterrupted run.

    Example:
        >>> import tempfile
        >>> last_complete_checkpoint(tempfile.mkdtemp()) is None
        True
    """
    for step, path in reversed(checkpoint_folders(folder)):
        if before_step is not None and step >= before_step:
            continue
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        logger.warning("skipping incomplete checkpoint %s: %s", path, problem)
    return None


# --------------------------------------------------------------------------- sharding
def sharding_problem(
    *, fsdp: bool, zero_stage: int | None, merge: str | None, ewc: bool
) -> str | None:
    """Why this combination of parameter sharding and features is refused, or None.

    SECURA's merges read whole ``A``/``B`` on each rank and EWC anchors whole tensors;
    FSDP and DeepSpeed ZeRO-3 shard parameters, and the library does not gather them
    yet (docs/scale-out.md).

    Example:
        >>> sharding_problem(fsdp=False, zero_stage=2, merge="m1", ewc=True) is None
        True
        >>> sharding_problem(fsdp=True, zero_stage=None, merge="none", ewc=False) is None
        True
        >>> print(sharding_problem(fsdp=True, zero_stage=None, merge="m1", ewc=False))
        FSDP shards SECURA's A and B, and merge 'm1' needs them whole on every rank (not supported yet); set merge: none, or train with DDP or DeepSpeed ZeRO-1/2 (docs/scale-out.md)
    """
    name = "FSDP" if fsdp else "DeepSpeed ZeRO-3" if zero_stage == 3 else None
    if name is None:
        return None
    fix = "train with DDP or DeepSpeed ZeRO-1/2 (docs/scale-out.md)"
    if merge not in (None, "none"):
        return (
            f"{name} shards SECURA's A and B, and merge {merge!r} needs them whole on every "
            f"rank (not supported yet); set merge: none, or {fix}"
        )
    if ewc:
        return (
            f"{name} shards the parameters EWC anchors and its gradients are not the "
            f"per-example ones the Fisher needs (not supported yet); drop continual.ewc, or {fix}"
        )
    return None


def trainer_sharding(trainer: Any) -> tuple[bool, int | None]:
    """``(fsdp, zero_stage)`` of a ``Trainer`` (``(False, None)`` for None)."""
    if trainer is None:
        return False, None
    fsdp = bool(getattr(trainer, "is_fsdp_enabled", False))
    stage = None
    if getattr(trainer, "is_deepspeed_enabled", False):
        plugin = getattr(getattr(trainer.accelerator, "state", None), "deepspeed_plugin", None)
        stage = getattr(plugin, "zero_stage", None)
    return fsdp, stage
