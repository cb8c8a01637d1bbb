"""merge: results in plan order, every output format, and never a silent hole."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchscore.errors import IncompleteJobError, PlanError
from batchscore.merge import merge_run
from batchscore.plan import plan_run, run_layout
from batchscore_runtime.formats import ErrorInfo, MiniBatchStatus, atomic_path
from tests.helpers import deployment_file, load, write

RUN = "manual__1"


@pytest.fixture()
def make_run(tmp_path: Path):
    """A planned run of 4 files in mini-batches of 2 (so 2 mini-batches), with a way to commit results."""
    (tmp_path / "model").mkdir()
    write(tmp_path / "code" / "score.py", "def run(mb):\n    return mb\n")
    for i in range(4):
        write(tmp_path / "in" / f"f{i}.csv", "x\n")

    def make(output_file_name: str = "predictions.csv"):
        path = deployment_file(
            tmp_path / "yaml",
            model=tmp_path / "model",
            code=tmp_path / "code",
            inputs=tmp_path / "in",
            settings={"mini_batch_size": 2, "output_file_name": output_file_name},
        )
        d = load(path).deployments[0]
        plan_run("ep", d, RUN)
        return d

    return make


def commit(d, index: int, table: pa.Table | None, error: str | None = None) -> None:
    mb_dir = run_layout(d, RUN).mini_batch_dir(index)
    mb_dir.path.mkdir(parents=True, exist_ok=True)
    if table is None:
        mb_dir.commit(MiniBatchStatus(index=index, state="failed", files=2, error=ErrorInfo("ValueError", error or "x")))
        return
    name = mb_dir.new_result_name()
    with atomic_path(mb_dir.path / name) as tmp:
        pq.write_table(table, tmp)
    mb_dir.commit(
        MiniBatchStatus(
            index=index, state="succeeded", files=2, rows=table.num_rows, result_file=name,
            run_seconds=0.5, started_at="2026-11-21T10:00:00+00:00", finished_at="2026-11-21T10:00:02+00:00",
        )
    )


def test_results_are_concatenated_in_plan_order_with_a_header(make_run) -> None:
    d = make_run()
    commit(d, 1, pa.table({"id": [3, 4], "p": ["c", "d"]}))  # committed first, merged second
    commit(d, 0, pa.table({"id": [1, 2], "p": ["a", "b"]}))

    summary = merge_run("ep", d, RUN)

    out = run_layout(d, RUN).root / "predictions.csv"
    assert out.read_text() == '"id","p"\n1,"a"\n2,"b"\n3,"c"\n4,"d"\n'
    assert summary["status"] == "succeeded" and summary["rows"] == 4
    assert summary["mini_batches"] == {"total": 2, "succeeded": 2, "failed": 0, "missing": 0}
    assert summary["durations"]["run_seconds_total"] == 1.0
    assert summary["durations"]["scoring_wall_seconds"] == 2.0
    assert json.loads(run_layout(d, RUN).summary_file.read_text()) == summary
    assert not list(out.parent.glob(".*.tmp"))  # no temporary file left behind


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


def test_a_failed_and_a_missing_mini_batch_fail_the_merge_after_writing_what_exists(make_run) -> None:
    d = make_run()
    commit(d, 0, None, "bad row 7")  # mini-batch 1 never committed anything

    with pytest.raises(IncompleteJobError) as info:
        merge_run("ep", d, RUN)

    root = run_layout(d, RUN).root
    assert str(info.value) == (
        "2 of 2 mini-batches have no result: mb-00000 (failed: ValueError: bad row 7); mb-00001 (missing: no "
        "result was committed (the task failed or never ran)). The output "
        f"{root / 'predictions.csv'} holds the other 0; clear the failed score instances in Airflow to rerun "
        "them, and the merge runs again."
    )
    summary = json.loads((root / "summary.json").read_text())
    assert summary["status"] == "incomplete"
    assert summary["mini_batches"] == {"total": 2, "succeeded": 0, "failed": 1, "missing": 1}
    assert [f["mini_batch"] for f in summary["failures"]] == ["mb-00000", "mb-00001"]

    commit(d, 0, pa.table({"id": [1, 2]}))  # the reruns succeed: the merge converges
    commit(d, 1, pa.table({"id": [3, 4]}))
    assert merge_run("ep", d, RUN)["status"] == "succeeded"
    assert (root / "predictions.csv").read_text() == '"id"\n1\n2\n3\n4\n'


def test_merge_without_a_plan_says_so(make_run) -> None:
    d = make_run()
    with pytest.raises(PlanError) as info:
        merge_run("ep", d, "another-run")
    root = run_layout(d, "another-run").root
    assert str(info.value) == (
        f"run directory {root} has no plan ({root / '_batchscore' / 'plan.json'}); the plan task of run "
        "'another-run' did not finish, so there is nothing to merge"
    )
