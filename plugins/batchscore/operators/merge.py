"""MergeOperator: the merge task of a deployment's task group."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperator, TriggerRule

from batchscore.merge import merge_run
from batchscore.operators._base import DeploymentMixin


class MergeOperator(DeploymentMixin, BaseOperator):
    """Concatenate the mini-batch results into the output and write the summary.

    Runs when every mini-batch has finished, failed or not (``all_done``), and fails itself
    when any mini-batch has no result, so the run cannot end green with holes in it.
    """

    ui_color = "#e8f5e9"

    def __init__(self, *, endpoint_name: str, deployment: dict[str, Any], **kwargs: Any):
        kwargs.setdefault("trigger_rule", TriggerRule.ALL_DONE)
        super().__init__(**kwargs)
        self.endpoint_name = endpoint_name
        self.deployment = deployment

    def execute(self, context: Any) -> dict[str, Any]:
        summary = merge_run(self.endpoint_name, self.run_spec(context), context["run_id"])
        self.log.info("Output: %s (%d rows)", summary.output, summary.rows)
        # The output asset's event says where this run's output is (a run's conf may move it).
        outlet_events = context.get("outlet_events")
        for asset in self.outlets if outlet_events is not None else ():
            outlet_events[asset].extra = {
                "run_id": summary.run_id,
                "run_folder": summary.run_folder,
                "output": summary.output,
                "status": summary.status,
                "rows": summary.rows,
                "failed_items": summary.items.failed,
            }
        return {"output": summary.output, "rows": summary.rows, "status": summary.status}
