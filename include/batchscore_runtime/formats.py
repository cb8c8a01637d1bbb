"""The on-disk formats shared by the Airflow side and the scoring container.

This module is the single definition of every file that crosses the boundary between
the orchestrator (``batchscore``, which imports Airflow) and the scoring runtime
(``batchscore_runtime``, which runs inside the user's image and never imports Airflow).
It uses the standard library only, so any image with Python 3.9+ can import it. It re-exports
what it builds on: :mod:`~batchscore_runtime.names` (file names, mount points, ids; the layout
of a run folder is drawn there), :mod:`~batchscore_runtime.files` (atomic writes) and
:mod:`~batchscore_runtime.transform` (the serving client's settings).

A container writes its attempt's result, custom outputs and report (a ``status.json`` of its
own) into its scratch folder; the orchestrator checks the report against the plan, copies the
regular files it names into the mini-batch's result folder and commits there (see
``batchscore.intake``). A mini-batch's result is committed by writing its parquet file under a
fresh name and then atomically replacing ``status.json``; the merge reads only the file the
status names. A rerun therefore replaces a result instead of adding to it, and a half-written
file is never read.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

# Re-exported: every module reads these names from here.
from batchscore_runtime.files import atomic_path, read_regular_file, write_json_atomic
from batchscore_runtime.names import (
    ERRORS_COLUMNS,
    ERRORS_FILE_NAME,
    FORMAT_VERSION,
    LEDGER_COLUMNS,
    LEDGER_FILE_NAME,
    SUMMARY_FILE_NAME,
    WORK_DIR_NAME,
    WORKER_STATE_FILE,
    ContainerPaths,
    attempt_folder_name,
    check_version,
    mini_batch_id,
    run_key,
)
from batchscore_runtime.transform import (
    DEFAULT_BATCH_STRATEGY,
    DEFAULT_MAX_CONCURRENT_TRANSFORMS,
    DEFAULT_MAX_PAYLOAD_MB,
    MAX_PAYLOAD_LIMIT_MB,
    TransformConfig,
)

# --------------------------------------------------------------------------- records


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The items of ``data`` (a record read from JSON) that are fields of ``cls``: a newer writer's extra keys are left out."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass(frozen=True)
class FilePart:
    """A slice of a large input file, scored as a file of its own (batchscore's size mode).

    ``kind`` ``bytes``: the byte range ``[start, end)`` of a CSV or JSON Lines file, cut between
    records (never inside a quoted CSV field), preceded by the file's first ``header_end`` bytes
    (a CSV header; 0 for JSON Lines). ``kind`` ``row_groups``: Parquet row groups
    ``[start, end)``. The runtime writes the slice as a file named like the original
    (``big.part-0002-of-0005.csv``) and hands that path to the scoring script.
    """

    index: int  # 0-based
    count: int
    kind: str  # "bytes" | "row_groups"
    start: int
    end: int
    header_end: int = 0
    file_size: int = 0  # of the whole file, to notice a change since the plan

    BYTES = "bytes"
    ROW_GROUPS = "row_groups"


@dataclass(frozen=True)
class InputFile:
    """One input file of a mini-batch, as seen when the plan was made, or a part of one.

    A symbolic link in the input folder (or a file reached through a linked folder) keeps its
    own ``path``, the name every record gives it, and is read at ``target``: the regular file
    it leads to, relative to the input folder (the plan resolved every link on the host). A link
    batchscore will not follow (dangling, leading outside the input folder, or to something that
    is not a regular file) is planned with ``refused``, the message saying why: the runtime
    never opens it and reports it as a failed item of its mini-batch.

    On object storage (``input.path`` a URI) ``path`` is the object's key below the input prefix and
    ``version`` the token the plan listed (ETag, generation or version id); the score task stages the
    object into a local folder and reads it there at ``target``. An object that changed or was
    deleted since the plan is not staged: it is ``refused``, with ``refused_type`` ``ObjectChanged``.
    """

    path: str  # relative to the input folder, POSIX separators
    size: int  # bytes; of the part, for a part
    mtime_ns: int
    part: FilePart | None = None
    target: str | None = None  # a link's regular file inside the input folder, relative to it
    refused: str | None = None  # why a link is not scored (never opened)
    version: str | None = None  # object storage: the plan's version token of the object
    refused_type: str | None = None  # the error type of a refused item; None: REFUSED

    REFUSED = "LinkRefused"  # the error type of a refused file's failed item (a link)
    OBJECT_CHANGED = "ObjectChanged"  # ... of an object changed or deleted since the plan

    @property
    def label(self) -> str:
        """How messages and records name it: ``big.csv``, or ``big.csv (part 2 of 5)``."""
        return self.path if self.part is None else f"{self.path} (part {self.part.index + 1} of {self.part.count})"

    @property
    def file_size(self) -> int:
        """The size of the whole file when the plan was made."""
        return self.part.file_size if self.part is not None else self.size

    def to_json(self) -> dict[str, Any]:
        # Spelt out rather than asdict(): a plan of 100,000 files calls this 100,000 times.
        data: dict[str, Any] = {"path": self.path, "size": self.size, "mtime_ns": self.mtime_ns}
        if self.part is not None:  # plans without parts (or links) stay as they were
            data["part"] = asdict(self.part)
        if self.target is not None:
            data["target"] = self.target
        if self.refused is not None:
            data["refused"] = self.refused
        if self.version is not None:
            data["version"] = self.version
        if self.refused_type is not None:
            data["refused_type"] = self.refused_type
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InputFile:
        part = data.get("part")
        return cls(
            path=data["path"],
            size=int(data["size"]),
            mtime_ns=int(data["mtime_ns"]),
            part=FilePart(**part) if part else None,
            target=data.get("target"),
            refused=data.get("refused"),
            version=data.get("version"),
            refused_type=data.get("refused_type"),
        )


@dataclass(frozen=True)
class MiniBatch:
    """The files of one mini-batch (``minibatches/mb-00007.json``)."""

    index: int
    files: list[InputFile]
    version: int = FORMAT_VERSION

    @property
    def id(self) -> str:
        return mini_batch_id(self.index)

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "index": self.index, "files": [f.to_json() for f in self.files]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MiniBatch:
        check_version(data, "mini-batch")
        return cls(index=int(data["index"]), files=[InputFile.from_json(f) for f in data["files"]])


@dataclass(frozen=True)
class PlanEntry:
    """What plan.json says of one mini-batch: enough to name it without opening its file."""

    index: int
    files: int
    bytes: int

    @property
    def id(self) -> str:
        return mini_batch_id(self.index)

    @property
    def label(self) -> str:
        """How the mini-batch is named in the Airflow UI: ``mb-00007 (10 files)``."""
        return f"{self.id} ({self.files} file{'s' if self.files != 1 else ''})"


@dataclass(frozen=True)
class Plan:
    """The persisted plan of one run (``plan.json``)."""

    endpoint: str
    deployment: str
    run_id: str
    input_path: str
    pattern: str
    mini_batch_size: int | str  # files, or a size such as "64MB" (batchscore's size mode)
    created_at: str
    mini_batches: list[PlanEntry]
    version: int = FORMAT_VERSION

    @property
    def files(self) -> int:
        return sum(e.files for e in self.mini_batches)

    @property
    def bytes(self) -> int:
        return sum(e.bytes for e in self.mini_batches)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        check_version(data, "plan")
        values = _known(cls, data)
        values["mini_batches"] = [PlanEntry(**e) for e in data["mini_batches"]]
        return cls(**values)


@dataclass(frozen=True)
class PinnedObject:
    """One object of a model on object storage, as its run pinned it."""

    name: str  # relative to the pin's location; for a model that is one object, its file name
    size: int  # bytes
    version: str  # its version token (ETag, version id or generation), as the listing gave it


@dataclass(frozen=True)
class ModelPin:
    """The model a run scores with (``_batchscore/model.json``), which every task of the run uses: written once,
    never replaced, by the first task that needs it (see ``batchscore.model_pin``)."""

    deployment: str
    location: str  # a local path, or a URI (no connection in it): for azureml:<name>@latest, the version's folder
    kind: str  # LOCAL | OBJECT (location is one object) | PREFIX (the objects below location)
    objects: list[PinnedObject]  # on object storage; [] for a local model
    connection: str | None = None  # the Airflow connection location is read with
    reference: str | None = None  # the YAML's azureml:<name>@latest or azureml:<name>:<version>
    model_version: str | None = None  # the registered version it resolved to (else the YAML's model.version)
    pinned_at: str = ""
    version: int = FORMAT_VERSION

    LOCAL, OBJECT, PREFIX = "local", "object", "prefix"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelPin:
        check_version(data, "model pin")
        values = _known(cls, data)
        values["objects"] = [PinnedObject(**o) for o in data["objects"]]
        return cls(**values)


@dataclass(frozen=True)
class ErrorInfo:
    """Why an attempt failed: the exception's type and message, and its traceback."""

    type: str
    message: str
    traceback: str = ""
    file: str | None = None  # the input file it concerns, when known

    def one_line(self) -> str:
        where = f" (file {self.file})" if self.file else ""
        return f"{self.type}: {self.message}{where}"


@dataclass(frozen=True)
class ItemError:
    """One input item (file) of a succeeded mini-batch that has no result.

    Azure contract: a file run() returned nothing for. Serving contract: a file with a record
    whose request failed after its retries (``record`` is that record's 1-based number in the
    file, the first of its payload); the message says which records, the HTTP status and the
    start of the response body.
    """

    file: str | None  # relative to the input folder; None when it cannot be told which file
    type: str
    message: str
    record: int | None = None


@dataclass(frozen=True)
class MiniBatchStatus:
    """The commit record of one mini-batch (``results/mb-00007/status.json``).

    Items are counted as Azure counts them: every element run() returns is one successful
    item, and ``files - rows`` (when positive) is the number of failed items.
    """

    index: int
    state: str  # "succeeded" | "failed"
    files: int
    rows: int = 0
    result_file: str | None = None  # name inside the mini-batch's result folder; None for summary_only
    init_seconds: float = 0.0
    run_seconds: float = 0.0
    started_at: str = ""
    finished_at: str = ""
    error: ErrorInfo | None = None
    attempt: int = 1  # the Airflow try number that committed this status
    workers: int = 1
    failed_items: int = 0
    item_errors: list[ItemError] = field(default_factory=list)
    outputs_dir: str | None = None  # custom outputs folder inside the result folder, if any
    custom_outputs: int = 0  # files in it
    worker: str | None = None  # warm workers: the worker container that scored it (init_seconds is its init())
    version: int = FORMAT_VERSION

    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def id(self) -> str:
        return mini_batch_id(self.index)

    @property
    def succeeded(self) -> bool:
        return self.state == self.SUCCEEDED

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MiniBatchStatus:
        check_version(data, "status")
        values = _known(cls, data)
        if values.get("error") is not None:
            values["error"] = ErrorInfo(**values["error"])
        values["item_errors"] = [ItemError(**e) for e in values.get("item_errors") or []]
        return cls(**values)


# --------------------------------------------------------------------------- summary


def _flat(cls: type, data: dict[str, Any]) -> Any:
    """A flat record ``cls`` from its JSON object; keys it does not know are left out."""
    return cls(**_known(cls, data))


@dataclass(frozen=True)
class InputInfo:
    """The summary's ``input``: the folder and pattern the plan read, and what it found there."""

    path: str
    pattern: str
    files: int
    bytes: int


@dataclass(frozen=True)
class MiniBatchCounts:
    """The summary's ``mini_batches``: how many were planned and what became of them."""

    total: int
    succeeded: int
    failed: int  # committed a failure
    missing: int  # committed nothing (the task failed or never ran), or the result it names is gone


@dataclass(frozen=True)
class ItemCounts:
    """The summary's ``items``: input files (or parts of files), counted as Azure counts them."""

    total: int
    succeeded: int
    failed: int


@dataclass(frozen=True)
class RenamedOutput:
    """A custom output the merge placed under another name: an earlier one, or a file of the run, has its name."""

    mini_batch: str
    source: str  # JSON "from": its path relative to AZUREML_BI_OUTPUT_PATH
    target: str  # JSON "to": its path in the run folder

    def to_json(self) -> dict[str, str]:
        return {"mini_batch": self.mini_batch, "from": self.source, "to": self.target}

    @classmethod
    def from_json(cls, data: dict[str, str]) -> RenamedOutput:
        return cls(data["mini_batch"], data["from"], data["to"])


@dataclass(frozen=True)
class CustomOutputs:
    """The summary's ``custom_outputs``: how many files the merge placed in the run folder, and which it renamed."""

    files: int
    renamed: list[RenamedOutput] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"files": self.files, "renamed": [r.to_json() for r in self.renamed]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CustomOutputs:
        return cls(int(data["files"]), [RenamedOutput.from_json(r) for r in data.get("renamed") or []])


@dataclass(frozen=True)
class ThresholdResult:
    """One of the summary's ``thresholds`` (named by the setting): its limit, what the job did, whether it was exceeded."""

    limit: float  # -1 (or 100 %) allows any number
    observed: float
    exceeded: bool


@dataclass(frozen=True)
class Durations:
    """The summary's ``durations``: when scoring started and ended, and the seconds spent in each part."""

    first_mini_batch_started_at: str  # "" when no mini-batch succeeded
    last_mini_batch_finished_at: str
    scoring_wall_seconds: float | None
    init_seconds_total: float  # init(): per mini-batch, or once per warm worker
    run_seconds_total: float
    merge_seconds: float


@dataclass(frozen=True)
class WarmWorkerInfo:
    """One of the summary's ``warm_workers``: a worker container as its ``state.json`` said at the merge."""

    worker: str
    state: str
    init_seconds: float | None
    processes: int
    mini_batches: list[str]  # scored by it, in order (the last start of its slot)
    error: str | None  # ErrorInfo.one_line() of a failed worker
    busy_seconds: float = 0.0  # spent scoring them (absent from older summaries: 0)
    first_started_at: str = ""
    last_ended_at: str = ""


@dataclass(frozen=True)
class MiniBatchFailure:
    """One of the summary's ``failures``: a mini-batch without a result."""

    mini_batch: str
    reason: str  # failed | missing
    error: str  # why it has no result, in one line
    files: int


@dataclass(frozen=True)
class ModelInfo:
    """The summary's ``model``: the model the run's mini-batches were scored with (its :class:`ModelPin`)."""

    location: str  # a local path, or a URI: for azureml:<name>@latest, the version's folder
    reference: str | None  # azureml:<name>@latest, as the YAML wrote it; None for a model.path
    version: str | None  # the registered version (resolved from @latest), else the YAML's model.version


@dataclass(frozen=True)
class Summary:
    """The job summary (``summary.json``): written by the merge, read by ``python -m batchscore``, the merge task, bench.

    The keys are those summaries had before this class; a summary without ``version`` (written
    before the key was added, last) reads as version 1.
    """

    endpoint: str
    deployment: str
    run_id: str
    status: str  # SUCCEEDED | SUCCEEDED_WITH_FAILURES | FAILED
    run_folder: str
    output: str | None  # None for summary_only, or when the output could not be made (``error`` says why)
    error: str | None
    contract: str  # azure | serve
    worker_mode: str  # per_mini_batch | warm
    warm_workers: list[WarmWorkerInfo]
    output_action: str
    output_layout: str
    ledger: str  # path of processed_mini-batches.csv
    errors: str  # path of errors.csv
    input: InputInfo
    mini_batch_size: int | str
    mini_batches: MiniBatchCounts
    items: ItemCounts
    rows: int  # in the output; for summary_only, what run() returned
    returned_elements: int
    custom_outputs: CustomOutputs
    thresholds: dict[str, ThresholdResult]
    durations: Durations
    rows_per_second: float | None  # per second of scoring wall time
    rows_per_run_second: float | None  # per second spent in run()
    failures: list[MiniBatchFailure]
    planned_at: str
    merged_at: str
    version: int = FORMAT_VERSION
    #: The workers' busy seconds / (workers x scoring wall seconds) (:mod:`batchscore.busy`); None when unknown.
    busy_fraction: float | None = None
    #: The model the run was scored with; None for a run folder planned before batchscore pinned models.
    model: ModelInfo | None = None

    SUCCEEDED = "succeeded"
    SUCCEEDED_WITH_FAILURES = "succeeded_with_failures"  # within the thresholds
    FAILED = "failed"  # over a threshold, or the output could not be made

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "custom_outputs": self.custom_outputs.to_json()}  # renames as {"from", "to"}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Summary:
        check_version({"version": FORMAT_VERSION, **data}, "summary")
        return cls(
            **{
                **_known(cls, data),
                "warm_workers": [_flat(WarmWorkerInfo, w) for w in data["warm_workers"]],
                "input": _flat(InputInfo, data["input"]),
                "mini_batches": _flat(MiniBatchCounts, data["mini_batches"]),
                "items": _flat(ItemCounts, data["items"]),
                "custom_outputs": CustomOutputs.from_json(data["custom_outputs"]),
                "thresholds": {name: _flat(ThresholdResult, t) for name, t in data["thresholds"].items()},
                "durations": _flat(Durations, data["durations"]),
                "failures": [_flat(MiniBatchFailure, f) for f in data["failures"]],
                "model": _flat(ModelInfo, data["model"]) if data.get("model") else None,
            }
        )

    @staticmethod
    def read(path: Path) -> Summary | None:
        """The summary in ``path``; None when no merge has written one (yet)."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        return Summary.from_json(data)

    def write(self, path: Path) -> None:
        """Write it to ``path`` atomically: a reader sees the previous summary or this one, whole."""
        write_json_atomic(path, self.to_json())


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class MiniBatchDir:
    """The result folder of one mini-batch."""

    path: Path
    index: int

    STATUS = "status.json"
    CLAIM = "attempt.json"

    @property
    def status_file(self) -> Path:
        return self.path / self.STATUS

    def new_result_name(self) -> str:
        """A fresh result file name; a rerun never writes over the file a status points at."""
        return f"result-{os.urandom(6).hex()}.parquet"

    def new_outputs_dir(self) -> Path:
        """A fresh, empty folder for the custom outputs of one attempt (AZUREML_BI_OUTPUT_PATH)."""
        path = self.path / f"outputs-{os.urandom(6).hex()}"
        path.mkdir(parents=True)
        return path

    def read_status(self) -> MiniBatchStatus | None:
        """The committed status, or None when no attempt has committed one."""
        try:
            data = json.loads(self.status_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        return MiniBatchStatus.from_json(data)

    def claim(self, attempt: int) -> None:
        """Make try ``attempt`` the only one that may commit (the orchestrator, before each try)."""
        write_json_atomic(self.path / self.CLAIM, {"attempt": attempt}, indent=None)
        (self.path / self.CLAIM).chmod(0o644)  # whatever the umask: the scoring container's user reads it

    def claimed_by(self) -> int | None:
        """The try that may commit now; None for a folder no orchestrator has claimed."""
        try:
            return int(json.loads((self.path / self.CLAIM).read_text(encoding="utf-8"))["attempt"])
        except FileNotFoundError:
            return None

    def commit(self, status: MiniBatchStatus) -> bool:
        """Make ``status`` the mini-batch's record; False (nothing changed) when a later try owns the folder.

        In the run folder only the orchestrator commits (:mod:`batchscore.intake`). A scoring
        container calls this on its own scratch folder, where the status it writes is only its
        report, which the orchestrator checks before it commits anything.

        A try whose Airflow worker died (a killed Celery worker) may leave its container
        scoring while the retry runs elsewhere: only the try that claimed the folder last
        commits, so a mini-batch is counted once. After a success, result files and
        custom-output folders of earlier attempts are removed; after a failure they stay on
        disk (nothing already produced is deleted), but nothing reads them.
        """
        owner = self.claimed_by()
        if owner is not None and owner != status.attempt:
            logging.getLogger(__name__).warning(
                "%s: try %d does not commit its %s result: try %d of this mini-batch has taken over",
                mini_batch_id(self.index),
                status.attempt,
                status.state,
                owner,
            )
            return False
        write_json_atomic(self.status_file, status.to_json())
        if status.succeeded:
            for stale in self.path.glob("result-*.parquet"):
                if stale.name != status.result_file:
                    stale.unlink(missing_ok=True)
            for stale in self.path.glob("outputs-*"):
                if stale.name != status.outputs_dir and stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
        return True

    def retract(self) -> None:
        """Withdraw the committed status before a new attempt, so a crash cannot leave an old one."""
        self.status_file.unlink(missing_ok=True)

    def result_path(self, status: MiniBatchStatus) -> Path | None:
        return self.path / status.result_file if status.result_file else None

    def outputs_path(self, status: MiniBatchStatus) -> Path | None:
        return self.path / status.outputs_dir if status.outputs_dir else None


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run directory (drawn in :mod:`batchscore_runtime.names`)."""

    root: Path

    @property
    def work(self) -> Path:
        return self.root / WORK_DIR_NAME

    @property
    def plan_file(self) -> Path:
        return self.work / "plan.json"

    @property
    def summary_file(self) -> Path:
        return self.root / SUMMARY_FILE_NAME

    @property
    def ledger_file(self) -> Path:
        return self.root / LEDGER_FILE_NAME

    @property
    def errors_file(self) -> Path:
        return self.root / ERRORS_FILE_NAME

    @property
    def model_pin_file(self) -> Path:
        """The model the run scores with (:class:`ModelPin`), written once by the first task that needs it."""
        return self.work / "model.json"

    @property
    def model_dir(self) -> Path:
        """Serving contract: the model archive's contents, unpacked once per run (``/opt/ml/model``)."""
        return self.work / "model"

    @property
    def collected_file(self) -> Path:
        """The list of custom outputs the merge placed in the run folder (so a re-merge can redo it)."""
        return self.work / "collected.json"

    @property
    def mini_batches_dir(self) -> Path:
        return self.work / "minibatches"

    @property
    def scratch_dir(self) -> Path:
        """Where containers write (see :mod:`batchscore_runtime.names`); nothing in it is trusted."""
        return self.work / "scratch"

    def attempt_scratch(self, index: int, attempt: int) -> Path:
        """The scratch folder of one container per mini-batch: its only writable mount."""
        return self.scratch_dir / attempt_folder_name(index, attempt)

    def worker_scratch(self, worker: str) -> Path:
        """A warm worker's scratch folder (``w1``), mounted at :attr:`ContainerPaths.SCRATCH`."""
        return self.scratch_dir / worker

    @property
    def results_dir(self) -> Path:
        return self.work / "results"

    @property
    def workers_dir(self) -> Path:
        """Warm workers: one state folder per worker container (``workers/w1/state.json``)."""
        return self.work / "workers"

    @property
    def workers_engine_file(self) -> Path:
        """Warm workers: the Docker engine they were started on (``{"id": ..., "name": ...}``)."""
        return self.workers_dir / "engine.json"

    def mini_batch_file(self, index: int) -> Path:
        return self.mini_batches_dir / f"{mini_batch_id(index)}.json"

    def mini_batch_dir(self, index: int) -> MiniBatchDir:
        return MiniBatchDir(self.results_dir / mini_batch_id(index), index)

    def read_plan(self) -> Plan | None:
        try:
            data = json.loads(self.plan_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        return Plan.from_json(data)

    def read_model_pin(self) -> ModelPin | None:
        try:
            data = json.loads(self.model_pin_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        return ModelPin.from_json(data)

    def read_summary(self) -> Summary | None:
        return Summary.read(self.summary_file)

    def read_mini_batch(self, index: int) -> MiniBatch:
        return read_mini_batch_file(self.mini_batch_file(index))


def read_mini_batch_file(path: Path) -> MiniBatch:
    return MiniBatch.from_json(json.loads(Path(path).read_text(encoding="utf-8")))


def now_iso() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


__all__ = [
    "DEFAULT_BATCH_STRATEGY",
    "DEFAULT_MAX_CONCURRENT_TRANSFORMS",
    "DEFAULT_MAX_PAYLOAD_MB",
    "FORMAT_VERSION",
    "MAX_PAYLOAD_LIMIT_MB",
    "ContainerPaths",
    "CustomOutputs",
    "Durations",
    "ERRORS_COLUMNS",
    "ERRORS_FILE_NAME",
    "ErrorInfo",
    "FilePart",
    "InputFile",
    "InputInfo",
    "ItemCounts",
    "ItemError",
    "LEDGER_COLUMNS",
    "LEDGER_FILE_NAME",
    "MiniBatch",
    "MiniBatchCounts",
    "MiniBatchDir",
    "MiniBatchFailure",
    "MiniBatchStatus",
    "ModelInfo",
    "ModelPin",
    "PinnedObject",
    "Plan",
    "PlanEntry",
    "RenamedOutput",
    "Summary",
    "ThresholdResult",
    "TransformConfig",
    "WarmWorkerInfo",
    "WORKER_STATE_FILE",
    "RunLayout",
    "atomic_path",
    "attempt_folder_name",
    "mini_batch_id",
    "now_iso",
    "read_mini_batch_file",
    "read_regular_file",
    "run_key",
    "write_json_atomic",
]
