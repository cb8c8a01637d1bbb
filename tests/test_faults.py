"""Faults on real DAG runs: a broken script, bad input files, a bad setting, two runs at once.

Each mini-batch is its own container, so one DAG run holds many faults at once: the endpoint
below has a deployment whose mini-batches (two files each) each hit a different fault, and
deployments whose whole task group fails in its own way (a script that does not compile,
results whose types disagree, an empty input folder, an output path that is a file). Every
case must end in a message that names the mini-batch, the file or the setting, in the failing
task's log and in the run's records, and leave what the other mini-batches produced intact.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest
import yaml

from batchscore.factory import build_dag
from batchscore.plan import plan_run
from batchscore_runtime.formats import ItemCounts, MiniBatchCounts, Summary, run_key
from tests.helpers import deployment_file, load, task_context, write

pytestmark = pytest.mark.docker

RUN_AFTER = datetime(2026, 1, 1, tzinfo=UTC)
RUN_ID = f"manual__{RUN_AFTER.isoformat()}"  # what dag.test(run_after=RUN_AFTER, logical_date=RUN_AFTER) names it

# One row per file it could read: file, rows, first id. The faults are chosen by file name, and by
# mini-batch (BATCHSCORE_MINI_BATCH) for those that happen before run() sees any file.
FAULTS_SCRIPT = """
import os
import time

import pandas as pd

MINI_BATCH = os.environ.get("BATCHSCORE_MINI_BATCH")
if MINI_BATCH == "mb-00012":
    import no_such_module  # noqa: F401 - a dependency missing from the image


def init():
    if MINI_BATCH == "mb-00009":
        raise RuntimeError("model server refused the connection")
    if MINI_BATCH == "mb-00010":
        os._exit(3)
    if MINI_BATCH == "mb-00011":
        time.sleep(120)  # the test kills the container meanwhile (docker kill, as an operator or the OOM killer would)


class Opaque:
    def __str__(self):
        return "opaque-object"


def read(path):
    return pd.read_parquet(path) if path.endswith(".parquet") else pd.read_csv(path)


def run(mini_batch):
    results = []
    for file_path in mini_batch:
        name = os.path.basename(file_path)
        if "raise" in name:
            raise ValueError("negative petal_length in row 3")
        if "skip" in name:
            continue
        data = read(file_path)
        row = {"file": name, "rows": len(data), "first_id": int(data["id"].iloc[0])}
        if "complex" in name:
            row.update(detail={"rank": 1, "labels": ["a", "b"]}, tags=[1, 2], obj=Opaque())
        results.append(row)
    return results
"""

# mini_batch_size 2, natural order: mb-00000 = a0, a1; mb-00001 = b0, b1; ...
FAULT_FILES = [
    ("a0-ok.csv", "a1-ok.csv"),  # mb-00000: fine
    ("b0-ok.csv", "b1-raise.csv"),  # mb-00001: run() raises on one file
    ("c0-ok.csv", "c1-skip.csv"),  # mb-00002: run() returns nothing for one file
    ("d0-complex.csv", "d1-complex.csv"),  # mb-00003: dicts, lists and objects
    ("e0-ok.csv", "e1-corrupt.csv"),  # mb-00004: a corrupt CSV
    ("f0-ok.csv", "f1-empty.csv"),  # mb-00005: an empty file
    ("g0-ok.csv", "g1-latin1.csv"),  # mb-00006: not UTF-8
    ("h0-ok.csv", "h1-corrupt.parquet"),  # mb-00007: a corrupt parquet file
    ("i0-ok.csv", "i1-removed.csv"),  # mb-00008: removed between plan and score
    ("j0-ok.csv", "j1-ok.csv"),  # mb-00009: init() raises
    ("k0-ok.csv", "k1-ok.csv"),  # mb-00010: init() calls os._exit(3)
    ("l0-ok.csv", "l1-ok.csv"),  # mb-00011: the script kills its supervisor
    ("m0-ok.csv", "m1-ok.csv"),  # mb-00012: the script imports a missing module
    ("n0-skip.csv", "n1-skip.csv"),  # mb-00013: run() returns nothing at all
    ("o0-ok.csv", "o1-ok.csv"),  # mb-00014: fine, after all the failures
]
BAD_CONTENT = {
    "e1-corrupt.csv": b"id,sepal_length\n1,5.1\n2,4.9,3.0,1.4,0.2\n",
    "f1-empty.csv": b"",
    "g1-latin1.csv": "id,sepal_length,origin\n1,5.1,Bogot\u00e1\n".encode("latin-1"),
    "h1-corrupt.parquet": b"PAR1 this is not a parquet file PAR1",
}


def make_inputs(folder: Path, iris: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True)
    sources = sorted(iris.glob("*.csv"))
    for k, name in enumerate(names):
        if name in BAD_CONTENT:
            (folder / name).write_bytes(BAD_CONTENT[name])
        else:
            shutil.copy(sources[k % len(sources)], folder / name)
    return folder


def states(dag_run) -> dict[tuple[str, int], str]:
    return {(ti.task_id, ti.map_index): ti.state for ti in dag_run.get_task_instances()}


def test_faults_each_end_in_a_message_naming_the_mini_batch_file_or_setting(
    airflow_db, iris_example: Path, tmp_path: Path, monkeypatch, capfd
) -> None:
    iris = iris_example / "data"
    names = [n for pair in FAULT_FILES for n in pair]
    faults_in = make_inputs(tmp_path / "faults-in", iris, names)
    write(tmp_path / "code" / "score.py", FAULTS_SCRIPT)
    write(tmp_path / "code" / "broken.py", "def run(mini_batch)\n    return mini_batch\n")
    write(
        tmp_path / "code" / "score_types.py",
        """
        import os

        def run(mini_batch):
            name = os.path.basename(mini_batch[0])
            return [{"file": name, "score": 1 if name == "a0-ok.csv" else "high"}]
        """,
    )
    two_in = make_inputs(tmp_path / "two-in", iris, ["a0-ok.csv", "a1-ok.csv"])
    (tmp_path / "empty-in").mkdir()
    (tmp_path / "not-a-folder").write_text("output.path points at this file\n")

    def deployment(name: str, script: str, inputs: Path, output: Path, mini_batch_size: int, pattern: str = "*"):
        return {
            "name": name,
            "model": {"path": str(iris_example / "model")},
            "code_configuration": {"code": str(tmp_path / "code"), "scoring_script": script},
            "environment": {"image": "batchscore-scoring:latest"},
            "input": {"path": str(inputs), "pattern": pattern},
            "output": {"path": str(output)},
            # One container per mini-batch: init() here fails per mini-batch (it reads BATCHSCORE_MINI_BATCH).
            "settings": {
                "mini_batch_size": mini_batch_size,
                "retry_settings": {"max_retries": 0},
                "worker_mode": "per_mini_batch",
            },
        }

    out = tmp_path / "out"
    yaml_path = write(
        tmp_path / "deployments" / "faults.yaml",
        yaml.safe_dump(
            {
                "endpoint_name": "faults",
                "deployments": [
                    deployment("faults", "score.py", faults_in, out / "faults", 2),
                    deployment("syntax-error", "broken.py", two_in, out / "syntax-error", 2),
                    deployment("wrong-types", "score_types.py", two_in, out / "wrong-types", 1),
                    deployment("empty-input", "score.py", tmp_path / "empty-in", out / "empty-input", 1, "*.csv"),
                    deployment("unwritable-output", "score.py", two_in, tmp_path / "not-a-folder", 1),
                ],
            },
            sort_keys=False,
        ),
    )
    monkeypatch.setenv("BATCHSCORE_DEPLOYMENTS_DIR", str(yaml_path.parent))
    endpoint = load(yaml_path)
    faults = endpoint.deployments[0]
    # A file removed between plan and score: plan this run now, then delete the file.
    plan = plan_run("faults", faults, RUN_ID)
    assert plan.files == 30 and len(plan.mini_batches) == 15
    (faults_in / "i1-removed.csv").unlink()

    stop = threading.Event()
    killer = threading.Thread(target=kill_container, args=("faults", "mb-00011", stop), daemon=True)
    killer.start()
    try:
        dag_run = build_dag(endpoint).test(run_after=RUN_AFTER, logical_date=RUN_AFTER)
    finally:
        stop.set()
        killer.join()
    log = "".join(capfd.readouterr())

    assert dag_run.run_id == RUN_ID
    tis = states(dag_run)
    failed_mbs = [1, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    assert [tis[("faults.score", i)] for i in range(15)] == ["failed" if i in failed_mbs else "success" for i in range(15)]
    assert tis[("faults.merge", -1)] == "success"  # Azure's default thresholds allow every failure

    # The failing task's exception: mini-batch, exception and the file it concerns.
    expected_task_errors = {
        1: "mb-00001 failed: ValueError: negative petal_length in row 3 (file b1-raise.csv)",
        4: "mb-00004 failed: ParserError: Error tokenizing data. C error: Expected 2 fields in line 3, saw 5 "
        "(file e1-corrupt.csv)",
        5: "mb-00005 failed: EmptyDataError: No columns to parse from file (file f1-empty.csv)",
        6: "mb-00006 failed: UnicodeDecodeError: 'utf-8' codec can't decode byte 0xe1 in position 5: "
        "unexpected end of data (file g1-latin1.csv)",
        7: "mb-00007 failed: ArrowInvalid: Could not open Parquet input source '/mnt/batchscore/input/h1-corrupt.parquet': "
        "Parquet file size is 36 bytes, smaller than the size reported by footer's (543517801bytes) "
        "(file h1-corrupt.parquet)",
        8: "mb-00008 failed: InputFileMissingError: input file i1-removed.csv of mb-00008 no longer exists "
        f"(it was planned with {plan_size(faults, 'i1-removed.csv')} bytes); the plan is kept per run, so "
        "restore the file or start a new run (file i1-removed.csv)",
        9: "mb-00009 failed: RuntimeError: model server refused the connection",
        10: "mb-00010 failed: WorkerDied: worker 1/1 of mb-00010 exited with code 3 during start-up and init()",
        11: "mb-00011 failed: ContainerDied: the scoring container ended without committing a result",
        12: "mb-00012 failed: ScoringScriptError: importing scoring script score.py failed: "
        "ModuleNotFoundError: No module named 'no_such_module'",
    }
    for i, message in expected_task_errors.items():
        assert f"ScoringError: {message}" in log, (i, message)

    run_dir = faults.output.path / run_key(RUN_ID)
    # Results already produced are intact: every succeeded mini-batch's rows, in input order.
    output = pd.read_csv(run_dir / "predictions.csv")
    ok = ["a0-ok.csv", "a1-ok.csv", "c0-ok.csv", "d0-complex.csv", "d1-complex.csv", "o0-ok.csv", "o1-ok.csv"]
    assert output["file"].tolist() == ok
    assert output["rows"].tolist() == [10] * 7
    assert list(output.columns) == ["file", "rows", "first_id", "detail", "tags", "obj"]
    complex_rows = output[output["file"].str.contains("complex")]
    assert complex_rows["detail"].tolist() == ['{"rank": 1, "labels": ["a", "b"]}'] * 2  # JSON text in a CSV
    assert complex_rows["tags"].tolist() == ["[1, 2]"] * 2 and complex_rows["obj"].tolist() == ["opaque-object"] * 2

    ledger = pd.read_csv(run_dir / "processed_mini-batches.csv").set_index("mini_batch")
    for i, message in expected_task_errors.items():
        assert ledger.loc[f"mb-{i:05d}", "status"] == "failed"
        assert ledger.loc[f"mb-{i:05d}", "error"].startswith(message.split(" failed: ", 1)[1]), i
    assert ledger.loc["mb-00002", "failed_items"] == 1 and ledger.loc["mb-00013", "failed_items"] == 2

    errors = pd.read_csv(run_dir / "errors.csv", keep_default_na=False)
    lines = {(r.mini_batch, r.file): (r.error_type, r.message) for r in errors.itertuples()}
    assert len(errors) == 2 * len(failed_mbs) + 3  # every file of a failed mini-batch, and 3 files without a result
    assert lines[("mb-00002", "c1-skip.csv")] == (
        "NoResult",
        "run() returned no result for this file (column 'file' does not name it)",
    )
    assert lines[("mb-00013", "n0-skip.csv")] == ("NoResult", "run() returned no results for this mini-batch")
    assert lines[("mb-00013", "n1-skip.csv")] == ("NoResult", "run() returned no results for this mini-batch")
    assert lines[("mb-00001", "b1-raise.csv")] == ("ValueError", "negative petal_length in row 3")
    assert lines[("mb-00001", "b0-ok.csv")] == (
        "ValueError",
        "negative petal_length in row 3 (raised on b1-raise.csv; failed with its mini-batch)",
    )
    assert lines[("mb-00004", "e1-corrupt.csv")] == (
        "ParserError",
        "Error tokenizing data. C error: Expected 2 fields in line 3, saw 5",
    )
    assert lines[("mb-00007", "h1-corrupt.parquet")][0] == "ArrowInvalid"
    assert lines[("mb-00008", "i1-removed.csv")][0] == "InputFileMissingError"
    assert lines[("mb-00011", "l0-ok.csv")][0] == "ContainerDied"

    summary = Summary.read(run_dir / "summary.json")
    assert summary.status == Summary.SUCCEEDED_WITH_FAILURES
    assert summary.mini_batches == MiniBatchCounts(total=15, succeeded=5, failed=10, missing=0)
    assert summary.items == ItemCounts(total=30, succeeded=7, failed=23)
    assert summary.rows == 7
    failures = {f.mini_batch: f.error for f in summary.failures}
    assert failures["mb-00004"].endswith("(file e1-corrupt.csv)")
    assert failures["mb-00007"].endswith("(file h1-corrupt.parquet)")

    # A script that does not compile: its mini-batch fails naming the script, the line and the error.
    assert tis[("syntax-error.score", 0)] == "failed"
    assert (
        "ScoringError: mb-00000 failed: ScoringScriptError: importing scoring script broken.py failed: "
        "SyntaxError: expected ':' (broken.py, line 1)" in log
    )
    syntax = Summary.read(out / "syntax-error" / run_key(RUN_ID) / "summary.json")
    assert syntax.failures[0].error.startswith("ScoringScriptError: importing scoring script broken.py failed")

    # Results whose column types disagree: the merge names the column and the mini-batches, and
    # still writes the ledger, errors file and summary; the results are kept for a rerun.
    assert [tis[("wrong-types.score", i)] for i in (0, 1)] == ["success", "success"]
    assert tis[("wrong-types.merge", -1)] == "failed"
    types_dir = out / "wrong-types" / run_key(RUN_ID)
    clash = (
        "MergeError: the mini-batches' results cannot be put into one output: column 'score' is int64 in mb-00000 "
        "but large_string in mb-00001. Make run() return the same column types for every mini-batch (e.g. cast "
        f"with DataFrame.astype). The mini-batches' results are kept in {types_dir / '_batchscore' / 'results'}; "
        f"summary.json, processed_mini-batches.csv and errors.csv are in {types_dir}."
    )
    assert clash in log
    types_summary = Summary.read(types_dir / "summary.json")
    assert types_summary.status == Summary.FAILED and types_summary.output is None
    assert "column 'score' is int64 in mb-00000 but large_string in mb-00001" in types_summary.error
    assert not (types_dir / "predictions.csv").exists()
    assert pd.read_csv(types_dir / "processed_mini-batches.csv")["status"].tolist() == ["succeeded"] * 2
    assert len(list((types_dir / "_batchscore" / "results").glob("mb-*/result-*.parquet"))) == 2

    # An empty input folder: the plan fails naming input.path; nothing is scored.
    assert tis[("empty-input.plan", -1)] == "failed"
    assert (
        f"PlanError: no input files match '*.csv' in {tmp_path / 'empty-in'} (deployment 'empty-input', "
        "keys input.path and input.pattern)" in log
    )
    # output.path is a file: the plan fails naming output.path.
    assert tis[("unwritable-output.plan", -1)] == "failed"
    assert (
        f"PlanError: cannot write the run folder {tmp_path / 'not-a-folder' / run_key(RUN_ID)} of deployment "
        f"'unwritable-output' (key output.path {tmp_path / 'not-a-folder'}): Not a directory" in log
    )
    assert (tmp_path / "not-a-folder").read_text() == "output.path points at this file\n"


def kill_container(deployment: str, mini_batch: str, stop: threading.Event) -> None:
    """``docker kill`` the scoring container of ``mini_batch`` once it runs."""
    labels = ["--filter", f"label=batchscore.deployment={deployment}", "--filter", f"label=batchscore.mini_batch={mini_batch}"]
    while not stop.wait(0.5):
        found = subprocess.run(["docker", "ps", "-q", *labels], capture_output=True, text=True).stdout.split()
        if found:
            time.sleep(1)  # let it reach init()
            subprocess.run(["docker", "kill", *found], capture_output=True)
            return


def plan_size(deployment, name: str) -> int:
    plan_dir = deployment.output.path / run_key(RUN_ID) / "_batchscore" / "minibatches"
    mb = json.loads((plan_dir / "mb-00008.json").read_text())
    return next(f["size"] for f in mb["files"] if f["path"] == name)


def test_a_model_folder_deleted_after_the_yaml_was_loaded_fails_naming_model_path(iris_example: Path, tmp_path: Path) -> None:
    """The DAG holds the deployment as it was when the YAML was parsed; a task re-validates it
    when it runs. dag.test() re-parses the DAGs folder first (where the YAML now fails to load,
    an import error), so the DAG's operators are run directly, as a worker runs a parsed DAG's tasks."""
    from batchscore.errors import BatchScoreError
    from batchscore.operators import MergeOperator, PlanOperator, ScoreOperator

    model = tmp_path / "model"
    shutil.copytree(iris_example / "model", model)
    inputs = make_inputs(tmp_path / "in", iris_example / "data", ["a0-ok.csv"])
    write(tmp_path / "code" / "score.py", FAULTS_SCRIPT)
    yaml_path = deployment_file(
        tmp_path / "deployments", model=model, code=tmp_path / "code", inputs=inputs, endpoint="lost-model"
    )
    dag = build_dag(load(yaml_path))
    shutil.rmtree(model)

    context = task_context(RUN_ID, dag=dag)
    expected = (
        "deployment 'test-deployment' of endpoint 'lost-model' is no longer valid:\n"
        "1 validation error for DeploymentSpec\nmodel.path\n  Value error, path "
        f"{model} does not exist"
    )
    for task_id in ("test-deployment.plan", "test-deployment.merge"):
        with pytest.raises(BatchScoreError) as info:
            dag.get_task(task_id).execute(context)
        assert str(info.value).startswith(expected), task_id
    score = ScoreOperator(  # a mapped score task is made from the same deployment, and checks it when it runs
        task_id="score",
        endpoint_name="lost-model",
        deployment=dag.get_task("test-deployment.plan").deployment,
        mini_batch={"index": 0, "files": 1, "bytes": 1, "label": "mb-00000 (1 file)"},
    )
    with pytest.raises(BatchScoreError) as info:
        score.execute(context)
    assert str(info.value).startswith(expected)
    assert isinstance(dag.get_task("test-deployment.plan"), PlanOperator)
    assert isinstance(dag.get_task("test-deployment.merge"), MergeOperator)


def test_two_runs_of_one_deployment_scored_at_the_same_time_keep_their_own_folders(
    airflow_db, iris_example: Path, tmp_path: Path
) -> None:
    """Two runs interleaved through the real operators: plan A, plan B (after the input changed),
    then all four mini-batch containers at once, then both merges. dag.test() runs one DAG run
    at a time, so the operators are driven directly, each with its own run id, as two workers would."""
    from batchscore.operators import MergeOperator, PlanOperator, ScoreOperator

    inputs = make_inputs(tmp_path / "in", iris_example / "data", ["a0.csv", "a1.csv", "a2.csv"])
    write(
        tmp_path / "code" / "score.py",
        """
        import os, time

        def run(mini_batch):
            time.sleep(2)  # long enough for the four containers to overlap
            return [{"file": os.path.basename(p)} for p in mini_batch]
        """,
    )
    yaml_path = deployment_file(
        tmp_path / "deployments",
        model=iris_example / "model",
        code=tmp_path / "code",
        inputs=inputs,
        endpoint="twice",
        settings={"mini_batch_size": 2},
    )
    spec = load(yaml_path).deployments[0]
    common = {"endpoint_name": "twice", "deployment": spec.model_dump(mode="json", by_alias=True)}
    runs = {"A": "manual__2026-01-01T00:00:00+00:00", "B": "manual__2026-01-01T00:00:00.5+00:00"}

    refs = {"A": PlanOperator(task_id="plan", **common).execute(task_context(runs["A"]))}
    shutil.copy(inputs / "a0.csv", inputs / "b9.csv")  # run B starts after the input changed
    refs["B"] = PlanOperator(task_id="plan", **common).execute(task_context(runs["B"]))
    assert [r["files"] for r in refs["A"]] == [2, 1] and [r["files"] for r in refs["B"]] == [2, 2]

    started = threading.Barrier(4)

    def score(run: str, ref: dict) -> dict:
        op = ScoreOperator(task_id=f"score-{run}-{ref['index']}", mini_batch=ref, **common)
        started.wait()
        return op.execute(task_context(runs[run]))

    with ThreadPoolExecutor(4) as pool:
        jobs = [pool.submit(score, run, ref) for ref_pair in zip(refs["A"], refs["B"]) for run, ref in zip("AB", ref_pair)]
        results = [j.result() for j in jobs]
    assert [r["rows"] for r in results] == [2, 2, 1, 2]

    summaries = {run: MergeOperator(task_id="merge", **common).execute(task_context(rid)) for run, rid in runs.items()}
    dirs = {run: spec.output.path / run_key(rid) for run, rid in runs.items()}
    assert dirs["A"] != dirs["B"]
    assert pd.read_csv(dirs["A"] / "predictions.csv")["file"].tolist() == ["a0.csv", "a1.csv", "a2.csv"]
    assert pd.read_csv(dirs["B"] / "predictions.csv")["file"].tolist() == ["a0.csv", "a1.csv", "a2.csv", "b9.csv"]
    assert summaries["A"]["rows"] == 3 and summaries["B"]["rows"] == 4
    # The four containers really ran at the same time: every scoring interval overlaps the others.
    spans = []
    for run in "AB":
        ledger = pd.read_csv(dirs[run] / "processed_mini-batches.csv")
        assert ledger["status"].tolist() == ["succeeded", "succeeded"]
        spans += [
            (datetime.fromisoformat(s), datetime.fromisoformat(f)) for s, f in zip(ledger["started_at"], ledger["finished_at"])
        ]
    assert max(s for s, _ in spans) < min(f for _, f in spans)
