"""A deployment's ``settings.secret_environment``, read from Airflow's variables and connections when a task runs.

The values are read on the worker, at execute time, and handed only to the containers that
get them (:attr:`batchscore.containers.Container.gets_secrets`); they are never rendered, stored
with the DAG nor logged: Airflow's masker learns each one, and :class:`batchscore.security.RedactingLogger`
redacts the containers' output before it reaches the task log. Everything else about containers
stays free of Airflow; this module is where the score and setup tasks meet Airflow's secrets.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook, Variable
from airflow.sdk.log import mask_secret

from batchscore.errors import SecretUnavailableError
from batchscore.spec import SecretRef


def resolve_secrets(refs: dict[str, SecretRef]) -> dict[str, str]:
    """The values of ``settings.secret_environment``, read from Airflow (task SDK) and masked in logs."""
    if not refs:
        return {}
    values: dict[str, str] = {}
    for name, ref in refs.items():
        try:
            if ref.variable is not None:
                value = Variable.get(ref.variable)
            else:
                assert ref.connection is not None, "a SecretRef names a variable or a connection"
                value = _connection_field(BaseHook.get_connection(ref.connection), ref.field or "password")
        except SecretUnavailableError as exc:
            raise SecretUnavailableError(f"settings.secret_environment.{name}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - Airflow raises several types; the message holds no value
            raise SecretUnavailableError(
                f"settings.secret_environment.{name}: cannot read {ref.describe()} ({type(exc).__name__}); "
                "create it in Airflow (Admin > Variables / Connections, the CLI, or a secrets backend)"
            ) from None
        if value is None or value == "":
            raise SecretUnavailableError(f"settings.secret_environment.{name}: {ref.describe()} is empty")
        value = str(value)
        mask_secret(value, name=name)  # redacted wherever it would appear in the task log
        values[name] = value
    return values


def _connection_field(conn: Any, field: str) -> Any:
    if field == "uri":
        return conn.get_uri()
    if field.startswith("extra."):
        key = field.removeprefix("extra.")
        extra = conn.extra_dejson
        if key not in extra:
            raise SecretUnavailableError(f"connection {conn.conn_id!r} has no extra {key!r}")
        return extra[key]
    return getattr(conn, field)


__all__ = ["resolve_secrets"]
