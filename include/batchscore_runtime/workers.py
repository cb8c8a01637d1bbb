"""Worker processes for one mini-batch: each runs ``init()`` once and ``run()`` on its share.

Azure's ``max_concurrency_per_instance`` starts that many worker processes per node, each
with its own ``init()``. Here one scoring container scores one mini-batch, so its files are
shared out in contiguous parts, one per worker; the parts' results are put back together in
input order.

The supervisor (the container's main process) never runs user code itself. It enforces the
time limits by killing a worker (``SIGKILL``, which also stops code stuck in C), notices a
worker that dies, and logs progress without the script's help: how many of its files
``run()`` has opened so far (seen by an audit hook on Python's ``open`` in the worker, and in
``/proc/<pid>/fd`` for files opened from C), and for a generator, the rows yielded so far.
"""

from __future__ import annotations

import inspect
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Callable, cast

from batchscore_runtime import scoring_script
from batchscore_runtime.formats import ErrorInfo, ItemError

log = logging.getLogger("batchscore")

#: How often the supervisor looks at its workers, and how often it reports unchanged progress.
POLL_SECONDS = 0.5
PROGRESS_EVERY_SECONDS = 5.0
HEARTBEAT_EVERY_SECONDS = 30.0


def split_evenly(items: list, parts: int) -> list[list]:
    """``items`` cut into ``parts`` contiguous runs whose lengths differ by at most one."""
    parts = max(1, min(parts, len(items)))
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for k in range(parts):
        end = start + size + (1 if k < extra else 0)
        out.append(items[start:end])
        start = end
    return out


def worker_gpus(worker: int, workers: int, gpu_count: int | None) -> str | None:
    """``CUDA_VISIBLE_DEVICES`` for worker ``worker`` of ``workers`` in a container with ``gpu_count`` GPUs.

    A single worker sees every GPU of the container. Several workers get disjoint, contiguous
    slices of the GPUs (4 GPUs, 2 workers: ``0,1`` and ``2,3``); with fewer GPUs than workers
    (allowed only by ``resources.share_gpus``) they take turns (``k mod gpu_count``). The
    indexes are the container's own: the NVIDIA runtime numbers a container's GPUs from 0.
    """
    if not gpu_count or workers <= 1:
        return None
    if gpu_count < workers:
        return str(worker % gpu_count)
    lo, hi = worker * gpu_count // workers, (worker + 1) * gpu_count // workers
    return ",".join(str(i) for i in range(lo, hi))


@dataclass(frozen=True)
class WorkerTask:
    """What one worker process is given (pickled to it)."""

    worker: int  # 0-based
    workers: int
    mini_batch: str  # "mb-00007"
    script: str
    paths: list[str]  # absolute paths inside the container, in input order
    rel_paths: list[str]  # the same files relative to the input folder
    result_file: str | None  # where to write what run() returned; None for summary_only
    outputs_dir: str | None = None  # AZUREML_BI_OUTPUT_PATH: the attempt's custom-outputs folder
    log_level: str = "info"
    cuda_visible_devices: str | None = None

    @property
    def name(self) -> str:
        return f"worker {self.worker + 1}/{self.workers}"


@dataclass
class WorkerResult:
    """What a worker reports after ``run()``."""

    rows: int
    files: int
    failed_items: int
    item_errors: list[ItemError]
    init_seconds: float
    run_seconds: float
    result_file: str | None


class MiniBatchFailed(Exception):
    """A worker failed, timed out or died; ``info`` says why (the script's exception when it raised)."""

    def __init__(self, info: ErrorInfo):
        super().__init__(info.one_line())
        self.info = info


# --------------------------------------------------------------------------- the worker side


class _Progress:
    """Reports a worker's progress to the supervisor: files opened, rows yielded (thread-safe)."""

    ROWS_EVERY_SECONDS = 1.0

    def __init__(self, conn: Connection, paths: list[str]):
        self._conn = conn
        self._lock = threading.Lock()
        self._index_of: dict[str, int] = {}
        for i, p in enumerate(paths):
            self._index_of.setdefault(p, i)
            self._index_of.setdefault(os.path.realpath(p), i)
        self.opened = 0
        self.last_opened: int | None = None  # index of the file run() opened most recently
        self.rows = 0
        self._rows_sent_at = 0.0

    def audit(self, event: str, args: tuple) -> None:
        """``sys.addaudithook`` hook: note when run() opens one of its files (any thread)."""
        if event != "open" or not args or not isinstance(args[0], str):
            return
        i = self._index_of.get(args[0])
        if i is not None:
            self.last_opened = i
            if i + 1 > self.opened:
                self._send("opened", i + 1)

    def count(self, items: Iterable[Any]) -> Iterator[Any]:
        """Pass a generator's items through, counting rows (a DataFrame's rows, else 1 each)."""
        for item in items:
            self.rows += len(item) if hasattr(item, "columns") and hasattr(item, "__len__") else 1
            now = time.monotonic()
            if now - self._rows_sent_at >= self.ROWS_EVERY_SECONDS:
                self._rows_sent_at = now
                self._send("rows", self.rows)
            yield item

    def _send(self, kind: str, value: int) -> None:
        with self._lock:
            if kind == "opened":
                if value <= self.opened:
                    return
                self.opened = value
            try:
                self._conn.send((kind, value))
            except OSError:
                pass  # the supervisor is gone or killing us; progress does not matter then


def _setup_process(name: str, log_level: str, outputs_dir: str | None, cuda_visible_devices: str | None) -> None:
    """Logging and environment of a worker process, before the scoring script is imported."""
    logging.basicConfig(
        stream=sys.stdout,
        level=log_level.upper(),
        format=f"%(asctime)s %(levelname)s %(name)s [{name}]: %(message)s",
        force=True,
    )
    if outputs_dir is not None:
        os.environ["AZUREML_BI_OUTPUT_PATH"] = outputs_dir  # before the script is imported
    if cuda_visible_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
        log.info("pinned to GPU %s (CUDA_VISIBLE_DEVICES)", cuda_visible_devices)


def _load_and_init(script_path: str, first: bool) -> tuple[Any, float]:
    """Import the scoring script and call its ``init()``; returns the module and the seconds it took."""
    t0 = time.monotonic()
    script = scoring_script.load_scoring_script(Path(script_path))
    init = getattr(script, "init", None)
    if callable(init):
        init()
    elif first:
        log.warning("scoring script %s defines no init(); continuing without it", Path(script_path).name)
    init_seconds = time.monotonic() - t0
    log.info("init() finished in %.2f s", init_seconds)
    # What turns run()'s return into a result file, loaded now (within init_timeout): the time
    # limit of run() is then run()'s and the result's alone, not a first import of pyarrow.
    import pandas  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    return script, init_seconds


def _score_task(script: Any, task: WorkerTask, conn: Connection, init_seconds: float, progress: _Progress) -> None:
    """Call ``run()`` on the task's files, write what it returned and report it (raises what run() raises)."""
    t1 = time.monotonic()
    result = script.run(list(task.paths))
    if inspect.isgenerator(result):
        result = list(progress.count(result))
    table = scoring_script.to_table(result)
    run_seconds = time.monotonic() - t1
    failed, item_errors = scoring_script.count_failed_items(table, task.paths, task.rel_paths)
    if task.result_file is not None:
        scoring_script.write_table(table, Path(task.result_file))
    rate = table.num_rows / run_seconds if run_seconds > 0 else float("inf")
    log.info(
        "run() returned %d rows for %d files in %.2f s (%.1f rows/s)%s",
        table.num_rows,
        len(task.paths),
        run_seconds,
        rate,
        f"; {failed} failed item(s)" if failed else "",
    )
    conn.send(
        (
            "done",
            WorkerResult(
                rows=table.num_rows,
                files=len(task.paths),
                failed_items=failed,
                item_errors=item_errors,
                init_seconds=init_seconds,
                run_seconds=run_seconds,
                result_file=task.result_file,
            ),
        )
    )


def _send_error(conn: Connection, exc: BaseException, task: WorkerTask | None, progress: _Progress | None) -> None:
    """Report what the script raised (its traceback goes to the log first)."""
    traceback.print_exc()
    sys.stderr.flush()
    conn.send(
        (
            "error",
            ErrorInfo(
                type=type(exc).__name__,
                message=str(exc).strip(),
                traceback=traceback.format_exc(),
                file=getattr(exc, "file", None) or (_file_of(exc, task, progress) if task and progress else None),
            ),
        )
    )


def _worker_main(conn: Connection, task: WorkerTask) -> None:
    """Entry point of a worker process (spawned: a fresh interpreter, nothing inherited but env)."""
    _setup_process(task.name, task.log_level, task.outputs_dir, task.cuda_visible_devices)
    progress: _Progress | None = None
    try:
        script, init_seconds = _load_and_init(task.script, task.worker == 0)
        conn.send(("ready", init_seconds))
        progress = _Progress(conn, task.paths)
        sys.addaudithook(progress.audit)  # stays for the process's life: the process scores just this
        _score_task(script, task, conn, init_seconds, progress)
    except BaseException as exc:  # noqa: BLE001 - everything the script raises is reported
        _send_error(conn, exc, task, progress)
    finally:
        sys.stdout.flush()
        conn.close()


@dataclass(frozen=True)
class WarmProcess:
    """What a warm worker process is given: it imports the script and calls ``init()`` once, then scores tasks."""

    worker: int  # 0-based, within its container
    workers: int
    label: str  # the worker container's name in logs: "w1"
    script: str
    log_level: str = "info"
    outputs_dir: str | None = None  # a fixed path, re-pointed at each mini-batch's outputs folder
    cuda_visible_devices: str | None = None

    @property
    def name(self) -> str:
        return f"{self.label} process {self.worker + 1}/{self.workers}"


def _warm_worker_main(conn: Connection, output: Connection, spec: WarmProcess) -> None:
    """Entry point of a warm worker process: ``init()`` once, then one :class:`WorkerTask` per message.

    Its standard output and error go to ``output`` (the daemon copies them to the container's log
    and to the log of the mini-batch being scored); ``None`` ends it.
    """
    os.dup2(output.fileno(), 1)
    os.dup2(output.fileno(), 2)
    output.close()
    _setup_process(spec.name, spec.log_level, spec.outputs_dir, spec.cuda_visible_devices)
    current: list[_Progress | None] = [None]

    def audit(event: str, args: tuple) -> None:
        progress = current[0]
        if progress is not None:
            progress.audit(event, args)

    try:
        script, init_seconds = _load_and_init(spec.script, spec.worker == 0)
        conn.send(("ready", init_seconds))
    except BaseException as exc:  # noqa: BLE001 - reported to the daemon, which stops
        _send_error(conn, exc, None, None)
        sys.stdout.flush()
        return
    sys.addaudithook(audit)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        progress = current[0] = _Progress(conn, task.paths)
        try:
            _score_task(script, task, conn, init_seconds, progress)
        except BaseException as exc:  # noqa: BLE001 - everything the script raises is reported
            _send_error(conn, exc, task, progress)
        finally:
            current[0] = None
            sys.stdout.flush()
            sys.stderr.flush()


def _file_of(exc: BaseException, task: WorkerTask, progress: _Progress) -> str | None:
    """The input file ``run()`` was working on when it raised ``exc``, relative to the input folder.

    First a variable of the frames the exception passed through (innermost first) that holds
    one of the worker's files, e.g. the script's ``file_path`` or pandas' ``filepath_or_buffer``;
    this also finds files opened from C (pyarrow). Otherwise the file run() opened last (the
    audit hook). None when neither points at one of the files.
    """
    index_of: dict[str | bytes, int] = {}
    for i, p in enumerate(task.paths):
        index_of.setdefault(p, i)
        index_of.setdefault(os.path.realpath(p), i)
    frames = [frame for frame, _ in traceback.walk_tb(exc.__traceback__)]
    for frame in reversed(frames[1:]):  # frames[0] is _worker_main itself
        try:
            values = list(frame.f_locals.values())
        except Exception:  # noqa: BLE001 - a frame's locals are a best effort
            continue
        for value in values:
            if isinstance(value, (str, os.PathLike)):
                try:
                    found = index_of.get(os.fspath(value))
                except TypeError:
                    continue
                if found is not None:
                    return task.rel_paths[found]
    if progress.last_opened is not None:
        return task.rel_paths[progress.last_opened]
    return None


# --------------------------------------------------------------------------- the supervisor side


@dataclass
class _Worker:
    task: WorkerTask
    process: Any
    conn: Connection
    started: float
    phase: str = "init"  # init -> run -> done
    run_started: float = 0.0
    opened: int = 0  # how many of its files run() has opened so far (highest index + 1)
    rows: int | None = None  # rows a generator run() has yielded so far
    result: WorkerResult | None = None
    index_of: dict[str, int] = field(default_factory=dict)
    failure: MiniBatchFailed | None = None  # warm workers: what went wrong with its part
    dead: bool = False  # warm workers: its process is gone (died, or killed past a time limit)


def _files_opened(pid: int, index_of: dict[str, int]) -> int | None:
    """Highest position + 1 among the worker's files that process ``pid`` has open now."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    best = None
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        i = index_of.get(target)
        if i is not None and (best is None or i + 1 > best):
            best = i + 1
    return best


def _kill(w: _Worker) -> None:
    if w.process.is_alive():
        try:
            os.kill(w.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    w.process.join(timeout=10)


def run_workers(
    tasks: list[WorkerTask],
    *,
    timeout: float,
    init_timeout: float,
    on_progress: Callable[[str], None] | None = None,
) -> list[WorkerResult]:
    """Run ``tasks`` in parallel worker processes; return their results in task order.

    Raises :class:`MiniBatchFailed` when a worker raises, runs past ``init_timeout``
    (start and ``init()``) or ``timeout`` (its ``run()``), or dies; every worker still alive
    is then killed, so nothing is left running.
    """
    ctx = multiprocessing.get_context("spawn")  # no fork: CUDA and threads do not survive it
    workers: list[_Worker] = []
    oom_baseline = oom_kills()
    try:
        for task in tasks:
            recv, send = ctx.Pipe(duplex=False)
            process = ctx.Process(target=_worker_main, args=(send, task), name=task.name, daemon=True)
            process.start()
            send.close()
            workers.append(_Worker(task, process, recv, time.monotonic(), index_of=_index_of(task)))
        return supervise(
            workers, timeout=timeout, init_timeout=init_timeout, report=on_progress or log.info, oom_baseline=oom_baseline
        )
    finally:
        for w in workers:
            _kill(w)
            w.conn.close()


def _index_of(task: WorkerTask) -> dict[str, int]:
    return {os.path.realpath(p): i for i, p in enumerate(task.paths)}


def supervise(
    workers: list[_Worker],
    *,
    timeout: float,
    init_timeout: float,
    report: Callable[[str], None],
    oom_baseline: int | None,
    persistent: bool = False,
) -> list[WorkerResult]:
    """Watch ``workers`` until each has its result; report progress; return the results in order.

    A worker that fails, dies or runs past its time limit raises :class:`MiniBatchFailed` at
    once, unless ``persistent`` (warm workers, which outlive the mini-batch): then the others
    finish their parts first, so that no process is killed for another's failure, and the first
    failure in worker order is raised; the failed workers are marked (``failure``, ``dead``).
    """
    tasks = [w.task for w in workers]
    total_files = sum(len(t.paths) for t in tasks)
    last_report, last_progress = time.monotonic(), None
    while any(w.phase != "done" for w in workers):
        pending = {w.conn: w for w in workers if w.phase != "done"}
        for conn in wait(list(pending), timeout=POLL_SECONDS):
            w = pending[cast(Connection, conn)]  # wait() returns some of the connections it was given
            try:
                _receive(w, oom_baseline, persistent=persistent)
            except MiniBatchFailed as exc:
                if not persistent:
                    raise
                w.phase, w.failure = "done", exc
        now = time.monotonic()
        for w in workers:
            if w.phase == "done":
                continue
            try:
                _check_deadlines(w, now, timeout, init_timeout)
            except MiniBatchFailed as exc:
                if not persistent:
                    raise
                w.phase, w.failure, w.dead = "done", exc, True
        # Progress: files opened by run() so far, across workers.
        for w in workers:
            if w.phase == "run":
                opened = _files_opened(w.process.pid, w.index_of)
                if opened is not None:
                    w.opened = max(w.opened, opened)
        running = [w for w in workers if w.phase == "run"]
        opened = sum(len(w.task.paths) if w.phase == "done" else w.opened for w in workers)
        since = now - last_report
        rows = [w.result.rows if w.result else w.rows for w in workers]
        progress = (opened, tuple(rows))
        if running and ((progress != last_progress and since >= PROGRESS_EVERY_SECONDS) or since >= HEARTBEAT_EVERY_SECONDS):
            elapsed = now - min(w.run_started for w in running)
            counted = [r for r in rows if r is not None]
            rows_text = f", {sum(counted)} rows so far ({sum(counted) / elapsed:.1f} rows/s)" if counted and elapsed > 0 else ""
            report(
                f"{tasks[0].mini_batch}: {opened} of {total_files} files opened by run() so far{rows_text}, "
                f"{sum(w.phase == 'done' for w in workers)} of {len(workers)} worker(s) done, "
                f"{elapsed:.0f} s into run()"
            )
            last_report, last_progress = now, progress
    failures = [w.failure for w in workers if w.failure is not None]
    if failures:
        raise failures[0]
    results = [w.result for w in workers if w.result is not None]
    assert len(results) == len(workers)  # done, and none failed: each has its result
    return results


def _cgroup_value(files: tuple[str, ...], key: str | None = None) -> int | None:
    """A number from the first readable cgroup file (v2, then v1); ``key`` picks a ``key value`` line."""
    for name in files:
        try:
            text = Path(name).read_text()
        except OSError:
            continue
        for line in text.splitlines():
            parts = line.split()
            if key is None and len(parts) == 1 and parts[0].isdigit():
                return int(parts[0])
            if key is not None and len(parts) == 2 and parts[0] == key and parts[1].isdigit():
                return int(parts[1])
    return None


def oom_kills() -> int | None:
    """How often the kernel's out-of-memory killer struck in this container's cgroup, if it can be read."""
    return _cgroup_value(("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"), "oom_kill")


def memory_limit() -> int | None:
    """The container's memory limit in bytes; None when there is none (or it cannot be read)."""
    limit = _cgroup_value(("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"))
    return limit if limit is not None and limit < 1 << 60 else None


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _receive(w: _Worker, oom_baseline: int | None = None, *, persistent: bool = False) -> None:
    try:
        kind, payload = w.conn.recv()
    except (EOFError, OSError):
        # The pipe closed without a result: the process ended (or is ending) on its own.
        w.dead = True
        w.process.join(timeout=5)
        code = w.process.exitcode
        if code == -signal.SIGKILL and oom_baseline is not None and (oom_kills() or 0) > oom_baseline:
            limit = memory_limit()
            raise MiniBatchFailed(
                ErrorInfo(
                    type="OutOfMemory",
                    message=f"{w.task.name} of {w.task.mini_batch} was killed by the kernel's out-of-memory killer "
                    f"during {_phase_name(w.phase)}: the container reached its memory limit"
                    f"{f' of {_size(limit)}' if limit else ''} (resources.memory); raise resources.memory, or "
                    "give each mini-batch fewer files (settings.mini_batch_size)",
                )
            ) from None
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        hint = " (SIGKILL: often the kernel's out-of-memory killer)" if code == -signal.SIGKILL else ""
        raise MiniBatchFailed(
            ErrorInfo(
                type="WorkerDied",
                message=f"{w.task.name} of {w.task.mini_batch} {how}{hint} during {_phase_name(w.phase)}",
            )
        ) from None
    if kind == "opened":
        w.opened = max(w.opened, payload)
    elif kind == "rows":
        w.rows = payload
    elif kind == "ready":
        w.phase, w.run_started = "run", time.monotonic()
    elif kind == "done":
        w.phase, w.result = "done", payload
        if not persistent:
            w.process.join(timeout=30)
    elif kind == "error":
        raise MiniBatchFailed(payload)


def _phase_name(phase: str) -> str:
    return {"init": "start-up and init()", "run": "run()"}.get(phase, phase)


def _check_deadlines(w: _Worker, now: float, timeout: float, init_timeout: float) -> None:
    if w.phase == "init" and now - w.started > init_timeout:
        _kill(w)
        raise MiniBatchFailed(
            ErrorInfo(
                type="InitTimeout",
                message=f"{w.task.name} of {w.task.mini_batch} did not finish init() within "
                f"settings.init_timeout = {init_timeout:g} s; it was killed after {now - w.started:.1f} s",
            )
        )
    if w.phase == "run" and now - w.run_started > timeout:
        _kill(w)
        raise MiniBatchFailed(
            ErrorInfo(
                type="MiniBatchTimeout",
                message=f"run() of {w.task.mini_batch} ({w.task.name}, {len(w.task.paths)} files) did not finish "
                f"within retry_settings.timeout = {timeout:g} s; the worker was killed after "
                f"{now - w.run_started:.1f} s, having opened {w.opened} of its files",
            )
        )
