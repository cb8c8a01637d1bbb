"""A warm worker's state file (``_batchscore/workers/w1/state.json``): written by its daemon, read by the orchestrator.

Versioned as every record of :mod:`batchscore_runtime.formats` is (``version``, refused when
another); the fields added since carry defaults, so a state an older daemon wrote still reads.
Standard library only.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from batchscore_runtime.formats import FORMAT_VERSION, ErrorInfo, _known, check_version, read_regular_file

#: The most a state file may hold: the worker container writes it, and it is read as untrusted.
MAX_STATE_BYTES = 1 << 20


@dataclass(frozen=True)
class WorkerState:
    """A warm worker's state (``_batchscore/workers/w1/state.json``), written by its daemon.

    ``starting`` until ``init()`` (or the serving container's ``/ping``) is done, then ``ready``
    or ``failed``; ``stopped`` when the daemon ended on its own (idle, or its pool broke).
    """

    worker: str  # "w1": the worker's slot, also in its container's name
    state: str
    started_at: str = ""
    init_seconds: float | None = None  # init() of its slowest process, or the wait for /ping
    processes: int = 1
    mini_batches: list[str] = field(default_factory=list)  # scored by it so far, in order
    error: ErrorInfo | None = None
    updated_at: str = ""
    version: int = FORMAT_VERSION
    # Added in version 1 with defaults (an older state reads as a worker that never scored):
    busy_seconds: float = 0.0  # spent scoring mini-batches, from taking each one to writing its report
    first_started_at: str = ""  # when it took its first mini-batch
    last_ended_at: str = ""  # when it finished its last one

    STARTING = "starting"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkerState:
        check_version(data, "worker state")
        values = _known(cls, data)
        if values.get("error") is not None:
            values["error"] = ErrorInfo(**values["error"])
        return cls(**values)

    @staticmethod
    def read(path: Path) -> WorkerState | None:
        """The state in ``path`` (a worker's ``state.json``); None when it is not there (yet).

        The worker container writes this file, so it is read as untrusted: never through a
        link, at most :data:`MAX_STATE_BYTES`, and a file that is not a valid state reads as a
        failed one (with what was wrong) rather than raising in the orchestrator.
        """
        try:
            data = json.loads(read_regular_file(Path(path), MAX_STATE_BYTES))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            return WorkerState(
                worker=Path(path).parent.name, state=WorkerState.FAILED, error=ErrorInfo("InvalidState", f"{path}: {exc}")
            )
        try:
            state = WorkerState.from_json(data)
            if not isinstance(state.state, str) or not isinstance(state.mini_batches, list):
                raise TypeError("state and mini_batches have the wrong types")
            float(state.init_seconds or 0.0)
            float(state.busy_seconds)
            if not isinstance(state.first_started_at, str) or not isinstance(state.last_ended_at, str):
                raise TypeError("first_started_at and last_ended_at are not strings")
            return state
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            return WorkerState(
                worker=Path(path).parent.name, state=WorkerState.FAILED, error=ErrorInfo("InvalidState", f"{path}: {exc}")
            )


__all__ = ["MAX_STATE_BYTES", "WorkerState"]
