"""The DAG factory, loaded the way Airflow's dag-processor loads it (a real DagBag)."""

from __future__ import annotations

from pathlib import Path

import pytest
from airflow.dag_processing.dagbag import DagBag
from airflow.sdk import TriggerRule

from batchscore.factory import INVALID_DAG_ID, build_dags

REPO = Path(__file__).resolve().parent.parent
LOADER = REPO / "dags" / "batchscore_deployments.py"


def parse(monkeypatch: pytest.MonkeyPatch, deployments: Path | None = None) -> DagBag:
    if deployments is not None:
        monkeypatch.setenv("BATCHSCORE_DEPLOYMENTS_DIR", str(deployments))
    return DagBag(dag_folder=str(LOADER), safe_mode=False)


def examples_copy(target: Path) -> Path:
    """The example YAMLs in another folder, their relative paths made absolute."""
    target.mkdir(parents=True, exist_ok=True)
    for src in sorted((REPO / "dags" / "deployments").glob("*.yaml")):
        (target / src.name).write_text(src.read_text().replace("../../", f"{REPO}/"))
    return target


def test_example_dags_load_with_plan_score_merge_per_deployment(iris_example: Path, monkeypatch) -> None:
    bag = parse(monkeypatch)

    assert bag.import_errors == {}
    assert sorted(bag.dag_ids) == ["iris-batch", "iris-custom-outputs", "iris-nightly", "iris-transform"]
    dag = bag.dags["iris-batch"]
    assert sorted(dag.task_ids) == [  # warm workers, the default: a setup and a teardown task
        "iris-sklearn.merge",
        "iris-sklearn.plan",
        "iris-sklearn.score",
        "iris-sklearn.start_workers",
        "iris-sklearn.stop_workers",
    ]
    plan, start, score, merge = (dag.get_task(f"iris-sklearn.{t}") for t in ("plan", "start_workers", "score", "merge"))
    assert score.upstream_task_ids == {plan.task_id, start.task_id} and merge.upstream_task_ids == {score.task_id}
    assert type(score).__name__ == "MappedOperator"
    assert score.partial_kwargs["retries"] == 1  # settings.retry_settings.max_retries
    assert score.partial_kwargs["max_active_tis_per_dagrun"] == 4  # resources.instance_count x worker_queue_depth (2)
    assert score.map_index_template == "{{ task.mini_batch['label'] }}"
    assert merge.trigger_rule == TriggerRule.ALL_DONE
    assert bag.dags["iris-nightly"].schedule == "0 2 * * *"


def test_a_broken_yaml_is_an_import_error_naming_file_line_and_key_and_the_others_still_load(
    iris_example: Path, tmp_path: Path, monkeypatch
) -> None:
    folder = examples_copy(tmp_path / "deployments")
    broken = folder / "broken.yaml"
    broken.write_text(
        (folder / "iris-batch.yaml")
        .read_text()
        .replace("endpoint_name: iris-batch", "endpoint_name: iris-broken")
        .replace("iris-batch", "iris-broken")
        .replace("  mini_batch_size: 4", "  mini_batch_szie: 5")
    )
    line = next(n for n, text in enumerate(broken.read_text().splitlines(), 1) if "mini_batch_szie" in text)

    bag = parse(monkeypatch, folder)

    assert sorted(bag.dag_ids) == ["iris-batch", "iris-custom-outputs", "iris-nightly", "iris-transform"]
    assert list(bag.import_errors) == [str(LOADER)]
    assert bag.import_errors[str(LOADER)] == (
        f"InvalidDeploymentFilesError: {broken}:{line}: settings.mini_batch_szie: unknown key 'mini_batch_szie'; "
        "did you mean 'mini_batch_size'?"
    )


def test_every_broken_file_is_listed_and_duplicates_across_files_are_refused(iris_example: Path, tmp_path: Path) -> None:
    folder = examples_copy(tmp_path / "deployments")
    (folder / "a-syntax.yaml").write_text("name: x\n  bad: [\n")
    (folder / "z-copy.yaml").write_text((folder / "iris-batch.yaml").read_text())

    dags = build_dags(folder)

    assert sorted(dags) == [INVALID_DAG_ID, "iris-batch", "iris-custom-outputs", "iris-nightly", "iris-transform"]
    with pytest.raises(Exception) as info:
        dags[INVALID_DAG_ID].validate()
    assert str(info.value).splitlines() == [
        f"{folder / 'a-syntax.yaml'}:2: YAML syntax error: mapping values are not allowed here",
        f"{folder / 'z-copy.yaml'}:5: endpoint_name: endpoint 'iris-batch' is already defined in {folder / 'iris-batch.yaml'}:5",
    ]


def test_a_missing_deployments_folder_is_reported_not_ignored(tmp_path: Path) -> None:
    dags = build_dags(tmp_path / "nope")
    with pytest.raises(Exception) as info:
        dags[INVALID_DAG_ID].validate()
    assert str(info.value) == f"{tmp_path / 'nope'}: the deployments folder does not exist"


def test_an_output_folder_shared_across_files_names_the_clashing_deployments_line(iris_example: Path, tmp_path: Path) -> None:
    folder = examples_copy(tmp_path / "deployments")
    taken = f"{REPO}/var/output/iris-batch"  # iris-batch.yaml writes here
    common = (
        f"    model: {{path: {iris_example / 'model'}}}\n"
        f"    code_configuration: {{code: {iris_example / 'code'}, scoring_script: score.py}}\n"
        "    environment: {image: batchscore-scoring:latest}\n"
        f"    input: {{path: {iris_example / 'data'}}}\n"
    )
    clash = folder / "x-clash.yaml"
    clash.write_text(
        "endpoint_name: clash\ndeployments:\n"
        f"  - name: fine\n{common}    output: {{path: {tmp_path / 'own'}}}\n"
        f"  - name: late\n{common}    output:\n      path: {taken}\n"
    )
    line = clash.read_text().splitlines().index(f"      path: {taken}") + 1
    taken_line = (folder / "iris-batch.yaml").read_text().splitlines().index(f"  path: {taken}") + 1

    dags = build_dags(folder)

    with pytest.raises(Exception) as info:
        dags[INVALID_DAG_ID].validate()
    assert str(info.value) == (
        f"{clash}:{line}: output.path: deployment 'late' writes to {taken}, as 'iris-sklearn' in "
        f"{folder / 'iris-batch.yaml'}:{taken_line} does"
    )


def test_every_dag_has_the_trigger_forms_params_and_each_merge_updates_its_output_asset(iris_example: Path, monkeypatch) -> None:
    bag = parse(monkeypatch)

    for dag_id, deployment in [("iris-batch", "iris-sklearn"), ("iris-nightly", "iris-parquet")]:
        dag = bag.dags[dag_id]
        assert dict(dag.params) == {"input_path": None, "output_path": None, "mini_batch_size": None}
        assert [(a.name, a.uri) for a in dag.get_task(f"{deployment}.merge").outlets] == [
            (f"batchscore/{dag_id}/{deployment}", f"batchscore/{dag_id}/{deployment}")
        ]
    assert bag.dags["iris-batch"].params.get_param("mini_batch_size").description == (
        "A whole number, 1 or more. Empty: the YAML's settings.mini_batch_size (4)."
    )


def test_warm_workers_put_a_setup_and_a_teardown_task_around_the_scoring_tasks(
    iris_example: Path, tmp_path: Path, monkeypatch
) -> None:
    folder = examples_copy(tmp_path / "deployments")
    for name, mode in (("iris-batch.yaml", "warm"), ("iris-transform.yaml", "per_mini_batch")):
        path = folder / name
        path.write_text(path.read_text().replace("settings:\n", f"settings:\n  worker_mode: {mode}\n", 1))

    bag = parse(monkeypatch, folder)

    assert bag.import_errors == {}
    dag = bag.dags["iris-batch"]
    assert sorted(dag.task_ids) == [
        "iris-sklearn.merge",
        "iris-sklearn.plan",
        "iris-sklearn.score",
        "iris-sklearn.start_workers",
        "iris-sklearn.stop_workers",
    ]
    plan, start, score, stop, merge = (
        dag.get_task(f"iris-sklearn.{t}") for t in ("plan", "start_workers", "score", "stop_workers", "merge")
    )
    assert start.is_setup and stop.is_teardown and not score.is_setup
    assert start.upstream_task_ids == set()  # the workers start while the plan is written
    assert score.upstream_task_ids == {start.task_id, plan.task_id}
    assert stop.upstream_task_ids == {start.task_id, score.task_id}
    assert merge.upstream_task_ids == {score.task_id}
    assert score.partial_kwargs["max_active_tis_per_dagrun"] == 4  # 2 workers x worker_queue_depth 2
    assert sorted(bag.dags["iris-transform"].task_ids) == ["iris-serve.merge", "iris-serve.plan", "iris-serve.score"]
    cold = bag.dags["iris-transform"].get_task("iris-serve.score")
    assert cold.partial_kwargs["max_active_tis_per_dagrun"] == 2  # a container per mini-batch: no queue


def test_a_deployments_queue_and_pool_go_to_the_tasks_that_use_its_scoring_hosts(
    iris_example: Path, tmp_path: Path, monkeypatch
) -> None:
    folder = examples_copy(tmp_path / "deployments")
    for name in ("iris-batch.yaml", "iris-transform.yaml"):  # warm workers, and a container per mini-batch
        path = folder / name
        text = path.read_text().replace("resources:\n", "resources:\n  queue: gpu\n  pool: gpus\n  pool_slots: 2\n", 1)
        if "resources:" not in text:
            text += "resources:\n  queue: gpu\n  pool: gpus\n  pool_slots: 2\n"
        if name == "iris-transform.yaml":
            text = text.replace("settings:\n", "settings:\n  worker_mode: per_mini_batch\n", 1)
        path.write_text(text)

    bag = parse(monkeypatch, folder)

    assert bag.import_errors == {}
    for dag_id, group in (("iris-batch", "iris-sklearn"), ("iris-transform", "iris-serve")):
        dag = bag.dags[dag_id]
        score = dag.get_task(f"{group}.score")
        assert (score.partial_kwargs["queue"], score.partial_kwargs["pool"], score.partial_kwargs["pool_slots"]) == (
            "gpu",
            "gpus",
            2,
        )
        for task_id in ("plan", "merge"):  # shared storage only: any worker of the default queue
            task = dag.get_task(f"{group}.{task_id}")
            assert (task.queue, task.pool) == ("default", "default_pool"), task.task_id
    start, stop = (bag.dags["iris-batch"].get_task(f"iris-sklearn.{t}") for t in ("start_workers", "stop_workers"))
    assert (start.queue, stop.queue) == ("gpu", "gpu")  # the workers' containers are on the scoring hosts' engine
    assert (start.pool, stop.pool) == ("default_pool", "default_pool")  # never waiting behind the mini-batches
    unrouted = parse(monkeypatch, examples_copy(tmp_path / "plain")).dags["iris-batch"].get_task("iris-sklearn.score")
    assert (unrouted.partial_kwargs.get("queue"), unrouted.partial_kwargs.get("pool")) == ("default", None)  # Airflow's defaults
