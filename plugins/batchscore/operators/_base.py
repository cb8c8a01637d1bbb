"""What the three operators share: the deployment they work on."""

from __future__ import annotations

from functools import cached_property
from typing import Any

from pydantic import ValidationError

from batchscore.errors import BatchScoreError
from batchscore.spec import DeploymentSpec


class DeploymentMixin:
    """Holds the deployment as plain JSON (serializable with the DAG) and validates it on use."""

    endpoint_name: str
    deployment: dict[str, Any]

    @cached_property
    def spec(self) -> DeploymentSpec:
        try:
            return DeploymentSpec.model_validate(self.deployment)
        except ValidationError as exc:  # e.g. the model folder was deleted after the DAG was parsed
            raise BatchScoreError(
                f"deployment {self.deployment.get('name')!r} of endpoint {self.endpoint_name!r} "
                f"is no longer valid:\n{exc}"
            ) from None

    def run_spec(self, context: Any) -> DeploymentSpec:
        """The deployment as this DAG run sees it: the YAML's, with the run's parameters applied."""
        return self.spec
