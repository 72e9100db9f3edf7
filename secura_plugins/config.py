"""The one configuration object of the library: :class:`AdapterConfig`.

Every field carries its help text and its checks (:func:`secura_plugins.options.option`);
construction rejects bad values with a :class:`~secura_plugins.errors.SecuraConfigError`
that names the field and the fix. The fields every method shares live here; each method's
own settings are its options dataclass (``AdapterConfig.options``), passed and read flat.

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

import copy
import difflib
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any

from .errors import SecuraConfigError, did_you_mean
from .options import MethodOptions, check_value, option

DEFAULT_TARGET_MODULES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)

ADAPTER_DTYPES = ("float32", "bfloat16", "float16")
#: Names users bring from PEFT/axolotl configs, and the field they mean (the methods'
#: options declare their own aliases in their field metadata).
FIELD_ALIASES = {
    "rank": "r",
    "lora_r": "r",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "targets": "target_modules",
    "lora_target_modules": "target_modules",
}


def __getattr__(name: str) -> Any:
    # SECURA's choices and saved defaults moved to its options module (deprecated here).
    moved = {"SAVED_DEFAULTS": "SecuraOptions.saved_defaults"}
    moved |= {n: n for n in ("SMAGNORM_MODES", "MERGE_STRATEGIES", "A_INITS", "CR_SELECTIONS")}
    if name not in moved:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"secura_plugins.config.{name} moved to "
        f"secura_plugins.methods.secura_options.{moved[name]}",
        DeprecationWarning,
        stacklevel=2,
    )
    from .methods import secura_options

    if name == "SAVED_DEFAULTS":
        return secura_options.SecuraOptions.saved_defaults
    return getattr(secura_options, name)


def _method_options(method: str) -> type[MethodOptions]:
    from .manager import get_plugin_manager

    cls = get_plugin_manager().get_method(method).options_class
    clash = sorted({f.name for f in fields(cls)} & {f.name for f in fields(AdapterConfig)})
    if clash:
        raise TypeError(
            f"adapter method {method!r}: its options class {cls.__name__} redefines the common "
            f"field(s) {', '.join(clash)} of AdapterConfig; rename them"
        )
    return cls


@dataclass(init=False)
class AdapterConfig:
    """How to adapt a model: which method, where, and its hyper-parameters.

    The same object drives the Python API, ``SecuraCallback``, the axolotl plugin
    (its ``secura:`` block) and the recipes of the ``secura`` command. The fields every
    method shares are fields of this class; a method's own settings live in ``options``
    (its :class:`~secura_plugins.options.MethodOptions` dataclass, e.g. SECURA's ``k``,
    ``smagnorm``, ``merge``...). They are passed, read and written flat, as before::

        AdapterConfig(method="secura", r=8, merge="m2").merge  ->  'm2'
    """

    method: str = option(
        "Adapter method: 'secura', 'curlora', 'sclora', the baselines 'lora' and 'dora', "
        "or a name registered by a third-party plugin.",
        "secura",
    )
    r: int = option(
        "Rank: number of rows/columns of W kept by SECURA and CURLoRA (C is d_out x r, "
        "R is r x d_in), or the LoRA rank of sclora/lora/dora.",
        16,
        integer=True,
        minimum=1,
    )
    target_modules: list[str] | str = option(
        "Module-name suffixes of the linear layers to adapt, or 'all-linear'.",
        factory=lambda: list(DEFAULT_TARGET_MODULES),
    )
    lora_alpha: float | None = option(
        "Scaling numerator: the adapter output is multiplied by lora_alpha / r. None means r "
        "(scale 1).",
        None,
        low=0.0,
        low_open=True,
        optional=True,
    )
    lora_dropout: float = option(
        "Dropout on the adapter input, in [0, 1).", 0.0, low=0.0, high=1.0, high_open=True
    )
    adapter_dtype: str = option(
        "dtype of adapter tensors (C, R, cores). float32 is the safe default, also on 4-bit "
        "and bf16 bases.",
        "float32",
        choices=ADAPTER_DTYPES,
    )
    seed: int = option(
        "Seed of every random choice (CURLoRA sampling, A init).", 0, integer=True, minimum=0
    )
    options: MethodOptions = field(
        default_factory=MethodOptions,
        metadata={"help": "The method's own settings (its options dataclass)."},
    )

    def __init__(
        self,
        method: str = "secura",
        r: int = 16,
        target_modules: list[str] | str | None = None,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
        adapter_dtype: str = "float32",
        seed: int = 0,
        options: MethodOptions | dict[str, Any] | None = None,
        **method_options: Any,
    ) -> None:
        self.method = method
        self.r = r
        self.target_modules = (
            list(DEFAULT_TARGET_MODULES) if target_modules is None else target_modules
        )
        self.lora_alpha = lora_alpha
        self.lora_dropout = lora_dropout
        self.adapter_dtype = adapter_dtype
        self.seed = seed
        cls = self._check_common()
        own, foreign = _split_options(method, cls, method_options)
        for key, owner in foreign.items():
            warnings.warn(
                f"AdapterConfig: {key!r} is an option of method {owner!r}, not of "
                f"{method!r}; it is ignored",
                UserWarning,
                stacklevel=2,
            )
        if isinstance(options, dict):
            options = cls(**{**options, **own})
        elif options is None:
            options = cls(**own)
        elif not isinstance(options, cls):
            raise SecuraConfigError(
                "options",
                f"method {method!r} takes {cls.__name__}, got {type(options).__name__}",
            )
        else:
            options = replace(options, **own)  # a copy: configs never share their options
        self.options = options
        options.check(self)

    def _check_common(self) -> type[MethodOptions]:
        for f in fields(self):
            if f.name not in ("method", "target_modules", "options"):
                setattr(self, f.name, check_value(f.name, getattr(self, f.name), f.metadata))
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
        return _method_options(self.method)

    # Flat access to the method's options: cfg.merge is cfg.options.merge.
    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "options":
            raise AttributeError(name)
        options = self.__dict__.get("options")
        if options is not None and name in {f.name for f in fields(options)}:
            return getattr(options, name)
        owner = _owner_of(name)
        if owner is not None:
            raise AttributeError(
                f"{name!r} is an option of method {owner!r}; this config's method is "
                f"{self.method!r} (its options: {', '.join(options_names(self.options))})"
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        options = self.__dict__.get("options")
        if options is not None and name in {f.name for f in fields(options)}:
            setattr(options, name, value)
        else:
            object.__setattr__(self, name, value)

    @property
    def adapter_method(self) -> Any:
        """The registered :class:`~secura_plugins.methods.base.AdapterMethod` of ``method``
        (its capabilities tell hosts what to do; nothing branches on method names)."""
        from .manager import get_plugin_manager

        return get_plugin_manager().get_method(self.method)

    @property
    def core_width(self) -> int:
        """SECURA's k (4 r when not set)."""
        k = getattr(self.options, "k", None)
        return k if k is not None else 4 * self.r

    @property
    def scaling(self) -> float:
        """Multiplier of the adapter output: lora_alpha / r."""
        return (self.lora_alpha if self.lora_alpha is not None else self.r) / self.r

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field, the method's options flat beside the
        common ones (the format of saved adapters, recipes and the axolotl block)."""
        common = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "options"}
        common["target_modules"] = copy.copy(common["target_modules"])
        return {**common, **asdict(self.options)}

    @classmethod
    def field_names(cls, method: str | None = None) -> list[str]:
        """The keys ``from_dict`` takes for ``method`` (every method's when None)."""
        common = [f.name for f in fields(cls) if f.name != "options"]
        return common + [n for n in _all_options(method) if n not in common]

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> AdapterConfig:
        """Build from a mapping (a YAML block, a saved JSON), rejecting unknown keys by name."""
        data = dict(data or {})
        method = data.get("method", "secura")
        if isinstance(method, str) and method in _known_methods():
            names = cls.field_names(method) + ["options"]
            valid = names[:-1]
            for key in data:
                if key not in names and _owner_of(str(key)) is None:
                    fix = did_you_mean(key, valid, _aliases(method))
                    raise SecuraConfigError(
                        str(key), f"unknown field; {fix}valid fields: {', '.join(valid)}"
                    )
        return cls(**data)

    @classmethod
    def from_saved(cls, data: dict[str, Any]) -> AdapterConfig:
        """Build from a config saved with an adapter. Saved configs hold every method's
        fields flat (up to 0.1) or their own method's: others' are dropped; missing later
        fields take the options' ``saved_defaults`` (the behaviour the adapter was trained
        with).

        Example:
            >>> AdapterConfig.from_saved({"method": "secura", "r": 4}).cr_select
            'smallest'
        """
        data = dict(data)
        method = data.get("method", "secura")
        if method not in _known_methods():
            return cls.from_dict(data)  # names the unknown method
        opts = _method_options(method)
        own = {f.name for f in fields(opts)}
        data = {k: v for k, v in data.items() if k in own or _owner_of(k) is None}
        return cls.from_dict({**opts.saved_defaults, **data})

    @staticmethod
    def describe(method: str | None = None) -> dict[str, str]:
        """Field name -> help text (used by the CLI and the docs): the common fields and
        the options of ``method`` (of every registered method when None)."""
        common = {f.name: f.metadata.get("help", "") for f in fields(AdapterConfig)}
        common.pop("options")
        return {**common, **_all_options(method)}


def _known_methods() -> list[str]:
    from .manager import get_plugin_manager

    return get_plugin_manager().method_names()


def options_names(options: MethodOptions) -> list[str]:
    return [f.name for f in fields(options)] or ["none"]


def _all_options(method: str | None) -> dict[str, str]:
    """Option name -> help of ``method``'s options (of every method's when None)."""
    from .manager import get_plugin_manager

    pm = get_plugin_manager()
    out: dict[str, str] = {}
    for m in [pm.get_method(method)] if method else list(pm.methods):
        for name, text in m.options_class.describe().items():
            out.setdefault(name, text)
    return out


def _owner_of(name: str, value: Any = MISSING) -> str | None:
    """The registered method whose options have a field ``name``, if any (``value``, when
    given, is checked against that field: a bad value is an error even where ignored)."""
    from .manager import get_plugin_manager

    for m in get_plugin_manager().methods:
        for f in fields(m.options_class):
            if f.name == name:
                if value is not MISSING:
                    check_value(name, value, f.metadata)
                return m.name
    return None


def adapter_aliases() -> dict[str, str]:
    """Other spellings -> field, of the common fields and every method's options."""
    return _aliases("")


def _aliases(method: str) -> dict[str, str]:
    from .manager import get_plugin_manager

    out = dict(FIELD_ALIASES)
    for m in get_plugin_manager().methods:
        out.update(m.options_class.aliases())
    return out


def _split_options(
    method: str, cls: type[MethodOptions], given: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, str]]:
    """(``method``'s own options, {other key: the method owning it}); unknown keys raise."""
    own_names = {f.name for f in fields(cls)}
    own, foreign = {}, {}
    for key, value in given.items():
        if key in own_names:
            own[key] = value
            continue
        owner = _owner_of(key, value)
        if owner is None:
            valid = AdapterConfig.field_names(method)
            fix = did_you_mean(key, valid, _aliases(method))
            raise SecuraConfigError(key, f"unknown field; {fix}valid fields: {', '.join(valid)}")
        foreign[key] = owner
    return own, foreign


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
