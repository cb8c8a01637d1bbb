"""The CeleryExecutor against the LocalExecutor (issue 7): the same job on one machine, one script.

A job of 20 one-file mini-batches with an instant model (warm workers, 2 at a time) and a DAG
of 20 mapped no-op tasks, 2 at a time, run on two stacks one after the other, both on one
PostgreSQL server (a database each), so that only the executor differs:
(a) :class:`~batchscore.localairflow.LocalAirflow` with the LocalExecutor (parallelism 4);
(b) the same with the CeleryExecutor, Redis, and two local Celery workers of 2 slots each.
PostgreSQL and Redis come from the distribution's packages (:mod:`batchscore.localservices`).
Each DAG runs once untimed on each stack; then medians of ``repeats`` runs, timed with the
API's own timestamps (trigger to end).

Target: ``t_job(celery) <= 1.2 * t_job(local)``: handing tasks through a broker to workers
that may be elsewhere costs little against the job itself.
"""

from __future__ import annotations

from batchscore.localairflow import LocalAirflow
from batchscore.localservices import Postgres, Redis
from bench.common import Result, median, remove_containers, require_image, stage_jobs, temp_folder
from bench.orchestration import INSTANT_SCRIPT, NOOP_DAG, NOOP_DAG_FILE
from bench.runs import timed_run

NAME = "celery"
TITLE = "CeleryExecutor (Redis, 2 local Celery workers) against LocalExecutor: 20 mini-batches, warm, 2 at a time"
TARGET = 1.2
JOB_DAG = "bench-celery"
SMALL = {"mini_batches": 2, "repeats": 1}


def _measure(airflow: LocalAirflow, repeats: int) -> dict[str, list[float]]:
    """The job and the no-op DAG: one untimed run each, then ``repeats`` timed runs, alternating."""
    for dag_id in (JOB_DAG, NOOP_DAG):
        airflow.wait_for_dag(dag_id)
        timed_run(airflow, dag_id)
    samples: dict[str, list[float]] = {"job": [], "noop": [], "score": []}
    for k in range(repeats):
        for step in ("job", "noop") if k % 2 == 0 else ("noop", "job"):
            run = timed_run(airflow, JOB_DAG if step == "job" else NOOP_DAG)
            samples[step].append(run.seconds)
            samples["score"].extend(run.durations.get("score", []))
    return samples


def run(mini_batches: int = 20, repeats: int = 3, instances: int = 2) -> Result:
    """Both stacks, one after the other, on one PostgreSQL server."""
    require_image()
    result = Result(NAME, TITLE)
    measured: dict[str, dict[str, list[float]]] = {}
    with temp_folder(NAME) as root:
        dags, deployments = stage_jobs(
            root, mini_batches, INSTANT_SCRIPT, {JOB_DAG: {"worker_mode": "warm"}}, instances=instances
        )
        (dags / "bench_noop_mapped.py").write_text(NOOP_DAG_FILE.format(dag_id=NOOP_DAG, n=mini_batches, k=instances))
        try:
            with Postgres() as postgres, Redis(root / "redis") as redis:  # stopped on any way out, a signal too
                common = {"BATCHSCORE_DEPLOYMENTS_DIR": str(deployments)}
                local = {**common, "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": postgres.create_database("local")}
                with LocalAirflow(root / "local", dags, env=local) as airflow:
                    measured["local"] = _measure(airflow, repeats)
                celery_db = postgres.create_database("celery")
                celery = {
                    **common,
                    "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
                    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": celery_db,
                    "AIRFLOW__CELERY__BROKER_URL": redis.url,
                    "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + celery_db,
                    "AIRFLOW__CELERY__WORKER_PREFETCH_MULTIPLIER": "1",
                }
                with LocalAirflow(root / "celery", dags, env=celery) as airflow:
                    for name in ("w1", "w2"):
                        airflow.start_celery_worker(name, concurrency=2)
                    measured["celery"] = _measure(airflow, repeats)
        finally:
            remove_containers(f"batchscore.endpoint={JOB_DAG}")
    n, k = mini_batches, instances
    t = {(stack, step): median(measured[stack][step]) for stack in measured for step in ("job", "noop", "score")}
    result.figure("mini_batches", n, "", f"one-file mini-batches, instant model, warm workers, {k} at a time")
    result.figure("t_job_local", t["local", "job"], "s", "job on the LocalExecutor, trigger -> success")
    result.figure("t_job_celery", t["celery", "job"], "s", "job on the CeleryExecutor, trigger -> success")
    result.figure("t_noop_local", t["local", "noop"], "s", f"{n} mapped no-op tasks on the LocalExecutor")
    result.figure("t_noop_celery", t["celery", "noop"], "s", f"{n} mapped no-op tasks on the CeleryExecutor")
    result.figure("score_task_local", t["local", "score"], "s", "score task instance, median duration, LocalExecutor")
    result.figure("score_task_celery", t["celery", "score"], "s", "score task instance, median duration, CeleryExecutor")
    result.figure(
        "celery_cost_per_mini_batch",
        (t["celery", "job"] - t["local", "job"]) / n,
        "s",
        "(t_job_celery - t_job_local) per mini-batch",
    )
    result.check("t_job_celery / t_job_local", t["celery", "job"] / t["local", "job"], "<=", TARGET)
    result.notes.append(
        "samples (s): "
        + "; ".join(
            f"{stack} {step} {[round(v, 2) for v in measured[stack][step]]}" for stack in measured for step in ("job", "noop")
        )
    )
    return result
