"""A deployment's input on object storage, as the plan sees it: the objects below ``input.path`` whose names match
``input.pattern``, each with its size and version token; and large ones opened for ranged reads, to be cut.

The names are matched as the local walk matches file paths (:func:`batchscore.plan.pattern_matcher`): ``*.csv``
within the prefix itself, ``**/*.csv`` at any depth; hidden names (a segment starting with ``.``) never. Objects
below the deployment's own output prefix (when it lies inside the input prefix) are never planned.
"""

from __future__ import annotations

from typing import IO

from airflow.sdk import ObjectStoragePath

from batchscore import storage
from batchscore.errors import PlanError, StorageNotFoundError
from batchscore.plan import InputSource, pattern_matcher
from batchscore.spec.deployment import DeploymentSpec
from batchscore.spec.paths import same_or_inside
from batchscore_runtime.formats import InputFile

#: Bytes fetched per ranged read when a large object is read through to find where to cut it.
READ_BLOCK = 8 << 20


def input_location(deployment: DeploymentSpec) -> ObjectStoragePath:
    """``input.path`` on object storage, with its connection (which must exist)."""
    return storage.location(str(deployment.input_spec.path), deployment.input_spec.connection)


def list_objects(deployment: DeploymentSpec) -> list[InputFile]:
    """The objects the plan scores, in name order (the plan sorts them naturally), with their version tokens.

    :raises PlanError: the bucket or prefix is missing (naming the key ``input.path``).
    :raises StorageError: the listing is denied or fails.
    """
    prefix = input_location(deployment)
    try:
        objects = storage.list_objects(prefix)
    except StorageNotFoundError as exc:
        raise PlanError(f"{exc} (deployment {deployment.name!r}, key input.path)") from None
    matches = pattern_matcher(deployment.input_spec.pattern)
    output = None
    if deployment.output_spec.remote:
        out = storage.location(str(deployment.output_spec.path), deployment.output_spec.connection)
        output = storage.uri_of(out)
    found = []
    for obj in objects:
        if not matches(obj.name):
            continue
        if output is not None and same_or_inside(obj.uri, output):
            continue  # our own outputs
        found.append(InputFile(path=obj.name, size=obj.size, mtime_ns=0, version=obj.version))
    return found


def source(deployment: DeploymentSpec) -> InputSource:
    """The plan's :class:`InputSource` for an input on object storage."""
    prefix = input_location(deployment)

    def opener(f: InputFile) -> IO[bytes]:
        obj = prefix / f.path
        storage.check_version(obj, f.version)
        handle: IO[bytes] = obj.fs.open(obj.path, "rb", block_size=READ_BLOCK)
        return handle

    return InputSource(
        storage.display(prefix), lambda: list_objects(deployment), opener=opener, recorded=str(deployment.input_spec.path)
    )


__all__ = ["input_location", "list_objects", "source"]
