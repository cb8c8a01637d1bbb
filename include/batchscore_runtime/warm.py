"""Warm workers: the model is loaded once per worker container, then mini-batches come one at a time.

With ``settings.worker_mode: warm`` the orchestrator starts a run's worker containers once
(``python3 -m batchscore_runtime.warm daemon ...``). The daemon gets ready once:

* **azure**: it starts ``--workers`` worker processes, each of which imports the scoring script
  and calls ``init()`` once (as Azure does per worker process);
* **serve**: it waits for the serving container's ``GET /ping`` once (the client shares the
  serving container's network, as in one-container-per-mini-batch mode).

It then scores one mini-batch at a time, taken on a Unix socket (:data:`ContainerPaths.WARM_SOCKET`),
and holds up to ``--queue-depth`` at once: the one it scores and the others waiting, in the
order they came, so that it starts the next the moment one ends.
``python3 -m batchscore_runtime.warm submit`` (run by the orchestrator with ``docker exec``;
:mod:`batchscore_runtime.warm_protocol` is that side, its lines and exit codes) hands
it one: the daemon answers whether it takes it now, queues it (``{"queued": true}``, then
``{"accepted": true}`` when it starts) or refuses it (a starting worker, a full queue, or any
queue at all with ``--idle-only``: the orchestrator tries another); ``warm cancel`` takes a
waiting one out of the queue (its task was killed). While scoring it copies every line the mini-batch logs to the submitter (the
orchestrator's task log) as well as to the container's log, writes the mini-batch's result
and report into the sub-folder of its scratch folder that the orchestrator named, exactly as
the one-shot runtimes do, ends every process the mini-batch left running
(:mod:`batchscore_runtime.processes`), and ends with the exit code. The orchestrator then
checks and commits the result; the worker never sees a result folder. Its state (``starting``,
``ready``, ``failed``, ``stopped``, the ``init()`` time, the mini-batches scored, the seconds spent
scoring them and when the first started and the last ended) is in
``state.json`` of its folder, for the orchestrator to read.

A worker process that dies or runs past ``retry_settings.timeout`` fails only its mini-batch;
the daemon starts a new one (a new ``init()``) before it takes the next. The daemon stops on
its own after ``--idle-timeout`` seconds without a mini-batch, so a teardown that never ran
leaves nothing running for long. Standard library only, plus what the contract's runtime uses.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import multiprocessing
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from batchscore_runtime.formats import (
    WORKER_STATE_FILE,
    ContainerPaths,
    ErrorInfo,
    MiniBatchDir,
    TransformConfig,
    now_iso,
    read_mini_batch_file,
    write_json_atomic,
)
from batchscore_runtime.processes import Sweeper
from batchscore_runtime.warm_protocol import (
    BUSY,
    CANCELLED,
    EXIT_FAILED,
    EXIT_OK,
    LOST,
    cancel,
    submit,
)
from batchscore_runtime.worker_state import WorkerState

log = logging.getLogger("batchscore")
#: What the queue does: in the container's log, not in the log of the mini-batch that scores meanwhile.
queue_log = logging.getLogger("batchscore.queue")

#: A serving container that was healthy must answer /ping this fast before each mini-batch.
WARM_PING_TIMEOUT = 15.0
STATE_FILE = WORKER_STATE_FILE


# --------------------------------------------------------------------------- log lines


class Tee:
    """Every line goes to the container's log, and to the submitter of the running mini-batch."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: socket.socket | None = None
        self._out = sys.__stdout__

    def line(self, text: str, *, local: bool = False) -> None:
        """``text`` to the container's log and, unless ``local``, to the running mini-batch's submitter."""
        with self._lock:
            if self._out is None:  # no standard output at all (never so in a container)
                return
            try:
                self._out.write(text + "\n")
                self._out.flush()
            except (OSError, ValueError):
                pass
            if self._conn is not None and not local:
                try:
                    self._conn.sendall((json.dumps({"log": text}) + "\n").encode())
                except OSError:
                    self._conn = None  # the submitter is gone; the mini-batch goes on, logged here

    def attach(self, conn: socket.socket | None) -> None:
        with self._lock:
            self._conn = conn


class _TeeHandler(logging.Handler):
    def __init__(self, tee: Tee, *, local: bool = False):
        super().__init__()
        self.tee = tee
        self.local = local  # the container's log only: not a line of the mini-batch scoring now

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001 - a log line must never break the daemon
            return
        for line in text.splitlines() or [""]:
            self.tee.line(line, local=self.local)


def _pump(fd: int, tee: Tee) -> None:
    """Copy a worker process's output (its stdout and stderr), line by line, to ``tee``."""
    buffer = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            chunk = b""
        if not chunk:
            if buffer:
                tee.line(buffer.decode("utf-8", "replace"))
            os.close(fd)
            return
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            tee.line(line.decode("utf-8", "replace"))


# --------------------------------------------------------------------------- the two contracts


class AzurePool:
    """Worker processes that import the scoring script and call ``init()`` once, then score tasks."""

    def __init__(self, args: argparse.Namespace, tee: Tee):
        from batchscore_runtime.workers import worker_gpus

        self.args = args
        self.tee = tee
        self.size = max(1, args.workers)
        self.ctx = multiprocessing.get_context("spawn")
        self.processes: list[Any] = [None] * self.size
        self.conns: list[Connection | None] = [None] * self.size
        self.init_seconds: list[float] = [0.0] * self.size
        self.gpus = [worker_gpus(k, self.size, args.gpus) for k in range(self.size)]

    @property
    def ready_seconds(self) -> float:
        return max(self.init_seconds)

    def start(self) -> None:
        """Start every process and wait for its ``init()``; raises ``MiniBatchFailed`` (killing them all) if one fails."""
        self._start([k for k in range(self.size)])

    def broken(self) -> bool:
        """Whether a process ended (died, or was killed past its time limit) and must be replaced."""
        return any(p is None or not p.is_alive() for p in self.processes)

    def heal(self) -> None:
        """Replace the processes that ended (each calls init() once)."""
        dead = [k for k, p in enumerate(self.processes) if p is None or not p.is_alive()]
        log.warning("%s: starting %d new worker process(es) in place of those that ended", self.args.worker, len(dead))
        self._start(dead)

    def _start(self, slots: list[int]) -> None:
        from batchscore_runtime.workers import MiniBatchFailed, WarmProcess, _warm_worker_main

        started = time.monotonic()
        for k in slots:
            spec = WarmProcess(
                worker=k,
                workers=self.size,
                label=self.args.worker,
                script=str(self.args.scoring_script),
                log_level=self.args.log_level,
                outputs_dir=ContainerPaths.WARM_BI_OUTPUT,
                cuda_visible_devices=self.gpus[k],
            )
            parent, child = self.ctx.Pipe(duplex=True)
            out_r, out_w = self.ctx.Pipe(duplex=False)
            process = self.ctx.Process(target=_warm_worker_main, args=(child, out_w, spec), name=spec.name, daemon=True)
            process.start()
            child.close()
            out_w.close()
            threading.Thread(target=_pump, args=(os.dup(out_r.fileno()), self.tee), daemon=True).start()
            out_r.close()
            self.processes[k], self.conns[k] = process, parent
        for k in slots:
            conn, process = self.conns[k], self.processes[k]
            assert conn is not None  # started just above
            remaining = self.args.init_timeout - (time.monotonic() - started)
            try:
                if not conn.poll(max(0.0, remaining)):
                    self.stop()
                    raise MiniBatchFailed(
                        ErrorInfo(
                            type="InitTimeout",
                            message=f"{self.args.worker} process {k + 1}/{self.size} did not finish init() within "
                            f"settings.init_timeout = {self.args.init_timeout:g} s",
                        )
                    )
                kind, payload = conn.recv()
            except (EOFError, OSError):
                process.join(timeout=5)
                self.stop()
                raise MiniBatchFailed(
                    ErrorInfo(
                        type="WorkerDied",
                        message=f"{self.args.worker} process {k + 1}/{self.size} exited with code "
                        f"{process.exitcode} during start-up and init()",
                    )
                ) from None
            if kind == "error":
                self.stop()
                raise MiniBatchFailed(payload)
            self.init_seconds[k] = float(payload)

    def run(self, tasks: list, timeout: float, init_timeout: float) -> list:
        """Score ``tasks`` (one per process, in order); the ``Runner`` of :func:`azure.score_mini_batch`."""
        from batchscore_runtime.workers import _index_of, _Worker, oom_kills, supervise

        workers = []
        now = time.monotonic()
        for k, task in enumerate(tasks):
            conn = self.conns[k]
            assert conn is not None  # every process runs: start() or heal() came first
            conn.send(task)
            workers.append(_Worker(task, self.processes[k], conn, now, phase="run", run_started=now, index_of=_index_of(task)))
        try:
            return supervise(
                workers,
                timeout=timeout,
                init_timeout=init_timeout,
                report=log.info,
                oom_baseline=oom_kills(),
                persistent=True,
            )
        finally:
            for k, w in enumerate(workers):
                if w.dead:
                    self._discard(k)

    def _discard(self, k: int) -> None:
        process, conn = self.processes[k], self.conns[k]
        if process is not None and process.is_alive():
            process.kill()
        if process is not None:
            process.join(timeout=10)
        if conn is not None:
            conn.close()
        self.processes[k], self.conns[k] = None, None

    def pids(self) -> set[int]:
        """The worker processes (they outlive mini-batches: each called init() once)."""
        return {p.pid for p in self.processes if p is not None and p.pid is not None}

    def stop(self) -> None:
        for k in range(self.size):
            conn = self.conns[k]
            if conn is not None:
                try:
                    conn.send(None)
                except OSError:
                    pass
            self._discard(k)

    def score(self, mini_batch_file: Path, output: Path, attempt: int, sweep: Callable[[], None] = lambda: None) -> int:
        """Score one mini-batch in the warm processes; ``sweep`` runs after run() and before the report is written.

        A process run() left behind could otherwise rewrite the report between its writing and
        the daemon's sweep: with the sweep first, nothing of the mini-batch is alive when it is written.
        """
        from batchscore_runtime.azure import RunOptions, score_and_commit

        def run_then_sweep(tasks: list, timeout: float, init_timeout: float) -> list:
            try:
                return self.run(tasks, timeout, init_timeout)
            finally:
                sweep()

        mini_batch = read_mini_batch_file(mini_batch_file)
        options = RunOptions(
            workers=self.size,
            timeout=self.args.timeout,
            init_timeout=self.args.init_timeout,
            output_action=self.args.output_action,
            gpu_count=self.args.gpus,
            attempt=attempt,
            log_level=self.args.log_level,
            worker=self.args.worker,
            worker_init_seconds=self.ready_seconds,
        )
        return score_and_commit(
            mini_batch,
            self.args.input_root,
            self.args.scoring_script,
            MiniBatchDir(output, mini_batch.index),
            options,
            runner=run_then_sweep,
            on_outputs=_point_bi_output,
        )


def _point_bi_output(folder: Path) -> None:
    """Point the warm workers' fixed ``AZUREML_BI_OUTPUT_PATH`` at this attempt's outputs folder."""
    link = Path(ContainerPaths.WARM_BI_OUTPUT)
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(folder)
    os.replace(tmp, link)


class ServeClient:
    """The client of the serving container: waits for ``/ping`` once, then scores mini-batches."""

    def __init__(self, args: argparse.Namespace, tee: Tee):
        self.args = args
        self.config = TransformConfig.from_json(json.loads(args.transform))
        self.ready_seconds = 0.0
        self.healthy = True

    def start(self) -> None:
        from batchscore_runtime.serving import ServingClient, wait_until_healthy

        self.ready_seconds = wait_until_healthy(ServingClient(self.args.url), self.config.startup_timeout)

    def broken(self) -> bool:
        return False

    def heal(self) -> None:
        pass

    def pids(self) -> set[int]:
        return set()

    def stop(self) -> None:
        pass

    def score(self, mini_batch_file: Path, output: Path, attempt: int, sweep: Callable[[], None] = lambda: None) -> int:
        """Send one mini-batch to the serving container; no user code runs here, so ``sweep`` is left to the daemon."""
        from batchscore_runtime.serving import Attempt, ServingClient, score_and_commit, wait_until_healthy

        mini_batch = read_mini_batch_file(mini_batch_file)
        run = Attempt(
            mini_batch,
            MiniBatchDir(output, mini_batch.index),
            attempt,
            worker=self.args.worker,
            worker_init_seconds=self.ready_seconds,
        )
        # A server that was healthy answers at once; one that does not is gone, and waiting init_timeout helps no one.
        config = replace(self.config, startup_timeout=min(WARM_PING_TIMEOUT, self.config.startup_timeout))
        code = score_and_commit(run, self.args.input_root, config, self.args.url)
        if code != EXIT_OK:
            try:
                wait_until_healthy(ServingClient(self.args.url), PING_CHECK)
            except Exception:  # noqa: BLE001 - the serving container stopped answering
                self.healthy = False
        return code


PING_CHECK = 3.0


# --------------------------------------------------------------------------- the daemon


class Daemon:
    """Gets ready once, then scores one mini-batch at a time for whoever connects to its socket."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.tee = Tee()
        self.backend: Any = AzurePool(args, self.tee) if args.contract == "azure" else ServeClient(args, self.tee)
        self.state_dir = Path(args.state_dir)
        self.state = WorkerState(
            worker=args.worker, state=WorkerState.STARTING, started_at=now_iso(), processes=getattr(self.backend, "size", 1)
        )
        self.lock = threading.Lock()  # the state file
        self.turns = threading.Condition()  # busy, waiting, scoring: who scores now and who is next
        self.busy = False  # a mini-batch scores now, or its turn was just handed over
        self.depth = max(1, int(getattr(args, "queue_depth", 1) or 1))
        self.waiting: collections.deque[_Ticket] = collections.deque()
        self.scoring: str | None = None  # the output folder of the mini-batch scoring now
        self.last_work = time.monotonic()
        self.stopping = threading.Event()
        self.exit_code = 0
        self.sweeper = Sweeper(args.worker)

    def _set(self, **changes: Any) -> None:
        with self.lock:
            self.state = replace(self.state, updated_at=now_iso(), **changes)
            write_json_atomic(self.state_dir / STATE_FILE, self.state.to_json())

    def run(self) -> int:
        self._set()
        try:
            os.unlink(self.args.socket)
        except FileNotFoundError:
            pass
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(self.args.socket))
        server.listen(16)
        server.settimeout(1.0)
        threading.Thread(target=self._get_ready, daemon=True).start()
        try:
            while not self.stopping.is_set():
                try:
                    conn, _ = server.accept()
                except socket.timeout:
                    self._check_idle()
                    continue
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()
        finally:
            server.close()
            self.backend.stop()
        return self.exit_code

    def _get_ready(self) -> None:
        what = "init()" if self.args.contract == "azure" else "the serving container's /ping"
        log.info("%s: getting ready (%s, once for the whole run)", self.args.worker, what)
        try:
            self.backend.start()
        except Exception as exc:  # noqa: BLE001 - reported in the state file, which the orchestrator reads
            info = getattr(exc, "info", None) or ErrorInfo(
                type=type(exc).__name__, message=str(exc).strip(), traceback=traceback.format_exc()
            )
            log.error("%s could not get ready: %s", self.args.worker, info.one_line())
            self._set(state=WorkerState.FAILED, error=info)
            self._stop(1)
            return
        log.info("%s: ready after %.2f s; waiting for mini-batches", self.args.worker, self.backend.ready_seconds)
        self.sweeper.settle()
        self.last_work = time.monotonic()
        self._set(state=WorkerState.READY, init_seconds=round(self.backend.ready_seconds, 3))

    def _check_idle(self) -> None:
        idle = time.monotonic() - self.last_work
        if self.state.state == WorkerState.READY and not self.busy and idle > self.args.idle_timeout:
            log.info("%s: no mini-batch for %.0f s (--idle-timeout); stopping", self.args.worker, idle)
            self._set(state=WorkerState.STOPPED)
            self._stop(0)

    def _stop(self, code: int) -> None:
        self.exit_code = code
        self.stopping.set()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                request = json.loads(conn.makefile("r", encoding="utf-8").readline() or "{}")
            except (OSError, ValueError):
                return
            if "cancel" in request:
                self._cancel(conn, str(request["cancel"]))
                return
            ticket: _Ticket | None = None
            with self.turns:
                refused = self.state.state if self.state.state != WorkerState.READY else None
                if refused is None and self.busy:
                    if request.get("idle_only") or len(self.waiting) >= self.depth - 1:
                        refused = BUSY
                    else:
                        ticket = _Ticket(str(request.get("output")), time.monotonic())
                        self.waiting.append(ticket)
                        ahead = len(self.waiting)  # the one scoring, and those queued before it
                elif refused is None:
                    self.busy = True
            if refused is not None:
                _send(conn, {"accepted": False, "state": refused})
                return
            queued_seconds = None
            if ticket is not None:
                name = Path(request["mini_batch"]).stem
                _send(conn, {"queued": True, "worker": self.args.worker, "ahead": ahead, "depth": self.depth})
                queue_log.info("%s: %s queued, %d mini-batch(es) ahead of it", self.args.worker, name, ahead)
                why = self._wait_turn(ticket, conn)
                if why is not None:
                    queue_log.info("%s: %s left the queue (%s)", self.args.worker, name, why)
                    _send(conn, {"accepted": False, "state": why})
                    return
                queued_seconds = round(time.monotonic() - ticket.since, 3)
            try:
                self._score(conn, request, queued_seconds)
            finally:
                self.last_work = time.monotonic()
                self._next_turn()

    def _wait_turn(self, ticket: _Ticket, conn: socket.socket) -> str | None:
        """Wait in the queue until the mini-batch may start (None), or why it may not (cancelled, the worker's state)."""
        with self.turns:
            while not ticket.granted and ticket.cancelled is None and not self.stopping.is_set():
                self.turns.wait(QUEUE_POLL_SECONDS)
                if not ticket.granted and ticket.cancelled is None and _hung_up(conn):
                    ticket.cancelled = CANCELLED  # the submitter is gone: nobody would take its result in
            if ticket in self.waiting:
                self.waiting.remove(ticket)
            if ticket.granted and self.state.state == WorkerState.READY and not self.stopping.is_set():
                return None
            if ticket.granted:  # the worker broke during the one before: pass the turn on, each one refuses
                self._pass_turn()
            return ticket.cancelled or (LOST if self.stopping.is_set() else self.state.state)

    def _next_turn(self) -> None:
        with self.turns:
            self.scoring = None
            self._pass_turn()

    def _pass_turn(self) -> None:
        """The next waiting mini-batch scores now (``busy`` stays set: no new one slips in between); else none."""
        if self.waiting:
            self.waiting.popleft().granted = True
            self.turns.notify_all()
        else:
            self.busy = False

    def _cancel(self, conn: socket.socket, output: str) -> None:
        """Take the waiting mini-batch whose output folder is ``output`` out of the queue; say whether it was there."""
        with self.turns:
            ticket = next((t for t in self.waiting if t.output == output), None)
            if ticket is not None:
                self.waiting.remove(ticket)
                ticket.cancelled = CANCELLED
                self.turns.notify_all()
            state = "queued" if ticket is not None else "scoring" if self.scoring == output else "unknown"
        _send(conn, {"cancelled": ticket is not None, "state": state})

    def _score(self, conn: socket.socket, request: dict[str, Any], queued_seconds: float | None = None) -> None:
        name = Path(request["mini_batch"]).stem
        with self.turns:
            self.scoring = str(request.get("output"))
        accepted: dict[str, Any] = {"accepted": True, "worker": self.args.worker, "init_seconds": self.state.init_seconds}
        if queued_seconds is not None:
            accepted["queued_seconds"] = queued_seconds
        _send(conn, accepted)
        self.tee.attach(conn)
        log.info("%s: scoring %s (try %s)", self.args.worker, name, request.get("attempt"))
        started, started_at = time.monotonic(), now_iso()
        try:
            output = Path(request["output"])  # a fresh sub-folder of this worker's scratch folder
            output.mkdir(parents=True, exist_ok=True)
            sweep = lambda: self.sweeper.sweep(name, keep=self.backend.pids())  # noqa: E731 - a closure over name
            code = self.backend.score(Path(request["mini_batch"]), output, int(request.get("attempt", 1)), sweep)
        except Exception:  # noqa: BLE001 - the contract's runtime commits every failure it can; this is a bug
            traceback.print_exc()
            code = EXIT_FAILED
        try:
            self.sweeper.sweep(name, keep=self.backend.pids())
        finally:
            self.tee.attach(None)
        busy = time.monotonic() - started
        self._set(
            mini_batches=[*self.state.mini_batches, name],
            busy_seconds=round(self.state.busy_seconds + busy, 3),
            first_started_at=self.state.first_started_at or started_at,
            last_ended_at=now_iso(),
        )
        _send(conn, {"exit": code})
        self._after(name)

    def _after(self, name: str) -> None:
        """Replace what broke during the mini-batch before the next one (a new init())."""
        if self.args.contract == "serve":
            if not self.backend.healthy:
                log.error("%s: the serving container stopped answering during %s; this worker stops", self.args.worker, name)
                self._set(
                    state=WorkerState.STOPPED,
                    error=ErrorInfo(type="ServingContainerGone", message="the serving container stopped answering /ping"),
                )
                self._stop(1)
            return
        if not self.backend.broken():
            return
        self._set(state=WorkerState.STARTING)
        try:
            self.backend.heal()
        except Exception as exc:  # noqa: BLE001 - the new process's init() failed: this worker is done
            info = getattr(exc, "info", None) or ErrorInfo(type=type(exc).__name__, message=str(exc).strip())
            self._set(state=WorkerState.FAILED, error=info)
            self._stop(1)
            return
        self.sweeper.settle()
        self._set(state=WorkerState.READY, init_seconds=round(self.backend.ready_seconds, 3))


#: How often a queued mini-batch looks whether its submitter is still there.
QUEUE_POLL_SECONDS = 0.5


@dataclass
class _Ticket:
    """A mini-batch waiting in a worker's queue."""

    output: str  # its output folder: what ``cancel`` names it by
    since: float  # time.monotonic() when it was queued
    granted: bool = False  # its turn came
    cancelled: str | None = None  # why it left the queue without scoring


def _hung_up(conn: socket.socket) -> bool:
    """Whether the submitter on ``conn`` closed its end (it sends nothing after its request)."""
    try:
        readable, _, _ = select.select([conn], [], [], 0)
        return bool(readable) and conn.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    try:
        conn.sendall((json.dumps(message) + "\n").encode())
    except OSError:
        pass


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m batchscore_runtime.warm", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    daemon = commands.add_parser("daemon", help="get ready once, then score mini-batches handed over by submit")
    daemon.add_argument("--contract", required=True, choices=["azure", "serve"])
    daemon.add_argument("--worker", required=True, help="this worker's name in logs and records (w1)")
    daemon.add_argument("--state-dir", default=ContainerPaths.WORKER_STATE, type=Path)
    daemon.add_argument("--input-root", default=ContainerPaths.INPUT, type=Path)
    daemon.add_argument("--socket", default=ContainerPaths.WARM_SOCKET, help="where to take mini-batches")
    daemon.add_argument("--idle-timeout", type=float, default=600.0, help="stop after this many seconds without work")
    daemon.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    daemon.add_argument("--queue-depth", type=int, default=1, help="mini-batches held at once: 1 scoring, the rest waiting")
    daemon.add_argument("--init-timeout", type=float, default=600.0)
    # azure
    daemon.add_argument("--scoring-script", type=Path)
    daemon.add_argument("--workers", type=int, default=1)
    daemon.add_argument("--timeout", type=float, default=30.0)
    daemon.add_argument("--output-action", default="append_row", choices=["append_row", "summary_only"])
    daemon.add_argument("--gpus", type=int, default=None)
    # serve
    daemon.add_argument("--transform", help="the transform settings: TransformConfig as JSON")
    daemon.add_argument("--url", default=ContainerPaths.SERVING_URL)
    sub = commands.add_parser("submit", help="hand one mini-batch to the daemon and wait for it")
    sub.add_argument("--mini-batch", required=True)
    sub.add_argument("--output", required=True)
    sub.add_argument("--attempt", type=int, default=1)
    sub.add_argument("--socket", default=ContainerPaths.WARM_SOCKET)
    sub.add_argument("--idle-only", action="store_true", help="refused unless the worker is free (no queueing)")
    sub.add_argument("--record", help="a detached hand-over: write every line to this file, the last {done: code}")
    stop = commands.add_parser("cancel", help="take a waiting mini-batch out of the daemon's queue")
    stop.add_argument("--output", required=True, help="the output folder it was submitted with")
    stop.add_argument("--socket", default=ContainerPaths.WARM_SOCKET)
    args = parser.parse_args(argv)

    if args.command == "submit":
        return submit(args.mini_batch, args.output, args.attempt, args.socket, idle_only=args.idle_only, record=args.record)
    if args.command == "cancel":
        return cancel(args.output, args.socket)
    if args.contract == "azure" and args.scoring_script is None:
        parser.error("--scoring-script is required with --contract azure")
    if args.contract == "serve" and args.transform is None:
        parser.error("--transform is required with --contract serve")
    daemon_ = Daemon(args)
    handler = _TeeHandler(daemon_.tee)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s %(name)s [{args.worker}]: %(message)s"))
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler], force=True)
    local = _TeeHandler(daemon_.tee, local=True)
    local.setFormatter(handler.formatter)
    queue_log.addHandler(local)
    queue_log.propagate = False
    # docker stop: end between mini-batches (the accept loop looks every second), worker processes with it.
    signal.signal(signal.SIGTERM, lambda signum, frame: daemon_._stop(0))
    # What the daemon itself prints (a traceback) reaches the submitter too.
    return daemon_.run()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
