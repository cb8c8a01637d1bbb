"""The Airflow plugin: registered through the ``airflow.plugins`` entry point of the package (pyproject.toml).

It mounts the app of :mod:`batchscore.ui.app` under ``/batchscore`` in Airflow's api-server (Airflow 3.1+'s
``fastapi_apps``) and adds a "Batch scoring" tab to the DAG-run page (an ``external_views`` entry with
``destination: dag_run``), which shows the app's page for that run in an iframe. Airflow fills in
``{DAG_ID}`` and ``{RUN_ID}``, URL-encoded.

Every Airflow process loads the plugins, each task runner included (for their macros), while only the
api-server serves the app: the app, which imports the api-server's security and database modules, is
imported on its first request (:class:`LazyApp`), so that no scoring task pays for it.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from airflow.plugins_manager import AirflowPlugin

#: Where the app is mounted; the tab's page, and its JSON, are under it.
URL_PREFIX = "/batchscore"

_Message = MutableMapping[str, Any]


class LazyApp:
    """An ASGI app that imports ``module``'s ``app`` on its first request and hands every request to it.

    :param module: the module that defines the app (``batchscore.ui.app``).
    """

    def __init__(self, module: str) -> None:
        self.module = module
        self._app: Any = None

    async def __call__(
        self, scope: _Message, receive: Callable[[], Awaitable[_Message]], send: Callable[[_Message], Awaitable[None]]
    ) -> None:
        if self._app is None:
            self._app = importlib.import_module(self.module).app
        await self._app(scope, receive, send)


class BatchScorePlugin(AirflowPlugin):
    """The "Batch scoring" tab of the DAG-run page, and the app behind it."""

    name = "batchscore"
    fastapi_apps = [{"app": LazyApp("batchscore.ui.app"), "url_prefix": URL_PREFIX, "name": "batchscore"}]
    external_views = [
        {
            "name": "Batch scoring",
            "href": URL_PREFIX + "/runs/{DAG_ID}/{RUN_ID}",
            "destination": "dag_run",
            "url_route": "batchscore",
            "icon": URL_PREFIX + "/static/icon.svg",
        }
    ]


__all__ = ["BatchScorePlugin", "LazyApp"]
