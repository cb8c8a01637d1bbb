"""The worker host's scratch folder (``BATCHSCORE_SCRATCH_DIR``): staged inputs, cached models and the mirrors of
run folders that live on object storage (:mod:`batchscore.run_store`). No Airflow import: the warm workers'
pool (:mod:`batchscore.scoring.workers`) asks whether a run folder is such a mirror."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from batchscore.errors import StorageError

#: Environment variable: the worker host's folder for staged inputs, cached models and run mirrors. In a
#: containerised Airflow worker it must be a folder the Docker engine can mount (see :mod:`batchscore.hostpaths`).
SCRATCH_DIR_ENV = "BATCHSCORE_SCRATCH_DIR"


def scratch_root() -> Path:
    """``BATCHSCORE_SCRATCH_DIR``, or ``<temp>/batchscore``; made when missing."""
    raw = os.environ.get(SCRATCH_DIR_ENV, "").strip()
    root = Path(raw).expanduser() if raw else Path(tempfile.gettempdir()) / "batchscore"
    if not root.is_absolute():
        raise StorageError(f"{SCRATCH_DIR_ENV} must be an absolute path, not {raw!r}")
    root.mkdir(parents=True, exist_ok=True)
    return root


def mirrors_root() -> Path:
    """Where the mirrors of run folders on object storage are: one folder per deployment and output URI."""
    return scratch_root() / "runs"


def is_mirror(run_folder: Path) -> bool:
    """Whether ``run_folder`` is this host's mirror of a run folder on object storage (not a shared one)."""
    return Path(run_folder).is_relative_to(mirrors_root())


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (a lock file) for the processes of this host: one fetch or build at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


__all__ = ["SCRATCH_DIR_ENV", "is_mirror", "locked", "mirrors_root", "scratch_root"]
