"""Nothing trusted blindly: no unpickling, safe YAML, remote code off by default, and a
diverging run halts before it can save a poisoned adapter.

(Mismatched shapes, base fingerprint and method, pickle-only adapter folders and
Python-object YAML tags are rows of the table in ``test_bad_inputs.py``.)
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import torch
from helpers.fixtures import train_steps, u_acc_total

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "secura_plugins"


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> full dotted name, for every import in ``tree``.

    ``import torch as T`` maps ``T`` to ``torch``; ``from torch import load as L`` maps
    ``L`` to ``torch.load``; ``from torch.serialization import load`` maps ``load`` to
    ``torch.serialization.load``.
    """
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    names[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _calls(tree: ast.AST):
    """Every call with the called name resolved through the module's import aliases."""
    aliases = _aliases(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            head, _, rest = ast.unparse(node.func).partition(".")
            full = aliases.get(head, head)
            yield node, f"{full}.{rest}" if rest else full


UNPICKLING_TORCH_LOADS = {"torch.load", "torch.serialization.load"}


def test_the_package_never_unpickles_or_loads_yaml_unsafely():
    """Source scan of every module: no pickle/marshal/dill loads, ``torch.load`` only
    with ``weights_only=True``, YAML only through ``yaml.safe_load``; names are
    resolved through import aliases (``from torch import load``)."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names]
                module = getattr(node, "module", None) or ""
                if {"pickle", "cPickle", "dill", "marshal", "shelve"} & {module, *names}:
                    offenders.append(f"{path.name}:{node.lineno} imports {module or names}")
        for call, name in _calls(tree):
            where = f"{path.relative_to(ROOT)}:{call.lineno} {name}"
            if name in UNPICKLING_TORCH_LOADS:
                weights_only = [k for k in call.keywords if k.arg == "weights_only"]
                if not weights_only or ast.unparse(weights_only[0].value) != "True":
                    offenders.append(where + " without weights_only=True")
            if re.fullmatch(r"yaml\.(load|unsafe_load|full_load|load_all|unsafe_load_all)", name):
                offenders.append(where)
            if name.endswith(("pickle.load", "pickle.loads", "numpy.load")):
                offenders.append(where)
    assert not offenders, offenders


@pytest.mark.parametrize(
    "source",
    [
        "import torch\ntorch.load(p)",
        "from torch import load\nload(p)",
        "from torch import load as read\nread(p, weights_only=False)",
        "import torch as T\nT.serialization.load(p)",
        "from torch import serialization\nserialization.load(p)",
        "from torch.serialization import load\nload(p)",
        "import numpy as np\nnp.load(p)",
    ],
)
def test_the_source_scan_resolves_import_aliases(source):
    """The scan's own check: every spelling of an unpickling load is seen."""
    names = [name for _, name in _calls(ast.parse(source))]
    assert set(names) & (UNPICKLING_TORCH_LOADS | {"numpy.load"}), names
    safe = [name for _, name in _calls(ast.parse("from json import load\nload(p)"))]
    assert not set(safe) & UNPICKLING_TORCH_LOADS


def test_trust_remote_code_is_off_unless_the_recipe_sets_it(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from secura_plugins.cli import build_parser
    from secura_plugins.recipe import ModelSpec, _load_model

    assert ModelSpec().trust_remote_code is False
    assert build_parser().parse_args(["merge", "a", "--out", "b"]).trust_remote_code is False

    seen: list[object] = []
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        real = cls.from_pretrained.__func__

        def spy(klass, *args, _real=real, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return _real(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    _load_model(ModelSpec(tiny="llama"), tmp_path)
    assert seen == [False, False]
    seen.clear()
    _load_model(ModelSpec(tiny="llama", trust_remote_code=True), tmp_path)
    assert seen == [True, True]


def test_yaml_object_tags_are_never_constructed(tmp_path):
    """The tag would run ``os.system``; the safe loader refuses it before anything runs."""
    from secura_plugins.errors import SecuraConfigError
    from secura_plugins.recipe import load_recipe

    flag = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"run: !!python/object/apply:os.system ['touch {flag}']\n")
    with pytest.raises(SecuraConfigError, match="never constructs objects"):
        load_recipe(path)
    assert not flag.exists()


def test_pickle_files_in_an_adapter_folder_are_never_opened(tmp_path):
    """A folder with both files loads from the safetensors file; the pickle is ignored
    (it would raise if unpickled: its class does not exist)."""
    from secura_plugins import AdapterConfig, apply_adapter, load_adapter, save_adapter
    from secura_plugins.tiny import build_tiny_model

    config = AdapterConfig(r=4, target_modules=["q_proj"], merge_every=2)
    model = apply_adapter(build_tiny_model(seed=1), config)
    ids = torch.tensor([[1, 5, 9, 12, 7, 3, 20, 11]])
    train_steps(model, ids, steps=3)  # A and B trained, U_acc merged at step 2
    assert u_acc_total(model) > 0
    folder = save_adapter(model, tmp_path / "adapter")
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04c__main__\nNoSuchClass\n.")
    loaded = load_adapter(build_tiny_model(seed=1), folder)
    with torch.no_grad():
        expected, base = model(ids).logits, build_tiny_model(seed=1)(ids).logits
        assert torch.equal(loaded(ids).logits, expected)
    assert not torch.allclose(expected, base, atol=1e-4)  # the loaded adapter is not a no-op


HALT_RECIPE = """\
run: {seed: 0}
model: {tiny: llama}
adapter: {method: secura, r: 4, k: 8, merge: m1, merge_every: 4, target_modules: [q_proj, k_proj]}
training: {max_steps: 3, per_device_train_batch_size: 4, learning_rate: 1.0e-2,
           lr_scheduler_type: constant, save_steps: 1, max_length: 32, use_cpu: true}
tasks:
  - {name: add, data: {builtin: add, n: 16}, eval: {builtin: add, n: 2, seed: 5}}
  - {name: upper, data: {builtin: upper, n: 16}, eval: {builtin: upper, n: 2, seed: 5},
     training: {learning_rate: 1.0e+30, max_steps: 6}}
"""


def test_a_diverging_run_halts_with_its_step_and_leaves_disk_intact(tmp_path):
    pytest.importorskip("trl")
    from secura_plugins.cli import main
    from secura_plugins.integrations.trl import checkpoint_problem
    from secura_plugins.io import load_adapter_weights

    recipe = tmp_path / "r.yaml"
    recipe.write_text(HALT_RECIPE)
    out = tmp_path / "run"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["train", str(recipe), "--no-progress", "--output-dir", str(out)])
    assert code == 1
    message = err.getvalue()[err.getvalue().rindex("secura: error:") :].strip()
    match = re.fullmatch(
        r"secura: error: step (\d+): training diverged \((.+) is NaN or inf\)\. Stopped before "
        r"anything of this step was saved: the checkpoints and adapters already on disk are "
        r"intact\. Lower the learning rate, enable gradient clipping \(max_grad_norm\), or "
        r"check this step's data, then rerun",
        message,
    )
    assert match, message
    step = int(match.group(1))
    assert step >= 2, message  # so that checkpoints from before the halt exist
    task = out / "task-1-upper"
    saved = sorted(int(p.name.split("-")[1]) for p in task.glob("checkpoint-*"))
    assert saved == list(range(1, step)), (saved, step)  # every step before, none after
    # the previous task's adapter and the checkpoints written before the halt load,
    # pass their SHA-256 check and hold only finite numbers
    from secura_plugins import AdapterConfig, apply_adapter
    from secura_plugins.tiny import build_tiny_model

    cfg = json.loads((out / "task-0-add" / "adapter" / "adapter_config.json").read_text())
    for folder in [out / "task-0-add" / "adapter", *(task / f"checkpoint-{s}" for s in saved)]:
        if folder.name.startswith("checkpoint-"):
            assert checkpoint_problem(folder) is None
        model = apply_adapter(
            build_tiny_model(vocab_size=cfg["secura"]["base_model"]["vocab_size"]),
            AdapterConfig.from_dict(cfg["secura"]["config"]),
        )
        load_adapter_weights(model, folder, check_base=False)
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert (out / "task-0-add" / "metrics.json").is_file()
    assert not (task / "adapter").exists() and not (task / "metrics.json").exists()
    assert not (out / "adapter").exists() and not (out / "results.json").exists()
