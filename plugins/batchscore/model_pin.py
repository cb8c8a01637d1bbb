"""The model a run scores with: resolved once per run, pinned in its run folder, used by every task of the run.

Azure resolves ``azureml:<name>@latest`` when a deployment is created, never while a job runs. Here the first
task of a run that needs the model resolves ``model`` and records what it found in the run folder
(``_batchscore/model.json``, a :class:`~batchscore_runtime.formats.ModelPin`):

* a local model: its path (for a local registry, the version's folder the YAML resolved to when it was loaded);
* on object storage: the location (for ``@latest``, the highest version's folder, found by listing the
  registry) and each object's name and version token.

Every later task of the run (the score tasks, warm workers started again, a mini-batch rerun a day later)
reads the pin and uses that model: on object storage exactly those object versions are fetched
(:func:`batchscore.run_store.fetch_model`). A model registered or replaced meanwhile is for the next run; a
pinned object that changed or is gone, or a pinned folder that is gone, fails the task saying so.

Who pins: the plan task, and the warm workers' start task, which runs at the same time (it does not wait for
the plan). Whoever comes first writes the pin with an exclusive create (:func:`batchscore.storage.create`: a
conditional PUT on object storage, a link on a local disk), so the pin is never replaced; whoever loses that
race, and every task after, reads the winner's. A run folder planned before models were pinned gets its pin
from its next task that needs the model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from airflow.sdk import ObjectStoragePath

from batchscore import storage
from batchscore.errors import ObjectChangedError, StorageError, StorageNotFoundError
from batchscore.spec import registry
from batchscore.spec.deployment import DeploymentSpec
from batchscore_runtime.formats import ModelPin, PinnedObject, now_iso

log = logging.getLogger(__name__)

#: What every "the pinned model is not there any more" error ends with.
NEW_RUN = "a run scores all its mini-batches with the model pinned when it started: trigger a new run to score with"


def pinned(deployment: DeploymentSpec, where: ObjectStoragePath, log_to: Any = log) -> ModelPin:
    """The run's model pin at ``where`` (its ``model.json``): read, or resolved and written if no task has yet."""
    found = read(where)
    if found is None:
        made = resolve(deployment, log_to)
        data = json.dumps(made.to_json(), indent=2).encode()
        if storage.retrying(lambda: storage.create(where, data), f"writing {where.name}", log_to):
            log_to.info("Pinned the run's model: %s", describe(made))
            return made
        found = read(where)  # another task of the run pinned it first: its pin counts
        if found is None:
            raise StorageError(f"{storage.display(where)}: the run's model pin was there and is gone; retry the task")
    if found.deployment != deployment.name:
        raise StorageError(
            f"{storage.display(where)} pins the model of deployment {found.deployment!r}, not of {deployment.name!r}; "
            "two deployments share this run folder: give each its own output.path"
        )
    log_to.info("The run's model, pinned at %s: %s", found.pinned_at, describe(found))
    return found


def read(where: ObjectStoragePath) -> ModelPin | None:
    """The pin at ``where``; ``None`` when no task of the run has written it."""
    try:
        data = storage.retrying(lambda: storage.read_bytes(where), f"reading {where.name}")
    except StorageNotFoundError:
        return None
    return ModelPin.from_json(json.loads(data))


def describe(pin: ModelPin) -> str:
    """The pin in a few words, for the log: reference and version, location, objects."""
    what = f"{pin.reference} (version {pin.model_version}) at " if pin.reference else ""
    where = storage.mask_uri(pin.location)
    return what + (where if pin.kind == ModelPin.LOCAL else f"{where} ({len(pin.objects)} object(s), by version)")


def resolve(deployment: DeploymentSpec, log_to: Any = log) -> ModelPin:
    """What ``deployment``'s model is now: a local path, or the objects (and their versions) on object storage."""
    model = deployment.model
    if not model.remote:
        return ModelPin(
            deployment=deployment.name,
            location=str(model.local),
            kind=ModelPin.LOCAL,
            objects=[],
            reference=model.reference,
            model_version=model.version,
            pinned_at=now_iso(),
        )
    where = storage.location(str(model.path), model.connection)
    try:
        objects = storage.list_objects(where)
    except StorageNotFoundError as exc:
        raise StorageNotFoundError(f"{exc} (deployment {deployment.name!r}, key model.path)") from None
    version = model.version
    if model.latest_in_registry:
        where, objects, version = _latest_version(deployment, where, objects, log_to)
    if not objects:
        raise StorageNotFoundError(
            f"model.path {storage.display(where)} of deployment {deployment.name!r} holds no object; upload the model there"
        )
    uri = storage.uri_of(where)
    single = len(objects) == 1 and objects[0].uri.rstrip("/") == uri.rstrip("/")
    return ModelPin(
        deployment=deployment.name,
        location=uri,
        kind=ModelPin.OBJECT if single else ModelPin.PREFIX,
        objects=[PinnedObject(o.name, o.size, o.version) for o in objects],
        connection=where.conn_id,
        reference=model.reference,
        model_version=version,
        pinned_at=now_iso(),
    )


def _latest_version(
    deployment: DeploymentSpec, where: ObjectStoragePath, objects: list[storage.ObjectInfo], log_to: Any
) -> tuple[ObjectStoragePath, list[storage.ObjectInfo], str]:
    """The highest version of a registered model on object storage (``model: azureml:<name>@latest``): its folder,
    its objects and the version.

    ``where`` is ``<registry>/<name>``; its versions are the first part of its objects' names. A registry
    without that name is told with the names it holds, as when a local registry is read at load.
    """
    model = deployment.model
    assert model.reference is not None
    reference = registry.parse_reference(model.reference)
    root = str(model.path).rstrip("/").rpartition("/")[0]
    versions = {o.name.split("/", 1)[0] for o in objects if "/" in o.name}
    names = [reference.name] if versions else []
    if not versions:
        try:
            listed = storage.list_objects(storage.location(root, model.connection))
        except StorageNotFoundError:
            listed = []
        names = sorted({o.name.split("/", 1)[0] for o in listed if "/" in o.name})
    try:
        version = registry.pick_version(reference, storage.mask_uri(root), names, versions)
    except ValueError as exc:
        raise StorageNotFoundError(f"deployment {deployment.name!r}, key model: {exc}") from None
    log_to.info(
        "Model %s is version %s (the highest of %s)", model.reference, version, ", ".join(registry.sorted_versions(versions))
    )
    prefix = f"{version}/"
    found = [dataclasses.replace(o, name=o.name[len(prefix) :]) for o in objects if o.name.startswith(prefix)]
    return where / version, found, version


def location(pin: ModelPin) -> ObjectStoragePath:
    """Where the pinned model is on object storage, read with the connection it was pinned with."""
    return storage.location(pin.location, pin.connection)


def local_path(deployment: DeploymentSpec, pin: ModelPin) -> Path:
    """A local model's pinned path, which must still be there."""
    path = Path(pin.location)
    if not path.exists():
        raise StorageNotFoundError(
            f"deployment {deployment.name!r}, key model.path: the model {path} this run was pinned to is gone; "
            f"{NEW_RUN} the model that model.path names now"
        )
    return path


def changed(deployment: DeploymentSpec, obj: ObjectStoragePath, pinned_version: str) -> ObjectChangedError:
    """The error for an object of the pinned model that changed or was deleted since the run pinned it."""
    try:
        now: str | None = storage.object_info(obj).version
    except StorageNotFoundError:
        now = None
    what = f"deployment {deployment.name!r}, key model.path: the model object {storage.display(obj)}"
    if now is None:
        return ObjectChangedError(f"{what} was deleted after this run pinned it; {NEW_RUN} the model as it is now")
    return ObjectChangedError(
        f"{what} changed after this run pinned it (version {pinned_version}, now {now}); {NEW_RUN} the new model"
    )


__all__ = ["NEW_RUN", "changed", "describe", "local_path", "location", "pinned", "read", "resolve"]
