"""Atomic writes (secura_plugins._fs): complete after success, untouched after a failure."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from secura_plugins._fs import (
    atomic_open,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    is_temp_name,
    staged_dir,
)


class WriterCrashed(RuntimeError):
    pass


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if is_temp_name(p.name))


def test_each_writer_leaves_the_complete_content(tmp_path):
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01" * 1000)
    atomic_write_text(tmp_path / "t.txt", "héllo\n" * 100)
    atomic_write_json(tmp_path / "j.json", {"a": [1, 2, 3]})
    with atomic_open(tmp_path / "rows.jsonl") as fh:
        for i in range(50):
            fh.write(f'{{"i": {i}}}\n')
    tensors = {"w": torch.arange(4096, dtype=torch.float32)}
    with atomic_path(tmp_path / "w.safetensors") as tmp:
        save_file(tensors, str(tmp))
    with atomic_path(tmp_path / "w.pt") as tmp:
        torch.save(tensors, tmp)

    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01" * 1000
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo\n" * 100
    assert (tmp_path / "j.json").read_text() == '{\n  "a": [\n    1,\n    2,\n    3\n  ]\n}'
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 50
    assert torch.equal(load_file(tmp_path / "w.safetensors")["w"], tensors["w"])
    assert torch.equal(torch.load(tmp_path / "w.pt")["w"], tensors["w"])
    assert _leftovers(tmp_path) == []


def test_a_writer_that_raises_mid_write_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "state.safetensors"
    save_file({"w": torch.ones(3)}, str(path))
    old = path.read_bytes()

    with pytest.raises(WriterCrashed), atomic_path(path) as tmp:
        save_file({"w": torch.zeros(10_000)}, str(tmp))  # a full new file is on disk...
        raise WriterCrashed("disk full")  # ...then the writer fails before finishing

    assert path.read_bytes() == old
    assert _leftovers(tmp_path) == []


def test_a_streaming_writer_that_raises_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"old": 1}\n')

    with pytest.raises(WriterCrashed), atomic_open(path) as fh:
        fh.write('{"new": 1}\n' * 1000)
        raise WriterCrashed("row 1000 is not serialisable")

    assert path.read_text() == '{"old": 1}\n'
    assert _leftovers(tmp_path) == []


def test_json_that_cannot_be_encoded_touches_nothing(tmp_path):
    path = tmp_path / "run.json"
    atomic_write_json(path, {"ok": True})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})
    assert path.read_text() == '{\n  "ok": true\n}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_the_file_and_its_folder_are_fsynced_before_returning(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    atomic_write_text(tmp_path / "a.txt", "x")
    assert synced == ["file", "dir"]


def test_suffix_keeps_the_extension_for_writers_that_need_it(tmp_path):
    with atomic_path(tmp_path / "plot.png", suffix=".tmp.png") as tmp:
        assert tmp.name.endswith(".tmp.png") and tmp.parent == tmp_path
        assert is_temp_name(tmp.name)
        tmp.write_bytes(b"png")
    assert (tmp_path / "plot.png").read_bytes() == b"png"


def test_a_staged_folder_replaces_the_old_one_only_when_complete(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "weights").write_text("old")

    with pytest.raises(WriterCrashed), staged_dir(target) as stage:
        (stage / "weights").write_text("new, half written")
        raise WriterCrashed("killed mid-save")
    assert (target / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]

    with staged_dir(target) as stage:
        (stage / "weights").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["weights"]
    assert (target / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_keep_existing_leaves_a_folder_another_process_finished_first(tmp_path):
    target = tmp_path / "cache"
    with staged_dir(target, keep_existing=True) as stage:
        (stage / "a").write_text("mine")
        target.mkdir()  # a concurrent run renamed its copy into place meanwhile
        (target / "a").write_text("theirs")
    assert (target / "a").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
