"""Worker processes inside the scoring container: parts, time limits, deaths, GPU pinning, progress.

Run in-process on real files and real (spawned) worker processes. No GPU exists here: the
pinning tests check the CUDA_VISIBLE_DEVICES each worker gets, not a GPU.
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchscore_runtime import workers
from batchscore_runtime.azure import main
from batchscore_runtime.formats import InputFile, MiniBatch, MiniBatchDir, write_json_atomic
from batchscore_runtime.workers import split_evenly, worker_gpus
from tests.helpers import write


@pytest.fixture()
def job(tmp_path: Path):
    """Five input files in one mini-batch, and a function that scores them with a given script."""
    inputs = tmp_path / "in"
    files = []
    for i in range(5):
        p = write(inputs / f"f{i}.csv", f"x\n{i}\n")
        files.append(InputFile(p.name, p.stat().st_size, p.stat().st_mtime_ns))
    mb_file = tmp_path / "mb.json"
    write_json_atomic(mb_file, MiniBatch(index=2, files=files).to_json())
    out = MiniBatchDir(tmp_path / "out", 2)

    def run(script: str, *options: str) -> tuple[int, MiniBatchDir]:
        path = write(tmp_path / "code" / "score.py", script)
        argv = ["--mini-batch", str(mb_file), "--input-root", str(inputs), "--scoring-script", str(path)]
        return main([*argv, "--output", str(out.path), *options]), out

    return run


def rows(out: MiniBatchDir) -> list[dict]:
    status = out.read_status()
    assert status is not None and status.succeeded, status
    return pq.read_table(out.result_path(status)).to_pylist()


@pytest.mark.parametrize(
    ("n", "parts", "expected"),
    [(5, 2, [3, 2]), (5, 5, [1] * 5), (2, 4, [1, 1]), (0, 3, [0]), (7, 3, [3, 2, 2])],
)
def test_files_are_shared_out_in_contiguous_parts(n: int, parts: int, expected: list[int]) -> None:
    split = split_evenly(list(range(n)), parts)
    assert [len(p) for p in split] == expected
    assert [i for p in split for i in p] == list(range(n))


@pytest.mark.parametrize(
    ("worker", "workers_", "gpus", "expected"),
    [
        (0, 1, 4, None),  # one worker sees every GPU of its container
        (0, 2, None, None),  # no GPUs
        (0, 2, 2, "0"),
        (1, 2, 2, "1"),
        (0, 2, 4, "0,1"),
        (1, 2, 4, "2,3"),
        (2, 3, 4, "2,3"),
        (3, 4, 2, "1"),  # more workers than GPUs (resources.share_gpus): they take turns
    ],
)
def test_each_worker_is_pinned_to_its_own_gpus(worker: int, workers_: int, gpus, expected) -> None:
    assert worker_gpus(worker, workers_, gpus) == expected


def test_each_worker_runs_its_own_init_and_results_keep_input_order(job) -> None:
    code, out = job(
        """
        import os, pandas as pd
        def init():
            global pid, gpu
            pid, gpu = os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES")
        def run(mini_batch):
            return pd.DataFrame({"file": [os.path.basename(p) for p in mini_batch], "pid": pid, "gpu": gpu})
        """,
        "--workers",
        "2",
        "--gpus",
        "2",
    )
    assert code == 0
    result = rows(out)
    assert [r["file"] for r in result] == [f"f{i}.csv" for i in range(5)]
    assert [r["gpu"] for r in result] == ["0", "0", "0", "1", "1"]
    pids = [r["pid"] for r in result]
    assert pids[0] == pids[2] != pids[3] == pids[4]
    assert out.read_status().workers == 2


def test_a_run_past_its_timeout_is_killed_and_fails_the_mini_batch(job) -> None:
    started = time.monotonic()
    code, out = job("import time\ndef run(mb):\n    time.sleep(120)\n", "--timeout", "1.5")
    assert code == 1 and time.monotonic() - started < 30
    error = out.read_status().error
    assert error.type == "MiniBatchTimeout"
    assert error.message.startswith(
        "run() of mb-00002 (worker 1/1, 5 files) did not finish within retry_settings.timeout = 1.5 s; "
        "the worker was killed after 1."
    )


def test_the_timeout_counts_run_only_not_init(job) -> None:
    code, out = job("import time\ndef init():\n    time.sleep(2)\ndef run(mb):\n    return mb\n", "--timeout", "1")
    assert code == 0 and out.read_status().init_seconds >= 2


def test_an_init_past_its_limit_is_killed(job) -> None:
    code, out = job("import time\ndef init():\n    time.sleep(120)\ndef run(mb):\n    return mb\n", "--init-timeout", "1")
    error = out.read_status().error
    assert code == 1 and error.type == "InitTimeout"
    assert "did not finish init() within settings.init_timeout = 1 s" in error.message


def test_one_failing_worker_fails_the_mini_batch_and_stops_the_others(job) -> None:
    script = """
        import time
        def run(mini_batch):
            if any(p.endswith("f4.csv") for p in mini_batch):
                raise ValueError("cannot score f4")
            time.sleep(120)
        """
    started = time.monotonic()
    code, out = job(script, "--workers", "2")
    assert code == 1 and time.monotonic() - started < 30
    assert out.read_status().error.one_line() == "ValueError: cannot score f4"


def test_a_worker_that_dies_is_reported(job) -> None:
    code, out = job("import os, signal\ndef run(mb):\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    assert code == 1
    assert out.read_status().error.one_line() == (
        "WorkerDied: worker 1/1 of mb-00002 was killed by signal 9 (SIGKILL: often the kernel's "
        "out-of-memory killer) during run()"
    )


def progress_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "files opened by run()" in r.getMessage()]


def test_progress_is_logged_while_run_reads_its_files(job, monkeypatch, caplog) -> None:
    monkeypatch.setattr(workers, "PROGRESS_EVERY_SECONDS", 0.2)
    script = """
        import time
        import pandas as pd
        def run(mini_batch):
            rows = []
            for p in mini_batch:
                rows.append(pd.read_csv(p))  # opened and closed at once: seen by the audit hook
                time.sleep(0.5)
            return pd.concat(rows)
        """
    with caplog.at_level("INFO", logger="batchscore"):
        code, _ = job(script)
    assert code == 0
    counts = [int(m.split(": ")[1].split(" of ")[0]) for m in progress_lines(caplog)]
    assert progress_lines(caplog)[0].startswith("mb-00002: ")
    assert counts == sorted(counts) and len(set(counts)) >= 3  # it moved while run() worked


def test_files_opened_from_c_are_seen_in_proc(job, monkeypatch, caplog) -> None:
    monkeypatch.setattr(workers, "PROGRESS_EVERY_SECONDS", 0.2)
    script = """
        import os, time
        def run(mini_batch):
            fds = []
            for p in mini_batch:
                fds.append(os.open(p, os.O_RDONLY))  # kept open, as a C reader keeps its file
                time.sleep(0.5)
            return mini_batch
        """
    with caplog.at_level("INFO", logger="batchscore"):
        code, _ = job(script)
    counts = [int(m.split(": ")[1].split(" of ")[0]) for m in progress_lines(caplog)]
    assert code == 0 and max(counts) >= 3


def test_a_generators_rows_are_counted_while_it_runs(job, monkeypatch, caplog) -> None:
    monkeypatch.setattr(workers, "PROGRESS_EVERY_SECONDS", 0.2)
    script = """
        import time
        import pandas as pd
        def run(mini_batch):
            for p in mini_batch:
                time.sleep(0.6)
                yield pd.DataFrame({"file": [p] * 3})
        """
    with caplog.at_level("INFO", logger="batchscore"):
        code, out = job(script)
    assert code == 0 and out.read_status().rows == 15
    rows = [m for m in progress_lines(caplog) if "rows so far" in m]
    assert rows, progress_lines(caplog)  # the worker reports its rows at most once a second
    assert " rows/s)" in rows[-1]
