"""Scoring code is untrusted: real DAG runs of a hostile script, in both worker modes.

The script does what issue 15 found possible on 95306f0, all at once: it leaves a process
behind that keeps forging every ``status.json`` it can reach so that ``outputs_dir`` points at
a host folder no container mounts (holding a root-only file); it writes custom outputs that
are links to host files, and a FIFO; it looks for other mini-batches' folders it could write;
and each mini-batch checks whether the process the previous one left is still alive. The
output must come out exact, with nothing of the host folder in the run folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from batchscore_runtime.formats import Summary, run_key
from tests.helpers import deployment_file, run_dag, write

pytestmark = pytest.mark.docker

SECRET = "TOP-SECRET-0f3a"

HOSTILE_SCRIPT = """
import glob, json, os, time
import pandas as pd

def _forge(secret_dir):
    # Outlives run(): rewrites every status file it can reach, for a minute.
    end = time.time() + 60
    while time.time() < end:
        for status in glob.glob("/mnt/batchscore/**/status.json", recursive=True):
            try:
                with open(status) as fh:
                    data = json.load(fh)
                data["outputs_dir"] = os.path.relpath(secret_dir, os.path.dirname(status))
                data["rows"] = 10 ** 6
                with open(status + ".tmp", "w") as fh:
                    json.dump(data, fh)
                os.replace(status + ".tmp", status)
            except Exception:
                pass
        time.sleep(0.02)

def run(mini_batch):
    secret_dir = os.environ["HOST_SECRET_DIR"]
    out = os.environ["AZUREML_BI_OUTPUT_PATH"]
    own = os.path.dirname(os.path.realpath(out))
    os.symlink(secret_dir + "/key.txt", os.path.join(out, "leak.txt"))
    os.symlink(secret_dir, os.path.join(out, "leakdir"))
    os.symlink("/etc/passwd", os.path.join(out, "passwd.txt"))
    os.mkfifo(os.path.join(out, "pipe"))
    name = os.path.basename(mini_batch[0])
    with open(os.path.join(out, "honest-" + name + ".txt"), "w") as fh:
        fh.write("ok")
    stray_alive = False
    try:
        with open("/tmp/stray.pid") as fh:
            os.kill(int(fh.read()), 0)
        stray_alive = True
    except Exception:
        pass
    others = [d for d in glob.glob("/mnt/batchscore/**/mb-*", recursive=True)
              if os.path.isdir(d) and os.access(d, os.W_OK) and not os.path.realpath(d).startswith(own)]
    pid = os.fork()
    if pid == 0:  # a daemon of its own: double fork, new session
        os.setsid()
        if os.fork() == 0:
            with open("/tmp/stray.pid", "w") as fh:
                fh.write(str(os.getpid()))
            _forge(secret_dir)
        os._exit(0)
    os.waitpid(pid, 0)
    time.sleep(0.3)  # the stray is at work before the mini-batch ends
    rows = [pd.read_csv(p).assign(file=os.path.basename(p)) for p in mini_batch]
    return pd.concat(rows, ignore_index=True).assign(stray_alive=stray_alive, other_writable=len(others))
"""


@pytest.mark.parametrize("worker_mode", ["warm", "per_mini_batch"])
def test_a_hostile_script_cannot_reach_the_host_nor_other_mini_batches(
    airflow_db, tmp_path: Path, monkeypatch, worker_mode: str
) -> None:
    secret_dir = tmp_path / "host-secret"  # on the host, mounted in no container
    write(secret_dir / "key.txt", SECRET)
    os.chmod(secret_dir / "key.txt", 0o600)
    write(tmp_path / "model" / "model.txt", "m")
    write(tmp_path / "code" / "score.py", HOSTILE_SCRIPT)
    for k in range(3):
        write(tmp_path / "in" / f"in-{k}.csv", f"id\n{k}\n")
    path = deployment_file(
        tmp_path / "deployments",
        model=tmp_path / "model",
        code=tmp_path / "code",
        inputs=tmp_path / "in",
        settings={
            "mini_batch_size": 1,
            "worker_mode": worker_mode,
            "max_concurrency_per_instance": 1,
            "environment_variables": {"HOST_SECRET_DIR": str(secret_dir)},
        },
        resources={"instance_count": 1},  # one worker: each mini-batch follows the one before it there
    )

    dag_run, endpoint = run_dag(path, monkeypatch)

    assert dag_run.state == "success"
    run_dir = endpoint.deployments[0].output.path / run_key(dag_run.run_id)
    predictions = pd.read_csv(run_dir / "predictions.csv")
    assert predictions[["file", "id"]].to_dict("records") == [{"file": f"in-{k}.csv", "id": k} for k in range(3)]
    assert not predictions["stray_alive"].any()  # no process of a mini-batch outlived it
    assert set(predictions["other_writable"]) == {0}  # no mini-batch could write another's folder
    # Nothing of the host folder reached the run folder: no link, no copy, no hard link.
    for p in run_dir.rglob("*"):
        assert not p.is_symlink(), p
        if p.is_file() and not p.name.startswith("output-try-"):  # the task's own log of the container's output
            assert SECRET.encode() not in p.read_bytes(), p
    assert (secret_dir / "key.txt").stat().st_nlink == 1
    # Only the honest custom outputs were placed: links and the FIFO were left out.
    placed = sorted(p.name for p in run_dir.iterdir() if p.is_file() and p.suffix == ".txt")
    assert placed == [f"honest-in-{k}.csv.txt" for k in range(3)]
    summary = Summary.read(run_dir / "summary.json")
    assert summary.custom_outputs.files == 3
    assert summary.rows == 3 and summary.mini_batches.succeeded == 3


LOUD_SCRIPT = """
import os, sys
import pandas as pd

LINES = 300_000

def run(mini_batch):
    line = "x" * 90
    for k in range(LINES):
        print(f"progress {k:07d} {line}")
    sys.stdout.flush()
    return pd.DataFrame({"file": [os.path.basename(p) for p in mini_batch]})
"""


@pytest.mark.parametrize("worker_mode", ["warm", "per_mini_batch"])
def test_a_script_that_prints_a_lot_keeps_every_line_in_a_file_and_the_task_log_short(
    airflow_db, tmp_path: Path, monkeypatch, capfd, worker_mode: str
) -> None:
    """About 30 MB of output: the task log gets a rate-limited part and says where the rest is."""
    write(tmp_path / "model" / "model.txt", "m")
    write(tmp_path / "code" / "score.py", LOUD_SCRIPT)
    write(tmp_path / "in" / "a.csv", "id\n1\n")
    path = deployment_file(
        tmp_path / "deployments",
        model=tmp_path / "model",
        code=tmp_path / "code",
        inputs=tmp_path / "in",
        # A generous run() limit: this checks where the lines go, not how fast (no race with the clock).
        settings={"worker_mode": worker_mode, "retry_settings": {"max_retries": 0, "timeout": 900}},
    )

    dag_run, endpoint = run_dag(path, monkeypatch)

    assert dag_run.state == "success"
    run_dir = endpoint.deployments[0].output.path / run_key(dag_run.run_id)
    full = run_dir / "_batchscore" / "results" / "mb-00000" / "output-try-1.log"
    progress = [line for line in full.read_text().splitlines() if "progress " in line]
    assert len(progress) == 300_000 and progress[-1].endswith(f"progress 0299999 {'x' * 90}")
    logged = capfd.readouterr().out
    assert sum("progress " in line for line in logged.splitlines()) < 300_000 // 10
    assert "line(s) of output left out of this log" in logged and f"every line is in {full}" in logged
