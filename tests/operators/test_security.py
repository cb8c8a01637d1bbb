"""Security of the scoring containers: each default proved on a real container, and the checks around it.

The Docker tests start the real operator on a real mini-batch with a scoring script whose
``init()`` waits until the test has read the running container's configuration through the
Docker engine (``docker inspect``'s HostConfig); the script then reports, from inside, what it
could and could not do, and the test reads that from the committed result.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from pathlib import Path

import docker
import pandas as pd
import pytest
from docker.types import Mount

from batchscore import security
from batchscore.containers import scoring_container
from batchscore.errors import (
    ContainerSecurityError,
    DeploymentSpecError,
    RunParamError,
    ScoringError,
    SecretUnavailableError,
)
from batchscore.operators.score import ScoreOperator
from batchscore.plan import run_layout
from batchscore.run_params import apply_run_params
from batchscore.secret_environment import resolve_secrets
from batchscore.spec import SecretRef
from tests.helpers import deployment_file, load, planned_score_operator, write

SECRET = "tok-9f3c1d7e-not-for-logs"
SECRET_SHA = hashlib.sha256(SECRET.encode()).hexdigest()

#: Waits in init() until the test has inspected the container, then reports what it can do.
PROBE = """
import hashlib, json, os, socket, time
from pathlib import Path

import pandas as pd


def init():
    deadline = time.time() + 60
    while not Path("/mnt/batchscore/input/inspected").exists() and time.time() < deadline:
        time.sleep(0.1)


def _can_write(path):
    try:
        with open(path, "w") as fh:
            fh.write("x")
        os.unlink(path)
        return True
    except OSError:
        return False


def _network():
    try:
        socket.create_connection(("1.1.1.1", 53), timeout=2).close()
        return "connected"
    except OSError as exc:
        return type(exc).__name__ + ": " + str(exc)


def run(mini_batch):
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    token = os.environ.get("TOKEN")
    print("the script prints its secret:", token, flush=True)
    interfaces = sorted(name for _, name in socket.if_nameindex())
    return pd.DataFrame([{
        "uid": os.getuid(),
        "gid": os.getgid(),
        "cap_eff": status["CapEff"].strip(),
        "no_new_privs": status["NoNewPrivs"].strip(),
        "root_fs_writable": _can_write("/probe"),
        "tmp_writable": _can_write("/tmp/probe"),
        "input_writable": _can_write("/mnt/batchscore/input/probe"),
        "model_writable": _can_write("/mnt/batchscore/model/probe"),
        "code_writable": _can_write("/mnt/batchscore/code/probe"),
        "output_writable": _can_write("/mnt/batchscore/output/probe"),
        "docker_socket": os.path.exists("/var/run/docker.sock") or os.path.exists("/run/docker.sock"),
        "interfaces": ",".join(interfaces),
        "network": _network(),
        "secret_sha": hashlib.sha256(token.encode()).hexdigest() if token else None,
        "files": len(mini_batch),
    }])
"""


@pytest.fixture()
def make(tmp_path: Path):
    (tmp_path / "model").mkdir()
    write(tmp_path / "code" / "score.py", PROBE)
    write(tmp_path / "in" / "a.csv", "x\n1\n")

    def make(**kwargs):
        kwargs.setdefault("model", tmp_path / "model")
        kwargs.setdefault("code", tmp_path / "code")
        kwargs.setdefault("inputs", tmp_path / "in")
        return load(deployment_file(tmp_path / "yaml", **kwargs))

    return make


def _run_and_inspect(op: ScoreOperator, run_id: str, inputs: Path) -> tuple[dict, dict]:
    """Execute ``op``; while its container waits in init(), read its configuration from Docker.

    Returns (``docker inspect`` of the container, what the script reported from inside).
    """
    client = docker.from_env()
    outcome: dict = {}

    def execute() -> None:
        try:
            outcome["result"] = op.execute({"run_id": run_id})
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=execute)
    thread.start()
    attrs = None
    deadline = time.time() + 60
    while attrs is None and time.time() < deadline and thread.is_alive():
        found = client.containers.list(filters={"label": f"batchscore.run_id={run_id}"})
        if found:
            attrs = client.api.inspect_container(found[0].id)
        else:
            time.sleep(0.1)
    (inputs / "inspected").write_text("")
    thread.join(120)
    if "error" in outcome:
        raise outcome["error"]
    assert attrs is not None, "the scoring container was never seen running"
    layout = run_layout(op.spec, run_id)
    status = layout.mini_batch_dir(0).read_status()
    table = pd.read_parquet(layout.mini_batch_dir(0).result_path(status))
    return attrs, table.iloc[0].to_dict()


# --------------------------------------------------------------------------- real containers


@pytest.mark.docker
def test_a_scoring_container_is_locked_down_by_default(
    make, scoring_image: str, airflow_db, tmp_path: Path, monkeypatch, caplog, capfd
) -> None:
    monkeypatch.delenv(security.CONTAINER_USER_ENV, raising=False)
    monkeypatch.setenv("AIRFLOW_VAR_BATCHSCORE_TEST_TOKEN", SECRET)  # an Airflow variable (env secrets backend)
    endpoint = make(settings={"secret_environment": {"TOKEN": {"variable": "batchscore_test_token"}}})
    op = planned_score_operator(endpoint, "run-sec")

    attrs, seen = _run_and_inspect(op, "run-sec", tmp_path / "in")

    host = attrs["HostConfig"]
    expected_user = "65534:65534" if os.getuid() == 0 else f"{os.getuid()}:{os.getgid()}"
    assert attrs["Config"]["User"] == expected_user  # never root
    assert host["NetworkMode"] == "none"
    assert host["Privileged"] is False
    assert host["CapDrop"] == ["ALL"] and not host["CapAdd"]
    assert host["SecurityOpt"] == ["no-new-privileges:true"]
    assert host["ReadonlyRootfs"] is True
    assert host["Tmpfs"] == {"/tmp": "rw,nosuid,nodev"}
    assert host["PidsLimit"] == 4096
    assert (host["Memory"], host["MemorySwap"]) == (0, 0)  # no memory limit unless resources.memory
    mounts = {m["Destination"]: (m["Source"], m["RW"]) for m in attrs["Mounts"]}
    assert [target for target, (_, rw) in mounts.items() if rw] == ["/mnt/batchscore/output"]
    # ... and that is the attempt's scratch folder, never the mini-batch's result folder.
    assert str(run_layout(op.spec, "run-sec").attempt_scratch(0, 1)) == mounts["/mnt/batchscore/output"][0]
    assert not any("docker.sock" in source for source, _ in mounts.values())

    # ... and from inside, the container can do only what it should.
    assert (seen["uid"], seen["gid"]) == tuple(int(i) for i in expected_user.split(":"))
    assert seen["cap_eff"] == "0000000000000000"
    assert seen["no_new_privs"] == "1"
    assert not seen["root_fs_writable"] and seen["tmp_writable"]
    assert not (seen["input_writable"] or seen["model_writable"] or seen["code_writable"])
    assert seen["output_writable"]  # its scratch folder is writable for the unprivileged user
    assert not seen["docker_socket"]
    assert seen["interfaces"] == "lo" and seen["network"] != "connected"
    assert seen["secret_sha"] == SECRET_SHA  # the Airflow variable reached the container

    # The secret is nowhere Airflow shows or stores: not in the log (the script's print of it is
    # masked), not in the rendered template fields, not in the serialized operator.
    logged = caplog.text + "".join(capfd.readouterr())
    assert "the script prints its secret" in logged
    assert SECRET not in logged
    # Airflow's own masker knows it too: in a real task its supervisor redacts the task log with it.
    from airflow.sdk._shared.secrets_masker import redact

    assert redact(f"value {SECRET}") == "value ***"
    assert SECRET not in json.dumps({f: getattr(op, f) for f in op.template_fields}, default=str)
    assert SECRET not in json.dumps(vars(op), default=str)  # the operator keeps no copy: only the container got it
    from airflow.serialization.serialized_objects import BaseSerialization

    assert SECRET not in json.dumps(BaseSerialization.serialize(op), default=str)

    # The result folder is the orchestrator's alone: everything in it was written by this process
    # (the container's result was copied in), and the scratch folder is gone after a success.
    layout = run_layout(op.spec, "run-sec")
    result_dir = layout.mini_batch_dir(0).path
    assert sorted(p.name.split("-")[0] for p in result_dir.iterdir()) == ["attempt.json", "output", "result", "status.json"]
    assert {p.stat().st_uid for p in result_dir.rglob("*")} | {result_dir.stat().st_uid} == {os.getuid()}
    assert not layout.attempt_scratch(0, 1).exists()


@pytest.mark.docker
def test_network_memory_and_processes_follow_resources(make, scoring_image: str, airflow_db, tmp_path: Path) -> None:
    endpoint = make(resources={"network": True, "memory": "256m", "shm_size": "128m", "pids_limit": 256})
    op = planned_score_operator(endpoint, "run-res")

    attrs, seen = _run_and_inspect(op, "run-res", tmp_path / "in")

    host = attrs["HostConfig"]
    assert host["NetworkMode"] in ("default", "bridge")  # Docker's default bridge
    assert (host["Memory"], host["MemorySwap"]) == (256 * 2**20, 256 * 2**20)  # no swap beyond the limit
    assert host["ShmSize"] == 128 * 2**20
    assert host["PidsLimit"] == 256
    assert host["CapDrop"] == ["ALL"] and host["ReadonlyRootfs"] is True  # the rest stays locked
    assert "eth0" in seen["interfaces"].split(",")


@pytest.mark.docker
def test_a_configured_container_user_is_used(make, scoring_image: str, airflow_db, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(security.CONTAINER_USER_ENV, "1000:1000")  # the image's own `scorer`
    op = planned_score_operator(make(), "run-user")

    attrs, seen = _run_and_inspect(op, "run-user", tmp_path / "in")

    assert attrs["Config"]["User"] == "1000:1000"
    assert (seen["uid"], seen["gid"], seen["output_writable"]) == (1000, 1000, True)


@pytest.mark.docker
def test_a_missing_secret_fails_the_mini_batch_before_any_container(make, scoring_image: str, airflow_db, monkeypatch) -> None:
    monkeypatch.delenv("AIRFLOW_VAR_BATCHSCORE_ABSENT", raising=False)
    endpoint = make(settings={"secret_environment": {"TOKEN": {"variable": "batchscore_absent"}}})
    op = planned_score_operator(endpoint, "run-nosecret")

    with pytest.raises(ScoringError) as info:
        op.execute({"run_id": "run-nosecret"})

    assert str(info.value) == (
        "mb-00000 failed: SecretUnavailable: settings.secret_environment.TOKEN: cannot read Airflow variable "
        "'batchscore_absent' (AirflowRuntimeError); create it in Airflow (Admin > Variables / Connections, the CLI, "
        "or a secrets backend)"
    )
    status = run_layout(endpoint.deployments[0], "run-nosecret").mini_batch_dir(0).read_status()
    assert status.state == "failed" and status.error.type == "SecretUnavailable"  # the ledger shows the attempt
    started = docker.from_env().containers.list(all=True, filters={"label": "batchscore.run_id=run-nosecret"})
    assert started == []


# --------------------------------------------------------------------------- no Docker needed


def test_secrets_come_from_connection_fields(monkeypatch) -> None:
    conn = json.dumps(
        {"conn_type": "http", "host": "api.example", "login": "svc", "password": "pw-1", "extra": {"token": "tk-2"}}
    )
    monkeypatch.setenv("AIRFLOW_CONN_SCORING_API", conn)
    refs = {
        "API_PASSWORD": SecretRef(connection="scoring_api"),
        "API_LOGIN": SecretRef(connection="scoring_api", field="login"),
        "API_TOKEN": SecretRef(connection="scoring_api", field="extra.token"),
        "API_HOST": SecretRef(connection="scoring_api", field="host"),
    }
    assert resolve_secrets(refs) == {
        "API_PASSWORD": "pw-1",
        "API_LOGIN": "svc",
        "API_TOKEN": "tk-2",
        "API_HOST": "api.example",
    }
    with pytest.raises(SecretUnavailableError, match=r"TOKEN: connection 'scoring_api' has no extra 'nope'"):
        resolve_secrets({"TOKEN": SecretRef(connection="scoring_api", field="extra.nope")})


@pytest.mark.parametrize(
    ("secret", "expected"),
    [
        ("{variable: k, connection: c}", "a secret needs either `variable` or `connection` (not both)"),
        ("{}", "a secret needs either `variable` or `connection` (not both)"),
        ("{variable: k, field: login}", "`field` goes with `connection`, not with `variable`"),
        (
            "{connection: c, field: secret}",
            "field must be one of password, login, host, schema, port, uri or extra.<key>, got 'secret'",
        ),
    ],
)
def test_bad_secret_references_name_the_key(make, tmp_path: Path, secret: str, expected: str) -> None:
    path = deployment_file(tmp_path / "yaml", model=tmp_path / "model", code=tmp_path / "code", inputs=tmp_path / "in")
    path.write_text(path.read_text() + f"  secret_environment:\n    TOKEN: {secret}\n")
    with pytest.raises(DeploymentSpecError) as info:
        load(path)
    key = "settings.secret_environment.TOKEN" + (".field" if "got 'secret'" in expected else "")
    assert str(info.value).split(": ", 1)[1] == f"{key}: {expected}"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("HOME", "secret_environment: 'HOME' is set by batchscore itself"),
        ("BATCHSCORE_X", "secret_environment: 'BATCHSCORE_X' is set by batchscore itself"),
        ("MODEL_VARIANT", "'MODEL_VARIANT' is in both environment_variables and secret_environment"),
        ("1X", "secret_environment: '1X' is not an environment variable name"),
    ],
)
def test_secret_names_may_not_shadow_other_variables(make, name: str, expected: str) -> None:
    settings = {"environment_variables": {"MODEL_VARIANT": "large"}, "secret_environment": {name: {"variable": "k"}}}
    with pytest.raises(DeploymentSpecError) as info:
        make(settings=settings)
    assert str(info.value).split(": ", 1)[1] == f"settings.secret_environment: {expected}"


def test_the_docker_socket_is_never_mounted(make, tmp_path: Path) -> None:
    with pytest.raises(ContainerSecurityError) as info:
        security.check_mounts([Mount(target="/x", source="/var/run/docker.sock", type="bind")])
    assert str(info.value) == (
        "refusing to mount /var/run/docker.sock into the scoring container at /x: it would give the container "
        "the socket /var/run/docker.sock, and with the Docker socket a container controls the host"
    )
    # A folder holding the socket gives it too: /var/run as the input folder.
    d = make(inputs=Path("/var/run")).deployments[0]
    with pytest.raises(ContainerSecurityError, match=r"refusing to mount (/var)?/run into the scoring container at /mnt/"):
        scoring_container(d, run_layout(d, "r"), 0, 1, user=None, labels={})
    # Any other socket (DOCKER_HOST may name one anywhere) is refused as a mount's source.
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "other.sock"))
    try:
        d = make(model=tmp_path / "other.sock").deployments[0]
        with pytest.raises(ContainerSecurityError, match=r"other.sock into the scoring container at /mnt/batchscore/model"):
            scoring_container(d, run_layout(d, "r"), 0, 1, user=None, labels={})
    finally:
        sock.close()


def test_the_container_user_is_never_root_unless_configured(monkeypatch) -> None:
    monkeypatch.delenv(security.CONTAINER_USER_ENV, raising=False)
    monkeypatch.setattr(os, "getuid", lambda: 0)
    assert security.container_user() == "65534:65534"
    monkeypatch.setattr(os, "getuid", lambda: 1001)
    monkeypatch.setattr(os, "getgid", lambda: 1002)
    assert security.container_user() == "1001:1002"  # a non-root worker: its own ids
    monkeypatch.setenv(security.CONTAINER_USER_ENV, "0:0")
    assert security.container_user() == "0:0"  # root only when asked for
    monkeypatch.setenv(security.CONTAINER_USER_ENV, "root")
    with pytest.raises(ContainerSecurityError, match="must be a numeric uid or uid:gid"):
        security.container_user()


# --------------------------------------------------------------------------- path confinement


@pytest.fixture()
def roots(tmp_path: Path, monkeypatch) -> Path:
    """``BATCHSCORE_ALLOWED_ROOTS`` set to ``tmp_path/allowed`` and ``tmp_path/yaml``; returns the first."""
    allowed = tmp_path / "allowed"
    (allowed / "model").mkdir(parents=True)
    write(allowed / "code" / "score.py", "def run(mb):\n    return mb\n")
    (allowed / "in").mkdir()
    (tmp_path / "outside").mkdir()
    monkeypatch.setenv("BATCHSCORE_ALLOWED_ROOTS", os.pathsep.join([str(allowed), str(tmp_path / "yaml")]))
    return allowed


def _yaml(tmp_path: Path, allowed: Path, **paths: str) -> Path:
    doc = {
        "name": "d",
        "endpoint_name": "e",
        "model": {"path": paths.get("model", str(allowed / "model"))},
        "code_configuration": {"code": paths.get("code", str(allowed / "code")), "scoring_script": "score.py"},
        "environment": {"image": "img"},
        "input": {"path": paths.get("input", str(allowed / "in"))},
        "output": {"path": paths.get("output", str(allowed / "out"))},
    }
    import yaml

    return write(tmp_path / "yaml" / "e.yaml", yaml.safe_dump(doc, sort_keys=False))


def test_paths_inside_the_allowed_roots_are_accepted(roots: Path, tmp_path: Path) -> None:
    (d,) = load(_yaml(tmp_path, roots, input="../allowed/in")).deployments
    assert d.input.path == roots / "in"  # '..' that stays inside is fine


@pytest.mark.parametrize(
    ("key", "line", "value", "why"),
    [
        ("input.path", 11, "../outside", "; its '..' leads out of them"),
        ("output.path", 13, "{tmp}/outside/out", ""),
        ("model.path", 4, "{tmp}/allowed/in/link", "; a symbolic link on the way leads out of them"),
        ("code_configuration.code", 6, "{tmp}/allowed/in/link", "; a symbolic link on the way leads out of them"),
    ],
)
def test_paths_outside_the_allowed_roots_are_refused(
    roots: Path, tmp_path: Path, key: str, line: int, value: str, why: str
) -> None:
    (roots / "in" / "link").symlink_to(tmp_path / "outside")
    value = value.format(tmp=tmp_path)
    path = _yaml(tmp_path, roots, **{key.split(".")[0].replace("code_configuration", "code"): value})
    with pytest.raises(DeploymentSpecError) as info:
        load(path)
    allowed = f"{roots}, {tmp_path / 'yaml'}"
    outside = tmp_path / "outside" if "out" not in key else tmp_path / "outside" / "out"
    assert str(info.value) == (
        f"{path}:{line}: {key}: path {value!r} resolves to {outside}, "
        f"outside the folders allowed by BATCHSCORE_ALLOWED_ROOTS ({allowed}){why}"
    )


def test_run_params_are_confined_too(roots: Path, tmp_path: Path) -> None:
    (d,) = load(_yaml(tmp_path, roots)).deployments
    assert apply_run_params(d, {"input_path": str(roots / "in")}, several_deployments=False).input.path == roots / "in"
    with pytest.raises(RunParamError, match=r"outside the folders allowed by BATCHSCORE_ALLOWED_ROOTS"):
        apply_run_params(d, {"input_path": str(tmp_path / "outside")}, several_deployments=False)
    with pytest.raises(RunParamError, match=r"outside the folders allowed by BATCHSCORE_ALLOWED_ROOTS"):
        apply_run_params(d, {"output_path": str(tmp_path / "outside" / "o")}, several_deployments=False)


def test_unset_roots_confine_nothing_and_relative_roots_are_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("BATCHSCORE_ALLOWED_ROOTS", raising=False)
    allowed = tmp_path / "allowed"
    (allowed / "model").mkdir(parents=True)
    write(allowed / "code" / "score.py", "def run(mb):\n    return mb\n")
    assert load(_yaml(tmp_path, allowed, input="/srv/anything")).deployments[0].input.path == Path("/srv/anything")
    monkeypatch.setenv("BATCHSCORE_ALLOWED_ROOTS", "data")
    with pytest.raises(DeploymentSpecError, match="BATCHSCORE_ALLOWED_ROOTS holds 'data', which is not an absolute path"):
        load(_yaml(tmp_path, allowed))
