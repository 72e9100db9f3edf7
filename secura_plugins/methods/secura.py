"""SECURA: CABR decomposition + S-MagNorm + M1/M2 merges (arXiv 2502.18168).

CABR keeps the ``r`` columns ``J`` and rows ``I`` of **smallest L2 norm** of the frozen
weight, ``C = W[:, J]`` and ``R = W[I, :]``, and trains a core ``A`` (``r x k``) times
``B`` (``k x r``), ``k >= r``. ``B = 0`` at the start, so the model starts unchanged::

    delta_W = scaling * C @ (U_acc + A @ B) @ R        # rank <= r, never built in forward

``U_acc`` (``r x r``, fp32, frozen) accumulates merges: every ``merge_every`` optimizer
steps ``U_acc += A @ B`` and ``B = 0`` (A, the output bias and the optimizer state are
kept). Because C and R never change, this equals writing ``C (A B) R`` into W (the
paper's M1) exactly, works on 4-bit bases and leaves the base checkpoint untouched.

S-MagNorm gates the output change, per token and output channel. The paper's equations
(``smagnorm='normalized'`` and ``'released'``)::

    h0 = x W^T + b  (+ x (C U_acc R)^T under M1: merged updates join the frozen path)
    dh = x (C A B R)^T (+ x (C U_acc R)^T under M2) + b_L
    L  = |dh| / (|h0| + eps)                         (detached)
    S  = 2 - sigmoid(s * norm(L))                    (detached, in (1, 2))
    y  = (h0 + (h0 + dh)) / S

``norm`` is ``L / max(L) - 0.5`` with the max over the output channels of each token
(``normalized``, the paper's intent as the project first read it) or ``L`` itself
(``released``, the authors' code). Where ``dh`` is zero for a whole token, ``S = 2`` and
``y = h0`` exactly, while ``dh`` stays in the autograd graph so training can start.

Both are discontinuous at ``dh = 0``: as ``dh -> 0`` (but not zero), ``y -> 2 h0 / S``,
which is ``h0`` only when ``S = 2``. ``released`` gives ``S = 1.5`` there (``y = 4/3 h0``);
``normalized`` gives ``S`` between 1.05 and 1.95 per element (``y`` up to ``1.9 h0``),
whether or not anything was learned. S-MagNorm's stated intent is "damp small relative
changes toward averaging old and new, let large ones pass": averaging old and new is
``(h0 + (h0 + dh)) / 2 = h0 + dh / 2`` and passing is ``h0 + dh``. ``smagnorm='continuous'``
is that intent with the frozen output left alone (the paper's form rescaled so that every
``S`` maps ``h0`` to itself)::

    S  = 2 - sigmoid(s * (L / max(L) - 0.5))         (as 'normalized', detached)
    y  = h0 + dh / S                                 (S = 2: h0 + dh/2;  S = 1: h0 + dh)

so ``y -> h0`` as ``dh -> 0`` and ``y = h0`` exactly at ``dh = 0`` (there ``S = 2``, and
``dh / 2`` keeps the adapter in the graph). ``smagnorm='off'`` is ``y = h0 + dh``.

With a gate on, an M1 merge is not function-preserving: the fresh change enters the
output as ``dh / S`` (about ``dh / 2`` for most elements) before the merge and as ``dh`` after
it, inside the ungated frozen path; on the real base the loss jumps from 3.8 to 12.5 at the
first merge. Under M2 the merged part stays gated and a merge changes nothing
(BENCHMARKS.md, "SECURA on the real base", where no variant reaches LoRA's frontier).

Which directions C and R keep (``cr_select``): ``smallest`` (the paper), ``largest``,
``random`` (seeded per layer) select columns/rows of W; ``svd_minor``/``svd_major`` take the
``r`` smallest/largest singular triplets of ``W = U diag(s) V^T`` instead:
``C = U_r diag(sqrt(s_r))``, ``R = diag(sqrt(s_r)) V_r^T`` (one SVD per layer at attach;
cheap on small models, minutes on an 8B model). ``a_scale`` multiplies A's initial value.

Example:
    >>> import torch
    >>> from secura_plugins import AdapterConfig, apply_adapter
    >>> from secura_plugins.tiny import build_tiny_model
    >>> base = build_tiny_model("llama")
    >>> ids = torch.randint(0, 128, (1, 8))
    >>> before = base(ids).logits
    >>> model = apply_adapter(base, AdapterConfig(method="secura", r=4))
    >>> torch.equal(model(ids).logits, before)      # exact start
    True
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..hookspecs import hookimpl
from .base import CORE_ATTR, AdapterMethod, adapter_dtype, layer_device, layer_seed
from .cur import CURCore, CURVariant, attach_cur, cur_factors
from .secura_options import SecuraOptions
from .secura_start import init_a, select_directions, squared_norms


class SecuraCore(CURCore):
    """Trainable core ``A @ B`` (+ output bias) and the frozen merge accumulator."""

    def __init__(
        self,
        r: int,
        k: int,
        d_out: int,
        *,
        smagnorm: str,
        smagnorm_scale: float,
        eps: float,
        merge: str,
        merge_every: int,
        output_bias: bool,
        dtype: torch.dtype,
        device: torch.device | None = None,
    ) -> None:
        super().__init__(r, device=device)
        self.A = nn.Parameter(torch.zeros(r, k, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(k, r, dtype=dtype, device=device))
        self.bias = (
            nn.Parameter(torch.zeros(d_out, dtype=dtype, device=device)) if output_bias else None
        )
        self.register_buffer("u_acc", torch.zeros(r, r, dtype=torch.float32, device=device))
        self.register_buffer("merges", torch.zeros((), dtype=torch.long, device=device))
        self.smagnorm = smagnorm
        self.smagnorm_scale = smagnorm_scale
        self.eps = eps
        self.merge = merge
        self.merge_every = merge_every
        #: Mean of the S-MagNorm gate S over the last forward (detached, no host sync).
        self.last_gate: torch.Tensor | None = None

    def core_matrix(self) -> torch.Tensor:
        return self.u_acc.to(self.A.dtype) + self.A @ self.B

    def output_bias(self) -> torch.Tensor | None:
        return self.bias

    @torch.no_grad()
    def merge_(self) -> None:
        """Fold ``A @ B`` into ``U_acc`` and restart ``B`` at zero (one M1/M2 merge)."""
        self.u_acc += (self.A @ self.B).to(torch.float32)
        self.B.zero_()
        self.merges += 1

    def extra_repr(self) -> str:
        r, k = self.A.shape
        return (
            f"r={r}, k={k}, smagnorm={self.smagnorm}, merge={self.merge}, "
            f"merge_every={self.merge_every}, output_bias={self.bias is not None}"
        )


#: Gate modes whose S uses ``L / max(L) - 0.5``.
NORMALIZED_MODES = ("normalized", "continuous")


def smagnorm_gate(
    h0: torch.Tensor, dh: torch.Tensor, *, mode: str, scale: float, eps: float
) -> torch.Tensor:
    """S-MagNorm's divisor ``S`` in (1, 2], detached, same shape as ``h0``."""
    with torch.no_grad():
        rel = dh.abs() / (h0.abs() + eps)
        peak = rel.amax(dim=-1, keepdim=True)
        if mode in NORMALIZED_MODES:
            rel = rel / peak.clamp_min(torch.finfo(rel.dtype).tiny) - 0.5
        gate = 2.0 - torch.sigmoid(scale * rel)
        # A token whose adapter output is exactly zero passes h0 unchanged (S = 2).
        return torch.where(peak > 0, gate, torch.full_like(gate, 2.0))


@torch.no_grad()
def _half_inverse_gate_(
    h0: torch.Tensor, dh: torch.Tensor, *, mode: str, scale: float, eps: float, own_h0: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``2 / S`` and ``mean(S)`` for 2-D ``h0``/``dh``, reusing ``dh``'s buffer (and ``h0``'s
    when ``own_h0``): both are consumed.

    The same gate as :func:`smagnorm_gate` in fewer in-place passes: with
    ``w = sigmoid(-z)``, ``S = 2 - sigmoid(z) = 1 + w``, and the per-token affine map
    ``-z = a * rel + b`` takes ``b = +inf`` where a token's ``dh`` is all zero (``S = 2``).
    """
    rel = dh.abs_().div_((h0.abs_() if own_h0 else h0.abs()).add_(eps))
    peak = rel.amax(dim=-1, keepdim=True)
    live = peak > 0
    if mode in NORMALIZED_MODES:  # z = scale * (rel / peak - 0.5)
        a = torch.where(live, -scale / peak.clamp_min(torch.finfo(rel.dtype).tiny), 0.0)
        b = torch.where(live, 0.5 * scale, math.inf)
    else:  # released: z = scale * rel
        a = torch.where(live, -scale, 0.0)
        b = torch.where(live, 0.0, math.inf)
    w = rel.mul_(a).add_(b).sigmoid_()
    mean = w.mean() + 1.0
    return w.add_(1.0).reciprocal_().mul_(2.0), mean


class _ScaleByGate(torch.autograd.Function):
    """``y = total * g`` for a detached gate ``g`` in [1, 2], saved as float16 for backward.

    The forward is exact; the gradient ``grad * g`` uses ``g`` rounded to float16, whose
    relative error on [1, 2] is at most ``2**-11`` (half the bytes of a float32 copy).
    """

    @staticmethod
    def forward(ctx: Any, total: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate.to(torch.float16))
        return total * gate

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (gate,) = ctx.saved_tensors
        # Cast first: a mixed-dtype multiply is ~10x slower on CPU than cast + multiply.
        return grad * gate.to(grad.dtype), None


class SecuraVariant(CURVariant):
    """PEFT LoRA variant running SECURA's forward (merge/unmerge come from CURVariant).

    Export merges the linear part ``W + scaling * C (U_acc + A B) R`` (and ``b_L`` into
    the bias): exactly the adapted model when ``smagnorm='off'``, the un-gated update
    otherwise.

    ``continuous`` runs ``y = h0 + (dh / 2) * (2 / S)`` with the same detached gate.

    With the gate on, ``y = (2 h0 + dh) / S = (h0 + dh / 2) * (2 / S)``: autograd sees one
    low-rank update of ``h0`` times a detached gate, so the backward costs one
    element-wise pass over the output and keeps only the gate (float16), while ``h0`` and
    ``dh`` are formed separately, without gradient, just to compute the gate.
    """

    @staticmethod
    def forward(
        module: Any, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        C, R, core = cur_factors(module, active_adapter)
        if core.smagnorm == "off":
            return CURVariant.forward(module, active_adapter, x, result, **kwargs)
        scaling = module.scaling[active_adapter]
        x = module.lora_dropout[active_adapter](x.to(R.dtype))
        t = F.linear(x, R).flatten(0, -2)  # (tokens, r)
        h0 = result.to(C.dtype).flatten(0, -2)  # (tokens, d_out)
        fresh = (core.A @ core.B) * scaling
        merged = core.u_acc.to(fresh.dtype) * scaling
        with torch.no_grad():
            if core.merge == "m1":
                # Merged updates belong to the frozen path; the gate sees only fresh change.
                u = F.linear(t, torch.cat([merged, fresh]))  # (tokens, 2r)
                gate_h0 = torch.addmm(h0, u[:, : merged.shape[0]], C.T)
                dh = u[:, merged.shape[0] :] @ C.T
            else:
                gate_h0 = h0
                dh = F.linear(t, merged + fresh) @ C.T
            if core.bias is not None:
                dh += core.bias
            gate, core.last_gate = _half_inverse_gate_(
                gate_h0,
                dh,
                mode=core.smagnorm,
                scale=core.smagnorm_scale,
                eps=core.eps,
                own_h0=core.merge == "m1",
            )
            del gate_h0, dh
        if core.smagnorm == "continuous":
            # y = h0 (+ merged under M1) + (dh / 2) * (2 / S): only the change is gated.
            if core.merge == "m1":
                h0 = torch.addmm(h0, F.linear(t, merged), C.T)
                half = fresh * 0.5
            else:
                half = (merged + fresh) * 0.5
            change = F.linear(F.linear(t, half), C)
            if core.bias is not None:
                change = change + core.bias * 0.5
            y = h0 + _ScaleByGate.apply(change, gate)
            return y.view(result.shape)
        # total = h0 (+ merged under M1) + dh / 2: one rank-r update with gradients.
        half = merged + fresh * 0.5 if core.merge == "m1" else (merged + fresh) * 0.5
        total = torch.addmm(h0, F.linear(t, half), C.T)
        if core.bias is not None:
            total = total + core.bias * 0.5
        y = _ScaleByGate.apply(total, gate)
        return y.view(result.shape)


class SecuraMethod(AdapterMethod):
    """SECURA (CABR + S-MagNorm + M1/M2)."""

    name = "secura"
    options_class = SecuraOptions

    def export_note(self, config: Any) -> str | None:
        if config.options.smagnorm == "off":
            return None
        return (
            f"S-MagNorm is {config.options.smagnorm!r}: the exported checkpoint holds the "
            "un-gated linear update, so its outputs differ from the adapted model's"
        )

    def periodic_merge(self, config: Any) -> str | None:
        return None if config.options.merge == "none" else config.options.merge

    def before_anchor(self, model: nn.Module) -> int:
        """Fold pending updates (``A @ B``) into ``U_acc`` so that ``B`` is zero.

        Under M1/M2, ``B`` is reset to zero at every merge, so an EWC anchor with
        ``B* != 0`` would pull ``B`` back to ``B*`` after each merge and the merge would
        add ``A B*`` to ``U_acc`` again and again. Returns the number of cores merged.
        """
        merged = 0
        for core in secura_cores(model):
            if core.merge != "none" and bool(core.B.detach().abs().sum() > 0):
                core.merge_()
                merged += 1
        return merged

    def stats(self, model: nn.Module) -> dict[str, float]:
        return secura_stats(secura_cores(model))

    def state_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"u_acc #{i}": core.u_acc for i, core in enumerate(secura_cores(model))}

    def attach(
        self,
        layer: Any,
        adapter_name: str,
        config: Any,
        *,
        layer_name: str,
        init: bool,
        prepared: Any = None,
    ) -> None:
        base = layer.get_base_layer()
        opts: SecuraOptions = config.options
        r, k = config.r, opts.core_width(config.r)
        core = SecuraCore(
            r,
            k,
            base.out_features,
            smagnorm=opts.smagnorm,
            smagnorm_scale=opts.smagnorm_scale,
            eps=opts.eps,
            merge=opts.merge,
            merge_every=opts.merge_every,
            output_bias=opts.output_bias,
            dtype=adapter_dtype(config),
            device=layer_device(layer),
        )

        def select(weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
            col_sq, row_sq = squared_norms(weight)
            if init:
                mean_sq = float(row_sq.sum()) / weight.numel()
                init_a(core.A, weight, config, layer_name, mean_sq=mean_sq)
            return select_directions(
                weight, r, opts.cr_select, col_sq, row_sq, layer_seed(config.seed, layer_name)
            )

        attach_cur(layer, adapter_name, config, core, SecuraVariant, select=select, init=init)


def secura_cores(model: nn.Module) -> list[SecuraCore]:
    """Every SECURA core in ``model`` (all adapters)."""
    return [m for m in model.modules() if isinstance(m, SecuraCore)]


def secura_stats(cores: list[SecuraCore]) -> dict[str, float]:
    """Merge count and mean S-MagNorm gate of ``cores`` (empty dict when there are none)."""
    if not cores:
        return {}
    stats = {"secura/merges": float(cores[0].merges.item())}
    gates = [c.last_gate for c in cores if c.last_gate is not None]
    if gates:
        stats["secura/gate_mean"] = float(torch.stack(gates).float().mean().item())
    return stats


@hookimpl
def secura_register_methods(registry: Any) -> None:
    registry.add(SecuraMethod())


@hookimpl
def secura_step_end(model: nn.Module, step: int) -> dict[str, float] | None:
    """Run due M1/M2 merges; report merge count and the mean S-MagNorm gate."""
    cores = secura_cores(model)
    if not cores:
        return None
    merged = 0
    for core in cores:
        if core.merge != "none" and step % core.merge_every == 0:
            core.merge_()
            merged += 1
    return secura_stats(cores)


__all__ = [
    "CORE_ATTR",
    "SecuraCore",
    "SecuraMethod",
    "SecuraOptions",
    "SecuraVariant",
    "select_directions",
    "smagnorm_gate",
]
