"""Warm workers (settings.worker_mode: warm) end to end: real containers, real DAG runs.

The scoring script counts its own init() calls (a global of its process) and says which
container and process scored each file, so "init() once per worker" is checked from the
script's side, not from batchscore's records alone.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from batchscore.warm import RUN_LABEL, run_digest
from batchscore_runtime.formats import run_key
from tests.helpers import deployment_file, run_dag, serve_endpoint, write

pytestmark = pytest.mark.docker

COUNTING_SCRIPT = """
import os, socket
import pandas as pd

INIT_CALLS = 0

def init():
    global INIT_CALLS
    INIT_CALLS += 1

def run(mini_batch):
    rows = [pd.read_csv(p).assign(file=os.path.basename(p)) for p in mini_batch]
    out = pd.concat(rows, ignore_index=True)[["file", "id"]]
    return out.assign(host=socket.gethostname(), pid=os.getpid(), init_calls=INIT_CALLS)
"""


def worker_containers(endpoint: str, deployment: str, run_id: str) -> list[str]:
    """Every container (running or not) of a run's warm workers, as ``docker ps -a`` lists them."""
    digest = run_digest(endpoint, deployment, run_id)
    out = subprocess.run(
        ["docker", "ps", "-a", "--filter", f"label={RUN_LABEL}={digest}", "--format", "{{.Names}}"],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.split()


def test_init_is_called_once_per_worker_across_many_mini_batches(
    airflow_db, iris_example: Path, tmp_path: Path, monkeypatch
) -> None:
    write(tmp_path / "code" / "score.py", COUNTING_SCRIPT)
    path = deployment_file(
        tmp_path / "deployments",
        model=iris_example / "model",
        code=tmp_path / "code",
        inputs=iris_example / "data",
        settings={"mini_batch_size": 1, "worker_mode": "warm", "max_concurrency_per_instance": 1},
        resources={"instance_count": 2},
    )

    dag_run, endpoint = run_dag(path, monkeypatch)
    deployment = endpoint.deployments[0]

    assert dag_run.state == "success"
    run_dir = deployment.output.path / run_key(dag_run.run_id)
    predictions = pd.read_csv(run_dir / "predictions.csv")
    files = sorted((iris_example / "data").glob("*.csv"))
    inputs = pd.concat([pd.read_csv(f).assign(file=f.name) for f in files], ignore_index=True)
    assert predictions["id"].tolist() == inputs["id"].tolist()
    assert predictions["file"].tolist() == inputs["file"].tolist()
    # 15 mini-batches, at most 2 processes ever: each called init() once and scored several.
    processes = predictions.groupby(["host", "pid"])["file"].nunique()
    assert 1 <= len(processes) <= 2, processes
    assert set(predictions["init_calls"]) == {1}
    assert processes.sum() == 15

    ledger = pd.read_csv(run_dir / "processed_mini-batches.csv")
    assert set(ledger["worker"]) <= {"w1", "w2"} and len(ledger) == 15
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["worker_mode"] == "warm"
    assert sum(len(w["mini_batches"]) for w in summary["warm_workers"]) == 15
    assert all(w["init_seconds"] is not None for w in summary["warm_workers"])

    tis = {(ti.task_id, ti.map_index): ti for ti in dag_run.get_task_instances()}
    assert tis[("test-deployment.start_workers", -1)].state == "success"
    assert tis[("test-deployment.stop_workers", -1)].state == "success"
    assert worker_containers(endpoint.endpoint_name, deployment.name, dag_run.run_id) == []


def test_the_serving_contract_in_warm_mode_pings_once_per_worker_and_gives_the_same_out_files(
    airflow_db, iris_example: Path, serving_image: str, tmp_path: Path, monkeypatch
) -> None:
    transform = {
        "SplitType": "Line", "ContentType": "text/csv", "Accept": "text/csv", "AssembleWith": "Line",
        "BatchStrategy": "MultiRecord",
        "DataProcessing": {"InputFilter": "$[1:]", "JoinSource": "Input", "OutputFilter": "$[0,-1]"},
    }
    common = {"model": iris_example / "model" / "iris-classifier.tar.gz", "image": serving_image,
              "inputs": iris_example / "data-serve", "pattern": "*.csv", "transform": transform}
    path = serve_endpoint(
        tmp_path,
        "iris-warm",
        [
            {**common, "name": "warm", "settings": {"worker_mode": "warm", "mini_batch_size": 2}},
            {**common, "name": "cold", "settings": {"worker_mode": "per_mini_batch", "mini_batch_size": 2}},
        ],
    )
    text = path.read_text().replace("name: warm\n", "name: warm\n  resources:\n    instance_count: 2\n", 1)
    path.write_text(text)

    dag_run, endpoint = run_dag(path, monkeypatch)

    assert dag_run.state == "success"
    warm, cold = (d.output.path / run_key(dag_run.run_id) for d in endpoint.deployments)
    outs = sorted(p.name for p in warm.glob("*.out"))
    assert len(outs) == 15
    for name in outs:
        assert (warm / name).read_bytes() == (cold / name).read_bytes(), name
    summary = json.loads((warm / "summary.json").read_text())
    assert summary["mini_batches"]["succeeded"] == 8
    workers = summary["warm_workers"]
    assert 1 <= len(workers) <= 2 and sum(len(w["mini_batches"]) for w in workers) == 8
    assert worker_containers("iris-warm", "warm", dag_run.run_id) == []
