"""docker-compose.yaml: valid for the Compose tool installed here, and consistent with itself.

``docker-compose config`` validates and resolves the file (anchors, merges, variables) the way
``up`` would; the tests then read the resolved file. Bringing the stack up needs the official
Postgres and Redis images, which cannot be pulled here: tests/test_celery.py runs the same
components with Debian's PostgreSQL and Redis instead.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

AIRFLOW_SERVICES = {
    "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-worker", "airflow-triggerer", "airflow-init",
}  # fmt: skip
SETTINGS = {
    "AIRFLOW_UID": "1234",
    "DOCKER_GID": "998",
    "AIRFLOW_JWT_SECRET": "jwt-secret-of-the-test",
    "AIRFLOW_API_SECRET_KEY": "api-secret-of-the-test",
}


def compose(*args: str, env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``docker-compose ARGS`` on the project's file with ``env`` alone (a developer's .env is not read)."""
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.fail("docker-compose is not installed; apt-get install docker-compose")
    empty = tmp_path / "empty.env"
    empty.touch()
    return subprocess.run(
        [tool, "--env-file", str(empty), "--project-directory", str(REPO), "-f", str(REPO / "docker-compose.yaml"), *args],
        capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", **env},
    )  # fmt: skip


@pytest.fixture
def settings(tmp_path: Path) -> dict[str, str]:
    return {**SETTINGS, "BATCHSCORE_HOST_DIR": str(REPO), "BATCHSCORE_DATA_DIR": str(tmp_path / "data"), "TMP": str(tmp_path)}


def _config(settings: dict[str, str], *args: str) -> dict:
    done = compose(*args, "config", env=settings, tmp_path=Path(settings["TMP"]))
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def _command(service: dict) -> list[str]:
    command = service["command"]
    return command.split() if isinstance(command, str) else command


def _binds(service: dict) -> dict[str, str]:
    """target -> source of a service's bind mounts, as ``config`` resolves them (short or long syntax)."""
    binds = {}
    for v in service.get("volumes", []):
        if isinstance(v, str):
            source, _, rest = v.partition(":")
            binds[rest.split(":")[0]] = source
        elif v.get("type") == "bind":
            binds[v["target"]] = v["source"]
    return binds


def test_the_stack_has_the_official_services_and_every_airflow_service_runs_batchscores_image(settings) -> None:
    config = _config(settings)
    assert set(config["services"]) == AIRFLOW_SERVICES | {"postgres", "redis", "airflow-cli", "airflow-worker-gpu"}
    assert config["services"]["airflow-worker-gpu"]["profiles"] == ["gpu"]  # started only when asked for
    assert config["services"]["airflow-cli"]["profiles"] == ["debug"]
    for name in AIRFLOW_SERVICES:
        service = config["services"][name]
        assert service["image"] == "batchscore-airflow:latest", name
        assert service["environment"]["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert service["environment"]["AIRFLOW__API_AUTH__JWT_SECRET"] == "jwt-secret-of-the-test", name
    assert _command(config["services"]["airflow-worker"]) == ["celery", "worker", "--queues", "default"]
    assert config["services"]["airflow-apiserver"]["depends_on"]["airflow-init"] == {
        "condition": "service_completed_successfully"
    }


def test_every_airflow_service_maps_exactly_the_folders_it_mounts_to_the_docker_host(settings) -> None:
    config = _config(settings, "--profile", "gpu")
    for name, service in config["services"].items():
        if not name.startswith("airflow-"):
            continue
        mapping = dict(entry.split("=") for entry in service["environment"]["BATCHSCORE_HOST_PATHS"].split(","))
        assert mapping == {"/opt/batchscore": str(REPO), "/data": settings["BATCHSCORE_DATA_DIR"]}, name
        binds = _binds(service)
        for worker, host in mapping.items():
            assert binds[worker] == host, f"{name}: {worker} is mounted from {binds.get(worker)}, mapped to {host}"


def test_only_the_celery_workers_get_the_docker_socket_with_its_group(settings) -> None:
    config = _config(settings, "--profile", "gpu")
    for name, service in config["services"].items():
        has_socket = _binds(service).get("/var/run/docker.sock") == "/var/run/docker.sock"
        is_worker = name in ("airflow-worker", "airflow-worker-gpu")
        assert has_socket == is_worker, name
        if is_worker:
            assert service["group_add"] == ["998"], name
            assert service["user"] == "1234:0", name
            assert _binds(service)["/tmp/batchscore-gpu-locks"] == "/tmp/batchscore-gpu-locks", name
    init = config["services"]["airflow-init"]  # makes the lease folder writable for every worker's uid
    assert _binds(init)["/tmp/batchscore-gpu-locks"] == "/tmp/batchscore-gpu-locks"
    assert "chmod 1777 /tmp/batchscore-gpu-locks" in " ".join(_command(init))
    gpu = config["services"]["airflow-worker-gpu"]
    assert _command(gpu) == ["celery", "worker", "--queues", "gpu"]
    assert gpu["environment"]["BATCHSCORE_GPUS"] == "0"


@pytest.mark.parametrize(
    ("missing", "message"),
    [
        ("BATCHSCORE_HOST_DIR", "run make compose-env: BATCHSCORE_HOST_DIR is this folder's absolute path on the Docker host"),
        ("DOCKER_GID", "run make compose-env: DOCKER_GID is the group of /var/run/docker.sock"),
        ("AIRFLOW_JWT_SECRET", "run make compose-env: it writes .env with a random AIRFLOW_JWT_SECRET"),
    ],
)
def test_a_missing_setting_stops_compose_with_what_to_run(settings, missing: str, message: str) -> None:
    done = compose("config", env={k: v for k, v in settings.items() if k != missing}, tmp_path=Path(settings["TMP"]))
    assert done.returncode != 0
    assert message in done.stderr
