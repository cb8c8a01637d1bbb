"""Many mini-batches (issue 6): a job of 5,000 mini-batches runs to the end on a real scheduler.

Not a ratio but a capacity check, so it is opt-in (``python -m bench scale``; ``make bench`` runs
the others): 5,000 one-line input files, ``mini_batch_size: 1``, an instant scoring script, warm
workers (``resources.instance_count: 4``), one run on a :class:`~batchscore.localairflow.LocalAirflow`
with its ``[core] max_map_length`` of 10,000 (Airflow's default of 1,024 would refuse the
expansion). It reports the time from trigger to end state, per mini-batch, and checks that every
mini-batch was scored once and the output has every row in input order.
"""

from __future__ import annotations

import pandas as pd

from batchscore.localairflow import LocalAirflow
from batchscore_runtime.formats import Summary, run_key
from bench.common import Result, remove_containers, require_image, stage_jobs, stopwatch, temp_folder

NAME = "scale"
TITLE = "a job of 5,000 mini-batches on a real scheduler (warm workers), end to end"
JOB_DAG = "bench-scale"
SMALL = {"mini_batches": 30}
OPT_IN = True  # about 40 minutes on 2 cores: run by name only

SCRIPT = "import os\n\n\ndef init():\n    pass\n\n\ndef run(mini_batch):\n    return [os.path.basename(p) for p in mini_batch]\n"


def run(mini_batches: int = 5000, instances: int = 4) -> Result:
    """One run of the job; the figures and the check that every mini-batch was scored once."""
    require_image()
    result = Result(NAME, TITLE)
    with temp_folder(NAME) as root:
        dags, deployments = stage_jobs(
            root, mini_batches, SCRIPT, {JOB_DAG: {"worker_mode": "warm"}}, instances=instances, width=5
        )
        try:
            with LocalAirflow(root / "airflow", dags, env={"BATCHSCORE_DEPLOYMENTS_DIR": str(deployments)}) as af:
                af.wait_for_dag(JOB_DAG)
                with stopwatch() as wall:
                    run_id = af.trigger(JOB_DAG)
                    state = af.wait_for_run(JOB_DAG, run_id, timeout=4 * 3600)
                tis = af.task_instances(JOB_DAG, run_id)
        finally:
            remove_containers(f"batchscore.endpoint={JOB_DAG}")
        run_dir = root / "output" / run_key(run_id)
        summary = Summary.read(run_dir / "summary.json")  # None when the merge never ran
        predictions = pd.read_csv(run_dir / "predictions.csv") if (run_dir / "predictions.csv").exists() else None
    scored = [t for t in tis if t["task_id"].endswith(".score") and t["state"] == "success"]
    in_order = predictions is not None and predictions["result"].tolist() == [f"item-{i:05d}.txt" for i in range(mini_batches)]
    result.figure("mini_batches", mini_batches, "", f"one file each, {instances} warm workers, parallelism {af.parallelism}")
    result.figure("t_job", wall[0], "s", f"trigger -> {state}")
    result.figure("per_mini_batch", wall[0] / mini_batches, "s", "t_job / mini-batches")
    result.figure("score_tasks_succeeded", len(scored), "", "mapped score instances in state success")
    result.figure("warm_workers", len(summary.warm_workers) if summary else 0, "", "worker containers the run started")
    result.check("mini-batches scored, output exact and in order", len(scored) if in_order else 0, ">=", mini_batches)
    result.notes.append(f"run {run_id}: {state}; summary status {summary and summary.status}, rows {summary and summary.rows}")
    return result
