"""The progress line of ``python -m batchscore run``: mini-batches done, failed and running of the total, rows
scored, rows/s and the ETA.

* :class:`Progress` is what is known of a run at one moment; :func:`progress_line` formats it (a pure function).
* :class:`ProgressReader` gathers it: the mini-batches from the score tasks' mapped instances (REST API), the
  rows from the mini-batches' committed statuses in the run folders on this host (a run folder on object
  storage has its mirror here, where the tasks of a local Airflow commit), else from the score tasks' XCom
  return values (``{"rows", "failed_items"}``) through the API, else none (only mini-batches are shown).
* :class:`ProgressDisplay` shows it: on a terminal one line rewritten in place (``\\r``); otherwise a plain
  line now and then (every :data:`PLAIN_EVERY_S` seconds at most, and only when something changed), and the last one.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

from batchscore.airflowapi import AirflowClient, LocalAirflowError
from batchscore.errors import BatchScoreError
from batchscore.spec import DeploymentSpec

__all__ = ["PLAIN_EVERY_S", "Progress", "ProgressDisplay", "ProgressReader", "format_duration", "format_rate", "progress_line"]

#: Seconds between two plain progress lines (output that is not a terminal), at least.
PLAIN_EVERY_S = 5.0
#: Score task instances still to come or going: "running" in the line.
_RUNNING = ("running", "queued", "scheduled", "up_for_retry", "up_for_reschedule", "restarting", "deferred")


@dataclass(frozen=True)
class Progress:
    """What is known of a run's scoring at one moment, all deployments together.

    :param total: mini-batches planned; ``None`` while a plan is still to run.
    :param done: mini-batches whose score task succeeded.
    :param failed: mini-batches whose score task failed (or was skipped for a failure upstream).
    :param running: mini-batches being scored or waiting for a slot.
    :param rows: rows (items) the done mini-batches scored; ``None`` when they cannot be read from here.
    :param failed_items: items that failed inside done mini-batches; ``None`` when unknown.
    """

    total: int | None
    done: int = 0
    failed: int = 0
    running: int = 0
    rows: int | None = None
    failed_items: int | None = None


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``: short enough for a progress line."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_rate(per_second: float) -> str:
    """``12,345``, ``42.5``, ``0.08``: whole numbers from 100 on, else two significant digits or so."""
    if per_second >= 100:
        return f"{per_second:,.0f}"
    if per_second >= 1:
        return f"{per_second:.1f}"
    return f"{per_second:.2f}"


def progress_line(p: Progress, elapsed: float) -> str:
    """One line for ``p``, ``elapsed`` seconds after the scoring started.

    The rate is the rows (or, with no rows known, nothing) over ``elapsed``; the ETA extrapolates the mini-batches
    finished so far (done or failed) over ``elapsed`` to those left: none before the first one finished.
    """
    if p.total is None:
        return "mini-batches: planning ..."
    finished = p.done + p.failed
    parts = [f"mini-batches {finished}/{p.total}: {p.done} done, {p.failed} failed, {p.running} running"]
    if p.rows is not None:
        items = f"{p.rows:,} row{'' if p.rows == 1 else 's'}"
        if p.failed_items:
            items += f" ({p.failed_items:,} failed item{'' if p.failed_items == 1 else 's'})"
        parts.append(items)
        if elapsed > 0 and p.rows:
            parts.append(f"{format_rate(p.rows / elapsed)} rows/s")
    if finished >= p.total:
        parts.append(f"took {format_duration(elapsed)}")
    elif finished and elapsed > 0:
        parts.append(f"ETA {format_duration(elapsed / finished * (p.total - finished))}")
    else:
        parts.append("ETA --")
    return " | ".join(parts)


class ProgressReader:
    """Reads a run's :class:`Progress` through the API and from its run folders on this host.

    :param client: the API of the Airflow that runs it.
    :param dag_id: the endpoint's DAG.
    :param run_id: the run.
    :param deployments: the endpoint's deployments, as this run sees them (its conf applied).
    """

    def __init__(self, client: AirflowClient, dag_id: str, run_id: str, deployments: list[DeploymentSpec]) -> None:
        self.client = client
        self.dag_id = dag_id
        self.run_id = run_id
        self.folders = {d.name: self._results_dir(d, run_id) for d in deployments}
        self._statuses: dict[Path, tuple[int, int, int]] = {}  # status.json -> (mtime_ns, rows, failed_items)
        self._xcoms: dict[tuple[str, int], tuple[int, int]] = {}  # (task_id, map_index) -> (rows, failed_items)

    @staticmethod
    def _results_dir(deployment: DeploymentSpec, run_id: str) -> Path | None:
        from batchscore.run_store import place

        try:
            return place(deployment, run_id).layout.results_dir
        except BatchScoreError:  # a storage URI this host cannot place: the rows come from the API
            return None

    def read(self) -> Progress:
        """The progress now (raises :class:`LocalAirflowError` when the API does not answer)."""
        tis = self.client.task_instances(self.dag_id, self.run_id)
        total: int | None = 0
        done = failed = running = rows = failed_items = 0
        rows_known = True
        for name, folder in self.folders.items():
            mapped = [ti for ti in tis if ti["task_id"] == f"{name}.score" and ti.get("map_index", -1) >= 0]
            if not mapped and not self._planned_empty(tis, name):
                total = None
                continue
            if total is not None:
                total += len(mapped)
            states = [ti.get("state") for ti in mapped]
            done += states.count("success")
            failed += states.count("failed") + states.count("upstream_failed")
            running += sum(states.count(s) for s in _RUNNING)
            found = self._rows_from(folder) if folder is not None else None
            if found is None:
                found = self._rows_from_xcom([ti for ti in mapped if ti.get("state") == "success"])
            if found is None:
                rows_known = False
            else:
                rows += found[0]
                failed_items += found[1]
        if not rows_known:
            return Progress(total, done, failed, running)
        return Progress(total, done, failed, running, rows, failed_items)

    @staticmethod
    def _planned_empty(tis: list[dict], name: str) -> bool:
        """Whether the deployment's plan ran and left no mini-batch (its score task then has no mapped instance)."""
        return any(ti["task_id"] == f"{name}.plan" and ti.get("state") == "success" for ti in tis) and any(
            ti["task_id"] == f"{name}.score" and ti.get("state") in ("skipped", "success") for ti in tis
        )

    def _rows_from(self, results: Path) -> tuple[int, int] | None:
        """Rows and failed items of the committed statuses under ``results``; ``None`` when it is not here."""
        if not results.parent.is_dir():
            return None
        rows = failed_items = 0
        for status in results.glob("mb-*/status.json"):
            try:
                mtime = status.stat().st_mtime_ns
                cached = self._statuses.get(status)
                if cached is None or cached[0] != mtime:
                    data = json.loads(status.read_text(encoding="utf-8"))
                    cached = (mtime, int(data.get("rows") or 0), int(data.get("failed_items") or 0))
                    self._statuses[status] = cached
            except (OSError, ValueError):  # being replaced by a rerun: next time
                continue
            rows += cached[1]
            failed_items += cached[2]
        return rows, failed_items

    def _rows_from_xcom(self, succeeded: list[dict]) -> tuple[int, int] | None:
        """Rows and failed items from the return values of the score tasks that succeeded; ``None`` if unreadable."""
        rows = failed_items = 0
        for ti in succeeded:
            key = (ti["task_id"], ti["map_index"])
            if key not in self._xcoms:
                try:
                    value = self._xcom_value(ti)
                except LocalAirflowError:
                    return None
                self._xcoms[key] = (int(value.get("rows") or 0), int(value.get("failed_items") or 0))
            rows += self._xcoms[key][0]
            failed_items += self._xcoms[key][1]
        return rows, failed_items

    def _xcom_value(self, ti: dict) -> dict[str, Any]:
        dag, run, task = (quote(part, safe="") for part in (self.dag_id, self.run_id, ti["task_id"]))
        path = f"/api/v2/dags/{dag}/dagRuns/{run}/taskInstances/{task}/xcomEntries/return_value"
        answer = self.client.api("GET", path, query={"map_index": ti["map_index"], "deserialize": "true"})
        value = answer.get("value") if isinstance(answer, dict) else None
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = json.loads(value)
        if not isinstance(value, dict):
            raise LocalAirflowError(f"the return value of {ti['task_id']} [{ti['map_index']}] is no dict: {value!r}")
        return value


class ProgressDisplay:
    """Shows :class:`Progress` on ``stream``: one line rewritten in place on a terminal, plain lines otherwise.

    :param stream: where to write (standard output by default).
    :param tty: whether it is a terminal; by default, what ``stream.isatty()`` says.
    """

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.started: float | None = None  # monotonic time the scoring started (the first plan known)
        self.ended: float | None = None  # and when its last mini-batch finished (the merge may still run)
        self._shown: Progress | None = None
        self._shown_at = 0.0
        self._width = 0  # of the line on the terminal, to blank what a shorter one leaves

    def elapsed(self, now: float) -> float:
        """Seconds the scoring has taken by ``now`` (a ``time.monotonic()``), or took."""
        return 0.0 if self.started is None else (self.ended or now) - self.started

    def show(self, p: Progress, *, final: bool = False) -> None:
        """Show ``p`` (``final``: the last one, shown unless it was just shown, and the terminal line ends)."""
        now = time.monotonic()
        if self.started is None and p.total is not None:
            self.started = now
        if p.total is not None and p.done + p.failed >= p.total:
            self.ended = self.ended or now
        else:
            self.ended = None  # (a mini-batch cleared and rerun meanwhile)
        line = "  " + progress_line(p, self.elapsed(now))
        if self.tty:
            pad = " " * max(0, self._width - len(line))
            self.stream.write("\r" + line + pad + ("\n" if final else ""))
            self._width = 0 if final else len(line)
        elif p != self._shown and (final or now - self._shown_at >= PLAIN_EVERY_S):
            self.stream.write(line + "\n")
            self._shown, self._shown_at = p, now
        self.stream.flush()

    def interrupt(self) -> None:
        """End the terminal line before something else is printed."""
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0
