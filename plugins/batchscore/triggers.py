"""The trigger of a deferred score task (``settings.deferrable``): wait, in the triggerer, for a warm worker to be done.

The score task hands its mini-batch to a warm worker with a detached ``warm submit --record``
(:mod:`batchscore.scoring.handover`) and defers: it holds no Airflow worker slot while the
mini-batch waits in the worker's queue and scores. :class:`HandOverTrigger` polls the record file
and fires once: when the hand-over is done (its exit code), when the worker has taken the
mini-batch longer ago than the contract's backstop (the task resumes and stops the worker), or
when the worker's container is gone without the record saying so. A user who marks the deferred
task failed or success, or clears it, stops its mini-batch on the worker (:meth:`HandOverTrigger.on_kill`).
The record is a host file
(the worker's scratch folder): **the triggerer must run on the Docker host of the run's warm
workers**, as the score tasks do (docs/workers.md). Nothing heavy is imported at import time:
the triggerer loads this module for every deferred task.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from batchscore.scoring.handover import read_record

#: How often the record file is read, and how often the worker's container is looked at.
POLL_SECONDS = 0.25
CONTAINER_CHECK_SECONDS = 5.0
#: Outcomes of an event besides ``done``.
DONE, TIMEOUT, GONE = "done", "timeout", "gone"


class HandOverTrigger(BaseTrigger):
    """Fire when a detached hand-over to a warm worker ends, runs past its backstop, or loses its worker.

    :param record: the hand-over's record file (a host path in the worker's scratch folder).
    :param container: the worker container's id, to notice it gone (a replacement has the same name, not the same id).
    :param backstop: seconds the worker may score the mini-batch once it took it; None: no limit.
    :param handover: what the resumed task needs (``HandOver.to_json()``), given back in every event
        (``dag.test()`` resumes a task with the event alone, not with the deferral's kwargs).
    """

    def __init__(self, record: str, container: str, backstop: float | None = None, handover: dict[str, Any] | None = None):
        super().__init__()
        self.record = record
        self.container = container
        self.backstop = backstop
        self.handover = handover or {}

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {"record": self.record, "container": self.container, "backstop": self.backstop, "handover": self.handover},
        )

    def _event(self, outcome: str, code: int | None, accepted: bool = False, exit_code: int | None = None) -> TriggerEvent:
        # What the record said, also in the event: a replacement worker empties the scratch folder it is in.
        return TriggerEvent(
            {"outcome": outcome, "code": code, "accepted": accepted, "exit": exit_code, "handover": self.handover}
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        path = Path(self.record)
        next_check = time.monotonic() + CONTAINER_CHECK_SECONDS
        accepted = False
        while True:
            record = await asyncio.to_thread(read_record, path)
            accepted = accepted or record.accepted
            if record.done is not None:
                yield self._event(DONE, record.done, accepted, record.exit_code)
                return
            at = record.accepted_at
            if self.backstop is not None and at is not None and time.time() - at > self.backstop:
                yield self._event(TIMEOUT, None, accepted)
                return
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + CONTAINER_CHECK_SECONDS
                if not await asyncio.to_thread(_running, self.container):
                    record = await asyncio.to_thread(read_record, path)  # it may have ended just before its worker
                    accepted = accepted or record.accepted
                    if record.done is not None:
                        yield self._event(DONE, record.done, accepted, record.exit_code)
                    else:
                        yield self._event(GONE, None, accepted)
                    return
            await asyncio.sleep(POLL_SECONDS)

    async def on_kill(self) -> None:
        """The user marked the deferred task failed or success, or cleared it: stop its mini-batch on the worker.

        As the operator's ``on_kill`` does for a task that does not defer
        (:func:`batchscore.scoring.workers.stop_hand_over`): out of the worker's queue, or the worker stopped
        mid mini-batch, so the worker is free for the next (a cleared task's next try among them).

        When Airflow calls it (3.3.2, ``TriggerRunner.run_trigger``): only when the trigger is cancelled with
        the user-action message, which ``cancel_triggers`` sends for a trigger that is no longer this
        triggerer's to run: its task left ``deferred`` (mark failed or success, clear) and the trigger row
        was removed. Never on a triggerer's shutdown or restart (its triggers are cancelled without the
        message, and are taken up again elsewhere), never past the deferral's timeout (checked first), never
        after the trigger fired. One more case reaches it in 3.3.2: a triggerer whose heartbeat went stale for
        longer than ``triggerer.health_check_threshold`` while it kept running finds its triggers reassigned
        to another triggerer and cancels them the same way. The task is still deferred then; stopping its
        mini-batch makes the other triggerer's copy of this trigger see the worker gone, and the try fails
        (``WarmWorkerDied``) and is retried: a wasted try, never a wrong result.

        Best effort, in the triggerer's event loop: the Docker calls run in a thread, a failure is logged
        and swallowed (Airflow bounds this call by ``triggerer.on_kill_timeout``).
        """
        output = self.handover.get("output")
        if not isinstance(output, str) or not output:
            self.log.warning("The deferred task was stopped by a user; its hand-over names no output folder: nothing to stop")
            return
        try:
            what = await asyncio.to_thread(_stop, self.container, self.record, output)
        except Exception:  # noqa: BLE001 - best effort: the worker's own backstop and idle timeout remain
            self.log.warning(
                "The deferred task was stopped by a user, but its mini-batch on worker container %s could not be "
                "stopped (a later task finds the worker busy until the mini-batch ends)",
                self.container[:12],
                exc_info=True,
            )
            return
        self.log.warning("The deferred task was stopped by a user (mark failed or success, or clear): %s", what)


def _stop(container: str, record: str, output: str) -> str:
    """Stop the hand-over's mini-batch on its worker (the Docker API, in a thread: it blocks); says what was done."""
    from batchscore.engine import docker_client
    from batchscore.scoring.workers import stop_hand_over

    return stop_hand_over(docker_client(), container, Path(record), output)


def _running(container: str) -> bool:
    """Whether the worker container runs (the Docker API, in a thread: it blocks). An unreachable engine: assume so."""
    from docker.errors import DockerException, NotFound

    from batchscore.engine import docker_client

    try:
        return bool(docker_client().inspect_container(container)["State"].get("Running"))
    except NotFound:
        return False
    except DockerException:
        return True  # the engine did not answer this time; the defer timeout is the backstop of last resort


__all__ = ["DONE", "GONE", "TIMEOUT", "HandOverTrigger"]
