"""A container's output: every line to its file, the task log within a budget (batchscore.output_log).

A fake clock drives the budget, so nothing here depends on how fast the machine is.
"""

from __future__ import annotations

from pathlib import Path

from batchscore import output_log
from batchscore.output_log import OutputLog


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_every_line_reaches_the_file_and_the_task_log_gets_a_burst_then_a_rate(tmp_path: Path) -> None:
    clock, shown = Clock(), []
    path = tmp_path / "output-try-1.log"
    log = OutputLog(path, shown.append, redact=lambda text: text.replace("s3cret", "***"), clock=clock)

    for k in range(5000):  # all at once: the burst passes, the rest is counted
        log.line(f"line {k} s3cret")
    clock.now = 1.0  # one second later: LINES_PER_SECOND more may pass
    for k in range(5000, 5300):
        log.line(f"line {k}")
    clock.now = 11.0  # past NOTE_EVERY_SECONDS: a note says how much was left out
    log.line("last")
    log.close()

    lines = path.read_text().splitlines()
    assert len(lines) == 5301 and lines[0] == "line 0 ***" and lines[-1] == "last"  # every line, redacted
    passed = [s for s in shown if not s.startswith("[batchscore")]
    assert len(passed) == output_log.BURST_LINES + int(output_log.LINES_PER_SECOND) + 1
    size = f"{log.dropped_bytes / 1024:.1f} KiB"
    assert log.summary() == f"3100 line(s) ({size}) of its output were left out of the task log; every line is in {path}"
    assert shown[-2:] == [
        f"[batchscore: 3100 line(s) of output left out of this log so far (3100 in all, {size}); every line is in {path}]",
        f"[batchscore: {log.summary()}]",  # the last word, at close
    ]


def test_a_quiet_container_shows_everything_and_no_note(tmp_path: Path) -> None:
    shown: list[str] = []
    with OutputLog(tmp_path / "out.log", shown.append) as log:
        for k in range(10):
            log.line(f"line {k}")
    assert shown == [f"line {k}" for k in range(10)]
    assert log.summary() == ""


def test_a_long_line_is_cut_in_the_task_log_only(tmp_path: Path) -> None:
    shown: list[str] = []
    with OutputLog(tmp_path / "out.log", shown.append) as log:
        log.line("x" * 10_000)
    assert shown == ["x" * 8192 + " [... 1808 more characters]"]
    assert (tmp_path / "out.log").read_text() == "x" * 10_000 + "\n"
