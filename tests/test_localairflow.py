"""LocalAirflow against the real thing: api-server, scheduler, dag-processor and triggerer.

One stack per module (the ``stack`` fixture).  The probe dag maps over [1, 2, 3]; the instance for 2
fails until a marker file exists, so the test can "fix" it, clear just that
mapped instance through the REST API and watch the scheduler rerun it and the
all_done reduce -- and nothing else.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import psutil
import pytest

from batchscore.localairflow import LocalAirflow, LocalAirflowError

# Tests that start processes; the others are plain unit tests.
scheduler = pytest.mark.scheduler

DAG_ID = "localairflow_probe"

PROBE_DAG = """
from datetime import datetime
from pathlib import Path

from airflow.sdk import dag, task

MARKER = Path(__MARKER__)


@dag(dag_id=__DAG_ID__, schedule=None, start_date=datetime(2024, 1, 1), catchup=False)
def probe():
    @task
    def make():
        return [1, 2, 3]

    @task(retries=0)
    def square(x):
        if x == 2 and not MARKER.exists():
            raise RuntimeError("square(2) fails until the marker exists")
        return x * x

    # all_done: runs on partial results.  It must fail on them too, else this
    # leaf succeeds and with it the whole run, hiding the failed square.
    @task(trigger_rule="all_done")
    def total(values):
        values = list(values)  # a failed mapped instance leaves no value
        if len(values) != 3:
            raise RuntimeError(f"only {len(values)} of 3 squares")
        return sum(values)

    total(square.expand(x=make()))


probe()
"""


def _probe_dag(marker: Path) -> str:
    return PROBE_DAG.replace("__MARKER__", repr(str(marker))).replace("__DAG_ID__", repr(DAG_ID))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("localairflow")
    dags = root / "dags"
    dags.mkdir()
    marker = root / "square-fixed"
    (dags / "probe.py").write_text(_probe_dag(marker))
    (dags / "broken.py").write_text("from airflow.sdk import dag\nraise ValueError('broken on purpose')\n")
    af = LocalAirflow(root / "home", dags)
    t0 = time.monotonic()
    af.start()
    print(f"\nstack started in {time.monotonic() - t0:.1f}s on port {af.port}")
    try:
        yield {"af": af, "marker": marker}
    finally:
        af.stop()


def test_child_env_is_hermetic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AIRFLOW__CORE__UNIT_TEST_MODE", "True")
    monkeypatch.setenv("AIRFLOW_HOME", "/somewhere/else")
    monkeypatch.setenv("AIRFLOW_CONN_MY_DB", "sqlite:///x.db")
    af = LocalAirflow(tmp_path / "home", tmp_path / "dags", env={"AIRFLOW__CORE__PARALLELISM": "2"})
    env = af.child_env()
    assert "AIRFLOW__CORE__UNIT_TEST_MODE" not in env
    assert env["AIRFLOW_HOME"] == str(tmp_path / "home")
    assert env["AIRFLOW_CONN_MY_DB"] == "sqlite:///x.db"  # data, not configuration
    assert env["AIRFLOW__CORE__PARALLELISM"] == "2"  # env= wins
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == f"sqlite:///{tmp_path}/home/airflow.db"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == f"http://127.0.0.1:{af.port}/execution/"


def test_a_stack_with_a_login_says_when_its_password_is_missing(tmp_path: Path) -> None:
    af = LocalAirflow(tmp_path / "home", tmp_path / "dags", login=True)
    env = af.child_env()
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"] == "False"
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] == "admin:admin"
    file = tmp_path / "home" / "simple_auth_manager_passwords.json.generated"
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"] == str(file)
    without = LocalAirflow(tmp_path / "home", tmp_path / "dags").child_env()
    assert without["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"] == "True"
    with pytest.raises(LocalAirflowError) as err:
        af.login_password()
    assert str(err.value) == (
        f"local Airflow: no password of 'admin' in {file} ([Errno 2] No such file or directory: '{file}'); the api-server "
        "writes it when it starts in this home: stop Airflow, delete the file if it is there, and start Airflow again"
    )
    file.parent.mkdir()
    file.write_text('{"admin": "s3cret"}\n')
    assert af.login_password() == "s3cret"


def test_start_refuses_a_busy_port(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        af = LocalAirflow(tmp_path / "home", tmp_path / "dags", port=busy.getsockname()[1])
        with pytest.raises(LocalAirflowError, match="is not free"):
            af.start()
    assert af.procs == {}


@scheduler
def test_start_failure_shows_the_failing_log(tmp_path: Path) -> None:
    af = LocalAirflow(tmp_path / "home", tmp_path / "dags", env={"AIRFLOW__CORE__EXECUTOR": "no.such.Executor"})
    with pytest.raises(LocalAirflowError, match=r"scheduler exited") as err:
        af.start(timeout=120)
    assert "scheduler.log" in str(err.value)
    assert "no.such.Executor" in str(err.value)  # from the tail of the log
    assert af.procs == {}  # the other components were stopped


def _by_key(tis: list[dict]) -> dict[tuple[str, int], dict]:
    return {(ti["task_id"], ti["map_index"]): ti for ti in tis}


@scheduler
def test_import_errors_are_reported(stack: dict) -> None:
    af: LocalAirflow = stack["af"]
    af.wait_for_dag(DAG_ID)
    deadline = time.monotonic() + 60
    while not (errors := af.import_errors()) and time.monotonic() < deadline:
        time.sleep(1)
    assert any(e["filename"].endswith("broken.py") and "broken on purpose" in e["stack_trace"] for e in errors), errors


@scheduler
def test_clear_one_failed_mapped_instance_reruns_only_it(stack: dict) -> None:
    af: LocalAirflow = stack["af"]
    dag = af.wait_for_dag(DAG_ID)
    assert dag["is_paused"] is False

    t0 = time.monotonic()
    run_id = af.trigger(DAG_ID, conf={"note": "probe"})
    assert af.wait_for_run(DAG_ID, run_id, timeout=240) == "failed"
    print(f"\nfirst run finished (failed) {time.monotonic() - t0:.1f}s after trigger")

    first = _by_key(af.task_instances(DAG_ID, run_id))
    assert {k: ti["state"] for k, ti in first.items()} == {
        ("make", -1): "success",
        ("square", 0): "success",
        ("square", 1): "failed",
        ("square", 2): "success",
        ("total", -1): "failed",
    }
    assert "square(2) fails until the marker exists" in af.task_log(
        DAG_ID, run_id, "square", map_index=1, try_number=first[("square", 1)]["try_number"]
    )
    assert "only 2 of 3 squares" in af.task_log(DAG_ID, run_id, "total")

    stack["marker"].touch()
    t1 = time.monotonic()
    cleared = af.clear(DAG_ID, run_id, [("square", 1)])
    assert sorted((ti["task_id"], ti["map_index"]) for ti in cleared) == [("square", 1), ("total", -1)]
    assert af.wait_for_run(DAG_ID, run_id, timeout=240) == "success"
    print(f"rerun after clear succeeded {time.monotonic() - t1:.1f}s after clear")

    second = _by_key(af.task_instances(DAG_ID, run_id))
    assert all(ti["state"] == "success" for ti in second.values()), second
    for key in [("make", -1), ("square", 0), ("square", 2)]:
        assert second[key]["try_number"] == first[key]["try_number"], key  # not rerun
    for key in [("square", 1), ("total", -1)]:
        assert second[key]["try_number"] == first[key]["try_number"] + 1, key  # rerun
    total = af.api(
        "GET",
        f"/api/v2/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}/taskInstances/total/xcomEntries/return_value",
    )
    assert total["value"] == 1 + 4 + 9

    # With the fix in place a fresh run succeeds at once.
    t2 = time.monotonic()
    assert af.wait_for_run(DAG_ID, af.trigger(DAG_ID), timeout=240) == "success"
    print(f"a fresh run succeeded {time.monotonic() - t2:.1f}s after trigger")


@scheduler
def test_api_errors_are_clear(stack: dict) -> None:
    af: LocalAirflow = stack["af"]
    with pytest.raises(LocalAirflowError, match="HTTP 404"):
        af.trigger("no_such_dag")


@scheduler
def test_stop_leaves_no_process(stack: dict) -> None:
    af: LocalAirflow = stack["af"]
    pids = af.pids()
    assert len(pids) >= 4
    assert af.procs["triggerer"].pid in pids  # deferred tasks' triggers run (settings.deferrable); it is stopped too
    af.stop()
    af.stop()  # idempotent

    def running(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    assert [pid for pid in pids if running(pid)] == []
