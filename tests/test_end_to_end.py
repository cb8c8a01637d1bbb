"""The example deployment end to end: a real Airflow DAG run, one real container per mini-batch."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from batchscore_runtime.formats import ItemCounts, MiniBatchCounts, MiniBatchFailure, Summary, run_key
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

    summary = Summary.read(run_dir / "summary.json")
    assert summary.status == Summary.SUCCEEDED
    assert summary.rows == 150
    assert summary.input.files == 15
    assert summary.mini_batches == MiniBatchCounts(total=4, succeeded=4, failed=0, missing=0)
    assert summary.output == str(run_dir / "predictions.csv")
    assert summary.warm_workers == [] and 0 < summary.busy_fraction <= 1  # from the statuses' start and end

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
        tmp_path / "deployments",
        model=iris_example / "model",
        code=code,
        inputs=iris_example / "data",
        settings={"mini_batch_size": 5},
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
    summary = Summary.read(run_dir / "summary.json")
    assert summary.status == Summary.SUCCEEDED_WITH_FAILURES
    assert summary.failures == [
        MiniBatchFailure(
            mini_batch="mb-00001",
            reason="failed",
            error="ValueError: cannot score iris-005.csv: sensor offline",
            files=5,
        )
    ]
    # What the other mini-batches produced is kept, in order.
    kept = pd.read_csv(run_dir / "predictions.csv")["file"].tolist()
    assert kept == [f"iris-{i:03d}.csv" for i in (0, 1, 2, 3, 4, 10, 11, 12, 13, 14)]
    assert len(pd.read_csv(run_dir / "errors.csv")) == 5


def test_symbolic_links_are_scored_inside_the_input_folder_only_and_refused_alone(
    airflow_db, iris_example: Path, tmp_path: Path, monkeypatch
) -> None:
    """Links in the input folder, through a real DAG run: one inside is scored (once) as its
    target under its own name; one to a host file, one out through ``..``, a dangling one and
    a linked folder outside are each a failed item of a mini-batch whose good files succeed."""
    iris = sorted((iris_example / "data").glob("*.csv"))
    inputs, outside = tmp_path / "in", tmp_path / "outside"
    (inputs / "store").mkdir(parents=True)
    outside.mkdir()
    for name, source in [("a-1.csv", 0), ("a-3.csv", 1), ("b-1.csv", 2), ("c-2.csv", 3), ("store/s-1.csv", 4)]:
        shutil.copy(iris[source], inputs / name)
    secret = pd.read_csv(iris[5]).assign(id=9999)  # scored, it would show as id 9999
    secret.to_csv(outside / "secret.csv", index=False)
    secret.to_csv(outside / "more.csv", index=False)
    (inputs / "a-2.csv").symlink_to("/etc/passwd")  # a host file: the container would read its own
    (inputs / "b-2.csv").symlink_to("../outside/secret.csv")  # relative, out through ..
    (inputs / "b-3.csv").symlink_to("gone.csv")  # dangling
    (inputs / "c-1.csv").symlink_to(inputs / "store" / "s-1.csv")  # absolute, inside: scored as s-1.csv
    (inputs / "d-archive").symlink_to(outside)  # a folder outside: never listed
    (inputs / "e-current").symlink_to("store")  # a folder inside: entered
    path = deployment_file(
        tmp_path / "deployments",
        model=iris_example / "model",
        code=iris_example / "code",
        inputs=inputs,
        pattern="**/*.csv",
        settings={"mini_batch_size": 3},
    )

    dag_run, endpoint = run_dag(path, monkeypatch)

    # a-1 a-2 a-3 | b-1 b-2 b-3 | c-1 c-2 d-archive | e-current/s-1 store/s-1
    assert dag_run.state == "success"
    run_dir = endpoint.deployments[0].output.path / run_key(dag_run.run_id)
    predictions = pd.read_csv(run_dir / "predictions.csv")
    scored = [("a-1.csv", 0), ("a-3.csv", 1), ("b-1.csv", 2), ("c-1.csv", 4), ("c-2.csv", 3), ("s-1.csv", 4), ("s-1.csv", 4)]
    expected = pd.concat([pd.read_csv(iris[k]).assign(file=name) for name, k in scored], ignore_index=True)
    assert predictions["file"].tolist() == expected["file"].tolist()  # c-1.csv once, under its own name
    assert predictions["id"].tolist() == expected["id"].tolist()  # and its target's rows; never 9999
    errors = pd.read_csv(run_dir / "errors.csv", keep_default_na=False)
    advice = "batchscore scores only files inside input.path: copy the file in or point input.path at its folder"
    assert errors.values.tolist() == [
        ["mb-00000", "a-2.csv", "", "LinkRefused",
         f"input file a-2.csv is a symbolic link to /etc/passwd, outside input.path ({inputs}); {advice}"],
        ["mb-00001", "b-2.csv", "", "LinkRefused",
         f"input file b-2.csv is a symbolic link to {outside / 'secret.csv'}, outside input.path ({inputs}); {advice}"],
        ["mb-00001", "b-3.csv", "", "LinkRefused",
         (f"input file b-3.csv is a symbolic link to {inputs / 'gone.csv'}, which does not exist (a dangling link); "
          "fix or remove the link")],
        ["mb-00002", "d-archive", "", "LinkRefused",
         (f"input folder d-archive is a symbolic link to {outside}, outside input.path ({inputs}); batchscore scores "
          "only files inside input.path: copy the files in or point input.path at their folder")],
    ]  # fmt: skip
    summary = Summary.read(run_dir / "summary.json")
    assert summary.status == Summary.SUCCEEDED_WITH_FAILURES
    assert summary.mini_batches == MiniBatchCounts(total=4, succeeded=4, failed=0, missing=0)
    assert summary.items == ItemCounts(total=11, succeeded=7, failed=4)
    ledger = pd.read_csv(run_dir / "processed_mini-batches.csv")
    assert ledger[["mini_batch", "files", "status", "failed_items"]].values.tolist() == [
        ["mb-00000", 3, "succeeded", 1],
        ["mb-00001", 3, "succeeded", 2],
        ["mb-00002", 3, "succeeded", 1],
        ["mb-00003", 2, "succeeded", 0],
    ]
