"""Where a mini-batch runs: :func:`create` picks the executor, a container per mini-batch or the run's warm workers.

As Ray Data's ``MapOperator.create`` picks a task pool or an actor pool, this one function reads
``settings.worker_mode`` (and, for warm workers, whether this Airflow worker reaches the Docker
engine they run on) and returns the executor; the score operator never branches on it. No Airflow import.
"""

from __future__ import annotations

from typing import Any, Protocol

from batchscore.errors import ScoringError
from batchscore.model_archive import serving_model_dir
from batchscore.scoring.attempt import Attempt
from batchscore.scoring.contract import Contract
from batchscore.scoring.per_mini_batch import ContainerPerMiniBatch
from batchscore.scoring.warm import WarmWorkersExecutor
from batchscore.scoring.workers import WarmWorkers
from batchscore_runtime.formats import MiniBatchStatus


class Executor(Protocol):
    """Runs one try of one mini-batch under a contract, and stops it when the task is killed."""

    def score(self, attempt: Attempt, contract: Contract, secrets: dict[str, str]) -> MiniBatchStatus:
        """Score the mini-batch; the committed status, or raise :class:`ScoringError` (the failed status committed)."""
        ...

    def kill(self) -> None:
        """Stop what runs for the try now (called from the task's kill handler)."""
        ...


def create(attempt: Attempt, cli: Any, log: Any) -> Executor:
    """The executor of ``attempt``'s deployment: its warm workers, or a container per mini-batch.

    A warm deployment whose workers run on another Docker engine than this Airflow worker
    reaches (a queue served on several Docker hosts) scores a scoring script's mini-batch in a
    container of its own, saying so; a serving container's cannot be, and fails naming the setting.
    """
    spec = attempt.spec
    if spec.settings.worker_mode != "warm":
        return ContainerPerMiniBatch(cli, log)
    layout = attempt.layout
    model_dir = serving_model_dir(spec, layout) if spec.contract == "serve" else None
    pool = WarmWorkers(cli, spec, attempt.endpoint_name, attempt.run_id, layout, log=log, model_dir=model_dir)
    elsewhere = pool.started_elsewhere()
    if elsewhere is None:
        return WarmWorkersExecutor(pool, log)
    theirs, ours = elsewhere
    where = (
        f"the run's warm workers run on the Docker engine of host {theirs.get('name') or '?'}, which this "
        f"Airflow worker does not reach (it reaches host {ours['name']}'s): resources.queue "
        f"{spec.queue or '(the default queue)'} is served on more than one Docker host"
    )
    if spec.contract == "serve":
        raise ScoringError(f"{attempt.id}: {where}; set settings.worker_mode: per_mini_batch for this deployment")
    log.warning(
        "%s: %s; scoring it in a container of its own (settings.worker_mode: per_mini_batch does so always)", attempt.id, where
    )
    return ContainerPerMiniBatch(cli, log)


__all__ = ["Executor", "create"]
