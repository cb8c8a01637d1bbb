"""A deployment's ``settings``, with Azure's names and defaults: mini-batches, retries, output, workers, environment, secrets."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, PositiveInt, ValidationInfo, field_validator, model_validator

from batchscore.spec.base import ENV_NAME, StrictModel, short

#: The suffixes of settings.output_file_name, by output_layout: table (the format), azure (text).
OUTPUT_FORMATS = (".csv", ".parquet", ".jsonl")
AZURE_LAYOUT_SUFFIXES = (".csv", ".txt")


class RetrySettings(StrictModel):
    """Retries and time limits of a mini-batch (Azure's ``retry_settings``)."""

    max_retries: int = Field(3, ge=0, le=100, description="Retries of a failed or timed-out mini-batch, 5 s apart.")
    timeout: PositiveInt = Field(
        30,
        description="Seconds one run() call may take; past it the worker is killed (SIGKILL) and the mini-batch "
        "retried. init() does not count (init_timeout). Refused for contract serve (use "
        "transform.ModelClientConfig).",
    )


#: Environment variables the orchestrator and runtime set in the scoring container.
RESERVED_ENVIRONMENT = frozenset(
    {"AZUREML_MODEL_DIR", "AZUREML_BI_OUTPUT_PATH", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "HOME"}
)
CONNECTION_FIELDS = ("password", "login", "host", "schema", "port", "uri")


class SecretRef(StrictModel):
    """batchscore's own: where one secret environment variable's value comes from.

    Either an Airflow variable (``variable``), or a field of an Airflow connection
    (``connection`` and ``field``). Only the reference is in the YAML; the value is read from
    Airflow (its metadata database or secrets backend) when the mini-batch starts.
    """

    variable: str | None = Field(None, min_length=1, description="Key of an Airflow variable.")
    connection: str | None = Field(None, min_length=1, description="Id of an Airflow connection.")
    field: str | None = Field(
        None,
        description="With connection: password (default), login, host, schema, port, uri, or extra.<key>.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> SecretRef:
        if (self.variable is None) == (self.connection is None):
            raise ValueError("a secret needs either `variable` or `connection` (not both)")
        if self.variable is not None and self.field is not None:
            raise ValueError("`field` goes with `connection`, not with `variable`")
        field = self.field
        if field is not None and field not in CONNECTION_FIELDS and not (field.startswith("extra.") and field[6:]):
            raise ValueError(f"field must be one of {', '.join(CONNECTION_FIELDS)} or extra.<key>, got {field!r}")
        return self

    def describe(self) -> str:
        """Where the value comes from, for messages (never the value)."""
        if self.variable is not None:
            return f"Airflow variable {self.variable!r}"
        return f"field {self.field or 'password'!r} of Airflow connection {self.connection!r}"


#: Units of ``mini_batch_size`` as a size: decimal (kB, MB, GB, TB) and binary (KiB, MiB, GiB, TiB).
SIZE_UNITS = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b)\s*$", re.IGNORECASE)


def size_bytes(text: str) -> int:
    """Bytes of a size such as ``"64MB"`` (10^6) or ``"1.5GiB"`` (2^30)."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r}")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])


def _mini_batch_size(value: Any) -> Any:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(f"must be 1 or more files, got {value}")
        return value
    if isinstance(value, str) and _SIZE.match(value):
        if size_bytes(value) < 1:
            raise ValueError(f"must be more than 0 bytes, got {value!r}")
        return value.strip()
    raise ValueError(f"must be a number of files (10) or a size such as '64MB' or '1GiB', got {short(value)}")


#: ``mini_batch_size``: a number of files, or a size (a string such as ``"64MB"``).
MiniBatchSize = Annotated[int | str, BeforeValidator(_mini_batch_size)]


#: settings.worker_mode when the YAML does not say (see docs/concepts/warm-workers.md for the measurements).
DEFAULT_WORKER_MODE: Literal["warm", "per_mini_batch"] = "warm"
#: settings.worker_queue_depth when the YAML does not say: one mini-batch scoring, one waiting (docs/workers.md).
DEFAULT_WORKER_QUEUE_DEPTH = 2


class Settings(StrictModel):
    """Batch settings, with Azure's names and defaults."""

    mini_batch_size: MiniBatchSize = Field(
        10,
        description="Files per mini-batch (a whole number), or batchscore's size mode: a size such as "
        "'64MB' or '1GiB': mini-batches are then cut by bytes, in input order, with the heaviest as light as "
        "that number of mini-batches allows; a large CSV, JSON Lines or Parquet file is cut into parts "
        "(split_large_files), any other file bigger than the size is a mini-batch of its own. The trigger "
        "form's mini_batch_size replaces it for one run.",
        json_schema_extra={
            "anyOf": [
                {"type": "integer", "minimum": 1},
                {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*[kKmMgGtT][iI]?[bB]\s*$"},
            ]
        },
    )
    max_files_per_mini_batch: PositiveInt = Field(
        1000, description="batchscore's own: with mini_batch_size as a size, at most this many files per mini-batch."
    )
    split_large_files: bool = Field(
        True,
        description="batchscore's own: with mini_batch_size as a size, cut CSV, JSON Lines and Parquet files "
        "bigger than half of it into parts of at most half (between records, never inside a quoted CSV field; "
        "Parquet by row groups), each scored as a file of its own, results in input order.",
    )
    max_concurrency_per_instance: int = Field(
        1,
        ge=1,
        le=64,
        description="Worker processes in one scoring container, each with its own init(); "
        "a mini-batch's files are shared out among them in contiguous parts, and their results put back in "
        "input order. Refused for contract serve (use transform.MaxConcurrentTransforms).",
    )
    error_threshold: int = Field(
        -1,
        ge=-1,
        description="Failed items (files) allowed across the job; -1 allows any number. Contract serve: default 0, "
        "as SageMaker fails a job when a file fails.",
    )
    mini_batch_error_threshold: int = Field(
        -1, ge=-1, description="Failed mini-batches allowed across the job; -1 allows any number."
    )
    allowed_failed_percent: float = Field(
        100, ge=0, le=100, description="Failed mini-batches allowed, as a percentage of all mini-batches."
    )
    output_action: Literal["append_row", "summary_only"] = Field(
        "append_row",
        description="append_row: what run() returns is written to output_file_name; "
        "summary_only: it is only counted (scripts that write their own files). Contract serve: default "
        "summary_only (the .out files are the output; append_row also joins them, in input order, into "
        "output_file_name).",
    )
    output_layout: Literal["table", "azure"] = Field(
        "table",
        description="batchscore's own: table: column names kept, in the format the file name says; "
        "azure: Azure's append_row text exactly (no header, values separated by a space; .csv or .txt). "
        "Refused for contract serve.",
    )
    output_file_name: str = Field(
        "predictions.csv",
        description="The job's output file, a plain file name; its suffix picks the format: .csv (with a header), "
        ".parquet, .jsonl (output_layout azure: .csv or .txt).",
    )
    retry_settings: RetrySettings = Field(
        RetrySettings(), description="Retries and time limit of a mini-batch's run() (Azure's retry_settings)."
    )
    init_timeout: PositiveInt = Field(
        600,
        description="batchscore's own: seconds a scoring container may take to start and run init() before it is "
        "killed (contract serve: to answer GET /ping with 200).",
    )
    worker_mode: Literal["warm", "per_mini_batch"] = Field(
        DEFAULT_WORKER_MODE,
        description="batchscore's own: warm starts the run's worker containers once (init() or the serving "
        "container's /ping once per worker) and hands them one mini-batch after another; per_mini_batch "
        "starts a fresh container for every mini-batch.",
    )
    worker_idle_timeout: PositiveInt = Field(
        600,
        description="batchscore's own, warm workers: seconds a worker waits without a mini-batch before it "
        "stops on its own (a safety net: the run's teardown task removes the workers).",
    )
    worker_queue_depth: PositiveInt = Field(
        DEFAULT_WORKER_QUEUE_DEPTH,
        description="batchscore's own, warm workers: mini-batches each worker holds at once, the one it scores "
        "and depth - 1 waiting in order, so that it starts the next the moment one ends; up to "
        "resources.instance_count x depth score tasks run at once, and a waiting task's inputs are staged "
        "while the worker scores. A free worker is always preferred over a queue. 1: a worker takes a "
        "mini-batch only when it has none. Default 2: one scoring and one ready, enough to hide a task's "
        "start-up; more only holds more Airflow task slots.",
    )
    deferrable: bool = Field(
        False,
        description="batchscore's own, warm workers only: a score task hands its mini-batch to a warm worker and "
        "defers to Airflow's triggerer until the worker is done, then resumes to take the result in and commit "
        "it; a task that waits (in a worker's queue, or while its mini-batch scores) holds no Airflow worker "
        "slot. Needs an `airflow triggerer` on the Docker host of the warm workers (it reads their scratch "
        "folder). Results, retries and reruns are those of a task that does not defer. Default false: on one "
        "host each deferral costs a round trip through the triggerer and the scheduler (docs/workers.md).",
    )
    logging_level: Literal["debug", "info", "warning"] = Field(
        "info", description="The runtime's log level; the scoring script's logging follows it."
    )
    environment_variables: dict[str, str] = Field(
        default_factory=dict,
        description="Plain environment variables of the scoring process. They are shown in Airflow's UI and "
        "logs: put secrets in secret_environment.",
    )
    secret_environment: dict[str, SecretRef] = Field(
        default_factory=dict,
        description="batchscore's own: environment variables whose values are secrets kept in Airflow, "
        "{NAME: {variable: <key>}} or {NAME: {connection: <conn id>, field: password}}. They are read when "
        "the mini-batch starts, given to the container only, masked in the task log, never stored in the DAG.",
    )

    @model_validator(mode="after")
    def _deferrable_needs_warm(self) -> Settings:
        if self.deferrable and self.worker_mode != "warm":
            raise ValueError(
                "settings.deferrable: true needs settings.worker_mode: warm (a container per mini-batch has no "
                "worker to hand the mini-batch to); set worker_mode: warm, or remove deferrable"
            )
        return self

    @field_validator("secret_environment")
    @classmethod
    def _secret_names(cls, value: dict[str, SecretRef], info: ValidationInfo) -> dict[str, SecretRef]:
        plain = info.data.get("environment_variables") or {}
        for name in value:
            if not ENV_NAME.fullmatch(name):
                raise ValueError(f"secret_environment: {name!r} is not an environment variable name")
            if name in plain:
                raise ValueError(f"{name!r} is in both environment_variables and secret_environment")
            if name in RESERVED_ENVIRONMENT or name.startswith("BATCHSCORE_"):
                raise ValueError(f"secret_environment: {name!r} is set by batchscore itself")
        return value

    @property
    def mini_batch_bytes(self) -> int | None:
        """The size mode's bytes per mini-batch; None when mini-batches are counted in files."""
        return size_bytes(self.mini_batch_size) if isinstance(self.mini_batch_size, str) else None

    @field_validator("output_file_name")
    @classmethod
    def _output_name(cls, value: str, info: ValidationInfo) -> str:
        if "/" in value or "\\" in value or value.startswith(".") or not value.strip():
            raise ValueError(f"output_file_name must be a plain file name, got {value!r}")
        layout = info.data.get("output_layout", "table")  # declared before output_file_name
        suffixes = AZURE_LAYOUT_SUFFIXES if layout == "azure" else OUTPUT_FORMATS
        if not value.lower().endswith(suffixes):
            raise ValueError(f"output_file_name {value!r} must end with one of {', '.join(suffixes)} (output_layout {layout})")
        return value
