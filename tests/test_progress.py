"""The progress line of ``python -m batchscore run``: its text (:func:`progress_line`), and how it is shown on a
terminal and elsewhere (:class:`ProgressDisplay`). A real run's plain lines are checked in tests/test_up.py."""

from __future__ import annotations

import io

import pytest

from batchscore import progress
from batchscore.progress import Progress, ProgressDisplay, format_duration, format_rate, progress_line


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (-3, "0s"), (59.4, "59s"), (60, "1m00s"), (185, "3m05s"), (7620, "2h07m")]
)
def test_durations_are_short(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(("rate", "text"), [(0, "0.00"), (0.08, "0.08"), (2.25, "2.2"), (99.96, "100.0"), (12345.6, "12,346")])
def test_rates_keep_what_matters(rate: float, text: str) -> None:
    assert format_rate(rate) == text


def test_one_row_and_one_failed_item_are_singular() -> None:
    assert progress_line(Progress(total=2, done=1, running=1, rows=1, failed_items=1), 10) == (
        "mini-batches 1/2: 1 done, 0 failed, 1 running | 1 row (1 failed item) | 0.10 rows/s | ETA 10s"
    )


def test_before_the_plan_there_is_no_total() -> None:
    assert progress_line(Progress(total=None), 12) == "mini-batches: planning ..."


def test_nothing_finished_yet_has_no_eta_and_no_rate() -> None:
    for elapsed in (0, 5):
        assert progress_line(Progress(total=40, running=4, rows=0, failed_items=0), elapsed) == (
            "mini-batches 0/40: 0 done, 0 failed, 4 running | 0 rows | ETA --"
        )


def test_rate_and_eta_extrapolate_what_finished() -> None:
    p = Progress(total=40, done=9, failed=1, running=4, rows=12_000, failed_items=3)
    # 10 of 40 in 30 s: 30 left take 90 s; 12,000 rows in 30 s: 400 rows/s
    assert progress_line(p, 30) == (
        "mini-batches 10/40: 9 done, 1 failed, 4 running | 12,000 rows (3 failed items) | 400 rows/s | ETA 1m30s"
    )


def test_without_rows_only_mini_batches_are_shown() -> None:
    assert progress_line(Progress(total=3, done=1, running=2), 10) == ("mini-batches 1/3: 1 done, 0 failed, 2 running | ETA 20s")


def test_a_finished_run_says_how_long_it_took() -> None:
    assert progress_line(Progress(total=2, done=2, rows=150, failed_items=0), 3) == (
        "mini-batches 2/2: 2 done, 0 failed, 0 running | 150 rows | 50.0 rows/s | took 3s"
    )
    assert progress_line(Progress(total=0, rows=0, failed_items=0), 0) == (
        "mini-batches 0/0: 0 done, 0 failed, 0 running | 0 rows | took 0s"
    )


def test_a_terminal_gets_one_line_rewritten_in_place() -> None:
    out = io.StringIO()
    display = ProgressDisplay(out, tty=True)
    display.show(Progress(total=None))
    display.show(Progress(total=2, running=2, rows=1000, failed_items=0))
    display.show(Progress(total=2, done=2), final=True)
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    frames = text.rstrip("\n").split("\r")[1:]
    assert [f.rstrip() for f in frames] == [
        "  mini-batches: planning ...",
        "  mini-batches 0/2: 0 done, 0 failed, 2 running | 1,000 rows | ETA --",
        "  mini-batches 2/2: 2 done, 0 failed, 0 running | took 0s",
    ]
    assert len(frames[2]) == len(frames[1])  # the shorter line blanks what the longer one left


def test_elsewhere_plain_lines_only_when_changed_and_not_too_often(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    display = ProgressDisplay(out, tty=False)
    display.show(Progress(total=4, running=4))  # shown: the first
    clock[0] += progress.PLAIN_EVERY_S
    display.show(Progress(total=4, running=4))  # unchanged: not shown
    display.show(Progress(total=4, done=1, running=3))  # changed, and time enough since the first: shown
    clock[0] += 1
    display.show(Progress(total=4, done=2, running=2))  # changed, but too soon: not shown
    display.show(Progress(total=4, done=4))  # changed, too soon: not shown; but the scoring ended here
    clock[0] += 30  # the merge runs: it is not the scoring's time
    display.show(Progress(total=4, done=4), final=True)  # the last one always
    assert "\r" not in out.getvalue()
    assert out.getvalue().splitlines() == [
        "  mini-batches 0/4: 0 done, 0 failed, 4 running | ETA --",
        "  mini-batches 1/4: 1 done, 0 failed, 3 running | ETA 15s",
        "  mini-batches 4/4: 4 done, 0 failed, 0 running | took 6s",
    ]


def test_elsewhere_the_last_line_is_not_repeated() -> None:
    out = io.StringIO()
    display = ProgressDisplay(out, tty=False)
    display.show(Progress(total=1, done=1))
    display.show(Progress(total=1, done=1), final=True)
    assert out.getvalue() == "  mini-batches 1/1: 1 done, 0 failed, 0 running | took 0s\n"
