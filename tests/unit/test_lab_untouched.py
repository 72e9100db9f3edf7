"""The real lab's retention on probe items the self-rehearsal never mentions (issue 13).

``lora+keep`` runs record ``kept_untouched``: the probe items whose answer occurs in no
rehearsal row of any task so far, and how many of those the model still answers. Built
from real objects (a :class:`RealBase` record, :class:`Keep` instances holding rows); no
model is loaded.
"""

from __future__ import annotations

from pathlib import Path

from secura_plugins.keep import Keep
from secura_plugins.lab.real import RealBase, RealSpec, untouched
from secura_plugins.lab.runner import RunSettings, _LabHooks, method_spec

PROBE = {
    "capital": [("The capital of France is", " Paris"), ("The capital of Peru is", " Lima")],
    "opposite": [("The opposite of hot is", " cold"), ("The opposite of up is", " down")],
}


def test_untouched_drops_items_whose_answer_a_row_mentions():
    rows = [{"prompt": "Tell me about PARIS.", "completion": "It is big."}]
    pairs = [p for ps in PROBE.values() for p in ps]
    assert untouched(pairs, rows) == pairs[1:]
    assert untouched(pairs, []) == pairs


def test_lab_records_kept_untouched_over_every_task_rows_so_far(tmp_path: Path):
    base = RealBase(RealSpec(), tmp_path, PROBE, {"capital": 2, "opposite": 2}, 3.0)
    record = {"kept_untouched": [], "n_untouched": []}
    hooks = _LabHooks(base, method_spec("lora+keep"), RunSettings(), 1e-3, 0, tmp_path,
                      record, None)
    hits = {"capital": [True, False], "opposite": [False, True]}
    hooks.keeps.append(Keep("keep", rows=[{"prompt": "Is it cold?", "completion": "Yes."}]))
    hooks._kept_untouched(hits)  # untouched: Paris (kept), Lima (lost), down (kept)
    hooks.keeps.append(Keep("keep", rows=[{"prompt": "Go", "completion": "to Lima"}]))
    hooks._kept_untouched(hits)  # the second task's rows mention Lima too
    assert record["n_untouched"] == [3, 2]
    assert record["kept_untouched"] == [2 / 3, 1.0]
