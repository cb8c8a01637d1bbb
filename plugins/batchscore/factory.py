"""The DAG factory: one Airflow DAG per endpoint YAML, one task group per deployment.

``build_dags(folder, globals())`` is the one call a DAG file makes. A YAML file that fails to
load never hides the others: the valid ones become DAGs, and the invalid ones are reported
together as an import error of the calling DAG file, each naming its file, line and key.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, TaskGroup

from batchscore.errors import DeploymentSpecError, InvalidDeploymentFilesError, SpecIssue
from batchscore.operators import MergeOperator, PlanOperator, ScoreMiniBatchOperator, ServeMiniBatchOperator
from batchscore.operators.score import RETRY_DELAY
from batchscore.operators.warm import StartWorkersOperator, StopWorkersOperator, WarmScoreMiniBatchOperator
from batchscore.spec import AssetSchedule, EndpointSpec, key_line, load_endpoint
from batchscore.triggers import RUN_PARAMS, airflow_schedule, dag_params, output_asset, upstream_asset

log = logging.getLogger(__name__)

START_DATE = datetime(2024, 1, 1, tzinfo=timezone.utc)
YAML_SUFFIXES = (".yaml", ".yml")
INVALID_DAG_ID = "batchscore_invalid_deployments"


def build_dag(endpoint: EndpointSpec) -> DAG:
    """The DAG of one endpoint: per deployment, a task group ``plan → score[mapped] → merge``.

With warm workers (``settings.worker_mode: warm``) the scoring tasks sit between a setup task
that starts the run's worker containers and a teardown task that removes them:
``plan → start_workers → score[mapped] → stop_workers``, and ``score → merge``.

    Runs start on the YAML's schedule (cron, preset or assets), or by hand with the DAG's params
    (the trigger form); each deployment's merge task updates its output asset (see
    :mod:`batchscore.triggers`).
    """
    with DAG(
        dag_id=endpoint.dag_id,
        schedule=airflow_schedule(endpoint.schedule),
        params=dag_params(endpoint),
        start_date=START_DATE,
        catchup=False,
        description=endpoint.description or f"Batch scoring endpoint {endpoint.endpoint_name}",
        doc_md=_doc(endpoint),
        tags=["batchscore", *(f"{k}:{v}" for k, v in endpoint.tags.items())],
        default_args={"owner": "batchscore"},
    ) as dag:
        for deployment in endpoint.deployments:
            common = {
                "endpoint_name": endpoint.endpoint_name,
                "deployment": deployment.model_dump(mode="json", by_alias=True),
            }
            with TaskGroup(group_id=deployment.name, tooltip=deployment.description or deployment.name):
                plan = PlanOperator(task_id="plan", **common)
                warm = deployment.settings.worker_mode == "warm"
                if warm:
                    operator: type[ScoreMiniBatchOperator] = WarmScoreMiniBatchOperator
                elif deployment.contract == "serve":
                    operator = ServeMiniBatchOperator
                else:
                    operator = ScoreMiniBatchOperator
                resources = deployment.resources
                # Only the tasks that talk to the scoring hosts' Docker engine follow the deployment's queue.
                queue = {"queue": resources.queue} if resources.queue else {}
                pool = {"pool": resources.pool, "pool_slots": resources.pool_slots} if resources.pool else {}
                score = operator.partial(
                    task_id="score",
                    **queue,
                    **pool,
                    retries=deployment.settings.retry_settings.max_retries,
                    retry_delay=RETRY_DELAY,
                    max_active_tis_per_dagrun=resources.instance_count,
                    map_index_template="{{ task.mini_batch['label'] }}",
                    **common,
                ).expand(mini_batch=plan.output)
                merge = MergeOperator(
                    task_id="merge", outlets=[output_asset(endpoint.endpoint_name, deployment.name)], **common
                )
                score >> merge
                if warm:
                    # Setup and teardown: Airflow runs the teardown whatever happened to the
                    # scoring tasks, and clearing one mini-batch clears both with it.
                    start = StartWorkersOperator(task_id="start_workers", **queue, **common)
                    stop = StopWorkersOperator(task_id="stop_workers", **queue, **common)
                    plan >> start >> score >> stop.as_teardown(setups=start)
    return dag


def _doc(endpoint: EndpointSpec) -> str:
    lines = [f"# {endpoint.endpoint_name}", "", f"Built by batchscore from `{endpoint.source}`.", ""]
    params = ", ".join(RUN_PARAMS)
    lines += [f"Starts: {_starts(endpoint)}. Trigger parameters ({params}) left empty keep the YAML's values.", ""]
    for d in endpoint.deployments:
        lines += [
            f"## {d.name}",
            (
                f"- image `{d.environment.image}`, script `{d.code_configuration.scoring_script}`"
                if d.code_configuration is not None
                else f"- serving image `{d.environment.image}` (`IMAGE serve`), SplitType {d.transform.SplitType}"
            ),
            f"- input `{d.input.path}` (`{d.input.pattern}`), "
            + (
                f"mini-batches of about {d.settings.mini_batch_size}"
                if d.settings.mini_batch_bytes is not None
                else f"{d.settings.mini_batch_size} files per mini-batch"
            ),
            (
                f"- output `{d.output.path}/<run id>/{d.settings.output_file_name}` and `summary.json`"
                if d.settings.output_action == "append_row"
                else f"- output in `{d.output.path}/<run id>/`: "
                + ("`<input file>.out` files" if d.contract == "serve" else "the script's own files")
                + " and `summary.json`"
            ),
            f"- a complete output updates the asset `{output_asset(endpoint.endpoint_name, d.name).name}`",
            "",
        ]
    return "\n".join(lines)


def _starts(endpoint: EndpointSpec) -> str:
    schedule = endpoint.schedule
    if schedule is None:
        return "by hand only"
    if not isinstance(schedule, AssetSchedule):
        return f"on the schedule `{schedule}`, and by hand"
    names = ", ".join(f"`{upstream_asset(e).name}`" for e in schedule.assets)
    which = "any one of" if schedule.when == "any" or len(schedule.assets) == 1 else "all of"
    return f"when {which} these assets are updated: {names}; and by hand"


class _InvalidDeployments(DAG):
    """Stands in for YAML files that failed to load, so Airflow lists them as an import error.

    Airflow validates every DAG a file defines before adding it; a DAG that fails validation
    becomes an import error of that file, while the file's other DAGs still load.
    """

    def validate(self) -> None:  # noqa: D102 - see the class docstring
        raise self.batchscore_error


def _invalid_dag(errors: list[DeploymentSpecError]) -> DAG:
    dag = _InvalidDeployments(dag_id=INVALID_DAG_ID, schedule=None, start_date=START_DATE)
    # One error for all files: Airflow keeps a single import error per DAG file.
    dag.batchscore_error = InvalidDeploymentFilesError(errors)
    return dag


def find_yaml_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in YAML_SUFFIXES and p.is_file())


def build_dags(folder: Path | str, target_globals: dict[str, Any] | None = None) -> dict[str, DAG]:
    """Build the DAG of every YAML file in ``folder``; register them in ``target_globals``.

    Invalid files are logged and reported through one extra DAG that Airflow turns into an
    import error of the calling file (see :class:`_InvalidDeployments`); they never stop the
    valid files from loading.
    """
    folder = Path(folder)
    dags: dict[str, DAG] = {}
    errors: list[DeploymentSpecError] = []
    owners: dict[str, Path] = {}
    outputs: dict[Path, tuple[Path, str]] = {}
    if not folder.is_dir():
        errors.append(DeploymentSpecError(folder, [SpecIssue(None, None, "the deployments folder does not exist")]))
        files: list[Path] = []
    else:
        files = find_yaml_files(folder)
    for path in files:
        try:
            endpoint = load_endpoint(path)
            _check_unique(endpoint, path, owners, outputs)
            dags[endpoint.dag_id] = build_dag(endpoint)
        except DeploymentSpecError as exc:
            log.error("Skipping invalid deployment file:\n%s", exc)
            errors.append(exc)
    if errors:
        dags[INVALID_DAG_ID] = _invalid_dag(errors)
    if target_globals is not None:
        target_globals.update(dags)
    return dags


def _check_unique(
    endpoint: EndpointSpec, path: Path, owners: dict[str, Path], outputs: dict[Path, tuple[Path, str]]
) -> None:
    """Two files must not define the same DAG id or write to the same output folder."""
    if endpoint.dag_id in owners:
        raise DeploymentSpecError(
            path,
            [
                SpecIssue(
                    key_line(path, ("endpoint_name",)),
                    "endpoint_name",
                    f"endpoint {endpoint.dag_id!r} is already defined in {owners[endpoint.dag_id]}",
                )
            ],
        )
    for i, d in enumerate(endpoint.deployments):
        if d.output.path in outputs:
            other, name = outputs[d.output.path]
            raise DeploymentSpecError(
                path,
                [
                    SpecIssue(
                        key_line(path, ("deployments", i, "output", "path"), ("output", "path")),
                        "output.path",
                        f"deployment {d.name!r} writes to {d.output.path}, as {name!r} in {other} does",
                    )
                ],
            )
    owners[endpoint.dag_id] = path
    for d in endpoint.deployments:
        outputs[d.output.path] = (path, d.name)
