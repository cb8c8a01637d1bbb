"""``python -m bench [NAME ...]``: run the benchmarks (all by default), print each one's figures
and verdicts, a final table, and write every result as JSON (``bench/results/latest.json``).

    python -m bench                  # all but the opt-in scale and peers, about 16 minutes on 2 cores
    python -m bench merge skew       # some of them
    python -m bench --small skew     # tiny sizes: checks the code path, not the targets
    python -m bench peers --files 100 --rows 5000   # opt-in; needs `make bench-peers` (Ray Data)

The exit status is 0 when every selected benchmark ran (met targets or not), 1 when one failed.
SIGINT (Ctrl-C), SIGTERM and SIGHUP stop the running benchmark: its Airflow stack, services and
containers are stopped and removed, one line says so, and the exit status is 128 + the signal's
number; a second signal kills what is left at once (:mod:`batchscore.shutdown`).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

from batchscore import shutdown
from bench import celery, deferrable, intake, merge, orchestration, peers, planning, runtime, scale, skew, storage, warm
from bench.common import CONTAINER_LABEL, Result, machine, remove_containers, report, table, write_json

#: In the order they run: the quick ones first.
BENCHMARKS = {
    m.NAME: m for m in (skew, planning, merge, intake, runtime, orchestration, storage, warm, deferrable, celery, scale, peers)
}
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "latest.json"


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks, report them, write the JSON; the exit status (see above)."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"benchmarks to run: {', '.join(BENCHMARKS)} (default: all but the opt-in scale and peers)",
    )
    parser.add_argument("--small", "--quick", action="store_true", help="tiny sizes (a smoke test of the code path)")
    # A benchmark's own options (its OPTIONS: name -> (type, help)), passed only to the benchmarks that take them.
    options = {name: spec for m in BENCHMARKS.values() for name, spec in getattr(m, "OPTIONS", {}).items()}
    for option, (kind, text) in options.items():
        parser.add_argument(f"--{option.replace('_', '-')}", type=kind, help=text)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="the JSON results file")
    args = parser.parse_args(argv)
    shutdown.install()
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    # Opt-in ones (hours-long capacity checks, peers with its extra packages) run only when named.
    default = [n for n, m in BENCHMARKS.items() if not getattr(m, "OPT_IN", False)]
    selected = [n for n in BENCHMARKS if n in args.names] if args.names else default
    given = {o: v for o in options if (v := getattr(args, o)) is not None}
    if unused := [o for o in given if not any(o in getattr(BENCHMARKS[n], "OPTIONS", {}) for n in selected)]:
        parser.error(f"--{unused[0].replace('_', '-')} applies to none of the selected benchmarks ({', '.join(selected)})")
    # What a benchmark needs beyond the venv (its missing(): what to install, and how), before anything starts.
    if absent := [why for n in selected if (why := getattr(BENCHMARKS[n], "missing", lambda: None)())]:
        print("\n".join(absent), file=sys.stderr)
        return 1
    logging.getLogger("batchscore").setLevel(logging.WARNING)  # the planner's info lines are noise here

    results: list[Result] = []
    failed = False
    name = ""
    try:
        started = datetime.now(UTC)
        where = machine()
        print(
            f"batchscore benchmarks, {started:%Y-%m-%d %H:%M} UTC, {where['cpus']} CPUs, load {where['load']}, "
            f"{where['platform']}, Python {where['python']}, Docker {where['docker']}"
            + (" (--small: sizes too small for the targets to mean anything)" if args.small else ""),
            flush=True,
        )
        for name in selected:
            module = BENCHMARKS[name]
            t0 = time.perf_counter()
            try:
                own = {o: v for o, v in given.items() if o in getattr(module, "OPTIONS", {})}
                result = module.run(**{**(module.SMALL if args.small else {}), **own})
            except Exception:  # noqa: BLE001 - reported, and the other benchmarks still run
                failed = True
                result = Result(name, module.TITLE, notes=[f"failed: {traceback.format_exc()}"])
            finally:
                remove_containers(CONTAINER_LABEL)
            result.seconds = time.perf_counter() - t0
            results.append(result)
            print("\n" + report(result), flush=True)
    except shutdown.Interrupted as stopped:  # the benchmark's with and finally blocks stopped what it started
        during = f" during the benchmark {name}" if name else ""
        shutdown.say(shutdown.report().replace(": ", f"{during}: ", 1))
        return stopped.exit_status
    print("\n" + table(results))
    write_json(args.output, results, started, where)
    print(f"\nResults: {args.output}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
