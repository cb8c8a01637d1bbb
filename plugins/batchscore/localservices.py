"""PostgreSQL and Redis as local processes, from the distribution's packages: the CeleryExecutor's
metadata database and broker for :class:`~batchscore.localairflow.LocalAirflow` (tests, bench).

No image can be pulled on this project's machines, so they run as plain processes of the
caller (``apt-get install postgresql redis-server``; ``.ci/run`` does it), each on a free port
of 127.0.0.1 with its data in a temporary folder. A missing package raises an error with the
command to run: a test that skipped itself on CI could never fail.

Each server runs in a session of its own (so a Ctrl-C in the terminal reaches only the caller,
which stops it); ``stop()`` ends the whole session (``killpg``), gives it 20 s, less when a
second signal forces a :mod:`batchscore.shutdown`. Both are context managers::

    with Postgres() as postgres, Redis(root / "redis") as redis:
        ...
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from batchscore import shutdown
from batchscore.localairflow import free_port, log_tail

INSTALL_HINT = "install them with: apt-get install postgresql redis-server (bash .ci/run does)"


def _runuser(args: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the package's user ``postgres``."""
    return ["runuser", "-u", "postgres", "--", *args] if os.getuid() == 0 else args


def _stop_session(proc: subprocess.Popen[bytes] | None, grace: float = 20, first: signal.Signals = signal.SIGTERM) -> bool:
    """Send ``first`` to the session that ``proc`` leads (started with ``start_new_session``), SIGKILL
    it after ``grace`` s or when the shutdown is forced; returns whether it was running."""
    if proc is None or proc.poll() is not None:
        return False

    def signal_session(sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    signal_session(first)
    if not shutdown.wait_unless_forced(grace, lambda: proc.poll() is not None):
        signal_session(signal.SIGKILL)
        proc.wait()
    signal_session(signal.SIGKILL)  # what the server left of its session (none, when it stopped well)
    return True


def _run_in_session(args: list[str]) -> subprocess.CompletedProcess[bytes]:
    """``subprocess.run(args)`` in a session of its own, which a signal here kills whole."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate()
    except BaseException:
        _stop_session(proc, 0)
        raise
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, args, out, err)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


class _Service:
    """Start and stop as a context manager; ``stop()`` on any way out of the block."""

    proc: subprocess.Popen[bytes] | None
    name = ""
    stop_signal = signal.SIGTERM

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """Stop the server: :attr:`stop_signal` to its whole session, SIGKILL after 20 s. Idempotent."""
        try:
            stopped = _stop_session(self.proc, first=self.stop_signal)
        except KeyboardInterrupt:  # a signal during the stop: finish it, then go on unwinding
            _stop_session(self.proc, 0)
            shutdown.note(f"stopped {self.name}")
            raise
        if stopped:
            shutdown.note(f"stopped {self.name}")

    def __enter__(self) -> Any:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _started(self, wait_until_ready: Any) -> None:
        """Wait with ``wait_until_ready()``; on any failure or signal, stop what was started."""
        try:
            wait_until_ready()
        except BaseException:
            self.stop()
            raise


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} is not installed; {INSTALL_HINT}")
    return found[-1]


class Postgres(_Service):
    """A throwaway PostgreSQL server with one database, ``airflow``, owned by the user ``airflow``."""

    name = "PostgreSQL"
    stop_signal = signal.SIGINT  # "fast" shutdown: SIGTERM's "smart" one waits for Airflow's pooled connections

    def __init__(self, root: Path | None = None):
        # Not under pytest's tmp_path: that is root's alone (0700), and the server runs as postgres.
        self.root = root or Path(tempfile.mkdtemp(prefix="batchscore-pg-"))
        self.data = self.root / "pgdata"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of Airflow's metadata database (psycopg2, as Airflow's image uses)."""
        return f"postgresql+psycopg2://airflow@127.0.0.1:{self.port}/airflow"

    def start(self, timeout: float = 60) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if os.getuid() == 0:
            shutil.chown(self.root, "postgres")
        _run_in_session(_runuser([_pg_bin("initdb"), "-D", str(self.data), "--auth=trust", "--username=airflow", "-E", "UTF8"]))
        log = open(self.root / "postgres.log", "ab")  # noqa: SIM115 - the server's for its lifetime
        self.proc = subprocess.Popen(
            _runuser(
                [
                    _pg_bin("postgres"),
                    "-D",
                    str(self.data),
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.root),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "fsync=off",
                    "-c",
                    "max_connections=200",
                ]
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._started(lambda: self._wait_ready(time.monotonic() + timeout))

    def _wait_ready(self, deadline: float) -> None:
        assert self.proc is not None
        while True:
            done = self._psql('CREATE DATABASE "airflow"')
            if done.returncode == 0:
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start: {done.stderr}\n{log_tail(self.root / 'postgres.log')}")
            time.sleep(0.5)

    def _psql(self, sql: str) -> subprocess.CompletedProcess[str]:
        """Run one SQL statement as ``airflow`` on the server's ``postgres`` database."""
        return subprocess.run(
            [_pg_bin("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "airflow", "-d", "postgres", "-c", sql],
            capture_output=True,
            text=True,
        )

    def create_database(self, name: str) -> str:
        """Another database on this server (owned by ``airflow``); returns its SQLAlchemy URL."""
        done = self._psql(f'CREATE DATABASE "{name}"')
        if done.returncode != 0:
            raise RuntimeError(f"PostgreSQL: cannot create the database {name!r}: {done.stderr.strip()}")
        return self.url.rsplit("/", 1)[0] + f"/{name}"

    def stop(self) -> None:
        """Stop the server and remove its data."""
        try:
            super().stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


class Redis(_Service):
    """A throwaway Redis server without persistence: the Celery broker."""

    name = "Redis"

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError(f"redis-server is not installed; {INSTALL_HINT}")
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "redis.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                server,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.root),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._started(lambda: self._wait_ready(time.monotonic() + timeout))

    def _wait_ready(self, deadline: float) -> None:
        assert self.proc is not None
        while "Ready to accept connections" not in log_tail(self.root / "redis.log"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Redis did not start:\n{log_tail(self.root / 'redis.log')}")
            time.sleep(0.2)
