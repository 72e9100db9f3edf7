"""SECURA's own options (its layer code is :mod:`secura_plugins.methods.secura`).

Example:
    >>> from secura_plugins import AdapterConfig
    >>> cfg = AdapterConfig(method="secura", r=4, merge="m2")
    >>> type(cfg.options).__name__, cfg.options.merge, cfg.merge
    ('SecuraOptions', 'm2', 'm2')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import SecuraConfigError
from ..options import MethodOptions, option

SMAGNORM_MODES = ("normalized", "released", "off", "continuous")
MERGE_STRATEGIES = ("m1", "m2", "none")
A_INITS = ("orthogonal", "released")
CR_SELECTIONS = ("smallest", "largest", "random", "svd_minor", "svd_major")


@dataclass
class SecuraOptions(MethodOptions):
    """SECURA's settings: core width, S-MagNorm gate, merges, output bias, A's start, C/R."""

    #: Fields added after adapters were first saved, with the value that reproduces what
    #: those adapters did.
    saved_defaults: ClassVar[dict[str, Any]] = {"a_scale": 1.0, "cr_select": "smallest"}

    k: int | None = option(
        "SECURA core width: A is r x k, B is k x r. None means 4 r.",
        None,
        integer=True,
        minimum=1,
        optional=True,
        aliases=("core_width",),
    )
    smagnorm: str = option(
        "SECURA's S-MagNorm gate: 'normalized' (the paper's intent as written, y = (2 h0 + dh) "
        "/ S with S in about [1.05, 1.95]), 'released' (the authors' code, S in (1, 1.5]), "
        "'continuous' (y = h0 + dh / S: S = 2 averages old and new, S = 1 passes the change; "
        "y -> h0 as dh -> 0) or 'off' (plain CABR, y = h0 + dh).",
        "normalized",
        choices=SMAGNORM_MODES,
        aliases=("signorm", "s_magnorm"),
    )
    smagnorm_scale: float = option(
        "Sigmoid sharpness s of S-MagNorm (6 in the authors' code).", 6.0, low=0.0, low_open=True
    )
    merge: str = option(
        "SECURA merge strategy: 'm1' (fold A B into the frozen accumulator U_acc, which joins "
        "the frozen path), 'm2' (fold into a long-term copy that stays in the adapter path), "
        "or 'none'.",
        "m1",
        choices=MERGE_STRATEGIES,
        aliases=("merge_strategy",),
    )
    merge_every: int = option(
        "Optimizer steps between SECURA merges (m1/m2).", 16, integer=True, minimum=1
    )
    output_bias: bool = option("Train SECURA's output bias b_L (zeros at start).", False, flag=True)
    a_init: str = option(
        "Initialisation of SECURA's A: 'orthogonal' (seeded, orthonormal rows scaled to W's "
        "RMS) or 'released' (the authors' code: the top-left r x k block of W).",
        "orthogonal",
        choices=A_INITS,
    )
    a_scale: float = option(
        "Multiplier of SECURA's initial A (1 keeps the a_init scale: for 'orthogonal', "
        "orthonormal rows x RMS(W) x sqrt(k)).",
        1.0,
        low=0.0,
        low_open=True,
    )
    cr_select: str = option(
        "Which directions of W SECURA's C and R keep: 'smallest' (the paper: the r columns and "
        "rows of smallest L2 norm), 'largest', 'random' (seeded), or the SVD's 'svd_minor' / "
        "'svd_major' directions (C = U_r sqrt(s_r), R = sqrt(s_r) V_r^T; one SVD per layer).",
        "smallest",
        choices=CR_SELECTIONS,
    )
    eps: float = option(
        "Epsilon of S-MagNorm's relative change |dh| / (|h0| + eps).", 1e-6, low=0.0, low_open=True
    )

    def check(self, config: Any) -> None:
        if self.k is not None and self.k < config.r:
            raise SecuraConfigError(
                "k", f"must be >= r ({config.r}), got {self.k}; the paper uses k > r (e.g. 4 r)"
            )

    def core_width(self, r: int) -> int:
        """k, or 4 r when not set."""
        return self.k if self.k is not None else 4 * r
