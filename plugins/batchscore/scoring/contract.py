"""What runs for a mini-batch, by contract: its containers, time limits, how a death is explained, how a result is reported.

:meth:`Contract.create` picks the deployment's contract (``azure``: a scoring script run by
batchscore's runtime; ``serve``: a SageMaker-style serving container and batchscore's client).
Where it runs is the executor's business (:mod:`batchscore.scoring.executor`). No Airflow import.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from docker.types import DeviceRequest

from batchscore import containers
from batchscore.containers import Container
from batchscore.model_archive import serving_model_dir
from batchscore.scoring.attempt import Attempt
from batchscore.spec.deployment import DeploymentSpec
from batchscore_runtime.formats import MiniBatchStatus

#: Time a scoring container gets beyond its runtime's own limits (container start, reading the
#: file list, writing the result) before the orchestrator kills it. The runtime enforces
#: init_timeout and retry_settings.timeout itself; this only catches one that stops answering.
CONTAINER_GRACE_SECONDS = 120


@dataclass(frozen=True)
class ServerExit:
    """How a serving container ended: its exit code and its last log lines (as it wrote them)."""

    code: int
    log_tail: str


class Contract:
    """What runs for a mini-batch of ``spec``; subclasses are the two contracts."""

    name: ClassVar[str]

    def __init__(self, spec: DeploymentSpec):
        self.spec = spec

    @staticmethod
    def create(spec: DeploymentSpec) -> Contract:
        """The contract the deployment names (``contract: azure`` or ``serve``)."""
        return ServeContract(spec) if spec.contract == "serve" else ScriptContract(spec)

    # ------------------------------------------------------------------ a container per mini-batch

    def server(self, attempt: Attempt, devices: list[DeviceRequest]) -> Container | None:
        """The container that must run before the mini-batch's own (and gets the GPUs), if any."""
        return None

    def one_shot(
        self, attempt: Attempt, *, user: str, devices: list[DeviceRequest], gpu_count: int | None, server_id: str | None
    ) -> Container:
        """The container that scores the mini-batch and reports into the try's scratch folder."""
        raise NotImplementedError

    def one_shot_backstop(self) -> float | None:
        """Seconds the one-shot container may run before it is killed; None: it bounds itself."""
        return None

    def warm_backstop(self) -> float | None:
        """Seconds a warm worker may spend on one mini-batch before it is stopped; None: it bounds itself."""
        return None

    def died(self, code: int | None, server: ServerExit | None, attempt: Attempt) -> tuple[str, str]:
        """The error type and message for a container that ended (``code``) without committing a result."""
        return "ContainerDied", (
            f"the {self.container_title} ended without committing a result (exit code {code})"
            f"{containers.explain_exit(code, self.spec.resources.memory)}"
        )

    container_title: ClassVar[str] = "scoring container"

    def report(self, status: MiniBatchStatus, log: Any) -> None:
        """The task log's last word on a mini-batch that succeeded."""
        raise NotImplementedError


class ScriptContract(Contract):
    """``contract: azure``: the user's scoring script (``init()``, ``run(mini_batch)``) in batchscore's runtime."""

    name = "azure"

    def one_shot(
        self, attempt: Attempt, *, user: str, devices: list[DeviceRequest], gpu_count: int | None, server_id: str | None
    ) -> Container:
        return containers.scoring_container(
            self.spec, attempt.layout, attempt.index, attempt.attempt,
            user=user, labels=attempt.labels(), devices=devices, gpu_count=gpu_count,
        )  # fmt: skip

    def one_shot_backstop(self) -> float | None:
        settings = self.spec.settings
        return settings.init_timeout + settings.retry_settings.timeout + CONTAINER_GRACE_SECONDS

    def warm_backstop(self) -> float | None:
        # A warm worker's init() is done before it takes a mini-batch: only run() and the grace count.
        return self.spec.settings.retry_settings.timeout + CONTAINER_GRACE_SECONDS

    def timeout_message(self, backstop: float) -> str:
        settings = self.spec.settings
        return (
            f"the scoring container ran past {backstop:g} s (settings.init_timeout {settings.init_timeout} + "
            f"retry_settings.timeout {settings.retry_settings.timeout} + {CONTAINER_GRACE_SECONDS} s) "
            "without ending and was killed"
        )

    def report(self, status: MiniBatchStatus, log: Any) -> None:
        log.info(
            "%s: %d rows from %d files (init %.2f s, run %.2f s)%s",
            status.id,
            status.rows,
            status.files,
            status.init_seconds,
            status.run_seconds,
            f"; {status.failed_items} failed item(s)" if status.failed_items else "",
        )


class ServeContract(Contract):
    """``contract: serve``: the user's serving container (``IMAGE serve``) and batchscore's client, which sends it the records.

    The client bounds everything itself (``/ping`` by ``init_timeout``, each request by
    ``InvocationsTimeoutInSeconds`` and its retries), so no backstop applies; a serving
    container that dies is noticed by the executor and named as the cause.
    """

    name = "serve"
    container_title = "serving client"

    def model_dir(self, attempt: Attempt) -> Path:
        """The model folder mounted at ``/opt/ml/model`` (a ``model.tar.gz`` is unpacked by the plan)."""
        return serving_model_dir(self.spec, attempt.layout)

    def server(self, attempt: Attempt, devices: list[DeviceRequest]) -> Container | None:
        return containers.serving_container(self.spec, self.model_dir(attempt), labels=attempt.labels(), devices=devices)

    def one_shot(
        self, attempt: Attempt, *, user: str, devices: list[DeviceRequest], gpu_count: int | None, server_id: str | None
    ) -> Container:
        assert server_id is not None, "the client joins its serving container's network"
        return containers.serving_client(
            self.spec, attempt.layout, attempt.index, attempt.attempt, user=user, labels=attempt.labels(), serving_id=server_id
        )

    def died(self, code: int | None, server: ServerExit | None, attempt: Attempt) -> tuple[str, str]:
        if server is None:
            return super().died(code, server, attempt)
        tail = attempt.redact(server.log_tail) if server.log_tail else "(it wrote nothing)"
        return "ServingContainerDied", (
            f"the serving container ({self.spec.environment.image} serve) exited with code {server.code}"
            f"{containers.explain_exit(server.code, self.spec.resources.memory)} before the mini-batch was done; "
            f"its last log lines:\n{tail}"
        )

    def report(self, status: MiniBatchStatus, log: Any) -> None:
        log.info(
            "%s: %d records from %d files, %d .out file(s) (healthy after %.2f s, scoring %.2f s)%s",
            status.id,
            status.rows,
            status.files,
            status.custom_outputs,
            status.init_seconds,
            status.run_seconds,
            f"; {status.failed_items} file(s) FAILED, see errors.csv after the merge" if status.failed_items else "",
        )
        for item in status.item_errors[:10]:
            log.warning("%s: %s: %s: %s", status.id, item.file, item.type, item.message)


__all__ = ["CONTAINER_GRACE_SECONDS", "Contract", "ScriptContract", "ServeContract", "ServerExit"]
