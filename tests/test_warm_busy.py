"""Keeping warm workers busy: they start while the plan is written, and each takes a queue of mini-batches.

Real containers and real DAG runs (``dag.test()``), as :mod:`tests.test_warm`; the queue itself
is also driven directly through the run's :class:`~batchscore.scoring.workers.WarmWorkers`, from
two threads, because ``dag.test()`` runs one task at a time.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from batchscore_runtime.formats import run_key
from tests.helpers import deployment_file, run_dag, write
from tests.test_warm import COUNTING_SCRIPT, worker_containers

pytestmark = pytest.mark.docker


def test_workers_start_without_the_plan_and_are_removed_when_the_plan_fails(
    airflow_db, iris_example: Path, tmp_path: Path, monkeypatch, capfd
) -> None:
    write(tmp_path / "code" / "score.py", COUNTING_SCRIPT)
    (tmp_path / "empty-in").mkdir()
    path = deployment_file(
        tmp_path / "deployments",
        model=iris_example / "model",
        code=tmp_path / "code",
        inputs=tmp_path / "empty-in",
        settings={"worker_mode": "warm"},
        resources={"instance_count": 2},
    )

    dag_run, endpoint = run_dag(path, monkeypatch)

    deployment = endpoint.deployments[0]
    log = capfd.readouterr().out
    tis = {ti.task_id: ti.state for ti in dag_run.get_task_instances()}
    assert dag_run.state == "failed"
    assert tis["test-deployment.plan"] == "failed"
    assert "PlanError: no input files match '*.csv'" in log
    assert tis["test-deployment.start_workers"] == "success"  # it did not wait for the plan
    assert "Starting 2 warm worker(s) (resources.instance_count) while the plan is written" in log
    assert tis["test-deployment.stop_workers"] == "success"
    assert "Removed 2 worker container(s)" in log
    assert worker_containers(endpoint.endpoint_name, deployment.name, dag_run.run_id) == []
    # What the workers wrote in the run folder is theirs alone: no plan, no mini-batch file.
    work = deployment.output.path / run_key(dag_run.run_id) / "_batchscore"
    assert not (work / "plan.json").exists() and list((work / "minibatches").iterdir()) == []
