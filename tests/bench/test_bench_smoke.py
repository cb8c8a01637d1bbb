"""The benchmark suite's code path at tiny sizes, so it cannot rot (bench/README.md).

Structure only: which figures and checks come out, and that they are sane. Never timings:
whether a target is met is for `make bench` to say, not for a test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.__main__ import main
from bench.common import Check

SKEW_FIGURES = {"count_skew", "size_skew", "split_size_skew", "largest_file_over_mean"}
PLANNING_FIGURES = {"plan_run_s", "raw_listing_s", "dagbag_0_s", "dagbag_s", "build_dags_s"}
STORAGE_RATES = {f"{size}_{what}_mb_s" for size in ("small", "large") for what in ("stage", "s3fs", "boto3")}


@pytest.mark.bench
def test_the_quick_benchmarks_report_figures_checks_and_a_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "latest.json"

    assert main(["skew", "planning", "intake", "--small", "--output", str(out)]) == 0

    doc = json.loads(out.read_text())
    assert {"started_at", "finished_at", "machine", "benchmarks"} <= doc.keys()
    benchmarks = doc["benchmarks"]
    assert list(benchmarks) == ["skew", "planning", "intake"]
    assert SKEW_FIGURES <= benchmarks["skew"]["figures"].keys()
    assert PLANNING_FIGURES <= benchmarks["planning"]["figures"].keys()
    assert {"intake_s", "copy_s", "sweep_ms"} <= benchmarks["intake"]["figures"].keys()
    for bench in benchmarks.values():
        assert bench["checks"] and bench["notes"] == []
        for figure in bench["figures"].values():  # differences of two timings may be negative
            assert figure.keys() == {"value", "unit", "what"} and isinstance(figure["value"], (int, float))
            assert figure["value"] > 0 or figure["unit"] != "x"
        for check in bench["checks"]:
            assert check["value"] > 0 and check["target"] > 0
            assert check["verdict"] == "met" if check["met"] else check["verdict"].startswith("missed by ")
    printed = capsys.readouterr().out
    assert "benchmark | figure" in printed and "size-aware skew, large files split (simulated)" in printed


@pytest.mark.bench
@pytest.mark.s3
def test_the_storage_benchmark_stages_from_its_own_s3_server_beside_direct_downloads(tmp_path: Path) -> None:
    out = tmp_path / "latest.json"

    assert main(["storage", "--small", "--output", str(out)]) == 0  # --small: staging only, no scheduler

    storage = json.loads(out.read_text())["benchmarks"]["storage"]
    assert {"small_objects", "large_objects", *STORAGE_RATES} <= storage["figures"].keys()
    assert all(storage["figures"][rate]["value"] > 0 for rate in STORAGE_RATES)
    assert [c["figure"] for c in storage["checks"]] == [
        "stage_files / fastest direct download, 8 x 64 KiB",
        "stage_files / fastest direct download, 2 x 1 MiB",
    ]
    assert all(c["value"] > 0 and c["op"] == ">=" for c in storage["checks"])
    assert [n.split(" ", 1)[0] for n in storage["notes"]] == ["small", "large"]  # the samples, no failure


@pytest.mark.parametrize(
    ("value", "op", "target", "verdict"),
    [
        (1.1, "<=", 1.2, "met"),
        (1.5, "<=", 1.2, "missed by 25%"),
        (0.6, ">=", 0.8, "missed by 25%"),
        (3.0, "<", 2.0, "missed by 50%"),
    ],
)
def test_a_verdict_says_by_how_much_a_target_was_missed(value: float, op: str, target: float, verdict: str) -> None:
    assert Check("ratio", value, op, target).verdict == verdict


def test_a_benchmark_option_is_refused_when_no_selected_benchmark_takes_it(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["skew", "--rows", "3"])

    assert stopped.value.code == 2
    assert "python -m bench: error: --rows applies to none of the selected benchmarks (skew)" in capsys.readouterr().err
