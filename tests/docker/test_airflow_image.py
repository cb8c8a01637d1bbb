"""`docker/build-images.sh --airflow`, run for real: the Airflow image of the compose stack.

The module's first test may build the image (about 3 minutes on a machine without a registry,
most of it pip installing the ~160 wheels of requirements.lock); later runs find it up to date
in a fraction of a second, unless the lock, the Dockerfile or the project's code changed. The
checks run the image as the stack runs it: as uid 50000, without a network.

One test builds a copy of the checkout under another tag (from Docker's layer cache, so about a
minute) to show that the image follows the project's code: a changed file rebuilds it, a changed
file in the example's generated model folder (not part of the image) does not.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.docker.test_build_images import docker, dockerfile_instructions, last_line, needs_docker

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "docker" / "build-images.sh"
DOCKERFILE = REPO / "docker" / "airflow" / "Dockerfile"
LOCK = REPO / "requirements.lock"
IMAGE = "batchscore-airflow:latest"
HASH_LABEL = "batchscore.build-hash"
PROJECT = "/opt/batchscore"
EXAMPLE_MODEL = "include/examples/iris/model"

BUILT_RE = re.compile(r"^airflow image (\S+) built \((sha256:[0-9a-f]{64})\)$")
UP_TO_DATE = "airflow image {} is up to date"


def run_script(
    *args: str, image: str = IMAGE, script: Path = SCRIPT, timeout: float = 1500, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(script), *args],
        cwd=script.parents[1],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, IMAGE=image, **(env or {})),
    )


def in_image(code: str, *docker_args: str, image: str = IMAGE) -> str:
    """Runs python -c CODE in the image as its default user (50000), offline; its last stdout line."""
    out = docker("run", "--rm", "--network", "none", *docker_args, "--entrypoint", "python", image, "-c", code)
    return last_line(out)


def inspect(image: str) -> dict:
    return json.loads(docker("image", "inspect", image))[0]


def locked() -> dict[str, str]:
    out = {}
    for line in LOCK.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)$", line.strip())
        if m:
            out[canonical(m.group(1))] = m.group(2)
    return out


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project_files(root: Path) -> set[str]:
    """What the image should hold of dags/, plugins/, include/ (relative paths)."""
    out = set()
    for folder in ("dags", "plugins", "include"):
        for path in (root / folder).rglob("*"):
            rel = path.relative_to(root)
            parts = rel.parts
            if "__pycache__" in parts or path.suffix == ".pyc" or not path.is_file():
                continue
            if parts[:2] == ("include", "examples") and len(parts) > 3 and (parts[3] == "model" or parts[3].startswith("data")):
                continue
            out.add(rel.as_posix())
    return out


@pytest.fixture(scope="module")
def built() -> subprocess.CompletedProcess:
    """The script has run: built the image, or found it up to date."""
    done = run_script("--airflow")
    assert done.returncode == 0, f"build-images.sh --airflow failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    final = last_line(done.stdout)
    assert BUILT_RE.match(final) or final == UP_TO_DATE.format(IMAGE), final
    return done


# --- static checks -----------------------------------------------------------------------------


def test_dockerfile_installs_from_wheels_only_on_the_base_image_arg():
    instructions = dockerfile_instructions(DOCKERFILE)
    keywords = [k for k, _ in instructions]
    first_from = keywords.index("FROM")
    assert any(re.fullmatch(r"BASE_IMAGE(=\S+)?", a) for k, a in instructions[:first_from] if k == "ARG")
    froms = [a for k, a in instructions if k == "FROM"]
    assert len(froms) == 2 and all(re.match(r"\$\{?BASE_IMAGE\}?(\s|$)", a) for a in froms), froms
    runs = " ".join(a for k, a in instructions if k == "RUN")
    assert "--no-index" in runs and "--find-links" in runs and "requirements.lock" in runs
    assert ("COPY", "--from=venv /opt/venv /opt/venv") in instructions
    assert ("USER", "50000") in instructions
    assert ("ENTRYPOINT", '["airflow"]') in instructions
    # Airflow would import every .py file of plugins_folder as an Airflow plugin.
    assert not any("PLUGINS_FOLDER" in a.upper() for _, a in instructions)


def test_help_mentions_the_airflow_image_and_the_flags_exclude_each_other():
    shown = run_script("--help", timeout=30)
    assert shown.returncode == 0
    assert "--airflow" in shown.stdout and "BATCHSCORE_AIRFLOW_WHEELS_DIR" in shown.stdout
    both = run_script("--gpu", "--airflow", timeout=30)
    assert both.returncode != 0 and "--gpu and --airflow exclude each other" in both.stderr


# --- the real image ----------------------------------------------------------------------------


@needs_docker
@pytest.mark.docker
def test_second_run_is_up_to_date(built):
    before = inspect(IMAGE)["Id"]
    started = time.monotonic()
    again = run_script("--airflow", timeout=120)
    elapsed = time.monotonic() - started
    assert again.returncode == 0, again.stderr
    assert last_line(again.stdout) == UP_TO_DATE.format(IMAGE)
    assert "docker build" not in again.stderr and "wheels:" not in again.stderr
    assert inspect(IMAGE)["Id"] == before
    assert elapsed < 15, f"cached run took {elapsed:.1f}s"


@needs_docker
@pytest.mark.docker
def test_airflow_version_is_the_default_command(built):
    assert last_line(docker("run", "--rm", "--network", "none", IMAGE)) == "3.3.2"
    assert last_line(docker("run", "--rm", "--network", "none", IMAGE, "version")) == "3.3.2"


@needs_docker
@pytest.mark.docker
def test_image_config_user_and_writable_airflow_home(built):
    config = inspect(IMAGE)["Config"]
    labels = config.get("Labels") or {}
    assert re.fullmatch(r"[0-9a-f]{64}", labels.get(HASH_LABEL, ""))
    assert labels.get("org.opencontainers.image.title") == "batchscore-airflow"
    assert config["User"] == "50000"
    assert config["Entrypoint"] == ["airflow"] and config["Cmd"] == ["version"]
    assert config["WorkingDir"] == "/opt/airflow"
    env = dict(e.split("=", 1) for e in config.get("Env") or [])
    assert env["PATH"] == "/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert env["PYTHONPATH"] == f"{PROJECT}/plugins:{PROJECT}/include"
    assert env["AIRFLOW_HOME"] == "/opt/airflow"
    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == f"{PROJECT}/dags"
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False"
    assert env["PYTHONUNBUFFERED"] == "1" and env["LANG"] == "C.UTF-8"
    assert "AIRFLOW__CORE__PLUGINS_FOLDER" not in env

    out = docker(
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "sh",
        IMAGE,
        "-c",
        "id; echo ~; stat -c '%u:%g %a %n' /opt/airflow /opt/airflow/logs /opt/airflow/plugins"
        " /home/airflow; airflow config get-value core plugins_folder",
    ).splitlines()
    assert out[0] == "uid=50000(airflow) gid=0(root) groups=0(root)", out
    assert out[1] == "/home/airflow"
    for line in out[2:6]:
        owner, mode, path = line.split()
        assert owner == "50000:0" and int(mode, 8) & 0o070 == 0o070, line  # group-writable
    assert out[6] == "/opt/airflow/plugins"


@needs_docker
@pytest.mark.docker
def test_packages_are_the_locked_ones_and_the_project_comes_from_opt_batchscore(built):
    code = (
        "import json, sys, importlib.metadata as md;"
        "import batchscore, batchscore_runtime, airflow, airflow.providers.celery, airflow.providers.docker,"
        " psycopg2, redis;"
        "print(json.dumps({'prefix': sys.prefix, 'batchscore': batchscore.__file__,"
        " 'runtime': batchscore_runtime.__file__, 'airflow': airflow.__version__,"
        " 'dists': {d.metadata['Name']: d.version for d in md.distributions()}}))"
    )
    got = json.loads(in_image(code))
    assert got["prefix"] == "/opt/venv"
    assert got["airflow"] == "3.3.2"
    assert got["batchscore"] == f"{PROJECT}/plugins/batchscore/__init__.py"
    assert got["runtime"] == f"{PROJECT}/include/batchscore_runtime/__init__.py"
    installed = {canonical(name): version for name, version in got["dists"].items()}
    want = locked()
    assert {n: installed.get(n) for n in want if installed.get(n) != want[n]} == {}
    # Beyond the lock: pip's own, and async-timeout where the base's Python is older than 3.11.3.
    assert set(installed) - set(want) <= {"pip", "setuptools", "async-timeout"}, set(installed) - set(want)


@needs_docker
@pytest.mark.docker
def test_project_copy_has_the_code_but_not_the_generated_example_files(built):
    listed = docker("run", "--rm", "--network", "none", "--entrypoint", "find", IMAGE, PROJECT, "-type", "f").split()
    in_image_files = {p.removeprefix(PROJECT + "/") for p in listed}
    assert in_image_files == project_files(REPO)
    assert not any("__pycache__" in p or p.startswith(EXAMPLE_MODEL) for p in in_image_files)
    assert "dags/batchscore_deployments.py" in in_image_files
    # Read-only for the airflow user: the code is no place for state.
    assert (
        docker(
            "run",
            "--rm",
            "--network",
            "none",
            "--entrypoint",
            "sh",
            IMAGE,
            "-c",
            f"test -w {PROJECT}/dags && echo writable || echo read-only",
        ).strip()
        == "read-only"
    )


DAGBAG = (
    "import json; from airflow.dag_processing.dagbag import DagBag;"
    f"b = DagBag('{PROJECT}/dags');"
    "print(json.dumps({'dag_ids': sorted(b.dag_ids), 'errors': {k: str(v) for k, v in b.import_errors.items()}}))"
)


@needs_docker
@pytest.mark.docker
def test_the_dag_file_parses_in_the_image(built, iris_example):
    """With the host's trained model mounted where the YAMLs expect it, every deployment of
    dags/deployments is a DAG; without it (the image has no model), the only errors name it."""
    from batchscore.factory import INVALID_DAG_ID, build_dags

    # The DAGs the same code makes of the same YAMLs on the host.
    host = build_dags(REPO / "dags" / "deployments")
    assert INVALID_DAG_ID not in host, "the deployment YAMLs are invalid on the host already"
    want = sorted(host)
    assert "iris-batch" in want

    mounted = json.loads(in_image(DAGBAG, "-v", f"{iris_example / 'model'}:{PROJECT}/{EXAMPLE_MODEL}:ro"))
    assert mounted == {"dag_ids": want, "errors": {}}

    bare = json.loads(in_image(DAGBAG))
    assert list(bare["errors"]) == [f"{PROJECT}/dags/batchscore_deployments.py"]
    lines = bare["errors"][f"{PROJECT}/dags/batchscore_deployments.py"].splitlines()
    assert lines and all(f"{PROJECT}/{EXAMPLE_MODEL}" in line and "does not exist" in line for line in lines), lines


@needs_docker
@pytest.mark.docker
def test_a_code_change_rebuilds_the_image_and_a_generated_file_does_not(built, tmp_path):
    """A copy of the checkout, built under another tag from Docker's layer cache."""
    copy = tmp_path / "checkout"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".cache")
    for folder in ("docker", "dags", "plugins", "include"):
        shutil.copytree(REPO / folder, copy / folder, ignore=ignore, symlinks=True)
    shutil.copy2(LOCK, copy / "requirements.lock")
    (copy / EXAMPLE_MODEL).mkdir(parents=True, exist_ok=True)
    wheels = os.environ.get("BATCHSCORE_AIRFLOW_WHEELS_DIR") or str(REPO / "docker" / ".cache" / "airflow-wheels")
    # This checkout's wheels, when its build downloaded them; a checkout whose image was already
    # up to date (built from another clone of the same code) has none, and the copy downloads its own.
    env = {"BATCHSCORE_AIRFLOW_WHEELS_DIR": wheels} if Path(wheels).is_dir() else {}
    script = copy / "docker" / "build-images.sh"
    tag = "batchscore-airflow:pytest-code-change"

    def build() -> str:
        done = run_script("--airflow", image=tag, script=script, timeout=900, env=env)
        assert done.returncode == 0, f"{done.stdout}\n{done.stderr[-4000:]}"
        return last_line(done.stdout)

    subprocess.run(["docker", "image", "rm", "-f", tag], capture_output=True)
    try:
        assert BUILT_RE.match(build())
        first = inspect(tag)["Id"]

        (copy / EXAMPLE_MODEL / "generated.bin").write_bytes(b"a trained model")
        assert build() == UP_TO_DATE.format(tag)

        marker = copy / "plugins" / "batchscore" / "_pytest_code_change.py"
        marker.write_text("CHANGED = True\n")
        assert BUILT_RE.match(build())
        assert inspect(tag)["Id"] != first
        assert in_image("import batchscore._pytest_code_change as m; print(m.CHANGED)", image=tag) == "True"
        assert build() == UP_TO_DATE.format(tag)
    finally:
        subprocess.run(["docker", "image", "rm", "-f", tag], capture_output=True)
    assert not list((copy / "docker" / ".cache").glob("work.*")), "scratch folders were left behind"
