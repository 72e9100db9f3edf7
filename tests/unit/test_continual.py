"""EWC, replay, metrics and the retention probe, on plain torch models and tiny LMs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from datasets import Dataset

from secura_plugins.continual import (
    EWC,
    AccuracyMatrix,
    ReplayBuffer,
    RetentionProbe,
    backward_transfer,
    forgetting,
    forward_transfer,
    replay_count,
    retention,
)
from secura_plugins.continual.probe import load_pairs
from secura_plugins.tiny import build_tiny_model, build_tokenizer


# --------------------------------------------------------------------------- EWC
def _regression_task(seed: int, n: int = 64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    w = torch.randn(8, 2, generator=g)
    return [(x[i : i + 8], x[i : i + 8] @ w) for i in range(0, n, 8)]


def _mse(model, batch):
    return torch.nn.functional.mse_loss(model(batch[0]), batch[1])


def _train(model, batches, steps, ewc=None, mode="loss", lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for step in range(steps):
        batch = batches[step % len(batches)]
        opt.zero_grad()
        loss = _mse(model, batch)
        if ewc is not None and mode == "loss":
            loss = loss + ewc.penalty(model)
        loss.backward()
        if ewc is not None and mode == "grad":
            ewc.penalty_grad_(model)
        opt.step()
    return model


def test_fisher_is_mean_squared_gradient():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    batches = _regression_task(1)
    fisher = EWC().estimate_fisher(model, batches, _mse)
    expected = torch.zeros_like(model.weight)
    for b in batches:
        model.zero_grad()
        _mse(model, b).backward()
        expected += model.weight.grad**2
    torch.testing.assert_close(fisher["weight"], expected / len(batches))
    assert fisher["weight"].abs().sum() > 0


def test_estimate_fisher_restores_grads_and_mode():
    model = torch.nn.Linear(8, 2).train()
    model.weight.grad = torch.full_like(model.weight, 3.0)
    EWC().estimate_fisher(model, _regression_task(1), _mse)
    assert model.training
    assert torch.equal(model.weight.grad, torch.full_like(model.weight, 3.0))


def test_penalty_has_real_gradient_equal_to_penalty_grad():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    ewc = EWC(lam=7.0)
    ewc.consolidate(model, _regression_task(1), _mse)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model.zero_grad()
    pen = ewc.penalty(model)
    assert pen.requires_grad and pen.item() > 0
    pen.backward()
    autograd = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(g.abs().sum() > 0 for g in autograd.values())
    model.zero_grad()
    value = ewc.penalty_grad_(model)
    assert math.isclose(value, pen.item(), rel_tol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, autograd[n])
    # and it is exactly lambda * F * (theta - theta*)
    expected = 7.0 * ewc.fisher["weight"] * (model.weight.detach() - ewc.anchors["weight"])
    torch.testing.assert_close(model.weight.grad, expected)


@pytest.mark.parametrize("mode", ["loss", "grad"])
def test_large_lambda_keeps_parameters_near_anchor(mode):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    task_a, task_b = _regression_task(1), _regression_task(2)
    _train(model, task_a, 60)
    ewc = EWC(lam=1000.0)
    ewc.consolidate(model, task_a, _mse)
    # The control runs the same path at the same learning rate with lambda = 0, so only
    # the penalty can make the difference.
    off = EWC(lam=0.0)
    off.consolidate(model, task_a, _mse)
    free = _train(copy.deepcopy(model), task_b, 60, ewc=off, mode=mode)
    held = _train(copy.deepcopy(model), task_b, 60, ewc=ewc, mode=mode)
    d_free, d_held = ewc.distance(free), ewc.distance(held)
    assert d_held < 0.5 * d_free, (d_held, d_free)
    # the protected model also keeps task A's loss lower
    loss_a = lambda m: sum(_mse(m, b).item() for b in task_a)  # noqa: E731
    assert loss_a(held) < loss_a(free)


def test_online_fisher_decays_and_sums():
    model = torch.nn.Linear(2, 1)
    ewc = EWC(gamma=0.5)
    f1 = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    f2 = {n: 2 * torch.ones_like(p) for n, p in model.named_parameters()}
    ewc.consolidate(model, fisher=f1)
    with torch.no_grad():
        model.weight.add_(1.0)
    ewc.consolidate(model, fisher=f2)
    assert ewc.num_tasks == 2
    torch.testing.assert_close(ewc.fisher["weight"], torch.full_like(model.weight, 2.5))
    torch.testing.assert_close(ewc.anchors["weight"], model.weight.detach())


def test_ewc_only_covers_trainable_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    model[0].requires_grad_(False)
    ewc = EWC()
    ewc.consolidate(model, _regression_task(1), _mse)
    assert set(ewc.fisher) == {"1.weight", "1.bias"}


def test_ewc_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    ewc = EWC(lam=3.0, gamma=0.9)
    ewc.consolidate(model, _regression_task(1), _mse)
    path = ewc.save(tmp_path / "ewc.safetensors")
    back = EWC.load(path)
    assert (back.lam, back.gamma, back.num_tasks) == (3.0, 0.9, 1)
    for n in ewc.fisher:
        assert torch.equal(back.fisher[n], ewc.fisher[n])
        assert torch.equal(back.anchors[n], ewc.anchors[n])
    with torch.no_grad():
        model.weight.add_(0.1)
    assert torch.allclose(back.penalty(model), ewc.penalty(model))


def test_ewc_rejects_foreign_state():
    ewc = EWC()
    ewc.consolidate(torch.nn.Linear(8, 2), _regression_task(1), _mse)
    with pytest.raises(ValueError, match="weight"):
        ewc.penalty(torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match="lam"):
        EWC(lam=-1)


def test_ewc_on_tiny_lm_default_loss():
    tok = build_tokenizer()
    model = build_tiny_model("llama", vocab_size=len(tok))
    for n, p in model.named_parameters():
        p.requires_grad_("q_proj" in n)
    enc = tok(["2+2=4", "3+3=6"], return_tensors="pt", padding=True)
    batch = {**enc, "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)}
    ewc = EWC(lam=1.0)
    ewc.consolidate(model, [batch])
    assert len(ewc.fisher) == 2 and all(f.sum() > 0 for f in ewc.fisher.values())


# --------------------------------------------------------------------------- replay
def _rows(prefix, n):
    return Dataset.from_dict({"text": [f"{prefix} {i}" for i in range(n)]})


def test_reservoir_is_bounded_uniform_and_deterministic():
    a, b = ReplayBuffer(capacity=50, seed=3), ReplayBuffer(capacity=50, seed=3)
    for buf in (a, b):
        buf.add(_rows("t1", 500), task="t1")
        buf.add(_rows("t2", 500), task="t2")
    assert len(a) == 50 and a.seen == 1000
    assert a.rows == b.rows
    counts = a.task_counts()
    assert counts["t1"] + counts["t2"] == 50 and min(counts.values()) >= 10  # both tasks kept
    c = ReplayBuffer(capacity=50, seed=4)
    c.add(_rows("t1", 500), task="t1")
    c.add(_rows("t2", 500), task="t2")
    assert c.rows != a.rows


@pytest.mark.parametrize("ratio,n_new", [(0.1, 90), (0.05, 200), (0.25, 33), (0.0, 10)])
def test_mix_holds_requested_share(ratio, n_new):
    buf = ReplayBuffer(capacity=100, seed=0)
    buf.add(_rows("old", 100), task="t1")
    mixed = buf.mix(_rows("new", n_new), ratio, tag_column="replayed")
    n_old = sum(mixed["replayed"])
    assert n_old == replay_count(n_new, ratio) == round(ratio * n_new / (1 - ratio))
    assert len(mixed) == n_new + n_old
    assert abs(n_old / len(mixed) - ratio) <= 1 / len(mixed)
    assert sum(t.startswith("old") for t in mixed["text"]) == n_old
    assert sorted(t for t in mixed["text"] if t.startswith("new")) == sorted(
        _rows("new", n_new)["text"]
    )


def test_mix_is_reproducible_and_shuffled():
    buf = ReplayBuffer(capacity=100, seed=0)
    buf.add(_rows("old", 100))
    new = _rows("new", 90)
    m1, m2 = buf.mix(new, 0.1), buf.mix(new, 0.1)
    assert m1["text"] == m2["text"]
    assert buf.mix(new, 0.1, seed=1)["text"] != m1["text"]
    assert [t for t in m1["text"][:20]] != new["text"][:20]  # shuffled


def test_mix_oversamples_small_buffer_evenly():
    buf = ReplayBuffer(capacity=3, seed=0)
    buf.add(_rows("old", 3))
    mixed = buf.mix(_rows("new", 10), 0.5)  # needs 10 replayed rows from 3
    olds = [t for t in mixed["text"] if t.startswith("old")]
    assert len(olds) == 10
    assert sorted(olds.count(t) for t in set(olds)) == [3, 3, 4]


def test_mix_names_missing_column():
    buf = ReplayBuffer(capacity=10)
    buf.add([{"prompt": "a", "completion": "b"}])
    with pytest.raises(ValueError, match="column 'text'"):
        buf.mix(_rows("new", 10), 0.5)
    with pytest.raises(ValueError, match="ratio"):
        buf.mix(_rows("new", 10), 1.0)


def test_replay_save_load_continues_identically(tmp_path):
    a = ReplayBuffer(capacity=20, seed=5)
    a.add(_rows("t1", 100), task="t1")
    path = a.save(tmp_path / "replay.jsonl")
    b = ReplayBuffer.load(path)
    assert b.items == a.items and b.seen == a.seen
    a.add(_rows("t2", 100), task="t2")
    b.add(_rows("t2", 100), task="t2")
    assert b.items == a.items  # same generator state after reload
    assert path.read_text().splitlines()[0].startswith('{"__secura_replay__": 1')


# --------------------------------------------------------------------------- metrics
def test_accuracy_matrix_metrics_match_hand_computation():
    m = AccuracyMatrix(3, names=["a", "b", "c"])
    table = [[0.9, 0.1, 0.1], [0.7, 0.8, 0.2], [0.5, 0.6, 0.85]]
    for i, row in enumerate(table):
        for j, v in enumerate(row):
            m.record(i, j, v)
    assert m.average_accuracy() == pytest.approx((0.5 + 0.6 + 0.85) / 3)
    assert m.average_accuracy(after=1) == pytest.approx(0.75)
    assert m.backward_transfer() == pytest.approx(((0.5 - 0.9) + (0.6 - 0.8)) / 2)
    assert m.forgetting() == pytest.approx(((0.9 - 0.5) + (0.8 - 0.6)) / 2)
    assert forward_transfer(table, [0.0, 0.05, 0.1]) == pytest.approx(
        ((0.1 - 0.05) + (0.2 - 0.1)) / 2
    )
    assert "0.850" in m.format()
    assert m.to_dict()["bwt"] == pytest.approx(-0.3)


def test_metrics_partial_and_errors():
    m = AccuracyMatrix(3)
    m.record(0, 0, 0.9)
    m.record(1, 0, 0.9)
    m.record(1, 1, 0.7)
    assert m.summary() == pytest.approx({"avg_accuracy": 0.8, "bwt": 0.0, "forgetting": 0.0})
    with pytest.raises(ValueError, match=r"a\[1\]\[0\]"):
        backward_transfer([[0.9], [None, 0.7]])
    assert forgetting([[0.5]]) == 0.0
    assert retention(0.8, 0.6) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="base_score"):
        retention(0.0, 0.5)


# --------------------------------------------------------------------------- probe
@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_probe_greedy_matches_uncached_argmax(tok):
    model = build_tiny_model("qwen2", vocab_size=len(tok))
    pairs = [("ab", "cde"), ("hello wor", "ld!"), ("x", "yz")]
    probe = RetentionProbe(pairs, tok, batch_size=3)
    # reference: feed the model its own argmax one token at a time, no cache, no padding
    reference_answers = []
    for prompt, answer in pairs:
        ids = tok(prompt, return_tensors="pt").input_ids
        for _ in range(len(answer)):
            nxt = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        reference_answers.append(tok.decode(ids[0, -len(answer) :]))
    # make the probe's answers be exactly what the model generates: accuracy must be 1
    exact = RetentionProbe(
        list(zip([p for p, _ in pairs], reference_answers, strict=True)), tok, batch_size=2
    )
    assert exact.evaluate(model)["accuracy"] == 1.0
    # one wrong last character in each answer: no exact match anywhere
    wrong = [a[:-1] + ("a" if a[-1] != "a" else "b") for a in reference_answers]
    off = RetentionProbe(list(zip([p for p, _ in pairs], wrong, strict=True)), tok, batch_size=3)
    assert off.evaluate(model)["accuracy"] == 0.0
    assert 0.0 <= probe.evaluate(model)["accuracy"] <= 1.0


def test_probe_loss_is_answer_token_nll(tok):
    model = build_tiny_model("llama", vocab_size=len(tok))
    probe = RetentionProbe([("2+2=", "4"), ("10-3=", "7!")], tok, batch_size=1)
    got = probe.evaluate(model, generate=False)
    assert set(got) == {"loss"}
    nll, n = 0.0, 0
    for prompt, answer in probe.pairs:
        p = tok(prompt).input_ids
        a = tok(answer, add_special_tokens=False).input_ids
        with torch.no_grad():
            logp = model(torch.tensor([p + a])).logits[0].log_softmax(-1)
        for k, t in enumerate(a):
            nll -= float(logp[len(p) - 1 + k, t])
            n += 1
    assert got["loss"] == pytest.approx(nll / n, rel=1e-4)
    # batching and padding do not change the score
    batched = RetentionProbe(probe.pairs, tok, batch_size=2).evaluate(model, generate=False)
    assert batched["loss"] == pytest.approx(got["loss"], rel=1e-4)


def test_probe_learns_a_memorised_answer(tok):
    """After overfitting one pair the probe reports lower loss and an exact match."""
    model = build_tiny_model("llama", vocab_size=len(tok))
    probe = RetentionProbe([("Q:", "yes")], tok)
    before = probe.evaluate(model)
    ids = tok("Q:yes", return_tensors="pt").input_ids
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(40):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    after = probe.evaluate(model)
    assert model.training  # mode restored
    assert after["loss"] < before["loss"] and after["accuracy"] == 1.0


def test_probe_inputs_validated(tmp_path, tok):
    with pytest.raises(ValueError, match="pairs"):
        RetentionProbe([], tok)
    path = tmp_path / "probe.jsonl"
    path.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "c", "completion": "d"}\n')
    assert load_pairs(path) == [("a", "b"), ("c", "d")]
    path.write_text('{"question": "a"}\n')
    with pytest.raises(ValueError, match=":1:"):
        load_pairs(path)


# --------------------------------------------------------------------------- plugin
def test_ewc_and_replay_are_registered_continual_plugins():
    from secura_plugins import get_plugin_manager
    from secura_plugins.continual.plugin import continual_registry

    registry = continual_registry()
    assert registry is get_plugin_manager().continual
    assert registry.get("ewc") is EWC and registry.get("replay") is ReplayBuffer
    assert registry.get("ewc")(lam=2.0, gamma=0.5).gamma == 0.5
    assert registry.get("replay")(capacity=3, ratio=0.2).ratio == 0.2
