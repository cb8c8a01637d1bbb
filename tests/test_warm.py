"""Warm workers (settings.worker_mode: warm) end to end: real containers, real DAG runs.

The scoring script counts its own init() calls (a global of its process) and says which
container and process scored each file, so "init() once per worker" is checked from the
script's side, not from batchscore's records alone.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from batchscore.scoring.workers import RUN_LABEL, run_digest
from batchscore_runtime.formats import Summary, run_key
from tests.helpers import assert_busy_sane, load, run_dag, script_deployment, serve_endpoint, warm_iris_deployment
from tests.test_rerun import FLAKY_SCRIPT, REPO  # fails on iris-005.csv until a marker appears next to the model

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
    settings = {"mini_batch_size": 1, "max_concurrency_per_instance": 1}
    path = warm_iris_deployment(tmp_path, iris_example, COUNTING_SCRIPT, settings, instance_count=2)

    dag_run, endpoint = run_dag(path, monkeypatch)
    deployment = endpoint.deployments[0]

    assert dag_run.state == "success"
    run_dir = deployment.output.path / run_key(dag_run.run_id)
    predictions = pd.read_csv(run_dir / "predictions.csv")
    pd.testing.assert_frame_equal(predictions[["file", "id"]], _expected(iris_example))  # every row, in order
    # 15 mini-batches, at most 2 processes ever: each called init() once and scored several.
    processes = predictions.groupby(["host", "pid"])["file"].nunique()
    assert 1 <= len(processes) <= 2, processes
    assert set(predictions["init_calls"]) == {1}
    assert processes.sum() == 15

    ledger = pd.read_csv(run_dir / "processed_mini-batches.csv")
    assert set(ledger["worker"]) <= {"w1", "w2"} and len(ledger) == 15
    summary = Summary.read(run_dir / "summary.json")
    assert summary.worker_mode == "warm"
    assert sum(len(w.mini_batches) for w in summary.warm_workers) == 15
    assert all(w.init_seconds is not None for w in summary.warm_workers)
    assert_busy_sane(summary, scored=15)

    tis = {(ti.task_id, ti.map_index): ti for ti in dag_run.get_task_instances()}
    assert tis[("test-deployment.start_workers", -1)].state == "success"
    assert tis[("test-deployment.stop_workers", -1)].state == "success"
    assert worker_containers(endpoint.endpoint_name, deployment.name, dag_run.run_id) == []


def test_the_serving_contract_in_warm_mode_pings_once_per_worker_and_gives_the_same_out_files(
    airflow_db, iris_example: Path, serving_image: str, tmp_path: Path, monkeypatch, capfd
) -> None:
    transform = {
        "SplitType": "Line",
        "ContentType": "text/csv",
        "Accept": "text/csv",
        "AssembleWith": "Line",
        "BatchStrategy": "MultiRecord",
        "DataProcessing": {"InputFilter": "$[1:]", "JoinSource": "Input", "OutputFilter": "$[0,-1]"},
    }
    common = {
        "model": iris_example / "model" / "iris-classifier.tar.gz",
        "image": serving_image,
        "inputs": iris_example / "data-serve",
        "pattern": "*.csv",
        "transform": transform,
    }
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
    log = capfd.readouterr().out
    assert "took the mini-batch" in log  # the client's lines, and the server's (not the cold deployment's "serve |"):
    assert re.search(r"w\d serve \| ", log)
    warm, cold = (d.output.path / run_key(dag_run.run_id) for d in endpoint.deployments)
    outs = sorted(p.name for p in warm.glob("*.out"))
    assert len(outs) == 15
    for name in outs:
        assert (warm / name).read_bytes() == (cold / name).read_bytes(), name
    summary = Summary.read(warm / "summary.json")
    assert summary.mini_batches.succeeded == 8
    workers = summary.warm_workers
    assert 1 <= len(workers) <= 2 and sum(len(w.mini_batches) for w in workers) == 8
    assert worker_containers("iris-warm", "warm", dag_run.run_id) == []


# --------------------------------------------------------------------------- on a real scheduler

# Sleeps on iris-007.csv (after saying so in its outputs folder) until the test has killed its
# worker container and left a marker next to the model; the retry then scores it at once.
KILLABLE_SCRIPT = """
import os, socket, time
import pandas as pd

def init():
    pass

def run(mini_batch):
    names = [os.path.basename(p) for p in mini_batch]
    marker = os.path.join(os.environ["AZUREML_MODEL_DIR"], "killed")
    if "iris-007.csv" in names and not os.path.exists(marker):
        open(os.path.join(os.environ["AZUREML_BI_OUTPUT_PATH"], "slow-" + socket.gethostname()), "w").close()
        time.sleep(300)
    rows = [pd.read_csv(p).assign(file=os.path.basename(p)) for p in mini_batch]
    return pd.concat(rows, ignore_index=True)[["file", "id"]].assign(host=socket.gethostname())
"""


def _stage(tmp_path: Path, script: str, settings: dict, endpoint: str, resources: dict | None = None):

    model = tmp_path / "model"
    model.mkdir()
    yaml_path = script_deployment(
        tmp_path,
        script,
        model=model,
        inputs=REPO / "include" / "examples" / "iris" / "data",
        endpoint=endpoint,
        settings={"worker_mode": "warm", **settings},
        resources=resources,
    )
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "batchscore_deployments.py").write_text((REPO / "dags" / "batchscore_deployments.py").read_text())
    return model, load(yaml_path).deployments[0], dags, {"BATCHSCORE_DEPLOYMENTS_DIR": str(yaml_path.parent)}


def _expected(iris_example: Path) -> pd.DataFrame:
    return pd.concat(
        [pd.read_csv(f).assign(file=f.name) for f in sorted((iris_example / "data").glob("*.csv"))], ignore_index=True
    )[["file", "id"]]


@pytest.mark.scheduler
def test_a_worker_killed_mid_mini_batch_fails_only_it_and_its_retry_gets_a_healthy_worker(
    iris_example: Path, tmp_path: Path
) -> None:
    import threading
    import time

    from batchscore.localairflow import LocalAirflow

    model, deployment, dags, env = _stage(
        tmp_path,
        KILLABLE_SCRIPT,
        {"mini_batch_size": 3, "retry_settings": {"max_retries": 1}},
        "killable",
        resources={"instance_count": 2},
    )
    killed: list[str] = []

    def kill_when_slow(run_dir: Path) -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            for marker in run_dir.glob("_batchscore/scratch/*/mb-*/outputs-*/slow-*"):  # the worker writes there while it scores
                host = marker.name.removeprefix("slow-")
                (model / "killed").touch()
                subprocess.run(["docker", "kill", host], check=True, capture_output=True)
                killed.append(host)
                return
            time.sleep(0.2)

    with LocalAirflow(tmp_path / "airflow", dags, env=env) as airflow:
        airflow.wait_for_dag("killable")
        run_id = airflow.trigger("killable")
        killer = threading.Thread(target=kill_when_slow, args=(deployment.output.path / run_key(run_id),), daemon=True)
        killer.start()
        assert airflow.wait_for_run("killable", run_id, timeout=420) == "success"
        killer.join(timeout=5)
        tis = {(t["task_id"], t["map_index"]): t for t in airflow.task_instances("killable", run_id)}
        first_try = airflow.task_log("killable", run_id, "test-deployment.score", map_index=2, try_number=1)
        second_try = airflow.task_log("killable", run_id, "test-deployment.score", map_index=2, try_number=2)

    assert killed, "the slow mini-batch never started"
    assert tis[("test-deployment.score", 2)]["try_number"] == 2  # iris-006..008: the only one retried
    assert all(tis[("test-deployment.score", i)]["try_number"] == 1 for i in (0, 1, 3, 4))
    assert "mb-00002 failed: WarmWorkerDied: worker w" in first_try
    assert "exited with code 137" in first_try
    assert "took the mini-batch" in second_try

    run_dir = deployment.output.path / run_key(run_id)
    merged = pd.read_csv(run_dir / "predictions.csv")
    pd.testing.assert_frame_equal(merged[["file", "id"]], _expected(iris_example))  # every row once, in order
    retried = merged[merged["file"].isin(["iris-006.csv", "iris-007.csv", "iris-008.csv"])]
    assert killed[0] not in set(retried["host"])  # the retry ran on another (healthy) worker container
    ledger = pd.read_csv(run_dir / "processed_mini-batches.csv", keep_default_na=False)
    row = ledger[ledger["mini_batch"] == "mb-00002"].iloc[0]
    assert (row["status"], row["attempts"]) == ("succeeded", 2)
    assert worker_containers("killable", deployment.name, run_id) == []


@pytest.mark.scheduler
def test_teardown_after_failures_and_a_rerun_from_the_rest_api_after_the_run_ended(iris_example: Path, tmp_path: Path) -> None:
    from batchscore.localairflow import LocalAirflow

    model, deployment, dags, env = _stage(
        tmp_path,
        FLAKY_SCRIPT,
        {"mini_batch_size": 5, "mini_batch_error_threshold": 0},
        "flaky-warm",
        resources={"instance_count": 2},
    )
    with LocalAirflow(tmp_path / "airflow", dags, env=env) as airflow:
        airflow.wait_for_dag("flaky-warm")
        run_id = airflow.trigger("flaky-warm")
        assert airflow.wait_for_run("flaky-warm", run_id, timeout=300) == "failed"
        before = {(t["task_id"], t["map_index"]): t for t in airflow.task_instances("flaky-warm", run_id)}
        assert [before[("test-deployment.score", i)]["state"] for i in range(3)] == ["success", "failed", "success"]
        assert before[("test-deployment.stop_workers", -1)]["state"] == "success"
        assert worker_containers("flaky-warm", deployment.name, run_id) == []  # torn down after the failure
        log = airflow.task_log("flaky-warm", run_id, "test-deployment.score", map_index=1)
        assert "mb-00001 failed: RuntimeError: upstream service unavailable" in log
        assert "| Traceback" in log  # the worker's own lines, streamed into the task's log

        (model / "fixed").touch()
        cleared = airflow.clear("flaky-warm", run_id, [("test-deployment.score", 1)], include_downstream=True)
        assert sorted((t["task_id"], t["map_index"]) for t in cleared) == [
            ("test-deployment.merge", -1),
            ("test-deployment.score", 1),
            ("test-deployment.start_workers", -1),
            ("test-deployment.stop_workers", -1),
        ]
        assert airflow.wait_for_run("flaky-warm", run_id, timeout=300) == "success"
        after = {(t["task_id"], t["map_index"]): t for t in airflow.task_instances("flaky-warm", run_id)}
        start_log = airflow.task_log("flaky-warm", run_id, "test-deployment.start_workers", try_number=2)

    assert "Starting 1 warm worker(s) for 1 mini-batch(es) to score" in start_log  # only what is left
    for i in (0, 2):
        assert after[("test-deployment.score", i)]["try_number"] == 1
    assert after[("test-deployment.score", 1)]["try_number"] == 2
    run_dir = deployment.output.path / run_key(run_id)
    pd.testing.assert_frame_equal(pd.read_csv(run_dir / "predictions.csv"), _expected(iris_example))
    assert worker_containers("flaky-warm", deployment.name, run_id) == []


def test_a_warm_workers_gpu_lease_lives_exactly_as_long_as_its_container(scoring_image: str, tmp_path: Path, monkeypatch) -> None:
    """No GPU here: the host's GPUs are named by BATCHSCORE_GPUS and never reach Docker (mocked)."""
    import time

    from batchscore.gpu_holder import lease_for_worker

    monkeypatch.setenv("BATCHSCORE_GPUS", "g0,g1")
    monkeypatch.setenv("BATCHSCORE_GPU_LOCK_DIR", str(tmp_path / "locks"))
    (tmp_path / "in").mkdir()
    spec = load(
        script_deployment(tmp_path, COUNTING_SCRIPT, model=tmp_path / "code", inputs=tmp_path / "in", resources={"gpus": 1})
    ).deployments[0]
    names = [f"batchscore-test-gpu-holder-{k}-{tmp_path.name[-8:]}" for k in range(3)]
    holders = []
    try:
        for name in names[:2]:
            subprocess.run(
                ["docker", "run", "-d", "--name", name, scoring_image, "sleep", "120"], check=True, capture_output=True
            )
        leases = [lease_for_worker(spec, name, name) for name in names[:2]]
        holders = [holder for _, _, holder in leases]
        ids = [requests[0]["DeviceIDs"] for requests, _, _ in leases]
        assert sorted(ids) == [["g0"], ["g1"]] and [count for _, count, _ in leases] == [1, 1]
        time.sleep(3)
        assert all(h.poll() is None for h in holders)  # held while the containers live

        subprocess.run(["docker", "rm", "-f", names[0]], check=True, capture_output=True)
        holders[0].wait(timeout=15)  # the holder notices and lets go
        subprocess.run(
            ["docker", "run", "-d", "--name", names[2], scoring_image, "sleep", "120"], check=True, capture_output=True
        )
        requests, _, holder = lease_for_worker(spec, names[2], names[2])
        holders.append(holder)
        assert requests[0]["DeviceIDs"] == ids[0]  # the freed GPU, not the one still held
    finally:
        subprocess.run(["docker", "rm", "-f", *names], capture_output=True)
        for h in holders:
            h.wait(timeout=15)


def test_serving_containers_that_never_get_healthy_or_die_mid_job_fail_clearly_in_warm_mode(
    airflow_db, serving_test_image: str, iris_example: Path, tmp_path: Path, monkeypatch
) -> None:
    from tests.helpers import inputs
    from tests.test_serving_contract import ECHO

    def deployment(name: str, env: dict, settings: dict | None = None) -> dict:
        return {
            "name": name,
            "model": iris_example / "model" / "iris-classifier",
            "image": serving_test_image,
            "inputs": inputs(tmp_path / "in" / name, {"a.txt": b"fine\n", "b.txt": b"boom\n"}),
            "transform": {"SplitType": "Line", "ContentType": ECHO, "Environment": env},
            "settings": {"worker_mode": "warm", "mini_batch_size": 1, **(settings or {})},
        }

    path = serve_endpoint(
        tmp_path,
        "serve-broken-warm",
        [
            # FAULT_NEVER_HEALTHY listens from the server's first moment (answering 503), before it
            # loads the model: the client's first ping finds it, however slow the machine is.
            deployment("never-healthy", {"FAULT_NEVER_HEALTHY": "1"}, {"init_timeout": 3}),
            deployment("dies-mid-job", {"FAULT_EXIT_MATCH": "boom"}),
        ],
    )
    dag_run, endpoint = run_dag(path, monkeypatch)

    assert dag_run.state == "failed"
    tis = {(ti.task_id, ti.map_index): ti for ti in dag_run.get_task_instances()}
    assert tis[("never-healthy.start_workers", -1)].state == "failed"  # nothing could be scored
    # Airflow runs no teardown after a failed setup: start_workers removed its workers itself (below).
    assert tis[("never-healthy.stop_workers", -1)].state == "upstream_failed"
    never = endpoint.deployments[0].output.path / run_key(dag_run.run_id) / "_batchscore" / "workers" / "w1" / "state.json"
    assert json.loads(never.read_text())["error"]["message"].startswith(
        "the serving container did not answer GET /ping with 200 within 3 s (settings.init_timeout)"
    )
    run_dir = endpoint.deployments[1].output.path / run_key(dag_run.run_id)
    statuses = [json.loads((run_dir / "_batchscore" / "results" / f"mb-0000{i}" / "status.json").read_text()) for i in (0, 1)]
    assert statuses[0]["state"] == "succeeded"
    assert (statuses[1]["state"], statuses[1]["error"]["type"]) == ("failed", "ServingContainerDied")
    assert "exited with code 3" in statuses[1]["error"]["message"]
    for name in ("never-healthy", "dies-mid-job"):
        assert worker_containers("serve-broken-warm", name, dag_run.run_id) == []


def test_a_mini_batch_on_a_host_that_cannot_reach_the_warm_workers_is_scored_in_a_container_of_its_own(
    airflow_db, iris_example: Path, tmp_path: Path, capfd
) -> None:
    # A queue served by Celery workers on two Docker hosts: start_workers ran on the other host
    # (its engine is recorded in the run folder), so this host's engine has none of the workers.
    from batchscore.operators.score import ScoreOperator
    from batchscore.plan import mini_batch_refs, plan_run, run_layout
    from batchscore_runtime.formats import write_json_atomic

    path = warm_iris_deployment(tmp_path, iris_example, COUNTING_SCRIPT, {"mini_batch_size": 5}, instance_count=2, queue="gpu")
    endpoint = load(path)
    d = endpoint.deployments[0]
    plan = plan_run(endpoint.endpoint_name, d, "run-elsewhere")
    layout = run_layout(d, "run-elsewhere")
    write_json_atomic(layout.workers_engine_file, {"id": "ABCD:OTHER:ENGINE", "name": "gpu-host-2"})
    op = ScoreOperator(
        task_id="score", endpoint_name=endpoint.endpoint_name, deployment=d.model_dump(mode="json"),
        mini_batch=mini_batch_refs(plan)[1],
    )  # fmt: skip

    assert op.execute({"run_id": "run-elsewhere"})["rows"] == 50
    log = "".join(capfd.readouterr())
    status = layout.mini_batch_dir(1).read_status()
    assert status.succeeded and status.worker is None  # not a warm worker's
    assert worker_containers(endpoint.endpoint_name, d.name, "run-elsewhere") == []  # none started here
    assert (
        "mb-00001: the run's warm workers run on the Docker engine of host gpu-host-2, which this Airflow worker "
        "does not reach (it reaches host "
    ) in log
    assert (
        "'s): resources.queue gpu is served on more than one Docker host; scoring it in a container of its own "
        "(settings.worker_mode: per_mini_batch does so always)"
    ) in log


def _dies_at_start(tmp_path: Path, iris_example: Path, image: str, name: str, code: int, after: float, mode: str) -> dict:
    """A serving deployment whose ``serve`` prints a line and exits with ``code``, ``after`` seconds in."""
    from tests.helpers import inputs
    from tests.test_serving_contract import ECHO

    env = {"FAULT_EXIT_AT_START": "1", "FAULT_EXIT_CODE": str(code), "FAULT_EXIT_AFTER_SECONDS": str(after)}
    return {
        "name": name,
        "model": iris_example / "model" / "iris-classifier",
        "image": image,
        "inputs": inputs(tmp_path / "in" / name, {"a.txt": b"fine\n"}),
        "transform": {"SplitType": "Line", "ContentType": ECHO, "Environment": env},
        # A long init_timeout: a death must be noticed when it happens, not when the wait for /ping gives up.
        "settings": {"worker_mode": mode, "init_timeout": 600},
    }


@pytest.mark.timeout(300)
def test_a_serving_container_that_exits_at_start_fails_start_workers_at_once_and_leaves_no_container(
    airflow_db, serving_test_image: str, iris_example: Path, tmp_path: Path, monkeypatch, capfd
) -> None:
    # At once: the client usually cannot even join the serving container's network; after 2 s it
    # is waiting for /ping. Either way the same failure, long before settings.init_timeout (600 s).
    cases = {"exit0-at-once": (0, 0), "exit3-at-once": (3, 0), "exit0-later": (0, 2), "exit3-later": (3, 2)}
    path = serve_endpoint(
        tmp_path,
        "serve-dies-warm",
        [
            _dies_at_start(tmp_path, iris_example, serving_test_image, name, code, after, "warm")
            for name, (code, after) in cases.items()
        ]
        + [_dies_at_start(tmp_path, iris_example, serving_test_image, "cold-exit3", 3, 0, "per_mini_batch")],
    )
    from tests.test_serving_contract import status_of

    dag_run, endpoint = run_dag(path, monkeypatch)

    assert dag_run.state == "failed"
    log = capfd.readouterr().out
    tis = {(ti.task_id, ti.map_index): ti.state for ti in dag_run.get_task_instances()}
    for name, (code, _) in cases.items():
        assert tis[(f"{name}.start_workers", -1)] == "failed", name
        assert tis[(f"{name}.stop_workers", -1)] == "upstream_failed", name
        assert (
            "no warm worker got ready, so no mini-batch can be scored:\n"
            f"worker w1: the serving container ({serving_test_image} serve) exited with code {code} before it "
            f"answered /ping; its last log lines:\nFAULT_EXIT_AT_START: exiting with code {code} before serving\n"
        ) in log, name
        assert worker_containers("serve-dies-warm", name, dag_run.run_id) == [], name
    status = status_of(endpoint, "cold-exit3", dag_run)
    assert (status.state, status.error.type) == ("failed", "ServingContainerDied")
    assert status.error.message == (
        f"the serving container ({serving_test_image} serve) exited with code 3 before the mini-batch was done; "
        "its last log lines:\nFAULT_EXIT_AT_START: exiting with code 3 before serving"
    )
    left = subprocess.run(
        ["docker", "ps", "-aq", "--filter", "label=batchscore.endpoint=serve-dies-warm"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert left.stdout.split() == []


@pytest.mark.timeout(300)
def test_a_serving_container_gone_before_its_client_starts_leaves_a_clear_error_and_no_container(
    serving_test_image: str, iris_example: Path, tmp_path: Path
) -> None:
    # Made certain, not left to timing: the serving container has exited before the client is
    # created, so Docker refuses to start a client in its network namespace.
    from batchscore.engine import docker_client
    from batchscore.plan import plan_run, run_layout
    from batchscore.scoring.workers import WarmWorkerError, WarmWorkers

    class ServingGoneFirst(WarmWorkers):
        def _create_serving(self, slot: int, gpus: list) -> str | None:
            serving_id = super()._create_serving(slot, gpus)
            assert serving_id is not None and self.cli.wait(serving_id)["StatusCode"] == 3
            return serving_id

    path = serve_endpoint(
        tmp_path, "serve-gone-first", [_dies_at_start(tmp_path, iris_example, serving_test_image, "gone", 3, 0, "warm")]
    )
    d = load(path).deployments[0]
    plan_run("serve-gone-first", d, "run-gone")
    pool = ServingGoneFirst(docker_client(), d, "serve-gone-first", "run-gone", run_layout(d, "run-gone"), model_dir=d.model.path)
    try:
        with pytest.raises(WarmWorkerError) as raised:
            pool.start(0)
        assert str(raised.value) == (
            f"worker w1: the serving container ({serving_test_image} serve) exited with code 3 before it answered "
            "/ping; its last log lines:\nFAULT_EXIT_AT_START: exiting with code 3 before serving"
        )
        assert worker_containers("serve-gone-first", "gone", "run-gone") == []  # neither the client nor the server
    finally:
        pool.remove_all()


@pytest.mark.timeout(300)
def test_a_ready_worker_whose_serving_container_died_is_replaced_before_it_gets_a_mini_batch(
    airflow_db, serving_test_image: str, iris_example: Path, tmp_path: Path, capfd
) -> None:
    from batchscore.engine import docker_client
    from batchscore.operators.score import ScoreOperator
    from batchscore.plan import mini_batch_refs, plan_run, run_layout
    from batchscore.scoring.workers import WarmWorkers
    from tests.helpers import inputs
    from tests.test_serving_contract import ECHO

    path = serve_endpoint(tmp_path, "serve-died-ready", [{
        "name": "ready", "model": iris_example / "model" / "iris-classifier", "image": serving_test_image,
        "inputs": inputs(tmp_path / "in", {"a.txt": b"fine\n"}),
        "transform": {"SplitType": "Line", "ContentType": ECHO}, "settings": {"worker_mode": "warm", "init_timeout": 600},
    }])  # fmt: skip
    d = load(path).deployments[0]
    plan = plan_run("serve-died-ready", d, "run-died")
    pool = WarmWorkers(docker_client(), d, "serve-died-ready", "run-died", run_layout(d, "run-died"), model_dir=d.model.path)
    try:
        assert pool.start(0)
        ready, failures = pool.wait_ready([0], 600)
        assert [s.name for s in ready] == ["w1"] and failures == []
        subprocess.run(["docker", "kill", pool.serving_name(0)], check=True, capture_output=True)
        subprocess.run(["docker", "wait", pool.serving_name(0)], check=True, capture_output=True)
        op = ScoreOperator(
            task_id="score", endpoint_name="serve-died-ready", deployment=d.model_dump(mode="json"),
            mini_batch=mini_batch_refs(plan)[0],
        )  # fmt: skip

        result = op.execute({"run_id": "run-died"})

        assert result["rows"] == 1 and result["worker"] == "w1"  # the replacement scored it
        log = capfd.readouterr().out
        assert (
            f"worker w1: the serving container ({serving_test_image} serve) exited with code 137 (SIGKILL: out of "
            "memory at resources.memory, or docker kill); its last log lines:\n"
        ) in log
        assert "; stopping its client" in log and "; starting a replacement" in log
    finally:
        pool.remove_all()
    assert worker_containers("serve-died-ready", "ready", "run-died") == []


class _StartsWhenTold:
    """The real Docker client, whose ``start`` waits for ``go``: a task paused between creating a worker's
    container and starting it (a busy host; CI once caught another task removing it in that moment)."""

    def __init__(self, cli, go):
        self._cli, self._go = cli, go

    def __getattr__(self, name):
        return getattr(self._cli, name)

    def start(self, *args, **kwargs):
        assert self._go.wait(240), "the test never let the creator start its container"
        return self._cli.start(*args, **kwargs)


def _created_by(pool, thread, who: str) -> dict:
    """The inspect of slot 0's container once ``thread`` (a task starting it through ``pool``) has created it."""
    import time

    deadline = time.monotonic() + 120
    while (found := pool.inspect(pool.container_name(0))) is None:
        assert time.monotonic() < deadline and thread.is_alive(), f"{who} never created the container"
        time.sleep(0.1)
    return found


@pytest.mark.timeout(300)
def test_a_worker_container_another_task_created_and_has_not_started_yet_is_waited_for_not_replaced(
    airflow_db, iris_example: Path, tmp_path: Path, capfd, monkeypatch
) -> None:
    import threading
    import time

    from batchscore.engine import docker_client
    from batchscore.operators.score import ScoreOperator
    from batchscore.plan import mini_batch_refs, plan_run, run_layout
    from batchscore.scoring import warm, workers

    d = load(warm_iris_deployment(tmp_path, iris_example, COUNTING_SCRIPT, {"mini_batch_size": 3}, instance_count=1)).deployments[
        0
    ]
    plan = plan_run("test-endpoint", d, "run-created")
    layout = run_layout(d, "run-created")
    go = threading.Event()
    creator = workers.WarmWorkers(_StartsWhenTold(docker_client(), go), d, "test-endpoint", "run-created", layout)
    started: list[bool] = []
    creating = threading.Thread(target=lambda: started.append(creator.start(0)), daemon=True)
    creating.start()
    try:
        created = _created_by(creator, creating, "the creator")
        assert created["State"]["Status"] == "created" and created["State"]["ExitCode"] == 0  # what looked dead
        s = creator.slot(0)
        assert s.being_started and not s.running and not warm._died(s)  # wait for it: it is about to start

        # A score task comes now: it waits for that worker instead of removing it under its creator.
        op = ScoreOperator(
            task_id="score", endpoint_name="test-endpoint", deployment=d.model_dump(mode="json"),
            mini_batch=mini_batch_refs(plan)[0],
        )  # fmt: skip
        result: list[dict] = []
        scoring = threading.Thread(target=lambda: result.append(op.execute({"run_id": "run-created"})), daemon=True)
        scoring.start()
        time.sleep(4 * warm.POLL_SECONDS)  # it looks at the slot a few times (on a slow host, fewer: never wrongly)
        go.set()
        creating.join(timeout=120)
        scoring.join(timeout=240)

        assert started == [True] and result and result[0]["worker"] == "w1"
        assert creator.inspect(creator.container_name(0))["Id"] == created["Id"]  # the creator's, never replaced
        assert "starting a replacement" not in capfd.readouterr().out

        # A container left created past CREATED_GRACE is one whose creator died in between: that one is replaced.
        creator.remove_all()
        paused = workers.WarmWorkers(
            _StartsWhenTold(docker_client(), threading.Event()), d, "test-endpoint", "run-created", layout
        )
        orphan = threading.Thread(target=lambda: paused.start(0), daemon=True)  # never told to start
        orphan.start()
        _created_by(paused, orphan, "the task that never starts it")
        monkeypatch.setattr(workers, "CREATED_GRACE", 0.0)
        s = creator.slot(0)
        assert s.never_started and not s.being_started and warm._died(s)
        assert re.fullmatch(
            rf"worker w1: its container {creator.container_name(0)} was created \d+ s ago and never started "
            r"\(the task that created it is gone\)",
            creator.failure(s),
        )
    finally:
        go.set()
        creator.remove_all()


@pytest.mark.timeout(300)
def test_two_tasks_starting_one_slot_at_once_start_one_worker_and_the_second_wipes_nothing_of_it(
    airflow_db, iris_example: Path, tmp_path: Path
) -> None:
    import threading

    from batchscore.engine import docker_client
    from batchscore.plan import plan_run, run_layout
    from batchscore.scoring import workers

    path = warm_iris_deployment(tmp_path, iris_example, COUNTING_SCRIPT, {"mini_batch_size": 3}, instance_count=1)
    d = load(path).deployments[0]
    plan_run("test-endpoint", d, "run-twice")
    layout = run_layout(d, "run-twice")
    go = threading.Event()
    first = workers.WarmWorkers(_StartsWhenTold(docker_client(), go), d, "test-endpoint", "run-twice", layout)
    second = workers.WarmWorkers(docker_client(), d, "test-endpoint", "run-twice", layout)
    said: dict[str, bool] = {}
    a = threading.Thread(target=lambda: said.setdefault("first", first.start(0)), daemon=True)
    a.start()
    try:
        created = _created_by(first, a, "the first task")["Id"]
        mine = first.scratch_dir(0) / "what-the-first-worker-wrote"
        mine.write_text("kept")  # stands for a result its worker reports there

        b = threading.Thread(target=lambda: said.setdefault("second", second.start(0)), daemon=True)
        b.start()  # the second task comes while the first is between create and start
        go.set()
        a.join(timeout=120)
        b.join(timeout=120)

        assert said == {"first": True, "second": False}
        assert first.inspect(first.container_name(0))["Id"] == created
        assert mine.read_text() == "kept"  # the second task wiped neither its scratch folder nor its state
        ready, failures = first.wait_ready([0], 120)
        assert [s.name for s in ready] == ["w1"] and failures == []
    finally:
        go.set()
        first.remove_all()
