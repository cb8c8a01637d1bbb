"""The names both sides agree on: the run folder's files and columns, container mount points, ids, the format version.

Standard library only, and it imports nothing of batchscore's; :mod:`batchscore_runtime.formats`
re-exports every name here and defines the records in these files.

A run directory looks like this::

    <output.path>/<run key>/
        predictions.csv             the job's output (name from settings.output_file_name)
        summary.json                the job summary, written by the merge
        processed_mini-batches.csv  the ledger: one line per mini-batch (attempts, rows, seconds, error)
        errors.csv                  one line per failed item (mini-batch, file, error type, message)
        <custom outputs>            files scoring scripts wrote to AZUREML_BI_OUTPUT_PATH
        _batchscore/
            plan.json               the plan: which mini-batches exist (written last, so
                                    its presence means the plan is complete)
            minibatches/mb-00007.json   the files of one mini-batch
            results/mb-00007/       written by the orchestrator only; no container mounts it
                result-<token>.parquet  what run() returned, one file per attempt that succeeded
                outputs-<token>/        the attempt's AZUREML_BI_OUTPUT_PATH (custom outputs), or
                                        the serving contract's <input file>.out files
                status.json             commit record: points at the result file and outputs
                                        folder of the attempt that counts, or says why it failed
                attempt.json            the try that may commit: written before each try, so a
                                        try whose Airflow worker died cannot commit over a retry
                output-try-2.log        everything the attempt's containers printed (the task
                                        log shows a rate-limited part of it)
            scratch/                where containers write; nothing here is trusted
                mb-00007.try-2/         one container per mini-batch: its only writable mount
                w1/mb-00007.try-2/      warm worker w1: its scratch folder is its only writable
                                        mount for results; one sub-folder per mini-batch
            model.json              the model the run scores with: pinned by the first task that
                                    needs it (plan or start_workers), never replaced
            collected.json          which custom outputs the merge placed in the run folder
            model/                  serving contract: model.tar.gz unpacked (once per run)
            workers/w1/state.json   warm workers: each worker container's state (starting,
                                    ready, failed), its init() time and its mini-batches
            workers/engine.json     warm workers: the Docker engine they run on (id, host name)
"""

from __future__ import annotations

import re
from typing import Any

#: The version every record file carries (``"version"``); a reader refuses another.
FORMAT_VERSION = 1

WORK_DIR_NAME = "_batchscore"
SUMMARY_FILE_NAME = "summary.json"
LEDGER_FILE_NAME = "processed_mini-batches.csv"
ERRORS_FILE_NAME = "errors.csv"
WORKER_STATE_FILE = "state.json"  # in each warm worker's folder, _batchscore/workers/w1/

#: Columns of the ledger and the errors file, in order.
LEDGER_COLUMNS = (
    "mini_batch",
    "files",
    "bytes",
    "status",
    "attempts",
    "rows",
    "failed_items",
    "seconds",
    "init_seconds",
    "run_seconds",
    "workers",
    "worker",
    "started_at",
    "finished_at",
    "error",
)
ERRORS_COLUMNS = ("mini_batch", "file", "record", "error_type", "message")


def check_version(data: dict[str, Any], what: str) -> None:
    """Refuse ``data`` (a record read from a file) unless it has this batchscore's format version."""
    version = data.get("version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{what} file has format version {version!r}, this batchscore reads version {FORMAT_VERSION}")


class ContainerPaths:
    """Where the orchestrator mounts things inside the scoring container."""

    RUNTIME = "/opt/batchscore/runtime"  # parent folder of the batchscore_runtime package
    MODEL = "/mnt/batchscore/model"  # AZUREML_MODEL_DIR
    CODE = "/mnt/batchscore/code"
    INPUT = "/mnt/batchscore/input"
    MINI_BATCH = "/mnt/batchscore/minibatch.json"
    OUTPUT = "/mnt/batchscore/output"  # the attempt's scratch folder, the only writable mount
    # AZUREML_BI_OUTPUT_PATH is a fresh folder ``outputs-<token>`` inside OUTPUT, made per attempt.
    SERVING_MODEL = "/opt/ml/model"  # serving contract: the model archive's contents, in the serving container
    SERVING_URL = "http://127.0.0.1:8080"  # serving contract: seen from the client, which shares its network
    # Warm workers (settings.worker_mode: warm) see the whole run, not one mini-batch:
    MINI_BATCHES = "/mnt/batchscore/minibatches"  # the run's mini-batch files, read-only
    SCRATCH = "/mnt/batchscore/scratch"  # the worker's scratch folder: one sub-folder per mini-batch, writable
    WORKER_STATE = "/mnt/batchscore/worker"  # the worker's own state folder, writable
    WARM_SOCKET = "/tmp/batchscore-warm.sock"  # where the worker's daemon takes mini-batches
    # AZUREML_BI_OUTPUT_PATH of a warm worker: a fixed path, re-pointed at each mini-batch's folder.
    WARM_BI_OUTPUT = "/tmp/batchscore/azureml_bi_output"


def mini_batch_id(index: int) -> str:
    """The stable name of mini-batch ``index``: ``mb-00007``."""
    return f"mb-{index:05d}"


def run_key(run_id: str) -> str:
    """A folder name for an Airflow run id (``manual__2026-01-01T00:00:00+00:00``).

    Only letters, digits, ``.``, ``_`` and ``-`` survive; colons and ``+`` would trip
    Docker's mount syntax and some file systems.
    """
    key = re.sub(r"[^A-Za-z0-9._-]+", "_", run_id).strip("._")
    if not key:
        raise ValueError(f"run id {run_id!r} gives an empty folder name")
    return key


def attempt_folder_name(index: int, attempt: int) -> str:
    """The scratch sub-folder of one attempt at one mini-batch: ``mb-00007.try-2``."""
    return f"{mini_batch_id(index)}.try-{attempt}"


__all__ = [
    "ERRORS_COLUMNS",
    "ERRORS_FILE_NAME",
    "FORMAT_VERSION",
    "LEDGER_COLUMNS",
    "LEDGER_FILE_NAME",
    "SUMMARY_FILE_NAME",
    "WORK_DIR_NAME",
    "WORKER_STATE_FILE",
    "ContainerPaths",
    "attempt_folder_name",
    "check_version",
    "mini_batch_id",
    "run_key",
]
