"""ScoreOperator: the one score task, mapped over the plan: a contract (what runs) times an executor (where it runs).

Both axes are chosen from the deployment, in one place each: :meth:`Contract.create
<batchscore.scoring.contract.Contract.create>` (``contract: azure | serve``) and
:func:`batchscore.scoring.executor.create` (``settings.worker_mode: per_mini_batch | warm``).
What every try does whatever runs it (claim the mini-batch, read the secrets from Airflow,
record a failure, report) is here and in :class:`batchscore.scoring.attempt.Attempt`, once.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import BaseOperator

from batchscore import images, security
from batchscore.engine import docker_client
from batchscore.errors import SecretUnavailableError, StorageError
from batchscore.operators._base import DeploymentMixin
from batchscore.run_store import place
from batchscore.scoring import executor as executors
from batchscore.scoring.attempt import Attempt
from batchscore.scoring.contract import Contract
from batchscore.scoring.executor import Executor
from batchscore.secret_environment import resolve_secrets

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

    def execute(self, context: Any) -> dict[str, Any]:
        # On object storage: a deployment whose paths are local (staged inputs, the cached model, the run
        # folder's mirror), and the transfers around the try (:mod:`batchscore.run_store`).
        placement = place(self.run_spec(context), context["run_id"], fetch=True, log_to=self.log)
        cli = docker_client()
        ti = context.get("ti")
        attempt = Attempt(
            spec=placement.spec,
            endpoint_name=self.endpoint_name,
            run_id=context["run_id"],
            index=int(self.mini_batch["index"]),
            attempt=int(getattr(ti, "try_number", 1) or 1),
            reference=dict(self.mini_batch),
            log=self.log,
        )
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
            # Read from Airflow now, on the worker; only the containers that need them get them, at
            # creation (neither rendered, serialized nor logged).
            try:
                secrets = resolve_secrets(spec.settings.secret_environment)
            except SecretUnavailableError as exc:
                raise attempt.failed("SecretUnavailable", str(exc)) from None
            if secrets:
                attempt.secret_values = tuple(secrets.values())
                attempt.log = security.RedactingLogger(self.log, attempt.secret_values)
            status = executor.score(attempt, contract, secrets)
        except BaseException:
            placement.finish_mini_batch(attempt.index, attempt.attempt, self.log, failing=True)
            raise
        placement.finish_mini_batch(attempt.index, attempt.attempt, self.log)
        contract.report(status, attempt.log)
        result = {"mini_batch": status.id, "rows": status.rows, "failed_items": status.failed_items}
        return {**result, "worker": status.worker} if status.worker else result

    def on_kill(self) -> None:
        if self._executor is not None:
            self._executor.kill()


__all__ = ["RETRY_DELAY", "ScoreOperator"]
