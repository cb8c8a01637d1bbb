"""Azure's model references, ``azureml:<name>@latest`` and ``azureml:<name>:<version>``, resolved against a model registry.

The registry is a folder, or a prefix on object storage, named by ``BATCHSCORE_MODEL_REGISTRY`` and holding
one folder per registered version: ``<registry>/<name>/<version>/``. Where a reference is resolved:

* **local registry**: when the YAML loads (:func:`reference_model`), so the DAG shows the version it runs
  and a missing name or version is an error of the file, with its line and key;
* **registry on object storage**: ``:<version>`` becomes the URI ``<registry>/<name>/<version>`` when the
  YAML loads (no network at parse time), fetched by the tasks as any model on object storage;
  ``@latest`` becomes ``<registry>/<name>`` with ``version: latest`` and is resolved once per run, when
  the run pins its model (:mod:`batchscore.model_pin`, which lists the versions with :func:`pick_version`).

Either way a run scores with one model: the one pinned in its run folder when it started, whatever the
registry holds by the time a task runs or reruns.

``latest`` is the highest version: compared as numbers when every version is a whole number (``10`` after
``9``), else in natural order (runs of digits compared as numbers, ``1.10`` after ``1.9``). No Airflow here.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from batchscore.spec.paths import REMOTE_SCHEMES, uri_scheme

#: Environment variable: the model registry's root, a folder or a URI (``s3://bucket/models``).
MODEL_REGISTRY_ENV = "BATCHSCORE_MODEL_REGISTRY"
#: What ``model.version`` says when the highest version is to be taken when a run pins its model.
LATEST = "latest"
_REFERENCE = re.compile(
    r"azureml:(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*)(?:@(?P<label>[A-Za-z0-9_.-]+)|:(?P<version>[A-Za-z0-9_.-]+))"
)
_FORM = "azureml:<name>@latest or azureml:<name>:<version>"


@dataclass(frozen=True)
class ModelReference:
    """A parsed ``azureml:`` model reference: the model's name and its version (``latest``: the highest)."""

    text: str
    name: str
    version: str

    @property
    def latest(self) -> bool:
        return self.version == LATEST


def is_reference(value: object) -> bool:
    """Whether ``value`` is written as an Azure registry reference (``azureml:...``)."""
    return isinstance(value, str) and value.startswith("azureml:")


def parse_reference(text: str) -> ModelReference:
    """The name and version of ``azureml:<name>@latest`` or ``azureml:<name>:<version>``; ValueError otherwise."""
    if text.startswith("azureml://"):
        raise ValueError(
            f"model {text!r} is a reference to an Azure registry or workspace URI, which batchscore cannot reach; "
            f"write {_FORM} to use BATCHSCORE_MODEL_REGISTRY, or give model.path"
        )
    match = _REFERENCE.fullmatch(text)
    if match is None:
        raise ValueError(f"model {text!r} is not a model reference: write {_FORM}, or a mapping with path")
    label = match["label"]
    if label is not None and label != LATEST:
        raise ValueError(f"model {text!r}: the only label batchscore knows is @latest; write {_FORM}")
    return ModelReference(text=text, name=match["name"], version=match["version"] or LATEST)


def registry_root(reference: ModelReference) -> str:
    """``BATCHSCORE_MODEL_REGISTRY`` as written, without a trailing ``/``; ValueError naming it when unset."""
    root = os.environ.get(MODEL_REGISTRY_ENV, "").strip()
    if not root:
        raise ValueError(
            f"model {reference.text!r} refers to a registered model, but {MODEL_REGISTRY_ENV} is not set; set it to "
            "the folder (or s3://, gs://, abfs:// URI) that holds the models as <name>/<version>/ folders, "
            "or give model.path"
        )
    return root.rstrip("/") or "/"


def registry_is_remote(root: str) -> bool:
    """Whether the registry's root is on object storage."""
    return uri_scheme(root) in REMOTE_SCHEMES


def _natural(version: str) -> list[tuple[int, int | str]]:
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", version) if part]


def sorted_versions(versions: Iterable[str]) -> list[str]:
    """Versions from lowest to highest: as numbers when all are whole numbers, else in natural order."""
    found = sorted(set(versions))
    if found and all(v.isdigit() for v in found):
        return sorted(found, key=int)
    return sorted(found, key=_natural)


def pick_version(reference: ModelReference, root: str, names: Iterable[str], versions: Iterable[str]) -> str:
    """The version ``reference`` resolves to, given the registry's model ``names`` and the ``versions`` of its name.

    Raises ValueError naming the registry and what it holds: the names ("did you mean") when the name is
    missing, the versions when the version is.
    """
    names = sorted(set(names))
    where = f"the registry {root} ({MODEL_REGISTRY_ENV})"
    if reference.name not in names:
        close = difflib.get_close_matches(reference.name, names, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        holds = f"it holds {', '.join(names)}" if names else "it holds no model"
        raise ValueError(f"model {reference.text!r}: {where} has no model {reference.name!r}; {hint}{holds}")
    ordered = sorted_versions(versions)
    if not ordered:
        raise ValueError(
            f"model {reference.text!r}: {where} has no version of {reference.name!r}; "
            f"register one as {root}/{reference.name}/<version>/"
        )
    if reference.latest:
        return ordered[-1]
    if reference.version not in ordered:
        raise ValueError(
            f"model {reference.text!r}: {where} has no version {reference.version!r} of {reference.name!r}; "
            f"available versions: {', '.join(ordered)}"
        )
    return reference.version


def _folders(path: Path) -> list[str]:
    try:
        return [p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except OSError:
        return []


def reference_model(text: str) -> dict[str, str]:
    """The ``model`` mapping an ``azureml:`` reference stands for: ``path``, ``name``, ``version``, ``reference``.

    A local registry is read now; on object storage the path is built without reading it (see the module).
    """
    reference = parse_reference(text)
    root = registry_root(reference)
    model = {"name": reference.name, "reference": text}
    if registry_is_remote(root):
        if reference.latest:
            return {**model, "path": f"{root}/{reference.name}", "version": LATEST}
        return {**model, "path": f"{root}/{reference.name}/{reference.version}", "version": reference.version}
    if uri_scheme(root) not in ("", "file"):
        raise ValueError(f"{MODEL_REGISTRY_ENV} is {root!r}: use a folder or an s3://, gs://, abfs:// URI")
    folder = Path(root.split("://", 1)[1] if uri_scheme(root) == "file" else root)
    if not folder.is_absolute():
        raise ValueError(f"{MODEL_REGISTRY_ENV} is {root!r}: give an absolute path (or a URI)")
    if not folder.is_dir():
        raise ValueError(f"model {text!r}: {MODEL_REGISTRY_ENV} is {root}, which is not a folder; create it or fix the variable")
    version = pick_version(reference, root, _folders(folder), _folders(folder / reference.name))
    return {**model, "path": str(folder / reference.name / version), "version": version}


__all__ = [
    "LATEST",
    "MODEL_REGISTRY_ENV",
    "ModelReference",
    "is_reference",
    "parse_reference",
    "pick_version",
    "reference_model",
    "registry_is_remote",
    "registry_root",
    "sorted_versions",
]
