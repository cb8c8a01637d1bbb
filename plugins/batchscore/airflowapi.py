"""A client of Airflow's public REST API v2 (``/api/v2``): dags, dag runs, task instances and their logs.

:class:`AirflowClient` knows nothing of the processes behind the API; :class:`batchscore.localairflow.LocalAirflow`,
which starts them, is one (it adds the checks that they are still alive and the tails of their logs
to its errors). Every call goes through :meth:`AirflowClient.api`, which raises :class:`LocalAirflowError`
with the status and the response's text on an HTTP error or when the server cannot be reached.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from typing import Any

#: Dag run states after which the scheduler does nothing more with a run.
TERMINAL_RUN_STATES = ("success", "failed")
#: Seconds between two looks at something being waited for.
POLL_S = 1.0
#: Where the simple auth manager hands out a token for a user name and password.
TOKEN_PATH = "/auth/token"


class LocalAirflowError(RuntimeError):
    """The local Airflow stack failed to start, or an API call or a wait failed."""


class AirflowClient:
    """The REST API of the Airflow whose api-server answers at ``base_url``.

    It remembers the runs triggered or cleared through it (:attr:`runs`), so that whoever
    stops the stack can remove what they left. Runs queued and dags parsed before
    :attr:`started_at` (when set) belong to an earlier session in the same Airflow home.
    """

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.started_at: datetime | None = None  # UTC; older runs and parses are an earlier session's
        self.runs: set[tuple[str, str]] = set()  # (dag_id, run_id) triggered or cleared through this object
        self._triggering: set[str] = set()  # dags whose trigger has not answered (yet)
        self._credentials: tuple[str, str] | None = None  # set by login()
        self._token: str | None = None  # the bearer token of every call after login()

    def _check_alive(self) -> None:
        """Raise :class:`LocalAirflowError` when the components behind the API are gone (a waiting
        loop calls it); a client that did not start them cannot tell, and does nothing."""

    def _failure(self, what: str, *components: str) -> str:
        """The text of a failure of ``what``; a client that started ``components`` adds the tails of their logs."""
        return f"Airflow at {self.base_url}: {what}"

    def api(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: dict[str, Any] | None = None,
        timeout: float = 30,
    ) -> Any:
        """Call the REST API and return the decoded JSON (``None`` for an empty body).

        Raises :class:`LocalAirflowError` with the status and the response
        text on an HTTP error or when the server cannot be reached.
        """
        url = self.base_url + path
        if query:
            url += "?" + urllib.parse.urlencode(query, doseq=True)
        data = None if body is None else json.dumps(body).encode()
        for renewed in (False, True):
            req = urllib.request.Request(url, data=data, method=method)
            req.add_header("Accept", "application/json")
            if data is not None:
                req.add_header("Content-Type", "application/json")
            if self._token is not None and path != TOKEN_PATH:
                req.add_header("Authorization", f"Bearer {self._token}")
            try:
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:2000]
                if e.code == 401 and self._credentials is not None and path != TOKEN_PATH and not renewed:
                    self.login(*self._credentials)  # the token expired: a new one, and the call once more
                    continue
                raise LocalAirflowError(f"{method} {path}: HTTP {e.code}: {detail}") from None
            except (urllib.error.URLError, OSError) as e:
                raise LocalAirflowError(f"{method} {path}: {e}") from None
            return json.loads(raw) if raw else None
        raise AssertionError("unreachable: the second try returns or raises")

    def login(self, username: str, password: str) -> None:
        """Log in to an Airflow whose simple auth manager wants a password (``POST /auth/token``):
        every later call sends the token, and a call refused with 401 (the token expired) logs in again."""
        self._credentials = (username, password)
        self._token = None
        self._token = self.fetch_token(username, password)

    @property
    def token(self) -> str | None:
        """The JWT every call sends as ``Authorization: Bearer`` since :meth:`login`; ``None`` before (an
        api-server whose auth manager lets every request in, LocalAirflow's all-admins default)."""
        return self._token

    def fetch_token(self, username: str, password: str) -> str:
        """A JWT of the auth manager for ``username`` (``POST /auth/token``), not kept: for a second user's calls."""
        return self.api("POST", TOKEN_PATH, {"username": username, "password": password})["access_token"]

    def get_dag(self, dag_id: str) -> dict | None:
        """Return the dag as the API shows it, or ``None`` if it is not (yet) known."""
        try:
            return self.api("GET", f"/api/v2/dags/{_q(dag_id)}")
        except LocalAirflowError as e:
            if "HTTP 404" in str(e):
                return None
            raise

    def wait_for_dag(self, dag_id: str, timeout: float = 120) -> dict:
        """Wait until the dag-processor has serialized ``dag_id``, unpause it, return it.

        The dag must have been parsed since the start (:attr:`started_at`), so a reused home
        never hands back a version from an earlier session.
        """
        deadline = time.monotonic() + timeout
        while (dag := self.get_dag(dag_id)) is None or not self._parsed_now(dag):
            self._check_alive()
            if time.monotonic() > deadline:
                raise LocalAirflowError(
                    f"dag {dag_id!r} not parsed after {timeout:.0f}s; import errors: "
                    f"{json.dumps(self.import_errors(), indent=1)}\n" + self._failure("dag-processor", "dag-processor")
                )
            time.sleep(POLL_S)
        if dag.get("is_paused"):
            dag = self.api("PATCH", f"/api/v2/dags/{_q(dag_id)}", {"is_paused": False})
        return dag

    def _parsed_now(self, dag: dict) -> bool:
        """Whether the dag is live and was parsed by this session's dag-processor."""
        if dag.get("is_stale"):
            return False
        if self.started_at is None or not dag.get("last_parsed_time"):
            return True
        return utc_time(dag["last_parsed_time"]) >= self.started_at

    def import_errors(self) -> list[dict]:
        """Return the current dag import errors (filename, stack_trace, ...)."""
        return self._paged("/api/v2/importErrors", "import_errors")

    def trigger(self, dag_id: str, conf: dict | None = None) -> str:
        """Trigger a manual run (no logical date) and return its ``dag_run_id``."""
        self._triggering.add(dag_id)  # a signal before the answer: stop() asks the API for the run
        try:
            run = self.api(
                "POST",
                f"/api/v2/dags/{_q(dag_id)}/dagRuns",
                {"logical_date": None, "conf": conf or {}},
            )
        except LocalAirflowError:  # an answer: no run
            self._triggering.discard(dag_id)
            raise
        self.runs.add((dag_id, run["dag_run_id"]))
        self._triggering.discard(dag_id)
        return run["dag_run_id"]

    def dag_run(self, dag_id: str, run_id: str) -> dict:
        """Return one dag run."""
        return self.api("GET", f"/api/v2/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}")

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 600) -> str:
        """Wait until the run is terminal and return its state, ``"success"`` or ``"failed"``."""
        deadline = time.monotonic() + timeout
        while (state := self.dag_run(dag_id, run_id)["state"]) not in TERMINAL_RUN_STATES:
            self._check_alive()
            if time.monotonic() > deadline:
                tis = ", ".join(_ti_label(ti) for ti in self.task_instances(dag_id, run_id))
                raise LocalAirflowError(
                    f"run {dag_id}/{run_id} still {state!r} after {timeout:.0f}s; task instances: {tis or 'none'}"
                )
            time.sleep(POLL_S)
        return state

    def _runs_since_start(self, dag_id: str) -> list[dict]:
        """The runs of ``dag_id`` queued since the start (:attr:`started_at`) (not those of earlier sessions in the same home)."""
        return [
            run for run in self._paged(f"/api/v2/dags/{_q(dag_id)}/dagRuns", "dag_runs")
            if self.started_at is None or utc_time(run.get("queued_at") or run["run_after"]) >= self.started_at
        ]  # fmt: skip

    def adopt_runs(self) -> None:
        """Add to :attr:`runs` the runs of every dag that this session may have started containers for: those
        queued since the start (:attr:`started_at`), triggered or cleared from the UI too (a clear queues the run
        anew), and those still queued or running (an earlier session's run that this scheduler goes on with)."""
        since = {"updated_at_gte": self.started_at.isoformat()} if self.started_at is not None else {}
        recent = self._paged("/api/v2/dags/~/dagRuns", "dag_runs", query=since)
        live = self._paged("/api/v2/dags/~/dagRuns", "dag_runs", query={"state": ["queued", "running"]})
        self.runs |= {
            (run["dag_id"], run["dag_run_id"]) for run in recent + live
            if run.get("state") in ("queued", "running") or self.started_at is None
            or utc_time(run.get("queued_at") or run["run_after"]) >= self.started_at
        }  # fmt: skip

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        """Return all task instances of a run, mapped ones included (one per ``map_index``)."""
        return self._paged(f"/api/v2/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}/taskInstances", "task_instances")

    def clear(
        self,
        dag_id: str,
        run_id: str,
        task_ids: list[str | tuple[str, int]],
        *,
        include_downstream: bool = True,
        only_failed: bool = False,
    ) -> list[dict]:
        """Clear task instances of one run so the scheduler runs them again.

        A ``(task_id, map_index)`` tuple clears one mapped instance; a plain
        task id clears all instances of that task.  The run goes back to
        ``queued``.  Returns the cleared task instances.
        """
        body = {
            "dry_run": False,  # the API default is True
            "dag_run_id": run_id,
            "task_ids": [t if isinstance(t, str) else [t[0], int(t[1])] for t in task_ids],
            "include_downstream": include_downstream,
            "only_failed": only_failed,  # the API default is True
            "reset_dag_runs": True,
        }
        self.runs.add((dag_id, run_id))
        resp = self.api("POST", f"/api/v2/dags/{_q(dag_id)}/clearTaskInstances", body)
        return resp["task_instances"]

    def set_task_state(self, dag_id: str, run_id: str, task_id: str, state: str, *, map_index: int = -1) -> list[dict]:
        """Mark one task instance ``failed``, ``success`` or ``skipped``, as the UI's "Mark as" does (``PATCH``).

        A running task is killed (its ``on_kill``), a deferred one's trigger is cancelled (its ``on_kill``).
        Returns the task instances it changed.
        """
        path = f"/api/v2/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}/taskInstances/{_q(task_id)}"
        resp = self.api("PATCH", path + (f"/{int(map_index)}" if map_index >= 0 else ""), {"new_state": state})
        return resp["task_instances"]

    def task_log(
        self,
        dag_id: str,
        run_id: str,
        task_id: str,
        *,
        map_index: int = -1,
        try_number: int = 1,
    ) -> str:
        """Return the log of one try of a task instance as text, one event per line."""
        resp = self.api(
            "GET",
            f"/api/v2/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}/taskInstances/{_q(task_id)}/logs/{int(try_number)}",
            query={"map_index": map_index, "full_content": "true"},
        )
        content = resp.get("content") or []
        if isinstance(content, str):
            return content
        return "\n".join(_log_line(entry) for entry in content)

    def _paged(self, path: str, key: str, page: int = 100, query: dict[str, Any] | None = None) -> list[dict]:
        items: list[dict] = []
        while True:
            resp = self.api("GET", path, query={**(query or {}), "limit": page, "offset": len(items)})
            chunk = resp[key]
            items.extend(chunk)
            if not chunk or len(items) >= resp.get("total_entries", 0):
                return items


# ---------------------------------------------------------------- helpers


def _q(part: str) -> str:
    return urllib.parse.quote(part, safe="")


def utc_time(iso: str) -> datetime:
    """Parse an ISO 8601 time from the API ("Z" or an offset; naive means UTC)."""
    at = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def _ti_label(ti: dict) -> str:
    idx = ti.get("map_index", -1)
    name = ti["task_id"] if idx is None or idx < 0 else f"{ti['task_id']}[{idx}]"
    return f"{name}={ti.get('state')}(try {ti.get('try_number')})"


#: Context Airflow repeats on every task log event; left out of :meth:`AirflowClient.task_log`.
_LOG_CONTEXT_KEYS = frozenset(
    {"dag_id", "run_id", "task_id", "map_index", "try_number", "ti_id", "logger", "filename", "lineno", "loc"}
)


def _log_line(entry: Any) -> str:
    """Render one structured task-log event as ``timestamp level event key=value ...``."""
    if not isinstance(entry, dict):
        return str(entry)
    entry = {k: v for k, v in entry.items() if k not in _LOG_CONTEXT_KEYS}
    head = " ".join(str(entry.pop(k)) for k in ("timestamp", "level", "event") if entry.get(k) is not None)
    errors = entry.pop("error_detail", None)
    entry.pop("sources", None)
    line = " ".join([head, *(f"{k}={v}" for k, v in entry.items())]).rstrip()
    if isinstance(errors, list):
        line += "".join("\n" + _format_error(e) for e in errors if isinstance(e, dict))
    return line


def _format_error(err: dict) -> str:
    """Render one ``error_detail`` item of a task log like a Python traceback."""
    lines = ["Traceback (most recent call last):"]
    for f in err.get("frames") or []:
        lines.append(f'  File "{f.get("filename")}", line {f.get("lineno")}, in {f.get("name")}')
    lines.append(f"{err.get('exc_type')}: {err.get('exc_value')}")
    return "\n".join(lines)
