"""The user's scoring script: importing it as Azure does, and reading what its ``run()`` returned.

:func:`load_scoring_script` imports the script with its folder first on ``sys.path``;
:func:`to_table` turns what ``run()`` returned (a list, a DataFrame or a generator of either)
into an Arrow table in row order, :func:`write_table` writes it, and :func:`count_failed_items`
applies Azure's item accounting: every returned element is one successful item.
Used by the worker processes (:mod:`batchscore_runtime.workers`) and the mini-batch's
supervisor (:mod:`batchscore_runtime.azure`), which joins the workers' parts.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from batchscore_runtime.formats import ItemError, atomic_path

if TYPE_CHECKING:  # for the annotations only: the functions import pyarrow when they are called
    import pyarrow as pa

log = logging.getLogger("batchscore")


class ScoringScriptError(Exception):
    """The scoring script broke the contract (cannot be imported, no run(), bad return value)."""


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
        raise ScoringScriptError(f"importing scoring script {path.name} failed: {type(exc).__name__}: {exc}") from exc
    if not callable(getattr(module, "run", None)):
        raise ScoringScriptError(f"scoring script {path.name} defines no run(mini_batch) function")
    return module


# --------------------------------------------------------------------------- results


def to_table(result: Any) -> pa.Table:
    """Turn what run() returned into an Arrow table, keeping column names and row order."""
    import pandas as pd
    import pyarrow as pa

    if result is None:
        raise ScoringScriptError(
            "run() returned None; it must return a list or a pandas DataFrame with one element per successful input"
        )
    if inspect.isgenerator(result) or isinstance(result, (map, filter)):
        result = list(result)
    if isinstance(result, pd.Series):
        result = result.to_frame(name=result.name if result.name is not None else "result")
    if not isinstance(result, pd.DataFrame):
        if isinstance(result, (str, bytes, dict)) or not hasattr(result, "__iter__"):
            raise ScoringScriptError(f"run() returned a {type(result).__name__}; it must return a list or a pandas DataFrame")
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


def write_table(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` as parquet, atomically."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


#: Column names that usually hold the input file a result row belongs to; tried first.
_FILE_COLUMN_HINTS = ("file", "filename", "file_name", "path", "filepath", "file_path", "source", "input", "result")


def count_failed_items(table: pa.Table, paths: list[str], rel_paths: list[str]) -> tuple[int, list[ItemError]]:
    """Azure's item accounting for one ``run()`` call, and which files failed when that can be told.

    Every returned element is one successful item, so ``len(paths) - rows`` items failed
    (never fewer than 0). When a text column of the result names input files (the input list
    itself, or a ``file`` column) and exactly that many files are not named in it, those are
    the failed files; otherwise the failures are reported without a file.
    """
    import pyarrow as pa

    failed = max(0, len(paths) - table.num_rows)
    if not failed:
        return 0, []
    if table.num_rows == 0:  # nothing returned: every file failed, and which ones is known
        return failed, [ItemError(rel, "NoResult", "run() returned no results for this mini-batch") for rel in rel_paths]
    keys: dict[str, int] = {}
    for i, (p, rel) in enumerate(zip(paths, rel_paths)):
        for key in (p, rel, os.path.basename(p)):
            keys.setdefault(key, i)
    names = sorted(
        (
            n
            for n in table.column_names
            if pa.types.is_string(table.schema.field(n).type) or pa.types.is_large_string(table.schema.field(n).type)
        ),
        key=lambda n: (n.lower() not in _FILE_COLUMN_HINTS, table.column_names.index(n)),
    )
    for name in names:
        values = [v for v in table.column(name).to_pylist() if v is not None]
        if values and all(v in keys for v in values):
            named = {keys[v] for v in values}
            missing = [i for i in range(len(paths)) if i not in named]
            if len(missing) == failed:
                return failed, [
                    ItemError(
                        rel_paths[i], "NoResult", f"run() returned no result for this file (column {name!r} does not name it)"
                    )
                    for i in missing
                ]
            break
    message = (
        f"run() returned {table.num_rows} results for {len(paths)} files; which files failed cannot be told "
        "(return a column naming each row's input file to find out)"
    )
    return failed, [ItemError(None, "NoResult", message) for _ in range(failed)]
