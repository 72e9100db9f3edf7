"""The lab's compared methods: :class:`MethodSpec`, :data:`METHODS`, :func:`method_spec`.

A method is an adapter (``None`` = full fine-tuning) plus continual extras (EWC, replay,
the keep tools). ``<method>+keep`` is any adapter method with the
:mod:`secura_plugins.keep` tools; it is its own learning-rate *family*, so a sweep picks
its rate apart from the plain method's.

Example:
    >>> from secura_plugins.lab.methods import method_spec
    >>> method_spec("secura-m2").adapter["merge"], method_spec("lora+ewc").family
    ('m2', 'lora')
    >>> spec = method_spec("lora+keep", keep={"kl_mode": "cached"})
    >>> spec.family, spec.keep
    ('lora+keep', {'preset': 'keep', 'kl_mode': 'cached'})
    >>> both = method_spec("lora+replay+keep")  # continual extras compose with keep
    >>> both.family, both.replay, both.keep
    ('lora+replay+keep', 0.2, 'keep')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["EWC_LAMBDA", "METHODS", "REPLAY_RATIO", "MethodSpec", "method_spec"]


@dataclass(frozen=True)
class MethodSpec:
    """A compared method: an adapter (``None`` = full fine-tuning) plus continual extras."""

    name: str
    family: str
    adapter: dict[str, Any] | None = None
    ewc: float | None = None
    replay: float | None = None
    replay_base: bool = False
    #: The keep tools (self-rehearsal + KL anchor): a :data:`~secura_plugins.keep.KEEP_PRESETS`
    #: name, or a dict of :class:`~secura_plugins.keep.KeepConfig` fields (``preset`` + overrides).
    keep: str | dict[str, Any] | None = None


#: EWC strength. The Fisher of these tiny models' parameters is 1e-10..1e-4, so lambda
#: must be large for the penalty to matter at all.
EWC_LAMBDA = 1e6
REPLAY_RATIO = 0.2

_R = 8
_SECURA = {"method": "secura", "r": _R}


def _m(name: str, family: str, adapter: dict[str, Any] | None, **kw: Any) -> MethodSpec:
    return MethodSpec(name, family, adapter, **kw)


METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in [
        _m("full", "full", None),
        _m("lora", "lora", {"method": "lora", "r": _R}),
        _m("dora", "dora", {"method": "dora", "r": _R}),
        _m("curlora", "curlora", {"method": "curlora", "r": _R}),
        _m("sclora", "sclora", {"method": "sclora", "r": _R}),
        _m("secura", "secura", dict(_SECURA)),
        _m("secura-m2", "secura-m2", {**_SECURA, "merge": "m2"}),
        _m("secura-released", "secura-released", {**_SECURA, "smagnorm": "released"}),
        _m("secura-off", "secura-off", {**_SECURA, "smagnorm": "off"}),
        _m("secura-nomerge", "secura-nomerge", {**_SECURA, "merge": "none"}),
        _m("secura-r16", "secura-r16", {**_SECURA, "r": 16}),
        _m("lora+ewc", "lora", {"method": "lora", "r": _R}, ewc=EWC_LAMBDA),
        _m("lora+replay", "lora", {"method": "lora", "r": _R}, replay=REPLAY_RATIO),
        _m(
            "lora+replay-base",
            "lora",
            {"method": "lora", "r": _R},
            replay=REPLAY_RATIO,
            replay_base=True,
        ),
        _m("secura+ewc", "secura", dict(_SECURA), ewc=EWC_LAMBDA),
        _m("secura+replay", "secura", dict(_SECURA), replay=REPLAY_RATIO),
    ]
}


def method_spec(name: str, keep: Mapping[str, Any] | None = None) -> MethodSpec:
    """The :class:`MethodSpec` called ``name`` (a clear error lists the choices).

    ``<method>+keep`` (or ``+rehearsal-only``) adds the :mod:`secura_plugins.keep` tools
    (the base's self-rehearsal and the KL anchor to it) to any adapter method, as its own
    learning-rate family; ``keep`` overrides fields of the preset (checked here)."""
    from ..keep import KEEP_PRESETS, KeepConfig

    stem, _, preset = name.rpartition("+")
    if stem in METHODS and preset in KEEP_PRESETS:
        if METHODS[stem].adapter is None:
            from ..errors import SecuraConfigError

            raise SecuraConfigError(
                "--methods",
                f"{name!r}: keep needs an adapter (it disables it to ask the "
                f"base); use it with one of {', '.join(m for m in METHODS if METHODS[m].adapter)}",
            )
        settings: str | dict[str, Any] = preset
        if keep:
            settings = {"preset": preset, **keep}
            KeepConfig.coerce(settings)  # a bad field fails here, before any training
        return dataclasses.replace(METHODS[stem], name=name, family=name, keep=settings)
    if name not in METHODS:
        from ..errors import SecuraConfigError, did_you_mean

        fix = did_you_mean(name, list(METHODS))
        raise SecuraConfigError(
            "--methods",
            f"unknown lab method {name!r}; {fix}choose from {', '.join(METHODS)} "
            f"(any adapter method also as <method>+{'|+'.join(KEEP_PRESETS)})",
        )
    return METHODS[name]
