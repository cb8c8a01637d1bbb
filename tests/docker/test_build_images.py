"""docker/build-images.sh, run for real against the local Docker engine.

The first test of a session may build the scoring image (a few minutes on a
machine without a registry: debootstrap, wheel download, docker build); after
that the script's own cache makes every run take about a second.
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

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "docker" / "build-images.sh"
DOCKERFILE = REPO / "docker" / "scoring" / "Dockerfile"
REQUIREMENTS = REPO / "docker" / "scoring" / "requirements.txt"
IMAGE = "batchscore-scoring:latest"
HASH_LABEL = "batchscore.build-hash"

BUILT_RE = re.compile(r"^scoring image (\S+) built \((sha256:[0-9a-f]{64})\)$")
UP_TO_DATE = f"scoring image {IMAGE} is up to date"


def _docker_usable() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(["docker", "info"], capture_output=True, timeout=60)
    return probe.returncode == 0


needs_docker = pytest.mark.skipif(not _docker_usable(), reason="no usable Docker engine")


def run_script(*args: str, image: str = IMAGE, timeout: float = 1500) -> subprocess.CompletedProcess:
    env = dict(os.environ, IMAGE=image)
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def docker(*args: str, timeout: float = 120) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"docker {' '.join(args)} failed:\n{done.stderr}"
    return done.stdout


def inspect(image: str) -> dict:
    return json.loads(docker("image", "inspect", image))[0]


def pins() -> dict[str, str]:
    """name -> version from a pip requirements file of name==version lines."""
    out = {}
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[name.strip().lower()] = version.strip()
    return out


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    out, pending = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


@pytest.fixture(scope="module")
def built() -> subprocess.CompletedProcess:
    """The script has run (built or found the image up to date)."""
    done = run_script()
    assert done.returncode == 0, f"build-images.sh failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    final = last_line(done.stdout)
    assert BUILT_RE.match(final) or final == UP_TO_DATE, final
    return done


# --- static checks: no Docker needed --------------------------------------


def test_dockerfile_declares_base_image_arg_before_from():
    instructions = dockerfile_instructions()
    keywords = [k for k, _ in instructions]
    assert "FROM" in keywords
    first_from = keywords.index("FROM")
    args_before = [a for k, a in instructions[:first_from] if k == "ARG"]
    assert any(re.fullmatch(r"BASE_IMAGE(=\S+)?", a) for a in args_before), (
        "ARG BASE_IMAGE must come before the first FROM, or FROM cannot use it"
    )
    froms = [a for k, a in instructions if k == "FROM"]
    assert all(re.match(r"\$\{?BASE_IMAGE\}?(\s|$)", a) for a in froms), froms


def test_dockerfile_leaves_user_and_command_to_the_orchestrator():
    keywords = {k for k, _ in dockerfile_instructions()}
    assert "ENTRYPOINT" not in keywords
    assert "USER" not in keywords


def test_requirements_are_fully_pinned():
    names = pins()
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][0-9A-Za-z.]*", line), line
    assert {"numpy", "pandas", "pyarrow", "scikit-learn"} <= names.keys()


def test_requirements_agree_with_the_project_lock():
    lock = REPO / "requirements.lock"
    if not lock.exists():
        pytest.skip("no requirements.lock")
    locked = {}
    for line in lock.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line.strip())
        if m:
            locked[m.group(1).lower()] = m.group(2)
    differ = {n: (v, locked[n]) for n, v in pins().items() if n in locked and locked[n] != v}
    assert not differ, f"scoring image pins differ from requirements.lock: {differ}"


def test_help_and_unknown_argument():
    shown = run_script("--help", timeout=30)
    assert shown.returncode == 0 and "--force" in shown.stdout
    bad = run_script("--no-such-option", timeout=30)
    assert bad.returncode != 0
    assert "unknown argument: --no-such-option" in bad.stderr


# --- the real image --------------------------------------------------------


@needs_docker
def test_image_has_pinned_packages_and_runs_offline_as_scorer(built):
    code = (
        "import json, numpy, pandas, pyarrow, scipy, sklearn;"
        "print(json.dumps({'numpy': numpy.__version__, 'pandas': pandas.__version__,"
        " 'pyarrow': pyarrow.__version__, 'scipy': scipy.__version__,"
        " 'scikit-learn': sklearn.__version__}))"
    )
    # As the orchestrator runs it: another user, no network.
    out = docker("run", "--rm", "--network", "none", "--user", "1000:1000",
                 IMAGE, "python3", "-c", code)
    versions = json.loads(last_line(out))
    want = pins()
    assert versions == {name: want[name] for name in versions}


@needs_docker
def test_image_metadata_label_user_and_defaults(built):
    info = inspect(IMAGE)
    config = info["Config"]
    assert re.fullmatch(r"[0-9a-f]{64}", (config.get("Labels") or {}).get(HASH_LABEL, ""))
    assert config.get("User", "") == ""          # root; the orchestrator passes --user
    assert not config.get("Entrypoint")
    assert config.get("WorkingDir") == "/tmp"
    env = dict(e.split("=", 1) for e in config.get("Env") or [])
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"

    ident = docker("run", "--rm", IMAGE, "id", "scorer").strip()
    assert ident.startswith("uid=1000(scorer) gid=1000(scorer)"), ident
    assert docker("run", "--rm", IMAGE, "id", "-u").strip() == "0"
    assert docker("run", "--rm", IMAGE, "python3", "-c",
                  "import sys; print(sys.prefix)").strip() == "/opt/venv"


@needs_docker
def test_second_run_hits_the_cache(built):
    before = inspect(IMAGE)["Id"]
    started = time.monotonic()
    again = run_script(timeout=120)
    elapsed = time.monotonic() - started
    assert again.returncode == 0, again.stderr
    assert last_line(again.stdout) == UP_TO_DATE
    assert "docker build" not in again.stderr and "Step 1/" not in again.stderr
    assert inspect(IMAGE)["Id"] == before
    assert elapsed < 15, f"cached run took {elapsed:.1f}s"


@needs_docker
def test_cache_is_per_tag_and_concurrent_runs_build_once(built):
    """Another tag misses the cache and builds (quickly, from Docker's layer
    cache); of two runs started together one builds, the other waits for it."""
    other = "batchscore-scoring:pytest-build-images"
    subprocess.run(["docker", "image", "rm", "-f", other], capture_output=True)
    env = dict(os.environ, IMAGE=other)
    try:
        procs = [
            subprocess.Popen(["bash", str(SCRIPT)], cwd=REPO, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(2)
        ]
        results = [(p.wait(timeout=1500), *p.communicate()) for p in procs]
        for rc, out, err in results:
            assert rc == 0, err[-4000:]
        finals = sorted(last_line(out) for _, out, _ in results)
        assert BUILT_RE.match(finals[0]) and BUILT_RE.match(finals[0]).group(1) == other, finals
        assert finals[1] == f"scoring image {other} is up to date", finals
        assert inspect(other)["Config"]["Labels"][HASH_LABEL] == \
            inspect(IMAGE)["Config"]["Labels"][HASH_LABEL]
    finally:
        subprocess.run(["docker", "image", "rm", "-f", other], capture_output=True)
    cache = REPO / "docker" / ".cache"
    assert not list(cache.glob("work.*")), "scratch folders were left behind"
