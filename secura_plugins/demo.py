"""``secura demo``: the continual-learning lab's short version (see :mod:`secura_plugins.lab`).

A tiny Llama is pretrained offline on synthetic knowledge (cached after the first run),
then fine-tuned on 3 tasks in a row with LoRA and with SECURA through ``trl.SFTTrainer``;
the table shows how much of the base's knowledge each keeps and how well each learned.
Run it with ``secura demo`` (or ``make demo``, or ``python -m secura_plugins.demo``).
"""

from __future__ import annotations

import argparse

from .lab.cli import add_demo_arguments as add_arguments
from .lab.cli import run_demo as run_cli

__all__ = ["add_arguments", "main", "run_cli"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(run_cli(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
