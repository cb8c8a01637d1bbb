"""The busy fraction (batchscore.busy): busy seconds / (workers x scoring wall seconds), from real records."""

from __future__ import annotations

from batchscore.busy import per_mini_batch_busy_fraction, warm_busy_fraction
from batchscore_runtime.formats import MiniBatchStatus, WarmWorkerInfo


def worker(name: str, busy: float, first: str, last: str, mini_batches: int = 1) -> WarmWorkerInfo:
    return WarmWorkerInfo(
        worker=name,
        state="ready",
        init_seconds=1.0,
        processes=1,
        mini_batches=[f"mb-{i:05d}" for i in range(mini_batches)],
        error=None,
        busy_seconds=busy,
        first_started_at=first,
        last_ended_at=last,
    )


def status(index: int, started: str, finished: str) -> MiniBatchStatus:
    return MiniBatchStatus(index=index, state="succeeded", files=1, started_at=started, finished_at=finished)


T = "2026-01-01T00:00:{:02d}.000+00:00"


def test_warm_workers_busy_fraction_is_their_busy_seconds_over_workers_times_the_wall_from_first_start_to_last_end() -> None:
    # 10 s of wall (0 to 10), 2 workers: 20 worker-seconds, 15 of them busy.
    workers = [worker("w1", 9.0, T.format(0), T.format(9), 3), worker("w2", 6.0, T.format(2), T.format(10), 2)]
    assert warm_busy_fraction(workers) == 0.75
    # A worker that scored nothing was idle all along: it counts, with no time of its own.
    assert warm_busy_fraction([*workers, worker("w3", 0.0, "", "", 0)]) == 0.5
    assert warm_busy_fraction([worker("w1", 0.0, "", "", 0)]) is None  # nothing scored: no wall time
    assert warm_busy_fraction([worker("w1", 3.0, "not a time", T.format(3))]) is None  # untrusted and unreadable
    assert warm_busy_fraction([]) is None


def test_per_mini_batch_busy_fraction_is_the_statuses_spans_over_instance_count_times_their_wall() -> None:
    statuses = [status(0, T.format(0), T.format(4)), status(1, T.format(0), T.format(2)), status(2, T.format(4), T.format(8))]
    assert per_mini_batch_busy_fraction(statuses, instance_count=2) == 0.625  # 10 busy of 2 x 8
    assert per_mini_batch_busy_fraction([status(0, "", T.format(1))], instance_count=2) is None  # no start: omitted
    assert per_mini_batch_busy_fraction([], instance_count=2) is None
