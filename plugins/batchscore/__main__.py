"""``python -m batchscore``: run a DAG on a local Airflow (or keep one up), check YAML files, import a SageMaker job.

    python -m batchscore run iris-batch          # api-server + scheduler + dag-processor + triggerer, one run
    python -m batchscore run iris-batch --keep   # the same, and Airflow stays up after the run until Ctrl-C
    python -m batchscore up                      # the same Airflow, left up (URL and login printed) until Ctrl-C
    python -m batchscore demo-s3                 # the same on a local S3 server (batchscore.demo_s3)
    python -m batchscore check dags/deployments  # load YAML files exactly as the DAG file does
    python -m batchscore import-transform-job job.json --model model.json -o job.yaml  # from SageMaker

SIGINT (Ctrl-C), SIGTERM and SIGHUP stop ``run`` cleanly (:mod:`batchscore.shutdown`): the Airflow
components and every process they started, then every container of the run (warm workers,
serving and scoring containers); one line says what was stopped, and the exit status is 128 + the
signal's number (130 for Ctrl-C). A second signal during that shutdown kills what is left at once.
``up`` and ``run --keep`` (:mod:`batchscore.local_up`) are meant to end by a signal: the same stop, and
``up`` exits 0, ``run --keep`` with its run's status. ``run`` shows a progress line (:mod:`batchscore.progress`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from batchscore import shutdown
from batchscore.errors import BatchScoreError, DeploymentSpecError
from batchscore.factory import find_yaml_files, load_folder
from batchscore.progress import ProgressDisplay, ProgressReader
from batchscore.run_params import apply_run_params
from batchscore.run_store import place
from batchscore.spec import DeploymentSpec, EndpointSpec, load_endpoint
from batchscore_runtime.formats import Summary

if TYPE_CHECKING:
    from batchscore.localairflow import LocalAirflow


def _endpoint(deployments: Path, dag_id: str) -> EndpointSpec:
    for path in find_yaml_files(deployments):
        try:
            endpoint = load_endpoint(path)
        except DeploymentSpecError:
            continue
        if endpoint.dag_id == dag_id:
            return endpoint
    raise SystemExit(f"no valid deployment YAML in {deployments} defines endpoint {dag_id!r}")


def _deployments(endpoint: EndpointSpec, conf: dict) -> list[DeploymentSpec]:
    """The endpoint's deployments as a run with ``conf`` sees them (its output folder, or the one its conf chose)."""
    found = []
    for deployment in endpoint.deployments:
        try:
            deployment = apply_run_params(deployment, conf, several_deployments=len(endpoint.deployments) > 1)
        except BatchScoreError:
            pass  # the plan task refuses the conf and says why
        found.append(deployment)
    return found


def run(args: argparse.Namespace) -> int:
    from batchscore.localairflow import LocalAirflow, LocalAirflowError

    dags_folder = Path(args.dags_folder).resolve()
    deployments = Path(os.environ.get("BATCHSCORE_DEPLOYMENTS_DIR", dags_folder / "deployments"))
    endpoint = _endpoint(deployments, args.dag_id)
    conf = json.loads(args.conf) if args.conf else {}
    keep = getattr(args, "keep", False)
    airflow = LocalAirflow(Path(args.home).resolve(), dags_folder, stop_grace=args.stop_grace, login=keep)
    print(f"Starting Airflow (api-server, scheduler, dag-processor, triggerer) in {airflow.home} ...", flush=True)
    # Leaving the block stops the components, every process they started and the run's containers.
    with airflow, shutdown.saying_what_stops("Airflow and the run's containers"):
        print(f"Airflow is up at {airflow.base_url}; waiting for DAG {args.dag_id} to be parsed ...", flush=True)
        try:
            airflow.wait_for_dag(args.dag_id)
        except LocalAirflowError as exc:
            for err in airflow.import_errors():
                print(f"import error in {err.get('filename')}:\n{err.get('stack_trace')}", file=sys.stderr)
            print(exc, file=sys.stderr)
            return 1
        run_id = airflow.trigger(args.dag_id, conf=conf or None)
        print(f"Triggered run {run_id}", flush=True)
        state = _follow(airflow, args, run_id, ProgressReader(airflow, args.dag_id, run_id, _deployments(endpoint, conf)))
        if state is None:
            return 1
        if state == "failed":
            _show_failures(airflow, args.dag_id, run_id)
        _show_summaries(args.dag_id, run_id, state, _deployments(endpoint, conf))
        if keep:
            from batchscore.local_up import keep_up

            keep_up(airflow)
    if shutdown.interrupted():  # --keep ended by a signal, as it is meant to
        shutdown.say(shutdown.report())
    return 0 if state == "success" else 1


def _follow(airflow: LocalAirflow, args: argparse.Namespace, run_id: str, reader: ProgressReader) -> str | None:
    """Show the progress line until the run ends; its final state, or ``None`` after ``--timeout``."""
    display = ProgressDisplay()
    deadline = time.monotonic() + args.timeout
    try:
        while True:
            state = airflow.dag_run(args.dag_id, run_id)["state"]
            progress = reader.read()
            if state in ("success", "failed"):
                display.show(progress, final=True)
                return state
            display.show(progress)
            if time.monotonic() > deadline:
                display.interrupt()
                print(f"run {run_id} still {state} after {args.timeout} s", file=sys.stderr)
                return None
            time.sleep(2)
    except BaseException:
        display.interrupt()  # the terminal line ends before the stop says why
        raise


def _show_failures(airflow: LocalAirflow, dag_id: str, run_id: str) -> None:
    """The last lines of the log of each failed task instance."""
    for ti in airflow.task_instances(dag_id, run_id):
        if ti.get("state") == "failed":
            label = ti.get("rendered_map_index") or ti["task_id"]
            print(f"\nFailed: {ti['task_id']} {label}", file=sys.stderr)
            log = airflow.task_log(
                dag_id, run_id, ti["task_id"], map_index=ti.get("map_index", -1), try_number=max(1, ti.get("try_number") or 1)
            )
            print("\n".join(log.splitlines()[-15:]), file=sys.stderr)


def _show_summaries(dag_id: str, run_id: str, state: str, deployments: list[DeploymentSpec]) -> None:
    """Where each deployment's output, summary, ledger and errors are."""
    print(f"\nRun {run_id} of {dag_id}: {state}")
    for deployment in deployments:
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
            print(f"  {deployment.name}: no summary in {placement.where()}", flush=True)


def _busy(summary: Summary) -> str:
    """Who was busy how long, for the busy fraction's line: each warm worker, or the containers together."""
    if summary.warm_workers:
        return ", ".join(
            f"{w.worker} {w.busy_seconds:.1f} s on {len(w.mini_batches)} mini-batch(es)" for w in summary.warm_workers
        )
    return f"a container per mini-batch, {summary.durations.scoring_wall_seconds} s of scoring wall time"


def demo_s3(args: argparse.Namespace) -> int:
    """``run`` of the iris example with its model, inputs and output on a local S3 server (:mod:`batchscore.demo_s3`)."""
    from batchscore.demo_s3 import s3_demo

    home = Path(args.home).resolve()
    source = Path(args.dags_folder) / "deployments" / f"{args.dag_id}.yaml"
    if not source.is_file():
        raise SystemExit(f"no deployment YAML {source}: run demo-s3 from the project's folder, or give --dags-folder")
    with s3_demo(home, source) as demo:
        status = run(argparse.Namespace(**{**vars(args), "home": str(home / "airflow"), "conf": None, "keep": False}))
        print(f"\n{demo.describe_output()}")
        if args.keep:
            demo.write_env_file()
            print(f"\n{demo.how_to_list()}", flush=True)
            demo.wait()
        else:
            print("\nThe S3 server stops now. To keep it up after the run and look at the output: make demo-s3 KEEP=1 "
                  "(python -m batchscore demo-s3 --keep)")  # fmt: skip
    return status


def _up(args: argparse.Namespace) -> int:
    from batchscore.local_up import up

    return up(args)


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


def import_transform_job(args: argparse.Namespace) -> int:
    """A deployment YAML from SageMaker's CreateTransformJob (and CreateModel) request (:mod:`batchscore.import_sagemaker`)."""
    from batchscore import import_sagemaker

    output = Path(args.output) if args.output else None
    return import_sagemaker.main(
        Path(args.request), Path(args.model) if args.model else None, output, args.connection, sys.stderr
    )


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
    p_run.add_argument("--keep", action="store_true", help="leave Airflow up after the run, as `up` does, until Ctrl-C")
    p_run.set_defaults(func=run)
    p_up = sub.add_parser("up", help="start the local Airflow of the demo and leave it up (URL and login printed) until Ctrl-C")
    p_up.add_argument("--dags-folder", default="dags")
    p_up.add_argument("--home", default=".airflow", help="AIRFLOW_HOME of the local Airflow (the demo's by default)")
    p_up.add_argument("--port", type=int, help="the port of the UI and API on 127.0.0.1 (default: a free one)")
    p_up.add_argument("--stop-grace", type=float, default=20, metavar="SECONDS", help="as for run")
    p_up.set_defaults(func=_up)
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
    p_import = sub.add_parser(
        "import-transform-job",
        help="write a deployment YAML from a SageMaker CreateTransformJob request (and its CreateModel request)",
        description="Write a deployment YAML (contract: serve) from a SageMaker CreateTransformJob request; list "
        "every field not carried over, with the reason, on stderr and at the top of the YAML. Exit status 2 when "
        "a file cannot be imported.",
    )
    p_import.add_argument("request", help="the CreateTransformJob request, as JSON (or describe-transform-job's answer)")
    p_import.add_argument("--model", metavar="CREATE_MODEL.json", help="the CreateModel request of the job's ModelName")
    p_import.add_argument("-o", "--output", metavar="OUT.yaml", help="where to write the YAML (default: stdout)")
    p_import.add_argument("--connection", metavar="CONN_ID", help="the Airflow connection for the s3:// URIs")
    p_import.set_defaults(func=import_transform_job)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except shutdown.Interrupted as stopped:
        shutdown.say(shutdown.report())
        return stopped.exit_status


if __name__ == "__main__":
    sys.exit(main())
