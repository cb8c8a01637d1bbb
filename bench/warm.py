"""Warm workers against one container per mini-batch (issue 8), side by side on one scheduler.

A scoring script whose ``init()`` sleeps 5 s and whose ``run()`` returns its input list at once;
20 one-file mini-batches, ``resources.instance_count: 2``, one worker process per container.
Two deployments of it, identical but for ``settings.worker_mode`` (``warm`` and
``per_mini_batch``), run as two DAGs on one :class:`~batchscore.localairflow.LocalAirflow`,
timed from trigger to end state with the API's timestamps. The per-mini-batch orchestration
floor is measured in the same run as :mod:`bench.orchestration` measures it: a DAG of 20 mapped
no-op tasks, 2 at a time, plus 20 bare ``docker run``s of the scoring image, 2 at a time.

Target: ``t_warm <= 1.2 * (2 * init + t_noop_dag + t_docker_runs)``, i.e. ``init()`` paid once
per worker, not once per mini-batch. After one untimed run of each DAG, medians of ``repeats``
rounds, every other round in reverse order.
"""

from __future__ import annotations

from pathlib import Path

from batchscore.localairflow import LocalAirflow
from bench.common import Result, median, remove_containers, require_image, stage_jobs, temp_folder
from bench.orchestration import NOOP_DAG, NOOP_DAG_FILE, docker_floor
from bench.runs import timed_run

NAME = "warm"
TITLE = "warm workers against a container per mini-batch: init() of 5 s, 20 mini-batches, 2 at a time"
TARGET = 1.2
WARM_DAG, COLD_DAG = "bench-warm", "bench-per-mini-batch"
INIT_SECONDS = 5.0
SMALL = {"mini_batches": 4, "init_seconds": 1.0, "repeats": 1}

SLOW_INIT_SCRIPT = "import time\n\n\ndef init():\n    time.sleep({init})\n\n\ndef run(mini_batch):\n    return list(mini_batch)\n"


def _stage(root: Path, mini_batches: int, instances: int, init_seconds: float) -> tuple[Path, Path]:
    """Inputs, code, model, the two YAMLs and the DAG folder; returns the DAG and deployments folders."""
    dags, deployments = stage_jobs(
        root,
        mini_batches,
        SLOW_INIT_SCRIPT.format(init=init_seconds),
        {WARM_DAG: {"worker_mode": "warm"}, COLD_DAG: {"worker_mode": "per_mini_batch"}},
        instances=instances,
    )
    (dags / "bench_noop_mapped.py").write_text(NOOP_DAG_FILE.format(dag_id=NOOP_DAG, n=mini_batches, k=instances))
    return dags, deployments


def run(mini_batches: int = 20, init_seconds: float = INIT_SECONDS, repeats: int = 2, instances: int = 2) -> Result:
    """Both modes, the no-op DAG and the docker floor on one Airflow stack, ``repeats`` rounds."""
    require_image()
    result = Result(NAME, TITLE)
    samples: dict[str, list[float]] = {"warm": [], "cold": [], "noop": [], "docker": []}
    tasks: dict[str, list[float]] = {}
    with temp_folder(NAME) as root:
        dags, deployments = _stage(root, mini_batches, instances, init_seconds)
        try:
            with LocalAirflow(root / "airflow", dags, env={"BATCHSCORE_DEPLOYMENTS_DIR": str(deployments)}) as airflow:
                for dag_id in (WARM_DAG, COLD_DAG, NOOP_DAG):
                    airflow.wait_for_dag(dag_id)
                for dag_id in (NOOP_DAG, WARM_DAG):  # the first run on a fresh stack pays one-time costs
                    timed_run(airflow, dag_id)
                steps = ["docker", "noop", "warm", "cold"]
                for k in range(repeats):
                    for step in steps if k % 2 == 0 else steps[::-1]:
                        if step == "docker":
                            samples["docker"].append(docker_floor(mini_batches, instances))
                            continue
                        dag_id = {"noop": NOOP_DAG, "warm": WARM_DAG, "cold": COLD_DAG}[step]
                        run = timed_run(airflow, dag_id)
                        samples[step].append(run.seconds)
                        for task, seconds in run.durations.items():
                            tasks.setdefault(f"{step}.{task}", []).extend(seconds)
        finally:
            for dag_id in (WARM_DAG, COLD_DAG):
                remove_containers(f"batchscore.endpoint={dag_id}")
    t_warm, t_cold, t_noop, t_docker = (median(samples[key]) for key in ("warm", "cold", "noop", "docker"))
    n, k = mini_batches, instances
    result.figure("init_s", init_seconds, "s", "what init() sleeps, per worker process")
    result.figure("t_warm", t_warm, "s", f"worker_mode warm: {n} mini-batches, {k} workers, trigger -> success")
    result.figure("t_per_mini_batch", t_cold, "s", "worker_mode per_mini_batch: the same job")
    result.figure("t_noop_dag", t_noop, "s", f"floor: {n} mapped no-op tasks, {k} at a time")
    result.figure("t_docker_runs", t_docker, "s", f"floor: {n} bare docker runs, {k} at a time")
    for task in ("warm.start_workers", "warm.score", "warm.stop_workers", "cold.score"):
        if task in tasks:
            result.figure(f"{task.replace('.', '_')}_s", median(tasks[task]), "s", f"{task} task instance, median duration")
    bound = 2 * init_seconds + t_noop + t_docker
    result.figure("bound_s", bound, "s", "2 x init + t_noop_dag + t_docker_runs")
    result.figure("speedup", t_cold / t_warm, "x", "per_mini_batch / warm")
    result.check("t_warm / (2 x init + floors)", t_warm / bound, "<=", TARGET)
    shown = ", ".join(f"{key} {[round(v, 2) for v in samples[key]]}" for key in samples)
    result.notes.append(f"samples (s): {shown}")
    return result
