"""Test-only fault injection: kill the process at a named point of a save.

The resume tests need to stop ``secura train`` *inside* a save, at a point a real crash
(SIGKILL, preemption, power loss) could hit, and do it deterministically. The save paths
call :func:`kill_point` with a name; nothing happens unless the environment variable
``SECURA_TEST_KILL_AT`` names that point, as ``POINT`` (first time it is reached) or
``POINT#N`` (the N-th time). Then the process sends itself SIGKILL: no cleanup, no
``finally`` blocks, exactly like a preempted machine.

Points:

* ``adapter-weights``: ``save_adapter`` wrote the tensor file but not yet the config
  (this is also the middle of every Trainer checkpoint save: the model comes first,
  optimizer, scheduler, RNG and trainer state after it).
* ``checkpoint-marker``: the Trainer wrote a whole checkpoint and ``SecuraCallback``
  wrote its EWC and replay state, but not yet the completion marker.
* ``task-metrics``: a task's adapter, EWC and replay files are written, its
  ``metrics.json`` (the task's completion marker) is not.

Never set the variable outside tests.

Example:
    >>> kill_point("adapter-weights")  # no-op: SECURA_TEST_KILL_AT is not set
"""

from __future__ import annotations

import os
import signal
from collections import Counter

__all__ = ["KILL_ENV", "POINTS", "kill_point"]

KILL_ENV = "SECURA_TEST_KILL_AT"
POINTS = ("adapter-weights", "checkpoint-marker", "task-metrics")
_hits: Counter[str] = Counter()


def kill_point(name: str) -> None:
    """SIGKILL this process if ``SECURA_TEST_KILL_AT`` asks for point ``name`` now."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    point, _, nth = spec.partition("#")
    if point != name:
        return
    _hits[name] += 1
    if _hits[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
