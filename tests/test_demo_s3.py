"""``python -m batchscore demo-s3``'s set-up (:mod:`batchscore.demo_s3`): the YAML it writes, the objects it uploads,
the environment it sets and restores, and its S3 server, stopped on the way out, by a signal too.

The run itself is ``python -m batchscore run``'s (tests/test_signals.py, tests/test_localairflow.py); here the
example is a stand-in (a model file and three input files) in the test's folder.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from batchscore import demo_s3
from tests.conftest import REPO


def _example(root: Path) -> Path:
    """A copy of dags/deployments/iris-batch.yaml beside a stand-in model folder and input folder."""
    (root / "model" / "iris-classifier").mkdir(parents=True)
    (root / "model" / "iris-classifier" / "model.joblib").write_bytes(b"not really a model")
    (root / "data").mkdir()
    for i in range(3):
        (root / "data" / f"iris-{i:03d}.csv").write_text(f"id,sepal_length\n{i},5.1\n")
    doc = yaml.safe_load((REPO / "dags" / "deployments" / "iris-batch.yaml").read_text())
    doc["model"]["path"], doc["input"]["path"] = "../model", "../data"  # relative to the YAML's folder
    doc["code_configuration"]["code"] = str(REPO / "include" / "examples" / "iris" / "code")
    (root / "deployments").mkdir()
    source = root / "deployments" / "iris-batch.yaml"
    source.write_text(yaml.safe_dump(doc, sort_keys=False))
    return source


def test_the_demo_yaml_puts_model_input_and_output_on_the_bucket_each_with_the_connection(tmp_path: Path) -> None:
    source = _example(tmp_path)

    plan = demo_s3.plan_demo(source)

    assert plan.doc["model"] == {
        "name": "iris-classifier", "path": "s3://batchscore-demo/models/iris/", "connection": "batchscore_s3",
    }  # fmt: skip
    assert plan.doc["input"] == {"path": "s3://batchscore-demo/data/iris/", "pattern": "*.csv", "connection": "batchscore_s3"}
    assert plan.doc["output"] == {"path": "s3://batchscore-demo/output/iris-batch/", "connection": "batchscore_s3"}
    assert plan.output_uri == "s3://batchscore-demo/output/iris-batch/"
    assert plan.uploads == [(tmp_path / "model", "models/iris/"), (tmp_path / "data", "data/iris/")]
    assert plan.doc["code_configuration"]["code"] == str(REPO / "include" / "examples" / "iris" / "code")
    assert plan.doc["settings"] == yaml.safe_load(source.read_text())["settings"]  # the rest as it was
    assert "password" not in yaml.safe_dump(plan.doc) and "login" not in yaml.safe_dump(plan.doc)


def test_an_unprepared_example_says_to_run_make_example(tmp_path: Path) -> None:
    source = _example(tmp_path)
    for f in (tmp_path / "data").iterdir():
        f.unlink()

    with pytest.raises(SystemExit, match=r"input\.path is .*/data, which has no files; prepare the example first with `make exa"):
        demo_s3.plan_demo(source)


@pytest.mark.s3
def test_the_demo_uploads_the_example_writes_its_yaml_and_undoes_everything_on_the_way_out(tmp_path: Path, monkeypatch) -> None:
    source = _example(tmp_path / "example")
    monkeypatch.delenv(demo_s3.CONNECTION_ENV, raising=False)
    monkeypatch.setenv("BATCHSCORE_DEPLOYMENTS_DIR", "/before")
    monkeypatch.delenv("BATCHSCORE_SCRATCH_DIR", raising=False)
    home = tmp_path / "home"
    (home / "s3").mkdir(parents=True)
    (home / "s3" / "left-from-last-time").write_text("")
    said: list[str] = []

    with demo_s3.s3_demo(home, source, say=said.append) as demo:
        client = demo.server.client()
        keys = demo_s3.list_keys(client, "batchscore-demo", "")
        assert [k for k, _ in keys] == [
            "data/iris/iris-000.csv", "data/iris/iris-001.csv", "data/iris/iris-002.csv",
            "models/iris/iris-classifier/model.joblib",
        ]  # fmt: skip
        assert not (home / "s3" / "left-from-last-time").exists()  # a fresh server
        assert os.environ["BATCHSCORE_DEPLOYMENTS_DIR"] == str(home / "deployments")
        assert os.environ["BATCHSCORE_SCRATCH_DIR"] == str(home / "scratch")
        assert os.environ[demo_s3.CONNECTION_ENV] == demo.server.connection_json()
        written = yaml.safe_load(demo.deployment_file.read_text())
        assert demo.deployment_file == home / "deployments" / "iris-batch.yaml"
        assert written == demo_s3.plan_demo(source).doc
        secret = demo.server.credentials()[1]
        assert secret not in demo.deployment_file.read_text() and not any(secret in line for line in said)
        assert "nothing: the run wrote no object there" in demo.describe_output()
        client.put_object(Bucket="batchscore-demo", Key="output/iris-batch/run-1/predictions.csv", Body=b"a,b\n")
        client.put_object(Bucket="batchscore-demo", Key="output/iris-batch/run-1/_batchscore/plan.json", Body=b"{}")
        described = demo.describe_output()
        assert "s3://batchscore-demo/output/iris-batch/run-1/predictions.csv          4 bytes" in described
        assert "(and 1 work file(s) of the run under _batchscore/" in described and "plan.json" not in described
        env_file = demo.write_env_file()
        assert env_file.stat().st_mode & 0o777 == 0o600
        assert f"AWS_ENDPOINT_URL={demo.server.endpoint_url}\n" in env_file.read_text()
        assert f". {env_file}; set +a; aws s3 ls --recursive s3://batchscore-demo/output/iris-batch/" in demo.how_to_list()
        proc = demo.server.proc

    assert proc is not None and proc.poll() is not None  # stopped
    assert not env_file.exists()  # its keys died with the server
    assert os.environ["BATCHSCORE_DEPLOYMENTS_DIR"] == "/before"
    assert "BATCHSCORE_SCRATCH_DIR" not in os.environ and demo_s3.CONNECTION_ENV not in os.environ
    assert said[0].startswith(f"Starting a local S3 server (SeaweedFS: weed mini) in {home / 's3'}")
    assert "  uploaded 3 file(s) of" in said[2] and said[2].endswith("to s3://batchscore-demo/data/iris/")


# The demo's set-up in a process of its own, as `python -m batchscore demo-s3` has it (shutdown installed first).
_HOLDING = """
import sys, time
from pathlib import Path
from batchscore import demo_s3, shutdown

shutdown.install()
try:
    with demo_s3.s3_demo(Path(sys.argv[1]), Path(sys.argv[2])) as demo:
        print("weed", demo.server.proc.pid, flush=True)
        while True:
            time.sleep(0.2)
except shutdown.Interrupted as stopped:
    shutdown.say(shutdown.report())
    sys.exit(stopped.exit_status)
"""


@pytest.mark.s3
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_the_demo_stops_its_s3_server_and_says_so(tmp_path: Path, sig: signal.Signals) -> None:
    source = _example(tmp_path / "example")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "plugins"), str(REPO / "include")])}
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDING, str(tmp_path / "home"), str(source)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = ""
        while not line.startswith("weed "):
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        weed = psutil.Process(int(line.split()[1]))
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    assert proc.returncode == 128 + sig
    assert f"Interrupted by {sig.name}: stopped SeaweedFS" in err
    deadline = time.monotonic() + 10
    while weed.is_running() and weed.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not weed.is_running() or weed.status() == psutil.STATUS_ZOMBIE
