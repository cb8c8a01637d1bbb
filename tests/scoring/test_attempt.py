"""Attempt: what every try does, whatever runs it (no Docker: the try's files only)."""

from __future__ import annotations

from pathlib import Path

from batchscore.output_log import BURST_LINES
from batchscore.plan import mini_batch_refs, plan_run
from batchscore.scoring.attempt import Attempt
from tests.helpers import deployment_file, load, write


class _Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, msg: str, *args: object) -> None:
        self.lines.append(msg % args)


def test_an_error_after_the_output_is_closed_still_says_what_the_task_log_left_out(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    write(tmp_path / "code" / "score.py", "def run(mb):\n    return mb\n")
    write(tmp_path / "in" / "a.csv", "x\n")
    d = load(deployment_file(tmp_path / "yaml", model=tmp_path / "model", code=tmp_path / "code", inputs=tmp_path / "in"))
    spec = d.deployments[0]
    reference = mini_batch_refs(plan_run(d.endpoint_name, spec, "run-1"))[0]
    log = _Log()
    attempt = Attempt(spec, d.endpoint_name, "run-1", 0, 1, reference, log)
    attempt.prepare()

    attempt.open_output()
    for k in range(BURST_LINES + 50):  # past the task log's burst: some lines are left out of it
        attempt.line(f"line {k}")
    attempt.close_output()

    assert attempt.dropped().startswith(" (") and "left out" in attempt.dropped()
    error = attempt.failed("ContainerDied", "it ended" + attempt.dropped())
    assert str(error).startswith("mb-00000 failed: ContainerDied: it ended (") and "left out" in str(error)
    assert attempt.result_dir.read_status().error.type == "ContainerDied"  # the ledger shows the try
