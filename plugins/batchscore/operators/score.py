"""ScoreMiniBatchOperator: one scoring container per mini-batch (mapped over the plan)."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.providers.docker.exceptions import DockerContainerFailedException
from airflow.providers.docker.operators.docker import DockerOperator
from airflow.sdk.exceptions import AirflowTaskTimeout
from airflow.sdk.execution_time.timeout import timeout
from docker.errors import APIError, NotFound
from docker.types import DeviceRequest, Mount

import batchscore_runtime.formats
from batchscore import hostpaths, security
from batchscore.errors import ScoringError, SecretUnavailableError
from batchscore.gpus import GpuAssignment, lease_gpus
from batchscore.intake import Expected, Intake, ResultRejected, remove_scratch, take_in
from batchscore.output_log import LineLogger, OutputLog, log_file_name
from batchscore.operators._base import DeploymentMixin
from batchscore.plan import run_layout
from batchscore.spec import DeploymentSpec, memory_bytes
from batchscore_runtime.formats import (
    ContainerPaths,
    ErrorInfo,
    MiniBatchDir,
    MiniBatchStatus,
    RunLayout,
    mini_batch_id,
    now_iso,
)

#: Pause before a failed mini-batch is retried (Azure retries at once; a short pause lets a
#: transient cause, such as a busy Docker engine, pass).
RETRY_DELAY = timedelta(seconds=5)
RUNTIME_SOURCE = Path(batchscore_runtime.formats.__file__).resolve().parent


def device_requests(gpus: int | str | list[str]) -> list[DeviceRequest]:
    """Docker device requests for ``resources.gpus``: a count, ``"all"``, or device ids."""
    if gpus == 0:
        return []
    if gpus == "all":
        return [DeviceRequest(count=-1, capabilities=[["gpu"]])]
    if isinstance(gpus, int):
        return [DeviceRequest(count=gpus, capabilities=[["gpu"]])]
    return [DeviceRequest(device_ids=list(gpus), capabilities=[["gpu"]])]


#: Time a scoring container gets beyond ``init_timeout + retry_settings.timeout`` (container
#: start, reading the file list, writing the result) before the orchestrator kills it. The
#: runtime enforces the two limits itself; this only catches a container that stops answering.
CONTAINER_GRACE_SECONDS = 120


def backstop_seconds(spec: DeploymentSpec) -> float:
    """How long the container of one mini-batch may run before the orchestrator kills it."""
    return spec.settings.init_timeout + spec.settings.retry_settings.timeout + CONTAINER_GRACE_SECONDS


@dataclass(frozen=True)
class ContainerSetup:
    """What the container of one mini-batch gets, and where that mini-batch's files are."""

    mounts: list[Mount]
    environment: dict[str, str]
    command: list[str]
    mini_batch_file: Path  # the plan's file list of the mini-batch (host side)
    result_dir: MiniBatchDir  # its result folder (host side), which only the orchestrator writes
    scratch: Path  # the attempt's scratch folder (host side), the container's only writable mount


def container_setup(
    spec: DeploymentSpec, run_id: str, index: int, *, attempt: int = 1, gpu_count: int | None = None
) -> ContainerSetup:
    """Mounts, environment and command of the container that scores mini-batch ``index``.

    Everything is mounted read-only except the attempt's own scratch folder, and no mount can
    give the container the Docker socket. ``gpu_count`` is how many GPUs the container
    sees, for pinning worker processes. Secrets (``settings.secret_environment``) are not here:
    they are read from Airflow in ``execute`` and never leave the operator's private environment.
    """
    layout = run_layout(spec, run_id)
    settings = spec.settings
    model = spec.model.path
    model_target = ContainerPaths.MODEL if model.is_dir() else f"{ContainerPaths.MODEL}/{model.name}"
    mounts, environment = runtime_mounts_and_environment(
        spec,
        layout,
        index,
        attempt,
        [
            Mount(target=model_target, source=str(model), type="bind", read_only=True),
            Mount(target=ContainerPaths.CODE, source=str(spec.code_configuration.code), type="bind", read_only=True),
        ],
    )
    environment = {**settings.environment_variables, "AZUREML_MODEL_DIR": ContainerPaths.MODEL, **environment}
    command = [
        "python3",
        "-m",
        "batchscore_runtime",
        "--mini-batch",
        ContainerPaths.MINI_BATCH,
        "--input-root",
        ContainerPaths.INPUT,
        "--scoring-script",
        f"{ContainerPaths.CODE}/{spec.code_configuration.scoring_script}",
        "--output",
        ContainerPaths.OUTPUT,
        "--log-level",
        settings.logging_level,
        "--workers",
        str(settings.max_concurrency_per_instance),
        "--timeout",
        str(settings.retry_settings.timeout),
        "--init-timeout",
        str(settings.init_timeout),
        "--output-action",
        settings.output_action,
        "--attempt",
        str(attempt),
    ]
    if gpu_count is not None:
        command += ["--gpus", str(gpu_count)]
    return ContainerSetup(
        mounts, environment, command, layout.mini_batch_file(index), layout.mini_batch_dir(index), layout.attempt_scratch(index, attempt)
    )


def runtime_mounts_and_environment(
    spec: DeploymentSpec, layout: RunLayout, index: int, attempt: int, extra_mounts: list[Mount]
) -> tuple[list[Mount], dict[str, str]]:
    """What every container running batchscore's runtime on mini-batch ``index`` gets.

    The runtime, the input folder and the mini-batch's file list, read-only; ``extra_mounts``
    (read-only too); and the attempt's scratch folder, the only writable mount: the container
    never sees the mini-batch's result folder, which the orchestrator alone writes
    (:mod:`batchscore.intake`). No mount can give the container the Docker socket.
    """
    mounts = [
        runtime_mount(),
        *extra_mounts,
        Mount(target=ContainerPaths.INPUT, source=str(spec.input.path), type="bind", read_only=True),
        Mount(target=ContainerPaths.MINI_BATCH, source=str(layout.mini_batch_file(index)), type="bind", read_only=True),
        Mount(target=ContainerPaths.OUTPUT, source=str(layout.attempt_scratch(index, attempt)), type="bind", read_only=False),
    ]
    mounts = hostpaths.for_docker(mounts)
    return mounts, {"BATCHSCORE_MINI_BATCH": mini_batch_id(index), **RUNTIME_ENVIRONMENT}


#: The environment every container running batchscore's runtime gets (a read-only root, a tmpfs /tmp).
RUNTIME_ENVIRONMENT = {
    "PYTHONPATH": ContainerPaths.RUNTIME,
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
    "HOME": "/tmp",
}


def runtime_mount() -> Mount:
    """batchscore's runtime package, mounted read-only where ``PYTHONPATH`` finds it."""
    return Mount(target=f"{ContainerPaths.RUNTIME}/batchscore_runtime", source=str(RUNTIME_SOURCE), type="bind", read_only=True)


def _exit_hint(failure: str, spec: DeploymentSpec) -> str:
    """What an exit code of a container that committed nothing usually means."""
    match = re.search(r"'StatusCode': (\d+)", failure)
    if not match or int(match.group(1)) != 137:
        return ""
    limit = f" ({spec.resources.memory})" if spec.resources.memory else ""
    return (
        "; exit code 137 is SIGKILL: the container's memory limit resources.memory"
        f"{limit} was reached, or it was stopped from outside (docker kill)"
    )


class ScoreMiniBatchOperator(DeploymentMixin, DockerOperator):
    """Run the deployment's scoring container on one mini-batch and take its result in (:mod:`batchscore.intake`).

    Mapped over the plan's output (``mini_batch``: a reference with ``index`` and ``label``).
    The container is locked down (see :mod:`batchscore.security`): no network unless
    ``resources.network``, never root unless configured, no capabilities, no new privileges, a
    read-only root file system, a process limit and ``resources.memory``. It is removed when it
    ends, and its output streams into this task's log, secrets redacted. The mini-batch's
    previous status is withdrawn before the container starts, so a crash can never leave an old result looking current; a container
    that ends without committing one (killed, out of memory, past its time) gets a failed
    status written for it, so the ledger shows every attempt's fate.
    """

    # Nothing of ours is a Jinja template: mounts, environment and command are built in execute().
    template_fields = ()
    ui_color = "#fff3e0"

    def __init__(
        self,
        *,
        endpoint_name: str,
        deployment: dict[str, Any],
        mini_batch: dict[str, Any],
        **kwargs: Any,
    ):
        self.endpoint_name = endpoint_name
        self.deployment = deployment
        self.mini_batch = mini_batch
        spec = self.spec
        resources = spec.resources
        kwargs.setdefault("image", spec.environment.image)
        # The user is chosen in execute(), on the worker that runs the container (see security.container_user).
        kwargs.setdefault("user", None)
        memory = memory_bytes(resources.memory) if resources.memory else None
        super().__init__(
            auto_remove="force",
            mount_tmp_dir=False,
            do_xcom_push=False,
            device_requests=device_requests(resources.gpus),
            network_mode=None if resources.network else "none",  # None: Docker's default bridge
            mem_limit=memory,
            shm_size=memory_bytes(resources.shm_size) if resources.shm_size else None,
            privileged=False,
            **kwargs,
        )

    def execute(self, context: Any) -> dict[str, Any]:
        index = int(self.mini_batch["index"])
        mb_id = mini_batch_id(index)
        run_id = context["run_id"]
        spec = self.run_spec(context)
        ti = context.get("ti")
        attempt = int(getattr(ti, "try_number", 1) or 1)
        label = f"{self.endpoint_name}/{spec.name}/{run_id}/{mb_id}"
        # The GPUs are held from before the container starts until after it is gone.
        with lease_gpus(spec.resources.gpus, spec.resources.share_gpus, label=label, log=self.log) as gpus:
            status = self._score_leased(context, spec, index, attempt, gpus)
        self._report(status)
        return {"mini_batch": mb_id, "rows": status.rows, "failed_items": status.failed_items}

    def _score_leased(
        self, context: Any, spec: DeploymentSpec, index: int, attempt: int, gpus: GpuAssignment
    ) -> MiniBatchStatus:
        """Score mini-batch ``index`` on the leased GPUs; return its committed status or raise."""
        self.device_requests = gpus.device_requests
        setup = container_setup(spec, context["run_id"], index, attempt=attempt, gpu_count=gpus.count)
        return self._score(context, spec, setup, attempt)

    def _report(self, status: MiniBatchStatus) -> None:
        """The task log's last word on a mini-batch that succeeded."""
        self.log.info(
            "%s: %d rows from %d files (init %.2f s, run %.2f s)%s",
            status.id,
            status.rows,
            status.files,
            status.init_seconds,
            status.run_seconds,
            f"; {status.failed_items} failed item(s)" if status.failed_items else "",
        )

    def _score(self, context: Any, spec: DeploymentSpec, setup: ContainerSetup, attempt: int) -> MiniBatchStatus:
        """Run the container on the mini-batch, take its result in; return the committed status or raise ScoringError."""
        result_dir = setup.result_dir
        mb_id = mini_batch_id(result_dir.index)
        run_id = context["run_id"]
        self.user = self.user or security.container_user()
        self._prepare(setup.mini_batch_file, result_dir, run_id, attempt)
        self._make_scratch(setup.scratch, self.user)
        self.mounts = setup.mounts
        self.environment = setup.environment
        self.command = setup.command
        self.labels = {
            "batchscore.endpoint": self.endpoint_name,
            "batchscore.deployment": spec.name,
            "batchscore.run_id": run_id,
            "batchscore.mini_batch": mb_id,
        }
        self._remove_earlier_tries(mb_id)
        self.log.info(
            "%s: scoring %s files (%s bytes) in image %s, try %s of %s",
            mb_id,
            self.mini_batch.get("files"),
            self.mini_batch.get("bytes"),
            self.image,
            attempt,
            spec.settings.retry_settings.max_retries + 1,
        )
        started = now_iso()
        backstop = self._backstop_seconds(spec)
        # Read from Airflow now, on the worker; only DockerOperator's private environment holds them
        # (neither rendered, serialized nor logged), and only while the container runs.
        try:
            secrets = security.resolve_secrets(spec.settings.secret_environment)
        except SecretUnavailableError as exc:
            raise self._failed(result_dir, spec, "SecretUnavailable", str(exc), attempt, started) from None
        self._secret_values = tuple(secrets.values())
        self._private_environment = self._container_secrets(secrets)
        expected = self._expected(spec, setup.mini_batch_file, result_dir.index, attempt, None)
        output = self._open_output(result_dir, attempt)
        try:
            with (
                timeout(backstop, error_message=f"{mb_id}: scoring container past {backstop:g} s")
                if backstop is not None
                else contextlib.nullcontext()
            ):
                super().execute(context)
        except AirflowTaskTimeout:
            # DockerOperator removes the container with force on the way out: it is killed, not left running.
            raise self._failed(
                result_dir,
                spec,
                "ContainerTimeout",
                f"the scoring container ran past {backstop:g} s (settings.init_timeout "
                f"{spec.settings.init_timeout} + retry_settings.timeout {spec.settings.retry_settings.timeout} "
                f"+ {CONTAINER_GRACE_SECONDS} s) without ending and was killed{_dropped(output)}",
                attempt,
                started,
            ) from None
        except APIError as exc:
            if self.device_requests and "device driver" in str(exc):
                raise ScoringError(
                    f"{mb_id}: Docker cannot give the container the GPUs it asks for "
                    f"(resources.gpus: {spec.resources.gpus!r}): {exc.explanation}. Install the NVIDIA "
                    "Container Toolkit on the Docker host, or set resources.gpus to 0"
                ) from None
            raise
        except DockerContainerFailedException as exc:
            intake = self._take_in(setup.scratch, result_dir, expected, spec, attempt, started)
            if intake is not None and intake.status.succeeded:  # a container that failed cannot have succeeded
                result_dir.retract()
            elif intake is not None and intake.status.error is not None:
                raise ScoringError(f"{mb_id} failed: {self._redact(intake.status.error.one_line())}{_dropped(output)}") from None
            kind, message = self._died(exc, spec)
            raise self._failed(result_dir, spec, kind, message + _dropped(output), attempt, started) from None
        finally:
            self._private_environment, self._secret_values = {}, ()
            self._close_output()
        intake = self._take_in(setup.scratch, result_dir, expected, spec, attempt, started)
        if intake is not None and intake.status.error is not None:
            raise ScoringError(f"{mb_id} failed: {self._redact(intake.status.error.one_line())}{_dropped(output)}")
        if intake is None or not intake.status.succeeded:
            raise self._failed(
                result_dir, spec, "NoResult", "the container exited 0 but reported no result in its scratch folder", attempt, started
            )
        remove_scratch(setup.scratch.parent, setup.scratch.name)
        return intake.status

    def _expected(self, spec: DeploymentSpec, mini_batch_file: Path, index: int, attempt: int, worker: str | None) -> Expected:
        """What the container's report is checked against: the plan's files, this try, the deployment's result kind."""
        from batchscore_runtime.formats import read_mini_batch_file

        files = read_mini_batch_file(mini_batch_file).files
        result_file = spec.contract == "azure" and spec.settings.output_action == "append_row"
        return Expected(
            index=index,
            files=tuple(f.label for f in files),
            aliases=frozenset(f.path for f in files),
            attempt=attempt,
            worker=worker,
            result_file=result_file,
        )

    def _take_in(
        self, scratch: Path, result_dir: MiniBatchDir, expected: Expected, spec: DeploymentSpec, attempt: int, started: str
    ) -> Intake | None:
        """Check, copy and commit what the container reported (:mod:`batchscore.intake`); a rejected report fails the try."""
        try:
            intake = take_in(scratch.parent, scratch.name, result_dir, expected, log=self.log)
        except ResultRejected as exc:
            raise self._failed(result_dir, spec, "ResultRejected", exc.reason, attempt, started) from None
        if intake is not None and not intake.committed:
            raise ScoringError(
                f"{expected.id}: try {attempt} does not commit its result: try {result_dir.claimed_by()} of this mini-batch has taken over"
            )
        return intake

    def _open_output(self, result_dir: MiniBatchDir, attempt: int) -> OutputLog:
        """The attempt's output file, and the task log's budget for the container's lines (:mod:`batchscore.output_log`)."""
        base = self.log
        self._output = OutputLog(
            result_dir.path / log_file_name(attempt), lambda line: base.info("%s", line), redact=self._redact
        )
        return self._output

    def _close_output(self) -> None:
        output, self._output = self._output, None
        if output is not None:
            output.close()

    _output: OutputLog | None = None

    _secret_values: tuple[str, ...] = ()

    def _remove_earlier_tries(self, mb_id: str) -> None:
        """Remove this mini-batch's containers left on this engine by an earlier try whose Airflow worker died.

        Such a container may still be scoring (and using a GPU no lease holds any more); it can
        commit nothing (it writes only its own try's scratch folder, which no one takes in). Airflow runs one try of a
        task at a time, so a container with this run's and mini-batch's labels is never current.
        """
        found = self.cli.containers(all=True, filters={"label": [f"{k}={v}" for k, v in self.labels.items()]})
        for c in found:
            name = (c.get("Names") or [c["Id"][:12]])[0].lstrip("/")
            self.log.warning("%s: removing container %s of an earlier try (%s); its Airflow worker is gone", mb_id, name, c.get("Status"))
            with contextlib.suppress(NotFound):
                self.cli.remove_container(c["Id"], force=True)

    @staticmethod
    def _prepare(mini_batch_file: Path, result_dir: MiniBatchDir, run_id: str, attempt: int) -> None:
        """Before a container scores the mini-batch: its file list is there and readable, its old status withdrawn.

        The folder is claimed for try ``attempt`` first: an earlier try whose Airflow worker died
        but whose task process lives on can then no longer commit over this one.
        """
        if not mini_batch_file.is_file():
            raise ScoringError(
                f"{mini_batch_id(result_dir.index)}: its file list {mini_batch_file} is missing; the plan of run "
                f"{run_id!r} was removed or never finished (clear the plan task of this run as well)"
            )
        result_dir.path.mkdir(parents=True, exist_ok=True)
        result_dir.claim(attempt)
        result_dir.retract()
        mini_batch_file.chmod(0o644)  # whatever the plan's umask: the container's user reads it

    @staticmethod
    def _make_scratch(scratch: Path, user: str) -> None:
        """A fresh, empty scratch folder for the attempt's container, writable by its user and nothing else of the run."""
        remove_scratch(scratch.parent, scratch.name)
        scratch.mkdir(parents=True)
        security.make_writable_for(scratch, user)

    def _backstop_seconds(self, spec: DeploymentSpec) -> float | None:
        """How long the container may run before it is killed; None: no limit of the orchestrator's own."""
        return backstop_seconds(spec)

    def _container_secrets(self, secrets: dict[str, str]) -> dict[str, str]:
        """The secret environment of DockerOperator's container (the scoring container itself)."""
        return secrets

    def _died(self, exc: DockerContainerFailedException, spec: DeploymentSpec) -> tuple[str, str]:
        """The error type and message for a container that ended without committing a status."""
        return (
            "ContainerDied",
            f"the scoring container ended without committing a result ({exc}){_exit_hint(str(exc), spec)}",
        )

    def _host_config_options(self) -> dict[str, Any]:
        """What batchscore adds to the host config of DockerOperator's container."""
        return security.host_config_options(self.spec.resources)

    @property
    def log(self) -> Any:
        """The task's logger; while a container with secrets runs, one that redacts them (its output streams here).

        While a container runs, its lines (DockerOperator logs each as ``info("%s", line)``) go
        through the attempt's :class:`OutputLog`: all to its file, a rate-limited part here.
        """
        log = super().log
        log = security.RedactingLogger(log, self._secret_values) if self._secret_values else log
        return LineLogger(log, self._output) if self._output is not None else log

    def _redact(self, text: str) -> str:
        return security.redact(text, self._secret_values)

    def _run_image_with_mounts(self, target_mounts: Any, add_tmp_variable: bool) -> Any:
        """DockerOperator's container start, with batchscore's hardening added to the host config.

        DockerOperator 4.6 builds the host config inside this method and has no parameters for
        ``cap_drop``, ``security_opt``, ``pids_limit``, ``read_only``, ``tmpfs`` or
        ``memswap_limit``. Rather than copy its ~70 lines (and drift from the provider), the
        client's ``create_host_config`` is wrapped for this one call: the wrapper adds those
        options, forces ``privileged`` off and checks the mounts once more.
        """
        cli = self.cli  # DockerHook.api_client is cached: the wrapper is what the method calls
        original = cli.create_host_config
        extra = self._host_config_options()

        def create_host_config(*args: Any, **kwargs: Any) -> Any:
            security.check_mounts(kwargs.get("mounts") or [])
            return original(*args, **{**kwargs, **extra})

        cli.create_host_config = create_host_config
        try:
            return super()._run_image_with_mounts(target_mounts, add_tmp_variable)
        finally:
            del cli.create_host_config  # the instance attribute; the class's method shows again

    def _failed(
        self, result_dir: MiniBatchDir, spec: DeploymentSpec, kind: str, message: str, attempt: int, started: str
    ) -> ScoringError:
        """Commit a failed status for an attempt whose container could not, and return the error to raise."""
        mb_id = mini_batch_id(result_dir.index)
        if result_dir.read_status() is None:
            result_dir.commit(
                MiniBatchStatus(
                    index=result_dir.index,
                    state=MiniBatchStatus.FAILED,
                    files=int(self.mini_batch.get("files") or 0),
                    started_at=started,
                    finished_at=now_iso(),
                    error=ErrorInfo(type=kind, message=message),
                    attempt=attempt,
                    workers=spec.settings.max_concurrency_per_instance,
                )
            )
        return ScoringError(f"{mb_id} failed: {kind}: {message}")


def _dropped(output: OutputLog | None) -> str:
    """For an error message: how much of the container's output the task log left out, if any."""
    summary = output.summary() if output is not None else ""
    return f" ({summary})" if summary else ""
