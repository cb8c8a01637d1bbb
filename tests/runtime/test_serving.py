"""The serving-contract client against a real HTTP server, on real files.

The server is an in-process ``ThreadingHTTPServer`` whose answers each test sets (echo, errors,
slow answers, execution parameters); it logs every request it receives, so the tests check
what went over the wire as well as the ``.out`` files and the committed status.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from batchscore_runtime.formats import (
    ErrorInfo,
    InputFile,
    ItemError,
    MiniBatch,
    MiniBatchDir,
    MiniBatchStatus,
    TransformConfig,
    write_json_atomic,
)
from batchscore_runtime.records import masked_crc32c
from batchscore_runtime.serving import main

MB = 1024 * 1024


# --------------------------------------------------------------------------- the test server


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    content_type: str | None
    accept: str | None
    body: bytes


class App:
    """What the test server answers, and what it received.

    ``ping(n)`` and ``invoke(request, n)`` return ``(status, body)`` for the n-th such request
    (1-based); ``parameters`` is the /execution-parameters answer (None: 404; bytes as they are).
    """

    def __init__(self) -> None:
        self.url = ""
        self.ping: Callable[[int], tuple[int, bytes]] = lambda n: (200, b"")
        self.parameters: Any = None
        self.invoke: Callable[[Request, int], tuple[int, bytes]] = lambda request, n: (200, request.body)
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0

    def count(self, path: str) -> int:
        with self.lock:
            return sum(1 for r in self.requests if r.path == path)

    def posts(self) -> list[bytes]:
        """The bodies of the ``POST /invocations`` requests, in arrival order."""
        return [r.body for r in self.requests if r.path == "/invocations"]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _receive(self) -> tuple[App, Request, int]:
        app: App = self.server.app  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        request = Request(self.command, self.path, self.headers.get("Content-Type"), self.headers.get("Accept"), body)
        with app.lock:
            app.requests.append(request)
            n = sum(1 for r in app.requests if r.path == request.path)
        return app, request, n

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        app, request, n = self._receive()
        if request.path == "/ping":
            self._answer(*app.ping(n))
        elif request.path == "/execution-parameters" and app.parameters is not None:
            params = app.parameters
            self._answer(200, params if isinstance(params, bytes) else json.dumps(params).encode())
        else:
            self._answer(404, b"not found")

    def do_POST(self) -> None:
        app, request, n = self._receive()
        with app.lock:
            app.in_flight += 1
            app.max_in_flight = max(app.max_in_flight, app.in_flight)
        try:
            status, body = app.invoke(request, n)
        finally:
            with app.lock:
                app.in_flight -= 1
        self._answer(status, body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture()
def server():
    app = App()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.app = app  # type: ignore[attr-defined]
    httpd.handle_error = lambda request, client_address: None  # a client that gave up is not a failure here
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    app.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield app
    httpd.shutdown()
    httpd.server_close()


def free_port_url() -> str:
    """An address where nothing listens (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


# --------------------------------------------------------------------------- running the client


def score(tmp_path: Path, url: str, files: dict[str, bytes], **transform: Any) -> tuple[int, MiniBatchDir]:
    """Write ``files`` as mini-batch 3, run the client on them with ``transform``; returns the exit code and the result folder."""
    inputs = tmp_path / "in"
    entries = []
    for rel, data in files.items():
        path = inputs / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        st = path.stat()
        entries.append(InputFile(rel, st.st_size, st.st_mtime_ns))
    mb_file = tmp_path / "mb.json"
    write_json_atomic(mb_file, MiniBatch(index=3, files=entries).to_json())
    out = MiniBatchDir(tmp_path / "out", 3)
    config = TransformConfig(**transform)
    code = main(
        [
            "--mini-batch", str(mb_file),
            "--input-root", str(inputs),
            "--output", str(out.path),
            "--transform", json.dumps(config.to_json()),
            "--attempt", "2",
            "--url", url,
        ]
    )  # fmt: skip
    return code, out


def succeeded(out: MiniBatchDir) -> MiniBatchStatus:
    status = out.read_status()
    assert status is not None and status.succeeded, status
    return status


def outputs(out: MiniBatchDir) -> dict[str, bytes]:
    """The committed ``.out`` files, by path inside the outputs folder."""
    folder = out.outputs_path(succeeded(out))
    assert folder is not None
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def lines(n: int, prefix: str = "") -> bytes:
    return "".join(f"{prefix}{k},{k * 2}\n" for k in range(1, n + 1)).encode()


# --------------------------------------------------------------------------- the basics


def test_line_split_multi_record_writes_one_out_file_per_input(server: App, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="batchscore")
    files = {"a.csv": b"1,2\r\n\n3,4\n", "sub/b.csv": b"5,6", "empty.csv": b"\n"}
    code, out = score(tmp_path, server.url, files, split_type="Line", content_type="text/csv", accept="text/csv")
    assert code == 0
    assert outputs(out) == {"a.csv.out": b"1,2\n3,4\n", "sub/b.csv.out": b"5,6\n", "empty.csv.out": b""}
    status = succeeded(out)
    assert (status.index, status.files, status.rows, status.failed_items, status.item_errors) == (3, 3, 3, 0, [])
    assert (status.custom_outputs, status.workers, status.attempt, status.result_file) == (3, 1, 2, None)
    assert status.outputs_dir is not None and status.outputs_dir.startswith("outputs-")
    assert 0 <= status.init_seconds < 1
    assert [(r.method, r.path) for r in server.requests] == [
        ("GET", "/ping"),
        ("GET", "/execution-parameters"),
        ("POST", "/invocations"),
        ("POST", "/invocations"),
    ]
    assert {(r.content_type, r.accept) for r in server.requests if r.method == "POST"} == {("text/csv", "text/csv")}
    messages = [r.getMessage() for r in caplog.records]
    assert "the serving container is healthy after 0.0 s" in messages
    assert (
        "the serving container does not implement /execution-parameters (HTTP 404); using the job's settings, else the defaults"
    ) in messages
    assert (
        "mb-00003: MaxConcurrentTransforms 1 (default), BatchStrategy MULTI_RECORD (default), MaxPayloadInMB 6 (default)"
        in messages
    )
    assert any(m.startswith("a.csv: 2 records in 1 payload -> a.csv.out (") for m in messages)
    assert any(m.startswith("mb-00003: 3 records of 3 files in ") and m.endswith("3 .out file(s)") for m in messages)


def test_split_none_sends_each_file_whole(server: App, tmp_path: Path) -> None:
    server.invoke = lambda request, n: (200, b"%d bytes" % len(request.body))
    code, out = score(tmp_path, server.url, {"x.bin": b"\x00\x01\n\n\xff", "y.bin": b""})
    assert code == 0
    assert outputs(out) == {"x.bin.out": b"5 bytes", "y.bin.out": b"0 bytes"}
    assert server.posts() == [b"\x00\x01\n\n\xff", b""]
    assert server.requests[-1].content_type is None and server.requests[-1].accept is None
    assert succeeded(out).rows == 2


def test_single_record_and_assemble_with(server: App, tmp_path: Path) -> None:
    server.invoke = lambda request, n: (200, b"p" + request.body.strip())
    files = {"a.csv": lines(3)}
    code, out = score(tmp_path, server.url, files, split_type="Line", batch_strategy="SINGLE_RECORD")
    assert code == 0
    assert server.posts() == [b"1,2\n", b"2,4\n", b"3,6\n"]
    assert outputs(out) == {"a.csv.out": b"p1,2p2,4p3,6"}  # AssembleWith None: the bodies as they are
    code, out = score(tmp_path, server.url, files, split_type="Line", batch_strategy="SINGLE_RECORD", assemble_with="Line")
    assert outputs(out) == {"a.csv.out": b"p1,2\np2,4\np3,6\n"}
    server.invoke = lambda request, n: (200, request.body)  # already ends with a newline: none added
    code, out = score(tmp_path, server.url, files, split_type="Line", assemble_with="Line")
    assert outputs(out) == {"a.csv.out": lines(3)}


def recordio(data: bytes, cflag: int = 0) -> bytes:
    return struct.pack("<II", 0xCED7230A, (cflag << 29) | len(data)) + data + b"\0" * (-len(data) % 4)


def tfrecord(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


@pytest.mark.parametrize(
    ("split_type", "records"),
    [
        ("RecordIO", [recordio(b"one"), recordio(b"two-", 1) + recordio(b"parts", 3), recordio(b"three!")]),
        ("TFRecord", [tfrecord(b"one"), tfrecord(b"two"), tfrecord(b"")]),
    ],
)
def test_binary_records_keep_their_framing(server: App, tmp_path: Path, split_type: str, records: list[bytes]) -> None:
    data = b"".join(records)
    code, out = score(tmp_path, server.url, {"r.rec": data}, split_type=split_type)
    assert code == 0
    assert server.posts() == [data]  # MULTI_RECORD: all in one payload, itself a valid stream
    assert outputs(out) == {"r.rec.out": data}
    assert succeeded(out).rows == 3
    code, out = score(tmp_path, server.url, {"r.rec": data}, split_type=split_type, batch_strategy="SINGLE_RECORD")
    assert server.posts()[1:] == records
    assert outputs(out) == {"r.rec.out": data}


def test_corrupt_binary_input_fails_its_file(server: App, tmp_path: Path) -> None:
    good = recordio(b"ok")
    code, out = score(tmp_path, server.url, {"bad.rec": good + b"\x00" * 8, "good.rec": good}, split_type="RecordIO")
    assert code == 0
    status = succeeded(out)
    assert status.item_errors == [
        ItemError("bad.rec", "CorruptInput", "bad RecordIO magic 0x00000000 at byte 12 (expected 0xced7230a)", 2)
    ]
    assert (status.rows, status.failed_items, status.custom_outputs) == (1, 1, 1)
    assert outputs(out) == {"good.rec.out": good}
    assert server.posts() == [good]


# --------------------------------------------------------------------------- payload limits


def test_payload_boundary_and_a_record_too_large(server: App, tmp_path: Path) -> None:
    quarter = b"a" * (MB // 4 - 1) + b"\n"  # a quarter MiB with its newline
    files = {
        "exact.txt": quarter * 4,  # exactly MaxPayloadInMB: one request
        "over.txt": quarter * 3 + b"b" * (MB // 4) + b"\n",  # one byte more: two
        "big.txt": b"small\n" + b"c" * MB + b"\n" + b"small\n",  # record 2 is over the cap
    }
    server.invoke = lambda request, n: (200, b"%d\n" % len(request.body))
    code, out = score(tmp_path, server.url, files, split_type="Line", max_payload_mb=1)
    assert code == 0
    assert outputs(out) == {
        "exact.txt.out": b"1048576\n",
        "over.txt.out": b"786432\n262145\n",
    }
    assert sorted(len(b) for b in server.posts()) == [MB // 4 + 1, 3 * MB // 4, MB]
    status = succeeded(out)
    assert status.item_errors == [
        ItemError("big.txt", "RecordTooLarge", "record 2 is 1,048,577 bytes, over MaxPayloadInMB = 1 (1,048,576 bytes)", 2)
    ]
    assert (status.rows, status.failed_items, status.custom_outputs) == (8, 1, 2)


# --------------------------------------------------------------------------- concurrency and retries


def test_concurrent_requests_keep_record_order(server: App, tmp_path: Path) -> None:
    def slow_first(request: Request, n: int) -> tuple[int, bytes]:
        k = int(request.body.split(b",")[0])
        time.sleep(0.05 * (5 - k))  # earlier records answer later
        return 200, request.body

    server.invoke = slow_first
    files = {"a.csv": lines(4), "b.csv": lines(4)}
    code, out = score(tmp_path, server.url, files, split_type="Line", batch_strategy="SINGLE_RECORD", max_concurrent_transforms=4)
    assert code == 0
    assert outputs(out) == {"a.csv.out": lines(4), "b.csv.out": lines(4)}
    assert server.max_in_flight >= 2
    assert len(server.posts()) == 8
    assert succeeded(out).workers == 4


def test_server_errors_are_retried(server: App, tmp_path: Path) -> None:
    server.invoke = lambda request, n: (503, b"busy") if n <= 2 else (200, b"ok\n")
    code, out = score(tmp_path, server.url, {"a.csv": lines(2)}, split_type="Line")
    assert code == 0
    assert outputs(out) == {"a.csv.out": b"ok\n"}
    assert server.posts() == [lines(2)] * 3
    assert succeeded(out).item_errors == []


def test_a_failing_file_does_not_stop_the_others(server: App, tmp_path: Path) -> None:
    def model(request: Request, n: int) -> tuple[int, bytes]:
        if b"bad" in request.body:
            return 500, b"model exploded\n" + b"x" * 300
        if b"invalid" in request.body:
            return 400, b""
        return 200, request.body

    server.invoke = model
    files = {
        "a.csv": lines(4),
        "b.csv": b"1,2\n3,4\nbad,1\nbad,2\n5,6\n",
        "c.csv": b"invalid\n",
    }
    code, out = score(
        tmp_path, server.url, files, split_type="Line", max_payload_mb=1, invocation_max_retries=1,
        content_type="text/csv",
    )  # fmt: skip
    assert code == 0
    assert outputs(out) == {"a.csv.out": lines(4)}
    status = succeeded(out)
    assert status.item_errors == [
        ItemError(
            "b.csv",
            "InvocationError",
            "records 1-5: HTTP 500 after 2 attempts: " + repr("model exploded\n" + "x" * 185) + "...",
            1,
        ),
        ItemError("c.csv", "InvocationError", "record 1: HTTP 400 after 1 attempt: (empty body)", 1),
    ]
    assert (status.rows, status.failed_items, status.custom_outputs) == (4, 2, 1)
    assert server.posts().count(files["c.csv"]) == 1  # a 4xx is not retried
    assert server.posts().count(files["b.csv"]) == 2


def test_a_failed_payload_cancels_the_rest_of_its_file(server: App, tmp_path: Path) -> None:
    server.invoke = lambda request, n: (500, b"no") if request.body.startswith(b"2,") else (200, request.body)
    code, out = score(
        tmp_path, server.url, {"a.csv": lines(6)}, split_type="Line", batch_strategy="SINGLE_RECORD",
        invocation_max_retries=0,
    )  # fmt: skip
    assert code == 0
    assert succeeded(out).item_errors == [ItemError("a.csv", "InvocationError", "record 2: HTTP 500 after 1 attempt: 'no'", 2)]
    assert outputs(out) == {}
    assert len(server.posts()) < 6


def test_a_request_past_its_timeout_is_retried_then_fails_its_file(server: App, tmp_path: Path) -> None:
    def model(request: Request, n: int) -> tuple[int, bytes]:
        if request.body.startswith(b"slow"):
            time.sleep(1.6)
        return 200, request.body

    server.invoke = model
    files = {"slow.csv": b"slow,1\n", "fast.csv": b"fast,1\n"}
    t0 = time.monotonic()
    code, out = score(
        tmp_path, server.url, files, split_type="Line", invocation_timeout=1, invocation_max_retries=1,
        max_concurrent_transforms=2,
    )  # fmt: skip
    assert code == 0
    assert time.monotonic() - t0 < 5
    status = succeeded(out)
    assert status.item_errors == [
        ItemError("slow.csv", "InvocationTimeout", "record 1: did not answer within 1 s after 2 attempts", 1)
    ]
    assert outputs(out) == {"fast.csv.out": b"fast,1\n"}
    assert server.posts().count(b"slow,1\n") == 2


# --------------------------------------------------------------------------- health


def failure(out: MiniBatchDir) -> ErrorInfo:
    status = out.read_status()
    assert status is not None and status.state == MiniBatchStatus.FAILED, status
    assert status.error is not None
    return status.error


def test_never_healthy_connection_refused(tmp_path: Path) -> None:
    t0 = time.monotonic()
    code, out = score(tmp_path, free_port_url(), {"a.csv": b"1\n"}, startup_timeout=2)
    assert code == 1
    assert 2 <= time.monotonic() - t0 < 4
    error = failure(out)
    assert (error.type, error.message) == (
        "ContainerNotHealthy",
        "the serving container did not answer GET /ping with 200 within 2 s (settings.init_timeout); "
        "last answer: connection refused",
    )
    status = out.read_status()
    assert (status.files, status.attempt, status.rows, status.workers) == (1, 2, 0, 1)


def test_never_healthy_names_the_last_answer(server: App, tmp_path: Path) -> None:
    server.ping = lambda n: (503, b"loading model\n")
    code, out = score(tmp_path, server.url, {"a.csv": b"1\n"}, startup_timeout=1)
    assert code == 1
    assert failure(out).message == (
        "the serving container did not answer GET /ping with 200 within 1 s (settings.init_timeout); "
        "last answer: HTTP 503 'loading model\\n'"
    )
    assert server.posts() == []
    assert server.count("/ping") == 2  # once a second: at 0 s and at 1 s


def test_healthy_after_a_while(server: App, tmp_path: Path) -> None:
    server.ping = lambda n: (503, b"") if n < 3 else (200, b"")
    code, out = score(tmp_path, server.url, {"a.csv": b"1\n"}, startup_timeout=10)
    assert code == 0
    assert server.count("/ping") == 3
    assert 1.9 <= succeeded(out).init_seconds < 3


# --------------------------------------------------------------------------- execution parameters


def test_the_containers_execution_parameters_apply_when_the_job_sets_none(server: App, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="batchscore")
    server.parameters = {"MaxConcurrentTransforms": 3, "BatchStrategy": "SINGLE_RECORD", "MaxPayloadInMB": 1}
    code, out = score(tmp_path, server.url, {"a.csv": lines(3)}, split_type="Line")
    assert code == 0
    assert len(server.posts()) == 3
    assert succeeded(out).workers == 3
    messages = [r.getMessage() for r in caplog.records]
    assert (
        "mb-00003: MaxConcurrentTransforms 3 (container), BatchStrategy SINGLE_RECORD (container), MaxPayloadInMB 1 (container)"
        in messages
    )


def test_the_jobs_settings_override_the_container(server: App, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="batchscore")
    server.parameters = {"MaxConcurrentTransforms": 3, "BatchStrategy": "SINGLE_RECORD", "MaxPayloadInMB": 1}
    big = b"x" * (MB + 10) + b"\n"
    code, out = score(
        tmp_path, server.url, {"a.csv": lines(3) + big}, split_type="Line", batch_strategy="MULTI_RECORD",
        max_concurrent_transforms=2, max_payload_mb=2,
    )  # fmt: skip
    assert code == 0
    assert server.posts() == [lines(3) + big]
    assert succeeded(out).workers == 2
    messages = [r.getMessage() for r in caplog.records]
    assert "mb-00003: MaxConcurrentTransforms 2 (job), BatchStrategy MULTI_RECORD (job), MaxPayloadInMB 2 (job)" in messages


def test_bad_container_values_are_refused(server: App, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="batchscore")
    server.parameters = {"MaxConcurrentTransforms": 0, "BatchStrategy": "ALL", "MaxPayloadInMB": 500}
    code, out = score(tmp_path, server.url, {"a.csv": lines(3)}, split_type="Line")
    assert code == 0
    assert len(server.posts()) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "refusing the serving container's MaxConcurrentTransforms = 0 from /execution-parameters: "
        "it must be 1 or more; using the default",
        'refusing the serving container\'s BatchStrategy = "ALL" from /execution-parameters: '
        "it must be MULTI_RECORD or SINGLE_RECORD; using the default",
        "refusing the serving container's MaxPayloadInMB = 500 from /execution-parameters: "
        "it must be 1 to 100; using the default",
    ]
    assert "mb-00003: MaxConcurrentTransforms 1 (default), BatchStrategy MULTI_RECORD (default), MaxPayloadInMB 6 (default)" in [
        r.getMessage() for r in caplog.records
    ]


def test_an_answer_that_is_not_json_means_no_parameters(server: App, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="batchscore")
    server.parameters = b"<html>"
    code, out = score(tmp_path, server.url, {"a.csv": lines(1)}, split_type="Line")
    assert code == 0
    assert (
        "the serving container does not implement /execution-parameters (HTTP 200 but not a JSON object: '<html>'); "
        "using the job's settings, else the defaults"
    ) in [r.getMessage() for r in caplog.records]


# --------------------------------------------------------------------------- compression


def test_gzip_input_and_a_corrupt_gzip(server: App, tmp_path: Path) -> None:
    files = {"a.csv.gz": gzip.compress(lines(2)), "b.csv.gz": b"1,2\n"}
    code, out = score(tmp_path, server.url, files, split_type="Line", compression="Gzip")
    assert code == 0
    assert outputs(out) == {"a.csv.gz.out": lines(2)}
    assert server.posts() == [lines(2)]
    assert succeeded(out).item_errors == [ItemError("b.csv.gz", "CorruptInput", "not a gzip file: Not a gzipped file (b'1,')")]


# --------------------------------------------------------------------------- data processing


def csv_model(request: Request, n: int) -> tuple[int, bytes]:
    """Per CSV line: a label and the sum of its numbers (other fields are ignored)."""
    out = []
    for line in request.body.decode().splitlines():
        total = sum(float(v) for v in line.split(",") if not v.startswith("id"))
        out.append(f"{'big' if total > 5 else 'small'},{total}")
    return 200, ("\n".join(out) + "\n").encode()


def test_csv_input_filter_join_and_output_filter(server: App, tmp_path: Path) -> None:
    server.invoke = csv_model
    files = {"a.csv": b"id1,1,2\nid2,3,4\n\nid3,5,6\n"}
    code, out = score(
        tmp_path, server.url, files, split_type="Line", content_type="text/csv", max_payload_mb=1,
        input_filter="$[1:]", join_source="Input", output_filter="$[0,-1]",
    )  # fmt: skip
    assert code == 0
    assert server.posts() == [b"1,2\n3,4\n5,6\n"]
    assert outputs(out) == {"a.csv.out": b"id1,3.0\nid2,7.0\nid3,11.0\n"}
    code, out = score(tmp_path, server.url, files, split_type="Line", content_type="text/csv", join_source="Input")
    assert outputs(out) == {"a.csv.out": b"id1,1,2,small,3.0\nid2,3,4,big,7.0\nid3,5,6,big,11.0\n"}
    code, out = score(
        tmp_path, server.url, {"a.csv": b"1,2\n3,4\n"}, split_type="Line", content_type="text/csv",
        batch_strategy="SINGLE_RECORD", output_filter="$[0]",
    )  # fmt: skip
    assert outputs(out) == {"a.csv.out": b"small\nbig\n"}


def json_model(request: Request, n: int) -> tuple[int, bytes]:
    """Per JSON line (an array of numbers): their sum, all in one JSON array."""
    values = [sum(json.loads(line)) for line in request.body.decode().splitlines()]
    return 200, json.dumps(values).encode()


def test_json_lines_input_filter_join_and_output_filter(server: App, tmp_path: Path) -> None:
    server.invoke = json_model
    files = {
        "a.jsonl": b'{"id": "a", "features": [1, 2]}\n{"id": "b", "features": [3, 4], "note": "\xc3\xa9"}\n',
        "b.jsonl": b'{"id": "c", "features": [5]}\n{"id": "d"}\n',
    }
    code, out = score(
        tmp_path, server.url, files, split_type="Line", content_type="application/jsonlines",
        accept="application/jsonlines", input_filter="$.features", join_source="Input",
    )  # fmt: skip
    assert code == 0
    assert server.posts() == [b"[1,2]\n[3,4]\n"]  # b.jsonl failed before anything was sent
    assert outputs(out) == {
        "a.jsonl.out": '{"id":"a","features":[1,2],"SageMakerOutput":3}\n'
        '{"id":"b","features":[3,4],"note":"é","SageMakerOutput":7}\n'.encode()
    }
    assert succeeded(out).item_errors == [
        ItemError(
            "b.jsonl",
            "FilterError",
            "InputFilter '$.features' selects nothing in record 2: no key 'features' (the object has 'id')",
            2,
        )
    ]
    code, out = score(
        tmp_path, server.url, {"a.jsonl": files["a.jsonl"]}, split_type="Line", content_type="application/jsonlines",
        input_filter="$.features", join_source="Input", output_filter="$['id','SageMakerOutput']",
    )  # fmt: skip
    assert outputs(out) == {"a.jsonl.out": b'{"id":"a","SageMakerOutput":3}\n{"id":"b","SageMakerOutput":7}\n'}


def test_an_output_count_that_does_not_match_fails_the_file(server: App, tmp_path: Path) -> None:
    server.invoke = lambda request, n: (200, b"only one\n")
    code, out = score(tmp_path, server.url, {"a.csv": lines(3)}, split_type="Line", content_type="text/csv", join_source="Input")
    assert code == 0
    assert succeeded(out).item_errors == [
        ItemError("a.csv", "OutputMismatch", "records 1-3: the response has 1 lines for 3 records", 1)
    ]
    assert outputs(out) == {}


# --------------------------------------------------------------------------- failures of the mini-batch


def test_bad_settings_fail_the_mini_batch(server: App, tmp_path: Path) -> None:
    code, out = score(tmp_path, server.url, {"a.csv": b"1\n"}, split_type="Word")
    assert code == 1
    error = failure(out)
    assert (error.type, error.message) == ("ValueError", "SplitType must be one of None, Line, RecordIO, TFRecord, got 'Word'")
    assert "Traceback" in error.traceback
    assert server.requests == []


def test_a_missing_input_file_fails_the_mini_batch(server: App, tmp_path: Path) -> None:
    score(tmp_path, server.url, {"a.csv": b"1\n"})
    (tmp_path / "in" / "a.csv").unlink()
    mb_file, out = tmp_path / "mb.json", MiniBatchDir(tmp_path / "out", 3)
    code = main(
        ["--mini-batch", str(mb_file), "--input-root", str(tmp_path / "in"), "--output", str(out.path),
         "--transform", json.dumps(TransformConfig().to_json()), "--url", server.url]
    )  # fmt: skip
    assert code == 1
    error = failure(out)
    assert (error.type, error.file) == ("InputFileMissingError", "a.csv")
    assert error.message.startswith("input file a.csv of mb-00003 no longer exists")


def test_a_rerun_replaces_the_status_and_the_outputs(server: App, tmp_path: Path) -> None:
    code, out = score(tmp_path, server.url, {"a.csv": b"1\n"})
    first = succeeded(out).outputs_dir
    server.invoke = lambda request, n: (200, b"second")
    code, out = score(tmp_path, server.url, {"a.csv": b"1\n"})
    status = succeeded(out)
    assert status.outputs_dir != first
    assert outputs(out) == {"a.csv.out": b"second"}
    assert sorted(p.name for p in out.path.iterdir()) == sorted([status.outputs_dir, "status.json"])


def test_runs_as_a_module(server: App, tmp_path: Path) -> None:
    """How the orchestrator starts it: ``python3 -m batchscore_runtime.serving`` with the runtime on the path."""
    score(tmp_path, server.url, {"a.csv": b"1,2\n"}, split_type="Line")  # writes the inputs and the mini-batch
    runtime = Path(__file__).resolve().parents[2] / "include"
    transform = TransformConfig(split_type="Line", content_type="text/csv", assemble_with="Line")
    done = subprocess.run(
        [sys.executable, "-m", "batchscore_runtime.serving", "--mini-batch", str(tmp_path / "mb.json"),
         "--input-root", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
         "--transform", json.dumps(transform.to_json()), "--attempt", "3", "--url", server.url],
        env={**os.environ, "PYTHONPATH": str(runtime)}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    out = MiniBatchDir(tmp_path / "out", 3)
    assert outputs(out) == {"a.csv.out": b"1,2\n"}
    assert succeeded(out).attempt == 3
    assert "INFO batchscore: a.csv: 1 record in 1 payload -> a.csv.out (" in done.stdout


# --------------------------------------------------------------------------- symbolic links


def test_a_link_is_sent_from_its_target_under_its_own_name_and_a_refused_link_is_never_read(server: App, tmp_path: Path) -> None:
    score(tmp_path, server.url, {"a.csv": b"1,2\n", "store/b.csv": b"3,4\n5,6\n", "c.csv": b"7,8\n"})  # the files
    inputs = tmp_path / "in"
    (inputs / "latest.csv").symlink_to(inputs / "store" / "b.csv")
    (tmp_path / "secret.csv").write_bytes(b"666,666\n")
    (inputs / "up.csv").symlink_to("../secret.csv")
    refused = (
        "input file up.csv is a symbolic link to /host/secret.csv, outside input.path (/data/in); batchscore "
        "scores only files inside input.path: copy the file in or point input.path at its folder"
    )
    b = (inputs / "store" / "b.csv").stat()
    files = [
        InputFile("a.csv", 4, (inputs / "a.csv").stat().st_mtime_ns),
        InputFile("latest.csv", b.st_size, b.st_mtime_ns, target="store/b.csv"),
        InputFile("up.csv", 0, 0, refused=refused),
        InputFile("c.csv", 4, (inputs / "c.csv").stat().st_mtime_ns),
    ]
    write_json_atomic(tmp_path / "mb.json", MiniBatch(index=3, files=files).to_json())
    server.requests.clear()
    out = MiniBatchDir(tmp_path / "out", 3)
    code = main(
        ["--mini-batch", str(tmp_path / "mb.json"), "--input-root", str(inputs), "--output", str(out.path),
         "--transform", json.dumps(TransformConfig(split_type="Line").to_json()), "--url", server.url]
    )  # fmt: skip

    assert code == 0
    assert outputs(out) == {"a.csv.out": b"1,2\n", "c.csv.out": b"7,8\n", "latest.csv.out": b"3,4\n5,6\n"}
    status = succeeded(out)
    assert (status.files, status.rows, status.failed_items, status.custom_outputs) == (4, 4, 1, 3)  # rows: records
    assert status.item_errors == [ItemError("up.csv", "LinkRefused", refused)]
    assert not any(b"666" in body for body in server.posts())
