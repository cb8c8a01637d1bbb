"""A deployment's ``resources``: GPUs, memory, processes, network, queue and pool of its scoring containers."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, PositiveInt

from batchscore.spec.base import Name, StrictModel


def _gpus(value: Any) -> int | Literal["all"] | list[str]:
    if isinstance(value, bool):
        raise ValueError("gpus must be a count, 'all', or a list of device ids")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"gpus must be 0 or more, got {value}")
        return value
    if value == "all":
        return "all"
    if isinstance(value, list) and value and all(isinstance(v, (int, str)) and not isinstance(v, bool) for v in value):
        return [str(v) for v in value]
    raise ValueError(f"gpus must be a count, 'all', or a non-empty list of device ids, got {value!r}")


MEMORY_PATTERN = r"^[0-9]+[bkmgBKMG]?$"
MEMORY_UNITS = {"b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
MIN_MEMORY = 6 * 1024**2  # Docker refuses less
SIZE_SCHEMA: list[Any] = [
    {"type": "string", "pattern": MEMORY_PATTERN},
    {"type": "integer", "minimum": MIN_MEMORY},
    {"type": "null"},
]


def memory_bytes(value: str) -> int:
    """Bytes of a size in Docker's syntax (``"4g"``, ``"512m"``, ``"1048576"``)."""
    unit = value[-1].lower()
    return int(value[:-1]) * MEMORY_UNITS[unit] if unit in MEMORY_UNITS else int(value)


def _bytes_as_text(value: Any) -> Any:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _memory(value: str | None) -> str | None:
    if value is None:
        return None
    if not re.fullmatch(MEMORY_PATTERN, value):
        raise ValueError(f"a size is a whole number with b, k, m or g, e.g. '512m' or '4g'; got {value!r}")
    if memory_bytes(value) < MIN_MEMORY:
        raise ValueError(f"a size must be at least 6m, got {value!r}")
    return value


class Resources(StrictModel):
    """What one run may use, and what its scoring containers may reach."""

    instance_count: PositiveInt = Field(
        1,
        description="Mini-batches of one run scored at the same time (Airflow's max_active_tis_per_dagrun); "
        "warm workers: the run's worker containers.",
    )
    gpus: Annotated[Any, AfterValidator(_gpus)] = Field(
        0,
        description="GPUs per scoring container: a count, 'all', or a list of device ids (indexes or UUIDs). Each "
        "container (warm: each worker, for the run) leases its GPUs exclusively unless share_gpus; counts and "
        "'all' need BATCHSCORE_GPUS or nvidia-smi on the worker.",
        json_schema_extra={
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {"const": "all"},
                {"type": "array", "items": {"type": ["string", "integer"]}, "minItems": 1},
            ]
        },
    )
    share_gpus: bool = Field(
        False,
        description="Let concurrent scoring containers (and worker processes) share GPUs: nothing is locked and the "
        "request goes to Docker as `docker run --gpus` sends it. By default each gets GPUs of its own.",
    )
    network: bool = Field(
        False,
        description="batchscore's own: give the scoring container a network (Docker's default bridge). "
        "By default it has none: no access to other hosts, the Docker host or the internet.",
    )
    memory: Annotated[str | None, BeforeValidator(_bytes_as_text), AfterValidator(_memory)] = Field(
        None,
        description="batchscore's own: memory limit of one scoring container, in Docker's syntax: a whole "
        "number with b, k, m or g ('512m', '4g'), at least 6m; no swap beyond it. Default: no limit.",
        json_schema_extra={"anyOf": SIZE_SCHEMA},
    )
    pids_limit: int = Field(
        4096,
        ge=64,
        description="batchscore's own: processes and threads one scoring container may have at once "
        "(fork bombs stop there); -1 is not accepted.",
    )
    shm_size: Annotated[str | None, BeforeValidator(_bytes_as_text), AfterValidator(_memory)] = Field(
        None,
        description="batchscore's own: size of /dev/shm in the container, Docker's syntax ('1g'); "
        "default Docker's 64m. Raise it for data loaders that share memory between processes.",
        json_schema_extra={"anyOf": SIZE_SCHEMA},
    )
    queue: Name | None = Field(
        None,
        description="batchscore's own: the Airflow queue of the scoring tasks (and of the warm workers' "
        "start and stop), so that with the CeleryExecutor only workers started with --queues <name> run "
        "them, e.g. the GPU hosts' workers. Planning and merging stay on the default queue. Default: "
        "Airflow's [operators] default_queue.",
    )
    pool: Name | None = Field(
        None,
        description="batchscore's own: the Airflow pool the scoring tasks take slots of, to cap mini-batches "
        "running at once across deployments (e.g. one slot per GPU). The pool must exist (airflow pools "
        "set); Airflow does not schedule tasks of a missing pool. Default: default_pool.",
    )
    pool_slots: PositiveInt = Field(1, description="batchscore's own: pool slots one scoring task takes.")
