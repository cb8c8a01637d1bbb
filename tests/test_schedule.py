"""How the YAML's schedule (cron, preset or upstream assets) becomes the DAG's: loaded, checked, given to Airflow.

A real scheduler starting a run on asset events is in ``test_run_params.py``, which has the one
``LocalAirflow`` stack of these tests.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from airflow.sdk import Asset, AssetAll, AssetAny

from batchscore.errors import DeploymentSpecError
from batchscore.factory import build_dag
from batchscore.schedule import airflow_schedule
from batchscore.spec import AssetSchedule, AssetSpec, load_endpoint
from tests.helpers import write

# --------------------------------------------------------------------------- the YAML's schedule

AZURE = textwrap.dedent(
    """
    name: blue
    endpoint_name: churn
    model:
      path: model
    code_configuration:
      code: code
      scoring_script: score.py
    environment:
      image: scorer:1
    input:
      path: data
    output:
      path: out
    """
).lstrip()
SCHEDULE_LINE = AZURE.count("\n") + 1  # the line of `schedule:` in with_schedule()


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    (tmp_path / "model").mkdir()
    (tmp_path / "data").mkdir()
    write(tmp_path / "code" / "score.py", "def run(mb):\n    return mb\n")
    return tmp_path


def with_schedule(folder: Path, schedule: str) -> Path:
    """AZURE with ``schedule:`` and then ``schedule``: inline (" '@daily'") or a block ("\\n  assets: ...")."""
    if schedule.startswith("\n"):
        schedule = textwrap.indent(textwrap.dedent(schedule), "  ")
    path = folder / "churn.yaml"
    path.write_text(AZURE + "schedule:" + schedule.rstrip() + "\n", encoding="utf-8")
    return path


def test_an_asset_schedule_becomes_airflow_assets_all_of_them_by_default(folder: Path) -> None:
    path = with_schedule(
        folder,
        """
          assets:
            - s3://bucket/iris/
            - iris-features
            - {name: iris-labels, uri: "s3://bucket/labels"}
        """,
    )

    endpoint = load_endpoint(path)

    assert endpoint.schedule == AssetSchedule(
        assets=["s3://bucket/iris/", "iris-features", AssetSpec(name="iris-labels", uri="s3://bucket/labels")],
        when="all",
    )
    expected = [
        Asset(uri="s3://bucket/iris/"),  # name 's3://bucket/iris/', uri 's3://bucket/iris' (Airflow's)
        Asset(name="iris-features"),
        Asset(name="iris-labels", uri="s3://bucket/labels"),
    ]
    assert airflow_schedule(endpoint.schedule) == expected
    assert [(a.name, a.uri) for a in expected] == [
        ("s3://bucket/iris/", "s3://bucket/iris"),
        ("iris-features", "iris-features"),
        ("iris-labels", "s3://bucket/labels"),
    ]
    dag = build_dag(endpoint)
    assert type(dag.timetable).__name__ == "AssetTriggeredTimetable"
    assert dag.timetable.asset_condition == AssetAll(*expected)


def test_when_any_starts_a_run_on_any_one_asset(folder: Path) -> None:
    endpoint = load_endpoint(with_schedule(folder, " {assets: [a, 'file:///data/b'], when: any}"))
    assert airflow_schedule(endpoint.schedule) == AssetAny(Asset(name="a"), Asset(uri="file:///data/b"))
    assert build_dag(endpoint).timetable.asset_condition == AssetAny(Asset(name="a"), Asset(uri="file:///data/b"))


def test_cron_presets_and_none_are_passed_through(folder: Path) -> None:
    assert airflow_schedule(load_endpoint(with_schedule(folder, ' "0 2 * * *"')).schedule) == "0 2 * * *"
    assert airflow_schedule(load_endpoint(with_schedule(folder, " '@daily'")).schedule) == "@daily"
    assert airflow_schedule(load_endpoint(with_schedule(folder, " null")).schedule) is None


def test_an_endpoint_file_takes_the_same_schedule_shape(folder: Path) -> None:
    path = write(
        folder / "e.yaml",
        """
        endpoint_name: churn
        schedule:
          assets: [iris-features]
          when: any
        deployments:
          - name: blue
            model: {path: model}
            code_configuration: {code: code, scoring_script: score.py}
            environment: {image: "scorer:1"}
            input: {path: data}
            output: {path: out}
        """,
    )
    assert load_endpoint(path).schedule == AssetSchedule(assets=["iris-features"], when="any")


S = SCHEDULE_LINE


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        (
            "\n  asets: [a]",
            [
                f"{S}: schedule.assets: required key is missing",
                f"{S + 1}: schedule.asets: unknown key 'asets'; did you mean 'assets'?",
            ],
        ),
        (
            "\n  assets: []",
            [f"{S + 1}: schedule.assets: List should have at least 1 item after validation, not 0 (got [])"],
        ),
        ("\n  assets: iris", [f"{S + 1}: schedule.assets: must be a list, got 'iris'"]),
        ("\n  assets: [a]\n  when: some", [f"{S + 2}: schedule.when: Input should be 'all' or 'any' (got 'some')"]),
        ("\n  assets:\n    - a\n    - 5", [f"{S + 3}: schedule.assets[1]: Input should be a valid string (got 5)"]),
        ("\n  assets:\n    - a\n    - a", [f"{S + 1}: schedule.assets: asset 'a' is listed twice"]),
        (
            "\n  assets: ['s3://b/x', 's3://b/x/']",
            [
                f"{S + 1}: schedule.assets: assets 's3://b/x' and 's3://b/x/' are one asset to Airflow "
                "(both have the URI 's3://b/x')"
            ],
        ),
        (
            "\n  assets:\n    - {uri: 's3://b/x'}\n    - {name: other, uri: 's3://b/x'}",
            [
                f"{S + 1}: schedule.assets: assets {{'uri': 's3://b/x'}} and {{'name': 'other', 'uri': 's3://b/x'}} "
                "are one asset to Airflow (both have the URI 's3://b/x')"
            ],
        ),
        ("\n  assets:\n    - {}", [f"{S + 2}: schedule.assets[0]: an asset needs a name, a uri, or both"]),
        (
            "\n  assets:\n    - {name: a, url: b}",
            [f"{S + 2}: schedule.assets[0].url: unknown key 'url'; allowed keys here: name, uri"],
        ),
        (
            "\n  assets: ['s3://user:secret@bucket/x']",
            [
                f"{S + 1}: schedule.assets[0]: asset 's3://***@bucket/x': a URI must not hold a user name "
                "or password (Airflow shows asset names and URIs to every user)"
            ],
        ),
        (
            "\n  assets: ['airflow://x']",
            [f"{S + 1}: schedule.assets[0]: asset 'airflow://x': Asset scheme 'airflow' is reserved"],
        ),
        ("\n  assets: [self]", [f"{S + 1}: schedule.assets[0]: asset 'self': prohibited name for asset: self"]),
        ("\n  assets: [' ']", [f"{S + 1}: schedule.assets[0]: asset ' ': Asset name cannot be just whitespace"]),
        (
            " [a, b]",
            [f'{S}: schedule: schedule must be a cron expression, a preset, or a mapping with \'assets\', got ["a", "b"]'],
        ),
        (" 5", [f"{S}: schedule: schedule must be a cron expression, a preset, or a mapping with 'assets', got 5"]),
        (
            " every day",
            [
                f"{S}: schedule: schedule 'every day' is neither a cron expression ('0 2 * * *') nor a preset "
                "(@once, @continuous, @hourly, @daily, @midnight, @weekly, @monthly, @quarterly, @yearly, @annually)"
            ],
        ),
    ],
)
def test_a_bad_schedule_names_line_key_and_problem(folder: Path, schedule: str, expected: list[str]) -> None:
    path = with_schedule(folder, schedule)
    with pytest.raises(DeploymentSpecError) as info:
        load_endpoint(path)
    assert str(info.value).splitlines() == [f"{path}:{line}" for line in expected]
