"""The orchestrator's intake of what a container wrote (batchscore.intake), on real files.

Each test writes a scratch folder as a hostile container could (forged fields, links to host
files, FIFOs, a result file that lies about its rows) and checks what is committed: only the
orchestrator's own copies of regular files, under names it chose, or nothing and a rejection
that names the mini-batch and the field.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchscore.intake import Expected, ResultRejected, remove_scratch, take_in
from batchscore_runtime.formats import MiniBatchDir, MiniBatchStatus

EXPECTED = Expected(index=3, files=("a.csv", "b.csv"), attempt=2, worker=None, result_file=True)


def report(**changes) -> dict:
    data = MiniBatchStatus(
        index=3,
        state="succeeded",
        files=2,
        rows=2,
        result_file="result-0123abcd.parquet",
        attempt=2,
        started_at="2026-11-28T00:00:00.000+00:00",
        finished_at="2026-11-28T00:00:01.000+00:00",
    ).to_json()
    data.update(changes)
    return data


def scratch(tmp_path: Path, data: dict | None = None, rows: int = 2) -> Path:
    """A scratch folder as the runtime leaves it: a result file and a report."""
    folder = tmp_path / "scratch" / "mb-00003.try-2"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"x": list(range(rows))}), folder / "result-0123abcd.parquet")
    if data is not None:
        (folder / "status.json").write_text(json.dumps(data))
    return folder


def result_dir(tmp_path: Path) -> MiniBatchDir:
    return MiniBatchDir(tmp_path / "results" / "mb-00003", 3)


def take(tmp_path: Path, expected: Expected = EXPECTED):
    return take_in(tmp_path / "scratch", "mb-00003.try-2", result_dir(tmp_path), expected)


def test_an_honest_report_is_committed_as_the_orchestrators_own_copy(tmp_path: Path) -> None:
    folder = scratch(tmp_path, report(outputs_dir="outputs-aa", custom_outputs=99, worker="w9", attempt=7))
    (folder / "outputs-aa" / "sub").mkdir(parents=True)
    (folder / "outputs-aa" / "sub" / "x.txt").write_text("x")

    intake = take(tmp_path)

    assert intake is not None and intake.committed and intake.left_out == []
    status = result_dir(tmp_path).read_status()
    assert status == intake.status
    # The orchestrator's facts win over the container's: the try, the worker, the names, the counts.
    assert (status.attempt, status.worker, status.custom_outputs, status.files) == (2, None, 1, 2)
    assert status.result_file != "result-0123abcd.parquet" and status.outputs_dir != "outputs-aa"
    assert pq.read_table(result_dir(tmp_path).result_path(status)).num_rows == 2
    assert (result_dir(tmp_path).outputs_path(status) / "sub" / "x.txt").read_text() == "x"
    # Copies, not links: nothing the container still holds can change them.
    copied = result_dir(tmp_path).result_path(status)
    assert copied.stat().st_ino != (folder / "result-0123abcd.parquet").stat().st_ino


def test_no_report_is_no_intake(tmp_path: Path) -> None:
    scratch(tmp_path)
    assert take(tmp_path) is None
    assert take_in(tmp_path / "nowhere", "x", result_dir(tmp_path), EXPECTED) is None
    assert result_dir(tmp_path).read_status() is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"outputs_dir": "../../../../etc"},
            "its report's outputs_dir is '../../../../etc', which is not possible for this mini-batch",
        ),
        ({"result_file": "/etc/shadow"}, "its report's result_file is '/etc/shadow', which is not possible for this mini-batch"),
        ({"index": 4}, "its report's index is 4, which is not possible for this mini-batch"),
        ({"files": 1000}, "its report's files is 1000, which is not possible for this mini-batch"),
        ({"rows": -1}, "its report's rows is -1, which is not possible for this mini-batch"),
        ({"failed_items": 3}, "its report's failed_items is 3, which is not possible for this mini-batch"),
        ({"run_seconds": float("nan")}, "its report's run_seconds is nan, which is not possible for this mini-batch"),
        ({"state": "committed"}, "its report's state is 'committed', which is not possible for this mini-batch"),
        (
            {"item_errors": [{"file": "/etc/passwd", "type": "X", "message": "m"}]},
            "its report has an item error for '/etc/passwd', which is not a file of this mini-batch",
        ),
        (
            {"item_errors": [{"file": ["a.csv"], "type": "X", "message": "m"}]},
            "its report has an item error for ['a.csv'], which is not a file of this mini-batch",
        ),
        ({"result_file": None}, "its report says succeeded but names no result file"),
        (
            {"version": 99},
            "its report is not a mini-batch status (status file has format version 99, this batchscore reads version 1)",
        ),
        (
            {"error": "boom"},
            "its report is not a mini-batch status "
            "(batchscore_runtime.formats.ErrorInfo() argument after ** must be a mapping, not str)",
        ),
    ],
)
def test_a_forged_report_is_rejected_naming_the_field(tmp_path: Path, changes: dict, message: str) -> None:
    scratch(tmp_path, report(**changes))
    with pytest.raises(ResultRejected) as caught:
        take(tmp_path)
    assert str(caught.value) == f"mb-00003: the result of try 2 is not accepted: {message}"
    assert result_dir(tmp_path).read_status() is None
    assert not list(result_dir(tmp_path).path.glob("result-*"))


def test_a_result_file_that_lies_about_its_rows_is_rejected(tmp_path: Path) -> None:
    scratch(tmp_path, report(rows=5), rows=2)
    expected = r"^mb-00003: the result of try 2 is not accepted: its result file has 2 rows but its report says 5$"
    with pytest.raises(ResultRejected, match=expected):
        take(tmp_path)
    assert not list(result_dir(tmp_path).path.glob("result-*"))


def test_links_are_never_followed(tmp_path: Path) -> None:
    host = tmp_path / "host"
    host.mkdir()
    (host / "key.txt").write_text("TOP-SECRET")
    os.chmod(host / "key.txt", 0o600)

    # The result file is a link to a host file: rejected.
    folder = scratch(tmp_path, report())
    (folder / "result-0123abcd.parquet").unlink()
    (folder / "result-0123abcd.parquet").symlink_to(host / "key.txt")
    with pytest.raises(
        ResultRejected, match=r"its result file result-0123abcd.parquet cannot be taken \(it is a symbolic link\)$"
    ):
        take(tmp_path)

    # The report itself is a link: rejected.
    remove_scratch(tmp_path / "scratch", "mb-00003.try-2")
    folder = scratch(tmp_path)
    (host / "status.json").write_text(json.dumps(report()))
    (folder / "status.json").symlink_to(host / "status.json")
    with pytest.raises(ResultRejected, match=r"its report status.json cannot be read \(it is a symbolic link\)$"):
        take(tmp_path)

    # The scratch folder is a link to a host folder holding an honest-looking result: rejected.
    remove_scratch(tmp_path / "scratch", "mb-00003.try-2")
    elsewhere = scratch(tmp_path / "elsewhere", report())
    (tmp_path / "scratch" / "mb-00003.try-2").symlink_to(elsewhere)
    with pytest.raises(ResultRejected, match=r"its scratch folder mb-00003.try-2 is not a folder \(a symbolic link\)$"):
        take(tmp_path)
    assert elsewhere.is_dir()  # removing the link never touches what it points at
    remove_scratch(tmp_path / "scratch", "mb-00003.try-2")
    assert elsewhere.is_dir() and not (tmp_path / "scratch" / "mb-00003.try-2").exists()


def test_custom_outputs_keep_regular_files_only(tmp_path: Path) -> None:
    host = tmp_path / "host"
    (host / "dir").mkdir(parents=True)
    (host / "key.txt").write_text("TOP-SECRET")
    (host / "dir" / "more.txt").write_text("TOP-SECRET")
    folder = scratch(tmp_path, report(outputs_dir="outputs-aa"))
    outputs = folder / "outputs-aa"
    (outputs / "sub").mkdir(parents=True)
    (outputs / "scored.csv").write_text("ok")
    (outputs / "sub" / "deep.csv").write_text("ok")
    (outputs / "leak.txt").symlink_to(host / "key.txt")
    (outputs / "leakdir").symlink_to(host / "dir")
    os.mkfifo(outputs / "pipe")

    intake = take(tmp_path)

    assert intake is not None and intake.status.custom_outputs == 2
    assert sorted(intake.left_out) == ["leak.txt (a symbolic link)", "leakdir (a symbolic link)", "pipe (a FIFO)"]
    committed = result_dir(tmp_path).outputs_path(intake.status)
    assert sorted(p.relative_to(committed).as_posix() for p in committed.rglob("*")) == ["scored.csv", "sub", "sub/deep.csv"]
    assert all(not p.is_symlink() for p in committed.rglob("*"))


def test_a_failed_report_keeps_its_error_cut_to_size(tmp_path: Path) -> None:
    scratch(
        tmp_path,
        report(
            state="failed",
            result_file=None,
            rows=0,
            error={"type": "ValueError", "message": "x" * 10_000, "traceback": "", "file": "/etc/passwd"},
        ),
    )
    intake = take(tmp_path)
    assert intake is not None and not intake.status.succeeded
    error = result_dir(tmp_path).read_status().error
    assert error.type == "ValueError" and error.file is None  # a file outside the mini-batch is not named
    assert error.message == "x" * 4096 + "... (5904 more characters)"


def test_a_later_try_keeps_the_mini_batch(tmp_path: Path) -> None:
    scratch(tmp_path, report())
    result_dir(tmp_path).path.mkdir(parents=True)
    result_dir(tmp_path).claim(3)  # try 3 has taken over
    intake = take(tmp_path)
    assert intake is not None and not intake.committed
    assert result_dir(tmp_path).read_status() is None
    assert not list(result_dir(tmp_path).path.glob("result-*"))


def test_a_warm_workers_protocol_lines_are_data() -> None:
    """The hand-over's protocol lines come from the user's image: a malformed one is a log line, never a crash."""
    from batchscore.scoring.handover import protocol_line
    from batchscore_runtime.warm_protocol import PREFIX

    assert protocol_line(PREFIX + '{"exit": 0}') == {"exit": 0}
    assert protocol_line(PREFIX + "{not json") is None
    assert protocol_line(PREFIX + "[1, 2]") is None
    assert protocol_line("an ordinary log line") is None
