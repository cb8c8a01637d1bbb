"""A local Airflow left up for a person: ``python -m batchscore up`` (``make up``), and ``run --keep`` after its run.

It is the demo's stack (:class:`batchscore.localairflow.LocalAirflow`: api-server, scheduler, dag-processor and triggerer on
SQLite and the LocalExecutor, 127.0.0.1 only) started with a login: one admin user, ``admin``, whose password the
api-server generated on its first start in this home and keeps in ``simple_auth_manager_passwords.json.generated``
there (readable by its owner only). :func:`banner` says where it is and how to log in.

:func:`stay_up` waits until SIGINT (Ctrl-C), SIGTERM or SIGHUP (:mod:`batchscore.shutdown`), noting meanwhile the
runs triggered or cleared from the UI, so that the stop removes their containers too (warm workers, serving and
scoring containers): :meth:`LocalAirflow.stop` removes the containers of every run it knows of. A signal then is how
``up`` is meant to end: its exit status is 0; a component that exits on its own ends it with 1.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from batchscore import shutdown
from batchscore.localairflow import LOGIN_USER, LocalAirflow, LocalAirflowError

__all__ = ["ADOPT_EVERY_S", "banner", "stay_up", "up"]

#: Seconds between two looks for runs triggered or cleared from the UI.
ADOPT_EVERY_S = 5.0


def banner(airflow: LocalAirflow) -> str:
    """Where the stack is and how to log in (a stack started with ``login=True``)."""
    return "\n".join(
        [
            f"Airflow UI: {airflow.base_url}/",
            f"  login:    {LOGIN_USER}",
            f"  password: {airflow.login_password()}   (kept in {airflow.passwords_file})",
            "  Ctrl-C stops it, and removes the containers of the runs it ran",
        ]
    )


def stay_up(airflow: LocalAirflow, poll: float = ADOPT_EVERY_S) -> None:
    """Keep the stack up until a signal (:class:`batchscore.shutdown.Interrupted`) or until a component exits
    (:class:`LocalAirflowError`, with the tail of its log), noting the runs triggered or cleared meanwhile."""
    try:
        while True:
            airflow.check_alive()
            with contextlib.suppress(LocalAirflowError):  # the api-server busy: next time
                airflow.adopt_runs()
            shutdown.wait_unless_forced(poll)
    finally:  # one last look: a run triggered since the last one
        with contextlib.suppress(LocalAirflowError):
            airflow.adopt_runs()


def up(args: argparse.Namespace) -> int:
    """``python -m batchscore up``: start the local Airflow, say where it is and how to log in, wait for a signal."""
    airflow = LocalAirflow(Path(args.home).resolve(), Path(args.dags_folder).resolve(), port=args.port,
                           stop_grace=args.stop_grace, login=True)  # fmt: skip
    print(f"Starting Airflow (api-server, scheduler, dag-processor, triggerer) in {airflow.home} ...", flush=True)
    try:
        with airflow, shutdown.saying_what_stops("Airflow and the containers of its runs"):
            print(banner(airflow), flush=True)
            stay_up(airflow)
    except shutdown.Interrupted:
        shutdown.say(shutdown.report())
        return 0
    except LocalAirflowError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 1  # stay_up returns only by raising


def keep_up(airflow: LocalAirflow) -> None:
    """``run --keep``: after the run, keep its stack up as :func:`up` does, until a signal (which this returns on)."""
    print(f"\n{banner(airflow)}", flush=True)
    try:
        with shutdown.saying_what_stops("Airflow and the containers of its runs"):
            stay_up(airflow)
    except shutdown.Interrupted:
        return
