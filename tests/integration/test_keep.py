"""The keep tools: disable_adapter is the base for every method, self-rehearsal (seeded,
deduplicated, probe-free), the KL anchor through the real TRL SFTTrainer (logged,
non-zero, mixed rows, exact resume), SC-LoRA's preserve side, and interpolation."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.trl_helpers import reverse_dataset, sft_config, text_dataset

from secura_plugins import AdapterConfig, apply_adapter, load_adapter, save_adapter
from secura_plugins.keep import REHEARSAL_FILE, Keep, KeepConfig, generate_rehearsal
from secura_plugins.keep.rehearsal import adapter_disabled, normalize_prompt
from secura_plugins.methods.secura import secura_cores
from secura_plugins.tiny import build_tiny_model, build_tokenizer

torch.set_num_threads(1)
METHODS = ["lora", "dora", "secura", "curlora", "sclora"]


def _adapted(method: str, tok, seed: int = 0):
    torch.manual_seed(seed)
    base = build_tiny_model("llama", vocab_size=len(tok))
    data = {}
    if method == "sclora":
        batch = {"input_ids": torch.randint(0, len(tok), (2, 12))}
        data = {"positive": [batch], "negative": [batch]}
    model = apply_adapter(base, AdapterConfig(method=method, r=4, merge_every=1), **data)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a trained-looking adapter: every tensor, merged U_acc included
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
        for core in secura_cores(model):
            core.u_acc.add_(torch.randn(core.u_acc.shape, generator=gen) * 0.2)
    return model


@pytest.mark.parametrize("method", METHODS)
def test_adapter_disabled_is_the_base(method):
    tok = build_tokenizer()
    torch.manual_seed(0)
    reference = build_tiny_model("llama", vocab_size=len(tok)).eval()
    ids = torch.randint(0, len(tok), (2, 10))
    base_logits = reference(ids).logits
    model = _adapted(method, tok).eval()  # same seed: the same base weights
    assert not torch.allclose(model(ids).logits, base_logits, atol=1e-4)
    with adapter_disabled(model):
        assert torch.allclose(model(ids).logits, base_logits, atol=1e-6)


def _rows(model, tok, **kw):
    # (seed 3: on this random tiny model, whether both kinds fill within the attempt bound
    # is luck of the sampling; with seed 3 they do)
    cfg = KeepConfig(rehearsal=12, max_new_tokens=4, batch_size=8, seed=3, **kw)
    prompts = [f"{a}+{b}=" for a in range(6) for b in range(6)]
    return generate_rehearsal(model, tok, prompts, cfg, progress=False), prompts, cfg


def test_rehearsal_is_seeded_deduplicated_and_never_produces_excluded_prompts():
    tok = build_tokenizer()
    model = _adapted("lora", tok)
    rows, prompts, cfg = _rows(model, tok)
    assert rows and rows == _rows(model, tok)[0]
    keys = [normalize_prompt(r["prompt"]) for r in rows]
    assert len(set(keys)) == len(keys)
    assert not set(keys) & {normalize_prompt(p) for p in prompts}
    assert {r["kind"] for r in rows} == {"task", "generic"}
    probe = [r["prompt"].upper() for r in rows[:6]]  # case-insensitive exclusion
    again = generate_rehearsal(model, tok, prompts, cfg, exclude=probe, progress=False)
    assert again and not {normalize_prompt(r["prompt"]) for r in again} & set(keys[:6])


def test_rehearsal_answers_come_from_the_base_not_the_adapter():
    tok = build_tokenizer()
    model = _adapted("lora", tok)
    rows = _rows(model, tok)[0]
    torch.manual_seed(0)
    base = build_tiny_model("llama", vocab_size=len(tok))
    assert rows == _rows(base, tok)[0]


def _trainer(tmp_path, keep, method="lora", data=None, **cfg):
    from trl import SFTTrainer

    from secura_plugins.integrations.trl import SecuraCallback

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = build_tiny_model("llama", vocab_size=len(tok))
    cb = SecuraCallback(AdapterConfig(method=method, r=4), keep=keep)
    args = sft_config(tmp_path, learning_rate=1e-2, loss_type="nll", **cfg)
    return SFTTrainer(
        model, args=args, train_dataset=data or text_dataset(32), processing_class=tok,
        callbacks=[cb],
    ), cb


def _keep(**kw):
    # The tiny tokenizer spells characters: rows as short as "3+4=7" leave no room for a
    # generic prompt, so these tests lift the row bound unless they test it.
    kw = {"max_row_tokens": 0, **kw}
    return Keep(KeepConfig(rehearsal=8, ratio=0.3, max_new_tokens=6, **kw), progress=False)


@pytest.mark.parametrize("mode", ["in_step", "cached"])
def test_sft_trainer_mixes_saves_and_logs_a_nonzero_kl(tmp_path, mode):
    trainer, cb = _trainer(tmp_path, _keep(kl_mode=mode, kl_on_task=mode == "in_step"))
    trainer.train()
    kl = [h["keep/kl"] for h in trainer.state.log_history if "keep/kl" in h]
    assert len(kl) >= 5 and max(kl) > 0
    assert len(trainer.train_dataset) == 32 + round(0.3 * 32 / 0.7)
    keys = {tuple(r) for r in trainer.train_dataset["input_ids"]}
    assert keys & cb.keep.keys  # the rehearsal rows are in the mixed set
    saved = [json.loads(x) for x in (tmp_path / REHEARSAL_FILE).read_text().splitlines()[1:]]
    assert saved == cb.keep.rows and 1 <= len(saved) <= 8  # a random tiny model: some rejected


def test_fixed_max_steps_warns_that_the_task_gets_fewer_rows(tmp_path, caplog):
    """With ``max_steps`` fixed, rehearsal rows take a share of the steps: the user is told
    how many steps give the task as many rows as without them."""
    trainer, _ = _trainer(tmp_path, _keep(kl_lambda=0.0), max_steps=6)
    with caplog.at_level("WARNING", logger="secura_plugins.keep.runtime"):
        trainer.train()
    assert "set max_steps to 9" in caplog.text  # 6 / (1 - 0.3), rounded up

    caplog.clear()  # a caller that already scaled max_steps is not told to scale it again
    keep = _keep(kl_lambda=0.0)
    keep.steps_scaled = True
    trainer, _ = _trainer(tmp_path / "scaled", keep, max_steps=9)
    with caplog.at_level("WARNING", logger="secura_plugins.keep.runtime"):
        trainer.train()
    assert "max_steps" not in caplog.text and len(trainer.train_dataset) > 32


def test_shortfall_warning_names_task_layout_when_no_row_takes_the_task_shape(caplog):
    """A template whose shared ending spans lines ("\\nA:") gets no task-shaped rows from
    the preset's exact-ending search: the warning says why and names ``task_layout``."""
    tok = build_tokenizer()
    model = _adapted("lora", tok)
    prompts = [f"Q: {a} plus {b}?\nA:" for a in range(4) for b in range(4)]
    keep = Keep(KeepConfig(rehearsal=4, max_new_tokens=4, batch_size=8), task_prompts=prompts,
                progress=False)
    keep.chat = False
    with caplog.at_level("WARNING", logger="secura_plugins.keep.runtime"):
        rows = keep.ensure_rows(model, tok)
    assert not any(r["kind"] == "task" for r in rows)
    assert "so every row is generic (task_layout: true" in caplog.text


def test_kl_off_logs_nothing_and_rehearsal_still_mixes(tmp_path):
    trainer, _ = _trainer(tmp_path, _keep(kl_lambda=0.0))
    trainer.train()
    assert not any("keep/kl" in h for h in trainer.state.log_history)
    assert len(trainer.train_dataset) > 32


def test_resume_is_exact(tmp_path):
    from secura_plugins.io import adapter_tensors

    full, full_cb = _trainer(tmp_path / "a", _keep(), max_steps=4)
    full.train()
    full_keep_rows = full_cb.keep.rows
    part, _ = _trainer(tmp_path / "b", _keep(), max_steps=4, save_strategy="steps", save_steps=2)
    part.train()
    assert (tmp_path / "b" / "checkpoint-2" / REHEARSAL_FILE).is_file()
    (tmp_path / "b" / REHEARSAL_FILE).unlink()  # the checkpoint's copy must be used
    # No time to generate: the rows can only come from the checkpoint.
    resumed, cb = _trainer(tmp_path / "b", _keep(max_seconds=1e-9), max_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    assert cb.keep.rows and cb.keep.rows == full_keep_rows
    a = adapter_tensors(full.model, "default")
    b = adapter_tensors(resumed.model, "default")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sclora_preserve_side_is_the_self_rehearsal(tmp_path):
    trainer, cb = _trainer(tmp_path, _keep(), method="sclora")
    tok = build_tokenizer()
    expected = cb.keep.negative_batches(tok)
    assert len(cb.adapter_data["negative"]) == len(expected)
    assert all(
        torch.equal(a["input_ids"], b["input_ids"])
        for a, b in zip(cb.adapter_data["negative"], expected)
    )
    trainer.train()


@pytest.mark.parametrize("method", ["lora", "secura", "sclora"])
def test_scale_zero_is_the_base_and_one_is_the_adapter(tmp_path, method):
    tok = build_tokenizer()
    model = _adapted(method, tok).eval()
    ids = torch.randint(0, len(tok), (2, 10))
    adapted = model(ids).logits
    with adapter_disabled(model):
        base_logits = model(ids).logits
    save_adapter(model, tmp_path / "ad")

    def loaded(scale):
        torch.manual_seed(0)
        fresh = build_tiny_model("llama", vocab_size=len(tok))
        return load_adapter(fresh, tmp_path / "ad", scale=scale).eval()(ids).logits

    assert torch.allclose(loaded(1.0), adapted, atol=1e-6)
    assert torch.allclose(loaded(0.0), base_logits, atol=1e-6)
    half = loaded(0.5)
    assert not torch.allclose(half, base_logits, atol=1e-4)
    assert not torch.allclose(half, adapted, atol=1e-4)


def test_scale_refuses_dora():
    from secura_plugins.errors import SecuraConfigError
    from secura_plugins.keep import scale_update

    with pytest.raises(SecuraConfigError, match="DoRA"):
        scale_update(_adapted("dora", build_tokenizer()), 0.5)


def test_bad_keep_settings_name_the_field():
    from secura_plugins.errors import SecuraConfigError

    with pytest.raises(SecuraConfigError, match="keep.ratio"):
        KeepConfig(ratio=1.0)
    with pytest.raises(SecuraConfigError, match="keep.preset"):
        KeepConfig.coerce("kepp")
    for bad, field in (({"max_row_tokens": "short"}, "max_row_tokens"),
                       ({"max_row_tokens": 2}, "max_row_tokens"),
                       ({"rehearsal_loss": "kl", "kl_lambda": 0.0}, "rehearsal_loss"),
                       ({"kl_positions": "prompt"}, "kl_positions"),
                       ({"task_layout": "yes"}, "task_layout")):
        with pytest.raises(SecuraConfigError, match=f"keep.{field}"):
            KeepConfig(**bad)


def test_recipe_keep_block_runs_rehearsal_and_kl_per_task(tmp_path):
    from secura_plugins.errors import SecuraConfigError
    from secura_plugins.recipe import Recipe, run_recipe

    keep = {"rehearsal": 6, "ratio": 0.3, "max_new_tokens": 4, "kl_on_task": True}
    recipe = Recipe.from_dict({
        "run": {"output_dir": str(tmp_path / "run")},
        "model": {"tiny": "llama"},
        "adapter": {"method": "lora", "r": 4},
        "training": {"max_steps": 3, "per_device_train_batch_size": 4, "logging_steps": 1,
                     "learning_rate": 1e-2, "use_cpu": True},
        "tasks": [{"name": "add", "data": {"builtin": "add", "n": 16}},
                  {"name": "upper", "data": {"builtin": "upper", "n": 16}}],
        "continual": {"keep": keep},
    })
    run_recipe(recipe, progress=False)
    for i, name in enumerate(["add", "upper"]):
        task_dir = tmp_path / "run" / f"task-{i}-{name}"
        assert (task_dir / REHEARSAL_FILE).is_file()
        state = json.loads(next(task_dir.glob("checkpoint-*/trainer_state.json")).read_text())
        assert max(h.get("keep/kl", 0.0) for h in state["log_history"]) > 0
    with pytest.raises(SecuraConfigError, match="keep.kl_lamda"):
        Recipe.from_dict({"model": {"tiny": "llama"}, "tasks": [{"data": {"builtin": "add"}}],
                          "continual": {"keep": {"kl_lamda": 1}}})


@pytest.mark.parametrize("method", ["lora", "secura"])
def test_adapter_disabled_is_the_base_on_a_4bit_base(tmp_path, method):
    from helpers.trl_helpers import load_4bit

    from secura_plugins.tiny import save_tiny_checkpoint

    folder = save_tiny_checkpoint(tmp_path / "tiny", "llama")
    ids = torch.randint(0, 90, (2, 10))
    base_logits = load_4bit(folder).eval()(ids).logits
    model = apply_adapter(load_4bit(folder), AdapterConfig(method=method, r=4, merge_every=1))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
        for core in secura_cores(model):
            core.u_acc.add_(torch.randn_like(core.u_acc) * 0.2)
    model.eval()
    assert not torch.allclose(model(ids).logits, base_logits, atol=1e-4)
    with adapter_disabled(model):
        assert torch.equal(model(ids).logits, base_logits)


def _row_tokens(tok, row) -> int:
    return sum(len(tok(row[k], add_special_tokens=False)["input_ids"])
               for k in ("prompt", "completion"))


def test_rehearsal_rows_fit_the_row_bound():
    tok = build_tokenizer()
    model = _adapted("lora", tok)
    prompts = [f"{a}+{b}=" for a in range(6) for b in range(6)]

    def rows(bound):
        cfg = KeepConfig(rehearsal=12, max_new_tokens=12, batch_size=8, seed=3,
                         max_row_tokens=bound)
        return generate_rehearsal(model, tok, prompts, cfg, progress=False)

    free, bounded = rows(0), rows(9)
    assert max(_row_tokens(tok, r) for r in free) > 9  # unbounded rows are longer
    assert bounded and max(_row_tokens(tok, r) for r in bounded) <= 9


def test_task_row_bound_is_the_task_longest_row(tmp_path):
    trainer, cb = _trainer(tmp_path, _keep(max_row_tokens="task"),
                           data=reverse_dataset(32))
    trainer.train()
    task_rows = [r for r in trainer.train_dataset["input_ids"] if tuple(r) not in cb.keep.keys]
    longest = max(len(r) for r in task_rows)
    assert cb.keep.row_tokens == longest
    assert cb.keep.settings()["row_tokens"] == longest
    tok = build_tokenizer()
    assert max(_row_tokens(tok, r) for r in cb.keep.rows) <= longest


@pytest.mark.parametrize("loss", ["ce", "kl"])
def test_kl_only_rehearsal_takes_no_cross_entropy_on_rehearsal_rows(tmp_path, loss):
    trainer, cb = _trainer(tmp_path, _keep(rehearsal_loss=loss, kl_lambda=1.0))
    trainer.train()  # a trained adapter: the KL to the base is non-zero
    rows = [r for r in trainer.train_dataset if tuple(r["input_ids"]) in cb.keep.keys]
    batch = trainer.data_collator([{"input_ids": r["input_ids"]} for r in rows[:4]])
    model = trainer.model.train()
    with torch.no_grad():
        value = float(trainer.compute_loss(model, batch))
    kl = float(cb.keep._kl[-1])
    assert kl > 0
    if loss == "kl":
        assert value == pytest.approx(kl, rel=1e-5)  # the anchor alone
    else:
        assert value > kl * 1.01  # cross-entropy on the base's answers too


@pytest.mark.parametrize("where", ["answer", "all"])
def test_kl_positions_all_anchors_the_rehearsal_prompt_too(where):
    from secura_plugins.keep.kl import row_key

    tok = build_tokenizer()
    model = _adapted("lora", tok).train()
    ids = torch.randint(3, len(tok), (2, 9))
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, -100)  # no trained answer token at all
    keep = Keep(KeepConfig(rehearsal=2, kl_positions=where), rows=[], progress=False)
    keep.keys = {row_key(ids[i], mask[i]) for i in range(2)}
    kl = keep.kl_term(model, ids, mask, labels, model(ids).logits)
    assert float(kl) > 0 if where == "all" else float(kl) == 0.0


def test_rehearsal_mixes_into_a_conversational_dataset(tmp_path):
    """TRL conversational rows keep their message-list columns after tokenizing: the
    rehearsal rows are mixed in as one user / one assistant message (issue 13, lab)."""
    from datasets import Dataset

    chat = Dataset.from_list([
        {"prompt": [{"role": "user", "content": f"{i}+{i}"}],
         "completion": [{"role": "assistant", "content": str(2 * i)}]}
        for i in range(32)
    ])
    trainer, cb = _trainer(tmp_path, _keep(), data=chat)
    trainer.train()
    assert cb.keep.chat and cb.keep.rows
    assert len(trainer.train_dataset) > 32 and {tuple(r) for r in
                                                 trainer.train_dataset["input_ids"]} & cb.keep.keys
    row = next(r for r in trainer.train_dataset if tuple(r["input_ids"]) in cb.keep.keys)
    assert row["prompt"][0]["role"] == "user" and row["completion"][0]["role"] == "assistant"


def _rows_spying_template(tok, generic_format: str, chat: bool, monkeypatch):
    """``(config, rows, prompts sent through the chat template)`` of a tiny model's
    rehearsal (seed 0: this random model writes every kind of row; the kinds are checked)."""
    from secura_plugins.keep import rehearsal

    config = KeepConfig(rehearsal=16, generic_share=0.75, max_new_tokens=4, max_row_tokens=0,
                        generic_format=generic_format, seed=0)
    templated: list[str] = []
    real_chat_prompt = rehearsal._chat_prompt

    def spy(tokenizer, prompt):
        templated.append(prompt)
        return real_chat_prompt(tokenizer, prompt)

    monkeypatch.setattr(rehearsal, "_chat_prompt", spy)
    rows = generate_rehearsal(build_tiny_model(vocab_size=len(tok)), tok, ["1+2=", "3+4="],
                              config, chat=chat, progress=False)
    return config, rows, templated


@pytest.mark.parametrize("generic_format", ["task", "plain", "both"])
def test_generic_rows_can_stay_plain_text_on_a_chat_task(generic_format, monkeypatch):
    """On a chat task, ``generic_format: plain`` writes and trains the generic rows as
    plain text (``"text"`` rows: the base's prose), ``both`` every other one, while
    task-shaped rows keep the chat template."""
    tok = build_tokenizer()
    config, rows, templated = _rows_spying_template(tok, generic_format, True, monkeypatch)
    kinds = [r["kind"] for r in rows]
    plain = {"task": 0, "plain": kinds.count("text") + kinds.count("generic")}.get(
        generic_format, (kinds.count("text") + kinds.count("generic")) // 2)
    assert "task" in kinds and kinds.count("text") == plain
    assert kinds.count("text") + kinds.count("generic") >= 2
    asked = set(templated)
    assert all((r["prompt"] in asked) is (r["kind"] != "text") for r in rows)

    keep = Keep(config, rows=[{"prompt": "1+1", "completion": "2", "kind": "task"},
                              {"prompt": "9+9", "completion": "18", "kind": "text"}],
                progress=False)
    keep.chat = True
    task_row, text_row = keep.tokenized(tok)
    chat_ids = list(tok.apply_chat_template(
        [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}],
        tokenize=True, return_dict=False))
    plain_ids = (tok("9+9")["input_ids"] + tok("18", add_special_tokens=False)["input_ids"]
                 + [tok.eos_token_id])
    assert task_row["input_ids"] == chat_ids and text_row["input_ids"] == plain_ids


@pytest.mark.parametrize("generic_format", ["task", "plain", "both"])
def test_both_writes_every_other_generic_row_in_the_chat_template_on_a_plain_task(
        generic_format, monkeypatch):
    """On a plain task, ``generic_format: both`` answers every other generic row through
    the chat template (``"chat"`` rows, trained in the template), so an instruct base's
    chat answers are rehearsed while it learns a plain format; ``task`` and ``plain``
    keep them all plain."""
    tok = build_tokenizer()
    config, rows, templated = _rows_spying_template(tok, generic_format, False, monkeypatch)
    kinds = [r["kind"] for r in rows]
    generic = kinds.count("chat") + kinds.count("generic")
    assert "task" in kinds and generic >= 2
    assert kinds.count("chat") == (generic // 2 if generic_format == "both" else 0)
    assert {r["prompt"] for r in rows if r["kind"] == "chat"} == set(templated)

    keep = Keep(config, rows=[{"prompt": "1+1", "completion": "2", "kind": "chat"}],
                progress=False)
    keep.chat = False
    (chat_row,) = keep.tokenized(tok)
    assert chat_row["input_ids"] == list(tok.apply_chat_template(
        [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}],
        tokenize=True, return_dict=False))


def test_ending_share_asks_other_sentences_with_the_task_prompts_ending():
    """``ending_share`` turns task-shaped prompts into generic openings that must reach
    the ending the task's prompts share (" is"), instead of the task's template."""
    import random

    from secura_plugins.keep.rehearsal import _OPENINGS, _prompt_batch

    tok = build_tokenizer()
    prompts = ["The capital of Velmaland is", "The capital of Zorvia is", "The capital of Ub is"]

    def batch(share: float):
        config = KeepConfig(batch_size=32, ending_share=share)
        return _prompt_batch(random.Random(0), ["task"], {"task": 32}, prompts, tok, config)

    template, ending = batch(0.0), batch(1.0)
    assert all(p.startswith("The capital of") for _, p, _, _ in template)
    # (a prompt drawn twice shares no varying part: no ending, so its template is kept)
    assert all(p in _OPENINGS for _, p, _, e in ending if e == " is")
    assert sum(p in _OPENINGS for _, p, _, _ in ending) > len(ending) // 2
    half = [p in _OPENINGS for _, p, _, _ in batch(0.5)]
    assert 0 < sum(half) < len(half)
    with pytest.raises(Exception, match="keep.ending_share"):
        KeepConfig(ending_share=1.5)
