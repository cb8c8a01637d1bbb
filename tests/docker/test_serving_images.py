"""The SageMaker serving images on real containers: the iris example and the fault-injection image.

Each server is started as SageMaker starts one, ``docker run -d IMAGE serve`` with the unpacked
model archive mounted read-only at ``/opt/ml/model``. Its port 8080 is neither published nor
reached through the host's loopback: the requests come from a second container in the server's
network namespace (``docker run --network container:<id>``, the scoring image running a small
urllib client), as the orchestrator reaches it. Every container is removed, also on failure.
"""

from __future__ import annotations

import base64
import json
import struct
import subprocess
import tarfile
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "include" / "examples" / "iris"
ARCHIVE = EXAMPLE / "model" / "iris-classifier.tar.gz"
LABEL = "batchscore-test=serving-images"

# Runs in the scoring image, inside the server's network namespace. argv[1] is a JSON object:
# "wait": seconds to wait for the server, "ready": 200 (a healthy /ping) or "any" (any HTTP
# answer to /ping), "concurrent": send the requests at once, "requests": [{"path", "method",
# "body" (base64), "content_type"}]. Prints {"ready", "results": [{"status", "body", ...}]}.
CLIENT = r"""
import base64, json, sys, time, urllib.error, urllib.request
from concurrent.futures import ThreadPoolExecutor

spec = json.loads(sys.argv[1])

def call(r):
    body = base64.b64decode(r["body"]) if "body" in r else None
    method = r.get("method", "GET" if body is None else "POST")
    req = urllib.request.Request("http://127.0.0.1:8080" + r["path"], data=body, method=method)
    if "content_type" in r:
        req.add_header("Content-Type", r["content_type"])
    started = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=r.get("timeout", 30)) as resp:
            out = {"status": resp.status, "body": resp.read().decode("utf-8", "replace"),
                   "content_type": resp.headers.get("Content-Type")}
    except urllib.error.HTTPError as exc:
        out = {"status": exc.code, "body": exc.read().decode("utf-8", "replace"),
               "content_type": exc.headers.get("Content-Type")}
    except Exception as exc:
        out = {"status": None, "error": type(exc).__name__ + ": " + str(exc)}
    out["seconds"] = time.monotonic() - started
    return out

ready, deadline = False, time.monotonic() + spec.get("wait", 30)
while time.monotonic() < deadline:
    ping = call({"path": "/ping", "timeout": 2})
    if ping["status"] == 200 or (spec.get("ready") == "any" and ping["status"] is not None):
        ready = True
        break
    time.sleep(0.1)
requests = spec.get("requests", [])
if spec.get("concurrent"):
    with ThreadPoolExecutor(len(requests) or 1) as pool:
        results = list(pool.map(call, requests))
else:
    results = [call(r) for r in requests]
print(json.dumps({"ready": ready, "results": results}))
"""


def docker(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"docker {' '.join(args[:3])} ... failed:\n{done.stderr}"
    return done


def logs(container: str) -> str:
    done = docker("logs", container, check=False)
    return done.stdout + done.stderr


@contextmanager
def server(image: str, model_dir: Path | None, env: dict[str, str] | None = None):
    """A detached `docker run -d IMAGE serve`; yields the container id; always removes it."""
    args = ["run", "-d", "--label", LABEL]
    if model_dir is not None:
        args += ["-v", f"{model_dir}:/opt/ml/model:ro"]
    for key, value in (env or {}).items():
        args += ["-e", f"{key}={value}"]
    container = docker(*args, image, "serve").stdout.strip()
    try:
        yield container
    finally:
        docker("rm", "-f", container, check=False)


def request(path: str, body: bytes | str | None = None, content_type: str | None = None) -> dict:
    r: dict = {"path": path}
    if body is not None:
        r["body"] = base64.b64encode(body.encode() if isinstance(body, str) else body).decode()
    if content_type is not None:
        r["content_type"] = content_type
    return r


def client(
    container: str, client_image: str, requests: list[dict], *, ready: str = "200", concurrent: bool = False
) -> list[dict]:
    """Sends the requests from a container sharing the server's network; returns the answers."""
    spec = json.dumps({"wait": 30, "ready": ready, "concurrent": concurrent, "requests": requests})
    done = docker(
        "run",
        "--rm",
        "--label",
        LABEL,
        "--network",
        f"container:{container}",
        client_image,
        "python3",
        "-c",
        CLIENT,
        spec,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, f"client failed:\n{done.stderr}\nserver log:\n{logs(container)}"
    answer = json.loads(done.stdout)
    assert answer["ready"], f"the server never answered /ping as wanted; its log:\n{logs(container)}"
    return answer["results"]


def run_foreground(image: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`docker run --rm IMAGE ARGS` to its end (a container that exits by itself)."""
    name = f"batchscore-serve-{uuid.uuid4().hex[:12]}"
    env_args = [item for key, value in (env or {}).items() for item in ("-e", f"{key}={value}")]
    try:
        return docker("run", "--rm", "--name", name, "--label", LABEL, *env_args, image, *args, check=False)
    finally:
        docker("rm", "-f", name, check=False)


# --- the example's files and the real model's predictions ---------------------------------------


def _lines(folder: str, suffix: str) -> list[list[str]]:
    files = sorted((EXAMPLE / folder).glob(f"*{suffix}"))
    if len(files) != 15 or not ARCHIVE.is_file():
        pytest.fail(f"the iris serving example is not prepared ({ARCHIVE}, 15 files in {folder}/); run `make example`")
    return [f.read_text().splitlines() for f in files]


@pytest.fixture(scope="module")
def csv_files() -> list[list[str]]:
    """data-serve/*.csv: per file its lines "id,f1,f2,f3,f4" (no header)."""
    return _lines("data-serve", ".csv")


@pytest.fixture(scope="module")
def jsonl_files() -> list[list[str]]:
    return _lines("data-serve-jsonl", ".jsonl")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, csv_files) -> Path:
    """The model archive unpacked, as SageMaker unpacks it into /opt/ml/model."""
    target = tmp_path_factory.mktemp("opt-ml-model")
    target.chmod(0o755)
    with tarfile.open(ARCHIVE) as tar:
        assert tar.getnames() == ["model.joblib"]
        tar.extractall(target, filter="data")
    return target


@pytest.fixture(scope="module")
def expected(scoring_image: str, model_dir: Path, csv_files) -> dict[int, tuple[str, float]]:
    """id -> (class, probability) of every row, computed by the model itself in the scoring image."""
    script = (
        "import glob, json, joblib, pandas as pd\n"
        "F = ['sepal_length', 'sepal_width', 'petal_length', 'petal_width']\n"
        "m = joblib.load('/m/model.joblib')\n"
        "rows = pd.concat([pd.read_csv(f, header=None, names=['id', *F]) for f in sorted(glob.glob('/d/*.csv'))])\n"
        "p = m.predict_proba(rows[F])\n"
        "print(json.dumps({int(i): [str(m.classes_[q.argmax()]), float(q.max())] for i, q in zip(rows['id'], p)}))\n"
    )
    done = docker(
        "run",
        "--rm",
        "--label",
        LABEL,
        "-v",
        f"{model_dir}:/m:ro",
        "-v",
        f"{EXAMPLE / 'data-serve'}:/d:ro",
        scoring_image,
        "python3",
        "-c",
        script,
    )
    return {int(k): (v[0], v[1]) for k, v in json.loads(done.stdout).items()}


def without_id(lines: list[str]) -> str:
    """The input filter `$[1:]`: each CSV row without its first column."""
    return "".join(",".join(line.split(",")[1:]) + "\n" for line in lines)


def ids(lines: list[str]) -> list[int]:
    return [int(line.split(",", 1)[0]) for line in lines]


# --- the example serving image -----------------------------------------------------------------


def test_example_serves_the_real_model(serving_image, scoring_image, model_dir, csv_files, jsonl_files, expected):
    every_line = [line for lines in csv_files for line in lines]
    jsonl_lists = "".join(json.dumps(json.loads(line)["features"]) + "\n" for line in jsonl_files[2])
    env = {"SAGEMAKER_BATCH": "true", "SAGEMAKER_MAX_PAYLOAD_IN_MB": "6"}
    with server(serving_image, model_dir, env) as container:
        results = client(
            container,
            scoring_image,
            [
                request("/ping"),
                request("/execution-parameters"),
                request("/invocations", without_id(csv_files[0]), "text/csv"),
                request("/invocations", without_id(every_line), "text/csv; charset=utf-8"),
                request("/invocations", "\n".join(jsonl_files[1]) + "\n", "application/jsonlines"),
                request("/invocations", jsonl_lists, "application/x-jsonlines"),
                request(
                    "/invocations",
                    json.dumps({"instances": [json.loads(x)["features"] for x in jsonl_files[3]]}),
                    "application/json",
                ),
                request("/invocations", "1,2,3,4\n", "text/plain"),
                request("/invocations", "5.1,3.5,1.4,0.2\n5.1,3.5,x,0.2\n", "text/csv"),
                request("/invocations", "5.1,3.5,1.4\n", "text/csv"),
                request("/invocations", '{"features": [1, 2, 3, 4]}\n{"features": [1, 2]\n', "application/jsonlines"),
                request("/invocations", "", "text/csv"),
                request("/nowhere"),
            ],
        )
        log = logs(container)

    ping, params, csv0, csv_all, jsonl_objects, jsonl_plain, as_json, *errors = results
    assert (ping["status"], ping["body"]) == (200, "")
    assert params["status"] == 200
    assert json.loads(params["body"]) == {"MaxConcurrentTransforms": 2, "BatchStrategy": "MULTI_RECORD", "MaxPayloadInMB": 6}

    assert csv0["status"] == 200 and csv0["content_type"] == "text/csv"
    assert csv0["body"] == "".join(expected[i][0] + "\n" for i in ids(csv_files[0]))
    assert csv_all["body"].splitlines() == [expected[i][0] for i in ids(every_line)]
    assert {expected[i][0] for i in ids(every_line)} == {"setosa", "versicolor", "virginica"}

    for answer, lines, ctype in (
        (jsonl_objects, jsonl_files[1], "application/jsonlines"),
        (jsonl_plain, jsonl_files[2], "application/x-jsonlines"),
    ):
        assert answer["status"] == 200 and answer["content_type"] == ctype, answer
        got = [json.loads(line) for line in answer["body"].splitlines()]
        want = [expected[json.loads(line)["id"]] for line in lines]
        assert [g["prediction"] for g in got] == [w[0] for w in want]
        assert [g["probability"] for g in got] == [round(w[1], 4) for w in want]
    assert json.loads(as_json["body"]) == {"predictions": [expected[json.loads(x)["id"]][0] for x in jsonl_files[3]]}

    unsupported, bad_number, short_row, bad_line, empty, nowhere = errors
    assert unsupported["status"] == 415 and "text/plain" in unsupported["body"]
    assert bad_number["status"] == 400 and "row 2" in bad_number["body"] and "'x'" in bad_number["body"]
    assert short_row["status"] == 400 and "row 1: expected 4 values, got 3" in short_row["body"]
    assert bad_line["status"] == 400 and "line 2" in bad_line["body"]
    assert empty["status"] == 400 and "no records" in empty["body"]
    assert nowhere["status"] == 404

    assert "SAGEMAKER_BATCH=true" in log and "SAGEMAKER_MAX_PAYLOAD_IN_MB=6" in log
    assert "POST /invocations 200 content_type=text/csv records=150" in log
    assert "content_type=application/jsonlines records=10" in log


def test_example_without_model_exits_1(serving_image):
    done = run_foreground(serving_image, "serve")
    assert done.returncode == 1
    assert "/opt/ml/model/model.joblib" in done.stdout + done.stderr


@pytest.mark.parametrize("args", [(), ("train",)])
def test_example_needs_the_serve_argument(serving_image, args):
    done = run_foreground(serving_image, *args)
    assert done.returncode == 2
    assert "usage" in done.stderr


# --- the fault-injection image -----------------------------------------------------------------


def recordio(*records: bytes, split: tuple[bytes, bytes] | None = None) -> bytes:
    def one(data: bytes, flag: int = 0) -> bytes:
        return struct.pack("<II", 0xCED7230A, (flag << 29) | len(data)) + data + b"\0" * (-len(data) % 4)

    out = b"".join(one(r) for r in records)
    if split:  # one record cut in two at a magic number inside it (MXNet's split records)
        out += one(split[0], 1) + one(split[1], 3)
    return out


def tfrecord(*records: bytes) -> bytes:
    return b"".join(struct.pack("<QI", len(r), 0) + r + struct.pack("<I", 0) for r in records)


def test_fault_image_failures_and_formats(serving_test_image, scoring_image, model_dir, csv_files, expected):
    env = {
        "FAULT_FAIL_FIRST": "2",
        "FAULT_FAIL_MATCH": "boom",
        "FAULT_SLOW_MATCH": "slowpoke",
        "FAULT_SLOW_SECONDS": "1.5",
        "FAULT_EXECUTION_PARAMETERS": '{"MaxConcurrentTransforms": 4, "BatchStrategy": "SINGLE_RECORD"}',
    }
    echo = "application/x-batchscore-echo"
    with server(serving_test_image, model_dir, env) as container:
        results = client(
            container,
            scoring_image,
            [
                request("/ping"),
                request("/execution-parameters"),
                *[request("/invocations", without_id(csv_files[0]), "text/csv")] * 3,
                request("/invocations", "a boom b\n", echo),
                request("/invocations", "a boom b\n", echo),
                request("/invocations", "slowpoke\n", echo),
                request("/invocations", "one\ntwo\nthree", echo),
                request(
                    "/invocations",
                    recordio(b"hello", b"", b"\xff\x00", b"two\nlines", split=(b"ab", b"cd")),
                    "application/x-recordio",
                ),
                request("/invocations", recordio(b"hello")[:-4], "application/x-recordio"),
                request("/invocations", tfrecord(b'{"id": 1}', b"", b"world"), "application/x-tfrecord"),
            ],
        )
        log = logs(container)

    ping, params, fail1, fail2, scored, boom1, boom2, slow, echoed, rio, bad_rio, tfr = results
    assert ping["status"] == 200
    assert json.loads(params["body"]) == {"MaxConcurrentTransforms": 4, "BatchStrategy": "SINGLE_RECORD"}
    assert (fail1["status"], fail1["body"]) == (500, "injected failure 1\n")
    assert (fail2["status"], fail2["body"]) == (500, "injected failure 2\n")
    assert scored["status"] == 200
    assert scored["body"].splitlines() == [expected[i][0] for i in ids(csv_files[0])]
    assert boom1["status"] == boom2["status"] == 500 and "boom" in boom1["body"]
    assert slow["status"] == 200 and slow["seconds"] >= 1.5
    assert echoed["body"] == "bytes=13 lines=2 inflight=1 max_inflight=1\n"
    assert rio["status"] == 200, rio
    assert rio["body"].splitlines() == [
        "len=5 text=hello",
        "len=0 text=",
        "len=2 hex=ff00",
        "len=9 hex=74776f0a6c696e6573",
        "len=8 hex=6162" + "0a23d7ce" + "6364",  # the two parts joined by the magic number
    ]
    assert bad_rio["status"] == 400 and "offset 0" in bad_rio["body"]
    assert tfr["body"] == 'len=9 text={"id": 1}\nlen=0 text=\nlen=5 text=world\n'
    assert "FAULT_FAIL_FIRST=2" in log


def test_fault_image_never_healthy_and_concurrency(serving_test_image, scoring_image, model_dir):
    env = {"FAULT_NEVER_HEALTHY": "1", "FAULT_NO_EXECUTION_PARAMETERS": "1", "FAULT_DELAY_SECONDS": "1"}
    echo = "application/x-batchscore-echo"
    with server(serving_test_image, model_dir, env) as container:
        health = client(container, scoring_image, [request("/ping"), request("/execution-parameters")], ready="any")
        together = client(container, scoring_image, [request("/invocations", "x\n", echo)] * 4, concurrent=True, ready="any")
    assert [r["status"] for r in health] == [503, 404]
    assert all(r["status"] == 200 for r in together), together
    answers = [dict(item.split("=") for item in r["body"].split()) for r in together]
    assert max(int(a["max_inflight"]) for a in answers) == 4, answers
    assert all(a["bytes"] == "2" and a["lines"] == "1" for a in answers)
    assert max(r["seconds"] for r in together) < 3.5  # four 1-second requests, side by side


def test_fault_image_exit_match_kills_the_container(serving_test_image, scoring_image, model_dir):
    echo = "application/x-batchscore-echo"
    with server(serving_test_image, model_dir, {"FAULT_EXIT_MATCH": "poison"}) as container:
        fine, poisoned = client(
            container,
            scoring_image,
            [
                request("/invocations", "fine\n", echo),
                request("/invocations", "poison\n", echo),
            ],
        )
        exit_code = docker("wait", container, timeout=30).stdout.strip()
        log = logs(container)
    assert fine["status"] == 200
    assert poisoned["status"] is None, poisoned  # the connection died with the process
    assert exit_code == "3"
    assert "FAULT_EXIT_MATCH" in log


def test_fault_image_exit_at_start(serving_test_image):
    done = run_foreground(serving_test_image, "serve", env={"FAULT_EXIT_AT_START": "1"})
    assert done.returncode == 1
    assert done.stdout == "FAULT_EXIT_AT_START: exiting with code 1 before serving\n"
    for code, after in (("0", "0"), ("3", "0.5")):
        env = {"FAULT_EXIT_AT_START": "1", "FAULT_EXIT_CODE": code, "FAULT_EXIT_AFTER_SECONDS": after}
        done = run_foreground(serving_test_image, "serve", env=env)
        assert (done.returncode, done.stdout) == (int(code), f"FAULT_EXIT_AT_START: exiting with code {code} before serving\n")
