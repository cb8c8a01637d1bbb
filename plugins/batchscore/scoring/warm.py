"""The executor that hands each mini-batch to one of the run's warm workers (``settings.worker_mode: warm``).

It finds a free worker, else a place in a worker's queue (``settings.worker_queue_depth``), hands
the mini-batch over with ``docker exec`` (:mod:`batchscore.scoring.workers`), streams the
worker's lines into the try's output, and takes the result in from the worker's scratch folder.
The task's inputs are staged before it is handed over, so a queued mini-batch's are ready when
its worker takes it. A mini-batch whose worker died while it waited in the queue was never
started: it goes to another (or a replacement) worker within the same try. A worker that died
is replaced; a worker past its time on one mini-batch is stopped; a serving container that
died is named as the cause. No Airflow import.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchscore import security
from batchscore.intake import remove_scratch
from batchscore.scoring.attempt import Attempt
from batchscore.scoring.contract import CONTAINER_GRACE_SECONDS, Contract
from batchscore.scoring.handover import read_record, record_name
from batchscore.scoring.workers import Outcome, Slot, WarmWorkerError, WarmWorkers, slot_name
from batchscore_runtime.formats import ContainerPaths, MiniBatchStatus, attempt_folder_name
from batchscore_runtime.warm_protocol import EXIT_FAILED, EXIT_LOST, EXIT_OK, EXIT_REFUSED
from batchscore_runtime.worker_state import WorkerState

#: How often a mini-batch that waits for a free worker looks again, and how often it says so in its log.
POLL_SECONDS = 0.5
WAIT_LOG_SECONDS = 30.0


class _Timeout(Exception):
    """The worker ran past the contract's backstop on this mini-batch and was stopped."""


class WarmWorkersExecutor:
    """Score each mini-batch on a free warm worker of the run.

    :param pool: the run's workers on this Docker engine.
    :param log: the task's logger.
    """

    def __init__(self, pool: WarmWorkers, log: Any):
        self.pool = pool
        self.log = log
        self._slot: int | None = None  # the worker this try's mini-batch was handed to
        self._queued: str | None = None  # its output folder while it waits in that worker's queue
        self._killed = False

    def kill(self) -> None:
        """The task is killed: take the mini-batch out of its worker's queue, or stop the worker in the middle of it.

        A worker is stopped only when it scores this mini-batch (a later task starts a replacement);
        one that holds it in its queue keeps scoring the one before.
        """
        self._killed = True
        slot, queued = self._slot, self._queued
        if slot is None:
            return
        if queued is not None and self.pool.cancel(slot, queued):
            self.log.warning(
                "Task killed: its mini-batch was taken out of worker %s's queue; the worker goes on", slot_name(slot)
            )
            return
        self.log.warning("Task killed: stopping worker %s, which was scoring this mini-batch", slot_name(slot))
        self.pool.kill(slot)

    def score(self, attempt: Attempt, contract: Contract, secrets: dict[str, str]) -> MiniBatchStatus:
        """Hand the mini-batch to a worker and take its result in; the committed status, or raise :class:`ScoringError`."""
        placed = self._place(attempt, contract, secrets, detached=False)
        assert isinstance(placed, MiniBatchStatus)  # only a detached hand-over is left waiting
        return placed

    def hand_over(self, attempt: Attempt, contract: Contract, secrets: dict[str, str]) -> HandOver:
        """A deferred task's hand-over (``settings.deferrable``): the mini-batch waits in a worker's queue or scores.

        Detached (:mod:`batchscore.scoring.handover`): the task may end and resume when the worker is done
        (:meth:`resume`). Raises :class:`ScoringError` (the failed status committed) when no worker takes it.
        """
        placed = self._place(attempt, contract, secrets, detached=True)
        assert isinstance(placed, HandOver)
        return placed

    def _place(
        self, attempt: Attempt, contract: Contract, secrets: dict[str, str], *, detached: bool
    ) -> MiniBatchStatus | HandOver:
        pool = self.pool
        self.log = pool.log = attempt.log  # redacts the secrets, once they are known
        pool.secrets, pool.user = secrets, security.container_user()  # for a replacement this task starts
        self.log.info(
            "%s: scoring %s files (%s bytes) on a warm worker, try %s of %s",
            attempt.id,
            attempt.reference.get("files"),
            attempt.reference.get("bytes"),
            attempt.attempt,
            attempt.tries,
        )
        self._stop_earlier_tries(attempt)
        container_file = f"{ContainerPaths.MINI_BATCHES}/{attempt.mini_batch_file.name}"
        # The worker writes into a sub-folder of its scratch folder; the orchestrator takes it in.
        scratch_name = attempt_folder_name(attempt.index, attempt.attempt)
        container_output = f"{ContainerPaths.SCRATCH}/{scratch_name}"
        backstop = contract.warm_backstop()
        replacements = 0
        last_failure = ""
        waiting_since = time.monotonic()
        next_log = waiting_since + WAIT_LOG_SECONDS
        order = [(attempt.index + k) % pool.slots for k in range(pool.slots)]
        # A free worker first; then a place in a worker's queue, when workers have one.
        passes = (True, False) if attempt.spec.settings.worker_queue_depth > 1 else (False,)
        while True:
            slots = [pool.slot(k) for k in order]
            if attempt.spec.contract == "serve":
                slots = [self._stop_if_serving_died(s) for s in slots]
            for idle_only in passes:
                for s in slots:
                    if not s.ready:
                        continue
                    if self._killed:
                        raise attempt.failed("TaskKilled", f"the task was killed before a worker took {attempt.id}")
                    self._slot = s.slot
                    remove_scratch(pool.scratch_dir(s.slot), scratch_name)
                    if detached:
                        handed = self._submit_detached(
                            attempt, s, container_file, container_output, scratch_name, backstop, idle_only
                        )
                        self._slot = None
                        if isinstance(handed, HandOver):
                            return handed
                        outcome = handed
                        if outcome.queued:
                            self.log.warning(
                                "%s: worker %s let it go from its queue before it started (%s); handing it to another worker",
                                attempt.id, s.name, outcome.state,
                            )  # fmt: skip
                        continue
                    attempt.open_output()
                    try:
                        outcome = self._submit(attempt, s, container_file, container_output, backstop, idle_only)
                    except _Timeout:
                        raise attempt.failed(
                            "ContainerTimeout",
                            f"worker {s.name} ran past {backstop:g} s (retry_settings.timeout "
                            f"{attempt.spec.settings.retry_settings.timeout} + {CONTAINER_GRACE_SECONDS} s) on this "
                            f"mini-batch without ending and was stopped{attempt.dropped()}",
                        ) from None
                    finally:
                        self._slot = self._queued = None
                        attempt.close_output()
                    if outcome.accepted:
                        return self._outcome(attempt, s, outcome.exit_code, scratch_name)
                    if outcome.queued:  # it waited in the queue and never started there
                        if self._killed:
                            raise attempt.failed(
                                "TaskKilled", f"the task was killed while {attempt.id} waited in worker {s.name}'s queue"
                            )
                        self.log.warning(
                            "%s: worker %s let it go from its queue before it started (%s); handing it to another worker",
                            attempt.id,
                            s.name,
                            outcome.state,
                        )
            slots = [pool.slot(k) for k in order]  # as they are now, after the hand-overs
            dead = [s for s in slots if _died(s)]
            alive = [s for s in slots if s.running or s.being_started]
            if dead or not alive:
                if replacements > pool.slots + 1:
                    raise attempt.failed("WarmWorkerFailed", f"no warm worker could be kept running; {last_failure}")
                target = dead[0] if dead else slots[0]
                if target.container is not None or target.state is not None:
                    last_failure = pool.failure(target)
                    if target.state is not None and target.state.state == WorkerState.FAILED and not alive and replacements:
                        raise attempt.failed("WarmWorkerFailed", last_failure)
                    self.log.warning("%s; starting a replacement", last_failure)
                try:
                    pool.replace(target)
                except WarmWorkerError as exc:  # e.g. the image is not on this Docker host
                    raise attempt.failed("WarmWorkerFailed", str(exc)) from None
                replacements += 1
            now = time.monotonic()
            if now >= next_log:
                self.log.info(
                    "%s: waiting %.0f s so far for a free warm worker (%s)",
                    attempt.id,
                    now - waiting_since,
                    ", ".join(f"{s.name} {_describe(s)}" for s in slots),
                )
                next_log = now + WAIT_LOG_SECONDS
            time.sleep(POLL_SECONDS)

    def _submit(
        self, attempt: Attempt, s: Slot, mini_batch_file: str, output: str, backstop: float | None, idle_only: bool
    ) -> Outcome:
        """Hand the mini-batch to worker ``s``; a worker past ``backstop`` seconds on it is stopped (:class:`_Timeout`).

        The backstop counts from when the worker takes the mini-batch, not from when it was queued.
        """
        pool = self.pool
        streams: list[Any] = []
        timed_out = threading.Event()
        timers: list[threading.Timer] = []

        def stop() -> None:
            timed_out.set()
            pool.kill(s.slot)  # the hand-over's stream ends with the worker

        def queued(message: dict[str, Any]) -> None:
            self._queued = output
            self.log.info(
                "%s queued the mini-batch: %s mini-batch(es) ahead of it (settings.worker_queue_depth %s); "
                "it starts the moment they are done",
                s.name,
                message.get("ahead"),
                message.get("depth"),
            )

        def accepted(message: dict[str, Any]) -> None:
            self._queued = None
            waited = message.get("queued_seconds")
            self.log.info(
                "%s took the mini-batch%s (its init() took %s s, once)",
                s.name,
                f" after {waited} s in its queue" if waited is not None else "",
                message.get("init_seconds"),
            )
            if backstop is not None:
                timer = threading.Timer(backstop, stop)
                timer.daemon = True
                timer.start()
                timers.append(timer)
            if pool.spec.contract == "serve":  # the server's own lines while it serves this mini-batch
                streams.append(pool.follow_serving_log(s.slot, lambda text: attempt.line(f"{s.name} serve | {text}")))

        try:
            outcome = pool.submit(
                s.slot,
                mini_batch_file,
                output,
                attempt.attempt,
                lambda text: attempt.line(f"{s.name} | {text}"),
                accepted,
                idle_only=idle_only,
                on_queued=queued,
            )
        finally:
            for timer in timers:
                timer.cancel()
            for stop_stream in streams:
                stop_stream()
        if timed_out.is_set():
            raise _Timeout
        return outcome

    def _outcome(self, attempt: Attempt, s: Slot, code: int | None, scratch_name: str) -> MiniBatchStatus:
        """What the hand-over to worker ``s`` ended with: the committed status, or the error to raise."""
        pool = self.pool
        # A serving container that died mid-mini-batch leaves the client with failed requests (or no
        # /ping): say what happened, and stop the pair so that the retry gets a fresh one.
        death = pool.serving_failure(s.slot, answered=True) if attempt.spec.contract == "serve" else None
        if death is not None:
            pool.kill(s.slot)  # the client's report hides the cause; this says it, and nothing of it is taken in
            raise attempt.failed("ServingContainerDied", death)
        scratch = pool.scratch_dir(s.slot) / scratch_name
        # Only a hand-over that ended as the protocol says has a report worth reading.
        intake = attempt.take_in(scratch, attempt.expected(s.name)) if code in (EXIT_OK, EXIT_FAILED) else None
        status = intake.status if intake is not None else None
        if status is not None and status.succeeded != (code == EXIT_OK):
            attempt.result_dir.retract()
            raise attempt.failed(
                "ResultRejected", f"worker {s.name}'s hand-over ended with exit code {code} but its report says {status.state}"
            )
        if code == EXIT_OK and status is not None and status.succeeded:
            remove_scratch(scratch.parent, scratch.name)
            return status
        if code == EXIT_FAILED and (reported := attempt.reported_failure(intake)) is not None:
            raise reported
        now = pool.settled(s.slot)
        why = pool.failure(now) if not now.running else f"its hand-over ended with exit code {code}"
        raise attempt.failed("WarmWorkerDied", f"worker {s.name} ended while scoring {attempt.id}; {attempt.redact(why)}")

    def _submit_detached(
        self,
        attempt: Attempt,
        s: Slot,
        mini_batch_file: str,
        output: str,
        scratch_name: str,
        backstop: float | None,
        idle_only: bool,
    ) -> HandOver | Outcome:
        """Hand the mini-batch to worker ``s`` detached; the hand-over once the worker took or queued it, else why not."""
        pool = self.pool
        record = pool.scratch_dir(s.slot) / record_name(scratch_name)
        _remove_record(record)
        running = pool.submit_detached(
            s.slot, mini_batch_file, output, attempt.attempt, f"{ContainerPaths.SCRATCH}/{record.name}", idle_only=idle_only
        )
        said = read_record(record)
        while running is not None and said.answer is None and not said.queued and said.done is None:
            time.sleep(HAND_OVER_POLL_SECONDS)
            said = read_record(record)
            if said.answer is None and not said.queued and said.done is None and not running():
                said = read_record(record)
                break
        if said.accepted or (said.queued and said.answer is None):
            if said.accepted:
                self.log.info(
                    "%s took the mini-batch (its init() took %s s, once)", s.name, (said.answer or {}).get("init_seconds")
                )
            else:
                queued = next(m for m in said.messages if m.get("queued") is True)
                self.log.info(
                    "%s queued the mini-batch: %s mini-batch(es) ahead of it (settings.worker_queue_depth %s)",
                    s.name,
                    queued.get("ahead"),
                    queued.get("depth"),
                )
            return HandOver(
                slot=s.slot,
                scratch_name=scratch_name,
                output=output,
                record=str(record),
                # By id: a replacement of the same name must not pass for the worker that holds this mini-batch.
                container=str(s.container["Id"]) if s.container else pool.container_name(s.slot),
                backstop=backstop,
            )
        _remove_record(record)
        return Outcome(False, state=str((said.answer or {}).get("state", "stopped")), queued=said.queued)

    def resume(self, attempt: Attempt, handover: HandOver, event: dict[str, Any]) -> MiniBatchStatus | None:
        """A deferred task is back (its trigger fired ``event``): take the result in as :meth:`score` does.

        The event says what the trigger read in the record (whether the worker took the mini-batch, its
        exit code): a replacement of a worker that died empties the scratch folder the record is in.

        The committed status, or raise :class:`ScoringError`; None when the worker let the mini-batch go from its
        queue before it started (it never scored: hand it over again, within the same try).
        """
        pool = self.pool
        self.log = pool.log = attempt.log
        s = pool.slot(handover.slot)
        record = Path(handover.record)
        said = read_record(record)
        attempt.open_output()
        try:
            for text in said.lines:
                attempt.line(f"{s.name} | {text}")
        finally:
            attempt.close_output()
        if said.accepted:
            waited = (said.answer or {}).get("queued_seconds")
            self.log.info(
                "%s had taken the mini-batch%s", s.name, f" after {waited} s in its queue" if waited is not None else ""
            )
        accepted = said.accepted or event.get("accepted") is True
        if event.get("outcome") == TIMEOUT:
            pool.kill(handover.slot)
            _remove_record(record)
            raise attempt.failed(
                "ContainerTimeout",
                f"worker {s.name} ran past {handover.backstop:g} s (retry_settings.timeout "
                f"{attempt.spec.settings.retry_settings.timeout} + {CONTAINER_GRACE_SECONDS} s) on this "
                f"mini-batch without ending and was stopped{attempt.dropped()}",
            )
        _remove_record(record)
        if said.refused is not None:  # never handed over again: the container could plant the next one too
            raise attempt.failed("ResultRejected", f"worker {s.name}: {said.refused}")
        if not accepted:  # queued, then let go (cancelled, or its worker ended) without starting
            self.log.warning(
                "%s: worker %s let it go from its queue before it started (%s); handing it to another worker",
                attempt.id,
                s.name,
                (said.answer or {}).get("state", "its worker is gone"),
            )
            return None
        code = said.exit_code if said.exit_code is not None else _whole(event.get("exit"))
        done = said.done if said.done is not None else _whole(event.get("code"))
        if code is None:  # the daemon never said how it ended
            code = EXIT_LOST if done in (None, 0, EXIT_REFUSED) else done
        return self._outcome(attempt, s, code, handover.scratch_name)

    def _stop_earlier_tries(self, attempt: Attempt) -> None:
        """Stop what an earlier try of this mini-batch left on a worker: a deferred task cleared before its trigger ran.

        The trigger's ``on_kill`` stops it (:meth:`batchscore.triggers.HandOverTrigger.on_kill`), but only once the
        triggerer has taken the trigger up; a task cleared (or whose Airflow worker was lost) in between leaves its
        mini-batch scoring, or queued, on its worker. Its result would never be taken in (the claim is this try's):
        the worker's time is freed for this try instead. Only records of this mini-batch's earlier tries are read.
        """
        for earlier in range(1, attempt.attempt):
            worker = self.abandon(attempt, attempt_folder_name(attempt.index, earlier))
            if worker:
                self.log.warning(
                    "%s: try %d's hand-over was still on worker %s (its task was cleared while deferred): stopped it, "
                    "or took it out of the queue",
                    attempt.id,
                    earlier,
                    worker,
                )

    def abandon(self, attempt: Attempt, scratch_name: str) -> str:
        """A deferred task ran past its deferral's timeout: stop the worker that scores its mini-batch, or take it
        out of the queue it waits in; says which worker (empty when none held it)."""
        pool = self.pool
        for k in range(pool.slots):
            record = pool.scratch_dir(k) / record_name(scratch_name)
            said = read_record(record)
            if not record.exists() or said.done is not None:
                continue
            if said.accepted:
                pool.kill(k)
            else:
                pool.cancel(k, f"{ContainerPaths.SCRATCH}/{scratch_name}")
            _remove_record(record)
            return slot_name(k)
        return ""

    def _stop_if_serving_died(self, s: Slot) -> Slot:
        """A worker whose serving container exited can serve nothing: stop its client now, so it is replaced."""
        if not s.running:
            return s
        death = self.pool.serving_failure(s.slot, answered=s.answered)
        if death is None:
            return s
        self.log.warning("%s; stopping its client", death)
        self.pool.kill(s.slot)
        return self.pool.settled(s.slot)


@dataclass(frozen=True)
class HandOver:
    """A mini-batch handed to a warm worker detached: what a deferred task needs to take its result in when it resumes."""

    slot: int
    scratch_name: str  # its output folder in the worker's scratch folder
    output: str  # the same, as the container sees it
    record: str  # the hand-over's record file (host path)
    container: str  # the worker container's id
    backstop: float | None  # seconds the worker may score it once it took it

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HandOver:
        return cls(**data)


#: The trigger's outcome for a worker past its backstop (``batchscore.triggers.TIMEOUT``).
TIMEOUT = "timeout"
#: How often a detached hand-over's record is read until the worker answers.
HAND_OVER_POLL_SECONDS = 0.05


def _whole(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _remove_record(record: Path) -> None:
    """Remove a hand-over's record: a link the container put there goes, not what it points to; a folder stays."""
    with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
        record.unlink()


def _died(s: Slot) -> bool:
    """A worker that was started and is gone, but did not fail its init() (those are not restarted blindly)."""
    return (
        s.container is not None
        and not s.running
        and not s.being_started  # another task starts it now
        and not (s.state is not None and s.state.state == WorkerState.FAILED)
    )


def _describe(s: Slot) -> str:
    if s.ready:
        return "busy"
    if s.starting or s.being_started:
        return "starting"
    return "stopped" if s.container is not None else "not started"


__all__ = ["HandOver", "WarmWorkersExecutor"]
