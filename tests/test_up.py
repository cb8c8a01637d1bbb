"""``python -m batchscore up`` and ``run --keep``: a local Airflow left up with a login, until a signal that
stops it and removes the containers of every run it ran, those triggered from outside (as from the UI) too.
Also the plain progress lines of ``run`` when its output is not a terminal.

The commands run as in tests/test_signals.py (its :class:`Command`: a staged warm deployment, the command in a
session of its own, its processes found by a marker and their sessions, its containers by the endpoint's label).
"""

from __future__ import annotations

import json
import re
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchscore.localairflow import LocalAirflow, LocalAirflowError
from batchscore.progress import Progress, ProgressReader
from batchscore.scoring.workers import run_digest
from tests.helpers import load
from tests.test_signals import WAIT_S, Command, still_running

pytestmark = [pytest.mark.docker, pytest.mark.scheduler]

# One row per file: each of the two mini-batches scores one row.
QUICK_SCRIPT = """
import os

def init():
    pass

def run(mini_batch):
    return [os.path.basename(p) for p in mini_batch]
"""

BANNER = re.compile(r"^Airflow UI: (http://127\.0\.0\.1:\d+)/\n  login:    (\S+)\n  password: (\S+)   \(kept in (\S+)\)$", re.M)


@pytest.fixture()
def command(tmp_path: Path) -> Iterator:
    started: list[Command] = []

    def start(*extra: str, verb: str = "run", script: str | None = None) -> Command:
        started.append(Command(tmp_path, *extra, verb=verb, script=script))
        return started[-1]

    try:
        yield start
    finally:
        for c in started:
            c.cleanup()


def _status(url: str, token: str | None = None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def _logged_in(cmd: Command, tmp_path: Path) -> tuple[LocalAirflow, str]:
    """Wait for the banner; check that the API wants the login it shows, and that it works. A client, and the URL."""
    url, user, password, kept_in = cmd.wait_for("the URL and the login", lambda: BANNER.search(cmd.out)).groups()  # type: ignore[union-attr]
    assert json.loads(Path(kept_in).read_text()) == {user: password}
    assert Path(kept_in).stat().st_mode & 0o077 == 0  # the owner's only
    with urllib.request.urlopen(f"{url}/api/v2/monitor/health", timeout=30) as resp:
        assert json.load(resp)["scheduler"]["status"] == "healthy"
    assert _status(f"{url}/api/v2/dags") == 401  # no login, nothing
    client = LocalAirflow(tmp_path / "airflow", cmd.dags, port=int(url.rsplit(":", 1)[1]))  # a client: not started
    with pytest.raises(LocalAirflowError, match="HTTP 401"):
        client.login(user, "not-the-password")
    client.login(user, password)
    assert client.api("GET", "/api/v2/dags")["total_entries"] >= 1  # logged in: the dags (HTTP 401 raises)
    return client, url


def test_up_stays_until_ctrl_c_which_removes_the_containers_of_a_run_triggered_from_outside(command, tmp_path: Path) -> None:
    cmd = command(verb="up")
    client, url = _logged_in(cmd, tmp_path)
    client.wait_for_dag(cmd.endpoint)
    run_id = client.trigger(cmd.endpoint)  # as the UI's trigger button does: `up` knows nothing of it
    cmd.scoring()
    worker = f"batchscore-{run_digest(cmd.endpoint, 'test-deployment', run_id)}-w1"
    assert cmd.containers() == [worker]
    processes = cmd.processes()
    assert len(processes) > 5  # the command, api-server, scheduler, dag-processor, a LocalExecutor worker, the task...

    cmd.proc.send_signal(signal.SIGINT)
    assert cmd.proc.wait(timeout=WAIT_S) == 0  # Ctrl-C is how `up` ends
    ended_at = time.time()
    out = cmd.out

    assert "Traceback" not in out
    lines = out.rstrip("\n").splitlines()
    assert lines[-2] == "SIGINT: stopping Airflow and the containers of its runs (a second signal kills them at once) ..."
    assert re.fullmatch(
        r"Interrupted by SIGINT: stopped Airflow \(api-server, scheduler, dag-processor, triggerer: \d+ processes\); "
        rf"removed the container\(s\) of run {re.escape(run_id)}: {worker}",
        lines[-1],
    ), lines[-1]
    assert still_running(processes, ended_at) == []
    assert cmd.containers() == []
    assert not _reachable(url)


def _reachable(url: str) -> bool:
    try:
        urllib.request.urlopen(f"{url}/api/v2/monitor/health", timeout=5).close()
    except OSError:
        return False
    return True


def test_run_keep_shows_plain_progress_lines_then_stays_up_until_sigterm(command, tmp_path: Path) -> None:
    cmd = command("--keep", script=QUICK_SCRIPT)
    run_id = cmd.run_id()
    client, url = _logged_in(cmd, tmp_path)  # the banner comes after the run
    out = cmd.out
    assert f"\nRun {run_id} of {cmd.endpoint}: success\n" in out
    assert "\r" not in out  # not a terminal: plain lines
    progress = re.findall(r"^  mini-batches.*$", out, re.M)
    assert progress[-1].startswith("  mini-batches 2/2: 2 done, 0 failed, 0 running | 2 rows | ")
    assert re.search(r"\| took \d+(m\d\ds|s)$", progress[-1]), progress[-1]
    assert len(progress) == len(set(progress))  # one line only when something changed
    assert client.dag_run(cmd.endpoint, run_id)["state"] == "success"  # still up, and logged in
    # The rows come from the run folder here; with none (object storage, no copy here), from the score tasks' XCom.
    deployments = load(cmd.root / "deployments" / f"{cmd.endpoint}.yaml").deployments
    reader = ProgressReader(client, cmd.endpoint, run_id, deployments)
    assert reader.read() == Progress(total=2, done=2, failed=0, running=0, rows=2, failed_items=0)
    reader.folders = dict.fromkeys(reader.folders)
    assert reader.read() == Progress(total=2, done=2, failed=0, running=0, rows=2, failed_items=0)
    processes = cmd.processes()

    cmd.proc.send_signal(signal.SIGTERM)
    assert cmd.proc.wait(timeout=WAIT_S) == 0  # the run's status: it succeeded
    ended_at = time.time()
    lines = cmd.out.rstrip("\n").splitlines()
    assert "Traceback" not in cmd.out
    assert lines[-2] == "SIGTERM: stopping Airflow and the containers of its runs (a second signal kills them at once) ..."
    assert re.fullmatch(
        r"Interrupted by SIGTERM: stopped Airflow \(api-server, scheduler, dag-processor, triggerer: \d+ processes\)", lines[-1]
    ), lines[-1]
    assert not _reachable(url)
    assert still_running(processes, ended_at) == []
    assert cmd.containers() == []
