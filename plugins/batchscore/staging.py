"""Staging: a mini-batch's input objects copied from object storage into a local folder, where its container reads them.

A scoring container keeps ``network: none``: it never reads object storage itself. The score task
downloads the objects of its mini-batch (:func:`stage_files`) into a folder on the worker host, which
is mounted read-only as today, and removes it when the try ends. What is staged is exactly what the
plan listed: each object's version token is checked once its bytes are here; an object that changed
or was deleted since the plan is not staged but *refused* (``refused_type`` ``ObjectChanged``): that
item fails alone, saying so, and the rest of the mini-batch is scored.

A part of a large file (size mode) is staged with ranged reads only, never the whole object: into a
sparse file of the object's size that holds the bytes the part reads (the header and its byte range;
for Parquet, the magic, the footer and its row groups' column chunks), so the runtime reads it as it
reads a local file (:mod:`batchscore_runtime.slices`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from airflow.sdk import ObjectStoragePath

from batchscore import storage
from batchscore.errors import ObjectChangedError, StorageError
from batchscore_runtime.formats import FilePart, InputFile

log = logging.getLogger(__name__)

#: Objects downloaded at once by one score task (s3fs and botocore share one connection pool).
DEFAULT_THREADS = 8


def _changed(f: InputFile, exc: ObjectChangedError) -> InputFile:
    return dataclasses.replace(f, refused=f"input object {f.path}: {exc}", refused_type=InputFile.OBJECT_CHANGED)


def local_path(target: Path, rel: str, what: str = "input object") -> Path:
    """``target / rel`` for a key listed on object storage; a key that would lead out of ``target`` (``..``, an
    absolute or empty segment) is refused: nothing is ever written outside ``target``."""
    parts = rel.split("/")
    if not rel or any(p in ("..", ".", "") for p in parts) or "\0" in rel:
        raise StorageError(f"{what} {rel!r} has a key that is not a plain relative path; rename the object")
    return target.joinpath(*parts)


def _readable(target: Path) -> None:
    """Staged files readable by the scoring container's user, whatever this process's umask."""
    for path in [target, *target.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)


def _ranges(f: InputFile, obj: ObjectStoragePath, reader: Any) -> list[tuple[int, int]]:
    """The ``(start, end)`` byte ranges a part's reader needs of the whole object."""
    part = f.part
    assert part is not None
    if part.kind == FilePart.BYTES:
        return [(0, part.header_end), (part.start, part.end)]
    import pyarrow.parquet as pq

    size = part.file_size
    tail = reader(size - 8, 8)
    if len(tail) != 8 or tail[4:] != b"PAR1":
        raise StorageError(f"input object {f.path}: it is not a Parquet file any more (no PAR1 at its end)")
    (footer,) = struct.unpack("<i", tail[:4])
    with obj.fs.open(obj.path, "rb") as fh:  # reads the footer only, in ranges
        metadata = pq.ParquetFile(fh).metadata
    wanted = [(0, 4), (size - 8 - footer, size)]
    for g in range(part.start, part.end):
        group = metadata.row_group(g)
        for c in range(group.num_columns):
            column = group.column(c)
            start = column.data_page_offset
            if column.has_dictionary_page and column.dictionary_page_offset is not None:
                start = min(start, column.dictionary_page_offset)
            wanted.append((start, start + column.total_compressed_size))
    return wanted


def _stage_parts(obj: ObjectStoragePath, parts: list[InputFile], dest: Path) -> None:
    """A sparse file of the object's size with the ranges its ``parts`` read; the rest is never downloaded."""
    first = parts[0]
    assert first.part is not None

    def reader(start: int, length: int) -> bytes:
        return storage.read_range(obj, start, length)

    wanted = sorted({r for f in parts for r in _ranges(f, obj, reader) if r[1] > r[0]})
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.ftruncate(fd, first.part.file_size)
        for start, end in wanted:
            data = reader(start, end - start)
            if len(data) != end - start:
                raise ObjectChangedError(f"{storage.display(obj)} is shorter than when it was planned")
            os.pwrite(fd, data, start)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        storage.check_version(obj, first.version)  # the ranges read are of the planned version
        os.replace(tmp, dest)
    finally:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _stage_one(source: ObjectStoragePath, files: list[InputFile], target: Path, *, log_to: Any) -> list[InputFile]:
    """Stage one object for the entries of ``files`` (the whole file, or some of its parts); each comes back as
    it was, or refused when the object changed. Network failures are tried again (:func:`storage.retrying`)."""
    first = files[0]
    obj = source / first.path
    dest = local_path(target, first.path)
    try:
        if any(f.part is None for f in files):
            storage.retrying(lambda: storage.download(obj, dest, first.version, durable=False), f"staging {first.path}", log_to)
        else:
            storage.retrying(lambda: _stage_parts(obj, files, dest), f"staging {first.path}", log_to)
        os.utime(dest, ns=(first.mtime_ns, first.mtime_ns))
    except ObjectChangedError as exc:
        return [_changed(f, exc) for f in files]
    return files


def stage_files(
    source: ObjectStoragePath, files: Sequence[InputFile], target: Path, *, threads: int = DEFAULT_THREADS, log_to: Any = None
) -> list[InputFile]:
    """Download each planned object ``source / f.path`` into ``target / f.path``, checking the plan's version.

    :param source: the input prefix (``input.path`` with its connection).
    :param files: the mini-batch's files, as planned (parts of one object are staged once, together).
    :param target: the local folder; made when missing.
    :param threads: objects downloaded at once.
    :param log_to: where retries are logged (the task log).
    :return: ``files`` in their order, each as it was, or ``refused`` (``ObjectChanged``) when its object changed
        or was deleted since the plan. A refused link of the plan stays refused and is not read.
    :raises StorageError: the objects cannot be read (access denied, network down after the retries).
    """
    target.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[int]] = {}
    for i, f in enumerate(files):
        if f.refused is None:
            groups.setdefault(f.path, []).append(i)
    out = list(files)
    if not groups:
        return out
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(groups))), thread_name_prefix="stage") as pool:
        jobs = {
            path: pool.submit(_stage_one, source, [files[i] for i in where], target, log_to=log_to)
            for path, where in groups.items()
        }
        for path, job in jobs.items():
            for i, staged in zip(groups[path], job.result()):
                out[i] = staged
    _readable(target)
    return out


__all__ = ["DEFAULT_THREADS", "local_path", "stage_files"]
