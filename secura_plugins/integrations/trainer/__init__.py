"""The ``transformers.Trainer`` integration, split by concern.

* :mod:`.checkpoint`: the files a ``SecuraCallback`` adds to a checkpoint, when a
  checkpoint is complete, the last complete one, and which parameter sharding is refused.
  Light (no ``Trainer`` import): ``secura train`` and the axolotl plugin read it too.
* :mod:`.state`: what the callback and the trainer mixin hand each other
  (:class:`~.state.TrainerLink`), and the one place the callback finds its ``Trainer``.
* :mod:`.adapt`: putting the adapter on the Trainer's model at ``on_init_end``.
* :mod:`.callback`: :class:`~.callback.SecuraCallback`.
* :mod:`.mixin`: :class:`~.mixin.ContinualTrainerMixin` and ``SecuraSFTTrainer``.

End of task EWC consolidation (with the final SECURA merge) is continual-learning code:
:mod:`secura_plugins.continual.consolidate`. The public entry point is
:mod:`secura_plugins.integrations.trl`, which re-exports all of this.
"""
