"""The warm worker's daemon (batchscore_runtime.warm), run as a real process on real files.

The same daemon runs inside the worker containers in tests/test_warm.py; here its contract
handling is exercised case by case without containers. The scripts count their own init()
calls in a file next to the inputs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from batchscore_runtime.formats import InputFile, MiniBatch, MiniBatchDir, write_json_atomic
from batchscore_runtime.warm_protocol import EXIT_FAILED, EXIT_OK, EXIT_REFUSED, PREFIX, cancel, submit
from batchscore_runtime.worker_state import WorkerState
from tests.helpers import write

RUNTIME = Path(__file__).resolve().parents[2] / "include"

COUNTING = """
import os, time
COUNT = os.path.join(os.path.dirname(__file__), "inits.txt")

def init():
    time.sleep(float(os.environ.get("INIT_SLEEP", "0")))
    with open(COUNT, "a") as f:
        f.write(f"{os.getpid()}\\n")

def run(mini_batch):
    names = [os.path.basename(p) for p in mini_batch]
    if "die.csv" in names:
        os._exit(3)
    if "hang.csv" in names:
        time.sleep(60)
    if "bad.csv" in names:
        raise ValueError("bad file")
    while "gated.csv" in names and not os.path.exists(os.path.join(os.path.dirname(__file__), "go")):
        time.sleep(0.05)
    with open(os.path.join(os.environ["AZUREML_BI_OUTPUT_PATH"], f"seen-{os.getpid()}.txt"), "w") as f:
        f.write(",".join(names))
    return [f"{n}:{os.getpid()}" for n in names]
"""


class Worker:
    """A daemon on a socket of its own, and mini-batches of the given files to hand it."""

    def __init__(self, root: Path, script: str, *args: str, env: dict[str, str] | None = None):
        self.root = root
        self.code = write(root / "code" / "score.py", script)
        self.inputs = root / "in"
        self.inputs.mkdir(exist_ok=True)
        self.socket = str(root / "warm.sock")
        self.state_dir = root / "state"
        self.state_dir.mkdir(exist_ok=True)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "batchscore_runtime.warm",
                "daemon",
                "--contract",
                "azure",
                "--worker",
                "w1",
                "--socket",
                self.socket,
                "--state-dir",
                str(self.state_dir),
                "--input-root",
                str(self.inputs),
                "--scoring-script",
                str(self.code),
                *args,
            ],
            env={**os.environ, "PYTHONPATH": str(RUNTIME), **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its process group stands for the container: see end()
        )
        self.output: list[str] = []
        threading.Thread(target=lambda: self.output.extend(self.process.stdout), daemon=True).start()

    def state(self) -> WorkerState | None:
        return WorkerState.read(self.state_dir / "state.json")

    def wait_for(self, state: str, timeout: float = 60) -> WorkerState:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.state()
            if s is not None and s.state == state:
                return s
            time.sleep(0.1)
        raise AssertionError(f"never {state}: {self.state()}; {''.join(self.output)}")

    def mini_batch(self, index: int, *names: str) -> tuple[str, MiniBatchDir]:
        files = []
        for name in names:
            p = self.inputs / name
            if not p.exists():
                p.write_text("x\n1\n")
            files.append(InputFile(name, p.stat().st_size, p.stat().st_mtime_ns))
        path = self.root / f"mb-{index:05d}.json"
        write_json_atomic(path, MiniBatch(index=index, files=files).to_json())
        return str(path), MiniBatchDir(self.root / "results" / f"mb-{index:05d}", index)

    def submit(self, index: int, *names: str, idle_only: bool = False) -> tuple[int, MiniBatchDir]:
        path, out = self.mini_batch(index, *names)
        out.path.mkdir(parents=True, exist_ok=True)
        return submit(path, str(out.path), 1, self.socket, idle_only=idle_only), out

    def submit_in_thread(self, index: int, *names: str) -> tuple[threading.Thread, list[tuple[int, MiniBatchDir]]]:
        result: list[tuple[int, MiniBatchDir]] = []
        thread = threading.Thread(target=lambda: result.append(self.submit(index, *names)), daemon=True)
        thread.start()
        return thread, result

    def wait_for_line(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.output):
            assert time.monotonic() < deadline, f"no {text!r} in: {''.join(self.output)}"
            time.sleep(0.05)

    def submit_when_free(self, index: int, *names: str, timeout: float = 60) -> tuple[int, MiniBatchDir]:
        """As the orchestrator does: a worker that refuses (busy, replacing a process) is asked again."""
        deadline = time.monotonic() + timeout
        while True:
            code, out = self.submit(index, *names)
            if code != EXIT_REFUSED or time.monotonic() > deadline:
                return code, out
            time.sleep(0.2)

    def inits(self) -> list[str]:
        count = self.code.parent / "inits.txt"
        return count.read_text().split() if count.exists() else []

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)

    def end(self) -> None:
        """What the end of its container does: every process the daemon started (worker processes,
        multiprocessing's resource tracker) goes too, also after a test killed the daemon alone."""
        if self.process.poll() is None:
            self.stop()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)


@pytest.fixture()
def worker(tmp_path: Path):
    started: list[Worker] = []

    def start(script: str = COUNTING, *args: str, env: dict[str, str] | None = None) -> Worker:
        w = Worker(tmp_path, script, *args, env=env)
        started.append(w)
        return w

    yield start
    for w in started:
        w.end()


def test_init_runs_once_per_process_and_every_mini_batch_is_committed_with_its_own_outputs(worker, capsys) -> None:
    w = worker(COUNTING, "--workers", "2")
    ready = w.wait_for(WorkerState.READY)
    assert ready.processes == 2 and ready.init_seconds is not None

    outs = []
    for i in range(4):
        code, out = w.submit_when_free(i, f"a{i}.csv", f"b{i}.csv", f"c{i}.csv")
        assert code == EXIT_OK, (i, code, "".join(w.output))
        outs.append(out)

    assert len(w.inits()) == 2  # two processes, four mini-batches
    for i, out in enumerate(outs):
        status = out.read_status()
        assert status.succeeded and status.rows == 3 and status.worker == "w1"
        assert status.init_seconds == ready.init_seconds  # the worker's init(), paid once
        seen = sorted(p.read_text() for p in (out.path / status.outputs_dir).glob("seen-*.txt"))
        assert seen == [f"a{i}.csv,b{i}.csv", f"c{i}.csv"]  # each process wrote into this mini-batch's folder
    printed = capsys.readouterr().out
    assert printed.count(PREFIX) == 8  # taken, then the exit code, per mini-batch
    assert "mb-00003: 3 rows from 3 files" in printed  # the mini-batch's log lines come back
    assert w.state().mini_batches == ["mb-00000", "mb-00001", "mb-00002", "mb-00003"]


def test_a_busy_or_starting_worker_refuses_and_says_why(worker, capsys) -> None:
    w = worker(COUNTING, env={"INIT_SLEEP": "2"})
    code, _ = w.submit(0, "a.csv")
    assert code == EXIT_REFUSED
    assert json.loads(capsys.readouterr().out.split(PREFIX)[1]) == {"accepted": False, "state": "starting"}
    w.wait_for(WorkerState.READY)

    result: list[int] = []
    slow = threading.Thread(target=lambda: result.append(w.submit(1, "hang.csv")[0]))
    slow.start()
    time.sleep(1.5)
    code, _ = w.submit(2, "b.csv")
    assert code == EXIT_REFUSED
    assert '{"accepted": false, "state": "busy"}' in capsys.readouterr().out
    w.stop()  # the hanging mini-batch never ends by itself
    slow.join(timeout=30)


def test_a_process_that_dies_fails_only_its_mini_batch_and_is_replaced_before_the_next(worker) -> None:
    w = worker(COUNTING, "--workers", "1")
    w.wait_for(WorkerState.READY)
    code, out = w.submit(0, "die.csv")
    assert code == EXIT_FAILED
    assert out.read_status().error.one_line() == ("WorkerDied: worker 1/1 of mb-00000 exited with code 3 during run()")
    code, out = w.submit_when_free(1, "fine.csv")
    assert code == EXIT_OK and out.read_status().succeeded
    assert len(w.inits()) == 2  # the replacement called init() once more


def test_a_run_past_the_timeout_is_killed_and_a_script_error_keeps_the_process(worker) -> None:
    w = worker(COUNTING, "--timeout", "1")
    w.wait_for(WorkerState.READY)
    code, out = w.submit(0, "hang.csv")
    assert code == EXIT_FAILED
    assert out.read_status().error.type == "MiniBatchTimeout"
    code, out = w.submit_when_free(1, "bad.csv")
    assert code == EXIT_FAILED
    assert out.read_status().error.one_line().startswith("ValueError: bad file")
    code, out = w.submit_when_free(2, "fine.csv")
    assert code == EXIT_OK
    assert len(w.inits()) == 2  # once at the start, once after the timeout; not after the ValueError


def test_an_init_that_fails_is_recorded_and_the_daemon_ends(worker) -> None:
    w = worker("def init():\n    raise RuntimeError('no weights')\n\ndef run(mb):\n    return mb\n")
    failed = w.wait_for(WorkerState.FAILED)
    assert failed.error.one_line() == "RuntimeError: no weights"
    assert w.process.wait(timeout=30) == 1


def test_an_idle_worker_stops_on_its_own(worker) -> None:
    w = worker(COUNTING, "--idle-timeout", "1")
    w.wait_for(WorkerState.READY)
    assert w.process.wait(timeout=30) == 0
    assert w.state().state == WorkerState.STOPPED


def test_a_worker_queues_up_to_depth_minus_1_in_order_refuses_more_and_idle_only_and_a_cancel_takes_one_out(
    worker, capsys
) -> None:
    w = worker(COUNTING, "--queue-depth", "3")
    w.wait_for(WorkerState.READY)
    first, first_result = w.submit_in_thread(0, "gated.csv")
    w.wait_for_line("w1: scoring mb-00000")
    assert w.submit(1, "idle.csv", idle_only=True)[0] == EXIT_REFUSED  # only a free worker would do
    second, second_result = w.submit_in_thread(2, "a.csv")
    w.wait_for_line("mb-00002 queued, 1 mini-batch(es) ahead of it")
    third, third_result = w.submit_in_thread(3, "b.csv")
    w.wait_for_line("mb-00003 queued, 2 mini-batch(es) ahead of it")
    assert w.submit(4, "full.csv")[0] == EXIT_REFUSED  # 1 scoring + 2 waiting = --queue-depth 3
    assert cancel(str(w.root / "results" / "mb-00003"), w.socket) == 0
    assert cancel(str(w.root / "results" / "mb-00000"), w.socket) == 1  # it scores: not the queue's any more
    (w.code.parent / "go").touch()
    for thread in (first, second, third):
        thread.join(timeout=60)

    assert first_result[0][0] == EXIT_OK and second_result[0][0] == EXIT_OK
    assert third_result[0][0] == EXIT_REFUSED and third_result[0][1].read_status() is None  # never started
    out = capsys.readouterr().out
    assert out.count(PREFIX + '{"accepted": false, "state": "busy"}') == 2
    assert PREFIX + '{"queued": true, "worker": "w1", "ahead": 1, "depth": 3}' in out
    assert PREFIX + '{"cancelled": true, "state": "queued"}' in out
    assert PREFIX + '{"cancelled": false, "state": "scoring"}' in out
    assert PREFIX + '{"accepted": false, "state": "cancelled"}' in out
    accepted = [json.loads(line[len(PREFIX) :]) for line in out.splitlines() if line.startswith(PREFIX + '{"accepted": true')]
    assert [a.get("queued_seconds") is not None for a in accepted] == [False, True]  # the queued one says how long
    logged = "".join(w.output)
    assert logged.index("w1: scoring mb-00000") < logged.index("w1: scoring mb-00002")  # in order, one at a time
    assert "w1: scoring mb-00003" not in logged
    assert w.state().mini_batches == ["mb-00000", "mb-00002"]


def test_a_queued_mini_batch_whose_daemon_ends_is_refused_as_lost(worker, capsys) -> None:
    w = worker(COUNTING, "--queue-depth", "2")
    w.wait_for(WorkerState.READY)
    first, _ = w.submit_in_thread(0, "gated.csv")
    w.wait_for_line("w1: scoring mb-00000")
    second, second_result = w.submit_in_thread(1, "a.csv")
    w.wait_for_line("mb-00001 queued")
    w.process.kill()  # as docker kill does to the container
    second.join(timeout=30)
    first.join(timeout=30)
    (w.code.parent / "go").touch()  # its worker process, left alone, finishes run() and finds no daemon

    assert second_result[0][0] == EXIT_REFUSED and second_result[0][1].read_status() is None
    assert PREFIX + '{"accepted": false, "state": "lost"}' in capsys.readouterr().out
