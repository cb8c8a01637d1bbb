"""The Batch scoring report of one deployment in one DAG run: progress, timeline, failures, links.

It is what the UI plugin's JSON endpoint serves (:mod:`batchscore.ui.app`), built from two sources:

* the **run folder** (:mod:`batchscore_runtime.formats`): ``plan.json`` (the mini-batches and their
  files), each mini-batch's committed ``status.json`` (state, files, rows, failed items and their
  errors, worker, start and end) and, once merged, ``summary.json``;
* the **mapped score task's instances** as Airflow has them (state, try, start): what runs now, and
  the mini-batches whose task failed before it committed anything.

Nothing here imports Airflow: the caller hands in a :class:`FolderReader` (a local folder, or an
object-storage prefix) and the task instances as plain dicts, so the report is the same whichever
store holds the run folder, and it is tested without an api-server.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from batchscore_runtime.formats import (
    ERRORS_FILE_NAME,
    LEDGER_FILE_NAME,
    SUMMARY_FILE_NAME,
    MiniBatchStatus,
    Plan,
    RunLayout,
    Summary,
)

#: The layout of a run folder, relative to its root (``_batchscore/plan.json``, ...).
RELATIVE = RunLayout(Path(""))
#: Task instance states of a mini-batch being scored, or about to be.
RUNNING_STATES = ("running", "restarting", "deferred")
QUEUED_STATES = ("scheduled", "queued", "up_for_retry", "up_for_reschedule")
#: Task instance states of a mini-batch whose task ended without a result.
FAILED_STATES = ("failed", "upstream_failed")
#: The record files a link is given for, by their key in the report.
RECORD_FILES = {"summary": SUMMARY_FILE_NAME, "ledger": LEDGER_FILE_NAME, "errors": ERRORS_FILE_NAME}
#: The most failures one report lists (the errors file has them all).
MAX_FAILURES = 500


#: Reads one file of a run folder by its path relative to the root (``_batchscore/plan.json``): its
#: bytes, or ``None`` when it is not there. ``stamp`` is ``None``, or something that changes whenever
#: the file may have (a reader may cache the file's bytes under it).
FolderReader = Callable[[str, Any], bytes | None]


@dataclass(frozen=True)
class TaskInstance:
    """What the report needs of one mapped score task instance (from Airflow's database or REST API)."""

    map_index: int
    state: str | None
    try_number: int = 0
    start_date: datetime | None = None
    end_date: datetime | None = None
    hostname: str = ""

    @property
    def stamp(self) -> tuple[Any, ...]:
        """Changes whenever the mini-batch's status may have: a status is committed only by a try."""
        return (self.state, self.try_number, self.end_date)


@dataclass
class Progress:
    """Counts of one deployment's run so far, with its pace and what it predicts."""

    mini_batches_total: int = 0
    mini_batches_succeeded: int = 0
    mini_batches_failed: int = 0
    mini_batches_running: int = 0
    mini_batches_queued: int = 0
    items_total: int = 0
    items_succeeded: int = 0
    items_failed: int = 0
    rows: int = 0
    elapsed_seconds: float | None = None
    rows_per_second: float | None = None
    eta_seconds: float | None = None


@dataclass
class Bar:
    """One mini-batch on the timeline: who scored it, from when to when (``end`` ``None``: still running)."""

    mini_batch: str
    map_index: int
    state: str
    start: str
    end: str | None
    rows: int = 0


@dataclass
class Failure:
    """One row of the failures table: a failed mini-batch, or a failed item of a succeeded one."""

    mini_batch: str
    map_index: int
    task_id: str
    file: str | None
    record: int | None
    error: str
    whole: bool  # the mini-batch has no result (a failed item leaves the rest of its mini-batch scored)


@dataclass
class DeploymentReport:
    """The report of one deployment (task group) of a run; :meth:`to_json` is what the page draws."""

    name: str
    score_task_id: str
    phase: str = "waiting"  # waiting | scoring | merged
    message: str | None = None
    progress: Progress = field(default_factory=Progress)
    lanes: dict[str, list[Bar]] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    failures_total: int = 0
    summary: dict[str, Any] | None = None
    records: dict[str, str | None] = field(default_factory=dict)  # key -> name in the run folder (None: not there)
    timeline_start: str | None = None
    timeline_end: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "score_task_id": self.score_task_id,
            "phase": self.phase,
            "message": self.message,
            "progress": vars(self.progress),
            "timeline": {
                "start": self.timeline_start,
                "end": self.timeline_end,
                "lanes": [{"worker": w, "bars": [vars(b) for b in bars]} for w, bars in sorted(self.lanes.items())],
            },
            "failures": [vars(f) for f in self.failures],
            "failures_total": self.failures_total,
            "summary": self.summary,
            "records": self.records,
        }


def _iso(at: datetime | None) -> str | None:
    return at.astimezone(UTC).isoformat(timespec="milliseconds") if at is not None else None


def _time(iso: str) -> datetime | None:
    if not iso:
        return None
    try:
        at = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def _json(read: FolderReader, rel: Path, stamp: Any = None) -> dict[str, Any] | None:
    data = read(rel.as_posix(), stamp)
    return None if data is None else json.loads(data)


def build(
    name: str,
    score_task_id: str,
    read: FolderReader,
    task_instances: Iterable[TaskInstance],
    now: datetime | None = None,
) -> DeploymentReport:
    """The report of deployment ``name`` from its run folder (``read``) and its score task's instances.

    :param name: the deployment, which is the task group's id.
    :param score_task_id: the mapped score task (``<name>.score``), whose map index is the
        mini-batch's position in the plan.
    :param read: reads the run folder's files (see :data:`FolderReader`).
    :param task_instances: the score task's instances in this run (none before the plan ran).
    :param now: the time the pace and the ETA are reckoned at; default: now.
    """
    now = now or datetime.now(UTC)
    report = DeploymentReport(name, score_task_id)
    plan_json = _json(read, RELATIVE.plan_file)
    if plan_json is None:
        report.message = "No plan yet: the plan task has not finished."
        return report
    plan = Plan.from_json(plan_json)
    tis = {ti.map_index: ti for ti in task_instances}
    statuses: dict[int, MiniBatchStatus] = {}
    for position, entry in enumerate(plan.mini_batches):
        ti = tis.get(position)
        if ti is not None and ti.state in RUNNING_STATES + QUEUED_STATES:
            continue  # its status was withdrawn for this try
        data = _json(read, RELATIVE.mini_batch_dir(entry.index).status_file, ti.stamp if ti is not None else None)
        if data is not None:
            statuses[position] = MiniBatchStatus.from_json(data)
    report.phase = "scoring"
    _count(report, plan, statuses, tis)
    _timeline(report, plan, statuses, tis, now)
    _failures(report, plan, statuses, tis)
    _pace(report, statuses, now)
    summary_json = _json(read, RELATIVE.summary_file)
    if summary_json is not None:
        summary = Summary.from_json(summary_json)
        if summary.run_id == plan.run_id:
            report.phase = "merged"
            report.summary = {
                "status": summary.status,
                "rows": summary.rows,
                "rows_per_second": summary.rows_per_second,
                "output": summary.output,
                "error": summary.error,
                "merged_at": summary.merged_at,
                "scoring_wall_seconds": summary.durations.scoring_wall_seconds,
            }
            if summary.rows_per_second is not None:
                report.progress.rows_per_second = summary.rows_per_second
            report.progress.eta_seconds = 0.0
    report.records = _records(report.summary["output"] if report.summary else None, merged=report.phase == "merged")
    return report


def _records(output: str | None, merged: bool) -> dict[str, str | None]:
    """The record files' names in the run folder by key (``None``: not there before the merge)."""
    names: dict[str, str | None] = {key: name if merged else None for key, name in RECORD_FILES.items()}
    names["output"] = output.replace("\\", "/").rsplit("/", 1)[-1] if output else None
    return names


def records(read: FolderReader) -> dict[str, str | None]:
    """The record files of a run folder by key (``output``, ``summary``, ``ledger``, ``errors``), from its summary
    alone; ``None`` each before its first merge."""
    summary_json = _json(read, RELATIVE.summary_file)
    if summary_json is None:
        return _records(None, merged=False)
    return _records(Summary.from_json(summary_json).output, merged=True)


def _count(report: DeploymentReport, plan: Plan, statuses: dict[int, MiniBatchStatus], tis: dict[int, TaskInstance]) -> None:
    p = report.progress
    p.mini_batches_total = len(plan.mini_batches)
    p.items_total = plan.files
    for position, entry in enumerate(plan.mini_batches):
        status = statuses.get(position)
        ti = tis.get(position)
        if status is not None and status.succeeded:
            p.mini_batches_succeeded += 1
            p.items_failed += min(status.failed_items, status.files)
            p.items_succeeded += status.files - min(status.failed_items, status.files)
            p.rows += status.rows
        elif status is not None or (ti is not None and ti.state in FAILED_STATES):
            p.mini_batches_failed += 1
            p.items_failed += entry.files
        elif ti is not None and ti.state in RUNNING_STATES:
            p.mini_batches_running += 1
        elif ti is not None and ti.state in QUEUED_STATES:
            p.mini_batches_queued += 1


def _timeline(
    report: DeploymentReport, plan: Plan, statuses: dict[int, MiniBatchStatus], tis: dict[int, TaskInstance], now: datetime
) -> None:
    """Bars per worker: a warm worker's name, else one lane per slot of the host that ran the task (a mini-batch
    goes into the first lane free when it started), so lanes show how many ran at once."""
    bars: list[tuple[str | None, str, Bar]] = []  # (worker, host, bar)
    for position, entry in enumerate(plan.mini_batches):
        status, ti = statuses.get(position), tis.get(position)
        if status is not None and _time(status.started_at) is not None:
            end = status.finished_at if _time(status.finished_at) is not None else None
            bar = Bar(entry.id, position, status.state, status.started_at, end, status.rows)
            bars.append((status.worker, ti.hostname if ti else "", bar))
        elif ti is not None and ti.state in RUNNING_STATES and ti.start_date is not None:
            bars.append((None, ti.hostname, Bar(entry.id, position, "running", _iso(ti.start_date) or "", None)))
    bars.sort(key=lambda b: (_time(b[2].start) or now, b[2].map_index))
    free_at: dict[str, list[datetime]] = {}  # host -> when each of its slots is free again
    for worker, host, bar in bars:
        if worker:
            report.lanes.setdefault(worker, []).append(bar)
            continue
        start = _time(bar.start) or now
        free_from = (_time(bar.end) if bar.end else now) or now
        slots = free_at.setdefault(host, [])
        slot = next((i for i, free in enumerate(slots) if free <= start), len(slots))
        if slot == len(slots):
            slots.append(free_from)
        else:
            slots[slot] = free_from
        lane = f"{host + ' ' if host else ''}slot {slot + 1}"
        report.lanes.setdefault(lane, []).append(bar)
    starts = [t for _, _, b in bars if (t := _time(b.start)) is not None]
    ends = [(_time(b.end) if b.end else now) or now for _, _, b in bars]
    report.timeline_start = _iso(min(starts)) if starts else None
    report.timeline_end = _iso(max(ends)) if ends else None


def _failures(report: DeploymentReport, plan: Plan, statuses: dict[int, MiniBatchStatus], tis: dict[int, TaskInstance]) -> None:
    rows: list[Failure] = []
    for position, entry in enumerate(plan.mini_batches):
        status, ti = statuses.get(position), tis.get(position)
        task = report.score_task_id
        if status is not None and not status.succeeded:
            error = status.error
            text = error.one_line() if error else "failed (its status gives no error)"
            rows.append(Failure(entry.id, position, task, error.file if error else None, None, text, True))
        elif status is None and ti is not None and ti.state in FAILED_STATES:
            text = f"the task {ti.state.replace('_', ' ')} without committing a result: see its log (try {ti.try_number})"
            rows.append(Failure(entry.id, position, task, None, None, text, True))
        if status is not None:
            for item in status.item_errors:
                rows.append(Failure(entry.id, position, task, item.file, item.record, f"{item.type}: {item.message}", False))
    report.failures_total = len(rows)
    report.failures = rows[:MAX_FAILURES]


def _pace(report: DeploymentReport, statuses: dict[int, MiniBatchStatus], now: datetime) -> None:
    """Rows per second of wall time since the first mini-batch started, and the time left at the pace of the
    items done so far (``None`` until one mini-batch is done)."""
    p = report.progress
    starts = [t for s in statuses.values() if (t := _time(s.started_at)) is not None]
    if not starts:
        return
    done = p.mini_batches_succeeded + p.mini_batches_failed
    still = p.mini_batches_total - done
    if still == 0:  # all done: the pace of the scoring itself, not of the time since
        now = max((t for s in statuses.values() if (t := _time(s.finished_at)) is not None), default=now)
    elapsed = max((now - min(starts)).total_seconds(), 1e-3)
    p.elapsed_seconds = round(elapsed, 3)
    p.rows_per_second = round(p.rows / elapsed, 3)
    items_done = p.items_succeeded + p.items_failed
    if still == 0:
        p.eta_seconds = 0.0
    elif items_done:
        p.eta_seconds = round((p.items_total - items_done) * elapsed / items_done, 1)


def local_reader(root: Path) -> FolderReader:
    """A :data:`FolderReader` of a run folder on this host (never outside it: ``rel`` comes from this module)."""

    def read(rel: str, stamp: Any = None) -> bytes | None:
        try:
            return (root / rel).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    return read


__all__ = ["DeploymentReport", "FolderReader", "TaskInstance", "build", "local_reader", "records"]
