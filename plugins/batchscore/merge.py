"""merge: gather the mini-batches' results into the job's output, in plan order, and summarize.

Runs after every mini-batch has finished, also when some failed. The output is streamed
record batch by record batch with pyarrow, so memory does not grow with the job's rows, and
written under a temporary name that is renamed at the end. When a mini-batch has no
committed result, the output and the summary are still written from what exists (nothing
already produced is lost), and then :class:`IncompleteJobError` fails the task, so a run is
never green with holes in it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from batchscore.errors import IncompleteJobError, PlanError
from batchscore.plan import run_layout
from batchscore.spec import DeploymentSpec
from batchscore_runtime.formats import MiniBatchStatus, atomic_path, now_iso, write_json_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Failure:
    """A mini-batch without a committed result."""

    mini_batch: str
    reason: str  # "failed" | "missing"
    error: str
    file: str | None = None

    def one_line(self) -> str:
        return f"{self.mini_batch} ({self.reason}: {self.error})"


def _conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """Reorder, cast and null-fill ``batch``'s columns to ``schema`` (parts may differ in columns)."""
    columns = []
    for field in schema:
        i = batch.schema.get_field_index(field.name)
        if i < 0:
            columns.append(pa.nulls(batch.num_rows, type=field.type))
        else:
            columns.append(batch.column(i).cast(field.type))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


class _JsonLinesWriter:
    def __init__(self, path: Path):
        self._fh = open(path, "w", encoding="utf-8")

    def write(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows:
            self._fh.write(batch.to_pandas().to_json(orient="records", lines=True, date_format="iso"))
            self._fh.write("\n")

    def close(self) -> None:
        self._fh.close()


def _open_writer(path: Path, suffix: str, schema: pa.Schema):
    if suffix == ".csv":
        import pyarrow.csv as pacsv

        return pacsv.CSVWriter(str(path), schema)
    if suffix == ".parquet":
        return pq.ParquetWriter(str(path), schema)
    if suffix == ".jsonl":
        return _JsonLinesWriter(path)
    raise ValueError(f"no writer for output format {suffix!r}")  # the spec admits only the three above


def write_output(path: Path, parts: Iterable[Path]) -> int:
    """Concatenate the parquet ``parts`` in order into ``path`` (format from its suffix); return rows."""
    parts = list(parts)
    schemas = [pq.read_schema(p) for p in parts]
    schema = pa.unify_schemas(schemas, promote_options="permissive") if schemas else pa.schema([])
    suffix = path.suffix.lower()
    rows = 0
    with atomic_path(path) as tmp:
        if suffix == ".csv" and len(schema) == 0:
            tmp.write_text("")  # nothing returned any column: an empty file, not a broken header
        else:
            writer = _open_writer(tmp, suffix, schema)
            try:
                for part in parts:
                    for batch in pq.ParquetFile(part).iter_batches():
                        writer.write(_conform(batch, schema))
                        rows += batch.num_rows
            finally:
                writer.close()
    return rows


def _seconds_between(start: str, end: str) -> float | None:
    try:
        return round((datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds(), 3)
    except ValueError:
        return None


def merge_run(endpoint_name: str, deployment: DeploymentSpec, run_id: str) -> dict[str, Any]:
    """Write the run's output and ``summary.json``; raise IncompleteJobError if results are missing."""
    layout = run_layout(deployment, run_id)
    plan = layout.read_plan()
    if plan is None:
        raise PlanError(
            f"run directory {layout.root} has no plan ({layout.plan_file}); the plan task of run "
            f"{run_id!r} did not finish, so there is nothing to merge"
        )

    done: list[tuple[MiniBatchStatus, Path]] = []  # succeeded mini-batches and their result files
    failures: list[Failure] = []
    for entry in plan.mini_batches:
        mb_dir = layout.mini_batch_dir(entry.index)
        status = mb_dir.read_status()
        if status is None:
            failures.append(Failure(entry.id, "missing", "no result was committed (the task failed or never ran)"))
        elif not status.succeeded:
            err = status.error
            failures.append(Failure(entry.id, "failed", err.one_line() if err else "failed", err.file if err else None))
        elif not (result := mb_dir.result_path(status)) or not result.is_file():
            failures.append(Failure(entry.id, "missing", f"its status names {status.result_file}, which is gone"))
        else:
            done.append((status, result))

    output = layout.root / deployment.settings.output_file_name
    rows = write_output(output, [result for _, result in done])

    statuses = [s for s, _ in done]
    started = min((s.started_at for s in statuses if s.started_at), default="")
    finished = max((s.finished_at for s in statuses if s.finished_at), default="")
    run_seconds = round(sum(s.run_seconds for s in statuses), 3)
    summary: dict[str, Any] = {
        "endpoint": endpoint_name,
        "deployment": deployment.name,
        "run_id": run_id,
        "status": "succeeded" if not failures else "incomplete",
        "output": str(output),
        "input": {"path": plan.input_path, "pattern": plan.pattern, "files": plan.files, "bytes": plan.bytes},
        "mini_batch_size": plan.mini_batch_size,
        "mini_batches": {
            "total": len(plan.mini_batches),
            "succeeded": len(done),
            "failed": sum(f.reason == "failed" for f in failures),
            "missing": sum(f.reason == "missing" for f in failures),
        },
        "rows": rows,
        "durations": {
            "first_mini_batch_started_at": started,
            "last_mini_batch_finished_at": finished,
            "scoring_wall_seconds": _seconds_between(started, finished) if started and finished else None,
            "init_seconds_total": round(sum(s.init_seconds for s in statuses), 3),
            "run_seconds_total": run_seconds,
            "rows_per_run_second": round(rows / run_seconds, 1) if run_seconds > 0 else None,
        },
        "failures": [f.__dict__ for f in failures],
        "planned_at": plan.created_at,
        "merged_at": now_iso(),
    }
    write_json_atomic(layout.summary_file, summary)
    log.info(
        "Merged %d of %d mini-batches, %d rows, into %s; summary in %s",
        len(done),
        len(plan.mini_batches),
        rows,
        output,
        layout.summary_file,
    )
    if failures:
        shown = "; ".join(f.one_line() for f in failures[:10])
        more = f"; and {len(failures) - 10} more" if len(failures) > 10 else ""
        raise IncompleteJobError(
            f"{len(failures)} of {len(plan.mini_batches)} mini-batches have no result: {shown}{more}. "
            f"The output {output} holds the other {len(done)}; clear the failed score instances in "
            "Airflow to rerun them, and the merge runs again."
        )
    return summary
