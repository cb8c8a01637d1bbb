"""batchscore against its peers (issue 18): one generated job scored three ways, end to end.

The job: ``files`` iris-like CSV files of ``rows`` rows each (:func:`bench.runtime.write_inputs`)
and a scikit-learn model with the iris example's features (a ``StandardScaler`` +
``LogisticRegression`` pipeline, trained here as ``include/examples/iris/train.py`` trains it,
saved as ``model/iris-classifier/model.joblib``). Every side computes what the iris example's
scoring script computes (``predict_proba``: the file, the id, the predicted class and its
probability per row) and writes every row to output files:

(a) **a plain loop** in one process, the floor: load the model, then per file ``read_csv``,
    ``predict_proba``, append to one output CSV;
(b) **Ray Data** on a local Ray cluster of this machine's CPUs: ``read_csv`` of the folder,
    ``map_batches`` with a callable class (the model loaded once per actor, an actor pool of
    ``workers``), ``write_csv``. Each actor asks for ``RAY_ACTOR_CPUS`` (0.5) CPU: on 2 CPUs,
    two actors of 1 CPU each can hold every CPU so that no read task runs (issue 18 saw Ray Data
    wait forever). Ray 2.60 at 1 CPU fuses the read into the actors instead (``ReadCSV->MapBatches``)
    and finished; at 0.5 the reads run as their own tasks, streaming beside the actors;
(c) **batchscore** on a real scheduler (:class:`~batchscore.localairflow.LocalAirflow`): the iris
    example's scoring script unchanged (Azure contract), ``worker_mode: warm``,
    ``resources.instance_count: workers``, ``mini_batch_size`` files per mini-batch, timed with the
    API's timestamps from the trigger to the run's end state (plan, workers, score, merge).

The sides run one after the other, each alone (Ray is shut down before Airflow starts); each
first runs the whole job once untimed (a fresh Ray cluster or Airflow stack pays one-time costs),
then ``repeats`` timed runs; medians. Ray's cluster start and Airflow's stack start are outside
the times, as a running cluster and a running scheduler are what a user has. Targets: batchscore
``<= 1.0x`` Ray Data end to end, and a busy fraction ``>= 0.8``: the seconds the workers spent in
``run()`` over ``workers x`` the scoring wall time (first mini-batch start to last mini-batch end).
It is read from ``summary.json``'s ``busy_fraction`` when the summary has one, else computed here
from the run's ledger (``processed_mini-batches.csv``: ``run_seconds``, ``worker``,
``started_at``, ``finished_at`` per mini-batch); the output says which.

Opt-in (``python -m bench peers``, never part of ``make bench``): Ray Data and scikit-learn are
installed into the venv only by ``make bench-peers`` (``bench/requirements-peers.txt``).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
import shutil
import statistics
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from batchscore.localairflow import LocalAirflow
from batchscore_runtime.formats import Summary, run_key
from bench.common import Result, deployment_doc, job_folders, median, remove_containers, require_image, stopwatch, temp_folder
from bench.runs import timed_run
from bench.runtime import IRIS, write_inputs

NAME = "peers"
TITLE = "one job scored by a plain loop, by Ray Data (actor pool) and by batchscore (real scheduler), end to end"
OPT_IN = True  # needs Ray Data, which only `make bench-peers` installs
SMALL = {"files": 8, "rows": 1_000, "mini_batch_size": 2, "repeats": 1}
#: Options of ``python -m bench`` that this benchmark takes: name -> (type, help).
OPTIONS = {
    "files": (int, "peers: how many CSV files the generated job has (default 300)"),
    "rows": (int, "peers: rows per CSV file (default 20,000)"),
    "mini_batch_size": (int, "peers: files per batchscore mini-batch (default 10)"),
}
JOB_DAG = "bench-peers"
TARGET_VS_RAY = 1.0
TARGET_BUSY = 0.8
#: CPUs each Ray actor asks for: with 1, two actors hold both CPUs of a 2-core machine and the read
#: tasks that feed them never get one (Ray Data then waits forever).
RAY_ACTOR_CPUS = 0.5
FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
#: What the benchmark imports on top of the venv, and where it comes from.
NEEDS = {"ray": "ray[data]", "ray.data": "ray[data]", "sklearn": "scikit-learn"}
MISSING = (
    "python -m bench peers needs {what}, which the venv lacks; install it with `make bench-peers` (bench/requirements-peers.txt)"
)


def missing() -> str | None:
    """Why this benchmark cannot run here (what to install, and how), or None."""
    absent = []
    for module, package in NEEDS.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # the parent package is absent
            found = False
        if not found and package not in absent:
            absent.append(package)
    return MISSING.format(what=" and ".join(absent)) if absent else None


# --------------------------------------------------------------------------- the job


def train_model(model_dir: Path) -> Path:
    """The iris example's model (``train.py``'s pipeline on scikit-learn's iris data), saved as joblib."""
    import joblib
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    iris = load_iris()
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    model.fit(pd.DataFrame(iris.data, columns=FEATURES), iris.target_names[iris.target])
    path = model_dir / "iris-classifier" / "model.joblib"
    path.parent.mkdir(parents=True)
    joblib.dump(model, path)
    return path


def predictions(model: Any, frame: pd.DataFrame, file: pd.Series | str) -> pd.DataFrame:
    """What the iris example's ``run()`` returns for one frame: file, id, prediction, probability."""
    proba = model.predict_proba(frame[FEATURES])
    return pd.DataFrame(
        {
            "file": file,
            "id": frame["id"],
            "prediction": model.classes_[proba.argmax(axis=1)],
            "probability": proba.max(axis=1).round(4),
        }
    )


def _stage(root: Path, files: int, rows: int, mini_batch_size: int, workers: int) -> dict[str, Path]:
    """Inputs, model, batchscore's deployment YAML and DAG folder; the paths by name."""
    paths = {name: root / name for name in ("inputs", "model", "dags", "deployments", "output")}
    for name in ("inputs", "model"):
        paths[name].mkdir()
    write_inputs(paths["inputs"], files, rows)
    paths["model_file"] = train_model(paths["model"])
    settings = {
        "mini_batch_size": mini_batch_size,
        "worker_mode": "warm",
        "retry_settings": {"max_retries": 0, "timeout": 3600},
    }
    doc = deployment_doc(
        JOB_DAG,
        model=paths["model"],
        code=IRIS / "code",  # the example's scoring script, unchanged
        inputs=paths["inputs"],
        output=paths["output"],
        pattern="*.csv",
        settings=settings,
        resources={"instance_count": workers},
    )
    job_folders(root, {JOB_DAG: doc})
    return paths


# --------------------------------------------------------------------------- (a) the plain loop


def plain_loop(inputs: Path, model_file: Path, output: Path) -> int:
    """Load the model, then per file: read, predict, append to one CSV. Returns the rows written."""
    import joblib

    model = joblib.load(model_file)
    written = 0
    with open(output, "w", encoding="utf-8", newline="") as fh:
        for k, path in enumerate(sorted(inputs.glob("*.csv"))):
            frame = pd.read_csv(path)
            result = predictions(model, frame, path.name)
            result.to_csv(fh, header=k == 0, index=False)
            written += len(result)
    return written


# --------------------------------------------------------------------------- (b) Ray Data


def _predictor_class() -> type:
    """The callable class of ``map_batches``, made here so Ray ships it by value (workers need not import bench)."""
    from pathlib import PurePath

    import joblib

    class Predictor:
        """Loads the model once per actor; scores one batch (a pandas frame with a ``path`` column)."""

        def __init__(self, model_file: str) -> None:
            self.model = joblib.load(model_file)

        def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
            proba = self.model.predict_proba(batch[FEATURES])
            return pd.DataFrame(
                {
                    "file": batch["path"].map(lambda p: PurePath(p).name),
                    "id": batch["id"],
                    "prediction": self.model.classes_[proba.argmax(axis=1)],
                    "probability": proba.max(axis=1).round(4),
                }
            )

    return Predictor


def ray_data(inputs: Path, model_file: Path, output: Path, workers: int) -> None:
    """``read_csv`` -> ``map_batches`` (actor pool of ``workers``, model loaded once per actor) -> ``write_csv``."""
    import ray.data

    dataset = ray.data.read_csv(str(inputs), include_paths=True, file_extensions=["csv"])
    scored = dataset.map_batches(
        _predictor_class(),
        fn_constructor_args=(str(model_file),),
        batch_format="pandas",
        batch_size=None,  # a whole block (about a file) per call, as the plain loop does
        compute=ray.data.ActorPoolStrategy(size=workers),  # what ``concurrency=workers`` was before Ray 2.51
        num_cpus=RAY_ACTOR_CPUS,
    )
    scored.write_csv(str(output))


def csv_rows(folder: Path) -> int:
    """Data rows in every CSV file under ``folder`` (one header line each)."""
    total = 0
    for path in folder.rglob("*.csv"):
        with open(path, "rb") as fh:
            total += sum(1 for _ in fh) - 1
    return total


def _measure_ray(paths: dict[str, Path], root: Path, workers: int, repeats: int, expected: int) -> dict[str, Any]:
    """A local Ray cluster of this machine's CPUs; one untimed run, then ``repeats`` timed ones."""
    import ray
    import ray.data

    with stopwatch() as start:
        ray.init(
            num_cpus=os.cpu_count(),
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
            _temp_dir=str(root / "ray"),
        )
    for name in ("ray", "ray.data"):  # Ray Data's per-dataset info lines
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        samples = []
        for k in range(repeats + 1):
            output = root / f"ray-output-{k}"
            with stopwatch() as t:
                ray_data(paths["inputs"], paths["model_file"], output, workers)
            if (rows := csv_rows(output)) != expected:
                raise RuntimeError(f"Ray Data wrote {rows} rows of {expected} under {output}")
            shutil.rmtree(output)
            if k:  # the first run is untimed
                samples.append(t[0])
    finally:
        ray.shutdown()
    return {"samples": samples, "start_s": start[0]}


# --------------------------------------------------------------------------- (c) batchscore


def busy_fraction(run_dir: Path, workers: int) -> dict[str, Any]:
    """The run's busy fraction and per-worker busy seconds: from ``summary.json`` when it has them, else the ledger."""
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    durations = summary.get("durations", {})
    if "busy_fraction" in summary:
        per_worker = summary.get("worker_busy_seconds") or {
            w["worker"]: w["busy_seconds"] for w in summary.get("warm_workers", []) if "busy_seconds" in w
        }
        return {
            "fraction": summary["busy_fraction"],
            "per_worker": per_worker,
            "busy_total": sum(per_worker.values()) if per_worker else durations.get("run_seconds_total", 0.0),
            "wall": durations.get("scoring_wall_seconds"),
            "source": "summary.json's busy_fraction",
        }
    with open(run_dir / "processed_mini-batches.csv", encoding="utf-8", newline="") as fh:
        ledger = list(csv.DictReader(fh))
    per_worker: dict[str, float] = defaultdict(float)
    for row in ledger:
        per_worker[row["worker"] or row["mini_batch"]] += float(row["run_seconds"] or 0)
    started = min(datetime.fromisoformat(r["started_at"]) for r in ledger if r["started_at"])
    finished = max(datetime.fromisoformat(r["finished_at"]) for r in ledger if r["finished_at"])
    wall = (finished - started).total_seconds()
    return {
        "fraction": sum(per_worker.values()) / (workers * wall),
        "per_worker": dict(per_worker),
        "busy_total": sum(per_worker.values()),
        "wall": wall,
        "source": "computed by the bench from processed_mini-batches.csv (summary.json has no busy_fraction)",
    }


def _measure_batchscore(paths: dict[str, Path], root: Path, workers: int, repeats: int, expected: int) -> dict[str, Any]:
    """The job's DAG on a LocalAirflow: one untimed run, then ``repeats`` timed ones, each checked, busy fractions read."""
    samples: list[float] = []
    busy: list[dict[str, Any]] = []
    tasks: dict[str, list[float]] = {}
    try:
        env = {"BATCHSCORE_DEPLOYMENTS_DIR": str(paths["deployments"])}
        with LocalAirflow(root / "airflow", paths["dags"], env=env) as airflow:
            airflow.wait_for_dag(JOB_DAG)
            for k in range(repeats + 1):
                run = timed_run(airflow, JOB_DAG, timeout=3600)
                run_dir = paths["output"] / run_key(run.run_id)
                summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
                if summary["status"] != Summary.SUCCEEDED or summary["rows"] != expected:
                    raise RuntimeError(f"{run_dir}: summary {summary['status']}, {summary['rows']} rows of {expected}")
                if k:  # the first run is untimed
                    samples.append(run.seconds)
                    busy.append(busy_fraction(run_dir, workers) | {"t_job": run.seconds})
                    for task, values in run.durations.items():
                        tasks.setdefault(task, []).extend(values)
    finally:
        remove_containers(f"batchscore.endpoint={JOB_DAG}")
    return {"samples": samples, "busy": busy, "tasks": tasks}


# --------------------------------------------------------------------------- the benchmark


def run(files: int = 300, rows: int = 20_000, mini_batch_size: int = 10, workers: int = 2, repeats: int = 2) -> Result:
    """The job scored by the plain loop, Ray Data and batchscore, each alone, ``repeats`` timed runs after one untimed."""
    if why := missing():
        raise RuntimeError(why)
    require_image()
    result = Result(NAME, TITLE)
    expected = files * rows
    with temp_folder(NAME) as root:
        paths = _stage(root, files, rows, mini_batch_size, workers)
        plain: list[float] = []
        for k in range(repeats + 1):
            with stopwatch() as t:
                written = plain_loop(paths["inputs"], paths["model_file"], root / "plain.csv")
            if written != expected:
                raise RuntimeError(f"the plain loop wrote {written} rows of {expected}")
            if k:
                plain.append(t[0])
        ray_measured = _measure_ray(paths, root, workers, repeats, expected)
        job = _measure_batchscore(paths, root, workers, repeats, expected)
    _report(result, files, rows, mini_batch_size, workers, plain, ray_measured, job)
    return result


def _report(
    result: Result,
    files: int,
    rows: int,
    mini_batch_size: int,
    workers: int,
    plain: list[float],
    ray_measured: dict[str, Any],
    job: dict[str, Any],
) -> None:
    """The medians as figures, the ratios, the busy fraction, the two checks, the samples."""
    import ray
    import sklearn

    n_mb = -(-files // mini_batch_size)
    result.figure("work", files * rows, "rows", f"{files} CSV files x {rows:,} rows, iris-like model (scikit-learn)")
    result.figure("workers", workers, "", f"workers: Ray actors of {RAY_ACTOR_CPUS} CPU, batchscore warm containers")
    t_plain = result.figure("t_plain", median(plain), "s", "(a) plain loop, one process: read, predict, write")
    t_ray = result.figure(
        "t_ray", median(ray_measured["samples"]), "s", "(b) Ray Data, actor pool: read_csv -> map_batches -> write_csv"
    )
    t_job = result.figure("t_batchscore", median(job["samples"]), "s", f"(c) batchscore, {n_mb} mini-batches, trigger -> success")
    result.figure("ray_init_s", ray_measured["start_s"], "s", "ray.init() of the local cluster (not in t_ray)")
    for task in ("plan", "start_workers", "score", "merge", "stop_workers"):
        if task in job["tasks"]:
            result.figure(f"{task}_task_s", median(job["tasks"][task]), "s", f"batchscore {task} task instance, median duration")
    result.figure("ray_over_plain", t_ray / t_plain, "x", "Ray Data / plain loop")
    result.figure("batchscore_over_plain", t_job / t_plain, "x", "batchscore / plain loop")
    result.figure("batchscore_over_ray", t_job / t_ray, "x", "batchscore / Ray Data")
    busy = job["busy"]
    fraction = statistics.median(b["fraction"] for b in busy)
    wall = median([b["wall"] for b in busy])
    result.figure("scoring_wall_s", wall, "s", "batchscore scoring wall: first mini-batch start -> last end")
    result.figure("busy_fraction", fraction, "", f"batchscore busy fraction: run() seconds / ({workers} x scoring wall)")
    over_job = statistics.median(b["busy_total"] / (workers * b["t_job"]) for b in busy)
    result.figure("busy_over_t_job", over_job, "", f"run() seconds / ({workers} x trigger -> success)")
    result.check("t_batchscore / t_ray", t_job / t_ray, "<=", TARGET_VS_RAY)
    result.check("batchscore busy fraction", fraction, ">=", TARGET_BUSY, unit="")
    result.notes.append(f"busy fraction: {busy[0]['source']}")
    per_worker = "; ".join(", ".join(f"{w} {s:.2f}" for w, s in sorted(b["per_worker"].items())) for b in busy)
    result.notes.append(f"busy seconds per worker, per timed run: {per_worker}")
    result.notes.append(
        f"Ray {ray.__version__}: each actor asks for num_cpus={RAY_ACTOR_CPUS}, so the read tasks keep a CPU beside {workers} "
        "actors (with 1 CPU each, the actors could hold every CPU of a 2-core machine and starve the reads)"
    )
    shown = ", ".join(
        f"{name} {[round(v, 2) for v in values]}"
        for name, values in (("plain", plain), ("ray", ray_measured["samples"]), ("batchscore", job["samples"]))
    )
    result.notes.append(f"scikit-learn {sklearn.__version__}; samples (s): {shown}")
