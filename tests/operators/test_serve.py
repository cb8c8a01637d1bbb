"""ScoreOperator with contract serve: the serving container and its client, as Docker sees them."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import docker
import pytest

from batchscore.operators.score import ScoreOperator
from batchscore.plan import mini_batch_refs, plan_run
from tests.helpers import inputs, load, serve_endpoint

pytestmark = pytest.mark.usefixtures("airflow_db")


def test_both_containers_as_docker_runs_them_and_a_killed_task_removes_both(
    serving_test_image: str, iris_example: Path, tmp_path: Path
) -> None:
    path = serve_endpoint(
        tmp_path,
        "serve-kill",
        [
            {
                "name": "slow",
                "model": iris_example / "model" / "iris-classifier",
                "image": serving_test_image,
                "inputs": inputs(tmp_path / "in", {"a.txt": b"slow\n"}),
                "transform": {
                    "SplitType": "Line",
                    "ContentType": "application/x-batchscore-echo",
                    "Environment": {"FAULT_SLOW_MATCH": "slow", "FAULT_SLOW_SECONDS": "120"},
                },
            }
        ],
    )
    endpoint = load(path)
    d = endpoint.deployments[0]
    run_id = "run-kill"
    op = ScoreOperator(
        task_id="score",
        endpoint_name=endpoint.endpoint_name,
        deployment=d.model_dump(mode="json", by_alias=True),
        mini_batch=mini_batch_refs(plan_run(endpoint.endpoint_name, d, run_id))[0],
    )
    client = docker.from_env()
    outcome: dict = {}

    def execute() -> None:
        try:
            outcome["result"] = op.execute({"run_id": run_id})
        except BaseException as exc:  # noqa: BLE001 - checked in the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=execute)
    thread.start()
    found: list = []
    deadline = time.time() + 60
    while len(found) < 2 and time.time() < deadline:  # the server, then the client joined to it
        found = client.containers.list(filters={"label": f"batchscore.run_id={run_id}"})
        time.sleep(0.2)
    assert len(found) == 2, "the serving container and its client did not both start"
    served = next(c for c in found if c.labels.get("batchscore.role") == "serving")
    client_container = next(c for c in found if c is not served)
    server_config, client_config = served.attrs, client_container.attrs

    # The server: IMAGE serve, the model read-only at /opt/ml/model, no network, SageMaker's variable.
    assert server_config["Config"]["Cmd"] == ["serve"]
    assert server_config["HostConfig"]["NetworkMode"] == "none"
    assert [(m["Destination"], m["RW"]) for m in server_config["Mounts"]] == [("/opt/ml/model", False)]
    assert "SAGEMAKER_BATCH=true" in server_config["Config"]["Env"]
    assert not any(e.startswith("SAGEMAKER_MAX") for e in server_config["Config"]["Env"])  # not set by the job
    # The client: in the server's network namespace, hardened like a scoring container.
    assert client_config["HostConfig"]["NetworkMode"] == f"container:{served.id}"
    assert client_config["HostConfig"]["ReadonlyRootfs"] is True
    assert client_config["HostConfig"]["CapDrop"] == ["ALL"]

    time.sleep(2)  # the request is now waiting on the slow server
    op.on_kill()  # what Airflow calls when the task is killed (SIGTERM)
    thread.join(60)
    assert not thread.is_alive()
    assert "error" in outcome  # the mini-batch did not succeed
    assert client.containers.list(all=True, filters={"label": f"batchscore.run_id={run_id}"}) == []
