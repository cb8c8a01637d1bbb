"""Run a real, local Airflow stack and drive it through the public REST API.

:class:`LocalAirflow` starts Airflow's own components -- ``airflow api-server``,
``airflow scheduler``, ``airflow dag-processor`` and ``airflow triggerer`` -- as subprocesses of the
current Python interpreter, on a SQLite metadata database with the
``LocalExecutor``, and talks to them only through the public REST API v2
(``/api/v2``; it is an :class:`batchscore.airflowapi.AirflowClient`).  It is
meant for ``make demo`` and for tests that must go through a real scheduler;
it is not a deployment tool.

Layout under ``home`` (``AIRFLOW_HOME``)::

    airflow.cfg           written by Airflow itself on first use (defaults only)
    airflow.db            SQLite metadata database
    logs/                 task and dag-processor logs
    db-migrate.log        output of ``airflow db migrate``
    api-server.log        output of each component
    scheduler.log
    dag-processor.log
    triggerer.log

Stopping: :meth:`LocalAirflow.stop` (also on leaving the ``with`` block, on any exception,
``KeyboardInterrupt`` and :class:`batchscore.shutdown.Interrupted` included) ends every process the
stack started, at any depth, then removes the containers of the runs it triggered. Each component
leads a session of its own, which its descendants keep (a task's own process group included) even
after their parent died; one that starts a session of its own is found by the stack's marker in
its environment (``BATCHSCORE_LOCAL_AIRFLOW``). The warm workers' GPU holders are left alone: each
ends when its container is gone (:func:`batchscore.shutdown.end_gpu_holders`).

Configuration is passed only through environment variables of the child
processes (see :meth:`LocalAirflow.child_env`); the caller's Airflow settings
(``AIRFLOW__*``, ``AIRFLOW_HOME``, ``AIRFLOW_CONFIG``) are *not* inherited, so
the stack is the same whether it is started from a shell, ``make`` or pytest;
``AIRFLOW_CONN_*`` and ``AIRFLOW_VAR_*`` are.  Everything binds to 127.0.0.1;
the scheduler and the triggerer run with ``--skip-serve-logs`` (their log servers would bind all
interfaces; the api-server reads the task logs from ``logs/`` directly).

Authentication: with ``[core] simple_auth_manager_all_admins = True`` the
SimpleAuthManager installs a middleware that adds an admin JWT to every
request, so the REST API needs no login or token.  A stack left up for a person
(``login=True``: ``python -m batchscore up``, ``run --keep``) has one user instead,
:data:`LOGIN_USER` (an admin), whose password the api-server generates on its first
start into ``simple_auth_manager_passwords.json.generated`` in the home (readable by its
owner only; kept, so the password stays the same across starts): :meth:`LocalAirflow.login_password`
reads it, and the stack's own client logs in with it.  The task runners talk to
the Execution API with JWTs minted by the scheduler, hence one
``[api_auth] jwt_secret`` shared by all components.

With ``env`` naming ``AIRFLOW__CORE__EXECUTOR=CeleryExecutor``, a Postgres database and a
Redis broker, the same stack schedules onto Celery workers: :meth:`start_celery_worker` starts
one as a local process (``tests/test_celery.py`` adds another in a container).

Example::

    with LocalAirflow(Path(".airflow"), Path("dags")) as af:
        af.wait_for_dag("my_dag")
        run_id = af.trigger("my_dag", conf={"x": 1})
        print(af.wait_for_run("my_dag", run_id))
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil  # a dependency of apache-airflow itself

from batchscore import shutdown
from batchscore.airflowapi import POLL_S, AirflowClient, LocalAirflowError, utc_time

__all__ = ["LocalAirflow", "LocalAirflowError"]

#: Components started by :meth:`LocalAirflow.start`, in start order.
#: The triggerer runs deferred tasks' triggers (``settings.deferrable``: a score task that waits for a warm worker).
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
_COMMANDS = {
    "api-server": ["api-server"],
    "scheduler": ["scheduler", "--skip-serve-logs"],
    "dag-processor": ["dag-processor"],
    "triggerer": ["triggerer", "--skip-serve-logs"],
}
#: Environment variable naming the stack in all its processes (see :meth:`LocalAirflow.processes`).
MARK_ENV = "BATCHSCORE_LOCAL_AIRFLOW"
_LOG_TAIL_LINES = 40


#: The one user of a stack started with ``login=True`` (an admin of the simple auth manager).
LOGIN_USER = "admin"
#: Where the api-server writes its password, in the home.
PASSWORDS_FILE = "simple_auth_manager_passwords.json.generated"

#: ``[core] max_map_length`` of the local stack: mapped instances one task may expand to, so
#: mini-batches one run may have (Airflow's default is 1024).
MAX_MAP_LENGTH = 10_000


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load_prctl() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None


_PRCTL = _load_prctl()  # resolved here: the child after fork should not dlopen
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the process that started it dies.

    A safety net for a test run killed hard (no ``stop()``): without it the
    components would live on, holding the port and the database.  Linux only.
    """
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


def _check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise LocalAirflowError(f"local Airflow: port 127.0.0.1:{port} is not free ({e})") from None


def log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """Return the last ``lines`` lines of a text file ("" if it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class LocalAirflow(AirflowClient):
    """A local api-server + scheduler + dag-processor on SQLite and the LocalExecutor.

    :param home: ``AIRFLOW_HOME``; created if missing.  Reusing a home keeps
        its database (dag runs, history) between starts.
    :param dags_folder: folder the dag-processor parses.
    :param port: API server port on 127.0.0.1; ``None`` picks a free one.
    :param env: extra environment for the components; overrides the defaults.
    :param parallelism: ``[core] parallelism``, the most task instances
        running at once.
    :param stop_grace: seconds :meth:`stop` gives the processes to end before it kills them.
    :param login: the UI and the API want a login (:data:`LOGIN_USER` and the password the api-server
        generates, :meth:`login_password`) instead of making every request an admin's.
    """

    def __init__(
        self,
        home: Path,
        dags_folder: Path,
        *,
        port: int | None = None,
        env: dict[str, str] | None = None,
        parallelism: int = 4,
        stop_grace: float = 20,
        login: bool = False,
    ) -> None:
        self.home = Path(home).resolve()
        self.dags_folder = Path(dags_folder).resolve()
        self.port = port if port is not None else free_port()
        super().__init__(f"http://127.0.0.1:{self.port}")  # started_at: set by start()
        self.parallelism = parallelism
        self.extra_env = dict(env or {})
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._jwt_secret = secrets.token_urlsafe(64)  # HS512 wants >= 64 bytes
        self._api_secret = secrets.token_urlsafe(32)
        self.mark = secrets.token_hex(8)  # MARK_ENV's value in this stack's processes
        self.stop_grace = stop_grace
        self.wants_login = login

    # ------------------------------------------------------------------ setup

    def child_env(self) -> dict[str, str]:
        """Return the environment of the Airflow child processes."""
        env = {k: v for k, v in os.environ.items() if not _is_airflow_setting(k)}
        home = str(self.home)
        env.update(
            {
                "AIRFLOW_HOME": home,
                "AIRFLOW_CONFIG": str(self.home / "airflow.cfg"),
                "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
                "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
                "AIRFLOW__CORE__PARALLELISM": str(self.parallelism),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                # One mapped score instance per mini-batch: Airflow's default of 1024 is too few.
                "AIRFLOW__CORE__MAX_MAP_LENGTH": str(MAX_MAP_LENGTH),
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base_url}/execution/",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__PORT": str(self.port),
                "AIRFLOW__API__WORKERS": "1",
                "AIRFLOW__API__BASE_URL": f"{self.base_url}/",
                "AIRFLOW__API__SECRET_KEY": self._api_secret,
                "AIRFLOW__API_AUTH__JWT_SECRET": self._jwt_secret,
                "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(self.home / "logs"),
                "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_STORAGE_PATH": str(self.home / "dag_bundles"),
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
                "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
                # The task supervisor can notice that its task exited only at its next
                # select() timeout, which is this interval (default 5 s): each task
                # would end up to 5 s late.  1 s costs one heartbeat a second per task.
                "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.wants_login:
            env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"] = "False"
            env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] = f"{LOGIN_USER}:admin"
            env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"] = str(self.passwords_file)
        env.update(self.extra_env)
        env[MARK_ENV] = self.mark
        return env

    @property
    def passwords_file(self) -> Path:
        """The simple auth manager's passwords (``{"admin": "..."}``), written by the api-server (``login=True``)."""
        return self.home / PASSWORDS_FILE

    def login_password(self) -> str:
        """The password of :data:`LOGIN_USER` (``login=True``), which the api-server generated on its first start."""
        try:
            return json.loads(self.passwords_file.read_text())[LOGIN_USER]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LocalAirflowError(
                f"local Airflow: no password of {LOGIN_USER!r} in {self.passwords_file} ({exc}); the api-server writes it "
                "when it starts in this home: stop Airflow, delete the file if it is there, and start Airflow again"
            ) from None

    def log_path(self, component: str) -> Path:
        """Return the file that receives a component's stdout and stderr."""
        return self.home / f"{component}.log"

    def _spawn(self, component: str, args: list[str]) -> subprocess.Popen[bytes]:
        with open(self.log_path(component), "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "airflow", *args],
                cwd=self.home,
                env=self.child_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group, so stop() can killpg it
                preexec_fn=_die_with_parent,
            )

    def migrate(self, timeout: float = 300) -> None:
        """Run ``airflow db migrate`` (a no-op apart from its start-up on a current database)."""
        self.home.mkdir(parents=True, exist_ok=True)
        proc = self._spawn("db-migrate", ["db", "migrate"])
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _terminate(_tree(proc.pid), 5, [proc])
            proc.wait()
            raise LocalAirflowError(self._failure("`airflow db migrate` timed out", "db-migrate")) from None
        except BaseException:  # a signal: it is in a session of its own, so nobody else stops it
            _terminate(_tree(proc.pid), 5, [proc])
            raise
        if rc != 0:
            raise LocalAirflowError(self._failure(f"`airflow db migrate` exited {rc}", "db-migrate"))

    def start(self, timeout: float = 180) -> None:
        """Migrate the database, start the components and wait until they are healthy.

        Healthy means: the API answers ``/api/v2/monitor/health`` and reports
        the scheduler, the dag-processor and the triggerer alive with a heartbeat newer than
        this start.  On failure everything is stopped and
        :class:`LocalAirflowError` carries the tail of the failing log.
        """
        if self.procs:
            raise LocalAirflowError("already started")
        _check_port_free(self.port)
        deadline = time.monotonic() + timeout
        self.dags_folder.mkdir(parents=True, exist_ok=True)
        self.migrate(timeout=timeout)
        if self.wants_login:  # the api-server appends to it: its mode stays the owner's only
            self.passwords_file.touch(mode=0o600)
            self.passwords_file.chmod(0o600)
        started_at = self.started_at = datetime.now(UTC) - timedelta(seconds=1)
        try:
            for component in COMPONENTS:
                self.procs[component] = self._spawn(component, _COMMANDS[component])
            self._wait_healthy(("scheduler", "dag_processor", "triggerer"), started_at, deadline, COMPONENTS)
            if self.wants_login:
                self.login(LOGIN_USER, self.login_password())
        except BaseException:
            self.stop()
            raise

    def check_alive(self) -> None:
        """Raise :class:`LocalAirflowError` with the tail of its log when a component has exited."""
        self._check_alive()

    def _check_alive(self) -> None:
        """Raise :class:`LocalAirflowError` with the tail of its log when a component has exited."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise LocalAirflowError(self._failure(f"{name} exited {proc.returncode}", name))

    def _failure(self, what: str, *components: str) -> str:
        parts = [f"local Airflow: {what}"]
        for c in components:
            parts.append(f"--- tail of {self.log_path(c)} ---\n{log_tail(self.log_path(c))}")
        return "\n".join(parts)

    def pids(self) -> set[int]:
        """Return the pids of the components and all their descendants right now."""
        found: set[int] = set()
        for proc in self.procs.values():
            if proc.poll() is None:
                found |= _tree(proc.pid)
        return found

    def stop_component(self, component: str, grace: float = 20) -> None:
        """Stop one component and its children (SIGTERM, SIGKILL after ``grace`` s), e.g. to
        test that a run survives the scheduler going away; :meth:`start_component` brings it back."""
        proc = self.procs.pop(component)
        if proc.poll() is None:
            _terminate(_tree(proc.pid), grace, [proc])
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)

    def start_component(self, component: str, timeout: float = 120) -> None:
        """Start a component stopped by :meth:`stop_component` and wait until it is healthy."""
        if component in self.procs:
            raise LocalAirflowError(f"{component} is already running")
        since = datetime.now(UTC) - timedelta(seconds=1)
        self.procs[component] = self._spawn(component, _COMMANDS[component])
        fresh = () if component == "api-server" else (component.replace("-", "_"),)
        self._wait_healthy(fresh, since, time.monotonic() + timeout, (component,))

    def start_celery_worker(self, name: str, *, queues: str = "default", concurrency: int = 2, timeout: float = 120) -> None:
        """Start ``airflow celery worker`` as the component ``celery-<name>`` and wait until it is ready.

        For a stack started with ``AIRFLOW__CORE__EXECUTOR=CeleryExecutor`` (and a broker and
        database in ``env``). The worker's Celery name is ``<name>@<host>``; it serves only
        ``queues`` (comma-separated) and no log server (the api-server reads ``logs/``).
        """
        component = f"celery-{name}"
        if component in self.procs:
            raise LocalAirflowError(f"{component} is already running")
        args = [
            "celery",
            "worker",
            "--celery-hostname",
            f"{name}@%h",
            "--queues",
            queues,
            "--concurrency",
            str(concurrency),
            "--skip-serve-logs",
        ]
        self.log_path(component).unlink(missing_ok=True)
        self.procs[component] = self._spawn(component, args)
        deadline = time.monotonic() + timeout
        while " ready." not in log_tail(self.log_path(component), 400):
            self._check_alive()
            if time.monotonic() > deadline:
                raise LocalAirflowError(self._failure(f"{component} not ready after {timeout:.0f}s", component))
            time.sleep(POLL_S)

    def kill_component(self, component: str) -> None:
        """SIGKILL one component and all its descendants at once, as a crash would (no clean-up runs)."""
        proc = self.procs.pop(component)
        pids = _tree(proc.pid)
        _signal(pids, signal.SIGKILL)
        proc.wait(10)

    def _wait_healthy(self, fresh: tuple[str, ...], since: datetime, deadline: float, logs: tuple[str, ...]) -> None:
        """Wait until the API answers its health check with a heartbeat newer than ``since``
        from each of ``fresh``; on timeout, fail with the tails of the ``logs`` components' logs."""
        health: dict[str, Any] = {}
        while True:
            self._check_alive()
            try:
                health = self.api("GET", "/api/v2/monitor/health", timeout=5)
            except LocalAirflowError:
                health = {}
            if health and all(_is_fresh(health, key, since) for key in fresh):
                return
            if time.monotonic() > deadline:
                raise LocalAirflowError(self._failure(f"not healthy in time (health: {health or 'no answer'})", *logs))
            time.sleep(POLL_S)

    def processes(self, components: Iterable[str] | None = None) -> tuple[set[int], list[psutil.Process]]:
        """Every live process of the stack (or of some of its ``components``): ``(pids, gpu_holders)``.

        Each component leads a session of its own, which its descendants keep wherever they
        move (the task supervisor puts each task in a process group of its own, in the same
        session) and after their parent died: a task whose LocalExecutor worker was killed is
        found by its session. A descendant that starts a session of its own is found by the
        stack's marker (:data:`MARK_ENV`, in its environment; Airflow's processes overwrite
        theirs with their titles) or, while its parent lives, as a child. The warm workers'
        GPU holders come apart: they must live as long as their containers.
        """
        procs = [p for name, p in self.procs.items() if components is None or name in components]
        pids: set[int] = set()
        for proc in procs:
            if proc.poll() is None:
                pids |= _tree(proc.pid)
        pids |= _session_members(procs)
        if components is None:
            pids |= {p.pid for p in shutdown.marked_processes(MARK_ENV, self.mark)}
        found = {}
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                found[pid] = psutil.Process(pid)
        holders = [p for p in found.values() if shutdown.is_gpu_holder(p)]
        return set(found) - {h.pid for h in holders}, holders

    def gpu_holders(self) -> list[psutil.Process]:
        """The GPU holders of warm workers that tasks of this stack started, still running."""
        return self.processes()[1]

    def stop(self, grace: float | None = None) -> None:
        """Stop all components, every process they started and the containers of the runs triggered
        (or cleared) through this object: SIGTERM, SIGKILL after ``grace`` s (:attr:`stop_grace`).

        The api-server goes last: a task stopped by SIGTERM still reports its end through it
        (else its supervisor retries for many seconds before it gives up).  Every process that
        :meth:`processes` finds is stopped, GPU holders aside: each ends once its container is
        removed (checked: one still running 30 s later is killed).  Idempotent.  A second
        signal during a :mod:`batchscore.shutdown` cuts the grace short; a signal that arrives
        during the stop does not: the stop ends, then the signal's exception goes on.
        """
        grace = self.stop_grace if grace is None else grace
        try:
            self._stop(grace)
        except KeyboardInterrupt:  # shutdown.Interrupted too: finish the stop, then go on unwinding
            self._stop(grace)
            raise

    def _stop(self, grace: float) -> None:
        procs = dict(self.procs)
        if self._triggering and procs and not shutdown.forced():
            with contextlib.suppress(LocalAirflowError):  # the run a trigger made before a signal cut it short
                self.runs |= {(d, r["dag_run_id"]) for d in list(self._triggering) for r in self._runs_since_start(d)}
            self._triggering.clear()
        api_side = ["api-server"]

        def first() -> set[int]:
            return self.processes()[0] - self.processes(api_side)[0]

        stopped = first()
        if stopped:
            _terminate(stopped, grace, [p for name, p in procs.items() if name not in api_side], rescan=first)
        last = self.processes()[0]
        if last:
            _terminate(last, grace, procs.values(), rescan=lambda: self.processes()[0])
        for proc in procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):  # only if unkillable (D state)
                proc.wait(5)
        self.procs = {}
        if procs:
            shutdown.note(f"stopped Airflow ({', '.join(procs)}: {len(stopped | last)} processes)")
        self._remove_run_containers()

    def _remove_run_containers(self) -> None:
        """Remove the containers of :attr:`runs` (none are left after a run that ended), then check
        that the GPU holders of their warm workers end on their own."""
        if not self.runs:
            return
        holders = self.gpu_holders()
        by_dag: dict[str, list[str]] = {}
        for dag_id, run_id in sorted(self.runs):
            by_dag.setdefault(dag_id, []).append(run_id)
        for dag_id, run_ids in by_dag.items():  # a batchscore DAG's id is its endpoint's name
            try:
                shutdown.remove_run_containers(dag_id, run_ids)
            except Exception as exc:  # noqa: BLE001 - a stop goes on: say it, and stop the rest
                if not _no_docker(exc):  # (no Docker engine here: no container either)
                    what = f"could not remove the containers of {dag_id}'s runs: {exc}"
                    shutdown.note(what) if shutdown.interrupted() else print(f"local Airflow: {what}", file=sys.stderr)
        shutdown.end_gpu_holders(holders)

    def __enter__(self) -> LocalAirflow:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# ---------------------------------------------------------------- helpers


def _is_airflow_setting(name: str) -> bool:
    """Whether an environment variable configures Airflow itself (not inherited).

    ``AIRFLOW_CONN_*`` and ``AIRFLOW_VAR_*`` (connections, variables) are data, not
    configuration, and pass through.
    """
    return name.startswith(("AIRFLOW__", "_AIRFLOW")) or name in ("AIRFLOW_HOME", "AIRFLOW_CONFIG")


def _is_fresh(health: dict, component: str, since: datetime) -> bool:
    info = health.get(component) or {}
    beat = info.get(f"latest_{component}_heartbeat")
    if info.get("status") != "healthy" or not beat:
        return False
    return utc_time(beat) >= since


def _tree(pid: int) -> set[int]:
    """Return ``pid`` and all its descendants that are running now."""
    try:
        parent = psutil.Process(pid)
        return {pid, *(c.pid for c in parent.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()


def _session_members(leaders: Iterable[subprocess.Popen[bytes]]) -> set[int]:
    """The live processes of the sessions that these children of ours started (``start_new_session``).

    A session keeps its leader's pid as its id while it has members, even after the leader
    died, and the kernel hands that pid to no new process meanwhile: once the leader is reaped,
    a live process with its pid means the session ended and the pid was reused.
    """
    ours = {proc.pid for proc in leaders if proc.poll() is None or not _running(proc.pid)}
    if not ours:
        return set()
    return {pid for pid in psutil.pids() if _session_of(pid) in ours and _running(pid)}


def _no_docker(exc: Exception) -> bool:
    """Whether ``exc`` says that no Docker engine answers (the docker SDK's or its transport's error)."""
    from docker.errors import DockerException
    from requests.exceptions import ConnectionError as Unreachable

    return isinstance(exc, Unreachable) or (isinstance(exc, DockerException) and not hasattr(exc, "status_code"))


def _session_of(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (a zombie has already exited)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _signal(pids: Iterable[int], sig: signal.Signals) -> None:
    """Send ``sig`` to each pid and to its process group (never to our own group)."""
    own = os.getpgrp()
    groups = set()
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for pgid in groups - {own}:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)


def _terminate(
    pids: set[int],
    grace: float,
    reap: Iterable[subprocess.Popen[bytes]] = (),
    rescan: Callable[[], set[int]] | None = None,
) -> None:
    """SIGTERM ``pids`` and their process groups; SIGKILL whatever runs after ``grace`` s, or
    at once when a second signal forces the shutdown (:func:`batchscore.shutdown.forced`).

    ``reap`` are our own children among them, polled so they do not stay zombies. ``rescan``
    finds processes started meanwhile (a task forked as the scheduler stopped): killed too.
    """
    reap = list(reap)

    def alive() -> set[int]:
        for proc in reap:
            proc.poll()
        return {p for p in pids if _running(p)}

    _signal(pids, signal.SIGTERM)
    shutdown.wait_unless_forced(grace, lambda: not alive())
    for _ in range(3):
        left = alive() | (rescan() if rescan else set())
        if not left:
            return
        # Something still runs: take its newest children along, and kill.
        for pid in list(left):
            left |= _tree(pid)
        pids |= left
        _signal(left, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while alive() and time.monotonic() < deadline:
            time.sleep(0.2)
