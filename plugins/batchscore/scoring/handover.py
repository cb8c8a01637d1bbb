"""A detached hand-over's record: what a deferred score task's worker said, read back from its scratch folder.

A deferred score task (``settings.deferrable``) cannot hold ``docker exec``'s stream open while it
waits: it starts ``warm submit --record <file>`` detached in the worker container, and that
process writes every line of the hand-over into the file (the worker's scratch folder, a host
folder): the protocol's lines (``queued``, ``accepted`` with the time it started, ``exit``), the
mini-batch's log lines, and last ``{"done": <exit code>}``. The trigger polls the file
(:mod:`batchscore.triggers`), the resumed task reads it whole. Standard library only: the
triggerer imports this.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchscore_runtime.files import read_regular_file

#: The protocol's prefix (``batchscore_runtime.warm_protocol.PREFIX``; said again here so the triggerer imports nothing more).
PREFIX = "BATCHSCORE-WARM "
#: How the record marks the mini-batch's own lines (``batchscore_runtime.warm_protocol.RECORD_LOG``).
LOG_MARK = "| "
#: The largest record read back (the mini-batch's own lines are in it); a bigger one is refused, as a link or a FIFO is.
RECORD_LIMIT = 64 << 20
#: How a refused record ends: the daemon's code for a hand-over that was lost (``batchscore_runtime.warm_protocol.EXIT_LOST``).
REFUSED_CODE = 70


def record_name(scratch_name: str) -> str:
    """The record file of the hand-over whose output folder is ``scratch_name``, beside it in the scratch folder."""
    return f"{scratch_name}.handover"


@dataclass
class Record:
    """What a hand-over's record file says so far."""

    messages: list[dict[str, Any]] = field(default_factory=list)  # the protocol's lines, in order
    lines: list[str] = field(default_factory=list)  # the mini-batch's log lines
    done: int | None = None  # the submitter's exit code, once it ended
    refused: str | None = None  # why the file was not read (a link, a FIFO, too big): the try fails

    @property
    def queued(self) -> bool:
        return any(m.get("queued") is True for m in self.messages)

    @property
    def answer(self) -> dict[str, Any] | None:
        """The daemon's ``accepted`` line (true: it scores; false: refused, or let go from its queue), once it came."""
        return next((m for m in self.messages if "accepted" in m), None)

    @property
    def accepted(self) -> bool:
        answer = self.answer
        return bool(answer and answer.get("accepted") is True)

    @property
    def accepted_at(self) -> float | None:
        """When the worker took the mini-batch (seconds since the epoch): the backstop counts from here."""
        answer = self.answer
        at = answer.get("at") if answer and answer.get("accepted") is True else None
        return float(at) if isinstance(at, (int, float)) and not isinstance(at, bool) else None

    @property
    def exit_code(self) -> int | None:
        """The mini-batch's exit code as the daemon said it (``{"exit": ...}``); None when it never said."""
        for m in self.messages:
            code = m.get("exit")
            if isinstance(code, int) and not isinstance(code, bool):
                return code
        return None


def read_record(path: Path) -> Record:
    """The record as far as it is written (an empty one when the file is not there yet).

    The mini-batch's lines are marked (``LOG_MARK``), so none of them can pass for the protocol's;
    a malformed line is kept as a log line, never raised on.
    """
    record = Record()
    try:
        text = read_regular_file(path, RECORD_LIMIT).decode("utf-8", "replace")
    except FileNotFoundError:
        return record
    except (OSError, ValueError) as exc:
        # The scratch folder is the container's to write: a link, a FIFO or a huge file there is never read through.
        record.refused = f"batchscore refused the hand-over record {path.name}: {exc}"
        record.lines.append(record.refused)
        record.done = REFUSED_CODE
        return record
    *whole, _partial = text.split("\n")  # a line is whole once its newline is written
    for line in whole:
        if line.startswith(LOG_MARK):
            record.lines.append(line[len(LOG_MARK) :])
            continue
        message = protocol_line(line)
        if message is None:
            record.lines.append(line)
        elif "done" in message:
            done = message["done"]
            record.done = done if isinstance(done, int) and not isinstance(done, bool) else None
        else:
            record.messages.append(message)
    return record


def protocol_line(line: str) -> dict[str, Any] | None:
    """A line of ``submit``'s protocol as a JSON object; None for a log line (or one that only looks like the protocol).

    The worker runs in the user's image, so its lines are data: a malformed one is kept as a log line, never raised on.
    """
    if not line.startswith(PREFIX):
        return None
    try:
        message = json.loads(line[len(PREFIX) :])
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


__all__ = ["PREFIX", "Record", "protocol_line", "read_record", "record_name"]
