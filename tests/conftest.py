"""Test setup: an isolated Airflow home, and the real scoring image and example on disk.

Airflow reads its configuration when first imported, so the environment is set here, before
any test module imports it. Tests that need the scoring image or the trained example fail
(never skip) with the command that prepares them: `make test` runs those commands first.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "include" / "examples" / "iris"
SCORING_IMAGE = os.environ.get("BATCHSCORE_SCORING_IMAGE", "batchscore-scoring:latest")

_HOME = Path(tempfile.mkdtemp(prefix="batchscore-test-airflow-"))
os.environ["AIRFLOW_HOME"] = str(_HOME)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_HOME}/airflow.db"
os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO")


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
            "docker", "build", "--quiet",
            "--build-arg", f"SERVING_IMAGE={serving_image}",
            "-t", SERVING_TEST_IMAGE,
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
