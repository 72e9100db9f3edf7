"""Command line for the axolotl integration: merge/export a SECURA run, write tiny assets.

Axolotl's own ``merge-lora`` merges plain LoRA only; for ``adapter: secura`` it is
refused at config time and this command is the merge path::

    python -m secura_plugins.integrations.axolotl.cli merge path/to/config.yml
    # or, with the entry point declared in pyproject.toml:
    axolotl secura-merge path/to/config.yml

It loads the dense base model (also for a run trained on a 4-bit base, as axolotl's
``merge-lora`` does) and the trained adapter through axolotl's own loader (with the
SECURA plugin, as ``axolotl inference`` would) and writes a dense ``transformers``
checkpoint plus tokenizer to ``<output_dir>/merged``.

``tiny-assets DIR`` writes the tiny offline model and dataset the tiny recipe uses.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

#: Rows of the tiny alpaca-style dataset (digit sums, answer is one or two characters).
TINY_ROWS = 32


def write_tiny_assets(root: str | Path, kind: str = "llama") -> tuple[Path, Path]:
    """Write ``root/model`` (tiny checkpoint + tokenizer) and ``root/data.jsonl``.

    Nothing is downloaded: the model is built from a seeded config and the tokenizer
    is character level (see :mod:`secura_plugins.tiny`).
    """
    from secura_plugins.tiny import save_tiny_checkpoint

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    model_dir = save_tiny_checkpoint(root / "model", kind)  # type: ignore[arg-type]
    data_path = root / "data.jsonl"
    with data_path.open("w", encoding="utf-8") as handle:
        for i in range(TINY_ROWS):
            a, b = i % 7, (3 * i) % 5
            row = {"instruction": f"add {a} and {b}", "input": "", "output": str(a + b)}
            handle.write(json.dumps(row) + "\n")
    return model_dir, data_path


def merge_axolotl_run(
    config: str | Path,
    *,
    adapter_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    **overrides: Any,
) -> Path:
    """Merge the SECURA adapter of an axolotl run into a dense checkpoint.

    Args:
        config: the axolotl YAML the run was trained with.
        adapter_dir: the saved adapter (default: the config's ``lora_model_dir`` or
            ``output_dir``).
        out_dir: where to write the dense model (default ``<output_dir>/merged``).
        overrides: extra axolotl config values (as ``axolotl ... --key value``).

    Returns:
        The folder of the merged checkpoint.
    """
    from axolotl.cli.config import load_cfg
    from axolotl.cli.utils import load_model_and_tokenizer

    import secura_plugins as core

    from .plugin import is_secura_cfg

    # Merge into the dense base, as axolotl's merge-lora does: merging into 4-bit weights
    # would lose the update (export_merged refuses quantized bases).
    cfg = load_cfg(str(config), **{"load_in_4bit": False, "load_in_8bit": False, **overrides})
    if not is_secura_cfg(cfg):
        raise click.UsageError(
            f"{config}: adapter is {cfg.adapter!r}; this command merges adapter: secura runs "
            "(use `axolotl merge-lora` for LoRA)"
        )
    cfg.lora_model_dir = str(adapter_dir or cfg.lora_model_dir or cfg.output_dir)
    if not (Path(cfg.lora_model_dir) / "adapter_config.json").exists():
        raise click.UsageError(
            f"no saved adapter in {cfg.lora_model_dir}; train first or pass --adapter-dir"
        )
    target = Path(out_dir) if out_dir else Path(cfg.output_dir) / "merged"
    model, tokenizer, _ = load_model_and_tokenizer(cfg=cfg, inference=True)
    core.export_merged(model, target)
    tokenizer.save_pretrained(str(target))
    return target


@click.command(name="secura-merge")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--adapter-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Saved SECURA adapter (default: lora_model_dir or output_dir).",
)
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Output folder (default: <output_dir>/merged).",
)
def merge_command(config: str, adapter_dir: str | None, out_dir: str | None) -> None:
    """Merge an `adapter: secura` axolotl run into a dense transformers checkpoint."""
    target = merge_axolotl_run(config, adapter_dir=adapter_dir, out_dir=out_dir)
    click.echo(f"merged model written to {target}")


@click.command(name="tiny-assets")
@click.argument("root", type=click.Path(file_okay=False))
@click.option("--kind", type=click.Choice(["llama", "qwen2"]), default="llama")
def tiny_assets_command(root: str, kind: str) -> None:
    """Write the tiny offline model (ROOT/model) and dataset (ROOT/data.jsonl)."""
    model_dir, data_path = write_tiny_assets(root, kind)
    click.echo(f"tiny model: {model_dir}\ntiny dataset: {data_path}")


@click.group()
def main() -> None:
    """secura-plugins commands for axolotl runs."""


main.add_command(merge_command, name="merge")
main.add_command(tiny_assets_command)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
