"""Inputs, model, run state and outputs on object storage: a real S3 server (SeaweedFS), real containers, real runs.

Each test makes its own bucket on the session's server and its own Airflow connection (``AIRFLOW_CONN_S3_TEST``,
an environment variable); the worker host's scratch folder (``BATCHSCORE_SCRATCH_DIR``) is the test's own.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from batchscore import storage
from batchscore.errors import DeploymentSpecError, PlanError, StorageAccessError, StorageConnectionError, StorageError
from batchscore.operators.merge import MergeOperator
from batchscore.operators.plan import PlanOperator
from batchscore.operators.score import ScoreOperator
from batchscore.plan import pattern_matcher
from batchscore.run_store import place
from batchscore.spec import load_endpoint
from batchscore.split import split_large_files
from batchscore.staging import local_path, stage_files
from batchscore.ui.folders import XCOM_KEY, reader
from batchscore.ui.report import build
from batchscore_runtime.formats import InputFile, MiniBatch, Summary, run_key
from batchscore_runtime.slices import sliced_inputs
from tests.helpers import S3_CONN, load, read_object, run_dag, s3_deployment, serve_endpoint, task_context, upload_tree

pytestmark = pytest.mark.s3
CONN = S3_CONN


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.docker
def test_a_job_reads_and_writes_s3_and_its_output_is_exact(airflow_db, iris_example: Path, tmp_path: Path, s3, monkeypatch):
    path = s3_deployment(tmp_path, iris_example, s3)
    dag_run, _ = run_dag(path, monkeypatch)
    assert dag_run.state == "success"

    run_uri = f"{s3['uri']}/output/iris/{run_key(dag_run.run_id)}"
    summary = Summary.from_json(json.loads(read_object(f"{run_uri}/summary.json")))
    assert summary.status == Summary.SUCCEEDED
    assert (summary.rows, summary.input.files, summary.mini_batches.succeeded) == (150, 15, 4)
    assert summary.output == f"{run_uri}/predictions.csv"
    assert summary.run_folder == run_uri
    assert summary.input.path == f"{s3['uri']}/data/iris/"

    predictions = pd.read_csv(io.BytesIO(read_object(f"{run_uri}/predictions.csv")))
    files = sorted((iris_example / "data").glob("*.csv"))
    inputs = pd.concat([pd.read_csv(f).assign(file=f.name) for f in files], ignore_index=True)
    assert predictions["id"].tolist() == inputs["id"].tolist()  # every row once, in input order
    assert predictions["file"].tolist() == inputs["file"].tolist()
    ledger = pd.read_csv(io.BytesIO(read_object(f"{run_uri}/processed_mini-batches.csv")))
    assert len(ledger) == 4

    # Nothing staged is left on the worker host; the model was fetched once, into the host's cache.
    scratch = tmp_path / "scratch"
    assert [p for p in scratch.glob("runs/*/*/_batchscore/input/*")] == []
    assert len(list(scratch.glob("models/*/*/.complete"))) == 1
    # No credential reached the run folder's records.
    _, secret = s3["server"].credentials()
    for name in ("summary.json", "processed_mini-batches.csv", "_batchscore/plan.json"):
        assert secret.encode() not in read_object(f"{run_uri}/{name}")


@pytest.mark.docker
def test_an_object_changed_after_the_plan_fails_that_item_alone_and_a_rerun_of_the_mini_batch_commits_once(
    iris_example: Path, tmp_path: Path, s3
):
    path = s3_deployment(tmp_path, iris_example, s3, settings={"mini_batch_size": 5})
    d = load(path).deployments[0].model_dump(mode="json")
    run_id = "manual__changed"
    plan_context = task_context(run_id)
    refs = PlanOperator(task_id="plan", endpoint_name="test-endpoint", deployment=d).execute(plan_context)
    assert [r["files"] for r in refs] == [5, 5, 5]
    # Where the UI's report reads the run: the run folder on the bucket, with its connection.
    assert plan_context["ti"].pushed == {XCOM_KEY: {"folder": f"{s3['uri']}/output/iris/{run_key(run_id)}", "connection": CONN}}

    changed = storage.location(f"{s3['uri']}/data/iris/iris-002.csv", CONN)
    storage.write_bytes(changed, b"id,sepal_length,sepal_width,petal_length,petal_width\n999,1,1,1,1\n")
    storage.delete(storage.location(f"{s3['uri']}/data/iris/iris-003.csv", CONN))

    def score(ref: dict[str, Any], try_number: int = 1) -> dict[str, Any]:
        op = ScoreOperator(task_id="score", endpoint_name="test-endpoint", deployment=d, mini_batch=ref)
        return op.execute(task_context(run_id, try_number))

    assert score(refs[0]) == {"mini_batch": "mb-00000", "rows": 30, "failed_items": 2}
    assert score(refs[1])["failed_items"] == 0
    assert score(refs[2])["failed_items"] == 0
    assert score(refs[0], try_number=2)["failed_items"] == 2  # a rerun of one mini-batch replaces its result

    merged = MergeOperator(task_id="merge", endpoint_name="test-endpoint", deployment=d).execute(task_context(run_id))
    run_uri = f"{s3['uri']}/output/iris/{run_key(run_id)}"
    assert merged["output"] == f"{run_uri}/predictions.csv"
    summary = Summary.from_json(json.loads(read_object(f"{run_uri}/summary.json")))
    assert (summary.rows, summary.items.failed, summary.mini_batches.succeeded) == (130, 2, 3)
    errors = pd.read_csv(io.BytesIO(read_object(f"{run_uri}/errors.csv")))
    assert errors["file"].tolist() == ["iris-002.csv", "iris-003.csv"]
    assert errors["error_type"].tolist() == ["ObjectChanged", "ObjectChanged"]
    assert "changed after it was planned" in errors["message"][0]
    assert "was deleted after it was planned" in errors["message"][1]
    ledger = pd.read_csv(io.BytesIO(read_object(f"{run_uri}/processed_mini-batches.csv")))
    assert ledger.set_index("mini_batch").loc["mb-00000", "attempts"] == 2  # counted once, the last try
    # Each try's whole output is kept in the run folder, beside the result it committed.
    assert b"mb-00000" in read_object(f"{run_uri}/_batchscore/results/mb-00000/output-try-2.log")

    # The UI's report of the run (batchscore.ui), read on the bucket where the plan task recorded the run folder.
    recorded = plan_context["ti"].pushed[XCOM_KEY]
    report = build("test-deployment", "test-deployment.score", reader(recorded["folder"], recorded["connection"]), [])
    progress = report.progress
    assert (report.phase, progress.mini_batches_succeeded, progress.items_failed, progress.rows) == ("merged", 3, 2, 130)
    assert [(f.mini_batch, f.file, f.whole) for f in report.failures] == [
        ("mb-00000", "iris-002.csv", False),
        ("mb-00000", "iris-003.csv", False),
    ]
    assert report.records == {
        "summary": "summary.json",
        "ledger": "processed_mini-batches.csv",
        "errors": "errors.csv",
        "output": "predictions.csv",
    }


# ------------------------------------------------------------------------------------------------ bad input


def test_a_missing_connection_is_named_with_the_uri_and_what_to_do(iris_example: Path, tmp_path: Path, s3):
    path = s3_deployment(tmp_path, iris_example, s3, input={"connection": "no_such_conn"})
    d = load(path).deployments[0].model_dump(mode="json")
    with pytest.raises(StorageConnectionError) as info:
        PlanOperator(task_id="plan", endpoint_name="test-endpoint", deployment=d).execute(task_context("r"))
    assert str(info.value).startswith(
        f"{s3['uri']}/data/iris/: the Airflow connection 'no_such_conn' does not exist; create it (UI: Admin > Connections;"
    )


def test_a_missing_prefix_or_bucket_says_which_key(iris_example: Path, tmp_path: Path, s3):
    path = s3_deployment(tmp_path, iris_example, s3, input={"path": f"{s3['uri']}/nothing-here/"})
    d = load(path).deployments[0].model_dump(mode="json")
    with pytest.raises(PlanError) as info:
        PlanOperator(task_id="plan", endpoint_name="test-endpoint", deployment=d).execute(task_context("r"))
    assert str(info.value) == (
        f"no input files match '*.csv' in {s3['uri']}/nothing-here (connection '{CONN}') "
        "(deployment 'test-deployment', keys input.path and input.pattern)"
    )
    path = s3_deployment(tmp_path, iris_example, s3, input={"path": "s3://no-such-bucket-here/in/"})
    d = load(path).deployments[0].model_dump(mode="json")
    with pytest.raises(PlanError, match=r"the bucket 'no-such-bucket-here' does not exist .*key input.path\)$"):
        PlanOperator(task_id="plan", endpoint_name="test-endpoint", deployment=d).execute(task_context("r"))


def test_a_read_only_connection_cannot_write_the_run_folder_and_says_so(iris_example: Path, tmp_path: Path, s3, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_S3_READER", s3["server"].connection_json(read_only=True))
    path = s3_deployment(tmp_path, iris_example, s3, output={"connection": "s3_reader"})
    d = load(path).deployments[0].model_dump(mode="json")
    with pytest.raises(StorageAccessError) as info:
        PlanOperator(task_id="plan", endpoint_name="test-endpoint", deployment=d).execute(task_context("r"))
    message = str(info.value)
    assert message.startswith(f"cannot write {s3['uri']}/output/iris/r/_batchscore/minibatches/mb-00000.json (connection ")
    assert "access denied" in message and "check the Airflow connection 's3_reader'" in message
    assert s3["server"].credentials(read_only=True)[1] not in message


def test_yaml_refuses_credentials_in_a_uri_and_a_connection_on_a_local_path(iris_example: Path, tmp_path: Path):
    def problem(**blocks: Any) -> str:
        doc = {
            "name": "d",
            "endpoint_name": "e",
            "model": {"path": str(iris_example / "model")},
            "code_configuration": {"code": str(iris_example / "code"), "scoring_script": "score.py"},
            "environment": {"image": "batchscore-scoring:latest"},
            "input": {"path": "s3://bucket/in/"},
            "output": {"path": str(tmp_path / "out")},
            **blocks,
        }
        path = tmp_path / "e.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        with pytest.raises(DeploymentSpecError) as info:
            load_endpoint(path)
        return str(info.value)

    message = problem(input={"path": "s3://AKIA:SECRET@bucket/in/"})
    assert message.endswith(
        "e.yaml:11: input.path: s3:// URI holds a credential; credentials never go in the YAML: put them in an "
        "Airflow connection and name it with `connection:`"
    )
    assert "SECRET" not in message
    assert problem(input={"path": str(tmp_path), "connection": "c"}).endswith(
        f"e.yaml:12: input.connection: connection 'c' is for a URI of object storage (s3://, gs://, abfs://), "
        f"but path is the local path {tmp_path}; remove connection or give a URI"
    )
    assert problem(input={"path": "ftp://host/in"}).endswith(
        "e.yaml:11: input.path: 'ftp://host/in': the scheme ftp:// is not supported; use s3://, gs://, abfs://, abfss://, "
        "file:// or a plain path"
    )
    assert "output.path s3://bucket/in is the input folder" in problem(output={"path": "s3://bucket/in"})
    doc_path = tmp_path / "ok.yaml"
    doc_path.write_text(yaml.safe_dump({
        "name": "d", "endpoint_name": "e", "model": {"path": str(iris_example / "model")},
        "code_configuration": {"code": str(iris_example / "code"), "scoring_script": "score.py"},
        "environment": {"image": "batchscore-scoring:latest"},
        "input": {"path": f"file://{tmp_path}"}, "output": {"path": str(tmp_path / "out")},
    }))  # fmt: skip
    assert load_endpoint(doc_path).deployments[0].input.path == tmp_path  # file:// is a local path


# ------------------------------------------------------------------------------------------------ staging


def test_the_pattern_matches_keys_as_the_local_walk_matches_paths():
    flat, deep, one = pattern_matcher("*.csv"), pattern_matcher("**/*.csv"), pattern_matcher("*/x.csv")
    assert [flat(n) for n in ("a.csv", "sub/a.csv", ".a.csv", "a.txt")] == [True, False, False, False]
    assert [deep(n) for n in ("a.csv", "sub/a.csv", "s/t/a.csv", "s/.h/a.csv")] == [True, True, True, False]
    assert [one(n) for n in ("a/x.csv", "x.csv", "a/b/x.csv")] == [True, False, False]


def test_parts_of_large_objects_are_staged_with_ranged_reads_and_read_as_local_parts(tmp_path: Path, s3):
    csv = "id,text\n" + "".join(f'{i},"line {i}\nwith a break"\n' for i in range(4000))
    table = pa.table({"id": list(range(40_000)), "v": [float(i) for i in range(40_000)]})
    local = tmp_path / "local"
    local.mkdir()
    (local / "big.csv").write_text(csv)
    pq.write_table(table, local / "big.parquet", row_group_size=5_000)
    upload_tree(local, f"{s3['uri']}/in")
    prefix = storage.location(f"{s3['uri']}/in", CONN)
    listed = {o.name: o for o in storage.list_objects(prefix)}
    planned = [InputFile(n, listed[n].size, 0, version=listed[n].version) for n in ("big.csv", "big.parquet")]

    def opener(f: InputFile):
        return (prefix / f.path).fs.open((prefix / f.path).path, "rb")

    remote_parts = split_large_files(planned, None, 30_000, opener=opener)
    local_parts = split_large_files([InputFile(f.path, f.size, 0) for f in planned], local, 30_000)
    assert [(p.path, p.part) for p in remote_parts] == [(p.path, p.part) for p in local_parts]
    assert len(remote_parts) > 4

    # The parts of one mini-batch: one of each file. Staged: sparse files with only their ranges.
    chosen = [next(p for p in remote_parts if p.path == "big.csv" and p.part.index == 1)]
    chosen.append(next(p for p in remote_parts if p.path == "big.parquet" and p.part.index == 2))
    staged = stage_files(prefix, chosen, tmp_path / "staged")
    assert staged == chosen
    for f in chosen:
        st = (tmp_path / "staged" / f.path).stat()
        assert st.st_size == f.part.file_size
        assert st.st_blocks * 512 < f.part.file_size  # sparse: the rest was never downloaded

    def read(root: Path) -> list[bytes]:
        parts = [InputFile(f.path, f.size, 0, part=f.part) for f in chosen]
        with sliced_inputs(MiniBatch(0, parts), [str(root / f.path) for f in parts], tmp_path / f"work-{root.name}") as paths:
            return [Path(p).read_bytes() for p in paths]

    staged_bytes, local_bytes = read(tmp_path / "staged"), read(local)
    assert staged_bytes[0] == local_bytes[0]
    assert pq.read_table(io.BytesIO(staged_bytes[1])).equals(pq.read_table(io.BytesIO(local_bytes[1])))


def test_a_placed_deployment_has_local_paths_and_its_run_folder_on_s3(iris_example: Path, tmp_path: Path, s3):
    path = s3_deployment(tmp_path, iris_example, s3)
    spec = load(path).deployments[0]
    placement = place(spec, "run-1", fetch=True)
    assert placement.spec.model.local.is_dir() and (placement.spec.model.local / "iris-classifier").is_dir()
    assert placement.spec.input.local.is_dir() and not placement.spec.output.remote
    assert placement.where() == f"{s3['uri']}/output/iris/run-1 (connection '{CONN}')"
    assert place(spec, "run-1", fetch=True).spec.model.local == placement.spec.model.local  # cached by version


@pytest.mark.docker
def test_a_transform_job_with_model_tar_gz_on_s3_and_warm_workers_uploads_its_out_files(
    airflow_db, serving_image: str, iris_example: Path, tmp_path: Path, s3, monkeypatch
):
    from tests.test_serving_contract import containers_left, expected_predictions

    example = yaml.safe_load(Path("dags/deployments/iris-transform.yaml").read_text())
    archive = iris_example / "model" / "iris-classifier.tar.gz"
    storage.upload(archive, storage.location(f"{s3['uri']}/models/iris/model.tar.gz", CONN))  # SageMaker's ModelDataUrl
    upload_tree(iris_example / "data-serve", f"{s3['uri']}/data/serve")
    path = serve_endpoint(
        tmp_path,
        "s3-transform",
        [
            {
                "name": "csv",
                "model": archive,
                "image": serving_image,
                "inputs": iris_example / "data-serve",
                "pattern": "*.csv",
                "transform": example["transform"],
                "settings": {
                    "mini_batch_size": 5,
                    "output_action": "append_row",
                    "output_file_name": "predictions.csv",
                    "worker_mode": "warm",
                },
            }
        ],
    )
    doc = yaml.safe_load(path.read_text())
    deployment = doc["deployments"][0]
    deployment["model"] = {"path": f"{s3['uri']}/models/iris/model.tar.gz", "connection": CONN}
    deployment["input"] = {"path": f"{s3['uri']}/data/serve", "pattern": "*.csv", "connection": CONN}
    deployment["output"] = {"path": f"{s3['uri']}/output/serve", "connection": CONN}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))

    dag_run, _ = run_dag(path, monkeypatch)
    assert dag_run.state == "success"
    run_uri = f"{s3['uri']}/output/serve/{run_key(dag_run.run_id)}"
    expected = expected_predictions(iris_example / "model" / "iris-classifier", iris_example / "data-serve")
    assert read_object(f"{run_uri}/predictions.csv").decode().splitlines() == expected
    outs = storage.list_objects(storage.location(run_uri, CONN))
    assert sorted(o.name for o in outs if o.name.endswith(".out") and "/" not in o.name) == [
        f"iris-{n:03d}.csv.out" for n in range(15)
    ]
    assert read_object(f"{run_uri}/iris-000.csv.out").decode().splitlines() == expected[:10]
    summary = Summary.from_json(json.loads(read_object(f"{run_uri}/summary.json")))
    assert (summary.status, summary.rows, summary.custom_outputs.files) == (Summary.SUCCEEDED, 150, 15)
    # The archive was fetched once into the host's cache; nothing is left running or staged.
    assert len(list((tmp_path / "scratch").glob("models/*/*/model.tar.gz"))) == 1
    assert [p for p in (tmp_path / "scratch").glob("runs/*/*/_batchscore/input/*")] == []
    assert containers_left("s3-transform") == []


class FlakyProxy:
    """A TCP proxy to the S3 server that resets the first ``drop`` connections it accepts (a network that fails
    mid-job), then forwards; ``drop=None``: resets every connection (a network that stays down)."""

    def __init__(self, port: int, drop: int | None):
        import socket
        import threading

        self.target, self.drop, self.dropped = port, drop, 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import socket
        import struct
        import threading

        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.drop is None or self.dropped < self.drop:
                self.dropped += 1
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()  # RST
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: Any, b: Any) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(2)
                except OSError:
                    pass

    def connection_json(self, server: Any, **extra: Any) -> str:
        conn = server.connection()
        conn["extra"] = {**conn["extra"], "endpoint_url": f"http://127.0.0.1:{self.port}", **extra}
        return json.dumps(conn)

    def close(self) -> None:
        self.server.close()


def test_a_network_that_fails_mid_staging_is_retried_and_one_that_stays_down_fails_clearly(tmp_path: Path, s3, monkeypatch):
    from urllib.parse import urlsplit

    local = tmp_path / "in"
    local.mkdir()
    for i in range(6):
        (local / f"f-{i}.csv").write_text(f"id\n{i}\n")
    upload_tree(local, f"{s3['uri']}/in")
    port = urlsplit(s3["server"].endpoint_url).port
    listed = storage.list_objects(storage.location(f"{s3['uri']}/in", CONN))
    planned = [InputFile(o.name, o.size, 0, version=o.version) for o in listed]

    flaky = FlakyProxy(port, drop=12)
    monkeypatch.setenv("AIRFLOW_CONN_S3_FLAKY", flaky.connection_json(s3["server"]))
    try:
        staged = stage_files(storage.location(f"{s3['uri']}/in", "s3_flaky"), planned, tmp_path / "staged", threads=2)
    finally:
        flaky.close()
    assert staged == planned and flaky.dropped == 12
    assert sorted(p.read_text() for p in (tmp_path / "staged").iterdir()) == [f"id\n{i}\n" for i in range(6)]

    down = FlakyProxy(port, drop=None)
    # botocore's own retries off (the connection's config_kwargs), so that the test waits for ours only.
    monkeypatch.setenv("AIRFLOW_CONN_S3_DOWN", down.connection_json(s3["server"], config_kwargs={"retries": {"max_attempts": 1}}))
    monkeypatch.setattr(storage, "RETRY_PAUSES", (0.1, 0.1))
    try:
        with pytest.raises(StorageError) as info:
            stage_files(storage.location(f"{s3['uri']}/in", "s3_down"), planned[:1], tmp_path / "down")
    finally:
        down.close()
    assert str(info.value).startswith(f"cannot download {s3['uri']}/in/f-0.csv (connection 's3_down'): ")
    assert str(info.value).endswith("; check the endpoint of the Airflow connection 's3_down' and the network, then retry")
    assert list((tmp_path / "down").iterdir()) == []  # no half file
    assert down.dropped >= 3  # tried again after each pause (s3fs may retry a connection of its own too)


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "a//b", "./a", ""])
def test_a_key_never_leads_out_of_the_folder_it_is_copied_to(tmp_path: Path, key: str):
    with pytest.raises(StorageError) as info:
        local_path(tmp_path, key, "run folder object")
    assert str(info.value) == f"run folder object {key!r} has a key that is not a plain relative path; rename the object"
    assert local_path(tmp_path, "a/b.csv") == tmp_path / "a" / "b.csv"
