"""The serving contract's model: a folder as is, or a ``model.tar.gz`` unpacked once per run.

SageMaker unpacks the model archive into ``/opt/ml/model`` before a transform job starts. Here
the plan task unpacks it into the run folder (``_batchscore/model``), and every mini-batch's
serving container mounts that folder read-only; a retried or cleared mini-batch finds it there.
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

from batchscore.errors import PlanError
from batchscore.spec.deployment import DeploymentSpec
from batchscore_runtime.formats import RunLayout

log = logging.getLogger(__name__)


def serving_model_dir(deployment: DeploymentSpec, layout: RunLayout) -> Path:
    """The folder to mount at ``/opt/ml/model``: ``model.path`` itself, or the run's unpacked archive.

    Unpacking goes to a temporary folder renamed into place, so two tasks that unpack at the
    same time both end with one complete folder, and a crash never leaves a partial one.
    """
    model = deployment.model.local
    if model.is_dir():
        return model
    target = layout.model_dir
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=".model-", dir=target.parent))
    try:
        try:
            with tarfile.open(model, "r:*") as archive:
                # The "data" filter refuses absolute paths, "..", links out of the folder and devices.
                archive.extractall(tmp, filter="data")
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise PlanError(
                f"cannot unpack the model archive {model} (key model.path) of deployment "
                f"{deployment.name!r}: {exc}; it must be a tar.gz archive, as SageMaker's model.tar.gz"
            ) from None
        for path in [tmp, *tmp.rglob("*")]:  # readable by the serving container's user, whoever it is
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    files = sum(1 for p in target.rglob("*") if p.is_file())
    log.info("Unpacked the model archive %s into %s: %d files in %.1f s", model, target, files, time.monotonic() - started)
    return target
