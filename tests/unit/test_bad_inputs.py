"""Bad configs and inputs, each with the exact error a user sees.

Every case runs what a user runs (``secura train`` through the CLI's ``main``, or the
Python API for adapter files) and compares the whole message. ``docs/errors.md`` holds
the same table; ``test_errors_doc_matches_the_table`` fails when they drift apart.
Regenerate the doc with ``python tests/unit/test_bad_inputs.py``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from secura_plugins import AdapterConfig

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "errors.md"
START, END = "<!-- cases:start -->", "<!-- cases:end -->"

BASE_RECIPE = """\
run: {seed: 0}
model: {tiny: llama}
adapter: {method: secura, r: 4}
training: {max_steps: 2, per_device_train_batch_size: 4, use_cpu: true, max_length: 32,
           save_strategy: "no", learning_rate: 1.0e-3}
tasks:
  - {name: add, data: {builtin: add, n: 8}, eval: {builtin: add, n: 2, seed: 1}}
"""


@dataclass(frozen=True)
class Case:
    id: str
    what: str
    run: Callable[[Path], str]  # the message the user sees; gets a fresh folder
    expected: str  # ``{tmp}`` stands for that folder


# --------------------------------------------------------------------------- runners
def _cli(tmp: Path, *sets: str, dry: bool = True, recipe: str = BASE_RECIPE) -> str:
    """``secura train`` with ``--set`` overrides; the last line of stderr."""
    import contextlib
    import io

    from secura_plugins.cli import main

    path = tmp / "recipe.yaml"
    if not path.exists():
        path.write_text(recipe)
    argv = ["train", str(path), "--no-progress", "--output-dir", str(tmp / "out")]
    argv += ["--dry-run"] if dry else []
    for item in sets:
        argv += ["--set", item]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    assert code in (1, 2), f"expected a failure, got exit status {code}"
    return _message(err.getvalue())


def _message(stderr: str) -> str:
    """The error the command printed (after any library warnings or progress bars)."""
    return stderr[stderr.rindex("secura: ") :].strip()


def _yaml(text: str) -> Callable[[Path], str]:
    def run(tmp: Path) -> str:
        (tmp / "recipe.yaml").write_text(text)
        return _cli(tmp)

    return run


def _empty_file(tmp: Path) -> str:
    (tmp / "empty.jsonl").write_text("\n")
    return _cli(tmp, f"tasks[0].data={{path: {tmp / 'empty.jsonl'}}}", dry=False)


def _not_writable(tmp: Path) -> str:
    (tmp / "a-file").write_text("x")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(BASE_RECIPE)
    import contextlib
    import io

    from secura_plugins.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["train", str(recipe), "--output-dir", str(tmp / "a-file" / "out")])
    assert code == 2
    return _message(err.getvalue())


def _no_bitsandbytes(tmp: Path) -> str:
    # The import fails exactly as it does where bitsandbytes is not installed.
    saved = sys.modules.get("bitsandbytes")
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]
    try:
        return _cli(tmp, "model.load_in_4bit=true", dry=False)
    finally:
        if saved is None:
            sys.modules.pop("bitsandbytes", None)
        else:
            sys.modules["bitsandbytes"] = saved


def _other_recipe(tmp: Path) -> str:
    # The folder holds progress of the same recipe with another learning rate.
    from secura_plugins.recipe import load_recipe, recipe_identity

    (tmp / "recipe.yaml").write_text(BASE_RECIPE)
    identity = recipe_identity(load_recipe(tmp / "recipe.yaml"))
    identity["training"]["learning_rate"] = 0.5
    out = tmp / "out"
    (out / "task-0-add").mkdir(parents=True)
    record = {"format": 1, "recipe_sha256": "0" * 64, "recipe": identity}
    (out / "secura_run.json").write_text(json.dumps(record))
    return _cli(tmp, dry=False)


def _api(call: Callable[[Path], object]) -> Callable[[Path], str]:
    def run(tmp: Path) -> str:
        from secura_plugins.errors import SecuraError

        with pytest.raises(SecuraError) as info:
            call(tmp)
        return f"{type(info.value).__name__}: {info.value}"

    return run


def _tiny(seed: int = 0, **sizes):
    from secura_plugins.tiny import build_tiny_model

    return build_tiny_model("llama", seed=seed, **sizes)


def _saved(tmp: Path) -> Path:
    from secura_plugins import AdapterConfig, apply_adapter, save_adapter

    model = apply_adapter(_tiny(1), AdapterConfig(r=4, target_modules=["q_proj"]))
    return save_adapter(model, tmp / "adapter")


def _other_base(tmp: Path) -> None:
    from secura_plugins import load_adapter

    load_adapter(_tiny(2), _saved(tmp))


def _other_shapes(tmp: Path) -> None:
    from secura_plugins import load_adapter

    load_adapter(_tiny(1, hidden_size=32, num_attention_heads=2, num_key_value_heads=1), _saved(tmp))


def _other_method(tmp: Path) -> None:
    from secura_plugins import AdapterConfig, apply_adapter
    from secura_plugins.io import load_adapter_weights

    model = apply_adapter(_tiny(1), AdapterConfig(method="curlora", r=4, target_modules=["q_proj"]))
    load_adapter_weights(model, _saved(tmp))


def _pickle_adapter(tmp: Path) -> None:
    from secura_plugins import load_adapter

    folder = _saved(tmp)
    (folder / "adapter_model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, folder / "adapter_model.bin")
    load_adapter(_tiny(1), folder)


def _nan_save(tmp: Path) -> None:
    from secura_plugins import AdapterConfig, apply_adapter, save_adapter

    model = apply_adapter(_tiny(1), AdapterConfig(r=4, target_modules=["q_proj"]))
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))
    save_adapter(model, tmp / "adapter")


LAYERS = "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"
#: The fields of a SECURA config, from the same metadata as the message (common fields,
#: then SECURA's options).
FIELDS = ", ".join(AdapterConfig.field_names("secura"))
CE = "secura: config error: "

CASES = [
    Case(
        "r-larger-than-layer",
        "rank larger than a layer (`adapter.r: 100` on 64-wide layers)",
        lambda t: _cli(t, "adapter.r=100", dry=False),
        CE + "adapter.r: model.layers.0.self_attn.q_proj: r=100 is larger than the layer "
        "(64 x 64); lower r or drop this layer from target_modules",
    ),
    Case(
        "r-zero",
        "`adapter.r: 0`",
        lambda t: _cli(t, "adapter.r=0"),
        CE + "adapter.r: must be an integer >= 1, got 0",
    ),
    Case(
        "r-fraction",
        "`adapter.r: 2.5`",
        lambda t: _cli(t, "adapter.r=2.5"),
        CE + "adapter.r: must be an integer >= 1, got 2.5",
    ),
    Case(
        "r-text",
        "`adapter.r: four`",
        lambda t: _cli(t, "adapter.r=four"),
        CE + "adapter.r: must be an integer >= 1, got 'four'",
    ),
    Case(
        "k-zero",
        "`adapter.k: 0`",
        lambda t: _cli(t, "adapter.k=0"),
        CE + "adapter.k: must be an integer >= 1, got 0",
    ),
    Case(
        "k-below-r",
        "`adapter.k` smaller than `r`",
        lambda t: _cli(t, "adapter.k=2"),
        CE + "adapter.k: must be >= r (4), got 2; the paper uses k > r (e.g. 4 r)",
    ),
    Case(
        "unknown-target-module",
        "a target module the model does not have",
        lambda t: _cli(t, "adapter.target_modules=[q_prj]", dry=False),
        CE + f"adapter.target_modules: ['q_prj'] match no layer of this model; its linear "
        f"layers are named {LAYERS}",
    ),
    Case(
        "unknown-method",
        "a misspelt adapter method",
        lambda t: _cli(t, "adapter.method=securra"),
        CE + "adapter.method: unknown adapter method 'securra'; did you mean 'secura'? known "
        "methods: curlora, dora, lora, sclora, secura (third-party methods register through "
        "the 'secura_plugins' entry-point group)",
    ),
    Case(
        "unknown-adapter-field",
        "a PEFT name for an adapter field (`rank`)",
        lambda t: _cli(t, "adapter.rank=8"),
        CE + f"adapter.rank: unknown field; did you mean 'r'? valid fields: {FIELDS}",
    ),
    Case(
        "merge-every-zero",
        "`adapter.merge_every: 0`",
        lambda t: _cli(t, "adapter.merge_every=0"),
        CE + "adapter.merge_every: must be an integer >= 1, got 0",
    ),
    Case(
        "dropout-out-of-range",
        "`adapter.lora_dropout: 1.5`",
        lambda t: _cli(t, "adapter.lora_dropout=1.5"),
        CE + "adapter.lora_dropout: must be in [0.0, 1.0), got 1.5",
    ),
    Case(
        "empty-dataset-rows",
        "a task with an empty inline dataset",
        lambda t: _cli(t, "tasks[0].data={rows: []}"),
        CE + "tasks[0].data.rows: must be a non-empty list of mappings",
    ),
    Case(
        "empty-dataset-file",
        "a task whose JSON-lines file is empty",
        _empty_file,
        CE + "tasks[0].data.path: {tmp}/empty.jsonl is empty; give the task at least one "
        "training example",
    ),
    Case(
        "missing-dataset-file",
        "a task whose data file does not exist",
        lambda t: _cli(t, "tasks[0].data={path: nowhere.jsonl}"),
        CE + "tasks[0].data.path: nowhere.jsonl does not exist",
    ),
    Case(
        "no-tasks",
        "`tasks: []`",
        lambda t: _cli(t, "tasks=[]"),
        CE + "tasks: must be a non-empty list of tasks (name, data)",
    ),
    Case(
        "duplicate-task-names",
        "two tasks with the same name",
        lambda t: _cli(t, "tasks[1]={name: add, data: {builtin: add, n: 4}}"),
        CE + "tasks: task names must be unique, got ['add', 'add']",
    ),
    Case(
        "missing-probe-set",
        "a retention probe whose file does not exist",
        lambda t: _cli(t, "probe={data: {path: probe.jsonl}}"),
        CE + "probe.data.path: probe.jsonl does not exist",
    ),
    Case(
        "probe-without-data",
        "a probe block without data",
        lambda t: _cli(t, "probe={steps: 5}"),
        CE + "probe.data: missing; e.g. data: {path: probe.jsonl}",
    ),
    Case(
        "sclora-without-probe",
        "SC-LoRA without the probe it preserves",
        lambda t: _cli(t, "adapter.method=sclora", dry=False),
        CE + "adapter.method: sclora needs a probe (its knowledge-to-preserve data)",
    ),
    Case(
        "output-dir-not-writable",
        "an output folder that cannot be created",
        _not_writable,
        CE + "run.output_dir: cannot create {tmp}/a-file/out (Not a directory); choose a "
        "folder you can write to",
    ),
    Case(
        "output-dir-other-recipe",
        "an output folder holding another recipe's run",
        _other_recipe,
        CE + "run.output_dir: {tmp}/out holds a run of a different recipe "
        "(training.learning_rate: 0.5 -> 0.001); rerun the recipe it was started with to "
        "resume it, or choose another output_dir to start over",
    ),
    Case(
        "4bit-without-bitsandbytes",
        "`model.load_in_4bit: true` where bitsandbytes is not installed",
        _no_bitsandbytes,
        CE + "model.load_in_4bit: 4-bit loading needs bitsandbytes, which is not installed; "
        "pip install 'bitsandbytes>=0.45', or set model.load_in_4bit: false",
    ),
    Case(
        "trust-remote-code-not-bool",
        "`model.trust_remote_code: maybe`",
        lambda t: _cli(t, "model.trust_remote_code=maybe"),
        CE + "model.trust_remote_code: must be true or false",
    ),
    Case(
        "nan-loss",
        "a learning rate that makes training diverge (`learning_rate: 1.0e+30`)",
        lambda t: _cli(t, "training.learning_rate=1.0e+30", dry=False),
        "secura: error: step 2: training diverged (the training loss is NaN or inf). Stopped before anything of this step was saved: the checkpoints and adapters already "
        "on disk are intact. Lower the learning rate, enable gradient clipping "
        "(max_grad_norm), or check this step's data, then rerun",
    ),
    Case(
        "ewc-negative-lambda",
        "`continual.ewc.lam: -1`",
        lambda t: _cli(t, "continual={ewc: {lam: -1}}", dry=False),
        CE + "continual.ewc.lam: must be >= 0, got -1; use 0 to switch the penalty off",
    ),
    Case(
        "unknown-training-field",
        "a misspelt trl.SFTConfig field",
        lambda t: _cli(t, "training.max_stepz=3"),
        CE + "training.max_stepz: not a trl.SFTConfig field; did you mean 'max_steps'?",
    ),
    Case(
        "unknown-block",
        "a misspelt top-level block",
        lambda t: _cli(t, "trainig.max_steps=3"),
        CE + "trainig: unknown block; did you mean 'training'? valid: run, model, adapter, "
        "training, tasks, continual, probe",
    ),
    Case(
        "yaml-python-object",
        "a recipe with a `!!python/object` tag",
        _yaml("run: !!python/object/apply:os.system ['echo pwned']\n"),
        CE + "recipe: {tmp}/recipe.yaml uses a YAML tag that builds Python objects (could not "
        "determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system', "
        "line 1); recipes are read with yaml.safe_load, which never constructs objects: write "
        "plain values instead",
    ),
    Case(
        "yaml-syntax",
        "a recipe that is not YAML",
        _yaml("model: {tiny: llama\n"),
        CE + "recipe: {tmp}/recipe.yaml is not valid YAML: while parsing a flow mapping\n",
    ),
    Case(
        "set-without-value",
        "`--set` without `=`",
        lambda t: _cli(t, "training.max_steps"),
        CE + "--set: expected key.path=value, got 'training.max_steps'",
    ),
    Case(
        "adapter-other-base",
        "loading an adapter onto another base model",
        _api(_other_base),
        "AdapterLoadError: {tmp}/adapter was trained on another base model: the weights of "
        "model.layers.0.self_attn.q_proj do not match (fingerprint cosine -0.09 < 0.9). Load it "
        "onto the base it was trained on, or pass check_base=False if you know better",
    ),
    Case(
        "adapter-other-shapes",
        "loading an adapter onto a base of other sizes",
        _api(_other_shapes),
        "AdapterLoadError: {tmp}/adapter: layer model.layers.0.self_attn.q_proj is 32 -> 32 "
        "in this base but 64 -> 64 in the adapter's base",
    ),
    Case(
        "adapter-other-method",
        "loading a SECURA adapter into a CURLoRA model",
        _api(_other_method),
        "AdapterLoadError: {tmp}/adapter holds a 'secura' adapter but the model carries "
        "'curlora'; load it onto a fresh base with load_adapter",
    ),
    Case(
        "adapter-pickle-weights",
        "an adapter folder with pickle weights (`adapter_model.bin`)",
        _api(_pickle_adapter),
        "AdapterLoadError: {tmp}/adapter holds pickle weights (adapter_model.bin) and no "
        "adapter_model.safetensors; secura-plugins reads safetensors only and never unpickles "
        "(pickle files can run code when loaded). Re-save the adapter with save_adapter",
    ),
    Case(
        "save-nan-adapter",
        "saving an adapter that holds NaN",
        _api(_nan_save),
        "SecuraError: the adapter holds NaN/inf in 1 tensor(s), first "
        "model.layers.0.self_attn.q_proj.lora_core.A; refusing to save it (training diverged: "
        "lower the learning rate or enable gradient clipping)",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_the_documented_error(case: Case, tmp_path: Path) -> None:
    message = case.run(tmp_path)
    expected = case.expected.replace("{tmp}", str(tmp_path))
    if expected.endswith("\n"):  # the rest quotes the YAML parser
        assert message.startswith(expected.rstrip("\n")), message
    else:
        assert message == expected


def test_the_table_has_the_cases_the_issue_names() -> None:
    ids = {c.id for c in CASES}
    assert len(CASES) >= 20 and len(ids) == len(CASES)
    assert {
        "r-larger-than-layer",
        "r-zero",
        "k-zero",
        "unknown-target-module",
        "empty-dataset-rows",
        "nan-loss",
        "missing-probe-set",
        "output-dir-not-writable",
        "4bit-without-bitsandbytes",
    } <= ids


def render_table() -> str:
    rows = ["| case | input | error the user sees |", "| --- | --- | --- |"]
    for case in CASES:
        message = case.expected.replace("{tmp}", "<dir>").rstrip("\n")
        suffix = " ..." if case.expected.endswith("\n") else ""
        message = message.replace("|", "\\|")
        rows.append(f"| `{case.id}` | {case.what} | `{message}`{suffix} |")
    return "\n".join(rows)


def test_errors_doc_matches_the_table() -> None:
    text = DOC.read_text()
    table = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert table == render_table(), "docs/errors.md is stale: run python tests/unit/test_bad_inputs.py"


if __name__ == "__main__":  # regenerate the table in docs/errors.md
    text = DOC.read_text()
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    DOC.write_text(f"{head}{START}\n{render_table()}\n{END}{tail}")
    print(f"wrote {DOC}")
