"""A serving deployment's ``transform`` (contract: serve): SageMaker batch transform's settings, with its names and defaults."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, field_validator, model_validator

from batchscore.spec.base import ENV_NAME, StrictModel
from batchscore_runtime.jsonpath import CSV_CONTENT_TYPES, JSON_CONTENT_TYPES  # what DataProcessing reads
from batchscore_runtime.jsonpath import parse as parse_json_path

# SageMaker's names are CreateTransformJob's keys, so that a transform job's request can be copied
# over. YAML reads ``None`` as the string "None", which is SageMaker's spelling; a YAML null
# (``null``, ``~``) is taken to mean the same.

#: Environment variables the orchestrator sets in a serving container (from the transform settings).
SAGEMAKER_ENVIRONMENT = {
    "SAGEMAKER_BATCH": None,
    "SAGEMAKER_MAX_PAYLOAD_IN_MB": "MaxPayloadInMB",
    "SAGEMAKER_BATCH_STRATEGY": "BatchStrategy",
    "SAGEMAKER_MAX_CONCURRENT_TRANSFORMS": "MaxConcurrentTransforms",
}


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


class ModelClientConfig(StrictModel):
    """Time limit and retries of one ``/invocations`` request (SageMaker's ``ModelClientConfig``)."""

    InvocationsTimeoutInSeconds: int = Field(600, ge=1, le=3600, description="Seconds one request may take.")
    InvocationsMaxRetries: int = Field(
        3,
        ge=0,
        le=3,
        description="Retries of a failed request (connection error, timeout, 5xx, 408, 429); other 4xx are not retried.",
    )


class DataProcessing(StrictModel):
    """Filters and join of CSV or JSON records (SageMaker's ``DataProcessing``); needs SplitType Line."""

    InputFilter: JsonPath = Field(
        "$",
        description="JSONPath selecting what of each input record is sent: a CSV record is the array of its "
        "fields ('$[1:]' drops the first column), a JSON record its value ('$.features'). The subset: $, .name, "
        "['a','b'], [i], [i,j], [a:b] with negative indexes, and *.",
    )
    OutputFilter: JsonPath = Field("$", description="JSONPath selecting what of each (joined) output record is kept ('$[0,-1]').")
    JoinSource: Annotated[Literal["None", "Input"], NoneString] = Field(
        "None",
        description="Input: join each output to its input record (CSV: input columns, then the output's; "
        "JSON: the output under SageMakerOutput).",
    )

    @property
    def active(self) -> bool:
        return (self.InputFilter, self.OutputFilter, self.JoinSource) != ("$", "$", "None")


class TransformSettings(StrictModel):
    """SageMaker batch transform's settings for ``contract: serve``, with SageMaker's names and defaults."""

    SplitType: Annotated[Literal["None", "Line", "RecordIO", "TFRecord"], NoneString] = Field(
        "None",
        description="None: a whole file is one request; Line: one record per line (blank lines skipped); "
        "RecordIO (MXNet framing) and TFRecord (framing kept, the length's CRC checked).",
    )
    BatchStrategy: Annotated[Literal["MultiRecord", "SingleRecord"] | None, BeforeValidator(_batch_strategy)] = Field(
        None,
        description="MultiRecord: as many records per request as fit in MaxPayloadInMB; SingleRecord: one. "
        "Unset: the container's /execution-parameters answer, else MultiRecord. MULTI_RECORD and SINGLE_RECORD "
        "are accepted too.",
    )
    MaxPayloadInMB: int | None = Field(
        None,
        ge=1,
        le=100,
        description="Largest request body in MiB; a record bigger than that fails its file. Unset: the "
        "container's answer, else 6.",
    )
    MaxConcurrentTransforms: int | None = Field(
        None, ge=1, le=256, description="Requests in flight to one container. Unset: the container's answer, else 1."
    )
    CompressionType: Annotated[Literal["None", "Gzip"], NoneString] = Field(
        "None",
        description="Gzip: the input files are gunzipped first (x.csv.gz gives x.csv.gz.out).",
    )
    ContentType: str | None = Field(None, min_length=1, description="Content-Type of the requests.")
    Accept: str | None = Field(None, min_length=1, description="Accept header of the requests.")
    AssembleWith: Annotated[Literal["None", "Line"], NoneString] = Field(
        "None",
        description="None: a file's responses concatenated as bytes; Line: a newline after each response that lacks one.",
    )
    client_config: ModelClientConfig = Field(
        default_factory=lambda: ModelClientConfig(),
        alias="ModelClientConfig",
        description="Time limit and retries of one /invocations request.",
    )
    Environment: dict[str, str] = Field(default_factory=dict, description="Environment variables of the serving container.")
    data_processing: DataProcessing = Field(
        default_factory=lambda: DataProcessing(),
        alias="DataProcessing",
        description="JSONPath filters and the join of each record; needs SplitType Line and a CSV or JSON Lines ContentType.",
    )

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
