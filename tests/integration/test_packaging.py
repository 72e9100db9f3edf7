"""The built wheel ships every module (a missing __init__.py once hid the methods)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_contains_every_module(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("secura_plugins-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "secura_plugins").rglob("*.py")}
    assert sources and sources <= shipped, sorted(sources - shipped)
    entry_points = next(n for n in shipped if n.endswith("entry_points.txt"))
    assert "secura = secura_plugins.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
