"""ScoreOperator: the one score task, mapped over the plan: a contract (what runs) times an executor (where it runs).

Both axes are chosen from the deployment, in one place each: :meth:`Contract.create
<batchscore.scoring.contract.Contract.create>` (``contract: azure | serve``) and
:func:`batchscore.scoring.executor.create` (``settings.worker_mode: per_mini_batch | warm``).
What every try does whatever runs it (claim the mini-batch, read the secrets from Airflow,
record a failure, report) is here and in :class:`batchscore.scoring.attempt.Attempt`, once.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, NoReturn

from airflow.sdk import BaseOperator

from batchscore import images, security
from batchscore.engine import docker_client
from batchscore.errors import SecretUnavailableError, StorageError
from batchscore.operators._base import DeploymentMixin
from batchscore.run_store import Placement, place
from batchscore.scoring import executor as executors
from batchscore.scoring.attempt import Attempt
from batchscore.scoring.contract import Contract
from batchscore.scoring.executor import Executor
from batchscore.scoring.warm import HandOver, WarmWorkersExecutor
from batchscore.scoring.workers import slot_name
from batchscore.secret_environment import resolve_secrets
from batchscore_runtime.formats import MiniBatchStatus, attempt_folder_name

#: How Airflow resumes a task whose deferral failed (``BaseOperator.resume_execution``), and why.
TRIGGER_FAIL, TRIGGER_TIMEOUT = "__fail__", "Trigger timeout"
#: Pause before a failed mini-batch is retried (Azure retries at once; a short pause lets a
#: transient cause, such as a busy Docker engine, pass).
RETRY_DELAY = timedelta(seconds=5)


class ScoreOperator(DeploymentMixin, BaseOperator):
    """Score one mini-batch of the plan and take its result in (:mod:`batchscore.intake`).

    Mapped over the plan's output (``mini_batch``: a reference with ``index``, ``label``,
    ``files`` and ``bytes``). The mini-batch's previous status is withdrawn before anything
    runs, so a crash can never leave an old result looking current; a try whose container ends
    without committing one (killed, out of memory, past its time) gets a failed status written
    for it, so the ledger shows every try's fate. Containers are locked down
    (:mod:`batchscore.containers`, :mod:`batchscore.security`) and their output streams into
    this task's log, rate-limited, and all of it into the try's output file, secrets redacted.

    :param endpoint_name: the endpoint (the DAG) the deployment belongs to.
    :param deployment: the deployment, as JSON (validated again on use).
    :param mini_batch: the plan's reference of the mini-batch this task scores.
    """

    # Nothing of ours is a Jinja template: what runs is built in execute(), on the worker.
    template_fields = ()
    ui_color = "#fff3e0"

    def __init__(self, *, endpoint_name: str, deployment: dict[str, Any], mini_batch: dict[str, Any], **kwargs: Any):
        super().__init__(**kwargs)
        self.endpoint_name = endpoint_name
        self.deployment = deployment
        self.mini_batch = mini_batch
        self._executor: Executor | None = None

    def _attempt(self, context: Any) -> tuple[Placement, Any, Attempt]:
        # On object storage: a deployment whose paths are local (staged inputs, the cached model, the run
        # folder's mirror), and the transfers around the try (:mod:`batchscore.run_store`).
        placement = place(self.run_spec(context), context["run_id"], fetch=True, log_to=self.log)
        ti = context.get("ti")
        attempt = Attempt(
            spec=placement.spec,
            endpoint_name=self.endpoint_name,
            run_id=context["run_id"],
            index=int(self.mini_batch["index"]),
            attempt=int(getattr(ti, "try_number", 1) or 1),  # a deferred task resumes in the same try
            reference=dict(self.mini_batch),
            log=self.log,
        )
        return placement, docker_client(), attempt

    def _secrets(self, attempt: Attempt) -> dict[str, str]:
        # Read from Airflow now, on the worker; only the containers that need them get them, at
        # creation (neither rendered, serialized nor logged).
        try:
            secrets = resolve_secrets(attempt.spec.settings.secret_environment)
        except SecretUnavailableError as exc:
            raise attempt.failed("SecretUnavailable", str(exc)) from None
        if secrets:
            attempt.secret_values = tuple(secrets.values())
            attempt.log = security.RedactingLogger(self.log, attempt.secret_values)
        return secrets

    def execute(self, context: Any) -> dict[str, Any]:
        placement, cli, attempt = self._attempt(context)
        placement.prepare_mini_batch(attempt.index, attempt.attempt)
        attempt.prepare()
        try:  # an environment's conda file: its image, built once per Docker host (batchscore.images)
            attempt.spec = spec = images.prepared(attempt.spec, cli, self.log)
        except images.ImageBuildError as exc:
            error = attempt.failed("ImageBuildError", str(exc))
            placement.finish_mini_batch(attempt.index, attempt.attempt, self.log, failing=True)
            raise error from None
        contract = Contract.create(spec)
        self._executor = executor = executors.create(attempt, cli, self.log)
        try:
            try:
                placement.stage_inputs(attempt.index, self.log)
            except StorageError as exc:
                raise attempt.failed("StorageError", str(exc)) from None
            secrets = self._secrets(attempt)
            if spec.settings.deferrable and isinstance(executor, WarmWorkersExecutor):
                handover = executor.hand_over(attempt, contract, secrets)
            else:
                status = executor.score(attempt, contract, secrets)
                handover = None
        except BaseException:
            placement.finish_mini_batch(attempt.index, attempt.attempt, self.log, failing=True)
            raise
        if handover is not None:
            self._defer(handover, spec.settings.worker_queue_depth)
        return self._finish(placement, attempt, contract, status)

    def _finish(self, placement: Placement, attempt: Attempt, contract: Contract, status: MiniBatchStatus) -> dict[str, Any]:
        placement.finish_mini_batch(attempt.index, attempt.attempt, self.log)
        contract.report(status, attempt.log)
        result = {"mini_batch": status.id, "rows": status.rows, "failed_items": status.failed_items}
        return {**result, "worker": status.worker} if status.worker else result

    def _defer(self, handover: HandOver, depth: int) -> NoReturn:
        """Wait in the triggerer (:mod:`batchscore.triggers`) until the worker is done with the mini-batch.

        The trigger stops waiting at the contract's backstop from when the worker took it; the deferral's
        own timeout (the backstop once per place in the queue, and a minute) is the scheduler's, should no
        triggerer run: :meth:`resume_execution` then stops the worker.
        """
        from batchscore.triggers import HandOverTrigger

        timeout = timedelta(seconds=handover.backstop * depth + 60) if handover.backstop is not None else None
        self.log.info("Deferring until worker %s is done with the mini-batch (settings.deferrable)", slot_name(handover.slot))
        self.defer(
            trigger=HandOverTrigger(handover.record, handover.container, handover.backstop, handover.to_json()),
            method_name="execute_complete",
            timeout=timeout,
        )

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        """A deferred task resumes (its trigger fired): take the worker's result in and commit it, as :meth:`execute` does."""
        placement, cli, attempt = self._attempt(context)
        spec = attempt.spec = images.prepared(attempt.spec, cli, self.log)  # built already: the same image
        contract = Contract.create(spec)
        executor = executors.create(attempt, cli, self.log)
        self._executor = executor
        try:
            if not isinstance(executor, WarmWorkersExecutor):  # create() said why, in the log
                raise attempt.failed(
                    "WarmWorkerFailed",
                    f"the task resumed on an Airflow worker that does not reach the Docker engine of warm worker "
                    f"{slot_name(int(event['handover']['slot']))}; run the triggerer and the score tasks on that host",
                )
            secrets = self._secrets(attempt)
            status = executor.resume(attempt, HandOver.from_json(event["handover"]), event)
            again = executor.hand_over(attempt, contract, secrets) if status is None else None
        except BaseException:
            placement.finish_mini_batch(attempt.index, attempt.attempt, self.log, failing=True)
            raise
        if again is not None:
            self._defer(again, spec.settings.worker_queue_depth)
        assert status is not None
        return self._finish(placement, attempt, contract, status)

    def resume_execution(self, next_method: str, next_kwargs: dict[str, Any] | None, context: Any) -> Any:
        """A deferral that failed (past its timeout, or its trigger raised): stop the worker, commit the failed try."""
        if next_method == TRIGGER_FAIL:
            placement, cli, attempt = self._attempt(context)
            executor = executors.create(attempt, cli, self.log)
            if isinstance(executor, WarmWorkersExecutor):
                worker = executor.abandon(attempt, attempt_folder_name(attempt.index, attempt.attempt))
                error = str((next_kwargs or {}).get("error", "Unknown"))
                timed_out = error == TRIGGER_TIMEOUT
                stopped = f"; worker {worker} was stopped, or let it go from its queue" if worker else ""
                attempt.failed(
                    "ContainerTimeout" if timed_out else "TriggerFailed",
                    f"the deferred task was not resumed within its deferral's timeout{stopped}"
                    if timed_out
                    else f"its trigger failed ({error}; the triggerer's log says why){stopped}",
                )
                placement.finish_mini_batch(attempt.index, attempt.attempt, self.log, failing=True)
        return super().resume_execution(next_method, next_kwargs, context)

    def on_kill(self) -> None:
        if self._executor is not None:
            self._executor.kill()


__all__ = ["RETRY_DELAY", "ScoreOperator"]
