"""Runtime efficiency: the scoring runtime against a plain loop over the same ``run()``.

Both are a whole ``docker run`` of the scoring image on the same files, with the same
hardening, user and mounts, timed from start to exit. The runtime gets exactly what the score
operator gives one mini-batch (:func:`batchscore.containers.scoring_container`: command,
mounts, environment) on a plan made by :func:`batchscore.plan.plan_run`. The plain loop is a
script that imports the scoring script, calls ``init()`` once and ``run(files)`` once, and
writes the result to parquet as the runtime does (``pa.Table.from_pandas``, ``pq.write_table``).
The work is the iris example's model and scoring script on generated CSV files. Runs
alternate, the order flipped each round; the median of each counts.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
from docker.types import Mount

from batchscore import security
from batchscore.containers import scoring_container
from batchscore.plan import plan_run, run_layout
from batchscore.spec import DeploymentSpec, load_endpoint
from batchscore_runtime.formats import ContainerPaths, MiniBatchDir
from bench.common import (
    REPO,
    SCORING_IMAGE,
    Result,
    deployment_doc,
    hardened_run_args,
    median,
    require_image,
    stopwatch,
    temp_folder,
    write_yaml,
)

NAME = "runtime"
TITLE = "scoring runtime in its container against a plain init()/run() loop in the same image"
TARGET = 0.97
IRIS = REPO / "include" / "examples" / "iris"
SMALL = {"files": 4, "rows": 1000, "repeats": 1}
PLAIN_SCRIPT_TARGET = "/mnt/bench/plain.py"
#: The plain loop's environment: what the runtime's container gets, less the runtime's own.
PLAIN_ENVIRONMENT = {
    "AZUREML_MODEL_DIR": ContainerPaths.MODEL,
    "HOME": "/tmp",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
}

#: The plain loop, run in the scoring image: no runtime, no worker process, no time limits.
PLAIN_SCRIPT = """
import importlib.util, json, os, sys, time
import pyarrow as pa, pyarrow.parquet as pq

code, script_name, inputs, output = sys.argv[1:5]
t0 = time.monotonic()
sys.path.insert(0, code)
spec = importlib.util.spec_from_file_location("score", os.path.join(code, script_name))
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)
script.init()
t1 = time.monotonic()
result = script.run([os.path.join(inputs, name) for name in sorted(os.listdir(inputs))])
table = pa.Table.from_pandas(result.reset_index(drop=True), preserve_index=False)
t2 = time.monotonic()
pq.write_table(table, os.path.join(output, "result.parquet"))
with open(os.path.join(output, "timing.json"), "w") as fh:
    json.dump({"rows": table.num_rows, "init_seconds": t1 - t0, "run_seconds": t2 - t1}, fh)
"""


def write_inputs(folder: Path, files: int, rows: int, seed: int = 6) -> None:
    """``files`` iris-like CSV files of ``rows`` rows each (id and the four features)."""
    rng = np.random.default_rng(seed)
    means, spreads = np.array([5.8, 3.0, 3.8, 1.2]), np.array([0.8, 0.4, 1.8, 0.8])
    for k in range(files):
        features = np.clip(rng.normal(means, spreads, size=(rows, 4)), 0.1, None)
        frame = pd.DataFrame(features, columns=["sepal_length", "sepal_width", "petal_length", "petal_width"])
        frame.insert(0, "id", np.arange(k * rows, (k + 1) * rows))
        frame.to_csv(folder / f"batch-{k:04d}.csv", index=False, float_format="%.1f")


def mount_args(mounts: list[Mount]) -> list[str]:
    """``docker run --mount`` options for docker-py mounts (binds)."""
    args = []
    for m in mounts:
        spec = f"type={m['Type']},source={m['Source']},target={m['Target']}"
        args += ["--mount", spec + (",readonly" if m.get("ReadOnly") else "")]
    return args


def _docker_run(args: list[str]) -> float:
    """Run a container to its end; return its wall time (start to exit)."""
    with stopwatch() as t:
        proc = subprocess.run(["docker", "run", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"docker run failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return t[0]


def run_runtime(spec: DeploymentSpec, run_id: str, user: str) -> tuple[float, dict]:
    """The runtime on the whole input as one mini-batch, set up as the score operator does."""
    plan_run("bench-runtime", spec, run_id)
    layout = run_layout(spec, run_id)
    container = scoring_container(spec, layout, 0, 1, user=user, labels={})
    scratch = layout.attempt_scratch(0, 1)
    scratch.mkdir(parents=True, exist_ok=True)  # the container's only writable mount, as the operator makes it
    security.make_writable_for(scratch, user)
    layout.mini_batch_file(0).chmod(0o644)
    env = [f"--env={k}={v}" for k, v in container.environment.items()]
    hardening = hardened_run_args(spec.resources, user)
    wall = _docker_run([*hardening, *mount_args(container.mounts), *env, container.image, *container.command])
    status = MiniBatchDir(scratch, 0).read_status()  # the container's report (the runtime's cost, not the intake's)
    if status is None or not status.succeeded:
        raise RuntimeError(f"the runtime committed no success: {status}")
    return wall, {"rows": status.rows, "init_seconds": status.init_seconds, "run_seconds": status.run_seconds}


def run_plain(spec: DeploymentSpec, root: Path, output: Path, user: str) -> tuple[float, dict]:
    """The plain loop on the same files, with the same mounts (and its own script), image and hardening."""
    script = root / "plain.py"
    output.mkdir()
    security.make_writable_for(output, user)
    paths = ContainerPaths
    mounts = [
        Mount(target=PLAIN_SCRIPT_TARGET, source=str(script), type="bind", read_only=True),
        Mount(target=paths.MODEL, source=str(spec.model.path), type="bind", read_only=True),
        Mount(target=paths.CODE, source=str(spec.code_configuration.code), type="bind", read_only=True),
        Mount(target=paths.INPUT, source=str(spec.input.path), type="bind", read_only=True),
        Mount(target=paths.OUTPUT, source=str(output), type="bind", read_only=False),
    ]
    env = [f"--env={k}={v}" for k, v in PLAIN_ENVIRONMENT.items()]
    script_name = spec.code_configuration.scoring_script
    command = ["python3", PLAIN_SCRIPT_TARGET, paths.CODE, script_name, paths.INPUT, paths.OUTPUT]
    hardening = hardened_run_args(spec.resources, user)
    wall = _docker_run([*hardening, *mount_args(mounts), *env, spec.environment.image, *command])
    return wall, json.loads((output / "timing.json").read_text())


def _measure(spec: DeploymentSpec, root: Path, rows: int, repeats: int) -> tuple[dict, dict]:
    """Both, ``repeats`` rounds, the order flipped each round: wall times and in-container figures."""
    user = security.container_user()
    walls: dict[str, list[float]] = {"runtime": [], "plain": []}
    inside: dict[str, list[dict]] = {"runtime": [], "plain": []}
    for k in range(repeats):
        for name in ("plain", "runtime") if k % 2 == 0 else ("runtime", "plain"):
            if name == "runtime":
                wall, measured = run_runtime(spec, f"bench-{k}", user)
            else:
                wall, measured = run_plain(spec, root, root / f"plain-{k}", user)
            if measured["rows"] != rows:
                raise RuntimeError(f"{name} returned {measured['rows']} rows of {rows}")
            walls[name].append(wall)
            inside[name].append(measured)
    return walls, inside


def run(files: int = 200, rows: int = 10_000, repeats: int = 5) -> Result:
    """Score ``files`` files of ``rows`` rows both ways, ``repeats`` times each."""
    require_image()
    if not (IRIS / "model" / "iris-classifier" / "model.joblib").is_file():
        raise RuntimeError("the iris example's model is missing; make it with `make example`")
    result = Result(NAME, TITLE)
    with temp_folder(NAME) as root:
        inputs = root / "inputs"
        inputs.mkdir()
        write_inputs(inputs, files, rows)
        (root / "plain.py").write_text(PLAIN_SCRIPT)
        settings = {"mini_batch_size": files, "retry_settings": {"max_retries": 0, "timeout": 3600}}
        doc = deployment_doc(
            "bench-runtime",
            model=IRIS / "model",
            code=IRIS / "code",
            inputs=inputs,
            output=root / "output",
            pattern="*.csv",
            settings=settings,
        )
        spec = load_endpoint(write_yaml(root / "bench-runtime.yaml", doc)).deployments[0]
        walls, inside = _measure(spec, root, files * rows, repeats)
    result.figure("work", files * rows, "rows", f"{files} CSV files x {rows:,} rows, iris model (scikit-learn)")
    plain_s = result.figure("plain_s", median(walls["plain"]), "s", "baseline: plain loop, docker run wall")
    runtime_s = result.figure("runtime_s", median(walls["runtime"]), "s", "runtime, docker run wall")
    for name in ("plain", "runtime"):
        for part in ("init", "run"):
            seconds = median([m[f"{part}_seconds"] for m in inside[name]])
            result.figure(f"{name}_{part}_s", seconds, "s", f"{name}: {part}() in the container")
    result.figure("runtime_fixed_s", runtime_s - plain_s, "s", "runtime wall minus plain wall")
    result.check(f"plain / runtime wall, {files * rows:,} rows", plain_s / runtime_s, ">=", TARGET)
    shown = ", ".join(f"{name} {[round(w, 2) for w in walls[name]]}" for name in ("plain", "runtime"))
    result.notes.append(f"image {SCORING_IMAGE}; samples (s): {shown}")
    return result
