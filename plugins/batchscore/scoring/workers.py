"""The warm workers of one run on the Docker host: start them, find a free one, hand it a mini-batch, remove them.

``settings.worker_mode: warm`` gives each run of a deployment up to ``resources.instance_count``
worker *slots*. Slot ``k`` is one container named ``batchscore-<pool digest>-w<k>`` (the run's digest;
for a run folder on object storage, mirrored per host folder, the run's and that folder's; for the
serving contract, two: the serving container ``...-w<k>-serve`` and the client that shares its
network), running :mod:`batchscore_runtime.warm`'s daemon. The name is the slot's lock: Docker
refuses a second container of the same name, so two tasks that replace a dead worker at once
start one. Workers are found by name and by their labels, on any Airflow worker that talks to
the same Docker engine; no state is kept in Airflow.

A mini-batch is handed over with ``docker exec`` (``warm submit``), which works wherever the
Docker API reaches: the Airflow worker never opens a connection to a container. The worker's
state (``starting``, ``ready``, ``failed``) is read from its state file in the run folder.
A serving container that exits is seen at the next look at its slot (the client cannot see it,
and would wait for ``/ping`` until ``init_timeout``): its client is stopped, and the failure
names the exit code and the last log lines. A worker that cannot start leaves no container.

The docker SDK only: no Airflow import.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from docker.errors import APIError, NotFound

from batchscore import containers, security
from batchscore.containers import ROLE_LABEL, ImageMissingError, explain_exit
from batchscore.engine import engine_identity
from batchscore.errors import ScoringError
from batchscore.gpu_holder import lease_for_worker, release
from batchscore.intake import remove_scratch
from batchscore.scoring.handover import protocol_line, read_record
from batchscore.scratch import is_mirror, locked
from batchscore.spec.deployment import DeploymentSpec
from batchscore_runtime.formats import RunLayout, write_json_atomic
from batchscore_runtime.warm import STATE_FILE
from batchscore_runtime.warm_protocol import EXIT_LOST, EXIT_REFUSED
from batchscore_runtime.worker_state import WorkerState

log = logging.getLogger(__name__)

WORKER_ROLE = containers.WARM_WORKER
SERVING_ROLE = containers.WARM_SERVING
RUN_LABEL = "batchscore.warm_run"
LOG_TAIL_LINES = 15
#: Seconds a worker container may stay created and not started (Docker's ``created``) before it counts as dead:
#: the task that created it starts it a moment later, unless that task died in between.
CREATED_GRACE = 60.0


class WarmWorkerError(ScoringError):
    """A warm worker could not be started or got lost; the message names it and says why."""


def run_digest(endpoint_name: str, deployment: str, run_id: str, *more: str) -> str:
    """12 hex digits naming one run of one deployment (container names allow few characters)."""
    return hashlib.sha256("\0".join((endpoint_name, deployment, run_id, *more)).encode()).hexdigest()[:12]


def slot_name(slot: int) -> str:
    """The worker's name in logs and records: ``w1`` for slot 0."""
    return f"w{slot + 1}"


@dataclass
class Slot:
    """What the Docker host and the state file say of one worker slot now."""

    slot: int
    container: dict[str, Any] | None  # docker inspect of the worker container; None: there is none
    state: WorkerState | None

    @property
    def name(self) -> str:
        return slot_name(self.slot)

    @property
    def running(self) -> bool:
        return bool(self.container and self.container["State"].get("Running"))

    @property
    def ready(self) -> bool:
        return self.running and self.state is not None and self.state.state == WorkerState.READY

    @property
    def answered(self) -> bool:
        """Whether the worker got ready once (its init(), or its serving container's /ping, is done)."""
        return self.state is not None and self.state.init_seconds is not None

    @property
    def starting(self) -> bool:
        return self.running and (self.state is None or self.state.state == WorkerState.STARTING)

    @property
    def being_started(self) -> bool:
        """Created by another task, which starts it a moment later: neither dead nor to be replaced.

        Docker says ``created`` (exit code 0, not running) between a container's create and its start; a task
        that took that for a dead worker would remove it under the task starting it. Past
        :data:`CREATED_GRACE` seconds the task that created it is taken to be gone.
        """
        return self.never_started and created_seconds_ago(self.container) < CREATED_GRACE

    @property
    def never_started(self) -> bool:
        return self.container is not None and self.container["State"].get("Status") == "created"


def created_seconds_ago(container: dict[str, Any] | None) -> float:
    """Seconds since Docker created ``container`` (an inspect), by this host's clock; infinite when unknown."""
    try:
        created = datetime.fromisoformat(str((container or {})["Created"]))
    except (KeyError, ValueError):
        return float("inf")
    return max(0.0, (datetime.now(UTC) - created).total_seconds())


@dataclass(frozen=True)
class Outcome:
    """What ``submit`` said: taken or refused, and how the mini-batch ended."""

    accepted: bool
    exit_code: int | None = None
    state: str = ""  # why it was refused: busy, starting, stopped; cancelled, lost (after it was queued)
    queued: bool = False  # it waited in the worker's queue (and, when not accepted, left it without starting)


class WarmWorkers:
    """The warm workers of one run of one deployment on one Docker engine."""

    def __init__(
        self,
        cli: Any,
        spec: DeploymentSpec,
        endpoint_name: str,
        run_id: str,
        layout: RunLayout,
        *,
        log: Any = log,
        model_dir: Path | None = None,
        secrets: dict[str, str] | None = None,
        user: str | None = None,
    ):
        self.cli = cli
        self.spec = spec
        self.endpoint_name = endpoint_name
        self.run_id = run_id
        self.layout = layout
        self.log = log
        self.model_dir = model_dir  # serving contract: the folder mounted at /opt/ml/model
        self.secrets = secrets or {}
        self.user = user or security.container_user()
        self.digest = run_digest(endpoint_name, spec.name, run_id)  # the run's: every pool of the run has it as a label
        # A run folder on object storage is mirrored per host folder (BATCHSCORE_SCRATCH_DIR): Airflow workers that
        # share an engine but not that folder each get a pool of their own, whose containers mount their folders.
        self.pool = run_digest(endpoint_name, spec.name, run_id, str(layout.root)) if is_mirror(layout.root) else self.digest
        self._image = self.spec.environment.image  # the worker container's, once one is started

    # ------------------------------------------------------------------ names and state

    @property
    def slots(self) -> int:
        return self.spec.resources.instance_count

    def container_name(self, slot: int) -> str:
        return f"batchscore-{self.pool}-{slot_name(slot)}"

    def serving_name(self, slot: int) -> str:
        return f"{self.container_name(slot)}-serve"

    def state_dir(self, slot: int) -> Path:
        return self.layout.workers_dir / slot_name(slot)

    def scratch_dir(self, slot: int) -> Path:
        """Where the worker of ``slot`` writes its mini-batches' results, one sub-folder each (untrusted)."""
        return self.layout.worker_scratch(slot_name(slot))

    def labels(self, slot: int) -> dict[str, str]:
        """The labels of the slot's containers (:mod:`batchscore.containers` adds each one's role)."""
        return {
            "batchscore.endpoint": self.endpoint_name,
            "batchscore.deployment": self.spec.name,
            "batchscore.run_id": self.run_id,
            "batchscore.worker": slot_name(slot),
            RUN_LABEL: self.digest,
        }

    def inspect(self, name: str) -> dict[str, Any] | None:
        try:
            return self.cli.inspect_container(name)
        except NotFound:
            return None

    def slot(self, slot: int) -> Slot:
        return Slot(slot, self.inspect(self.container_name(slot)), WorkerState.read(self.state_dir(slot) / STATE_FILE))

    def settled(self, slot: int, wait: float = 10.0) -> Slot:
        """The slot once its container has finished dying (a hand-over that broke off means it is going)."""
        try:
            self.cli.wait(self.container_name(slot), timeout=wait)
        except Exception:  # noqa: BLE001 - still running after `wait` s, or already removed
            pass
        return self.slot(slot)

    def all_slots(self) -> list[Slot]:
        return [self.slot(k) for k in range(self.slots)]

    def containers(self) -> list[dict[str, Any]]:
        """Every container of this run's workers (also stopped ones), as ``docker ps -a`` lists them."""
        return self.cli.containers(all=True, filters={"label": f"{RUN_LABEL}={self.digest}"})

    # ------------------------------------------------------------------ the engine

    def engine(self) -> dict[str, str]:
        """The Docker engine this process reaches: its id and its host's name."""
        return engine_identity(self.cli)

    def record_engine(self) -> None:
        """Say where the run's workers run (start_workers), for score tasks on other hosts."""
        write_json_atomic(self.layout.workers_engine_file, self.engine())

    def started_elsewhere(self) -> tuple[dict[str, str], dict[str, str]] | None:
        """(the engine the run's workers were started on, this process's engine) when they differ."""
        try:
            recorded = json.loads(self.layout.workers_engine_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        here = self.engine()
        return None if recorded.get("id") == here["id"] else (recorded, here)

    # ------------------------------------------------------------------ start

    def start(self, slot: int) -> bool:
        """Start the worker of ``slot`` (and its serving container); False when another task already did, or does.

        Starting a slot wipes its state and scratch folders first, which must never happen under a worker that
        another task has just created or started there (its mounts would point at removed folders). So one task
        of this host at a time starts a slot (a lock file beside the slots' folders), and not while a container
        of that name is there: a dead one is removed by :meth:`replace` first.
        """
        with locked(self.layout.workers_dir / f".{slot_name(slot)}.start.lock"):
            if self.inspect(self.container_name(slot)) is not None:
                return False
            return self._start(slot)

    def _start(self, slot: int) -> bool:
        state_dir = self.state_dir(slot)
        state_dir.mkdir(parents=True, exist_ok=True)
        # Mounted read-only: it must exist (as this user's, for the plan to write into) before the plan does.
        self.layout.mini_batches_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / STATE_FILE).unlink(missing_ok=True)
        security.make_writable_for(state_dir, self.user)
        # A fresh scratch folder: nothing a worker of this slot left there before is read.
        scratch = self.scratch_dir(slot)
        remove_scratch(scratch.parent, scratch.name)
        scratch.mkdir(parents=True)
        security.make_writable_for(scratch, self.user)
        serving_id = None
        # The GPUs go to the container that loads the model: the worker, or the serving container.
        holds = self.serving_name(slot) if self.spec.contract == "serve" else self.container_name(slot)
        gpus, gpu_count, holder = lease_for_worker(
            self.spec, holds, f"{self.endpoint_name}/{self.spec.name}/{self.run_id}/{slot_name(slot)}", self.log
        )
        try:
            if self.spec.contract == "serve":
                serving_id = self._create_serving(slot, gpus)
                if serving_id is None:
                    release(holder)
                    return False
            worker = containers.warm_worker(
                self.spec, self.layout, slot_name(slot), user=self.user, labels=self.labels(slot),
                devices=gpus, gpu_count=gpu_count, serving_id=serving_id,
            )  # fmt: skip
            self._image = worker.image
            created = {"Id": worker.create(self.cli, name=self.container_name(slot), secrets=self.secrets)}
        except (APIError, ImageMissingError) as exc:
            release(holder)  # never keep a lease for a container that is not ours, or not started
            if serving_id is not None:
                self._remove(serving_id)  # no client: its serving container must not stay behind either
            if isinstance(exc, ImageMissingError):
                raise WarmWorkerError(f"worker {slot_name(slot)}: {exc}") from None
            if exc.status_code == 409:  # the name is taken: another task started this slot a moment ago
                return False
            raise
        try:
            self.cli.start(created["Id"])
        except APIError as exc:
            mine = self.inspect(created["Id"])
            if mine is None or mine["State"].get("Status") in ("removing", "dead"):
                # Another task took it for a dead worker (it stayed created past CREATED_GRACE) and replaces it.
                release(holder)
                if serving_id is not None:
                    self._remove(serving_id)
                self.log.warning("worker %s: another task removed its container before it started", slot_name(slot))
                return False
            # Typically the serving container died at once, and the client cannot join its network.
            # Leave nothing behind: neither the client (created) nor the serving container (exited).
            death = self._serving_failure_settled(slot, serving_id) if serving_id is not None else None
            for container_id in (created["Id"], serving_id):
                if container_id is not None:
                    self._remove(container_id)
            release(holder)
            if death is not None:
                raise WarmWorkerError(death) from None
            raise WarmWorkerError(
                f"worker {slot_name(slot)}: its container ({self._image}) could not start: {exc.explanation or exc}"
            ) from None
        self.log.info(
            "Started warm worker %s (container %s, image %s)%s",
            slot_name(slot),
            self.container_name(slot),
            self._image,
            " with its serving container" if serving_id else "",
        )
        return True

    def _create_serving(self, slot: int, gpus: list[Any]) -> str | None:
        """Create and start the serving container of ``slot``; None when another task already did."""
        assert self.model_dir is not None, "the serving contract's pool knows its model folder"
        serving = containers.serving_container(self.spec, self.model_dir, labels=self.labels(slot), devices=gpus, warm=True)
        try:
            serving_id = serving.create(self.cli, name=self.serving_name(slot), secrets=self.secrets)
        except APIError as exc:
            if exc.status_code == 409:
                return None
            raise
        self.cli.start(serving_id)
        return serving_id

    # ------------------------------------------------------------------ wait, replace

    def wait_ready(self, slots: list[int], timeout: float, *, poll: float = 0.5) -> tuple[list[Slot], list[str]]:
        """Wait until every slot's worker is ready or has failed; returns the ready ones and the failures' messages."""
        deadline = time.monotonic() + timeout
        pending = set(slots)
        ready: list[Slot] = []
        failures: list[str] = []
        next_log = time.monotonic() + 30
        while pending:
            for k in sorted(pending):
                s = self.slot(k)
                if s.ready:
                    ready.append(s)
                    pending.discard(k)
                    self.log.info(
                        "Warm worker %s is ready: init() took %.2f s", s.name, (s.state and s.state.init_seconds) or 0.0
                    )
                elif not s.running and not s.being_started:
                    failures.append(self.failure(s))
                    pending.discard(k)
                elif self.spec.contract == "serve" and (death := self.serving_failure(k)) is not None:
                    # Its client waits for a /ping that cannot come: stop it now, not after init_timeout.
                    self.kill(k)
                    failures.append(death)
                    pending.discard(k)
            if not pending:
                break
            now = time.monotonic()
            if now > deadline:
                for k in sorted(pending):
                    failures.append(
                        f"worker {slot_name(k)} did not get ready within settings.init_timeout = "
                        f"{self.spec.settings.init_timeout} s (and {CONTAINER_START_GRACE} s to start)"
                    )
                    self.kill(k)
                break
            if now > next_log:
                self.log.info("Waiting for warm worker(s) %s to get ready", ", ".join(slot_name(k) for k in sorted(pending)))
                next_log = now + 30
            time.sleep(poll)
        return sorted(ready, key=lambda s: s.slot), failures

    def failure(self, s: Slot) -> str:
        """Why the worker of slot ``s`` is not running.

        Its serving container's end, else its state file's error, else its exit code and last log lines.
        """
        if self.spec.contract == "serve":
            death = self.serving_failure(s.slot, answered=s.answered)
            if death is not None:
                return death
        if s.state is not None and s.state.error is not None:
            return f"worker {s.name}: {s.state.error.one_line()}"
        if s.container is None:
            return f"worker {s.name}: its container {self.container_name(s.slot)} is gone"
        if s.never_started:
            return (
                f"worker {s.name}: its container {self.container_name(s.slot)} was created "
                f"{created_seconds_ago(s.container):.0f} s ago and never started (the task that created it is gone)"
            )
        code = s.container["State"].get("ExitCode")
        why = explain_exit(code, self._worker_memory)
        return f"worker {s.name}: its container exited with code {code}{why}; {self.log_tail(s.container['Id'])}"

    @property
    def _worker_memory(self) -> str | None:
        """The worker container's memory limit: a scoring script's has resources.memory, a serving client none."""
        return self.spec.resources.memory if self.spec.contract == "azure" else None

    def log_tail(self, container: str) -> str:
        try:
            tail = self.cli.logs(container, tail=LOG_TAIL_LINES).decode("utf-8", "replace").strip()
        except APIError:
            tail = ""
        return f"its last log lines:\n{tail}" if tail else "it wrote nothing"

    def replace(self, s: Slot) -> bool:
        """Remove a dead worker of slot ``s`` (by id, so never one another task just started) and start another."""
        if s.container is not None:
            self._remove(s.container["Id"])
        if self.spec.contract == "serve":
            serving = self.inspect(self.serving_name(s.slot))
            if serving is not None:
                self._remove(serving["Id"])
        return self.start(s.slot)

    def kill(self, slot: int) -> None:
        """Stop the worker of ``slot`` at once (it is stuck, or its task was killed); a later task replaces it."""
        for name in (self.container_name(slot), self.serving_name(slot)):
            try:
                self.cli.kill(name)
            except APIError:
                pass

    def serving_failure(self, slot: int, *, answered: bool = False) -> str | None:
        """Serving contract: the failure of worker ``slot`` when its serving container has exited, else None.

        Names the worker, the image, the exit code and the container's last log lines;
        ``answered``: the worker got ready (its serving container had answered ``/ping``).
        """
        serving = self.inspect(self.serving_name(slot))
        if serving is None or serving["State"].get("Status") not in ("exited", "dead"):
            return None  # not there (yet), created, or running
        code = serving["State"].get("ExitCode")
        when = "" if answered else " before it answered /ping"  # else: while or after it served
        return (
            f"worker {slot_name(slot)}: the serving container ({self.spec.environment.image} serve) exited with code "
            f"{code}{explain_exit(code, self.spec.resources.memory)}{when}; {self.log_tail(serving['Id'])}"
        )

    def _serving_failure_settled(self, slot: int, serving_id: str, wait: float = 30.0) -> str | None:
        """``serving_failure`` once a serving container that is going has gone (Docker tears it down in steps)."""
        deadline = time.monotonic() + wait
        while (death := self.serving_failure(slot)) is None and time.monotonic() < deadline:
            serving = self.inspect(serving_id)
            if serving is None or serving["State"].get("Status") not in ("running", "removing", "restarting"):
                break
            time.sleep(0.2)
        return death

    def follow_serving_log(self, slot: int, on_line: Callable[[str], None]) -> Callable[[], None]:
        """Copy the serving container's new log lines to ``on_line`` until the returned function is called."""
        try:
            stream = self.cli.logs(self.serving_name(slot), stream=True, follow=True, since=time.time())
        except APIError:
            return lambda: None

        def pump() -> None:
            try:
                for raw in stream:
                    for text in raw.decode("utf-8", "replace").splitlines():
                        on_line(text)
            except Exception:  # noqa: BLE001 - closed, or the container went away
                return

        thread = threading.Thread(target=pump, daemon=True)
        thread.start()

        def stop() -> None:
            time.sleep(0.2)  # the last lines of the mini-batch are on their way
            stream.close()
            thread.join(timeout=5)

        return stop

    # ------------------------------------------------------------------ submit

    def submit(
        self,
        slot: int,
        mini_batch_file: str,
        output: str,
        attempt: int,
        on_line: Callable[[str], None],
        on_accepted: Callable[[dict[str, Any]], None] = lambda message: None,
        *,
        idle_only: bool = False,
        on_queued: Callable[[dict[str, Any]], None] = lambda message: None,
    ) -> Outcome:
        """Hand one mini-batch (container paths) to the worker of ``slot``; its log lines go to ``on_line``.

        ``idle_only``: refused unless the worker is free; else it may wait in the worker's queue
        (``settings.worker_queue_depth``), and ``on_queued`` hears when it does.
        """
        command = [
            "python3",
            "-m",
            "batchscore_runtime.warm",
            "submit",
            "--mini-batch",
            mini_batch_file,
            "--output",
            output,
            "--attempt",
            str(attempt),
            *(["--idle-only"] if idle_only else []),
        ]
        try:
            exec_id = self.cli.exec_create(self.container_name(slot), command, user=self.user)["Id"]
            stream = self.cli.exec_start(exec_id, stream=True)
        except APIError as exc:
            # Gone, or not running any more; or stopped between the two calls (the engine answers 500 then).
            if exc.status_code in (404, 409) or not self._running(slot):
                return Outcome(False, state="stopped")
            raise
        accepted: dict[str, Any] | None = None
        ended: dict[str, Any] | None = None
        queued = False
        buffer = b""
        for chunk in stream:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                line = raw.decode("utf-8", "replace")
                message = protocol_line(line)
                if message is not None:
                    if accepted is None and message.get("queued") is True:
                        queued = True
                        on_queued(message)
                    elif accepted is None:
                        accepted = message
                        if message.get("accepted"):
                            on_accepted(message)
                    else:
                        ended = message
                else:
                    on_line(line)
        if buffer:
            on_line(buffer.decode("utf-8", "replace"))
        code = self.cli.exec_inspect(exec_id).get("ExitCode")
        if accepted is None or not accepted.get("accepted"):
            return Outcome(False, state=str((accepted or {}).get("state", "stopped")), queued=queued)
        if ended is None or not isinstance(ended.get("exit"), int) or isinstance(ended.get("exit"), bool):
            return Outcome(True, exit_code=EXIT_LOST if code in (None, 0, EXIT_REFUSED) else code)
        return Outcome(True, exit_code=ended["exit"])

    def submit_detached(
        self, slot: int, mini_batch_file: str, output: str, attempt: int, record: str, *, idle_only: bool = False
    ) -> Callable[[], bool] | None:
        """Hand one mini-batch to the worker of ``slot`` with a detached ``warm submit --record`` (a deferred task).

        Every line of the hand-over goes to ``record`` (a container path in the worker's scratch folder;
        :mod:`batchscore.scoring.handover` reads it). Returns a function that says whether the hand-over
        still runs; None when the worker is gone.
        """
        command = [
            "python3", "-m", "batchscore_runtime.warm", "submit", "--mini-batch", mini_batch_file, "--output", output,
            "--attempt", str(attempt), "--record", record, *(["--idle-only"] if idle_only else []),
        ]  # fmt: skip
        try:
            exec_id = self.cli.exec_create(self.container_name(slot), command, user=self.user)["Id"]
            self.cli.exec_start(exec_id, detach=True)
        except APIError as exc:
            # Gone, or not running any more; or stopped between the two calls (the engine answers 500 then).
            if exc.status_code in (404, 409) or not self._running(slot):
                return None
            raise

        def running() -> bool:
            try:
                return bool(self.cli.exec_inspect(exec_id).get("Running"))
            except APIError:
                return False

        return running

    def _running(self, slot: int) -> bool:
        """Whether the worker container of ``slot`` still runs once a kill under way has ended (an engine that does
        not answer: assume so). Docker refuses an exec in a container being killed before inspect says it stopped."""
        try:
            return self.settled(slot, wait=5.0).running
        except APIError:
            return True

    def cancel(self, slot: int, output: str) -> bool:
        """Take the mini-batch with output folder ``output`` (a container path) out of the queue of worker ``slot``.

        True when it waited there; False when it is not there (it started, or the worker is gone).
        """
        return cancel_queued(self.cli, self.container_name(slot), output, self.user)

    # ------------------------------------------------------------------ stop

    def remove_all(self) -> list[str]:
        """Stop and remove every container of this run's workers; returns their names."""
        removed = []
        containers = self.containers()
        # Clients first: a serving container's network is still theirs until they are gone.
        containers.sort(key=lambda c: c.get("Labels", {}).get(ROLE_LABEL) == SERVING_ROLE)
        for c in containers:
            self._remove(c["Id"])  # forced: a worker between mini-batches has nothing to save
            removed.append((c.get("Names") or [c["Id"][:12]])[0].lstrip("/"))
        return removed

    def _remove(self, container_id: str) -> None:
        try:
            self.cli.remove_container(container_id, force=True)
        except NotFound:
            pass
        except APIError as exc:
            if exc.status_code != 409:  # 409: removal already in progress
                raise


#: Seconds a worker container gets to start before its init_timeout counts.
CONTAINER_START_GRACE = 60


def cancel_queued(cli: Any, container: str, output: str, user: str) -> bool:
    """Take the mini-batch with output folder ``output`` (a container path) out of the queue of ``container``.

    ``container``: the worker container's name or id; ``user``: who runs ``warm cancel`` in it (the daemon's
    user: its socket is that user's). True when it waited there; False when it is not there (it started, or
    the worker is gone). The answer is the protocol's line, read as data (the container runs the user's image).
    """
    command = ["python3", "-m", "batchscore_runtime.warm", "cancel", "--output", output]
    try:
        exec_id = cli.exec_create(container, command, user=user)["Id"]
        raw = cli.exec_start(exec_id)
    except APIError:
        return False
    for line in raw.decode("utf-8", "replace").splitlines():
        message = protocol_line(line)
        if message is not None:
            return message.get("cancelled") is True
    return False


def stop_hand_over(cli: Any, container: str, record: Path, output: str) -> str:
    """Stop a deferred task's mini-batch on its worker: the user marked the task failed or success, or cleared it.

    What :meth:`WarmWorkersExecutor.kill <batchscore.scoring.warm.WarmWorkersExecutor.kill>` does for a task
    that does not defer: a mini-batch that waits in the worker's queue is taken out of it (the worker goes on
    with the one it scores); one that scores stops its worker, and its serving container, by id (a replacement
    of the same name holds other mini-batches); a later task starts a replacement. Nothing of the stopped try
    is taken in: only a resumed task takes a result in, and the claim of the mini-batch's folder turns away a
    try that is not the latest (:meth:`Attempt.take_in <batchscore.scoring.attempt.Attempt.take_in>`).

    ``container``, ``record`` and ``output`` are the orchestrator's (the hand-over's); what the record says
    is the container's, read with :func:`read_record` (a regular file, no link, bounded): a record that was
    refused, or is not there, cannot say the mini-batch is done or queued, so the worker is stopped.
    Returns what was done, for the log. Blocking (the Docker API): the trigger runs it in a thread.
    """
    said = read_record(record)
    if said.refused is None and said.done is not None:
        return "its hand-over had ended; nothing to stop"
    try:
        info = cli.inspect_container(container)
    except NotFound:
        return "its worker container is gone; nothing to stop"
    if not info["State"].get("Running"):
        return "its worker container is not running; nothing to stop"
    if said.refused is None and said.answer is not None and not said.accepted:
        return "its worker had let it go from its queue; nothing to stop"
    if said.refused is None and said.queued and said.answer is None:
        user = str(info.get("Config", {}).get("User") or security.container_user())
        if cancel_queued(cli, container, output, user):
            return "it was taken out of the worker's queue; the worker goes on with the one it scores"
        said = read_record(record)  # not in the queue any more: it started, or it ended, a moment ago
        if said.refused is None and said.done is not None:
            return "its hand-over had ended; nothing to stop"
    kill_worker(cli, info)
    return "it was scoring: the worker was stopped (a later task starts a replacement)"


def kill_worker(cli: Any, worker: dict[str, Any]) -> None:
    """Kill the worker container ``worker`` (``docker inspect``) and, for the serving contract, its serving container.

    By id: the serving container is the one whose network the worker joined (its ``NetworkMode``, which the
    orchestrator set), killed only when it carries the warm serving role.
    """
    targets = [str(worker["Id"])]
    network = str(worker.get("HostConfig", {}).get("NetworkMode") or "")
    if network.startswith("container:"):
        try:
            serving = cli.inspect_container(network.split(":", 1)[1])
        except APIError:
            serving = None
        if serving is not None and (serving.get("Config", {}).get("Labels") or {}).get(ROLE_LABEL) == SERVING_ROLE:
            targets.append(str(serving["Id"]))
    for target in targets:
        try:
            cli.kill(target)
        except APIError:  # gone, or not running any more
            pass


__all__ = [
    "Outcome",
    "Slot",
    "WarmWorkerError",
    "WarmWorkers",
    "cancel_queued",
    "kill_worker",
    "run_digest",
    "slot_name",
    "stop_hand_over",
]
