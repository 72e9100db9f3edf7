"""The continual-learning lab (issue 5): a CI-sized run through the real SFTTrainer path,
plus unit tests of its data, metrics and learning-rate rule. The lab on the real model is
in ``tests/e2e/test_real_lab.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from secura_plugins.errors import SecuraConfigError
from secura_plugins.lab import BaseSpec, LabConfig, pretrain_base, run_lab
from secura_plugins.lab.bench import _pick_lrs
from secura_plugins.lab.data import TASKS, copy_pairs, knowledge_pairs, task_pairs
from secura_plugins.lab.report import mean_sd, summarize

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def lab_cache(tmp_path_factory):
    # Shared with tests/integration/test_cli.py's demo test: the same quick base is pretrained once.
    return tmp_path_factory.getbasetemp() / "lab-cache"


@pytest.fixture(scope="module")
def quick_lab(lab_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("lab")
    cfg = LabConfig.quick(methods=["lora", "secura"], out=str(out), cache_dir=str(lab_cache))
    return cfg, run_lab(cfg, progress=False)


def test_quick_lab_writes_measured_results(quick_lab):
    cfg, result = quick_lab
    out = cfg.out
    on_disk = json.loads(Path(out, "results.json").read_text())
    assert on_disk["summary"] == json.loads(json.dumps(result["summary"]))
    # The base learned its knowledge to the target in the quick config.
    assert result["base"]["recall"] >= cfg.base.recall_target
    assert [r["method"] for r in result["runs"]] == ["lora", "secura"]
    n = len(cfg.tasks)
    for run in result["runs"]:
        m = run["matrix"]
        assert len(m) == n and all(len(row) == n for row in m)
        for i in range(n):  # lower triangle measured, upper triangle never trained on
            assert all(0.0 <= m[i][j] <= 1.0 for j in range(i + 1))
            assert all(m[i][j] is None for j in range(i + 1, n))
        # retention is the measured probe score over the measured base score
        assert run["base_probe"] == pytest.approx(result["base"]["recall"])
        assert run["retention"] == pytest.approx([p / run["base_probe"] for p in run["probe"]])
        assert len(run["step_seconds"]) == n and all(s > 0 for s in run["step_seconds"])
        assert run["trainable_params"] > 0 and run["state_mib"] > 0
    lora, secura = result["runs"]
    assert secura["trainable_params"] < lora["trainable_params"]  # r x k cores vs LoRA
    # Training happened: untrained, both methods would still be the base model (exact
    # start), with probe scores equal to the base's and identical records.
    assert any(p != run["base_probe"] for run in result["runs"] for p in run["probe"])
    assert (lora["matrix"], lora["probe"]) != (secura["matrix"], secura["probe"])
    assert abs(lora["train_loss"][0] - secura["train_loss"][0]) > 1e-3
    table = Path(out, "table.md").read_text()
    assert "| lora |" in table and "| secura |" in table
    for name in ("retention.png", "frontier.png"):
        data = Path(out, name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000


def test_rerun_reuses_base_and_runs(quick_lab, lab_cache):
    cfg, first = quick_lab
    assert pretrain_base(cfg.base, cache_dir=lab_cache, progress=False).cached
    again = run_lab(cfg, progress=False)
    assert again["runs"] == json.loads(json.dumps(first["runs"]))  # loaded, not retrained


def test_lr_sweep_picks_the_gentlest_matching_rate(lab_cache, tmp_path):
    cfg = LabConfig.quick(
        methods=["lora"], tasks=1, sweep=True, out=str(tmp_path), cache_dir=str(lab_cache)
    )
    result = run_lab(cfg, progress=False)
    assert [s["lr"] for s in result["sweep"]] == list(cfg.lr_grid)
    assert result["lrs"]["lora"] == _pick_lrs(result["sweep"], cfg.match)["lora"]
    # the rates really trained: the records differ from one rate to the next
    outcomes = {(s["learning_accuracy"], s["retention"]) for s in result["sweep"]}
    assert len(outcomes) > 1, result["sweep"]


def test_keep_variant_of_a_lab_method_rehearses_and_anchors(lab_cache, tmp_path):
    """``<method>+keep`` runs the keep tools (the base's self-rehearsal + the KL anchor to
    the base) inside the lab's task loop: the KL is measured while training, the mixed
    data change the run, and a method without an adapter is refused."""
    from secura_plugins.lab.runner import RunSettings, method_spec, run_sequence

    base = pretrain_base(LabConfig.quick().base, cache_dir=lab_cache, progress=False)
    spec = method_spec("lora+keep")
    assert (spec.keep, spec.family) == ("keep", "lora+keep")  # its own learning rate
    assert spec.adapter == method_spec("lora").adapter
    settings = RunSettings(steps=4, n_train=32, n_eval=8)
    run = {"tasks": ["first", "up"], "lr": 1e-2, "settings": settings, "work_dir": tmp_path}
    kept = run_sequence(base, spec, **run)
    plain = run_sequence(base, method_spec("lora"), **run)
    assert kept["method"] == "lora+keep" and "keep_kl" not in plain
    assert len(kept["keep_kl"]) == 2 and all(v is not None and v > 0 for v in kept["keep_kl"])
    # the rows the base wrote for each task are on record, by kind ("task" / "generic")
    assert len(kept["keep_rows"]) == 2 and "keep_rows" not in plain
    assert all(sum(n.values()) > 0 and set(n) <= {"task", "generic", "text", "chat"}
               for n in kept["keep_rows"]), kept["keep_rows"]
    assert kept["train_loss"] != plain["train_loss"]  # rehearsal rows were trained on
    with pytest.raises(SecuraConfigError, match="keep needs an adapter"):
        method_spec("full+keep")


def test_sclora_keep_preserves_the_rehearsal_and_alphas_rescale(lab_cache, tmp_path, monkeypatch):
    """``sclora+keep`` gets its preserve side from the base's own rehearsal rows (written
    before the adapter exists, then trained on as the first task's rehearsal), not from
    the probe; ``alphas`` measures the final model scaled and leaves it as trained."""
    from secura_plugins.keep import Keep
    from secura_plugins.lab.runner import RunSettings, method_spec, run_sequence

    base = pretrain_base(LabConfig.quick().base, cache_dir=lab_cache, progress=False)
    seen: list[tuple[int, int]] = []
    real_negative = Keep.negative_batches

    def spy(self, tokenizer, batch_size=8):
        seen.append((id(self), len(self.rows or [])))
        return real_negative(self, tokenizer, batch_size)

    monkeypatch.setattr(Keep, "negative_batches", spy)
    settings = RunSettings(steps=3, n_train=16, n_eval=8)
    run = {"tasks": ["first"], "lr": 1e-2, "settings": settings, "work_dir": tmp_path}
    rec = run_sequence(base, method_spec("sclora+keep", {"rehearsal": 8}), alphas=(0.0001, 1.0),
                       **run)
    assert len(seen) == 1 and seen[0][1] > 0  # one Keep wrote rows, and they calibrated
    assert rec["steps"] == [3]
    assert rec["keep"] == {"preset": "keep", "rehearsal": 8}
    scaled, same = rec["alphas"]["0.0001"], rec["alphas"]["1.0"]
    # alpha 1 re-measures the trained model; alpha ~0 is (almost) the base: all kept.
    assert same["accuracy"] == [rec["matrix"][0][0]] and same["retention"] == rec["retention"][-1]
    assert scaled["retention"] == pytest.approx(1.0, abs=0.05)
    equal = dict(run, settings=RunSettings(steps=3, n_train=16, n_eval=8,
                                           keep_equal_task_rows=True))
    # ratio 0.5: twice the steps, so as many task rows as a method without rehearsal
    assert run_sequence(base, method_spec("lora+keep", {"rehearsal": 4}), **equal)["steps"] == [6]
    assert run_sequence(base, method_spec("lora"), **equal)["steps"] == [3]
    with pytest.raises(SecuraConfigError, match="alphas"):
        LabConfig.quick(alphas=(0.0,))
    with pytest.raises(SecuraConfigError, match="keep.kl_mod"):
        method_spec("lora+keep", {"kl_mod": "cached"})


def test_pick_lrs_rule():
    sweep = [
        {"family": "a", "lr": 1e-3, "learning_accuracy": 0.5},
        {"family": "a", "lr": 1e-2, "learning_accuracy": 1.0},
        {"family": "b", "lr": 1e-3, "learning_accuracy": 0.95},
        {"family": "b", "lr": 1e-2, "learning_accuracy": 0.99},
        {"family": "c", "lr": 1e-3, "learning_accuracy": 0.1},
        {"family": "c", "lr": 1e-2, "learning_accuracy": 0.3},
    ]
    # b reaches 0.9 x best at its smallest rate; c never does and gets its best rate
    assert _pick_lrs(sweep, 0.9) == {"a": 1e-2, "b": 1e-3, "c": 1e-2}


def test_summary_mean_and_spread():
    runs = [
        {
            "method": "m",
            "lr": 0.1,
            "seed": s,
            "trainable_params": 10,
            "avg_accuracy": a,
            "learning_accuracy": a,
            "bwt": 0.0,
            "forgetting": 0.0,
            "state_mib": 1.0,
            "retention": [1.0, r],
            "step_seconds": [0.1, 0.3],
        }
        for s, (a, r) in enumerate([(0.4, 0.8), (0.6, 0.6)])
    ]
    (row,) = summarize(runs, ["m", "absent"])
    assert row["avg_accuracy"][0] == pytest.approx(0.5)
    assert row["retention"] == pytest.approx(mean_sd([0.8, 0.6]))
    assert row["min_retention"][0] == pytest.approx(0.7)
    assert row["step_seconds"] == pytest.approx(0.2) and row["seeds"] == 2
    with pytest.raises(ValueError):
        mean_sd([])


def test_data_is_deterministic_and_tasks_distinct():
    assert task_pairs("up", 5, seed=3) == task_pairs("up", 5, seed=3)
    assert task_pairs("up", 5, seed=3) != task_pairs("up", 5, seed=4)
    word = "abcd"
    outputs = {tag: fn(word) for tag, fn in TASKS.items()}
    assert len(set(outputs.values())) == len(TASKS)  # 16 different transforms
    facts = knowledge_pairs(50)
    assert len({p for p, _ in facts}) == 150  # unique prompts: 50 facts + 100 sums
    held_out = {p for p, _ in copy_pairs(20, seed=-1)}
    assert not held_out & {p for p, _ in copy_pairs(200, seed=0)}
    assert BaseSpec().key() != BaseSpec(n_facts=10).key()


def test_config_errors_name_the_field():
    with pytest.raises(SecuraConfigError, match="methods"):
        LabConfig(methods=["lorra"])
    with pytest.raises(SecuraConfigError, match="tasks"):
        LabConfig(tasks=["nope"])
    with pytest.raises(ValueError, match="tasks"):
        LabConfig(tasks=17)
    # a rate keyed by a method, not its family, was ignored: lora+replay ran at 1e-3
    with pytest.raises(SecuraConfigError, match="lrs: 'lora\\+replay'.* give lora=LR"):
        LabConfig(methods=["lora+replay"], lrs={"lora+replay": 3e-3})
    with pytest.raises(SecuraConfigError, match="lr_grid: 'dora'.*families: lora, lora\\+keep"):
        LabConfig(methods=["lora", "lora+keep"], lr_grid={"dora": (1e-3,)})
    assert LabConfig(methods=["lora+replay"], lrs={"lora": 3e-3}).lr_for("lora") == 3e-3


def test_bench_command(lab_cache, tmp_path, capsys):
    from secura_plugins.cli import main

    code = main(
        [
            "bench",
            "--quick",
            "--tasks",
            "1",
            "--methods",
            "lora",
            "--seeds",
            "0",
            "--cache-dir",
            str(lab_cache),
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "| lora |" in out and (tmp_path / "results.json").is_file()
    assert main(["bench", "--methods", "nope", "--out", str(tmp_path)]) == 2
