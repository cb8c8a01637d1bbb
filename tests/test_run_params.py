"""The trigger form's params: on the DAG, applied to a run's deployment, checked by Airflow, kept for reruns.

Real Airflow throughout: DAGs parsed by a DagBag, runs with ``dag.test()``, and a real scheduler
(``LocalAirflow``, one stack for the module) for trigger-time validation and reruns; its endpoint
is scheduled on two upstream assets, so asset events starting a run are checked here too (the
YAML's schedule itself: ``test_schedule.py``).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pandas as pd
import pytest
from airflow.dag_processing.dagbag import DagBag
from airflow.sdk import Asset

from batchscore.errors import RunParamError
from batchscore.localairflow import LocalAirflow, LocalAirflowError
from batchscore.run_params import LOCATION_PATTERN, RUN_PARAMS, apply_run_params
from batchscore.schedule import output_asset
from batchscore_runtime.formats import Summary, run_key
from tests.helpers import deployment_file, load, run_dag, write

REPO = Path(__file__).resolve().parent.parent
LOADER = REPO / "dags" / "batchscore_deployments.py"

# --------------------------------------------------------------------------- params on the DAG


def two_deployments(folder: Path, iris: Path) -> Path:
    common = (
        f"    model: {{path: {iris / 'model'}}}\n"
        f"    code_configuration: {{code: {iris / 'code'}, scoring_script: score.py}}\n"
        "    environment: {image: batchscore-scoring:latest}\n"
        f"    input: {{path: {iris / 'data'}, pattern: '*.csv'}}\n"
    )
    return write(
        folder / "pair.yaml",
        "endpoint_name: pair\nschedule: '@daily'\ndeployments:\n"
        f"  - name: left\n{common}    output: {{path: {folder / 'out-left'}}}\n    settings: {{mini_batch_size: 3}}\n"
        f"  - name: right\n{common}    output: {{path: {folder / 'out-right'}}}\n",
    )


def parse(folder: Path, monkeypatch: pytest.MonkeyPatch) -> DagBag:
    monkeypatch.setenv("BATCHSCORE_DEPLOYMENTS_DIR", str(folder))
    bag = DagBag(dag_folder=str(LOADER), safe_mode=False)
    assert bag.import_errors == {}
    return bag


def test_the_dag_has_the_trigger_forms_params_null_by_default(iris_example: Path, tmp_path: Path, monkeypatch) -> None:
    deployment_file(
        tmp_path,
        model=iris_example / "model",
        code=iris_example / "code",
        inputs=iris_example / "data",
        output=tmp_path / "out",
        settings={"mini_batch_size": 4},
    )
    dag = parse(tmp_path, monkeypatch).dags["test-endpoint"]

    assert list(dag.params) == list(RUN_PARAMS)
    assert dict(dag.params) == {"input_path": None, "output_path": None, "mini_batch_size": None}
    schemas = {name: dag.params.get_param(name).schema for name in RUN_PARAMS}
    assert schemas == {
        "input_path": {"type": ["null", "string"], "minLength": 1, "pattern": LOCATION_PATTERN, "title": "Input folder"},
        "output_path": {"type": ["null", "string"], "minLength": 1, "pattern": LOCATION_PATTERN, "title": "Output folder"},
        "mini_batch_size": {"type": ["null", "integer"], "minimum": 1, "title": "Files per mini-batch"},
    }
    descriptions = {name: dag.params.get_param(name).description for name in RUN_PARAMS}
    assert descriptions == {
        "input_path": "Absolute path of a folder of input files, or a URI (s3://bucket/prefix/), read with the YAML's "
        "input.pattern; a URI uses the YAML's input.connection, or the one it names (s3://conn_id@bucket/...). "
        f"Empty: the YAML's input.path ({iris_example / 'data'}).",
        "output_path": "Absolute path or URI (s3://bucket/prefix/); this run writes to <output folder>/<run id>/. "
        f"Empty: the YAML's output.path ({tmp_path / 'out'}).",
        "mini_batch_size": "A whole number, 1 or more. Empty: the YAML's settings.mini_batch_size (4).",
    }
    # Airflow's own check, as at trigger time.
    dag.params.validate()
    merge = dag.get_task("test-deployment.merge")
    assert merge.outlets == [Asset(name="batchscore/test-endpoint/test-deployment")]
    assert merge.outlets == [output_asset("test-endpoint", "test-deployment")]


def test_with_several_deployments_output_path_gets_a_folder_per_deployment(
    iris_example: Path, tmp_path: Path, monkeypatch
) -> None:
    two_deployments(tmp_path, iris_example)
    dag = parse(tmp_path, monkeypatch).dags["pair"]
    assert dag.params.get_param("output_path").description == (
        "Absolute path or URI; each deployment writes this run to <output folder>/<deployment name>/<run id>/. "
        f"Empty: the YAML's output.path (left: {tmp_path / 'out-left'}; right: {tmp_path / 'out-right'})."
    )
    assert dag.params.get_param("mini_batch_size").description == (
        "A whole number, 1 or more. Empty: the YAML's settings.mini_batch_size (left: 3; right: 10). "
        "It applies to every deployment."
    )

    params = {"input_path": str(tmp_path), "output_path": str(tmp_path / "elsewhere"), "mini_batch_size": 2}
    for name in ("left", "right"):
        for task in ("plan", "merge"):  # the operators' own run_spec, with the run's context
            spec = dag.get_task(f"{name}.{task}").run_spec({"params": params, "dag": dag})
            assert spec.output.path == tmp_path / "elsewhere" / name
            assert spec.input.path == tmp_path
            assert spec.settings.mini_batch_size == 2
            assert spec.input.pattern == "*.csv"  # what no param sets stays the YAML's


def spec_of(tmp_path: Path, iris_example: Path):
    path = deployment_file(
        tmp_path / "yaml", model=iris_example / "model", code=iris_example / "code", inputs=iris_example / "data"
    )
    return load(path).deployments[0]


def test_without_params_a_run_sees_exactly_the_yaml(iris_example: Path, tmp_path: Path) -> None:
    spec = spec_of(tmp_path, iris_example)
    defaults = dict.fromkeys(RUN_PARAMS)
    assert apply_run_params(spec, defaults, several_deployments=False) is spec
    assert apply_run_params(spec, {}, several_deployments=True) is spec


def test_params_override_input_output_and_mini_batch_size(iris_example: Path, tmp_path: Path) -> None:
    spec = spec_of(tmp_path, iris_example)
    (tmp_path / "in").mkdir()
    params = {"input_path": f"{tmp_path}/x/../in", "output_path": str(tmp_path / "new-out"), "mini_batch_size": 7}

    applied = apply_run_params(spec, params, several_deployments=False)

    assert applied.input.path == tmp_path / "in"  # resolved
    assert applied.output.path == tmp_path / "new-out"  # need not exist yet
    assert applied.settings.mini_batch_size == 7
    assert applied.model_dump(exclude={"input", "output", "settings"}) == spec.model_dump(exclude={"input", "output", "settings"})
    assert applied.settings.model_dump(exclude={"mini_batch_size"}) == spec.settings.model_dump(exclude={"mini_batch_size"})


def test_params_may_be_uris_of_object_storage_and_keep_the_yamls_connection(iris_example: Path, tmp_path: Path) -> None:
    spec = spec_of(tmp_path, iris_example)
    on_s3 = spec.model_copy(update={"output": spec.output.model_copy(update={"path": "s3://bucket/out", "connection": "c"})})
    applied = apply_run_params(
        on_s3, {"input_path": "s3://bucket/in/", "output_path": "s3://bucket/other"}, several_deployments=False
    )
    assert (applied.input.path, applied.input.connection) == ("s3://bucket/in/", None)
    assert (applied.output.path, applied.output.connection) == ("s3://bucket/other", "c")  # the YAML's connection
    local = apply_run_params(on_s3, {"output_path": str(tmp_path / "o")}, several_deployments=False)
    assert (local.output.path, local.output.connection) == (tmp_path / "o", None)  # a local path takes none
    several = apply_run_params(spec, {"output_path": "s3://bucket/all/"}, several_deployments=True)
    assert several.output.path == f"s3://bucket/all/{spec.name}"
    with pytest.raises(RunParamError, match="the output folder s3://bucket/in/ is the input folder"):
        apply_run_params(spec, {"input_path": "s3://bucket/in", "output_path": "s3://bucket/in/"}, several_deployments=False)
    with pytest.raises(RunParamError, match=r"run parameter input_path: 'ftp://x/y' has a scheme batchscore does not read"):
        apply_run_params(spec, {"input_path": "ftp://x/y"}, several_deployments=False)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"input_path": "{tmp}/nope"}, "run parameter input_path: folder '{tmp}/nope' does not exist"),
        ({"input_path": "{tmp}/a-file"}, "run parameter input_path: '{tmp}/a-file' is not a folder"),
        ({"input_path": "data/in"}, "run parameter input_path must be an absolute path or a URI, got 'data/in'"),
        ({"input_path": ""}, "run parameter input_path must be an absolute path or a URI, got ''"),
        ({"input_path": 5}, "run parameter input_path must be a string (an absolute path or a URI), got 5"),
        ({"output_path": "out"}, "run parameter output_path must be an absolute path or a URI, got 'out'"),
        ({"output_path": "{tmp}/a-file"}, "run parameter output_path: '{tmp}/a-file' exists and is not a folder"),
        ({"mini_batch_size": 0}, "run parameter mini_batch_size must be a whole number, 1 or more, got 0"),
        ({"mini_batch_size": "4"}, "run parameter mini_batch_size must be a whole number, 1 or more, got '4'"),
        ({"mini_batch_size": True}, "run parameter mini_batch_size must be a whole number, 1 or more, got True"),
        ({"mini_batch_size": 2.5}, "run parameter mini_batch_size must be a whole number, 1 or more, got 2.5"),
        (
            {"mini_batch_sise": 2},
            "unknown run parameter 'mini_batch_sise' (did you mean 'mini_batch_size'?); "
            "batchscore's run parameters are input_path, output_path, mini_batch_size",
        ),
        (
            {"note": "x", "inputpath": "/"},
            "unknown run parameters 'inputpath' (did you mean 'input_path'?), 'note'; "
            "batchscore's run parameters are input_path, output_path, mini_batch_size",
        ),
    ],
)
def test_a_bad_param_is_refused_naming_it_and_its_value(iris_example: Path, tmp_path: Path, params: dict, message: str) -> None:
    spec = spec_of(tmp_path, iris_example)
    (tmp_path / "a-file").write_text("x")
    params = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in params.items()}
    with pytest.raises(RunParamError) as info:
        apply_run_params(spec, params, several_deployments=False)
    assert str(info.value) == message.format(tmp=tmp_path)


def test_an_output_folder_that_is_or_holds_the_input_folder_is_refused_when_the_run_starts(
    iris_example: Path, tmp_path: Path
) -> None:
    spec = spec_of(tmp_path, iris_example)  # input: the example's data; output: <tmp>/yaml/output
    (tmp_path / "yaml" / "output" / "incoming").mkdir(parents=True)
    (tmp_path / "in").mkdir()
    advice = (
        "the plan never reads files inside the output folder, so no input file would be left; "
        "write the output to another folder (a subfolder of the input folder is fine)"
    )
    data = iris_example / "data"
    refused = [
        (
            {"output_path": f"{data}/"},
            f"run parameter output_path: the output folder {data} is the input folder (deployment 'test-deployment')",
        ),
        (
            {"input_path": str(tmp_path / "yaml" / "output" / "incoming")},
            f"run parameter input_path: the output folder {tmp_path / 'yaml' / 'output'} holds the input folder "
            f"{tmp_path / 'yaml' / 'output' / 'incoming'} (deployment 'test-deployment')",
        ),
        (
            {"input_path": str(tmp_path / "in"), "output_path": str(tmp_path)},
            f"run parameters input_path and output_path: the output folder {tmp_path} holds the input folder "
            f"{tmp_path / 'in'} (deployment 'test-deployment')",
        ),
    ]
    for params, message in refused:
        with pytest.raises(RunParamError) as info:
            apply_run_params(spec, params, several_deployments=False)
        assert str(info.value) == f"{message}; {advice}"

    inside = {"input_path": str(tmp_path / "in"), "output_path": str(tmp_path / "in" / "scored")}
    assert apply_run_params(spec, inside, several_deployments=False).output.path == tmp_path / "in" / "scored"


# --------------------------------------------------------------------------- real runs: dag.test()


def raised_in(output: str, module: str) -> list[str]:
    """The exceptions (last traceback lines) that dag.test() printed from ``module``'s execute()."""
    found, block = [], None
    for line in output.splitlines():
        if line.startswith("Traceback (most recent call last):"):
            block = []
        elif block is not None and line.startswith(" "):
            block.append(line)
        elif block is not None:
            if any(f'/{module}", line ' in frame and frame.endswith(", in execute") for frame in block):
                found.append(line)
            block = None
    return found


@pytest.mark.docker
def test_a_run_with_params_scores_another_folder_into_another_output(
    airflow_db, iris_example: Path, iris_inputs: Path, tmp_path: Path, monkeypatch
) -> None:
    for extra in sorted(iris_inputs.glob("*.csv"))[5:]:
        extra.unlink()  # the other input folder: 5 files, where the YAML's has 15
    path = deployment_file(
        tmp_path / "deployments",
        model=iris_example / "model",
        code=iris_example / "code",
        inputs=iris_example / "data",
        output=tmp_path / "yaml-out",
        settings={"mini_batch_size": 4},
    )
    conf = {"input_path": str(iris_inputs), "output_path": str(tmp_path / "other-out"), "mini_batch_size": 2}

    dag_run, endpoint = run_dag(path, monkeypatch, run_conf=conf)
    yaml_deployment = endpoint.deployments[0]

    assert dag_run.state == "success"
    assert dag_run.conf == conf
    run_dir = tmp_path / "other-out" / run_key(dag_run.run_id)
    plan = json.loads((run_dir / "_batchscore" / "plan.json").read_text())
    assert plan["input_path"] == str(iris_inputs)
    assert plan["mini_batch_size"] == 2
    assert [e["files"] for e in plan["mini_batches"]] == [2, 2, 1]
    tis = {(ti.task_id, ti.map_index): ti for ti in dag_run.get_task_instances()}
    assert sorted(i for (t, i) in tis if t == "test-deployment.score") == [0, 1, 2]
    assert tis[("test-deployment.score", 2)].rendered_map_index == "mb-00002 (1 file)"

    predictions = pd.read_csv(run_dir / "predictions.csv")
    assert predictions["file"].tolist() == [f"iris-{i:03d}.csv" for i in range(5) for _ in range(10)]
    summary = Summary.read(run_dir / "summary.json")
    assert summary.status == Summary.SUCCEEDED and summary.rows == 50
    assert summary.input.path == str(iris_inputs)
    assert not yaml_deployment.output.path.exists()  # nothing went where the YAML says


@pytest.mark.docker
def test_a_missing_input_folder_fails_the_plan_naming_the_param(
    airflow_db, iris_example: Path, tmp_path: Path, monkeypatch, capfd
) -> None:
    path = deployment_file(
        tmp_path / "deployments", model=iris_example / "model", code=iris_example / "code", inputs=iris_example / "data"
    )
    missing = tmp_path / "no-such-folder"

    dag_run, _ = run_dag(path, monkeypatch, run_conf={"input_path": str(missing)})

    assert dag_run.state == "failed"
    states = {ti.task_id: ti.state for ti in dag_run.get_task_instances()}
    assert states["test-deployment.plan"] == "failed"
    assert states["test-deployment.score"] == "upstream_failed"
    assert raised_in(capfd.readouterr().out, "operators/plan.py") == [
        f"batchscore.errors.RunParamError: run parameter input_path: folder '{missing}' does not exist"
    ]


# --------------------------------------------------------------------------- a real scheduler

UPSTREAM_URI = "s3://batchscore-test/iris/"
UPSTREAM_NAME = "iris-features"


@pytest.fixture(scope="module")
def stack(iris_example: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """One LocalAirflow for the module, with an endpoint that runs when two upstream assets are updated."""
    root = tmp_path_factory.mktemp("run-params")
    inputs = root / "inputs"
    inputs.mkdir()
    for f in sorted((iris_example / "data").glob("*.csv"))[:6]:
        shutil.copy(f, inputs)
    deployments = root / "deployments"
    deployments.mkdir()
    write(
        deployments / "assets.yaml",
        f"""
        endpoint_name: iris-on-assets
        schedule:
          assets:
            - {UPSTREAM_URI}
            - {UPSTREAM_NAME}
        deployments:
          - name: iris
            model: {{path: {iris_example / "model"}}}
            code_configuration: {{code: {iris_example / "code"}, scoring_script: score.py}}
            environment: {{image: batchscore-scoring:latest}}
            input: {{path: {inputs}, pattern: "*.csv"}}
            output: {{path: {root / "yaml-out"}}}
            settings: {{mini_batch_size: 3, retry_settings: {{max_retries: 0}}}}
            resources: {{instance_count: 4}}
        """,
    )
    dags = root / "dags"
    dags.mkdir()
    shutil.copy(LOADER, dags)
    af = LocalAirflow(root / "airflow", dags, env={"BATCHSCORE_DEPLOYMENTS_DIR": str(deployments)})
    af.start()
    try:
        af.wait_for_dag("iris-on-assets")
        yield {"af": af, "root": root, "inputs": inputs}
    finally:
        af.stop()


DAG_ID = "iris-on-assets"


def _asset_id(af: LocalAirflow, **query: str) -> int:
    (asset,) = af.api("GET", "/api/v2/assets", query=query)["assets"]
    return asset["id"]


def _runs(af: LocalAirflow, **query: str) -> list[dict]:
    return af.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns", query=query)["dag_runs"]


def _wait(what: str, get, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not (value := get()):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout:.0f}s")
        time.sleep(1)
    return value


@pytest.mark.docker
@pytest.mark.scheduler
def test_the_params_reach_the_api_server_with_their_schema(scoring_image: str, stack: dict) -> None:
    af: LocalAirflow = stack["af"]
    params = af.api("GET", f"/api/v2/dags/{DAG_ID}/details")["params"]
    assert list(params) == list(RUN_PARAMS)
    assert params["mini_batch_size"]["value"] is None
    assert params["mini_batch_size"]["schema"] == {
        "type": ["null", "integer"],
        "minimum": 1,
        "title": "Files per mini-batch",
    }


@pytest.mark.docker
@pytest.mark.scheduler
def test_a_run_starts_once_both_upstream_assets_are_updated(scoring_image: str, stack: dict) -> None:
    af: LocalAirflow = stack["af"]
    by_uri = _asset_id(af, uri_pattern="batchscore-test")
    by_name = _asset_id(af, name_pattern=UPSTREAM_NAME)

    af.api("POST", "/api/v2/assets/events", {"asset_id": by_uri, "extra": {"batch": "2026-11-21"}})
    queued = _wait(
        "queued asset event",
        lambda: af.api("GET", f"/api/v2/dags/{DAG_ID}/assets/queuedEvents")["queued_events"],
    )
    assert [q["asset_id"] for q in queued] == [by_uri]
    assert _runs(af, run_type="asset_triggered") == []  # one of two assets: no run yet

    af.api("POST", "/api/v2/assets/events", {"asset_id": by_name})
    (run,) = _wait("asset-triggered run", lambda: _runs(af, run_type="asset_triggered"))
    run_id = run["dag_run_id"]
    assert af.wait_for_run(DAG_ID, run_id, timeout=300) == "success"

    consumed = af.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}/upstreamAssetEvents")
    assert sorted(e["asset_id"] for e in consumed["asset_events"]) == sorted([by_uri, by_name])
    # No params were given: the run did what the YAML says.
    run_dir = stack["root"] / "yaml-out" / run_key(run_id)
    summary = Summary.read(run_dir / "summary.json")
    assert summary.status == Summary.SUCCEEDED and summary.rows == 60
    assert summary.mini_batches.total == 2  # 6 files, 3 per mini-batch
    # The merge updated the deployment's output asset, for downstream DAGs.
    events = af.api("GET", "/api/v2/assets/events", query={"source_dag_id": DAG_ID, "source_run_id": run_id})
    assert [(e["name"], e["uri"], e["source_task_id"]) for e in events["asset_events"]] == [
        ("batchscore/iris-on-assets/iris", "batchscore/iris-on-assets/iris", "iris.merge")
    ]
    assert events["asset_events"][0]["extra"] == {  # where the output is, for the downstream DAG
        "run_id": run_id,
        "run_folder": str(run_dir),
        "output": str(run_dir / "predictions.csv"),
        "status": "succeeded",
        "rows": 60,
        "failed_items": 0,
    }


@pytest.mark.docker
@pytest.mark.scheduler
@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ({"mini_batch_size": 0}, "Invalid input for param mini_batch_size: 0 is less than the minimum of 1"),
        ({"mini_batch_size": "4"}, "Invalid input for param mini_batch_size: '4' is not of type 'null', 'integer'"),
        (
            {"input_path": "data/in"},
            "Invalid input for param input_path: 'data/in' does not match '^(/|[A-Za-z][A-Za-z0-9+.-]*://)'",
        ),
        ({"output_path": 7}, "Invalid input for param output_path: 7 is not of type 'null', 'string'"),
    ],
)
def test_a_bad_conf_is_refused_when_triggered(scoring_image: str, stack: dict, conf: dict, message: str) -> None:
    af: LocalAirflow = stack["af"]
    before = len(_runs(af))
    with pytest.raises(LocalAirflowError) as info:
        af.trigger(DAG_ID, conf=conf)
    assert f"POST /api/v2/dags/{DAG_ID}/dagRuns: HTTP 400: " in str(info.value)
    assert message in str(info.value)
    assert len(_runs(af)) == before  # no run was made


@pytest.mark.docker
@pytest.mark.scheduler
def test_a_cleared_mini_batch_of_a_run_with_params_reruns_with_the_same_params(
    scoring_image: str, stack: dict, iris_example: Path
) -> None:
    af: LocalAirflow = stack["af"]
    root: Path = stack["root"]
    other = root / "other-inputs"
    other.mkdir()
    for f in sorted((iris_example / "data").glob("*.csv"))[10:14]:
        shutil.copy(f, other)
    conf = {"input_path": str(other), "output_path": str(root / "manual-out"), "mini_batch_size": 1}

    run_id = af.trigger(DAG_ID, conf=conf)
    assert af.wait_for_run(DAG_ID, run_id, timeout=300) == "success"
    before = {(t["task_id"], t["map_index"]): t for t in af.task_instances(DAG_ID, run_id)}
    assert sorted(i for (t, i) in before if t == "iris.score") == [0, 1, 2, 3]  # 4 files, 1 per mini-batch

    cleared = af.clear(DAG_ID, run_id, [("iris.score", 2)], include_downstream=True)
    assert sorted((t["task_id"], t["map_index"]) for t in cleared) == [  # warm workers come back with it
        ("iris.merge", -1),
        ("iris.score", 2),
        ("iris.start_workers", -1),
        ("iris.stop_workers", -1),
    ]
    assert af.wait_for_run(DAG_ID, run_id, timeout=300) == "success"
    after = {(t["task_id"], t["map_index"]): t for t in af.task_instances(DAG_ID, run_id)}

    assert af.dag_run(DAG_ID, run_id)["conf"] == conf  # Airflow kept the run's conf
    for key in [("iris.score", 2), ("iris.merge", -1)]:
        assert after[key]["try_number"] == before[key]["try_number"] + 1, key
    # The rerun mini-batch found its file list in the overridden output folder (else it fails),
    # and the merge wrote there again, from the files of the overridden input folder.
    run_dir = root / "manual-out" / run_key(run_id)
    predictions = pd.read_csv(run_dir / "predictions.csv")
    assert predictions["file"].tolist() == [f"iris-{i:03d}.csv" for i in range(10, 14) for _ in range(10)]
    summary = Summary.read(run_dir / "summary.json")
    assert summary.status == Summary.SUCCEEDED and summary.input.path == str(other)
    assert not (root / "yaml-out" / run_key(run_id)).exists()
