"""Images of Azure environments with a conda file (``environment: {name, image, conda_file}``), built where they run.

An environment with a conda file names no ready image: its image is the conda file's ``pip:`` dependencies
installed on a base (:attr:`~batchscore.spec.EnvironmentSpec.build_base`: batchscore's scoring image in place
of Azure's own base images). :func:`prepared` gives a task the deployment with that image, built first when
it is not on the Docker host yet. The tasks that start containers call it (the warm workers' start, and each
score task), so the image is built on the Docker engine of the scoring hosts (``resources.queue``), never when
the DAG is parsed, and once: the tag is ``batchscore-env-<name>:<hash12>``, the hash of what the image is
made of (the base's image id, the pip requirements, the wheels folder's file names, the Dockerfile), so an
image already there is used as is, and a change of any of those builds a new one.

Offline, as ``docker/build-images.sh`` builds the scoring image: the wheels are downloaded by the Airflow
worker's pip (``pip download --only-binary=:all:`` for CPython ``BATCHSCORE_ENV_PYTHON_VERSION``, 3.11, on
manylinux x86_64), or taken from the folder ``BATCHSCORE_ENV_WHEELS_DIR`` alone (``--no-index``, for sites
with no package index); the build installs them with ``pip install --no-index``, so it needs no network and
no registry (the base is on the host already). No Airflow here.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from docker.errors import ImageNotFound

from batchscore.errors import ScoringError
from batchscore.scratch import locked, scratch_root
from batchscore.spec.deployment import ENV_BASE_IMAGE_ENV, DeploymentSpec, EnvironmentSpec

IMAGE_PREFIX = "batchscore-env-"
HASH_LABEL = "batchscore.build-hash"
#: Environment variable: a folder of wheels; then pip takes the wheels from it alone (no package index).
WHEELS_DIR_ENV = "BATCHSCORE_ENV_WHEELS_DIR"
#: Environment variable: the Python version the wheels are for (the base image's), default 3.11.
PYTHON_VERSION_ENV = "BATCHSCORE_ENV_PYTHON_VERSION"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
#: Bump when the way images are built changes without the Dockerfile changing.
BUILD_LOGIC_VERSION = "1"
DOCKERFILE = """\
# Built by batchscore (batchscore.images): a conda file's pip dependencies on a base, from wheels only.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY wheels/ /tmp/batchscore-wheels/
USER root
RUN python3 -m pip install --no-index --no-cache-dir --disable-pip-version-check \\
        --find-links /tmp/batchscore-wheels -r /tmp/batchscore-wheels/requirements.txt \\
    && rm -rf /tmp/batchscore-wheels
"""


class ImageBuildError(ScoringError):
    """An environment's image cannot be built; the message names the conda file and what to do."""


def image_name(env: EnvironmentSpec, deployment_name: str) -> str:
    """The repository part of the image's tag after ``batchscore-env-``: the environment's name, lowercase."""
    name = re.sub(r"[^a-z0-9_.-]+", "-", (env.name or deployment_name).lower()).strip("-._")
    return name or "env"


def _wheels_dir() -> Path | None:
    raw = os.environ.get(WHEELS_DIR_ENV, "").strip()
    return Path(raw) if raw else None


def build_hash(base: str, base_id: str, requirements: tuple[str, ...]) -> str:
    """The hash of what the image is made of (see the module)."""
    wheels = _wheels_dir()
    listed = sorted(p.name for p in wheels.glob("*.whl")) if wheels is not None and wheels.is_dir() else []
    parts = [
        f"logic={BUILD_LOGIC_VERSION}",
        f"base={base} {base_id}",
        f"python={python_version()}",
        "--- requirements",
        *requirements,
        f"--- wheels from {wheels}" if wheels is not None else "--- wheels from the package index",
        *listed,
        "--- Dockerfile",
        DOCKERFILE,
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def python_version() -> str:
    return os.environ.get(PYTHON_VERSION_ENV, "").strip() or "3.11"


def prepared(spec: DeploymentSpec, cli: Any, log: Any) -> DeploymentSpec:
    """``spec`` with the image its containers run: its own, or the one built from its conda file (built now if missing)."""
    env = spec.environment
    dependencies = env.dependencies
    if dependencies is None:
        return spec
    base = env.build_base
    if dependencies.ignored:
        log.info(
            "Ignored from the conda file %s (no conda here; the base's Python and pip): %s",
            env.conda_file,
            ", ".join(dependencies.ignored),
        )
    tag = ensure_image(cli, env, spec.name, base, dependencies.pip, log) if dependencies.pip else base
    if not dependencies.pip:
        log.info("The conda file %s has no pip dependencies: the containers run the base %s", env.conda_file, base)
    return spec.model_copy(update={"environment": EnvironmentSpec(name=env.name, image=tag)})


def _present(cli: Any, tag: str) -> bool:
    try:
        cli.inspect_image(tag)
    except ImageNotFound:
        return False
    return True


def ensure_image(cli: Any, env: EnvironmentSpec, deployment_name: str, base: str, requirements: tuple[str, ...], log: Any) -> str:
    """The tag of ``requirements`` installed on ``base``: the image on the Docker host, else built now (one build per host)."""
    try:
        base_id = str(cli.inspect_image(base)["Id"])
    except ImageNotFound:
        instead = f"set {ENV_BASE_IMAGE_ENV} to another base" if base != env.image else "load it there (docker load)"
        raise ImageBuildError(
            f"the base image {base!r} of environment.conda_file ({env.conda_file}) is not on this Docker host; "
            f"build it (make images: batchscore-scoring:latest) or {instead}"
        ) from None
    digest = build_hash(base, base_id, requirements)
    tag = f"{IMAGE_PREFIX}{image_name(env, deployment_name)}:{digest[:12]}"
    if _present(cli, tag):
        log.info("Environment image %s is on the Docker host already (conda file %s)", tag, env.conda_file)
        return tag
    folder = scratch_root() / "images"
    with locked(folder / f"{digest[:16]}.lock"):
        if _present(cli, tag):  # built by another task meanwhile
            return tag
        with tempfile.TemporaryDirectory(prefix="build-", dir=folder) as context:
            _download_wheels(Path(context) / "wheels", requirements, env, log)
            (Path(context) / "Dockerfile").write_text(DOCKERFILE, encoding="utf-8")
            log.info("Building environment image %s: %s on %s", tag, ", ".join(requirements), base)
            _build(cli, Path(context), tag, base, digest, env, log)
    log.info("Built environment image %s", tag)
    return tag


def _download_wheels(wheels: Path, requirements: tuple[str, ...], env: EnvironmentSpec, log: Any) -> None:
    """The wheels of ``requirements`` into ``wheels``, by this host's pip (from ``BATCHSCORE_ENV_WHEELS_DIR`` alone if set)."""
    wheels.mkdir()
    (wheels / "requirements.txt").write_text("\n".join(requirements) + "\n", encoding="utf-8")
    command = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--quiet"]
    command += ["--only-binary=:all:", "--python-version", python_version(), "--implementation", "cp"]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    given = _wheels_dir()
    if given is not None:
        command += ["--no-index", "--find-links", str(given)]
    command += ["-d", str(wheels), "-r", str(wheels / "requirements.txt")]
    log.info("Downloading the wheels of %s%s", env.conda_file, f" from {given}" if given else "")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        where = f"the folder {given} ({WHEELS_DIR_ENV})" if given else f"the package index (or set {WHEELS_DIR_ENV})"
        raise ImageBuildError(
            f"pip could not download the wheels of the pip dependencies in {env.conda_file} (exit {done.returncode}): "
            f"{tail}\nEach must be a wheel for CPython {python_version()} on Linux x86_64, available from {where}"
        )


def _build(cli: Any, context: Path, tag: str, base: str, digest: str, env: EnvironmentSpec, log: Any) -> None:
    lines: list[str] = []
    for chunk in cli.build(
        path=str(context),
        tag=tag,
        buildargs={"BASE_IMAGE": base},
        labels={HASH_LABEL: digest},
        rm=True,
        forcerm=True,
        decode=True,
    ):
        if "stream" in chunk and chunk["stream"].strip():
            lines.append(chunk["stream"].rstrip())
            log.info("build | %s", lines[-1])
        if "error" in chunk:
            tail = "\n".join(lines[-5:])
            raise ImageBuildError(
                f"docker build of {tag} from {env.conda_file} failed: {chunk['error'].strip()}\n{tail}\n"
                f"The base {base} must have python3 with pip"
            )


__all__ = ["HASH_LABEL", "IMAGE_PREFIX", "PYTHON_VERSION_ENV", "WHEELS_DIR_ENV", "ImageBuildError", "image_name", "prepared"]
