"""What starts an endpoint's DAG runs (its schedule: cron, preset or upstream assets), and the asset each deployment updates.

* :func:`airflow_schedule` turns the YAML's ``schedule`` into Airflow's ``schedule`` argument: a
  cron expression or preset as it is, ``{assets: [...]}`` into Airflow assets (all of them
  updated, or any one of them with ``when: any``); each entry is
  :func:`batchscore.spec.upstream_asset`, which the YAML's validation builds too.
* :func:`output_asset` is the asset a deployment's merge task updates when it succeeds, for
  downstream DAGs to be scheduled on: ``batchscore/<endpoint>/<deployment>``.

Runs started by hand take the trigger form's params: see :mod:`batchscore.run_params`.
"""

from __future__ import annotations

from airflow.sdk import Asset, AssetAny

from batchscore.spec import AssetSchedule, upstream_asset

#: The name (and URI) of a deployment's output asset: ``batchscore/<endpoint>/<deployment>``.
OUTPUT_ASSET_PREFIX = "batchscore"

AirflowSchedule = str | list[Asset] | AssetAny | None


def airflow_schedule(schedule: str | AssetSchedule | None) -> AirflowSchedule:
    """Airflow's ``schedule`` argument for the YAML's ``schedule``."""
    if not isinstance(schedule, AssetSchedule):
        return schedule
    assets = [upstream_asset(entry) for entry in schedule.assets]
    return AssetAny(*assets) if schedule.when == "any" else assets  # a list: all of them


def output_asset(endpoint_name: str, deployment_name: str) -> Asset:
    """The asset a deployment's merge task updates when a run's output is complete."""
    return Asset(name=f"{OUTPUT_ASSET_PREFIX}/{endpoint_name}/{deployment_name}")
