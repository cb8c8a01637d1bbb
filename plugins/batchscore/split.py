"""Cutting large input files into parts, so that size-mode mini-batches stay near their size.

In size mode (``mini_batch_size: "64MB"``) a file bigger than the size would be a mini-batch
of its own, and the slowest mini-batch would be as slow as the biggest file. With
``settings.split_large_files`` (the default) every such file bigger than half the size is cut
into about equal parts of at most half the size (:func:`part_size`), each scored as a file
(see :mod:`batchscore_runtime.slices`):

* CSV: byte ranges that end at a record boundary: a newline outside quotes (RFC 4180 quoting:
  a line break inside a quoted field never ends a part); every part gets the header line;
* JSON Lines: byte ranges that end at a newline;
* Parquet: runs of whole row groups (a file with one row group is not cut).

The parts of a file are consecutive in the plan, so results come back in input order. Other
formats are never cut. Finding CSV boundaries reads the file once (quotes are counted, at C
speed, with ``bytes.count``); nothing else is read. A symbolic link is read at the target the
plan checked (inside the input folder), never through the link; a refused link is not read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Union

from batchscore.partition import partition_by_size
from batchscore_runtime.formats import FilePart, InputFile

log = logging.getLogger(__name__)

#: Opens a planned file for reading, for files that are not on this host's disk (object storage): a seekable
#: binary file whose reads are ranged requests. ``None``: the file at ``root / (target or path)``.
Opener = Callable[[InputFile], IO[bytes]]
Source = Union[Path, IO[bytes]]  # noqa: UP007


@contextlib.contextmanager
def _opened(source: Source) -> Iterator[IO[bytes]]:
    if isinstance(source, Path):
        with open(source, "rb") as fh:
            yield fh
    else:
        source.seek(0)
        yield source


READ_CHUNK = 1 << 22
SPLITTABLE = {".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet"}


def record_boundaries(path: Source, wanted: list[int], quoted: bool) -> list[int]:
    """For each offset in ``wanted`` (ascending), the first record boundary at or after it.

    A boundary is the offset just after a newline that is outside quotes (``quoted``: CSV; a
    quote toggles the state, so an escaped ``""`` leaves it as it was). Offsets passed over by
    a long record give no boundary of their own; none at the end of the file is returned.
    """
    cuts: list[int] = []
    inside = False
    searching = False
    wi, pos = 0, 0
    with _opened(path) as fh:
        while wi < len(wanted):
            chunk = fh.read(READ_CHUNK)
            if not chunk:
                break
            i, n = 0, len(chunk)
            while wi < len(wanted):
                if not searching:
                    w = wanted[wi] - pos
                    if w >= n:
                        break  # the next wanted offset is in a later chunk
                    w = max(w, i)
                    if quoted:
                        inside ^= bool(chunk.count(b'"', i, w) & 1)
                    i, searching = w, True
                nl = chunk.find(b"\n", i)
                if nl < 0:
                    break
                if quoted:
                    inside ^= bool(chunk.count(b'"', i, nl) & 1)
                i = nl + 1
                if not inside:
                    cut = pos + i
                    cuts.append(cut)
                    searching = False
                    while wi < len(wanted) and wanted[wi] < cut:
                        wi += 1
            if quoted and i < n:
                inside ^= bool(chunk.count(b'"', i) & 1)
            pos += n
    return cuts


def _text_parts(f: InputFile, path: Source, target: int, csv: bool) -> list[InputFile]:
    header_end = 0
    if csv:
        found = record_boundaries(path, [0], quoted=True)
        if not found:
            return [f]  # one record: nothing to cut
        header_end = found[0]
    body = f.size - header_end
    count = -(-body // target)
    if count < 2:
        return [f]
    wanted = [header_end + body * k // count for k in range(1, count)]
    # Ascending and distinct, all after header_end (the wanted offsets are); none at the end.
    cuts = [c for c in record_boundaries(path, wanted, quoted=csv) if c < f.size]
    bounds = [header_end, *cuts, f.size]
    if len(bounds) < 3:
        return [f]
    n = len(bounds) - 1
    return [
        dataclasses.replace(f, size=header_end + end - start, part=FilePart(k, n, FilePart.BYTES, start, end, header_end, f.size))
        for k, (start, end) in enumerate(zip(bounds, bounds[1:]))
    ]


def _parquet_parts(f: InputFile, path: Source, target: int) -> list[InputFile]:
    import pyarrow.parquet as pq

    try:
        with _opened(path) as fh:
            metadata = pq.ParquetFile(fh).metadata
    except Exception as exc:  # noqa: BLE001 - pyarrow's errors vary; the scoring script will meet it too
        log.warning("Not cutting %s: its Parquet metadata cannot be read (%s)", f.path, exc)
        return [f]
    sizes = [
        sum(metadata.row_group(g).column(c).total_compressed_size for c in range(metadata.num_columns))
        for g in range(metadata.num_row_groups)
    ]
    if len(sizes) < 2:
        return [f]
    groups = partition_by_size([InputFile(str(g), s, 0) for g, s in enumerate(sizes)], target, len(sizes))
    if len(groups) < 2:
        return [f]
    out, first = [], 0
    for k, group in enumerate(groups):
        last = first + len(group.files)
        size = sum(sizes[first:last])
        out.append(dataclasses.replace(f, size=size, part=FilePart(k, len(groups), FilePart.ROW_GROUPS, first, last, 0, f.size)))
        first = last
    return out


def part_size(target: int) -> int:
    """The size above which a file is cut, and the largest part: half a mini-batch.

    Parts of at most half a mini-batch let the planner fill mini-batches evenly: with parts of
    a whole mini-batch's size, two of them rarely fit in one, and the mean falls while the
    heaviest stays (``bench/skew.py`` measures both).
    """
    return max(1, target // 2)


def split_large_files(files: list[InputFile], root: Path | None, size: int, *, opener: Opener | None = None) -> list[InputFile]:
    """``files`` with each CSV, JSON Lines or Parquet file bigger than ``size`` bytes cut into
    about equal parts of at most ``size`` bytes (as far as records and row groups allow).

    A symbolic link is read at its planned ``target`` (a regular file inside ``root``, found by
    the plan) and its parts keep the link's name; a refused link is never read nor cut. With
    ``opener`` (object storage), each file is read through it instead: ranged reads, where
    Parquet needs only its footer.
    """
    out: list[InputFile] = []
    for f in files:
        kind = SPLITTABLE.get(Path(f.path).suffix.lower())
        if kind is None or f.size <= size or f.refused is not None:
            out.append(f)
            continue
        t0 = time.monotonic()
        with contextlib.ExitStack() as stack:
            if opener is not None:
                path: Any = stack.enter_context(opener(f))
            else:
                assert root is not None, "a local input folder or an opener"
                path = root / (f.target or f.path)
            if kind == "parquet":
                parts = _parquet_parts(f, path, size)
            else:
                parts = _text_parts(f, path, size, csv=kind == "csv")
        if len(parts) > 1:
            log.info("Cut %s (%d bytes) into %d parts in %.2f s", f.path, f.size, len(parts), time.monotonic() - t0)
        out.extend(parts)
    return out
