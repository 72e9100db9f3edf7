"""End-to-end tests through the real ``trl.SFTTrainer`` with ``SecuraCallback``.

Tiny models on CPU; the 4-bit runs use bitsandbytes' real ``Linear4bit`` (CPU backend).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers.trl_helpers import (
    adapter_snapshot,
    base_snapshot,
    load_4bit,
    logged,
    reverse_dataset,
    sample_ids,
    sft_config,
    text_dataset,
)

pytest.importorskip("trl")

from peft import LoraConfig  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import SFTTrainer  # noqa: E402

from secura_plugins import AdapterConfig, apply_adapter, is_adapted, load_adapter  # noqa: E402
from secura_plugins.continual import EWC, ReplayBuffer, RetentionProbe  # noqa: E402
from secura_plugins.integrations.trl import (  # noqa: E402
    CALLBACK_STATE_NAME,
    EWC_STATE_NAME,
    SecuraCallback,
    SecuraSFTTrainer,
)
from secura_plugins.tiny import build_tiny_model, build_tokenizer, save_tiny_checkpoint  # noqa: E402

# The output bias is on (as in the authors' runs): without it SECURA's update C A B R is
# cubic in the tiny model's small weights (d=64) and the loss moves ~20x slower than LoRA's.
SECURA = dict(
    method="secura",
    r=4,
    merge_every=3,
    output_bias=True,
    target_modules=["q_proj", "v_proj", "up_proj"],
)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("base") / "llama", "llama", seed=3)


class Recorder(TrainerCallback):
    """Stands in for a reporting callback (TensorBoard, W&B): records what on_log sees."""

    def __init__(self):
        self.seen: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs or {}))


def _train_loss(model, tok, texts) -> float:
    enc = tok(list(texts), return_tensors="pt", padding=True)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    model.eval()
    with torch.no_grad():
        return float(model(**enc, labels=labels).loss)


# --------------------------------------------------------------------------- fp32
def test_plain_model_end_to_end(tmp_path, tok):
    base = build_tiny_model("llama", vocab_size=len(tok), seed=3)
    ds = text_dataset(64)
    before_base = base_snapshot(base)
    recorder = Recorder()
    cb = SecuraCallback(AdapterConfig(**SECURA))
    trainer = SFTTrainer(
        base,
        args=sft_config(tmp_path / "run", max_steps=9),
        train_dataset=ds,
        processing_class=tok,
        callbacks=[recorder, cb],
    )
    model = trainer.model
    assert is_adapted(model) and model.secura_config.method == "secura"
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    loss_before = _train_loss(model, tok, ds["text"])
    trainer.train()
    loss_after = _train_loss(model, tok, ds["text"])
    assert loss_after < loss_before - 0.05, (loss_before, loss_after)

    # the base weights are untouched (M1 merges live in U_acc)
    after_base = base_snapshot(model.get_base_model())
    assert set(after_base) == set(before_base)
    assert all(torch.equal(after_base[k], before_base[k]) for k in before_base)

    # merges at steps 3, 6, 9; metrics reached the Trainer's log and the "reporter"
    assert logged(trainer, "secura/merges")[-1] == 3.0
    assert logged(trainer, "secura/gate_mean")
    assert any("secura/merges" in logs for logs in recorder.seen)
    snap = adapter_snapshot(model)
    u_acc = [v for k, v in snap.items() if k.endswith("u_acc")]
    assert u_acc and all(u.abs().sum() > 0 for u in u_acc)

    # the adapter is saved in our format and a reload reproduces the logits
    trainer.save_model(str(tmp_path / "adapter"))
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert meta["peft_type"] == "SECURA"
    ids = sample_ids(tok)
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits
        again = load_adapter(
            build_tiny_model("llama", vocab_size=len(tok), seed=3), tmp_path / "adapter"
        )
        torch.testing.assert_close(again(ids).logits, expected, rtol=0, atol=1e-6)


def test_reporting_integration_records_secura_metrics(tmp_path, tok):
    """A real reporting callback (TensorBoard) writes the callback's metrics."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    base = build_tiny_model("llama", vocab_size=len(tok), seed=3)
    args = sft_config(tmp_path / "run", max_steps=3, report_to="tensorboard")
    trainer = SFTTrainer(
        base,
        args=args,
        train_dataset=text_dataset(32),
        processing_class=tok,
        callbacks=[SecuraCallback(AdapterConfig(**SECURA))],
    )
    trainer.train()
    (logdir,) = {p.parent for p in (tmp_path / "run").rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(logdir)).Reload()
    tags = events.Tags()["scalars"]
    assert any(t.endswith("secura/merges") for t in tags), tags


class StepCounter(TrainerCallback):
    """Counts the optimizer steps a run really executes (``on_step_end``)."""

    def __init__(self):
        self.steps: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def _resume_run(tmp_path, tok, make_trainer, steps=8, save_at=4):
    """(uninterrupted final adapter, resumed-from-mid-run final adapter).

    CPU training is deterministic, so a run that ignored the checkpoint and redid the
    task would end on the same adapter: the resumed run must execute only the steps
    after ``save_at``.
    """
    full = make_trainer(
        tmp_path / "full", save_steps=save_at, save_strategy="steps", max_steps=steps
    )
    full.train()
    want = adapter_snapshot(full.model)
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full", resumed_dir)
    shutil.rmtree(resumed_dir / f"checkpoint-{steps}")
    again = make_trainer(resumed_dir, save_steps=save_at, save_strategy="steps", max_steps=steps)
    counter = StepCounter()
    again.add_callback(counter)
    again.train(resume_from_checkpoint=str(resumed_dir / f"checkpoint-{save_at}"))
    assert counter.steps == list(range(save_at + 1, steps + 1)), counter.steps
    return want, adapter_snapshot(again.model), full, again


def test_resume_gives_same_final_adapter(tmp_path, tok):
    ds = text_dataset(64)

    def make(out, **kw):
        return SFTTrainer(
            build_tiny_model("llama", vocab_size=len(tok), seed=3),
            args=sft_config(out, **kw),
            train_dataset=ds,
            processing_class=tok,
            callbacks=[SecuraCallback(AdapterConfig(**SECURA))],
        )

    want, got, full, again = _resume_run(tmp_path, tok, make)
    assert (tmp_path / "full" / "checkpoint-4" / CALLBACK_STATE_NAME).is_file()
    assert set(want) == set(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    merges = [v for k, v in got.items() if k.endswith("merges")]
    assert merges and all(int(m) == 2 for m in merges)  # steps 3 and 6, across the resume


# --------------------------------------------------------------------------- 4-bit
def test_4bit_peft_config_end_to_end_and_resume(tmp_path, tok, checkpoint):
    ds = text_dataset(64)
    cfg = AdapterConfig(**SECURA)

    def make(out, **kw):
        return SFTTrainer(
            load_4bit(checkpoint),
            args=sft_config(out, **kw),
            train_dataset=ds,
            processing_class=tok,
            peft_config=LoraConfig(r=4, target_modules=SECURA["target_modules"]),
            callbacks=[SecuraCallback(cfg)],
        )

    probe = make(tmp_path / "probe")
    model = probe.model
    assert is_adapted(model)
    assert (
        type(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer).__name__
        == "Linear4bit"
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)  # not TRL's bf16
    before_base = base_snapshot(model.get_base_model())
    loss_before = _train_loss(model, tok, ds["text"])
    probe.train()
    assert _train_loss(model, tok, ds["text"]) < loss_before - 0.05
    after_base = base_snapshot(model.get_base_model())
    assert all(torch.equal(after_base[k], before_base[k]) for k in before_base)

    probe.save_model(str(tmp_path / "adapter"))
    ids = sample_ids(tok)
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits
        again = load_adapter(load_4bit(checkpoint), tmp_path / "adapter")
        torch.testing.assert_close(again(ids).logits, expected, rtol=0, atol=1e-5)

    want, got, _, _ = _resume_run(tmp_path, tok, make)
    for k in want:
        assert torch.equal(want[k], got[k]), k


def test_model_already_carrying_secura_4bit(tmp_path, tok, checkpoint):
    model = apply_adapter(load_4bit(checkpoint), AdapterConfig(**SECURA))
    start = adapter_snapshot(model)
    # SecuraSFTTrainer keeps the carried adapter exact through TRL's bf16 cast ...
    trainer = SecuraSFTTrainer(
        model,
        args=sft_config(tmp_path / "run", max_steps=4),
        train_dataset=text_dataset(32),
        processing_class=tok,
        callbacks=[SecuraCallback()],
    )
    assert trainer.model is model
    assert all(torch.equal(start[k], v) for k, v in adapter_snapshot(model).items())
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    trainer.train()
    end = adapter_snapshot(model)
    assert logged(trainer, "secura/merges")[-1] == 1.0
    assert any(not torch.equal(start[k], end[k]) for k in start if k.endswith(".B"))
    assert any(not torch.equal(start[k], end[k]) for k in start if k.endswith("u_acc"))
    # ... plain SFTTrainer rounds it (TRL casts before any callback runs); the callback
    # restores the dtype so training still runs in fp32
    SFTTrainer(
        model,
        args=sft_config(tmp_path / "run2", max_steps=1),
        train_dataset=text_dataset(8),
        processing_class=tok,
        callbacks=[SecuraCallback()],
    )
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="method"):
        SFTTrainer(
            model,
            args=sft_config(tmp_path / "x", max_steps=1),
            train_dataset=text_dataset(8),
            processing_class=tok,
            callbacks=[SecuraCallback({"method": "curlora", "r": 4})],
        )


# --------------------------------------------------------------------------- EWC
def _two_task_distance(tmp_path, tok, lam, *, mixin: bool, name: str):
    """Train task A, consolidate, train task B with EWC(lam); distance to task A's anchor."""
    ewc = EWC(lam=lam)
    model = apply_adapter(
        build_tiny_model("llama", vocab_size=len(tok), seed=3),
        AdapterConfig(**{**SECURA, "merge": "none"}),
    )
    cls = SecuraSFTTrainer if mixin else SFTTrainer
    for task, ds in (("a", text_dataset(64)), ("b", reverse_dataset(64))):
        cb = SecuraCallback(ewc=ewc, fisher_batches=4)
        trainer = cls(
            model,
            args=sft_config(tmp_path / f"{name}-{task}", max_steps=8),
            train_dataset=ds,
            processing_class=tok,
            callbacks=[cb],
        )
        if task == "b":
            anchor_state = {k: v.clone() for k, v in ewc.anchors.items()}
        trainer.train()
    dist = (
        sum(
            float(((p.detach() - anchor_state[n]) ** 2).sum())
            for n, p in model.named_parameters()
            if n in anchor_state
        )
        ** 0.5
    )
    return dist, trainer


@pytest.fixture(scope="module")
def free_distance(tmp_path_factory, tok):
    """Distance to the anchor without EWC (lambda 0: the same for both paths)."""
    return _two_task_distance(tmp_path_factory.mktemp("free"), tok, 0.0, mixin=False, name="free")[
        0
    ]


@pytest.mark.parametrize("mixin", [False, True], ids=["callback-grad", "mixin-loss"])
def test_ewc_keeps_parameters_near_anchor(tmp_path, tok, mixin, free_distance):
    free = free_distance
    # lambda is relative to the Fisher's scale, ~1e-10..1e-4 for this tiny model's gradients
    held, trainer = _two_task_distance(tmp_path, tok, 1e9, mixin=mixin, name="held")
    assert held < 0.5 * free, (held, free)
    penalties = logged(trainer, "ewc/penalty")
    assert penalties and max(penalties) > 0


def test_ewc_gradient_paths_agree_under_accumulation(tmp_path, tok):
    """Loss-term (mixin) and gradient (callback) paths give the same update."""
    results = []
    for mixin in (False, True):
        model = apply_adapter(
            build_tiny_model("llama", vocab_size=len(tok), seed=3),
            AdapterConfig(**{**SECURA, "merge": "none"}),
        )
        with torch.no_grad():  # leave the anchor so the penalty has a gradient
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.add_(
                        0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n)))
                    )
        ewc = EWC(lam=50.0)
        ewc.consolidate(
            model,
            fisher={n: torch.ones_like(p) for n, p in model.named_parameters() if p.requires_grad},
        )
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05)
        cls = SecuraSFTTrainer if mixin else SFTTrainer
        trainer = cls(
            model,
            args=sft_config(
                tmp_path / f"gas-{mixin}",
                max_steps=1,
                gradient_accumulation_steps=2,
                per_device_train_batch_size=4,
                max_grad_norm=0.0,
                optim="sgd",
                learning_rate=1e-3,
            ),
            train_dataset=text_dataset(16),
            processing_class=tok,
            callbacks=[SecuraCallback(ewc=ewc, consolidate=False)],
        )
        trainer.train()
        results.append(adapter_snapshot(model))
    grad_path, loss_path = results
    for k in grad_path:
        torch.testing.assert_close(grad_path[k], loss_path[k], rtol=1e-4, atol=1e-6)


def test_ewc_state_saved_in_checkpoints_and_restored(tmp_path, tok):
    model = apply_adapter(
        build_tiny_model("llama", vocab_size=len(tok), seed=3), AdapterConfig(**SECURA)
    )
    ewc = EWC(lam=5.0)
    ewc.consolidate(
        model,
        fisher={n: torch.rand_like(p) for n, p in model.named_parameters() if p.requires_grad},
    )
    trainer = SFTTrainer(
        model,
        args=sft_config(tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=2),
        train_dataset=text_dataset(32),
        processing_class=tok,
        callbacks=[SecuraCallback(ewc=ewc, consolidate=False)],
    )
    trainer.train()
    path = tmp_path / "run" / "checkpoint-2" / EWC_STATE_NAME
    saved = EWC.load(path)
    assert saved.lam == 5.0 and set(saved.fisher) == set(ewc.fisher)
    # a resumed run whose callback was built without EWC picks it up from the checkpoint
    model2 = apply_adapter(
        build_tiny_model("llama", vocab_size=len(tok), seed=3), AdapterConfig(**SECURA)
    )
    cb = SecuraCallback(consolidate=False)
    resumed = SFTTrainer(
        model2,
        args=sft_config(tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=2),
        train_dataset=text_dataset(32),
        processing_class=tok,
        callbacks=[cb],
    )
    resumed.train(resume_from_checkpoint=True)
    assert cb.ewc is not None and torch.equal(
        cb.ewc.fisher[next(iter(ewc.fisher))], ewc.fisher[next(iter(ewc.fisher))]
    )
    assert logged(resumed, "ewc/penalty")


def test_consolidation_at_train_end_zeroes_pending_b(tmp_path, tok):
    ewc = EWC(lam=1.0)
    cb = SecuraCallback(AdapterConfig(**{**SECURA, "merge_every": 100}), ewc=ewc, fisher_batches=2)
    trainer = SFTTrainer(
        build_tiny_model("llama", vocab_size=len(tok), seed=3),
        args=sft_config(tmp_path / "run", max_steps=3),
        train_dataset=text_dataset(32),
        processing_class=tok,
        callbacks=[cb],
    )
    trainer.train()
    assert ewc.num_tasks == 1 and all(
        f.sum() > 0 for n, f in ewc.fisher.items() if n.endswith(".A")
    )
    b_anchors = [a for n, a in ewc.anchors.items() if n.endswith(".B")]
    assert b_anchors and all(torch.count_nonzero(a) == 0 for a in b_anchors)
    u_acc = [v for k, v in adapter_snapshot(trainer.model).items() if k.endswith("u_acc")]
    assert all(u.abs().sum() > 0 for u in u_acc)  # the pending update was kept, in U_acc


# --------------------------------------------------------------------------- replay, probe
def test_replay_buffer_saved_in_checkpoints_and_restored(tmp_path, tok):
    buffer = ReplayBuffer(capacity=8, seed=1)
    buffer.add(reverse_dataset(20), task="reverse")  # 20 > 8: the reservoir generator moved
    args = sft_config(tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=2)
    trainer = SFTTrainer(
        build_tiny_model("llama", vocab_size=len(tok), seed=3),
        args=args,
        train_dataset=text_dataset(32),
        processing_class=tok,
        callbacks=[SecuraCallback(AdapterConfig(**SECURA), replay=buffer)],
    )
    trainer.train()
    # a resumed run whose callback holds a fresh, empty buffer gets the saved one back
    fresh = ReplayBuffer(capacity=8, seed=1)
    resumed = SFTTrainer(
        build_tiny_model("llama", vocab_size=len(tok), seed=3),
        args=args,
        train_dataset=text_dataset(32),
        processing_class=tok,
        callbacks=[SecuraCallback(AdapterConfig(**SECURA), replay=fresh)],
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert len(fresh) == 8 and fresh.seen == 20
    assert fresh.state_dict() == buffer.state_dict()


def test_mixin_replay_mixes_and_fills_buffer(tmp_path, tok):
    buffer = ReplayBuffer(capacity=50, seed=0)
    buffer.add(reverse_dataset(40), task="reverse")
    ds = text_dataset(72)
    trainer = SecuraSFTTrainer(
        build_tiny_model("llama", vocab_size=len(tok), seed=3),
        args=sft_config(tmp_path / "run", max_steps=2),
        train_dataset=ds,
        processing_class=tok,
        callbacks=[SecuraCallback(AdapterConfig(**SECURA))],
        replay=buffer,
        replay_ratio=0.1,
        task_name="add",
    )
    assert len(trainer.train_dataset) == 72 + 8  # round(0.1 * 72 / 0.9)
    trainer.train()
    assert buffer.seen == 40 + 72 and set(buffer.task_counts()) == {"reverse", "add"}


def test_retention_probe_logged_as_eval_metric(tmp_path, tok):
    pairs = [("3+4=", "7"), ("5+5=", "10"), ("2+9=", "11")]
    cb = SecuraCallback(AdapterConfig(**SECURA), probe=pairs, probe_steps=2)
    trainer = SFTTrainer(
        build_tiny_model("llama", vocab_size=len(tok), seed=3),
        # logging every 3 steps: the probe still runs at steps 2 and 4 (it forces a log)
        args=sft_config(
            tmp_path / "run", max_steps=4, eval_strategy="steps", eval_steps=3, logging_steps=3
        ),
        train_dataset=text_dataset(32),
        eval_dataset=text_dataset(8, offset=40),
        processing_class=tok,
        callbacks=[cb],
    )
    trainer.train()
    assert isinstance(cb.probe, RetentionProbe) and cb.probe_baseline is not None
    hist = trainer.state.log_history
    eval_rows = [h for h in hist if "eval_loss" in h]
    assert eval_rows and all("eval_retention_accuracy" in h for h in eval_rows)
    train_rows = [h for h in hist if "loss" in h and "eval_retention_loss" in h]
    assert [h["step"] for h in train_rows] == [2, 4]
    final = [h for h in hist if "train_runtime" in h][0]
    assert "eval_retention_loss" in final or final["step"] in {h["step"] for h in eval_rows}
    assert all(0.0 <= h["eval_retention_accuracy"] <= 1.0 for h in eval_rows)
    # the probe measured the model: its loss moved with training
    losses = [h["eval_retention_loss"] for h in hist if "eval_retention_loss" in h]
    assert len(set(losses)) > 1


def test_callback_applies_adapter_with_gradient_checkpointing(tmp_path, tok):
    """Plain model + checkpointing: the swapped-in PeftModel still gets gradients."""
    cb = SecuraCallback(AdapterConfig(**{**SECURA, "merge": "none"}))
    trainer = SFTTrainer(
        build_tiny_model("llama", vocab_size=len(tok), seed=3),
        args=sft_config(tmp_path / "run", max_steps=2, gradient_checkpointing=True),
        train_dataset=text_dataset(16),
        processing_class=tok,
        callbacks=[cb],
    )
    start = adapter_snapshot(trainer.model)
    trainer.train()
    end = adapter_snapshot(trainer.model)
    for suffix in (".A", ".B"):
        assert any(not torch.equal(start[k], end[k]) for k in start if k.endswith(suffix)), suffix


class PoisonUAcc(TrainerCallback):
    """Puts a NaN into the first SECURA core's ``U_acc`` right after step ``at``'s
    optimizer step (before any callback's ``on_step_end``): that step's loss is finite."""

    def __init__(self, at: int):
        self.at = at

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        from secura_plugins.methods.secura import secura_cores

        if state.global_step + 1 == self.at:
            next(iter(secura_cores(model))).u_acc[0, 0] = float("nan")


def test_nan_in_an_adapter_buffer_halts_with_step_and_tensor(tmp_path, tok):
    from secura_plugins.errors import TrainingDivergedError

    base = build_tiny_model("llama", vocab_size=len(tok), seed=3)
    cb = SecuraCallback(AdapterConfig(**SECURA))
    trainer = SFTTrainer(
        base,
        args=sft_config(tmp_path / "run", max_steps=6, save_strategy="steps", save_steps=1),
        train_dataset=text_dataset(64),
        processing_class=tok,
        callbacks=[PoisonUAcc(at=2), cb],
    )
    with pytest.raises(TrainingDivergedError, match=r"^step 2: .*adapter tensor u_acc #0 is NaN"):
        trainer.train()
    # the loss of step 2 was finite: only the tensor check can have stopped it, and
    # nothing of step 2 reached disk
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-1"]


class NanLossAtStep(SFTTrainer):
    """Adds a NaN constant to the loss of one step: the gradient (and so every adapter
    tensor) stays finite, only the loss itself is not."""

    nan_at = 2

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        if model.training and self.state.global_step + 1 == self.nan_at:
            loss = loss + float("nan")
        return (loss, outputs) if return_outputs else loss


def test_a_nan_loss_halts_even_when_every_adapter_tensor_stays_finite(tmp_path, tok):
    """The mixin hands each loss's finiteness to the callback (through callback.link)."""
    from secura_plugins.errors import TrainingDivergedError
    from secura_plugins.integrations.trl import ContinualTrainerMixin

    class Trainer(ContinualTrainerMixin, NanLossAtStep):
        pass

    trainer = Trainer(
        build_tiny_model("llama", vocab_size=len(tok), seed=3),
        args=sft_config(tmp_path / "run", max_steps=4, max_grad_norm=0.0),
        train_dataset=text_dataset(64),
        processing_class=tok,
        callbacks=[SecuraCallback(AdapterConfig(**SECURA))],
    )
    with pytest.raises(TrainingDivergedError, match=r"^step 2: .*\(the training loss is NaN"):
        trainer.train()
    assert all(torch.isfinite(t).all() for t in adapter_snapshot(trainer.model).values())


def test_the_mixin_alone_adds_logs_and_consolidates_the_ewc_penalty(tmp_path, tok):
    model = apply_adapter(
        build_tiny_model("llama", vocab_size=len(tok), seed=3),
        AdapterConfig(**{**SECURA, "merge": "none"}),
    )
    ewc = EWC(lam=50.0)
    ewc.consolidate(
        model, fisher={n: torch.ones_like(p) for n, p in model.named_parameters() if p.requires_grad}
    )
    trainer = SecuraSFTTrainer(  # no SecuraCallback: the mixin does it all
        model,
        args=sft_config(tmp_path / "run", max_steps=3),
        train_dataset=text_dataset(32),
        processing_class=tok,
        ewc=ewc,
        fisher_batches=2,
    )
    trainer.train()
    penalties = logged(trainer, "ewc/penalty")
    assert len(penalties) == 3 and penalties[-1] > 0, penalties
    assert ewc.num_tasks == 2  # the task was folded in after train()
