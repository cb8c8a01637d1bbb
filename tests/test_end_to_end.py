"""The example deployment end to end: a real Airflow DAG run, one real container per mini-batch."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from batchscore_runtime.formats import run_key
from tests.helpers import deployment_file, run_dag, write

pytestmark = pytest.mark.docker


def test_example_scores_every_row_in_input_order(airflow_db, iris_example: Path, tmp_path: Path, monkeypatch) -> None:
    path = deployment_file(
        tmp_path / "deployments",
        model=iris_example / "model",
        code=iris_example / "code",
        inputs=iris_example / "data",
        settings={"mini_batch_size": 4},
    )

    dag_run, endpoint = run_dag(path, monkeypatch)
    deployment = endpoint.deployments[0]

    assert dag_run.state == "success"
    run_dir = deployment.output.path / run_key(dag_run.run_id)
    predictions = pd.read_csv(run_dir / "predictions.csv")
    files = sorted((iris_example / "data").glob("*.csv"))
    inputs = pd.concat([pd.read_csv(f).assign(file=f.name) for f in files], ignore_index=True)
    assert list(predictions.columns) == ["file", "id", "prediction", "probability"]
    assert predictions["id"].tolist() == inputs["id"].tolist()  # one row per input row, in input order
    assert predictions["file"].tolist() == inputs["file"].tolist()
    assert set(predictions["prediction"]) == {"setosa", "versicolor", "virginica"}
    assert predictions["probability"].between(0.33, 1.0).all()

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "succeeded"
    assert summary["rows"] == 150
    assert summary["input"]["files"] == 15
    assert summary["mini_batches"] == {"total": 4, "succeeded": 4, "failed": 0, "missing": 0}
    assert summary["output"] == str(run_dir / "predictions.csv")

    tis = {(ti.task_id, ti.map_index): ti for ti in dag_run.get_task_instances()}
    assert [tis[("test-deployment.score", i)].state for i in range(4)] == ["success"] * 4
    assert tis[("test-deployment.score", 3)].rendered_map_index == "mb-00003 (3 files)"


def test_a_failing_mini_batch_within_azures_default_thresholds_is_recorded_not_fatal(
    airflow_db, iris_example: Path, tmp_path: Path, monkeypatch
) -> None:
    code = tmp_path / "code"
    write(
        code / "score.py",
        """
        import os
        import pandas as pd

        def init():
            pass

        def run(mini_batch):
            names = [os.path.basename(p) for p in mini_batch]
            if "iris-005.csv" in names:
                raise ValueError("cannot score iris-005.csv: sensor offline")
            return pd.DataFrame({"file": names})
        """,
    )
    path = deployment_file(
        tmp_path / "deployments", model=iris_example / "model", code=code, inputs=iris_example / "data", settings={"mini_batch_size": 5}
    )

    dag_run, endpoint = run_dag(path, monkeypatch)
    deployment = endpoint.deployments[0]

    # Azure's defaults (error_threshold -1, ...) tolerate failures: the job succeeds, the mini-batch
    # shows failed in Airflow, and the summary, ledger and errors file say what failed.
    assert dag_run.state == "success"
    tis = {(ti.task_id, ti.map_index): ti.state for ti in dag_run.get_task_instances()}
    assert [tis[("test-deployment.score", i)] for i in range(3)] == ["success", "failed", "success"]
    assert tis[("test-deployment.merge", -1)] == "success"

    run_dir = deployment.output.path / run_key(dag_run.run_id)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "succeeded_with_failures"
    assert summary["failures"] == [
        {
            "mini_batch": "mb-00001",
            "reason": "failed",
            "error": "ValueError: cannot score iris-005.csv: sensor offline",
            "files": 5,
        }
    ]
    # What the other mini-batches produced is kept, in order.
    kept = pd.read_csv(run_dir / "predictions.csv")["file"].tolist()
    assert kept == [f"iris-{i:03d}.csv" for i in (0, 1, 2, 3, 4, 10, 11, 12, 13, 14)]
    assert len(pd.read_csv(run_dir / "errors.csv")) == 5
