"""Intake: what checking and copying a container's result costs, against a plain copy of the same files.

Since issue 15 a container writes into a scratch folder and the orchestrator takes the result
in (:func:`batchscore.intake.take_in`): it reads the report without following links, checks
it, copies the result file and every custom output with ``O_NOFOLLOW`` opens, reads the
Parquet footer, and commits. The baseline is ``shutil.copy2`` of the same files into a fresh
folder: the least any copy-in has to do. Runs alternate between the two; the medians count.

The warm worker's sweep (:class:`batchscore_runtime.processes.Sweeper`) runs after every
mini-batch: its time is measured here on this process's tree with a few children alive.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batchscore.intake import Expected, take_in
from batchscore_runtime.formats import MiniBatchDir, MiniBatchStatus
from batchscore_runtime.processes import Sweeper
from bench.common import Result, median, stopwatch, temp_folder

NAME = "intake"
TITLE = "intake of a mini-batch's result (check + copy) against a plain copy; the warm worker's sweep"
TARGET = 1.5  # intake / plain copy
SMALL = {"rows": 10_000, "outputs": 10, "repeats": 3}


def _scratch(root: Path, rows: int, outputs: int) -> tuple[Path, list[Path]]:
    """A scratch folder as the runtime leaves it: a result of ``rows`` rows, ``outputs`` custom outputs of 64 KiB."""
    folder = root / "scratch" / "mb-00000.try-1"
    (folder / "outputs-00aa").mkdir(parents=True)
    rng = np.random.default_rng(15)
    pq.write_table(
        pa.table({"id": np.arange(rows), "x": rng.normal(size=rows), "y": rng.uniform(size=rows)}), folder / "result-00aa.parquet"
    )
    blob = rng.bytes(64 * 1024)
    for k in range(outputs):
        (folder / "outputs-00aa" / f"scored-{k:04d}.csv").write_bytes(blob)
    report = MiniBatchStatus(
        index=0,
        state="succeeded",
        files=outputs,
        rows=rows,
        result_file="result-00aa.parquet",
        outputs_dir="outputs-00aa",
        custom_outputs=outputs,
    )
    (folder / "status.json").write_text(json.dumps(report.to_json()))
    return folder, [p for p in folder.rglob("*") if p.is_file()]


def run(rows: int = 1_000_000, outputs: int = 100, repeats: int = 7) -> Result:
    result = Result(NAME, TITLE)
    expected = Expected(index=0, files=tuple(f"in-{k}.csv" for k in range(outputs)), attempt=1, result_file=True)
    intake_times, copy_times = [], []
    with temp_folder(NAME) as root:
        folder, files = _scratch(root, rows, outputs)
        size = sum(p.stat().st_size for p in files)
        result.figure("bytes", size / 1e6, "MB", f"a result of {rows:,} rows and {outputs} custom outputs of 64 KiB")
        for k in range(repeats):
            target = MiniBatchDir(root / f"results-{k}" / "mb-00000", 0)
            with stopwatch() as t:
                intake = take_in(folder.parent, folder.name, target, expected)
            assert intake is not None and intake.committed and intake.status.custom_outputs == outputs
            intake_times.append(t[0])
            plain = root / f"plain-{k}"
            with stopwatch() as t:
                for p in files:
                    dest = plain / p.relative_to(folder)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(p, dest)
            copy_times.append(t[0])
    t_intake, t_copy = median(intake_times), median(copy_times)
    result.figure("intake_s", t_intake, "s", "take_in: read and check the report, copy, read the Parquet footer, commit")
    result.figure("copy_s", t_copy, "s", "shutil.copy2 of the same files")
    result.check("intake / plain copy", t_intake / t_copy, "<=", TARGET)

    children = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(3)]
    try:
        sweeper = Sweeper("bench")
        sweeper.settle()  # the children are this process's own: the sweep keeps them and only looks
        sweeps = []
        for _ in range(repeats):
            with stopwatch() as t:
                killed = sweeper.sweep("mb-00000")
            assert killed == []
            sweeps.append(t[0])
        result.figure("sweep_ms", median(sweeps) * 1000, "ms", "one sweep after a mini-batch (3 live children, none killed)")
    finally:
        for child in children:
            child.kill()
            child.wait()
    return result
