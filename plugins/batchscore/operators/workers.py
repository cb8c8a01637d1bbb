"""The warm workers' setup and teardown tasks (``settings.worker_mode: warm``): start them before scoring, remove them after.

* :class:`StartWorkersOperator` (the task group's setup task) starts the run's worker
  containers while the plan is written (it does not wait for the plan task), one per
  ``resources.instance_count`` (on a rerun, fewer when fewer mini-batches are left), and waits
  until each has called ``init()`` once (serving contract: passed ``/ping`` once).
  When none gets ready it removes them itself: Airflow runs no teardown after a failed setup.
* :class:`StopWorkersOperator` (the teardown task) stops and removes every worker container of
  the run, also when scoring tasks failed; Airflow runs it whatever happened upstream.

The mini-batches go to the workers through :class:`batchscore.operators.score.ScoreOperator`;
the containers are :mod:`batchscore.scoring.workers`'.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperator

from batchscore import images
from batchscore.engine import docker_client
from batchscore.model_archive import serving_model_dir
from batchscore.operators._base import DeploymentMixin
from batchscore.plan import run_layout
from batchscore.run_store import place
from batchscore.scoring.workers import CONTAINER_START_GRACE, WarmWorkerError, WarmWorkers
from batchscore.secret_environment import resolve_secrets
from batchscore.spec import DeploymentSpec
from batchscore_runtime.worker_state import WorkerState


def _workers(spec: DeploymentSpec, endpoint_name: str, context: Any, log: Any, **kwargs: Any) -> WarmWorkers:
    layout = run_layout(spec, context["run_id"])
    model_dir = serving_model_dir(spec, layout) if spec.contract == "serve" else None
    return WarmWorkers(docker_client(), spec, endpoint_name, context["run_id"], layout, log=log, model_dir=model_dir, **kwargs)


def _ready_call(spec: DeploymentSpec) -> str:
    return "init()" if spec.contract == "azure" else "the serving container's /ping"


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
        # On object storage: the workers mount this host's staging folder, model cache and run mirror.
        placement = place(self.run_spec(context), context["run_id"], fetch=True, log_to=self.log)
        spec, layout = images.prepared(placement.spec, docker_client(), self.log), placement.layout
        # The plan is written while the workers start: with no complete plan yet (a first run), as many
        # workers as resources.instance_count; with one (a rerun), only as many as mini-batches are left.
        plan = placement.peek_plan()
        instances = spec.resources.instance_count
        if plan is None:
            count = instances
            self.log.info(
                "Starting %d warm worker(s) (resources.instance_count) while the plan is written; each calls %s once",
                count,
                _ready_call(spec),
            )
        else:
            pending = [
                e
                for e in plan.mini_batches
                if not ((s := layout.mini_batch_dir(e.index).read_status()) is not None and s.succeeded)
            ]
            count = min(instances, len(pending))
            if count == 0:
                self.log.info("No mini-batch left to score: no worker started")
                return {"workers": []}
            self.log.info(
                "Starting %d warm worker(s) for %d mini-batch(es) to score (resources.instance_count %d); each calls %s once",
                count,
                len(pending),
                instances,
                _ready_call(spec),
            )
        secrets = resolve_secrets(spec.settings.secret_environment)
        pool = self._pool = _workers(spec, self.endpoint_name, context, self.log, secrets=secrets)
        pool.record_engine()
        started: list[int] = []
        failures: list[str] = []
        try:
            for k in range(count):
                slot = pool.slot(k)
                if slot.running and slot.state is not None and slot.state.state in (WorkerState.READY, WorkerState.STARTING):
                    self.log.info("Warm worker %s is already running", slot.name)
                else:
                    try:
                        pool.replace(slot)
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
        return {"workers": [s.name for s in ready], "init_seconds": {s.name: s.state and s.state.init_seconds for s in ready}}

    _pool: WarmWorkers | None = None

    def on_kill(self) -> None:
        # Killed while the workers start: no teardown follows a setup that did not succeed.
        if self._pool is not None:
            self._pool.remove_all()


class StopWorkersOperator(_WorkersTask):
    """Stop and remove every warm worker container of the run (the task group's teardown)."""

    def execute(self, context: Any) -> dict[str, Any]:
        spec = place(self.run_spec(context), context["run_id"], log_to=self.log).spec
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


__all__ = ["StartWorkersOperator", "StopWorkersOperator"]
