"""``python -m batchscore``: run a deployment's DAG on a local Airflow, or check YAML files.

    python -m batchscore run iris-batch          # api-server + scheduler + dag-processor, one run
    python -m batchscore demo-s3                 # the same on a local S3 server (batchscore.demo_s3)
    python -m batchscore check dags/deployments  # load YAML files exactly as the DAG file does

SIGINT (Ctrl-C), SIGTERM and SIGHUP stop ``run`` cleanly (:mod:`batchscore.shutdown`): the Airflow
components and every process they started, then every container of the run (warm workers,
serving and scoring containers); one line says what was stopped, and the exit status is 128 + the
signal's number (130 for Ctrl-C). A second signal during that shutdown kills what is left at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from batchscore import shutdown
from batchscore.errors import BatchScoreError, DeploymentSpecError
from batchscore.factory import find_yaml_files, load_folder
from batchscore.run_params import apply_run_params
from batchscore.run_store import place
from batchscore.spec import EndpointSpec, load_endpoint
from batchscore_runtime.formats import Summary


def _endpoint(deployments: Path, dag_id: str) -> EndpointSpec:
    for path in find_yaml_files(deployments):
        try:
            endpoint = load_endpoint(path)
        except DeploymentSpecError:
            continue
        if endpoint.dag_id == dag_id:
            return endpoint
    raise SystemExit(f"no valid deployment YAML in {deployments} defines endpoint {dag_id!r}")


def _progress(tis: list[dict]) -> str:
    counts: dict[str, int] = {}
    for ti in tis:
        state = ti.get("state") or "not started"
        counts[state] = counts.get(state, 0) + 1
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))


def run(args: argparse.Namespace) -> int:
    from batchscore.localairflow import LocalAirflow, LocalAirflowError

    dags_folder = Path(args.dags_folder).resolve()
    deployments = Path(os.environ.get("BATCHSCORE_DEPLOYMENTS_DIR", dags_folder / "deployments"))
    endpoint = _endpoint(deployments, args.dag_id)
    airflow = LocalAirflow(Path(args.home).resolve(), dags_folder, stop_grace=args.stop_grace)
    print(f"Starting Airflow (api-server, scheduler, dag-processor) in {airflow.home} ...", flush=True)
    # Leaving the block stops the components, every process they started and the run's containers.
    with airflow, _saying_what_stops():
        print(f"Airflow is up at {airflow.base_url}; waiting for DAG {args.dag_id} to be parsed ...", flush=True)
        try:
            airflow.wait_for_dag(args.dag_id)
        except LocalAirflowError as exc:
            for err in airflow.import_errors():
                print(f"import error in {err.get('filename')}:\n{err.get('stack_trace')}", file=sys.stderr)
            print(exc, file=sys.stderr)
            return 1
        run_id = airflow.trigger(args.dag_id, conf=json.loads(args.conf) if args.conf else None)
        print(f"Triggered run {run_id}", flush=True)
        deadline = time.monotonic() + args.timeout
        last = ""
        while True:
            state = airflow.dag_run(args.dag_id, run_id)["state"]
            line = _progress(airflow.task_instances(args.dag_id, run_id))
            if line != last:
                print(f"  {state}: {line}", flush=True)
                last = line
            if state in ("success", "failed"):
                break
            if time.monotonic() > deadline:
                print(f"run {run_id} still {state} after {args.timeout} s", file=sys.stderr)
                return 1
            time.sleep(2)
        if state == "failed":
            for ti in airflow.task_instances(args.dag_id, run_id):
                if ti.get("state") == "failed":
                    label = ti.get("rendered_map_index") or ti["task_id"]
                    print(f"\nFailed: {ti['task_id']} {label}", file=sys.stderr)
                    log = airflow.task_log(
                        args.dag_id,
                        run_id,
                        ti["task_id"],
                        map_index=ti.get("map_index", -1),
                        try_number=max(1, ti.get("try_number") or 1),
                    )
                    print("\n".join(log.splitlines()[-15:]), file=sys.stderr)
    print(f"\nRun {run_id} of {args.dag_id}: {state}")
    conf = json.loads(args.conf) if args.conf else {}
    for deployment in endpoint.deployments:
        try:  # where this run wrote: the YAML's output folder, or the one its conf chose
            deployment = apply_run_params(deployment, conf, several_deployments=len(endpoint.deployments) > 1)
        except BatchScoreError:
            pass  # the plan task refused the conf and said why above
        placement = place(deployment, run_id)  # the run folder may be on object storage
        summary = placement.read_summary()
        if summary is not None:
            print(
                f"  {deployment.name}: {summary.status}, {summary.rows} rows, "
                f"{summary.mini_batches.succeeded}/{summary.mini_batches.total} mini-batches, "
                f"{summary.items.failed} failed items"
            )
            own = ".out files" if summary.contract == "serve" else "custom outputs"
            if summary.busy_fraction is not None:
                print(f"    busy:    {summary.busy_fraction:.0%} of the workers' time while scoring ({_busy(summary)})")
            print(f"    output:  {summary.output or f'(summary_only: {own} in the run folder)'}")
            print(f"    summary: {placement.summary_location()}")
            print(f"    ledger:  {summary.ledger}")
            if summary.items.failed:
                print(f"    errors:  {summary.errors}")
        else:
            print(f"  {deployment.name}: no summary in {placement.where()}")
    return 0 if state == "success" else 1


def _busy(summary: Summary) -> str:
    """Who was busy how long, for the busy fraction's line: each warm worker, or the containers together."""
    if summary.warm_workers:
        return ", ".join(
            f"{w.worker} {w.busy_seconds:.1f} s on {len(w.mini_batches)} mini-batch(es)" for w in summary.warm_workers
        )
    return f"a container per mini-batch, {summary.durations.scoring_wall_seconds} s of scoring wall time"


@contextlib.contextmanager
def _saying_what_stops() -> Iterator[None]:
    """After a signal, say what is about to stop: it may take the stop grace."""
    try:
        yield
    except shutdown.Interrupted:
        shutdown.say(
            f"{shutdown.signal_name()}: stopping Airflow and the run's containers (a second signal kills them at once) ..."
        )
        raise


def demo_s3(args: argparse.Namespace) -> int:
    """``run`` of the iris example with its model, inputs and output on a local S3 server (:mod:`batchscore.demo_s3`)."""
    from batchscore.demo_s3 import s3_demo

    home = Path(args.home).resolve()
    source = Path(args.dags_folder) / "deployments" / f"{args.dag_id}.yaml"
    if not source.is_file():
        raise SystemExit(f"no deployment YAML {source}: run demo-s3 from the project's folder, or give --dags-folder")
    with s3_demo(home, source) as demo:
        status = run(argparse.Namespace(**{**vars(args), "home": str(home / "airflow"), "conf": None}))
        print(f"\n{demo.describe_output()}")
        if args.keep:
            demo.write_env_file()
            print(f"\n{demo.how_to_list()}", flush=True)
            demo.wait()
        else:
            print("\nThe S3 server stops now. To keep it up after the run and look at the output: make demo-s3 KEEP=1 "
                  "(python -m batchscore demo-s3 --keep)")  # fmt: skip
    return status


def check(args: argparse.Namespace) -> int:
    """Load the folder exactly as the DAG file does (:func:`batchscore.factory.load_folder`); print each file."""
    failed = 0
    for loaded in load_folder(Path(args.folder)):
        if loaded.error is not None:
            failed += 1
            print(f"FAIL {loaded.error}")
        else:
            endpoint = loaded.endpoint
            assert endpoint is not None, "a file that loaded has its endpoint"
            print(f"ok   {loaded.path}: endpoint {endpoint.dag_id}, {len(endpoint.deployments)} deployment(s)")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    shutdown.install()  # first thing: a signal from now on stops what was started, and says so
    parser = argparse.ArgumentParser(prog="python -m batchscore", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run one DAG on a local Airflow (SQLite, LocalExecutor) and wait")
    p_run.add_argument("dag_id")
    p_run.add_argument("--dags-folder", default="dags")
    p_run.add_argument("--home", default=".airflow", help="AIRFLOW_HOME of the local Airflow")
    p_run.add_argument("--conf", help="the run's conf, as JSON")
    p_run.add_argument("--timeout", type=float, default=1800)
    p_run.add_argument(
        "--stop-grace", type=float, default=20, metavar="SECONDS",
        help="after a signal, how long Airflow's processes get to end before they are killed (default 20)",
    )  # fmt: skip
    p_run.set_defaults(func=run)
    p_demo = sub.add_parser("demo-s3", help="run the iris example with its model, input and output on a local S3 server")
    p_demo.add_argument("--dags-folder", default="dags")
    p_demo.add_argument("--home", default=".airflow-s3", help="the demo's folder: the S3 server's data, the YAML, Airflow's home")
    p_demo.add_argument("--timeout", type=float, default=1800)
    p_demo.add_argument("--stop-grace", type=float, default=20, metavar="SECONDS", help="as for run")
    p_demo.add_argument("--keep", action="store_true", help="keep the S3 server up after the run, until Ctrl-C")
    p_demo.set_defaults(func=demo_s3, dag_id="iris-batch")
    p_check = sub.add_parser("check", help="validate the deployment YAML files of a folder")
    p_check.add_argument("folder", nargs="?", default="dags/deployments")
    p_check.set_defaults(func=check)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except shutdown.Interrupted as stopped:
        shutdown.say(shutdown.report())
        return stopped.exit_status


if __name__ == "__main__":
    sys.exit(main())
