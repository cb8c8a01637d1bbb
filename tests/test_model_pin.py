"""A run is scored by one model, the one pinned in its run folder when it starts (:mod:`batchscore.model_pin`).

A registry on a real S3 server (SeaweedFS), real containers, real runs: a version registered, or a model replaced,
while a run is in flight (or before one of its mini-batches is rerun) is for the next run.
"""

from __future__ import annotations

import io
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from airflow.sdk import ObjectStoragePath

from batchscore import storage
from batchscore.errors import ObjectChangedError, StorageNotFoundError
from batchscore.operators.merge import MergeOperator
from batchscore.operators.plan import PlanOperator
from batchscore.operators.score import ScoreOperator
from batchscore.run_store import place
from batchscore_runtime.formats import ModelInfo, Summary, run_key
from tests.helpers import S3_CONN, deployment_file, inputs, load, read_object, run_dag, task_context

#: Reports the version its model says it is (the model folder's ``version.txt``) in every row.
SCRIPT = """
import os
import pandas as pd

def init():
    global VERSION
    with open(os.path.join(os.environ["AZUREML_MODEL_DIR"], "version.txt")) as f:
        VERSION = f.read().strip()

def run(mini_batch):
    return pd.DataFrame({"file": [os.path.basename(p) for p in mini_batch], "model": VERSION})
"""
MODEL = "azureml:versioned@latest"
RUN = "manual__pinned"


def _deployment(tmp_path: Path, output: str | None = None, **settings: Any) -> Path:
    """Four input files in two mini-batches, scored by :data:`SCRIPT` with the registry's :data:`MODEL`."""
    (tmp_path / "code").mkdir(exist_ok=True)
    (tmp_path / "code" / "score.py").write_text(SCRIPT)
    files = inputs(tmp_path / "inputs", {f"in-{i}.csv": b"x\n1\n" for i in range(4)})
    (tmp_path / "placeholder").mkdir(exist_ok=True)
    path = deployment_file(
        tmp_path / "deployments",
        model=tmp_path / "placeholder",
        code=tmp_path / "code",
        inputs=files,
        settings={"mini_batch_size": 2, **settings},
    )
    doc = yaml.safe_load(path.read_text())
    doc["model"] = MODEL
    if output is not None:
        doc["output"] = {"path": output, "connection": S3_CONN}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _register(s3: dict[str, Any], version: str, text: str | None = None) -> ObjectStoragePath:
    """Register (or replace) ``version`` of the model on the bucket's registry; returns its ``version.txt``."""
    obj = storage.location(f"{s3['uri']}/registry/versioned/{version}/version.txt", S3_CONN)
    storage.write_bytes(obj, (text or f"v{version}\n").encode())
    return obj


@pytest.fixture()
def s3_registry(s3: dict[str, Any], monkeypatch) -> dict[str, Any]:
    monkeypatch.setenv("BATCHSCORE_MODEL_REGISTRY", f"s3://{S3_CONN}@{s3['bucket']}/registry")
    _register(s3, "1")
    return s3


def _score(d: dict[str, Any], ref: dict[str, Any], run_id: str = RUN, try_number: int = 1) -> dict[str, Any]:
    op = ScoreOperator(task_id="score", endpoint_name="test-endpoint", deployment=d, mini_batch=ref)
    return op.execute(task_context(run_id, try_number))


def _plan(d: dict[str, Any], run_id: str = RUN) -> list[dict[str, Any]]:
    return PlanOperator(task_id="plan", endpoint_name="test-endpoint", deployment=d).execute(task_context(run_id))


@pytest.mark.s3
@pytest.mark.docker
def test_a_run_scores_with_the_version_pinned_when_it_started_and_a_new_run_with_the_new_one(
    airflow_db, scoring_image: str, tmp_path: Path, s3_registry: dict[str, Any], monkeypatch
) -> None:
    s3 = s3_registry
    path = _deployment(tmp_path, output=f"{s3['uri']}/output")
    d = load(path).deployments[0].model_dump(mode="json")
    refs = _plan(d)
    _register(s3, "2")  # while the run is in flight

    for ref in refs:
        assert _score(d, ref)["rows"] == 2
    assert _score(d, refs[0], try_number=2)["rows"] == 2  # a rerun of one mini-batch, after version 2 came
    MergeOperator(task_id="merge", endpoint_name="test-endpoint", deployment=d).execute(task_context(RUN))

    run_uri = f"{s3['uri']}/output/{run_key(RUN)}"
    predictions = pd.read_csv(io.BytesIO(read_object(f"{run_uri}/predictions.csv")))
    assert predictions["model"].tolist() == ["v1"] * 4
    summary = Summary.from_json(json.loads(read_object(f"{run_uri}/summary.json")))
    assert summary.model == ModelInfo(location=f"{s3['uri']}/registry/versioned/1", reference=MODEL, version="1")

    # A new run takes version 2, its warm workers started beside its plan included.
    doc = yaml.safe_load(path.read_text())
    doc["settings"] = {**doc["settings"], "worker_mode": "warm"}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    dag_run, _ = run_dag(path, monkeypatch)
    assert dag_run.state == "success"
    new_uri = f"{s3['uri']}/output/{run_key(dag_run.run_id)}"
    predictions = pd.read_csv(io.BytesIO(read_object(f"{new_uri}/predictions.csv")))
    assert predictions["model"].tolist() == ["v2"] * 4
    summary = Summary.from_json(json.loads(read_object(f"{new_uri}/summary.json")))
    assert summary.model == ModelInfo(location=f"{s3['uri']}/registry/versioned/2", reference=MODEL, version="2")


@pytest.mark.s3
def test_a_pinned_model_replaced_or_deleted_on_s3_fails_the_score_task_saying_to_trigger_a_new_run(
    tmp_path: Path, s3_registry: dict[str, Any]
) -> None:
    s3 = s3_registry
    d = load(_deployment(tmp_path, output=f"{s3['uri']}/output")).deployments[0].model_dump(mode="json")
    refs = _plan(d)
    obj = storage.location(f"{s3['uri']}/registry/versioned/1/version.txt", S3_CONN)
    pinned = storage.object_info(obj).version
    _register(s3, "1", "v1, retrained\n")  # replaced in place
    now = storage.object_info(obj).version

    with pytest.raises(ObjectChangedError) as info:
        _score(d, refs[0])
    where = f"{s3['uri']}/registry/versioned/1/version.txt (connection '{S3_CONN}')"
    assert str(info.value) == (
        f"deployment 'test-deployment', key model.path: the model object {where} changed after this run pinned it "
        f"(version {pinned}, now {now}); a run scores all its mini-batches with the model pinned when it started: "
        "trigger a new run to score with the new model"
    )
    storage.delete(obj)
    with pytest.raises(ObjectChangedError) as info:
        _score(d, refs[1])
    assert str(info.value) == (
        f"deployment 'test-deployment', key model.path: the model object {where} was deleted after this run pinned "
        "it; a run scores all its mini-batches with the model pinned when it started: trigger a new run to score "
        "with the model as it is now"
    )


@pytest.mark.s3
def test_whichever_task_of_a_run_needs_the_model_first_pins_it_and_the_others_read_that_pin(
    tmp_path: Path, s3_registry: dict[str, Any]
) -> None:
    s3 = s3_registry
    spec = load(_deployment(tmp_path, output=f"{s3['uri']}/output")).deployments[0]
    first = place(spec, RUN).pin_model()  # warm workers starting before the plan is written
    _register(s3, "2")
    assert place(spec, RUN).pin_model() == first  # the plan task, after
    assert (first.model_version, [o.name for o in first.objects]) == ("1", ["version.txt"])
    assert place(spec, "manual__next").pin_model().model_version == "2"


@pytest.mark.parametrize("on", ["disk", pytest.param("s3", marks=pytest.mark.s3)])
def test_of_writers_racing_to_create_one_object_exactly_one_does_and_its_content_stays(
    tmp_path: Path, request: pytest.FixtureRequest, on: str
) -> None:
    if on == "s3":
        s3 = request.getfixturevalue("s3")
        target = storage.location(f"{s3['uri']}/run/model.json", S3_CONN)
    else:
        target = storage.location(tmp_path / "run" / "model.json")
    with ThreadPoolExecutor(max_workers=8) as pool:
        made = list(pool.map(lambda i: storage.create(target, f"writer {i}".encode()), range(8)))
    assert made.count(True) == 1
    assert storage.read_bytes(target) == f"writer {made.index(True)}".encode()
    assert storage.create(target, b"late") is False
    if on == "disk":
        assert [p.name for p in target.parent.iterdir()] == ["model.json"]  # no temporary file left


def test_a_local_registrys_latest_stays_pinned_for_the_run_though_the_yaml_now_resolves_a_newer_version(
    tmp_path: Path, monkeypatch
) -> None:
    reg = tmp_path / "registry"
    inputs(reg / "versioned" / "1", {"version.txt": b"v1\n"})
    monkeypatch.setenv("BATCHSCORE_MODEL_REGISTRY", str(reg))
    path = _deployment(tmp_path)
    _plan(load(path).deployments[0].model_dump(mode="json"))
    inputs(reg / "versioned" / "2", {"version.txt": b"v2\n"})

    now = load(path).deployments[0]  # the DAG parsed again: the YAML's @latest is version 2 now
    assert now.model.path == reg / "versioned" / "2"
    assert place(now, RUN, fetch=True).spec.model.path == reg / "versioned" / "1"  # a score task of the run
    assert place(now, "manual__next", fetch=True).spec.model.path == reg / "versioned" / "2"
    shutil.rmtree(reg / "versioned" / "1")
    with pytest.raises(StorageNotFoundError) as info:
        place(now, RUN, fetch=True)
    assert str(info.value) == (
        f"deployment 'test-deployment', key model.path: the model {reg / 'versioned' / '1'} this run was pinned to is "
        "gone; a run scores all its mini-batches with the model pinned when it started: trigger a new run to score "
        "with the model that model.path names now"
    )
