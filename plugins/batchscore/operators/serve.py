"""ServeMiniBatchOperator: a SageMaker-style serving container per mini-batch, and its client.

For ``contract: serve`` each mapped instance runs two containers:

* the **serving container**: the deployment's image started as ``IMAGE serve``, with the model
  at ``/opt/ml/model`` (read-only), ``SAGEMAKER_BATCH=true`` and the transform's environment,
  the GPUs of the mini-batch's lease, and no network unless ``resources.network``;
* the **client**: batchscore's runtime (:mod:`batchscore_runtime.serving`) in the client image,
  run by DockerOperator in the serving container's network namespace, so it reaches the server
  at ``127.0.0.1:8080`` wherever the Docker host is: the Airflow worker never connects to the
  container itself (it may run in a container of its own, or talk to a remote Docker engine).
  The client waits for ``/ping``, asks ``/execution-parameters``, sends the records and writes
  the ``.out`` files and its report into the attempt's scratch folder, as the Azure contract's
  runtime does; the orchestrator checks and commits them (:mod:`batchscore.intake`).

The serving container's output streams into the task log (``serve |``). A watcher stops the
client as soon as the serving container exits, so a server that dies is reported at once,
with its exit code and last log lines, instead of as requests that time out. The serving
container is stopped and removed when the mini-batch ends, fails, or the task is killed.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from airflow.providers.docker.exceptions import DockerContainerFailedException
from docker.errors import APIError, NotFound
from docker.types import Mount

from batchscore import hostpaths, security
from batchscore.errors import ScoringError
from batchscore.gpus import GpuAssignment
from batchscore.model_archive import serving_model_dir
from batchscore.operators.score import ContainerSetup, ScoreMiniBatchOperator, runtime_mounts_and_environment
from batchscore.plan import run_layout
from batchscore.spec import DeploymentSpec, memory_bytes
from batchscore_runtime.formats import ContainerPaths, MiniBatchStatus, TransformConfig

#: The image the client runs in: any image with Python 3.9+ will do (the runtime is mounted).
CLIENT_IMAGE_ENV = "BATCHSCORE_CLIENT_IMAGE"
DEFAULT_CLIENT_IMAGE = "batchscore-scoring:latest"
#: Lines of the serving container's log quoted in the error when it dies.
LOG_TAIL_LINES = 15
#: Seconds the serving container gets to stop on SIGTERM before it is killed.
STOP_TIMEOUT = 10
#: Seconds a serving container that is going gets to say it exited, when the client could not start.
SETTLE_SECONDS = 30.0


def client_image() -> str:
    """The client's image: ``BATCHSCORE_CLIENT_IMAGE``, else batchscore's scoring image."""
    return os.environ.get(CLIENT_IMAGE_ENV) or DEFAULT_CLIENT_IMAGE


def transform_config(spec: DeploymentSpec) -> TransformConfig:
    """The client's settings from the deployment's ``transform`` block (SageMaker's names)."""
    t = spec.transform
    assert t is not None, "contract serve always has transform settings"
    dp = t.data_processing
    return TransformConfig(
        split_type=t.SplitType,
        batch_strategy=t.batch_strategy_value,
        max_payload_mb=t.MaxPayloadInMB,
        max_concurrent_transforms=t.MaxConcurrentTransforms,
        compression=t.CompressionType,
        content_type=t.ContentType,
        accept=t.Accept,
        assemble_with=t.AssembleWith,
        invocation_timeout=float(t.client_config.InvocationsTimeoutInSeconds),
        invocation_max_retries=t.client_config.InvocationsMaxRetries,
        input_filter=dp.InputFilter,
        output_filter=dp.OutputFilter,
        join_source=dp.JoinSource,
        startup_timeout=float(spec.settings.init_timeout),
    )


def serving_environment(spec: DeploymentSpec) -> dict[str, str]:
    """The serving container's plain environment: SageMaker's variables, the transform's and the settings'."""
    t = spec.transform
    assert t is not None
    return {**spec.settings.environment_variables, **t.Environment, **t.environment()}


def client_setup(spec: DeploymentSpec, run_id: str, index: int, *, attempt: int = 1) -> ContainerSetup:
    """Mounts, environment and command of the client container of mini-batch ``index``."""
    layout = run_layout(spec, run_id)
    mounts, environment = runtime_mounts_and_environment(spec, layout, index, attempt, [])
    command = [
        "python3",
        "-m",
        "batchscore_runtime.serving",
        "--mini-batch",
        ContainerPaths.MINI_BATCH,
        "--input-root",
        ContainerPaths.INPUT,
        "--output",
        ContainerPaths.OUTPUT,
        "--transform",
        json.dumps(transform_config(spec).to_json()),
        "--attempt",
        str(attempt),
        "--url",
        ContainerPaths.SERVING_URL,
        "--log-level",
        spec.settings.logging_level,
    ]
    return ContainerSetup(
        mounts, environment, command, layout.mini_batch_file(index), layout.mini_batch_dir(index), layout.attempt_scratch(index, attempt)
    )


def create_serving_container(
    cli: Any,
    spec: DeploymentSpec,
    model_dir: Any,
    *,
    gpu_requests: list[Any] | None,
    secrets: dict[str, str],
    labels: dict[str, str],
    name: str | None = None,
) -> str:
    """Create (not start) the deployment's serving container, ``IMAGE serve``; returns its id.

    The model folder at ``/opt/ml/model`` read-only, SageMaker's and the deployment's environment
    with ``secrets``, the GPUs of ``gpu_requests``, ``resources.memory``, and no network unless
    ``resources.network``. Raises :class:`ScoringError` when the image is not on the Docker host.
    """
    resources = spec.resources
    mounts = [Mount(target=ContainerPaths.SERVING_MODEL, source=str(model_dir), type="bind", read_only=True)]
    mounts = hostpaths.for_docker(mounts)
    memory = memory_bytes(resources.memory) if resources.memory else None
    host_config = cli.create_host_config(
        mounts=mounts,
        network_mode=None if resources.network else "none",
        device_requests=gpu_requests or None,
        mem_limit=memory,
        memswap_limit=memory,
        shm_size=memory_bytes(resources.shm_size) if resources.shm_size else None,
        pids_limit=resources.pids_limit,
        security_opt=[security.NO_NEW_PRIVILEGES],
        privileged=False,
    )
    try:
        created = cli.create_container(
            image=spec.environment.image,
            command=["serve"],
            environment={**serving_environment(spec), **secrets},
            host_config=host_config,
            labels=labels,
            name=name,
        )
    except NotFound as exc:
        raise ScoringError(
            f"the serving image {spec.environment.image!r} (key environment.image) is not on this "
            f"Docker host: {exc.explanation}; build or load it there (docker load), no registry is used"
        ) from None
    return created["Id"]


@dataclass
class _Served:
    """The serving container of the running mini-batch, and what the watcher saw of it."""

    id: str
    exit_code: int | None = None
    log_tail: str = ""


class ServeMiniBatchOperator(ScoreMiniBatchOperator):
    """Score one mini-batch with the deployment's serving container (``contract: serve``).

    Mapped over the plan's output like :class:`ScoreMiniBatchOperator`, with the same retries,
    status records and failure handling; see the module docstring for the two containers.
    """

    ui_color = "#ede7f6"

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("image", client_image())
        super().__init__(**kwargs)
        # DockerOperator's container is the client: no GPUs, no memory limit of the server's.
        self.device_requests = []
        self.mem_limit = None
        self.shm_size = None
        self._served: _Served | None = None
        self._serving_secrets: dict[str, str] = {}

    # ------------------------------------------------------------------ hooks of ScoreMiniBatchOperator

    def _score_leased(
        self, context: Any, spec: DeploymentSpec, index: int, attempt: int, gpus: GpuAssignment
    ) -> MiniBatchStatus:
        # The GPUs go to the serving container (started in _run_image_with_mounts), not the client.
        self._gpu_requests = gpus.device_requests
        self._model_dir = serving_model_dir(spec, run_layout(spec, context["run_id"]))  # the plan unpacked it
        setup = client_setup(spec, context["run_id"], index, attempt=attempt)
        try:
            return self._score(context, spec, setup, attempt)
        finally:
            self._remove_serving_container()

    def _report(self, status: MiniBatchStatus) -> None:
        self.log.info(
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
            self.log.warning("%s: %s: %s: %s", status.id, item.file, item.type, item.message)

    def _backstop_seconds(self, spec: DeploymentSpec) -> float | None:
        # The client bounds everything itself: /ping by init_timeout, each request by
        # InvocationsTimeoutInSeconds and its retries; a dead server stops it (the watcher).
        return None

    def _container_secrets(self, secrets: dict[str, str]) -> dict[str, str]:
        # Secrets are for the user's serving container; the client gets none.
        self._serving_secrets = secrets
        return {}

    def _host_config_options(self) -> dict[str, Any]:
        resources = self.spec.resources.model_copy(update={"memory": None})  # resources.memory is the server's
        return security.host_config_options(resources)

    def _died(self, exc: DockerContainerFailedException, spec: DeploymentSpec) -> tuple[str, str]:
        served = self._served
        if served is not None and self._exited(served):
            return "ServingContainerDied", self._death_message(served, spec)
        return super()._died(exc, spec)

    def _run_image_with_mounts(self, target_mounts: Any, add_tmp_variable: bool) -> Any:
        """Start the serving container, then the client in its network namespace."""
        served = self._start_serving_container()
        self.network_mode = f"container:{served.id}"
        try:
            return super()._run_image_with_mounts(target_mounts, add_tmp_variable)
        except APIError:
            # DockerOperator removed the client it created (auto_remove); the serving container goes in _score_leased.
            if self._exited(served, settle=SETTLE_SECONDS):
                # The server died before the client could join its network: say so, not Docker's words.
                raise DockerContainerFailedException("the serving container exited before the client started") from None
            raise

    def on_kill(self) -> None:
        super().on_kill()
        self._remove_serving_container()

    # ------------------------------------------------------------------ the serving container

    def _start_serving_container(self) -> _Served:
        spec = self.spec
        self.log.info(
            "Starting the serving container: %s serve (model %s at %s; network %s)",
            spec.environment.image,
            self._model_dir,
            ContainerPaths.SERVING_MODEL,
            "bridge" if spec.resources.network else "none",
        )
        served = _Served(
            create_serving_container(
                self.cli,
                spec,
                self._model_dir,
                gpu_requests=self._gpu_requests,
                secrets=self._serving_secrets,
                labels={**(self.labels or {}), "batchscore.role": "serving"},
            )
        )
        self._served = served
        self.cli.start(served.id)
        threading.Thread(target=self._stream_serving_log, args=(served,), daemon=True).start()
        threading.Thread(target=self._watch_serving_container, args=(served,), daemon=True).start()
        return served

    def _stream_serving_log(self, served: _Served) -> None:
        """The serving container's output, line by line, into the task log."""
        try:
            for raw in self.cli.logs(served.id, stream=True, follow=True):
                for line in raw.decode("utf-8", "replace").splitlines():
                    self.log.info("%s", f"serve | {line}")  # through the attempt's OutputLog, as the client's lines
        except Exception:  # noqa: BLE001 - the container was removed; its log ends here
            return

    def _watch_serving_container(self, served: _Served) -> None:
        """Stop the client as soon as the serving container exits: nothing can be scored any more."""
        try:
            result = self.cli.wait(served.id)
        except Exception:  # noqa: BLE001 - removed while waiting: the mini-batch is over
            return
        if self._served is not served:
            return  # stopped by us, after the mini-batch
        self._record_exit(served, int(result.get("StatusCode", -1)))
        container = getattr(self, "container", None)
        if container:
            self.log.error("The serving container exited with code %s; stopping the client", served.exit_code)
            try:
                self.cli.kill(container["Id"])
            except Exception:  # noqa: BLE001 - the client already ended
                pass

    def _record_exit(self, served: _Served, code: int) -> None:
        try:
            served.log_tail = self.cli.logs(served.id, tail=LOG_TAIL_LINES).decode("utf-8", "replace").strip()
        except Exception:  # noqa: BLE001 - removed meanwhile
            served.log_tail = ""
        served.exit_code = code  # last: _died() reads the tail once the code is set

    def _exited(self, served: _Served, settle: float = 0.0) -> bool:
        """Whether the serving container has exited (asked now, not left to the watcher's timing).

        ``settle``: seconds to give a container that is going (Docker releases its network before
        it reports it exited) to say so.
        """
        deadline = time.monotonic() + settle
        while served.exit_code is None:
            try:
                state = self.cli.inspect_container(served.id)["State"]
            except APIError:
                return False
            if not state.get("Running"):
                self._record_exit(served, int(state.get("ExitCode", -1)))
            elif time.monotonic() < deadline:
                time.sleep(0.2)
            else:
                break
        return served.exit_code is not None

    def _death_message(self, served: _Served, spec: DeploymentSpec) -> str:
        code = served.exit_code
        hint = ""
        if code == 137:
            limit = f" ({spec.resources.memory})" if spec.resources.memory else ""
            hint = f" (SIGKILL: out of memory at resources.memory{limit}, or docker kill)"
        tail = self._redact(served.log_tail) if served.log_tail else "(it wrote nothing)"
        return (
            f"the serving container ({spec.environment.image} serve) exited with code {code}{hint} before the "
            f"mini-batch was done; its last log lines:\n{tail}"
        )

    def _remove_serving_container(self) -> None:
        served, self._served = self._served, None
        self._serving_secrets = {}
        if served is None:
            return
        try:
            self.cli.stop(served.id, timeout=STOP_TIMEOUT)
        except Exception:  # noqa: BLE001 - already stopped
            pass
        try:
            self.cli.remove_container(served.id, force=True)
            self.log.info("Serving container %s stopped and removed", served.id[:12])
        except NotFound:
            pass
        except APIError as exc:
            self.log.warning("Could not remove the serving container %s: %s", served.id[:12], exc)


__all__ = ["ServeMiniBatchOperator", "client_image", "create_serving_container", "client_setup", "serving_environment", "transform_config"]
