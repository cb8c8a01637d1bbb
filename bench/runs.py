"""A DAG run timed as every end-to-end benchmark times it: trigger, wait for its end, read the API's timestamps.

The time of a run is the REST API's ``queued_at`` to ``end_date`` (the scheduler's own clock, not
this client's polling); the client's wall time and the durations of the run's task instances come
with it. A run that does not succeed fails the benchmark, naming its task instances.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from batchscore.localairflow import LocalAirflow
from bench.common import stopwatch


@dataclass(frozen=True)
class TimedRun:
    """One successful DAG run and how long it took."""

    run_id: str
    seconds: float  # the API's trigger-to-end seconds (queued_at -> end_date)
    wall: float  # this client's seconds from the trigger to seeing the run end
    durations: dict[str, list[float]]  # the durations of its task instances, by task (``plan``, ``score``, ...)


def utc(iso: str) -> datetime:
    """A time from the REST API ("Z" or an offset)."""
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


def timed_run(airflow: LocalAirflow, dag_id: str, timeout: float = 900) -> TimedRun:
    """Trigger ``dag_id`` and wait (at most ``timeout`` seconds) for it to succeed; else ``RuntimeError``."""
    with stopwatch() as wall:
        run_id = airflow.trigger(dag_id)
        state = airflow.wait_for_run(dag_id, run_id, timeout=timeout)
    if state != "success":
        raise RuntimeError(f"run {run_id} of {dag_id} ended {state}: {airflow.task_instances(dag_id, run_id)}")
    run = airflow.dag_run(dag_id, run_id)
    durations: dict[str, list[float]] = {}
    for ti in airflow.task_instances(dag_id, run_id):
        durations.setdefault(ti["task_id"].rsplit(".", 1)[-1], []).append(ti["duration"])
    return TimedRun(run_id, (utc(run["end_date"]) - utc(run["queued_at"])).total_seconds(), wall[0], durations)


__all__ = ["TimedRun", "timed_run", "utc"]
