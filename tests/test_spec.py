"""The deployment YAML schema: both layouts, defaults, and errors naming file, line and key."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from batchscore.errors import DeploymentSpecError
from batchscore.spec import DeploymentFile, EndpointSpec, json_schema, load_endpoint
from tests.helpers import write

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    (tmp_path / "model").mkdir()
    write(tmp_path / "code" / "score.py", "def run(mb):\n    return mb\n")
    return tmp_path


AZURE = textwrap.dedent(
    """
    name: blue
    endpoint_name: churn
    type: model
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


def error_of(path: Path) -> str:
    with pytest.raises(DeploymentSpecError) as info:
        load_endpoint(path)
    return str(info.value)


def test_azure_layout_is_an_endpoint_with_one_deployment_and_azure_defaults(folder: Path) -> None:
    endpoint = load_endpoint(write(folder / "churn.yaml", AZURE))

    assert endpoint.dag_id == "churn"
    assert endpoint.source == folder / "churn.yaml"
    assert endpoint.schedule is None
    (d,) = endpoint.deployments
    assert d.name == "blue"
    assert d.model.path == folder / "model"  # relative paths resolve against the YAML's folder
    assert d.code_configuration.code == folder / "code"
    assert d.input.path == folder / "data" and d.input.pattern == "*"
    assert d.output.path == folder / "out"
    assert d.settings.mini_batch_size == 10
    assert d.settings.output_file_name == "predictions.csv"
    assert d.settings.retry_settings.max_retries == 3
    assert d.settings.retry_settings.timeout == 30
    assert d.settings.logging_level == "info"
    assert d.settings.max_concurrency_per_instance == 1
    assert (d.settings.error_threshold, d.settings.mini_batch_error_threshold, d.settings.allowed_failed_percent) == (-1, -1, 100)
    assert (d.settings.output_action, d.settings.output_layout) == ("append_row", "table")
    assert d.settings.init_timeout == 600 and d.settings.environment_variables == {}
    assert d.resources.instance_count == 1 and d.resources.gpus == 0 and d.resources.share_gpus is False


AZURE_SETTINGS = AZURE + textwrap.dedent(
    """
    settings:
      mini_batch_size: 20
      max_concurrency_per_instance: 4
      error_threshold: 10
      mini_batch_error_threshold: 2
      allowed_failed_percent: 5
      output_action: append_row
      output_file_name: out.csv
      logging_level: debug
      retry_settings:
        max_retries: 5
        timeout: 300
      environment_variables:
        MODEL_VARIANT: large
    """
)


def test_azures_settings_block_is_accepted_verbatim(folder: Path) -> None:
    (d,) = load_endpoint(write(folder / "churn.yaml", AZURE_SETTINGS)).deployments
    s = d.settings
    assert (s.mini_batch_size, s.max_concurrency_per_instance, s.error_threshold) == (20, 4, 10)
    assert (s.mini_batch_error_threshold, s.allowed_failed_percent, s.output_file_name) == (2, 5, "out.csv")
    assert (s.retry_settings.max_retries, s.retry_settings.timeout) == (5, 300)
    assert s.environment_variables == {"MODEL_VARIANT": "large"}


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (
            "  output_layout: azure\n  output_file_name: out.parquet\n",
            "settings.output_file_name: output_file_name 'out.parquet' must end with one of .csv, .txt (output_layout azure)",
        ),
        (
            "  output_file_name: out.txt\n",
            "settings.output_file_name: output_file_name 'out.txt' must end with one of .csv, .parquet, .jsonl "
            "(output_layout table)",
        ),
        ("  error_threshold: -2\n", "settings.error_threshold: Input should be greater than or equal to -1 (got -2)"),
        (
            "  allowed_failed_percent: 120\n",
            "settings.allowed_failed_percent: Input should be less than or equal to 100 (got 120)",
        ),
        (
            "  output_action: append_rows\n",
            "settings.output_action: Input should be 'append_row' or 'summary_only' (got 'append_rows')",
        ),
        ("  retry_settings:\n    timeout: 0\n", "settings.retry_settings.timeout: Input should be greater than 0 (got 0)"),
    ],
)
def test_bad_settings_name_the_key(folder: Path, settings: str, expected: str) -> None:
    path = write(folder / "churn.yaml", AZURE + "settings:\n" + settings)
    assert error_of(path).split(": ", 1)[1] == expected


def test_worker_processes_may_not_share_gpus_unless_allowed(folder: Path) -> None:
    text = AZURE + "settings:\n  max_concurrency_per_instance: 4\nresources:\n  gpus: 2\n"
    assert error_of(write(folder / "churn.yaml", text)).endswith(
        "settings.max_concurrency_per_instance is 4 but resources.gpus gives each container 2 GPU(s), so worker "
        "processes would share GPUs; lower max_concurrency_per_instance, raise resources.gpus, or set "
        "resources.share_gpus: true"
    )
    (d,) = load_endpoint(write(folder / "churn.yaml", text + "  share_gpus: true\n")).deployments
    assert d.resources.share_gpus is True


def test_endpoint_layout_with_two_deployments(folder: Path) -> None:
    text = """
        endpoint_name: churn
        schedule: "0 2 * * *"
        deployments:
          - name: blue
            model: {path: model}
            code_configuration: {code: code, scoring_script: score.py}
            environment: {image: "scorer:1"}
            input: {path: data, pattern: "**/*.parquet"}
            output: {path: out-blue}
            settings: {mini_batch_size: 3, output_file_name: p.parquet}
            resources: {gpus: all, instance_count: 2}
          - name: green
            model: {path: model}
            code_configuration: {code: code, scoring_script: score.py}
            environment: {image: "scorer:2"}
            input: {path: data}
            output: {path: out-green}
            resources: {gpus: [0, "GPU-3b2f"]}
        """
    endpoint = load_endpoint(write(folder / "e.yaml", text))
    blue, green = endpoint.deployments
    assert endpoint.schedule == "0 2 * * *"
    assert blue.settings.mini_batch_size == 3 and blue.resources.gpus == "all"
    assert green.resources.gpus == ["0", "GPU-3b2f"]


def test_misspelt_key_names_file_line_key_and_suggestion(folder: Path) -> None:
    path = write(folder / "typo.yaml", AZURE + "settings:\n  mini_batch_szie: 5\n")
    assert error_of(path) == (
        f"{path}:16: settings.mini_batch_szie: unknown key 'mini_batch_szie'; did you mean 'mini_batch_size'?"
    )


def test_unknown_key_without_a_close_match_lists_the_allowed_keys(folder: Path) -> None:
    path = write(folder / "x.yaml", AZURE + "instance_type: Standard_DS3_v2\n")
    assert error_of(path) == (
        f"{path}:15: instance_type: unknown key 'instance_type'; allowed keys here: $schema, code_configuration, compute, "
        "contract, description, endpoint_name, environment, input, model, name, output, resources, schedule, "
        "settings, tags, transform, type"
    )


def test_every_problem_is_reported_in_line_order(folder: Path) -> None:
    text = """
        endpoint_name: has space
        schedule: every day
        deployments:
          - name: a
            model: {path: nope}
            code_configuration: {code: code, scoring_script: ../x.py}
            environment: {image: ""}
            input: {path: d}
            output: {path: o}
            settings: {mini_batch_size: -3, output_file_name: p.txt}
            resources: {gpus: -1}
          - name: b
            modl: {}
        """
    path = write(folder / "bad.yaml", text)
    lines = error_of(path).splitlines()
    assert lines == [
        f"{path}:1: endpoint_name: must start with a letter or digit and hold only letters, digits, '_' and '-' "
        "(at most 63 characters), got 'has space'",
        f"{path}:2: schedule: schedule 'every day' is neither a cron expression ('0 2 * * *') nor a preset "
        "(@once, @continuous, @hourly, @daily, @midnight, @weekly, @monthly, @quarterly, @yearly, @annually)",
        f"{path}:5: deployments[0].model.path: path {folder / 'nope'} does not exist",
        f"{path}:6: deployments[0].code_configuration.scoring_script: scoring_script must be a path inside `code`, got '../x.py'",
        f"{path}:7: deployments[0].environment.image: String should have at least 1 character (got '')",
        f"{path}:10: deployments[0].settings.mini_batch_size: must be 1 or more files, got -3",
        f"{path}:10: deployments[0].settings.output_file_name: output_file_name 'p.txt' must end with one of "
        ".csv, .parquet, .jsonl (output_layout table)",
        f"{path}:11: deployments[0].resources.gpus: gpus must be 0 or more, got -1",
        f"{path}:12: deployments[1].model: required key is missing",
        f"{path}:12: deployments[1].code_configuration: required key is missing",
        f"{path}:12: deployments[1].environment: required key is missing",
        f"{path}:13: deployments[1].modl: unknown key 'modl'; did you mean 'model'?",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: x\n  bad: [\n", ":2: YAML syntax error: mapping values are not allowed here"),
        ("", ":1: the file is empty"),
        ("- a\n- b\n", ":1: the top level must be a mapping of keys, not a list"),
        ("endpoint_name: a\nendpoint_name: b\ndeployments: []\n", ":2: endpoint_name: key appears twice (first on line 1)"),
        (
            "endpoint_name: a\ndeployments: []\n",
            ":2: deployments: List should have at least 1 item after validation, not 0 (got [])",
        ),
    ],
)
def test_file_level_problems(folder: Path, text: str, expected: str) -> None:
    path = folder / "f.yaml"
    path.write_text(text)
    assert error_of(path) == f"{path}{expected}"


def test_scoring_script_must_exist_in_the_code_folder(folder: Path) -> None:
    path = write(folder / "s.yaml", AZURE.replace("score.py", "missing.py"))
    assert error_of(path) == (
        f"{path}:8: code_configuration.scoring_script: scoring script 'missing.py' not found in {folder / 'code'}"
    )


def test_two_deployments_may_not_share_a_name(folder: Path) -> None:
    one = (
        "    - name: a\n      model: {path: model}\n      code_configuration: {code: code, scoring_script: score.py}\n"
        "      environment: {image: i}\n      input: {path: d}\n"
    )
    text = "endpoint_name: e\ndeployments:\n" + one + "      output: {path: o1}\n" + one + "      output: {path: o2}\n"
    path = folder / "dup.yaml"
    path.write_text(text)
    assert error_of(path) == f"{path}:9: deployments[1].name: deployments 'a' and 'a' have the same name: a"


def test_json_schema_in_the_repository_is_current() -> None:
    committed = json.loads((REPO / "include" / "schema" / "deployment.schema.json").read_text())
    assert committed == json_schema(), "regenerate it with `make schema`"
    refs = {branch["$ref"] for branch in committed["anyOf"]}
    assert refs == {"#/$defs/EndpointSpec", "#/$defs/DeploymentFile"}


def test_models_forbid_unknown_keys_everywhere() -> None:
    assert EndpointSpec.model_config["extra"] == "forbid"
    assert DeploymentFile.model_config["extra"] == "forbid"


def test_security_defaults_of_resources_and_settings(folder: Path) -> None:
    (d,) = load_endpoint(write(folder / "churn.yaml", AZURE)).deployments
    r = d.resources
    assert (r.network, r.memory, r.pids_limit, r.shm_size) == (False, None, 4096, None)
    assert d.settings.secret_environment == {}


def test_security_keys_are_read(folder: Path) -> None:
    text = (
        AZURE
        + "settings:\n  secret_environment:\n    API_TOKEN: {variable: scoring_token}\n"
        + "    DB_PASSWORD: {connection: warehouse, field: password}\n"
        + "resources:\n  network: true\n  memory: 4g\n  pids_limit: 512\n  shm_size: 512m\n"
    )
    (d,) = load_endpoint(write(folder / "churn.yaml", text)).deployments
    assert (d.resources.network, d.resources.memory, d.resources.pids_limit, d.resources.shm_size) == (
        True,
        "4g",
        512,
        "512m",
    )
    secrets = d.settings.secret_environment
    assert (secrets["API_TOKEN"].variable, secrets["DB_PASSWORD"].connection) == ("scoring_token", "warehouse")


@pytest.mark.parametrize(
    ("resources", "expected"),
    [
        (
            "  memory: 4 GB\n",
            "resources.memory: a size is a whole number with b, k, m or g, e.g. '512m' or '4g'; got '4 GB'",
        ),
        ("  memory: 1m\n", "resources.memory: a size must be at least 6m, got '1m'"),
        ("  shm_size: 2x\n", "resources.shm_size: a size is a whole number with b, k, m or g, e.g. '512m' or '4g'; got '2x'"),
        ("  pids_limit: -1\n", "resources.pids_limit: Input should be greater than or equal to 64 (got -1)"),
        ("  network: bridge\n", "resources.network: Input should be a valid boolean, unable to interpret input (got 'bridge')"),
    ],
)
def test_bad_security_resources_name_the_key(folder: Path, resources: str, expected: str) -> None:
    path = write(folder / "churn.yaml", AZURE + "resources:\n" + resources)
    assert error_of(path).split(": ", 1)[1] == expected


def test_a_queue_and_a_pool_route_the_scoring_tasks_and_are_checked_like_names(folder: Path) -> None:
    path = write(folder / "q.yaml", AZURE + "resources:\n  queue: gpu-a100\n  pool: gpus\n  pool_slots: 2\n")
    resources = load_endpoint(path).deployments[0].resources
    assert (resources.queue, resources.pool, resources.pool_slots) == ("gpu-a100", "gpus", 2)
    path = write(folder / "bad.yaml", AZURE + "resources:\n  queue: gpu a100\n")
    assert error_of(path) == (
        f"{path}:16: resources.queue: must start with a letter or digit and hold only letters, digits, '_' and '-' "
        "(at most 63 characters), got 'gpu a100'"
    )


def test_the_output_folder_may_lie_inside_the_input_folder_but_not_be_it_or_hold_it(folder: Path) -> None:
    (folder / "data").mkdir()
    (folder / "link-to-data").symlink_to(folder / "data")
    inside = load_endpoint(write(folder / "inside.yaml", AZURE.replace("path: out", "path: data/scored")))
    assert inside.deployments[0].output.path == folder / "data" / "scored"  # the plan skips it (test_plan)

    advice = (
        "the plan never reads files inside the output folder, so no input file would be left; "
        "write the output to another folder (a subfolder of the input folder is fine)"
    )
    same = write(folder / "same.yaml", AZURE.replace("path: out", "path: link-to-data"))  # a link to it is it
    assert error_of(same) == f"{same}:14: output.path: output.path {folder / 'data'} is the input folder; {advice}"
    holds = write(folder / "holds.yaml", AZURE.replace("path: out", "path: ."))
    assert error_of(holds) == (
        f"{holds}:14: output.path: output.path {folder} holds the input folder {folder / 'data'}; {advice}"
    )


@pytest.mark.parametrize(
    "image",
    [
        "batchscore-scoring:latest",
        "scorer",
        "my_team__scorer.v2--rc",
        "localhost:5000/team/scorer:1.0",
        "Registry.Example.com/team/scorer:V1_x",  # a host and a tag may hold capitals; a repository may not
        "[::1]:5000/scorer",
        "ghcr.io/org/scorer@sha256:" + "0123456789abcdef" * 4,
        "scorer:1@sha256:" + "a" * 64,
    ],
)
def test_image_references_docker_takes_are_accepted(folder: Path, image: str) -> None:
    endpoint = load_endpoint(write(folder / "i.yaml", AZURE.replace("image: scorer:1", f'image: "{image}"')))
    assert endpoint.deployments[0].environment.image == image


@pytest.mark.parametrize(
    ("image", "problem"),
    [
        ("Scorer", "repository names must be lowercase, and 'Scorer' is not (did you mean 'scorer'?)"),
        (
            "localhost/Scorer@sha256:" + "a" * 64,
            f"repository names must be lowercase, and 'Scorer' is not (did you mean 'localhost/scorer@sha256:{'a' * 64}'?)",
        ),
        ("bad_host.com/scorer", "the registry 'bad_host.com' must be a host name or an IP address, with an optional :port"),
        (":1", "the repository name is missing"),
        (
            "team//scorer",
            "the repository name 'team//scorer' must be lowercase letters and digits, in components "
            "joined by '/' and separated inside by '.', '_', '__' or '-'",
        ),
        (
            "scorer@md5:" + "a" * 32,
            f"the digest 'md5:{'a' * 32}' must be sha256: and 64 lowercase hex digits (or sha384:, sha512:)",
        ),
        ("s" * 256, "the name is 256 characters long, more than Docker's 255"),
    ],
)
def test_a_bad_image_reference_says_what_docker_would_refuse(folder: Path, image: str, problem: str) -> None:
    path = write(folder / "i.yaml", AZURE.replace("image: scorer:1", f'image: "{image}"'))
    assert error_of(path) == f"{path}:10: environment.image: {image!r} is not a valid image reference: {problem}"
