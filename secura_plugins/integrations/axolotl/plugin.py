"""Axolotl plugin that makes ``adapter: secura`` a first-class adapter (4-bit included).

Hook points used in axolotl 0.19 (every hook returns at once when the config is not an
``adapter: secura`` one):

- ``get_input_args`` / ``get_adapter_capabilities``: the ``secura:`` block joins the
  schema and ``adapter: secura`` validates.
- ``register(cfg)`` (raw config, before validation): turns off axolotl's fused
  ``lora_*_kernel`` patches, which compute plain ``x A B`` and would bypass SECURA's
  layers, and, with ``load_in_4bit: true``, makes axolotl's ``ModelLoader`` pass a
  bitsandbytes 4-bit ``BitsAndBytesConfig`` (axolotl builds one only for the literal
  ``qlora``).
- ``post_model_build(cfg, model)``: k-bit preparation of the 4-bit base, where axolotl
  does it for ``qlora``.
- ``load_adapter(model, cfg, ...)``: builds the SECURA ``PeftModel`` (or loads a saved
  adapter from ``lora_model_dir``, the path of ``axolotl inference`` and of a second
  continual task).
- ``load_datasets(cfg)``: replay; earlier tasks' rows join ``datasets:`` before axolotl
  tokenizes them (returns None, so axolotl's own loader still runs).
- ``add_callbacks_pre_trainer(cfg, model)``: adds the library's ``SecuraCallback``
  (M1/M2 merges, metrics, EWC gradient, retention probe); it is created before the
  trainer so that its ``on_init_end`` runs.
- ``post_train(cfg, model)``: writes the EWC state and the replay buffer next to the
  adapter for the next task (see ``continual.py``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from axolotl.integrations.base import AdapterCapabilities, BasePlugin
from axolotl.utils.dict import DictDefault
from axolotl.utils.logging import get_logger

from .args import ADAPTER_NAME, PLUGIN_PATH, adapter_config_from_cfg, secura_settings
from .continual import (
    build_ewc,
    build_replay_buffer,
    prepare_replay_mix,
    task_name,
    task_rows,
)

# A name under "axolotl." so that axolotl's log filter shows our INFO lines (it lets
# only WARNING and above through for other loggers).
LOG = get_logger("axolotl.integrations.secura")

#: Axolotl's fused LoRA kernels: they read ``lora_A``/``lora_B`` directly and skip the
#: layer's forward, so SECURA's CABR product, S-MagNorm and merged state would be ignored.
FUSED_LORA_KERNEL_FIELDS = (
    "lora_mlp_kernel",
    "lora_qkv_kernel",
    "lora_o_kernel",
    "lora_embedding_kernel",
)


def is_secura_cfg(cfg: Any) -> bool:
    """True when an axolotl config (raw dict or ``DictDefault``) asks for ``adapter: secura``."""
    return cfg is not None and cfg.get("adapter") == ADAPTER_NAME


def bnb_4bit_config(compute_dtype: torch.dtype, overrides: dict[str, Any] | None = None):
    """The NF4 config for ``adapter: secura`` (:func:`secura_plugins.quant.nf4_config`,
    axolotl's ``qlora`` settings); ``overrides`` are the user's ``bnb_config_kwargs``."""
    from ...quant import nf4_config

    return nf4_config(compute_dtype, overrides)


def install_4bit_loading() -> None:
    """Teach axolotl's ``ModelLoader`` to load ``adapter: secura`` bases in 4 bit.

    ``ModelLoader._set_quantization_config`` fills ``model_kwargs["quantization_config"]``
    before any plugin hook runs, and only for ``adapter: qlora``; no hook can reach
    ``model_kwargs`` afterwards. This wraps that one method (idempotently): after the
    original ran, an ``adapter: secura`` + ``load_in_4bit`` config without a
    quantization config gets the same NF4 config as ``qlora``.
    """
    from axolotl.loaders.model import ModelLoader

    if getattr(ModelLoader, "_secura_4bit_installed", False):
        return
    original = ModelLoader._set_quantization_config

    @functools.wraps(original)
    def _set_quantization_config(self) -> None:
        original(self)
        if (
            is_secura_cfg(self.cfg)
            and self.cfg.load_in_4bit
            and "quantization_config" not in self.model_kwargs
        ):
            self.model_kwargs["quantization_config"] = bnb_4bit_config(
                self.cfg.torch_dtype or torch.float32, self.cfg.bnb_config_kwargs
            )
            LOG.info("adapter: secura: loading the base model in bitsandbytes 4-bit (nf4)")

    ModelLoader._set_quantization_config = _set_quantization_config
    ModelLoader._secura_4bit_installed = True


def count_4bit_linears(model: torch.nn.Module) -> int:
    """Number of bitsandbytes ``Linear4bit`` modules in ``model``."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        return 0
    return sum(isinstance(m, Linear4bit) for m in model.modules())


def make_secura_callback(cfg: DictDefault, keep: Any = None) -> tuple[Any, Any]:
    """The library's ``SecuraCallback`` for this run, and the replay buffer it hands on.

    The callback runs SECURA's M1/M2 merges (``secura_step_end``) after every optimizer
    step, logs ``secura/*`` metrics, adds the EWC gradient before each optimizer step and
    folds the task's Fisher in at the end; the model it sees already carries the adapter
    built by :meth:`SecuraPlugin.load_adapter`, so it builds none itself.
    """
    from secura_plugins.continual import load_pairs
    from secura_plugins.integrations.trl import SecuraCallback

    settings = secura_settings(cfg)
    buffer = build_replay_buffer(cfg, settings)
    callback = SecuraCallback(
        None,
        ewc=build_ewc(cfg, settings),
        replay=buffer,
        probe=load_pairs(settings.probe) if settings.probe else None,
        probe_steps=settings.probe_steps,
        fisher_batches=settings.ewc.fisher_batches if settings.ewc else None,
        keep=keep if keep is not None else settings.keep,
    )
    return callback, buffer


class SecuraPlugin(BasePlugin):
    """``adapter: secura`` for axolotl: SECURA, CURLoRA and SC-LoRA adapters, fp or 4-bit.

    Add ``secura_plugins.integrations.axolotl.SecuraPlugin`` under ``plugins:`` and set
    ``adapter: secura`` plus an optional ``secura:`` block (see ``args.py``).
    """

    def get_input_args(self) -> str:
        return "secura_plugins.integrations.axolotl.args.SecuraArgs"

    def get_adapter_capabilities(self) -> list[AdapterCapabilities]:
        # Not lora_like: axolotl must never fall back to its plain LoRA loader for us.
        return [AdapterCapabilities(name=ADAPTER_NAME, lora_like=False, relora=False)]

    def register(self, cfg: dict) -> None:
        if not is_secura_cfg(cfg):
            return
        from ...real_model import ALIAS, resolve_model_path

        if cfg.get("base_model") == ALIAS:  # the offline SmolLM2-135M-Instruct checkpoint
            cfg["base_model"] = resolve_model_path(ALIAS)
            LOG.info("adapter: secura: base_model: %s is %s", ALIAS, cfg["base_model"])
        enabled = [name for name in FUSED_LORA_KERNEL_FIELDS if cfg.get(name)]
        for name in FUSED_LORA_KERNEL_FIELDS:
            cfg[name] = False
        if enabled:
            LOG.warning(
                "adapter: secura: turned off %s; axolotl's fused LoRA kernels bypass the "
                "SECURA layers' forward pass (remove them from the YAML to silence this)",
                ", ".join(enabled),
            )
        else:
            LOG.info("adapter: secura: axolotl's fused lora_*_kernel patches stay off")
        if cfg.get("load_in_4bit"):
            install_4bit_loading()

    def post_model_build(self, cfg: DictDefault, model: Any) -> None:
        if not is_secura_cfg(cfg) or not cfg.load_in_4bit:
            return
        if count_4bit_linears(model) == 0:
            raise RuntimeError(
                "load_in_4bit: true was set for adapter: secura but the base model has no "
                "bitsandbytes Linear4bit layer; check that bitsandbytes is installed and "
                f"that `{PLUGIN_PATH}` is listed under plugins:"
            )
        from peft import prepare_model_for_kbit_training

        from ...quant import keep_4bit_layout

        keep_4bit_layout(model)
        LOG.info("adapter: secura: preparing the 4-bit base with prepare_model_for_kbit_training")
        prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=bool(cfg.gradient_checkpointing),
            gradient_checkpointing_kwargs=cfg.gradient_checkpointing_kwargs,
        )

    def load_adapter(
        self,
        model: Any,
        cfg: DictDefault,
        inference: bool = False,
        config_only: bool = False,
    ) -> tuple[Any, Any] | None:
        if not is_secura_cfg(cfg):
            return None
        import secura_plugins as core

        config = adapter_config_from_cfg(cfg)
        if config_only:
            raise NotImplementedError(
                "adapter: secura cannot hand a bare PEFT config to a trainer (RL flows); "
                "use supervised fine-tuning"
            )
        if cfg.lora_model_dir:
            LOG.info("adapter: secura: loading the adapter saved in %s", cfg.lora_model_dir)
            peft_model = core.load_adapter(model, cfg.lora_model_dir, is_trainable=not inference)
            saved = peft_model.secura_config.to_dict()
            differ = sorted(k for k, v in config.to_dict().items() if saved.get(k) != v)
            if differ:
                LOG.warning(
                    "adapter: secura: the saved adapter's settings are used; the secura: block "
                    "differs in %s (saved: %s)",
                    ", ".join(differ),
                    {k: saved.get(k) for k in differ},
                )
        else:
            LOG.info("adapter: secura: building %s adapter %s", config.method, config.to_dict())
            data: dict[str, Any] = {}
            settings = secura_settings(cfg)
            calibrated = config.adapter_method.needs_calibration
            if calibrated and settings.calibration is not None:
                from .calibration import calibration_data

                data = calibration_data(cfg, settings.calibration)
            if calibrated and settings.keep and "negative" not in data:
                data = {**data, **self._keep_calibration(cfg, model, data)}
            if "negative" in data:
                LOG.info(
                    "adapter: secura: SC-LoRA calibration on %d positive and %d negative batches",
                    len(data["positive"]),
                    len(data["negative"]),
                )
            peft_model = core.apply_adapter(model, config, **data)
        LOG.info("adapter: secura: parameters %s", core.count_parameters(peft_model))
        peft_config = peft_model.peft_config[peft_model.active_adapter]
        return peft_model, peft_config

    def _keep_calibration(self, cfg: DictDefault, model: Any, data: dict) -> dict[str, Any]:
        """SC-LoRA's preserve side from the base's self-rehearsal (``secura.keep``)."""
        from axolotl.loaders import load_tokenizer

        from secura_plugins.keep import Keep

        from .calibration import batches, row_text

        settings = secura_settings(cfg)
        tokenizer = load_tokenizer(cfg)
        rows = task_rows(cfg)
        self._keep = Keep(
            settings.keep, task_prompts=[row_text(r).split("\n", 1)[0] for r in rows[:256]]
        )
        self._keep.ensure_rows(model, tokenizer, run_dir=cfg.output_dir)
        out = {"negative": self._keep.negative_batches(tokenizer)}
        if "positive" not in data:
            out["positive"] = batches([row_text(r) for r in rows[:64]], tokenizer, 4, 512)
        return out

    def load_datasets(self, cfg: DictDefault, preprocess: bool = False) -> None:
        # Replay: append earlier tasks' rows as one more dataset, then let axolotl load
        # and tokenize everything as usual (returning None keeps its own loader).
        if not is_secura_cfg(cfg):
            return None
        settings = secura_settings(cfg)
        if settings.replay is not None:
            mix = prepare_replay_mix(cfg, settings.replay)
            if mix is not None:
                LOG.info("adapter: secura: replaying earlier tasks' rows from %s", mix)
        return None

    def add_callbacks_pre_trainer(self, cfg: DictDefault, model: Any) -> list[Any]:
        # Before the trainer exists, so the callback's on_init_end runs.
        if not is_secura_cfg(cfg):
            return []
        self._callback, self._buffer = make_secura_callback(cfg, getattr(self, "_keep", None))
        self._finished = False
        return [self._callback]

    def post_train(self, cfg: DictDefault, model: Any) -> None:
        # Axolotl 0.19 calls post_train twice (after trainer.train, after saving): once is
        # enough. Hand the task's state on: EWC (consolidated at on_train_end), replay
        # buffer with this task's rows, settings; the next task reads them through its
        # lora_model_dir.
        callback = getattr(self, "_callback", None)
        if not is_secura_cfg(cfg) or callback is None or self._finished:
            return
        self._finished = True
        if int(cfg.local_rank or 0) != 0:
            return
        if self._buffer is not None:
            settings = secura_settings(cfg)
            self._buffer.add(task_rows(cfg), task=task_name(cfg, settings))
        callback.save_state(cfg.output_dir)
        LOG.info(
            "adapter: secura: continual state written to %s (ewc: %s, replay: %s)",
            cfg.output_dir,
            callback.ewc,
            self._buffer,
        )
