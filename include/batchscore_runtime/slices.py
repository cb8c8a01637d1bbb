"""Parts of large input files, written as files of their own for the scoring script.

The plan may cut a large CSV, JSON Lines or Parquet file into parts (see
:class:`batchscore_runtime.formats.FilePart`). A scoring script still receives file paths, so
the runtime writes each part of its mini-batch as a file named like the original
(``big.part-0002-of-0005.csv``): a CSV part starts with the file's header, a Parquet part holds
its row groups. A symbolic link of the input folder is likewise handed over under its own
name, as a link to the target the runtime checked. The files live in the mini-batch's result
folder for the attempt and are removed when it ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from batchscore_runtime.formats import FilePart, InputFile, MiniBatch

log = logging.getLogger("batchscore")

COPY_CHUNK = 1 << 20


def part_name(f: InputFile) -> str:
    """The file name a part is given: ``big.part-0002-of-0005.csv`` for part 2 of 5 of ``big.csv``."""
    assert f.part is not None
    name = PurePosixPath(f.path)
    return f"{name.stem}.part-{f.part.index + 1:04d}-of-{f.part.count:04d}{name.suffix}"


def write_part(f: InputFile, source: Path, target: Path) -> None:
    """Write part ``f.part`` of ``source`` to ``target``."""
    part = f.part
    assert part is not None
    if part.kind == FilePart.ROW_GROUPS:
        import pyarrow.parquet as pq

        table = pq.ParquetFile(source).read_row_groups(list(range(part.start, part.end)))
        pq.write_table(table, target)
        return
    with open(source, "rb") as src, open(target, "wb") as dst:
        if part.header_end:
            dst.write(src.read(part.header_end))
        src.seek(part.start)
        left = part.end - part.start
        while left > 0:
            chunk = src.read(min(COPY_CHUNK, left))
            if not chunk:
                raise ValueError(f"{f.path} is shorter than planned: part {part.index + 1} ends at byte {part.end}")
            dst.write(chunk)
            left -= len(chunk)


@contextlib.contextmanager
def sliced_inputs(mini_batch: MiniBatch, paths: list[str], work: Path) -> Iterator[list[str]]:
    """The paths to hand the scoring script: ``paths``, with each part written out as a file,
    and each symbolic link (read at its checked target, ``paths``) under the link's own name.

    A link is given to the script as a link of the same relative path and name in a fresh
    folder under ``work``, leading to the target that :func:`batchscore_runtime.azure.resolve_inputs`
    checked, so results that name their file name the link as the user sees it. Part files
    go into the same folder; it is removed when the block ends.
    """
    if not any(f.part or f.target for f in mini_batch.files):
        yield paths
        return
    folder = work / f"parts-{os.urandom(6).hex()}"
    t0 = time.monotonic()
    out: list[str] = []
    try:
        for f, path in zip(mini_batch.files, paths):
            if f.part is None and f.target is None:
                out.append(path)
                continue
            if f.part is None:
                named = folder / f.path
                named.parent.mkdir(parents=True, exist_ok=True)
                named.symlink_to(path)
                out.append(str(named))
                continue
            target = folder / PurePosixPath(f.path).parent / part_name(f)
            target.parent.mkdir(parents=True, exist_ok=True)
            write_part(f, Path(path), target)
            out.append(str(target))
        if any(f.part for f in mini_batch.files):
            log.info(
                "%s: wrote %d part(s) of large files in %.2f s",
                mini_batch.id,
                sum(1 for f in mini_batch.files if f.part),
                time.monotonic() - t0,
            )
        yield out
    finally:
        shutil.rmtree(folder, ignore_errors=True)
