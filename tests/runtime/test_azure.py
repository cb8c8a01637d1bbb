"""The in-container runtime for Azure-style scoring scripts, run in-process on real files.

The same module runs inside the scoring container in the operator and end-to-end tests; here
its contract handling is exercised case by case without a container start per case.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchscore_runtime.azure import main
from batchscore_runtime.formats import InputFile, ItemError, MiniBatch, MiniBatchDir, MiniBatchStatus, write_json_atomic
from tests.helpers import write


@pytest.fixture()
def job(tmp_path: Path):
    """Three input files, a mini-batch of them, and a function that runs a given script."""
    inputs = tmp_path / "in"
    files = []
    for name in ("a.csv", "b.csv", "c.csv"):
        p = write(inputs / name, f"x\n{len(name)}\n")
        st = p.stat()
        files.append(InputFile(name, st.st_size, st.st_mtime_ns))
    mb_file = tmp_path / "mb.json"
    write_json_atomic(mb_file, MiniBatch(index=4, files=files).to_json())
    out = MiniBatchDir(tmp_path / "out", 4)

    def run(script: str, *options: str) -> tuple[int, MiniBatchDir]:
        path = write(tmp_path / "code" / "score.py", script)
        code = main(
            [
                "--mini-batch",
                str(mb_file),
                "--input-root",
                str(inputs),
                "--scoring-script",
                str(path),
                "--output",
                str(out.path),
                *options,
            ]
        )
        return code, out

    run.inputs = inputs  # type: ignore[attr-defined]
    return run


def result_rows(out: MiniBatchDir) -> list[dict]:
    status = out.read_status()
    assert status is not None and status.succeeded, status
    return pq.read_table(out.result_path(status)).to_pylist()


def failure(out: MiniBatchDir) -> str:
    status = out.read_status()
    assert status is not None and not status.succeeded
    return status.error.one_line()


def test_dataframe_keeps_columns_and_row_order(job) -> None:
    code, out = job(
        """
        import os, pandas as pd
        def init():
            global calls
            calls = 1
        def run(mini_batch):
            return pd.DataFrame({"file": [os.path.basename(p) for p in mini_batch], "n": [calls] * len(mini_batch)})
        """
    )
    assert code == 0
    assert result_rows(out) == [{"file": "a.csv", "n": 1}, {"file": "b.csv", "n": 1}, {"file": "c.csv", "n": 1}]
    status = out.read_status()
    assert (status.rows, status.files, status.index) == (3, 3, 4)
    assert list(out.path.glob("result-*.parquet")) == [out.path / status.result_file]


def test_list_of_scalars_becomes_a_result_column(job) -> None:
    code, out = job("def init(): pass\ndef run(mb):\n    return [len(p) for p in mb]\n")
    assert code == 0
    assert [r["result"] for r in result_rows(out)] == [len(str(job.inputs / n)) for n in ("a.csv", "b.csv", "c.csv")]


def test_generator_of_dataframes_is_concatenated(job) -> None:
    code, out = job(
        """
        import pandas as pd
        def init(): pass
        def run(mini_batch):
            for i, p in enumerate(mini_batch):
                yield pd.DataFrame({"i": [i], "path": [p.rsplit("/", 1)[1]]})
        """
    )
    assert code == 0
    assert result_rows(out) == [{"i": 0, "path": "a.csv"}, {"i": 1, "path": "b.csv"}, {"i": 2, "path": "c.csv"}]


def test_list_of_dicts_becomes_columns_and_the_input_list_is_accepted(job) -> None:
    code, out = job("def init(): pass\ndef run(mb):\n    return [{'k': 1, 'v': 'x'}, {'k': 2, 'v': 'y'}]\n")
    assert code == 0 and result_rows(out) == [{"k": 1, "v": "x"}, {"k": 2, "v": "y"}]
    code, out = job("def init(): pass\ndef run(mb):\n    return mb\n")  # custom-outputs scripts return the input
    assert code == 0 and len(result_rows(out)) == 3


def test_complex_objects_are_written_as_text(job) -> None:
    code, out = job("def init(): pass\ndef run(mb):\n    return [{'a': 1}, [1, 2], object]\n")
    assert code == 0
    assert [r["result"] for r in result_rows(out)] == ["{'a': 1}", "[1, 2]", "<class 'object'>"]


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        (
            "def init():\n    raise RuntimeError('model file is corrupt')\ndef run(mb):\n    return mb\n",
            "RuntimeError: model file is corrupt",
        ),
        (
            "def init(): pass\ndef run(mb):\n    raise ValueError('bad row 7')\n",
            "ValueError: bad row 7",
        ),
        (
            "def init(): pass\ndef run(mb):\n    return None\n",
            "ScoringScriptError: run() returned None; it must return a list or a pandas DataFrame "
            "with one element per successful input",
        ),
        (
            "def init(): pass\ndef run(mb):\n    return 42\n",
            "ScoringScriptError: run() returned a int; it must return a list or a pandas DataFrame",
        ),
        ("def init(): pass\n", "ScoringScriptError: scoring script score.py defines no run(mini_batch) function"),
        (
            "import not_a_module_anywhere\n",
            "ScoringScriptError: importing scoring script score.py failed: ModuleNotFoundError: "
            "No module named 'not_a_module_anywhere'",
        ),
    ],
)
def test_failures_are_committed_with_the_cause_and_exit_1(job, script: str, expected: str, capfd) -> None:
    code, out = job(script)
    assert code == 1
    assert failure(out) == expected
    assert out.read_status().error.traceback.startswith("Traceback")
    assert "Traceback" in capfd.readouterr().err  # the task log shows the script's traceback


def test_a_vanished_input_file_fails_naming_it(job) -> None:
    (job.inputs / "b.csv").unlink()
    code, out = job("def init(): pass\ndef run(mb):\n    return mb\n")
    assert code == 1
    assert failure(out) == (
        "InputFileMissingError: input file b.csv of mb-00004 no longer exists (it was planned with 4 bytes); "
        "the plan is kept per run, so restore the file or start a new run (file b.csv)"
    )


def test_a_rerun_replaces_the_result_and_a_failed_rerun_keeps_the_old_file(job) -> None:
    code, out = job("def init(): pass\ndef run(mb):\n    return [1, 2, 3]\n")
    first = out.read_status().result_file
    code, out = job("def init(): pass\ndef run(mb):\n    return [4, 5, 6]\n")
    second = out.read_status().result_file
    assert code == 0 and first != second
    assert [p.name for p in out.path.glob("result-*.parquet")] == [second]  # the old attempt is gone
    assert [r["result"] for r in result_rows(out)] == [4, 5, 6]

    code, out = job("def init(): pass\ndef run(mb):\n    raise KeyError('x')\n")
    assert code == 1 and out.read_status().result_file is None
    assert (out.path / second).is_file()  # nothing already produced is deleted
    assert json.loads(out.status_file.read_text())["state"] == "failed"


# --------------------------------------------------------------------------- item accounting


def test_fewer_rows_than_files_are_failed_items_named_by_a_file_column(job) -> None:
    code, out = job(
        """
        import os, pandas as pd
        def run(mini_batch):
            kept = [p for p in mini_batch if not p.endswith("b.csv")]
            return pd.DataFrame({"file": [os.path.basename(p) for p in kept], "score": [0.5] * len(kept)})
        """
    )
    status = out.read_status()
    assert code == 0 and (status.rows, status.failed_items) == (2, 1)
    assert [(e.file, e.type) for e in status.item_errors] == [("b.csv", "NoResult")]


def test_a_returned_subset_of_the_input_list_names_the_failed_files(job) -> None:
    code, out = job("def run(mb):\n    return [p for p in mb if not p.endswith(('a.csv', 'c.csv'))]\n")
    status = out.read_status()
    assert code == 0 and status.failed_items == 2
    assert [e.file for e in status.item_errors] == ["a.csv", "c.csv"]


def test_failed_items_that_cannot_be_named_are_counted_without_a_file(job) -> None:
    code, out = job("def run(mb):\n    return [0.1]\n")
    status = out.read_status()
    assert code == 0 and status.failed_items == 2
    assert [e.file for e in status.item_errors] == [None, None]
    assert status.item_errors[0].message == (
        "run() returned 1 results for 3 files; which files failed cannot be told "
        "(return a column naming each row's input file to find out)"
    )


def test_more_rows_than_files_fail_nothing(job) -> None:
    code, out = job("def run(mb):\n    return list(range(7))\n")
    assert code == 0 and (out.read_status().rows, out.read_status().failed_items) == (7, 0)


# --------------------------------------------------------------------------- outputs


def test_custom_outputs_go_to_a_fresh_folder_per_attempt(job) -> None:
    script = """
        import os, pathlib
        def run(mini_batch):
            out = pathlib.Path(os.environ["AZUREML_BI_OUTPUT_PATH"])
            for p in mini_batch:
                (out / ("scored-" + os.path.basename(p))).write_text("ok")
            return mini_batch
        """
    code, out = job(script, "--output-action", "summary_only")
    first = out.read_status()
    assert code == 0 and first.result_file is None and first.rows == 3  # summary_only: counted, not written
    assert first.custom_outputs == 3
    assert sorted(p.name for p in out.outputs_path(first).iterdir()) == ["scored-a.csv", "scored-b.csv", "scored-c.csv"]
    assert not list(out.path.glob("result-*.parquet"))

    code, out = job(script, "--output-action", "summary_only")
    second = out.read_status()
    assert second.outputs_dir != first.outputs_dir
    assert [p.name for p in out.path.glob("outputs-*")] == [second.outputs_dir]  # the old attempt's are gone


def test_no_custom_outputs_leave_no_folder(job) -> None:
    code, out = job("def run(mb):\n    return mb\n")
    assert code == 0 and out.read_status().outputs_dir is None and not list(out.path.glob("outputs-*"))


def test_no_results_at_all_name_every_file(job) -> None:
    code, out = job("def run(mb):\n    return []\n")
    status = out.read_status()
    assert code == 0 and (status.rows, status.failed_items) == (0, 3)
    assert [(e.file, e.type, e.message) for e in status.item_errors] == [
        (name, "NoResult", "run() returned no results for this mini-batch") for name in ("a.csv", "b.csv", "c.csv")
    ]


def test_an_exception_names_the_file_run_was_working_on(job) -> None:
    # The file is in a variable of a frame the exception passed through (pandas' own, here).
    code, out = job(
        """
        import pandas as pd
        def run(mini_batch):
            return [len(pd.read_csv(p, usecols=["y"] if p.endswith("b.csv") else None)) for p in mini_batch]
        """
    )
    assert code == 1
    assert failure(out) == "ValueError: Usecols do not match columns, columns expected but not found: ['y'] (file b.csv)"


def test_an_exception_names_the_file_run_opened_last(job) -> None:
    # No variable holds the path: the audit hook's last opened file names it.
    code, out = job(
        """
        def run(mini_batch):
            handles = [open(p) for p in mini_batch[:2]]
            del mini_batch
            raise RuntimeError("bad header")
        """
    )
    assert code == 1 and failure(out) == "RuntimeError: bad header (file b.csv)"


def test_an_exception_before_any_file_names_none(job) -> None:
    code, out = job("def init():\n    raise RuntimeError('no model')\ndef run(mb):\n    return mb\n")
    assert code == 1 and failure(out) == "RuntimeError: no model"


def test_a_try_that_lost_its_claim_to_a_retry_commits_nothing_and_keeps_the_retrys_record(job, caplog) -> None:
    # Try 1's Celery worker died; the retry (try 2) claimed the folder and committed. Try 1's
    # container, still running, ends later: its result must not replace the retry's.
    script = "import os\ndef init(): pass\ndef run(mb):\n    return [os.environ.get('WHO', '?')] * len(mb)\n"
    _, out = job(script)
    out.path.mkdir(parents=True, exist_ok=True)
    out.claim(2)
    code, out = job(script, "--attempt", "2")
    assert code == 0
    retry = out.read_status()
    assert retry.attempt == 2
    code, out = job(script, "--attempt", "1")  # the late container of try 1
    assert out.read_status() == retry
    assert out.result_path(retry).is_file()  # its result file was not cleaned away either
    assert "mb-00004: try 1 does not commit its succeeded result: try 2 of this mini-batch has taken over" in caplog.text


def test_a_claim_is_readable_by_the_scoring_containers_user(tmp_path: Path) -> None:
    out = MiniBatchDir(tmp_path / "mb", 0)
    out.path.mkdir()
    out.claim(3)
    assert (out.claimed_by(), oct((out.path / MiniBatchDir.CLAIM).stat().st_mode & 0o777)) == (3, "0o644")
    assert out.commit(MiniBatchStatus(index=0, state=MiniBatchStatus.FAILED, files=0, attempt=2)) is False
    assert out.read_status() is None
    assert out.commit(MiniBatchStatus(index=0, state=MiniBatchStatus.FAILED, files=0, attempt=3)) is True


# --------------------------------------------------------------------------- symbolic links


REFUSED = (
    "input file up.csv is a symbolic link to /host/secret.csv, outside input.path (/data/in); batchscore scores "
    "only files inside input.path: copy the file in or point input.path at its folder"
)


@pytest.fixture()
def linked(tmp_path: Path):
    """Input files with a link the plan followed (latest.csv -> store/b.csv) and one it refused
    (up.csv), which leads to a secret file that must never be read; runs a script on them."""
    inputs = tmp_path / "in"
    a = write(inputs / "a.csv", "id\n1\n")
    b = write(inputs / "store" / "b.csv", "id\n2\n3\n")
    c = write(inputs / "c.csv", "id\n4\n")
    (inputs / "latest.csv").symlink_to(b)
    (inputs / "up.csv").symlink_to(write(tmp_path / "secret.csv", "id\n666\n"))

    def entry(p: Path, rel: str, **kw) -> InputFile:
        return InputFile(rel, p.stat().st_size, p.stat().st_mtime_ns, **kw)

    files = [
        entry(a, "a.csv"),
        entry(c, "c.csv"),
        entry(b, "latest.csv", target="store/b.csv"),
        InputFile("up.csv", 0, 0, refused=REFUSED),
    ]

    def run(script: str, planned: list[InputFile] = files) -> tuple[int, MiniBatchDir]:
        mb_file = tmp_path / "mb.json"
        write_json_atomic(mb_file, MiniBatch(index=2, files=planned).to_json())
        out = MiniBatchDir(tmp_path / "out", 2)
        path = write(tmp_path / "code" / "score.py", script)
        return main(
            ["--mini-batch", str(mb_file), "--input-root", str(inputs), "--scoring-script", str(path), "--output", str(out.path)]
        ), out

    run.inputs, run.files = inputs, files  # type: ignore[attr-defined]
    return run


READ_EACH = """
import os, pandas as pd
def run(mini_batch):
    return pd.DataFrame([
        {"file": os.path.basename(p), "ids": " ".join(map(str, pd.read_csv(p)["id"])), "real": os.path.realpath(p)}
        for p in mini_batch
    ])
"""


def test_a_link_is_read_at_its_target_under_its_own_name_and_a_refused_link_is_a_failed_item(linked) -> None:
    code, out = linked(READ_EACH)

    assert code == 0
    assert result_rows(out) == [
        {"file": "a.csv", "ids": "1", "real": str(linked.inputs / "a.csv")},
        {"file": "c.csv", "ids": "4", "real": str(linked.inputs / "c.csv")},
        {"file": "latest.csv", "ids": "2 3", "real": str(linked.inputs / "store" / "b.csv")},  # once, as its target
    ]  # up.csv was never given to run(): its secret (666) is nowhere
    status = out.read_status()
    assert (status.files, status.rows, status.failed_items) == (4, 3, 1)
    assert status.item_errors == [ItemError("up.csv", "LinkRefused", REFUSED)]
    assert not list(out.path.glob("parts-*"))  # the links named for run() are gone


def test_a_mini_batch_of_refused_links_only_never_calls_run(linked) -> None:
    code, out = linked("def run(mb):\n    raise RuntimeError('run() must not be called')\n", [linked.files[3]])
    status = out.read_status()
    assert code == 0 and status.succeeded
    assert (status.files, status.rows, status.failed_items, status.result_file) == (1, 0, 1, None)
    assert status.item_errors == [ItemError("up.csv", "LinkRefused", REFUSED)]


@pytest.mark.parametrize(
    "change, now",
    [
        (lambda b: b.write_text("id\n2\n3\n4\n"), "9 bytes"),
        (lambda b: b.unlink(), "gone"),
        (lambda b: (b.unlink(), b.symlink_to(b.parent.parent / "c.csv")), "a symbolic link"),
        (
            lambda b: (
                b.rename(b.parent.parent / "moved.csv"),
                b.parent.rename(b.parent.parent / "real"),
                b.parent.symlink_to(b.parent.parent / "real"),
                (b.parent.parent / "moved.csv").rename(b),
            ),
            "reached through a symbolic link",
        ),
    ],
    ids=["size", "gone", "now-a-link", "through-a-link"],
)
def test_a_links_target_that_changed_since_the_plan_is_never_scored(linked, change, now: str) -> None:
    change(linked.inputs / "store" / "b.csv")
    code, out = linked(READ_EACH)
    assert code == 1
    assert failure(out) == (
        "InputFileMissingError: input file latest.csv of mb-00002 is a symbolic link to store/b.csv, which changed "
        f"since the plan (planned: a regular file of 7 bytes; now: {now}); batchscore scores only the file the plan "
        "checked: restore it or start a new run (file latest.csv)"
    )
