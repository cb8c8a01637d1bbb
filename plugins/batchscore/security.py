"""How a scoring container is locked down: its user, its Docker host config, its mounts, its secrets.

By default a scoring container has no network, runs as an unprivileged user, has every Linux
capability dropped, cannot gain privileges (``no-new-privileges``), has a read-only root file
system with a tmpfs ``/tmp``, a process limit and optionally a memory limit; everything it gets
is mounted read-only except its own scratch folder, and it can never get the
Docker socket. Secrets reach it from Airflow variables and connections, at execute time, in
environment variables that are neither rendered, stored with the DAG nor logged.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from batchscore.errors import ContainerSecurityError
from batchscore.spec.resources import Resources, memory_bytes

#: Environment variable: the ``uid:gid`` (or ``uid``) scoring containers run as when the Airflow
#: worker runs as root. Unset: :data:`DEFAULT_CONTAINER_USER`. Where the worker is not root, the
#: containers run as the worker's own uid:gid unless this is set.
CONTAINER_USER_ENV = "BATCHSCORE_CONTAINER_USER"
#: ``nobody:nogroup``: owns nothing on the host nor in the image, exists in every Debian-based image.
DEFAULT_CONTAINER_USER = "65534:65534"
#: Where Docker's socket usually is; never mounted into a scoring container.
DOCKER_SOCKETS = ("/var/run/docker.sock", "/run/docker.sock")
#: The root file system is read-only; Python, pandas & co. write temporary files here only.
TMPFS = {"/tmp": "rw,nosuid,nodev"}  # noqa: S108 - a private tmpfs of the container
NO_NEW_PRIVILEGES = "no-new-privileges:true"

_USER = re.compile(r"^[0-9]+(:[0-9]+)?$")


def container_user() -> str:
    """The ``uid:gid`` a scoring container runs as: never root unless configured so.

    A worker that is not root gives its own uid:gid (the container's files are then the
    worker's). A root worker gives ``BATCHSCORE_CONTAINER_USER`` or ``65534:65534``.
    """
    configured = os.environ.get(CONTAINER_USER_ENV, "").strip()
    if configured:
        if not _USER.match(configured):
            raise ContainerSecurityError(
                f"{CONTAINER_USER_ENV} must be a numeric uid or uid:gid (e.g. 65534:65534), got {configured!r}"
            )
        return configured
    if os.getuid() != 0:
        return f"{os.getuid()}:{os.getgid()}"
    return DEFAULT_CONTAINER_USER


def ids(user: str) -> tuple[int, int | None]:
    """The numeric uid and gid (``None`` if not given) of a ``uid[:gid]`` user."""
    uid, _, gid = user.partition(":")
    return int(uid), int(gid) if gid else None


def make_writable_for(folder: Path, user: str) -> None:
    """Let ``user`` (the container's) write into ``folder`` (the mini-batch's result folder).

    A root worker gives it the folder (chown), and can still read and remove what the container
    writes. A non-root worker running containers as another user can only open the folder to
    everyone (chmod 0777); what the container writes in subfolders is then the container
    user's, which the worker can read but not always remove.
    """
    if not _USER.match(user):  # a user name: its ids are the image's, unknown here
        folder.chmod(0o777)
        return
    uid, gid = ids(user)
    if uid == os.getuid() and (gid is None or gid == os.getgid()):
        return
    if os.getuid() == 0:
        os.chown(folder, uid, -1 if gid is None else gid)
        folder.chmod(0o755)
    else:
        folder.chmod(0o777)


def docker_socket_paths() -> set[Path]:
    """The Docker socket's possible places on this host (the usual ones, and ``DOCKER_HOST``'s)."""
    paths = {Path(p) for p in DOCKER_SOCKETS}
    host = os.environ.get("DOCKER_HOST", "")
    if host.startswith("unix://"):
        paths.add(Path(host.removeprefix("unix://")))
    return paths | {p.resolve() for p in paths}


def check_mounts(mounts: Iterable[Any]) -> None:
    """Refuse any mount that would give the container the Docker socket (or any other socket).

    The socket is refused as the mount's source, and as a file inside a mounted folder
    (``/var/run`` as an input folder would give it too).
    """
    sockets = docker_socket_paths()
    for mount in mounts:
        source = mount.get("Source") if isinstance(mount, dict) else getattr(mount, "source", None)
        if not source:
            continue
        path = Path(source)
        resolved = path.resolve()
        try:
            is_socket = stat.S_ISSOCK(resolved.stat().st_mode)
        except OSError:
            is_socket = False
        inside = sorted(
            (s for s in sockets if s.is_relative_to(path) or s.is_relative_to(resolved)),
            key=lambda s: (s != path, s != resolved, str(s)),  # the mount's own source first
        )
        if is_socket or inside:
            what = inside[0] if inside else resolved
            raise ContainerSecurityError(
                f"refusing to mount {source} into the scoring container at {_target(mount)}: it would give "
                f"the container the socket {what}, and with the Docker socket a container controls the host"
            )


def _target(mount: Any) -> str:
    return str(mount.get("Target") if isinstance(mount, dict) else getattr(mount, "target", "?"))


def lockdown(full: bool = True) -> dict[str, Any]:
    """The host-config options that lock a container down (:class:`batchscore.containers.Container` applies them).

    Every container: never privileged, no new privileges. ``full`` (every container that runs
    batchscore's runtime) adds: every capability dropped, a read-only root with a tmpfs ``/tmp``.
    """
    options: dict[str, Any] = {"privileged": False, "security_opt": [NO_NEW_PRIVILEGES]}
    if full:
        options.update(cap_drop=["ALL"], read_only=True, tmpfs=dict(TMPFS))
    return options


def host_config_options(resources: Resources) -> dict[str, Any]:
    """A scoring container's lockdown with its process and swap limits (what ``docker run`` needs to match it)."""
    options: dict[str, Any] = {**lockdown(), "pids_limit": resources.pids_limit}
    if resources.memory is not None:
        options["memswap_limit"] = memory_bytes(resources.memory)  # = mem_limit: no swap beyond it
    return options


def redact(text: Any, secrets: Iterable[str]) -> Any:
    """``text`` with every secret value in it replaced by ``***`` (anything but a string as it is)."""
    if isinstance(text, str):
        for secret in secrets:
            if secret:
                text = text.replace(secret, "***")
    return text


class RedactingLogger:
    """A logger that replaces secret values in messages and their arguments by ``***``.

    Airflow's own masker (fed by :func:`batchscore.secret_environment.resolve_secrets`) redacts the task log in the task
    supervisor; this catches the container's output before it gets there, so it holds also
    where no supervisor runs (``dag.test()``, tests) and for scripts that print their secrets.
    """

    _METHODS = frozenset({"debug", "info", "warning", "warn", "error", "exception", "critical", "fatal", "log", "msg"})

    def __init__(self, log: Any, secrets: Iterable[str]):
        self._log = log
        self._secrets = tuple(secrets)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._log, name)
        if name not in self._METHODS:
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            args = tuple(redact(a, self._secrets) for a in args)
            return attr(*args, **{k: redact(v, self._secrets) for k, v in kwargs.items()})

        return call
