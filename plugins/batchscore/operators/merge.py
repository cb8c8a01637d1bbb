"""MergeOperator: the merge task of a deployment's task group."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperator, TriggerRule

from batchscore.errors import MergeError, ThresholdExceededError
from batchscore.merge import merge_run
from batchscore.operators._base import DeploymentMixin
from batchscore.run_store import place


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
        run_id = context["run_id"]
        # A run folder on object storage: the committed results come into this host's mirror, the merge runs
        # there, and its output, records and summary (last) go back (:mod:`batchscore.run_store`).
        placement = place(self.run_spec(context), run_id, log_to=self.log)
        placement.pull_results()
        previous = placement.previous_collected()
        if placement.remote_run is not None:
            placement.layout.summary_file.unlink(missing_ok=True)  # only this merge's summary goes up
        try:
            summary = merge_run(self.endpoint_name, placement.spec, run_id)
        except (ThresholdExceededError, MergeError) as exc:
            if placement.remote_run is None or placement.layout.read_summary() is None:
                raise
            placement.push_merge(previous)  # the records of a failed job are kept, as on local disk
            raise type(exc)(placement.on_remote(str(exc))) from None
        summary = placement.push_merge(previous) or summary
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
