"""The executor that starts a container for each mini-batch (``settings.worker_mode: per_mini_batch``) and removes it after.

For a scoring script that is one container; for a serving container, the serving container
first (it gets the GPUs and the secrets) and the client in its network namespace, so the client
reaches it at ``127.0.0.1:8080`` wherever the Docker host is. A watcher stops the client as soon
as the serving container exits, so a server that dies is reported at once, with its exit code
and last log lines. The mini-batch's GPUs are leased from before its first container starts
until after its last is gone. Every container of the try is removed when it ends, fails, or
the task is killed. No Airflow import.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import requests
from docker.errors import APIError, NotFound

from batchscore import security
from batchscore.containers import ImageMissingError
from batchscore.errors import ScoringError
from batchscore.gpus import GpuAssignment, lease_gpus
from batchscore.intake import remove_scratch
from batchscore.scoring.attempt import Attempt
from batchscore.scoring.contract import Contract, ScriptContract, ServerExit
from batchscore_runtime.formats import MiniBatchStatus

#: Lines of the serving container's log quoted in the error when it dies.
LOG_TAIL_LINES = 15
#: Seconds the serving container gets to stop on SIGTERM before it is killed.
STOP_TIMEOUT = 10
#: Seconds a serving container that is going gets to say it exited, when the client could not start.
SETTLE_SECONDS = 30.0


class _Timeout(Exception):
    """The one-shot container ran past the contract's backstop and was killed."""


class _Server:
    """The running serving container of the try, and how it ended once it has."""

    def __init__(self, cli: Any, container_id: str):
        self.cli = cli
        self.id = container_id
        self.exit: ServerExit | None = None
        self.stopping = False  # we stop it: its end is not a death

    def record_exit(self, code: int) -> None:
        try:
            tail = self.cli.logs(self.id, tail=LOG_TAIL_LINES).decode("utf-8", "replace").strip()
        except Exception:  # noqa: BLE001 - removed meanwhile
            tail = ""
        self.exit = ServerExit(code, tail)

    def exited(self, settle: float = 0.0) -> ServerExit | None:
        """How the serving container ended, asked now.

        ``settle``: seconds to give one that is going to say so (Docker releases its network first).
        """
        deadline = time.monotonic() + settle
        while self.exit is None and not self.stopping:
            try:
                state = self.cli.inspect_container(self.id)["State"]
            except APIError:
                return None
            if not state.get("Running"):
                self.record_exit(int(state.get("ExitCode", -1)))
            elif time.monotonic() < deadline:
                time.sleep(0.2)
            else:
                break
        return self.exit


class ContainerPerMiniBatch:
    """Score each mini-batch in containers of its own.

    :param cli: a Docker API client (:func:`batchscore.engine.docker_client`).
    :param log: the task's logger.
    """

    def __init__(self, cli: Any, log: Any):
        self.cli = cli
        self.log = log
        self._containers: list[str] = []  # this try's, the client first: a serving container's network is the client's
        self._server: _Server | None = None
        self.gpus: GpuAssignment | None = None

    def score(self, attempt: Attempt, contract: Contract, secrets: dict[str, str]) -> MiniBatchStatus:
        """Lease the GPUs, run the containers, take the result in; the committed status, or raise :class:`ScoringError`."""
        self.log = attempt.log  # redacts the secrets, once they are known
        resources = attempt.spec.resources
        with lease_gpus(resources.gpus, resources.share_gpus, label=attempt.label, log=self.log) as gpus:
            self.gpus = gpus
            try:
                return self._score(attempt, contract, secrets, gpus)
            finally:
                self.remove()

    def kill(self) -> None:
        """The task is killed: remove the try's containers now (the waiting thread then ends)."""
        self.remove()

    def remove(self) -> None:
        """Remove every container of the try: the client first, then the serving container (given time to stop)."""
        if self._server is not None:
            self._server.stopping = True
        for container_id in list(self._containers):
            if self._server is not None and container_id == self._server.id:
                with contextlib.suppress(Exception):
                    self.cli.stop(container_id, timeout=STOP_TIMEOUT)
            try:
                self.cli.remove_container(container_id, force=True)
            except NotFound:
                pass
            except APIError as exc:
                if exc.status_code != 409:  # 409: its removal is under way
                    self.log.warning("Could not remove container %s: %s", container_id[:12], exc)
            with contextlib.suppress(ValueError):
                self._containers.remove(container_id)

    # ------------------------------------------------------------------ one try

    def _score(self, attempt: Attempt, contract: Contract, secrets: dict[str, str], gpus: GpuAssignment) -> MiniBatchStatus:
        spec = attempt.spec
        user = security.container_user()
        scratch = attempt.layout.attempt_scratch(attempt.index, attempt.attempt)
        attempt.make_scratch(scratch, user)
        self._remove_earlier_tries(attempt)
        self.log.info(
            "%s: scoring %s files (%s bytes) in image %s, try %s of %s",
            attempt.id,
            attempt.reference.get("files"),
            attempt.reference.get("bytes"),
            spec.environment.image,
            attempt.attempt,
            attempt.tries,
        )
        expected = attempt.expected(None)
        attempt.open_output()
        backstop = contract.one_shot_backstop()
        try:
            code = self._run(attempt, contract, secrets, gpus, user, backstop)
        except ImageMissingError as exc:
            raise attempt.failed("ImageMissing", str(exc)) from None
        except _Timeout:
            assert isinstance(contract, ScriptContract) and backstop is not None
            raise attempt.failed("ContainerTimeout", contract.timeout_message(backstop) + attempt.dropped()) from None
        except APIError as exc:
            if gpus.device_requests and "device driver" in str(exc):
                raise ScoringError(
                    f"{attempt.id}: Docker cannot give the container the GPUs it asks for "
                    f"(resources.gpus: {spec.resources.gpus!r}): {exc.explanation}. Install the NVIDIA "
                    "Container Toolkit on the Docker host, or set resources.gpus to 0"
                ) from None
            raise
        finally:
            attempt.close_output()
        intake = attempt.take_in(scratch, expected)
        if code != 0:
            if intake is not None and intake.status.succeeded:  # a container that failed cannot have succeeded
                attempt.result_dir.retract()
            elif (reported := attempt.reported_failure(intake)) is not None:
                raise reported
            server = self._server.exited() if self._server is not None else None
            kind, message = contract.died(code, server, attempt)
            raise attempt.failed(kind, message + attempt.dropped())
        if (reported := attempt.reported_failure(intake)) is not None:
            raise reported
        if intake is None or not intake.status.succeeded:
            raise attempt.failed("NoResult", "the container exited 0 but reported no result in its scratch folder")
        remove_scratch(scratch.parent, scratch.name)
        return intake.status

    def _run(
        self,
        attempt: Attempt,
        contract: Contract,
        secrets: dict[str, str],
        gpus: GpuAssignment,
        user: str,
        backstop: float | None,
    ) -> int | None:
        """Run the try's containers until the scoring one ends; its exit code (None: it never started)."""
        server_id = None
        if (server := contract.server(attempt, gpus.device_requests)) is not None:
            self.log.info(
                "Starting the serving container: %s serve (model at %s; network %s)",
                server.image,
                server.mounts[0]["Target"],
                "bridge" if attempt.spec.resources.network else "none",
            )
            server_id = server.create(self.cli, secrets=secrets)
            self._containers.append(server_id)
            self._server = _Server(self.cli, server_id)
            _follow(self._attach(server_id), lambda line: attempt.line(f"serve | {line}"))
            self.cli.start(server_id)
        container = contract.one_shot(
            attempt,
            user=user,
            devices=[] if server is not None else gpus.device_requests,
            gpu_count=gpus.count,
            server_id=server_id,
        )
        container_id = container.create(self.cli, secrets=secrets)
        self._containers.insert(0, container_id)
        output = self._attach(container_id)
        try:
            self.cli.start(container_id)
        except APIError:
            if self._server is not None and self._server.exited(settle=SETTLE_SECONDS) is not None:
                return None  # the server died before the client could join its network: the death says so
            raise
        if self._server is not None:
            threading.Thread(target=self._watch, args=(self._server, container_id), daemon=True).start()
        logs = _follow(output, attempt.line)
        try:
            result = self.cli.wait(container_id, timeout=backstop)
        except requests.exceptions.RequestException:
            if backstop is None:
                raise
            with contextlib.suppress(APIError):
                self.cli.kill(container_id)
            raise _Timeout from None
        finally:
            logs.join()  # every line, to the last: the stream ends when the container has ended and its output is read
        return int(result.get("StatusCode", -1))

    def _attach(self, container_id: str) -> Any:
        """The container's output as it prints it, attached before it starts: every line, and it waits for its reader.

        (Docker's log files are rotated at the daemon's ``max-size``; following them can miss lines.)
        """
        return self.cli.attach(container_id, stdout=True, stderr=True, stream=True, logs=True)

    def _watch(self, server: _Server, client_id: str) -> None:
        """Stop the client as soon as the serving container exits: nothing can be scored any more."""
        try:
            result = self.cli.wait(server.id)
        except Exception:  # noqa: BLE001 - removed while waiting: the mini-batch is over
            return
        if server.stopping:
            return
        server.record_exit(int(result.get("StatusCode", -1)))
        self.log.error("The serving container exited with code %s; stopping the client", server.exit.code if server.exit else "?")
        with contextlib.suppress(Exception):
            self.cli.kill(client_id)

    def _remove_earlier_tries(self, attempt: Attempt) -> None:
        """Remove this mini-batch's containers left on this engine by an earlier try whose Airflow worker died.

        Such a container may still be scoring (and using a GPU no lease holds any more); it can
        commit nothing (it writes only its own try's scratch folder, which no one takes in).
        Airflow runs one try of a task at a time, so a container with this run's and
        mini-batch's labels is never current.
        """
        found = self.cli.containers(all=True, filters={"label": [f"{k}={v}" for k, v in attempt.labels().items()]})
        for c in found:
            name = (c.get("Names") or [c["Id"][:12]])[0].lstrip("/")
            self.log.warning(
                "%s: removing container %s of an earlier try (%s); its Airflow worker is gone", attempt.id, name, c.get("Status")
            )
            with contextlib.suppress(NotFound):
                self.cli.remove_container(c["Id"], force=True)


def _follow(stream: Any, on_line: Any) -> threading.Thread:
    """Copy a container's attached output, line by line, to ``on_line`` in a thread, until the container ends."""

    def pump() -> None:
        buffer = b""
        try:
            for chunk in stream:
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for raw in lines:
                    on_line(raw.decode("utf-8", "replace").rstrip("\r"))
        except Exception:  # noqa: BLE001 - the container was removed: its output ends here
            pass
        if buffer:
            on_line(buffer.decode("utf-8", "replace"))

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


__all__ = ["ContainerPerMiniBatch"]
