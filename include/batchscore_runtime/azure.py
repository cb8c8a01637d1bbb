"""Runs an Azure ML batch-deployment scoring script on one mini-batch.

The contract, as Azure defines it: the script's ``init()`` is called once before any
mini-batch, with the model folder in ``AZUREML_MODEL_DIR``; ``run(mini_batch)`` is called
with the list of the mini-batch's file paths and returns a list, a pandas DataFrame or a
generator of either. Every returned element (list item or DataFrame row) is one result row.

The result is committed in the formats of :mod:`batchscore_runtime.formats`; any failure
is written to the mini-batch's status and ends the process with exit code 1, with the
script's traceback on stderr (which the Airflow task log shows).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

from batchscore_runtime.formats import (
    ErrorInfo,
    MiniBatch,
    MiniBatchDir,
    MiniBatchStatus,
    atomic_path,
    now_iso,
    read_mini_batch_file,
)

log = logging.getLogger("batchscore")

EXIT_FAILED = 1


class ScoringScriptError(Exception):
    """The scoring script broke the contract (cannot be imported, no run(), bad return value)."""


class InputFileMissingError(FileNotFoundError):
    """An input file of the plan no longer exists."""

    def __init__(self, message: str, file: str):
        super().__init__(message)
        self.file = file


# --------------------------------------------------------------------------- script


def load_scoring_script(path: Path) -> ModuleType:
    """Import the user's scoring script the way Azure does: its folder first on sys.path."""
    if not path.is_file():
        raise ScoringScriptError(f"scoring script {path} does not exist")
    code_dir = str(path.parent)
    if code_dir not in sys.path:
        sys.path.insert(0, code_dir)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise ScoringScriptError(f"cannot import scoring script {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ScoringScriptError(
            f"importing scoring script {path.name} failed: {type(exc).__name__}: {exc}"
        ) from exc
    if not callable(getattr(module, "run", None)):
        raise ScoringScriptError(f"scoring script {path.name} defines no run(mini_batch) function")
    return module


def resolve_inputs(mini_batch: MiniBatch, input_root: Path) -> list[str]:
    """Absolute paths of the mini-batch's files; fails naming the first file that is gone."""
    paths = []
    for f in mini_batch.files:
        p = input_root / f.path
        try:
            st = p.stat()
        except FileNotFoundError:
            raise InputFileMissingError(
                f"input file {f.path} of {mini_batch.id} no longer exists "
                f"(it was planned with {f.size} bytes); the plan is kept per run, "
                "so restore the file or start a new run",
                file=f.path,
            ) from None
        if st.st_size != f.size or st.st_mtime_ns != f.mtime_ns:
            log.warning("input file %s changed since the plan was made (%d -> %d bytes)", f.path, f.size, st.st_size)
        paths.append(str(p))
    return paths


# --------------------------------------------------------------------------- results


def to_table(result: Any):
    """Turn what run() returned into an Arrow table, keeping column names and row order."""
    import pandas as pd
    import pyarrow as pa

    if result is None:
        raise ScoringScriptError(
            "run() returned None; it must return a list or a pandas DataFrame "
            "with one element per successful input"
        )
    if inspect.isgenerator(result) or isinstance(result, (map, filter)):
        result = list(result)
    if isinstance(result, pd.Series):
        result = result.to_frame(name=result.name if result.name is not None else "result")
    if not isinstance(result, pd.DataFrame):
        if isinstance(result, (str, bytes, dict)) or not hasattr(result, "__iter__"):
            raise ScoringScriptError(
                f"run() returned a {type(result).__name__}; it must return a list or a pandas DataFrame"
            )
        items = list(result)
        if items and all(isinstance(i, pd.DataFrame) for i in items):
            result = pd.concat(items, ignore_index=True)
        elif items and all(isinstance(i, dict) for i in items):
            result = pd.DataFrame.from_records(items)
        else:
            result = pd.DataFrame({"result": pd.Series(items, dtype=object if items else None)})
    df = result.reset_index(drop=True)
    df.columns = [str(c) for c in df.columns]
    try:
        return pa.Table.from_pandas(df, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        converted = []
        for col in df.columns:
            try:
                pa.array(df[col], from_pandas=True)
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                df[col] = df[col].map(lambda v: None if v is None else str(v))
                converted.append(col)
        log.warning("column(s) %s hold mixed or complex objects; they are written as text", ", ".join(converted))
        return pa.Table.from_pandas(df, preserve_index=False)


def write_result(out: MiniBatchDir, table) -> str:
    import pyarrow.parquet as pq

    name = out.new_result_name()
    with atomic_path(out.path / name) as tmp:
        pq.write_table(table, tmp)
    return name


# --------------------------------------------------------------------------- main


def score_mini_batch(mini_batch: MiniBatch, input_root: Path, script_path: Path, out: MiniBatchDir) -> MiniBatchStatus:
    """Score one mini-batch and commit its result; raises on any failure."""
    started = now_iso()
    paths = resolve_inputs(mini_batch, input_root)
    log.info("%s: %d files, %d bytes", mini_batch.id, len(paths), mini_batch.bytes)

    script = load_scoring_script(script_path)
    t0 = time.monotonic()
    init = getattr(script, "init", None)
    if callable(init):
        init()
    else:
        log.warning("scoring script %s defines no init(); continuing without it", script_path.name)
    init_seconds = time.monotonic() - t0
    log.info("init() finished in %.2f s", init_seconds)

    t1 = time.monotonic()
    table = to_table(script.run(paths))
    run_seconds = time.monotonic() - t1
    rate = table.num_rows / run_seconds if run_seconds > 0 else float("inf")
    log.info("run() returned %d rows in %.2f s (%.0f rows/s)", table.num_rows, run_seconds, rate)

    status = MiniBatchStatus(
        index=mini_batch.index,
        state=MiniBatchStatus.SUCCEEDED,
        files=len(paths),
        rows=table.num_rows,
        result_file=write_result(out, table),
        init_seconds=round(init_seconds, 3),
        run_seconds=round(run_seconds, 3),
        started_at=started,
        finished_at=now_iso(),
    )
    out.commit(status)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m batchscore_runtime", description=__doc__.splitlines()[0])
    parser.add_argument("--mini-batch", required=True, type=Path, help="the mini-batch file (JSON)")
    parser.add_argument("--input-root", required=True, type=Path, help="folder the mini-batch's paths are relative to")
    parser.add_argument("--scoring-script", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path, help="the mini-batch's result folder")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    args = parser.parse_args(argv)

    logging.basicConfig(
        stream=sys.stdout,
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    mini_batch = read_mini_batch_file(args.mini_batch)
    out = MiniBatchDir(args.output, mini_batch.index)
    started = now_iso()
    try:
        status = score_mini_batch(mini_batch, args.input_root, args.scoring_script, out)
    except Exception as exc:  # every failure is recorded, then reported through the exit code
        sys.stdout.flush()
        traceback.print_exc()
        sys.stderr.flush()
        error = ErrorInfo(
            type=type(exc).__name__,
            message=str(exc),
            traceback=traceback.format_exc(),
            file=getattr(exc, "file", None),
        )
        out.commit(
            MiniBatchStatus(
                index=mini_batch.index,
                state=MiniBatchStatus.FAILED,
                files=len(mini_batch.files),
                started_at=started,
                finished_at=now_iso(),
                error=error,
            )
        )
        log.error("%s failed: %s", mini_batch.id, error.one_line())
        return EXIT_FAILED
    log.info("%s succeeded: %d rows committed to %s", mini_batch.id, status.rows, status.result_file)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
