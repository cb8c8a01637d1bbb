"""SIGINT, SIGTERM and SIGHUP stop a real ``python -m batchscore run`` mid-run and leave nothing behind.

Each test starts the command in a session of its own on a warm deployment whose scoring script
leaves a file in its outputs folder and then blocks: once that file exists, Airflow is up, the
run's warm worker runs and a mini-batch is being scored, and the test sends the signal. The
command's processes are found by an environment variable of the test's own, which every
descendant inherits (the LocalExecutor's workers, the task processes, their subprocesses); its
containers by the label of an endpoint whose name no other test uses.

The second-signal test adds a task whose subprocess ignores SIGTERM, and gives the command a
stop grace longer than the test may last: only a forced shutdown ends it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from batchscore import shutdown
from batchscore.localairflow import LocalAirflow
from batchscore.scoring.workers import run_digest
from tests.conftest import REPO
from tests.helpers import deployment_file, inputs, write

pytestmark = [pytest.mark.docker, pytest.mark.scheduler]

MARK = "BATCHSCORE_TEST_SIGNALS"
WAIT_S = 420  # for states that come within a minute on an idle machine: the bound of a hang, not a timing

# Says that it scores (a file in its outputs folder), then never ends: only a signal ends the run.
BLOCKING_SCRIPT = """
import os, socket, time

def init():
    pass

def run(mini_batch):
    open(os.path.join(os.environ["AZUREML_BI_OUTPUT_PATH"], "scoring-" + socket.gethostname()), "w").close()
    while True:
        time.sleep(1)
"""

# A task whose subprocess (in a session of its own) ignores SIGTERM, saying that it got it.
STUBBORN_DAG = """
import subprocess
from datetime import datetime

from airflow.sdk import dag, task


@dag(dag_id="stubborn", schedule=None, start_date=datetime(2024, 1, 1), catchup=False)
def stubborn():
    @task
    def ignore_sigterm():
        script = "trap 'touch {got_term}' TERM; touch {started}; while :; do sleep 0.1; done"
        subprocess.Popen(["sh", "-c", script], start_new_session=True).wait()

    ignore_sigterm()


stubborn()
"""


class Command:
    """``python -m batchscore run`` of a staged warm deployment, and what the test knows of it.

    ``verb="up"`` starts ``python -m batchscore up`` on the same DAG folder instead (tests/test_up.py), and
    ``script`` replaces the scoring script that blocks.
    """

    def __init__(self, root: Path, *extra: str, stubborn: bool = False, verb: str = "run", script: str | None = None) -> None:
        self.root = root
        self.endpoint = f"signals-{uuid.uuid4().hex[:8]}"
        self.mark = uuid.uuid4().hex
        self.seen: set[tuple[int, float]] = set()  # every process of the command the test saw
        (root / "model").mkdir()
        write(root / "code" / "score.py", script or BLOCKING_SCRIPT)
        self.output = root / "output"
        yaml_path = deployment_file(
            root / "deployments", model=root / "model", code=root / "code",
            inputs=inputs(root / "in", {"a.csv": b"id\n1\n", "b.csv": b"id\n2\n"}), output=self.output,
            endpoint=self.endpoint, settings={"worker_mode": "warm", "mini_batch_size": 1},
            resources={"instance_count": 1},
        )  # fmt: skip
        self.dags = root / "dags"
        self.dags.mkdir()
        (self.dags / "batchscore_deployments.py").write_text((REPO / "dags" / "batchscore_deployments.py").read_text())
        if stubborn:
            (self.dags / "stubborn.py").write_text(
                STUBBORN_DAG.format(got_term=root / "got-term", started=root / "stubborn-started")
            )
        env = {
            **os.environ,
            MARK: self.mark,
            "BATCHSCORE_DEPLOYMENTS_DIR": str(yaml_path.parent),
            "PYTHONPATH": os.pathsep.join([str(REPO / "plugins"), str(REPO / "include"), os.environ.get("PYTHONPATH", "")]),
        }
        self.log = root / "command.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "batchscore", *([verb, self.endpoint] if verb == "run" else [verb]),
                 "--dags-folder", str(self.dags),
                 "--home", str(root / "airflow"), *extra],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip

    @property
    def out(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, what: str, found) -> object:
        """Wait until ``found()`` is true (returned), failing with the output if the command ends first."""
        deadline = time.monotonic() + WAIT_S
        while not (value := found()):
            if self.proc.poll() is not None:
                pytest.fail(f"the command ended ({self.proc.returncode}) before {what}:\n{self.out}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} after {WAIT_S} s:\n{self.out}")
            time.sleep(0.2)
        return value

    def run_id(self) -> str:
        return self.wait_for("a triggered run", lambda: (m := re.search(r"^Triggered run (\S+)$", self.out, re.M)) and m[1])

    def scoring(self) -> None:
        """Wait until a warm worker scores a mini-batch."""
        self.wait_for("mini-batch scoring", lambda: any(self.output.rglob("scoring-*")))

    def processes(self) -> set[tuple[int, float]]:
        """The command's processes now, as (pid, start time) (a pid may be reused): its tree, what carries
        its marker (if its title did not overwrite it) and the members of their sessions."""
        pids = {self.proc.pid}
        with contextlib.suppress(psutil.NoSuchProcess):
            pids |= {c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)}
        pids |= {p.pid for p in shutdown.marked_processes(MARK, self.mark)}
        sessions = {sid for pid in pids if (sid := _session(pid)) is not None} - {os.getsid(0)}
        pids |= {pid for pid in psutil.pids() if _session(pid) in sessions}
        found = set()
        for pid in pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                found.add((pid, psutil.Process(pid).create_time()))
        self.seen |= found
        return found

    def containers(self) -> list[str]:
        out = subprocess.run(
            ["docker", "ps", "-a", "--filter", f"label=batchscore.endpoint={self.endpoint}", "--format", "{{.Names}}"],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        return sorted(out.stdout.split())

    def cleanup(self) -> None:
        """Whatever a failed test left: the command's session, its marked processes, its containers."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for line in still_running(self.seen, time.time()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split()[0]), signal.SIGKILL)
        for p in shutdown.marked_processes(MARK, self.mark):
            p.kill()
        if names := self.containers():
            subprocess.run(["docker", "rm", "-f", *names], capture_output=True)


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def still_running(processes: set[tuple[int, float]], ended_at: float) -> list[str]:
    """Those of ``processes`` that still run, and any process started before ``ended_at`` (a time.time())
    in one of their sessions: a descendant that moved out of the tree after ``processes`` was taken."""
    sessions = {sid for pid, _ in processes if (sid := _session(pid)) is not None} - {os.getsid(0)}
    left = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            if (p.pid, p.create_time()) in processes or (_session(p.pid) in sessions and p.create_time() <= ended_at):
                left.append(f"{p.pid} {' '.join(p.cmdline())[:160]}")
    return left


@pytest.fixture()
def command(tmp_path: Path) -> Iterator[type[Command]]:
    started: list[Command] = []

    def start(*extra: str, stubborn: bool = False) -> Command:
        started.append(Command(tmp_path, *extra, stubborn=stubborn))
        return started[-1]

    try:
        yield start  # type: ignore[misc]
    finally:
        for c in started:
            c.cleanup()


def _stopped_line(name: str, run_id: str, endpoint: str, forced_by: str = "") -> str:
    forced = f", forced by a second signal ({forced_by})" if forced_by else ""
    worker = f"batchscore-{run_digest(endpoint, 'test-deployment', run_id)}-w1"
    return (
        rf"Interrupted by {name}{re.escape(forced)}: stopped Airflow "
        r"\(api-server, scheduler, dag-processor, triggerer: \d+ processes\); "
        rf"removed the container\(s\) of run {re.escape(run_id)}: {worker}"
    )


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_mid_run_stops_airflow_and_the_runs_containers(command, sig: signal.Signals) -> None:
    cmd = command()
    run_id = cmd.run_id()
    cmd.scoring()
    assert cmd.containers() == [f"batchscore-{run_digest(cmd.endpoint, 'test-deployment', run_id)}-w1"]
    processes = cmd.processes()
    assert len(processes) > 5  # the command, api-server, scheduler, dag-processor, triggerer, a LocalExecutor worker, the task...

    cmd.proc.send_signal(sig)
    assert cmd.proc.wait(timeout=WAIT_S) == 128 + sig
    ended_at = time.time()
    out = cmd.out

    assert "Traceback" not in out
    lines = out.rstrip("\n").splitlines()
    assert lines[-2] == f"{sig.name}: stopping Airflow and the run's containers (a second signal kills them at once) ..."
    assert re.fullmatch(_stopped_line(sig.name, run_id, cmd.endpoint), lines[-1]), lines[-1]
    assert still_running(processes, ended_at) == []
    assert cmd.containers() == []


def test_a_second_signal_kills_what_the_first_is_still_stopping(command, tmp_path: Path) -> None:
    cmd = command("--stop-grace", "3600", stubborn=True)  # without the second signal the stop would outlast the test
    run_id = cmd.run_id()
    port = cmd.wait_for(
        "the API's address", lambda: (m := re.search(r"Airflow is up at http://127.0.0.1:(\d+)", cmd.out)) and int(m[1])
    )
    cmd.scoring()
    api = LocalAirflow(tmp_path / "airflow", cmd.dags, port=port)  # a client of the command's stack: not started
    api.wait_for_dag("stubborn")
    api.trigger("stubborn")
    cmd.wait_for("the stubborn task", lambda: (tmp_path / "stubborn-started").exists())
    processes = cmd.processes()

    cmd.proc.send_signal(signal.SIGTERM)
    cmd.wait_for("SIGTERM reaching the stubborn subprocess", lambda: (tmp_path / "got-term").exists())
    cmd.proc.send_signal(signal.SIGINT)
    assert cmd.proc.wait(timeout=WAIT_S) == 128 + signal.SIGTERM
    ended_at = time.time()
    out = cmd.out

    assert "Traceback" not in out
    last = out.rstrip("\n").splitlines()[-1]
    assert re.fullmatch(_stopped_line("SIGTERM", run_id, cmd.endpoint, forced_by="SIGINT"), last), last
    assert still_running(processes, ended_at) == []
    assert cmd.containers() == []


@pytest.mark.docker
def test_a_warm_workers_gpu_holder_ends_by_itself_once_the_sweep_removed_its_container(
    scoring_image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No GPU here: the host's GPUs are named by BATCHSCORE_GPUS and never reach Docker."""
    from batchscore.gpu_holder import lease_for_worker
    from tests.helpers import load

    monkeypatch.setenv("BATCHSCORE_GPUS", "g0")
    monkeypatch.setenv("BATCHSCORE_GPU_LOCK_DIR", str(tmp_path / "locks"))
    write(tmp_path / "in" / "score.py", BLOCKING_SCRIPT)
    endpoint = f"signals-{uuid.uuid4().hex[:8]}"
    spec = load(
        deployment_file(tmp_path / "yaml", model=tmp_path / "in", code=tmp_path / "in", inputs=tmp_path / "in",
                        endpoint=endpoint, resources={"gpus": 1})
    ).deployments[0]  # fmt: skip
    name = f"batchscore-test-{endpoint}-w1"
    labels = [f"batchscore.endpoint={endpoint}", "batchscore.run_id=run-1", "batchscore.role=warm-worker"]
    holder = None
    try:
        subprocess.run(
            ["docker", "run", "-d", "--name", name, *(a for label in labels for a in ("--label", label)),
             scoring_image, "sleep", "300"],
            check=True, capture_output=True,
        )  # fmt: skip
        _, _, holder = lease_for_worker(spec, name, name)
        assert holder.poll() is None  # holds the GPU while the container lives

        assert shutdown.remove_run_containers(endpoint, ["run-1", "run-2"]) == {"run-1": [name]}
        assert shutdown.end_gpu_holders([psutil.Process(holder.pid)]) == []  # none had to be killed
        assert holder.wait(timeout=10) == 0  # it ended by itself, not by a signal
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
        if holder is not None and holder.poll() is None:
            holder.kill()
            holder.wait()
