"""Intake of an attempt's result: the orchestrator checks what a container wrote, copies it and commits.

Scoring code is untrusted: a scoring script, a serving image, and the client that runs in a
user's image alike. Each container gets one writable folder for results, its *scratch folder*
(``_batchscore/scratch/``, see :mod:`batchscore_runtime.formats`), and no container ever mounts
a mini-batch's result folder. When the container's mini-batch ends, the orchestrator (often
root) takes its result in:

1. it reads the container's report (the ``status.json`` it wrote in its scratch folder) without
   following a link, and at most :data:`MAX_REPORT_BYTES`;
2. it checks every field against what it decided itself: the mini-batch's index and files
   (the plan), the try, the worker, the names of the result file and of the outputs folder,
   numbers in range, item errors that name planned files. A report that fails a check is
   rejected whole (:class:`ResultRejected`, naming the mini-batch and the field);
3. it copies the result file and the custom outputs into the mini-batch's result folder:
   regular files only, each opened with ``O_NOFOLLOW`` relative to a folder already opened the
   same way, so no symbolic link, hard-linked path, device, FIFO or path outside the scratch
   folder is ever followed. Links and other non-regular entries are left out and named in the
   task log. Bytes are copied (never linked), so nothing the container still holds open can
   change a committed file;
4. it commits a status it built itself, through :meth:`MiniBatchDir.commit` (the claim of the
   try still holds), and removes the scratch folder.

No Airflow import.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from batchscore.errors import ScoringError
from batchscore_runtime.formats import (
    ErrorInfo,
    ItemError,
    MiniBatchDir,
    MiniBatchStatus,
    mini_batch_id,
    now_iso,
    read_regular_file,
)

log = logging.getLogger(__name__)

#: The report is a few KiB; item errors of a large mini-batch make it larger, never this large.
MAX_REPORT_BYTES = 32 << 20
#: Custom outputs of one attempt: at most this many files, this deep.
MAX_OUTPUT_FILES = 100_000
MAX_OUTPUT_DEPTH = 32
#: Text fields of the report are cut to this length (the traceback to the longer one).
MAX_TEXT = 4096
MAX_TRACEBACK = 64 * 1024

_RESULT_NAME = re.compile(r"^result-[0-9a-f]{1,64}(-part[0-9]{1,4})?\.parquet$")
_OUTPUTS_NAME = re.compile(r"^outputs-[0-9a-f]{1,64}$")
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class ResultRejected(ScoringError):
    """What a container reported fails a check; nothing of it was committed.

    ``reason`` is the message without the mini-batch's name (for the failed status's error).
    """

    def __init__(self, expected: Expected, what: str):
        self.reason = f"the result of try {expected.attempt} is not accepted: {what}"
        super().__init__(f"{expected.id}: {self.reason}")


@dataclass(frozen=True)
class Expected:
    """What the orchestrator decided about one attempt, against which the container's report is checked.

    :param index: the mini-batch's index in the plan.
    :param files: the labels of its planned files, in order, one per file.
    :param aliases: other names an item error may give a planned file (its path, for a part of one).
    :param attempt: the Airflow try that ran the container.
    :param worker: the warm worker that scored it (``w1``); None for a container per mini-batch.
    :param result_file: whether a succeeded attempt must name a result file (``append_row`` of
        the Azure contract), must not (``summary_only``, the serving contract), or None: either.
    """

    index: int
    files: tuple[str, ...]
    attempt: int
    aliases: frozenset[str] = frozenset()
    worker: str | None = None
    result_file: bool | None = None

    @property
    def id(self) -> str:
        return mini_batch_id(self.index)


@dataclass
class Intake:
    """What one intake did besides the commit: entries it left out, and the bytes it copied."""

    status: MiniBatchStatus
    left_out: list[str]
    bytes_copied: int
    committed: bool  # False: a later try had claimed the mini-batch, and nothing was committed


def take_in(scratch_parent: Path, name: str, result_dir: MiniBatchDir, expected: Expected, *, log: Any = log) -> Intake | None:
    """Check, copy and commit the attempt whose container wrote into ``scratch_parent/name``.

    ``scratch_parent`` is a folder the orchestrator made and no container can replace (the
    run's scratch folder, or a warm worker's); ``name`` may be anything the container made of
    it. Returns None when the container left no report (it died first): the caller records
    why. Raises :class:`ResultRejected` when the report or its files fail a check.
    """
    try:
        top = _open_dir(str(scratch_parent), None)
    except FileNotFoundError:
        return None
    try:
        try:
            folder = _open_dir(name, top)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _rejected(expected, f"its scratch folder {name} is not a folder ({_kind_at(name, top) or _why(exc)})") from None
        try:
            return _take_in(folder, result_dir, expected, log)
        finally:
            os.close(folder)
    finally:
        os.close(top)


def remove_scratch(scratch_parent: Path, name: str) -> None:
    """Remove an attempt's scratch folder (``shutil.rmtree`` does not follow links on Linux)."""
    path = Path(scratch_parent) / name
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _take_in(folder: int, result_dir: MiniBatchDir, expected: Expected, log: Any) -> Intake | None:
    try:
        raw = read_regular_file(MiniBatchDir.STATUS, MAX_REPORT_BYTES, dir_fd=folder)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise _rejected(expected, f"its report {MiniBatchDir.STATUS} cannot be read ({_why(exc)})") from None
    report = _parse(raw, expected)
    left_out: list[str] = []
    copied = 0
    result_file = outputs_name = None
    custom = 0
    result_dir.path.mkdir(parents=True, exist_ok=True)
    if report.succeeded and report.result_file is not None:
        result_file = result_dir.new_result_name()
        try:
            copied += _copy_file(report.result_file, folder, result_dir.path / result_file)
        except (OSError, ValueError) as exc:
            raise _rejected(expected, f"its result file {report.result_file} cannot be taken ({_why(exc)})") from None
        _check_result_rows(result_dir.path / result_file, report, expected)
    if report.succeeded and report.outputs_dir is not None:
        outputs_name = f"outputs-{os.urandom(6).hex()}"
        try:
            custom, size = _copy_tree(report.outputs_dir, folder, result_dir.path / outputs_name, left_out)
        except (OSError, ValueError) as exc:
            _discard(result_dir, result_file, outputs_name)
            raise _rejected(expected, f"its outputs folder {report.outputs_dir} cannot be taken ({_why(exc)})") from None
        copied += size
        if not custom:
            shutil.rmtree(result_dir.path / outputs_name, ignore_errors=True)
            outputs_name = None
    for entry in left_out:
        log.warning("%s: custom output %s is left out: only regular files are taken from a scoring container", expected.id, entry)
    status = replace(
        report,
        index=expected.index,
        files=len(expected.files),
        attempt=expected.attempt,
        worker=expected.worker,
        result_file=result_file,
        outputs_dir=outputs_name,
        custom_outputs=custom,
    )
    committed = result_dir.commit(status)
    if not committed:
        _discard(result_dir, result_file, outputs_name)
    return Intake(status, left_out, copied, committed)


# --------------------------------------------------------------------------- the report


def _parse(raw: bytes, expected: Expected) -> MiniBatchStatus:
    """The container's report as a status, every field checked; raises ResultRejected."""
    import json

    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise _rejected(expected, f"its report is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise _rejected(expected, "its report is not a JSON object")
    try:
        report = MiniBatchStatus.from_json(data)
    except (TypeError, ValueError, KeyError) as exc:
        raise _rejected(expected, f"its report is not a mini-batch status ({exc})") from None
    files = len(expected.files)
    checks: list[tuple[str, bool]] = [
        ("index", _is_int(report.index) and report.index == expected.index),
        ("state", report.state in (MiniBatchStatus.SUCCEEDED, MiniBatchStatus.FAILED)),
        ("files", _is_int(report.files) and report.files == files),
        ("rows", _is_int(report.rows) and 0 <= report.rows <= 10**12),
        ("failed_items", _is_int(report.failed_items) and 0 <= report.failed_items <= files),
        ("workers", _is_int(report.workers) and 1 <= report.workers <= 100_000),
        ("init_seconds", _is_seconds(report.init_seconds)),
        ("run_seconds", _is_seconds(report.run_seconds)),
        ("item_errors", isinstance(report.item_errors, list) and len(report.item_errors) <= max(files, 1) * 2),
        (
            "result_file",
            report.result_file is None or (isinstance(report.result_file, str) and bool(_RESULT_NAME.match(report.result_file))),
        ),
        (
            "outputs_dir",
            report.outputs_dir is None or (isinstance(report.outputs_dir, str) and bool(_OUTPUTS_NAME.match(report.outputs_dir))),
        ),
    ]
    for key, ok in checks:
        if not ok:
            raise _rejected(
                expected, f"its report's {key} is {_show(getattr(report, key))}, which is not possible for this mini-batch"
            )
    if report.succeeded and expected.result_file is True and report.result_file is None:
        raise _rejected(expected, "its report says succeeded but names no result file")
    if expected.result_file is False and report.result_file is not None:
        raise _rejected(expected, f"its report names a result file ({report.result_file}) although this deployment writes none")
    planned = set(expected.files) | expected.aliases
    item_errors = []
    for item in report.item_errors:
        if item.file is not None and (not isinstance(item.file, str) or item.file not in planned):
            raise _rejected(
                expected, f"its report has an item error for {_show(item.file)}, which is not a file of this mini-batch"
            )
        if item.record is not None and not (_is_int(item.record) and item.record >= 0):
            raise _rejected(expected, f"its report has an item error with record {_show(item.record)}")
        item_errors.append(ItemError(item.file, _text(item.type, 200), _text(item.message, MAX_TEXT), item.record))
    error = report.error
    if error is not None:
        error = ErrorInfo(
            type=_text(error.type, 200),
            message=_text(error.message, MAX_TEXT),
            traceback=_text(error.traceback, MAX_TRACEBACK),
            file=error.file if isinstance(error.file, str) and error.file in planned else None,
        )
    elif not report.succeeded:
        error = ErrorInfo("Failed", "the container reported a failure without saying why")
    return replace(
        report,
        error=error,
        item_errors=item_errors,
        init_seconds=float(report.init_seconds),
        run_seconds=float(report.run_seconds),
        started_at=_timestamp(report.started_at),
        finished_at=_timestamp(report.finished_at),
    )


def _check_result_rows(path: Path, report: MiniBatchStatus, expected: Expected) -> None:
    """The copied result file must be a Parquet file with as many rows as the report says."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_metadata(path).num_rows
    except (pa.ArrowException, OSError) as exc:
        path.unlink(missing_ok=True)
        raise _rejected(expected, f"its result file is not a readable Parquet file ({exc})") from None
    if rows != report.rows:
        path.unlink(missing_ok=True)
        raise _rejected(expected, f"its result file has {rows} rows but its report says {report.rows}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_seconds(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 10**9


def _text(value: Any, limit: int) -> str:
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more characters)"


def _timestamp(value: Any) -> str:
    """An ISO timestamp as the container gave it, or the orchestrator's now for anything else."""
    if isinstance(value, str) and len(value) <= 64:
        try:
            datetime.fromisoformat(value)
            return value
        except ValueError:
            pass
    return now_iso()


def _show(value: Any) -> str:
    return _text(repr(value), 200)


def _rejected(expected: Expected, what: str) -> ResultRejected:
    return ResultRejected(expected, what)


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
        return "it is a symbolic link"
    if isinstance(exc, OSError) and exc.errno == errno.ENOTDIR:
        return "it is not a folder"
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


# --------------------------------------------------------------------------- files, without following links


def _open_dir(name: str, dir_fd: int | None) -> int:
    return os.open(name, _O_DIR, dir_fd=dir_fd)


@contextmanager
def _opened_file(name: str, dir_fd: int) -> Iterator[tuple[int, os.stat_result]]:
    """A regular file ``name`` in the folder ``dir_fd``, never through a link; ValueError for anything else."""
    fd = os.open(name, _O_FILE, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("it is not a regular file")
        yield fd, st
    finally:
        os.close(fd)


def _copy_file(name: str, dir_fd: int, dest: Path) -> int:
    """Copy the regular file ``name`` to ``dest`` (a new file of the orchestrator's); returns its size.

    Only the bytes the file had when it was opened are copied: a file that keeps growing
    cannot keep the orchestrator copying.
    """
    with _opened_file(name, dir_fd) as (fd, st):
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        try:
            left = st.st_size
            while left > 0:
                try:
                    sent = os.copy_file_range(fd, out, left)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    sent = _copy_by_read(fd, out, left)
                if sent == 0:
                    break
                left -= sent
        except BaseException:
            os.close(out)
            dest.unlink(missing_ok=True)
            raise
        os.close(out)
        return st.st_size - left


def _copy_by_read(src: int, dst: int, left: int) -> int:
    chunk = os.read(src, min(left, 1 << 20))
    view = memoryview(chunk)
    while view:
        view = view[os.write(dst, view) :]
    return len(chunk)


def _copy_tree(name: str, dir_fd: int, dest: Path, left_out: list[str]) -> tuple[int, int]:
    """Copy the regular files under folder ``name`` to ``dest``; returns (files, bytes).

    Entries that are not regular files or folders (links above all) are named in ``left_out``.
    """
    counts = [0, 0]

    def walk(fd: int, target: Path, rel: str, depth: int) -> None:
        if depth > MAX_OUTPUT_DEPTH:
            raise ValueError(f"folders deeper than {MAX_OUTPUT_DEPTH} levels ({rel})")
        target.mkdir(parents=True, exist_ok=True)
        for entry in sorted(os.listdir(fd)):
            path = f"{rel}/{entry}" if rel else entry
            try:
                st = os.stat(entry, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                try:
                    sub = _open_dir(entry, fd)
                except OSError:
                    left_out.append(f"{path}/ (it changed while it was read)")
                    continue
                try:
                    walk(sub, target / entry, path, depth + 1)
                finally:
                    os.close(sub)
            elif stat.S_ISREG(st.st_mode):
                if counts[0] >= MAX_OUTPUT_FILES:
                    raise ValueError(f"more than {MAX_OUTPUT_FILES} files")
                try:
                    counts[1] += _copy_file(entry, fd, target / entry)
                except (OSError, ValueError) as exc:
                    left_out.append(f"{path} ({_why(exc)})")
                    continue
                counts[0] += 1
            else:
                left_out.append(f"{path} ({_kind(st.st_mode)})")

    top = _open_dir(name, dir_fd)
    try:
        walk(top, dest, "", 0)
    finally:
        os.close(top)
    return counts[0], counts[1]


def _kind_at(name: str, dir_fd: int) -> str:
    """What ``name`` in folder ``dir_fd`` is, without following it ('' when it cannot be told)."""
    try:
        return _kind(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return ""


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _discard(result_dir: MiniBatchDir, result_file: str | None, outputs_name: str | None) -> None:
    if result_file:
        (result_dir.path / result_file).unlink(missing_ok=True)
    if outputs_name:
        shutil.rmtree(result_dir.path / outputs_name, ignore_errors=True)


__all__ = ["Expected", "Intake", "ResultRejected", "remove_scratch", "take_in"]
