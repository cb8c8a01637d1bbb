"""The busy fraction of a run: how much of the scoring wall time its workers spent scoring.

``busy fraction = busy seconds / (workers x scoring wall seconds)``, the wall time running from
the first mini-batch's start to the last one's end. 1.0: every worker scored all the time;
what is missing is time a worker waited for its next mini-batch (Airflow's task life cycle,
the hand-over, staging that was not done ahead).

* Warm workers (:func:`warm_busy_fraction`): each worker's daemon records the seconds it spent
  scoring and when it took its first and finished its last mini-batch (``state.json``); the
  workers are those the run started (one that scored nothing was idle all the time).
* A container per mini-batch (:func:`per_mini_batch_busy_fraction`): each committed status's
  start and end (the container's start-up and ``init()`` count as busy: the slot is taken);
  the workers are ``resources.instance_count``, the most containers that run at once.

No Airflow import.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from batchscore_runtime.formats import MiniBatchStatus, WarmWorkerInfo


def _time(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text) if text else None
    except (TypeError, ValueError):  # a worker's state file is untrusted: a bad time is no time
        return None


def _fraction(busy: float, workers: int, start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None or workers < 1:
        return None
    wall = (end - start).total_seconds()
    if wall <= 0:
        return None
    return round(min(1.0, busy / (workers * wall)), 3)


def warm_busy_fraction(workers: list[WarmWorkerInfo]) -> float | None:
    """The busy fraction of a run's warm workers; None when none of them scored a mini-batch."""
    starts = [t for w in workers if (t := _time(w.first_started_at)) is not None]
    ends = [t for w in workers if (t := _time(w.last_ended_at)) is not None]
    busy = sum(max(0.0, float(w.busy_seconds)) for w in workers)
    return _fraction(busy, len(workers), min(starts, default=None), max(ends, default=None))


def per_mini_batch_busy_fraction(statuses: Iterable[MiniBatchStatus], instance_count: int) -> float | None:
    """The busy fraction of containers started one per mini-batch; None when no status has both times."""
    spans = [
        (start, end)
        for s in statuses
        if (start := _time(s.started_at)) is not None and (end := _time(s.finished_at)) is not None and end >= start
    ]
    if not spans:
        return None
    busy = sum((end - start).total_seconds() for start, end in spans)
    return _fraction(busy, instance_count, min(s for s, _ in spans), max(e for _, e in spans))


__all__ = ["per_mini_batch_busy_fraction", "warm_busy_fraction"]
