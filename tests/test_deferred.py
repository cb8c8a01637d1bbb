"""Deferrable score tasks (``settings.deferrable``): the mini-batch is handed to a warm worker, the task defers.

Real containers, a real scheduler and triggerer (:class:`batchscore.localairflow.LocalAirflow`), and
``dag.test()``, which runs a deferred task's trigger in its own process: results, retries and the
ledger are those of a task that does not defer.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from batchscore.errors import DeploymentSpecError
from batchscore.scoring.handover import read_record
from batchscore_runtime.formats import Summary, run_key
from tests.helpers import assert_busy_sane, load, run_dag, script_deployment, warm_iris_deployment
from tests.test_rerun import FLAKY_SCRIPT  # fails on iris-005.csv until a file "fixed" appears next to the model
from tests.test_warm import COUNTING_SCRIPT, _expected, _stage, worker_containers

pytestmark = pytest.mark.docker


def test_a_deferred_run_scores_every_row_in_order_and_each_task_deferred(
    airflow_db, iris_example: Path, tmp_path: Path, monkeypatch, capfd
) -> None:
    settings = {"mini_batch_size": 2, "deferrable": True}
    path = warm_iris_deployment(tmp_path, iris_example, COUNTING_SCRIPT, settings, instance_count=2)

    dag_run, endpoint = run_dag(path, monkeypatch)

    deployment = endpoint.deployments[0]
    log = capfd.readouterr().out
    assert dag_run.state == "success"
    run_dir = deployment.output.path / run_key(dag_run.run_id)
    predictions = pd.read_csv(run_dir / "predictions.csv")
    pd.testing.assert_frame_equal(predictions[["file", "id"]], _expected(iris_example))  # every row, in order
    assert set(predictions["init_calls"]) == {1}  # warm: the workers' init() once each
    assert log.count("Deferring until worker w") == 8  # 15 files, 2 a mini-batch: each task deferred
    assert log.count("had taken the mini-batch") == 8  # and came back to take its result in
    summary = Summary.read(run_dir / "summary.json")
    assert summary.status == "succeeded"
    assert_busy_sane(summary, scored=8)
    assert list((run_dir / "_batchscore" / "scratch").glob("*/*.handover")) == []  # each record read and removed
    assert worker_containers(endpoint.endpoint_name, deployment.name, dag_run.run_id) == []


def test_deferrable_needs_warm_workers(tmp_path: Path) -> None:
    path = script_deployment(
        tmp_path,
        COUNTING_SCRIPT,
        model=tmp_path / "code",
        inputs=tmp_path,
        settings={"worker_mode": "per_mini_batch", "deferrable": True},
    )
    with pytest.raises(DeploymentSpecError) as info:
        load(path)
    assert (
        "settings: settings.deferrable: true needs settings.worker_mode: warm (a container per mini-batch has no worker to hand "
        "the mini-batch to); set worker_mode: warm, or remove deferrable"
    ) in str(info.value)


def test_the_record_of_a_hand_over_keeps_log_lines_apart_from_the_protocol(tmp_path: Path) -> None:
    record = tmp_path / "mb-00001.1.handover"
    record.write_text(
        'BATCHSCORE-WARM {"queued": true, "ahead": 1}\n'
        'BATCHSCORE-WARM {"accepted": true, "at": 12.5}\n'
        '| BATCHSCORE-WARM {"done": 0}\n'  # a line the scoring script printed: never the protocol's
        "| scoring\n"
        'BATCHSCORE-WARM {"exit": 1}\n'
        'BATCHSCORE-WARM {"done": 1'  # not written whole yet
    )
    said = read_record(record)
    assert said.queued and said.accepted and said.accepted_at == 12.5
    assert said.lines == ['BATCHSCORE-WARM {"done": 0}', "scoring"]
    assert (said.exit_code, said.done) == (1, None)
    with record.open("a") as f:
        f.write("}\n")
    assert read_record(record).done == 1


def test_a_record_the_container_replaced_by_a_link_is_not_read_through(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text('BATCHSCORE-WARM {"done": 0}\nthe host\'s secret\n')
    record = tmp_path / "scratch" / "mb-00001.1.handover"
    record.parent.mkdir()
    record.symlink_to(secret)  # what a scoring script can do in its scratch folder
    said = read_record(record)
    assert said.done == 70  # ends the hand-over as lost, not as the link's "done 0"
    assert said.refused == said.lines[0]  # the resumed task fails the try with it (ResultRejected)
    assert said.lines == [
        f"batchscore refused the hand-over record {record.name}: [Errno 40] Too many levels of symbolic links: '{record}'"
    ]


@pytest.mark.scheduler
def test_on_a_real_scheduler_tasks_defer_and_a_failing_mini_batch_is_retried(iris_example: Path, tmp_path: Path) -> None:
    from batchscore.localairflow import LocalAirflow

    model, deployment, dags, env = _stage(
        tmp_path,
        FLAKY_SCRIPT,
        {"mini_batch_size": 3, "deferrable": True, "retry_settings": {"max_retries": 1}},
        "deferred",
        resources={"instance_count": 2},
    )
    seen: set[str] = set()

    def fix_when_retried(airflow: LocalAirflow, run_id: str) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            for t in airflow.task_instances("deferred", run_id):
                if t["task_id"] == "test-deployment.score":
                    seen.add(str(t["state"]))
                    if t["map_index"] == 1 and t["state"] == "up_for_retry":
                        (model / "fixed").touch()
            if (model / "fixed").exists() and "deferred" in seen:
                return
            time.sleep(0.2)

    with LocalAirflow(tmp_path / "airflow", dags, env=env) as airflow:
        airflow.wait_for_dag("deferred")
        run_id = airflow.trigger("deferred")
        watcher = threading.Thread(target=fix_when_retried, args=(airflow, run_id), daemon=True)
        watcher.start()
        assert airflow.wait_for_run("deferred", run_id, timeout=420) == "success"
        watcher.join(timeout=5)
        tis = {(t["task_id"], t["map_index"]): t for t in airflow.task_instances("deferred", run_id)}
        first_try = airflow.task_log("deferred", run_id, "test-deployment.score", map_index=1, try_number=1)
        second_try = airflow.task_log("deferred", run_id, "test-deployment.score", map_index=1, try_number=2)
        other = airflow.task_log("deferred", run_id, "test-deployment.score", map_index=0, try_number=1)

    assert "deferred" in seen  # the REST API saw score tasks in state deferred
    assert "Deferring until worker w" in other and "had taken the mini-batch" in other
    assert tis[("test-deployment.score", 1)]["try_number"] == 2  # iris-003..005: the only one retried
    assert all(tis[("test-deployment.score", i)]["try_number"] == 1 for i in (0, 2, 3, 4))
    assert "mb-00001 failed: RuntimeError: upstream service unavailable" in first_try
    assert "Deferring until worker w" in second_try
    run_dir = deployment.output.path / run_key(run_id)
    merged = pd.read_csv(run_dir / "predictions.csv")
    pd.testing.assert_frame_equal(merged[["file", "id"]], _expected(iris_example))  # every row once, in order
    ledger = pd.read_csv(run_dir / "processed_mini-batches.csv", keep_default_na=False)
    row = ledger[ledger["mini_batch"] == "mb-00001"].iloc[0]
    assert (row["status"], row["attempts"]) == ("succeeded", 2)
    assert Summary.read(run_dir / "summary.json").status == "succeeded"
    assert worker_containers("deferred", deployment.name, run_id) == []


@pytest.mark.scheduler
def test_a_deferred_mini_batch_in_the_queue_of_a_worker_that_dies_goes_to_its_replacement_in_the_same_try(
    iris_example: Path, tmp_path: Path
) -> None:
    import json
    import subprocess

    from batchscore.localairflow import LocalAirflow
    from batchscore.scoring.workers import run_digest
    from tests.test_warm_busy import GATED_SCRIPT  # iris-000.csv waits for a file "go" next to the script

    _, deployment, dags, env = _stage(
        tmp_path,
        GATED_SCRIPT,
        {"mini_batch_size": 5, "deferrable": True, "retry_settings": {"max_retries": 1}},
        "requeue",
        resources={"instance_count": 1},
    )
    queued: list[int] = []  # the mini-batch that waited in the queue when its worker was killed

    def kill_with_one_queued(run_id: str) -> None:
        scratch = deployment.output.path / run_key(run_id) / "_batchscore" / "scratch" / "w1"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            said = {int(p.name[3:8]): read_record(p) for p in scratch.glob("mb-*.try-1.handover")}
            waiting = [i for i, r in said.items() if r.queued and r.answer is None]
            if 0 in said and said[0].accepted and waiting:  # the gated one scores, another waits behind it
                name = f"batchscore-{run_digest('requeue', deployment.name, run_id)}-w1"
                subprocess.run(["docker", "kill", name], check=True, capture_output=True)
                queued.append(waiting[0])
                (tmp_path / "code" / "go").touch()  # the retry of the gated one may end
                return
            time.sleep(0.1)

    with LocalAirflow(tmp_path / "airflow", dags, env=env) as airflow:
        airflow.wait_for_dag("requeue")
        run_id = airflow.trigger("requeue")
        killer = threading.Thread(target=kill_with_one_queued, args=(run_id,), daemon=True)
        killer.start()
        assert airflow.wait_for_run("requeue", run_id, timeout=420) == "success"
        killer.join(timeout=5)
        tis = {(t["task_id"], t["map_index"]): t for t in airflow.task_instances("requeue", run_id)}
        logs = {i: airflow.task_log("requeue", run_id, "test-deployment.score", map_index=i, try_number=1) for i in (0, 1, 2)}

    assert queued, "no mini-batch ever waited in the worker's queue behind mb-00000"
    k = queued[0]
    assert tis[("test-deployment.score", 0)]["try_number"] == 2  # the one it scored: failed, retried
    assert "mb-00000 failed: WarmWorkerDied: worker w1 ended while scoring mb-00000" in logs[0]
    assert tis[("test-deployment.score", k)]["try_number"] == 1  # the queued one never started: the same try
    assert f"mb-0000{k}: worker w1 let it go from its queue before it started" in logs[k]
    assert logs[k].count("Deferring until worker w1") == 2  # handed over again, to the replacement
    run_dir = deployment.output.path / run_key(run_id)
    merged = pd.read_csv(run_dir / "predictions.csv")
    pd.testing.assert_frame_equal(merged[["file", "id"]], _expected(iris_example))  # every row once, in order
    ledger = pd.read_csv(run_dir / "processed_mini-batches.csv", keep_default_na=False)
    attempts = {row["mini_batch"]: (row["status"], row["attempts"]) for _, row in ledger.iterrows()}
    assert attempts == {"mb-00000": ("succeeded", 2), "mb-00001": ("succeeded", 1), "mb-00002": ("succeeded", 1)}  # once each
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "succeeded"


#: Waits in run() while its mini-batch has iris-000.csv and no file "go" is next to the script, or iris-010.csv and no "go2".
TWO_GATES_SCRIPT = """
import os, time
import pandas as pd

def init():
    pass

def run(mini_batch):
    names = [os.path.basename(p) for p in mini_batch]
    here = os.path.dirname(os.path.abspath(__file__))
    gates = {"iris-000.csv": "go", "iris-010.csv": "go2"}
    while any(name in names and not os.path.exists(os.path.join(here, gate)) for name, gate in gates.items()):
        time.sleep(0.1)
    rows = [pd.read_csv(p).assign(file=os.path.basename(p)) for p in mini_batch]
    return pd.concat(rows, ignore_index=True)[["file", "id"]]
"""


@pytest.mark.scheduler
def test_a_deferred_task_cleared_then_marked_failed_stops_its_mini_batch_on_its_worker(
    iris_example: Path, tmp_path: Path
) -> None:
    """Airflow's REST API with a user's token, as the UI: a clear, then a mark failed, of a deferred score task.

    Two workers, two mini-batches, each blocked in run() on a file: mb-00000 on w1 (never let go) and
    mb-00001 on w2 (let go at the end), so no teardown runs meanwhile, the backstop is an hour away and
    no worker is idle: only the user's action can stop a worker. mb-00000 is cleared: its worker stops
    (the trigger's on_kill, or the next try, whichever comes first), and the next try goes to that
    slot's replacement; marked failed there, its worker stops (on_kill: nothing else could). Nothing of
    either try is committed; mb-00001 is scored once.
    """
    import json
    import subprocess

    from batchscore.localairflow import LocalAirflow
    from batchscore.plan import run_layout
    from batchscore.scoring.workers import run_digest

    _, deployment, dags, env = _stage(
        tmp_path,
        TWO_GATES_SCRIPT,
        {
            "mini_batch_size": 8,
            "deferrable": True,
            "worker_queue_depth": 1,
            "retry_settings": {"max_retries": 0, "timeout": 3600},
        },
        "userstop",
        resources={"instance_count": 2},
    )
    score = "test-deployment.score"

    def run_dir(run_id: str) -> Path:
        return deployment.output.path / run_key(run_id)

    def inspect(container: str) -> dict | None:
        out = subprocess.run(["docker", "inspect", container], capture_output=True, text=True)
        return json.loads(out.stdout)[0] if out.returncode == 0 else None

    def wait_for(what: str, check, airflow: LocalAirflow, timeout: float = 300):
        deadline = time.monotonic() + timeout
        while not (found := check()):
            airflow.check_alive()
            assert time.monotonic() < deadline, f"{what}: not after {timeout:.0f} s"
            time.sleep(0.2)
        return found

    def states(airflow: LocalAirflow, run_id: str) -> dict[int, tuple[str, int]]:
        tis = airflow.task_instances("userstop", run_id)
        return {t["map_index"]: (t["state"], t["try_number"]) for t in tis if t["task_id"] == score}

    def trigger_log(airflow: LocalAirflow, run_id: str, index: int, try_number: int) -> str:
        logs = airflow.home / "logs" / "dag_id=userstop" / f"run_id={run_id}" / f"task_id={score}" / f"map_index={index}"
        return "".join(f.read_text(errors="replace") for f in logs.glob(f"attempt={try_number}.log.trigger.*"))

    def scoring_deferred(airflow: LocalAirflow, run_id: str, index: int, try_number: int, worker: str) -> str | None:
        """The id of the container of ``worker`` while it scores try ``try_number`` of mb-0000<index>, deferred."""
        if states(airflow, run_id).get(index) != ("deferred", try_number):
            return None
        # The triggerer calls on_kill only for a trigger it took up, and says so in the trigger's log first.
        if " starting" not in trigger_log(airflow, run_id, index, try_number):
            return None
        scratch = run_dir(run_id) / "_batchscore" / "scratch" / worker
        record = read_record(scratch / f"mb-0000{index}.try-{try_number}.handover")
        container = inspect(f"batchscore-{run_digest('userstop', deployment.name, run_id)}-{worker}")
        if record.accepted and record.done is None and container and container["State"]["Running"]:
            return container["Id"]
        return None

    def stopped(container: str) -> bool:
        found = inspect(container)
        return found is None or not found["State"]["Running"]

    with LocalAirflow(tmp_path / "airflow", dags, env=env, parallelism=6, login=True) as airflow:
        assert airflow.token is not None  # every call below goes with a user's token, as the UI's
        airflow.wait_for_dag("userstop")
        run_id = airflow.trigger("userstop")

        first = wait_for("mb-00000 scoring on w1", lambda: scoring_deferred(airflow, run_id, 0, 1, "w1"), airflow)
        wait_for("mb-00001 scoring on w2", lambda: scoring_deferred(airflow, run_id, 1, 1, "w2"), airflow)
        airflow.clear("userstop", run_id, [(score, 0)], include_downstream=False)
        wait_for("the worker that scored the cleared try stopped", lambda: stopped(first), airflow)

        second = wait_for("mb-00000's next try on w1", lambda: scoring_deferred(airflow, run_id, 0, 2, "w1"), airflow)
        assert second != first  # the slot's replacement took the cleared task's next try
        airflow.set_task_state("userstop", run_id, score, "failed", map_index=0)
        wait_for("the worker that scored the try marked failed stopped", lambda: stopped(second), airflow)
        killed = trigger_log(airflow, run_id, 0, 2)
        (tmp_path / "code" / "go2").touch()

        airflow.wait_for_run("userstop", run_id, timeout=420)  # merge runs when all are done, a failed one too
        final = states(airflow, run_id)
        logs = {n: airflow.task_log("userstop", run_id, score, map_index=0, try_number=n) for n in (1, 2)}
        cleared = trigger_log(airflow, run_id, 0, 1)

    assert final == {0: ("failed", 2), 1: ("success", 1)}
    stopped_line = (
        "The deferred task was stopped by a user (mark failed or success, or clear): it was scoring: the worker was "
        "stopped (a later task starts a replacement)"
    )
    assert "Trigger cancelled by user action, invoking on_kill" in killed  # the mark failed
    assert stopped_line in killed
    # The clear: the trigger's on_kill, or the next try if it came first (the triggerer had not cancelled the trigger yet).
    by_next_try = (
        "mb-00000: try 1's hand-over was still on worker w1 (its task was cleared while deferred): stopped it, or took it "
        "out of the queue"
    )
    assert stopped_line in cleared or by_next_try in logs[2]
    for n in (1, 2):
        assert "Deferring until worker w1 is done with the mini-batch" in logs[n]
        assert "had taken the mini-batch" not in logs[n]  # never resumed: nothing of it was taken in
    assert run_layout(deployment, run_id).mini_batch_dir(0).read_status() is None  # no try of mb-00000 committed
    ledger = pd.read_csv(run_dir(run_id) / "processed_mini-batches.csv", keep_default_na=False)
    assert {row["mini_batch"]: (row["status"], str(row["attempts"])) for _, row in ledger.iterrows()} == {
        "mb-00000": ("missing", ""),
        "mb-00001": ("succeeded", "1"),
    }
    predictions = pd.read_csv(run_dir(run_id) / "predictions.csv")
    assert sorted(set(predictions["file"])) == [f"iris-{k:03d}.csv" for k in range(8, 15)]  # none of mb-00000's rows
    assert worker_containers("userstop", deployment.name, run_id) == []
