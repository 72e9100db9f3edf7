"""What each method computes: SECURA (CABR, S-MagNorm, M1/M2), CURLoRA, SC-LoRA."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.fixtures import calibration, train_steps
from torch.nn import functional as F

from secura_plugins import AdapterConfig, adapter_stats, apply_adapter, get_plugin_manager
from secura_plugins.methods.base import base_weight
from secura_plugins.methods.cur import cur_delta_weight
from secura_plugins.methods.sclora import calibrate
from secura_plugins.methods.secura import SecuraCore, smagnorm_gate
from secura_plugins.model import adapter_layers


def _layers(model):
    return adapter_layers(model, "default")


def _cores(model):
    return [layer.lora_core["default"] for layer in _layers(model).values()]


def _steps_with_hook(model, ids, steps: int, lr: float = 3e-2) -> list[dict]:
    """Train ``steps`` optimizer steps, calling the host hook after each, like a Trainer."""
    pm = get_plugin_manager()
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0
    )
    logs = []
    model.train()
    for step in range(1, steps + 1):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        logs.append(
            {k: v for d in pm.hook.secura_step_end(model=model, step=step) for k, v in d.items()}
        )
    model.eval()
    return logs


# ----------------------------------------------------------------------------- SECURA
def _smallest(norms: torch.Tensor, chosen: list[int], tol: float) -> bool:
    """``chosen`` are the smallest ``norms``, to ``tol``."""
    rest = [n for i, n in enumerate(norms.tolist()) if i not in set(chosen)]
    return max(norms[chosen].tolist()) <= min(rest) + tol


@pytest.mark.parametrize("quant", ["fp32", "4bit", "4bit-forwarded", "4bit-repacked"])
def test_cabr_keeps_the_smallest_norm_rows_and_columns(loader, ids, quant):
    """Checked against the fp32 weights (to NF4's error) and a never-forwarded 4-bit copy,
    not against ``base_weight``, the function under test. ``4bit-forwarded`` runs a no-grad
    eval forward on the bare base first (bitsandbytes repacks it there on AVX512-BF16
    CPUs); ``4bit-repacked`` repacks it with bitsandbytes' own conversion on any CPU."""
    from helpers.fixtures import repack_for_cpu
    from peft.utils.integrations import dequantize_module_weight

    base = loader("llama", quant.split("-")[0], keep_layout=False)
    if quant == "4bit-forwarded":
        with torch.no_grad():
            base.eval()(ids)
    elif quant == "4bit-repacked":
        repack_for_cpu(base)
    dense = loader("llama", "fp32")
    fresh = loader("llama", "4bit")  # never run forward: the 4-bit truth
    model = apply_adapter(base, AdapterConfig(method="secura", r=4))
    for name, layer in _layers(model).items():
        w32 = dense.get_submodule(name).weight.detach()
        core = layer.lora_core["default"]
        cols, rows = core.col_idx.tolist(), core.row_idx.tolist()
        assert len(set(cols)) == len(set(rows)) == 4, f"{name}: duplicates"
        nf4 = 0.0 if quant == "fp32" else 0.1  # NF4 moves a norm by a few percent
        col_norms, row_norms = w32.norm(dim=0), w32.norm(dim=1)
        assert _smallest(col_norms, cols, nf4 * col_norms.max()), name
        assert _smallest(row_norms, rows, nf4 * row_norms.max()), name
        truth = w32 if quant == "fp32" else dequantize_module_weight(fresh.get_submodule(name))
        B, A = layer.lora_B["default"].weight, layer.lora_A["default"].weight
        if quant in ("fp32", "4bit"):
            assert torch.equal(B, truth[:, cols]) and torch.equal(A, truth[rows, :]), name
        else:  # a repacked layer keeps bfloat16 block scales
            assert torch.allclose(B, truth[:, cols], atol=5e-3), name
            assert torch.allclose(A, truth[rows, :], atol=5e-3), name
        assert torch.allclose(B, w32[:, cols], atol=0.1), name  # NF4 step: < 0.1 here


def test_smagnorm_gate_ranges_and_the_zero_case():
    gen = torch.Generator().manual_seed(0)
    h0 = torch.randn(3, 5, 64, generator=gen)
    dh = torch.randn(3, 5, 64, generator=gen) * torch.rand(3, 5, 1, generator=gen)
    normalized = smagnorm_gate(h0, dh, mode="normalized", scale=6.0, eps=1e-6)
    released = smagnorm_gate(h0, dh, mode="released", scale=6.0, eps=1e-6)
    sigmoid = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    lower, upper = 2 - sigmoid(3), 2 - sigmoid(-3)  # 1.047, 1.953
    assert normalized.min() >= lower - 1e-6 and normalized.max() <= upper + 1e-6
    assert normalized.max() - normalized.min() > 0.5  # it really spans the range
    assert released.min() >= 1.0 and released.max() <= 1.5  # (1, 1.5], saturating in fp32
    assert not normalized.requires_grad and not released.requires_grad
    zero = smagnorm_gate(h0, torch.zeros_like(h0), mode="normalized", scale=6.0, eps=1e-6)
    assert torch.equal(zero, torch.full_like(h0, 2.0))


@pytest.mark.parametrize("mode", ["normalized", "released", "off", "continuous"])
def test_every_smagnorm_mode_starts_exact_and_gets_gradients(loader, ids, mode):
    base = loader("llama", "fp32")
    with torch.no_grad():
        reference = base(ids).logits
    model = apply_adapter(base, AdapterConfig(method="secura", r=4, smagnorm=mode))
    out = model(input_ids=ids, labels=ids)
    assert torch.equal(out.logits, reference)
    out.loss.backward()
    grads = [core.B.grad for core in _cores(model)]
    # The trap of returning h0 alone when dh == 0: B would get no gradient at all.
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def _expected_output(layer, x, mode: str, merge: str, scale: float = 6.0, eps: float = 1e-6):
    """The layer's output written by hand from the S-MagNorm and M1/M2 equations in the
    module docstring of ``secura_plugins.methods.secura``."""
    c = layer.lora_core["default"]
    C, R = layer.lora_B["default"].weight, layer.lora_A["default"].weight
    s = layer.scaling["default"]
    frozen = F.linear(x, layer.get_base_layer().weight, layer.get_base_layer().bias)
    merged = x @ (s * C @ c.u_acc @ R).T
    fresh = x @ (s * C @ c.A @ c.B @ R).T + c.bias
    h0, dh = (frozen + merged, fresh) if merge == "m1" else (frozen, merged + fresh)
    if mode == "off":
        return h0 + dh
    rel = dh.abs() / (h0.abs() + eps)
    if mode in ("normalized", "continuous"):
        rel = rel / rel.amax(dim=-1, keepdim=True) - 0.5
    S = 2 - torch.sigmoid(scale * rel)
    if mode == "continuous":
        return h0 + dh / S
    return (h0 + (h0 + dh)) / S


@pytest.mark.parametrize("merge", ["m1", "m2"])
@pytest.mark.parametrize("mode", ["off", "released", "normalized", "continuous"])
def test_each_gate_mode_computes_its_equation(loader, mode, merge):
    config = AdapterConfig(
        method="secura", r=4, smagnorm=mode, merge=merge, output_bias=True, lora_alpha=8
    )
    model = apply_adapter(loader("llama", "fp32"), config)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for c in _cores(model):
            c.u_acc.copy_(torch.randn(c.u_acc.shape, generator=gen) * 0.3)
            c.B.copy_(torch.randn(c.B.shape, generator=gen) * 0.3)
            c.bias.copy_(torch.randn(c.bias.shape, generator=gen) * 0.1)
        for name, layer in _layers(model).items():
            assert layer.scaling["default"] == 2.0  # lora_alpha / r
            x = torch.randn(2, 3, layer.get_base_layer().in_features, generator=gen)
            expected = _expected_output(layer, x, mode, merge)
            assert torch.allclose(layer(x), expected, atol=1e-5, rtol=1e-5), (mode, name)


def test_continuous_gate_tends_to_h0_where_the_paper_gates_jump(loader, ids):
    """As dh -> 0 the continuous gate returns h0; normalized and released scale h0 by 2/S."""
    gaps = {}
    for mode in ("continuous", "normalized", "released", "off"):
        model = apply_adapter(
            loader("llama", "fp32"), AdapterConfig(method="secura", r=4, smagnorm=mode)
        )
        with torch.no_grad():
            for c in _cores(model):
                c.B.copy_(torch.full_like(c.B, 1e-7))
            layer = next(iter(_layers(model).values()))
            x = torch.randn(4, layer.get_base_layer().in_features)
            h0 = layer.get_base_layer()(x)
            gaps[mode] = float((layer(x) - h0).abs().max() / h0.abs().max())
    assert gaps["continuous"] < 1e-5 and gaps["off"] < 1e-5
    assert gaps["released"] > 0.2  # S = 1.5: y = 4/3 h0
    assert gaps["normalized"] > 0.01


def test_continuous_gate_trains_a_and_b(loader, ids):
    model = apply_adapter(
        loader("llama", "fp32"), AdapterConfig(method="secura", r=4, smagnorm="continuous")
    )
    train_steps(model, ids, steps=1)  # B non-zero, so A gets gradients too
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    for c in _cores(model):
        assert c.A.grad.abs().sum() > 0 and c.B.grad.abs().sum() > 0
    assert 1.0 < adapter_stats(model)["secura/gate_mean"] < 2.0


@pytest.mark.parametrize("how", ["largest", "random", "svd_minor", "svd_major"])
def test_cr_selection_variants(loader, ids, how):
    base = loader("llama", "fp32")
    with torch.no_grad():
        reference = base(ids).logits
    model = apply_adapter(base, AdapterConfig(method="secura", r=4, cr_select=how))
    out = model(input_ids=ids, labels=ids)
    assert torch.equal(out.logits, reference)
    out.loss.backward()
    assert all(c.B.grad.abs().sum() > 0 for c in _cores(model))
    for name, layer in _layers(model).items():
        w = base_weight(layer)
        core = layer.lora_core["default"]
        C, R = layer.lora_B["default"].weight, layer.lora_A["default"].weight
        if how.startswith("svd"):
            U, sv, Vh = torch.linalg.svd(w, full_matrices=False)
            keep = slice(0, 4) if how == "svd_major" else slice(len(sv) - 4, len(sv))
            assert torch.allclose(C @ R, U[:, keep] @ torch.diag(sv[keep]) @ Vh[keep], atol=1e-5)
            assert torch.allclose(C.norm(dim=0) ** 2, sv[keep], rtol=1e-4), name
            assert (core.col_idx == -1).all()
            continue
        assert len(set(core.col_idx.tolist())) == len(set(core.row_idx.tolist())) == 4
        assert torch.equal(C, w[:, core.col_idx]) and torch.equal(R, w[core.row_idx, :])
        if how == "largest":
            cols = w.norm(dim=0).topk(4).indices.sort().values
            assert torch.equal(core.col_idx, cols), name
            assert torch.equal(core.row_idx, w.norm(dim=1).topk(4).indices.sort().values)
    if how == "random":
        other = apply_adapter(
            loader("llama", "fp32"), AdapterConfig(method="secura", r=4, cr_select=how, seed=1)
        )
        again = apply_adapter(
            loader("llama", "fp32"), AdapterConfig(method="secura", r=4, cr_select=how)
        )
        first = [c.col_idx for c in _cores(model)]
        assert all(torch.equal(a, c.col_idx) for a, c in zip(first, _cores(again)))
        assert not all(torch.equal(a, c.col_idx) for a, c in zip(first, _cores(other)))


@pytest.mark.parametrize("mode", ["off", "normalized", "continuous"])
def test_a_merge_keeps_the_output_only_where_the_math_is_linear_or_under_m2(loader, ids, mode):
    """M1 folds the gated fresh change into the ungated frozen path: under a gate the output
    jumps at every merge (the real-model lab's loss spikes); M2 keeps it gated, so a merge
    changes nothing."""
    changed = {}
    for merge in ("m1", "m2"):
        model = apply_adapter(
            loader("llama", "fp32"),
            AdapterConfig(method="secura", r=4, smagnorm=mode, merge=merge),
        )
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for c in _cores(model):
                c.B.copy_(torch.randn(c.B.shape, generator=gen) * 0.3)
            before = model(ids).logits
            for c in _cores(model):
                c.merge_()
            changed[merge] = float((model(ids).logits - before).abs().max())
    assert changed["m2"] < 1e-4
    if mode == "off":
        assert changed["m1"] < 1e-4
    else:
        assert changed["m1"] > 1e-2


def test_a_scale_multiplies_the_initial_a(loader):
    one = apply_adapter(loader("llama", "fp32"), AdapterConfig(method="secura", r=4))
    tenth = apply_adapter(loader("llama", "fp32"), AdapterConfig(method="secura", r=4, a_scale=0.1))
    for a, b in zip(_cores(one), _cores(tenth)):
        assert torch.allclose(b.A, a.A * 0.1) and not torch.allclose(b.A, a.A)


def test_gate_mean_is_reported_after_a_forward(loader, ids):
    """The logged mean is mean(S) of the last forward, S from ``smagnorm_gate`` itself."""
    model = apply_adapter(loader("llama", "fp32"), AdapterConfig(method="secura", r=4))
    train_steps(model, ids, steps=2)  # no merge yet (merge_every 16): U_acc is zero
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        layer.get_base_layer().register_forward_hook(
            lambda mod, args, out, name=name: seen.__setitem__(name, (args[0], out))
        )
        for name, layer in _layers(model).items()
    ]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    means = []
    for name, layer in _layers(model).items():
        x, h0 = seen[name]
        core = layer.lora_core["default"]
        dh = F.linear(x, cur_delta_weight(layer, "default"))
        gate = smagnorm_gate(h0, dh, mode=core.smagnorm, scale=core.smagnorm_scale, eps=core.eps)
        means.append(gate.mean())
    expected = float(torch.stack(means).mean())
    gate = adapter_stats(model)["secura/gate_mean"]
    assert 1.0 < gate <= 2.0
    assert gate == pytest.approx(expected, abs=1e-5)
    assert abs(expected - 2.0) > 1e-3  # the adapter output is not zero: S is not trivially 2


def test_m1_merges_on_schedule_and_u_acc_is_the_dense_update(loader, ids):
    config = AdapterConfig(method="secura", r=4, smagnorm="off", merge="m1", merge_every=2)
    model = apply_adapter(loader("llama", "fp32"), config)
    core = _cores(model)[0]
    logs = _steps_with_hook(model, ids, steps=5)
    assert [log["secura/merges"] for log in logs] == [0, 1, 1, 2, 2]
    assert all(int(c.merges) == 2 for c in _cores(model))
    assert core.u_acc.abs().sum() > 0
    # After the merge at step 4, step 5 trained B again from zero.
    assert core.B.abs().sum() > 0
    for name, layer in _layers(model).items():
        base = layer.get_base_layer()
        x = torch.randn(3, base.in_features)
        C, R = layer.lora_B["default"].weight, layer.lora_A["default"].weight
        c = layer.lora_core["default"]
        dense = base.weight + C @ (c.u_acc + c.A @ c.B) @ R
        assert torch.allclose(cur_delta_weight(layer, "default"), dense - base.weight, atol=1e-6)
        expected = F.linear(x, dense, base.bias)
        assert torch.allclose(layer(x), expected, atol=1e-5), name


def test_u_acc_sums_the_merged_products(loader, ids):
    model = apply_adapter(
        loader("llama", "fp32"), AdapterConfig(method="secura", r=4, merge_every=1)
    )
    cores = _cores(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    total = [torch.zeros_like(c.u_acc) for c in cores]
    for step in range(1, 4):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        for acc, c in zip(total, cores):
            acc += (c.A @ c.B).detach()
        get_plugin_manager().hook.secura_step_end(model=model, step=step)
        assert all(torch.equal(c.B, torch.zeros_like(c.B)) for c in cores)
    for acc, c in zip(total, cores):
        assert torch.allclose(c.u_acc, acc, atol=1e-7)


def test_merge_every_one_leaves_a_without_gradient(loader, ids):
    """A merge sets ``B = 0`` (``secura_plugins.methods.secura`` docstring); merging after
    every step, B is zero at every forward, so A (whose gradient goes through B) never
    learns and only B does. Kept visible here."""
    model = apply_adapter(
        loader("llama", "fp32"), AdapterConfig(method="secura", r=4, merge_every=1)
    )
    a_before = [c.A.detach().clone() for c in _cores(model)]
    _steps_with_hook(model, ids, steps=3)
    assert all(torch.equal(a, c.A) for a, c in zip(a_before, _cores(model)))
    assert all(c.u_acc.abs().sum() > 0 for c in _cores(model))


def test_m1_and_m2_differ_only_under_the_gate(loader, ids):
    outs = {}
    for mode in ("off", "normalized"):
        for merge in ("m1", "m2"):
            torch.manual_seed(0)
            model = apply_adapter(
                loader("llama", "fp32"),
                AdapterConfig(method="secura", r=4, smagnorm=mode, merge=merge, merge_every=1),
            )
            gen = torch.Generator().manual_seed(3)
            with torch.no_grad():  # the same tensors in every variant
                for c in _cores(model):
                    c.u_acc.copy_(torch.randn(c.u_acc.shape, generator=gen) * 0.3)
                    c.B.copy_(torch.randn(c.B.shape, generator=gen) * 0.3)
                outs[mode, merge] = model(ids).logits
    assert torch.allclose(outs["off", "m1"], outs["off", "m2"], atol=1e-5)
    assert not torch.allclose(outs["normalized", "m1"], outs["normalized", "m2"], atol=1e-4)


def test_released_a_init_copies_the_top_left_block(loader):
    model = apply_adapter(
        loader("llama", "fp32"), AdapterConfig(method="secura", r=4, k=8, a_init="released")
    )
    for layer in _layers(model).values():
        assert torch.equal(layer.lora_core["default"].A, base_weight(layer)[:4, :8])


def test_orthogonal_a_init_is_seeded(loader):
    a = apply_adapter(loader("llama", "fp32"), AdapterConfig(method="secura", r=4, seed=1))
    b = apply_adapter(loader("llama", "fp32"), AdapterConfig(method="secura", r=4, seed=1))
    c = apply_adapter(loader("llama", "fp32"), AdapterConfig(method="secura", r=4, seed=2))
    A = [x.A for x in _cores(a)]
    assert all(torch.equal(x, y.A) for x, y in zip(A, _cores(b)))
    assert not all(torch.equal(x, y.A) for x, y in zip(A, _cores(c)))
    rows = A[0] / A[0].norm(dim=1, keepdim=True)
    assert torch.allclose(rows @ rows.T, torch.eye(4), atol=1e-5)


def test_secura_cores_are_only_in_secura_models(loader):
    model = apply_adapter(loader("llama", "fp32"), AdapterConfig(method="curlora", r=4))
    assert not any(isinstance(m, SecuraCore) for m in model.modules())
    assert get_plugin_manager().hook.secura_step_end(model=model, step=1) == []


# ---------------------------------------------------------------------------- CURLoRA
def test_curlora_sampling_is_seeded_inverted_and_with_replacement(loader):
    def indices(seed: int, r: int = 4):
        model = apply_adapter(
            loader("llama", "fp32"), AdapterConfig(method="curlora", r=r, seed=seed)
        )
        return model, [(c.col_idx.clone(), c.row_idx.clone()) for c in _cores(model)]

    model, first = indices(0)
    _, again = indices(0)
    _, other = indices(1)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other))
    for layer in _layers(model).values():
        core = layer.lora_core["default"]
        w = base_weight(layer)
        assert torch.equal(layer.lora_B["default"].weight, w[:, core.col_idx])
        assert torch.equal(layer.lora_A["default"].weight, w[core.row_idx, :])
    # With replacement: 30 draws from 64 columns repeat one with probability > 0.99.
    _, many = indices(0, r=30)
    assert any(len(set(cols.tolist())) < 30 for cols, _ in many)


def test_curlora_trains_only_u(loader, ids):
    model = apply_adapter(loader("qwen2", "fp32"), AdapterConfig(method="curlora", r=4))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.endswith(".U") for n in names)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 16 * len(names)


def test_curlora_inverted_probabilities_prefer_small_columns():
    from secura_plugins.methods.curlora import inverted_probabilities

    p = inverted_probabilities(torch.tensor([1.0, 4.0, 100.0], dtype=torch.float64))
    assert p[0] > p[1] > p[2] and torch.isclose(p.sum(), torch.tensor(1.0, dtype=torch.float64))


# ---------------------------------------------------------------------------- SC-LoRA
def test_sclora_covariance_matches_the_definition(loader, ids):
    base = loader("llama", "fp32")
    data = calibration(ids)
    beta = 0.3
    model = apply_adapter(base, AdapterConfig(method="sclora", r=4, beta=beta), **data)
    name, layer = next(iter(_layers(model).items()))
    dcov = calibrate(model, {name: layer}, data["positive"], data["negative"], beta=beta)[name]

    captured = {}
    hook = layer.get_base_layer().register_forward_hook(
        lambda m, a, o: captured.setdefault("y", []).append(o.detach())
    )
    with torch.no_grad(), model.disable_adapter():
        for batch in data["positive"] + data["negative"]:
            model(**batch)
    hook.remove()
    y_pos = captured["y"][0].reshape(-1, captured["y"][0].shape[-1])[
        data["positive"][0]["attention_mask"].reshape(-1).bool()
    ]
    y_neg = captured["y"][1].reshape(-1, captured["y"][1].shape[-1])
    expected = (1 - beta) * y_pos.T @ y_pos / len(y_pos) - beta * y_neg.T @ y_neg / len(y_neg)
    assert torch.allclose(dcov, expected, atol=1e-5)
    eigvals, eigvecs = torch.linalg.eigh(expected.double())
    top = eigvecs[:, -4:].float()
    B = layer.lora_B["default"].weight
    # Same subspace: the projection onto the top-4 eigenvectors keeps B whole.
    assert torch.allclose(top @ (top.T @ B), B, atol=1e-4)
    assert torch.allclose(layer.lora_A["default"].weight, B.T @ base_weight(layer), atol=1e-5)


def test_sclora_beta_moves_the_subspace_and_passes_are_equivalent(loader, ids):
    data = calibration(ids)

    def first_b(beta: float, **kw):
        model = apply_adapter(
            loader("llama", "fp32"), AdapterConfig(method="sclora", r=4, beta=beta), **data, **kw
        )
        return next(iter(_layers(model).values())).lora_B["default"].weight.detach()

    low, high = first_b(0.0), first_b(1.0)
    overlap = torch.linalg.matrix_norm(low.T @ high) ** 2 / 4  # 1.0 = same subspace
    assert overlap < 0.9
    assert torch.allclose(first_b(0.5), first_b(0.5, layers_per_pass=3), atol=1e-5)


def test_sclora_requires_calibration_data(loader):
    from secura_plugins import SecuraConfigError

    with pytest.raises(SecuraConfigError, match="positive.*calibration data"):
        apply_adapter(loader("llama", "fp32"), AdapterConfig(method="sclora", r=4))
    with pytest.raises(SecuraConfigError, match="negative.*non-empty"):
        apply_adapter(
            loader("llama", "fp32"),
            AdapterConfig(method="sclora", r=4),
            positive=[{"input_ids": torch.ones(1, 4, dtype=torch.long)}],
            negative=[],
        )


@pytest.mark.parametrize("method", ["secura", "curlora", "sclora"])
def test_gradient_checkpointing_gives_the_same_gradients(loader, ids, method):
    from helpers.fixtures import method_data

    grads = []
    for checkpointing in (False, True):
        model = apply_adapter(
            loader("llama", "fp32"), AdapterConfig(method=method, r=4), **method_data(method, ids)
        )
        train_steps(model, ids, steps=1)  # B non-zero, so A gets gradients too
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5), name
    assert any(g.abs().sum() > 0 for g in grads[1].values())
