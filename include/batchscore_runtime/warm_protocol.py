"""The warm worker's hand-over protocol, the submitter's side: its lines, its exit codes, ``submit`` and ``cancel``.

The orchestrator runs ``python3 -m batchscore_runtime.warm submit|cancel`` in a worker container
(``docker exec``); :mod:`batchscore_runtime.warm` parses that command line and its daemon answers on
the Unix socket. What the submitter prints (or, for a detached hand-over, appends to its record) is
the mini-batch's log lines and, marked with :data:`PREFIX`, the protocol's own lines (JSON); its exit
code says how the mini-batch ended. The orchestrator's reader of those lines is
:mod:`batchscore.scoring.handover`. Standard library only.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable

from batchscore_runtime.formats import ContainerPaths

#: Lines of ``submit``'s output that are the protocol's, not the mini-batch's log.
PREFIX = "BATCHSCORE-WARM "
#: How a detached hand-over's record marks the mini-batch's log lines (``submit --record``).
RECORD_LOG = "| "
EXIT_OK = 0
EXIT_FAILED = 1  # the mini-batch failed; its status says why
EXIT_REFUSED = 75  # the worker is busy or still starting: try another (EX_TEMPFAIL)
EXIT_LOST = 70  # the daemon ended before the mini-batch was done (EX_SOFTWARE)
#: Why a submission was refused (``{"accepted": false, "state": ...}``), besides the worker's own state.
BUSY = "busy"  # scoring, with a full queue (or any queue, for an --idle-only submission)
CANCELLED = "cancelled"  # taken out of the queue by ``cancel``
LOST = "lost"  # the daemon ended while the mini-batch waited in its queue


def submit(
    mini_batch: str,
    output: str,
    attempt: int,
    socket_path: str = ContainerPaths.WARM_SOCKET,
    *,
    idle_only: bool = False,
    record: str | None = None,
) -> int:
    """Hand one mini-batch to this container's daemon; print its log lines; return its exit code.

    The protocol's lines are printed with ``PREFIX`` (JSON): ``{"queued": true, ...}`` when it
    waits in the worker's queue, then ``{"accepted": ...}`` (when it starts, or why it was
    refused), last its exit code ``{"exit": ...}``. ``idle_only``: refused unless the worker is free.

    ``record``: a detached hand-over (a deferred task): every line goes to that file instead, log lines
    marked ``RECORD_LOG``, the accepted line with ``"at"`` (epoch seconds), the last ``{"done": <code>}``.
    """
    # A record: one whole line per write, appended (a reader never sees half a line).
    fd = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if record is not None else None

    def emit(text: str) -> None:
        if fd is None:
            print(text, flush=True)
        else:
            os.write(fd, (text + "\n").encode("utf-8", "replace"))

    code = _submit(mini_batch, output, attempt, socket_path, idle_only=idle_only, emit=emit, stamped=fd is not None)
    if fd is not None:
        emit(PREFIX + json.dumps({"done": code}))
        os.close(fd)
    return code


def _submit(
    mini_batch: str, output: str, attempt: int, socket_path: str, *, idle_only: bool, emit: Callable[[str], None], stamped: bool
) -> int:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(socket_path)
    except OSError:
        emit(PREFIX + json.dumps({"accepted": False, "state": "starting"}))
        return EXIT_REFUSED
    with conn:
        request = {"mini_batch": mini_batch, "output": output, "attempt": attempt, "idle_only": idle_only}
        conn.sendall((json.dumps(request) + "\n").encode())
        reader = conn.makefile("r", encoding="utf-8")
        first = reader.readline()
        if first and json.loads(first).get("queued"):
            emit(PREFIX + first.strip())
            first = reader.readline()
            if not first:  # the daemon ended while it waited: it never started
                emit(PREFIX + json.dumps({"accepted": False, "state": LOST}))
                return EXIT_REFUSED
        if not first:
            emit(PREFIX + json.dumps({"accepted": False, "state": "stopped"}))
            return EXIT_REFUSED
        answer = json.loads(first)
        if stamped and answer.get("accepted"):
            answer["at"] = round(time.time(), 3)  # the backstop of a deferred task counts from here
            first = json.dumps(answer)
        emit(PREFIX + first.strip())
        if not answer.get("accepted"):
            return EXIT_REFUSED
        for line in reader:
            message = json.loads(line)
            if "log" in message:  # in a record, marked as a log line: it can never pass for the protocol's
                emit(RECORD_LOG + message["log"] if stamped else message["log"])
            elif "exit" in message:
                emit(PREFIX + line.strip())
                return int(message["exit"])
    emit(PREFIX + json.dumps({"lost": True}))
    return EXIT_LOST


def cancel(output: str, socket_path: str = ContainerPaths.WARM_SOCKET) -> int:
    """Take the mini-batch with output folder ``output`` out of the daemon's queue; 0 if it was waiting there.

    Prints one protocol line: ``{"cancelled": true|false, "state": "queued"|"scoring"|"unknown"}``.
    """
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(socket_path)
    except OSError:
        print(PREFIX + json.dumps({"cancelled": False, "state": "stopped"}), flush=True)
        return 1
    with conn:
        conn.sendall((json.dumps({"cancel": output}) + "\n").encode())
        line = conn.makefile("r", encoding="utf-8").readline()
    message = json.loads(line) if line else {"cancelled": False, "state": "stopped"}
    print(PREFIX + json.dumps(message), flush=True)
    return 0 if message.get("cancelled") else 1


__all__ = [
    "BUSY",
    "CANCELLED",
    "EXIT_FAILED",
    "EXIT_LOST",
    "EXIT_OK",
    "EXIT_REFUSED",
    "LOST",
    "PREFIX",
    "RECORD_LOG",
    "cancel",
    "submit",
]
