"""A warm worker's GPU lease, held by a small process of its own for as long as the worker's container lives.

A per-mini-batch lease (:func:`batchscore.gpus.lease_gpus`) lives as long as its task. A warm
worker lives for the run, so its lease is taken by ``python -m batchscore.gpu_holder`` in a
session of its own, which keeps the ``flock`` until the container is gone (removed or stopped)
and then exits; the kernel drops the lease with it, whatever happens. No Airflow import.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from typing import Any

from docker.errors import NotFound
from docker.types import DeviceRequest

from batchscore.containers import device_requests
from batchscore.engine import docker_client
from batchscore.errors import GpuUnavailableError
from batchscore.gpus import lease_gpus
from batchscore.spec.deployment import DeploymentSpec

log = logging.getLogger(__name__)

#: Seconds a GPU holder waits for its worker container to appear before it lets the GPUs go.
HOLDER_APPEAR_SECONDS = 120.0
HOLDER_POLL_SECONDS = 2.0


def lease_for_worker(spec: DeploymentSpec, container: str, label: str, log: Any = log) -> tuple[list[Any], int | None, Any]:
    """GPUs for a warm worker container that outlives the task starting it: ``(device_requests, count, holder)``.

    A per-mini-batch lease (:func:`batchscore.gpus.lease_gpus`) lives as long as its task. A warm
    worker lives for the run, so its lease is taken by a small holder process
    (``python -m batchscore.gpu_holder``) in a session of its own, which keeps the ``flock``
    until the container is gone (removed or stopped) and then exits; the kernel drops the lease
    with it, whatever happens. ``resources.share_gpus`` and ``gpus: 0`` take no lease.
    """
    resources = spec.resources
    if resources.gpus == 0:
        return [], None, None
    if resources.share_gpus:
        gpus = resources.gpus
        return device_requests(gpus), (gpus if isinstance(gpus, int) else None if gpus == "all" else len(gpus)), None
    holder = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "batchscore.gpu_holder",
            "--gpus",
            json.dumps(resources.gpus),
            "--container",
            container,
            "--label",
            label,
        ],
        stdout=subprocess.PIPE,
        start_new_session=True,  # not killed with the task: it lives as long as the container
        text=True,
    )
    line = holder.stdout.readline() if holder.stdout else ""
    answer = json.loads(line) if line.strip() else {"error": f"the GPU holder exited with code {holder.wait()}"}
    if "error" in answer:
        raise GpuUnavailableError(f"worker container {container}: {answer['error']}")
    ids = [str(i) for i in answer["ids"]]
    log.info("Worker container %s gets GPU(s) %s, held until it is gone (holder pid %d)", container, ",".join(ids), holder.pid)
    return [DeviceRequest(device_ids=ids, capabilities=[["gpu"]])], len(ids), holder


def release(holder: Any) -> None:
    """Let a holder go (its worker container was not started): the lease ends with it."""
    if holder is not None:
        holder.kill()
        holder.wait(timeout=10)


def hold_gpus(gpus: Any, container: str, label: str, appear_seconds: float = HOLDER_APPEAR_SECONDS) -> int:
    """The holder process: lease, print the ids (one JSON line), keep them while ``container`` lives."""
    try:
        with lease_gpus(gpus, False, label=label) as assignment:
            print(json.dumps({"ids": assignment.device_ids}), flush=True)
            sys_stdout_close()
            cli = docker_client()
            appear_by = time.monotonic() + appear_seconds
            seen = False
            while True:
                try:
                    state = cli.inspect_container(container)["State"]
                except NotFound:
                    if seen or time.monotonic() > appear_by:
                        return 0
                else:
                    seen = True
                    if state.get("Status") not in ("created", "running", "restarting", "paused"):
                        return 0
                time.sleep(HOLDER_POLL_SECONDS)
    except GpuUnavailableError as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        return 1


def sys_stdout_close() -> None:
    """Let the parent's readline end: nothing more is written to it."""
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    """``python -m batchscore.gpu_holder``: see :func:`lease_for_worker`."""
    parser = argparse.ArgumentParser(
        prog="python -m batchscore.gpu_holder", description="hold a GPU lease while a worker container lives"
    )
    parser.add_argument("--gpus", required=True, help="resources.gpus as JSON")
    parser.add_argument("--container", required=True)
    parser.add_argument("--label", required=True)
    parser.add_argument("--appear-seconds", type=float, default=HOLDER_APPEAR_SECONDS)
    args = parser.parse_args(argv)
    return hold_gpus(json.loads(args.gpus), args.container, args.label, args.appear_seconds)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


__all__ = ["hold_gpus", "lease_for_worker"]
