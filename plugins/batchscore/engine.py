"""The Docker engine this process talks to: one client, configured from the environment.

``DOCKER_HOST`` (and ``DOCKER_TLS_VERIFY``, ``DOCKER_CERT_PATH``) choose the engine, as for the
``docker`` command line; unset, the local socket. The docker SDK only: no Airflow import.
"""

from __future__ import annotations

from typing import Any

import docker
import docker.utils


def docker_client() -> Any:
    """A low-level Docker API client for the engine the environment names (``DOCKER_HOST``, else the local socket)."""
    return docker.APIClient(**docker.utils.kwargs_from_env(), version="auto")


def engine_identity(cli: Any) -> dict[str, str]:
    """The engine ``cli`` reaches: its id and its host's name (two Airflow workers on one host see the same)."""
    info = cli.info()
    return {"id": str(info.get("ID", "")), "name": str(info.get("Name", ""))}


__all__ = ["docker_client", "engine_identity"]
