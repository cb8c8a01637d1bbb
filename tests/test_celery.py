"""The example job on the CeleryExecutor: Postgres, Redis, a real scheduler, two Celery workers that share no folder.

What runs where (no image can be pulled here):
* PostgreSQL and Redis: Debian's packages, as processes of this session (batchscore.localservices);
* S3: the session's SeaweedFS (the ``s3_server`` fixture, on 127.0.0.1), with the bucket ``celery-job``:
  the jobs' models, inputs and run folders (outputs, run state) are there and nowhere else;
* api-server, scheduler and dag-processor: processes of this session (LocalAirflow);
* Celery worker ``w1``: a process of this session, on the host, serving the queue ``default``; its scratch
  folder (``BATCHSCORE_SCRATCH_DIR``: staged inputs, cached models, run mirrors) is ``<root>/scratch-w1``;
* Celery worker ``w2``: a container of the compose stack's Airflow image (``batchscore-airflow``,
  built here offline), on the host's network, serving ``default`` and ``gpu``. It mounts what a worker
  host needs and no data: the Docker socket, the project at ``/opt/batchscore``, the DAGs folder (the
  YAML files and their scoring code) at ``/opt/airflow/dags``, Airflow's task-log folder (which the
  api-server reads, as the host's worker writes it) and its own scratch folder, ``<root>/scratch-w2`` at
  ``/var/lib/batchscore/scratch``. Its scoring containers are bind-mounted by the host's engine, so
  those three folders are mapped with ``BATCHSCORE_HOST_PATHS``.

Both workers reach S3 through the Airflow connection ``celery_s3`` (``AIRFLOW_CONN_CELERY_S3``; the
container is on the host's network, so 127.0.0.1 is the server). A mini-batch's inputs are staged into
the scratch folder of the worker that scores it, the model is fetched once per worker, and each commits
its results to the run folder on S3; the merge, on either worker, reads them back from there. The tests
read every output from S3. No GPU is needed: ``gpu`` is only the name of the queue that a GPU host's
workers would serve.

The example and the killable job keep warm workers (``worker_mode: warm``): a run's warm workers mount
the scratch folder of the Celery worker that started them, so a Celery worker of the same Docker engine
with another scratch folder starts a pool of its own (named for its folder); the teardown removes every
pool of the run (by the run's label).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from batchscore.localairflow import LocalAirflow, log_tail
from batchscore.localservices import Postgres, Redis, SeaweedS3
from batchscore_runtime.formats import Summary, run_key
from tests.conftest import EXAMPLE, REPO
from tests.helpers import write

pytestmark = [pytest.mark.docker, pytest.mark.scheduler, pytest.mark.celery, pytest.mark.s3]

CONTAINER_WORKER = "batchscore-test-celery-w2"
CONTAINER_HOSTNAME = "celery-w2"
HEARTBEAT_TIMEOUT = 20  # s without a heartbeat before the scheduler fails a task whose worker died
QUEUED_TIMEOUT = 60  # s a task may stay queued (taken by a worker that died before starting it) before it is sent again
BUCKET = "celery-job"
CONN = "celery_s3"
# w2's own folders (the DAGs folder and its scratch folder), each mapped to the host's for its scoring containers.
W2_DAGS = "/opt/airflow/dags"
W2_SCRATCH = "/var/lib/batchscore/scratch"
# Which cached model is the killable deployment's: an object of its model prefix by this name.
KILLABLE_MODEL_FILE = "killable-model.txt"

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


@dataclass(frozen=True)
class Stack:
    """The running stack of the module's docstring."""

    airflow: LocalAirflow
    root: Path
    s3: Any  # a boto3 S3 client of the server, signed as admin

    def scratch(self, worker: str) -> Path:
        """The scratch folder of Celery worker ``w1`` or ``w2``, on the host."""
        return self.root / f"scratch-{worker}"

    def read(self, key: str) -> bytes:
        """An object of the bucket."""
        return self.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()

    def read_csv(self, key: str, **kwargs: Any) -> pd.DataFrame:
        return pd.read_csv(io.BytesIO(self.read(key)), **kwargs)

    def upload(self, folder: Path, prefix: str) -> None:
        """Every file under ``folder``, as objects under ``prefix``."""
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            self.s3.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(folder).as_posix()}")


def _blocks(endpoint: str, model: str) -> dict[str, Any]:
    """A deployment's model, input and output on the bucket, and its code in the DAGs folder."""
    return {
        "model": {"path": f"s3://{BUCKET}/models/{model}/", "connection": CONN},
        "code_configuration": {"code": f"../code/{endpoint}", "scoring_script": "score.py"},
        "input": {"path": f"s3://{BUCKET}/data/iris/", "pattern": "*.csv", "connection": CONN},
        "output": {"path": f"s3://{BUCKET}/output/{endpoint}/", "connection": CONN},
    }


def _example_yaml(dags: Path) -> None:
    """dags/deployments/iris-batch.yaml as shipped (warm workers), but on S3."""
    doc = yaml.safe_load((REPO / "dags" / "deployments" / "iris-batch.yaml").read_text())
    for key, block in _blocks("iris-batch", "iris").items():
        doc[key] = {**doc[key], **block}
    shutil.copytree(EXAMPLE / "code", dags / "code" / "iris-batch")
    (dags / "deployments" / "iris-batch.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def _test_yaml(dags: Path, endpoint: str, code: str, settings: dict[str, Any], resources: dict[str, Any], model: str) -> None:
    doc = {
        "name": "test-deployment",
        "endpoint_name": endpoint,
        **_blocks(endpoint, model),
        "environment": {"image": "batchscore-scoring:latest"},
        "settings": settings,
        "resources": resources,
    }
    write(dags / "code" / endpoint / "score.py", code)
    (dags / "deployments" / f"{endpoint}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def _stage(root: Path, stack: Stack) -> Path:
    """The DAGs folder (DAG file, YAML files, scoring code) on the host, and the jobs' data on S3; returns the folder."""
    dags = root / "dags"
    (dags / "deployments").mkdir(parents=True)
    shutil.copy(REPO / "dags" / "batchscore_deployments.py", dags)
    (dags / ".airflowignore").write_text("code/\n")  # scoring scripts, not DAG files
    stack.upload(EXAMPLE / "model", "models/iris")
    stack.upload(EXAMPLE / "data", "data/iris")
    stack.s3.put_object(Bucket=BUCKET, Key=f"models/killable/{KILLABLE_MODEL_FILE}", Body=b"the killable script needs no model\n")
    _example_yaml(dags)
    # Routed to the queue "gpu", which only w2 serves.
    _test_yaml(
        dags,
        "routed",
        (EXAMPLE / "code" / "score.py").read_text(),
        {"mini_batch_size": 5, "worker_mode": "per_mini_batch", "retry_settings": {"max_retries": 0}},
        {"instance_count": 2, "queue": "gpu"},
        model="iris",
    )
    _test_yaml(
        dags,
        "killable",
        KILLABLE_SCRIPT,
        {"mini_batch_size": 3, "retry_settings": {"max_retries": 1}},
        {"instance_count": 2},
        model="killable",
    )
    for p in [dags, *dags.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)  # the scoring containers' user reads the code
    return dags


def _container_env(airflow: LocalAirflow, host_paths: str) -> list[str]:
    """The stack's Airflow settings for the container worker, with its own paths and scratch folder, and the connection."""
    own = {
        "AIRFLOW_HOME": "/opt/airflow",
        "AIRFLOW__CORE__DAGS_FOLDER": W2_DAGS,
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": "/opt/airflow/logs",
        "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_STORAGE_PATH": "/opt/airflow/dag_bundles",
        f"AIRFLOW_CONN_{CONN.upper()}": airflow.extra_env[f"AIRFLOW_CONN_{CONN.upper()}"],
        "BATCHSCORE_SCRATCH_DIR": W2_SCRATCH,
        "BATCHSCORE_HOST_PATHS": host_paths,
    }
    env = {k: v for k, v in airflow.child_env().items() if k.startswith("AIRFLOW__")} | own
    return [arg for k, v in sorted(env.items()) for arg in ("-e", f"{k}={v}")]


def _start_container_worker(stack: Stack, image: str) -> None:
    airflow, dags, scratch = stack.airflow, stack.airflow.dags_folder, stack.scratch("w2")
    scratch.mkdir(exist_ok=True)
    host_paths = f"/opt/batchscore={REPO},{W2_DAGS}={dags},{W2_SCRATCH}={scratch}"
    subprocess.run(["docker", "rm", "-f", CONTAINER_WORKER], capture_output=True)
    subprocess.run(
        [
            "docker", "run", "-d", "--name", CONTAINER_WORKER, "--network", "host", "--hostname", CONTAINER_HOSTNAME,
            "--user", "0:0",  # the Docker socket is root's here
            "-v", "/var/run/docker.sock:/var/run/docker.sock",
            "-v", f"{REPO}:/opt/batchscore:ro", "-v", f"{dags}:{W2_DAGS}:ro",
            "-v", f"{airflow.home / 'logs'}:/opt/airflow/logs", "-v", f"{scratch}:{W2_SCRATCH}",
            *_container_env(airflow, host_paths),
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


def _container_mounts() -> set[str]:
    """Where w2's container has its mounts."""
    done = subprocess.run(
        ["docker", "inspect", "-f", "{{json .Mounts}}", CONTAINER_WORKER], capture_output=True, text=True, check=True
    )
    return {m["Destination"] for m in json.loads(done.stdout)}


@pytest.fixture(scope="module")
def celery_stack(
    scoring_image: str, airflow_image: str, iris_example: Path, s3_server: SeaweedS3, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The stack of this module's docstring, with the jobs' data on S3 and their DAGs in the DAGs folder."""
    root = tmp_path_factory.mktemp("celery")
    s3_server.create_bucket(BUCKET)
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
        f"AIRFLOW_CONN_{CONN.upper()}": s3_server.connection_json(),
        # w1's (the host's other Airflow processes never score).
        "BATCHSCORE_SCRATCH_DIR": str(root / "scratch-w1"),
    }
    airflow = LocalAirflow(root / "airflow", root / "dags", env=env, parallelism=8)
    stack = Stack(airflow, root, s3_server.client())
    _stage(root, stack)

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
        _start_container_worker(stack, airflow_image)
        yield stack


def _score_hosts(airflow: LocalAirflow, dag_id: str, run_id: str) -> dict[int, dict[str, Any]]:
    return {t["map_index"]: t for t in airflow.task_instances(dag_id, run_id) if t["task_id"].endswith(".score")}


def _model_output() -> pd.DataFrame:
    """What the example's own script gives for all input files at once, computed in the scoring image from the
    example's files on this host (the ones uploaded to S3)."""
    script = (
        "import glob, os, sys\n"
        "sys.path.insert(0, '/code'); os.environ['AZUREML_MODEL_DIR'] = '/model'\n"
        "import score\n"
        "score.init()\n"
        "print(score.run(sorted(glob.glob('/data/*.csv'))).to_csv(index=False), end='')\n"
    )
    out = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "-v", f"{EXAMPLE / 'model'}:/model:ro",
         "-v", f"{EXAMPLE / 'code'}:/code:ro", "-v", f"{EXAMPLE / 'data'}:/data:ro",
         "batchscore-scoring:latest", "python3", "-c", script],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return pd.read_csv(io.StringIO(out.stdout))


def test_the_example_job_runs_on_two_celery_workers_that_share_no_folder_and_merges_exactly(celery_stack: Stack) -> None:
    airflow = celery_stack.airflow
    assert _container_mounts() == {"/var/run/docker.sock", "/opt/batchscore", W2_DAGS, "/opt/airflow/logs", W2_SCRATCH}
    airflow.wait_for_dag("iris-batch")
    run_id = airflow.trigger("iris-batch")
    assert airflow.wait_for_run("iris-batch", run_id, timeout=480) == "success"

    hosts = {t["hostname"] for t in _score_hosts(airflow, "iris-batch", run_id).values()}
    assert len(hosts) == 2, f"all mini-batches ran on {hosts}"  # the host's worker and the container's
    assert CONTAINER_HOSTNAME in hosts

    run = f"output/iris-batch/{run_key(run_id)}"
    pd.testing.assert_frame_equal(
        celery_stack.read_csv(f"{run}/predictions.csv"), _model_output()
    )  # every row once, in input order
    ledger = celery_stack.read_csv(f"{run}/processed_mini-batches.csv", keep_default_na=False)
    assert ledger["status"].tolist() == ["succeeded"] * 4 and ledger["attempts"].tolist() == [1] * 4
    for worker in ("w1", "w2"):  # each fetched the model into its own scratch folder, and left no input there
        scratch = celery_stack.scratch(worker)
        assert list(scratch.glob("models/*/*/.complete")), f"{worker} fetched no model into {scratch}"
        assert list(scratch.glob(f"runs/*/{run_key(run_id)}/_batchscore/input/*/*")) == []


def test_a_deployment_with_a_queue_runs_only_on_the_workers_of_that_queue(celery_stack: Stack) -> None:
    airflow = celery_stack.airflow
    airflow.wait_for_dag("routed")
    run_id = airflow.trigger("routed")
    assert airflow.wait_for_run("routed", run_id, timeout=480) == "success"

    tis = {t["task_id"]: t for t in airflow.task_instances("routed", run_id) if not t["task_id"].endswith(".score")}
    scores = _score_hosts(airflow, "routed", run_id)
    assert len(scores) == 3
    assert {t["hostname"] for t in scores.values()} == {CONTAINER_HOSTNAME}  # only w2 serves "gpu"
    assert {t["queue"] for t in scores.values()} == {"gpu"}
    assert tis["test-deployment.plan"]["queue"] == "default"  # planning needs no scoring host
    run = f"output/routed/{run_key(run_id)}"
    pd.testing.assert_frame_equal(celery_stack.read_csv(f"{run}/predictions.csv"), _model_output())
    summary = Summary.from_json(json.loads(celery_stack.read(f"{run}/summary.json")))
    assert summary.mini_batches.succeeded == 3
    assert summary.output == f"s3://{BUCKET}/{run}/predictions.csv"


def test_a_celery_worker_killed_mid_mini_batch_its_mini_batch_is_retried_elsewhere_and_counted_once(
    celery_stack: Stack,
) -> None:
    """mb-00002 (iris-006..008) hangs until the marker ``killed`` is next to the model. Once the test has
    killed the Celery worker scoring it, the marker is uploaded into the model's prefix on S3: the retry, on
    the other worker, sees a new version of the model, fetches it with the marker, and goes through. The
    hung container of the first try (the Docker engine's, so it outlives its Celery worker) mounts the
    model cached in its worker's scratch folder: the marker is written into every cached copy of the
    killable model on the host too, which lets it end (uncommitted: its task is gone).
    """
    airflow = celery_stack.airflow
    airflow.wait_for_dag("killable")
    run_id = airflow.trigger("killable")
    killed: list[str] = []

    def release_the_hung_container() -> None:
        celery_stack.s3.put_object(Bucket=BUCKET, Key="models/killable/killed", Body=b"")
        for worker in ("w1", "w2"):
            for cached in celery_stack.scratch(worker).glob(f"models/*/*/{KILLABLE_MODEL_FILE}"):
                (cached.parent / "killed").touch()

    def kill_the_slow_mini_batchs_worker() -> None:
        slow = f"runs/*/{run_key(run_id)}/_batchscore/scratch/**/mb-00002.try-*/outputs-*/slow"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            # The container writes there, in the scratch folder of its worker, while it scores.
            if any(f for worker in ("w1", "w2") for f in celery_stack.scratch(worker).glob(slow)):
                host = _score_hosts(airflow, "killable", run_id)[2]["hostname"]
                if host == CONTAINER_HOSTNAME:
                    subprocess.run(["docker", "kill", CONTAINER_WORKER], check=True, capture_output=True)
                else:
                    airflow.kill_component("celery-w1")
                killed.append(host)
                release_the_hung_container()
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
            _start_container_worker(celery_stack, "batchscore-airflow:latest")
        elif killed:
            airflow.start_celery_worker("w1", queues="default", concurrency=2)

    assert killed, "the slow mini-batch never started"
    scores = _score_hosts(airflow, "killable", run_id)
    assert scores[2]["try_number"] == 2  # iris-006..008, retried
    # With a queue per warm worker (settings.worker_queue_depth) the killed Celery worker may also have held a
    # second score task, waiting for its turn: that one is retried too. Nothing else is: at most its 2 slots.
    retried = {i for i, t in scores.items() if t["try_number"] > 1}
    assert 2 in retried and len(retried) <= 2 and all(t["try_number"] <= 2 for t in scores.values()), scores
    assert all(scores[i]["hostname"] != killed[0] for i in retried)  # on the worker that was left

    run = f"output/killable/{run_key(run_id)}"
    merged = celery_stack.read_csv(f"{run}/predictions.csv")
    files = sorted((EXAMPLE / "data").glob("*.csv"))
    expected = pd.concat([pd.read_csv(f).assign(file=f.name) for f in files], ignore_index=True)[["file", "id"]]
    pd.testing.assert_frame_equal(merged[["file", "id"]], expected)  # every row once, in order
    ledger = celery_stack.read_csv(f"{run}/processed_mini-batches.csv", keep_default_na=False)
    row = ledger[ledger["mini_batch"] == "mb-00002"].iloc[0]
    assert (row["status"], row["attempts"]) == ("succeeded", 2)
    assert len(ledger) == 5
