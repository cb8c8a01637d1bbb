"""Bind-mount sources as the Docker host sees them, for Airflow workers that run in a container.

A scoring container's bind mounts are resolved by the Docker engine on *its* host, not inside
the Airflow worker that asks for them. Where the worker runs on the host itself (the local
stack, ``make demo``) the two agree. Where it runs in a container (the docker-compose stack)
the worker's ``/opt/batchscore`` may be the host's ``/home/me/batchscore``: the setting
``BATCHSCORE_HOST_PATHS`` says so, and every bind-mount source is rewritten with it::

    BATCHSCORE_HOST_PATHS=/opt/batchscore=/home/me/batchscore,/data=/srv/scoring-data

Each entry is ``<folder in the worker>=<the same folder on the Docker host>``; the longest
matching folder wins. Once set, every source must lie in one of the folders: a path the host
cannot see is refused rather than mounted from the wrong place.

When the worker can find its own container on the engine (same Docker host), the mapping is
checked against the container's real mounts once per process, so a missing or wrong setting
fails with the value to use instead of scoring an empty folder. On a remote engine that check
is impossible; each worker folder must then at least exist.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import docker.errors
from docker.types import Mount

from batchscore import security
from batchscore.engine import docker_client
from batchscore.errors import HostPathError

log = logging.getLogger(__name__)

#: Environment variable: ``worker=host`` folder pairs, separated by commas.
HOST_PATHS_ENV = "BATCHSCORE_HOST_PATHS"
#: Files that say "this process runs in a container" (Docker's, Podman's).
CONTAINER_MARKERS = (Path("/.dockerenv"), Path("/run/.containerenv"))
_CGROUP_ID = re.compile(r"[/-]([0-9a-f]{64})(?:\.scope)?$")


@dataclass(frozen=True)
class PathMapping:
    """One folder of the worker and where the Docker host has it."""

    worker: PurePosixPath
    host: PurePosixPath

    def __str__(self) -> str:
        return f"{self.worker}={self.host}"


@dataclass(frozen=True)
class ContainerMount:
    """A bind mount of the worker's own container, as Docker reports it."""

    source: PurePosixPath  # on the host
    destination: PurePosixPath  # in the worker


def parse(value: str) -> list[PathMapping]:
    """The mappings of a ``BATCHSCORE_HOST_PATHS`` value; an empty value gives none."""
    mappings = []
    for entry in (e.strip() for e in value.replace("\n", ",").split(",")):
        if not entry:
            continue
        worker, sep, host = (part.strip() for part in entry.partition("="))
        if not sep or not worker or not host:
            raise HostPathError(
                f"{HOST_PATHS_ENV}: entry {entry!r} is not <folder in the worker>=<folder on the Docker host>, "
                "e.g. /opt/batchscore=/home/me/batchscore"
            )
        for side, path in (("worker", worker), ("host", host)):
            if not path.startswith("/"):
                raise HostPathError(f"{HOST_PATHS_ENV}: entry {entry!r}: the {side} folder {path!r} is not an absolute path")
        mappings.append(PathMapping(PurePosixPath(os.path.normpath(worker)), PurePosixPath(os.path.normpath(host))))
    workers = [m.worker for m in mappings]
    if len(set(workers)) != len(workers):
        raise HostPathError(f"{HOST_PATHS_ENV}: a worker folder is mapped twice in {value!r}")
    return mappings


def _covering(path: PurePosixPath, folders: Iterable[Any], key: Any) -> Any:
    """The item whose folder (``key(item)``) holds ``path`` most closely, or None."""
    best = None
    for item in folders:
        folder = key(item)
        if path.is_relative_to(folder) and (best is None or len(folder.parts) > len(key(best).parts)):
            best = item
    return best


def host_path(path: str | Path, mappings: Sequence[PathMapping]) -> str:
    """``path`` (the worker's) as the Docker host sees it; raises when no mapping holds it."""
    worker_path = PurePosixPath(os.path.normpath(str(path)))
    mapping = _covering(worker_path, mappings, lambda m: m.worker)
    if mapping is None:
        raise HostPathError(
            f"{path} is in none of the folders {HOST_PATHS_ENV} maps to the Docker host "
            f"({', '.join(str(m.worker) for m in mappings)}), so the scoring container cannot mount it; "
            f"keep deployments' files under a mapped folder, or add its folder to {HOST_PATHS_ENV}"
        )
    return str(mapping.host / worker_path.relative_to(mapping.worker))


@functools.cache  # a process does not move between containers
def own_container_id() -> str | None:
    """The id (or, failing that, the host name) of the container this process runs in; None on a host."""
    if not any(marker.exists() for marker in CONTAINER_MARKERS):
        return None
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():  # cgroup v1 names the container
            match = _CGROUP_ID.search(line)
            if match:
                return match.group(1)
    except OSError:
        pass
    return socket.gethostname()  # Docker's default host name is the short container id


def container_mounts(client: Any, container: str) -> list[ContainerMount] | None:
    """The bind mounts of ``container`` on the engine ``client`` reaches; None when it is not there."""
    try:
        info = client.inspect_container(container)
    except (docker.errors.NotFound, docker.errors.APIError):
        return None
    if not info.get("Id", "").startswith(container) and (info.get("Config") or {}).get("Hostname") != container:
        return None  # a name that merely looks like the host name: not this process's container
    return [
        ContainerMount(PurePosixPath(m["Source"]), PurePosixPath(m["Destination"]))
        for m in info.get("Mounts", [])
        if m.get("Type") == "bind" and m.get("Source") and m.get("Destination")
    ]


def _expected_host(worker_path: PurePosixPath, mounts: Sequence[ContainerMount]) -> PurePosixPath | None:
    mount = _covering(worker_path, mounts, lambda m: m.destination)
    return None if mount is None else mount.source / worker_path.relative_to(mount.destination)


def suggestion(mounts: Sequence[ContainerMount]) -> str:
    """A ``BATCHSCORE_HOST_PATHS`` value that matches the container's bind mounts of folders."""
    pairs = [
        f"{m.destination}={m.source}"
        for m in mounts
        if m.source != m.destination and str(m.destination) != "/var/run/docker.sock"
    ]
    return ",".join(sorted(pairs))


def check(mappings: Sequence[PathMapping], mounts: Sequence[ContainerMount] | None, container: str | None) -> None:
    """Refuse mappings that this worker's file system (and, where known, its container) contradicts."""
    for m in mappings:
        if not Path(m.worker).exists():
            raise HostPathError(
                f"{HOST_PATHS_ENV} maps {m.worker} to {m.host} on the Docker host, but {m.worker} does not exist "
                "in this Airflow worker; the left side of each entry is the worker's own path"
            )
        if mounts is None:
            continue
        expected = _expected_host(m.worker, mounts)
        assert container is not None, "mounts are known only for a known container"
        if expected is None:
            raise HostPathError(
                f"{HOST_PATHS_ENV} maps {m.worker} to {m.host}, but in this worker's container ({container[:12]}) "
                f"{m.worker} is not mounted from the host at all; mount it (docker-compose volumes) or drop the entry"
            )
        if expected != m.host:
            raise HostPathError(
                f"{HOST_PATHS_ENV} maps {m.worker} to {m.host}, but this worker's container ({container[:12]}) "
                f"mounts {expected} there; set {HOST_PATHS_ENV}={suggestion(mounts) or f'{m.worker}={expected}'}"
            )


@functools.lru_cache(maxsize=8)
def _context(value: str, container: str | None) -> tuple[tuple[PathMapping, ...], tuple[ContainerMount, ...] | None]:
    """Parsed and checked once per process (and setting): the mappings, and the container's mounts if known."""
    mappings = parse(value)
    mounts = None
    if container is not None:
        try:
            mounts = container_mounts(docker_client(), container)
        except Exception as exc:  # noqa: BLE001 - no engine to ask: the check below is skipped, not the job
            log.warning("Cannot ask the Docker engine about this worker's own container %s: %s", container[:12], exc)
        if mounts is None:
            log.info(
                "This worker runs in a container the Docker engine does not know (a remote engine?): "
                "%s is not checked against its mounts",
                HOST_PATHS_ENV,
            )
    check(mappings, mounts, container)
    if mappings:
        log.info("Bind-mount sources are mapped to the Docker host with %s=%s", HOST_PATHS_ENV, ",".join(map(str, mappings)))
    return tuple(mappings), None if mounts is None else tuple(mounts)


def _unmapped_source(source: str, mounts: Sequence[ContainerMount], container: str) -> HostPathError | None:
    """Without a mapping, in a known container: the error for a source the host has elsewhere, or None."""
    path = PurePosixPath(os.path.normpath(source))
    expected = _expected_host(path, mounts)
    if expected == path:
        return None  # mounted at the same path as on the host: nothing to map
    if expected is None:
        where = "lies in the worker container's own file system, which the Docker host cannot mount"
    else:
        where = f"is {expected} on the Docker host"
    hint = suggestion(mounts)
    return HostPathError(
        f"{source} {where}, and {HOST_PATHS_ENV} is not set: this Airflow worker runs in a container "
        f"({container[:12]}) and the Docker engine resolves bind mounts on its host; "
        + (f"set {HOST_PATHS_ENV}={hint}" if hint else "mount the data folder from the host and map it in " + HOST_PATHS_ENV)
    )


def for_docker(mounts: list[Mount]) -> list[Mount]:
    """``mounts`` checked (:func:`security.check_mounts`) and with their sources as the Docker host sees them."""
    security.check_mounts(mounts)
    container = own_container_id()
    mappings, known = _context(os.environ.get(HOST_PATHS_ENV, "").strip(), container)
    if not mappings:
        if known is not None and container is not None:
            for m in mounts:
                if m.get("Type") == "bind" and (error := _unmapped_source(m["Source"], known, container)):
                    raise error
        return mounts
    translated = []
    for m in mounts:
        if m.get("Type") == "bind":
            m = Mount(target=m["Target"], source=host_path(m["Source"], mappings), type="bind", read_only=bool(m.get("ReadOnly")))
        translated.append(m)
    return translated


__all__ = ["HOST_PATHS_ENV", "PathMapping", "check", "for_docker", "host_path", "parse"]
