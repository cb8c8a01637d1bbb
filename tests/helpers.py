"""Builders shared by the tests: deployment YAML files, scoring scripts and input files on disk."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import yaml

from batchscore.spec import EndpointSpec, load_endpoint

#: The Airflow connection id the ``s3`` fixture (tests/conftest.py) sets up for the test's bucket.
S3_CONN = "s3_test"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def deployment_file(
    folder: Path,
    *,
    model: Path,
    code: Path,
    inputs: Path,
    output: Path | None = None,
    script: str = "score.py",
    endpoint: str = "test-endpoint",
    name: str = "test-deployment",
    image: str = "batchscore-scoring:latest",
    settings: dict | None = None,
    resources: dict | None = None,
    pattern: str = "*.csv",
) -> Path:
    """An Azure-layout deployment YAML with absolute paths; returns its path.

    ``worker_mode`` is ``per_mini_batch`` unless ``settings`` say otherwise: most tests are of
    one container per mini-batch; warm workers (the default of real YAMLs) have tests of their own.
    """
    doc = {
        "name": name,
        "endpoint_name": endpoint,
        "model": {"path": str(model)},
        "code_configuration": {"code": str(code), "scoring_script": script},
        "environment": {"image": image},
        "input": {"path": str(inputs), "pattern": pattern},
        "output": {"path": str(output or folder / "output")},
        "settings": {"retry_settings": {"max_retries": 0}, "worker_mode": "per_mini_batch", **(settings or {})},
    }
    if resources:
        doc["resources"] = resources
    path = folder / f"{endpoint}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def script_deployment(
    tmp_path: Path, script: str, *, model: Path, inputs: Path, settings: dict | None = None, **more: Any
) -> Path:
    """``script`` as the scoring script ``tmp_path/code/score.py``, in a deployment YAML under
    ``tmp_path/deployments`` (:func:`deployment_file`: ``more`` are its other keywords); returns its path."""
    write(tmp_path / "code" / "score.py", script)
    return deployment_file(
        tmp_path / "deployments", model=model, code=tmp_path / "code", inputs=inputs, settings=settings, **more
    )


def warm_iris_deployment(tmp_path: Path, iris_example: Path, script: str, settings: dict, **resources: Any) -> Path:
    """A ``worker_mode: warm`` deployment of ``script`` on the iris example's model and input files
    (:func:`script_deployment`), with ``settings`` and ``resources`` (``instance_count=2``); returns its path."""
    return script_deployment(
        tmp_path,
        script,
        model=iris_example / "model",
        inputs=iris_example / "data",
        settings={"worker_mode": "warm", **settings},
        resources=resources,
    )


def load(path: Path) -> EndpointSpec:
    return load_endpoint(path)


def run_dag(yaml_path: Path, monkeypatch, run_conf: dict | None = None):
    """Run the YAML's DAG with ``dag.test()``; return the DAG run and the endpoint.

    ``dag.test()`` serializes the DAG through Airflow's parse of the DAGs folder, so the
    repository's DAG file is pointed at the YAML's folder. Interrupted (or timed out), it
    removes the run's containers: those of the endpoint that mount one of its output folders.
    """
    from batchscore.factory import build_dag

    monkeypatch.setenv("BATCHSCORE_DEPLOYMENTS_DIR", str(yaml_path.parent))
    endpoint = load(yaml_path)
    try:
        return build_dag(endpoint).test(run_conf=run_conf), endpoint
    except BaseException:  # Ctrl-C, a signal, pytest-timeout: the run's containers would run on
        from batchscore import shutdown

        outputs = [d.output.path for d in endpoint.deployments if d.output is not None]
        shutdown.remove_containers(shutdown.containers_mounting(outputs, label=f"batchscore.endpoint={endpoint.endpoint_name}"))
        raise


def planned_score_operator(endpoint: EndpointSpec, run_id: str):
    """The score operator of the first mini-batch of a freshly planned run of ``endpoint``."""
    from batchscore.operators.score import ScoreOperator
    from batchscore.plan import mini_batch_refs, plan_run

    d = endpoint.deployments[0]
    plan = plan_run(endpoint.endpoint_name, d, run_id)
    return ScoreOperator(
        task_id="score",
        endpoint_name=endpoint.endpoint_name,
        deployment=d.model_dump(mode="json"),
        mini_batch=mini_batch_refs(plan)[0],
    )


def serve_endpoint(folder: Path, endpoint: str, deployments: list[dict[str, Any]]) -> Path:
    """An endpoint YAML whose deployments are serving containers (absolute paths); ``per_mini_batch`` unless set."""
    docs = []
    for d in deployments:
        doc = {
            "name": d["name"],
            "contract": "serve",
            "model": {"path": str(d["model"])},
            "environment": {"image": d["image"]},
            "input": {"path": str(d["inputs"]), "pattern": d.get("pattern", "*")},
            "output": {"path": str(folder / "output" / d["name"])},
            "transform": d.get("transform", {}),
            "settings": {"retry_settings": {"max_retries": 0}, "worker_mode": "per_mini_batch", **d.get("settings", {})},
        }
        docs.append(doc)
    path = folder / f"{endpoint}.yaml"
    path.write_text(yaml.safe_dump({"endpoint_name": endpoint, "deployments": docs}, sort_keys=False))
    return path


def inputs(folder: Path, files: dict[str, bytes]) -> Path:
    """Input files with the given contents in ``folder``; returns the folder."""
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def upload_tree(folder: Path, uri: str) -> None:
    """Upload every file under ``folder`` to ``uri`` through the ``s3`` fixture's connection."""
    from batchscore import storage  # imports Airflow: not before conftest has set AIRFLOW_HOME

    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        storage.upload(path, storage.location(f"{uri}/{path.relative_to(folder).as_posix()}", S3_CONN))


def read_object(uri: str) -> bytes:
    """The object at ``uri``, read through the ``s3`` fixture's connection."""
    from batchscore import storage  # imports Airflow: not before conftest has set AIRFLOW_HOME

    return storage.read_bytes(storage.location(uri, S3_CONN))


def assert_busy_sane(summary: Any, scored: int) -> None:
    """A warm run's summary: each worker's busy seconds within its own span, ``scored`` mini-batches, a fraction in (0, 1]."""
    from datetime import datetime

    assert sum(len(w.mini_batches) for w in summary.warm_workers) == scored
    for w in summary.warm_workers:
        assert (w.busy_seconds > 0) == bool(w.mini_batches), w
        if w.mini_batches:
            span = (datetime.fromisoformat(w.last_ended_at) - datetime.fromisoformat(w.first_started_at)).total_seconds()
            assert 0 < w.busy_seconds <= span + 0.01, w  # busy only between its first start and its last end
    assert summary.busy_fraction is not None and 0 < summary.busy_fraction <= 1, summary.busy_fraction


def s3_deployment(tmp_path: Path, iris_example: Path, s3: dict[str, Any], **blocks: Any) -> Path:
    """The iris deployment with model, input and output on the test's bucket (``blocks`` override keys)."""
    upload_tree(iris_example / "model", f"{s3['uri']}/models/iris")
    upload_tree(iris_example / "data", f"{s3['uri']}/data/iris")
    path = deployment_file(
        tmp_path / "deployments",
        model=iris_example / "model",
        code=iris_example / "code",
        inputs=iris_example / "data",
        settings={"mini_batch_size": 4},
    )
    doc = yaml.safe_load(path.read_text())
    doc["model"] = {"path": f"{s3['uri']}/models/iris/", "connection": S3_CONN}
    doc["input"] = {"path": f"{s3['uri']}/data/iris/", "pattern": "*.csv", "connection": S3_CONN}
    doc["output"] = {"path": f"{s3['uri']}/output/iris/", "connection": S3_CONN}
    for key, value in blocks.items():
        doc[key] = {**doc.get(key, {}), **value}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def task_context(run_id: str, try_number: int = 1, **more: Any) -> dict[str, Any]:
    """What an operator's ``execute`` reads of Airflow's context, for a task run outside a DAG run.

    ``ti.pushed`` holds the XComs the task pushed besides its return value (the plan task's run folder).
    """
    from types import SimpleNamespace

    pushed: dict[str, Any] = {}
    ti = SimpleNamespace(try_number=try_number, pushed=pushed, xcom_push=lambda key, value: pushed.__setitem__(key, value))
    return {"run_id": run_id, "params": {}, "ti": ti, **more}
