"""BATCHSCORE_HOST_PATHS: bind-mount sources as the Docker host sees them (batchscore.hostpaths).

The checks against a worker's own container use real containers: their mounts are what the
Docker engine reports, and the last test runs the check inside the compose stack's Airflow
image, where the worker finds its own container by itself.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from docker.types import Mount

from batchscore.engine import docker_client
from batchscore.errors import ContainerSecurityError, HostPathError
from batchscore.hostpaths import HOST_PATHS_ENV, PathMapping, check, container_mounts, for_docker, host_path, parse
from tests.conftest import REPO


def test_a_mapping_is_parsed_and_the_longest_worker_folder_wins() -> None:
    mappings = parse(" /opt/batchscore=/home/me/batchscore , /opt/batchscore/var=/srv/var,\n/data=/srv/data/ ")
    assert [str(m) for m in mappings] == [
        "/opt/batchscore=/home/me/batchscore",
        "/opt/batchscore/var=/srv/var",
        "/data=/srv/data",
    ]
    assert host_path("/opt/batchscore/include/batchscore_runtime", mappings) == "/home/me/batchscore/include/batchscore_runtime"
    assert host_path("/opt/batchscore/var/output/run-1", mappings) == "/srv/var/output/run-1"
    assert host_path("/data", mappings) == "/srv/data"
    assert host_path("/data/../data/in", mappings) == "/srv/data/in"
    assert parse("") == []


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "/data",
            "BATCHSCORE_HOST_PATHS: entry '/data' is not <folder in the worker>=<folder on the Docker host>, "
            "e.g. /opt/batchscore=/home/me/batchscore",
        ),
        ("/data=srv/data", "BATCHSCORE_HOST_PATHS: entry '/data=srv/data': the host folder 'srv/data' is not an absolute path"),
        ("data=/srv", "BATCHSCORE_HOST_PATHS: entry 'data=/srv': the worker folder 'data' is not an absolute path"),
        ("/data=/a,/data/=/b", "BATCHSCORE_HOST_PATHS: a worker folder is mapped twice in '/data=/a,/data/=/b'"),
    ],
)
def test_a_malformed_mapping_is_refused_with_the_entry(value: str, message: str) -> None:
    with pytest.raises(HostPathError) as err:
        parse(value)
    assert str(err.value) == message


def test_a_source_outside_every_mapped_folder_is_refused_not_mounted_from_the_wrong_place() -> None:
    with pytest.raises(HostPathError) as err:
        host_path("/tmp/inputs", parse("/data=/srv/data,/opt/batchscore=/home/me/b"))
    assert str(err.value) == (
        "/tmp/inputs is in none of the folders BATCHSCORE_HOST_PATHS maps to the Docker host (/data, /opt/batchscore), "
        "so the scoring container cannot mount it; keep deployments' files under a mapped folder, or add its folder "
        "to BATCHSCORE_HOST_PATHS"
    )


def test_for_docker_rewrites_bind_sources_keeps_everything_else_and_still_refuses_the_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "in").mkdir()
    monkeypatch.setenv(HOST_PATHS_ENV, f"{tmp_path}=/srv/host-side")
    mounts = [
        Mount(target="/mnt/input", source=str(tmp_path / "in"), type="bind", read_only=True),
        Mount(target="/mnt/output", source=str(tmp_path / "out" / "mb-00001"), type="bind", read_only=False),
        Mount(target="/tmp", source="", type="tmpfs"),
    ]
    out = for_docker(mounts)
    assert [(m["Target"], m["Source"], m["ReadOnly"], m["Type"]) for m in out] == [
        ("/mnt/input", "/srv/host-side/in", True, "bind"),
        ("/mnt/output", "/srv/host-side/out/mb-00001", False, "bind"),
        ("/tmp", "", False, "tmpfs"),
    ]
    with pytest.raises(ContainerSecurityError):  # checked on the worker's paths, before any mapping
        for_docker([Mount(target="/mnt/input", source="/var/run", type="bind", read_only=True)])


def test_a_mapped_worker_folder_that_does_not_exist_here_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HOST_PATHS_ENV, f"{tmp_path / 'nowhere'}=/srv/data")
    with pytest.raises(HostPathError) as err:
        for_docker([Mount(target="/mnt/input", source=str(tmp_path / "nowhere" / "in"), type="bind", read_only=True)])
    assert str(err.value) == (
        f"BATCHSCORE_HOST_PATHS maps {tmp_path / 'nowhere'} to /srv/data on the Docker host, but {tmp_path / 'nowhere'} "
        "does not exist in this Airflow worker; the left side of each entry is the worker's own path"
    )


# --------------------------------------------------------------------------- against real containers' mounts


@pytest.fixture
def worker_like_container(scoring_image: str, tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """A container mounting two host folders as a compose worker would: /data and /opt/batchscore."""
    data, code = tmp_path / "host-data", tmp_path / "host-code"
    data.mkdir()
    code.mkdir()
    name = f"batchscore-test-hostpaths-{tmp_path.name}"[:60]
    cid = subprocess.run(
        ["docker", "run", "-d", "--name", name, "--network", "none", "-v", f"{data}:/data", "-v", f"{code}:/opt/batchscore:ro",
         scoring_image, "sleep", "120"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    try:
        yield cid, data, code
    finally:
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True)


@pytest.mark.docker
def test_the_check_against_the_workers_own_container_names_the_right_value(
    worker_like_container: tuple[str, Path, Path], tmp_path: Path
) -> None:
    cid, data, code = worker_like_container
    mounts = container_mounts(docker_client(), cid)
    assert {(str(m.destination), str(m.source)) for m in mounts} == {("/data", str(data)), ("/opt/batchscore", str(code))}
    here = tmp_path / "worker-view"  # stands for the worker's /data and /opt/batchscore, which exist here
    for folder in ("data", "code"):
        (here / folder).mkdir(parents=True)
    as_worker = [m.__class__(m.source, here / ("data" if m.destination.name == "data" else "code")) for m in mounts]

    check(parse(f"{here / 'data'}={data},{here / 'code'}={code}"), as_worker, cid)  # right: no error
    with pytest.raises(HostPathError) as err:
        check(parse(f"{here / 'data'}=/srv/elsewhere"), as_worker, cid)
    assert str(err.value) == (
        f"BATCHSCORE_HOST_PATHS maps {here / 'data'} to /srv/elsewhere, but this worker's container ({cid[:12]}) mounts "
        f"{data} there; set BATCHSCORE_HOST_PATHS={here / 'code'}={code},{here / 'data'}={data}"
    )
    with pytest.raises(HostPathError) as err:
        check([PathMapping(here, here)], as_worker, cid)
    assert str(err.value) == (
        f"BATCHSCORE_HOST_PATHS maps {here} to {here}, but in this worker's container ({cid[:12]}) {here} is not "
        "mounted from the host at all; mount it (docker-compose volumes) or drop the entry"
    )


@pytest.mark.docker
@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            None,
            "/data/inputs is {data}/inputs on the Docker host, and BATCHSCORE_HOST_PATHS is not set: this Airflow "
            "worker runs in a container ({cid}) and the Docker engine resolves bind mounts on its host; "
            "set BATCHSCORE_HOST_PATHS=/data={data},/opt/batchscore={repo}",
        ),
        (
            "/data=/srv/wrong",
            "BATCHSCORE_HOST_PATHS maps /data to /srv/wrong, but this worker's container ({cid}) mounts {data} there; "
            "set BATCHSCORE_HOST_PATHS=/data={data},/opt/batchscore={repo}",
        ),
        ("/data={data},/opt/batchscore={repo}", "ok {data}/inputs"),
    ],
    ids=["missing", "wrong", "right"],
)
def test_inside_the_airflow_image_a_worker_finds_its_own_container_and_checks_the_setting(
    airflow_image: str, tmp_path: Path, setting: str | None, message: str
) -> None:
    data = tmp_path / "data"
    (data / "inputs").mkdir(parents=True)
    script = (
        "from docker.types import Mount\n"
        "from batchscore import hostpaths\n"
        "try:\n"
        "    m = hostpaths.for_docker([Mount(target='/mnt/input', source='/data/inputs', type='bind', read_only=True)])\n"
        "    print('ok', m[0]['Source'])\n"
        "except Exception as e:\n"
        "    print(e)\n"
    )
    env = [] if setting is None else ["-e", f"{HOST_PATHS_ENV}={setting.format(data=data, repo=REPO)}"]
    name = f"batchscore-test-hostpaths-{tmp_path.name}"[:60]
    done = subprocess.run(
        ["docker", "run", "--name", name, "--user", "0:0", "--network", "none", "-v", "/var/run/docker.sock:/var/run/docker.sock",
         "-v", f"{data}:/data", "-v", f"{REPO}:/opt/batchscore:ro", *env, "--entrypoint", "python", airflow_image, "-c", script],
        capture_output=True, text=True,
    )  # fmt: skip
    cid = subprocess.run(["docker", "inspect", "-f", "{{.Id}}", name], capture_output=True, text=True).stdout.strip()
    subprocess.run(["docker", "rm", "-f", name], capture_output=True)
    assert done.stdout.strip().splitlines()[-1] == message.format(data=data, repo=REPO, cid=cid[:12]), done.stderr
