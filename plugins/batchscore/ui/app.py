"""The plugin's FastAPI app, mounted by Airflow's api-server under ``/batchscore`` (docs/ui.md).

* ``GET /batchscore/runs/{dag_id}/{run_id}``: the report page (the DAG-run page's "Batch scoring" tab);
* ``GET /batchscore/api/runs/{dag_id}/{run_id}``: the report as JSON, which the page polls;
* ``GET /batchscore/api/runs/{dag_id}/{run_id}/files/{deployment}/{record}``: the run's output,
  ``summary.json``, ledger or errors file (run folders on this host's disk);
* ``GET /batchscore/static/...``: the page's script and style sheet.

Every route but the static files goes through Airflow's own security dependencies
(:func:`airflow.api_fastapi.core_api.security.requires_access_dag`): the caller is authenticated by
the auth manager (the ``Authorization: Bearer`` header, or the ``_token`` cookie of Airflow's UI
login), and must be allowed to read the DAG's runs (``is_authorized_dag(method="GET",
access_entity=DagAccessEntity.RUN)``); else 401 or 403. The page's "clear" buttons call Airflow's
public REST API from the browser, so Airflow authorises each with the viewer's own session.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.common.db.common import SessionDep
from airflow.api_fastapi.core_api.security import requires_access_dag
from airflow.models.dagrun import DagRun
from airflow.models.taskinstance import TaskInstance as TI
from airflow.models.xcom import XComModel
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy import select
from sqlalchemy.orm import Session

from batchscore import storage
from batchscore.errors import BatchScoreError
from batchscore.ui import folders, report

STATIC = Path(__file__).parent / "static"
#: Who may see a run's report: whoever may read the DAG's runs.
READ_RUN = [Depends(requires_access_dag(method="GET", access_entity=DagAccessEntity.RUN))]
#: The tasks of a deployment's task group (the factory's names).
PLAN_TASK, SCORE_TASK = "plan", "score"

app = FastAPI(title="batchscore", description="The Batch scoring tab of Airflow's DAG-run page (docs/ui.md).")
app.mount("/static", StaticFiles(directory=STATIC), name="static")


def _run(session: Session, dag_id: str, run_id: str) -> DagRun:
    run = session.scalar(select(DagRun).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id))
    if run is None:
        raise HTTPException(404, f"DAG {dag_id!r} has no run {run_id!r}")
    return run


def _groups(session: Session, dag_id: str, run_id: str) -> list[str]:
    """The run's deployments: the task groups with a plan task, in name order."""
    task_ids = session.scalars(select(TI.task_id).where(TI.dag_id == dag_id, TI.run_id == run_id).distinct())
    suffix = "." + PLAN_TASK
    return sorted({t.removesuffix(suffix) for t in task_ids if t.endswith(suffix)})


def _recorded_folder(session: Session, dag_id: str, run_id: str, group: str) -> dict[str, Any] | None:
    row = session.scalar(
        select(XComModel).where(
            XComModel.dag_id == dag_id,
            XComModel.run_id == run_id,
            XComModel.task_id == f"{group}.{PLAN_TASK}",
            XComModel.map_index == -1,
            XComModel.key == folders.XCOM_KEY,
        )
    )
    value = XComModel.deserialize_value(row) if row is not None else None
    return value if isinstance(value, dict) and isinstance(value.get("folder"), str) else None


def _score_instances(session: Session, dag_id: str, run_id: str, group: str) -> list[report.TaskInstance]:
    rows = session.scalars(
        select(TI).where(TI.dag_id == dag_id, TI.run_id == run_id, TI.task_id == f"{group}.{SCORE_TASK}", TI.map_index >= 0)
    )
    return [
        report.TaskInstance(ti.map_index, ti.state, ti.try_number or 0, ti.start_date, ti.end_date, ti.hostname or "")
        for ti in rows
    ]


def _deployment(session: Session, dag_id: str, run_id: str, group: str, now: datetime) -> dict[str, Any]:
    where = _recorded_folder(session, dag_id, run_id, group)
    score_task = f"{group}.{SCORE_TASK}"
    if where is None:
        missing = report.DeploymentReport(group, score_task, message="No run folder yet: the plan task has not run.")
        return {**missing.to_json(), "folder": None, "links": {}}
    folder = where["folder"]
    try:
        built = report.build(
            group,
            score_task,
            folders.reader(folder, where.get("connection")),
            _score_instances(session, dag_id, run_id, group),
            now,
        )
    except (BatchScoreError, OSError, ValueError, KeyError, TypeError) as exc:  # an unreadable run folder: say so
        failed = report.DeploymentReport(group, score_task, message=f"The run folder {folder} cannot be read: {exc}")
        return {**failed.to_json(), "folder": folder, "links": {}}
    result = built.to_json()
    links: dict[str, dict[str, str | None]] = {}
    remote = storage.is_remote(folder)
    for key, name in built.records.items():
        if name:
            href = (
                None
                if remote
                else f"api/runs/{quote(dag_id, safe='')}/{quote(run_id, safe='')}/files/{quote(group, safe='')}/{key}"
            )
            links[key] = {"name": name, "href": href, "location": f"{folder}/{name}"}
    return {**result, "folder": folder, "links": links}


@app.get("/runs/{dag_id}/{run_id}", dependencies=READ_RUN, include_in_schema=False)
def page(dag_id: str, run_id: str) -> FileResponse:
    """The report page; its script reads the DAG and run from its own address and polls :func:`run_report`."""
    return FileResponse(STATIC / "report.html", media_type="text/html", headers={"Cache-Control": "no-store"})


@app.get("/api/runs/{dag_id}/{run_id}", dependencies=READ_RUN)
def run_report(dag_id: str, run_id: str, session: SessionDep) -> dict[str, Any]:
    """The report of every deployment of one DAG run (see :mod:`batchscore.ui.report`)."""
    run = _run(session, dag_id, run_id)
    now = datetime.now(UTC)
    return {
        "dag_id": dag_id,
        "run_id": run_id,
        "state": run.state,
        "generated_at": now.isoformat(timespec="milliseconds"),
        "deployments": [_deployment(session, dag_id, run_id, g, now) for g in _groups(session, dag_id, run_id)],
    }


@app.get("/api/runs/{dag_id}/{run_id}/files/{deployment}/{record}", dependencies=READ_RUN)
def record_file(dag_id: str, run_id: str, deployment: str, record: str, session: SessionDep) -> FileResponse:
    """One of the run's records (``output``, ``summary``, ``ledger``, ``errors``) from a run folder on this host."""
    _run(session, dag_id, run_id)
    if deployment not in _groups(session, dag_id, run_id):
        raise HTTPException(404, f"run {run_id!r} of DAG {dag_id!r} has no deployment {deployment!r}")
    where = _recorded_folder(session, dag_id, run_id, deployment)
    if where is None or storage.is_remote(where["folder"]):
        raise HTTPException(404, f"deployment {deployment!r} of run {run_id!r} has no run folder on this host")
    folder = where["folder"]
    name = report.records(folders.reader(folder)).get(record)
    if not name:
        raise HTTPException(404, f"deployment {deployment!r} of run {run_id!r} has no {record} (yet): its merge writes it")
    path = folders.local_folder(folder) / name
    # Served by the api-server's user: never through a link, whoever made it.
    if path.parent != folders.local_folder(folder) or path.is_symlink() or not path.is_file():
        raise HTTPException(404, f"{path} is not a file of the run folder")
    return FileResponse(path, filename=name)


__all__ = ["app"]
