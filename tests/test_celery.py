"""The example job on the CeleryExecutor: Postgres, Redis, a real scheduler and two Celery workers.

What runs where (no image can be pulled here):
* PostgreSQL and Redis: Debian's packages, as processes of this session (batchscore.localservices);
* api-server, scheduler and dag-processor: processes of this session (LocalAirflow);
* Celery worker ``w1``: a process of this session, on the host, serving the queue ``default``;
* Celery worker ``w2``: a container of the compose stack's Airflow image (``batchscore-airflow``,
  built here offline), with the Docker socket, on the host's network, serving ``default`` and
  ``gpu``. It sees the project at ``/opt/batchscore`` and the job's folder at ``/data``, so its
  scoring containers mount the right host folders only through ``BATCHSCORE_HOST_PATHS``.

The job's YAML files use paths relative to themselves, as the compose stack's do, so the host
processes and the container read the same job at different paths. No GPU is needed: ``gpu`` is
only the name of the queue that a GPU host's workers would serve.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from batchscore.localairflow import LocalAirflow, log_tail
from batchscore.localservices import Postgres, Redis
from batchscore_runtime.formats import Summary, run_key
from tests.conftest import EXAMPLE, REPO
from tests.helpers import write

pytestmark = [pytest.mark.docker, pytest.mark.scheduler, pytest.mark.celery]

CONTAINER_WORKER = "batchscore-test-celery-w2"
CONTAINER_HOSTNAME = "celery-w2"
HEARTBEAT_TIMEOUT = 20  # s without a heartbeat before the scheduler fails a task whose worker died
QUEUED_TIMEOUT = 60  # s a task may stay queued (taken by a worker that died before starting it) before it is sent again

# The example's scoring script, slowed down on iris-007.csv until the test has killed the Celery
# worker of that mini-batch (the marker "killed" next to the model); says where it runs.
KILLABLE_SCRIPT = """
import os, socket, time
import pandas as pd

def init():
    pass

def run(mini_batch):
    names = [os.path.basename(p) for p in mini_batch]
    killed = os.path.join(os.environ["AZUREML_MODEL_DIR"], "killed")
    if "iris-007.csv" in names and not os.path.exists(killed):
        open(os.path.join(os.environ["AZUREML_BI_OUTPUT_PATH"], "slow"), "w").close()
        while not os.path.exists(killed):
            time.sleep(0.2)
    rows = [pd.read_csv(p).assign(file=os.path.basename(p)) for p in mini_batch]
    return pd.concat(rows, ignore_index=True)[["file", "id"]].assign(host=socket.gethostname())
"""


def _example_yaml(job: Path) -> None:
    """dags/deployments/iris-batch.yaml as shipped, its paths pointing into the job's folder."""
    doc = yaml.safe_load((REPO / "dags" / "deployments" / "iris-batch.yaml").read_text())
    doc["model"]["path"] = "../../iris/model"
    doc["code_configuration"]["code"] = "../../iris/code"
    doc["input"]["path"] = "../../iris/data"
    doc["output"]["path"] = "../../output/iris-batch"
    (job / "dags" / "deployments" / "iris-batch.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def _test_yaml(
    job: Path, endpoint: str, code: str, settings: dict[str, Any], resources: dict[str, Any], model: str | None = None
) -> None:
    doc = {
        "name": "test-deployment",
        "endpoint_name": endpoint,
        "model": {"path": model or f"../../{endpoint}/model"},
        "code_configuration": {"code": f"../../{endpoint}/code", "scoring_script": "score.py"},
        "environment": {"image": "batchscore-scoring:latest"},
        "input": {"path": "../../iris/data", "pattern": "*.csv"},
        "output": {"path": f"../../output/{endpoint}"},
        "settings": settings,
        "resources": resources,
    }
    (job / endpoint / "model").mkdir(parents=True)
    write(job / endpoint / "code" / "score.py", code)
    (job / "dags" / "deployments" / f"{endpoint}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def _stage(job: Path) -> None:
    (job / "dags" / "deployments").mkdir(parents=True)
    shutil.copy(REPO / "dags" / "batchscore_deployments.py", job / "dags")
    for part in ("model", "code", "data"):
        shutil.copytree(EXAMPLE / part, job / "iris" / part)
    _example_yaml(job)
    # Routed to the queue "gpu", which only w2 serves; one container per mini-batch this time.
    _test_yaml(
        job,
        "routed",
        (EXAMPLE / "code" / "score.py").read_text(),
        {"mini_batch_size": 5, "worker_mode": "per_mini_batch", "retry_settings": {"max_retries": 0}},
        {"instance_count": 2, "queue": "gpu"},
        model="../../iris/model",
    )
    _test_yaml(
        job, "killable", KILLABLE_SCRIPT, {"mini_batch_size": 3, "retry_settings": {"max_retries": 1}}, {"instance_count": 2}
    )
    job.chmod(0o755)


def _container_env(airflow: LocalAirflow) -> list[str]:
    """The stack's Airflow settings for the container worker, with its own paths."""
    own = {
        "AIRFLOW_HOME": "/opt/airflow",
        "AIRFLOW__CORE__DAGS_FOLDER": "/data/dags",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": "/opt/airflow/logs",
        "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_STORAGE_PATH": "/opt/airflow/dag_bundles",
    }
    env = {k: v for k, v in airflow.child_env().items() if k.startswith("AIRFLOW__")} | own
    return [arg for k, v in sorted(env.items()) for arg in ("-e", f"{k}={v}")]


def _start_container_worker(airflow: LocalAirflow, job: Path, image: str) -> None:
    subprocess.run(["docker", "rm", "-f", CONTAINER_WORKER], capture_output=True)
    subprocess.run(
        [
            "docker", "run", "-d", "--name", CONTAINER_WORKER, "--network", "host", "--hostname", CONTAINER_HOSTNAME,
            "--user", "0:0",  # the same user as the host's worker: both write the same run folders
            "-v", "/var/run/docker.sock:/var/run/docker.sock",
            "-v", f"{REPO}:/opt/batchscore:ro", "-v", f"{job}:/data", "-v", f"{airflow.home / 'logs'}:/opt/airflow/logs",
            "-e", f"BATCHSCORE_HOST_PATHS=/opt/batchscore={REPO},/data={job}",
            *_container_env(airflow),
            image, "celery", "worker", "--celery-hostname", "w2@%h", "--queues", "default,gpu", "--concurrency", "2",
        ],
        check=True, capture_output=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while " ready." not in (logs := _container_logs()):
        running = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", CONTAINER_WORKER],
                                 capture_output=True, text=True).stdout.strip()  # fmt: skip
        if running != "true" or time.monotonic() > deadline:
            raise AssertionError(f"the container worker did not get ready:\n{logs[-4000:]}")
        time.sleep(1)


def _container_logs() -> str:
    done = subprocess.run(["docker", "logs", CONTAINER_WORKER], capture_output=True, text=True)
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def celery_stack(scoring_image: str, airflow_image: str, iris_example: Path, tmp_path_factory) -> Iterator[Any]:
    """The stack of this module's docstring, with the job staged in its folder."""
    root = tmp_path_factory.mktemp("celery")
    job = root / "job"
    _stage(job)
    postgres, redis = Postgres(), Redis(root / "redis")
    env = {
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": postgres.url,
        "AIRFLOW__CELERY__BROKER_URL": redis.url,
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + postgres.url,
        "AIRFLOW__CELERY__WORKER_PREFETCH_MULTIPLIER": "1",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT),
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
        # A task the killed worker had taken but not yet started stays queued until this (600 s by default).
        "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": str(QUEUED_TIMEOUT),
        "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT_CHECK_INTERVAL": "10",
    }
    airflow = LocalAirflow(root / "airflow", job / "dags", env=env, parallelism=8)

    def show_logs() -> None:
        if (airflow.home / "logs").exists():
            print(f"--- container worker log ---\n{_container_logs()[-6000:]}")
            print(f"--- host worker log ---\n{log_tail(airflow.log_path('celery-w1'), 80)}")

    # Each stop runs, last started first, even when one before it fails or a signal cuts it short.
    with contextlib.ExitStack() as stops:
        stops.callback(postgres.stop)
        postgres.start()
        stops.callback(redis.stop)
        redis.start()
        stops.callback(airflow.stop)
        stops.callback(subprocess.run, ["docker", "rm", "-f", CONTAINER_WORKER], capture_output=True)
        stops.callback(show_logs)
        airflow.start()
        (airflow.home / "logs").chmod(0o777)
        airflow.start_celery_worker("w1", queues="default", concurrency=2)
        _start_container_worker(airflow, job, airflow_image)
        yield airflow, job


def _score_hosts(airflow: LocalAirflow, dag_id: str, run_id: str) -> dict[int, dict[str, Any]]:
    return {t["map_index"]: t for t in airflow.task_instances(dag_id, run_id) if t["task_id"].endswith(".score")}


def _model_output(job: Path) -> pd.DataFrame:
    """What the example's own script gives for all input files at once, computed in the scoring image."""
    script = (
        "import glob, os, sys\n"
        "sys.path.insert(0, '/code'); os.environ['AZUREML_MODEL_DIR'] = '/model'\n"
        "import score\n"
        "score.init()\n"
        "print(score.run(sorted(glob.glob('/data/*.csv'))).to_csv(index=False), end='')\n"
    )
    out = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "-v", f"{job / 'iris' / 'model'}:/model:ro",
         "-v", f"{job / 'iris' / 'code'}:/code:ro", "-v", f"{job / 'iris' / 'data'}:/data:ro",
         "batchscore-scoring:latest", "python3", "-c", script],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    from io import StringIO

    return pd.read_csv(StringIO(out.stdout))


def test_the_example_job_runs_on_two_celery_workers_and_merges_exactly(celery_stack) -> None:
    airflow, job = celery_stack
    airflow.wait_for_dag("iris-batch")
    run_id = airflow.trigger("iris-batch")
    assert airflow.wait_for_run("iris-batch", run_id, timeout=480) == "success"

    hosts = {t["hostname"] for t in _score_hosts(airflow, "iris-batch", run_id).values()}
    assert len(hosts) == 2, f"all mini-batches ran on {hosts}"  # the host's worker and the container's
    assert CONTAINER_HOSTNAME in hosts

    run_dir = job / "output" / "iris-batch" / run_key(run_id)
    merged = pd.read_csv(run_dir / "predictions.csv")
    pd.testing.assert_frame_equal(merged, _model_output(job))  # every row once, in input order, as the model says
    ledger = pd.read_csv(run_dir / "processed_mini-batches.csv", keep_default_na=False)
    assert ledger["status"].tolist() == ["succeeded"] * 4 and ledger["attempts"].tolist() == [1] * 4


def test_a_deployment_with_a_queue_runs_only_on_the_workers_of_that_queue(celery_stack) -> None:
    airflow, job = celery_stack
    airflow.wait_for_dag("routed")
    run_id = airflow.trigger("routed")
    assert airflow.wait_for_run("routed", run_id, timeout=480) == "success"

    tis = {t["task_id"]: t for t in airflow.task_instances("routed", run_id) if not t["task_id"].endswith(".score")}
    scores = _score_hosts(airflow, "routed", run_id)
    assert len(scores) == 3
    assert {t["hostname"] for t in scores.values()} == {CONTAINER_HOSTNAME}  # only w2 serves "gpu"
    assert {t["queue"] for t in scores.values()} == {"gpu"}
    assert tis["test-deployment.plan"]["queue"] == "default"  # planning needs no scoring host
    run_dir = job / "output" / "routed" / run_key(run_id)
    pd.testing.assert_frame_equal(pd.read_csv(run_dir / "predictions.csv"), _model_output(job))
    assert Summary.read(run_dir / "summary.json").mini_batches.succeeded == 3


def test_a_celery_worker_killed_mid_mini_batch_its_mini_batch_is_retried_elsewhere_and_counted_once(
    celery_stack,
) -> None:
    airflow, job = celery_stack
    airflow.wait_for_dag("killable")
    run_id = airflow.trigger("killable")
    run_dir = job / "output" / "killable" / run_key(run_id)
    killed: list[str] = []

    def kill_the_slow_mini_batchs_worker() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if any(
                run_dir.glob("_batchscore/scratch/**/mb-00002.try-*/outputs-*/slow")
            ):  # the container writes there while it scores
                host = _score_hosts(airflow, "killable", run_id)[2]["hostname"]
                if host == CONTAINER_HOSTNAME:
                    subprocess.run(["docker", "kill", CONTAINER_WORKER], check=True, capture_output=True)
                else:
                    airflow.kill_component("celery-w1")
                killed.append(host)
                (job / "killable" / "model" / "killed").touch()
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_the_slow_mini_batchs_worker, daemon=True)
    killer.start()
    try:
        assert airflow.wait_for_run("killable", run_id, timeout=480) == "success"
    finally:
        killer.join(timeout=5)
        # The stack's other tests need both workers again.
        if killed == [CONTAINER_HOSTNAME]:
            _start_container_worker(airflow, job, "batchscore-airflow:latest")
        elif killed:
            airflow.start_celery_worker("w1", queues="default", concurrency=2)

    assert killed, "the slow mini-batch never started"
    scores = _score_hosts(airflow, "killable", run_id)
    assert scores[2]["try_number"] == 2  # iris-006..008: the only one retried
    assert scores[2]["hostname"] != killed[0]  # on the worker that was left
    assert all(scores[i]["try_number"] == 1 for i in (0, 1, 3, 4))

    merged = pd.read_csv(run_dir / "predictions.csv")
    files = sorted((job / "iris" / "data").glob("*.csv"))
    expected = pd.concat([pd.read_csv(f).assign(file=f.name) for f in files], ignore_index=True)[["file", "id"]]
    pd.testing.assert_frame_equal(merged[["file", "id"]], expected)  # every row once, in order
    ledger = pd.read_csv(run_dir / "processed_mini-batches.csv", keep_default_na=False)
    row = ledger[ledger["mini_batch"] == "mb-00002"].iloc[0]
    assert (row["status"], row["attempts"]) == ("succeeded", 2)
    assert len(ledger) == 5
