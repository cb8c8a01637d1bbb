"""plan: list a run's input files, cut them into mini-batches, persist the plan in the run directory.

The plan is written once per run and then reused: a retried or re-run mini-batch, or a rerun
of the plan task itself, sees exactly the files the first plan saw, even if the input folder
changed since. ``plan.json`` is written last, so its presence means the plan is complete.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchscore.errors import PlanError
from batchscore.partition import partition, partition_by_size
from batchscore.spec.deployment import DeploymentSpec
from batchscore.split import Opener, part_size, split_large_files
from batchscore_runtime.formats import (
    InputFile,
    Plan,
    PlanEntry,
    RunLayout,
    now_iso,
    run_key,
    write_json_atomic,
)

log = logging.getLogger(__name__)


def run_layout(deployment: DeploymentSpec, run_id: str) -> RunLayout:
    """The run directory of ``run_id``: ``<output.path>/<run key>/`` (on object storage: its mirror on this host,
    in the deployment :func:`batchscore.run_store.place` gives)."""
    return RunLayout(deployment.output_spec.local / run_key(run_id))


@dataclass(frozen=True)
class InputSource:
    """Where a plan's files come from: this host's input folder (:meth:`local`), or a prefix on object storage
    (:func:`batchscore.object_input.source`).

    :param where: the input for messages (a path, or a URI with its connection).
    :param list_files: the matched files, in plan order.
    :param root: the local folder a large file is read from to be cut; ``None`` on object storage.
    :param opener: on object storage, opens a file for ranged reads (to cut it).
    :param recorded: what the plan (and the summary) record as the input: the URI; default ``where``.
    """

    where: str
    list_files: Callable[[], list[InputFile]]
    root: Path | None = None
    opener: Opener | None = None
    recorded: str | None = None

    @classmethod
    def local(cls, deployment: DeploymentSpec) -> InputSource:
        return cls(str(deployment.input_spec.path), lambda: list_input_files(deployment), root=deployment.input_spec.local)


def pattern_matcher(pattern: str) -> Callable[[str], bool]:
    """Whether a ``/``-separated relative name matches ``pattern`` as the local walk matches it: each segment a
    glob within one folder, ``**`` any number of folders (none included), hidden names never."""
    segments = [s for s in pattern.split("/") if s not in ("", ".")]
    matchers = [None if s == "**" else re.compile(fnmatch.translate(s)).match for s in segments]

    def match(parts: list[str], i: int) -> bool:
        if i == len(matchers):
            return not parts
        m = matchers[i]
        if m is None:  # **: this many folders, then the rest of the pattern
            return any(match(parts[k:], i + 1) for k in range(len(parts)))
        return bool(parts) and m(parts[0]) is not None and match(parts[1:], i + 1)

    def matches(name: str) -> bool:
        parts = name.split("/")
        return not any(p.startswith(".") or not p for p in parts) and match(parts, 0)

    return matches


_DIGITS = re.compile(r"(\d+)")


def _natural_key(rel: str) -> list:
    """Sort key that puts ``file-2`` before ``file-10``; ties broken by the plain string."""
    return [int(t) if t.isdigit() else t for t in _DIGITS.split(rel)] + [rel]


def _candidates(root: Path, pattern: str) -> Iterator[str]:
    """Paths (as text) of the entries of the folder ``root`` whose names match the glob ``pattern``.

    For a pattern within one folder (``*.csv``, the usual case): one ``os.scandir``, several
    times faster than ``Path.glob`` on 100,000 files. Patterns with folders go through :func:`_walk`.
    """
    match = re.compile(fnmatch.translate(pattern)).match  # case-sensitive, as Path.glob on Linux
    base = str(root)
    with os.scandir(base) as entries:
        for entry in entries:
            if match(entry.name):
                yield f"{base}/{entry.name}"


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


ADVICE_FILE = "batchscore scores only files inside input.path: copy the file in or point input.path at its folder"
ADVICE_FOLDER = "batchscore scores only files inside input.path: copy the files in or point input.path at their folder"


def _is_folder(real: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(real).st_mode)
    except OSError:
        return False


def _walk(root: str, real_root: str, work_root: str, pattern: str) -> Iterator[tuple[str, str | None]]:
    """``(relative path, refusal)`` of every entry that matches a pattern with folders (``**/*.csv``).

    Hidden entries are passed over. Folders are entered through symbolic links too, but only
    where the link leads to a folder inside ``real_root`` that is not one the walk is already
    in (no loops) nor the output folder; a link that leads to a folder outside the input folder
    is never entered: it comes back with a refusal (the message saying why) instead.
    ``**`` matches any number of folders, itself included, as in ``Path.glob``.
    """
    segments = [s for s in pattern.split("/") if s not in ("", ".")]
    matchers = [None if s == "**" else re.compile(fnmatch.translate(s)).match for s in segments]

    def folders(folder: str, real: str, rel: str, chain: frozenset[str]) -> Iterator[tuple[str, str, str, str | None]]:
        """``(folder to list, its real path, relative path, refusal)`` of each subfolder to enter."""
        with os.scandir(folder) as entries:
            listed = sorted((e.name, e.is_symlink(), e.is_dir(follow_symlinks=False)) for e in entries)
        for name, link, is_dir in listed:
            if name.startswith("."):
                continue
            sub_rel = f"{rel}{name}"
            if not link:
                if is_dir:
                    yield f"{folder}/{name}", f"{real}/{name}", sub_rel, None
                continue
            target = os.path.realpath(f"{folder}/{name}")
            if _inside(target, work_root) or target in chain:  # our outputs, or a loop
                if target in chain:
                    log.info("Not entering %s: a symbolic link to %s, a folder it is already in", sub_rel, target)
                continue
            if not _inside(target, real_root):
                if _is_folder(target):  # its type only (lstat of the resolved path); it is never listed
                    yield (
                        "",
                        target,
                        sub_rel,
                        (f"input folder {sub_rel} is a symbolic link to {target}, outside input.path ({root}); {ADVICE_FOLDER}"),
                    )
                continue
            if _is_folder(target):
                yield target, target, sub_rel, None

    def walk(folder: str, real: str, rel: str, i: int, chain: frozenset[str]) -> Iterator[tuple[str, str | None]]:
        last = i == len(segments) - 1
        match = matchers[i]
        if match is None:  # **
            if last:
                return  # ``**`` at the end matches folders, never files
            yield from walk(folder, real, rel, i + 1, chain)
            for sub, sub_real, sub_rel, refusal in folders(folder, real, rel, chain):
                if refusal is not None:
                    yield sub_rel, refusal
                else:
                    yield from walk(sub, sub_real, f"{sub_rel}/", i, chain | {sub_real})
            return
        if last:
            with os.scandir(folder) as entries:
                names = [e.name for e in entries]
            for name in names:
                if match(name) and not name.startswith("."):
                    yield f"{rel}{name}", None
            return
        for sub, sub_real, sub_rel, refusal in folders(folder, real, rel, chain):
            if match(sub_rel.rsplit("/", 1)[-1]):
                if refusal is not None:
                    yield sub_rel, refusal
                else:
                    yield from walk(sub, sub_real, f"{sub_rel}/", i + 1, chain | {sub_real})

    if segments:
        yield from walk(root, real_root, "", 0, frozenset({real_root}))


def _planned(text: str, rel: str, real_root: str, work_root: str, root: Path, check_all: bool) -> InputFile | None:
    """The plan's entry for the matched entry ``text`` (``rel`` inside the input folder); None to pass it over.

    A regular file is planned as it is. Anything reached through a symbolic link (the file, or a
    folder above it) is judged by where the links lead, resolved with ``realpath`` and never
    opened first: a regular file inside the input folder is planned with that file as its
    ``target``; a folder is passed over, as folders are (:func:`_walk` decides which linked
    folders to enter); anything else (dangling, outside the input folder, a loop, a pipe or
    device) is planned ``refused``, with the reason. Our own outputs are never planned.
    """
    try:
        st = os.lstat(text)
    except OSError:  # vanished since it was listed
        return None
    link = stat.S_ISLNK(st.st_mode)
    if not link and not stat.S_ISREG(st.st_mode):
        return None
    real = os.path.realpath(text) if link or check_all else None
    if real is not None and _inside(real, work_root):
        return None
    if real is None or real == f"{real_root}/{rel}":
        if link:  # a link to itself resolves to its own path
            return InputFile(
                rel,
                0,
                st.st_mtime_ns,
                refused=(
                    f"input file {rel} is a symbolic link that leads back to itself (a loop of links); fix or remove the link"
                ),
            )
        return InputFile(path=rel, size=st.st_size, mtime_ns=st.st_mtime_ns)
    if _is_folder(real):  # a folder is never a file to score; the walk enters linked folders it may
        return None
    if not _inside(real, real_root):
        return InputFile(
            rel,
            0,
            st.st_mtime_ns,
            refused=(f"input file {rel} is a symbolic link to {real}, outside input.path ({root}); {ADVICE_FILE}"),
        )
    try:
        target = os.stat(real)  # inside the input folder: safe to look at
    except FileNotFoundError:
        return InputFile(
            rel,
            0,
            st.st_mtime_ns,
            refused=(
                f"input file {rel} is a symbolic link to {real}, which does not exist (a dangling link); fix or remove the link"
            ),
        )
    except OSError as exc:  # a loop of links (ELOOP), or no permission
        return InputFile(
            rel,
            0,
            st.st_mtime_ns,
            refused=(
                f"input file {rel} is a symbolic link to {real}, which cannot be read ({exc.strerror}); fix or remove the link"
            ),
        )
    if not stat.S_ISREG(target.st_mode):  # a pipe, socket or device: reading it could block or never end
        return InputFile(
            rel,
            0,
            st.st_mtime_ns,
            refused=(
                f"input file {rel} is a symbolic link to {real}, which is not a regular file (a pipe, socket or "
                "device); batchscore scores only regular files"
            ),
        )
    return InputFile(rel, target.st_size, target.st_mtime_ns, target=real[len(real_root) + 1 :])


def list_input_files(deployment: DeploymentSpec) -> list[InputFile]:
    """The deployment's input files in a deterministic (natural) order; hidden files are skipped.

    Symbolic links follow one rule (see :func:`_planned`): one that leads to a regular file
    inside the input folder is scored as that file, under the link's own name; any other is
    planned refused, a failed item of its mini-batch that nothing ever opens.
    """
    root = deployment.input_spec.local
    if not root.is_dir():
        raise PlanError(
            f"input folder {root} of deployment {deployment.name!r} does not exist or is not a folder (key input.path)"
        )
    real_root = os.path.realpath(root)
    work_root = os.path.realpath(deployment.output_spec.local)
    # Our own outputs are never scored: a file is checked against the output folder only where
    # it can lie inside it: the output folder is inside the input folder, the file is a link, or
    # the pattern reaches into subfolders (one of which may be a link).
    pattern = deployment.input_spec.pattern
    nested = "/" in pattern or "**" in pattern
    check_all = _inside(work_root, real_root) or nested
    base = str(root)
    if nested:
        matched: Iterator[tuple[str, str | None]] = _walk(base, real_root, work_root, pattern)
    else:
        matched = ((text[len(base) + 1 :], None) for text in _candidates(root, pattern))
    found: list[InputFile] = []
    seen: set[str] = set()
    for rel, refusal in matched:
        if rel in seen or rel.startswith(".") or "/." in rel:  # twice (**/**), hidden, or in a hidden folder
            continue
        seen.add(rel)
        entry = (
            InputFile(rel, 0, 0, refused=refusal)
            if refusal
            else _planned(f"{base}/{rel}", rel, real_root, work_root, root, check_all)
        )
        if entry is not None:
            found.append(entry)
    found.sort(key=lambda f: _natural_key(f.path))
    refusals = [f.refused for f in found if f.refused]
    if refusals:
        log.warning(
            "%d symbolic link(s) in %s will not be scored (each a failed item): %s",
            len(refusals),
            root,
            "; ".join(refusals[:5]) + (" ..." if len(refusals) > 5 else ""),
        )
    return found


def mini_batch_refs(plan: Plan) -> list[dict[str, Any]]:
    """The small per-mini-batch references passed through XCom to the mapped scoring task."""
    return [
        {
            "index": e.index,
            "files": e.files,
            "bytes": e.bytes,
            "label": e.label,
        }
        for e in plan.mini_batches
    ]


def _unwritable(deployment: DeploymentSpec, layout: RunLayout, exc: OSError) -> PlanError:
    return PlanError(
        f"cannot write the run folder {layout.root} of deployment {deployment.name!r} (key output.path "
        f"{deployment.output_spec.path}): {exc.strerror or exc}"
        + (f": {exc.filename}" if exc.filename else "")
        + "; output.path must be a folder this Airflow worker can write"
    )


def plan_run(
    endpoint_name: str,
    deployment: DeploymentSpec,
    run_id: str,
    *,
    max_mini_batches: int | None = None,
    source: InputSource | None = None,
) -> Plan:
    """Return the run's plan, making and persisting it on the first call.

    :param source: where the files are; default: the deployment's local input folder.
    """
    source = source or InputSource.local(deployment)
    layout = run_layout(deployment, run_id)
    try:
        existing = layout.read_plan()
    except NotADirectoryError as exc:  # output.path (or a folder below it) is a file
        raise _unwritable(deployment, layout, exc) from None
    if existing is not None:
        log.info(
            "Reusing the plan of this run from %s: %d files in %d mini-batches",
            layout.plan_file,
            existing.files,
            len(existing.mini_batches),
        )
        return existing

    files = source.list_files()
    if not files:
        raise PlanError(
            f"no input files match {deployment.input_spec.pattern!r} in {source.where} "
            f"(deployment {deployment.name!r}, keys input.path and input.pattern)"
        )
    settings = deployment.settings
    size = settings.mini_batch_size
    if settings.mini_batch_bytes is not None:
        if settings.split_large_files and deployment.contract == "azure":  # a serving container's .out is per file
            files = split_large_files(files, source.root, part_size(settings.mini_batch_bytes), opener=source.opener)
        mini_batches = partition_by_size(files, settings.mini_batch_bytes, settings.max_files_per_mini_batch)
    else:
        assert isinstance(size, int)  # not a size (mini_batch_bytes): a number of files
        mini_batches = partition(files, size)
    if max_mini_batches is not None and len(mini_batches) > max_mini_batches:
        raise PlanError(
            f"{len(files)} files at mini_batch_size {size} make {len(mini_batches)} mini-batches, more than "
            f"Airflow's [core] max_map_length ({max_mini_batches}); raise settings.mini_batch_size "
            "or AIRFLOW__CORE__MAX_MAP_LENGTH"
        )
    try:
        for mb in mini_batches:
            write_json_atomic(layout.mini_batch_file(mb.index), mb.to_json(), indent=None)
    except OSError as exc:
        raise _unwritable(deployment, layout, exc) from None
    plan = Plan(
        endpoint=endpoint_name,
        deployment=deployment.name,
        run_id=run_id,
        input_path=source.recorded or source.where,
        pattern=deployment.input_spec.pattern,
        mini_batch_size=size,
        created_at=now_iso(),
        mini_batches=[PlanEntry(index=mb.index, files=len(mb.files), bytes=mb.bytes) for mb in mini_batches],
    )
    write_json_atomic(layout.plan_file, plan.to_json())  # last: its presence marks a complete plan
    log.info(
        "Planned %d files (%d bytes) from %s into %d mini-batches (mini_batch_size %s); plan in %s",
        plan.files,
        plan.bytes,
        source.where,
        len(mini_batches),
        size,
        layout.plan_file,
    )
    return plan
