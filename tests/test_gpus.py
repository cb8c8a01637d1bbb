"""GPU leases (batchscore.gpus) with real lock files and real concurrent processes.

No GPU exists on the machines these tests run on: they check the leasing (which process gets
which GPU ids, who waits, what a dead holder leaves behind) and the device requests that reach
Docker, not a GPU. The host's GPUs are given as an inventory (or BATCHSCORE_GPUS), and
nvidia-smi is a small script on PATH where its answer matters.
"""

from __future__ import annotations

import json
import logging
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from docker.types import DeviceRequest, HostConfig

from batchscore.errors import BatchScoreError, GpuUnavailableError
from batchscore.gpus import GpuAssignment, gpu_inventory, lease_gpus, lock_path

POLL = 0.05
SLEEP = shutil.which("sleep")
HOST = socket.gethostname()

# A lease holder in a process of its own: leases, prints what it got as one JSON line, and
# holds the lease until a line arrives on its standard input (or it is killed).
HOLDER = textwrap.dedent(
    """
    import json, logging, sys
    from batchscore.gpus import lease_gpus
    args = json.loads(sys.argv[1])
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
    extra = {"inventory": args["inventory"]} if "inventory" in args else {}
    with lease_gpus(args["gpus"], args["share"], label=args["label"], lock_dir=args["lock_dir"],
                    poll_seconds=args["poll"], **extra) as lease:
        print(json.dumps({"device_ids": lease.device_ids, "count": lease.count}), flush=True)
        sys.stdin.readline()
    print("released", flush=True)
    """
)


class Holder:
    """One process holding (or waiting for) a lease."""

    def __init__(self, lock_dir: Path, gpus, *, label: str, share: bool = False, **extra):
        args = {"gpus": gpus, "share": share, "label": label, "lock_dir": str(lock_dir), "poll": POLL, **extra}
        self.label = label
        self.said = ""  # log lines read before release() (waits())
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, json.dumps(args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def leased(self, timeout: float = 10.0) -> dict | None:
        """What the lease gave, or None if it has not got one within ``timeout`` seconds."""
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                return None
        line = self.proc.stdout.readline()
        assert line, f"{self.label} ended without a lease:\n{self.proc.stderr.read()}"
        return json.loads(line)

    def waits(self, timeout: float = 60.0) -> str:
        """The holder's first log line, once it has one: it says it waits when every GPU it wants is held.

        Read byte by byte from the pipe (no buffer that release() would miss); ``timeout`` only
        bounds a holder that hangs, it is no race: the line comes whatever the load.
        """
        fd = self.proc.stderr.fileno()
        line = b""
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while not line.endswith(b"\n"):
                assert sel.select(timeout), f"{self.label} said nothing within {timeout} s"
                byte = os.read(fd, 1)
                assert byte, f"{self.label} ended before it said anything"
                line += byte
        self.said += line.decode()
        return line.decode().rstrip("\n")

    def release(self) -> str:
        """Let go of the lease; returns the holder's log."""
        out, err = self.proc.communicate("\n", timeout=10)
        assert self.proc.returncode == 0, err
        assert out.strip() == "released"
        return self.said + err

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            stream.close()


@pytest.fixture()
def holders():
    started: list[Holder] = []

    def start(*args, **kwargs) -> Holder:
        holder = Holder(*args, **kwargs)
        started.append(holder)
        return holder

    yield start
    for holder in started:
        holder.stop()


@pytest.fixture()
def lock_dir(tmp_path: Path) -> Path:
    return tmp_path / "locks"


class Records(logging.Handler):
    """A logger whose messages a test can read."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []
        self.logger = logging.getLogger(f"test-gpus-{id(self)}")
        self.logger.setLevel(logging.DEBUG)
        self.logger.propagate = False
        self.logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def gpu_request(**kwargs) -> list[DeviceRequest]:
    return [DeviceRequest(capabilities=[["gpu"]], **kwargs)]


def docker_json(assignment: GpuAssignment) -> list[dict]:
    """The DeviceRequests of the HostConfig the docker SDK sends to the engine."""
    return HostConfig(version="1.41", device_requests=assignment.device_requests).get("DeviceRequests", [])


# --- what reaches Docker -----------------------------------------------------------------


def test_no_gpus_means_no_requests_and_no_lock_folder(lock_dir):
    with lease_gpus(0, False, label="x", inventory=None, lock_dir=lock_dir) as lease:
        assert lease == GpuAssignment([], [], 0)
        assert docker_json(lease) == []
    assert not lock_dir.exists()


def test_shared_requests_are_what_docker_run_gpus_sends_and_take_no_lock(lock_dir):
    with lease_gpus(2, True, label="x", inventory=None, lock_dir=lock_dir) as lease:
        assert lease == GpuAssignment(gpu_request(count=2), None, 2)
        assert docker_json(lease) == [{"Driver": "", "Count": 2, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}]
    with lease_gpus("all", True, label="x", inventory=["0", "1", "2"], lock_dir=lock_dir) as lease:
        assert lease == GpuAssignment(gpu_request(count=-1), None, 3)
        assert docker_json(lease)[0]["Count"] == -1
    with lease_gpus("all", True, label="x", inventory=None, lock_dir=lock_dir) as lease:
        assert lease == GpuAssignment(gpu_request(count=-1), None, None)
    with lease_gpus(["1", "3"], True, label="x", lock_dir=lock_dir) as lease:
        assert lease == GpuAssignment(gpu_request(device_ids=["1", "3"]), ["1", "3"], 2)
    assert not lock_dir.exists()


def test_exclusive_lease_pins_the_container_with_device_ids(lock_dir):
    with lease_gpus(2, False, label="x", inventory=["0", "1", "2"], lock_dir=lock_dir) as lease:
        assert lease == GpuAssignment(gpu_request(device_ids=["0", "1"]), ["0", "1"], 2)
        assert docker_json(lease) == [
            {"Driver": "", "Count": 0, "DeviceIDs": ["0", "1"], "Capabilities": [["gpu"]], "Options": {}}
        ]
    with lease_gpus("all", False, label="x", inventory=["0", "1", "2"], lock_dir=lock_dir) as lease:
        assert lease.device_ids == ["0", "1", "2"] and lease.count == 3
    # Device ids need no inventory; repeated ids are one GPU.
    with lease_gpus(["GPU-8f3b", "GPU-8f3b", "3"], False, label="x", inventory=None, lock_dir=lock_dir) as lease:
        assert lease == GpuAssignment(gpu_request(device_ids=["GPU-8f3b", "3"]), ["GPU-8f3b", "3"], 2)


# --- leases exclude each other --------------------------------------------------------------


def test_lock_file_names_its_holder_while_held(lock_dir):
    with lease_gpus(["0"], False, label="iris-batch/iris-sklearn/mb-00003", lock_dir=lock_dir):
        note = json.loads(lock_path(lock_dir, "0").read_text())
        assert (note["pid"], note["host"], note["label"]) == (os.getpid(), HOST, "iris-batch/iris-sklearn/mb-00003")
    assert lock_path(lock_dir, "0").read_text() == ""


def test_lock_file_names_are_distinct_for_any_id(lock_dir):
    ids = ["0", "GPU-8f3b-11aa", "MIG-GPU-8f3b/1/0", "MIG-GPU-8f3b_2f1_2f0", "../x"]
    paths = [lock_path(lock_dir, i) for i in ids]
    assert len(set(paths)) == len(ids)
    assert all(p.parent == lock_dir and p.name.startswith("gpu-") for p in paths)
    assert paths[2].name == "gpu-MIG-GPU-8f3b_2f1_2f0.lock"


def test_two_leases_in_one_process_get_different_gpus(lock_dir):
    with lease_gpus(1, False, label="a", inventory=["0", "1"], lock_dir=lock_dir) as a:
        with lease_gpus(1, False, label="b", inventory=["0", "1"], lock_dir=lock_dir) as b:
            assert (a.device_ids, b.device_ids) == (["0"], ["1"])


def test_concurrent_processes_get_different_gpus_and_a_third_waits_for_one(lock_dir, holders):
    inventory = ["0", "1"]
    a = holders(lock_dir, 1, label="a", inventory=inventory)
    got_a = a.leased()
    b = holders(lock_dir, 1, label="b", inventory=inventory)
    got_b = b.leased()
    assert {got_a["device_ids"][0], got_b["device_ids"][0]} == {"0", "1"}
    assert got_a["count"] == got_b["count"] == 1

    c = holders(lock_dir, 1, label="c", inventory=inventory)
    assert c.waits().startswith("waiting for 1 free GPU(s) of 0, 1 for c: ")  # both are held: it waits, holding none
    assert c.leased(timeout=0) is None, "a third lease got a GPU while both were held"
    a.release()
    got_c = c.leased()
    assert got_c["device_ids"] == got_a["device_ids"]
    b.release()
    log = c.release()
    first = "0" if got_a["device_ids"] == ["0"] else "1"
    pid = {"0": a.proc.pid, "1": b.proc.pid}
    label = {"0": "a", "1": "b"}
    assert log.splitlines()[0] == (
        "waiting for 1 free GPU(s) of 0, 1 for c: "
        f"GPU 0 is held by pid {pid['0']} on {HOST} ({label['0']}); "
        f"GPU 1 is held by pid {pid['1']} on {HOST} ({label['1']})"
    )
    assert log.count("waiting for") == 1
    assert log.splitlines()[1].startswith(f"leased GPU(s) {first} for c after waiting ")


def test_device_id_leases_exclude_each_other_all_or_nothing(lock_dir, holders):
    a = holders(lock_dir, ["1"], label="a")
    assert a.leased()["device_ids"] == ["1"]
    both = holders(lock_dir, ["0", "1"], label="both")
    assert both.waits().startswith("waiting for GPUs 0, 1 for both: ")
    assert both.leased(timeout=0) is None
    # While "both" waits for GPU 1 it holds no GPU: GPU 0 is free for anyone.
    with lease_gpus(1, False, label="c", inventory=["0", "1"], lock_dir=lock_dir, poll_seconds=POLL) as c:
        assert c.device_ids == ["0"]
    a.release()
    assert both.leased()["device_ids"] == ["0", "1"]
    with pytest.raises(TimeoutError):
        wait_in_thread(["1"], lock_dir, seconds=0.5)
    both.release()


def test_shared_lease_takes_no_lock(lock_dir, holders):
    a = holders(lock_dir, ["0"], label="a")
    assert a.leased()["device_ids"] == ["0"]
    started = time.monotonic()
    with lease_gpus(["0"], True, label="shared", lock_dir=lock_dir, poll_seconds=POLL) as shared:
        assert shared.device_ids == ["0"]
    with lease_gpus("all", True, label="shared", inventory=["0"], lock_dir=lock_dir) as shared:
        assert shared.count == 1
    assert time.monotonic() - started < 0.5
    # ... and a shared lease does not keep an exclusive one waiting.
    s = holders(lock_dir, 1, label="s", share=True, inventory=["0", "1"])
    assert s.leased() == {"device_ids": None, "count": 1}
    a.release()
    with lease_gpus(["0"], False, label="b", lock_dir=lock_dir, poll_seconds=POLL) as b:
        assert b.device_ids == ["0"]
    s.release()
    assert sorted(p.name for p in lock_dir.iterdir()) == ["gpu-0.lock"]


def test_a_killed_holder_frees_its_gpus(lock_dir, holders):
    a = holders(lock_dir, "all", label="a", inventory=["0", "1"])
    assert a.leased()["device_ids"] == ["0", "1"]
    b = holders(lock_dir, 2, label="b", inventory=["0", "1"])
    assert b.waits().startswith("waiting for 2 free GPU(s) of 0, 1 for b: ")
    assert b.leased(timeout=0) is None
    a.kill()
    assert b.leased() == {"device_ids": ["0", "1"], "count": 2}
    b.release()


def test_lease_is_released_when_the_block_fails(lock_dir):
    with pytest.raises(RuntimeError, match="scoring failed"):
        with lease_gpus(["0"], False, label="a", lock_dir=lock_dir):
            raise RuntimeError("scoring failed")
    with lease_gpus(["0"], False, label="b", lock_dir=lock_dir, poll_seconds=POLL) as again:
        assert again.device_ids == ["0"]


def wait_in_thread(gpus, lock_dir: Path, *, seconds: float, log: logging.Logger | None = None) -> GpuAssignment:
    """Lease in a thread; TimeoutError if it has no lease after ``seconds`` (it is then left
    waiting, as a daemon thread, until what it waits for is released)."""
    got: list = []
    thread = threading.Thread(target=lambda: got.append(_lease_and_release(gpus, lock_dir, log)), daemon=True)
    thread.start()
    thread.join(seconds)
    if not got:
        raise TimeoutError
    return got[0]


def _lease_and_release(gpus, lock_dir, log):
    with lease_gpus(gpus, False, label="thread", lock_dir=lock_dir, poll_seconds=POLL, log=log) as lease:
        return lease


def test_waiting_is_logged_once_with_the_holder_then_the_lease(lock_dir, holders):
    a = holders(lock_dir, ["0", "1"], label="iris-batch/iris-sklearn/run-1/mb-00000")
    assert a.leased()["device_ids"] == ["0", "1"]
    records = Records()
    result: list[GpuAssignment] = []
    thread = threading.Thread(target=lambda: result.append(_lease_and_release(["1"], lock_dir, records.logger)))
    thread.start()
    time.sleep(0.6)  # a dozen polls
    assert not result
    assert records.messages == [
        f"waiting for GPU 1 for thread: GPU 1 is held by pid {a.proc.pid} on {HOST} (iris-batch/iris-sklearn/run-1/mb-00000)"
    ]
    a.release()
    thread.join(10)
    assert result and result[0].device_ids == ["1"]
    assert records.messages[1].startswith("leased GPU(s) 1 for thread after waiting ")
    assert records.messages[2:] == ["released GPU(s) 1 of thread"]


def test_a_long_wait_is_logged_again_at_the_interval(lock_dir, holders, monkeypatch):
    monkeypatch.setattr("batchscore.gpus.WAIT_LOG_INTERVAL_S", 0.3)
    a = holders(lock_dir, ["0"], label="a")
    assert a.leased()["device_ids"] == ["0"]
    records = Records()
    with pytest.raises(TimeoutError):
        wait_in_thread(["0"], lock_dir, seconds=1.0, log=records.logger)
    waiting = [m for m in records.messages if m.startswith("waiting for GPU 0 for thread")]
    assert 2 <= len(waiting) <= 5, records.messages
    assert "so far" not in waiting[0]
    assert all(re.search(r"for thread \(for \d+s so far\): GPU 0 is held by pid", m) for m in waiting[1:])
    a.release()


# --- errors ---------------------------------------------------------------------------------

UNKNOWN = (
    "resources.gpus: {gpus} asks for GPUs that no other container uses (resources.share_gpus is false), "
    "but batchscore cannot tell which GPUs this host has: neither BATCHSCORE_GPUS nor nvidia-smi lists "
    "them. Set BATCHSCORE_GPUS=0,1,... (this host's GPU indexes or UUIDs) in the Airflow worker's "
    "environment, install nvidia-smi there, or set resources.share_gpus: true to let containers share GPUs"
)


@pytest.mark.parametrize("gpus", [1, "all"])
def test_unknown_inventory_is_an_error_that_says_what_to_do(gpus, lock_dir):
    with pytest.raises(GpuUnavailableError) as caught:
        with lease_gpus(gpus, False, label="x", inventory=None, lock_dir=lock_dir):
            pass
    assert str(caught.value) == UNKNOWN.format(gpus=gpus)
    assert isinstance(caught.value, BatchScoreError)
    assert not lock_dir.exists()


def test_unknown_inventory_by_default_when_nothing_lists_gpus(lock_dir, monkeypatch, tmp_path):
    monkeypatch.delenv("BATCHSCORE_GPUS", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    with pytest.raises(GpuUnavailableError, match=r"^resources\.gpus: 2 asks for GPUs"):
        with lease_gpus(2, False, label="x", lock_dir=lock_dir):
            pass


def test_more_gpus_than_the_host_has_is_an_error(lock_dir):
    with pytest.raises(GpuUnavailableError) as caught:
        with lease_gpus(3, False, label="x", inventory=["0", "1"], lock_dir=lock_dir):
            pass
    assert str(caught.value) == (
        "resources.gpus: 3 asks for 3 GPUs per container, but this host has only 2 (0, 1); "
        "lower resources.gpus to at most 2, or correct BATCHSCORE_GPUS on the Airflow worker "
        "if it lists the wrong GPUs"
    )
    with pytest.raises(GpuUnavailableError) as caught:
        with lease_gpus(1, False, label="x", inventory=[], lock_dir=lock_dir):
            pass
    assert str(caught.value) == (
        "resources.gpus: 1 asks for 1 GPUs per container, but this host has none; "
        "lower resources.gpus to at most 0, or correct BATCHSCORE_GPUS on the Airflow worker "
        "if it lists the wrong GPUs"
    )
    with pytest.raises(GpuUnavailableError) as caught:
        with lease_gpus("all", False, label="x", inventory=[], lock_dir=lock_dir):
            pass
    assert str(caught.value) == (
        "resources.gpus: all asks for every GPU of this host, but it has none (the list of GPUs "
        "is empty); set resources.gpus: 0, or correct BATCHSCORE_GPUS on the Airflow worker if it "
        "lists the wrong GPUs"
    )


def test_lock_folder_that_cannot_be_used_is_an_error(tmp_path):
    folder = tmp_path / "locks"
    folder.write_text("a file, not a folder")
    with pytest.raises(GpuUnavailableError) as caught:
        with lease_gpus(["0"], False, label="x", lock_dir=folder):
            pass
    assert str(caught.value) == (
        f"cannot open the GPU lock file {folder}/gpu-0.lock: Not a directory; every Airflow worker of "
        f"this host must be able to write {folder} (or set BATCHSCORE_GPU_LOCK_DIR to a folder they share)"
    )


def test_default_lock_folder_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHSCORE_GPU_LOCK_DIR", str(tmp_path / "from-env"))
    with lease_gpus(["0"], False, label="x"):
        assert lock_path(tmp_path / "from-env", "0").is_file()
    assert (tmp_path / "from-env").stat().st_mode & 0o7777 == 0o1777


# --- the host's GPUs ------------------------------------------------------------------------


def fake_nvidia_smi(folder: Path, script: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    smi = folder / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + textwrap.dedent(script))
    smi.chmod(0o755)


@pytest.mark.parametrize(
    "value, expected",
    [("0,1", ["0", "1"]), (" 0 , 1 ,, 2 ", ["0", "1", "2"]), ("", []), (" ", []), ("GPU-aa,GPU-bb,GPU-aa", ["GPU-aa", "GPU-bb"])],
)
def test_inventory_from_batchscore_gpus_wins_over_nvidia_smi(value, expected, monkeypatch, tmp_path):
    fake_nvidia_smi(tmp_path / "bin", "echo 7\n")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setenv("BATCHSCORE_GPUS", value)
    assert gpu_inventory() == expected


def test_inventory_from_nvidia_smi(monkeypatch, tmp_path):
    fake_nvidia_smi(
        tmp_path / "bin",
        """
        [ "$1 $2" = "--query-gpu=index --format=csv,noheader" ] || { echo "bad arguments: $*" >&2; exit 2; }
        printf '0\\n1\\n2\\n3\\n'
    """,
    )
    monkeypatch.delenv("BATCHSCORE_GPUS", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert gpu_inventory() == ["0", "1", "2", "3"]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert gpu_inventory() is None


def test_failing_or_hanging_nvidia_smi_gives_none_and_a_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("BATCHSCORE_GPUS", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    fake_nvidia_smi(
        tmp_path / "bin",
        """
        echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver." >&2
        exit 9
    """,
    )
    with caplog.at_level(logging.WARNING, logger="batchscore.gpus"):
        assert gpu_inventory() is None
    assert caplog.messages == [
        f"{tmp_path}/bin/nvidia-smi failed (exit status 9: NVIDIA-SMI has failed because it couldn't "
        "communicate with the NVIDIA driver.); the GPUs of this host are unknown "
        "(set BATCHSCORE_GPUS=0,1,... to list them)"
    ]
    caplog.clear()
    fake_nvidia_smi(tmp_path / "bin", f"exec {SLEEP} 30\n")
    monkeypatch.setattr("batchscore.gpus.NVIDIA_SMI_TIMEOUT_S", 0.3)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="batchscore.gpus"):
        assert gpu_inventory() is None
    assert time.monotonic() - started < 5
    assert caplog.messages == [
        f"{tmp_path}/bin/nvidia-smi gave no answer in 0.3s; the GPUs of this host are unknown "
        "(set BATCHSCORE_GPUS=0,1,... to list them)"
    ]


def test_inventory_is_asked_only_when_a_lease_needs_it(monkeypatch, tmp_path, lock_dir):
    """Device ids and shared counts never run nvidia-smi; a count does, once."""
    calls = tmp_path / "calls"
    fake_nvidia_smi(tmp_path / "bin", f"echo run >> {calls}\nprintf '0\\n1\\n'\n")
    monkeypatch.delenv("BATCHSCORE_GPUS", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with lease_gpus(["1"], False, label="x", lock_dir=lock_dir), lease_gpus(1, True, label="y", lock_dir=lock_dir):
        pass
    assert not calls.exists()
    with lease_gpus(1, False, label="x", lock_dir=lock_dir, poll_seconds=POLL) as lease:
        assert lease.device_ids == ["0"]
    assert calls.read_text() == "run\n"


@pytest.mark.parametrize("bad", [-1, True, [], "some", ["0", ""][1:]])
def test_invalid_gpus_value_is_a_programming_error(bad, lock_dir):
    with pytest.raises(ValueError):
        with lease_gpus(bad, False, label="x", inventory=["0"], lock_dir=lock_dir):
            pass
