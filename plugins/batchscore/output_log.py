"""What a container prints: all of it to a file in the mini-batch's folder, a rate-limited part to the task log.

A scoring script may print a lot (50 MiB of progress lines is not unusual). Airflow's task log
takes well under a megabyte a second, and a container's output stream waits for its reader:
copied line by line into the task log, the output would slow ``run()`` down until its time
limit killed it. Here each line is written to ``output-try-<N>.log`` in the mini-batch's
result folder (fast, and the orchestrator's own file, not the container's) and passed to the
task log only within a budget (:data:`BURST_LINES` at once, then :data:`LINES_PER_SECOND`);
what is left out is counted, and the task log says so every :data:`NOTE_EVERY_SECONDS` and at
the end, naming the file that has everything.

No Airflow import.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: The task log's budget: a burst, then a steady rate (lines), and a cap on one line's length.
BURST_LINES = 2000
LINES_PER_SECOND = 200.0
MAX_LINE_CHARS = 8192
#: While lines are left out, a note says so this often.
NOTE_EVERY_SECONDS = 10.0
#: The file stops growing past this (the task log says so); a script printing without end cannot fill the disk.
MAX_FILE_BYTES = 1 << 30


def log_file_name(attempt: int) -> str:
    """The name of one attempt's output file in the mini-batch's result folder."""
    return f"output-try-{attempt}.log"


class OutputLog:
    """Every line to ``path``; to ``emit`` (the task log) within the budget. Thread-safe.

    :param path: the file that gets every line (created, or truncated for a new attempt).
    :param emit: called with each line that goes to the task log.
    :param redact: applied to every line before it is written anywhere (the secrets).
    """

    def __init__(
        self,
        path: Path,
        emit: Callable[[str], None],
        *,
        redact: Callable[[str], str] = lambda text: text,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", encoding="utf-8", errors="replace")  # noqa: SIM115 - closed by close()
        self._emit = emit
        self._redact = redact
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = float(BURST_LINES)
        self._refilled = clock()
        self._noted = clock()
        self.lines = 0
        self.bytes = 0
        self.dropped_lines = 0
        self.dropped_bytes = 0
        self._dropped_since_note = 0
        self._file_full = False

    def line(self, text: str) -> None:
        """One line the container printed."""
        text = self._redact(text)
        with self._lock:
            self.lines += 1
            size = len(text) + 1
            self.bytes += size
            if not self._file_full:
                if self.bytes > MAX_FILE_BYTES:
                    self._file_full = True
                    self._file.write(f"[batchscore: output past {MAX_FILE_BYTES} bytes is not kept]\n")
                else:
                    self._file.write(text + "\n")
            now = self._clock()
            self._tokens = min(float(BURST_LINES), self._tokens + (now - self._refilled) * LINES_PER_SECOND)
            self._refilled = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                shown = (
                    text
                    if len(text) <= MAX_LINE_CHARS
                    else text[:MAX_LINE_CHARS] + f" [... {len(text) - MAX_LINE_CHARS} more characters]"
                )
            else:
                shown = None
                self.dropped_lines += 1
                self.dropped_bytes += size
                self._dropped_since_note += 1
            note = None
            if self._dropped_since_note and now - self._noted >= NOTE_EVERY_SECONDS:
                note = self._note(self._dropped_since_note, "so far")
                self._dropped_since_note = 0
                self._noted = now
        if shown is not None:
            self._emit(shown)
        if note is not None:
            self._emit(note)

    def _note(self, lines: int, when: str) -> str:
        return (
            f"[batchscore: {lines} line(s) of output left out of this log {when} "
            f"({self.dropped_lines} in all, {_size(self.dropped_bytes)}); every line is in {self.path}]"
        )

    def summary(self) -> str:
        """For an error message: how much output was left out of the task log and where it all is; '' if none."""
        if not self.dropped_lines:
            return ""
        return (
            f"{self.dropped_lines} line(s) ({_size(self.dropped_bytes)}) of its output were left out of the task log; "
            f"every line is in {self.path}"
        )

    def close(self) -> None:
        with self._lock:
            if self._file.closed:
                return
            self._file.close()
            pending = self._dropped_since_note
            self._dropped_since_note = 0
        if pending or self.dropped_lines:
            self._emit(self._note(pending, "at the end") if pending else f"[batchscore: {self.summary()}]")

    def __enter__(self) -> OutputLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"


__all__ = ["OutputLog", "log_file_name"]
