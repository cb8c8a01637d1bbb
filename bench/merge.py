"""Merge: rows per second of :func:`batchscore.merge.write_output` against pyarrow on its own,
and the merge's peak memory at 1M and at 10M rows.

The parts are what mini-batches commit: parquet files of about 100,000 rows, here with five
columns (an int64 id, three float64, a short string). The baseline reads the same parts with
``pq.ParquetFile(part).iter_batches()`` and writes them with pyarrow's ``CSVWriter`` (or
``ParquetWriter``) into one file: the least any merge into that format has to do. Runs
alternate between the two, and the median of each counts. Peak memory is the merge's high-water
mark (``VmHWM``) in a fresh Python process per size; the one after its imports is shown beside it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from batchscore.merge import write_output
from bench.common import Result, median, stopwatch, temp_folder

NAME = "merge"
TITLE = "merge rows/s against pyarrow alone; merge peak memory at 1M and 10M rows"
RATE_TARGET = 0.8
PEAK_TARGET = 1.5
FORMATS = (".csv", ".parquet")
SMALL = {"rows_small": 20_000, "rows_large": 100_000, "part_rows": 10_000, "repeats": 1}

#: Child process: the merge alone, and its memory high-water mark before and after.
_PEAK = """
import json, sys
from pathlib import Path
from batchscore.merge import write_output

def high_water_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

parts = sorted(Path(sys.argv[2]).glob("*.parquet"))[: int(sys.argv[3])]
imported = high_water_kib()
rows = write_output(Path(sys.argv[1]), parts)
print(json.dumps({"rows": rows, "imported_kib": imported, "peak_kib": high_water_kib()}))
"""


def write_parts(folder: Path, rows: int, part_rows: int, seed: int = 6) -> int:
    """``rows`` rows as parquet parts of ``part_rows`` rows each, in name order; returns the count."""
    rng = np.random.default_rng(seed)
    labels = np.array([f"label-{i:03d}" for i in range(500)], dtype=object)
    template = {
        "x1": rng.normal(size=part_rows),
        "x2": rng.uniform(size=part_rows),
        "x3": rng.exponential(size=part_rows),
        "label": pa.array(labels[rng.integers(0, len(labels), part_rows)], type=pa.string()),
    }
    count = -(-rows // part_rows)
    for k in range(count):
        n = min(part_rows, rows - k * part_rows)
        ids = np.arange(k * part_rows, k * part_rows + n, dtype=np.int64)
        part = pa.table({"id": ids, **{c: v[:n] for c, v in template.items()}})
        pq.write_table(part, folder / f"part-{k:05d}.parquet")
    return count


def direct(path: Path, parts: list[Path]) -> int:
    """The baseline: pyarrow reads every part batch by batch and writes one file; returns its rows."""
    schema = pq.read_schema(parts[0])
    writer = pacsv.CSVWriter(str(path), schema) if path.suffix == ".csv" else pq.ParquetWriter(str(path), schema)
    rows = 0
    with writer:
        for part in parts:
            for batch in pq.ParquetFile(part).iter_batches():
                writer.write(batch)
                rows += batch.num_rows
    return rows


def _rates(result: Result, root: Path, parts: list[Path], rows: int, suffix: str, repeats: int) -> None:
    """Merge and baseline into ``suffix`` alternately; record both rates and check their ratio."""
    fmt = suffix.lstrip(".")
    times: dict[str, list[float]] = {"merge": [], "direct": []}
    for _ in range(repeats):
        for name, write in (("merge", write_output), ("direct", direct)):
            out = root / f"{name}{suffix}"
            with stopwatch() as t:
                written = write(out, parts)
            out.unlink()
            if written != rows:
                raise RuntimeError(f"{name} wrote {written} rows of {rows}")
            times[name].append(t[0])
    merge_rate = rows / median(times["merge"])
    direct_rate = rows / median(times["direct"])
    result.figure(f"merge_{fmt}_rows_per_s", merge_rate, "rows/s", f"write_output -> {fmt}")
    result.figure(f"direct_{fmt}_rows_per_s", direct_rate, "rows/s", f"baseline: pyarrow alone -> {fmt}")
    result.check(f"merge / pyarrow rows/s, {fmt}, {rows:,} rows", merge_rate / direct_rate, ">=", RATE_TARGET)


def _peak_kib(root: Path, parts_dir: Path, count: int, suffix: str) -> dict:
    """The merge of the first ``count`` parts into ``suffix`` in a fresh process: rows and memory."""
    out = root / f"peak{suffix}"
    proc = subprocess.run([sys.executable, "-c", _PEAK, str(out), str(parts_dir), str(count)], capture_output=True, text=True)
    out.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise RuntimeError(f"merge child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _peaks(result: Result, root: Path, parts_dir: Path, sizes: dict[int, int], suffix: str) -> None:
    """Peak memory of the merge at each size (rows: parts); check the largest against the smallest."""
    fmt = suffix.lstrip(".")
    peaks = {}
    for rows, count in sizes.items():
        measured = _peak_kib(root, parts_dir, count, suffix)
        if measured["rows"] != rows:
            raise RuntimeError(f"the merge child wrote {measured['rows']} rows of {rows}")
        label = f"{rows / 1e6:g}M"
        imported, peaks[rows] = measured["imported_kib"] / 1024, measured["peak_kib"] / 1024
        result.figure(f"imported_{fmt}_{label}_mib", imported, "MiB", f"{fmt} {label} rows: memory after imports")
        result.figure(f"peak_{fmt}_{label}_mib", peaks[rows], "MiB", f"{fmt} {label} rows: peak memory of the merge")
    small, large = min(peaks), max(peaks)
    figure = f"peak({large / 1e6:g}M) / peak({small / 1e6:g}M), {fmt}"
    result.check(figure, peaks[large] / peaks[small], "<=", PEAK_TARGET)


def run(rows_small: int = 1_000_000, rows_large: int = 10_000_000, part_rows: int = 100_000, repeats: int = 3) -> Result:
    """Rates on ``rows_small`` rows (median of ``repeats``); peaks at ``rows_small`` and ``rows_large``."""
    result = Result(NAME, TITLE)
    with temp_folder(NAME) as root:
        parts_dir = root / "parts"
        parts_dir.mkdir()
        count = write_parts(parts_dir, rows_large, part_rows)
        parts = sorted(parts_dir.glob("*.parquet"))
        small = parts[: -(-rows_small // part_rows)]
        result.figure("part_rows", part_rows, "rows", "rows per part (id int64, 3 float64, a short string)")
        result.figure("parts", count, "", f"parts for {rows_large:,} rows")
        for suffix in FORMATS:
            _rates(result, root, small, rows_small, suffix, repeats)
        for suffix in FORMATS:
            _peaks(result, root, parts_dir, {rows_small: len(small), rows_large: count}, suffix)
    return result
