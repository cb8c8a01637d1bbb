"""PlanOperator: the plan task of a deployment's task group."""

from __future__ import annotations

from typing import Any

from airflow.configuration import conf
from airflow.sdk import BaseOperator

from batchscore.model_archive import serving_model_dir
from batchscore.operators._base import DeploymentMixin
from batchscore.plan import mini_batch_refs, plan_run
from batchscore.run_store import place
from batchscore.ui.folders import XCOM_KEY, record


class PlanOperator(DeploymentMixin, BaseOperator):
    """List and partition the input files; return one small reference per mini-batch (to XCom).

    It pins the model the run scores with (:mod:`batchscore.model_pin`), and for a serving container
    (``contract: serve``) unpacks the model archive, once per run.
    """

    ui_color = "#e3f2fd"

    def __init__(self, *, endpoint_name: str, deployment: dict[str, Any], **kwargs: Any):
        super().__init__(**kwargs)
        self.endpoint_name = endpoint_name
        self.deployment = deployment

    def execute(self, context: Any) -> list[dict[str, Any]]:
        max_map_length = conf.getint("core", "max_map_length", fallback=1024)
        run_id = context["run_id"]
        original = self.run_spec(context)
        # Inputs or run folder on object storage: the plan is made in this host's mirror of the run
        # folder and uploaded, plan.json last (:mod:`batchscore.run_store`).
        placement = place(original, run_id, log_to=self.log)
        context["ti"].xcom_push(key=XCOM_KEY, value=record(placement))  # where the UI's report reads the run
        existing = placement.pull_plan() if placement.remote_run is not None else None  # local: plan_run reads it
        plan = plan_run(
            self.endpoint_name, placement.spec, run_id, max_mini_batches=max_map_length, source=placement.input_source()
        )
        if existing is None:
            placement.push_plan(plan)
        # The model every task of the run uses, pinned now unless the warm workers starting meanwhile have
        # (:mod:`batchscore.model_pin`): azureml:<name>@latest resolved, a missing model told here.
        if original.contract == "serve":
            placement = placement.with_model(self.log)  # fetched: the archive is unpacked once per run
            serving_model_dir(placement.spec, placement.layout)
        else:
            placement.pin_model(self.log)
        return mini_batch_refs(plan)
