"""The iris serving container with fault injection, for tests on real containers.

Image ``batchscore-serve-test:latest`` (``tests/conftest.py``'s ``serving_test_image`` builds
it FROM ``batchscore-iris-serve:latest``). Started as ``docker run IMAGE serve`` like the
example; it is the example's server (``/opt/program/serve.py``, imported) plus the behaviours
below, each switched on by an environment variable. Without any, it serves exactly as the
example does.

Start-up and health:

* ``FAULT_EXIT_AT_START=1``: print ``FAULT_EXIT_AT_START: exiting with code 1 before serving``
  and exit 1 (a container that dies at start-up; checked before the model is loaded).
  ``FAULT_EXIT_CODE=N`` makes it exit with code N instead (0 too; the line says N), and
  ``FAULT_EXIT_AFTER_SECONDS=S`` makes it sleep S seconds (float) first, then print and exit.
* ``FAULT_NEVER_HEALTHY=1``: ``GET /ping`` always answers 503 (``FAULT_NEVER_HEALTHY``). The
  server listens from its first moment, before the model is loaded (which then loads while it
  serves), so a client never finds the port closed, however slow the model's import is.
* ``FAULT_NO_EXECUTION_PARAMETERS=1``: ``GET /execution-parameters`` answers 404.
* ``FAULT_EXECUTION_PARAMETERS='{"MaxConcurrentTransforms": 4, ...}'``: ``GET
  /execution-parameters`` answers this text as-is (``application/json``; not validated, so a
  test can serve malformed JSON too).

``POST /invocations``, checked in this order for each request:

1. ``FAULT_EXIT_MATCH=text``: a payload containing ``text`` makes the process exit at once
   with code 3 (``os._exit``; no answer is sent: a container that dies mid-job).
2. ``FAULT_DELAY_SECONDS=S``: every request sleeps S seconds (float) first (concurrency tests).
3. ``FAULT_SLOW_MATCH=text`` with ``FAULT_SLOW_SECONDS=S`` (default 30): a payload containing
   ``text`` sleeps S seconds before it is answered (timeout tests).
4. ``FAULT_FAIL_FIRST=N``: the first N requests (counted from the container's start, the
   failed ones included) answer 500 with body ``injected failure K`` (K = 1..N, this
   request's number).
5. ``FAULT_FAIL_MATCH=text``: a payload containing ``text`` answers 500, always, with body
   ``injected failure: payload contains 'text'``.

Then the answer by content type (any split type; the media type, parameters ignored):

* ``application/x-batchscore-echo``: one line (``text/plain``)
  ``bytes=<payload length> lines=<number of \\n in the payload> inflight=<requests to
  /invocations in flight now, this one included> max_inflight=<the most seen so far>\\n``.
* ``application/x-recordio``: the payload parsed as MXNet RecordIO (uint32 LE magic
  0xced7230a, uint32 LE lrecord: upper 3 bits continuation flag, lower 29 bits length, data
  padded to 4 bytes; split records are joined); one line per record:
  ``len=<data length> text=<data as UTF-8>``, or ``len=<n> hex=<data in hex>`` when the data is
  not UTF-8 or holds a line break. A malformed payload answers 400 naming the byte offset.
* ``application/x-tfrecord``: the payload parsed as TFRecords (uint64 LE length, uint32 CRC,
  data, uint32 CRC; the CRCs are not checked); one line per record, as for RecordIO.
* anything else: the example server (CSV, JSON Lines, JSON; 415 for other types).

The port is always 8080.
"""

from __future__ import annotations

import os
import signal
import struct
import sys
import threading
import time

sys.path.insert(0, "/opt/program")

import serve  # noqa: E402  (the example server, /opt/program/serve.py)
from serve import Response, log, media_type  # noqa: E402

ECHO = "application/x-batchscore-echo"
RECORDIO = "application/x-recordio"
TFRECORD = "application/x-tfrecord"
RECORDIO_MAGIC = 0xCED7230A


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _seconds(name: str, default: float = 0.0) -> float:
    value = os.environ.get(name, "").strip()
    return float(value) if value else default


_lock = threading.Lock()
_inflight = 0
_max_inflight = 0
_invocations = 0


def _record_line(data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\n" in text or "\r" in text:
        return f"len={len(data)} hex={data.hex()}"
    return f"len={len(data)} text={text}"


def parse_recordio(payload: bytes) -> list[bytes]:
    records, parts, pos = [], None, 0
    while pos < len(payload):
        if len(payload) - pos < 8:
            raise ValueError(f"offset {pos}: {len(payload) - pos} bytes left, too few for a RecordIO header")
        magic, lrecord = struct.unpack_from("<II", payload, pos)
        if magic != RECORDIO_MAGIC:
            raise ValueError(f"offset {pos}: magic {magic:#010x}, expected {RECORDIO_MAGIC:#010x}")
        flag, length = lrecord >> 29, lrecord & ((1 << 29) - 1)
        start = pos + 8
        if start + length > len(payload):
            raise ValueError(f"offset {pos}: record of {length} bytes runs past the payload's end")
        data = payload[start : start + length]
        pos = start + length + (-length % 4)
        if flag == 0:  # a whole record
            records.append(data)
        elif flag == 1:  # first part of a split record
            parts = [data]
        elif flag in (2, 3) and parts is not None:  # middle / last part: the magic was cut out
            parts.append(data)
            if flag == 3:
                records.append(struct.pack("<I", RECORDIO_MAGIC).join(parts))
                parts = None
        else:
            raise ValueError(f"offset {pos}: continuation flag {flag} without a first part")
    if parts is not None:
        raise ValueError("the payload ends inside a split record")
    return records


def parse_tfrecord(payload: bytes) -> list[bytes]:
    records, pos = [], 0
    while pos < len(payload):
        if len(payload) - pos < 12:
            raise ValueError(f"offset {pos}: {len(payload) - pos} bytes left, too few for a TFRecord header")
        (length,) = struct.unpack_from("<Q", payload, pos)
        start = pos + 12
        if start + length + 4 > len(payload):
            raise ValueError(f"offset {pos}: record of {length} bytes runs past the payload's end")
        records.append(payload[start : start + length])
        pos = start + length + 4
    return records


class FaultHandler(serve.Handler):
    server_version = "batchscore-serve-test/1"

    def ping(self) -> Response:
        if _flag("FAULT_NEVER_HEALTHY"):
            return Response.text(503, "FAULT_NEVER_HEALTHY")
        return super().ping()

    def execution_parameters(self) -> Response:
        if _flag("FAULT_NO_EXECUTION_PARAMETERS"):
            return Response.text(404, "FAULT_NO_EXECUTION_PARAMETERS")
        custom = os.environ.get("FAULT_EXECUTION_PARAMETERS")
        if custom is not None:
            return Response(200, custom.encode(), "application/json")
        return super().execution_parameters()

    def invocations(self, payload: bytes, content_type: str) -> Response:
        global _inflight, _max_inflight, _invocations
        with _lock:
            _invocations += 1
            number = _invocations
            _inflight += 1
            _max_inflight = max(_max_inflight, _inflight)
        try:
            return self._invocation(number, payload, content_type)
        finally:
            with _lock:
                _inflight -= 1

    def _invocation(self, number: int, payload: bytes, content_type: str) -> Response:
        exit_match = os.environ.get("FAULT_EXIT_MATCH")
        if exit_match and exit_match.encode() in payload:
            log(f"FAULT_EXIT_MATCH: the payload contains {exit_match!r}; exiting with code 3")
            os._exit(3)
        delay = _seconds("FAULT_DELAY_SECONDS")
        if delay > 0:
            time.sleep(delay)
        slow_match = os.environ.get("FAULT_SLOW_MATCH")
        if slow_match and slow_match.encode() in payload:
            time.sleep(_seconds("FAULT_SLOW_SECONDS", 30.0))
        fail_first = int(os.environ.get("FAULT_FAIL_FIRST", "0") or 0)
        if number <= fail_first:
            return Response.text(500, f"injected failure {number}")
        fail_match = os.environ.get("FAULT_FAIL_MATCH")
        if fail_match and fail_match.encode() in payload:
            return Response.text(500, f"injected failure: payload contains {fail_match!r}")

        kind = media_type(content_type)
        if kind == ECHO:
            with _lock:
                inflight, max_inflight = _inflight, _max_inflight
            newlines = payload.count(b"\n")
            line = f"bytes={len(payload)} lines={newlines} inflight={inflight} max_inflight={max_inflight}\n"
            return Response(200, line.encode(), "text/plain; charset=utf-8", records=1)
        if kind in (RECORDIO, TFRECORD):
            try:
                records = parse_recordio(payload) if kind == RECORDIO else parse_tfrecord(payload)
            except ValueError as exc:
                return Response.text(400, f"bad {kind} payload: {exc}")
            body = "".join(_record_line(data) + "\n" for data in records)
            return Response(200, body.encode(), "text/plain; charset=utf-8", records=len(records))
        return super().invocations(payload, content_type)


def serve_before_loading(argv: list[str]) -> int:
    """FAULT_NEVER_HEALTHY: listen at once, then load the model while /ping answers 503."""
    if len(argv) < 2 or argv[1] != "serve":
        return serve.main(argv, FaultHandler)  # its usage message
    server = serve.ThreadingHTTPServer((serve.HOST, serve.PORT), FaultHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    log(f"listening on {serve.HOST}:{serve.PORT} before loading the model (FAULT_NEVER_HEALTHY)")
    try:
        FaultHandler.model = serve.Model(serve.MODEL_PATH)
        log(f"loaded {serve.MODEL_PATH}")
    except Exception as exc:  # noqa: BLE001 - /ping is never healthy anyway; the echo types need no model
        log(f"cannot load the model {serve.MODEL_PATH}: {type(exc).__name__}: {exc}")
    threading.Event().wait()
    return 0


def main(argv: list[str]) -> int:
    if _flag("FAULT_EXIT_AT_START"):
        code = int(os.environ.get("FAULT_EXIT_CODE", "1") or 1)
        time.sleep(_seconds("FAULT_EXIT_AFTER_SECONDS"))
        print(f"FAULT_EXIT_AT_START: exiting with code {code} before serving", flush=True)
        return code
    active = sorted(name for name in os.environ if name.startswith("FAULT_"))
    if len(argv) >= 2 and argv[1] == "serve":
        log("test server; faults: " + (", ".join(f"{n}={os.environ[n]}" for n in active) or "none"))
    if _flag("FAULT_NEVER_HEALTHY"):
        return serve_before_loading(argv)
    return serve.main(argv, FaultHandler)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
