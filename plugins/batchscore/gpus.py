"""GPU leases: scoring containers on one host never share a GPU unless the YAML allows it.

Docker's ``DeviceRequest(count=N)`` (``docker run --gpus N``) always hands out the host's
*first* N GPUs, so two containers that each ask for one GPU both get GPU 0. With
``resources.share_gpus: false`` (the default) :func:`lease_gpus` instead takes GPUs that no
other scoring container of this host holds, and pins the container to them with
``device_ids``.

A lease is an ``flock`` on one lock file per GPU id in a folder that every Airflow worker of
the host shares (``$BATCHSCORE_GPU_LOCK_DIR``, default ``/tmp/batchscore-gpu-locks``). It is
all-or-nothing: a container that needs two GPUs takes both or neither, and waits without
holding any, so leases never deadlock. The kernel drops an ``flock`` when its process dies, so
a crashed or killed worker never leaves a stale lease. The lock file names its holder (pid,
host, label) for the messages of those who wait.

Name each GPU the same way everywhere on one host, as indexes (``0``) or as UUIDs
(``GPU-8f3b...``): ``BATCHSCORE_GPUS``, device ids in the YAML files and nvidia-smi's list
must agree, since GPU ``0`` and its UUID are two different lock files.

Standard library and the docker SDK only: no Airflow import.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from docker.types import DeviceRequest

from batchscore.errors import GpuUnavailableError

#: The host's GPU ids, comma separated (indexes or UUIDs); set and empty means no GPUs.
GPUS_ENV = "BATCHSCORE_GPUS"
#: The folder of the lock files; every Airflow worker of one host must see the same one.
LOCK_DIR_ENV = "BATCHSCORE_GPU_LOCK_DIR"
DEFAULT_LOCK_DIR = "/tmp/batchscore-gpu-locks"
NVIDIA_SMI_TIMEOUT_S = 10.0
#: A lease that waits says so at once, then at most this often.
WAIT_LOG_INTERVAL_S = 60.0
CAPABILITIES = [["gpu"]]

#: ``resources.gpus``: 0, a count, ``"all"``, or device ids.
Gpus = int | Literal["all"] | Sequence[str]

_LOG = logging.getLogger(__name__)
_ASK: Any = object()  # inventory not given: ask gpu_inventory(), and only when it is needed


@dataclass(frozen=True)
class GpuAssignment:
    """What one scoring container gets.

    ``device_requests`` go to Docker (the container's host config); ``device_ids``
    are the GPUs it is pinned to (``[]`` for none, ``None`` when Docker picks them, which only
    happens with ``share_gpus``); ``count`` is how many GPUs the container will see (``None``
    when unknown: a shared ``all`` on a host whose GPUs are not known).
    """

    device_requests: list[DeviceRequest]
    device_ids: list[str] | None
    count: int | None


def gpu_inventory() -> list[str] | None:
    """The ids of this host's GPUs, or ``None`` when they cannot be known.

    ``$BATCHSCORE_GPUS`` when set (comma separated indexes or UUIDs, whitespace ignored; an
    empty value means no GPUs), else the indexes ``nvidia-smi`` lists when it is on ``PATH``,
    else ``None``. A failing or hanging nvidia-smi gives ``None`` and a logged warning.
    """
    listed = os.environ.get(GPUS_ENV)
    if listed is not None:
        return _unique(listed.split(","))
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    advice = f"the GPUs of this host are unknown (set {GPUS_ENV}=0,1,... to list them)"
    try:
        done = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        _LOG.warning("%s gave no answer in %gs; %s", smi, NVIDIA_SMI_TIMEOUT_S, advice)
        return None
    except OSError as exc:
        _LOG.warning("cannot run %s (%s); %s", smi, exc, advice)
        return None
    if done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        _LOG.warning("%s failed (exit status %d: %s); %s", smi, done.returncode, said, advice)
        return None
    return _unique(done.stdout.splitlines())


def lock_path(lock_dir: str | os.PathLike[str], gpu_id: str) -> Path:
    """The lock file of one GPU id; characters other than letters, digits, ``.`` and ``-``
    are escaped (``_2f`` for ``/`` of MIG ids), so every id gets a file name of its own."""
    safe = "".join(
        chr(b) if chr(b).isascii() and (chr(b).isalnum() or chr(b) in ".-") else f"_{b:02x}" for b in gpu_id.encode("utf-8")
    )
    return Path(lock_dir) / f"gpu-{safe}.lock"


@contextlib.contextmanager
def lease_gpus(
    gpus: Gpus,
    share: bool,
    *,
    label: str,
    inventory: Sequence[str] | None = _ASK,
    lock_dir: str | os.PathLike[str] | None = None,
    poll_seconds: float = 2.0,
    log: logging.Logger | None = None,
) -> Iterator[GpuAssignment]:
    """Lease the GPUs ``resources.gpus`` asks for, for the time of the ``with`` block.

    ``gpus``: 0, a count N, ``"all"``, or a list of device ids. ``share``:
    ``resources.share_gpus``. ``label`` names the holder in the lock files and in the messages
    of those who wait (e.g. ``"<dag>/<deployment>/<run id>/mb-00003"``). ``inventory``: the
    host's GPU ids; by default :func:`gpu_inventory`, asked only when needed. ``lock_dir``: by
    default ``$BATCHSCORE_GPU_LOCK_DIR`` or ``/tmp/batchscore-gpu-locks``.

    * 0: no device requests, nothing locked.
    * ``share=True``: nothing locked; N -> ``count=N``, ``"all"`` -> ``count=-1``, ids ->
      ``device_ids``, as ``docker run --gpus`` would.
    * ``share=False``: ids -> exactly those GPUs; N -> any N free GPUs of the inventory, in its
      order (nvidia-smi lists the lowest index first); ``"all"`` -> every GPU of the inventory.
      Waits, polling every ``poll_seconds``, until all of them are free, and holds none while it
      waits. The container is pinned to the leased GPUs with ``device_ids``.

    Raises :class:`GpuUnavailableError` when an exclusive lease needs the inventory and it is
    unknown, or asks for more GPUs than the host has.
    """
    log = log or _LOG
    requested = _check(gpus)
    if requested == 0:
        yield GpuAssignment([], [], 0)
        return
    if share:
        yield _shared(requested, inventory)
        return

    if isinstance(requested, list):
        candidates, need = requested, len(requested)
        wanted = f"GPU {_join(requested)}" if need == 1 else f"GPUs {_join(requested)}"
    else:
        known = gpu_inventory() if inventory is _ASK else inventory
        candidates, need = _from_inventory(requested, known)
        if requested == "all":
            wanted = f"all GPUs ({_join(candidates)})"
        else:
            wanted = f"{need} free GPU(s) of {_join(candidates)}"

    folder = Path(lock_dir or os.environ.get(LOCK_DIR_ENV) or DEFAULT_LOCK_DIR)
    held = _wait_for(candidates, need, folder, label, wanted, poll_seconds, log)
    ids = list(held)
    try:
        yield GpuAssignment([DeviceRequest(device_ids=ids, capabilities=CAPABILITIES)], ids, len(ids))
    finally:
        _release(held, clear=True)
        log.info(f"released GPU(s) {_join(ids)} of {label}")


# --------------------------------------------------------------------------- internals


def _unique(items: Iterable[str]) -> list[str]:
    """Stripped, non-empty, first occurrence kept, order kept."""
    return list(dict.fromkeys(s.strip() for s in items if s.strip()))


def _join(ids: Iterable[str]) -> str:
    return ", ".join(ids)


def _check(gpus: Any) -> int | Literal["all"] | list[str]:
    if isinstance(gpus, bool):
        raise ValueError(f"gpus must be a count, 'all' or device ids, got {gpus!r}")
    if isinstance(gpus, int):
        if gpus < 0:
            raise ValueError(f"gpus must be 0 or more, got {gpus}")
        return gpus
    if gpus == "all":
        return "all"
    if isinstance(gpus, Sequence) and not isinstance(gpus, str):
        ids = _unique(str(g) for g in gpus)
        if ids:
            return ids
    raise ValueError(f"gpus must be a count, 'all' or a non-empty list of device ids, got {gpus!r}")


def _shared(gpus: int | Literal["all"] | list[str], inventory: Any) -> GpuAssignment:
    if isinstance(gpus, list):
        return GpuAssignment([DeviceRequest(device_ids=list(gpus), capabilities=CAPABILITIES)], list(gpus), len(gpus))
    if gpus == "all":
        known = gpu_inventory() if inventory is _ASK else inventory
        return GpuAssignment([DeviceRequest(count=-1, capabilities=CAPABILITIES)], None, None if known is None else len(known))
    return GpuAssignment([DeviceRequest(count=gpus, capabilities=CAPABILITIES)], None, gpus)


def _from_inventory(gpus: int | Literal["all"], inventory: Sequence[str] | None) -> tuple[list[str], int]:
    """The GPUs a count or ``all`` chooses from, and how many it needs."""
    if inventory is None:
        raise GpuUnavailableError(
            f"resources.gpus: {gpus} asks for GPUs that no other container uses (resources.share_gpus "
            "is false), but batchscore cannot tell which GPUs this host has: neither "
            f"{GPUS_ENV} nor nvidia-smi lists them. Set {GPUS_ENV}=0,1,... (this host's GPU indexes "
            "or UUIDs) in the Airflow worker's environment, install nvidia-smi there, or set "
            "resources.share_gpus: true to let containers share GPUs"
        )
    inventory = _unique(inventory)
    if gpus == "all":
        if not inventory:
            raise GpuUnavailableError(
                "resources.gpus: all asks for every GPU of this host, but it has none (the list of "
                f"GPUs is empty); set resources.gpus: 0, or correct {GPUS_ENV} on the Airflow worker "
                "if it lists the wrong GPUs"
            )
        return inventory, len(inventory)
    if gpus > len(inventory):
        has = f"only {len(inventory)} ({_join(inventory)})" if inventory else "none"
        raise GpuUnavailableError(
            f"resources.gpus: {gpus} asks for {gpus} GPUs per container, but this host has {has}; "
            f"lower resources.gpus to at most {len(inventory)}, or correct {GPUS_ENV} on the "
            "Airflow worker if it lists the wrong GPUs"
        )
    return inventory, gpus


def _ensure_dir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True)
    except FileExistsError:
        return
    except OSError as exc:
        raise GpuUnavailableError(f"cannot make the GPU lock folder {folder}: {exc.strerror}") from exc
    with contextlib.suppress(OSError):  # like /tmp: every worker's user may add lock files
        folder.chmod(0o1777)


def _open(path: Path) -> int:
    try:
        # Without O_CREAT first: Linux's protected_regular forbids O_CREAT on another user's
        # file in a sticky folder, even when it exists and may be written.
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _lock_file_error(path, exc) from exc
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise _lock_file_error(path, exc) from exc
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o666)
    return fd


def _lock_file_error(path: Path, exc: OSError) -> GpuUnavailableError:
    return GpuUnavailableError(
        f"cannot open the GPU lock file {path}: {exc.strerror}; every Airflow worker of this host must "
        f"be able to write {path.parent} (or set {LOCK_DIR_ENV} to a folder they share)"
    )


def _try_lock(path: Path) -> int | None:
    fd = _open(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _release(held: dict[str, int], *, clear: bool) -> None:
    for fd in held.values():
        try:
            if clear:
                os.ftruncate(fd, 0)  # the holder's note goes with the lease
            fcntl.flock(fd, fcntl.LOCK_UN)  # even if a forked child shares the descriptor
        except OSError:
            pass
        finally:
            os.close(fd)


def _try_all(candidates: list[str], need: int, folder: Path) -> tuple[dict[str, int] | None, list[str]]:
    """Take ``need`` of the candidates, or none; also says which ones were busy."""
    held: dict[str, int] = {}
    busy: list[str] = []
    try:
        for gpu in candidates:
            if len(held) == need:
                break
            fd = _try_lock(lock_path(folder, gpu))
            if fd is None:
                busy.append(gpu)
            else:
                held[gpu] = fd
    except BaseException:
        _release(held, clear=False)
        raise
    if len(held) < need:
        _release(held, clear=False)
        return None, busy
    return held, busy


def _write_holder(fd: int, label: str) -> None:
    note = {"pid": os.getpid(), "host": socket.gethostname(), "label": label, "since": time.time()}
    with contextlib.suppress(OSError):  # only a note: a full disk must not fail the lease
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(note) + "\n").encode("utf-8"), 0)


def _holder(path: Path) -> str:
    try:
        note = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {note['pid']} on {note['host']} ({note['label']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not said who it is yet"


def _wait_for(
    candidates: list[str],
    need: int,
    folder: Path,
    label: str,
    wanted: str,
    poll_seconds: float,
    log: Any,
) -> dict[str, int]:
    _ensure_dir(folder)
    started = time.monotonic()
    said_at: float | None = None
    while True:
        held, busy = _try_all(candidates, need, folder)
        if held is not None:
            for fd in held.values():
                _write_holder(fd, label)
            waited = f" after waiting {time.monotonic() - started:.0f}s" if said_at is not None else ""
            log.info(f"leased GPU(s) {_join(held)} for {label}{waited}")
            return held
        now = time.monotonic()
        if said_at is None or now - said_at >= WAIT_LOG_INTERVAL_S:
            holders = "; ".join(f"GPU {g} is held by {_holder(lock_path(folder, g))}" for g in busy)
            so_far = f" (for {now - started:.0f}s so far)" if said_at is not None else ""
            log.info(f"waiting for {wanted} for {label}{so_far}: {holders}")
            said_at = now
        time.sleep(poll_seconds)
