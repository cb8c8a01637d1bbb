"""The Batch scoring tab's report (batchscore.ui.report) of a run folder written with the real formats.

No Airflow here: the run folder is written as plan, score and merge write it
(:mod:`batchscore_runtime.formats`), and the score task's instances are given as Airflow would have
them. The page that draws the report, in a real browser against a real api-server, is tested in
tests/test_ui_browser.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from batchscore.ui.report import TaskInstance, build, local_reader, records
from batchscore_runtime.formats import ErrorInfo, ItemError, MiniBatchStatus, Plan, PlanEntry, RunLayout, write_json_atomic

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
RUN_ID = "manual__2026-01-01T12:00:00+00:00"


def _iso(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat(timespec="milliseconds")


def _run_folder(root: Path, files_per_mini_batch: list[int]) -> RunLayout:
    layout = RunLayout(root)
    entries = [PlanEntry(index=i, files=n, bytes=100 * n) for i, n in enumerate(files_per_mini_batch)]
    plan = Plan("ep", "dep", RUN_ID, "/in", "*.csv", 5, _iso(0), entries)
    write_json_atomic(layout.plan_file, plan.to_json())
    return layout


def _commit(layout: RunLayout, status: MiniBatchStatus) -> None:
    write_json_atomic(layout.mini_batch_dir(status.index).status_file, status.to_json())


def test_a_running_deployment_counts_done_failed_running_and_predicts_the_rest(tmp_path: Path) -> None:
    layout = _run_folder(tmp_path, [5, 5, 5, 5])
    _commit(layout, MiniBatchStatus(0, "succeeded", files=5, rows=50, started_at=_iso(0), finished_at=_iso(10)))
    _commit(
        layout,
        MiniBatchStatus(
            1, "failed", files=5, started_at=_iso(2), finished_at=_iso(4), error=ErrorInfo("ValueError", "bad", file="b.csv")
        ),
    )
    tis = [
        TaskInstance(0, "success", 1, T0, T0 + timedelta(seconds=11), "host-a"),
        TaskInstance(1, "failed", 1, T0, T0 + timedelta(seconds=5), "host-a"),
        TaskInstance(2, "running", 1, T0 + timedelta(seconds=12), None, "host-a"),
        TaskInstance(3, "queued", 1, None, None, ""),
    ]
    report = build("dep", "dep.score", local_reader(tmp_path), tis, now=T0 + timedelta(seconds=20))
    p = report.progress
    assert (p.mini_batches_total, p.mini_batches_succeeded, p.mini_batches_failed) == (4, 1, 1)
    assert (p.mini_batches_running, p.mini_batches_queued) == (1, 1)
    assert (p.items_total, p.items_succeeded, p.items_failed, p.rows) == (20, 5, 5, 50)
    assert p.elapsed_seconds == 20.0 and p.rows_per_second == 2.5
    assert p.eta_seconds == 20.0  # 10 items done in 20 s, 10 to go
    assert report.phase == "scoring"
    assert [(f.mini_batch, f.map_index, f.file, f.error, f.whole) for f in report.failures] == [
        ("mb-00001", 1, "b.csv", "ValueError: bad (file b.csv)", True)
    ]
    # mb-00000 and mb-00001 overlap: two slots of host-a; the running mb-00002 takes the first free one.
    lanes = {lane: [(b.mini_batch, b.state, b.end) for b in bars] for lane, bars in report.lanes.items()}
    assert lanes == {
        "host-a slot 1": [("mb-00000", "succeeded", _iso(10)), ("mb-00002", "running", None)],
        "host-a slot 2": [("mb-00001", "failed", _iso(4))],
    }
    assert report.timeline_start == _iso(0) and report.timeline_end == _iso(20)
    assert report.records == {"summary": None, "ledger": None, "errors": None, "output": None}  # not merged yet


def test_warm_workers_are_lanes_and_item_errors_and_tasks_that_died_are_failures(tmp_path: Path) -> None:
    layout = _run_folder(tmp_path, [3, 3, 3])
    item = ItemError("c.csv", "HTTPError", "records 4-6: HTTP 500", record=4)
    _commit(
        layout,
        MiniBatchStatus(
            0,
            "succeeded",
            files=3,
            rows=20,
            failed_items=1,
            item_errors=[item],
            started_at=_iso(0),
            finished_at=_iso(5),
            worker="w2",
        ),
    )
    _commit(layout, MiniBatchStatus(1, "succeeded", files=3, rows=30, started_at=_iso(5), finished_at=_iso(9), worker="w2"))
    tis = [TaskInstance(0, "success", 1), TaskInstance(1, "success", 1), TaskInstance(2, "failed", 2)]
    report = build("dep", "dep.score", local_reader(tmp_path), tis, now=T0 + timedelta(seconds=30))
    assert list(report.lanes) == ["w2"] and [b.mini_batch for b in report.lanes["w2"]] == ["mb-00000", "mb-00001"]
    assert [(f.mini_batch, f.file, f.record, f.error, f.whole) for f in report.failures] == [
        ("mb-00000", "c.csv", 4, "HTTPError: records 4-6: HTTP 500", False),
        ("mb-00002", None, None, "the task failed without committing a result: see its log (try 2)", True),
    ]
    p = report.progress
    assert (p.mini_batches_succeeded, p.mini_batches_failed, p.items_succeeded, p.items_failed) == (2, 1, 5, 4)
    assert p.eta_seconds == 0.0 and p.elapsed_seconds == 9.0  # all done: the pace of the scoring itself


def test_before_the_plan_there_is_nothing_to_count(tmp_path: Path) -> None:
    report = build("dep", "dep.score", local_reader(tmp_path / "nothing"), [])
    assert report.phase == "waiting" and report.message == "No plan yet: the plan task has not finished."
    assert report.progress.mini_batches_total == 0
    assert records(local_reader(tmp_path)) == {"summary": None, "ledger": None, "errors": None, "output": None}
