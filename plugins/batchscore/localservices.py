"""PostgreSQL and Redis as local processes, from the distribution's packages: the CeleryExecutor's
metadata database and broker for :class:`~batchscore.localairflow.LocalAirflow` (tests, bench).

No image can be pulled on this project's machines, so they run as plain processes of the
caller (``apt-get install postgresql redis-server``; ``.ci/run`` does it), each on a free port
of 127.0.0.1 with its data in a temporary folder. A missing package raises an error with the
command to run: a test that skipped itself on CI could never fail.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from batchscore.localairflow import free_port, log_tail

INSTALL_HINT = "install them with: apt-get install postgresql redis-server (bash .ci/run does)"


def _runuser(args: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the package's user ``postgres``."""
    return ["runuser", "-u", "postgres", "--", *args] if os.getuid() == 0 else args


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} is not installed; {INSTALL_HINT}")
    return found[-1]


class Postgres:
    """A throwaway PostgreSQL server with one database, ``airflow``, owned by the user ``airflow``."""

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
        subprocess.run(
            _runuser([_pg_bin("initdb"), "-D", str(self.data), "--auth=trust", "--username=airflow", "-E", "UTF8"]),
            check=True,
            capture_output=True,
        )
        log = open(self.root / "postgres.log", "ab")  # noqa: SIM115 - the server's for its lifetime
        self.proc = subprocess.Popen(
            _runuser(
                [_pg_bin("postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.root),
                 "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=200"]
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
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
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # "smart" shutdown would wait for Airflow's pooled connections
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


class Redis:
    """A throwaway Redis server without persistence: the Celery broker."""

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
            [server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.root)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while "Ready to accept connections" not in log_tail(self.root / "redis.log"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Redis did not start:\n{log_tail(self.root / 'redis.log')}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
