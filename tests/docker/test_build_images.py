"""docker/build-images.sh, run for real against the local Docker engine.

The first test of a session may build the scoring image (a few minutes on a
machine without a registry: debootstrap, wheel download, docker build); after
that the script's own cache makes every run take about a second.

The GPU variant (--gpu) cannot be built for real here: its CUDA base cannot be
pulled, nor can the standalone Python be downloaded. The tests prove what can
be proven without them: the recipe's static properties, that a missing base or
Python fails at once with what to do, and a real build of the GPU recipe on
stand-ins made from the local Debian base (a "CUDA base" with no Python in it,
and a Python archive in python-build-standalone's layout). That build takes
about two minutes the first time; its images (batchscore-test/cuda-standin,
batchscore-scoring:pytest-gpu) are kept, so later runs hit the cache.
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
GPU_DOCKERFILE = REPO / "docker" / "scoring-gpu" / "Dockerfile"
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


_NO_DOCKER = pytest.mark.skipif(not _docker_usable(), reason="no usable Docker engine")


def needs_docker(test):
    """A Docker test (marker ``docker``: not in ``make test-unit``), skipped where no engine answers."""
    return pytest.mark.docker(_NO_DOCKER(test))


def run_script(
    *args: str, image: str = IMAGE, timeout: float = 1500, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = dict(os.environ, IMAGE=image, **(env or {}))
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
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


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
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
    out = docker("run", "--rm", "--network", "none", "--user", "1000:1000", IMAGE, "python3", "-c", code)
    versions = json.loads(last_line(out))
    want = pins()
    assert versions == {name: want[name] for name in versions}


@needs_docker
def test_image_metadata_label_user_and_defaults(built):
    info = inspect(IMAGE)
    config = info["Config"]
    assert re.fullmatch(r"[0-9a-f]{64}", (config.get("Labels") or {}).get(HASH_LABEL, ""))
    assert config.get("User", "") == ""  # root; the orchestrator passes --user
    assert not config.get("Entrypoint")
    assert config.get("WorkingDir") == "/tmp"
    env = dict(e.split("=", 1) for e in config.get("Env") or [])
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"

    ident = docker("run", "--rm", IMAGE, "id", "scorer").strip()
    assert ident.startswith("uid=1000(scorer) gid=1000(scorer)"), ident
    assert docker("run", "--rm", IMAGE, "id", "-u").strip() == "0"
    assert docker("run", "--rm", IMAGE, "python3", "-c", "import sys; print(sys.prefix)").strip() == "/opt/venv"


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
            subprocess.Popen(["bash", str(SCRIPT)], cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(2)
        ]
        results = [(p.wait(timeout=1500), *p.communicate()) for p in procs]
        for rc, _, err in results:
            assert rc == 0, err[-4000:]
        finals = sorted(last_line(out) for _, out, _ in results)
        assert BUILT_RE.match(finals[0]) and BUILT_RE.match(finals[0]).group(1) == other, finals
        assert finals[1] == f"scoring image {other} is up to date", finals
        assert inspect(other)["Config"]["Labels"][HASH_LABEL] == inspect(IMAGE)["Config"]["Labels"][HASH_LABEL]
    finally:
        subprocess.run(["docker", "image", "rm", "-f", other], capture_output=True)
    cache = REPO / "docker" / ".cache"
    assert not list(cache.glob("work.*")), "scratch folders were left behind"


# --- the GPU variant (--gpu) -------------------------------------------------

GPU_IMAGE = "batchscore-scoring:pytest-gpu"
STANDIN_BASE = "batchscore-test/cuda-standin:latest"
DEBIAN_BASE = "batchscore-base:bookworm"  # what build-images.sh makes without a registry
# Never reached: the test must not depend on (or wait for) the network.
NO_DOWNLOAD = {"BATCHSCORE_PYTHON_URL": "http://127.0.0.1:9/python.tar.gz", "BATCHSCORE_PYTHON_SHA256": "0" * 64}


def test_gpu_dockerfile_takes_a_cuda_runtime_base_and_sets_the_nvidia_environment():
    instructions = dockerfile_instructions(GPU_DOCKERFILE)
    keywords = [k for k, _ in instructions]
    first_from = keywords.index("FROM")
    args_before = [a for k, a in instructions[:first_from] if k == "ARG"]
    default = next(a.split("=", 1)[1] for a in args_before if a.startswith("CUDA_BASE_IMAGE="))
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(cudnn-)?runtime-ubuntu\d\d\.\d\d", default), default
    froms = [a for k, a in instructions if k == "FROM"]
    assert len(froms) == 2 and all(re.match(r"\$\{?CUDA_BASE_IMAGE\}?(\s|$)", a) for a in froms), froms
    assert "ENTRYPOINT" not in keywords and "USER" not in keywords
    env = " ".join(a for k, a in instructions if k == "ENV")
    assert "NVIDIA_VISIBLE_DEVICES=void" in env
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in env
    assert re.search(r"PATH=/opt/venv/bin:", env)
    # Nothing is installed from a package manager, so no driver can come in.
    runs = " ".join(a for k, a in instructions if k == "RUN")
    for word in ("apt-get", "apt ", "dnf", "yum", "nvidia-driver", "libnvidia", "cuda-drivers", "curl", "wget"):
        assert word not in runs, word
    assert ("ADD", "python.tar.gz /opt/") in instructions


def test_help_mentions_the_gpu_variant():
    shown = run_script("--help", timeout=30)
    assert shown.returncode == 0
    assert "--gpu" in shown.stdout and "CUDA_BASE_IMAGE" in shown.stdout
    assert "BATCHSCORE_PYTHON_TARBALL" in shown.stdout


@needs_docker
def test_gpu_build_with_an_unpullable_base_fails_at_once_naming_the_build_argument():
    missing = "batchscore-test.invalid/cuda:12.4.1-runtime-ubuntu22.04"
    started = time.monotonic()
    done = run_script(
        "--gpu",
        image="batchscore-scoring:pytest-gpu-nobase",
        timeout=120,
        env={"CUDA_BASE_IMAGE": missing, "BATCHSCORE_PULL_TIMEOUT": "30", **NO_DOWNLOAD},
    )
    elapsed = time.monotonic() - started
    assert done.returncode != 0
    assert elapsed < 40, f"took {elapsed:.1f}s"
    assert (f"[build-images] ERROR: cannot pull the GPU image's base {missing} (build argument CUDA_BASE_IMAGE): ") in done.stderr
    assert "set CUDA_BASE_IMAGE to one that is present" in done.stderr
    # It stopped before anything else: no download, no build.
    assert "python:" not in done.stderr and "wheels:" not in done.stderr
    assert "docker build" not in done.stderr
    assert (
        subprocess.run(["docker", "image", "inspect", "batchscore-scoring:pytest-gpu-nobase"], capture_output=True).returncode
        != 0
    )


@needs_docker
def test_gpu_build_without_python_says_what_to_set(built, tmp_path):
    base = {"CUDA_BASE_IMAGE": DEBIAN_BASE if image_present(DEBIAN_BASE) else IMAGE}
    image = "batchscore-scoring:pytest-gpu-nopython"
    done = run_script("--gpu", image=image, timeout=120, env={**base, **NO_DOWNLOAD})
    assert done.returncode != 0
    assert (
        "ERROR: cannot download Python 3.11 for the GPU image from http://127.0.0.1:9/python.tar.gz: curl: (7)"
    ) in done.stderr
    assert "set BATCHSCORE_PYTHON_TARBALL to\n  its path" in done.stderr

    given = run_script(
        "--gpu", image=image, timeout=120, env={**base, "BATCHSCORE_PYTHON_TARBALL": str(tmp_path / "nope.tar.gz")}
    )
    assert given.returncode != 0
    assert f"ERROR: BATCHSCORE_PYTHON_TARBALL={tmp_path / 'nope.tar.gz'} is not a file" in given.stderr

    wrong = tmp_path / "wrong.tar.gz"
    (tmp_path / "python" / "lib").mkdir(parents=True)
    subprocess.run(["tar", "-czf", str(wrong), "-C", str(tmp_path), "python"], check=True)
    bad = run_script("--gpu", image=image, timeout=120, env={**base, "BATCHSCORE_PYTHON_TARBALL": str(wrong)})
    assert bad.returncode != 0
    assert (f"ERROR: {wrong} is not a python-build-standalone install_only archive (no python/bin/python3 in it)") in bad.stderr
    assert "docker build" not in bad.stderr


def image_present(name: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", name], capture_output=True).returncode == 0


# A CUDA runtime base has no Python: the stand-in is the Debian base without its Python.
STANDIN_DOCKERFILE = f"""\
FROM {DEBIAN_BASE}
RUN rm -rf /usr/bin/python3* /usr/lib/python3 /usr/lib/python3.11 && ! command -v python3
ENV CUDA_VERSION=12.4.1 NVIDIA_REQUIRE_CUDA="cuda>=12.4" NVIDIA_VISIBLE_DEVICES=all \\
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
"""
# python-build-standalone's install_only layout (python/bin/python3, python/lib/python3.11),
# made from the Debian base's own CPython 3.11; byte for byte the same on every run.
STANDIN_PYTHON = (
    "set -e; mkdir -p /o/python/bin /o/python/lib; cp /usr/bin/python3.11 /o/python/bin/;"
    " ln -s python3.11 /o/python/bin/python3; cp -a /usr/lib/python3.11 /o/python/lib/;"
    " find /o -name __pycache__ -prune -exec rm -rf {} +;"
    " tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C /o -c python | gzip -n"
)


@pytest.fixture(scope="module")
def gpu_standin(built, tmp_path_factory) -> tuple[subprocess.CompletedProcess, str, Path]:
    """The GPU recipe built by `build-images.sh --gpu` on the stand-ins: (the run, the CPU
    image's id before it, the stand-in Python archive)."""
    if not image_present(DEBIAN_BASE):
        pytest.skip(f"the stand-ins are made from {DEBIAN_BASE}, which build-images.sh makes only where no registry answers")
    cpu_before = inspect(IMAGE)["Id"]
    made = subprocess.run(
        ["docker", "build", "-q", "-t", STANDIN_BASE, "-"],
        input=STANDIN_DOCKERFILE,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, DOCKER_BUILDKIT="0"),
    )
    assert made.returncode == 0, made.stderr
    tarball = tmp_path_factory.mktemp("python") / "cpython-3.11-standin.tar.gz"
    with tarball.open("wb") as out:
        subprocess.run(
            ["docker", "run", "--rm", "--network", "none", DEBIAN_BASE, "sh", "-c", STANDIN_PYTHON],
            stdout=out,
            check=True,
            timeout=120,
        )
    done = run_script(
        "--gpu", image=GPU_IMAGE, env={"CUDA_BASE_IMAGE": STANDIN_BASE, "BATCHSCORE_PYTHON_TARBALL": str(tarball), **NO_DOWNLOAD}
    )
    assert done.returncode == 0, f"build-images.sh --gpu failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    final = last_line(done.stdout)
    assert (
        BUILT_RE.match(final) and BUILT_RE.match(final).group(1) == GPU_IMAGE
    ) or final == f"scoring image {GPU_IMAGE} is up to date", final
    return done, cpu_before, tarball


@needs_docker
def test_gpu_recipe_builds_on_stand_ins_with_its_own_python_and_the_pinned_packages(gpu_standin):
    code = (
        "import json, sys, numpy, pandas, pyarrow, scipy, sklearn;"
        "print(json.dumps({'python': list(sys.version_info[:2]), 'prefix': sys.prefix,"
        " 'base_prefix': sys.base_prefix, 'numpy': numpy.__version__, 'pandas': pandas.__version__,"
        " 'pyarrow': pyarrow.__version__, 'scipy': scipy.__version__, 'scikit-learn': sklearn.__version__}))"
    )
    out = docker("run", "--rm", "--network", "none", "--user", "1000:1000", GPU_IMAGE, "python3", "-c", code)
    got = json.loads(last_line(out))
    assert got.pop("python") == [3, 11]
    # The interpreter is the archive's, not the base's (the stand-in base has none).
    assert (got.pop("prefix"), got.pop("base_prefix")) == ("/opt/venv", "/opt/python")
    want = pins()
    assert got == {name: want[name] for name in got}


@needs_docker
def test_gpu_image_sets_the_nvidia_environment_and_holds_no_driver(gpu_standin):
    config = inspect(GPU_IMAGE)["Config"]
    env = dict(e.split("=", 1) for e in config.get("Env") or [])
    assert env["NVIDIA_VISIBLE_DEVICES"] == "void"  # the base said "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    assert env["CUDA_VERSION"] == "12.4.1"  # inherited from the base
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert re.fullmatch(r"[0-9a-f]{64}", (config.get("Labels") or {}).get(HASH_LABEL, ""))
    assert config.get("User", "") == "" and not config.get("Entrypoint")
    assert config.get("WorkingDir") == "/tmp"
    assert docker("run", "--rm", GPU_IMAGE, "id", "scorer").startswith("uid=1000(scorer) gid=1000(scorer)")
    found = docker(
        "run",
        "--rm",
        GPU_IMAGE,
        "find",
        "/",
        "-xdev",
        "(",
        "-name",
        "libcuda.so*",
        "-o",
        "-name",
        "libnvidia-*.so*",
        "-o",
        "-name",
        "nvidia-smi",
        ")",
        "-print",
    )
    assert found.strip() == ""


@needs_docker
def test_gpu_build_is_cached_and_leaves_the_cpu_image_alone(gpu_standin):
    _, cpu_before, tarball = gpu_standin
    before = inspect(GPU_IMAGE)["Id"]
    started = time.monotonic()
    again = run_script(
        "--gpu",
        image=GPU_IMAGE,
        timeout=120,
        env={"CUDA_BASE_IMAGE": STANDIN_BASE, "BATCHSCORE_PYTHON_TARBALL": str(tarball), **NO_DOWNLOAD},
    )
    assert again.returncode == 0, again.stderr
    assert last_line(again.stdout) == f"scoring image {GPU_IMAGE} is up to date"
    assert time.monotonic() - started < 15
    assert inspect(GPU_IMAGE)["Id"] == before
    assert inspect(IMAGE)["Id"] == cpu_before
    cpu = run_script(timeout=120)
    assert last_line(cpu.stdout) == UP_TO_DATE, cpu.stderr
    assert inspect(GPU_IMAGE)["Config"]["Labels"][HASH_LABEL] != inspect(IMAGE)["Config"]["Labels"][HASH_LABEL]
