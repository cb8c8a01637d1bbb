"""The serving contract end to end: real serving containers on the local Docker engine, real DAG runs.

Each test runs one DAG with ``dag.test()``; its deployments use the example serving image (the
real iris model) or the test image built from it (fault injection and echo content types, see
``tests/images/serve-test/fault_server.py``). Nothing is mocked.
"""

from __future__ import annotations

import gzip
import json
import struct
import subprocess
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from batchscore.plan import run_layout
from batchscore_runtime.formats import ItemCounts, MiniBatchCounts, MiniBatchStatus, Summary
from batchscore_runtime.records import masked_crc32c
from tests.helpers import inputs, run_dag, serve_endpoint

pytestmark = pytest.mark.usefixtures("airflow_db")

ECHO = "application/x-batchscore-echo"
MIB = 1024 * 1024


def run_folder(endpoint: Any, name: str, dag_run: Any) -> Path:
    d = next(d for d in endpoint.deployments if d.name == name)
    return run_layout(d, dag_run.run_id).root


def status_of(endpoint: Any, name: str, dag_run: Any, index: int = 0) -> MiniBatchStatus:
    d = next(d for d in endpoint.deployments if d.name == name)
    status = run_layout(d, dag_run.run_id).mini_batch_dir(index).read_status()
    assert status is not None, f"{name}: no status committed"
    return status


def containers_left(endpoint: str) -> list[str]:
    out = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label=batchscore.endpoint={endpoint}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()


def recordio(*records: bytes) -> bytes:
    """MXNet RecordIO: magic, length, data padded to 4 bytes."""
    return b"".join(struct.pack("<II", 0xCED7230A, len(r)) + r + b"\0" * (-len(r) % 4) for r in records)


def tfrecord(*records: bytes) -> bytes:
    """TFRecord: length, masked CRC32C of the length, data, masked CRC32C of the data."""
    out = b""
    for r in records:
        length = struct.pack("<Q", len(r))
        out += length + struct.pack("<I", masked_crc32c(length)) + r + struct.pack("<I", masked_crc32c(r))
    return out


def expected_predictions(model_dir: Path, data_dir: Path) -> list[str]:
    """``id,class`` for every row of the headerless CSV files, predicted by the model itself."""
    script = (
        "import glob, joblib, pandas as pd\n"
        "m = joblib.load('/model/model.joblib')\n"
        "cols = ['id', 'sepal_length', 'sepal_width', 'petal_length', 'petal_width']\n"
        "for f in sorted(glob.glob('/data/*.csv')):\n"
        "    df = pd.read_csv(f, header=None, names=cols)\n"
        "    for i, p in zip(df['id'], m.predict(df[cols[1:]])):\n"
        "        print(f'{i},{p}')\n"
    )
    out = subprocess.run(
        [
            "docker", "run", "--rm", "--network", "none",
            "-v", f"{model_dir}:/model:ro", "-v", f"{data_dir}:/data:ro",
            "batchscore-scoring:latest", "python3", "-c", script,
        ],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return out.stdout.splitlines()


# --------------------------------------------------------------------------- the example image, the real model


def test_the_example_deployment_scores_csv_and_json_lines_as_the_model_does(
    serving_image: str, iris_example: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    example = yaml.safe_load((Path("dags/deployments/iris-transform.yaml")).read_text())
    model_archive = iris_example / "model" / "iris-classifier.tar.gz"
    csv_dir, jsonl_dir = iris_example / "data-serve", iris_example / "data-serve-jsonl"
    path = serve_endpoint(
        tmp_path,
        "iris-transform-test",
        [
            {
                "name": "csv",
                "model": model_archive,
                "image": serving_image,
                "inputs": csv_dir,
                "pattern": "*.csv",
                "transform": example["transform"],  # the example's own settings
                "settings": {"mini_batch_size": 5, "output_action": "append_row", "output_file_name": "predictions.csv"},
            },
            {
                "name": "jsonl",
                "model": model_archive,
                "image": serving_image,
                "inputs": jsonl_dir,
                "pattern": "*.jsonl",
                "transform": {
                    "SplitType": "Line",
                    "BatchStrategy": "SingleRecord",
                    "MaxConcurrentTransforms": 3,
                    "ContentType": "application/jsonlines",
                    "Accept": "application/jsonlines",
                    "AssembleWith": "Line",
                    "DataProcessing": {
                        "InputFilter": "$.features",
                        "JoinSource": "Input",
                        "OutputFilter": "$['id','SageMakerOutput']",
                    },
                },
                "settings": {"mini_batch_size": 15},
            },
        ],
    )
    dag_run, endpoint = run_dag(path, monkeypatch)
    assert dag_run.state == "success"

    expected = expected_predictions(iris_example / "model" / "iris-classifier", csv_dir)
    assert len(expected) == 150
    csv_run = run_folder(endpoint, "csv", dag_run)
    # Joined with the input row and filtered to id and prediction, in input order.
    assert (csv_run / "predictions.csv").read_text().splitlines() == expected
    assert sorted(p.name for p in csv_run.glob("*.out")) == [f"iris-{n:03d}.csv.out" for n in range(15)]
    assert (csv_run / "iris-000.csv.out").read_text().splitlines() == expected[:10]
    summary = Summary.read(csv_run / "summary.json")
    assert (summary.status, summary.contract, summary.rows) == (Summary.SUCCEEDED, "serve", 150)
    assert summary.mini_batches == MiniBatchCounts(total=3, succeeded=3, failed=0, missing=0)
    ledger = pd.read_csv(csv_run / "processed_mini-batches.csv")
    assert ledger["workers"].tolist() == [2, 2, 2]  # the container's /execution-parameters answer
    assert ledger["rows"].tolist() == [50, 50, 50]

    jsonl_run = run_folder(endpoint, "jsonl", dag_run)
    by_id = dict(line.split(",") for line in expected)
    lines = [json.loads(line) for f in sorted(jsonl_run.glob("*.jsonl.out")) for line in f.read_text().splitlines()]
    assert len(lines) == 150
    assert all(set(r) == {"id", "SageMakerOutput"} for r in lines)
    assert {str(r["id"]): r["SageMakerOutput"]["prediction"] for r in lines} == by_id
    assert status_of(endpoint, "jsonl", dag_run).workers == 3  # the job's value wins over the container's

    assert containers_left("iris-transform-test") == []


# --------------------------------------------------------------------------- split types, batch strategies


def test_every_split_type_and_batch_strategy(
    serving_test_image: str, iris_example: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = iris_example / "model" / "iris-classifier"
    lines = b"".join(b"line-%d\n" % i for i in range(8))

    def deployment(name: str, files: dict[str, bytes], transform: dict, env: dict | None = None) -> dict:
        return {
            "name": name,
            "model": model,
            "image": serving_test_image,
            "inputs": inputs(tmp_path / "in" / name, files),
            "transform": {**transform, "Environment": env or {}},
        }

    path = serve_endpoint(
        tmp_path,
        "serve-splits",
        [
            deployment(
                "whole-gzip",
                {"a.txt.gz": gzip.compress(b"a\nb\nc\n"), "b.txt.gz": gzip.compress(b"xyz")},
                {"SplitType": "None", "CompressionType": "Gzip", "ContentType": ECHO},
            ),
            deployment(
                "lines-single",
                {"lines.txt": lines},
                {
                    "SplitType": "Line",
                    "BatchStrategy": "SingleRecord",
                    "MaxConcurrentTransforms": 4,
                    "ContentType": ECHO,
                    "AssembleWith": "Line",
                },
                {"FAULT_DELAY_SECONDS": "0.5"},
            ),  # fmt: skip
            deployment(
                "lines-multi",
                {"lines.txt": lines},
                {"SplitType": "Line", "BatchStrategy": "MultiRecord", "ContentType": ECHO, "AssembleWith": "None"},
            ),
            deployment(
                "recordio-multi",
                {"data.rec": recordio(b"alpha", b"be", b"gamma-delta")},
                {"SplitType": "RecordIO", "BatchStrategy": "MultiRecord", "ContentType": "application/x-recordio"},
            ),
            deployment(
                "tfrecord-single",
                {"data.tfrecord": tfrecord(b"one", b"two", b"three")},
                {
                    "SplitType": "TFRecord",
                    "BatchStrategy": "SingleRecord",
                    "ContentType": "application/x-tfrecord",
                    "AssembleWith": "Line",
                },
            ),  # fmt: skip
        ],
    )
    dag_run, endpoint = run_dag(path, monkeypatch)
    assert dag_run.state == "success"

    def out(name: str, file: str) -> str:
        return (run_folder(endpoint, name, dag_run) / f"{file}.out").read_text()

    # None: the whole (gunzipped) file is one request; the .out keeps the input's name.
    assert out("whole-gzip", "a.txt.gz") == "bytes=6 lines=3 inflight=1 max_inflight=1\n"
    assert out("whole-gzip", "b.txt.gz") == "bytes=3 lines=0 inflight=1 max_inflight=1\n"
    # SingleRecord: one request per line, four in flight at once.
    single = out("lines-single", "lines.txt").splitlines()
    assert len(single) == 8 and all(s.startswith("bytes=7 lines=1 ") for s in single)
    assert max(int(s.rsplit("max_inflight=", 1)[1]) for s in single) >= 2
    assert status_of(endpoint, "lines-single", dag_run).rows == 8
    # MultiRecord: all eight lines in one request.
    assert out("lines-multi", "lines.txt") == "bytes=56 lines=8 inflight=1 max_inflight=1\n"
    # RecordIO: the records keep their framing; one request holds all three.
    assert out("recordio-multi", "data.rec") == "len=5 text=alpha\nlen=2 text=be\nlen=11 text=gamma-delta\n"
    # TFRecord, SingleRecord: one request per record.
    assert out("tfrecord-single", "data.tfrecord") == "len=3 text=one\nlen=3 text=two\nlen=5 text=three\n"
    assert status_of(endpoint, "tfrecord-single", dag_run).rows == 3
    assert containers_left("serve-splits") == []


def test_payload_limit_boundary_and_a_record_too_large(
    serving_test_image: str, iris_example: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    line = b"x" * 1023 + b"\n"  # 1 KiB with its newline
    files = {
        "a-exact.txt": line * 1024,  # exactly 1 MiB: one request
        "b-over.txt": line * 1024 + b"y\n",  # 2 bytes more: two requests
        "c-huge.txt": b"ok\n" + b"z" * MIB + b"\n",  # its record 2 alone is over the limit
    }
    path = serve_endpoint(
        tmp_path,
        "serve-payload",
        [
            {
                "name": "payload",
                "model": iris_example / "model" / "iris-classifier",
                "image": serving_test_image,
                "inputs": inputs(tmp_path / "in", files),
                "transform": {"SplitType": "Line", "MaxPayloadInMB": 1, "ContentType": ECHO, "AssembleWith": "Line"},
                "settings": {"error_threshold": 1},
            }
        ],
    )
    dag_run, endpoint = run_dag(path, monkeypatch)
    assert dag_run.state == "success"  # one failed file is within error_threshold 1
    run = run_folder(endpoint, "payload", dag_run)

    assert (run / "a-exact.txt.out").read_text() == f"bytes={MIB} lines=1024 inflight=1 max_inflight=1\n"
    assert (run / "b-over.txt.out").read_text().splitlines() == [
        f"bytes={MIB} lines=1024 inflight=1 max_inflight=1",
        "bytes=2 lines=1 inflight=1 max_inflight=1",
    ]
    assert not (run / "c-huge.txt.out").exists()  # SageMaker's rule: no .out unless every record succeeded
    errors = pd.read_csv(run / "errors.csv", keep_default_na=False)
    assert errors.values.tolist() == [
        ["mb-00000", "c-huge.txt", 2, "RecordTooLarge", "record 2 is 1,048,577 bytes, over MaxPayloadInMB = 1 (1,048,576 bytes)"]
    ]
    summary = Summary.read(run / "summary.json")
    assert (summary.status, summary.items) == (Summary.SUCCEEDED_WITH_FAILURES, ItemCounts(total=3, succeeded=2, failed=1))


# --------------------------------------------------------------------------- faults


def test_retries_timeouts_and_execution_parameters(
    serving_test_image: str, iris_example: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = iris_example / "model" / "iris-classifier"
    features = b"5.1,3.5,1.4,0.2\n6.7,3.0,5.2,2.3\n"
    echo_lines = {"lines.txt": b"a\nb\nc\nd\n"}

    def deployment(name: str, files: dict[str, bytes], transform: dict, env: dict, settings: dict | None = None) -> dict:
        return {
            "name": name,
            "model": model,
            "image": serving_test_image,
            "inputs": inputs(tmp_path / "in" / name, files),
            "transform": {**transform, "Environment": env},
            "settings": settings or {},
        }

    path = serve_endpoint(
        tmp_path,
        "serve-faults",
        [
            deployment(
                "retried",
                {"rows.csv": features},
                {"SplitType": "Line", "ContentType": "text/csv", "AssembleWith": "Line"},
                {"FAULT_FAIL_FIRST": "1", "FAULT_NO_EXECUTION_PARAMETERS": "1"},
            ),
            deployment(
                "timeout",
                {"fast.txt": b"quick\n", "slow.txt": b"slow\n"},
                {
                    "SplitType": "Line",
                    "ContentType": ECHO,
                    "AssembleWith": "Line",
                    "ModelClientConfig": {"InvocationsTimeoutInSeconds": 1, "InvocationsMaxRetries": 1},
                },
                {"FAULT_SLOW_MATCH": "slow", "FAULT_SLOW_SECONDS": "4"},
                {"error_threshold": 1},
            ),  # fmt: skip
            deployment(
                "container-params",
                echo_lines,
                {"SplitType": "Line", "ContentType": ECHO, "AssembleWith": "Line"},
                {"FAULT_EXECUTION_PARAMETERS": json.dumps({"MaxConcurrentTransforms": 3, "BatchStrategy": "SINGLE_RECORD"})},
            ),
            deployment(
                "job-params",
                echo_lines,
                {"SplitType": "Line", "ContentType": ECHO, "AssembleWith": "Line", "BatchStrategy": "MultiRecord"},
                {"FAULT_EXECUTION_PARAMETERS": json.dumps({"MaxConcurrentTransforms": 3, "BatchStrategy": "SINGLE_RECORD"})},
            ),
        ],
    )
    dag_run, endpoint = run_dag(path, monkeypatch)
    assert dag_run.state == "success"

    # A 500, then success: the request is retried and the .out is written.
    retried = run_folder(endpoint, "retried", dag_run)
    assert (retried / "rows.csv.out").read_text() == "setosa\nvirginica\n"
    status = status_of(endpoint, "retried", dag_run)
    assert (status.failed_items, status.workers) == (0, 1)  # no /execution-parameters: the default, 1

    # A request past InvocationsTimeoutInSeconds is retried, then fails its file only.
    timeout_run = run_folder(endpoint, "timeout", dag_run)
    # (Its two files go out concurrently: whether the fast one overlaps the slow one is timing.)
    assert (timeout_run / "fast.txt.out").read_text().startswith("bytes=6 lines=1 inflight=")
    assert not (timeout_run / "slow.txt.out").exists()
    errors = pd.read_csv(timeout_run / "errors.csv", keep_default_na=False).values.tolist()
    assert errors == [["mb-00000", "slow.txt", 1, "InvocationTimeout", "record 1: did not answer within 1 s after 2 attempts"]]

    # Container's /execution-parameters apply when the job sets nothing; the job's value wins otherwise.
    container = run_folder(endpoint, "container-params", dag_run)
    assert len((container / "lines.txt.out").read_text().splitlines()) == 4  # SINGLE_RECORD: 4 requests
    assert status_of(endpoint, "container-params", dag_run).workers == 3
    job = run_folder(endpoint, "job-params", dag_run)
    assert (job / "lines.txt.out").read_text() == "bytes=8 lines=4 inflight=1 max_inflight=1\n"
    assert containers_left("serve-faults") == []


def test_unhealthy_and_dying_serving_containers_fail_their_mini_batch_clearly(
    serving_test_image: str, iris_example: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = iris_example / "model" / "iris-classifier"

    def deployment(name: str, env: dict, settings: dict | None = None) -> dict:
        return {
            "name": name,
            "model": model,
            "image": serving_test_image,
            "inputs": inputs(tmp_path / "in" / name, {"a.txt": b"fine\n", "b.txt": b"boom\n"}),
            "transform": {"SplitType": "Line", "ContentType": ECHO, "Environment": env},
            "settings": settings or {},
        }

    path = serve_endpoint(
        tmp_path,
        "serve-broken",
        [
            # FAULT_NEVER_HEALTHY listens from the server's first moment (answering 503), before it
            # loads the model; 20 s leave the server's Python start-up no race to lose on a loaded
            # machine (3 s once did: "connection refused" instead of 503).
            deployment("never-healthy", {"FAULT_NEVER_HEALTHY": "1"}, {"init_timeout": 20}),
            deployment("dies-at-start", {"FAULT_EXIT_AT_START": "1"}),
            deployment("dies-mid-job", {"FAULT_EXIT_MATCH": "boom"}),
        ],
    )
    dag_run, endpoint = run_dag(path, monkeypatch)
    assert dag_run.state == "failed"

    never = status_of(endpoint, "never-healthy", dag_run)
    assert (never.state, never.error.type) == ("failed", "ContainerNotHealthy")
    assert never.error.message.startswith(
        "the serving container did not answer GET /ping with 200 within 20 s (settings.init_timeout); last answer: HTTP 503"
    )
    at_start = status_of(endpoint, "dies-at-start", dag_run)
    assert (at_start.state, at_start.error.type) == ("failed", "ServingContainerDied")
    assert at_start.error.message.startswith(
        f"the serving container ({serving_test_image} serve) exited with code 1 before the mini-batch was done; "
        "its last log lines:\n"
    )
    mid = status_of(endpoint, "dies-mid-job", dag_run)
    assert (mid.state, mid.error.type) == ("failed", "ServingContainerDied")
    assert "exited with code 3" in mid.error.message
    for name in ("never-healthy", "dies-at-start", "dies-mid-job"):
        assert not list(run_folder(endpoint, name, dag_run).glob("*.out"))
    assert containers_left("serve-broken") == []


@pytest.mark.timeout(300)
def test_a_serving_container_gone_before_its_client_starts_fails_the_mini_batch_and_leaves_no_container(
    serving_test_image: str, iris_example: Path, tmp_path: Path, monkeypatch
) -> None:
    # per_mini_batch; made certain, not left to timing: the serving container has exited before
    # the client is created, so Docker refuses to start it in its network namespace.
    from batchscore.errors import ScoringError
    from batchscore.operators.score import ScoreOperator
    from batchscore.plan import mini_batch_refs, plan_run
    from batchscore.scoring import executor
    from batchscore.scoring.per_mini_batch import ContainerPerMiniBatch
    from tests.helpers import load

    class ServingGoneFirst(ContainerPerMiniBatch):
        def _run(self, attempt, contract, secrets, gpus, user, backstop):  # type: ignore[no-untyped-def]
            original = contract.one_shot

            def one_shot(*args, **kwargs):  # the client is built once its serving container has exited
                assert self.cli.wait(kwargs["server_id"])["StatusCode"] == 3
                return original(*args, **kwargs)

            contract.one_shot = one_shot
            return super()._run(attempt, contract, secrets, gpus, user, backstop)

    env = {"FAULT_EXIT_AT_START": "1", "FAULT_EXIT_CODE": "3"}
    path = serve_endpoint(tmp_path, "serve-gone-first", [{
        "name": "gone", "model": iris_example / "model" / "iris-classifier", "image": serving_test_image,
        "inputs": inputs(tmp_path / "in", {"a.txt": b"fine\n"}),
        "transform": {"SplitType": "Line", "ContentType": ECHO, "Environment": env},
        "settings": {"init_timeout": 600},
    }])  # fmt: skip
    d = load(path).deployments[0]
    monkeypatch.setattr(executor, "ContainerPerMiniBatch", ServingGoneFirst)
    op = ScoreOperator(
        task_id="score", endpoint_name="serve-gone-first", deployment=d.model_dump(mode="json"),
        mini_batch=mini_batch_refs(plan_run("serve-gone-first", d, "run-gone"))[0],
    )  # fmt: skip

    with pytest.raises(ScoringError) as raised:
        op.execute({"run_id": "run-gone"})

    message = (
        f"the serving container ({serving_test_image} serve) exited with code 3 before the mini-batch was done; "
        "its last log lines:\nFAULT_EXIT_AT_START: exiting with code 3 before serving"
    )
    assert str(raised.value) == f"mb-00000 failed: ServingContainerDied: {message}"
    status = run_layout(d, "run-gone").mini_batch_dir(0).read_status()
    assert (status.state, status.error.type, status.error.message) == ("failed", "ServingContainerDied", message)
    assert containers_left("serve-gone-first") == []  # neither the client nor the server


# --------------------------------------------------------------------------- symbolic links


def test_a_link_inside_is_sent_from_its_target_and_links_outside_are_failed_items(
    serving_test_image: str, iris_example: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = inputs(tmp_path / "in", {"a.csv": b"5.1,3.5,1.4,0.2\n", "store/b.csv": b"6.7,3.0,5.2,2.3\n"})
    (tmp_path / "secret.csv").write_bytes(b"5.9,3.0,5.1,1.8\n")
    (folder / "etc.csv").symlink_to("/etc/passwd")  # the serving client would read its own image's
    (folder / "latest.csv").symlink_to(folder / "store" / "b.csv")  # absolute, inside: sent from b.csv
    (folder / "up.csv").symlink_to("../secret.csv")  # relative, out through ..
    path = serve_endpoint(
        tmp_path,
        "serve-links",
        [
            {
                "name": "links",
                "model": iris_example / "model" / "iris-classifier",
                "image": serving_test_image,
                "inputs": folder,
                "pattern": "*.csv",
                "transform": {"SplitType": "Line", "ContentType": "text/csv", "AssembleWith": "Line"},
                "settings": {"worker_mode": "warm", "mini_batch_size": 2},  # a.csv etc.csv | latest.csv up.csv
            }
        ],
    )
    dag_run, endpoint = run_dag(path, monkeypatch)

    # Both mini-batches succeed; their refused links count against error_threshold (SageMaker's 0 here).
    tis = {(ti.task_id, ti.map_index): ti.state for ti in dag_run.get_task_instances()}
    assert [tis[("links.score", i)] for i in (0, 1)] == ["success", "success"]
    assert (tis[("links.merge", -1)], dag_run.state) == ("failed", "failed")
    run = run_folder(endpoint, "links", dag_run)
    assert Summary.read(run / "summary.json").items == ItemCounts(total=4, succeeded=2, failed=2)
    assert sorted(p.name for p in run.glob("*.out")) == ["a.csv.out", "latest.csv.out"]
    assert (run / "a.csv.out").read_text() == "setosa\n"
    assert (run / "latest.csv.out").read_text() == "virginica\n"  # b.csv's record, under the link's name
    advice = "batchscore scores only files inside input.path: copy the file in or point input.path at its folder"
    assert pd.read_csv(run / "errors.csv", keep_default_na=False).values.tolist() == [
        ["mb-00000", "etc.csv", "", "LinkRefused",
         f"input file etc.csv is a symbolic link to /etc/passwd, outside input.path ({folder}); {advice}"],
        ["mb-00001", "up.csv", "", "LinkRefused",
         f"input file up.csv is a symbolic link to {tmp_path / 'secret.csv'}, outside input.path ({folder}); {advice}"],
    ]  # fmt: skip
    assert [(s.files, s.rows, s.failed_items) for s in (status_of(endpoint, "links", dag_run, i) for i in (0, 1))] == [
        (2, 1, 1),
        (2, 1, 1),
    ]
    assert containers_left("serve-links") == []
