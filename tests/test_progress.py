"""One overall progress over the stages of a long call: monotonic, with stage names and an ETA."""
from __future__ import annotations

import io

import pytest

from napari_stofm.progress import OVERALL_TOTAL, StagedProgress, TextProgress, format_duration, staged


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _collect():
    seen = []
    return seen, lambda done, total, message="": seen.append((done, total, message))


def test_stages_whose_reports_restart_make_one_monotonic_bar():
    seen, callback = _collect()
    clock = Clock()
    overall = StagedProgress(callback, [("Embedding", 6.0, (("Cell embeddings", 0.5), ("SE(2)", 0.5))),
                                        ("Regions", 2.0), ("Cell types", 2.0)], clock=clock)
    embed = overall.stage("Embedding")
    for step in ("Cell embeddings", "SE(2) transformer"):  # each step counts from 0 again
        for done in range(0, 11):
            clock.now += 0.5
            embed(done, 10, step)
    regions = overall.stage("Regions")
    for done in range(6):
        clock.now += 0.5
        regions(done, 5, "micro-clusters")
    clock.now += 3
    overall.begin("Cell types", "fitting")
    overall.finish()
    dones = [d for d, _, _ in seen]
    assert all(t == OVERALL_TOTAL for _, t, _ in seen)
    assert dones == sorted(dones) and dones[-1] == OVERALL_TOTAL
    # the shares follow the weights: the embedding ends at 60 %, the regions at 80 %
    assert max(d for d, _, m in seen if m.startswith("Embedding")) == pytest.approx(600, abs=1)
    assert max(d for d, _, m in seen if m.startswith("Regions")) == pytest.approx(800, abs=1)
    # the message names the stage and its step, then the time left
    assert any(m.startswith("Embedding: SE(2) transformer (5/10), ") and m.endswith(" left") for _, _, m in seen)
    assert seen[-1][2] == "done"


def test_a_late_report_of_a_closed_stage_never_moves_the_bar_back():
    seen, callback = _collect()
    overall = StagedProgress(callback, [("A", 1.0), ("B", 1.0)])
    overall.stage("A")(1, 2)
    overall.stage("B")(1, 2)
    before = overall.fraction
    overall.stage("A")(0, 2)  # late, from a stage already closed
    assert overall.fraction == before
    assert [d for d, _, _ in seen] == sorted(d for d, _, _ in seen)


def test_an_earlier_step_reporting_again_holds_the_bar():
    overall = StagedProgress(None, [("Embedding", 1.0, (("Cell", 0.5), ("SE(2)", 0.5)))])
    cb = overall.stage("Embedding")
    cb(5, 10, "SE(2)")
    held = overall.fraction
    cb(10, 10, "Cell embeddings (cached)")
    assert overall.fraction == held == pytest.approx(0.75)


def test_stages_not_reported_are_skipped_and_weights_of_future_stages_can_change():
    seen, callback = _collect()
    overall = StagedProgress(callback, [("load", 1.0), ("embed", 1.0), ("labels", 1.0)])
    overall.add("territories", 1.0, final=True)
    overall.add("reference", 1.0)  # declared later: runs before the final stage
    assert [s.name for s in overall._stages] == ["load", "embed", "labels", "reference", "territories"]
    overall.begin("load")  # a fifth of the bar: its share is fixed once it begins
    overall.set_weight("territories", 0.0)
    overall.remove("reference")
    overall.begin("labels")  # 'embed' was never reported: closed with no share
    assert overall.fraction == pytest.approx(0.2)
    overall.stage("labels")(1, 2)  # what is left goes to 'labels' ('territories' now weighs 0)
    assert overall.fraction == pytest.approx(0.6)


def test_undeclared_stage_goes_before_the_final_one():
    overall = StagedProgress(None, [("A", 1.0)])
    overall.add("Z", 1.0, final=True)
    overall.stage("A")(1, 1)
    overall.stage("surprise")(1, 2)
    assert [s.name for s in overall._stages] == ["A", "surprise", "Z"]
    assert 0.5 < overall.fraction < 1.0


def test_eta_ignores_work_that_took_no_time_and_waits_for_enough():
    clock = Clock()
    overall = StagedProgress(None, [("cached", 1.0), ("slow", 1.0)], clock=clock)
    overall.stage("cached")(1, 1, "cached")  # done at once: nothing to learn from
    assert overall.eta_seconds() is None
    clock.now = 10.0
    overall.stage("slow")(1, 4)  # a quarter of the slow half took 10 s
    assert overall.eta_seconds() == pytest.approx(10.0 * 0.375 / 0.125)


def test_format_duration():
    assert format_duration(3) == "a few seconds"
    assert format_duration(42) == "about 40 s"
    assert format_duration(170) == "about 3 min"
    assert format_duration(3900) == "about 1 h 5 min"


def test_staged_reuses_a_staged_progress_and_wraps_a_callback():
    overall = StagedProgress(None)
    assert staged(overall) == (overall, False)
    assert staged(None) == (None, False)
    wrapped, owned = staged(lambda *a: None)
    assert isinstance(wrapped, StagedProgress) and owned


def test_text_progress_shows_the_overall_percentage():
    out = io.StringIO()
    bar = TextProgress(out, min_interval=0)
    bar(250, OVERALL_TOTAL, "Embedding the slice: Cell embeddings (10/40), about 20 s left")
    bar(OVERALL_TOTAL, OVERALL_TOTAL, "done")
    text = out.getvalue()
    assert " 25% Embedding the slice: Cell embeddings (10/40), about 20 s left" in text
    assert "100% done" in text and text.endswith("\n")
