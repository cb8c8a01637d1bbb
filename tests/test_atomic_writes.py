"""A merge killed half-way (SIGKILL, as the OOM killer or a lost node does) leaves no partial file.

The merge runs in a real subprocess on real parquet parts and is killed while it writes. Its
writes are slowed down (one sleep per record batch) only so the kill lands mid-write.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from batchscore.merge import merge_run
from batchscore.plan import plan_run, run_layout
from batchscore_runtime.formats import MiniBatchStatus, Summary, atomic_path
from tests.helpers import deployment_file, write

RUN = "manual__kill"

SLOW_MERGE = """
import sys, time
from batchscore import merge
from batchscore.spec import load_endpoint

original = merge._conform
def slow(batch, schema):
    time.sleep(0.05)
    return original(batch, schema)
merge._conform = slow
deployment = load_endpoint(sys.argv[1]).deployments[0]
merge.merge_run("ep", deployment, sys.argv[2])
"""


def commit(d, index: int, value: int) -> None:
    mb_dir = run_layout(d, RUN).mini_batch_dir(index)
    mb_dir.path.mkdir(parents=True, exist_ok=True)
    name = mb_dir.new_result_name()
    table = pa.table({"mb": [index] * 200_000, "value": [value] * 200_000})
    with atomic_path(mb_dir.path / name) as tmp:
        pq.write_table(table, tmp, row_group_size=1_000)  # many record batches to write
    mb_dir.commit(MiniBatchStatus(index=index, state="succeeded", files=2, rows=table.num_rows, result_file=name))


def kill_merge_mid_write(yaml_path: Path, root: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SLOW_MERGE), str(yaml_path), RUN])
    deadline = time.monotonic() + 60
    while not list(root.glob(".predictions.csv.*.tmp")):  # the output is being written
        assert proc.poll() is None and time.monotonic() < deadline, "the merge ended before it could be killed"
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_a_killed_merge_leaves_the_previous_output_whole_or_none_at_all(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    write(tmp_path / "code" / "score.py", "def run(mb):\n    return mb\n")
    for i in range(4):
        write(tmp_path / "in" / f"f{i}.csv", "x\n")
    yaml_path = deployment_file(
        tmp_path / "yaml",
        model=tmp_path / "model",
        code=tmp_path / "code",
        inputs=tmp_path / "in",
        settings={"mini_batch_size": 2},
    )
    from batchscore.spec import load_endpoint

    d = load_endpoint(yaml_path).deployments[0]
    plan_run("ep", d, RUN)
    commit(d, 0, 1)
    commit(d, 1, 1)
    root = run_layout(d, RUN).root

    kill_merge_mid_write(yaml_path, root)  # the first merge dies: nothing under the final names
    assert not (root / "predictions.csv").exists() and not (root / "summary.json").exists()

    merge_run("ep", d, RUN)  # a merge that completes
    complete = (root / "predictions.csv").read_bytes()
    summary = (root / "summary.json").read_text()

    commit(d, 0, 2)  # a rerun of mb-00000 changes its result; its merge is killed half-way
    kill_merge_mid_write(yaml_path, root)
    assert (root / "predictions.csv").read_bytes() == complete  # the old output, whole
    assert (root / "summary.json").read_text() == summary and json.loads(summary)["rows"] == 400_000

    assert list(root.glob(".*.tmp"))  # what the killed merge was writing...
    merge_run("ep", d, RUN)  # the merge run again converges
    assert not list(root.glob(".*.tmp"))  # ...is cleaned up by the next one
    assert (root / "predictions.csv").read_bytes() != complete
    assert Summary.read(root / "summary.json").rows == 400_000


def test_atomically_written_files_follow_the_umask_not_mkstemps_0600(tmp_path: Path) -> None:
    # Outputs on shared storage are read by the other hosts' workers (the merge) and by users.
    script = (
        "import os, sys\n"
        "os.umask(int(sys.argv[2], 8))\n"
        "from batchscore_runtime.formats import write_json_atomic\n"
        "write_json_atomic(__import__('pathlib').Path(sys.argv[1]), {'a': 1})\n"
    )
    modes = {}
    for umask in ("022", "077", "002"):
        target = tmp_path / f"summary-{umask}.json"
        subprocess.run([sys.executable, "-c", script, str(target), umask], check=True)
        modes[umask] = oct(target.stat().st_mode & 0o777)
    assert modes == {"022": "0o644", "077": "0o600", "002": "0o664"}
    with atomic_path(tmp_path / "x.parquet") as tmp:  # this process: its umask too
        assert tmp.stat().st_mode & 0o777 == 0o666 & ~_current_umask()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
