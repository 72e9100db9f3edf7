"""Helpers for the axolotl integration tests: a tiny offline workspace, a YAML writer,
a runner for axolotl's real training entry, and a probe plugin.

The probe (:class:`ProbePlugin`) is an ordinary axolotl plugin the tests list under
``plugins:`` next to the SECURA plugin. Inside the axolotl process it records what the
loaded model looks like (layer classes, a snapshot of every tensor) and, after
training, what changed and the logits on a fixed input, into ``<output_dir>/probe/``.
Nothing is mocked: the tests only read what real axolotl runs wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
TESTS_DIR = Path(__file__).resolve().parents[1]  # holds the ``helpers`` package
TINY_RECIPE = REPO_ROOT / "recipes" / "axolotl" / "tiny-secura.yml"
PROBE_PLUGIN = "helpers.axolotl_helpers.ProbePlugin"
#: Token ids fed to the model for the logits comparisons (the tiny vocab has ~100 ids).
PROBE_IDS = [[1, *range(10, 40), 2]]


@dataclass
class TinyWorkspace:
    """Where a test's tiny model, dataset and outputs live."""

    root: Path
    model_dir: Path
    data_path: Path


def make_workspace(root: Path, kind: str = "llama") -> TinyWorkspace:
    """Save a tiny checkpoint + tokenizer and a 32-row alpaca jsonl under ``root``."""
    from secura_plugins.integrations.axolotl.cli import write_tiny_assets

    model_dir, data_path = write_tiny_assets(root, kind=kind)
    return TinyWorkspace(root=root, model_dir=model_dir, data_path=data_path)


def write_task2_data(ws: TinyWorkspace) -> Path:
    """A second task for continual runs: 24 subtraction rows (alpaca format)."""
    path = ws.root / "task2.jsonl"
    rows = [
        {"instruction": f"sub {a} from {a + b}", "input": "", "output": str(b)}
        for a, b in ((i % 6, (5 * i) % 4) for i in range(24))
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_config(
    ws: TinyWorkspace, name: str, overrides: dict[str, Any] | None = None, probe: bool = True
) -> Path:
    """The tiny recipe with this workspace's paths and ``overrides``.

    A ``None`` override deletes the key; a dict override is merged into a dict value.
    """
    cfg = yaml.safe_load(TINY_RECIPE.read_text())
    cfg["base_model"] = str(ws.model_dir)
    cfg["datasets"][0]["path"] = str(ws.data_path)
    cfg["dataset_prepared_path"] = str(ws.root / "prepared")
    cfg["output_dir"] = str(ws.root / name)
    if probe:
        cfg["plugins"] = [*cfg.get("plugins", []), PROBE_PLUGIN]
    for key, value in (overrides or {}).items():
        if value is None:
            cfg.pop(key, None)
        elif isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}  # e.g. change one field of the secura: block
        else:
            cfg[key] = value
    path = ws.root / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def axolotl_env() -> dict[str, str]:
    """Environment of an offline, CPU-only axolotl run that can import this checkout."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        WANDB_MODE="disabled",
        AXOLOTL_DO_NOT_TRACK="1",
        DO_NOT_TRACK="1",
        CUDA_VISIBLE_DEVICES="",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(
            [str(REPO_ROOT), str(TESTS_DIR), env.get("PYTHONPATH", "")]
        ).rstrip(os.pathsep),
    )
    return env


@dataclass
class RunResult:
    """A finished subprocess: return code, combined output and wall time."""

    returncode: int
    output: str
    seconds: float


def run_module(args: list[str], timeout: float = 240.0) -> RunResult:
    """``python -m <args>`` in a fresh interpreter with :func:`axolotl_env`."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", *args],
        env=axolotl_env(),
        cwd=str(REPO_ROOT),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return RunResult(proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start)


def run_axolotl_train(cfg_path: Path, timeout: float = 240.0) -> RunResult:
    """Axolotl's real training entry (the module ``axolotl train`` launches)."""
    return run_module(["axolotl.cli.train", str(cfg_path)], timeout=timeout)


def check_configs(checks: list[tuple[str, Path]], result_path: Path) -> RunResult:
    """Run axolotl's config loading on several YAMLs in one interpreter (see :func:`main`)."""
    args = ["helpers.axolotl_helpers", "check-configs", str(result_path)]
    for kind, cfg in checks:
        args += [f"{kind}={cfg}"]
    return run_module(args)


def tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def read_probe(output_dir: Path) -> tuple[dict[str, Any], torch.Tensor]:
    """The probe report and post-training logits written by :class:`ProbePlugin`."""
    from safetensors.torch import load_file

    probe_dir = Path(output_dir) / "probe"
    report = json.loads((probe_dir / "report.json").read_text())
    logits = load_file(str(probe_dir / "logits.safetensors"))["logits"]
    return report, logits


# --------------------------------------------------------------------------------------
# The probe plugin (runs inside the axolotl process)
# --------------------------------------------------------------------------------------

try:  # the module is also imported by pytest, where axolotl need not be importable
    from axolotl.integrations.base import BasePlugin as _BasePlugin
except ImportError:  # pragma: no cover
    _BasePlugin = object  # type: ignore[assignment,misc]


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy that compares bit for bit with ``torch.equal``.

    Floats are viewed as integers of the same width: packed 4-bit weights stored as
    bfloat16 contain NaN bit patterns, and NaN != NaN would report a change.
    """
    t = t.detach().to("cpu").clone()
    if t.is_floating_point():
        t = t.view(_INT_OF_SIZE[t.element_size()])
    return t


def _base_key(key: str) -> str:
    """State-dict key of a PEFT-wrapped model -> the same tensor's key in the bare model."""
    return key.removeprefix("base_model.model.").replace(".base_layer.", ".")


class ProbePlugin(_BasePlugin):  # type: ignore[misc,valid-type]
    """Records model structure, tensor changes and logits of an axolotl run (test only)."""

    def __init__(self) -> None:
        super().__init__()
        self.bare_keys: set[str] = set()
        self.before: dict[str, torch.Tensor] = {}
        self.trainable: list[str] = []
        self.layers: list[dict[str, str]] = []

    def post_model_build(self, cfg: Any, model: torch.nn.Module) -> None:
        self.bare_keys = set(model.state_dict())

    def post_model_load(self, cfg: Any, model: torch.nn.Module) -> None:
        self.layers = [
            {
                "name": name,
                "class": type(module).__name__,
                "base_class": type(module.base_layer).__name__,
            }
            for name, module in model.named_modules()
            if hasattr(module, "base_layer") and hasattr(module, "lora_A")
        ]
        self.trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        self.before = {n: _tensor_bytes(t) for n, t in model.state_dict().items()}
        # The adapter as training will start from it, keyed as in a saved adapter file.
        from safetensors.torch import save_file

        from secura_plugins import is_adapted
        from secura_plugins.io import adapter_tensors

        if is_adapted(model):
            tensors = adapter_tensors(model, model.secura_adapter_name)
            probe_dir = Path(cfg.output_dir) / "probe"
            probe_dir.mkdir(parents=True, exist_ok=True)
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                str(probe_dir / "adapter_at_load.safetensors"),
            )

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        self.train_rows = len(trainer.train_dataset)

    def post_train(self, cfg: Any, model: torch.nn.Module) -> None:
        # axolotl 0.19 calls post_train twice (after trainer.train and after saving);
        # the second report wins, and it is written after the adapter was saved.
        from safetensors.torch import save_file

        after = {n: _tensor_bytes(t) for n, t in model.state_dict().items()}
        changed = sorted(
            k for k, v in after.items() if k in self.before and not torch.equal(v, self.before[k])
        )
        base = {k for k in self.before if _base_key(k) in self.bare_keys}
        report = {
            "layers": self.layers,
            "trainable": self.trainable,
            "n_base_tensors": len(base),
            "changed_base": [k for k in changed if k in base],
            "changed_adapter": [k for k in changed if k not in base],
            "new_keys": sorted(set(after) - set(self.before)),
            "n_linear4bit": sum(type(m).__name__ == "Linear4bit" for m in model.modules()),
            "train_rows": getattr(self, "train_rows", None),
        }
        was_training = model.training
        model.eval()
        with torch.no_grad():
            device = next(model.parameters()).device
            logits = model(input_ids=torch.tensor(PROBE_IDS, device=device)).logits
        model.train(was_training)
        probe_dir = Path(cfg.output_dir) / "probe"
        probe_dir.mkdir(parents=True, exist_ok=True)
        (probe_dir / "report.json").write_text(json.dumps(report, indent=1))
        save_file(
            {"logits": logits.float().cpu().contiguous()}, str(probe_dir / "logits.safetensors")
        )


# --------------------------------------------------------------------------------------
# Config checks in one process: python -m helpers.axolotl_helpers check-configs OUT kind=cfg
# --------------------------------------------------------------------------------------


def write_arch_config(root: Path, model_type: str) -> Path:
    """A folder with only a tiny ``config.json`` of ``model_type`` (enough for config loading)."""
    from transformers import AutoConfig

    folder = Path(root) / f"arch-{model_type}"
    config = AutoConfig.for_model(
        model_type,
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    config.save_pretrained(str(folder))
    return folder


def _check_one(kind: str, cfg: str) -> dict[str, Any]:
    """Load ``cfg`` the way ``kind`` does (``train``: axolotl's ``load_cfg``, the first step
    of ``axolotl.cli.train``; ``merge-lora``: ``axolotl.cli.merge_lora.do_cli``, which
    loads the config with ``merge_lora: true`` before merging).

    Returns ``{"error": text or None}`` plus, for a config that loaded, the resolved
    values the tests check."""
    try:
        if kind == "train":
            from axolotl.cli.config import load_cfg

            loaded = load_cfg(cfg)
        elif kind == "merge-lora":
            from axolotl.cli.merge_lora import do_cli

            do_cli(config=cfg)
            return {"error": None}
        else:
            raise SystemExit(f"unknown check kind {kind!r}")
    except Exception as exc:  # noqa: BLE001 - the error text is the result
        return {"error": f"{type(exc).__name__}: {exc}"}
    from secura_plugins.integrations.axolotl.args import adapter_config_from_cfg

    return {
        "error": None,
        "adapter": loaded.adapter,
        "load_in_4bit": bool(loaded.load_in_4bit),
        "kernels": {
            k: loaded.get(k)
            for k in (
                "lora_mlp_kernel",
                "lora_qkv_kernel",
                "lora_o_kernel",
                "lora_embedding_kernel",
            )
        },
        "adapter_config": adapter_config_from_cfg(loaded).to_dict(),
    }


def main(argv: list[str] | None = None) -> None:
    """Checks run in the order given. Axolotl's ``PluginManager`` is a process-wide
    singleton that keeps every plugin once registered, so a config that must fail for
    lack of the plugin has to come first."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] != "check-configs":
        raise SystemExit(
            "usage: python -m helpers.axolotl_helpers check-configs OUT.json KIND=CFG ..."
        )
    results = []
    for item in argv[2:]:
        kind, cfg = item.split("=", 1)
        results.append({"kind": kind, "config": cfg, **_check_one(kind, cfg)})
    Path(argv[1]).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
