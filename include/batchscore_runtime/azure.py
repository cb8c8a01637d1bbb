"""Runs an Azure ML batch-deployment scoring script on one mini-batch.

The contract, as Azure defines it: the script's ``init()`` is called once per worker process
before any mini-batch, with the model folder in ``AZUREML_MODEL_DIR``; ``run(mini_batch)`` is
called with a list of file paths and returns a list, a pandas DataFrame or a generator of
either. Every returned element (list item or DataFrame row) is one successful item; the
files it falls short of are failed items. Scripts that write their own files find a fresh
folder in ``AZUREML_BI_OUTPUT_PATH``.

Where the mini-batch's files are read is decided here (:func:`resolve_inputs`): a symbolic
link is read at the target the plan found inside the input folder, checked again in the
container, and a link the plan refused is never opened: it is a failed item, and run() is
given the other files.

With ``--workers N`` the mini-batch's files are shared out among N worker processes
(:mod:`batchscore_runtime.workers`), each with its own ``init()``; ``--timeout`` bounds each
``run()`` call, and a worker past it is killed.

The result and a report of how the attempt went (a status in the formats of
:mod:`batchscore_runtime.formats`) are written to the attempt's scratch folder, the only
writable mount; the orchestrator checks them and commits (``batchscore.intake``). Any failure
is reported so and ends the process with exit code 1, with the script's traceback on stderr
(which the Airflow task log shows).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import stat
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from batchscore_runtime.formats import (
    ErrorInfo,
    InputFile,
    ItemError,
    MiniBatch,
    MiniBatchDir,
    MiniBatchStatus,
    now_iso,
    read_mini_batch_file,
)
from batchscore_runtime.processes import Sweeper
from batchscore_runtime.scoring_script import ScoringScriptError, write_table
from batchscore_runtime.slices import sliced_inputs
from batchscore_runtime.workers import MiniBatchFailed, WorkerTask, run_workers, split_evenly, worker_gpus

log = logging.getLogger("batchscore")

EXIT_FAILED = 1


class InputFileMissingError(FileNotFoundError):
    """An input file of the plan no longer exists, or a symbolic link's target changed since the plan."""

    def __init__(self, message: str, file: str):
        super().__init__(message)
        self.file = file


# --------------------------------------------------------------------------- inputs


def refused_item(f: InputFile) -> ItemError:
    """The failed item of a file the plan refused to score (a symbolic link it will not follow)."""
    assert f.refused is not None
    return ItemError(f.label, f.refused_type or InputFile.REFUSED, f.refused)


def _check_target(f: InputFile, mini_batch: MiniBatch, input_root: Path) -> str:
    """The path of a link's planned target inside ``input_root``, checked here to be the file the plan saw.

    It must be a regular file (not a link), reached through no link, with the planned size;
    otherwise the mini-batch fails naming the link, and nothing is read.
    """
    assert f.target is not None
    path = input_root / f.target
    expected = os.path.join(os.path.realpath(input_root), f.target)
    planned = f"a regular file of {f.file_size} bytes"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        now = "gone"
    except OSError as exc:
        now = f"unreadable ({exc.strerror})"
    else:
        if stat.S_ISLNK(st.st_mode):
            now = "a symbolic link"
        elif not stat.S_ISREG(st.st_mode):
            now = "not a regular file"
        elif os.path.realpath(path) != expected:
            now = "reached through a symbolic link"
        elif st.st_size != f.file_size:
            now = f"{st.st_size} bytes"
        else:
            if st.st_mtime_ns != f.mtime_ns:
                log.warning("input file %s (a link to %s) was modified since the plan was made", f.path, f.target)
            return str(path)
    raise InputFileMissingError(
        f"input file {f.path} of {mini_batch.id} is a symbolic link to {f.target}, which changed since the plan "
        f"(planned: {planned}; now: {now}); batchscore scores only the file the plan checked: "
        "restore it or start a new run",
        file=f.path,
    )


def resolve_inputs(mini_batch: MiniBatch, input_root: Path) -> list[str | None]:
    """Where each of the mini-batch's files is read, in plan order; fails naming the first file that is gone.

    A symbolic link is read at its planned target, after checking here that it is still the
    file the plan saw (:func:`_check_target`); a refused link is never opened: None.
    """
    paths: list[str | None] = []
    for f in mini_batch.files:
        if f.refused is not None:
            paths.append(None)
            continue
        if f.target is not None:
            paths.append(_check_target(f, mini_batch, input_root))
            continue
        p = input_root / f.path
        try:
            st = p.stat()
        except FileNotFoundError:
            raise InputFileMissingError(
                f"input file {f.path} of {mini_batch.id} no longer exists "
                f"(it was planned with {f.file_size} bytes); the plan is kept per run, "
                "so restore the file or start a new run",
                file=f.path,
            ) from None
        if st.st_size != f.file_size or st.st_mtime_ns != f.mtime_ns:
            if f.part is not None:  # its parts were cut at record boundaries of the planned file
                raise InputFileMissingError(
                    f"input file {f.path} of {mini_batch.id} changed since the plan cut it into parts "
                    f"({f.file_size} -> {st.st_size} bytes); restore it or start a new run",
                    file=f.path,
                )
            log.warning("input file %s changed since the plan was made (%d -> %d bytes)", f.path, f.size, st.st_size)
        paths.append(str(p))
    return paths


# --------------------------------------------------------------------------- main


@dataclass(frozen=True)
class RunOptions:
    """How to score a mini-batch: the deployment's settings as the container receives them."""

    workers: int = 1
    timeout: float = 30.0
    init_timeout: float = 600.0
    output_action: str = "append_row"  # or "summary_only"
    gpu_count: int | None = None
    attempt: int = 1
    log_level: str = "info"
    worker: str | None = None  # warm workers: the worker container's name ("w1")
    worker_init_seconds: float | None = None  # warm workers: its init(), paid once before any mini-batch


#: Runs a mini-batch's worker tasks and returns their results: fresh processes by default
#: (:func:`batchscore_runtime.workers.run_workers`), or a warm worker's pool.
Runner = Callable[[list, float, float], list]


def score_mini_batch(
    mini_batch: MiniBatch,
    input_root: Path,
    script_path: Path,
    out: MiniBatchDir,
    options: RunOptions = RunOptions(),
    *,
    runner: Runner | None = None,
    on_outputs: Callable[[Path], None] | None = None,
) -> MiniBatchStatus:
    """Score one mini-batch in worker processes and commit its result; raises on any failure.

    ``runner`` runs the worker tasks (default: fresh processes that call ``init()`` first);
    ``on_outputs`` is told the attempt's custom-outputs folder before any ``run()``.
    """
    started = now_iso()
    located = resolve_inputs(mini_batch, input_root)
    refused = [refused_item(f) for f, p in zip(mini_batch.files, located) if p is None]
    if refused:  # run() is given the other files only; the refused ones are failed items
        mini_batch = replace(mini_batch, files=[f for f, p in zip(mini_batch.files, located) if p is not None])
    with sliced_inputs(mini_batch, [p for p in located if p is not None], out.path) as paths:
        return _score_files(mini_batch, paths, script_path, out, options, started, runner, on_outputs, refused)


def _fresh_processes(tasks: list, timeout: float, init_timeout: float) -> list:
    """The default runner: fresh worker processes, and in a container nothing of them left once they end."""
    # As the container's PID 1, every process the script left (orphans come to PID 1) is ended
    # before the report is written; elsewhere (tests, benchmarks) this process's other children are not ours.
    sweeper = Sweeper(tasks[0].mini_batch) if os.getpid() == 1 else None
    try:
        return run_workers(tasks, timeout=timeout, init_timeout=init_timeout)
    finally:
        if sweeper is not None:
            sweeper.sweep(tasks[0].mini_batch, keep=_resource_tracker())


def _resource_tracker() -> set[int]:
    """multiprocessing's resource tracker, which the spawned workers started and which is not the script's."""
    from multiprocessing import resource_tracker

    pid = getattr(getattr(resource_tracker, "_resource_tracker", None), "_pid", None)
    return {pid} if pid else set()


def _score_files(
    mini_batch: MiniBatch,
    paths: list[str],
    script_path: Path,
    out: MiniBatchDir,
    options: RunOptions,
    started: str,
    runner: Runner | None = None,
    on_outputs: Callable[[Path], None] | None = None,
    refused: list[ItemError] | None = None,
) -> MiniBatchStatus:
    refused = refused or []  # files of the mini-batch not in ``paths``: failed items, never opened

    t0 = time.monotonic()
    rel_paths = [f.label for f in mini_batch.files]
    parts = split_evenly(list(zip(paths, rel_paths)), options.workers)
    if not script_path.is_file():
        raise ScoringScriptError(f"scoring script {script_path} does not exist")
    log.info(
        "%s: %d files, %d bytes, %d worker process(es), run() timeout %g s, try %d",
        mini_batch.id,
        len(paths),
        mini_batch.bytes,
        len(parts),
        options.timeout,
        options.attempt,
    )
    outputs = out.new_outputs_dir()
    if on_outputs is not None:
        on_outputs(outputs)
    token = os.urandom(6).hex()
    tasks = [
        WorkerTask(
            worker=k,
            workers=len(parts),
            mini_batch=mini_batch.id,
            script=str(script_path),
            paths=[p for p, _ in part],
            rel_paths=[r for _, r in part],
            result_file=(str(out.path / f"result-{token}-part{k}.parquet") if options.output_action == "append_row" else None),
            outputs_dir=str(outputs),
            log_level=options.log_level,
            cuda_visible_devices=worker_gpus(k, len(parts), options.gpu_count),
        )
        for k, part in enumerate(parts)
        if part
    ]
    results = (runner or _fresh_processes)(tasks, options.timeout, options.init_timeout) if tasks else []

    rows = sum(r.rows for r in results)
    result_file = None
    if options.output_action == "append_row" and results:
        result_file = _join_parts(out, [Path(r.result_file) for r in results if r.result_file])
    custom = [p for p in outputs.rglob("*") if p.is_file()]
    if not custom:
        shutil.rmtree(outputs, ignore_errors=True)
    status = MiniBatchStatus(
        index=mini_batch.index,
        state=MiniBatchStatus.SUCCEEDED,
        files=len(paths) + len(refused),
        rows=rows,
        result_file=result_file,
        init_seconds=round(
            options.worker_init_seconds
            if options.worker_init_seconds is not None
            else max((r.init_seconds for r in results), default=0.0),
            3,
        ),
        run_seconds=round(max((r.run_seconds for r in results), default=0.0), 3),
        started_at=started,
        finished_at=now_iso(),
        attempt=options.attempt,
        workers=len(parts),
        failed_items=len(refused) + sum(r.failed_items for r in results),
        item_errors=[*refused, *(e for r in results for e in r.item_errors)],
        outputs_dir=outputs.name if custom else None,
        custom_outputs=len(custom),
        worker=options.worker,
    )
    out.commit(status)
    seconds = time.monotonic() - t0
    log.info(
        "%s: %d rows from %d files in %.2f s (%.1f rows/s)%s%s",
        mini_batch.id,
        rows,
        len(paths),
        seconds,
        rows / seconds if seconds > 0 else 0.0,
        f", {status.failed_items} failed item(s)" if status.failed_items else "",
        f", {len(custom)} custom output file(s)" if custom else "",
    )
    return status


def _join_parts(out: MiniBatchDir, parts: list[Path]) -> str:
    """One result file from the workers' parts, in worker (= input) order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = out.new_result_name()
    if len(parts) == 1:
        os.replace(parts[0], out.path / name)
        return name
    tables = [pq.read_table(p) for p in parts]
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        described = "; ".join(f"worker {k + 1}: {t.schema.to_string(show_schema_metadata=False)}" for k, t in enumerate(tables))
        raise ScoringScriptError(f"the worker processes' run() results have incompatible columns ({exc}): {described}") from None
    write_table(table, out.path / name)
    for p in parts:
        p.unlink(missing_ok=True)
    return name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m batchscore_runtime", description=__doc__.splitlines()[0])
    parser.add_argument("--mini-batch", required=True, type=Path, help="the mini-batch file (JSON)")
    parser.add_argument("--input-root", required=True, type=Path, help="folder the mini-batch's paths are relative to")
    parser.add_argument("--scoring-script", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path, help="the mini-batch's result folder")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    parser.add_argument("--workers", type=int, default=1, help="worker processes (max_concurrency_per_instance)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds one run() call may take")
    parser.add_argument("--init-timeout", type=float, default=600.0, help="seconds start-up and init() may take")
    parser.add_argument("--output-action", default="append_row", choices=["append_row", "summary_only"])
    parser.add_argument("--gpus", type=int, default=None, help="GPUs this container sees (to pin workers)")
    parser.add_argument("--attempt", type=int, default=1, help="the orchestrator's try number")
    args = parser.parse_args(argv)

    logging.basicConfig(
        stream=sys.stdout,
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    options = RunOptions(
        workers=max(1, args.workers),
        timeout=args.timeout,
        init_timeout=args.init_timeout,
        output_action=args.output_action,
        gpu_count=args.gpus,
        attempt=args.attempt,
        log_level=args.log_level,
    )
    mini_batch = read_mini_batch_file(args.mini_batch)
    out = MiniBatchDir(args.output, mini_batch.index)
    return score_and_commit(mini_batch, args.input_root, args.scoring_script, out, options)


def score_and_commit(
    mini_batch: MiniBatch,
    input_root: Path,
    script_path: Path,
    out: MiniBatchDir,
    options: RunOptions,
    *,
    runner: Runner | None = None,
    on_outputs: Callable[[Path], None] | None = None,
) -> int:
    """Score the mini-batch and commit its status, succeeded or failed; returns the exit code."""
    started = now_iso()
    try:
        status = score_mini_batch(mini_batch, input_root, script_path, out, options, runner=runner, on_outputs=on_outputs)
    except Exception as exc:  # every failure is recorded, then reported through the exit code
        sys.stdout.flush()
        if isinstance(exc, MiniBatchFailed):
            error = exc.info  # the worker printed the script's traceback already
        else:
            traceback.print_exc()
            error = ErrorInfo(
                type=type(exc).__name__,
                message=str(exc).strip(),
                traceback=traceback.format_exc(),
                file=getattr(exc, "file", None),
            )
        sys.stderr.flush()
        out.commit(
            MiniBatchStatus(
                index=mini_batch.index,
                state=MiniBatchStatus.FAILED,
                files=len(mini_batch.files),
                started_at=started,
                finished_at=now_iso(),
                error=error,
                attempt=options.attempt,
                workers=options.workers,
                worker=options.worker,
            )
        )
        log.error("%s failed: %s", mini_batch.id, error.one_line())
        return EXIT_FAILED
    log.info(
        "%s succeeded: %d rows in %s, reported for the orchestrator to take in", mini_batch.id, status.rows, status.result_file
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
