"""Where a run's data and state live: on this host, or on object storage behind a mirror on this host.

``model.path``, ``input.path`` and ``output.path`` may be URIs of object storage. Planning, scoring and
merging work on local paths only (the containers mount them): :func:`place` gives each task a
:class:`Placement`, whose :attr:`~Placement.spec` is the deployment with every path local, and which moves
data between the two:

* **input** on object storage: each score task stages the objects of its mini-batch
  (:mod:`batchscore.staging`) into ``<mirror>/_batchscore/input/<mini-batch>/``, which it removes after
  the try; the mini-batch's file list there points at the staged copies (``target``);
* **model**: the one the run pinned when it was planned (:mod:`batchscore.model_pin`); on object storage
  fetched once per worker host and version into ``<scratch>/models/<URI hash>/<versions hash>/``
  (:func:`fetch_model`); a serving archive is then unpacked once per run as a local one is;
* **output** (the run folder) on object storage: each host works in a mirror,
  ``<scratch>/runs/<deployment>-<URI hash>/<run key>/``, and the run folder on object storage is the
  record. The plan uploads its mini-batch files, then ``plan.json`` (the plan's commit); a score task
  claims its mini-batch there (``attempt.json``) and withdraws its status, scores in the mirror, then
  uploads the result and custom outputs, then ``status.json``: the status write is the commit, as in
  :mod:`batchscore_runtime.formats`. A later try's claim stops an earlier one from committing. The
  merge downloads the committed results, merges in the mirror and uploads the output, the records, and
  ``summary.json`` last. No two Airflow workers need to share a folder; XCom carries what it did.

``<scratch>`` is ``BATCHSCORE_SCRATCH_DIR`` (default ``<temp>/batchscore``): a folder of the worker host
that the Docker engine can mount (see :mod:`batchscore.hostpaths` for workers in containers).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airflow.sdk import ObjectStoragePath

from batchscore import model_pin, object_input, staging, storage
from batchscore.errors import ObjectChangedError, ScoringError, StorageError, StorageNotFoundError
from batchscore.output_log import log_file_name
from batchscore.plan import InputSource, run_layout
from batchscore.scratch import SCRATCH_DIR_ENV, locked, mirrors_root, scratch_root
from batchscore.spec.deployment import DeploymentSpec
from batchscore_runtime.formats import (
    InputFile,
    MiniBatchDir,
    MiniBatchStatus,
    ModelPin,
    Plan,
    RunLayout,
    Summary,
    mini_batch_id,
    read_mini_batch_file,
    run_key,
    write_json_atomic,
)

log = logging.getLogger(__name__)

INPUT_DIR_NAME = "input"


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- model


def fetch_model(deployment: DeploymentSpec, pin: ModelPin, log_to: Any = log) -> Path:
    """The local copy of the run's pinned model on object storage: fetched once per host and version, then reused.

    Exactly the object versions the run pinned (:mod:`batchscore.model_pin`) are downloaded, each with its
    version token (a conditional GET on S3); one that changed or is gone since fails with the deployment, key
    and what to do. The cache key is the model's URI and those version tokens: any task of any run on this
    host that pinned the same versions reuses the copy, without a request. One object (a ``model.tar.gz``)
    comes back as that file; a prefix as a folder of its objects. Made readable by any user (the container's).
    """
    where = model_pin.location(pin)
    single = pin.kind == ModelPin.OBJECT
    key = _digest(pin.location, *(f"{o.name}={o.version}" for o in pin.objects))
    folder = scratch_root() / "models" / _digest(pin.location) / key
    wanted = folder / pin.objects[0].name if single else folder
    if (folder / ".complete").is_file():
        return wanted
    with locked(folder.with_name(f"{key}.lock")):
        if (folder / ".complete").is_file():
            return wanted
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=folder.parent))
        try:
            for o in pin.objects:
                obj = where if single else where / o.name
                dest = staging.local_path(tmp, o.name, "model object")
                try:
                    storage.retrying(
                        functools.partial(storage.download, obj, dest, o.version), f"fetching {storage.display(obj)}", log_to
                    )
                except ObjectChangedError:
                    raise model_pin.changed(deployment, obj, o.version) from None
            for p in [tmp, *tmp.rglob("*")]:
                p.chmod(0o755 if p.is_dir() else 0o644)
            (tmp / ".complete").write_text(json.dumps({"uri": pin.location, "objects": len(pin.objects)}))
            if folder.exists():
                shutil.rmtree(folder)
            os.rename(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log_to.info("Fetched the model %s (%d objects) into %s", storage.display(where), len(pin.objects), folder)
    return wanted


# ---------------------------------------------------------------------------------------------- placement


@dataclass(frozen=True)
class Placement:
    """A deployment's paths for one run on this host, and the transfers between them and object storage.

    :param spec: the deployment with every path local: what plan, score and merge read.
    :param original: the deployment as the run sees it (URIs).
    :param run_id: the Airflow run.
    :param remote_run: the run folder on object storage (``<output.path>/<run key>/``); ``None``: local.
    """

    spec: DeploymentSpec
    original: DeploymentSpec
    run_id: str
    remote_run: ObjectStoragePath | None = None

    @property
    def layout(self) -> RunLayout:
        """The run folder on this host (the mirror, when the run folder is on object storage)."""
        return run_layout(self.spec, self.run_id)

    @property
    def input_remote(self) -> bool:
        return self.original.input_spec.remote

    def input_source(self) -> InputSource | None:
        """What the plan lists: ``None`` for a local input folder (the plan's own walk)."""
        return object_input.source(self.original) if self.input_remote else None

    def where(self) -> str:
        """The run folder for messages: its URI (with the connection), or its path."""
        return storage.display(self.remote_run) if self.remote_run is not None else str(self.layout.root)

    def _remote(self, local: Path) -> ObjectStoragePath:
        assert self.remote_run is not None
        return self.remote_run / local.relative_to(self.layout.root).as_posix()

    def _push(self, local: Path) -> None:
        target = self._remote(local)
        storage.retrying(lambda: storage.upload(local, target), f"uploading {local.name}")

    def _pull(self, local: Path) -> bool:
        """Download the run folder's object for ``local``; False (and ``local`` removed) when there is none."""
        if self._pull_as(local, local):
            return True
        local.unlink(missing_ok=True)
        return False

    # ------------------------------------------------------------------------------------------ model

    def pin_model(self, log_to: Any = log) -> ModelPin:
        """The model this run scores with: its pin in the run folder, made now if no task of the run has
        (:mod:`batchscore.model_pin`)."""
        layout = self.layout
        where = self._remote(layout.model_pin_file) if self.remote_run is not None else storage.location(layout.model_pin_file)
        return model_pin.pinned(self.original, where, log_to)

    def with_model(self, log_to: Any = log) -> Placement:
        """This placement with the run's pinned model in :attr:`spec`: its local path, or its local copy (fetched)."""
        pin = self.pin_model(log_to)
        if pin.kind != ModelPin.LOCAL:
            path = fetch_model(self.original, pin, log_to)
        else:
            path = model_pin.local_path(self.original, pin)
        model = self.spec.model.model_copy(update={"path": path, "connection": None, "version": pin.model_version})
        return dataclasses.replace(self, spec=self.spec.model_copy(update={"model": model}))

    # ------------------------------------------------------------------------------------------ plan

    def pull_plan(self) -> Plan | None:
        """The run's plan from object storage into the mirror (with its mini-batch files); ``None`` if not made."""
        if self.remote_run is None:
            return self.layout.read_plan()
        layout = self.layout
        plan_file = layout.plan_file
        tmp = plan_file.with_name(".plan.pulled")
        if not self._pull_as(plan_file, tmp):
            plan_file.unlink(missing_ok=True)
            return None
        plan = Plan.from_json(json.loads(tmp.read_text(encoding="utf-8")))
        _in_parallel(self._pull, [layout.mini_batch_file(e.index) for e in plan.mini_batches])
        os.replace(tmp, plan_file)  # last, as the plan writes it
        return plan

    def peek_plan(self) -> Plan | None:
        """The run's plan if it is complete, ``None`` if not (yet); writes nothing in the mirror.

        For start_workers, which runs while the plan task writes the plan: :meth:`pull_plan` would
        remove the mirror's ``plan.json`` that the plan task has written and not yet uploaded.
        """
        if self.remote_run is None:
            return self.layout.read_plan()
        work = self.layout.work
        work.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".plan.peek-", dir=work)
        os.close(fd)
        tmp = Path(name)
        try:
            if not self._pull_as(self.layout.plan_file, tmp):
                return None
            return Plan.from_json(json.loads(tmp.read_text(encoding="utf-8")))
        finally:
            tmp.unlink(missing_ok=True)

    def _pull_as(self, local: Path, as_file: Path) -> bool:
        """Download the run folder's object for ``local`` into ``as_file``; False when there is none."""
        source = self._remote(local)
        try:
            storage.retrying(lambda: storage.download(source, as_file), f"downloading {local.name}")
        except StorageNotFoundError:
            return False
        return True

    def push_plan(self, plan: Plan) -> None:
        """Upload the mini-batch files, then ``plan.json``: its presence marks a complete plan there too."""
        if self.remote_run is None:
            return
        layout = self.layout
        _in_parallel(self._push, [layout.mini_batch_file(e.index) for e in plan.mini_batches])
        self._push(layout.plan_file)
        log.info("Run folder: %s", self.where())

    # ------------------------------------------------------------------------------------------ score

    def prepare_mini_batch(self, index: int, attempt: int) -> None:
        """Before try ``attempt`` of mini-batch ``index``: its file list in the mirror, this try's claim on object
        storage and the withdrawal of the status there (a crash can then never leave an old one looking current)."""
        if self.remote_run is None:
            return
        layout = self.layout
        if not self._pull(layout.mini_batch_file(index)):
            raise ScoringError(
                f"{mini_batch_id(index)}: its file list is missing in {self.where()}; the plan of run "
                f"{self.run_id!r} was removed or never finished (clear the plan task of this run as well)"
            )
        result_dir = layout.mini_batch_dir(index)
        claim = result_dir.path / MiniBatchDir.CLAIM
        write_json_atomic(claim, {"attempt": attempt}, indent=None)
        self._push(claim)
        storage.delete(self._remote(result_dir.status_file))

    def stage_inputs(self, index: int, log_to: Any) -> None:
        """Stage the mini-batch's input objects (input on object storage; else nothing to do)."""
        if self.input_remote:
            self._stage(index, log_to)

    def staged_dir(self, index: int) -> Path:
        return self.spec.input_spec.local / mini_batch_id(index)

    def _stage(self, index: int, log_to: Any) -> None:
        """Download the mini-batch's objects; rewrite its file list in the mirror to read the staged copies."""
        mini_batch_file = self.layout.mini_batch_file(index)
        planned = read_mini_batch_file(mini_batch_file)
        # As planned: what an earlier try of this host staged (targets, refusals of changed objects) is checked anew.
        planned = dataclasses.replace(planned, files=[_as_planned(f) for f in planned.files])
        target = self.staged_dir(index)
        shutil.rmtree(target, ignore_errors=True)
        source = object_input.input_location(self.original)
        staged = staging.stage_files(source, planned.files, target, log_to=log_to)
        prefix = mini_batch_id(index)
        files = [f if f.refused is not None else dataclasses.replace(f, target=f"{prefix}/{f.path}") for f in staged]
        for f in staged:
            if f.refused is not None and f.refused_type is not None:
                log_to.warning("%s: NOT SCORED: %s", f.path, f.refused)
        write_json_atomic(mini_batch_file, dataclasses.replace(planned, files=files).to_json(), indent=None)
        log_to.info(
            "Staged %d input object(s) of %s (%d bytes) into %s",
            sum(1 for f in files if f.refused is None),
            prefix,
            sum(f.size for f in files if f.refused is None),
            target,
        )

    def finish_mini_batch(self, index: int, attempt: int, log_to: Any, *, failing: bool = False) -> None:
        """After try ``attempt``, whatever its fate: upload what it committed in the mirror (result, custom outputs,
        output log), then its status (the commit), unless a later try has claimed the mini-batch; remove the
        staged inputs. An upload that fails raises :class:`StorageError`: the status is not written, so no
        half result is ever committed. ``failing``: the try is failing already; an upload error is logged, and
        the try's own error is the one raised."""
        try:
            if self.remote_run is not None:
                self._commit(index, attempt, log_to)
        except (StorageError, ScoringError) as exc:
            if not failing:
                raise
            log_to.error("%s: its failed status could not be recorded in %s: %s", mini_batch_id(index), self.where(), exc)
        finally:
            if self.input_remote:
                shutil.rmtree(self.staged_dir(index), ignore_errors=True)

    def _commit(self, index: int, attempt: int, log_to: Any) -> None:
        result_dir = self.layout.mini_batch_dir(index)
        status = result_dir.read_status()
        if status is None or status.attempt != attempt:
            return  # nothing committed by this try (the task was killed before)
        claim = result_dir.path / MiniBatchDir.CLAIM
        owner = read_claim(self._remote(claim))
        if owner is not None and owner != attempt:
            raise ScoringError(
                f"{mini_batch_id(index)}: try {attempt} does not commit its result: try {owner} of this mini-batch has "
                f"taken over (in {self.where()})"
            )
        pushed = _committed_files(result_dir, status, attempt)
        _in_parallel(self._push, pushed)
        self._push(result_dir.status_file)  # the commit, once everything it names is there
        log_to.info("Committed %s (%s) to %s", mini_batch_id(index), status.state, self.where())
        for path in pushed:  # the record is on object storage now: the host keeps no copy of the data
            path.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------ merge

    def pull_results(self) -> None:
        """Into the mirror: the plan, each mini-batch's committed status and what it names (result, custom
        outputs); a mini-batch with no status there has none here either. Files already here under the same
        name are not fetched again (a result's name is new for every try). Output logs stay on object storage."""
        if self.remote_run is None:
            return
        plan = self.pull_plan()
        if plan is None:
            return  # open_run says the plan is missing
        layout = self.layout
        self._pull(layout.collected_file)
        self._pull(layout.model_pin_file)
        _in_parallel(self._pull_committed, [layout.mini_batch_dir(e.index) for e in plan.mini_batches])

    def _pull_committed(self, result_dir: MiniBatchDir) -> None:
        """One mini-batch's committed status and the result and custom outputs it names (the merge reads those)."""
        result_dir.path.mkdir(parents=True, exist_ok=True)
        if not self._pull(result_dir.status_file):
            return
        status = result_dir.read_status()
        assert status is not None
        wanted: list[Path] = []
        if status.result_file:
            wanted.append(staging.local_path(result_dir.path, status.result_file, "result file"))
        if status.outputs_dir:
            folder = staging.local_path(result_dir.path, status.outputs_dir, "custom outputs folder")
            for obj in storage.list_objects(self._remote(folder)):
                wanted.append(staging.local_path(folder, obj.name, "custom output"))
        for local in wanted:
            if not local.is_file():  # a result's name is new for every try: one here is that result
                self._pull(local)

    def push_merge(self, previous_collected: set[str] | None = None) -> Summary | None:
        """Upload the merge's output, records and custom outputs, then ``summary.json`` (with the URIs of
        what it names) last; remove custom outputs an earlier merge placed that this one did not."""
        layout = self.layout
        summary = layout.read_summary()
        if self.remote_run is None or summary is None:
            return summary
        collected = _collected(layout)
        for name in sorted((previous_collected or set()) - collected):
            storage.delete(self._remote(layout.root / name))
        names = [layout.ledger_file.name, layout.errors_file.name, *sorted(collected)]
        if summary.output:
            names.insert(0, Path(summary.output).name)
        files = [layout.root / name for name in names]
        _in_parallel(self._push, [f for f in [*files, layout.collected_file] if f.is_file()])
        root = storage.uri_of(self.remote_run)
        summary = dataclasses.replace(
            summary,
            run_folder=root,
            output=f"{root}/{Path(summary.output).name}" if summary.output else None,
            ledger=f"{root}/{layout.ledger_file.name}",
            errors=f"{root}/{layout.errors_file.name}",
        )
        summary.write(layout.summary_file)
        self._push(layout.summary_file)  # the merge's commit
        log.info("Uploaded the output, %d other file(s) and summary.json (last) to %s", len(names), self.where())
        self._drop_copies(names)
        return summary

    def _drop_copies(self, names: list[str]) -> None:
        """Remove the mirror's copies of the data once the run folder on object storage holds them."""
        layout = self.layout
        for name in names:
            (layout.root / name).unlink(missing_ok=True)
        shutil.rmtree(layout.results_dir, ignore_errors=True)

    def summary_location(self) -> str:
        """Where the run's ``summary.json`` is: a URI, or a path."""
        if self.remote_run is None:
            return str(self.layout.summary_file)
        return f"{storage.uri_of(self.remote_run)}/{self.layout.summary_file.name}"

    def read_summary(self) -> Summary | None:
        """The run's committed summary, read where it lives; ``None`` before the first merge."""
        if self.remote_run is None:
            return self.layout.read_summary()
        try:
            data = storage.read_bytes(self._remote(self.layout.summary_file))
        except StorageNotFoundError:
            return None
        return Summary.from_json(json.loads(data))

    def previous_collected(self) -> set[str]:
        return _collected(self.layout)

    def on_remote(self, message: str) -> str:
        """A message of the local code with the mirror's path replaced by the run folder's URI."""
        if self.remote_run is None:
            return message
        return message.replace(str(self.layout.root), storage.uri_of(self.remote_run))


#: Transfers of one task at once (small objects: the round trips, not the bandwidth, are the cost).
PARALLEL_TRANSFERS = 8


def _in_parallel(transfer: Any, items: list[Any]) -> None:
    """``transfer(item)`` for every item, :data:`PARALLEL_TRANSFERS` at once; the first error is raised."""
    if len(items) <= 1:
        for item in items:
            transfer(item)
        return
    with ThreadPoolExecutor(max_workers=min(PARALLEL_TRANSFERS, len(items)), thread_name_prefix="transfer") as pool:
        for _ in pool.map(transfer, items):
            pass


def _as_planned(f: InputFile) -> InputFile:
    if f.refused_type == InputFile.OBJECT_CHANGED:
        f = dataclasses.replace(f, refused=None, refused_type=None)
    return dataclasses.replace(f, target=None) if f.target is not None else f


def read_claim(path: ObjectStoragePath) -> int | None:
    try:
        return int(json.loads(storage.read_bytes(path))["attempt"])
    except StorageNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return None


def _committed_files(result_dir: MiniBatchDir, status: MiniBatchStatus, attempt: int) -> list[Path]:
    """What a committed status names, plus the try's output logs: the files to upload before the status."""
    files: list[Path] = []
    result = result_dir.result_path(status)
    if result is not None and result.is_file():
        files.append(result)
    outputs = result_dir.outputs_path(status)
    if outputs is not None and outputs.is_dir():
        files += sorted(p for p in outputs.rglob("*") if p.is_file() and not p.is_symlink())
    log_file = result_dir.path / log_file_name(attempt)  # the container's whole output, secrets redacted
    if log_file.is_file():
        files.append(log_file)
    return files


def _collected(layout: RunLayout) -> set[str]:
    try:
        return set(json.loads(layout.collected_file.read_text(encoding="utf-8")).get("files", []))
    except (FileNotFoundError, ValueError, AttributeError):
        return set()


def place(deployment: DeploymentSpec, run_id: str, *, fetch: bool = False, log_to: Any = log) -> Placement:
    """The :class:`Placement` of ``deployment`` for run ``run_id`` on this host.

    :param fetch: the task runs the model (score and warm-worker tasks; the plan, for a serving archive, which it
        unpacks): :attr:`Placement.spec` has the run's pinned model (:meth:`Placement.with_model`), pinned now if
        no task of the run has, and fetched when it is on object storage.
    """
    if not (deployment.input_spec.remote or deployment.output_spec.remote):
        placement = Placement(deployment, deployment, run_id)
        return placement.with_model(log_to) if fetch else placement
    update: dict[str, Any] = {}
    remote_run = None
    if deployment.output_spec.remote:
        where = storage.location(str(deployment.output_spec.path), deployment.output_spec.connection)
        mirror = mirrors_root() / f"{deployment.name}-{_digest(storage.uri_of(where))}"
        update["output"] = deployment.output_spec.model_copy(update={"path": mirror, "connection": None})
        remote_run = where / run_key(run_id)
    else:
        mirror = deployment.output_spec.local
    if deployment.input_spec.remote:
        staged = RunLayout(mirror / run_key(run_id)).work / INPUT_DIR_NAME
        staged.mkdir(parents=True, exist_ok=True)
        staged.chmod(0o755)
        update["input"] = deployment.input_spec.model_copy(update={"path": staged, "connection": None})
    placement = Placement(deployment.model_copy(update=update), deployment, run_id, remote_run)
    return placement.with_model(log_to) if fetch else placement


__all__ = ["SCRATCH_DIR_ENV", "Placement", "fetch_model", "place", "read_claim", "scratch_root"]
