"""What every benchmark shares: results and their verdicts, timing, temporary folders, Docker.

A benchmark returns one :class:`Result`: the figures it measured (each with its unit and what it
is) and the :class:`Check` of each target against a figure measured side by side with its
baseline in the same run. :func:`report` prints them; :func:`write_json` writes them all.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from batchscore import security, shutdown
from batchscore.spec import Resources

#: Label of every container a benchmark starts itself, so teardown finds them all.
CONTAINER_LABEL = "batchscore.bench=1"
#: The scoring image: never pulled, built by `make images`.
SCORING_IMAGE = os.environ.get("BATCHSCORE_SCORING_IMAGE", "batchscore-scoring:latest")
REPO = Path(__file__).resolve().parent.parent

_OPS = {"<=": lambda v, t: v <= t, "<": lambda v, t: v < t, ">=": lambda v, t: v >= t}


@dataclass(frozen=True)
class Figure:
    """One measured number: ``value`` in ``unit``, and what it is."""

    value: float | int
    unit: str
    what: str


@dataclass(frozen=True)
class Check:
    """A target: ``value op target`` (e.g. ratio <= 1.2)."""

    figure: str  # what is compared, e.g. "t_job / (t_noop_dag + t_docker_runs)"
    value: float
    op: str  # "<=", "<" or ">="
    target: float
    unit: str = "x"

    @property
    def met(self) -> bool:
        """Whether the value is within the target."""
        return _OPS[self.op](self.value, self.target)

    @property
    def verdict(self) -> str:
        """``met``, or ``missed by X%``: how far the value is past the target, relative to the target."""
        if self.met:
            return "met"
        miss = (self.value / self.target - 1) if self.op in ("<=", "<") else (1 - self.value / self.target)
        return f"missed by {100 * miss:.0f}%"

    def describe(self) -> str:
        """One line: the figure, its value, the target and the verdict."""
        unit = _unit(self.unit)
        return f"{self.figure} = {fmt(self.value)}{unit}, target {self.op} {fmt(self.target)}{unit}: {self.verdict}"


@dataclass
class Result:
    """What one benchmark measured and how it did against its targets."""

    name: str
    title: str
    figures: dict[str, Figure] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0  # how long the benchmark took, set by the runner

    def figure(self, key: str, value: float | int, unit: str, what: str) -> float | int:
        """Record a figure and return its value."""
        self.figures[key] = Figure(value, unit, what)
        return value

    def check(self, figure: str, value: float, op: str, target: float, unit: str = "x") -> Check:
        """Record a target check and return it."""
        c = Check(figure, value, op, target, unit)
        self.checks.append(c)
        return c

    def to_json(self) -> dict[str, Any]:
        """The result as JSON-ready data (the benchmark's entry in the results file)."""
        return {
            "title": self.title,
            "seconds": round(self.seconds, 1),
            "figures": {k: asdict(f) for k, f in self.figures.items()},
            "checks": [{**asdict(c), "met": c.met, "verdict": c.verdict} for c in self.checks],
            "notes": self.notes,
        }


def fmt(value: float | int) -> str:
    """A number with about four significant digits (integers as they are, with thousands separators)."""
    if isinstance(value, int):
        return f"{value:,}"
    if value == 0 or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}" if abs(value) >= 1 else f"{value:.3g}"


def _unit(unit: str) -> str:
    """How a unit follows a number: ``1.2x``, ``3.4 s``."""
    return "x" if unit == "x" else (f" {unit}" if unit else "")


# --------------------------------------------------------------------------- reporting


def report(result: Result) -> str:
    """The figures that went into a benchmark's ratios, the checks and the notes, as text."""
    lines = [f"== {result.name}: {result.title}"]
    width = max((len(f.what) for f in result.figures.values()), default=0)
    for f in result.figures.values():
        lines.append(f"   {f.what:<{width}}  {fmt(f.value):>12}{_unit(f.unit)}")
    for c in result.checks:
        lines.append(f"   => {c.describe()}")
    lines += [f"   note: {n}" for n in result.notes]
    lines.append(f"   ({result.seconds:.0f} s)")
    return "\n".join(lines)


def table(results: Sequence[Result]) -> str:
    """The final table: benchmark, figure, value, target, verdict."""
    rows = [("benchmark", "figure", "value", "target", "verdict")]
    for r in results:
        for c in r.checks:
            unit = _unit(c.unit)
            rows.append((r.name, c.figure, f"{fmt(c.value)}{unit}", f"{c.op} {fmt(c.target)}{unit}", c.verdict))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    out.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(out)


def machine() -> dict[str, Any]:
    """Where the numbers were taken, and how busy the machine was (1-minute load average)."""
    docker = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True, text=True)
    return {
        "cpus": os.cpu_count(),
        "load": round(os.getloadavg()[0], 2),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "docker": docker.stdout.strip() or None,
    }


def write_json(path: Path, results: Sequence[Result], started: datetime, where: dict[str, Any]) -> None:
    """All results as JSON: when, where (:func:`machine`), and per benchmark its figures and checks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": where,
        "benchmarks": {r.name: r.to_json() for r in results},
    }
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- timing


@contextlib.contextmanager
def stopwatch() -> Iterator[list[float]]:
    """``with stopwatch() as t: ...``; afterwards ``t[0]`` holds the block's wall time in seconds."""
    elapsed = [0.0]
    t0 = time.perf_counter()
    try:
        yield elapsed
    finally:
        elapsed[0] = time.perf_counter() - t0


def median(values: Sequence[float]) -> float:
    """The median of the samples: what every benchmark reports of repeated measurements."""
    return statistics.median(values)


# --------------------------------------------------------------------------- files and containers


@contextlib.contextmanager
def temp_folder(name: str) -> Iterator[Path]:
    """A fresh folder removed afterwards, whatever happens (what containers wrote included)."""
    root = Path(tempfile.mkdtemp(prefix=f"batchscore-bench-{name}-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def write_yaml(path: Path, doc: dict[str, Any]) -> Path:
    """Write ``doc`` as YAML to ``path`` (folders made as needed); return ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def deployment_doc(
    endpoint: str,
    *,
    model: Path,
    code: Path,
    inputs: Path,
    output: Path,
    pattern: str,
    settings: dict[str, Any],
    resources: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An Azure-layout deployment YAML document with absolute paths and no retries."""
    doc = {
        "name": "bench",
        "endpoint_name": endpoint,
        "model": {"path": str(model)},
        "code_configuration": {"code": str(code), "scoring_script": "score.py"},
        "environment": {"image": SCORING_IMAGE},
        "input": {"path": str(inputs), "pattern": pattern},
        "output": {"path": str(output)},
        "settings": {"retry_settings": {"max_retries": 0}, **settings},
    }
    if resources:
        doc["resources"] = resources
    return doc


def job_folders(root: Path, docs: dict[str, dict[str, Any]]) -> tuple[Path, Path]:
    """``root/deployments`` with one YAML per DAG id of ``docs``, and ``root/dags`` holding a copy of
    ``dags/batchscore_deployments.py``, which builds their DAGs; returns the DAG and deployments folders."""
    deployments, dags = root / "deployments", root / "dags"
    for dag_id, doc in docs.items():
        write_yaml(deployments / f"{dag_id}.yaml", doc)
    dags.mkdir(exist_ok=True)
    shutil.copy(REPO / "dags" / "batchscore_deployments.py", dags)
    return dags, deployments


def stage_jobs(
    root: Path, mini_batches: int, script: str, jobs: dict[str, dict[str, Any]], *, instances: int, width: int = 3
) -> tuple[Path, Path]:
    """A job of one-file mini-batches per entry of ``jobs`` (DAG id -> settings), on shared inputs and code.

    Writes ``mini_batches`` files ``item-<i>.txt``, the scoring script, an empty model, one YAML
    per job (``mini_batch_size: 1`` plus its settings, ``instance_count: instances``) and a DAG
    folder with a copy of ``dags/batchscore_deployments.py``. Returns the DAG and deployments folders.
    """
    for name in ("inputs", "code", "model"):
        (root / name).mkdir()
    for i in range(mini_batches):
        (root / "inputs" / f"item-{i:0{width}d}.txt").write_text(f"{i}\n")
    (root / "code" / "score.py").write_text(script)
    docs = {
        dag_id: deployment_doc(
            dag_id,
            model=root / "model",
            code=root / "code",
            inputs=root / "inputs",
            output=root / "output" / dag_id if len(jobs) > 1 else root / "output",
            pattern="*.txt",
            settings={"mini_batch_size": 1, **settings},
            resources={"instance_count": instances},
        )
        for dag_id, settings in jobs.items()
    }
    return job_folders(root, docs)


def hardened_run_args(resources: Resources, user: str) -> list[str]:
    """``docker run`` options giving a container what the score operator gives its own.

    The same hardening (:func:`batchscore.security.host_config_options`), no network and the
    same user, so a container started here costs what a scoring container costs; labelled.
    """
    opts = security.host_config_options(resources)
    args = ["--rm", "--label", CONTAINER_LABEL, "--network", "none", "--user", user]
    args += ["--pids-limit", str(opts["pids_limit"])]
    args += [f"--cap-drop={c}" for c in opts["cap_drop"]]
    args += [f"--security-opt={o}" for o in opts["security_opt"]]
    args += ["--read-only"] if opts["read_only"] else []
    args += [f"--tmpfs={path}:{mode}" for path, mode in opts["tmpfs"].items()]
    return args


def remove_containers(label: str) -> None:
    """Remove (with force) every container that carries ``label`` (``key=value``); after a signal, say so."""
    found = subprocess.run(["docker", "ps", "-aq", "--filter", f"label={label}"], capture_output=True, text=True)
    if ids := found.stdout.split():
        subprocess.run(["docker", "rm", "-f", *ids], capture_output=True)
        shutdown.note(f"removed {len(ids)} container(s) labelled {label}")


def require_image(image: str = SCORING_IMAGE) -> None:
    """Fail with the command that builds ``image`` when it is missing (never pull)."""
    if subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode != 0:
        raise RuntimeError(f"image {image} does not exist; build it with `make images`")
