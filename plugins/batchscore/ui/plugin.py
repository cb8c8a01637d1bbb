"""The Airflow plugin: registered through the ``airflow.plugins`` entry point of the package (pyproject.toml).

It mounts :data:`batchscore.ui.app.app` under ``/batchscore`` in Airflow's api-server (Airflow 3.1+'s
``fastapi_apps``) and adds a "Batch scoring" tab to the DAG-run page (an ``external_views`` entry with
``destination: dag_run``), which shows the app's page for that run in an iframe. Airflow fills in
``{DAG_ID}`` and ``{RUN_ID}``, URL-encoded.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from batchscore.ui.app import app

#: Where the app is mounted; the tab's page, and its JSON, are under it.
URL_PREFIX = "/batchscore"


class BatchScorePlugin(AirflowPlugin):
    """The "Batch scoring" tab of the DAG-run page, and the app behind it."""

    name = "batchscore"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "batchscore"}]
    external_views = [
        {
            "name": "Batch scoring",
            "href": URL_PREFIX + "/runs/{DAG_ID}/{RUN_ID}",
            "destination": "dag_run",
            "url_route": "batchscore",
            "icon": URL_PREFIX + "/static/icon.svg",
        }
    ]


__all__ = ["BatchScorePlugin"]
