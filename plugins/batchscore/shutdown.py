"""Stopping on SIGINT, SIGTERM and SIGHUP, and leaving nothing behind: what ``python -m batchscore run``,
``python -m bench`` and the test suite share.

* :func:`install` makes the first of these signals raise :class:`Interrupted` (a ``KeyboardInterrupt``)
  in the main thread, so that the ``with`` and ``finally`` blocks that started something stop it. A
  second signal during that shutdown raises nothing: it sets :func:`forced`, and the stop loops
  (:meth:`batchscore.localairflow.LocalAirflow.stop`, the local services' ``stop``) kill what is left
  at once instead of giving it time to end. A third one ends the process at once, as if it were
  not handled (only the components' parent-death signal then stops them).
* :func:`note` collects what the shutdown stopped; :func:`report` is the one line said at the end.
  The exit status is ``128 + the first signal's number`` (130 for Ctrl-C).
* :func:`marked_processes` finds processes by an environment variable every descendant inherits,
  even one that left its parent's process group or session, or whose parent died.
* :func:`remove_run_containers` removes every container of some runs (labels ``batchscore.endpoint``
  and ``batchscore.run_id``), and :func:`end_gpu_holders` checks that the warm workers' GPU holders
  (``python -m batchscore.gpu_holder``) then end on their own.

No Airflow import: the Docker SDK and psutil only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import psutil

__all__ = [
    "Interrupted", "containers_mounting", "end_gpu_holders", "forced", "install", "interrupted", "marked_processes", "note",
    "remove_containers", "remove_run_containers", "report", "say", "saying_what_stops", "signal_name", "wait_unless_forced",
]  # fmt: skip

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: Seconds a GPU holder gets to notice that its container is gone (it looks every 2 s).
HOLDER_END_SECONDS = 30.0


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread by the first SIGINT, SIGTERM or SIGHUP after :func:`install`."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        """``128 + N``, as a shell reports a command that signal N ended."""
        return 128 + self.signum


class _State:
    def __init__(self) -> None:
        self.first: int | None = None  # the signal that started the shutdown
        self.second: int | None = None  # the one that forced it
        self.notes: list[str] = []


_state = _State()


def _handler(signum: int, frame: Any) -> None:
    if _state.first is None:
        _state.first = signum
        raise Interrupted(signum)
    if _state.second is None:
        _state.second = signum  # read by the stop loops; raising again would cut the shutdown short
        return
    # A third: something other than the stop loops hangs. End now, as the signal would have.
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def install() -> None:
    """Handle SIGINT, SIGTERM and SIGHUP as this module says, from now until the process ends.

    A signal ignored since the process started stays ignored: ``nohup`` (SIGHUP), or SIGINT in
    a job that a non-interactive shell started in the background.
    """
    for sig in SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, _handler)


def interrupted() -> bool:
    """Whether a signal started a shutdown."""
    return _state.first is not None


def forced() -> bool:
    """Whether a second signal asked to kill what is left at once."""
    return _state.second is not None


def wait_unless_forced(seconds: float, done: Any = lambda: False, poll: float = 0.2) -> bool:
    """Wait until ``done()`` is true, ``seconds`` have passed or the shutdown is forced; return ``done()``."""
    deadline = time.monotonic() + seconds
    while not done() and not forced() and time.monotonic() < deadline:
        time.sleep(poll)
    return bool(done())


def note(what: str) -> None:
    """Record what a shutdown stopped (nothing is recorded when no signal started one)."""
    if interrupted():
        _state.notes.append(what)


def signal_name() -> str:
    """The name of the signal that started the shutdown (``SIGINT``...)."""
    return signal.Signals(_state.first).name if _state.first else "no signal"


def report() -> str:
    """The one line said at the end of a shutdown: the signal(s) and what was stopped."""
    head = f"Interrupted by {signal_name()}"
    if _state.second is not None:
        head += f", forced by a second signal ({signal.Signals(_state.second).name})"
    return f"{head}: {'; '.join(_state.notes) or 'nothing was running'}"


def say(line: str) -> None:
    """Print a line on stderr; a terminal that hung up (SIGHUP) is no reason to fail."""
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        with contextlib.suppress(OSError):  # and no complaint when Python flushes it at exit
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stderr.fileno())
            os.dup2(devnull, sys.stdout.fileno())


# --------------------------------------------------------------------------- processes


@contextlib.contextmanager
def saying_what_stops(what: str) -> Iterator[None]:
    """After a signal, say that ``what`` is about to stop (it may take the stop grace), then let it stop."""
    try:
        yield
    except Interrupted:
        say(f"{signal_name()}: stopping {what} (a second signal kills them at once) ...")
        raise


def marked_processes(name: str, value: str) -> list[psutil.Process]:
    """Every live process (this one aside) whose environment has ``name=value``."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error, OSError):
            if proc.environ().get(name) == value and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


def is_gpu_holder(proc: psutil.Process) -> bool:
    """Whether ``proc`` is a warm worker's GPU holder (``python -m batchscore.gpu_holder``)."""
    try:
        cmdline = proc.cmdline()
    except psutil.Error:
        return False
    return "batchscore.gpu_holder" in cmdline


def end_gpu_holders(holders: Iterable[psutil.Process], timeout: float = HOLDER_END_SECONDS) -> list[int]:
    """Wait for GPU holders whose containers were removed to end on their own; kill those that do not.

    Returns the pids that had to be killed (none, when holders work as they should).
    """
    holders = list(holders)

    def left() -> list[psutil.Process]:
        return [h for h in holders if _alive(h)]

    wait_unless_forced(timeout, lambda: not left())
    killed = [h.pid for h in left()]
    for h in left():
        with contextlib.suppress(psutil.Error):
            h.kill()
    if killed:
        note(f"killed {len(killed)} GPU holder(s) that outlived their container")
    return killed


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# --------------------------------------------------------------------------- containers


def _docker() -> Any:
    from docker import APIClient
    from docker.utils import kwargs_from_env

    return APIClient(**kwargs_from_env(), version="auto")


def remove_containers(containers: list[dict[str, Any]], cli: Any = None) -> list[str]:
    """Remove (with force) the containers that ``docker ps`` listed; returns their names.

    Serving containers go last: their clients use their network until they are gone.
    """
    from docker.errors import APIError, NotFound

    cli = cli or _docker()
    containers = sorted(containers, key=lambda c: (c.get("Labels") or {}).get("batchscore.role", "").endswith("serving"))
    removed = []
    for c in containers:
        try:
            cli.remove_container(c["Id"], force=True)
        except NotFound:
            continue
        except APIError as exc:
            if exc.status_code != 409:  # 409: its removal is already in progress
                raise
        removed.append((c.get("Names") or [c["Id"][:12]])[0].lstrip("/"))
    return removed


def remove_run_containers(endpoint: str, run_ids: Iterable[str]) -> dict[str, list[str]]:
    """Remove every container of these runs of ``endpoint`` (warm workers, serving and scoring containers).

    Returns the names removed, by run id; each run that had any is noted for :func:`report`.
    """
    cli = _docker()
    removed = {}
    for run_id in dict.fromkeys(run_ids):
        found = cli.containers(all=True, filters={"label": [f"batchscore.endpoint={endpoint}", f"batchscore.run_id={run_id}"]})
        if names := remove_containers(found, cli):
            removed[run_id] = names
            note(f"removed the container(s) of run {run_id}: {', '.join(sorted(names))}")
    return removed


def containers_mounting(folders: Iterable[Path], label: str | None = None) -> list[dict[str, Any]]:
    """The containers (running or not) that bind-mount a path inside one of ``folders``; with ``label`` only those carrying it.

    A test's (or a test session's) own folder tells its containers from those of anyone else on the same Docker engine.
    """
    roots = [str(Path(f).resolve()).rstrip("/") + "/" for f in folders]
    filters = {"label": label} if label else None
    return [
        c for c in _docker().containers(all=True, filters=filters)
        if any(((m.get("Source") or "") + "/").startswith(r) for m in c.get("Mounts") or [] for r in roots)
    ]  # fmt: skip
