"""batchscore's exception types: narrow, and each message says what to do."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class BatchScoreError(Exception):
    """Base class of every error batchscore raises on purpose."""


@dataclass(frozen=True)
class SpecIssue:
    """One problem in a deployment YAML: where it is and what is wrong."""

    line: int | None  # 1-based; None when the problem is not tied to a line
    key: str | None  # dotted path such as ``deployments[0].settings.mini_batch_size``
    message: str

    def format(self, path: Path | str) -> str:
        where = f"{path}:{self.line}" if self.line else f"{path}"
        key = f" {self.key}:" if self.key else ""
        return f"{where}:{key} {self.message}"


class DeploymentSpecError(BatchScoreError):
    """A deployment YAML is invalid; the message names the file, line and key of each problem."""

    def __init__(self, path: Path | str, issues: list[SpecIssue]):
        self.path = Path(path)
        self.issues = list(issues)
        super().__init__("\n".join(issue.format(path) for issue in self.issues))


class PlanError(BatchScoreError):
    """The input of a run cannot be planned (missing folder, no files, unreadable plan)."""


class ScoringError(BatchScoreError):
    """A mini-batch failed; the message names the mini-batch and the cause."""


class GpuUnavailableError(BatchScoreError):
    """The GPUs that ``resources.gpus`` asks for cannot be leased on this host (unknown or too few)."""


class MergeError(BatchScoreError):
    """The mini-batches' results cannot be merged into one output (e.g. a column's types differ)."""


class ThresholdExceededError(BatchScoreError):
    """The job has more failures than an error threshold allows; its output and summary were written."""


class InvalidDeploymentFilesError(BatchScoreError):
    """Deployment YAML files that failed to load, reported together as one Airflow import error."""

    def __init__(self, errors: list[DeploymentSpecError]):
        self.errors = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors))


class RequestImportError(BatchScoreError):
    """A SageMaker request (``CreateTransformJob`` or ``CreateModel`` JSON) cannot be turned into a deployment YAML;
    the message names the file and the field, and says what to do."""


class RunParamError(BatchScoreError):
    """A run's parameter (trigger form or ``conf``) cannot be applied; the message names it and its value."""


class ContainerSecurityError(BatchScoreError):
    """A scoring container would be set up unsafely (e.g. given the Docker socket, or run as root unasked)."""


class SecretUnavailableError(BatchScoreError):
    """A ``settings.secret_environment`` entry cannot be read from Airflow; the message never holds a value."""


class HostPathError(BatchScoreError):
    """A bind-mount source cannot be given to the Docker host: ``BATCHSCORE_HOST_PATHS`` is missing, wrong or incomplete."""


class StorageError(BatchScoreError):
    """A location on object storage or local disk cannot be listed, read or written. The message names the
    URI (credentials masked) and what to do, and never holds a credential."""


class StorageConnectionError(StorageError):
    """The Airflow connection named for a URI does not exist, or its scheme's provider is not installed."""


class StorageAccessError(StorageError):
    """Access denied: wrong or missing credentials, or credentials not allowed to do that."""


class StorageNotFoundError(StorageError):
    """The bucket, container, object or local path does not exist."""


class ObjectChangedError(StorageError):
    """An object changed or was deleted after the plan recorded its version token."""
