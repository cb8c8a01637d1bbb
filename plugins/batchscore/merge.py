"""merge: gather the mini-batches' results into the job's output, check the error thresholds.

Runs after every mini-batch has finished, also when some failed. It writes, into the run
folder (see :mod:`batchscore_runtime.names` for the layout):

* the output (``settings.output_file_name``), streamed record batch by record batch with
  pyarrow in plan order, so memory does not grow with the job's rows; nothing for
  ``output_action: summary_only``;
* the custom outputs the scoring scripts wrote to ``AZUREML_BI_OUTPUT_PATH`` (for a serving
  container: its ``<input file>.out`` files, also joined into the output with ``append_row``), linked into the
  run folder, renamed ``<stem>-mb-00007<suffix>`` where two would clash;
* the ledger (one line per mini-batch), the errors file (one line per failed item) and
  ``summary.json``.

Items are counted as Azure counts them: a failed or missing mini-batch fails all its files;
a succeeded one fails the files ``run()`` returned nothing for. The job fails, after all of
the above is written, when a threshold is exceeded (:class:`ThresholdExceededError`); within
the thresholds it succeeds and the summary says what failed. Running the merge again (after
a rerun of some mini-batches) rewrites all of it from the committed results.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchscore.busy import per_mini_batch_busy_fraction, warm_busy_fraction
from batchscore.errors import MergeError, PlanError, ThresholdExceededError
from batchscore.plan import run_layout
from batchscore.spec import DeploymentSpec, Settings
from batchscore_runtime.formats import (
    ERRORS_COLUMNS,
    LEDGER_COLUMNS,
    WORK_DIR_NAME,
    WORKER_STATE_FILE,
    CustomOutputs,
    Durations,
    InputFile,
    InputInfo,
    ItemCounts,
    MiniBatchCounts,
    MiniBatchFailure,
    MiniBatchStatus,
    ModelInfo,
    ModelPin,
    Plan,
    PlanEntry,
    RenamedOutput,
    RunLayout,
    Summary,
    ThresholdResult,
    WarmWorkerInfo,
    atomic_path,
    now_iso,
    write_json_atomic,
)
from batchscore_runtime.worker_state import WorkerState

log = logging.getLogger(__name__)

SUCCEEDED, FAILED, MISSING = "succeeded", "failed", "missing"


@dataclass(frozen=True)
class Outcome:
    """What became of one planned mini-batch."""

    entry: PlanEntry
    state: str  # succeeded | failed | missing
    status: MiniBatchStatus | None
    result: Path | None = None  # the committed result file (append_row)
    reason: str = ""  # why it has no result

    @property
    def committed(self) -> MiniBatchStatus:
        """The status a succeeded mini-batch committed (only those are asked)."""
        assert self.status is not None, f"{self.id} succeeded, so it has a status"
        return self.status

    @property
    def id(self) -> str:
        return self.entry.id


@dataclass(frozen=True)
class FailedItem:
    """One line of the errors file."""

    mini_batch: str
    file: str
    error_type: str
    message: str
    record: int | None = None  # serving contract: the first record of the failed request, 1-based

    def row(self) -> list[Any]:
        return [self.mini_batch, self.file, "" if self.record is None else self.record, self.error_type, self.message]


@dataclass(frozen=True)
class ThresholdCheck:
    """One of Azure's error thresholds, against what the job did."""

    name: str
    limit: float  # -1 (or 100 %) means unlimited
    observed: float
    exceeded: bool
    message: str = ""


# --------------------------------------------------------------------------- outcomes


def collect_outcomes(layout: RunLayout, plan: Plan) -> list[Outcome]:
    """Step 2: every planned mini-batch's committed status, in plan order."""
    outcomes = []
    for entry in plan.mini_batches:
        mb_dir = layout.mini_batch_dir(entry.index)
        status = mb_dir.read_status()
        if status is None:
            outcomes.append(Outcome(entry, MISSING, None, reason="no result was committed (the task failed or never ran)"))
        elif not status.succeeded:
            err = status.error
            outcomes.append(Outcome(entry, FAILED, status, reason=err.one_line() if err else "failed"))
        elif (result := mb_dir.result_path(status)) is not None and not result.is_file():
            outcomes.append(Outcome(entry, MISSING, status, reason=f"its status names {status.result_file}, which is gone"))
        else:
            outcomes.append(Outcome(entry, SUCCEEDED, status, mb_dir.result_path(status) if status.result_file else None))
    return outcomes


def failed_items(layout: RunLayout, outcomes: Iterable[Outcome]) -> list[FailedItem]:
    """One line per failed item, in plan order: every file of a mini-batch without a result,
    and the files a succeeded ``run()`` returned nothing for."""
    items: list[FailedItem] = []
    for o in outcomes:
        if o.state == SUCCEEDED:
            named = [FailedItem(o.id, e.file or "", e.type, e.message, e.record) for e in o.committed.item_errors]
            unnamed = o.committed.failed_items - len(named)  # the status's count is the one that counts
            items += named + [FailedItem(o.id, "", "NoResult", "run() returned fewer results than files")] * unnamed
            continue
        culprit = None
        if o.state == FAILED and o.status and o.status.error:
            error_type, message, culprit = o.status.error.type, o.status.error.message, o.status.error.file
        else:
            error_type, message = "NoResult", o.reason
        refused: dict[str, str] = {}  # symbolic links the plan refused fail for that reason, whatever the mini-batch did
        try:
            planned = layout.read_mini_batch(o.entry.index).files
            files = [f.label for f in planned]
            refused = {f.label: f.refused for f in planned if f.refused is not None}
        except (OSError, ValueError):
            files = [""] * o.entry.files
        for f in files:
            if f in refused:
                items.append(FailedItem(o.id, f, InputFile.REFUSED, refused[f]))
            elif culprit and culprit in files:  # say which file it was raised on, on the other files' lines
                items.append(
                    FailedItem(
                        o.id,
                        f,
                        error_type,
                        message if f == culprit else f"{message} (raised on {culprit}; failed with its mini-batch)",
                    )
                )
            else:
                items.append(FailedItem(o.id, f, error_type, message))
    return items


def _count_check(name: str, limit: int, observed: int, what: str) -> ThresholdCheck:
    """A threshold on a count, where -1 allows any number."""
    exceeded = limit != -1 and observed > limit
    message = f"{name} exceeded: {observed} {what} failed, {limit} allowed ({observed - limit} over)"
    return ThresholdCheck(name, limit, observed, exceeded, message if exceeded else "")


def check_thresholds(settings: Settings, failed_items: int, failed_mini_batches: int, mini_batches: int) -> list[ThresholdCheck]:
    """Azure's three thresholds, each counted across the whole job."""
    checks = [
        _count_check("error_threshold", settings.error_threshold, failed_items, "items"),
        _count_check("mini_batch_error_threshold", settings.mini_batch_error_threshold, failed_mini_batches, "mini-batches"),
    ]
    limit = settings.allowed_failed_percent
    percent = round(100.0 * failed_mini_batches / mini_batches, 2) if mini_batches else 0.0
    exceeded = percent > limit
    checks.append(
        ThresholdCheck(
            "allowed_failed_percent",
            limit,
            percent,
            exceeded,
            f"allowed_failed_percent exceeded: {percent:g}% of mini-batches failed ({failed_mini_batches} of "
            f"{mini_batches}), {limit:g}% allowed ({percent - limit:.3g} points over)"
            if exceeded
            else "",
        )
    )
    return checks


# --------------------------------------------------------------------------- output


def _is_nested(t: pa.DataType) -> bool:
    return pa.types.is_nested(t) or pa.types.is_dictionary(t) and pa.types.is_nested(t.value_type)


def _as_json_text(column: pa.Array) -> pa.Array:
    return pa.array(
        [None if v is None else json.dumps(v, default=str, ensure_ascii=False) for v in column.to_pylist()],
        type=pa.string(),
    )


def _text_schema(schema: pa.Schema) -> pa.Schema:
    """``schema`` with nested columns (dicts, lists: structs, lists, maps) as text, for CSV, which cannot hold them."""
    return pa.schema([pa.field(f.name, pa.string()) if _is_nested(f.type) else f for f in schema], metadata=schema.metadata)


def _conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """Reorder, cast and null-fill ``batch``'s columns to ``schema`` (parts may differ in columns).

    A nested column (what run() returned as dicts or lists) becomes JSON text where ``schema``
    has text for it.
    """
    columns = []
    for field in schema:
        i = batch.schema.get_field_index(field.name)
        if i < 0:
            columns.append(pa.nulls(batch.num_rows, type=field.type))
        elif _is_nested(batch.schema.field(i).type) and not _is_nested(field.type):
            columns.append(_as_json_text(batch.column(i)).cast(field.type))
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


def _azure_value(value: Any) -> str:
    return "" if value is None else str(value)


class _AzureTextWriter:
    """Azure's ``append_row`` layout: one line per element, values separated by a space, no header."""

    def __init__(self, path: Path):
        self._fh = open(path, "w", encoding="utf-8", newline="\n")

    def write(self, batch: pa.RecordBatch) -> None:
        columns = [c.to_pylist() for c in batch.columns]
        for row in zip(*columns):
            self._fh.write(" ".join(_azure_value(v) for v in row) + "\n")

    def close(self) -> None:
        self._fh.close()


def _open_writer(path: Path, suffix: str, schema: pa.Schema, layout: str) -> Any:
    if layout == "azure":
        return _AzureTextWriter(path)
    if suffix == ".csv":
        import pyarrow.csv as pacsv

        return pacsv.CSVWriter(str(path), schema)
    if suffix == ".parquet":
        return pq.ParquetWriter(str(path), schema)
    if suffix == ".jsonl":
        return _JsonLinesWriter(path)
    raise ValueError(f"no writer for output format {suffix!r}")  # the spec admits only the three above


def _unified_schema(parts: list[Path]) -> pa.Schema:
    schemas = [pq.read_schema(p) for p in parts]
    if not schemas:
        return pa.schema([])
    try:
        return pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        # Name the mini-batches whose columns disagree, not just Arrow's types.
        by_column: dict[str, dict[str, list[str]]] = {}
        for part, schema in zip(parts, schemas):
            for f in schema:
                by_column.setdefault(f.name, {}).setdefault(str(f.type), []).append(part.parent.name)
        clashes = [
            f"column {name!r} is "
            + " but ".join(f"{t} in {', '.join(ids[:3])}{' ...' if len(ids) > 3 else ''}" for t, ids in types.items())
            for name, types in by_column.items()
            if len(types) > 1
        ]
        raise MergeError(
            "the mini-batches' results cannot be put into one output: "
            + ("; ".join(clashes) or str(exc))
            + ". Make run() return the same column types for every mini-batch (e.g. cast with DataFrame.astype)"
        ) from None


def write_output(path: Path, parts: Iterable[Path], layout: str = "table") -> int:
    """Concatenate the parquet ``parts`` in order into ``path``; return its rows.

    ``layout`` "table" writes the format ``path``'s suffix names, with column names;
    "azure" writes Azure's append_row text.
    """
    parts = list(parts)
    # A part without rows (a run() that returned nothing) adds no columns: its schema is a guess.
    schema = _unified_schema([p for p in parts if pq.read_metadata(p).num_rows] or parts)
    suffix = path.suffix.lower()
    if layout == "table" and suffix == ".csv":
        schema = _text_schema(schema)
    rows = 0
    with atomic_path(path) as tmp:
        if layout == "table" and suffix == ".csv" and len(schema) == 0:
            tmp.write_text("")  # nothing returned any column: an empty file, not a broken header
        else:
            writer = _open_writer(tmp, suffix, schema, layout)
            try:
                for part in parts:
                    for batch in pq.ParquetFile(part).iter_batches():
                        writer.write(_conform(batch, schema))
                        rows += batch.num_rows
            finally:
                writer.close()
    return rows


def write_serving_output(path: Path, layout: RunLayout, done: Iterable[Outcome]) -> int:
    """Serving contract: the ``.out`` files of the succeeded mini-batches joined into one file, in input order.

    The bytes are copied as they are (a file that does not end with a newline gets one, so the
    next file starts on a line of its own); files that failed have no ``.out`` and are left out.
    Returns the number of ``.out`` files joined.
    """
    joined = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as sink:
        for o in done:
            outputs = layout.mini_batch_dir(o.entry.index).outputs_path(o.committed)
            if outputs is None:
                continue
            for f in layout.read_mini_batch(o.entry.index).files:
                out = outputs / f"{f.path}.out"
                if not out.is_file():
                    continue
                with open(out, "rb") as source:
                    shutil.copyfileobj(source, sink, 1 << 20)
                    if out.stat().st_size:
                        source.seek(-1, os.SEEK_END)
                        if source.read(1) != b"\n":
                            sink.write(b"\n")
                joined += 1
    return joined


def _write_csv(path: Path, header: tuple[str, ...], rows: Iterable[Iterable[Any]]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(rows)


def _seconds_between(start: str, end: str) -> float | None:
    try:
        return round((datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds(), 3)
    except ValueError:
        return None


def _init_seconds_total(statuses: list[MiniBatchStatus]) -> float:
    """Time spent in init(): per mini-batch, or once per warm worker (whose mini-batches all name it)."""
    per_worker = {s.worker: s.init_seconds for s in statuses if s.worker}
    return round(sum(s.init_seconds for s in statuses if not s.worker) + sum(per_worker.values()), 3)


def warm_workers(layout: RunLayout) -> list[WarmWorkerInfo]:
    """Warm workers: each one's init() time, state and the mini-batches it scored (the last start of each slot)."""
    folder = layout.workers_dir
    if not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.glob(f"*/{WORKER_STATE_FILE}")):
        state = WorkerState.read(path)
        if state is not None:
            out.append(
                WarmWorkerInfo(
                    worker=state.worker,
                    state=state.state,
                    init_seconds=state.init_seconds,
                    processes=state.processes,
                    mini_batches=state.mini_batches,
                    error=state.error.one_line() if state.error else None,
                    busy_seconds=state.busy_seconds,
                    first_started_at=state.first_started_at,
                    last_ended_at=state.last_ended_at,
                )
            )
    return out


def write_ledger(path: Path, outcomes: Iterable[Outcome]) -> None:
    """The per-mini-batch ledger (Azure's ``processed_mini-batches.csv``, with batchscore's columns)."""

    def line(o: Outcome) -> list[Any]:
        s = o.status
        seconds = _seconds_between(s.started_at, s.finished_at) if s and s.started_at and s.finished_at else None
        return [
            o.id,
            o.entry.files,
            o.entry.bytes,
            o.state,
            s.attempt if s else "",
            s.rows if s and o.state == SUCCEEDED else "",
            o.committed.failed_items if o.state == SUCCEEDED else o.entry.files,
            "" if seconds is None else seconds,
            s.init_seconds if s and o.state == SUCCEEDED else "",
            s.run_seconds if s and o.state == SUCCEEDED else "",
            s.workers if s else "",
            (s.worker or "") if s else "",
            s.started_at if s else "",
            s.finished_at if s else "",
            "" if o.state == SUCCEEDED else o.reason,
        ]

    _write_csv(path, LEDGER_COLUMNS, (line(o) for o in outcomes))


def collect_custom_outputs(layout: RunLayout, outcomes: Iterable[Outcome], reserved: set[str]) -> CustomOutputs:
    """Link every succeeded mini-batch's custom outputs into the run folder, without name clashes.

    Files keep their path relative to ``AZUREML_BI_OUTPUT_PATH``. A file whose name is taken
    (by an earlier mini-batch in plan order, or by one of the run's own files) becomes
    ``<stem>-mb-00007<suffix>``. The files are hard links to the committed ones under
    ``_batchscore`` (copies where links are impossible); what an earlier merge placed is
    removed first, so a merge after a rerun places each file once.
    """
    previous = _read_collected(layout)
    for rel in previous.get("files", []):
        (layout.root / rel).unlink(missing_ok=True)

    placed: list[str] = []
    renamed: list[RenamedOutput] = []
    taken = {r.lower() for r in reserved}
    for o in outcomes:
        if o.state != SUCCEEDED or not o.committed.outputs_dir:
            continue
        source_dir = layout.mini_batch_dir(o.entry.index).outputs_path(o.committed)
        if source_dir is None or not source_dir.is_dir():
            continue
        for source in sorted(p for p in source_dir.rglob("*") if p.is_file()):
            rel = source.relative_to(source_dir)
            target = rel
            n = 1
            while target.as_posix().lower() in taken or target.parts[0].lower() in taken or (layout.root / target).exists():
                target = rel.with_name(f"{rel.stem}-{o.id}{'' if n == 1 else f'-{n}'}{rel.suffix}")
                n += 1
            if target != rel:
                renamed.append(RenamedOutput(o.id, rel.as_posix(), target.as_posix()))
            dest = layout.root / target
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, dest)
            except OSError:
                shutil.copy2(source, dest)
            taken.add(target.as_posix().lower())
            placed.append(target.as_posix())
    write_json_atomic(layout.collected_file, {"files": placed, "renamed": [r.to_json() for r in renamed]})
    for r in renamed:
        log.warning("Custom output %s of %s is named like an earlier one; placed as %s", r.source, r.mini_batch, r.target)
    return CustomOutputs(len(placed), renamed)


def _read_collected(layout: RunLayout) -> dict[str, Any]:
    try:
        return json.loads(layout.collected_file.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return {}


# --------------------------------------------------------------------------- the merge, step by step


@dataclass(frozen=True)
class MergeInput:
    """What one merge works on: the deployment, its run folder and the plan found there."""

    endpoint: str
    deployment: DeploymentSpec
    run_id: str
    layout: RunLayout
    plan: Plan

    @property
    def settings(self) -> Settings:
        return self.deployment.settings


@dataclass(frozen=True)
class JobOutput:
    """The job's output file as the merge left it."""

    path: Path | None  # None for summary_only
    rows: int = 0
    error: MergeError | None = None  # it cannot be made: no file, the records are written all the same


def open_run(endpoint_name: str, deployment: DeploymentSpec, run_id: str) -> MergeInput:
    """Step 1: the run folder and its plan (a :class:`PlanError` without one); a killed merge's temporary files go."""
    layout = run_layout(deployment, run_id)
    plan = layout.read_plan()
    if plan is None:
        raise PlanError(
            f"run directory {layout.root} has no plan ({layout.plan_file}); the plan task of run "
            f"{run_id!r} did not finish, so there is nothing to merge"
        )
    for debris in layout.root.glob(".*.tmp"):  # temporary files of a merge that was killed
        debris.unlink(missing_ok=True)
    return MergeInput(endpoint_name, deployment, run_id, layout, plan)


def write_job_output(run: MergeInput, done: list[Outcome]) -> JobOutput:
    """Step 3: the succeeded mini-batches' results joined into the output, in plan order (nothing for summary_only).

    Results that cannot be put into one table do not raise here: the output is removed (one of
    an earlier merge would look current) and the error is kept, for the records to be written first.
    """
    settings = run.settings
    if settings.output_action != "append_row":
        return JobOutput(None)
    path = run.layout.root / settings.output_file_name
    if run.deployment.contract == "serve":
        write_serving_output(path, run.layout, done)
        return JobOutput(path, sum(o.committed.rows for o in done))
    try:
        return JobOutput(path, write_output(path, [o.result for o in done if o.result], settings.output_layout))
    except MergeError as exc:
        path.unlink(missing_ok=True)
        return JobOutput(path, error=exc)


def write_records(run: MergeInput, outcomes: list[Outcome], items: list[FailedItem]) -> CustomOutputs:
    """Step 4: the ledger, the errors file, and the custom outputs placed in the run folder."""
    layout = run.layout
    write_ledger(layout.ledger_file, outcomes)
    _write_csv(layout.errors_file, ERRORS_COLUMNS, (i.row() for i in items))
    reserved = {run.settings.output_file_name, WORK_DIR_NAME}
    reserved |= {layout.summary_file.name, layout.ledger_file.name, layout.errors_file.name}
    return collect_custom_outputs(layout, [o for o in outcomes if o.state == SUCCEEDED], reserved)


def build_summary(
    run: MergeInput,
    outcomes: list[Outcome],
    output: JobOutput,
    items: list[FailedItem],
    custom: CustomOutputs,
    checks: list[ThresholdCheck],
    merge_seconds: float,
) -> Summary:
    """Step 5: the job summary, from what the steps before found and wrote."""
    plan, settings = run.plan, run.settings
    done = [o for o in outcomes if o.state == SUCCEEDED]
    not_done = [o for o in outcomes if o.state != SUCCEEDED]
    statuses = [o.committed for o in done]
    returned = sum(s.rows for s in statuses)
    started = min((s.started_at for s in statuses if s.started_at), default="")
    finished = max((s.finished_at for s in statuses if s.finished_at), default="")
    wall = _seconds_between(started, finished) if started and finished else None
    run_seconds = round(sum(s.run_seconds for s in statuses), 3)
    workers = warm_workers(run.layout)
    if settings.worker_mode == "warm":
        busy = warm_busy_fraction(workers)
    else:  # every try that ended, failed ones too: their containers took a slot as long as they ran
        ended = [o.status for o in outcomes if o.status is not None]
        busy = per_mini_batch_busy_fraction(ended, run.deployment.resources.instance_count)
    if any(c.exceeded for c in checks) or output.error:
        status = Summary.FAILED
    else:
        status = Summary.SUCCEEDED_WITH_FAILURES if items or not_done else Summary.SUCCEEDED
    return Summary(
        endpoint=run.endpoint,
        deployment=run.deployment.name,
        run_id=run.run_id,
        status=status,
        run_folder=str(run.layout.root),
        output=str(output.path) if output.path and not output.error else None,
        error=str(output.error) if output.error else None,
        contract=run.deployment.contract,
        worker_mode=settings.worker_mode,
        warm_workers=workers,
        output_action=settings.output_action,
        output_layout=settings.output_layout,
        ledger=str(run.layout.ledger_file),
        errors=str(run.layout.errors_file),
        input=InputInfo(plan.input_path, plan.pattern, plan.files, plan.bytes),
        mini_batch_size=plan.mini_batch_size,
        mini_batches=MiniBatchCounts(
            total=len(outcomes),
            succeeded=len(done),
            failed=sum(o.state == FAILED for o in outcomes),
            missing=sum(o.state == MISSING for o in outcomes),
        ),
        items=ItemCounts(total=plan.files, succeeded=plan.files - len(items), failed=len(items)),
        rows=output.rows if output.path else returned,
        returned_elements=returned,
        custom_outputs=custom,
        thresholds={c.name: ThresholdResult(c.limit, c.observed, c.exceeded) for c in checks},
        durations=Durations(
            first_mini_batch_started_at=started,
            last_mini_batch_finished_at=finished,
            scoring_wall_seconds=wall,
            init_seconds_total=_init_seconds_total(statuses),
            run_seconds_total=run_seconds,
            merge_seconds=merge_seconds,
        ),
        rows_per_second=round(returned / wall, 1) if wall else None,
        rows_per_run_second=round(returned / run_seconds, 1) if run_seconds > 0 else None,
        failures=[MiniBatchFailure(o.id, o.state, o.reason, o.entry.files) for o in not_done],
        planned_at=plan.created_at,
        merged_at=now_iso(),
        busy_fraction=busy,
        model=_model_info(run.layout.read_model_pin()),
    )


def _model_info(pin: ModelPin | None) -> ModelInfo | None:
    """The summary's ``model``: what the run pinned (none in a run folder planned before models were pinned)."""
    return ModelInfo(location=pin.location, reference=pin.reference, version=pin.model_version) if pin else None


def log_merge(run: MergeInput, summary: Summary, output: JobOutput, not_done: list[Outcome]) -> None:
    """After the commit (step 6): what the merge did, for the task log."""
    log.info(
        "Merged %d of %d mini-batches: %d rows%s; %d of %d items failed; summary in %s",
        summary.mini_batches.succeeded,
        summary.mini_batches.total,
        summary.rows,
        (f" not written, the output cannot be made ({output.error})" if output.error else f" into {output.path}")
        if output.path
        else " (summary_only: counted, not written)",
        summary.items.failed,
        summary.items.total,
        run.layout.summary_file,
    )
    if summary.custom_outputs.files:
        what = ".out" if run.deployment.contract == "serve" else "custom output"
        log.info("Placed %d %s file(s) in %s", summary.custom_outputs.files, what, run.layout.root)
    if not_done:
        log.warning(
            "%d mini-batch(es) have no result: %s",
            len(not_done),
            "; ".join(f"{o.id} ({o.state}: {o.reason})" for o in not_done[:10]) + (" ..." if len(not_done) > 10 else ""),
        )


def conclude(run: MergeInput, summary: Summary, output: JobOutput, checks: list[ThresholdCheck]) -> None:
    """Step 7: fail the job when the output could not be made or a threshold is exceeded; else say what failed within them."""
    layout = run.layout
    if output.error:
        raise MergeError(
            f"{output.error}. The mini-batches' results are kept in {layout.work / 'results'}; "
            f"{layout.summary_file.name}, {layout.ledger_file.name} and {layout.errors_file.name} are in {layout.root}."
        )
    exceeded = [c for c in checks if c.exceeded]
    if exceeded:
        raise ThresholdExceededError(
            f"{'; '.join(c.message for c in exceeded)}. The output, {layout.summary_file.name}, "
            f"{layout.ledger_file.name} and {layout.errors_file.name} (one line per failed item) are in "
            f"{layout.root}; clear the failed score instances in Airflow to rerun them, and the merge runs again."
        )
    if summary.status == Summary.SUCCEEDED_WITH_FAILURES:
        log.warning(
            "%d item(s) failed, within the thresholds (%s): the job succeeds; see %s",
            summary.items.failed,
            ", ".join(f"{c.name} {c.limit:g}" for c in checks),
            layout.errors_file,
        )


def merge_run(endpoint_name: str, deployment: DeploymentSpec, run_id: str) -> Summary:
    """Write the run's output, custom outputs, ledger, errors file and summary; then check thresholds.

    The steps, in order: 1. open the run (its plan); 2. collect every mini-batch's committed
    status, the failed items and the thresholds; 3. write the output; 4. write the records
    (ledger, errors file, custom outputs); 5. build the summary; 6. commit it (``summary.json``
    is written last, so a merge killed before leaves the previous one whole); 7. conclude. Raises
    :class:`ThresholdExceededError` (after writing everything) when the failures exceed a
    threshold of ``settings``, :class:`MergeError` when the results cannot be put into one output.
    """
    t0 = time.monotonic()
    run = open_run(endpoint_name, deployment, run_id)  # 1. the plan
    outcomes = collect_outcomes(run.layout, run.plan)  # 2. what became of each mini-batch,
    done = [o for o in outcomes if o.state == SUCCEEDED]
    not_done = [o for o in outcomes if o.state != SUCCEEDED]
    items = failed_items(run.layout, outcomes)  # which items failed,
    checks = check_thresholds(run.settings, len(items), len(not_done), len(outcomes))  # and the thresholds
    output = write_job_output(run, done)  # 3.
    custom = write_records(run, outcomes, items)  # 4.
    summary = build_summary(run, outcomes, output, items, custom, checks, round(time.monotonic() - t0, 3))  # 5.
    summary.write(run.layout.summary_file)  # 6. the commit: the summary is written last
    log_merge(run, summary, output, not_done)
    conclude(run, summary, output, checks)  # 7.
    return summary


__all__ = [
    "FailedItem",
    "JobOutput",
    "MergeInput",
    "Outcome",
    "ThresholdCheck",
    "build_summary",
    "check_thresholds",
    "collect_custom_outputs",
    "collect_outcomes",
    "conclude",
    "failed_items",
    "log_merge",
    "merge_run",
    "open_run",
    "write_job_output",
    "write_ledger",
    "write_output",
    "write_records",
    "write_serving_output",
]
