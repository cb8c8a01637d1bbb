"""Keeping warm workers busy: they start while the plan is written, and each takes a queue of mini-batches.

Real containers and real DAG runs (``dag.test()``), as :mod:`tests.test_warm`. ``dag.test()``
runs one task at a time, so the queue is driven by the real operators (start_workers, plan,
score, merge, stop_workers) run by the test, each score task in a thread of its own, as
Airflow workers run them side by side.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from batchscore.run_store import place
from batchscore.scoring.workers import run_digest
from batchscore_runtime.formats import Summary, run_key
from tests.helpers import (
    assert_busy_sane,
    load,
    read_object,
    run_dag,
    s3_deployment,
    script_deployment,
    task_context,
    warm_iris_deployment,
    write,
)
from tests.test_warm import COUNTING_SCRIPT, worker_containers

pytestmark = pytest.mark.docker


def test_workers_start_without_the_plan_and_are_removed_when_the_plan_fails(
    airflow_db, iris_example: Path, tmp_path: Path, monkeypatch, capfd
) -> None:
    (tmp_path / "empty-in").mkdir()
    path = script_deployment(
        tmp_path,
        COUNTING_SCRIPT,
        model=iris_example / "model",
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


# --------------------------------------------------------------------------- a queue per worker

# Waits on iris-000.csv until the test leaves a file "go" next to the script: the mini-batch
# after it then has to wait in the worker's queue for as long as the test needs.
GATED_SCRIPT = """
import os, socket, time
import pandas as pd

def init():
    pass

def run(mini_batch):
    names = [os.path.basename(p) for p in mini_batch]
    gate = os.path.join(os.path.dirname(os.path.abspath(__file__)), "go")
    while "iris-000.csv" in names and not os.path.exists(gate):
        time.sleep(0.1)
    rows = [pd.read_csv(p).assign(file=os.path.basename(p)) for p in mini_batch]
    return pd.concat(rows, ignore_index=True)[["file", "id"]].assign(host=socket.gethostname())
"""


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def index(self, text: str) -> int:
        """The first line that contains ``text``; fails naming it and the lines so far."""
        for i, line in enumerate(self.lines):
            if text in line:
                return i
        raise AssertionError(f"no line contains {text!r}:\n" + "\n".join(self.lines))

    def wait_for(self, text: str, thread: threading.Thread, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert thread.is_alive(), f"the task ended before it logged {text!r}:\n" + "\n".join(self.lines)
            assert time.monotonic() < deadline, f"no {text!r} in:\n" + "\n".join(self.lines)
            time.sleep(0.1)


class _Task:
    """A score task of one mini-batch, run in a thread of its own as an Airflow worker would run it."""

    def __init__(self, deployment: dict[str, Any], ref: dict[str, Any], run_id: str):
        from batchscore.operators.score import ScoreOperator

        self.lines = _Lines()
        logger = logging.getLogger(f"tests.warm_busy.{run_id}.{ref['index']}")
        logger.setLevel(logging.INFO)
        logger.addHandler(self.lines)

        class Logged(ScoreOperator):
            @property
            def log(self) -> logging.Logger:
                return logger

        self.op = Logged(task_id="score", endpoint_name="test-endpoint", deployment=deployment, mini_batch=ref)
        self.result: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(run_id,), daemon=True)
        self.thread.start()

    def _run(self, run_id: str) -> None:
        try:
            self.result = self.op.execute(task_context(run_id))
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            self.error = exc

    def wait_for(self, text: str) -> None:
        self.lines.wait_for(text, self.thread)

    def join(self) -> None:
        self.thread.join(timeout=300)
        assert not self.thread.is_alive(), "\n".join(self.lines.lines)


def _operators(deployment: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    from batchscore.operators import MergeOperator, PlanOperator, StartWorkersOperator, StopWorkersOperator

    common = {"endpoint_name": "test-endpoint", "deployment": deployment}
    return (
        StartWorkersOperator(task_id="start_workers", **common),
        PlanOperator(task_id="plan", **common),
        MergeOperator(task_id="merge", **common),
        StopWorkersOperator(task_id="stop_workers", **common),
    )


@contextlib.contextmanager
def _first_taken(d: dict[str, Any], run_id: str, gate: Path) -> Iterator[tuple[list[dict[str, Any]], _Task, Any]]:
    """Start the run's worker and plan it; yields the mini-batch refs, the task of the first (gated) one once the
    worker took it, and the merge operator. Afterwards, whatever happened, the gate is opened and the workers stopped."""
    start, plan, merge, stop = _operators(d)
    try:
        start.execute(task_context(run_id))
        refs = plan.execute(task_context(run_id))
        first = _Task(d, refs[0], run_id)
        first.wait_for("w1 took the mini-batch")
        yield refs, first, merge
    finally:
        gate.touch()
        stop.execute(task_context(run_id))


def _gated(tmp_path: Path, iris_example: Path, settings: dict[str, Any]) -> tuple[Path, Path]:
    """A warm deployment of one worker whose first mini-batch waits for the gate; (its YAML, the gate)."""
    path = warm_iris_deployment(tmp_path, iris_example, GATED_SCRIPT, {"mini_batch_size": 5, **settings}, instance_count=1)
    return path, tmp_path / "code" / "go"


@pytest.mark.s3
def test_with_one_worker_and_depth_2_the_second_mini_batch_waits_in_its_queue_with_its_inputs_staged(
    iris_example: Path,
    tmp_path: Path,
    s3,
) -> None:
    write(tmp_path / "code" / "score.py", GATED_SCRIPT)
    path = s3_deployment(
        tmp_path,
        iris_example,
        s3,
        code_configuration={"code": str(tmp_path / "code")},
        settings={"worker_mode": "warm", "mini_batch_size": 5, "worker_queue_depth": 2},
        resources={"instance_count": 1},
    )
    gate = tmp_path / "code" / "go"
    spec = load(path).deployments[0]
    d = spec.model_dump(mode="json")
    run_id = "manual__queue"
    start, plan, merge, stop = _operators(d)
    try:
        assert start.execute(task_context(run_id))["workers"] == ["w1"]  # no plan yet: instance_count workers
        refs = plan.execute(task_context(run_id))
        assert len(refs) == 3
        first = _Task(d, refs[0], run_id)
        first.wait_for("w1 took the mini-batch")
        second = _Task(d, refs[1], run_id)
        second.wait_for("w1 queued the mini-batch")
        # While the first one still scores, the second one's inputs are already staged on this host.
        staged = place(spec, run_id).staged_dir(1)
        assert sorted(p.name for p in staged.iterdir()) == [f"iris-00{i}.csv" for i in range(5, 10)]
        assert first.thread.is_alive()
        gate.touch()
        first.join()
        second.join()
        third = _Task(d, refs[2], run_id)
        third.join()
        summary_ref = merge.execute(task_context(run_id))
    finally:
        gate.touch()
        stop.execute(task_context(run_id))

    assert (first.error, second.error, third.error) == (None, None, None)
    assert [t.result["worker"] for t in (first, second, third)] == ["w1", "w1", "w1"]
    lines = second.lines
    assert lines.index("Staged 5 input object(s) of mb-00001") < lines.index("w1 queued the mini-batch: 1 mini-batch(es) ahead")
    assert lines.index("w1 queued the mini-batch") < lines.index("w1 took the mini-batch after")
    assert not any("queued" in line for line in first.lines.lines + third.lines.lines)  # a free worker takes them at once
    assert summary_ref["status"] == "succeeded"
    run_uri = f"{s3['uri']}/output/iris/{run_key(run_id)}"
    summary = Summary.from_json(json.loads(read_object(f"{run_uri}/summary.json")))
    assert [(w.worker, w.mini_batches) for w in summary.warm_workers] == [("w1", ["mb-00000", "mb-00001", "mb-00002"])]
    assert_busy_sane(summary, scored=3)


def test_a_task_killed_in_the_queue_leaves_the_worker_and_one_queued_when_the_worker_dies_goes_to_its_replacement(
    iris_example: Path, tmp_path: Path
) -> None:
    path, gate = _gated(tmp_path, iris_example, {"worker_queue_depth": 2})
    endpoint = load(path)
    spec = endpoint.deployments[0]
    d = spec.model_dump(mode="json")
    run_id = "manual__dying"
    worker = f"batchscore-{run_digest(endpoint.endpoint_name, spec.name, run_id)}-w1"
    with _first_taken(d, run_id, gate) as (refs, first, merge):
        container = _container_id(worker)

        # Killed while it waits: it leaves the queue, and the worker goes on with the first one.
        killed = _Task(d, refs[1], run_id)
        killed.wait_for("w1 queued the mini-batch")
        killed.op.on_kill()
        killed.join()
        assert first.thread.is_alive() and _container_id(worker) == container

        # The worker dies while a mini-batch waits in its queue: that one goes to its replacement, in the same try.
        third = _Task(d, refs[2], run_id)
        third.wait_for("w1 queued the mini-batch")
        subprocess.run(["docker", "kill", worker], check=True, capture_output=True)
        first.join()
        third.join()
        summary_ref = merge.execute(task_context(run_id))

    assert str(killed.error) == "mb-00001 failed: TaskKilled: the task was killed while mb-00001 waited in worker w1's queue"
    assert "Task killed: its mini-batch was taken out of worker w1's queue; the worker goes on" in killed.lines.lines
    assert str(first.error).startswith("mb-00000 failed: WarmWorkerDied: worker w1 ended while scoring mb-00000")
    assert third.error is None and third.result["worker"] == "w1"
    lines = third.lines
    assert not any("queued" in line for line in first.lines.lines)  # the queue is not the scoring one's business
    assert lines.index("mb-00002: worker w1 let it go from its queue before it started") < lines.index("w1 took the mini-batch")
    assert _container_id(worker) is None  # removed by stop_workers
    run_dir = spec.output.path / run_key(run_id)
    ledger = pd.read_csv(run_dir / "processed_mini-batches.csv", keep_default_na=False)
    assert ledger[["mini_batch", "status", "attempts"]].values.tolist() == [
        ["mb-00000", "failed", 1],
        ["mb-00001", "failed", 1],
        ["mb-00002", "succeeded", 1],
    ]
    summary = Summary.read(run_dir / "summary.json")
    assert (summary.mini_batches.succeeded, summary.mini_batches.failed) == (1, 2)
    assert_busy_sane(summary, scored=1)  # the replacement's: a new worker's state starts afresh
    assert summary_ref["status"] == summary.status


def test_with_depth_1_a_busy_worker_queues_nothing_and_the_task_waits_for_it(
    iris_example: Path, tmp_path: Path, monkeypatch
) -> None:
    from batchscore.scoring import warm

    monkeypatch.setattr(warm, "WAIT_LOG_SECONDS", 0.5)  # say at once that it waits for a free worker
    path, gate = _gated(tmp_path, iris_example, {"worker_queue_depth": 1})
    d = load(path).deployments[0].model_dump(mode="json")
    run_id = "manual__depth1"
    with _first_taken(d, run_id, gate) as (refs, first, _):
        second = _Task(d, refs[1], run_id)
        second.wait_for("waiting")
        assert first.thread.is_alive()
        gate.touch()
        first.join()
        second.join()

    assert (first.error, second.error) == (None, None)
    lines = second.lines
    assert "for a free warm worker (w1 busy)" in lines.lines[lines.index("waiting")]
    assert lines.index("waiting") < lines.index("w1 took the mini-batch (its init()")
    assert not any("queued" in line for line in lines.lines)


def _container_id(name: str) -> str | None:
    found = subprocess.run(["docker", "inspect", "--format", "{{.Id}}", name], capture_output=True, text=True)
    return found.stdout.strip() if found.returncode == 0 else None


def test_a_queued_mini_batchs_time_limit_counts_from_when_the_worker_takes_it(
    iris_example: Path, tmp_path: Path, monkeypatch
) -> None:
    from batchscore.scoring import contract

    monkeypatch.setattr(contract, "CONTAINER_GRACE_SECONDS", 0)  # the backstop: retry_settings.timeout itself
    path, gate = _gated(tmp_path, iris_example, {"worker_queue_depth": 2, "retry_settings": {"max_retries": 0, "timeout": 120}})
    d = load(path).deployments[0].model_dump(mode="json")
    # The second task's own limit is 5 s (the run's workers are found by name, whatever the task's
    # settings): it waits longer than that in the queue, then scores in far less.
    short = {**d, "settings": {**d["settings"], "retry_settings": {"max_retries": 0, "timeout": 5}}}
    run_id = "manual__backstop"
    with _first_taken(d, run_id, gate) as (refs, first, _):
        second = _Task(short, refs[1], run_id)
        second.wait_for("w1 queued the mini-batch")
        time.sleep(8)  # past the second one's 5 s, in the queue
        gate.touch()
        first.join()
        second.join()

    assert (first.error, second.error) == (None, None)
    assert not any("ran past" in line for line in first.lines.lines + second.lines.lines)
