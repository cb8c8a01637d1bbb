"""plan: deterministic listing, partitioning, and a plan persisted once per run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from batchscore.errors import PlanError
from batchscore.partition import partition, partition_by_size
from batchscore.plan import list_input_files, mini_batch_refs, plan_run, run_layout
from batchscore_runtime.formats import InputFile
from tests.helpers import deployment_file, load, write


@pytest.fixture()
def make_deployment(tmp_path: Path):
    (tmp_path / "model").mkdir()
    write(tmp_path / "code" / "score.py", "def run(mb):\n    return mb\n")

    def make(inputs: Path, **kwargs):
        path = deployment_file(tmp_path / "yaml", model=tmp_path / "model", code=tmp_path / "code", inputs=inputs, **kwargs)
        return load(path).deployments[0]

    return make


def test_files_are_listed_in_natural_order_without_hidden_files(tmp_path: Path, make_deployment) -> None:
    inputs = tmp_path / "in"
    for name in ("f-10.csv", "f-2.csv", "f-1.csv", ".hidden.csv", "sub/f-3.csv", "notes.txt"):
        write(inputs / name, "x\n")
    (inputs / ".cache").mkdir()
    write(inputs / ".cache" / "f-0.csv", "x\n")

    flat = make_deployment(inputs, pattern="*.csv")
    assert [f.path for f in list_input_files(flat)] == ["f-1.csv", "f-2.csv", "f-10.csv"]
    deep = make_deployment(inputs, pattern="**/*.csv")
    assert [f.path for f in list_input_files(deep)] == ["f-1.csv", "f-2.csv", "f-10.csv", "sub/f-3.csv"]


def test_plan_partitions_by_count_and_persists_one_file_per_mini_batch(tmp_path: Path, make_deployment) -> None:
    inputs = tmp_path / "in"
    for i in range(7):
        write(inputs / f"part-{i}.csv", "x\n" * (i + 1))
    d = make_deployment(inputs, settings={"mini_batch_size": 3})

    plan = plan_run("ep", d, "manual__2026-11-21T10:00:00+00:00")

    layout = run_layout(d, "manual__2026-11-21T10:00:00+00:00")
    assert layout.root == d.output.path / "manual__2026-11-21T10_00_00_00_00"
    assert [(e.index, e.files) for e in plan.mini_batches] == [(0, 3), (1, 3), (2, 1)]
    assert [f.path for f in layout.read_mini_batch(1).files] == ["part-3.csv", "part-4.csv", "part-5.csv"]
    assert json.loads(layout.plan_file.read_text())["mini_batches"][2] == {"index": 2, "files": 1, "bytes": 14}
    assert mini_batch_refs(plan)[0] == {"index": 0, "files": 3, "bytes": 12, "label": "mb-00000 (3 files)"}
    assert mini_batch_refs(plan)[2]["label"] == "mb-00002 (1 file)"


def test_a_second_plan_of_the_same_run_reuses_the_first_even_if_inputs_changed(tmp_path: Path, make_deployment) -> None:
    inputs = tmp_path / "in"
    for i in range(4):
        write(inputs / f"p{i}.csv", "x\n")
    d = make_deployment(inputs, settings={"mini_batch_size": 2})
    first = plan_run("ep", d, "run-1")
    write(inputs / "p9.csv", "new\n")
    (inputs / "p0.csv").unlink()

    again = plan_run("ep", d, "run-1")
    other_run = plan_run("ep", d, "run-2")

    assert again == first
    assert [f.path for f in run_layout(d, "run-1").read_mini_batch(0).files] == ["p0.csv", "p1.csv"]
    assert other_run.files == 4 and other_run != first


def test_missing_and_empty_input_folders_fail_clearly(tmp_path: Path, make_deployment) -> None:
    missing = make_deployment(tmp_path / "nowhere")
    with pytest.raises(PlanError) as info:
        plan_run("ep", missing, "r")
    assert str(info.value) == (
        f"input folder {tmp_path / 'nowhere'} of deployment 'test-deployment' does not exist or is not a folder (key input.path)"
    )
    (tmp_path / "empty").mkdir()
    empty = make_deployment(tmp_path / "empty")
    with pytest.raises(PlanError) as info:
        plan_run("ep", empty, "r")
    assert str(info.value) == (
        f"no input files match '*.csv' in {tmp_path / 'empty'} (deployment 'test-deployment', keys input.path and input.pattern)"
    )
    assert not run_layout(empty, "r").plan_file.exists()


def test_more_mini_batches_than_airflow_can_map_fail_before_anything_is_written(tmp_path: Path, make_deployment) -> None:
    inputs = tmp_path / "in"
    for i in range(5):
        write(inputs / f"p{i}.csv", "x\n")
    d = make_deployment(inputs, settings={"mini_batch_size": 1})
    with pytest.raises(PlanError) as info:
        plan_run("ep", d, "r", max_mini_batches=4)
    assert str(info.value) == (
        "5 files at mini_batch_size 1 make 5 mini-batches, more than Airflow's [core] max_map_length (4); "
        "raise settings.mini_batch_size or AIRFLOW__CORE__MAX_MAP_LENGTH"
    )
    assert not run_layout(d, "r").work.exists()


def test_outputs_inside_the_input_folder_are_never_planned(tmp_path: Path, make_deployment) -> None:
    inputs = tmp_path / "in"
    write(inputs / "a.csv", "x\n")
    d = make_deployment(inputs, pattern="**/*.csv", output=inputs / "out")
    write(inputs / "out" / "old-run" / "predictions.csv", "x\n")
    assert [f.path for f in list_input_files(d)] == ["a.csv"]


def test_links_into_the_output_folder_are_never_planned(tmp_path: Path, make_deployment) -> None:
    inputs, output = tmp_path / "in", tmp_path / "out"
    write(inputs / "a.csv", "x\n")
    write(output / "old-run" / "predictions.csv", "x\n")
    (inputs / "b.csv").symlink_to(output / "old-run" / "predictions.csv")  # a linked file
    (inputs / "sub").symlink_to(output / "old-run")  # a linked folder, reached by **
    write(tmp_path / "elsewhere.csv", "x\n")
    (inputs / "c.csv").symlink_to(tmp_path / "elsewhere.csv")  # a link elsewhere is an input

    assert [f.path for f in list_input_files(make_deployment(inputs, output=output))] == ["a.csv", "c.csv"]
    assert [f.path for f in list_input_files(make_deployment(inputs, pattern="**/*.csv", output=output))] == [
        "a.csv",
        "c.csv",
    ]
    # ... planned, and refused: it leads outside the input folder (see the tests of links below).
    assert list_input_files(make_deployment(inputs, output=output))[1].refused is not None


# --------------------------------------------------------------------------- symbolic links


def link_refusal(rel: str, real: Path, root: Path) -> str:
    return (
        f"input file {rel} is a symbolic link to {real}, outside input.path ({root}); batchscore scores only "
        "files inside input.path: copy the file in or point input.path at its folder"
    )


def test_links_to_files_inside_are_planned_as_their_target_and_others_are_refused(tmp_path: Path, make_deployment) -> None:
    inputs = tmp_path / "in"
    write(inputs / "a.csv", "id\n1\n")
    write(inputs / "b.csv", "id\n2\n3\n")
    write(inputs / "sub" / "c.csv", "id\n4\n5\n6\n")
    secret = write(tmp_path / "secret.csv", "host secret\n")
    (inputs / "abs.csv").symlink_to(secret)  # absolute, outside
    (inputs / "up.csv").symlink_to("../secret.csv")  # relative, outside through ..
    (inputs / "gone.csv").symlink_to("missing.csv")  # dangling
    (inputs / "latest.csv").symlink_to("b.csv")  # inside: scored as b.csv
    (inputs / "chain.csv").symlink_to(inputs / "latest.csv")  # a link to a link inside: resolved to b.csv
    (inputs / "deep.csv").symlink_to("sub/c.csv")
    (inputs / "loop.csv").symlink_to("loop.csv")
    (inputs / "folder.csv").symlink_to("sub")  # a folder, passed over as folders are
    os.mkfifo(inputs / "fifo")
    (inputs / "pipe.csv").symlink_to("fifo")  # a pipe would block a reader
    d = make_deployment(inputs)

    files = {f.path: f for f in list_input_files(d)}

    b, c = (inputs / "b.csv").stat(), (inputs / "sub" / "c.csv").stat()
    assert files == {
        "a.csv": InputFile("a.csv", 5, (inputs / "a.csv").stat().st_mtime_ns),
        "abs.csv": InputFile(
            "abs.csv", 0, os.lstat(inputs / "abs.csv").st_mtime_ns, refused=link_refusal("abs.csv", secret, inputs)
        ),
        "b.csv": InputFile("b.csv", 7, b.st_mtime_ns),
        "chain.csv": InputFile("chain.csv", 7, b.st_mtime_ns, target="b.csv"),
        "deep.csv": InputFile("deep.csv", 9, c.st_mtime_ns, target="sub/c.csv"),
        "gone.csv": InputFile(
            "gone.csv",
            0,
            os.lstat(inputs / "gone.csv").st_mtime_ns,
            refused=(
                f"input file gone.csv is a symbolic link to {inputs / 'missing.csv'}, which does not exist (a dangling "
                "link); fix or remove the link"
            ),
        ),
        "latest.csv": InputFile("latest.csv", 7, b.st_mtime_ns, target="b.csv"),
        "loop.csv": InputFile(
            "loop.csv",
            0,
            os.lstat(inputs / "loop.csv").st_mtime_ns,
            refused=(
                "input file loop.csv is a symbolic link that leads back to itself (a loop of links); fix or remove the link"
            ),
        ),
        "pipe.csv": InputFile(
            "pipe.csv",
            0,
            os.lstat(inputs / "pipe.csv").st_mtime_ns,
            refused=(
                f"input file pipe.csv is a symbolic link to {inputs / 'fifo'}, which is not a regular file (a pipe, "
                "socket or device); batchscore scores only regular files"
            ),
        ),
        "up.csv": InputFile("up.csv", 0, os.lstat(inputs / "up.csv").st_mtime_ns, refused=link_refusal("up.csv", secret, inputs)),
    }
    # The plan keeps the link's name and says where it is read; plans without links are as they were.
    assert files["latest.csv"].to_json() == {"path": "latest.csv", "size": 7, "mtime_ns": b.st_mtime_ns, "target": "b.csv"}
    assert InputFile.from_json(files["up.csv"].to_json()) == files["up.csv"]
    assert files["a.csv"].to_json() == {"path": "a.csv", "size": 5, "mtime_ns": files["a.csv"].mtime_ns}


def test_an_input_path_that_is_itself_a_link_is_the_folder_it_leads_to(tmp_path: Path, make_deployment) -> None:
    write(tmp_path / "real" / "a.csv", "x\n")
    (tmp_path / "real" / "b.csv").symlink_to(tmp_path / "real" / "a.csv")  # absolute, through the real path
    (tmp_path / "in").symlink_to(tmp_path / "real")
    files = list_input_files(make_deployment(tmp_path / "in"))
    assert [(f.path, f.target, f.refused) for f in files] == [("a.csv", None, None), ("b.csv", "a.csv", None)]


def test_linked_folders_are_entered_only_inside_the_input_folder_and_never_in_a_loop(tmp_path: Path, make_deployment) -> None:
    inputs = tmp_path / "in"
    write(inputs / "a.csv", "x\n")
    write(inputs / "sub" / "x.csv", "id\n1\n")
    write(tmp_path / "outside" / "y.csv", "host\n")
    (inputs / "alias").symlink_to("sub")  # relative, inside: entered
    (inputs / "deep").mkdir()
    (inputs / "deep" / "abs").symlink_to(inputs / "sub")  # absolute, inside: entered
    (inputs / "sub" / "loop").symlink_to("..")  # back to the input folder: a loop, never entered
    (inputs / "sub" / "self").symlink_to(".")
    (inputs / "ext").symlink_to(tmp_path / "outside")  # outside: refused, never listed
    (inputs / "up").symlink_to("../outside")
    x = (inputs / "sub" / "x.csv").stat()

    files = list_input_files(make_deployment(inputs, pattern="**/*.csv"))

    folder_refusal = (
        "input folder {} is a symbolic link to {}, outside input.path ({}); batchscore scores only files inside "
        "input.path: copy the files in or point input.path at their folder"
    )
    assert files == [
        InputFile("a.csv", 2, (inputs / "a.csv").stat().st_mtime_ns),
        InputFile("alias/x.csv", 5, x.st_mtime_ns, target="sub/x.csv"),
        InputFile("deep/abs/x.csv", 5, x.st_mtime_ns, target="sub/x.csv"),
        InputFile("ext", 0, 0, refused=folder_refusal.format("ext", tmp_path / "outside", inputs)),
        InputFile("sub/x.csv", 5, x.st_mtime_ns),
        InputFile("up", 0, 0, refused=folder_refusal.format("up", tmp_path / "outside", inputs)),
    ]
    # A pattern with a folder in it follows the same rule.
    assert [(f.path, f.target, bool(f.refused)) for f in list_input_files(make_deployment(inputs, pattern="*/x.csv"))] == [
        ("alias/x.csv", "sub/x.csv", False),
        ("ext", None, True),
        ("sub/x.csv", None, False),
        ("up", None, True),
    ]
    # Without folders in the pattern, linked folders are passed over as folders are.
    assert [f.path for f in list_input_files(make_deployment(inputs, pattern="*"))] == ["a.csv"]


def test_refused_links_are_failed_items_of_mini_batches_with_good_files(tmp_path: Path, make_deployment) -> None:
    inputs = tmp_path / "in"
    for name in ("a.csv", "b.csv", "c.csv"):
        write(inputs / name, "x\n")
    (inputs / "bb.csv").symlink_to(write(tmp_path / "secret.csv", "host\n"))  # outside: planned between b.csv and c.csv
    d = make_deployment(inputs, settings={"mini_batch_size": 2})
    plan = plan_run("ep", d, "r")
    assert [(e.files, e.bytes) for e in plan.mini_batches] == [(2, 4), (2, 2)]
    assert [(f.path, f.refused is not None) for f in run_layout(d, "r").read_mini_batch(1).files] == [
        ("bb.csv", True),
        ("c.csv", False),
    ]


def test_an_output_path_that_is_a_file_fails_the_plan_naming_output_path(tmp_path: Path, make_deployment) -> None:
    write(tmp_path / "in" / "f.csv", "x\n")
    not_a_folder = write(tmp_path / "taken", "a file\n")
    d = make_deployment(tmp_path / "in", output=not_a_folder)
    with pytest.raises(PlanError) as info:
        plan_run("ep", d, "manual__1")
    assert str(info.value) == (
        f"cannot write the run folder {not_a_folder / 'manual__1'} of deployment 'test-deployment' (key output.path "
        f"{not_a_folder}): Not a directory: {not_a_folder / 'manual__1' / '_batchscore' / 'plan.json'}; "
        "output.path must be a folder this Airflow worker can write"
    )
    assert not_a_folder.read_text() == "a file\n"


# --------------------------------------------------------------------------- size mode


def files_of(sizes: list[int]) -> list[InputFile]:
    return [InputFile(f"f{i:03d}.bin", size, 0) for i, size in enumerate(sizes)]


def sizes_of(mini_batches) -> list[list[int]]:
    return [[f.size for f in mb.files] for mb in mini_batches]


def test_size_mode_balances_bytes_in_contiguous_input_order() -> None:
    files = files_of([40, 40, 40, 40, 40, 40, 40])  # 280 bytes at 100 per mini-batch
    mbs = partition_by_size(files, 100, max_files=1000)
    # Cutting at 100 gives 4 mini-batches (80 + 80 + 80 + 40); with the limit lowered to the
    # smallest that keeps 4, the heaviest holds 80 still (no 4-way split does better), and
    # none is left nearly empty when a lower limit can spread the bytes.
    assert sizes_of(mbs) == [[40, 40], [40, 40], [40, 40], [40]]
    uneven = files_of([10, 10, 10, 10, 10, 10, 10, 10, 10, 70])  # cut at 100: 90 + 80 -> 2 mini-batches
    assert sizes_of(partition_by_size(uneven, 100, max_files=1000)) == [[10] * 8, [10, 70]]  # 80 + 80
    assert [f for mb in mbs for f in mb.files] == files  # every file once, in input order
    assert [mb.index for mb in mbs] == [0, 1, 2, 3]


def test_size_mode_puts_a_file_bigger_than_the_target_alone_and_caps_files() -> None:
    assert sizes_of(partition_by_size(files_of([5, 500, 5, 5]), 100, max_files=1000)) == [[5], [500], [5, 5]]
    assert sizes_of(partition_by_size(files_of([1] * 7), 100, max_files=3)) == [[1, 1, 1], [1, 1, 1], [1]]
    assert partition_by_size([], 100, max_files=3) == []


def test_size_mode_is_deterministic_and_evens_out_skewed_sizes() -> None:
    import random

    rng = random.Random(7)
    sizes = [int(1_000_000 / rng.paretovariate(1.2)) + 1 for _ in range(2000)]  # heavy-tailed
    files = files_of(sizes)
    first = partition_by_size(files, 50_000_000, max_files=1000)
    assert sizes_of(first) == sizes_of(partition_by_size(files, 50_000_000, max_files=1000))
    by_bytes = [sum(s) for s in sizes_of(first)]
    assert max(by_bytes) <= 50_000_000 or any(len(s) == 1 for s in sizes_of(first))
    by_count = [sum(f.size for f in mb.files) for mb in partition(files, -(-len(files) // len(first)))]
    # Counting files leaves the heaviest mini-batch far above the mean; sizing keeps it close.
    assert max(by_bytes) / (sum(by_bytes) / len(by_bytes)) < max(by_count) / (sum(by_count) / len(by_count))


def test_size_mode_from_the_yaml(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    write(tmp_path / "code" / "score.py", "def run(mb):\n    return mb\n")
    for i, size in enumerate([3000, 1000, 1000, 1000, 2000]):
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / f"f{i}.csv").write_bytes(b"x" * size)
    path = deployment_file(
        tmp_path / "yaml",
        model=tmp_path / "model",
        code=tmp_path / "code",
        inputs=tmp_path / "in",
        settings={"mini_batch_size": "4kB", "max_files_per_mini_batch": 2},
    )
    d = load(path).deployments[0]
    assert d.settings.mini_batch_bytes == 4000
    plan = plan_run("ep", d, "run-size")
    # Cut at 4 kB: 4000 + 2000 + 2000; balanced: the same 3 mini-batches, none over 3000.
    assert [(e.files, e.bytes) for e in plan.mini_batches] == [(1, 3000), (2, 2000), (2, 3000)]
    assert plan.mini_batch_size == "4kB"
