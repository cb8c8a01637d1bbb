"""Planning and parsing: planning a run of 100,000 files, and parsing the DAG folder with 50 YAMLs.

Planning times :func:`batchscore.plan.plan_run` (listing, partitioning, writing the plan) on
real files in a temporary folder, beside its phases alone and beside the file system's own
cost: ``os.scandir`` and a ``stat`` of every file. Parsing times, each in a fresh Python
process, :func:`batchscore.factory.build_dags` on 50 YAML files, and Airflow's own ``DagBag``
parse of a DAG folder holding ``dags/batchscore_deployments.py``, pointed at those 50 files
and at an empty folder (the cost of importing batchscore and Airflow's operators).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from batchscore.partition import partition
from batchscore.plan import list_input_files, plan_run
from batchscore.spec import DeploymentSpec, load_endpoint
from bench.common import REPO, Result, deployment_doc, median, stopwatch, temp_folder, write_yaml

NAME = "planning"
TITLE = "planning 100,000 files, and parsing the DAG folder with 50 deployment YAMLs"
PLAN_TARGET_S = 2.0
PARSE_TARGET_S = 1.0
SMALL = {"files": 1000, "yamls": 3, "repeats": 1}

#: Child process: import the factory (not timed), then time build_dags on a folder.
_BUILD_DAGS = """
import json, sys, time
from batchscore.factory import build_dags
t0 = time.perf_counter()
dags = build_dags(sys.argv[1])
seconds = time.perf_counter() - t0
open(sys.argv[2], "w").write(json.dumps({"seconds": seconds, "dags": len(dags)}))
"""
#: Child process: import Airflow's DagBag (not timed), then time its parse of a DAG folder.
_DAGBAG = """
import json, sys, time
from airflow.dag_processing.dagbag import DagBag
t0 = time.perf_counter()
bag = DagBag(dag_folder=sys.argv[1])
seconds = time.perf_counter() - t0
open(sys.argv[2], "w").write(json.dumps({"seconds": seconds, "dags": len(bag.dags), "errors": len(bag.import_errors)}))
"""


def _stage(root: Path, folder: Path, name: str, inputs: Path, settings: dict) -> Path:
    """A deployment YAML ``<folder>/<name>.yaml`` reading ``inputs``, with its own output folder."""
    return write_yaml(
        folder / f"{name}.yaml",
        deployment_doc(
            name,
            model=root / "model",
            code=root / "code",
            inputs=inputs,
            output=root / "output" / name,
            pattern="*.csv",
            settings=settings,
        ),
    )


def _raw_listing(folder: Path) -> int:
    """What the file system costs: every entry of the folder, and a stat of each ``.csv`` file."""
    return sum(1 for e in os.scandir(folder) if e.name.endswith(".csv") and e.stat().st_size >= 0)


def _plan(result: Result, deployment: DeploymentSpec, repeats: int) -> None:
    """Time the baseline listing, the planner's phases and ``plan_run`` (a new run each round)."""
    raw, listing, cutting, planning = [], [], [], []
    for k in range(repeats):
        with stopwatch() as t:
            _raw_listing(deployment.input.path)
        raw.append(t[0])
        with stopwatch() as t:
            files = list_input_files(deployment)
        listing.append(t[0])
        with stopwatch() as t:
            batches = partition(files, deployment.settings.mini_batch_size)
        cutting.append(t[0])
        with stopwatch() as t:
            plan_run("bench-planning", deployment, f"bench-{k}")
        planning.append(t[0])
    size = deployment.settings.mini_batch_size
    result.figure("input_files", len(files), "", f"input files, {len(batches)} mini-batches of {size}")
    result.figure("raw_listing_s", median(raw), "s", "baseline: os.scandir + stat of every file")
    result.figure("list_input_files_s", median(listing), "s", "list_input_files")
    result.figure("partition_s", median(cutting), "s", "partition")
    plan_s = result.figure("plan_run_s", median(planning), "s", "plan_run (lists, partitions, writes the plan)")
    result.figure("listing_over_raw", median(listing) / median(raw), "x", "list_input_files / baseline listing")
    result.check(f"plan_run, {len(files):,} files", plan_s, "<", PLAN_TARGET_S, "s")


def _child_env(home: Path, deployments: Path) -> dict[str, str]:
    """The environment of a parsing child: only this Airflow home and these deployments."""
    own = ("AIRFLOW_HOME", "AIRFLOW_CONFIG")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__") and k not in own}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        BATCHSCORE_DEPLOYMENTS_DIR=str(deployments),
    )
    return env


def _child(code: str, folder: Path, env: dict[str, str], out: Path) -> dict:
    """Run a timing child in a fresh interpreter; return what it measured."""
    proc = subprocess.run([sys.executable, "-c", code, str(folder), str(out)], env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"parsing child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    measured = json.loads(out.read_text())
    out.unlink()
    return measured


def _parse(result: Result, root: Path, full: Path, yamls: int, repeats: int) -> None:
    """Time ``build_dags`` on ``full`` (``yamls`` files), and DagBag parses of it and of an empty folder."""
    empty = root / "deployments-0"
    empty.mkdir()
    dags = root / "dags"
    dags.mkdir()
    shutil.copy(REPO / "dags" / "batchscore_deployments.py", dags)
    home = root / "airflow-home"
    out = root / "child.json"
    bag0, bag, build = [], [], []
    for _ in range(repeats):  # interleaved, so a slow moment of the machine touches all three
        bag0.append(_child(_DAGBAG, dags, _child_env(home, empty), out))
        bag.append(_child(_DAGBAG, dags, _child_env(home, full), out))
        build.append(_child(_BUILD_DAGS, full, _child_env(home, full), out))
    if bag[0]["dags"] != yamls or bag[0]["errors"] or build[0]["dags"] != yamls:
        raise RuntimeError(f"expected {yamls} DAGs without import errors, got {bag[0]} and {build[0]}")
    bag0_s, bag_s, build_s = (median([m["seconds"] for m in samples]) for samples in (bag0, bag, build))
    result.figure("dagbag_0_s", bag0_s, "s", "baseline: DagBag parse, 0 YAMLs (imports)")
    result.figure("dagbag_s", bag_s, "s", f"DagBag parse, {yamls} YAMLs")
    result.figure("build_dags_s", build_s, "s", f"build_dags, {yamls} YAMLs (imports done)")
    result.figure("dagbag_marginal_s", bag_s - bag0_s, "s", f"DagBag parse, {yamls} YAMLs minus 0 YAMLs")
    result.figure("dagbag_over_baseline", bag_s / bag0_s, "x", f"DagBag {yamls} YAMLs / DagBag 0 YAMLs")
    result.check(f"build_dags, {yamls} YAMLs", build_s, "<", PARSE_TARGET_S, "s")
    result.check(f"DagBag parse, {yamls} YAMLs", bag_s, "<", PARSE_TARGET_S, "s")


def run(files: int = 100_000, yamls: int = 50, repeats: int = 3) -> Result:
    """Plan ``files`` real files; parse ``yamls`` deployment YAMLs. Medians of ``repeats``."""
    result = Result(NAME, TITLE)
    with temp_folder(NAME) as root:
        for name in ("model", "code"):
            (root / name).mkdir()
        (root / "code" / "score.py").write_text("def run(mini_batch):\n    return mini_batch\n")
        inputs = root / "inputs"
        inputs.mkdir()
        for i in range(files):
            (inputs / f"in-{i:06d}.csv").write_bytes(b"id\n1\n")
        planning = _stage(root, root, "bench-planning", inputs, {"mini_batch_size": 100})
        _plan(result, load_endpoint(planning).deployments[0], repeats)
        shared = root / "inputs-small"
        shared.mkdir()
        for i in range(yamls):
            _stage(root, root / "deployments", f"bench-parse-{i:02d}", shared, {"mini_batch_size": 10})
        _parse(result, root, root / "deployments", yamls, repeats)
    return result
