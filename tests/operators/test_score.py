"""ScoreOperator: one mini-batch scored in a real container, its GPUs, its time limit."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from docker.types import DeviceRequest

from batchscore.errors import ScoringError
from batchscore.plan import run_layout
from tests.helpers import deployment_file, load, planned_score_operator, write


@pytest.fixture()
def deployment(tmp_path: Path):
    (tmp_path / "model").mkdir()
    write(tmp_path / "code" / "score.py", "def run(mb):\n    return mb\n")
    write(tmp_path / "in" / "a.csv", "x\n")

    def make(**kwargs):
        kwargs.setdefault("model", tmp_path / "model")
        path = deployment_file(tmp_path / "yaml", code=tmp_path / "code", inputs=tmp_path / "in", **kwargs)
        return load(path)

    return make


@pytest.mark.docker
def test_a_gpu_request_on_a_host_without_gpus_fails_naming_the_setting(
    deployment, scoring_image: str, airflow_db, tmp_path: Path, monkeypatch
) -> None:
    # No GPU exists on this machine or in CI: the request is made of the real Docker engine,
    # which refuses it; on a GPU host the same request is what starts the container there.
    # BATCHSCORE_GPUS stands in for the host's GPU list, which nvidia-smi would give there.
    monkeypatch.setenv("BATCHSCORE_GPUS", "0,1")
    monkeypatch.setenv("BATCHSCORE_GPU_LOCK_DIR", str(tmp_path / "locks"))
    op = planned_score_operator(deployment(resources={"gpus": 1}), "run-gpu")

    with pytest.raises(ScoringError) as info:
        op.execute({"run_id": "run-gpu"})

    assert op._executor.gpus.device_requests == [DeviceRequest(device_ids=["0"], capabilities=[["gpu"]])]  # leased, pinned

    assert str(info.value) == (
        "mb-00000: Docker cannot give the container the GPUs it asks for (resources.gpus: 1): could not select "
        'device driver "" with capabilities: [[gpu]]. Install the NVIDIA Container Toolkit on the Docker host, '
        "or set resources.gpus to 0"
    )


@pytest.mark.docker
def test_the_operator_scores_one_mini_batch_in_a_real_container(deployment, scoring_image: str, airflow_db) -> None:
    endpoint = deployment()
    op = planned_score_operator(endpoint, "run-1")

    assert op.execute({"run_id": "run-1"}) == {"mini_batch": "mb-00000", "rows": 1, "failed_items": 0}
    status = run_layout(endpoint.deployments[0], "run-1").mini_batch_dir(0).read_status()
    assert status.succeeded and status.rows == 1


@pytest.mark.docker
def test_a_container_that_stops_answering_is_killed_and_its_attempt_recorded(
    deployment, scoring_image: str, airflow_db, tmp_path: Path, monkeypatch
) -> None:
    # The runtime enforces init_timeout and timeout itself; this is the orchestrator's last
    # resort for a container that does not end. The grace is shortened so it fires first.
    import subprocess

    from batchscore.scoring import contract

    monkeypatch.setattr(contract, "CONTAINER_GRACE_SECONDS", -3)  # backstop: 5 + 1 - 3 = 3 s
    write(tmp_path / "code" / "score.py", "import time\ndef init():\n    time.sleep(60)\ndef run(mb):\n    return mb\n")
    endpoint = deployment(settings={"init_timeout": 5, "retry_settings": {"max_retries": 0, "timeout": 1}})
    op = planned_score_operator(endpoint, "run-hang")

    with pytest.raises(ScoringError) as info:
        op.execute({"run_id": "run-hang"})

    assert str(info.value) == (
        "mb-00000 failed: ContainerTimeout: the scoring container ran past 3 s (settings.init_timeout 5 + "
        "retry_settings.timeout 1 + -3 s) without ending and was killed"
    )
    status = run_layout(endpoint.deployments[0], "run-hang").mini_batch_dir(0).read_status()
    assert status.state == "failed" and status.error.type == "ContainerTimeout"  # the ledger shows the attempt
    left = subprocess.run(
        ["docker", "ps", "-aq", "--filter", "label=batchscore.run_id=run-hang"], capture_output=True, text=True, check=True
    ).stdout
    assert left == ""  # killed and removed, not left running


@pytest.mark.docker
def test_a_mini_batch_over_its_memory_limit_fails_naming_the_setting(
    deployment, scoring_image: str, airflow_db, tmp_path: Path
) -> None:
    # A real limit and a real out-of-memory kill: run() asks for far more than resources.memory.
    write(
        tmp_path / "code" / "score.py",
        "def run(mb):\n    hog = bytearray(1024 * 1024 * 1024)\n    return mb\n",
    )
    endpoint = deployment(resources={"memory": "160m"})
    op = planned_score_operator(endpoint, "run-oom")

    with pytest.raises(ScoringError) as info:
        op.execute({"run_id": "run-oom"})

    assert str(info.value) == (
        "mb-00000 failed: OutOfMemory: worker 1/1 of mb-00000 was killed by the kernel's out-of-memory killer "
        "during run(): the container reached its memory limit of 160.0 MiB (resources.memory); raise "
        "resources.memory, or give each mini-batch fewer files (settings.mini_batch_size)"
    )
    status = run_layout(endpoint.deployments[0], "run-oom").mini_batch_dir(0).read_status()
    assert status.error.type == "OutOfMemory"  # the ledger and errors.csv say so too


@pytest.mark.docker
def test_a_container_left_running_by_an_earlier_try_is_removed_before_the_retry_scores(
    deployment, scoring_image: str, airflow_db
) -> None:
    # Try 1's Airflow worker died (a killed Celery worker): its container, labelled with the run
    # and the mini-batch, still runs on this engine. Try 2 removes it, then scores.
    endpoint = deployment()
    d = endpoint.deployments[0]
    labels = {"batchscore.endpoint": endpoint.endpoint_name, "batchscore.deployment": d.name,
              "batchscore.run_id": "run-orphan", "batchscore.mini_batch": "mb-00000"}  # fmt: skip

    def sleeper(labels: dict[str, str]) -> str:
        run = ["docker", "run", "-d", "--network", "none", *(f"--label={k}={v}" for k, v in labels.items())]
        return subprocess.run([*run, scoring_image, "sleep", "300"], check=True, capture_output=True, text=True).stdout.strip()

    orphan = sleeper(labels)
    other = sleeper({**labels, "batchscore.mini_batch": "mb-00001"})  # another mini-batch's container of the same run stays
    try:
        op = planned_score_operator(endpoint, "run-orphan")
        assert op.execute({"run_id": "run-orphan", "ti": SimpleNamespace(try_number=2)})["rows"] == 1
        gone = subprocess.run(["docker", "inspect", orphan], capture_output=True)
        kept = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", other], capture_output=True, text=True)
        assert gone.returncode != 0
        assert kept.stdout.strip() == "true"
        assert run_layout(d, "run-orphan").mini_batch_dir(0).read_status().attempt == 2
    finally:
        subprocess.run(["docker", "rm", "-f", orphan, other], capture_output=True)


@pytest.mark.docker
def test_an_image_that_is_not_on_the_docker_host_fails_the_mini_batch_naming_the_setting(deployment, airflow_db) -> None:
    # No registry is ever used: a missing image is the user's to build or load, and the ledger shows the try.
    endpoint = deployment(image="batchscore-no-such-image:1")
    op = planned_score_operator(endpoint, "run-noimage")

    with pytest.raises(ScoringError) as info:
        op.execute({"run_id": "run-noimage"})

    assert str(info.value).startswith(
        "mb-00000 failed: ImageMissing: the image 'batchscore-no-such-image:1' (environment.image) is not on this Docker host: "
    )
    assert str(info.value).endswith("; build or load it there (docker load), no registry is used")
    status = run_layout(endpoint.deployments[0], "run-noimage").mini_batch_dir(0).read_status()
    assert (status.state, status.error.type) == ("failed", "ImageMissing")
