"""Azure batch-deployment semantics on real DAG runs: one real scoring container per mini-batch.

Custom outputs with Azure's own example script, the error thresholds, a run() past its
timeout, and every output format, each through ``dag.test()`` of the DAG the factory builds.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from batchscore.errors import ThresholdExceededError
from batchscore.merge import merge_run
from batchscore_runtime.formats import CustomOutputs, ItemCounts, Summary, ThresholdResult, run_key
from tests.helpers import deployment_file, run_dag, write

pytestmark = pytest.mark.docker


def states(dag_run) -> dict[tuple[str, int], str]:
    return {(ti.task_id, ti.map_index): ti.state for ti in dag_run.get_task_instances()}


def test_azures_custom_outputs_script_runs_unmodified(airflow_db, iris_example: Path, tmp_path: Path, monkeypatch) -> None:
    path = deployment_file(
        tmp_path / "deployments",
        model=iris_example / "model",
        code=iris_example / "code",
        inputs=iris_example / "data",
        script="score_custom_outputs.py",
        settings={"mini_batch_size": 5, "max_concurrency_per_instance": 2, "output_action": "summary_only"},
    )

    dag_run, endpoint = run_dag(path, monkeypatch)

    assert dag_run.state == "success"
    run_dir = endpoint.deployments[0].output.path / run_key(dag_run.run_id)
    written = sorted(p.name for p in run_dir.glob("*.parquet"))
    assert written == [f"iris-{i:03d}.parquet" for i in range(15)]  # one per input file, no clash renames
    scored = pd.read_parquet(run_dir / "iris-007.parquet")
    source = pd.read_csv(iris_example / "data" / "iris-007.csv")
    assert scored["id"].tolist() == source["id"].tolist()
    assert set(scored["prediction"]) <= {"setosa", "versicolor", "virginica"}
    assert not (run_dir / "predictions.csv").exists()  # summary_only: run()'s return is counted, not written

    summary = Summary.read(run_dir / "summary.json")
    assert summary.status == Summary.SUCCEEDED
    assert summary.items == ItemCounts(total=15, succeeded=15, failed=0)
    assert summary.custom_outputs == CustomOutputs(files=15, renamed=[])
    ledger = pd.read_csv(run_dir / "processed_mini-batches.csv")
    assert ledger["workers"].tolist() == [2, 2, 2] and ledger["status"].tolist() == ["succeeded"] * 3


THRESHOLD_SCRIPT = """
import os
import pandas as pd

def run(mini_batch):
    names = [os.path.basename(p) for p in mini_batch]
    if "iris-005.csv" in names:
        raise ValueError("cannot score iris-005.csv: sensor offline")
    for path, name in zip(mini_batch, names):  # a generator, as some Azure scripts are
        if name != "iris-012.csv":  # returns nothing for this file: one failed item
            yield pd.DataFrame({"file": [name], "rows": [len(pd.read_csv(path))]})
"""


def test_thresholds_count_failed_items_and_mini_batches_across_the_job(
    airflow_db, iris_example: Path, tmp_path: Path, monkeypatch
) -> None:
    write(tmp_path / "code" / "score.py", THRESHOLD_SCRIPT)
    path = deployment_file(
        tmp_path / "deployments",
        model=iris_example / "model",
        code=tmp_path / "code",
        inputs=iris_example / "data",
        settings={"mini_batch_size": 5, "mini_batch_error_threshold": 0},
    )

    dag_run, endpoint = run_dag(path, monkeypatch)

    # 3 mini-batches: mb-00001 raised (5 failed items), mb-00002 returned 4 of 5 files (1 more).
    assert dag_run.state == "failed"
    tis = states(dag_run)
    assert [tis[("test-deployment.score", i)] for i in range(3)] == ["success", "failed", "success"]
    assert tis[("test-deployment.merge", -1)] == "failed"
    deployment = endpoint.deployments[0]
    run_dir = deployment.output.path / run_key(dag_run.run_id)
    summary = Summary.read(run_dir / "summary.json")
    assert summary.status == Summary.FAILED
    assert summary.items == ItemCounts(total=15, succeeded=9, failed=6)
    assert summary.thresholds["mini_batch_error_threshold"] == ThresholdResult(limit=0, observed=1, exceeded=True)
    kept = pd.read_csv(run_dir / "predictions.csv")["file"].tolist()  # what succeeded is kept, in order
    assert kept == [f"iris-{i:03d}.csv" for i in (0, 1, 2, 3, 4, 10, 11, 13, 14)]
    errors = pd.read_csv(run_dir / "errors.csv")
    assert errors["file"].tolist() == [f"iris-{i:03d}.csv" for i in (5, 6, 7, 8, 9, 12)]
    assert errors["error_type"].tolist() == ["ValueError"] * 5 + ["NoResult"]
    assert errors["message"].iloc[0] == "cannot score iris-005.csv: sensor offline"

    # Each threshold just passed and just exceeded, on the results this real run committed.
    def merge_with(**settings):
        changed = deployment.settings.model_copy(update={"mini_batch_error_threshold": -1, **settings})
        return merge_run(endpoint.endpoint_name, deployment.model_copy(update={"settings": changed}), dag_run.run_id)

    for name, passed, exceeded, message in [
        ("error_threshold", 6, 5, "error_threshold exceeded: 6 items failed, 5 allowed (1 over)"),
        ("mini_batch_error_threshold", 1, 0, "mini_batch_error_threshold exceeded: 1 mini-batches failed, 0 allowed (1 over)"),
        (
            "allowed_failed_percent",
            34,
            33,
            "allowed_failed_percent exceeded: 33.33% of mini-batches failed (1 of 3), 33% allowed (0.33 points over)",
        ),
    ]:
        assert merge_with(**{name: passed}).status == Summary.SUCCEEDED_WITH_FAILURES, name
        with pytest.raises(ThresholdExceededError) as info:
            merge_with(**{name: exceeded})
        assert str(info.value).startswith(message + ". The output, summary.json"), name


def test_a_mini_batch_past_its_timeout_is_killed_and_retried(
    airflow_db, iris_example: Path, tmp_path: Path, monkeypatch, capfd
) -> None:
    write(
        tmp_path / "code" / "score.py",
        """
        import time

        def run(mini_batch):
            # Each try writes to a fresh scratch folder, so the try is read from the runtime's
            # command line (PID 1 of the container): the first one hangs.
            args = open("/proc/1/cmdline").read().split(chr(0))
            if args[args.index("--attempt") + 1] == "1":
                time.sleep(600)
            return mini_batch
        """,
    )
    path = deployment_file(
        tmp_path / "deployments",
        model=iris_example / "model",
        code=tmp_path / "code",
        inputs=iris_example / "data",
        settings={"mini_batch_size": 15, "retry_settings": {"max_retries": 1, "timeout": 3}},
    )

    dag_run, endpoint = run_dag(path, monkeypatch)

    assert dag_run.state == "success"
    ti = next(t for t in dag_run.get_task_instances() if t.task_id == "test-deployment.score")
    assert ti.try_number == 2
    log = capfd.readouterr()
    assert "did not finish within retry_settings.timeout = 3 s; the worker was killed after 3." in log.out + log.err
    run_dir = endpoint.deployments[0].output.path / run_key(dag_run.run_id)
    ledger = pd.read_csv(run_dir / "processed_mini-batches.csv")
    assert (ledger["attempts"].tolist(), ledger["status"].tolist()) == ([2], ["succeeded"])
    left = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label=batchscore.run_id={dag_run.run_id}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert left == ""  # the timed-out container was killed and removed, not left running


def test_every_output_format_and_azures_layout(airflow_db, iris_example: Path, tmp_path: Path, monkeypatch) -> None:
    write(
        tmp_path / "code" / "score.py",
        """
        import os
        import pandas as pd

        def run(mini_batch):
            frames = [pd.read_csv(p).assign(file=os.path.basename(p)) for p in mini_batch]
            data = pd.concat(frames, ignore_index=True)
            return data[["file", "id"]].assign(score=(data["sepal_length"] * 10).round(1))
        """,
    )
    common = {
        "model": {"path": str(iris_example / "model")},
        "code_configuration": {"code": str(tmp_path / "code"), "scoring_script": "score.py"},
        "environment": {"image": "batchscore-scoring:latest"},
        "input": {"path": str(iris_example / "data"), "pattern": "iris-00[0-3].csv"},
    }
    outputs = {
        "as-csv": ("predictions.csv", "table"),
        "as-parquet": ("predictions.parquet", "table"),
        "as-jsonl": ("predictions.jsonl", "table"),
        "as-azure": ("predictions.csv", "azure"),
    }
    deployments = [
        {
            "name": name,
            **common,
            "output": {"path": str(tmp_path / "out" / name)},
            "settings": {"mini_batch_size": 3, "output_file_name": file, "output_layout": layout},
        }
        for name, (file, layout) in outputs.items()
    ]
    path = write(
        tmp_path / "deployments" / "formats.yaml",
        yaml.safe_dump({"endpoint_name": "formats", "deployments": deployments}, sort_keys=False),
    )

    dag_run, endpoint = run_dag(path, monkeypatch)

    assert dag_run.state == "success"
    source = pd.concat(
        [pd.read_csv(iris_example / "data" / f"iris-00{i}.csv").assign(file=f"iris-00{i}.csv") for i in range(4)],
        ignore_index=True,
    )
    expected = source[["file", "id"]].assign(score=(source["sepal_length"] * 10).round(1))
    key = run_key(dag_run.run_id)
    read = {
        "as-csv": lambda p: pd.read_csv(p),
        "as-parquet": lambda p: pd.read_parquet(p),
        "as-jsonl": lambda p: pd.read_json(p, lines=True),
    }
    for name, reader in read.items():
        got = reader(tmp_path / "out" / name / key / outputs[name][0])
        pd.testing.assert_frame_equal(got, expected, check_dtype=False, obj=name)
    azure = (tmp_path / "out" / "as-azure" / key / "predictions.csv").read_text().splitlines()
    assert azure == [f"{r.file} {r.id} {r.score}" for r in expected.itertuples()]
