"""``python -m bench [NAME ...]``: run the benchmarks (all by default), print each one's figures
and verdicts, a final table, and write every result as JSON (``bench/results/latest.json``).

    python -m bench                  # all but the opt-in scale, about 16 minutes on 2 cores
    python -m bench merge skew       # some of them
    python -m bench --small skew     # tiny sizes: checks the code path, not the targets

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
from bench import celery, intake, merge, orchestration, planning, runtime, scale, skew, storage, warm
from bench.common import CONTAINER_LABEL, Result, machine, remove_containers, report, table, write_json

#: In the order they run: the quick ones first.
BENCHMARKS = {m.NAME: m for m in (skew, planning, merge, intake, runtime, orchestration, storage, warm, celery, scale)}
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "latest.json"


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks, report them, write the JSON; the exit status (see above)."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"benchmarks to run: {', '.join(BENCHMARKS)} (default: all but the opt-in scale)"
    )
    parser.add_argument("--small", action="store_true", help="tiny sizes (a smoke test of the code path)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="the JSON results file")
    args = parser.parse_args(argv)
    shutdown.install()
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    # Opt-in ones (hours-long capacity checks) run only when named.
    default = [n for n, m in BENCHMARKS.items() if not getattr(m, "OPT_IN", False)]
    selected = [n for n in BENCHMARKS if n in args.names] if args.names else default
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
                result = module.run(**(module.SMALL if args.small else {}))
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
