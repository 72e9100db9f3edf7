"""The one configuration object of the library: :class:`AdapterConfig`.

Every field carries its help text; ``__post_init__`` rejects bad values with a
:class:`~secura_plugins.errors.SecuraConfigError` that names the field and the fix.

Example:
    >>> from secura_plugins import AdapterConfig
    >>> cfg = AdapterConfig(method="secura", r=8)
    >>> cfg.core_width           # k defaults to 4 r
    32
    >>> AdapterConfig.from_dict({"method": "secura", "rank": 8})
    Traceback (most recent call last):
    ...
    secura_plugins.errors.SecuraConfigError: rank: unknown field; did you mean 'r'? ...
"""

from __future__ import annotations

import difflib
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from .errors import SecuraConfigError, did_you_mean

DEFAULT_TARGET_MODULES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)

SMAGNORM_MODES = ("normalized", "released", "off", "continuous")
MERGE_STRATEGIES = ("m1", "m2", "none")
A_INITS = ("orthogonal", "released")
CR_SELECTIONS = ("smallest", "largest", "random", "svd_minor", "svd_major")
ADAPTER_DTYPES = ("float32", "bfloat16", "float16")
#: Fields added after adapters were first saved, with the value that reproduces what those
#: adapters did. A saved config that lacks one loads with this value, not today's default,
#: so changing a default never changes an old adapter's behaviour.
SAVED_DEFAULTS: dict[str, Any] = {"a_scale": 1.0, "cr_select": "smallest"}
#: Names users bring from PEFT/axolotl configs or the paper, and the field they mean.
FIELD_ALIASES = {
    "rank": "r",
    "lora_r": "r",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "targets": "target_modules",
    "lora_target_modules": "target_modules",
    "signorm": "smagnorm",
    "s_magnorm": "smagnorm",
    "merge_strategy": "merge",
    "core_width": "k",
}


def _help(text: str, default: Any = MISSING, factory: Any = MISSING) -> Any:
    if factory is not MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class AdapterConfig:
    """How to adapt a model: which method, where, and its hyper-parameters.

    The same object drives the Python API, ``SecuraCallback``, the axolotl plugin
    (its ``secura:`` block) and the recipes of the ``secura`` command.
    """

    method: str = _help(
        "Adapter method: 'secura', 'curlora', 'sclora', the baselines 'lora' and 'dora', "
        "or a name registered by a third-party plugin.",
        "secura",
    )
    r: int = _help(
        "Rank: number of rows/columns of W kept by SECURA and CURLoRA (C is d_out x r, "
        "R is r x d_in), or the LoRA rank of sclora/lora/dora.",
        16,
    )
    k: int | None = _help("SECURA core width: A is r x k, B is k x r. None means 4 r.", None)
    target_modules: list[str] | str = _help(
        "Module-name suffixes of the linear layers to adapt, or 'all-linear'.",
        factory=lambda: list(DEFAULT_TARGET_MODULES),
    )
    smagnorm: str = _help(
        "SECURA's S-MagNorm gate: 'normalized' (the paper's intent as written, y = (2 h0 + dh) "
        "/ S with S in about [1.05, 1.95]), 'released' (the authors' code, S in (1, 1.5]), "
        "'continuous' (y = h0 + dh / S: S = 2 averages old and new, S = 1 passes the change; "
        "y -> h0 as dh -> 0) or 'off' (plain CABR, y = h0 + dh).",
        "normalized",
    )
    smagnorm_scale: float = _help("Sigmoid sharpness s of S-MagNorm (6 in the authors' code).", 6.0)
    merge: str = _help(
        "SECURA merge strategy: 'm1' (fold A B into the frozen accumulator U_acc, which joins "
        "the frozen path), 'm2' (fold into a long-term copy that stays in the adapter path), "
        "or 'none'.",
        "m1",
    )
    merge_every: int = _help("Optimizer steps between SECURA merges (m1/m2).", 16)
    output_bias: bool = _help("Train SECURA's output bias b_L (zeros at start).", False)
    a_init: str = _help(
        "Initialisation of SECURA's A: 'orthogonal' (seeded, orthonormal rows scaled to W's "
        "RMS) or 'released' (the authors' code: the top-left r x k block of W).",
        "orthogonal",
    )
    a_scale: float = _help(
        "Multiplier of SECURA's initial A (1 keeps the a_init scale: for 'orthogonal', "
        "orthonormal rows x RMS(W) x sqrt(k)).",
        1.0,
    )
    cr_select: str = _help(
        "Which directions of W SECURA's C and R keep: 'smallest' (the paper: the r columns and "
        "rows of smallest L2 norm), 'largest', 'random' (seeded), or the SVD's 'svd_minor' / "
        "'svd_major' directions (C = U_r sqrt(s_r), R = sqrt(s_r) V_r^T; one SVD per layer).",
        "smallest",
    )
    beta: float = _help(
        "SC-LoRA trade-off in [0, 1]: larger keeps more of the preserved knowledge.", 0.5
    )
    lora_alpha: float | None = _help(
        "Scaling numerator: the adapter output is multiplied by lora_alpha / r. None means r "
        "(scale 1).",
        None,
    )
    lora_dropout: float = _help("Dropout on the adapter input, in [0, 1).", 0.0)
    adapter_dtype: str = _help(
        "dtype of adapter tensors (C, R, cores). float32 is the safe default, also on 4-bit "
        "and bf16 bases.",
        "float32",
    )
    eps: float = _help("Epsilon of S-MagNorm's relative change |dh| / (|h0| + eps).", 1e-6)
    seed: int = _help("Seed of every random choice (CURLoRA sampling, A init).", 0)

    def __post_init__(self) -> None:
        if self.smagnorm is False:  # YAML 1.1 reads a bare `off` as false
            self.smagnorm = "off"
        _check_int("r", self.r, minimum=1)
        if self.k is not None:
            _check_int("k", self.k, minimum=1)
            if self.k < self.r:
                raise SecuraConfigError(
                    "k", f"must be >= r ({self.r}), got {self.k}; the paper uses k > r (e.g. 4 r)"
                )
        _check_int("merge_every", self.merge_every, minimum=1)
        _check_int("seed", self.seed, minimum=0)
        _check_choice("smagnorm", self.smagnorm, SMAGNORM_MODES)
        _check_choice("merge", self.merge, MERGE_STRATEGIES)
        _check_choice("a_init", self.a_init, A_INITS)
        _check_choice("cr_select", self.cr_select, CR_SELECTIONS)
        _check_number("a_scale", self.a_scale, low=0.0, low_open=True)
        _check_choice("adapter_dtype", self.adapter_dtype, ADAPTER_DTYPES)
        _check_number("smagnorm_scale", self.smagnorm_scale, low=0.0, low_open=True)
        _check_number("beta", self.beta, low=0.0, high=1.0)
        _check_number("lora_dropout", self.lora_dropout, low=0.0, high=1.0, high_open=True)
        _check_number("eps", self.eps, low=0.0, low_open=True)
        if self.lora_alpha is not None:
            _check_number("lora_alpha", self.lora_alpha, low=0.0, low_open=True)
        if not isinstance(self.output_bias, bool):
            raise SecuraConfigError(
                "output_bias", f"must be true or false, got {self.output_bias!r}"
            )
        self.target_modules = _check_targets(self.target_modules)
        if not isinstance(self.method, str) or not self.method:
            raise SecuraConfigError("method", f"must be a method name, got {self.method!r}")
        from .manager import get_plugin_manager

        known = get_plugin_manager().method_names()
        if self.method not in known:
            hint = difflib.get_close_matches(self.method, known, n=1)
            fix = f"did you mean {hint[0]!r}? " if hint else ""
            raise SecuraConfigError(
                "method",
                f"unknown adapter method {self.method!r}; {fix}known methods: {', '.join(known)} "
                "(third-party methods register through the 'secura_plugins' entry-point group)",
            )

    @property
    def core_width(self) -> int:
        """SECURA's k (4 r when not set)."""
        return self.k if self.k is not None else 4 * self.r

    @property
    def scaling(self) -> float:
        """Multiplier of the adapter output: lora_alpha / r."""
        return (self.lora_alpha if self.lora_alpha is not None else self.r) / self.r

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> AdapterConfig:
        """Build from a mapping (a YAML block, a saved JSON), rejecting unknown keys by name."""
        data = dict(data or {})
        names = [f.name for f in fields(cls)]
        for key in data:
            if key not in names:
                fix = did_you_mean(key, names, FIELD_ALIASES)
                raise SecuraConfigError(
                    str(key), f"unknown field; {fix}valid fields: {', '.join(names)}"
                )
        return cls(**data)

    @classmethod
    def from_saved(cls, data: dict[str, Any]) -> AdapterConfig:
        """Build from a config saved with an adapter: missing later fields take
        :data:`SAVED_DEFAULTS` (the behaviour the adapter was trained with).

        Example:
            >>> AdapterConfig.from_saved({"method": "secura", "r": 4}).cr_select
            'smallest'
        """
        return cls.from_dict({**SAVED_DEFAULTS, **dict(data)})

    @staticmethod
    def describe() -> dict[str, str]:
        """Field name -> help text (used by the CLI and the docs)."""
        return {f.name: f.metadata.get("help", "") for f in fields(AdapterConfig)}


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SecuraConfigError(name, f"must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise SecuraConfigError(name, f"must be an integer >= {minimum}, got {value}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        fix = did_you_mean(value, choices)
        raise SecuraConfigError(name, f"got {value!r}; {fix}choose one of {', '.join(choices)}")


def _check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise SecuraConfigError(name, f"must be a number, got {value!r}")
    lo_ok = low is None or (value > low if low_open else value >= low)
    hi_ok = high is None or (value < high if high_open else value <= high)
    if not (lo_ok and hi_ok):
        lo = "" if low is None else ("(" if low_open else "[") + str(low)
        hi = "" if high is None else str(high) + (")" if high_open else "]")
        span = f"{lo}, {hi}" if low is not None and high is not None else (lo or hi)
        raise SecuraConfigError(name, f"must be in {span}, got {value}")


def _check_targets(value: Any) -> list[str] | str:
    if value == "all-linear":
        return value
    if isinstance(value, str):
        value = [value]
    if (
        not isinstance(value, (list, tuple))
        or not value
        or not all(isinstance(v, str) and v for v in value)
    ):
        raise SecuraConfigError(
            "target_modules",
            f"must be a non-empty list of module-name suffixes (e.g. ['q_proj', 'v_proj']) "
            f"or 'all-linear', got {value!r}",
        )
    return list(value)
