"""What the three operators share: the deployment they work on."""

from __future__ import annotations

from functools import cached_property
from typing import Any

from pydantic import ValidationError

from batchscore.errors import BatchScoreError
from batchscore.run_params import OUTPUT_PATH, apply_run_params, deployment_names
from batchscore.spec import DeploymentSpec


class DeploymentMixin:
    """Holds the deployment as plain JSON (serializable with the DAG) and validates it on use."""

    endpoint_name: str
    deployment: dict[str, Any]
    get_dag: Any  # BaseOperator's, which every class using the mixin derives from

    @cached_property
    def spec(self) -> DeploymentSpec:
        try:
            return DeploymentSpec.model_validate(self.deployment)
        except ValidationError as exc:  # e.g. the model folder was deleted after the DAG was parsed
            raise BatchScoreError(
                f"deployment {self.deployment.get('name')!r} of endpoint {self.endpoint_name!r} is no longer valid:\n{exc}"
            ) from None

    def run_spec(self, context: Any) -> DeploymentSpec:
        """The deployment as this DAG run sees it: the YAML's, with the run's parameters applied.

        Plan, score and merge of one run call this with the same ``params`` (the run's conf over
        the DAG's defaults), so they agree; see :mod:`batchscore.run_params`.
        """
        params = context.get("params") or {}
        # With several deployments, an output_path param is the parent of one folder per deployment.
        dag = context.get("dag") or self.get_dag()
        several = params.get(OUTPUT_PATH) is not None and dag is not None and len(deployment_names(dag)) > 1
        return apply_run_params(self.spec, params, several_deployments=several)
