"""Atomic file writes: all or nothing, and on disk before the call returns.

Every file the library writes (adapters, EWC state, replay buffers, run records,
checkpoint markers, reports) goes through this module:

1. the content is written to a temporary file in the same folder (so the final
   ``os.replace`` never crosses a file system);
2. the temporary file is flushed and ``fsync``-ed;
3. ``os.replace`` puts it in place (readers see the old file or the new one, never a
   mix);
4. the folder is ``fsync``-ed, so the rename itself survives a power cut.

If the write raises (or the process is interrupted by an exception), the temporary
file is removed and the old file, if any, is left untouched. Temporary names start
with ``.`` and contain ``.tmp`` (see :func:`is_temp_name`), so a listing can skip them.

A whole folder (an adapter, an exported model, a cached base) is written the same way
by :func:`staged_dir`: into a hidden folder beside it, fsynced, then renamed.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "run.json"
    >>> _ = atomic_write_json(path, {"step": 3})
    >>> path.read_text()
    '{\\n  "step": 3\\n}'
    >>> with atomic_path(path) as tmp:  # any writer that takes a path (torch.save, ...)
    ...     _ = tmp.write_text("{}")
    >>> path.read_text()
    '{}'
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_open",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "fsync_dir",
    "fsync_tree",
    "is_temp_name",
    "replace_dir",
    "staged_dir",
]


def fsync_dir(path: str | os.PathLike) -> None:
    """``fsync`` a folder (makes renames and new entries in it durable); best effort."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """``fsync`` every file under ``folder`` (written by someone else, e.g. ``Trainer``)."""
    for path in Path(folder).rglob("*"):
        if path.is_file():
            with contextlib.suppress(OSError), open(path, "rb") as fh:
                os.fsync(fh.fileno())


def is_temp_name(name: str) -> bool:
    """True for the name of a temporary file of this module (or an older ``NAME.tmp``)."""
    return (name.startswith(".") and ".tmp" in name) or name.endswith(".tmp")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    For writers that take a path (``torch.save``, ``safetensors.torch.save_file``,
    ``Figure.savefig``). ``suffix`` ends the temporary name (``".tmp.png"`` for a writer
    that picks the format from the extension). The parent folder must exist.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike, mode: str = "w", *, encoding: str | None = "utf-8"
) -> Iterator[IO[Any]]:
    """Yield an open temporary file (``"w"`` text or ``"wb"`` bytes) that becomes ``path``.

    For writers that stream (JSON lines row by row). Flushed, ``fsync``-ed and renamed
    into place when the block ends without an exception; removed otherwise.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp:
        kwargs = {"encoding": encoding} if mode == "w" else {}
        with open(tmp, mode, **kwargs) as fh:
            yield fh
            fh.flush()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see the module doc) and return ``path``."""
    with atomic_open(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see the module doc) and return ``path``."""
    with atomic_open(path, "w", encoding=encoding) as fh:
        fh.write(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 2) -> Path:
    """Write ``data`` as JSON to ``path`` atomically and return ``path``.

    The JSON is encoded before the temporary file is created, so data that is not
    JSON-serialisable raises without touching the folder.
    """
    return atomic_write_text(path, json.dumps(data, indent=indent))


def replace_dir(stage: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename the finished folder ``stage`` to ``target``; an old ``target`` is moved
    aside first and deleted after (a crash in between leaves it as ``.NAME.old-*``)."""
    stage, target = Path(stage), Path(target)
    try:
        os.replace(stage, target)  # target absent or an empty folder
    except OSError:
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
        os.replace(stage, target)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(target.parent)


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike, *, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a new hidden folder beside ``target`` (``.NAME.tmp-*``) to write into.

    When the block ends without an exception, every file in it is fsynced and the folder
    is renamed to ``target`` (:func:`replace_dir`). With ``keep_existing`` a ``target``
    that exists by then (another process finished first, e.g. a cache) is kept and the
    new folder deleted. On an exception the new folder is deleted and ``target`` is left
    as it was. The parent folder is created if needed.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "model"
        >>> with staged_dir(target) as stage:
        ...     _ = (stage / "config.json").write_text("{}")
        >>> sorted(p.name for p in target.iterdir())
        ['config.json']
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield stage
        fsync_tree(stage)
        if keep_existing:
            try:
                os.replace(stage, target)
            except OSError:
                if not target.is_dir():
                    raise
                shutil.rmtree(stage, ignore_errors=True)
            fsync_dir(target.parent)
        else:
            replace_dir(stage, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
