"""The DAG factory: one Airflow DAG per endpoint YAML, one task group per deployment.

``build_dags(folder, globals())`` is the one call a DAG file makes. A YAML file that fails to
load never hides the others: the valid ones become DAGs, and the invalid ones are reported
together as an import error of the calling DAG file, each naming its file, line and key.

:func:`load_folder` is what both the DAG file and ``python -m batchscore check`` run: each
file loaded, checked against the files before it (one endpoint name, one output folder each),
its DAG built and validated as Airflow's DagBag validates it. What one refuses, the other does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, TaskGroup

from batchscore.errors import DeploymentSpecError, InvalidDeploymentFilesError, SpecIssue
from batchscore.images import image_name
from batchscore.operators import MergeOperator, PlanOperator, ScoreOperator, StartWorkersOperator, StopWorkersOperator
from batchscore.operators.score import RETRY_DELAY
from batchscore.run_params import INPUT_PATH, OUTPUT_PATH, RUN_PARAMS, dag_params
from batchscore.schedule import airflow_schedule, output_asset
from batchscore.spec import AssetSchedule, DeploymentSpec, EndpointSpec, key_line, load_endpoint, upstream_asset

log = logging.getLogger(__name__)

START_DATE = datetime(2024, 1, 1, tzinfo=UTC)
YAML_SUFFIXES = (".yaml", ".yml")
INVALID_DAG_ID = "batchscore_invalid_deployments"


def build_dag(endpoint: EndpointSpec) -> DAG:
    """The DAG of one endpoint: per deployment, a task group ``plan → score[mapped] → merge``.

    With warm workers (``settings.worker_mode: warm``) the scoring tasks sit between a setup task
    that starts the run's worker containers and a teardown task that removes them:
    ``start_workers → score[mapped] → stop_workers``, ``plan → score`` and ``score → merge``. The
    workers start while the plan is written: they need the image, code and model, not the plan.

        Runs start on the YAML's schedule (cron, preset or assets), or by hand with the DAG's params
        (the trigger form); each deployment's merge task updates its output asset (see
        :mod:`batchscore.schedule` and :mod:`batchscore.run_params`).
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
            common: dict[str, Any] = {
                "endpoint_name": endpoint.endpoint_name,
                "deployment": deployment.model_dump(mode="json", by_alias=True),
            }
            with TaskGroup(group_id=deployment.name, tooltip=deployment.description or deployment.name):
                plan = PlanOperator(task_id="plan", **common)
                warm = deployment.settings.worker_mode == "warm"
                resources = deployment.resources
                # Only the tasks that talk to the scoring hosts' Docker engine follow the deployment's queue.
                # resources.queue, else Azure's compute: azureml:<name> as the queue <name>.
                queue: dict[str, Any] = {"queue": deployment.queue} if deployment.queue else {}
                pool = {"pool": resources.pool, "pool_slots": resources.pool_slots} if resources.pool else {}
                score = ScoreOperator.partial(
                    task_id="score",
                    **queue,
                    **pool,
                    retries=deployment.settings.retry_settings.max_retries,
                    retry_delay=RETRY_DELAY,
                    # Warm workers: each holds worker_queue_depth mini-batches, one scoring and the rest waiting.
                    max_active_tis_per_dagrun=resources.instance_count * (deployment.settings.worker_queue_depth if warm else 1),
                    map_index_template="{{ task.mini_batch['label'] }}",
                    **common,
                ).expand(mini_batch=plan.output)
                merge = MergeOperator(task_id="merge", outlets=[output_asset(endpoint.endpoint_name, deployment.name)], **common)
                score >> merge
                if warm:
                    # Setup and teardown: Airflow runs the teardown whatever happened to the
                    # scoring tasks (and to the plan), and clearing one mini-batch clears both with
                    # it. The setup does not wait for the plan: the workers start while it is written.
                    start = StartWorkersOperator(task_id="start_workers", **queue, **common)
                    stop = StopWorkersOperator(task_id="stop_workers", **queue, **common)
                    start >> score >> stop.as_teardown(setups=start)
    return dag


def _doc(endpoint: EndpointSpec) -> str:
    lines = [f"# {endpoint.endpoint_name}", "", f"Built by batchscore from `{endpoint.source}`.", ""]
    params = ", ".join(RUN_PARAMS)
    lines += [f"Starts: {_starts(endpoint)}. Trigger parameters ({params}) left empty keep the YAML's values.", ""]
    required = [
        p
        for p, key in ((INPUT_PATH, "input"), (OUTPUT_PATH, "output"))
        if any(getattr(d, key) is None for d in endpoint.deployments)
    ]
    if required:
        lines += [f"Required with every run (the YAML leaves them to the run, as Azure's does): {', '.join(required)}.", ""]
    for d in endpoint.deployments:
        lines += [
            f"## {d.name}",
            (
                f"- script `{d.code_configuration.scoring_script}`, image {_image_doc(d)}"
                if d.code_configuration is not None
                else f"- serving image `{d.environment.image}` (`IMAGE serve`), SplitType {d.transform and d.transform.SplitType}"
            ),
            *_azure_doc(d),
            (
                f"- input `{d.input.path}` (`{d.input.pattern}`), "
                if d.input is not None
                else f"- input: none in the YAML; each run gives it (run parameter `{INPUT_PATH}`, required), "
            )
            + (
                f"mini-batches of about {d.settings.mini_batch_size}"
                if d.settings.mini_batch_bytes is not None
                else f"{d.settings.mini_batch_size} files per mini-batch"
            ),
            (
                f"- output `{_output_doc(d)}/<run id>/{d.settings.output_file_name}` and `summary.json`"
                if d.settings.output_action == "append_row"
                else f"- output in `{_output_doc(d)}/<run id>/`: "
                + ("`<input file>.out` files" if d.contract == "serve" else "the script's own files")
                + " and `summary.json`"
            ),
            f"- a complete output updates the asset `{output_asset(endpoint.endpoint_name, d.name).name}`",
            "",
        ]
    return "\n".join(lines)


def _image_doc(d: DeploymentSpec) -> str:
    env = d.environment
    deps = env.dependencies
    if deps is None:
        return f"`{env.image}`"
    what = f"`batchscore-env-{image_name(env, d.name)}:<hash>`, built on the scoring host from `{env.conda_file}` "
    what += f"(pip: {', '.join(f'`{r}`' for r in deps.pip) or 'none'}) on `{env.build_base}`"
    if env.image is not None and env.image != env.build_base:
        what += f" (in place of Azure's base `{env.image}`)"
    if deps.ignored:
        what += f"; ignored from the conda file (no conda here): {', '.join(f'`{i}`' for i in deps.ignored)}"
    return what


def _azure_doc(d: DeploymentSpec) -> list[str]:
    """Lines on what Azure's keys became: a registered model's version, the compute's queue."""
    lines = []
    if d.model.reference is not None:
        version = "the highest version, pinned when a run starts" if d.model.latest_in_registry else f"version {d.model.version}"
        lines.append(f"- model `{d.model.reference}`: {version}, `{d.model.path}`")
    if d.compute is not None:
        if d.resources.queue is not None:
            lines.append(f"- compute `{d.compute}`: not used; resources.queue `{d.resources.queue}` is set")
        else:
            lines.append(f"- compute `{d.compute}`: the scoring tasks run on the Airflow queue `{d.queue}`")
    return lines


def _output_doc(d: DeploymentSpec) -> str:
    return str(d.output.path) if d.output is not None else f"<{OUTPUT_PATH}>"


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

    batchscore_error: InvalidDeploymentFilesError

    def validate(self) -> None:  # noqa: D102 - see the class docstring
        raise self.batchscore_error


def _invalid_dag(errors: list[DeploymentSpecError]) -> DAG:
    dag = _InvalidDeployments(dag_id=INVALID_DAG_ID, schedule=None, start_date=START_DATE)
    # One error for all files: Airflow keeps a single import error per DAG file.
    dag.batchscore_error = InvalidDeploymentFilesError(errors)
    return dag


def find_yaml_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in YAML_SUFFIXES and p.is_file())


@dataclass(frozen=True)
class LoadedFile:
    """One YAML file of the deployments folder as the DAG load sees it: its endpoint and DAG, or its error."""

    path: Path
    endpoint: EndpointSpec | None = None
    dag: DAG | None = None
    error: DeploymentSpecError | None = None


def load_folder(folder: Path | str) -> list[LoadedFile]:
    """Load every YAML file of ``folder`` in name order, as the DAG file does; never raises for a bad file.

    A file fails when it does not load (:func:`batchscore.spec.load_endpoint`), when it repeats
    an earlier file's endpoint name or output folder, or when Airflow refuses its DAG
    (``dag.validate()``, which the DagBag calls before adding a DAG). A missing folder is one
    failed entry for the folder itself.
    """
    folder = Path(folder)
    if not folder.is_dir():
        missing = SpecIssue(None, None, "the deployments folder does not exist")
        return [LoadedFile(folder, error=DeploymentSpecError(folder, [missing]))]
    results: list[LoadedFile] = []
    owners: dict[str, Path] = {}
    outputs: dict[Path | str, tuple[Path, int, str]] = {}
    for path in find_yaml_files(folder):
        try:
            endpoint = load_endpoint(path)
            _check_unique(endpoint, path, owners, outputs)
            dag = _built(endpoint, path)
        except DeploymentSpecError as exc:
            results.append(LoadedFile(path, error=exc))
            continue
        owners[endpoint.dag_id] = path
        for i, d in enumerate(endpoint.deployments):
            if d.output is not None:  # an output given with each run is checked by that run
                outputs[d.output.path] = (path, i, d.name)
        results.append(LoadedFile(path, endpoint=endpoint, dag=dag))
    return results


def _built(endpoint: EndpointSpec, path: Path) -> DAG:
    """The endpoint's DAG, validated as the DagBag will; Airflow's refusal is the file's error."""
    line = key_line(path, ("endpoint_name",))
    if endpoint.dag_id == INVALID_DAG_ID:
        message = f"{INVALID_DAG_ID!r} is the DAG id batchscore reports invalid files under; choose another name"
        raise DeploymentSpecError(path, [SpecIssue(line, "endpoint_name", message)])
    try:
        dag = build_dag(endpoint)
        dag.validate()
    except Exception as exc:  # noqa: BLE001 - whatever Airflow refuses, reported for this file only
        message = f"Airflow refuses the DAG: {type(exc).__name__}: {exc}"
        raise DeploymentSpecError(path, [SpecIssue(line, None, message)]) from exc
    return dag


def build_dags(folder: Path | str, target_globals: dict[str, Any] | None = None) -> dict[str, DAG]:
    """Build the DAG of every YAML file in ``folder`` (:func:`load_folder`); register them in ``target_globals``.

    Invalid files are logged and reported through one extra DAG that Airflow turns into an
    import error of the calling file (see :class:`_InvalidDeployments`); they never stop the
    valid files from loading.
    """
    results = load_folder(folder)
    dags: dict[str, DAG] = {r.dag.dag_id: r.dag for r in results if r.dag is not None}
    errors = [r.error for r in results if r.error is not None]
    for error in errors:
        log.error("Skipping invalid deployment file:\n%s", error)
    if errors:
        dags[INVALID_DAG_ID] = _invalid_dag(errors)
    if target_globals is not None:
        target_globals.update(dags)
    return dags


def _output_line(path: Path, index: int) -> int | None:
    return key_line(path, ("deployments", index, "output", "path"), ("output", "path"))


def _check_unique(
    endpoint: EndpointSpec, path: Path, owners: dict[str, Path], outputs: dict[Path | str, tuple[Path, int, str]]
) -> None:
    """Two files must not define the same DAG id or write to the same output folder; both files are named."""
    if endpoint.dag_id in owners:
        other = owners[endpoint.dag_id]
        raise DeploymentSpecError(
            path,
            [
                SpecIssue(
                    key_line(path, ("endpoint_name",)),
                    "endpoint_name",
                    f"endpoint {endpoint.dag_id!r} is already defined in {_at(other, key_line(other, ('endpoint_name',)))}",
                )
            ],
        )
    for i, d in enumerate(endpoint.deployments):
        if d.output is not None and d.output.path in outputs:
            other, j, name = outputs[d.output.path]
            raise DeploymentSpecError(
                path,
                [
                    SpecIssue(
                        _output_line(path, i),
                        "output.path",
                        f"deployment {d.name!r} writes to {d.output.path}, as {name!r} in "
                        f"{_at(other, _output_line(other, j))} does",
                    )
                ],
            )


def _at(path: Path, line: int | None) -> str:
    return f"{path}:{line}" if line else str(path)
