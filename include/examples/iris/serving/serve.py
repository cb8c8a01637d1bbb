"""Iris serving container for SageMaker batch transform ("bring your own container").

The contract it implements (CONTRACTS.md section 2):

* Started as ``docker run IMAGE serve`` (exec-form ENTRYPOINT); any other first argument prints
  the usage and exits 2.
* The model archive (``model.tar.gz``, with ``model.joblib`` at its top level) is unpacked into
  ``/opt/ml/model`` before the container starts. The model is loaded once, at start; if
  ``/opt/ml/model/model.joblib`` is missing the server logs an error naming it and exits 1.
* An HTTP server on 0.0.0.0:8080 (standard library, one thread per request):

  - ``GET /ping``: 200 with an empty body (only answered once the model is loaded);
  - ``GET /execution-parameters``: ``{"MaxConcurrentTransforms": 2, "BatchStrategy":
    "MULTI_RECORD", "MaxPayloadInMB": 6}``;
  - ``POST /invocations``: one payload of records; the response holds one result per record, in
    order, in the request's format:

    ``text/csv``: rows of 4 numbers (sepal_length, sepal_width, petal_length, petal_width), no
    header; answers ``text/csv``, one predicted class name per line (``setosa\\n``).

    ``application/jsonlines`` or ``application/x-jsonlines``: one JSON value per line, an object
    ``{"features": [4 numbers]}`` or a list of 4 numbers; answers one object per line,
    ``{"prediction": "setosa", "probability": 0.9731}`` (the predicted class's probability,
    rounded to 4 places), with the request's content type.

    ``application/json``: ``{"instances": [[4 numbers], ...]}`` (an instance may also be
    ``{"features": [...]}``); answers ``{"predictions": ["setosa", ...]}``.

  Other content types get 415; a payload that cannot be parsed gets 400 with a message naming
  the record (1-based row or line number within the payload) and what is wrong with it; no
  records at all is a 400 too. Unknown paths get 404.
* One log line per request on stdout (method, path, status, content type, records, bytes, ms).
  The SageMaker variables (``SAGEMAKER_BATCH``, ``SAGEMAKER_MAX_PAYLOAD_IN_MB``,
  ``SAGEMAKER_BATCH_STRATEGY``, ``SAGEMAKER_MAX_CONCURRENT_TRANSFORMS``) are only logged at start.

Other servers reuse this module (the test image's ``fault_server.py`` does): subclass
``Handler`` and override ``ping``, ``execution_parameters`` or ``invocations``, each returning a
``Response``, then call ``main(sys.argv, Handler subclass)``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL_DIR = "/opt/ml/model"
MODEL_PATH = f"{MODEL_DIR}/model.joblib"
HOST, PORT = "0.0.0.0", 8080
FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
EXECUTION_PARAMETERS = {"MaxConcurrentTransforms": 2, "BatchStrategy": "MULTI_RECORD", "MaxPayloadInMB": 6}
SAGEMAKER_VARIABLES = (
    "SAGEMAKER_BATCH",
    "SAGEMAKER_MAX_PAYLOAD_IN_MB",
    "SAGEMAKER_BATCH_STRATEGY",
    "SAGEMAKER_MAX_CONCURRENT_TRANSFORMS",
)
CSV = "text/csv"
JSON = "application/json"
JSON_LINES = ("application/jsonlines", "application/x-jsonlines")
USAGE = "usage: docker run IMAGE serve   (serves the model in /opt/ml/model on port 8080)"

_log_lock = threading.Lock()


def log(message: str) -> None:
    """One line on stdout, flushed at once (lines of concurrent requests never mix)."""
    with _log_lock:
        sys.stdout.write(f"[serve] {message}\n")
        sys.stdout.flush()


class BadPayload(ValueError):
    """The payload cannot be parsed; the message says where and why (answered with 400)."""


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    records: int | None = None  # for the log line

    @classmethod
    def text(cls, status: int, message: str, records: int | None = None) -> Response:
        return cls(status, (message.rstrip("\n") + "\n").encode(), "text/plain; charset=utf-8", records)


class Model:
    """The scikit-learn pipeline of train.py: a DataFrame of the 4 features in, class names out."""

    def __init__(self, path: str = MODEL_PATH) -> None:
        import joblib  # imported here: `serve.py --help` and the test server's early exits stay fast

        self.pipeline = joblib.load(path)

    def predict(self, rows: list[list[float]]) -> list[tuple[str, float]]:
        """(class name, its probability) for each row of 4 numbers, in order."""
        import pandas as pd

        frame = pd.DataFrame(rows, columns=FEATURES, dtype=float)
        probabilities = self.pipeline.predict_proba(frame)
        classes = self.pipeline.classes_
        best = probabilities.argmax(axis=1)
        return [(str(classes[b]), float(p[b])) for b, p in zip(best, probabilities)]


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise BadPayload(f"{where}: {value!r} is not a number")
    try:
        number = float(value)
    except ValueError:
        raise BadPayload(f"{where}: {value!r} is not a number") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise BadPayload(f"{where}: {value!r} is not a finite number")
    return number


def _features(value, where: str) -> list[float]:
    """4 numbers from a list, or from an object's "features" list."""
    if isinstance(value, dict):
        if "features" not in value:
            raise BadPayload(f'{where}: an object needs a "features" list of {len(FEATURES)} numbers')
        value = value["features"]
    if not isinstance(value, list):
        raise BadPayload(f"{where}: expected a list of {len(FEATURES)} numbers, got {type(value).__name__}")
    if len(value) != len(FEATURES):
        raise BadPayload(f"{where}: expected {len(FEATURES)} values, got {len(value)}")
    return [_number(v, where) for v in value]


def _text(payload: bytes) -> str:
    try:
        return payload.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadPayload(f"the payload is not UTF-8 text (byte {exc.start})") from None


def parse_csv(payload: bytes) -> list[list[float]]:
    rows = []
    for number, row in enumerate(csv.reader(io.StringIO(_text(payload))), start=1):
        if not row or all(not cell.strip() for cell in row):
            continue  # blank lines (the payload's last newline among them)
        if len(row) != len(FEATURES):
            raise BadPayload(f"row {number}: expected {len(FEATURES)} values, got {len(row)}")
        rows.append([_number(cell.strip(), f"row {number}") for cell in row])
    return rows


def parse_json_lines(payload: bytes) -> list[list[float]]:
    rows = []
    for number, line in enumerate(_text(payload).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadPayload(f"line {number}: not JSON ({exc.msg} at column {exc.colno})") from None
        rows.append(_features(value, f"line {number}"))
    return rows


def parse_json(payload: bytes) -> list[list[float]]:
    try:
        document = json.loads(_text(payload))
    except json.JSONDecodeError as exc:
        raise BadPayload(f"not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(document, dict) or not isinstance(document.get("instances"), list):
        raise BadPayload('expected an object {"instances": [[4 numbers], ...]}')
    return [_features(value, f"instance {n}") for n, value in enumerate(document["instances"], start=1)]


def media_type(content_type: str | None) -> str:
    """``text/csv; charset=utf-8`` -> ``text/csv``."""
    return (content_type or "").split(";", 1)[0].strip().lower()


class Handler(BaseHTTPRequestHandler):
    """The three routes of the contract; ``model`` is set by ``main`` before serving."""

    model: Model | None = None
    server_version = "batchscore-iris-serve/1"
    protocol_version = "HTTP/1.1"  # keep-alive: every answer carries a Content-Length

    # --- the routes; subclasses override these -------------------------------------------
    def ping(self) -> Response:
        if self.model is None:
            return Response.text(503, "model not loaded")
        return Response(200, b"", "text/plain; charset=utf-8")

    def execution_parameters(self) -> Response:
        return Response(200, json.dumps(EXECUTION_PARAMETERS).encode(), JSON)

    def invocations(self, payload: bytes, content_type: str) -> Response:
        kind = media_type(content_type)
        if kind == CSV:
            parse = parse_csv
        elif kind in JSON_LINES:
            parse = parse_json_lines
        elif kind == JSON:
            parse = parse_json
        else:
            return Response.text(
                415,
                f"unsupported content type {content_type or '(none)'!r}; "
                f"use {CSV}, {JSON_LINES[0]} (or {JSON_LINES[1]}) or {JSON}",
            )
        try:
            rows = parse(payload)
        except BadPayload as exc:
            return Response.text(400, f"bad {kind} payload: {exc}")
        if not rows:
            return Response.text(400, f"bad {kind} payload: no records in it", records=0)
        results = self.model.predict(rows)
        if kind == CSV:
            body = "".join(f"{label}\n" for label, _ in results)
        elif kind == JSON:
            body = json.dumps({"predictions": [label for label, _ in results]})
        else:
            body = "".join(json.dumps({"prediction": label, "probability": round(p, 4)}) + "\n" for label, p in results)
        return Response(200, body.encode(), kind, records=len(rows))

    # --- HTTP plumbing ---------------------------------------------------------------------
    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/ping":
            self._serve(self.ping)
        elif path == "/execution-parameters":
            self._serve(self.execution_parameters)
        elif path == "/invocations":
            self._serve(lambda: Response.text(405, "use POST for /invocations"))
        else:
            self._serve(lambda: Response.text(404, f"no such path: {path}"))

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            payload = self._read_body()
        except ValueError as exc:
            self.close_connection = True
            message = str(exc)
            self._serve(lambda: Response.text(400, message))
            return
        if path == "/invocations":
            self._serve(lambda: self.invocations(payload, self.headers.get("Content-Type", "")), payload)
        else:
            self._serve(lambda: Response.text(404, f"no such path: {path}"), payload)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size_line = self.rfile.readline(1024)
                try:
                    size = int(size_line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise ValueError(f"bad chunk size line {size_line!r}") from None
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline(1024)
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        try:
            return self.rfile.read(int(length))
        except ValueError:
            raise ValueError(f"bad Content-Length {length!r}") from None

    def _serve(self, route, payload: bytes | None = None) -> None:
        started = time.monotonic()
        try:
            response = route()
        except Exception as exc:  # a bug or a model failure: answer 500, keep serving
            response = Response.text(500, f"internal error: {type(exc).__name__}: {exc}")
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)
        self.wfile.flush()
        parts = [f"{self.command} {self.path.split('?', 1)[0]} {response.status}"]
        if payload is not None:
            parts.append(f"content_type={media_type(self.headers.get('Content-Type')) or '-'}")
            parts.append(f"records={'-' if response.records is None else response.records}")
            parts.append(f"bytes={len(payload)}")
        parts.append(f"ms={(time.monotonic() - started) * 1000:.1f}")
        if response.status >= 400 and response.body:
            parts.append(f"error={response.body.decode(errors='replace').strip()[:300]!r}")
        log(" ".join(parts))

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        pass  # _serve logs one line per request instead of http.server's stderr lines


def main(argv: list[str], handler: type[Handler] = Handler) -> int:
    if len(argv) < 2 or argv[1] != "serve":
        print(USAGE, file=sys.stderr)
        return 2
    settings = {name: os.environ[name] for name in SAGEMAKER_VARIABLES if name in os.environ}
    log("SageMaker settings: " + (", ".join(f"{k}={v}" for k, v in settings.items()) or "none set"))
    if not os.path.isfile(MODEL_PATH):
        log(
            f"ERROR: no model at {MODEL_PATH}; the model archive (model.tar.gz with model.joblib "
            f"at its top level) must be unpacked into {MODEL_DIR}"
        )
        return 1
    started = time.monotonic()
    try:
        handler.model = Model(MODEL_PATH)
    except Exception as exc:
        log(f"ERROR: cannot load the model {MODEL_PATH}: {type(exc).__name__}: {exc}")
        return 1
    log(f"loaded {MODEL_PATH} in {time.monotonic() - started:.2f}s")

    server = ThreadingHTTPServer((HOST, PORT), handler)
    server.daemon_threads = True

    def stop(signum, _frame):
        raise SystemExit(0)  # PID 1 ignores SIGTERM unless handled: make `docker stop` quick

    signal.signal(signal.SIGTERM, stop)
    log(f"listening on {HOST}:{PORT}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
