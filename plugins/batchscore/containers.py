"""Every container batchscore starts, specified once: image, command, mounts, environment, lockdown, devices, labels.

Four kinds of container exist, each built by one function here:

* :func:`scoring_container`: batchscore's runtime on one mini-batch in the deployment's image
  (Azure contract, a container per mini-batch);
* :func:`warm_worker`: the runtime's daemon for the whole run, taking one mini-batch at a time
  (either contract: for ``serve`` it is the serving container's client);
* :func:`serving_container`: the user's image as ``IMAGE serve`` (SageMaker contract), with the
  model at ``/opt/ml/model``;
* :func:`serving_client`: the runtime's HTTP client on one mini-batch, in the serving
  container's network namespace.

A :class:`Container` is a recipe; :meth:`Container.create` is the one place a container is
created, with the lockdown of :mod:`batchscore.security` applied to its host config. Secrets are
never part of a recipe: they join the environment at creation. The docker SDK only: no Airflow.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from docker.errors import NotFound
from docker.types import DeviceRequest, Mount

import batchscore_runtime.formats
from batchscore import hostpaths, security
from batchscore.errors import ScoringError
from batchscore.spec.deployment import DeploymentSpec
from batchscore.spec.resources import memory_bytes
from batchscore_runtime.formats import ContainerPaths, RunLayout, TransformConfig, mini_batch_id

#: batchscore's runtime package on this host, mounted read-only into every container that runs it.
RUNTIME_SOURCE = Path(batchscore_runtime.formats.__file__).resolve().parent
#: The environment every container running batchscore's runtime gets (a read-only root, a tmpfs /tmp).
RUNTIME_ENVIRONMENT = {
    "PYTHONPATH": ContainerPaths.RUNTIME,
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
    "HOME": "/tmp",
}
#: The image a serving client runs in: any image with Python 3.9+ will do (the runtime is mounted).
CLIENT_IMAGE_ENV = "BATCHSCORE_CLIENT_IMAGE"
DEFAULT_CLIENT_IMAGE = "batchscore-scoring:latest"
#: The label that says what a container is to batchscore (its value: one of the roles below).
ROLE_LABEL = "batchscore.role"
SCORING, WARM_WORKER, SERVING, WARM_SERVING, CLIENT = "scoring", "warm-worker", "serving", "warm-serving", "serving-client"


def client_image() -> str:
    """The serving client's image: ``BATCHSCORE_CLIENT_IMAGE``, else batchscore's scoring image."""
    return os.environ.get(CLIENT_IMAGE_ENV) or DEFAULT_CLIENT_IMAGE


def device_requests(gpus: int | str | list[str]) -> list[DeviceRequest]:
    """Docker device requests for ``resources.gpus``: a count, ``"all"``, or device ids."""
    if gpus == 0:
        return []
    if gpus == "all":
        return [DeviceRequest(count=-1, capabilities=[["gpu"]])]
    if isinstance(gpus, int):
        return [DeviceRequest(count=gpus, capabilities=[["gpu"]])]
    return [DeviceRequest(device_ids=list(gpus), capabilities=[["gpu"]])]


def explain_exit(code: Any, memory: str | None = None) -> str:
    """What a container's exit code says beyond its number (137 is SIGKILL), to follow the number in a message."""
    if code != 137:
        return ""
    at = f" = {memory}" if memory else ""
    return f" (SIGKILL: out of memory at resources.memory{at}, or docker kill)"


def transform_config(spec: DeploymentSpec) -> TransformConfig:
    """The serving client's settings from the deployment's ``transform`` block (SageMaker's names)."""
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
    assert t is not None, "contract serve always has transform settings"
    return {**spec.settings.environment_variables, **t.Environment, **t.environment()}


@dataclass(frozen=True)
class Container:
    """One container to create: what it runs, what it sees, and how it is locked down.

    Every container gets ``no-new-privileges``, never ``privileged``, a process limit, and no
    mount that could give it the Docker socket. ``locked_down`` adds what batchscore's own
    runtime needs no more than: every capability dropped and a read-only root with a tmpfs
    ``/tmp``; the user's serving container keeps its image's file system and user.
    """

    role: str
    image: str
    #: Where the image comes from, for the error when it is not on the Docker host.
    image_key: str
    command: list[str]
    mounts: list[Mount]
    environment: dict[str, str]
    labels: dict[str, str]
    user: str | None = None
    #: None: Docker's default bridge; ``"none"``; or ``"container:<id>"`` (a serving container's namespace).
    network_mode: str | None = "none"
    devices: list[DeviceRequest] = field(default_factory=list)
    memory: str | None = None  # resources.memory, Docker's syntax; also the swap limit: no swap beyond it
    shm_size: str | None = None
    pids_limit: int | None = None
    locked_down: bool = True
    #: Whether the deployment's secrets (settings.secret_environment) go to this container.
    gets_secrets: bool = False

    def host_config(self, cli: Any) -> Any:
        """The Docker host config of this container, lockdown included."""
        memory = memory_bytes(self.memory) if self.memory else None
        options: dict[str, Any] = {
            "mounts": self.mounts,
            "network_mode": self.network_mode,
            "device_requests": self.devices or None,
            "mem_limit": memory,
            "memswap_limit": memory,
            "shm_size": memory_bytes(self.shm_size) if self.shm_size else None,
            "pids_limit": self.pids_limit,
            **security.lockdown(self.locked_down),
        }
        return cli.create_host_config(**options)

    def create(self, cli: Any, *, name: str | None = None, secrets: dict[str, str] | None = None) -> str:
        """Create (not start) the container; returns its id. Secrets join the environment of a container that ``gets_secrets``.

        Raises :class:`ImageMissingError` when the image is not on the Docker host (no registry is used).
        """
        security.check_mounts(self.mounts)
        environment = {**self.environment, **(secrets or {})} if self.gets_secrets else self.environment
        try:
            created = cli.create_container(
                image=self.image,
                command=self.command,
                environment=environment,
                host_config=self.host_config(cli),
                labels=self.labels,
                user=self.user,
                name=name,
            )
        except NotFound as exc:  # docker.errors.ImageNotFound is one
            if "image" not in str(exc.explanation or exc).lower():
                raise
            raise ImageMissingError(
                f"the image {self.image!r} ({self.image_key}) is not on this Docker host: {exc.explanation}; "
                "build or load it there (docker load), no registry is used"
            ) from None
        return str(created["Id"])


class ImageMissingError(ScoringError):
    """A container's image is not on the Docker host; the message names the image and the setting it comes from."""


# --------------------------------------------------------------------------- mounts and commands


def runtime_mount() -> Mount:
    """batchscore's runtime package, mounted read-only where ``PYTHONPATH`` finds it."""
    return Mount(target=f"{ContainerPaths.RUNTIME}/batchscore_runtime", source=str(RUNTIME_SOURCE), type="bind", read_only=True)


def _read_only(target: str, source: Path) -> Mount:
    return Mount(target=target, source=str(source), type="bind", read_only=True)


def _writable(target: str, source: Path) -> Mount:
    return Mount(target=target, source=str(source), type="bind", read_only=False)


def _script_mounts(spec: DeploymentSpec) -> list[Mount]:
    """A scoring script's model (a folder, or a file inside the model folder) and its code folder, read-only."""
    model = spec.model.local
    target = ContainerPaths.MODEL if model.is_dir() else f"{ContainerPaths.MODEL}/{model.name}"
    assert spec.code_configuration is not None, "contract azure always has a scoring script"
    return [_read_only(target, model), _read_only(ContainerPaths.CODE, spec.code_configuration.code)]


def _script_options(spec: DeploymentSpec, gpu_count: int | None) -> list[str]:
    """The runtime's options for a scoring script (one-shot and warm alike); ``--gpus`` pins worker processes."""
    settings = spec.settings
    assert spec.code_configuration is not None, "contract azure always has a scoring script"
    options = [
        "--scoring-script",
        f"{ContainerPaths.CODE}/{spec.code_configuration.scoring_script}",
        "--workers",
        str(settings.max_concurrency_per_instance),
        "--timeout",
        str(settings.retry_settings.timeout),
        "--output-action",
        settings.output_action,
    ]
    return options + (["--gpus", str(gpu_count)] if gpu_count is not None else [])


def _client_options(spec: DeploymentSpec) -> list[str]:
    """The serving client's options (one-shot and warm alike): the transform settings and the server's address."""
    return ["--transform", json.dumps(transform_config(spec).to_json()), "--url", ContainerPaths.SERVING_URL]


def _network(spec: DeploymentSpec) -> str | None:
    return None if spec.resources.network else "none"  # None: Docker's default bridge


def _script_environment(spec: DeploymentSpec) -> dict[str, str]:
    return {**spec.settings.environment_variables, "AZUREML_MODEL_DIR": ContainerPaths.MODEL}


def _mini_batch_mounts(spec: DeploymentSpec, layout: RunLayout, index: int, attempt: int, extra: list[Mount]) -> list[Mount]:
    """What a one-shot container of mini-batch ``index`` sees: all read-only but the attempt's own scratch folder.

    The container never sees the mini-batch's result folder, which the orchestrator alone writes
    (:mod:`batchscore.intake`).
    """
    return hostpaths.for_docker(
        [
            runtime_mount(),
            *extra,
            _read_only(ContainerPaths.INPUT, spec.input_spec.local),
            _read_only(ContainerPaths.MINI_BATCH, layout.mini_batch_file(index)),
            _writable(ContainerPaths.OUTPUT, layout.attempt_scratch(index, attempt)),
        ]
    )


def _one_shot_command(module: str, attempt: int) -> list[str]:
    """The runtime ``module`` on the mounted file list (which says which mini-batch it is), try ``attempt``."""
    return [
        "python3",
        "-m",
        module,
        "--mini-batch",
        ContainerPaths.MINI_BATCH,
        "--input-root",
        ContainerPaths.INPUT,
        "--output",
        ContainerPaths.OUTPUT,
        "--attempt",
        str(attempt),
    ]


# --------------------------------------------------------------------------- the four containers


def scoring_container(
    spec: DeploymentSpec,
    layout: RunLayout,
    index: int,
    attempt: int,
    *,
    user: str | None,
    labels: dict[str, str],
    devices: list[DeviceRequest] | None = None,
    gpu_count: int | None = None,
) -> Container:
    """The container that runs the scoring script on mini-batch ``index`` (try ``attempt``).

    ``devices``: the GPUs of its lease; ``gpu_count``: how many it sees (to pin worker
    processes), None when unknown. Its only writable mount is the attempt's scratch folder.
    """
    settings = spec.settings
    command = _one_shot_command("batchscore_runtime", attempt) + [
        "--log-level",
        settings.logging_level,
        "--init-timeout",
        str(settings.init_timeout),
        *_script_options(spec, gpu_count),
    ]
    resources = spec.resources
    return Container(
        role=SCORING,
        image=spec.environment.ready_image,
        image_key="environment.image",
        command=command,
        mounts=_mini_batch_mounts(spec, layout, index, attempt, _script_mounts(spec)),
        environment={**_script_environment(spec), "BATCHSCORE_MINI_BATCH": mini_batch_id(index), **RUNTIME_ENVIRONMENT},
        labels={**labels, ROLE_LABEL: SCORING},
        user=user,
        network_mode=_network(spec),
        devices=list(devices or []),
        memory=resources.memory,
        shm_size=resources.shm_size,
        pids_limit=resources.pids_limit,
        gets_secrets=True,
    )


def serving_client(
    spec: DeploymentSpec,
    layout: RunLayout,
    index: int,
    attempt: int,
    *,
    user: str | None,
    labels: dict[str, str],
    serving_id: str,
) -> Container:
    """The client that sends mini-batch ``index``'s records to the serving container ``serving_id``, in its network namespace.

    No GPUs, no memory limit (``resources.memory`` is the server's), no secrets, never the model.
    """
    command = _one_shot_command("batchscore_runtime.serving", attempt)
    command += [*_client_options(spec), "--log-level", spec.settings.logging_level]
    return Container(
        role=CLIENT,
        image=client_image(),
        image_key=CLIENT_IMAGE_ENV,
        command=command,
        mounts=_mini_batch_mounts(spec, layout, index, attempt, []),
        environment={"BATCHSCORE_MINI_BATCH": mini_batch_id(index), **RUNTIME_ENVIRONMENT},
        labels={**labels, ROLE_LABEL: CLIENT},
        user=user,
        network_mode=f"container:{serving_id}",
        pids_limit=spec.resources.pids_limit,
    )


def serving_container(
    spec: DeploymentSpec,
    model_dir: Path,
    *,
    labels: dict[str, str],
    devices: list[DeviceRequest] | None = None,
    warm: bool = False,
) -> Container:
    """The deployment's serving container, ``IMAGE serve``: the model folder read-only at ``/opt/ml/model``.

    SageMaker's and the deployment's environment (and, at creation, the secrets), the GPUs of
    ``devices``, ``resources.memory``, and no network unless ``resources.network``. It runs as
    its image's user on its image's file system, as SageMaker runs it.
    """
    resources = spec.resources
    return Container(
        role=WARM_SERVING if warm else SERVING,
        image=spec.environment.ready_image,
        image_key="environment.image",
        command=["serve"],
        mounts=hostpaths.for_docker([_read_only(ContainerPaths.SERVING_MODEL, model_dir)]),
        environment=serving_environment(spec),
        labels={**labels, ROLE_LABEL: WARM_SERVING if warm else SERVING},
        user=None,
        network_mode=_network(spec),
        devices=list(devices or []),
        memory=resources.memory,
        shm_size=resources.shm_size,
        pids_limit=resources.pids_limit,
        locked_down=False,
        gets_secrets=True,
    )


def warm_worker(
    spec: DeploymentSpec,
    layout: RunLayout,
    worker: str,
    *,
    user: str | None,
    labels: dict[str, str],
    devices: list[DeviceRequest] | None = None,
    gpu_count: int | None = None,
    serving_id: str | None = None,
) -> Container:
    """The warm worker ``worker`` (``w1``...) of a run: the runtime's daemon, which takes one mini-batch at a time.

    It sees every mini-batch's file list, read-only, and writes only its own scratch and state
    folders. A scoring script's worker gets the model, the code, the GPUs and the secrets; a
    serving client's (``serving_id``: its serving container, whose network it joins) none of them.
    """
    settings, resources = spec.settings, spec.resources
    script = spec.contract == "azure"
    command = ["python3", "-m", "batchscore_runtime.warm", "daemon", "--contract", spec.contract, "--worker", worker]
    command += ["--idle-timeout", str(settings.worker_idle_timeout), "--init-timeout", str(settings.init_timeout)]
    command += ["--log-level", settings.logging_level, "--queue-depth", str(settings.worker_queue_depth)]
    command += _script_options(spec, gpu_count or None) if script else _client_options(spec)
    mounts = [
        runtime_mount(),
        _read_only(ContainerPaths.INPUT, spec.input_spec.local),
        _read_only(ContainerPaths.MINI_BATCHES, layout.mini_batches_dir),
        _writable(ContainerPaths.SCRATCH, layout.worker_scratch(worker)),
        _writable(ContainerPaths.WORKER_STATE, layout.workers_dir / worker),
        *(_script_mounts(spec) if script else []),
    ]
    environment = {"BATCHSCORE_WORKER": worker, **RUNTIME_ENVIRONMENT}
    return Container(
        role=WARM_WORKER,
        image=spec.environment.ready_image if script else client_image(),
        image_key="environment.image" if script else CLIENT_IMAGE_ENV,
        command=command,
        mounts=hostpaths.for_docker(mounts),
        environment={**_script_environment(spec), **environment} if script else environment,
        labels={**labels, ROLE_LABEL: WARM_WORKER},
        user=user,
        network_mode=_network(spec) if serving_id is None else f"container:{serving_id}",
        devices=list(devices or []) if script else [],
        memory=resources.memory if script else None,
        shm_size=resources.shm_size if script else None,
        pids_limit=resources.pids_limit,
        gets_secrets=script,
    )


__all__ = [
    "CLIENT_IMAGE_ENV",
    "Container",
    "ImageMissingError",
    "RUNTIME_ENVIRONMENT",
    "RUNTIME_SOURCE",
    "client_image",
    "device_requests",
    "explain_exit",
    "runtime_mount",
    "scoring_container",
    "serving_client",
    "serving_container",
    "serving_environment",
    "transform_config",
    "warm_worker",
]
