"""Deferrable score tasks against score tasks that wait on their worker (issue 18), side by side on one scheduler.

Three deployments of one job, all ``worker_mode: warm``: ``deferrable`` false and true with
``worker_queue_depth`` 2, and true with depth 4: one-file mini-batches, a ``run()`` that takes ``run_seconds``,
``resources.instance_count: 2``, as three DAGs on one :class:`~batchscore.localairflow.LocalAirflow`
(with its triggerer). Each is timed from trigger to end state with the API's timestamps, and its
busy fraction is read from its ``summary.json``. After one untimed run of each DAG, medians of
``repeats`` rounds, every other round in reverse order. No target: it chooses the default.
"""

from __future__ import annotations

from pathlib import Path

from batchscore.localairflow import LocalAirflow
from batchscore_runtime.formats import Summary, run_key
from bench.common import Result, median, remove_containers, require_image, stage_jobs, temp_folder
from bench.runs import timed_run

NAME = "deferrable"
TITLE = "deferrable score tasks against waiting ones: warm workers, 20 mini-batches of 0.3 s, 2 workers"
WAITING_DAG, DEFERRED_DAG, DEEP_DAG = "bench-waiting", "bench-deferred", "bench-deferred-deep"
#: The third job's queue: a deferred task holds no slot, so a deeper queue costs no Airflow worker.
DEEP_QUEUE = 4
SMALL = {"mini_batches": 4, "repeats": 1}
OPTIONS = {"repeats": (int, "rounds of each job (deferrable: default 3)")}

SCRIPT = "import time\n\n\ndef init():\n    pass\n\n\ndef run(mini_batch):\n    time.sleep({run})\n    return list(mini_batch)\n"


def _timed(airflow: LocalAirflow, dag_id: str, output: Path) -> tuple[float, float | None]:
    """Trigger ``dag_id``; its trigger-to-end seconds (the API's timestamps) and its busy fraction."""
    run = timed_run(airflow, dag_id)
    summary = Summary.read(output / dag_id / run_key(run.run_id) / "summary.json")
    return run.seconds, summary.busy_fraction


def run(mini_batches: int = 20, run_seconds: float = 0.3, repeats: int = 3, instances: int = 2) -> Result:
    """Both settings on one Airflow stack, ``repeats`` rounds."""
    require_image()
    result = Result(NAME, TITLE)
    steps = ("waiting", "deferred", "deep")
    seconds: dict[str, list[float]] = {step: [] for step in steps}
    busy: dict[str, list[float]] = {step: [] for step in steps}
    dag_ids = {"waiting": WAITING_DAG, "deferred": DEFERRED_DAG, "deep": DEEP_DAG}
    with temp_folder(NAME) as root:
        dags, deployments = stage_jobs(
            root,
            mini_batches,
            SCRIPT.format(run=run_seconds),
            {
                WAITING_DAG: {"worker_mode": "warm", "deferrable": False},
                DEFERRED_DAG: {"worker_mode": "warm", "deferrable": True},
                DEEP_DAG: {"worker_mode": "warm", "deferrable": True, "worker_queue_depth": DEEP_QUEUE},
            },
            instances=instances,
        )
        try:
            with LocalAirflow(root / "airflow", dags, env={"BATCHSCORE_DEPLOYMENTS_DIR": str(deployments)}) as airflow:
                for dag_id in dag_ids.values():
                    airflow.wait_for_dag(dag_id)
                    _timed(airflow, dag_id, root / "output")  # the first run on a fresh stack pays one-time costs
                for k in range(repeats):
                    for step in steps if k % 2 == 0 else steps[::-1]:
                        t, fraction = _timed(airflow, dag_ids[step], root / "output")
                        seconds[step].append(t)
                        if fraction is not None:
                            busy[step].append(fraction)
        finally:
            for dag_id in dag_ids.values():
                remove_containers(f"batchscore.endpoint={dag_id}")
    n, k = mini_batches, instances
    t_wait, t_defer, t_deep = (median(seconds[step]) for step in steps)
    result.figure("t_waiting", t_wait, "s", f"deferrable false: {n} mini-batches, {k} warm workers, trigger -> success")
    result.figure("t_deferred", t_defer, "s", "deferrable true: the same job")
    result.figure("t_deferred_deep", t_deep, "s", f"deferrable true, worker_queue_depth {DEEP_QUEUE}: the same job")
    result.figure("ratio", t_defer / t_wait, "x", "deferred / waiting")
    result.figure("ratio_deep", t_deep / t_wait, "x", f"deferred with depth {DEEP_QUEUE} / waiting")
    for step in steps:
        if busy[step]:
            result.figure(f"busy_{step}", median(busy[step]), "", f"busy fraction, {step}")
    shown = ", ".join(f"{step} {[round(v, 2) for v in seconds[step]]}" for step in steps)
    result.notes.append(f"samples (s): {shown}")
    return result
