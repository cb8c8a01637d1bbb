"""Ends every process a mini-batch left running, before its result is reported or the next one starts.

A scoring script may start processes (a helper server, a pool, a daemon that forks twice and
calls ``setsid``). None of them may outlive its mini-batch: they could change the report the
runtime is about to write, or reach the next mini-batch of a warm worker. :class:`Sweeper`
finds them by descent, not by process group or session (which a process can leave): every
live process below the runtime's own process is a stray unless it was there when the sweeper
settled. Standard library only; Linux ``/proc``.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Set as AbstractSet

log = logging.getLogger("batchscore")


class Sweeper:
    """Ends every process a mini-batch left running.

    The processes of this process's tree when :meth:`settle` was called (a warm worker's
    processes once each has called ``init()``, and what they and multiprocessing started
    then) are its own. After a mini-batch, every other live process that descends from this
    one is killed (``SIGKILL``), whatever its process group or session: this process is its
    container's PID 1, and elsewhere a child subreaper, so a process that daemonises itself
    (double fork, ``setsid``) is still its descendant. ``docker exec`` processes (a warm
    worker's submitter) descend from no process of the container, and are never touched. A
    thread that ``run()`` leaves in a warm worker process lives on with that process: it is
    the same script's code, and it can reach only this worker's scratch folder, from which
    the orchestrator copies nothing without checking it.
    """

    ROUNDS = 20  # a process that forks while it is being killed is caught in a later round

    def __init__(self, worker: str):
        self.worker = worker  # how log lines name the one sweeping ("w1", "mb-00007")
        self.own: set[int] = set()
        _become_subreaper()

    def settle(self) -> None:
        """Take this process's tree as it is now as its own (a warm worker: after init(), and after a heal)."""
        tree = _processes()
        self.own = {pid for pid in tree if _descends(pid, os.getpid(), tree)}

    def sweep(self, mini_batch: str, keep: AbstractSet[int] = frozenset()) -> list[int]:
        """Kill what ``mini_batch`` left running; returns the pids killed."""
        t0 = time.monotonic()
        killed: list[int] = []
        me = os.getpid()
        for _ in range(self.ROUNDS):
            tree = _processes()
            strays = [
                pid
                for pid, (_ppid, state) in tree.items()
                if pid != me and pid not in self.own and pid not in keep and state not in "ZX" and _descends(pid, me, tree)
            ]
            if not strays:
                break
            for pid in strays:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
            for pid in strays:  # reap the ones that are (now) this process's own children; others are not ours to reap
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass
        if killed:
            log.warning(
                "%s: killed %d process(es) that %s left running (pids %s) in %.0f ms: no process of a mini-batch outlives it",
                self.worker,
                len(set(killed)),
                mini_batch,
                ", ".join(str(p) for p in sorted(set(killed))),
                (time.monotonic() - t0) * 1000,
            )
        return sorted(set(killed))


def _processes() -> dict[int, tuple[int, str]]:
    """Every process this PID namespace shows: pid -> (parent pid, state letter)."""
    found: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                data = fh.read()
            fields = data[data.rindex(b")") + 2 :].split()
            found[int(entry)] = (int(fields[1]), fields[0].decode())
        except (OSError, ValueError, IndexError):
            continue
    return found


def _descends(pid: int, ancestor: int, tree: dict[int, tuple[int, str]]) -> bool:
    seen = 0
    while pid in tree and seen < 4096:
        pid = tree[pid][0]
        if pid == ancestor:
            return True
        seen += 1
    return False


def _become_subreaper() -> None:
    """Orphans of this process's tree become its children, not PID 1's (Linux ``PR_SET_CHILD_SUBREAPER``)."""
    if os.getpid() == 1:
        return  # a container's PID 1 gets them anyway
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


__all__ = ["Sweeper"]
