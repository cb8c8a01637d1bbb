"""The client of a SageMaker-style serving container: scores one mini-batch through its HTTP API.

The orchestrator starts the user's image as ``IMAGE serve`` (a web server on port 8080) and
this client in a second container that shares its network, so the server is at
``http://127.0.0.1:8080``. The client follows SageMaker batch transform's contract:

1. ``GET /ping`` until it answers 200 (each ping times out after 2 s), within ``startup_timeout``.
2. ``GET /execution-parameters`` (optional): the container's ``MaxConcurrentTransforms``,
   ``BatchStrategy`` and ``MaxPayloadInMB``; the job's own values win, SageMaker's defaults
   apply where neither says.
3. Every input file is cut into records (``SplitType``), the records into payloads
   (``BatchStrategy``, ``MaxPayloadInMB``), and each payload is sent as ``POST /invocations``,
   ``MaxConcurrentTransforms`` at a time, retried on connection errors, timeouts, 5xx, 408 and 429.
4. A file whose every payload succeeded gets ``<file>.out`` in the attempt's outputs folder
   (responses in record order, ``AssembleWith``, ``DataProcessing``); a file with a failed
   record gets none, and an item error naming the record, the HTTP status and the answer.
   A symbolic link is read at the target the plan found inside the input folder (checked
   again here) and its ``.out`` keeps the link's name; a link the plan refused is never
   opened: it is a failed item.

The mini-batch's status is committed in the formats of :mod:`batchscore_runtime.formats`;
a container that never becomes healthy, or any unexpected failure, is written to the
status and ends the process with exit code 1. Standard library only.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import socket
import sys
import threading
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from batchscore_runtime.azure import refused_item, resolve_inputs
from batchscore_runtime.formats import (
    DEFAULT_BATCH_STRATEGY,
    DEFAULT_MAX_CONCURRENT_TRANSFORMS,
    DEFAULT_MAX_PAYLOAD_MB,
    MAX_PAYLOAD_LIMIT_MB,
    ContainerPaths,
    ErrorInfo,
    InputFile,
    ItemError,
    MiniBatch,
    MiniBatchDir,
    MiniBatchStatus,
    TransformConfig,
    atomic_path,
    now_iso,
    read_mini_batch_file,
)
from batchscore_runtime.jsonpath import DataProcessing
from batchscore_runtime.records import (
    BATCH_STRATEGIES,
    COMPRESSIONS,
    SPLIT_TYPES,
    FileError,
    Payload,
    decompress,
    pack_payloads,
    split_records,
)

log = logging.getLogger("batchscore")

EXIT_FAILED = 1
PING_TIMEOUT = 2.0
PING_EVERY = 1.0
PING_LOG_EVERY = 10.0
EXECUTION_PARAMETERS_TIMEOUT = 10.0
RETRY_BACKOFF = 0.5  # seconds times the attempt number
BODY_START = 200  # characters of a failed answer quoted in messages


class ContainerNotHealthy(Exception):
    """The serving container did not answer ``GET /ping`` with 200 in time."""


# --------------------------------------------------------------------------- HTTP


def body_start(body: bytes) -> str:
    """The start of an answer's body for a message: at most 200 characters, quoted, control characters escaped."""
    if not body:
        return "(empty body)"
    text = body[: BODY_START * 4].decode("utf-8", errors="replace")
    more = len(text) > BODY_START or len(body) > BODY_START * 4
    return repr(text[:BODY_START]) + ("..." if more else "")


def describe_error(exc: BaseException, timeout: float) -> str:
    """A connection-level failure in words: ``connection refused``, ``no answer within 2 s``, ..."""
    if isinstance(exc, socket.timeout):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return f"connection error ({type(exc).__name__}: {exc})"


class ServingClient:
    """HTTP to the serving container: one-off requests, and one kept-alive connection per thread for invocations."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"the serving URL must be http://HOST:PORT, got {url!r}")
        self.url = url
        self.host = parts.hostname
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: set[http.client.HTTPConnection] = set()

    def request(self, method: str, path: str, timeout: float) -> tuple[int, bytes]:
        """One request on a fresh connection; raises ``OSError`` / ``HTTPException`` when there is no answer."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, self.prefix + path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def invoke(self, body: bytes, headers: dict[str, str], timeout: float) -> tuple[int, bytes]:
        """``POST /invocations`` on this thread's connection, reconnecting once if a kept-alive one went stale.

        The timeout bounds each wait for the server (connecting, each read), as ``http.client`` does.
        """
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
            with self._lock:
                self._connections.add(conn)
        reused = conn.sock is not None
        conn.timeout = timeout
        try:
            conn.request("POST", self.prefix + "/invocations", body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            conn.close()
            if not reused:
                raise
            return self.invoke(body, headers, timeout)  # the server closed an idle connection: not a failure
        except BaseException:
            conn.close()  # an answer may still come on it: never reuse it
            raise

    def close(self) -> None:
        """Close the connections of every thread."""
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()


def wait_until_healthy(client: ServingClient, timeout: float) -> float:
    """Ping until ``GET /ping`` answers 200; returns the seconds it took, raises :class:`ContainerNotHealthy`."""
    t0 = time.monotonic()
    next_log = PING_LOG_EVERY
    last = "none"
    while True:
        tick = time.monotonic()
        try:
            status, body = client.request("GET", "/ping", timeout=PING_TIMEOUT)
        except (OSError, http.client.HTTPException) as exc:
            last = describe_error(exc, PING_TIMEOUT)
        else:
            if status == 200:
                seconds = time.monotonic() - t0
                log.info("the serving container is healthy after %.1f s", seconds)
                return seconds
            last = f"HTTP {status} {body_start(body)}"
        elapsed = time.monotonic() - t0
        if elapsed >= timeout:
            raise ContainerNotHealthy(
                f"the serving container did not answer GET /ping with 200 within {timeout:g} s "
                f"(settings.init_timeout); last answer: {last}"
            )
        if elapsed >= next_log:
            log.info("waiting for the serving container at %s: %.0f s so far, last answer: %s", client.url, elapsed, last)
            next_log += PING_LOG_EVERY
        time.sleep(max(0.0, min(PING_EVERY - (time.monotonic() - tick), timeout - elapsed)))


# --------------------------------------------------------------------------- execution parameters


@dataclass(frozen=True)
class ExecutionParameters:
    """The three settings a job and its container negotiate, resolved, and where each came from."""

    max_concurrent_transforms: int
    batch_strategy: str
    max_payload_mb: int
    sources: dict[str, str] = field(default_factory=dict)  # SageMaker's key -> "job" | "container" | "default"

    def describe(self) -> str:
        values = {
            "MaxConcurrentTransforms": self.max_concurrent_transforms,
            "BatchStrategy": self.batch_strategy,
            "MaxPayloadInMB": self.max_payload_mb,
        }
        return ", ".join(f"{k} {v} ({self.sources[k]})" for k, v in values.items())


def _valid_parameter(key: str, value: Any) -> str | None:
    """Why ``value`` is not acceptable for ``key``, or None when it is."""
    if key == "BatchStrategy":
        return None if value in BATCH_STRATEGIES else f"must be {' or '.join(BATCH_STRATEGIES)}"
    if isinstance(value, bool) or not isinstance(value, int):
        return "must be an integer"
    if key == "MaxPayloadInMB" and not 1 <= value <= MAX_PAYLOAD_LIMIT_MB:
        return f"must be 1 to {MAX_PAYLOAD_LIMIT_MB}"
    if key == "MaxConcurrentTransforms" and value < 1:
        return "must be 1 or more"
    return None


def container_parameters(client: ServingClient) -> dict[str, Any]:
    """The container's valid answers from ``GET /execution-parameters``; empty when it gives none."""
    reason = None
    try:
        status, body = client.request("GET", "/execution-parameters", timeout=EXECUTION_PARAMETERS_TIMEOUT)
    except (OSError, http.client.HTTPException) as exc:
        reason = describe_error(exc, EXECUTION_PARAMETERS_TIMEOUT)
    else:
        if status != 200:
            reason = f"HTTP {status}"
        else:
            try:
                answer = json.loads(body)
            except ValueError:
                answer = None
            if not isinstance(answer, dict):
                reason = f"HTTP 200 but not a JSON object: {body_start(body)}"
    if reason is not None:
        log.info(
            "the serving container does not implement /execution-parameters (%s); using the job's settings, else the defaults",
            reason,
        )
        return {}
    log.info("the serving container's /execution-parameters: %s", json.dumps(answer))
    values = {}
    for key in ("MaxConcurrentTransforms", "BatchStrategy", "MaxPayloadInMB"):
        if key not in answer:
            continue
        problem = _valid_parameter(key, answer[key])
        if problem:
            log.warning(
                "refusing the serving container's %s = %s from /execution-parameters: it %s; using the default",
                key,
                json.dumps(answer[key]),
                problem,
            )
            continue
        values[key] = answer[key]
    return values


def resolve_parameters(config: TransformConfig, container: dict[str, Any]) -> ExecutionParameters:
    """SageMaker's order for each setting: the job's value, else the container's, else the default."""
    resolved: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, job_value, default in (
        ("MaxConcurrentTransforms", config.max_concurrent_transforms, DEFAULT_MAX_CONCURRENT_TRANSFORMS),
        ("BatchStrategy", config.batch_strategy, DEFAULT_BATCH_STRATEGY),
        ("MaxPayloadInMB", config.max_payload_mb, DEFAULT_MAX_PAYLOAD_MB),
    ):
        if job_value is not None:
            resolved[key], sources[key] = job_value, "job"
        elif key in container:
            resolved[key], sources[key] = container[key], "container"
        else:
            resolved[key], sources[key] = default, "default"
    return ExecutionParameters(
        resolved["MaxConcurrentTransforms"], resolved["BatchStrategy"], resolved["MaxPayloadInMB"], sources
    )


def check_config(config: TransformConfig) -> DataProcessing | None:
    """Refuse settings the orchestrator should never have passed; returns the DataProcessing they ask for."""
    choices = {
        "SplitType": (config.split_type, SPLIT_TYPES),
        "CompressionType": (config.compression, COMPRESSIONS),
        "AssembleWith": (config.assemble_with, ("None", "Line")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
    for key, setting in (
        ("MaxConcurrentTransforms", config.max_concurrent_transforms),
        ("BatchStrategy", config.batch_strategy),
        ("MaxPayloadInMB", config.max_payload_mb),
    ):
        problem = None if setting is None else _valid_parameter(key, setting)
        if problem:
            raise ValueError(f"the job's {key} {setting!r} {problem}")
    if config.invocation_timeout <= 0 or config.invocation_max_retries < 0 or config.startup_timeout <= 0:
        raise ValueError(
            "the invocation timeout and the startup timeout must be positive and the retries 0 or more, got "
            f"{config.invocation_timeout!r}, {config.startup_timeout!r} and {config.invocation_max_retries!r}"
        )
    return DataProcessing.from_settings(
        content_type=config.content_type,
        accept=config.accept,
        split_type=config.split_type,
        input_filter=config.input_filter,
        output_filter=config.output_filter,
        join_source=config.join_source,
    )


# --------------------------------------------------------------------------- scoring


@dataclass
class FileJob:
    """One input file being scored: its payloads, their answers, and its first error."""

    order: int
    rel: str
    records: list[bytes]  # as read, kept only to join outputs to them
    record_count: int
    payloads: list[Payload]
    results: list[bytes | None]
    started: float
    error: FileError | None = None
    done: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, error: FileError) -> None:
        """Record the file's first error; its payloads not yet sent are then skipped."""
        with self.lock:
            if self.error is None:
                self.error = error

    def payload_done(self) -> bool:
        """Count one payload as finished; True for the call that finishes the file's last one."""
        with self.lock:
            self.done += 1
            return self.done == len(self.payloads)


@dataclass
class Tally:
    """What the finished files add up to (updated from the worker threads)."""

    records: int = 0
    written: int = 0
    errors: dict[int, ItemError] = field(default_factory=dict)  # file order -> error
    lock: threading.Lock = field(default_factory=threading.Lock)


class MiniBatchScorer:
    """Scores the files of one mini-batch through a healthy serving container."""

    def __init__(
        self,
        client: ServingClient,
        config: TransformConfig,
        processing: DataProcessing | None,
        params: ExecutionParameters,
        outputs: Path,
    ):
        self.client = client
        self.config = config
        self.processing = processing
        self.params = params
        self.outputs = outputs
        self.headers = {}
        if config.content_type:
            self.headers["Content-Type"] = config.content_type
        if config.accept:
            self.headers["Accept"] = config.accept
        self.tally = Tally()

    def score(self, files: list[InputFile], paths: list[str | None]) -> Tally:
        """Send every file's payloads through one pool of ``MaxConcurrentTransforms`` threads; returns the tally.

        ``paths`` says where each of ``files`` is read (:func:`resolve_inputs`); a file with
        none (a refused symbolic link) is a failed item, never opened.
        """
        workers = self.params.max_concurrent_transforms
        # Payloads waiting for a thread are bounded, so files are read only a little ahead of the requests.
        slots = threading.BoundedSemaphore(workers * 2)
        crashed: list[BaseException] = []

        def finished(future: Future) -> None:
            slots.release()
            error = None if future.cancelled() else future.exception()
            if error is not None:
                crashed.append(error)

        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="invocations")
        try:
            for order, (f, path) in enumerate(zip(files, paths)):
                if path is None:
                    with self.tally.lock:
                        self.tally.errors[order] = refused_item(f)
                    log.error("%s: NOT SCORED: %s", f.path, f.refused)
                    continue
                job = self._prepare(order, path, f.path)
                if job.error is not None or not job.payloads:
                    self._finish(job)
                    continue
                for i in range(len(job.payloads)):
                    slots.acquire()
                    if crashed:
                        raise crashed[0]
                    pool.submit(self._send, job, i).add_done_callback(finished)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        else:
            pool.shutdown(wait=True)
        finally:
            self.client.close()
        if crashed:
            raise crashed[0]
        return self.tally

    def _prepare(self, order: int, path: str, rel: str) -> FileJob:
        """Read (from ``path``), decompress, split, filter and pack the file ``rel``; a file error is kept in the job."""
        started = time.monotonic()
        records: list[bytes] = []
        payloads: list[Payload] = []
        error = None
        try:
            data = decompress(Path(path).read_bytes(), self.config.compression)
            records = split_records(data, self.config.split_type)
            del data
            sent = records
            if self.processing is not None:
                sent = [self.processing.filter_input(r, n) for n, r in enumerate(records, start=1)]
            payloads = pack_payloads(sent, self.config.split_type, self.params.batch_strategy, self.params.max_payload_mb)
        except FileError as exc:
            error = exc
        keep = records if self.processing is not None and self.processing.join and error is None else []
        return FileJob(order, rel, keep, len(records), payloads, [None] * len(payloads), started, error)

    def _send(self, job: FileJob, i: int) -> None:
        """Send payload ``i`` of ``job`` with its retries; the file's last payload to finish finishes the file."""
        try:
            self._invoke(job, job.payloads[i], i)
        finally:
            if job.payload_done():
                self._finish(job)

    def _invoke(self, job: FileJob, payload: Payload, i: int) -> None:
        timeout = self.config.invocation_timeout
        retries = self.config.invocation_max_retries
        attempt = 0
        while job.error is None:  # a failed payload of the same file cancels the rest
            attempt += 1
            answer: bytes | None = None  # the body of a failed HTTP answer
            timed_out = False
            try:
                status, body = self.client.invoke(payload.body, self.headers, timeout)
            except socket.timeout:
                problem, retryable, timed_out = f"did not answer within {timeout:g} s", True, True
            except (OSError, http.client.HTTPException) as exc:
                problem, retryable = describe_error(exc, timeout), True
            else:
                if 200 <= status < 300:
                    job.results[i] = body
                    return
                problem, retryable, answer = f"HTTP {status}", status >= 500 or status in (408, 429), body
            if retryable and attempt <= retries:
                log.warning("%s, %s: %s; retrying (%d of %d)", job.rel, payload.label, problem, attempt, retries)
                time.sleep(RETRY_BACKOFF * attempt)
                continue
            message = f"{payload.label}: {problem} after {attempt} attempt{'s' if attempt != 1 else ''}"
            if answer is not None:
                message += f": {body_start(answer)}"
            job.fail(FileError("InvocationTimeout" if timed_out else "InvocationError", message, payload.first))

    def _finish(self, job: FileJob) -> None:
        """Write the file's ``.out`` if all its payloads succeeded, else record its error; log one line."""
        name = job.rel + ".out"
        if job.error is None:
            try:
                with atomic_path(self.outputs / name) as tmp:
                    with open(tmp, "wb") as fh:
                        self._assemble(job, fh)
            except FileError as exc:
                job.fail(exc)
        seconds = time.monotonic() - job.started
        payloads = f"{len(job.payloads)} payload{'s' if len(job.payloads) != 1 else ''}"
        with self.tally.lock:
            if job.error is None:
                self.tally.records += job.record_count
                self.tally.written += 1
            else:
                self.tally.errors[job.order] = job.error.item_error(job.rel)
        if job.error is None:
            records = f"{job.record_count} record{'s' if job.record_count != 1 else ''}"
            log.info("%s: %s in %s -> %s (%.2f s)", job.rel, records, payloads, name, seconds)
        else:
            log.error("%s: FAILED: %s: %s", job.rel, job.error.type, job.error.message)

    def _assemble(self, job: FileJob, fh: BinaryIO) -> None:
        """The responses in record order: as they are, one line each (``AssembleWith Line``), or one line per record."""
        processing = self.processing
        for payload, body in zip(job.payloads, job.results):
            assert body is not None
            if processing is not None and processing.splits_outputs:
                outputs = processing.outputs(body, payload.first, payload.count, payload.label)
                for k, output in enumerate(outputs):
                    number = payload.first + k
                    source = job.records[number - 1] if processing.join else b""
                    fh.write(processing.finish(source, output, number) + b"\n")
            elif self.config.assemble_with == "Line" and not body.endswith(b"\n"):
                fh.write(body + b"\n")
            else:
                fh.write(body)


# --------------------------------------------------------------------------- main


@dataclass
class Attempt:
    """What one attempt knows so far, for the status it commits whatever happens."""

    mini_batch: MiniBatch
    out: MiniBatchDir
    attempt: int
    started: str = field(default_factory=now_iso)
    workers: int = DEFAULT_MAX_CONCURRENT_TRANSFORMS
    init_seconds: float = 0.0
    worker: str | None = None  # warm workers: the worker that scores it ("w1")
    worker_init_seconds: float | None = None  # warm workers: its wait for /ping, paid once before any mini-batch


def score_mini_batch(run: Attempt, input_root: Path, config: TransformConfig, url: str) -> MiniBatchStatus:
    """Score one mini-batch through the serving container at ``url`` and commit its status; raises on failure."""
    mini_batch, out = run.mini_batch, run.out
    processing = check_config(config)
    if config.max_concurrent_transforms is not None:
        run.workers = config.max_concurrent_transforms
    rel_paths = [f.path for f in mini_batch.files]
    located = resolve_inputs(mini_batch, input_root)  # a symbolic link: its checked target; refused: None
    outputs = out.new_outputs_dir()
    client = ServingClient(url)
    log.info(
        "%s: %d files, %d bytes, try %d; waiting for the serving container at %s",
        mini_batch.id,
        len(rel_paths),
        mini_batch.bytes,
        run.attempt,
        url,
    )
    ping_seconds = wait_until_healthy(client, config.startup_timeout)
    run.init_seconds = round(ping_seconds if run.worker_init_seconds is None else run.worker_init_seconds, 3)
    params = resolve_parameters(config, container_parameters(client))
    run.workers = params.max_concurrent_transforms
    log.info("%s: %s", mini_batch.id, params.describe())

    t0 = time.monotonic()
    tally = MiniBatchScorer(client, config, processing, params, outputs).score(mini_batch.files, located)
    seconds = time.monotonic() - t0
    errors = [tally.errors[k] for k in sorted(tally.errors)]
    status = MiniBatchStatus(
        index=mini_batch.index,
        state=MiniBatchStatus.SUCCEEDED,
        files=len(rel_paths),
        rows=tally.records,
        result_file=None,
        init_seconds=run.init_seconds,
        run_seconds=round(seconds, 3),
        started_at=run.started,
        finished_at=now_iso(),
        attempt=run.attempt,
        workers=params.max_concurrent_transforms,
        failed_items=len(errors),
        item_errors=errors,
        outputs_dir=outputs.name,
        custom_outputs=tally.written,
        worker=run.worker,
    )
    out.commit(status)
    log.info(
        "%s: %d records of %d files in %.2f s (%.1f records/s), %d .out file(s)%s",
        mini_batch.id,
        tally.records,
        len(rel_paths),
        seconds,
        tally.records / seconds if seconds > 0 else 0.0,
        tally.written,
        f", {len(errors)} failed file(s)" if errors else "",
    )
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m batchscore_runtime.serving", description=__doc__.splitlines()[0])
    parser.add_argument("--mini-batch", required=True, type=Path, help="the mini-batch file (JSON)")
    parser.add_argument("--input-root", required=True, type=Path, help="folder the mini-batch's paths are relative to")
    parser.add_argument("--output", required=True, type=Path, help="the mini-batch's result folder")
    parser.add_argument("--transform", required=True, help="the transform settings: TransformConfig as JSON")
    parser.add_argument("--attempt", type=int, default=1, help="the orchestrator's try number")
    parser.add_argument("--url", default=ContainerPaths.SERVING_URL, help="the serving container's address")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    args = parser.parse_args(argv)

    logging.basicConfig(
        stream=sys.stdout,
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    mini_batch = read_mini_batch_file(args.mini_batch)
    out = MiniBatchDir(args.output, mini_batch.index)
    out.retract()
    return score_and_commit(Attempt(mini_batch, out, args.attempt), args.input_root, args.transform, args.url)


def score_and_commit(run: Attempt, input_root: Path, transform: str | TransformConfig, url: str) -> int:
    """Score the mini-batch and commit its status, succeeded or failed; returns the exit code.

    ``transform`` is the :class:`TransformConfig`, or its JSON as the command line gives it.
    """
    mini_batch, out = run.mini_batch, run.out
    try:
        config = transform if isinstance(transform, TransformConfig) else TransformConfig.from_json(json.loads(transform))
        status = score_mini_batch(run, input_root, config, url)
    except ContainerNotHealthy as exc:
        error = ErrorInfo(type="ContainerNotHealthy", message=str(exc))
    except Exception as exc:  # every failure is recorded, then reported through the exit code
        sys.stdout.flush()
        traceback.print_exc()
        sys.stderr.flush()
        error = ErrorInfo(
            type=type(exc).__name__,
            message=str(exc).strip(),
            traceback=traceback.format_exc(),
            file=getattr(exc, "file", None),
        )
    else:
        log.info(
            "%s succeeded: %d records, %d .out file(s) in %s",
            mini_batch.id,
            status.rows,
            status.custom_outputs,
            status.outputs_dir,
        )
        return 0
    out.commit(
        MiniBatchStatus(
            index=mini_batch.index,
            state=MiniBatchStatus.FAILED,
            files=len(mini_batch.files),
            init_seconds=run.init_seconds,
            started_at=run.started,
            finished_at=now_iso(),
            error=error,
            attempt=run.attempt,
            workers=run.workers,
            worker=run.worker,
        )
    )
    log.error("%s failed: %s", mini_batch.id, error.one_line())
    return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
