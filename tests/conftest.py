"""Test setup: an isolated Airflow home, and the real scoring image and example on disk.

Airflow reads its configuration when first imported, so the environment is set here, before
any test module imports it. Tests that need the scoring image or the trained example fail
(never skip) with the command that prepares them: `make test` runs those commands first.

An interrupted or timed-out test leaves nothing running for the next one: SIGTERM and SIGHUP
(a CI runner's cancel) unwind the session as Ctrl-C does (:func:`batchscore.shutdown.install`;
a second signal makes the stops kill at once), pytest-timeout's failure unwinds the test, and
the ``with`` blocks and fixtures stop what they started (LocalAirflow also removes the
containers of its runs; ``run_dag`` those of its dag.test() run). At the end of the session,
whatever is left anyway is removed and named: containers that mount a folder of the session's
temporary directory, and processes that carry the session's marker in their environment.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from batchscore import shutdown
from batchscore.localservices import SeaweedS3
from tests.helpers import S3_CONN

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "include" / "examples" / "iris"
SCORING_IMAGE = os.environ.get("BATCHSCORE_SCORING_IMAGE", "batchscore-scoring:latest")

_HOME = Path(tempfile.mkdtemp(prefix="batchscore-test-airflow-"))
os.environ["AIRFLOW_HOME"] = str(_HOME)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_HOME}/airflow.db"
os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO")

shutdown.install()
#: In the environment of every process the session starts (see the module's docstring).
SESSION_MARK = ("BATCHSCORE_TEST_SESSION", uuid.uuid4().hex)
os.environ[SESSION_MARK[0]] = SESSION_MARK[1]


#: Fixtures that need the Docker engine and an image that `make test` builds (the example's fixtures
#: depend on them): a test that uses one is a Docker test, marked ``docker`` here, so that
#: ``make test-unit`` (``-m "not docker ..."``) never waits for an image it does not have.
DOCKER_FIXTURES = frozenset({"scoring_image", "airflow_image", "serving_image"})


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if DOCKER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.docker)


@pytest.fixture(scope="session", autouse=True)
def _nothing_left_behind(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[None]:
    """At the end of the session (interrupted or not): remove what its tests left, and name it."""
    basetemp = tmp_path_factory.getbasetemp()
    yield
    left = []
    try:
        if names := shutdown.remove_containers(shutdown.containers_mounting([basetemp])):
            left.append(f"container(s) {', '.join(sorted(names))}")
    except Exception as exc:  # noqa: BLE001 - no Docker engine: the Docker tests failed already
        left.append(f"(containers not checked: {exc})")
    procs = shutdown.marked_processes(*SESSION_MARK)
    holders = [p for p in procs if shutdown.is_gpu_holder(p)]
    shutdown.end_gpu_holders(holders, timeout=10)  # their containers are gone: they end by themselves
    tracker = _resource_tracker()
    rest = [p for p in procs if p not in holders and p.pid not in tracker]
    described = [_described(p) for p in rest]  # before they end
    for p in rest:
        p.terminate()
    _, alive = psutil.wait_procs(rest, timeout=0 if shutdown.forced() else 10)
    for p in alive:
        p.kill()
    if rest:
        left.append(f"process(es) {', '.join(described)}")
    if left:  # on the terminal, not in the last test's captured output
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            print(f"\ntests left running, now removed: {'; '.join(left)}", flush=True)


def _resource_tracker() -> set[int]:
    """multiprocessing's resource tracker of this process (the runtime's tests spawn workers from it):
    not a test's leftover, it ignores SIGTERM and ends with the session."""
    from multiprocessing import resource_tracker

    pid = getattr(getattr(resource_tracker, "_resource_tracker", None), "_pid", None)
    return {pid} if pid else set()


def _described(process: psutil.Process) -> str:
    """``pid (command line)``, for the line naming what the tests left running."""
    try:
        command = " ".join(process.cmdline())
    except psutil.Error:  # gone meanwhile
        command = ""
    return f"{process.pid} ({command[:120]})" if command else str(process.pid)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """The session's S3 server: SeaweedFS's ``weed mini`` on free ports of 127.0.0.1 (about 1 s to start).

    Stopped at the end of the session, before the sweep of ``_nothing_left_behind`` (set up first, so
    torn down last). Each test makes its own bucket (:meth:`SeaweedS3.create_bucket`) and its own
    Airflow connection (``AIRFLOW_CONN_<ID>`` = :meth:`SeaweedS3.connection_json`).
    """
    with SeaweedS3(tmp_path_factory.mktemp("s3-server")) as server:
        yield server


@pytest.fixture()
def s3(s3_server, tmp_path: Path, monkeypatch, request) -> dict[str, Any]:
    """A fresh bucket on :func:`s3_server`, the connection ``s3_test`` to it, and a scratch folder of the test's own."""
    bucket = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    s3_server.create_bucket(bucket)
    monkeypatch.setenv(f"AIRFLOW_CONN_{S3_CONN.upper()}", s3_server.connection_json())
    monkeypatch.setenv("BATCHSCORE_SCRATCH_DIR", str(tmp_path / "scratch"))
    return {"bucket": bucket, "server": s3_server, "uri": f"s3://{bucket}"}


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated metadata database for dag.test() runs."""
    subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        check=True,
        capture_output=True,
        env=os.environ.copy(),
    )
    return _HOME


def _built(image: str, make_target: str) -> str:
    """``image``, which must exist; else the test fails naming the make target that builds it."""
    found = subprocess.run(["docker", "image", "inspect", image], capture_output=True)
    if found.returncode != 0:
        pytest.fail(f"image {image} does not exist; build it with `make {make_target}`")
    return image


@pytest.fixture(scope="session")
def scoring_image() -> str:
    """The scoring image, built by `make images` (docker/build-images.sh)."""
    return _built(SCORING_IMAGE, "images")


@pytest.fixture(scope="session")
def airflow_image() -> str:
    """The docker-compose stack's Airflow image, built by `make images-airflow` (docker/build-images.sh --airflow)."""
    return _built(os.environ.get("BATCHSCORE_AIRFLOW_IMAGE", "batchscore-airflow:latest"), "images-airflow")


@pytest.fixture(scope="session")
def iris_example(scoring_image: str) -> Path:
    """The iris example with its trained model and input files, made by `make example`."""
    model = EXAMPLE / "model" / "iris-classifier" / "model.joblib"
    if not (model.parent / "model.pkl").is_file():
        model = model.parent / "model.pkl"
    data = sorted((EXAMPLE / "data").glob("*.csv")) if (EXAMPLE / "data").is_dir() else []
    if not model.is_file() or len(data) != 15:
        pytest.fail(f"the iris example is not prepared ({model} or 15 files in {EXAMPLE / 'data'}); run `make example`")
    return EXAMPLE


@pytest.fixture()
def iris_inputs(iris_example: Path, tmp_path: Path) -> Path:
    """A private copy of the example's input files, which a test may change."""
    target = tmp_path / "inputs"
    shutil.copytree(iris_example / "data", target)
    return target


SERVING_IMAGE = "batchscore-iris-serve:latest"
# BATCHSCORE_SERVE_TEST_IMAGE: another tag, for checkouts whose tests run side by side on one engine.
SERVING_TEST_IMAGE = os.environ.get("BATCHSCORE_SERVE_TEST_IMAGE", "batchscore-serve-test:latest")


@pytest.fixture(scope="session")
def serving_image() -> str:
    """The example's SageMaker serving image, built by `make images-serve` (part of `make example`)."""
    return _built(SERVING_IMAGE, "images-serve")


@pytest.fixture(scope="session")
def serving_test_image(serving_image: str) -> str:
    """The serving image with fault injection (tests/images/serve-test), built here on demand.

    Docker's layer cache makes the build take about a second once it was built.
    """
    built = subprocess.run(
        [
            "docker",
            "build",
            "--quiet",
            "--build-arg",
            f"SERVING_IMAGE={serving_image}",
            "-t",
            SERVING_TEST_IMAGE,
            str(REPO / "tests" / "images" / "serve-test"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "DOCKER_BUILDKIT": "0"},
        timeout=600,
    )
    if built.returncode != 0:
        pytest.fail(f"docker build of {SERVING_TEST_IMAGE} failed:\n{built.stdout}\n{built.stderr}")
    return SERVING_TEST_IMAGE
