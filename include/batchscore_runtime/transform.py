"""The serving contract's settings as its client receives them: the ``transform`` block and SageMaker's defaults.

Standard library only; :mod:`batchscore_runtime.formats` re-exports every name here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from batchscore_runtime.names import FORMAT_VERSION, check_version

#: SageMaker's defaults for the three settings a serving container may also choose
#: (``/execution-parameters``): used when neither the deployment nor the container sets them.
DEFAULT_MAX_CONCURRENT_TRANSFORMS = 1
DEFAULT_BATCH_STRATEGY = "MULTI_RECORD"
DEFAULT_MAX_PAYLOAD_MB = 6
MAX_PAYLOAD_LIMIT_MB = 100


@dataclass(frozen=True)
class TransformConfig:
    """What the serving client needs of a deployment's ``transform`` block (SageMaker's settings).

    The orchestrator builds it from the validated YAML and passes it to the client as JSON
    (``--transform``); ``None`` for the three negotiable settings means "not set by the job":
    the container's ``/execution-parameters`` answer, else the defaults above, apply.
    """

    split_type: str = "None"  # None | Line | RecordIO | TFRecord
    batch_strategy: str | None = None  # MULTI_RECORD | SINGLE_RECORD
    max_payload_mb: int | None = None  # 1..100
    max_concurrent_transforms: int | None = None
    compression: str = "None"  # None | Gzip (input files)
    content_type: str | None = None  # Content-Type of /invocations requests
    accept: str | None = None  # Accept of /invocations requests
    assemble_with: str = "None"  # None: responses concatenated; Line: a newline after each
    invocation_timeout: float = 600.0  # seconds per request
    invocation_max_retries: int = 3  # retries of a failed request
    input_filter: str = "$"  # JSONPath applied to each input record (CSV or JSON)
    output_filter: str = "$"  # JSONPath applied to each (joined) output record
    join_source: str = "None"  # None | Input: each output joined to its input record
    startup_timeout: float = 600.0  # seconds the container has to answer /ping with 200
    version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TransformConfig:
        check_version(data, "transform settings")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


__all__ = [
    "DEFAULT_BATCH_STRATEGY",
    "DEFAULT_MAX_CONCURRENT_TRANSFORMS",
    "DEFAULT_MAX_PAYLOAD_MB",
    "MAX_PAYLOAD_LIMIT_MB",
    "TransformConfig",
]
