"""What the test tiers share (``tests/`` is on ``sys.path``: pyproject's pytest ``pythonpath``).

- ``fixtures``: tiny checkpoints, dense and 4-bit loaders, batches, a training loop
  (its fixtures are registered for every tier by ``tests/conftest.py``).
- ``trl_helpers``: tiny datasets, an ``SFTConfig``, 4-bit loading, adapter snapshots.
- ``axolotl_helpers``: a tiny workspace, axolotl's real training entry in a subprocess and
  the probe plugin it loads (``helpers.axolotl_helpers.ProbePlugin``).
- ``real_model_helpers``: the fresh process of the real SmolLM2 tests.
- ``ddp_worker``: one torchrun rank of ``tests/e2e/test_ddp.py``.
"""
