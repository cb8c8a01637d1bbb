"""One try of one mini-batch, whatever runs it: its claim, its scratch folder, its output log, its intake and its failure record.

Every executor goes through the same steps: :meth:`Attempt.prepare` claims the mini-batch's
result folder for this try and withdraws its old status; the container writes into the try's
scratch folder only; :meth:`Attempt.take_in` checks and commits what it reported
(:mod:`batchscore.intake`); :meth:`Attempt.failed` commits a failed status for a try whose
container could not, so the ledger shows every try's fate. No Airflow import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchscore import security
from batchscore.errors import ScoringError
from batchscore.intake import Expected, Intake, ResultRejected, remove_scratch, take_in
from batchscore.output_log import OutputLog, log_file_name
from batchscore.plan import run_layout
from batchscore.spec.deployment import DeploymentSpec
from batchscore_runtime.formats import (
    ErrorInfo,
    MiniBatchDir,
    MiniBatchStatus,
    RunLayout,
    mini_batch_id,
    now_iso,
    read_mini_batch_file,
)


@dataclass
class Attempt:
    """Try ``attempt`` of mini-batch ``index`` of one run of one deployment.

    :param spec: the deployment as this run sees it (run parameters applied).
    :param endpoint_name: the endpoint (DAG) it belongs to.
    :param run_id: the Airflow run.
    :param index: the mini-batch's index in the plan.
    :param attempt: Airflow's try number, 1 for the first.
    :param reference: the plan's reference of the mini-batch (``files``, ``bytes``), for messages.
    :param log: where the try's own lines go (the task log).
    :param secret_values: the secrets' values, redacted from every line and message.
    """

    spec: DeploymentSpec
    endpoint_name: str
    run_id: str
    index: int
    attempt: int
    reference: dict[str, Any]
    log: Any
    secret_values: tuple[str, ...] = ()
    started: str = field(default_factory=now_iso)
    output: OutputLog | None = None
    #: What the task log left out of the last closed output, for the error messages that follow it.
    _dropped_summary: str = field(default="", init=False, repr=False)

    @property
    def id(self) -> str:
        return mini_batch_id(self.index)

    @property
    def layout(self) -> RunLayout:
        return run_layout(self.spec, self.run_id)

    @property
    def result_dir(self) -> MiniBatchDir:
        return self.layout.mini_batch_dir(self.index)

    @property
    def mini_batch_file(self) -> Path:
        return self.layout.mini_batch_file(self.index)

    @property
    def label(self) -> str:
        """Who holds a GPU lease or a container: ``<endpoint>/<deployment>/<run id>/mb-00003``."""
        return f"{self.endpoint_name}/{self.spec.name}/{self.run_id}/{self.id}"

    @property
    def tries(self) -> int:
        return self.spec.settings.retry_settings.max_retries + 1

    def labels(self) -> dict[str, str]:
        """The Docker labels of this try's containers: they find an earlier try's leftovers."""
        return {
            "batchscore.endpoint": self.endpoint_name,
            "batchscore.deployment": self.spec.name,
            "batchscore.run_id": self.run_id,
            "batchscore.mini_batch": self.id,
        }

    # ------------------------------------------------------------------ before

    def prepare(self) -> None:
        """Before anything scores the mini-batch: its file list is there and readable, its old status withdrawn.

        The folder is claimed for this try first: an earlier try whose Airflow worker died but
        whose task process lives on can then no longer commit over this one.
        """
        mini_batch_file, result_dir = self.mini_batch_file, self.result_dir
        if not mini_batch_file.is_file():
            raise ScoringError(
                f"{self.id}: its file list {mini_batch_file} is missing; the plan of run "
                f"{self.run_id!r} was removed or never finished (clear the plan task of this run as well)"
            )
        result_dir.path.mkdir(parents=True, exist_ok=True)
        result_dir.claim(self.attempt)
        result_dir.retract()
        mini_batch_file.chmod(0o644)  # whatever the plan's umask: the container's user reads it

    def make_scratch(self, scratch: Path, user: str) -> None:
        """A fresh, empty scratch folder for the try's container, writable by its user and nothing else of the run."""
        remove_scratch(scratch.parent, scratch.name)
        scratch.mkdir(parents=True)
        security.make_writable_for(scratch, user)

    def expected(self, worker: str | None) -> Expected:
        """What the container's report is checked against: the plan's files, this try, the deployment's result kind."""
        files = read_mini_batch_file(self.mini_batch_file).files
        return Expected(
            index=self.index,
            files=tuple(f.label for f in files),
            aliases=frozenset(f.path for f in files),
            attempt=self.attempt,
            worker=worker,
            result_file=self.spec.contract == "azure" and self.spec.settings.output_action == "append_row",
        )

    # ------------------------------------------------------------------ while

    def open_output(self) -> OutputLog:
        """The try's output file, and the task log's budget for the container's lines (:mod:`batchscore.output_log`)."""
        self.close_output()
        log = self.log
        self.output = OutputLog(
            self.result_dir.path / log_file_name(self.attempt), lambda line: log.info("%s", line), redact=self.redact
        )
        return self.output

    def close_output(self) -> None:
        output, self.output = self.output, None
        if output is not None:
            output.close()
            self._dropped_summary = output.summary()

    def line(self, text: str) -> None:
        """One line of the container's output: all of it to the try's file, a rate-limited part to the task log."""
        if self.output is not None:
            self.output.line(text)
        else:
            self.log.info("%s", self.redact(text))

    def dropped(self) -> str:
        """For an error message: how much of the container's output the task log left out, if any."""
        summary = self.output.summary() if self.output is not None else self._dropped_summary
        return f" ({summary})" if summary else ""

    def redact(self, text: str) -> str:
        return security.redact(text, self.secret_values)

    # ------------------------------------------------------------------ after

    def take_in(self, scratch: Path, expected: Expected) -> Intake | None:
        """Check, copy and commit what the container reported in ``scratch``; a rejected report fails the try."""
        try:
            intake = take_in(scratch.parent, scratch.name, self.result_dir, expected, log=self.log)
        except ResultRejected as exc:
            raise self.failed("ResultRejected", exc.reason) from None
        if intake is not None and not intake.committed:
            raise ScoringError(
                f"{self.id}: try {self.attempt} does not commit its result: try {self.result_dir.claimed_by()} "
                "of this mini-batch has taken over"
            )
        return intake

    def reported_failure(self, intake: Intake | None) -> ScoringError | None:
        """The error to raise for a report that says the mini-batch failed (the runtime committed its own error)."""
        if intake is None or intake.status.error is None:
            return None
        return ScoringError(f"{self.id} failed: {self.redact(intake.status.error.one_line())}{self.dropped()}")

    def failed(self, kind: str, message: str) -> ScoringError:
        """Commit a failed status for a try whose container could not, and return the error to raise."""
        result_dir = self.result_dir
        if result_dir.read_status() is None:
            result_dir.commit(
                MiniBatchStatus(
                    index=self.index,
                    state=MiniBatchStatus.FAILED,
                    files=int(self.reference.get("files") or 0),
                    started_at=self.started,
                    finished_at=now_iso(),
                    error=ErrorInfo(type=kind, message=message),
                    attempt=self.attempt,
                    workers=self.spec.settings.max_concurrency_per_instance,
                )
            )
        return ScoringError(f"{self.id} failed: {kind}: {message}")


__all__ = ["Attempt"]
