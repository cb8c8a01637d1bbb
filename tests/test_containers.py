"""The containers batchscore starts (batchscore.containers): what each one is given, as Docker will get it."""

from __future__ import annotations

from pathlib import Path

import pytest
from docker.types import DeviceRequest

from batchscore import containers, security
from batchscore.containers import RUNTIME_SOURCE, device_requests, explain_exit, scoring_container, serving_container, warm_worker
from batchscore.plan import run_layout
from batchscore_runtime.formats import ContainerPaths
from tests.helpers import deployment_file, load, write


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


@pytest.mark.parametrize(
    ("gpus", "expected"),
    [
        (0, []),
        (2, [DeviceRequest(count=2, capabilities=[["gpu"]])]),
        ("all", [DeviceRequest(count=-1, capabilities=[["gpu"]])]),
        (["0", "GPU-3b2f"], [DeviceRequest(device_ids=["0", "GPU-3b2f"], capabilities=[["gpu"]])]),
    ],
)
def test_gpus_become_docker_device_requests(gpus, expected) -> None:
    assert device_requests(gpus) == expected


def test_only_the_attempts_scratch_folder_is_writable(deployment, tmp_path: Path) -> None:
    """The container never mounts the mini-batch's result folder: the orchestrator alone commits there."""
    d = deployment().deployments[0]
    setup = scoring_container(d, run_layout(d, "run-1"), 7, 2, user="1:1", labels={})

    mounts = {m["Target"]: (m["Source"], m["ReadOnly"]) for m in setup.mounts}
    layout = run_layout(d, "run-1")
    assert mounts == {
        f"{ContainerPaths.RUNTIME}/batchscore_runtime": (str(RUNTIME_SOURCE), True),
        ContainerPaths.MODEL: (str(tmp_path / "model"), True),
        ContainerPaths.CODE: (str(tmp_path / "code"), True),
        ContainerPaths.INPUT: (str(tmp_path / "in"), True),
        ContainerPaths.MINI_BATCH: (str(layout.mini_batch_file(7)), True),
        ContainerPaths.OUTPUT: (str(layout.work / "scratch" / "mb-00007.try-2"), False),
    }
    assert setup.environment["AZUREML_MODEL_DIR"] == ContainerPaths.MODEL
    assert setup.environment["BATCHSCORE_MINI_BATCH"] == "mb-00007"
    assert setup.command[:3] == ["python3", "-m", "batchscore_runtime"]
    assert f"{ContainerPaths.CODE}/score.py" in setup.command
    assert setup.gets_secrets and setup.locked_down and setup.user == "1:1" and setup.network_mode == "none"


def test_a_model_file_is_mounted_inside_the_model_folder(deployment, tmp_path: Path) -> None:
    write(tmp_path / "model.pkl", "x")
    d = deployment(model=tmp_path / "model.pkl").deployments[0]
    targets = [m["Target"] for m in scoring_container(d, run_layout(d, "r"), 0, 1, user=None, labels={}).mounts]
    assert f"{ContainerPaths.MODEL}/model.pkl" in targets


def test_the_runtime_gets_the_settings_the_try_and_the_leased_gpu_count(deployment) -> None:
    d = deployment(
        settings={
            "max_concurrency_per_instance": 2,
            "output_action": "summary_only",
            "init_timeout": 90,
            "retry_settings": {"max_retries": 0, "timeout": 45},
        },
        resources={"gpus": 2},
    ).deployments[0]
    command = scoring_container(d, run_layout(d, "r"), 0, 3, user=None, labels={}, gpu_count=2).command
    options = dict(zip(command[5::2], command[6::2]))
    assert options == {
        "--input-root": "/mnt/batchscore/input",
        "--scoring-script": "/mnt/batchscore/code/score.py",
        "--output": "/mnt/batchscore/output",
        "--log-level": "info",
        "--workers": "2",
        "--timeout": "45",
        "--init-timeout": "90",
        "--output-action": "summary_only",
        "--attempt": "3",
        "--gpus": "2",  # the runtime pins each worker to one of them
    }
    assert (
        "--gpus" not in scoring_container(d, run_layout(d, "r"), 0, 1, user=None, labels={}).command
    )  # unknown count: no pinning


def test_the_lockdown_reaches_the_host_config(deployment, monkeypatch) -> None:
    """Every option of the lockdown, the memory and process limits reach Docker's host config."""
    d = deployment(resources={"memory": "1g", "pids_limit": 100}).deployments[0]
    captured: dict = {}

    class Client:  # records what Docker would be asked for; the real engine's view is tests/operators/test_security.py's
        def create_host_config(self, **kwargs):
            captured.update(kwargs)
            return kwargs

    scoring_container(d, run_layout(d, "r"), 0, 1, user="1:1", labels={}).host_config(Client())
    assert {k: captured[k] for k in ("network_mode", "mem_limit", "memswap_limit", "pids_limit", "privileged")} == {
        "network_mode": "none",
        "mem_limit": 2**30,
        "memswap_limit": 2**30,
        "pids_limit": 100,
        "privileged": False,
    }
    assert security.lockdown() == {k: captured[k] for k in ("privileged", "cap_drop", "security_opt", "read_only", "tmpfs")}
    # The user's serving container keeps its image's file system and user, but never gains privileges.
    captured.clear()
    monkeypatch.setattr(containers, "serving_environment", lambda spec: {})  # an azure deployment has no transform block
    serving_container(d, Path(d.model.path), labels={}).host_config(Client())
    assert captured["security_opt"] == [security.NO_NEW_PRIVILEGES] and captured["privileged"] is False
    assert "cap_drop" not in captured and "read_only" not in captured


def test_a_warm_worker_sees_every_file_list_and_writes_only_its_own_folders(deployment) -> None:
    d = deployment(settings={"worker_mode": "warm"}).deployments[0]
    layout = run_layout(d, "r")
    worker = warm_worker(d, layout, "w2", user="1:1", labels={}, gpu_count=0)
    writable = {m["Target"]: m["Source"] for m in worker.mounts if not m["ReadOnly"]}
    assert writable == {
        ContainerPaths.SCRATCH: str(layout.worker_scratch("w2")),
        ContainerPaths.WORKER_STATE: str(layout.workers_dir / "w2"),
    }
    assert worker.command[:4] == ["python3", "-m", "batchscore_runtime.warm", "daemon"] and "--gpus" not in worker.command
    assert worker.environment["BATCHSCORE_WORKER"] == "w2" and worker.gets_secrets


def test_exit_code_137_is_explained_once_for_every_container() -> None:
    assert explain_exit(137, "1g") == " (SIGKILL: out of memory at resources.memory = 1g, or docker kill)"
    assert explain_exit(137) == " (SIGKILL: out of memory at resources.memory, or docker kill)"
    assert explain_exit(3, "1g") == ""
