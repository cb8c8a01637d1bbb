"""Orchestration overhead: a job of 20 one-file mini-batches with an instant model, on a real
scheduler, against two floors measured on the same stack in the same run.

One local Airflow (:class:`batchscore.localairflow.LocalAirflow`: api-server, scheduler,
dag-processor, LocalExecutor at its default parallelism) parses a DAG folder holding a copy of
``dags/batchscore_deployments.py`` (one deployment YAML: 20 small files, ``mini_batch_size: 1``,
a scoring script whose ``run()`` returns its input list) and a plain DAG of 20 mapped no-op
``@task`` instances with the same ``max_active_tis_per_dagrun``. The floors are (a) that DAG's
run and (b) 20 bare ``docker run``s of the scoring image (``python3 -c pass``, the scoring
containers' hardening) at the same parallelism (``resources.instance_count``). A DAG run is
timed from its trigger to its end state with the API's own timestamps (``queued_at`` to
``end_date``); the target is ``t_job <= 1.2 * (t_noop_dag + t_docker_runs)``. After one untimed
run of each DAG, medians of two rounds, the second in reverse order. To show where a score
task's time goes, one mini-batch's scoring container is also run alone (``docker run`` of the
runtime, as in :mod:`bench.runtime`).
"""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from batchscore import security
from batchscore.localairflow import LocalAirflow
from batchscore.spec import Resources, load_endpoint
from bench.common import (
    SCORING_IMAGE,
    Result,
    hardened_run_args,
    median,
    remove_containers,
    require_image,
    stage_jobs,
    stopwatch,
    temp_folder,
)
from bench.runs import timed_run
from bench.runtime import run_runtime

NAME = "orchestration"
TITLE = "job of 20 mini-batches, instant model, real scheduler, against a no-op DAG plus bare docker runs"
TARGET = 1.2
JOB_DAG = "bench-orchestration"
NOOP_DAG = "bench_noop_mapped"
SMALL = {"mini_batches": 2, "instances": 2, "repeats": 1}

INSTANT_SCRIPT = "def init():\n    pass\n\n\ndef run(mini_batch):\n    return list(mini_batch)\n"
NOOP_DAG_FILE = '''"""The orchestration benchmark's floor: {n} mapped no-op tasks, {k} at a time (an Airflow DAG)."""
from airflow.sdk import dag, task


@dag(dag_id="{dag_id}", schedule=None, catchup=False)
def bench_noop_mapped():
    @task(max_active_tis_per_dagrun={k})
    def noop(i):
        return None

    noop.expand(i=list(range({n})))


bench_noop_mapped()
'''


def _stage(root: Path, mini_batches: int, instances: int) -> tuple[Path, Path]:
    """The job's inputs, code, model and YAML (``<JOB_DAG>.yaml``), and the DAG folder.

    Returns the DAG folder and the deployments folder.
    """
    dags, deployments = stage_jobs(
        root, mini_batches, INSTANT_SCRIPT, {JOB_DAG: {"worker_mode": "per_mini_batch"}}, instances=instances
    )
    noop = NOOP_DAG_FILE.format(dag_id=NOOP_DAG, n=mini_batches, k=instances)
    (dags / "bench_noop_mapped.py").write_text(noop)
    return dags, deployments


def docker_floor(runs: int, parallel: int) -> float:
    """``runs`` bare ``docker run``s of the scoring image, ``parallel`` at a time; the wall time."""
    args = [*hardened_run_args(Resources(), security.container_user()), SCORING_IMAGE, "python3", "-c", "pass"]

    def one(_: int) -> None:
        subprocess.run(["docker", "run", *args], check=True, capture_output=True)

    with stopwatch() as t, ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, range(runs)))
    return t[0]


def _measure(airflow: LocalAirflow, deployments: Path, mini_batches: int, instances: int, repeats: int) -> dict:
    """Every sample: the floors and the job (``repeats`` rounds), task durations, the container alone.

    Each DAG runs once untimed first: the first run on a fresh stack pays one-time costs.
    """
    for dag_id in (NOOP_DAG, JOB_DAG):
        timed_run(airflow, dag_id)
    samples: dict[str, list[float]] = {"docker": [], "noop": [], "job": [], "wall_noop": [], "wall_job": []}
    tasks: dict[str, list[float]] = {}  # durations of the task instances, by task, all rounds
    steps = ["docker", "noop", "job"]
    for k in range(repeats):
        for step in steps if k % 2 == 0 else steps[::-1]:
            if step == "docker":
                samples["docker"].append(docker_floor(mini_batches, instances))
                continue
            run = timed_run(airflow, NOOP_DAG if step == "noop" else JOB_DAG)
            samples[step].append(run.seconds)
            samples[f"wall_{step}"].append(run.wall)
            for task, seconds in run.durations.items():
                tasks.setdefault(task, []).extend(seconds)
    job = load_endpoint(deployments / f"{JOB_DAG}.yaml").deployments[0]
    user = security.container_user()
    alone = [run_runtime(job, f"bench-alone-{k}", user)[0] for k in range(3)]
    return {"samples": samples, "tasks": tasks, "alone": alone}


def _report(result: Result, measured: dict, mini_batches: int, instances: int, parallelism: int) -> None:
    """The medians of :func:`_measure`'s samples as figures, and the check."""
    samples, tasks = measured["samples"], measured["tasks"]
    n, k = mini_batches, instances
    t_docker, t_noop, t_job = (median(samples[key]) for key in ("docker", "noop", "job"))
    result.figure("mini_batches", n, "", f"mini-batches (one file each), {k} at a time, parallelism {parallelism}")
    result.figure("t_docker_runs", t_docker, "s", f"floor (b): {n} bare docker runs, {k} at a time")
    result.figure("t_noop_dag", t_noop, "s", f"floor (a): {n} mapped no-op tasks, trigger -> success")
    result.figure("t_job", t_job, "s", "job: plan, score x N, merge, trigger -> success")
    result.figure("wall_noop_dag", median(samples["wall_noop"]), "s", "no-op DAG as the client saw it (1 s polling)")
    result.figure("wall_job", median(samples["wall_job"]), "s", "job as the client saw it (1 s polling)")
    for task in ("noop", "plan", "score", "merge"):
        result.figure(f"{task}_task_s", median(tasks[task]), "s", f"{task} task instance, median duration")
    result.figure("bare_container_s", t_docker * k / n, "s", "one bare docker run (floor (b) per container)")
    result.figure("runtime_container_s", median(measured["alone"]), "s", "one mini-batch's scoring container alone")
    floors = t_noop + t_docker
    result.figure("overhead_per_mini_batch", (t_job - floors) / n, "s", "(t_job - floors) per mini-batch")
    result.check("t_job / (t_noop_dag + t_docker_runs)", t_job / floors, "<=", TARGET)
    shown = ", ".join(f"{key} {[round(v, 2) for v in samples[key]]}" for key in ("docker", "noop", "job"))
    result.notes.append(f"samples (s): {shown}")


def run(mini_batches: int = 20, instances: int = 2, repeats: int = 2) -> Result:
    """The job, the no-op DAG and the docker floor on one Airflow stack, ``repeats`` rounds.

    The order is reversed every other round, so neither side always runs on a fresher stack;
    the median of each counts.
    """
    require_image()
    result = Result(NAME, TITLE)
    with temp_folder(NAME) as root:
        dags, deployments = _stage(root, mini_batches, instances)
        try:
            with LocalAirflow(root / "airflow", dags, env={"BATCHSCORE_DEPLOYMENTS_DIR": str(deployments)}) as airflow:
                airflow.wait_for_dag(JOB_DAG)
                airflow.wait_for_dag(NOOP_DAG)
                measured = _measure(airflow, deployments, mini_batches, instances, repeats)
                parallelism = airflow.parallelism
        finally:
            remove_containers(f"batchscore.endpoint={JOB_DAG}")
    _report(result, measured, mini_batches, instances, parallelism)
    return result
