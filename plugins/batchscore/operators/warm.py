"""Warm workers (``settings.worker_mode: warm``): setup, scoring and teardown tasks.

* :class:`StartWorkersOperator` (the task group's setup task) starts the run's worker
  containers, one per ``resources.instance_count`` (fewer when fewer mini-batches are left),
  and waits until each has called ``init()`` once (serving contract: passed ``/ping`` once).
  When none gets ready it removes them itself: Airflow runs no teardown after a failed setup.
* :class:`WarmScoreMiniBatchOperator` stays one mapped task per mini-batch, so the UI, retries
  and reruns work as in ``per_mini_batch`` mode; it hands its mini-batch to a free worker and
  streams that worker's log lines into its own task log. A worker that died is replaced.
* :class:`StopWorkersOperator` (the teardown task) stops and removes every worker container of
  the run, also when scoring tasks failed; Airflow runs it whatever happened upstream.

See :mod:`batchscore.warm` for the containers and how a mini-batch is handed over.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowTaskTimeout
from airflow.sdk.execution_time.timeout import timeout

from batchscore import security
from batchscore.errors import PlanError, ScoringError, SecretUnavailableError
from batchscore.model_archive import serving_model_dir
from batchscore.operators._base import DeploymentMixin
from batchscore.operators.score import CONTAINER_GRACE_SECONDS, ScoreMiniBatchOperator, _dropped
from batchscore.operators.serve import ServeMiniBatchOperator
from batchscore.plan import run_layout
from batchscore.spec import DeploymentSpec
from batchscore.warm import CONTAINER_START_GRACE, Slot, WarmWorkerError, WarmWorkers, docker_client, slot_name
from batchscore.intake import Expected, remove_scratch
from batchscore.output_log import OutputLog
from batchscore_runtime.formats import ContainerPaths, MiniBatchStatus, WorkerState, attempt_folder_name, mini_batch_id, now_iso
from batchscore_runtime.warm import EXIT_FAILED, EXIT_OK

#: How often a mini-batch that waits for a free worker looks again, and says so in its log.
POLL_SECONDS = 0.5
WAIT_LOG_SECONDS = 30.0


def _workers(cli: Any, spec: DeploymentSpec, endpoint_name: str, context: Any, log: Any, **kwargs: Any) -> WarmWorkers:
    layout = run_layout(spec, context["run_id"])
    model_dir = serving_model_dir(spec, layout) if spec.contract == "serve" else None
    return WarmWorkers(cli, spec, endpoint_name, context["run_id"], layout, log=log, model_dir=model_dir, **kwargs)


def _secrets(spec: DeploymentSpec) -> dict[str, str]:
    return security.resolve_secrets(spec.settings.secret_environment)


class _WorkersTask(DeploymentMixin, BaseOperator):
    """A task of the deployment's task group that manages its warm workers."""

    ui_color = "#fff8e1"

    def __init__(self, *, endpoint_name: str, deployment: dict[str, Any], **kwargs: Any):
        super().__init__(**kwargs)
        self.endpoint_name = endpoint_name
        self.deployment = deployment


class StartWorkersOperator(_WorkersTask):
    """Start the run's warm workers and wait until each is ready (``init()`` called once)."""

    def execute(self, context: Any) -> dict[str, Any]:
        spec = self.run_spec(context)
        layout = run_layout(spec, context["run_id"])
        plan = layout.read_plan()
        if plan is None:
            raise PlanError(f"the plan of run {context['run_id']!r} is missing in {layout.work}; clear the plan task too")
        pending = [
            e
            for e in plan.mini_batches
            if not ((s := layout.mini_batch_dir(e.index).read_status()) is not None and s.succeeded)
        ]
        count = min(spec.resources.instance_count, len(pending))
        if count == 0:
            self.log.info("No mini-batch left to score: no worker started")
            return {"workers": []}
        pool = self._pool = _workers(docker_client(), spec, self.endpoint_name, context, self.log, secrets=_secrets(spec))
        pool.record_engine()
        self.log.info(
            "Starting %d warm worker(s) for %d mini-batch(es) to score (resources.instance_count %d); each calls %s once",
            count,
            len(pending),
            spec.resources.instance_count,
            "init()" if spec.contract == "azure" else "the serving container's /ping",
        )
        started: list[int] = []
        failures: list[str] = []
        try:
            for k in range(count):
                s = pool.slot(k)
                if s.running and s.state is not None and s.state.state in (WorkerState.READY, WorkerState.STARTING):
                    self.log.info("Warm worker %s is already running", s.name)
                else:
                    try:
                        pool.replace(s)
                    except WarmWorkerError as exc:  # e.g. its serving container died before the client could start
                        failures.append(str(exc))
                        continue
                started.append(k)
            ready, not_ready = pool.wait_ready(started, spec.settings.init_timeout + CONTAINER_START_GRACE)
        except BaseException:
            pool.remove_all()  # no teardown follows a setup that failed: leave no container behind
            raise
        failures += not_ready
        for failure in failures:
            self.log.error("%s", failure)
        if not ready:
            # Airflow runs no teardown after a setup that failed: remove the workers here.
            pool.remove_all()
            raise WarmWorkerError("no warm worker got ready, so no mini-batch can be scored:\n" + "\n".join(failures))
        if failures:
            self.log.warning("%d of %d worker(s) ready; the mini-batches go to those", len(ready), count)
        return {"workers": [s.name for s in ready], "init_seconds": {s.name: s.state.init_seconds for s in ready}}

    _pool: WarmWorkers | None = None

    def on_kill(self) -> None:
        # Killed while the workers start: no teardown follows a setup that did not succeed.
        if self._pool is not None:
            self._pool.remove_all()


class StopWorkersOperator(_WorkersTask):
    """Stop and remove every warm worker container of the run (the task group's teardown)."""

    def execute(self, context: Any) -> dict[str, Any]:
        spec = self.run_spec(context)
        layout = run_layout(spec, context["run_id"])
        pool = WarmWorkers(docker_client(), spec, self.endpoint_name, context["run_id"], layout, log=self.log)
        if (elsewhere := pool.started_elsewhere()) is not None:
            self.log.warning(
                "The run's warm workers run on the Docker engine of host %s, which this Airflow worker does not "
                "reach (it reaches host %s's): they stop on their own after settings.worker_idle_timeout (%s s)",
                elsewhere[0].get("name") or "?",
                elsewhere[1]["name"],
                spec.settings.worker_idle_timeout,
            )
        for k in range(pool.slots):
            s = pool.slot(k)
            if s.state is not None:
                self.log.info(
                    "Worker %s: init() %s s, %d mini-batch(es) scored%s",
                    s.name,
                    s.state.init_seconds,
                    len(s.state.mini_batches),
                    f", {s.state.error.one_line()}" if s.state.error else "",
                )
        removed = pool.remove_all()
        self.log.info("Removed %d worker container(s)%s", len(removed), f": {', '.join(removed)}" if removed else "")
        return {"removed": removed}


class WarmScoreMiniBatchOperator(ScoreMiniBatchOperator):
    """Score one mini-batch on a warm worker of the run (either contract).

    Mapped over the plan's output like :class:`ScoreMiniBatchOperator`, with the same status
    records: the mini-batch's previous status is withdrawn first, and an attempt whose worker
    could not commit one (it died, or ran past its time) gets a failed status written for it.
    """

    ui_color = "#ffe0b2"

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._pool: WarmWorkers | None = None
        self._slot: int | None = None

    def execute(self, context: Any) -> dict[str, Any]:
        index = int(self.mini_batch["index"])
        spec = self.run_spec(context)
        elsewhere = _workers(self.cli, spec, self.endpoint_name, context, self.log).started_elsewhere()
        if elsewhere is not None:
            return self._score_without_workers(context, spec, index, *elsewhere)
        ti = context.get("ti")
        attempt = int(getattr(ti, "try_number", 1) or 1)
        status = self._score_warm(context, spec, index, attempt)
        if spec.contract == "serve":
            ServeMiniBatchOperator._report(self, status)  # type: ignore[arg-type]
        else:
            self._report(status)
        return {"mini_batch": status.id, "rows": status.rows, "failed_items": status.failed_items, "worker": status.worker}

    def _score_without_workers(
        self, context: Any, spec: DeploymentSpec, index: int, theirs: dict[str, str], ours: dict[str, str]
    ) -> dict[str, Any]:
        """This task's Airflow worker reaches another Docker engine than the run's warm workers run on.

        A deployment's queue served by Celery workers on several Docker hosts: the workers'
        containers are out of reach here. A scoring script's mini-batch is scored in a container
        of its own instead (as in ``per_mini_batch`` mode); a serving container's cannot be.
        """
        mb_id = mini_batch_id(index)
        where = (
            f"the run's warm workers run on the Docker engine of host {theirs.get('name') or '?'}, which this "
            f"Airflow worker does not reach (it reaches host {ours['name']}'s): resources.queue "
            f"{spec.resources.queue or '(the default queue)'} is served on more than one Docker host"
        )
        if spec.contract == "serve":
            raise ScoringError(f"{mb_id}: {where}; set settings.worker_mode: per_mini_batch for this deployment")
        self.log.warning("%s: %s; scoring it in a container of its own (settings.worker_mode: per_mini_batch does so always)", mb_id, where)
        return ScoreMiniBatchOperator.execute(self, context)

    def _score_warm(self, context: Any, spec: DeploymentSpec, index: int, attempt: int) -> MiniBatchStatus:
        mb_id = mini_batch_id(index)
        run_id = context["run_id"]
        layout = run_layout(spec, run_id)
        mini_batch_file, result_dir = layout.mini_batch_file(index), layout.mini_batch_dir(index)
        user = security.container_user()
        self._prepare(mini_batch_file, result_dir, run_id, attempt)
        started = now_iso()
        try:
            secrets = _secrets(spec)
        except SecretUnavailableError as exc:
            raise self._failed(result_dir, spec, "SecretUnavailable", str(exc), attempt, started) from None
        self._secret_values = tuple(secrets.values())  # the worker has them; its lines are redacted here
        pool = self._pool = _workers(self.cli, spec, self.endpoint_name, context, self.log, secrets=secrets, user=user)
        self.log.info(
            "%s: scoring %s files (%s bytes) on a warm worker, try %s of %s",
            mb_id,
            self.mini_batch.get("files"),
            self.mini_batch.get("bytes"),
            attempt,
            spec.settings.retry_settings.max_retries + 1,
        )
        container_file = f"{ContainerPaths.MINI_BATCHES}/{mini_batch_file.name}"
        # The worker writes into a sub-folder of its scratch folder; the orchestrator takes it in.
        scratch_name = attempt_folder_name(index, attempt)
        container_output = f"{ContainerPaths.SCRATCH}/{scratch_name}"
        # The worker's init() is done before it takes a mini-batch: only run() and the grace count.
        backstop = spec.settings.retry_settings.timeout + CONTAINER_GRACE_SECONDS if spec.contract == "azure" else None
        replacements = 0
        last_failure = ""
        waiting_since = time.monotonic()
        next_log = waiting_since + WAIT_LOG_SECONDS
        order = [(index + k) % pool.slots for k in range(pool.slots)]
        while True:
            slots = [pool.slot(k) for k in order]
            if spec.contract == "serve":
                slots = [_stop_if_serving_died(pool, s, self.log) for s in slots]
            for s in slots:
                if not s.ready:
                    continue
                self._slot = s.slot
                remove_scratch(pool.scratch_dir(s.slot), scratch_name)
                output = self._open_output(result_dir, attempt)
                try:
                    outcome = self._submit(pool, s, container_file, container_output, attempt, backstop)
                except AirflowTaskTimeout:
                    pool.kill(s.slot)
                    raise self._failed(
                        result_dir,
                        spec,
                        "ContainerTimeout",
                        f"worker {s.name} ran past {backstop:g} s (retry_settings.timeout "
                        f"{spec.settings.retry_settings.timeout} + {CONTAINER_GRACE_SECONDS} s) on this mini-batch "
                        f"without ending and was stopped{_dropped(output)}",
                        attempt,
                        started,
                    ) from None
                finally:
                    self._slot = None
                    self._close_output()
                if outcome.accepted:
                    expected = self._expected(spec, mini_batch_file, index, attempt, s.name)
                    scratch = pool.scratch_dir(s.slot) / scratch_name
                    return self._outcome(pool, s, outcome.exit_code, result_dir, spec, attempt, started, expected, output, scratch)
            dead = [s for s in slots if _died(s)]
            alive = [s for s in slots if s.running]
            if dead or not alive:
                if replacements > pool.slots + 1:
                    raise self._failed(
                        result_dir, spec, "WarmWorkerFailed", f"no warm worker could be kept running; {last_failure}", attempt, started
                    )
                target = dead[0] if dead else slots[0]
                if target.container is not None or target.state is not None:
                    last_failure = pool.failure(target)
                    if target.state is not None and target.state.state == WorkerState.FAILED and not alive and replacements:
                        raise self._failed(result_dir, spec, "WarmWorkerFailed", last_failure, attempt, started)
                    self.log.warning("%s; starting a replacement", last_failure)
                try:
                    pool.replace(target)
                except WarmWorkerError as exc:  # e.g. the image is not on this Docker host
                    raise self._failed(result_dir, spec, "WarmWorkerFailed", str(exc), attempt, started) from None
                replacements += 1
            now = time.monotonic()
            if now >= next_log:
                self.log.info(
                    "%s: waiting %.0f s so far for a free warm worker (%s)",
                    mb_id,
                    now - waiting_since,
                    ", ".join(f"{s.name} {_describe(s)}" for s in slots),
                )
                next_log = now + WAIT_LOG_SECONDS
            time.sleep(POLL_SECONDS)

    def _submit(self, pool: WarmWorkers, s: Slot, mini_batch_file: str, output: str, attempt: int, backstop: float | None) -> Any:
        streams: list[Any] = []

        def accepted(message: dict[str, Any]) -> None:
            self.log.info("%s took the mini-batch (its init() took %s s, once)", s.name, message.get("init_seconds"))
            if pool.spec.contract == "serve":  # the server's own lines while it serves this mini-batch
                streams.append(pool.follow_serving_log(s.slot, lambda text: self.log.info("%s", f"{s.name} serve | {text}")))

        def line(text: str) -> None:
            self.log.info("%s", f"{s.name} | {text}")  # through the attempt's OutputLog: rate-limited here, all in its file

        try:
            if backstop is None:
                return pool.submit(s.slot, mini_batch_file, output, attempt, line, accepted)
            with timeout(backstop, error_message=f"worker {s.name} past {backstop:g} s"):
                return pool.submit(s.slot, mini_batch_file, output, attempt, line, accepted)
        finally:
            for stop in streams:
                stop()

    def _outcome(
        self,
        pool: WarmWorkers,
        s: Slot,
        code: int | None,
        result_dir: Any,
        spec: DeploymentSpec,
        attempt: int,
        started: str,
        expected: Expected,
        output: OutputLog,
        scratch: Path,
    ) -> MiniBatchStatus:
        mb_id = mini_batch_id(result_dir.index)
        # A serving container that died mid-mini-batch leaves the client with failed requests (or no
        # /ping): say what happened, and stop the pair so that the retry gets a fresh one.
        death = pool.serving_death(s.slot) if spec.contract == "serve" else None
        if death is not None:
            pool.kill(s.slot)  # the client's report hides the cause; this says it, and nothing of it is taken in
            raise self._failed(result_dir, spec, "ServingContainerDied", death, attempt, started)
        # Only a hand-over that ended as the protocol says has a report worth reading.
        intake = self._take_in(scratch, result_dir, expected, spec, attempt, started) if code in (EXIT_OK, EXIT_FAILED) else None
        status = intake.status if intake is not None else None
        if status is not None and status.succeeded != (code == EXIT_OK):
            result_dir.retract()
            raise self._failed(
                result_dir, spec, "ResultRejected",
                f"worker {s.name}'s hand-over ended with exit code {code} but its report says {status.state}", attempt, started,
            )
        if code == EXIT_OK and status is not None and status.succeeded:
            remove_scratch(scratch.parent, scratch.name)
            return status
        if code == EXIT_FAILED and status is not None and status.error is not None:
            raise ScoringError(f"{mb_id} failed: {self._redact(status.error.one_line())}{_dropped(output)}")
        now = pool.settled(s.slot)
        why = pool.failure(now) if not now.running else f"its hand-over ended with exit code {code}"
        raise self._failed(
            result_dir,
            spec,
            "WarmWorkerDied",
            f"worker {s.name} ended while scoring {mb_id}; {self._redact(why)}",
            attempt,
            started,
        )

    def on_kill(self) -> None:
        # The worker is in the middle of this mini-batch: stop it (a later task starts a replacement).
        if self._pool is not None and self._slot is not None:
            self.log.warning("Task killed: stopping worker %s, which was scoring this mini-batch", slot_name(self._slot))
            self._pool.kill(self._slot)


def _stop_if_serving_died(pool: WarmWorkers, s: Slot, log: Any) -> Slot:
    """A worker whose serving container exited can serve nothing: stop its client now, so it is replaced."""
    if not s.running:
        return s
    death = pool.serving_failure(s.slot, answered=s.answered)
    if death is None:
        return s
    log.warning("%s; stopping its client", death)
    pool.kill(s.slot)
    return pool.settled(s.slot)


def _died(s: Slot) -> bool:
    """A worker that was started and is gone, but did not fail its init() (those are not restarted blindly)."""
    return s.container is not None and not s.running and not (s.state is not None and s.state.state == WorkerState.FAILED)


def _describe(s: Slot) -> str:
    if s.ready:
        return "busy"
    if s.starting:
        return "starting"
    return "stopped" if s.container is not None else "not started"


__all__ = ["StartWorkersOperator", "StopWorkersOperator", "WarmScoreMiniBatchOperator"]
