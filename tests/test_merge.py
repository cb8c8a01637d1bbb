"""merge: results in plan order, every output format, the ledger, the errors file, the thresholds."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchscore.errors import MergeError, PlanError, ThresholdExceededError
from batchscore.merge import merge_run
from batchscore.plan import plan_run, run_layout
from batchscore_runtime.formats import (
    ErrorInfo,
    ItemCounts,
    ItemError,
    MiniBatchCounts,
    MiniBatchStatus,
    RenamedOutput,
    Summary,
    atomic_path,
    write_json_atomic,
)
from batchscore_runtime.worker_state import WorkerState
from tests.helpers import deployment_file, load, write

RUN = "manual__1"


@pytest.fixture()
def make_run(tmp_path: Path):
    """A planned run of 4 files in mini-batches of 2 (so 2 mini-batches), with a way to commit results."""
    (tmp_path / "model").mkdir()
    write(tmp_path / "code" / "score.py", "def run(mb):\n    return mb\n")
    for i in range(4):
        write(tmp_path / "in" / f"f{i}.csv", "x\n")

    def make(output_file_name: str = "predictions.csv", **settings):
        path = deployment_file(
            tmp_path / "yaml",
            model=tmp_path / "model",
            code=tmp_path / "code",
            inputs=tmp_path / "in",
            settings={"mini_batch_size": 2, "output_file_name": output_file_name, **settings},
        )
        d = load(path).deployments[0]
        plan_run("ep", d, RUN)
        return d

    return make


def commit(d, index: int, table: pa.Table | None, error: str | None = None, **status) -> None:
    """Commit mini-batch ``index``'s result as the runtime would: ``table``, or a failure."""
    mb_dir = run_layout(d, RUN).mini_batch_dir(index)
    mb_dir.path.mkdir(parents=True, exist_ok=True)
    if table is None:
        mb_dir.commit(
            MiniBatchStatus(index=index, state="failed", files=2, attempt=2, error=ErrorInfo("ValueError", error or "x"))
        )
        return
    name = mb_dir.new_result_name()
    with atomic_path(mb_dir.path / name) as tmp:
        pq.write_table(table, tmp)
    status = {"failed_items": max(0, 2 - table.num_rows), **status}
    mb_dir.commit(
        MiniBatchStatus(
            index=index,
            state="succeeded",
            files=2,
            rows=table.num_rows,
            result_file=name,
            run_seconds=0.5,
            started_at="2026-11-21T10:00:00+00:00",
            finished_at="2026-11-21T10:00:02+00:00",
            **status,
        )
    )


def test_results_are_concatenated_in_plan_order_with_a_header(make_run) -> None:
    d = make_run()
    commit(d, 1, pa.table({"id": [3, 4], "p": ["c", "d"]}))  # committed first, merged second
    commit(d, 0, pa.table({"id": [1, 2], "p": ["a", "b"]}))

    summary = merge_run("ep", d, RUN)

    out = run_layout(d, RUN).root / "predictions.csv"
    assert out.read_text() == '"id","p"\n1,"a"\n2,"b"\n3,"c"\n4,"d"\n'
    assert summary.status == Summary.SUCCEEDED and summary.rows == 4
    assert summary.mini_batches == MiniBatchCounts(total=2, succeeded=2, failed=0, missing=0)
    assert summary.durations.run_seconds_total == 1.0
    assert summary.durations.scoring_wall_seconds == 2.0
    assert Summary.read(run_layout(d, RUN).summary_file) == summary
    assert not list(out.parent.glob(".*.tmp"))  # no temporary file left behind


def test_the_summary_file_keeps_its_keys_and_reads_back_as_a_summary(make_run) -> None:
    # summary.json is read by users and their tools: its keys are those it had before it had a type.
    d = make_run(output_action="summary_only")
    commit(d, 0, pa.table({"x": [1, 2]}))
    worker = WorkerState("w1", WorkerState.READY, init_seconds=0.5, mini_batches=["mb-00000"])
    write_json_atomic(run_layout(d, RUN).workers_dir / "w1" / "state.json", worker.to_json())
    summary = merge_run("ep", d, RUN)
    path = run_layout(d, RUN).summary_file
    data = json.loads(path.read_text())
    assert list(data) == [
        "endpoint",
        "deployment",
        "run_id",
        "status",
        "run_folder",
        "output",
        "error",
        "contract",
        "worker_mode",
        "warm_workers",
        "output_action",
        "output_layout",
        "ledger",
        "errors",
        "input",
        "mini_batch_size",
        "mini_batches",
        "items",
        "rows",
        "returned_elements",
        "custom_outputs",
        "thresholds",
        "durations",
        "rows_per_second",
        "rows_per_run_second",
        "failures",
        "planned_at",
        "merged_at",
        "version",
        "busy_fraction",  # added since: keys are added last
        "model",
    ]
    assert data["warm_workers"] == [
        {
            "worker": "w1",
            "state": "ready",
            "init_seconds": 0.5,
            "processes": 1,
            "mini_batches": ["mb-00000"],
            "error": None,
            "busy_seconds": 0.0,
            "first_started_at": "",
            "last_ended_at": "",
        }
    ]
    assert list(data["input"]) == ["path", "pattern", "files", "bytes"]
    assert data["mini_batches"] == {"total": 2, "succeeded": 1, "failed": 0, "missing": 1}
    assert data["items"] == {"total": 4, "succeeded": 2, "failed": 2}
    assert data["custom_outputs"] == {"files": 0, "renamed": []}
    assert data["thresholds"]["error_threshold"] == {"limit": -1, "observed": 2, "exceeded": False}
    assert list(data["durations"]) == [
        "first_mini_batch_started_at",
        "last_mini_batch_finished_at",
        "scoring_wall_seconds",
        "init_seconds_total",
        "run_seconds_total",
        "merge_seconds",
    ]
    assert data["failures"] == [
        {
            "mini_batch": "mb-00001",
            "reason": "missing",
            "error": "no result was committed (the task failed or never ran)",
            "files": 2,
        }
    ]
    assert data == summary.to_json() and Summary.from_json(data) == summary
    # A summary written before the busy fraction reads back, without one.
    older = {k: v for k, v in data.items() if k != "busy_fraction"}
    older["warm_workers"] = [{k: v for k, v in w.items() if k in ("worker", "state", "init_seconds", "processes",
                             "mini_batches", "error")} for w in data["warm_workers"]]  # fmt: skip
    assert Summary.from_json(older).busy_fraction is None
    assert Summary.from_json(older).warm_workers[0].busy_seconds == 0.0
    del data["version"]  # a summary written before the key was added reads as version 1
    assert Summary.from_json(data) == summary
    with pytest.raises(ValueError, match="summary file has format version 2, this batchscore reads version 1"):
        Summary.from_json({**data, "version": 2})
    renamed = {"files": 1, "renamed": [{"mini_batch": "mb-00001", "from": "a.txt", "to": "a-mb-00001.txt"}]}
    assert Summary.from_json({**data, "custom_outputs": renamed}).to_json()["custom_outputs"] == renamed
    assert Summary.read(path.with_name("nothing.json")) is None


@pytest.mark.parametrize("name", ["predictions.parquet", "predictions.jsonl"])
def test_parquet_and_json_lines_outputs_unify_differing_columns(make_run, name: str) -> None:
    d = make_run(name)
    commit(d, 0, pa.table({"id": [1, 2], "score": [0.5, 0.25]}))
    commit(d, 1, pa.table({"id": [3, 4], "label": ["x", "y"]}))

    merge_run("ep", d, RUN)

    out = run_layout(d, RUN).root / name
    frame = pd.read_parquet(out) if name.endswith(".parquet") else pd.read_json(out, lines=True)
    assert list(frame.columns) == ["id", "score", "label"]
    assert frame["id"].tolist() == [1, 2, 3, 4]
    assert frame["label"].isna().tolist() == [True, True, False, False]


def test_failures_within_the_default_thresholds_succeed_and_are_recorded(make_run) -> None:
    d = make_run()  # Azure's defaults: error_threshold -1, mini_batch_error_threshold -1, allowed_failed_percent 100
    commit(d, 0, None, "bad row 7")  # mini-batch 1 never committed anything

    summary = merge_run("ep", d, RUN)

    root = run_layout(d, RUN).root
    assert summary.status == Summary.SUCCEEDED_WITH_FAILURES
    assert summary.mini_batches == MiniBatchCounts(total=2, succeeded=0, failed=1, missing=1)
    assert summary.items == ItemCounts(total=4, succeeded=0, failed=4)
    assert [f.mini_batch for f in summary.failures] == ["mb-00000", "mb-00001"]
    assert Summary.read(root / "summary.json") == summary
    assert pd.read_csv(root / "errors.csv", keep_default_na=False).values.tolist() == [
        ["mb-00000", "f0.csv", "", "ValueError", "bad row 7"],
        ["mb-00000", "f1.csv", "", "ValueError", "bad row 7"],
        ["mb-00001", "f2.csv", "", "NoResult", "no result was committed (the task failed or never ran)"],
        ["mb-00001", "f3.csv", "", "NoResult", "no result was committed (the task failed or never ran)"],
    ]

    commit(d, 0, pa.table({"id": [1, 2]}))  # the reruns succeed: the merge converges
    commit(d, 1, pa.table({"id": [3, 4]}))
    assert merge_run("ep", d, RUN).status == Summary.SUCCEEDED
    assert (root / "predictions.csv").read_text() == '"id"\n1\n2\n3\n4\n'
    assert (root / "errors.csv").read_text() == "mini_batch,file,record,error_type,message\n"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"error_threshold": 2}, "error_threshold exceeded: 3 items failed, 2 allowed (1 over)"),
        ({"mini_batch_error_threshold": 0}, "mini_batch_error_threshold exceeded: 1 mini-batches failed, 0 allowed (1 over)"),
        (
            {"allowed_failed_percent": 25},
            "allowed_failed_percent exceeded: 50% of mini-batches failed (1 of 2), 25% allowed (25 points over)",
        ),
    ],
)
def test_each_threshold_exceeded_fails_the_job_after_writing_everything(make_run, settings, message) -> None:
    d = make_run(**settings)
    commit(d, 0, None, "bad row 7")  # 2 failed items
    commit(d, 1, pa.table({"file": ["f2.csv"]}), item_errors=[ItemError("f3.csv", "NoResult", "no row")])  # 1 more

    with pytest.raises(ThresholdExceededError) as info:
        merge_run("ep", d, RUN)

    root = run_layout(d, RUN).root
    assert str(info.value) == (
        f"{message}. The output, summary.json, processed_mini-batches.csv and errors.csv (one line per failed "
        f"item) are in {root}; clear the failed score instances in Airflow to rerun them, and the merge runs again."
    )
    summary = Summary.read(root / "summary.json")
    assert summary.status == Summary.FAILED and summary.items.failed == 3
    name = next(iter(settings))
    assert summary.thresholds[name].exceeded is True
    assert pd.read_csv(root / "predictions.csv")["file"].tolist() == ["f2.csv"]  # what succeeded is kept


@pytest.mark.parametrize(
    "settings",
    [{"error_threshold": 3}, {"mini_batch_error_threshold": 1}, {"allowed_failed_percent": 50}],
)
def test_each_threshold_not_exceeded_lets_the_job_succeed(make_run, settings) -> None:
    d = make_run(**settings)
    commit(d, 0, None, "bad row 7")
    commit(d, 1, pa.table({"file": ["f2.csv"]}), item_errors=[ItemError("f3.csv", "NoResult", "no row")])
    summary = merge_run("ep", d, RUN)
    assert summary.status == Summary.SUCCEEDED_WITH_FAILURES
    assert not any(t.exceeded for t in summary.thresholds.values())


def test_the_ledger_has_a_line_per_mini_batch(make_run) -> None:
    d = make_run()
    commit(d, 0, pa.table({"id": [1, 2]}), attempt=3, workers=2, init_seconds=0.25)
    commit(d, 1, None, "bad row 7")
    merge_run("ep", d, RUN)
    ledger = pd.read_csv(run_layout(d, RUN).root / "processed_mini-batches.csv", keep_default_na=False, dtype=str)
    assert ledger.columns.tolist() == [
        "mini_batch",
        "files",
        "bytes",
        "status",
        "attempts",
        "rows",
        "failed_items",
        "seconds",
        "init_seconds",
        "run_seconds",
        "workers",
        "worker",
        "started_at",
        "finished_at",
        "error",
    ]
    first, second = ledger.to_dict("records")
    assert first == {
        "mini_batch": "mb-00000",
        "files": "2",
        "bytes": "4",
        "status": "succeeded",
        "attempts": "3",
        "rows": "2",
        "failed_items": "0",
        "seconds": "2.0",
        "init_seconds": "0.25",
        "run_seconds": "0.5",
        "workers": "2",
        "worker": "",
        "started_at": "2026-11-21T10:00:00+00:00",
        "finished_at": "2026-11-21T10:00:02+00:00",
        "error": "",
    }
    assert (second["status"], second["attempts"], second["failed_items"], second["error"]) == (
        "failed",
        "2",
        "2",
        "ValueError: bad row 7",
    )


def test_azure_layout_has_no_header_and_separates_values_with_spaces(make_run) -> None:
    d = make_run("predictions.csv", output_layout="azure")
    commit(d, 0, pa.table({"file": ["f0.csv", "f1.csv"], "label": [1, 0], "p": [0.75, None]}))
    commit(d, 1, pa.table({"file": ["f2.csv", "f3.csv"], "label": [1, 1], "p": [0.5, 0.25]}))
    merge_run("ep", d, RUN)
    assert (run_layout(d, RUN).root / "predictions.csv").read_text() == (
        "f0.csv 1 0.75\nf1.csv 0 \nf2.csv 1 0.5\nf3.csv 1 0.25\n"
    )


def test_summary_only_writes_no_output_but_counts(make_run) -> None:
    d = make_run(output_action="summary_only")
    commit(d, 0, pa.table({"x": [1, 2]}))
    commit(d, 1, pa.table({"x": [3]}))
    summary = merge_run("ep", d, RUN)
    root = run_layout(d, RUN).root
    assert not (root / "predictions.csv").exists() and summary.output is None
    assert (summary.returned_elements, summary.items.failed) == (3, 1)


def test_custom_outputs_are_collected_without_clashes_and_a_re_merge_places_each_once(make_run) -> None:
    d = make_run(output_action="summary_only")
    layout = run_layout(d, RUN)
    for index in (0, 1):
        mb_dir = layout.mini_batch_dir(index)
        mb_dir.path.mkdir(parents=True)
        outputs = mb_dir.new_outputs_dir()
        write(outputs / "part.parquet", f"data {index}")
        write(outputs / f"own-{index}.txt", "x")
        write(outputs / "summary.json", "a script's own summary")  # clashes with the run's summary
        mb_dir.commit(
            MiniBatchStatus(index=index, state="succeeded", files=2, rows=2, outputs_dir=outputs.name, custom_outputs=3)
        )

    first = merge_run("ep", d, RUN)
    second = merge_run("ep", d, RUN)

    root = layout.root
    placed = sorted(p.name for p in root.iterdir() if p.is_file())
    assert placed == [
        "errors.csv",
        "own-0.txt",
        "own-1.txt",
        "part-mb-00001.parquet",
        "part.parquet",
        "processed_mini-batches.csv",
        "summary-mb-00000.json",
        "summary-mb-00001.json",
        "summary.json",
    ]
    assert (root / "part.parquet").read_text() == "data 0" and (root / "part-mb-00001.parquet").read_text() == "data 1"
    assert Summary.read(root / "summary.json").run_id == RUN
    assert first.custom_outputs.files == second.custom_outputs.files == 6
    assert RenamedOutput("mb-00001", "part.parquet", "part-mb-00001.parquet") in second.custom_outputs.renamed


def test_results_whose_column_types_clash_name_the_mini_batches(make_run) -> None:
    d = make_run()
    commit(d, 0, pa.table({"score": [1, 2]}))
    commit(d, 1, pa.table({"score": ["high", "low"]}))
    with pytest.raises(MergeError) as info:
        merge_run("ep", d, RUN)
    root = run_layout(d, RUN).root
    assert str(info.value) == (
        "the mini-batches' results cannot be put into one output: column 'score' is int64 in mb-00000 but "
        "string in mb-00001. Make run() return the same column types for every mini-batch (e.g. cast with "
        f"DataFrame.astype). The mini-batches' results are kept in {root / '_batchscore' / 'results'}; "
        f"summary.json, processed_mini-batches.csv and errors.csv are in {root}."
    )
    # The records are written all the same; no output that could be taken for this merge's.
    summary = Summary.read(root / "summary.json")
    assert summary.status == Summary.FAILED and summary.output is None
    assert summary.error.startswith("the mini-batches' results cannot be put into one output: column 'score'")
    assert (root / "processed_mini-batches.csv").is_file() and (root / "errors.csv").is_file()
    assert not (root / "predictions.csv").exists()


def test_merge_without_a_plan_says_so(make_run) -> None:
    d = make_run()
    with pytest.raises(PlanError) as info:
        merge_run("ep", d, "another-run")
    root = run_layout(d, "another-run").root
    assert str(info.value) == (
        f"run directory {root} has no plan ({root / '_batchscore' / 'plan.json'}); the plan task of run "
        "'another-run' did not finish, so there is nothing to merge"
    )


def test_dicts_and_lists_become_json_text_in_a_csv_output(make_run) -> None:
    d = make_run()
    commit(d, 0, pa.table({"file": ["f0.csv", "f1.csv"], "detail": [{"rank": 1}, {"rank": 2}], "tags": [[1], [2, 3]]}))
    commit(d, 1, pa.table({"file": ["f2.csv", "f3.csv"]}))
    merge_run("ep", d, RUN)
    out = pd.read_csv(run_layout(d, RUN).root / "predictions.csv", keep_default_na=False)
    assert out.to_dict("list") == {
        "file": ["f0.csv", "f1.csv", "f2.csv", "f3.csv"],
        "detail": ['{"rank": 1}', '{"rank": 2}', "", ""],
        "tags": ["[1]", "[2, 3]", "", ""],
    }


def test_a_mini_batch_without_rows_adds_no_columns(make_run) -> None:
    d = make_run()
    commit(d, 0, pa.table({"file": ["f0.csv", "f1.csv"]}))
    commit(d, 1, pa.table({"result": pa.array([], pa.null())}))  # run() returned an empty list
    merge_run("ep", d, RUN)
    assert list(pd.read_csv(run_layout(d, RUN).root / "predictions.csv").columns) == ["file"]


def test_errors_file_says_which_file_a_failed_mini_batch_raised_on(make_run) -> None:
    d = make_run()
    commit(d, 0, pa.table({"file": ["f0.csv", "f1.csv"]}))
    mb_dir = run_layout(d, RUN).mini_batch_dir(1)
    mb_dir.path.mkdir(parents=True, exist_ok=True)
    mb_dir.commit(
        MiniBatchStatus(index=1, state="failed", files=2, error=ErrorInfo("ParserError", "Expected 2 fields", file="f3.csv"))
    )
    summary = merge_run("ep", d, RUN)
    errors = pd.read_csv(run_layout(d, RUN).root / "errors.csv", keep_default_na=False)
    assert errors.values.tolist() == [
        ["mb-00001", "f2.csv", "", "ParserError", "Expected 2 fields (raised on f3.csv; failed with its mini-batch)"],
        ["mb-00001", "f3.csv", "", "ParserError", "Expected 2 fields"],
    ]
    assert summary.failures[0].error == "ParserError: Expected 2 fields (file f3.csv)"


def test_a_refused_link_in_a_failed_mini_batch_keeps_its_own_reason(make_run, tmp_path: Path) -> None:
    (tmp_path / "in" / "f3.csv").unlink()
    (tmp_path / "in" / "f3.csv").symlink_to(write(tmp_path / "host.csv", "x\n"))  # outside: refused by the plan
    d = make_run()
    commit(d, 0, pa.table({"file": ["f0.csv", "f1.csv"]}))
    commit(d, 1, None, "run() raised")
    merge_run("ep", d, RUN)
    errors = pd.read_csv(run_layout(d, RUN).root / "errors.csv", keep_default_na=False)
    assert errors.values.tolist() == [
        ["mb-00001", "f2.csv", "", "ValueError", "run() raised"],
        [
            "mb-00001",
            "f3.csv",
            "",
            "LinkRefused",
            (
                f"input file f3.csv is a symbolic link to {tmp_path / 'host.csv'}, outside input.path ({tmp_path / 'in'}); "
                "batchscore scores only files inside input.path: copy the file in or point input.path at its folder"
            ),
        ],
    ]
