"""The deployment YAML: its schema, its loading, and errors that name file, line and key.

Two layouts are accepted, and both give an :class:`EndpointSpec` (one Airflow DAG):

* an **endpoint file** with a ``deployments:`` list; each deployment becomes a task group;
* an **Azure deployment file**: Azure ML's batch-deployment YAML (``name``, ``endpoint_name``,
  ``model``, ``code_configuration``, ``environment``, ``settings``, ...) plus batchscore's
  ``input`` and ``output`` blocks; it is an endpoint with that one deployment.

Relative paths are resolved against the YAML file's folder. Unknown keys are errors, with a
"did you mean" suggestion.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import types
import typing
import urllib.parse
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BeforeValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PositiveInt,
    PrivateAttr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema, models_json_schema
from pydantic_core import PydanticCustomError

from batchscore.errors import DeploymentSpecError, SpecIssue
from batchscore_runtime.jsonpath import CSV_CONTENT_TYPES, JSON_CONTENT_TYPES  # what DataProcessing reads
from batchscore_runtime.jsonpath import parse as parse_json_path

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"
OUTPUT_FORMATS = (".csv", ".parquet", ".jsonl")
AZURE_LAYOUT_SUFFIXES = (".csv", ".txt")
SCHEDULE_PRESETS = (
    "@once",
    "@continuous",
    "@hourly",
    "@daily",
    "@midnight",
    "@weekly",
    "@monthly",
    "@quarterly",
    "@yearly",
    "@annually",
)

# --------------------------------------------------------------------------- path types


#: Environment variable: the folders (absolute, separated by os.pathsep, ``:`` on Linux) that
#: every path of a deployment (model, code, input, output) must lie in once symbolic links and
#: ``..`` are resolved. Unset or empty: no confinement. Read on every validation, so the DAG
#: processor (YAML files) and the workers (run parameters) both check it where it is set.
ALLOWED_ROOTS_ENV = "BATCHSCORE_ALLOWED_ROOTS"


def allowed_roots() -> list[Path] | None:
    """The folders of ``BATCHSCORE_ALLOWED_ROOTS``, resolved; ``None`` when it is unset (no confinement)."""
    raw = os.environ.get(ALLOWED_ROOTS_ENV, "")
    roots = []
    for part in (p.strip() for p in raw.split(os.pathsep)):
        if not part:
            continue
        if not Path(part).is_absolute():
            raise ValueError(f"{ALLOWED_ROOTS_ENV} holds {part!r}, which is not an absolute path")
        roots.append(Path(part).resolve())
    return roots or None


def _confine(given: Path, joined: Path, resolved: Path) -> None:
    """Refuse a resolved path outside the allowed roots, saying whether ``..`` or a symlink led out."""
    roots = allowed_roots()
    if roots is None or any(resolved.is_relative_to(root) for root in roots):
        return
    lexical = Path(os.path.normpath(joined))
    if any(lexical.is_relative_to(root) for root in roots):
        how = "; a symbolic link on the way leads out of them"
    elif ".." in given.parts:
        how = "; its '..' leads out of them"
    else:
        how = ""
    raise ValueError(
        f"path {str(given)!r} resolves to {resolved}, outside the folders allowed by {ALLOWED_ROOTS_ENV} "
        f"({', '.join(str(r) for r in roots)}){how}"
    )


def _resolve(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    given = value
    if not value.is_absolute():
        if base is None:
            raise ValueError(f"relative path {str(value)!r} needs a base folder")
        value = Path(base) / value
    resolved = Path(value).resolve()
    _confine(given, Path(value), resolved)  # before any existence check: nothing is said of paths outside
    return resolved


def _must_exist(value: Path) -> Path:
    if not value.exists():
        raise ValueError(f"path {value} does not exist")
    return value


def _must_be_dir(value: Path) -> Path:
    if not value.is_dir():
        raise ValueError(f"path {value} does not exist or is not a folder")
    return value


#: A path, relative to the YAML file's folder unless absolute; resolved when loaded.
ResolvedPath = Annotated[Path, AfterValidator(_resolve)]
ExistingPath = Annotated[Path, AfterValidator(_resolve), AfterValidator(_must_exist)]
ExistingDir = Annotated[Path, AfterValidator(_resolve), AfterValidator(_must_be_dir)]
Name = Annotated[str, Field(pattern=NAME_PATTERN)]

# --------------------------------------------------------------------------- models


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ModelSpec(_Strict):
    """The model: a folder or a file, mounted read-only; the container finds it in AZUREML_MODEL_DIR."""

    path: ExistingPath
    name: str | None = Field(None, description="The model's name (informational, as in Azure's registry).")


class CodeConfiguration(_Strict):
    """The folder with the scoring script, mounted read-only."""

    code: ExistingDir
    scoring_script: str = Field(description="File name of the scoring script, relative to `code`.")

    @field_validator("scoring_script")
    @classmethod
    def _script_in_code(cls, value: str, info: ValidationInfo) -> str:
        rel = PurePosixPath(value)
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"scoring_script must be a path inside `code`, got {value!r}")
        code = info.data.get("code")
        if code is not None and not (code / rel).is_file():
            raise ValueError(f"scoring script {value!r} not found in {code}")
        return value


# Docker's image reference grammar (github.com/distribution/reference): what the engine accepts,
# so that a bad name is told when the YAML is loaded, not as Docker's raw APIError at run time.
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
#: The digests Docker knows, and their lengths in hex digits.
_DIGESTS = {"sha256": 64, "sha384": 96, "sha512": 128}
MAX_IMAGE_NAME = 255


def image_reference_problem(ref: str) -> str | None:
    """What is wrong with an image reference, in words; ``None`` when Docker would take it.

    ``[registry[:port]/]path[:tag][@digest]``: the path's components in lowercase letters and
    digits (separated by ``.``, ``_``, ``__`` or dashes); the first component is a registry when
    it holds ``.`` or ``:``, is ``localhost``, or has capitals (Docker's own rule).
    """
    rest, _, digest = ref.partition("@")
    if "@" in ref:
        algorithm, _, hex_digits = digest.partition(":")
        size = _DIGESTS.get(algorithm)
        if size is None or not re.fullmatch(f"[a-f0-9]{{{size}}}", hex_digits):
            return f"the digest {digest!r} must be sha256: and 64 lowercase hex digits (or sha384:, sha512:)"
    name, tag = rest, None
    if ":" in rest.rpartition("/")[2]:
        name, _, tag = rest.rpartition(":")
        if not _TAG.fullmatch(tag):
            return (
                f"the tag {tag!r} must be 1 to 128 letters, digits, '_', '.' and '-', "
                "and not start with '.' or '-'"
            )
    if not name:
        return "the repository name is missing"
    if len(name) > MAX_IMAGE_NAME:
        return f"the name is {len(name)} characters long, more than Docker's {MAX_IMAGE_NAME}"
    first, slash, remainder = name.partition("/")
    domain = None
    if slash and (any(c in first for c in ".:") or first == "localhost" or first != first.lower()):
        domain, name = first, remainder
        if not _DOMAIN.fullmatch(domain):
            return f"the registry {domain!r} must be a host name or an IP address, with an optional :port"
    components = name.split("/")
    if all(_PATH_COMPONENT.fullmatch(c) for c in components):
        return None
    if all(_PATH_COMPONENT.fullmatch(c.lower()) for c in components):
        fixed = (
            (f"{domain}/" if domain else "") + name.lower() + (f":{tag}" if tag is not None else "")
            + (f"@{digest}" if "@" in ref else "")
        )
        return f"repository names must be lowercase, and {name!r} is not (did you mean {fixed!r}?)"
    return (
        f"the repository name {name!r} must be lowercase letters and digits, in components joined by '/' "
        "and separated inside by '.', '_', '__' or '-'"
    )


def _image(value: str) -> str:
    problem = image_reference_problem(value)
    if problem:
        raise ValueError(f"{value!r} is not a valid image reference: {problem}")
    return value


class EnvironmentSpec(_Strict):
    """The container image: for ``contract: azure`` the scoring image (Python 3.9+, pandas and
    pyarrow); for ``contract: serve`` the serving image, started as ``IMAGE serve``."""

    image: Annotated[str, AfterValidator(_image)] = Field(
        min_length=1,
        description="A Docker image reference, [registry[:port]/]name[:tag][@sha256:digest]; "
        "the name in lowercase.",
    )


class InputSpec(_Strict):
    """Where the input files are: a folder and a glob pattern (``**/`` to include subfolders)."""

    path: ResolvedPath
    pattern: str = Field(
        "*",
        min_length=1,
        description="A glob matched inside `path` ('*.csv', '**/*.csv'); no '..' and not absolute.",
    )

    @field_validator("pattern")
    @classmethod
    def _inside_path(cls, value: str) -> str:
        if value.startswith("/"):
            raise ValueError(
                f"pattern {value!r} is absolute, but it is matched inside input.path; "
                "put the folder in input.path and keep only the file pattern here ('*.csv')"
            )
        if ".." in PurePosixPath(value).parts:
            raise ValueError(
                f"pattern {value!r} leaves input.path ('..'); "
                "a pattern is matched inside input.path: point input.path at the folder instead"
            )
        return value


class OutputSpec(_Strict):
    """Where each run writes its output, summary and work files: ``<path>/<run id>/``."""

    path: ResolvedPath


#: What to do about an output folder that is, or holds, the input folder (see :func:`output_overlap`).
OUTPUT_OVERLAP_ADVICE = (
    "the plan never reads files inside the output folder, so no input file would be left; "
    "write the output to another folder (a subfolder of the input folder is fine)"
)


def output_overlap(input_path: Path, output_path: Path) -> str | None:
    """Why ``output_path`` cannot be the output folder of ``input_path``, or ``None`` when it can.

    The plan never reads a file inside the output folder (the run folders of this and earlier
    runs), so an output folder that is the input folder, or holds it, leaves no input at all.
    An output folder strictly inside the input folder is fine: only its files are skipped.
    Both paths are compared resolved (symbolic links followed), as the plan compares them.
    """
    real_input, real_output = Path(input_path).resolve(), Path(output_path).resolve()
    if real_output == real_input:
        return f"{output_path} is the input folder"
    if real_input.is_relative_to(real_output):
        return f"{output_path} holds the input folder {input_path}"
    return None


class RetrySettings(_Strict):
    """Retries and time limits of a mini-batch (Azure's ``retry_settings``)."""

    max_retries: int = Field(3, ge=0, le=100, description="Retries of a failed or timed-out mini-batch.")
    timeout: PositiveInt = Field(
        30,
        description="Seconds one run() call may take; past it the worker is killed and the mini-batch retried.",
    )


ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: Environment variables the orchestrator and runtime set in the scoring container.
RESERVED_ENVIRONMENT = frozenset(
    {"AZUREML_MODEL_DIR", "AZUREML_BI_OUTPUT_PATH", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "HOME"}
)
CONNECTION_FIELDS = ("password", "login", "host", "schema", "port", "uri")


class SecretRef(_Strict):
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
    raise ValueError(
        f"must be a number of files (10) or a size such as '64MB' or '1GiB', got {_short(value)}"
    )


#: ``mini_batch_size``: a number of files, or a size (a string such as ``"64MB"``).
MiniBatchSize = Annotated[Union[int, str], BeforeValidator(_mini_batch_size)]


#: settings.worker_mode when the YAML does not say (see README, "Warm workers", for the measurements).
DEFAULT_WORKER_MODE = "warm"


class Settings(_Strict):
    """Batch settings, with Azure's names and defaults."""

    mini_batch_size: MiniBatchSize = Field(
        10,
        description="Files per mini-batch (a whole number), or batchscore's size mode: a size such as "
        "'64MB' or '1GiB', and mini-batches are then balanced by bytes, keeping input order.",
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
        "a mini-batch's files are shared out among them.",
    )
    error_threshold: int = Field(
        -1, ge=-1, description="Failed items (files) allowed across the job; -1 allows any number."
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
        "summary_only: it is only counted (scripts that write their own files).",
    )
    output_layout: Literal["table", "azure"] = Field(
        "table",
        description="table: column names kept, in the format the file name says; "
        "azure: Azure's append_row text (no header, values separated by spaces).",
    )
    output_file_name: str = Field(
        "predictions.csv", description="The job's output file; its suffix picks the format."
    )
    retry_settings: RetrySettings = RetrySettings()
    init_timeout: PositiveInt = Field(
        600,
        description="Seconds a scoring container may take to start and run init() before it is killed.",
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
    logging_level: Literal["debug", "info", "warning"] = "info"
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
            raise ValueError(
                f"output_file_name {value!r} must end with one of {', '.join(suffixes)} (output_layout {layout})"
            )
        return value


# --------------------------------------------------------------------------- serving contract
# SageMaker batch transform's settings, with SageMaker's names (CreateTransformJob's keys), so a
# transform job's request can be copied over. YAML reads ``None`` as the string "None", which is
# SageMaker's spelling; a YAML null (``null``, ``~``) is taken to mean the same.

#: Environment variables the orchestrator sets in a serving container (from the transform settings).
SAGEMAKER_ENVIRONMENT = {
    "SAGEMAKER_BATCH": None,
    "SAGEMAKER_MAX_PAYLOAD_IN_MB": "MaxPayloadInMB",
    "SAGEMAKER_BATCH_STRATEGY": "BatchStrategy",
    "SAGEMAKER_MAX_CONCURRENT_TRANSFORMS": "MaxConcurrentTransforms",
}
MODEL_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")


def _none_string(value: Any) -> Any:
    return "None" if value is None else value


#: BatchStrategy as CreateTransformJob spells it, and as the container sees it (environment, /execution-parameters).
BATCH_STRATEGY_VALUES = {"MultiRecord": "MULTI_RECORD", "SingleRecord": "SINGLE_RECORD"}


def _batch_strategy(value: Any) -> Any:
    spelled = {v: k for k, v in BATCH_STRATEGY_VALUES.items()}
    return spelled.get(value, value) if isinstance(value, str) else value


def _json_path(value: str) -> str:
    parse_json_path(value)  # the runtime's own parser: what it accepts, the YAML may say
    return value


NoneString = BeforeValidator(_none_string)
JsonPath = Annotated[str, AfterValidator(_json_path)]


class ModelClientConfig(_Strict):
    """Time limit and retries of one ``/invocations`` request (SageMaker's ``ModelClientConfig``)."""

    InvocationsTimeoutInSeconds: int = Field(600, ge=1, le=3600, description="Seconds one request may take.")
    InvocationsMaxRetries: int = Field(
        3, ge=0, le=3, description="Retries of a failed request (connection error, timeout, 5xx, 408, 429)."
    )


class DataProcessing(_Strict):
    """Filters and join of CSV or JSON records (SageMaker's ``DataProcessing``); needs SplitType Line."""

    InputFilter: JsonPath = Field("$", description="JSONPath selecting what of each input record is sent.")
    OutputFilter: JsonPath = Field("$", description="JSONPath selecting what of each (joined) output record is kept.")
    JoinSource: Annotated[Literal["None", "Input"], NoneString] = Field(
        "None",
        description="Input: join each output to its input record (CSV: input columns, then the output's; "
        "JSON: the output under SageMakerOutput).",
    )

    @property
    def active(self) -> bool:
        return (self.InputFilter, self.OutputFilter, self.JoinSource) != ("$", "$", "None")


class TransformSettings(_Strict):
    """SageMaker batch transform's settings for ``contract: serve``, with SageMaker's names and defaults."""

    SplitType: Annotated[Literal["None", "Line", "RecordIO", "TFRecord"], NoneString] = Field(
        "None", description="None: a whole file is one request; Line, RecordIO, TFRecord: records."
    )
    BatchStrategy: Annotated[Literal["MultiRecord", "SingleRecord"] | None, BeforeValidator(_batch_strategy)] = Field(
        None,
        description="MultiRecord: as many records per request as fit in MaxPayloadInMB; SingleRecord: one. "
        "Unset: the container's /execution-parameters answer, else MultiRecord.",
    )
    MaxPayloadInMB: int | None = Field(
        None, ge=1, le=100, description="Largest request body in MB. Unset: the container's answer, else 6."
    )
    MaxConcurrentTransforms: int | None = Field(
        None, ge=1, le=256, description="Requests in flight to one container. Unset: the container's answer, else 1."
    )
    CompressionType: Annotated[Literal["None", "Gzip"], NoneString] = Field(
        "None", description="Gzip: the input files are gzip-compressed."
    )
    ContentType: str | None = Field(None, min_length=1, description="Content-Type of the requests.")
    Accept: str | None = Field(None, min_length=1, description="Accept header of the requests.")
    AssembleWith: Annotated[Literal["None", "Line"], NoneString] = Field(
        "None", description="None: the responses of a file concatenated; Line: a newline after each."
    )
    client_config: ModelClientConfig = Field(default_factory=lambda: ModelClientConfig(), alias="ModelClientConfig")
    Environment: dict[str, str] = Field(
        default_factory=dict, description="Environment variables of the serving container."
    )
    data_processing: DataProcessing = Field(default_factory=lambda: DataProcessing(), alias="DataProcessing")

    @field_validator("Environment")
    @classmethod
    def _environment(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not ENV_NAME.fullmatch(name):
                raise ValueError(f"Environment: {name!r} is not an environment variable name")
            if name in SAGEMAKER_ENVIRONMENT:
                key = SAGEMAKER_ENVIRONMENT[name]
                raise ValueError(
                    f"Environment: {name} is set by batchscore"
                    + (f" from transform.{key}; set that instead" if key else " (always 'true')")
                )
        return value

    @model_validator(mode="after")
    def _data_processing(self) -> TransformSettings:
        dp = self.data_processing
        if not dp.active:
            return self
        content = (self.ContentType or "").split(";")[0].strip().lower()
        if content not in CSV_CONTENT_TYPES + JSON_CONTENT_TYPES:
            raise ValueError(
                "DataProcessing needs ContentType text/csv or a JSON type "
                f"({', '.join(JSON_CONTENT_TYPES)}) to read records, got {self.ContentType!r}"
            )
        if self.SplitType != "Line":
            raise ValueError(f"DataProcessing needs SplitType Line (one record per line), got {self.SplitType!r}")
        return self

    @property
    def batch_strategy_value(self) -> str | None:
        """``MULTI_RECORD`` or ``SINGLE_RECORD``, as the container sees it; None when the job leaves it open."""
        return BATCH_STRATEGY_VALUES.get(self.BatchStrategy or "")

    def environment(self) -> dict[str, str]:
        """The serving container's SageMaker variables: SAGEMAKER_BATCH always, the others only when set here."""
        env = {"SAGEMAKER_BATCH": "true"}
        if self.MaxPayloadInMB is not None:
            env["SAGEMAKER_MAX_PAYLOAD_IN_MB"] = str(self.MaxPayloadInMB)
        if self.batch_strategy_value is not None:
            env["SAGEMAKER_BATCH_STRATEGY"] = self.batch_strategy_value
        if self.MaxConcurrentTransforms is not None:
            env["SAGEMAKER_MAX_CONCURRENT_TRANSFORMS"] = str(self.MaxConcurrentTransforms)
        return env


def _gpus(value: Any) -> int | Literal["all"] | list[str]:
    if isinstance(value, bool):
        raise ValueError("gpus must be a count, 'all', or a list of device ids")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"gpus must be 0 or more, got {value}")
        return value
    if value == "all":
        return "all"
    if isinstance(value, list) and value and all(isinstance(v, (int, str)) and not isinstance(v, bool) for v in value):
        return [str(v) for v in value]
    raise ValueError(f"gpus must be a count, 'all', or a non-empty list of device ids, got {value!r}")


MEMORY_PATTERN = r"^[0-9]+[bkmgBKMG]?$"
MEMORY_UNITS = {"b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
MIN_MEMORY = 6 * 1024**2  # Docker refuses less
SIZE_SCHEMA = [
    {"type": "string", "pattern": MEMORY_PATTERN},
    {"type": "integer", "minimum": MIN_MEMORY},
    {"type": "null"},
]


def memory_bytes(value: str) -> int:
    """Bytes of a size in Docker's syntax (``"4g"``, ``"512m"``, ``"1048576"``)."""
    unit = value[-1].lower()
    return int(value[:-1]) * MEMORY_UNITS[unit] if unit in MEMORY_UNITS else int(value)


def _bytes_as_text(value: Any) -> Any:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _memory(value: str | None) -> str | None:
    if value is None:
        return None
    if not re.fullmatch(MEMORY_PATTERN, value):
        raise ValueError(f"a size is a whole number with b, k, m or g, e.g. '512m' or '4g'; got {value!r}")
    if memory_bytes(value) < MIN_MEMORY:
        raise ValueError(f"a size must be at least 6m, got {value!r}")
    return value


class Resources(_Strict):
    """What one run may use, and what its scoring containers may reach."""

    instance_count: PositiveInt = Field(1, description="Mini-batches of one run scored at the same time.")
    gpus: Annotated[Any, AfterValidator(_gpus)] = Field(
        0,
        description="GPUs per scoring container: a count, 'all', or a list of device ids.",
        json_schema_extra={
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {"const": "all"},
                {"type": "array", "items": {"type": ["string", "integer"]}, "minItems": 1},
            ]
        },
    )
    share_gpus: bool = Field(
        False,
        description="Let concurrent scoring containers (and worker processes) share GPUs; "
        "by default each gets GPUs of its own.",
    )
    network: bool = Field(
        False,
        description="batchscore's own: give the scoring container a network (Docker's default bridge). "
        "By default it has none: no access to other hosts, the Docker host or the internet.",
    )
    memory: Annotated[str | None, BeforeValidator(_bytes_as_text), AfterValidator(_memory)] = Field(
        None,
        description="batchscore's own: memory limit of one scoring container, in Docker's syntax: a whole "
        "number with b, k, m or g ('512m', '4g'), at least 6m; no swap beyond it. Default: no limit.",
        json_schema_extra={"anyOf": SIZE_SCHEMA},
    )
    pids_limit: int = Field(
        4096,
        ge=64,
        description="batchscore's own: processes and threads one scoring container may have at once "
        "(fork bombs stop there); -1 is not accepted.",
    )
    shm_size: Annotated[str | None, BeforeValidator(_bytes_as_text), AfterValidator(_memory)] = Field(
        None,
        description="batchscore's own: size of /dev/shm in the container, Docker's syntax ('1g'); "
        "default Docker's 64m. Raise it for data loaders that share memory between processes.",
        json_schema_extra={"anyOf": SIZE_SCHEMA},
    )
    queue: Name | None = Field(
        None,
        description="batchscore's own: the Airflow queue of the scoring tasks (and of the warm workers' "
        "start and stop), so that with the CeleryExecutor only workers started with --queues <name> run "
        "them, e.g. the GPU hosts' workers. Planning and merging stay on the default queue. Default: "
        "Airflow's [operators] default_queue.",
    )
    pool: Name | None = Field(
        None,
        description="batchscore's own: the Airflow pool the scoring tasks take slots of, to cap mini-batches "
        "running at once across deployments (e.g. one slot per GPU). The pool must exist (airflow pools "
        "set); Airflow does not schedule tasks of a missing pool. Default: default_pool.",
    )
    pool_slots: PositiveInt = Field(1, description="batchscore's own: pool slots one scoring task takes.")


#: Keys of Azure's deployment YAML that batchscore spells otherwise, and how (top level only).
KEY_HINTS = {
    "compute": "Azure's compute cluster is an Airflow queue here: set resources.queue to a queue that "
    "the Celery workers of those machines serve (README: Running on several workers)",
}
#: Settings of the Azure contract that mean nothing to a serving container, and what to use instead.
AZURE_ONLY_SETTINGS = {
    "max_concurrency_per_instance": "transform.MaxConcurrentTransforms",
    "output_layout": None,
}
#: Defaults of ``settings`` that differ for ``contract: serve``: SageMaker fails a job when a file
#: fails, and writes one ``.out`` file per input instead of one output file.
SERVE_SETTING_DEFAULTS = {"error_threshold": 0, "output_action": "summary_only"}


class DeploymentSpec(_Strict):
    """One deployment: a model, its scoring code (or serving image), an input and an output."""

    name: Name
    description: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    contract: Literal["azure", "serve"] = Field(
        "azure",
        description="azure: an Azure ML scoring script (init/run) in code_configuration; serve: a SageMaker "
        "serving container (IMAGE serve, /ping and /invocations on port 8080) with the transform settings.",
    )
    model: ModelSpec
    code_configuration: CodeConfiguration | None = Field(
        None, validate_default=True, description="contract azure (required): the scoring script."
    )
    environment: EnvironmentSpec
    input: InputSpec
    output: OutputSpec
    transform: TransformSettings | None = Field(
        None,
        validate_default=True,
        description="contract serve: SageMaker batch transform's settings, with its names and defaults.",
    )
    settings: Settings = Settings()
    resources: Resources = Resources()

    @field_validator("code_configuration")
    @classmethod
    def _code_for_azure(cls, value: CodeConfiguration | None, info: ValidationInfo) -> CodeConfiguration | None:
        contract = info.data.get("contract", "azure")
        if contract == "azure" and value is None:
            raise PydanticCustomError("missing", "Field required")  # reported with the other missing keys
        if contract == "serve" and value is not None:
            raise ValueError("code_configuration is for contract: azure; a serving container brings its own code")
        return value

    @field_validator("transform")
    @classmethod
    def _transform_for_serve(cls, value: TransformSettings | None, info: ValidationInfo) -> TransformSettings | None:
        contract = info.data.get("contract", "azure")
        if contract == "azure" and value is not None:
            raise ValueError("transform is for contract: serve; an Azure scoring script takes settings instead")
        if contract == "serve" and value is None:
            return TransformSettings()
        return value

    @model_validator(mode="before")
    @classmethod
    def _serve_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("contract") == "serve":
            settings = data.get("settings")
            if settings is None or isinstance(settings, dict):
                data = {**data, "settings": {**SERVE_SETTING_DEFAULTS, **(settings or {})}}
        return data

    @model_validator(mode="after")
    def _contract(self) -> DeploymentSpec:
        if self.contract == "azure":
            return self
        for key, instead in AZURE_ONLY_SETTINGS.items():
            # Compared with the default, not with what was set: operators validate a full dump again.
            if getattr(self.settings, key) != Settings.model_fields[key].default:
                raise ValueError(
                    f"settings.{key} applies to contract: azure only"
                    + (f"; for a serving container use {instead}" if instead else "; remove it")
                )
        if self.settings.retry_settings.timeout != RetrySettings.model_fields["timeout"].default:
            raise ValueError(
                "settings.retry_settings.timeout applies to contract: azure only; for a serving container use "
                "transform.ModelClientConfig.InvocationsTimeoutInSeconds"
            )
        if self.settings.output_file_name.lower().endswith(".parquet") and self.settings.output_action == "append_row":
            raise ValueError(
                "settings.output_file_name: the .out files of a serving container are joined as text, "
                "so the collected output cannot be .parquet; use .csv or .jsonl"
            )
        model = self.model.path
        if model.is_file() and not model.name.lower().endswith(MODEL_ARCHIVE_SUFFIXES):
            raise ValueError(
                f"model.path {model} must be a folder or a model archive (.tar.gz) for contract: serve"
            )
        overlap = set(self.transform.Environment) & set(self.settings.environment_variables)
        if overlap:
            raise ValueError(
                f"transform.Environment and settings.environment_variables both set {', '.join(sorted(overlap))}"
            )
        return self

    @model_validator(mode="after")
    def _output_apart_from_input(self) -> DeploymentSpec:
        clash = output_overlap(self.input.path, self.output.path)
        if clash:
            raise ValueError(f"output.path {clash}; {OUTPUT_OVERLAP_ADVICE}")
        return self

    @model_validator(mode="after")
    def _workers_fit_gpus(self) -> DeploymentSpec:
        gpus, workers = self.resources.gpus, self.settings.max_concurrency_per_instance
        count = len(gpus) if isinstance(gpus, list) else gpus
        if isinstance(count, int) and 0 < count < workers and not self.resources.share_gpus:
            raise ValueError(
                f"settings.max_concurrency_per_instance is {workers} but resources.gpus gives each container "
                f"{count} GPU(s), so worker processes would share GPUs; lower max_concurrency_per_instance, "
                "raise resources.gpus, or set resources.share_gpus: true"
            )
        return self


# --------------------------------------------------------------------------- schedule
# A DAG starts on a cron expression or preset, on updates of upstream Airflow assets, or only
# by hand. batchscore.triggers turns a Schedule into Airflow's schedule argument.


def _check_schedule(value: str) -> str:
    if value in SCHEDULE_PRESETS:
        return value
    from croniter import croniter  # Airflow's own cron parser

    if not croniter.is_valid(value):
        raise ValueError(
            f"schedule {value!r} is neither a cron expression ('0 2 * * *') nor a preset "
            f"({', '.join(SCHEDULE_PRESETS)})"
        )
    return value


def _check_asset(entry: str | AssetSpec) -> None:
    """Refuse what Airflow's ``Asset`` refuses, and URIs with credentials (Airflow would show them)."""
    shown = _shown(entry)
    for value in (entry,) if isinstance(entry, str) else (entry.name, entry.uri):
        if value is not None and "://" in value:
            try:
                userinfo = "@" in (urllib.parse.urlsplit(value).netloc or "")
            except ValueError as exc:
                raise ValueError(f"asset {shown}: not a valid URI ({exc})") from None
            if userinfo:
                raise ValueError(
                    f"asset {shown}: a URI must not hold a user name or password "
                    "(Airflow shows asset names and URIs to every user)"
                )
    from batchscore.triggers import upstream_asset  # imports Airflow; only files that use assets pay

    try:
        upstream_asset(entry)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"asset {shown}: {exc}") from None


def _check_asset_string(value: str) -> str:
    _check_asset(value)
    return value


class AssetSpec(_Strict):
    """An upstream asset by name and/or URI, spelt exactly as the producing DAG declares it."""

    name: str | None = Field(None, description="The asset's name; defaults to its URI.")
    uri: str | None = Field(None, description="The asset's URI; defaults to its name.")

    @model_validator(mode="after")
    def _valid(self) -> AssetSpec:
        if self.name is None and self.uri is None:
            raise ValueError("an asset needs a name, a uri, or both")
        _check_asset(self)
        return self


def _string_or_mapping(value: Any) -> str:
    return "mapping" if isinstance(value, (dict, BaseModel)) else "string"


#: One upstream asset: ``"s3://bucket/path"`` (a URI), ``"iris-features"`` (a name), or a
#: mapping ``{name: ..., uri: ...}``.
AssetEntry = Annotated[
    Annotated[str, AfterValidator(_check_asset_string), Tag("string")] | Annotated[AssetSpec, Tag("mapping")],
    Discriminator(_string_or_mapping),
]


class AssetSchedule(_Strict):
    """Start a run when upstream Airflow assets are updated (a producing task succeeded, or an event was posted)."""

    assets: list[AssetEntry] = Field(
        min_length=1,
        description="Upstream assets: a URI ('s3://bucket/iris/'), a name ('iris-features'), "
        "or {name: ..., uri: ...}, as the producer declares them.",
    )
    when: Literal["all", "any"] = Field(
        "all",
        description="all: a run starts once every asset has been updated since the last run "
        "(Airflow's default); any: an update of any one of them starts a run.",
    )

    @field_validator("assets")
    @classmethod
    def _distinct(cls, assets: list[str | AssetSpec]) -> list[str | AssetSpec]:
        from batchscore.triggers import upstream_asset

        seen: dict[str, str | AssetSpec] = {}
        for entry in assets:
            asset = upstream_asset(entry)
            for key in (f"the name {asset.name!r}", f"the URI {asset.uri!r}"):
                if key not in seen:
                    seen[key] = entry
                elif seen[key] == entry:
                    raise ValueError(f"asset {_shown(entry)} is listed twice")
                else:
                    raise ValueError(
                        f"assets {_shown(seen[key])} and {_shown(entry)} are one asset to Airflow (both have {key})"
                    )
        return assets


def _shown(entry: str | AssetSpec) -> str:
    """The entry for an error message, with any credentials in a URI masked (errors are public)."""
    text = repr(entry if isinstance(entry, str) else {k: v for k, v in entry.model_dump().items() if v is not None})
    return re.sub(r"(://)[^/@\s'\"]*@", r"\1***@", text)


def _schedule_kind(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, str):
        return "cron"
    return "asset-schedule" if isinstance(value, (dict, AssetSchedule)) else "other"


def _not_a_schedule(value: Any) -> None:
    raise ValueError(
        f"schedule must be a cron expression, a preset, or a mapping with 'assets', got {_short(value)}"
    )


#: ``None`` (manual runs only), a cron expression or preset, or an :class:`AssetSchedule`.
Schedule = Annotated[
    Annotated[None, Tag("none")]
    | Annotated[str, AfterValidator(_check_schedule), Tag("cron")]
    | Annotated[AssetSchedule, Tag("asset-schedule")]
    | Annotated[SkipJsonSchema[Any], AfterValidator(_not_a_schedule), Tag("other")],
    Discriminator(_schedule_kind),
]
SCHEDULE_DESCRIPTION = (
    "A cron expression or preset, or {assets: [...]} to run when upstream Airflow assets are "
    "updated; none for manual runs only."
)


class EndpointSpec(_Strict):
    """An endpoint: one Airflow DAG; each deployment is a task group plan → score → merge."""

    schema_: str | None = Field(None, alias="$schema")
    endpoint_name: Name = Field(description="The DAG id.")
    description: str | None = None
    schedule: Schedule = Field(None, description=SCHEDULE_DESCRIPTION)
    tags: dict[str, str] = Field(default_factory=dict)
    deployments: list[DeploymentSpec] = Field(min_length=1)
    _source: Path | None = PrivateAttr(None)

    @field_validator("deployments")
    @classmethod
    def _unique(cls, deployments: list[DeploymentSpec]) -> list[DeploymentSpec]:
        for attr, what in (("name", "name"), ("output", "output.path")):
            seen: dict[Any, str] = {}
            for d in deployments:
                value = getattr(d, attr)
                key = value.path if attr == "output" else value
                if key in seen:
                    raise ValueError(f"deployments {seen[key]!r} and {d.name!r} have the same {what}: {key}")
                seen[key] = d.name
        return deployments

    @property
    def dag_id(self) -> str:
        return self.endpoint_name

    @property
    def source(self) -> Path | None:
        """The YAML file this endpoint was loaded from."""
        return self._source


class DeploymentFile(DeploymentSpec):
    """Azure's deployment YAML: one deployment, with its endpoint's name and schedule."""

    schema_: str | None = Field(None, alias="$schema")
    endpoint_name: Name = Field(description="The DAG id.")
    type: Literal["model"] = "model"
    schedule: Schedule = Field(None, description=SCHEDULE_DESCRIPTION)

    def to_endpoint(self, context: dict[str, Any]) -> EndpointSpec:
        own = {"schema_", "endpoint_name", "type", "schedule"}
        deployment = DeploymentSpec.model_validate(self.model_dump(exclude=own), context=context)
        return EndpointSpec(
            endpoint_name=self.endpoint_name,
            description=self.description,
            schedule=self.schedule,
            tags=self.tags,
            deployments=[deployment],
        )


# --------------------------------------------------------------------------- loading


def load_endpoint(path: Path | str) -> EndpointSpec:
    """Load and validate one YAML file; raises :class:`DeploymentSpecError` naming file, line and key."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DeploymentSpecError(path, [SpecIssue(None, None, f"cannot read the file: {exc}")]) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, column = _line_column(raw, exc.start)
        raise DeploymentSpecError(
            path,
            [
                SpecIssue(
                    line,
                    None,
                    f"not UTF-8 text: byte 0x{raw[exc.start]:02x} at column {column} cannot be decoded "
                    "(a binary file, or text in another encoding? save it as UTF-8)",
                )
            ],
        ) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.load(text, Loader=yaml.SafeLoader)  # noqa: S506 - SafeLoader
    except yaml.MarkedYAMLError as exc:
        raise DeploymentSpecError(path, [_syntax_issue(exc)]) from exc
    except yaml.reader.ReaderError as exc:  # a character YAML refuses, such as NUL: no mark, a position
        line, column = _line_column(text, exc.position)
        raise DeploymentSpecError(
            path,
            [
                SpecIssue(
                    line,
                    None,
                    f"character #x{exc.character:04x} at column {column} is not allowed in YAML (a binary file?)",
                )
            ],
        ) from exc
    except yaml.YAMLError as exc:
        raise DeploymentSpecError(path, [SpecIssue(1, None, f"YAML error: {exc}")]) from exc
    if node is None:
        empty = "the file is empty" if not text.strip() else "the file holds no keys, only comments"
        raise DeploymentSpecError(path, [SpecIssue(1, None, empty)])
    if not isinstance(data, dict):
        raise DeploymentSpecError(
            path,
            [
                SpecIssue(
                    node.start_mark.line + 1, None, f"the top level must be a mapping of keys, not {_kind(data)}"
                )
            ],
        )
    lines, duplicates = _line_map(node)
    if duplicates:
        raise DeploymentSpecError(path, duplicates)

    model = _layout(data)
    context = {"base_dir": path.parent.resolve()}
    booleans = _booleans_for_numbers(model, data, lines)
    try:
        spec = model.model_validate(data, context=context)
    except ValidationError as exc:
        named = {issue.key for issue in booleans}
        issues = [i for i in _issues(exc, data, lines, model, context["base_dir"]) if i.key not in named]
        raise DeploymentSpecError(path, sorted(issues + booleans, key=lambda i: i.line or 0)) from None
    if booleans:
        raise DeploymentSpecError(path, booleans)
    endpoint = spec.to_endpoint(context) if isinstance(spec, DeploymentFile) else spec
    endpoint._source = path
    return endpoint


def _line_column(text: str | bytes, position: int) -> tuple[int, int]:
    """The 1-based line and column of ``position`` in ``text``."""
    newline = "\n" if isinstance(text, str) else b"\n"
    start = text.rfind(newline, 0, position) + 1  # type: ignore[arg-type]
    return text.count(newline, 0, position) + 1, position - start + 1  # type: ignore[arg-type]


def _syntax_issue(exc: yaml.MarkedYAMLError) -> SpecIssue:
    """A YAML syntax error on the line to fix: where an unclosed quote or bracket opens, else where it broke."""
    problem, context = exc.problem or "", exc.context or ""
    context_line = exc.context_mark.line + 1 if exc.context_mark else None
    at_end = "end of stream" in problem or "<stream end>" in problem
    mark = exc.context_mark if (at_end or exc.problem_mark is None) and exc.context_mark else exc.problem_mark
    line = mark.line + 1 if mark else None
    message = f"YAML syntax error: {problem or context}"
    if context and problem:
        message += f" ({context}{f' that starts on line {context_line}' if context_line not in (None, line) else ''})"
    if "'\\t'" in problem:
        message += "; indent with spaces, not tabs"
    elif at_end and context_line is not None:
        message += "; is a quote or bracket not closed?"
    elif "expected <block end>" in problem:
        message += "; check the indentation of this line"
    return SpecIssue(line, None, message)


def _kind(value: Any) -> str:
    """What a YAML value is, in words: 'a list', 'a string', 'null'..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    names = {str: "a string", list: "a list", dict: "a mapping"}
    return next((n for t, n in names.items() if isinstance(value, t)), f"a {type(value).__name__}")


def _layout(data: dict) -> type[BaseModel]:
    """The endpoint file (``deployments:``) or Azure's deployment file.

    A file with none of a deployment's own keys is taken for an endpoint file, so that one
    without ``deployments`` is told just that, not that ``name``, ``model``, ... are missing.
    """
    deployment_only = set(DeploymentFile.model_fields) - set(EndpointSpec.model_fields)
    if "deployments" in data or not deployment_only & set(data):
        return EndpointSpec
    return DeploymentFile


def _booleans_for_numbers(model: type[BaseModel], data: Any, lines: dict[tuple, int]) -> list[SpecIssue]:
    """true/false (YAML also reads yes, no, on, off so) where a number belongs; pydantic takes them for 1 and 0."""
    issues: list[SpecIssue] = []

    def walk(tp: Any, value: Any, path: tuple) -> None:
        tp = _unwrap(tp)
        if isinstance(value, bool):
            if tp in (int, float):
                what = "a whole number" if tp is int else "a number"
                issues.append(
                    SpecIssue(
                        lines.get(path),
                        _dotted(path),
                        f"must be {what}, got the boolean {json.dumps(value)} "
                        "(YAML reads true, false, yes, no, on and off as booleans)",
                    )
                )
            return
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, child in items:
            child_type = _child_type(tp, key)
            if child_type is not None:
                walk(child_type, child, path + (key,))

    walk(model, data, ())
    return issues


def key_line(path: Path, *key_paths: tuple) -> int | None:
    """The 1-based line of the first of ``key_paths`` present in the YAML file, if any.

    For problems found after loading (across files), e.g. ``("deployments", 1, "output", "path")``.
    """
    try:
        lines, _ = _line_map(yaml.compose(Path(path).read_text(encoding="utf-8"), Loader=yaml.SafeLoader))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return next((lines[k] for k in key_paths if k in lines), None)


def _line_map(node: yaml.Node | None) -> tuple[dict[tuple, int], list[SpecIssue]]:
    """Map each key path of the YAML document to its 1-based line; report duplicate keys."""
    lines: dict[tuple, int] = {}
    duplicates: list[SpecIssue] = []

    def walk(n: yaml.Node, path: tuple) -> None:
        if isinstance(n, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, value_node in n.value:
                key = key_node.value
                line = key_node.start_mark.line + 1
                if key in seen:
                    duplicates.append(
                        SpecIssue(line, _dotted(path + (key,)), f"key appears twice (first on line {seen[key]})")
                    )
                seen[key] = line
                lines[path + (key,)] = line
                walk(value_node, path + (key,))
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                lines.setdefault(path + (i,), item.start_mark.line + 1)
                walk(item, path + (i,))

    if node is not None:
        lines[()] = node.start_mark.line + 1
        walk(node, ())
    return lines, duplicates


def _dotted(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _data_path(loc: tuple, data: Any, error_type: str) -> tuple:
    """Keep the parts of a pydantic ``loc`` that are keys of the YAML (drop union-member tags)."""
    path: tuple = ()
    current = data
    for i, part in enumerate(loc):
        if isinstance(current, dict) and part in current:
            current = current[part]
            path += (part,)
        elif isinstance(current, list) and isinstance(part, int) and part < len(current):
            current = current[part]
            path += (part,)
        elif i == len(loc) - 1 and error_type in ("missing", "extra_forbidden"):
            path += (part,)
        # else: a tag pydantic adds for union members or validators; not a YAML key
    return path


def _allowed_keys(model: type[BaseModel], parent: tuple) -> list[str]:
    """The keys allowed at ``parent`` in ``model``'s schema (field names and aliases)."""
    tp: Any = model
    for part in parent:
        tp = _child_type(tp, part)
        if tp is None:
            return []
    tp = _unwrap(tp)
    if typing.get_origin(tp) in (Union, types.UnionType):  # a value of several shapes, e.g. schedule
        models = [_unwrap(a) for a in typing.get_args(tp)]
        tp = next((m for m in models if isinstance(m, type) and issubclass(m, BaseModel)), tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return sorted(f.alias or name for name, f in tp.model_fields.items())
    return []


def _unwrap(tp: Any) -> Any:
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _child_type(tp: Any, part: Any) -> Any:
    tp = _unwrap(tp)
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            found = _child_type(arg, part)
            if found is not None:
                return found
        return None
    if isinstance(part, int):
        return typing.get_args(tp)[0] if origin in (list, tuple) else None
    if origin is dict:
        return typing.get_args(tp)[1]
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        for name, f in tp.model_fields.items():
            if part in (name, f.alias):
                return f.annotation
    return None


def _issues(
    exc: ValidationError, data: dict, lines: dict[tuple, int], model: type[BaseModel], base_dir: Path | None = None
) -> list[SpecIssue]:
    issues: list[SpecIssue] = []
    seen: set[tuple] = set()
    for err in exc.errors():
        path = _data_path(err["loc"], data, err["type"])
        if path in seen:  # several union members failed for one value: report it once
            continue
        seen.add(path)
        if err["type"] == "value_error":  # a check of a whole mapping or list: point at the key it is about
            path = _culprit(path, data, lines, err["msg"].removeprefix("Value error, "), base_dir)
        line = next((lines[path[:n]] for n in range(len(path), -1, -1) if path[:n] in lines), None)
        if err["type"] == "extra_forbidden":
            message = f"unknown key {path[-1]!r}"
            top = len(path) == 1 or (len(path) == 3 and path[0] == "deployments")  # a deployment's own key
            hint = KEY_HINTS.get(str(path[-1])) if top else None
            match = difflib.get_close_matches(str(path[-1]), _allowed_keys(model, path[:-1]), n=1, cutoff=0.8)
            if hint:
                message += f"; {hint}"
            elif match:
                message += f"; did you mean {match[0]!r}?"
            else:
                allowed = _allowed_keys(model, path[:-1])
                if allowed:
                    message += f"; allowed keys here: {', '.join(allowed)}"
        elif err["type"] == "missing":
            message = "required key is missing"
        elif err["type"] == "string_pattern_mismatch":
            message = (
                "must start with a letter or digit and hold only letters, digits, '_' and '-' "
                f"(at most 63 characters), got {_short(err.get('input'))}"
            )
        elif err["type"] == "value_error":  # our validators' messages already quote the value
            message = err["msg"].removeprefix("Value error, ")
        elif err["type"] in ("model_type", "dict_type"):  # pydantic: "a valid dictionary or instance of ModelSpec"
            message = f"must be a mapping of keys, got {_short(err.get('input'))}"
        elif err["type"] == "list_type":
            message = f"must be a list, got {_short(err.get('input'))}"
        else:
            message = f"{err['msg']} (got {_short(err.get('input'))})"
        issues.append(SpecIssue(line, _dotted(path) or None, message))
    return sorted(issues, key=lambda i: i.line or 0)


def _culprit(path: tuple, data: Any, lines: dict[tuple, int], message: str, base_dir: Path | None) -> tuple:
    """The key a whole-mapping or whole-list check is about, when it can be told; else ``path``.

    A mapping's check that names a key first ("settings.max_concurrency_per_instance is 4 but
    ...") points at that key; a list of deployments that repeats a name or an output folder
    points at the repeat.
    """
    value = _value_at(data, path)
    if isinstance(value, dict):
        named = path + tuple(message.split(" ", 1)[0].split("."))
        return named if named in lines else path
    if isinstance(value, list) and all(isinstance(item, dict) for item in value):
        for key in (("name",), ("output", "path")):
            seen: set[Any] = set()
            for i, item in enumerate(value):
                found = _value_at(item, key)
                if isinstance(found, str) and key[0] == "output" and base_dir is not None:
                    found = (base_dir / found).resolve()
                if found is not None and found in seen and path + (i, *key) in lines:
                    return path + (i, *key)
                seen.add(found)
    return path


def _value_at(data: Any, path: tuple) -> Any:
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def json_schema() -> dict[str, Any]:
    """The JSON schema of a deployment YAML (either layout), for editors."""
    refs, schema = models_json_schema(
        [(EndpointSpec, "validation"), (DeploymentFile, "validation")], by_alias=True
    )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "batchscore endpoint (deployments: [...]) or Azure-style deployment file",
        "anyOf": [refs[(EndpointSpec, "validation")], refs[(DeploymentFile, "validation")]],
        **schema,
    }


if __name__ == "__main__":  # pragma: no cover - `python -m batchscore.spec > schema.json`
    print(json.dumps(json_schema(), indent=2))
