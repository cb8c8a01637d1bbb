"""PlanOperator: the plan task of a deployment's task group."""

from __future__ import annotations

from typing import Any

from airflow.configuration import conf
from airflow.sdk import BaseOperator

from batchscore.model_archive import serving_model_dir
from batchscore.operators._base import DeploymentMixin
from batchscore.plan import mini_batch_refs, plan_run, run_layout


class PlanOperator(DeploymentMixin, BaseOperator):
    """List and partition the input files; return one small reference per mini-batch (to XCom).

    For a serving container (``contract: serve``) it also unpacks the model archive, once per run.
    """

    ui_color = "#e3f2fd"

    def __init__(self, *, endpoint_name: str, deployment: dict[str, Any], **kwargs: Any):
        super().__init__(**kwargs)
        self.endpoint_name = endpoint_name
        self.deployment = deployment

    def execute(self, context: Any) -> list[dict[str, Any]]:
        max_map_length = conf.getint("core", "max_map_length", fallback=1024)
        spec = self.run_spec(context)
        plan = plan_run(self.endpoint_name, spec, context["run_id"], max_mini_batches=max_map_length)
        if spec.contract == "serve":
            serving_model_dir(spec, run_layout(spec, context["run_id"]))
        return mini_batch_refs(plan)
