"""The ``secura:`` block of an axolotl YAML, as a pydantic model merged into axolotl's schema.

Axolotl merges :class:`SecuraArgs` into its config class when the plugin is listed in
``plugins:``. Every field of the adapter part defaults to ``None``, which means "the
library's default" (see :class:`secura_plugins.AdapterConfig`); the values are checked
once more by ``AdapterConfig`` itself, so axolotl and the Python API reject the same
things with the same messages.

Example YAML::

    plugins:
      - secura_plugins.integrations.axolotl.SecuraPlugin
    adapter: secura
    secura:
      method: secura
      r: 16
      merge: m1
      merge_every: 16

Errors happen at config time and name the field and the fix, e.g. a misspelt
``secura.merge_evry`` gives ``secura.merge_evry: unknown field; did you mean
'merge_every'? ...``.
"""

from __future__ import annotations

import difflib
from typing import Any, ClassVar

from pydantic import BaseModel, Field, create_model, field_validator, model_validator

from secura_plugins.errors import did_you_mean

#: The value of ``adapter:`` that this plugin owns.
ADAPTER_NAME = "secura"
#: Dotted path users put under ``plugins:``.
PLUGIN_PATH = "secura_plugins.integrations.axolotl.SecuraPlugin"

# Top-level axolotl LoRA fields used when the ``secura:`` block leaves a value unset, so
# a YAML switched from ``adapter: lora`` to ``adapter: secura`` keeps its rank and targets.
_LORA_FALLBACKS = {
    "r": "lora_r",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "target_modules": "lora_target_modules",
}


class _StrictBlock(BaseModel):
    """A YAML block that rejects unknown keys, naming the key, a likely fix and the fields."""

    block_path: ClassVar[str] = "secura"

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        from secura_plugins.config import adapter_aliases

        aliases = {**adapter_aliases(), "lambda": "lam", "lambda_": "lam", "buffer_path": "buffer"}
        names = list(cls.model_fields)
        for key in data:
            if key not in names:
                fix = did_you_mean(key, names, aliases)
                raise ValueError(
                    f"{cls.block_path}.{key}: unknown field; {fix}valid fields: {', '.join(names)}"
                )
        return data


class EwcSettings(_StrictBlock):
    """``secura.ewc``: online EWC over the adapter's trainable tensors."""

    block_path: ClassVar[str] = "secura.ewc"

    lam: float = Field(default=1.0, ge=0.0, description="Penalty strength lambda (0 = off).")
    gamma: float = Field(
        default=1.0, ge=0.0, le=1.0, description="Decay of earlier tasks' Fisher (online EWC)."
    )
    fisher_batches: int | None = Field(
        default=None, ge=1, description="Batches for the end-of-task Fisher (default 32)."
    )
    state: str | None = Field(
        default=None,
        description="EWC state of earlier tasks (secura_ewc.safetensors). Default: the one in "
        "lora_model_dir, if there is one (a first task starts empty).",
    )


class ReplaySettings(_StrictBlock):
    """``secura.replay``: mix rows of earlier tasks into this task's datasets."""

    block_path: ClassVar[str] = "secura.replay"

    ratio: float = Field(
        default=0.05, ge=0.0, lt=1.0, description="Share of replayed rows in the mixed data."
    )
    capacity: int = Field(default=1000, ge=1, description="Rows the buffer keeps (reservoir).")
    seed: int = Field(default=0, ge=0, description="Seed of the reservoir and of the sampling.")
    buffer: str | None = Field(
        default=None,
        description="Replay buffer of earlier tasks (secura_replay.jsonl). Default: the one in "
        "lora_model_dir, if there is one (a first task only fills the buffer).",
    )
    task: str | None = Field(
        default=None, description="Tag of this task's rows in the buffer (default: output_dir)."
    )


class CalibrationSettings(_StrictBlock):
    """``secura.calibration``: the data SC-LoRA's initialisation is computed from."""

    block_path: ClassVar[str] = "secura.calibration"

    positive: str | None = Field(
        default=None,
        description="JSON-lines file of the new task's text. Default: this run's datasets.",
    )
    negative: str | None = Field(
        default=None, description="JSON-lines file of text whose knowledge must be preserved."
    )
    text_field: str | None = Field(
        default=None,
        description="Field holding a row's text. Default: 'text', else 'messages' contents, "
        "else every string value of the row joined by newlines.",
    )
    max_rows: int = Field(default=64, ge=1, description="Rows read from each file.")
    batch_size: int = Field(default=4, ge=1, description="Rows per calibration batch.")
    max_length: int | None = Field(
        default=None, ge=1, description="Token cut-off per row (default: sequence_len)."
    )
    layers_per_pass: int | None = Field(
        default=None, ge=1, description="Layers hooked per pass (bounds calibration memory)."
    )


#: ``secura:`` keys that are not ``AdapterConfig`` fields.
CONTINUAL_KEYS = ("ewc", "replay", "probe", "probe_steps", "calibration", "keep")


def _adapter_fields() -> dict[str, Any]:
    """``secura:`` adapter fields, generated from the same metadata as the Python API:
    :class:`~secura_plugins.AdapterConfig`'s common fields and every registered method's
    options dataclass (third-party ones included), each ``None`` by default (the library's
    default), with the dataclass field's help text."""
    import typing
    from dataclasses import fields

    from secura_plugins.config import AdapterConfig
    from secura_plugins.manager import get_plugin_manager

    sources: list[tuple[type, Any]] = [(AdapterConfig, fields(AdapterConfig))]
    sources += [(m.options_class, fields(m.options_class)) for m in get_plugin_manager().methods]
    out: dict[str, Any] = {}
    for cls, declared in sources:
        hints = typing.get_type_hints(cls)
        for f in declared:
            if f.name == "options":
                continue
            hint: Any = hints[f.name] | None
            text = f.metadata.get("help", "")
            if f.name in out:  # two methods share a name: one field, both meanings
                old_hint, old = out[f.name]
                hint = old_hint if old_hint == hint else Any
                text = old.description if text in old.description else f"{old.description} {text}"
            elif f.name in _LORA_FALLBACKS:
                text = f"{text} Falls back to {_LORA_FALLBACKS[f.name]}."
            out[f.name] = (hint, Field(default=None, description=text))
    return out


class _SettingsBase(_StrictBlock):
    """Validators and helpers of :class:`SecuraSettings` (its fields are generated)."""

    @field_validator("keep", mode="before", check_fields=False)
    @classmethod
    def _check_keep(cls, value: Any) -> Any:
        from secura_plugins.keep.config import KeepConfig

        coerced = KeepConfig.coerce(value)  # SecuraConfigError is a ValueError: named field
        return None if coerced is None else coerced.to_dict()

    @model_validator(mode="before")
    @classmethod
    def _yaml_off(cls, data: Any) -> Any:
        # YAML 1.1 reads a bare `off` as false: 'off' for fields whose choices include it.
        if not isinstance(data, dict):
            return data
        return {k: "off" if v is False and k in _OFF_CHOICES else v for k, v in data.items()}

    def adapter_fields(self) -> dict[str, Any]:
        """The adapter fields that were set, as keyword arguments of ``AdapterConfig``."""
        return self.model_dump(exclude_none=True, exclude=set(CONTINUAL_KEYS))


def _off_choices() -> frozenset[str]:
    from dataclasses import fields

    from secura_plugins.manager import get_plugin_manager

    return frozenset(
        f.name
        for m in get_plugin_manager().methods
        for f in fields(m.options_class)
        if "off" in (f.metadata.get("choices") or ())
    )


_OFF_CHOICES = _off_choices()

#: Settings of the ``secura:`` block. Adapter fields left ``None`` take the library's
#: default; ``ewc``/``replay``/``probe`` switch on the continual-learning pieces.
SecuraSettings = create_model(
    "SecuraSettings",
    __base__=_SettingsBase,
    __module__=__name__,
    **_adapter_fields(),
    ewc=(EwcSettings | None, Field(default=None, description="Online EWC (see EwcSettings).")),
    replay=(
        ReplaySettings | None,
        Field(default=None, description="Replay of earlier tasks' rows (see ReplaySettings)."),
    ),
    probe=(
        str | None,
        Field(
            default=None,
            description="Retention probe: a JSON-lines file of {prompt, answer} rows the model "
            "should keep answering; logged as eval_retention_* at evaluations and at the end.",
        ),
    ),
    probe_steps=(
        int | None,
        Field(default=None, ge=1, description="Also run the probe every this many training steps."),
    ),
    calibration=(
        CalibrationSettings | None,
        Field(default=None, description="SC-LoRA calibration data (method: sclora)."),
    ),
    keep=(
        Any,
        Field(
            default=None,
            description="Self-rehearsal and the KL anchor to the base: a preset name ('keep', "
            "the recommendation) or a dict of KeepConfig fields (preset, rehearsal, ratio, "
            "kl_lambda, kl_on_task, kl_mode, ...). With method: sclora and no "
            "calibration.negative, the rehearsal rows are SC-LoRA's preserve side.",
        ),
    ),
)
SecuraSettings.__doc__ = """Settings of the ``secura:`` block. Adapter fields left ``None`` take
the library's default; ``ewc``/``replay``/``probe`` switch on the continual-learning pieces."""


class SecuraArgs(BaseModel):
    """Plugin entry merged into axolotl's config: one nested ``secura:`` block."""

    secura: SecuraSettings | None = Field(
        default=None,
        description=f"SECURA / CURLoRA / SC-LoRA adapter settings, used with `adapter: secura`. "
        f"Needs `{PLUGIN_PATH}` under `plugins:`.",
    )

    @model_validator(mode="before")
    @classmethod
    def _check_secura_run(cls, data: Any) -> Any:
        """Config-time checks of a whole ``adapter: secura`` config (raw YAML dict)."""
        if not isinstance(data, dict):
            return data
        if data.get("adapter") != ADAPTER_NAME:
            return data
        _reject_misspelt_block(data)
        if data.get("load_in_8bit"):
            raise ValueError(
                "load_in_8bit: adapter: secura trains on full-precision or bitsandbytes 4-bit "
                "bases; set load_in_4bit: true (and load_in_8bit: false) instead"
            )
        if data.get("merge_lora"):
            raise ValueError(
                "merge_lora: axolotl's merge-lora merges plain LoRA only and would write a "
                "wrong model for adapter: secura; run `python -m "
                "secura_plugins.integrations.axolotl.cli merge <config.yml>` instead"
            )
        if data.get("rl"):
            raise ValueError(
                f"rl: adapter: secura supports supervised fine-tuning only, got rl: "
                f"{data.get('rl')!r}; remove rl or use adapter: lora"
            )
        config = adapter_config_from_cfg(data)  # SecuraConfigError names the field and fix
        settings = secura_settings(data)
        _check_state_files(settings)
        if config.adapter_method.needs_calibration and not data.get("lora_model_dir"):
            calibration = settings.calibration
            if calibration is None or not calibration.negative:
                raise ValueError(
                    "secura.calibration.negative: method sclora computes its start from "
                    "calibration data; set secura.calibration.negative to a JSON-lines file "
                    "of text whose knowledge must be preserved (positive defaults to the "
                    "run's datasets)"
                )
        return data


def _check_state_files(settings: SecuraSettings) -> None:
    """Explicit continual-state paths must exist (defaults may be absent: first task)."""
    from pathlib import Path

    paths = {
        "secura.ewc.state": settings.ewc.state if settings.ewc else None,
        "secura.replay.buffer": settings.replay.buffer if settings.replay else None,
        "secura.probe": settings.probe,
        "secura.calibration.positive": settings.calibration and settings.calibration.positive,
        "secura.calibration.negative": settings.calibration and settings.calibration.negative,
    }
    for field, path in paths.items():
        if path and not Path(path).is_file():
            fix = (
                "point it at the file an earlier run wrote, or leave it out to use the one "
                "in lora_model_dir"
                if field in ("secura.ewc.state", "secura.replay.buffer")
                else "point it at an existing JSON-lines file"
            )
            raise ValueError(f"{field}: no file at {path!r}; {fix}")


def _reject_misspelt_block(data: dict[str, Any]) -> None:
    """Axolotl silently drops unknown top-level keys; catch ``secrua:`` and friends."""
    for key in data:
        if (
            isinstance(key, str)
            and key != ADAPTER_NAME
            and difflib.get_close_matches(key, [ADAPTER_NAME], n=1, cutoff=0.8)
        ):
            raise ValueError(f"{key}: unknown top-level key; did you mean `{ADAPTER_NAME}:`?")


def secura_settings(cfg: Any) -> SecuraSettings:
    """The validated ``secura:`` block of an axolotl config (empty block if absent)."""
    block = cfg.get("secura") or {}
    if isinstance(block, SecuraSettings):
        return block
    return SecuraSettings.model_validate(_plain(block))


def _plain(value: Any) -> Any:
    """DictDefault / nested dicts -> plain dicts (pydantic validates plain containers)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def adapter_settings_from_cfg(cfg: Any) -> dict[str, Any]:
    """``AdapterConfig`` keyword arguments of an axolotl config (raw dict or DictDefault).

    Values of the ``secura:`` block win; unset ones fall back to axolotl's ``lora_r``,
    ``lora_alpha``, ``lora_dropout`` and ``lora_target_modules`` / ``lora_target_linear``.
    """
    settings = secura_settings(cfg).adapter_fields()
    for ours, theirs in _LORA_FALLBACKS.items():
        if ours not in settings and cfg.get(theirs) is not None:
            settings[ours] = cfg.get(theirs)
    if "target_modules" not in settings and cfg.get("lora_target_linear"):
        settings["target_modules"] = "all-linear"
    return settings


def adapter_config_from_cfg(cfg: Any):
    """The :class:`secura_plugins.AdapterConfig` of an axolotl config (see above)."""
    from secura_plugins import AdapterConfig

    try:
        return AdapterConfig.from_dict(adapter_settings_from_cfg(cfg))
    except ValueError as exc:
        # Name the YAML path: `secura.<field>` reads better in an axolotl error.
        field = getattr(exc, "field", None)
        if field is not None and not str(exc).startswith("secura."):
            raise ValueError(f"secura.{exc}") from exc
        raise


__all__ = [
    "ADAPTER_NAME",
    "PLUGIN_PATH",
    "CONTINUAL_KEYS",
    "CalibrationSettings",
    "EwcSettings",
    "ReplaySettings",
    "SecuraArgs",
    "SecuraSettings",
    "adapter_config_from_cfg",
    "adapter_settings_from_cfg",
]
