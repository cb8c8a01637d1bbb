"""A corpus of malformed deployment YAML files: each error names its file, line and key.

Every case is a small change to one of two valid bases (Azure's deployment file and an
endpoint file with ``deployments:``), and is checked against the loader's exact message
(``file:line: key: message``). Then the whole corpus, with one valid file and files that only
the folder's load refuses (an endpoint name taken by an earlier file), goes through the
repository's DAG file in a real DagBag (the valid DAG loads; one import error lists every bad
file) and through ``python -m batchscore check``, and the two agree message for message.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from airflow.dag_processing.dagbag import DagBag

from batchscore.errors import DeploymentSpecError
from batchscore.spec import load_endpoint

REPO = Path(__file__).resolve().parent.parent
LOADER = REPO / "dags" / "batchscore_deployments.py"

# Line numbers of the bases are what the expected messages below refer to.
AZURE = """\
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
  pattern: "*.csv"
output:
  path: out
settings:
  mini_batch_size: 4
  output_file_name: predictions.csv
  retry_settings:
    max_retries: 2
resources:
  instance_count: 1
"""

ENDPOINT = """\
endpoint_name: churn-nightly
schedule: "0 2 * * *"
deployments:
  - name: blue
    model: {path: model}
    code_configuration: {code: code, scoring_script: score.py}
    environment: {image: "scorer:1"}
    input: {path: data}
    output: {path: out-blue}
  - name: green
    model:
      path: model
    code_configuration:
      code: code
      scoring_script: score.py
    environment:
      image: scorer:2
    input:
      path: data
    output:
      path: out-green
    settings:
      mini_batch_size: 4
    resources:
      instance_count: 2
"""

VALID = AZURE.replace("endpoint_name: churn", "endpoint_name: good-endpoint").replace("path: out", "path: out-good")
BOOLEAN = "(YAML reads true, false, yes, no, on and off as booleans)"
NAME_RULE = "must start with a letter or digit and hold only letters, digits, '_' and '-' (at most 63 characters)"
PRESETS = "@once, @continuous, @hourly, @daily, @midnight, @weekly, @monthly, @quarterly, @yearly, @annually"
TOP_KEYS = (
    "$schema, code_configuration, compute, contract, description, endpoint_name, environment, input, model, name, "
    "output, resources, schedule, settings, tags, transform, type"
)


def edit(base: str, *changes: tuple[str, str]) -> str:
    """``base`` with each ``(old, new)`` replaced; ``old`` must occur exactly once."""
    for old, new in changes:
        assert base.count(old) == 1, f"{old!r} occurs {base.count(old)} times"
        base = base.replace(old, new)
    return base


def az(*changes: tuple[str, str]) -> str:
    return edit(AZURE, *changes)


def ep(*changes: tuple[str, str]) -> str:
    return edit(ENDPOINT, *changes)


@dataclass(frozen=True)
class Case:
    id: str
    content: str | bytes
    expected: tuple[str, ...]  # "line: key: message" per issue; {dir} stands for the corpus folder


CASES = [
    # ---------------------------------------------------------------- wrong types
    Case(
        "az-mini-batch-size-string",
        az(("mini_batch_size: 4", "mini_batch_size: four")),
        ("17: settings.mini_batch_size: must be a number of files (10) or a size such as '64MB' or '1GiB', got 'four'",),
    ),
    Case(
        "az-instance-count-boolean",
        az(("instance_count: 1", "instance_count: yes")),
        (f"22: resources.instance_count: must be a whole number, got the boolean true {BOOLEAN}",),
    ),
    Case(
        "ep-allowed-failed-percent-boolean",
        ep(("      mini_batch_size: 4", "      mini_batch_size: 4\n      allowed_failed_percent: false")),
        (f"24: deployments[1].settings.allowed_failed_percent: must be a number, got the boolean false {BOOLEAN}",),
    ),
    Case(
        "az-model-list-for-mapping",
        az(("model:\n  path: model", "model:\n  - model")),
        ('4: model: must be a mapping of keys, got ["model"]',),
    ),
    Case("az-model-empty", az(("model:\n  path: model", "model:")), ("4: model: must be a mapping of keys, got null",)),
    Case(
        "az-image-mapping-for-string",
        az(("image: scorer:1", "image: {name: scorer}")),
        ('10: environment.image: Input should be a valid string (got {"name": "scorer"})',),
    ),
    Case(
        "az-max-retries-fraction",
        az(("max_retries: 2", "max_retries: 2.5")),
        (
            "20: settings.retry_settings.max_retries: Input should be a valid integer, "
            "got a number with a fractional part (got 2.5)",
        ),
    ),
    Case(
        "ep-settings-list-for-mapping",
        ep(("    settings:\n      mini_batch_size: 4", "    settings: [4]")),
        ("22: deployments[1].settings: must be a mapping of keys, got [4]",),
    ),
    Case(
        "ep-deployments-mapping-for-list",
        "endpoint_name: churn-nightly\ndeployments: {name: blue}\n",
        ('2: deployments: must be a list, got {"name": "blue"}',),
    ),
    # ---------------------------------------------------------------- unknown and misspelt keys, every level
    Case(
        "az-unknown-top-key",
        AZURE + "instance_type: Standard_DS3_v2\n",
        (f"23: instance_type: unknown key 'instance_type'; allowed keys here: {TOP_KEYS}",),
    ),
    Case(
        "az-compute-key",
        AZURE + "compute: azureml:cpu cluster\n",
        (
            "23: compute: compute 'azureml:cpu cluster' must be azureml:<name> (or <name>): letters, digits, '_' and '-', "
            "as an Airflow queue",
        ),
    ),
    Case("ep-misspelt-top-key", ep(("schedule:", "schedul:")), ("2: schedul: unknown key 'schedul'; did you mean 'schedule'?",)),
    Case(
        "az-unknown-model-key",
        az(("  path: model", "  path: model\n  version: 3\n  stage: production")),
        (
            "7: model.stage: unknown key 'stage'; allowed keys here: connection, description, name, path, reference, "
            "tags, type, version",
        ),
    ),
    Case(
        "az-unknown-code-configuration-key",
        az(("  scoring_script: score.py", "  scoring_script: score.py\n  entry: main")),
        ("9: code_configuration.entry: unknown key 'entry'; allowed keys here: code, scoring_script",),
    ),
    Case(
        "az-unknown-environment-key",
        az(("  image: scorer:1", "  image: scorer:1\n  build: {path: docker}")),
        ("11: environment.build: unknown key 'build'; allowed keys here: conda_file, description, image, name",),
    ),
    Case(
        "az-unknown-input-key",
        az(('  pattern: "*.csv"', '  pattern: "*.csv"\n  type: uri_folder')),
        ("14: input.type: unknown key 'type'; allowed keys here: connection, path, pattern",),
    ),
    Case(
        "az-unknown-output-key",
        az(("  path: out", "  path: out\n  format: csv")),
        ("16: output.format: unknown key 'format'; allowed keys here: connection, path",),
    ),
    Case(
        "az-misspelt-settings-key",
        az(("mini_batch_size: 4", "mini_batch_szie: 4")),
        ("17: settings.mini_batch_szie: unknown key 'mini_batch_szie'; did you mean 'mini_batch_size'?",),
    ),
    Case(
        "az-unknown-retry-settings-key",
        az(("    max_retries: 2", "    max_retries: 2\n    backoff: 5")),
        ("21: settings.retry_settings.backoff: unknown key 'backoff'; allowed keys here: max_retries, timeout",),
    ),
    Case(
        "ep-misspelt-retry-settings",
        ep(("      mini_batch_size: 4", "      mini_batch_size: 4\n      retry_setings: {max_retries: 1}")),
        ("24: deployments[1].settings.retry_setings: unknown key 'retry_setings'; did you mean 'retry_settings'?",),
    ),
    Case(
        "az-misspelt-resources-key",
        az(("instance_count: 1", "instance_cout: 1")),
        ("22: resources.instance_cout: unknown key 'instance_cout'; did you mean 'instance_count'?",),
    ),
    Case(
        "ep-misspelt-deployment-key",
        ep(("    environment:\n      image: scorer:2", "    enviroment:\n      image: scorer:2")),
        (
            "10: deployments[1].environment: required key is missing",
            "16: deployments[1].enviroment: unknown key 'enviroment'; did you mean 'environment'?",
        ),
    ),
    # ---------------------------------------------------------------- missing required keys, each of them
    Case("az-missing-name", az(("name: blue\n", "")), ("1: name: required key is missing",)),
    Case("az-missing-endpoint-name", az(("endpoint_name: churn\n", "")), ("1: endpoint_name: required key is missing",)),
    Case("az-missing-model", az(("model:\n  path: model\n", "")), ("1: model: required key is missing",)),
    Case("az-missing-model-path", az(("  path: model", "  name: iris")), ("4: model.path: required key is missing",)),
    Case("az-missing-code", az(("  code: code\n", "")), ("6: code_configuration.code: required key is missing",)),
    Case(
        "az-missing-scoring-script",
        az(("  scoring_script: score.py\n", "")),
        ("6: code_configuration.scoring_script: required key is missing",),
    ),
    Case("az-missing-environment", az(("environment:\n  image: scorer:1\n", "")), ("1: environment: required key is missing",)),
    Case(
        "az-missing-image",
        az(("environment:\n  image: scorer:1", "environment: {}")),
        ("9: environment.image: required key is missing",),
    ),
    Case(
        "az-missing-input-scheduled",
        az(('input:\n  path: data\n  pattern: "*.csv"\n', 'schedule: "@daily"\n')),
        (
            "11: schedule: schedule is set but input is not, and a scheduled run has no trigger form to give it: "
            "add input.path, or remove schedule",
        ),
    ),
    Case("az-missing-input-path", az(("  path: data\n", "")), ("11: input.path: required key is missing",)),
    Case(
        "az-missing-output-scheduled",
        az(("output:\n  path: out\n", 'schedule: "@daily"\n')),
        (
            "14: schedule: schedule is set but output is not, and a scheduled run has no trigger form to give it: "
            "add output.path, or remove schedule",
        ),
    ),
    Case("az-missing-output-path", az(("output:\n  path: out", "output: {}")), ("14: output.path: required key is missing",)),
    Case(
        "ep-missing-deployments",
        'endpoint_name: churn-nightly\nschedule: "0 2 * * *"\n',
        ("1: deployments: required key is missing",),
    ),
    Case("ep-missing-endpoint-name", ep(("endpoint_name: churn-nightly\n", "")), ("1: endpoint_name: required key is missing",)),
    Case(
        "ep-missing-deployment-name",
        ep(("  - name: green\n    model:", "  - model:")),
        ("10: deployments[1].name: required key is missing",),
    ),
    # ---------------------------------------------------------------- schedules
    Case(
        "ep-bad-cron",
        ep(('"0 2 * * *"', '"0 25 * * *"')),
        (f"2: schedule: schedule '0 25 * * *' is neither a cron expression ('0 2 * * *') nor a preset ({PRESETS})",),
    ),
    Case(
        "ep-bad-preset",
        ep(('"0 2 * * *"', "'@dayly'")),
        (f"2: schedule: schedule '@dayly' is neither a cron expression ('0 2 * * *') nor a preset ({PRESETS})",),
    ),
    Case(
        "ep-schedule-number",
        ep(('"0 2 * * *"', "5")),
        ("2: schedule: schedule must be a cron expression, a preset, or a mapping with 'assets', got 5",),
    ),
    Case(
        "ep-asset-schedule-empty",
        ep(('schedule: "0 2 * * *"', "schedule:\n  assets: []")),
        ("3: schedule.assets: List should have at least 1 item after validation, not 0 (got [])",),
    ),
    Case(
        "ep-asset-schedule-bad-when",
        ep(('schedule: "0 2 * * *"', "schedule:\n  assets: [iris-features]\n  when: sometimes")),
        ("4: schedule.when: Input should be 'all' or 'any' (got 'sometimes')",),
    ),
    Case(
        "ep-asset-schedule-misspelt",
        ep(('schedule: "0 2 * * *"', "schedule:\n  asset: [iris-features]")),
        (
            "2: schedule.assets: required key is missing",
            "3: schedule.asset: unknown key 'asset'; did you mean 'assets'?",
        ),
    ),
    # ---------------------------------------------------------------- negative and zero sizes
    Case(
        "az-mini-batch-size-zero",
        az(("mini_batch_size: 4", "mini_batch_size: 0")),
        ("17: settings.mini_batch_size: must be 1 or more files, got 0",),
    ),
    Case(
        "az-instance-count-negative",
        az(("instance_count: 1", "instance_count: -2")),
        ("22: resources.instance_count: Input should be greater than 0 (got -2)",),
    ),
    Case(
        "az-max-retries-negative",
        az(("max_retries: 2", "max_retries: -1")),
        ("20: settings.retry_settings.max_retries: Input should be greater than or equal to 0 (got -1)",),
    ),
    Case(
        "az-timeout-zero",
        az(("    max_retries: 2", "    max_retries: 2\n    timeout: 0")),
        ("21: settings.retry_settings.timeout: Input should be greater than 0 (got 0)",),
    ),
    Case(
        "ep-error-threshold-below-minus-one",
        ep(("      mini_batch_size: 4", "      mini_batch_size: 4\n      error_threshold: -5")),
        ("24: deployments[1].settings.error_threshold: Input should be greater than or equal to -1 (got -5)",),
    ),
    Case(
        "az-allowed-failed-percent-over-100",
        az(("  mini_batch_size: 4", "  mini_batch_size: 4\n  allowed_failed_percent: 150")),
        ("18: settings.allowed_failed_percent: Input should be less than or equal to 100 (got 150)",),
    ),
    # ---------------------------------------------------------------- YAML syntax (no key to name; the line is there)
    Case(
        "az-bad-indentation",
        az(("  scoring_script: score.py", " scoring_script: score.py")),
        (
            "8: YAML syntax error: expected <block end>, but found '<block mapping start>' "
            "(while parsing a block mapping that starts on line 1); check the indentation of this line",
        ),
    ),
    Case(
        "az-over-indentation",
        az(("  scoring_script: score.py", "    scoring_script: score.py")),
        ("8: YAML syntax error: mapping values are not allowed here",),
    ),
    Case(
        "az-tab-indentation",
        az(("  path: model", "\tpath: model")),
        (
            "5: YAML syntax error: found character '\\t' that cannot start any token "
            "(while scanning for the next token); indent with spaces, not tabs",
        ),
    ),
    Case(
        "az-unclosed-quote",
        az(('pattern: "*.csv"', 'pattern: "*.csv')),
        (
            "13: YAML syntax error: found unexpected end of stream (while scanning a quoted scalar); "
            "is a quote or bracket not closed?",
        ),
    ),
    Case(
        "ep-unclosed-bracket",
        ep(("    model: {path: model}", "    model: {path: model")),
        ("6: YAML syntax error: expected ',' or '}', but got ':' (while parsing a flow mapping that starts on line 5)",),
    ),
    Case(
        "az-unclosed-list",
        AZURE + "tags: [a, b\n",
        (
            "23: YAML syntax error: expected ',' or ']', but got '<stream end>' (while parsing a flow sequence); "
            "is a quote or bracket not closed?",
        ),
    ),
    Case(
        "az-duplicate-key",
        az(("  mini_batch_size: 4", "  mini_batch_size: 4\n  mini_batch_size: 8")),
        ("18: settings.mini_batch_size: key appears twice (first on line 17)",),
    ),
    Case(
        "ep-duplicate-key-in-deployment",
        ep(("      path: data", "      path: data\n      path: data2")),
        ("20: deployments[1].input.path: key appears twice (first on line 19)",),
    ),
    # ---------------------------------------------------------------- paths that do not exist or leave the code folder
    Case("az-model-path-missing", az(("  path: model", "  path: models")), ("5: model.path: path {dir}/models does not exist",)),
    Case(
        "az-code-folder-missing",
        az(("  code: code", "  code: src")),
        ("7: code_configuration.code: path {dir}/src does not exist or is not a folder",),
    ),
    Case(
        "az-scoring-script-missing",
        az(("score.py", "scoring.py")),
        ("8: code_configuration.scoring_script: scoring script 'scoring.py' not found in {dir}/code",),
    ),
    Case(
        "az-scoring-script-escapes-code",
        az(("score.py", "../x.py")),
        ("8: code_configuration.scoring_script: scoring_script must be a path inside `code`, got '../x.py'",),
    ),
    # ---------------------------------------------------------------- the file itself
    Case("empty-file", "", ("1: the file is empty",)),
    Case("only-comments", "# the churn endpoint, to do\n", ("1: the file holds no keys, only comments",)),
    Case(
        "top-level-list",
        "# two deployments\n- name: blue\n- name: green\n",
        ("2: the top level must be a mapping of keys, not a list",),
    ),
    Case("top-level-string", "churn\n", ("1: the top level must be a mapping of keys, not a string",)),
    Case(
        "binary-png",
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
        (
            "1: not UTF-8 text: byte 0x89 at column 1 cannot be decoded "
            "(a binary file, or text in another encoding? save it as UTF-8)",
        ),
    ),
    Case(
        "latin-1-text",
        az(("image: scorer:1", "image: sc\u00f6rer:1")).encode("latin-1"),
        (
            "10: not UTF-8 text: byte 0xf6 at column 12 cannot be decoded "
            "(a binary file, or text in another encoding? save it as UTF-8)",
        ),
    ),
    Case(
        "nul-character",
        AZURE + "description: a\x00b\n",
        ("23: character #x0000 at column 15 is not allowed in YAML (a binary file?)",),
    ),
    # ---------------------------------------------------------------- names
    Case("az-name-bad-characters", az(("name: blue", "name: blue team!")), (f"1: name: {NAME_RULE}, got 'blue team!'",)),
    Case(
        "az-endpoint-name-bad-start",
        az(("endpoint_name: churn", "endpoint_name: -churn")),
        (f"2: endpoint_name: {NAME_RULE}, got '-churn'",),
    ),
    Case(
        "ep-two-deployments-one-name",
        ep(("  - name: green", "  - name: blue")),
        ("10: deployments[1].name: deployments 'blue' and 'blue' have the same name: blue",),
    ),
    Case(
        "ep-two-deployments-one-output",
        ep(("path: out-green", "path: out-blue")),
        ("21: deployments[1].output.path: deployments 'blue' and 'green' have the same output.path: {dir}/out-blue",),
    ),
    # ---------------------------------------------------------------- what Docker or the plan would refuse at run time
    Case(
        "az-image-uppercase",
        az(("image: scorer:1", "image: MyImage:latest")),
        (
            "10: environment.image: 'MyImage:latest' is not a valid image reference: repository names must be "
            "lowercase, and 'MyImage' is not (did you mean 'myimage:latest'?)",
        ),
    ),
    Case(
        "ep-image-uppercase-after-registry",
        ep(('image: "scorer:1"', 'image: "registry.example.com:5000/Team/scorer:1"')),
        (
            "7: deployments[0].environment.image: 'registry.example.com:5000/Team/scorer:1' is not a valid image "
            "reference: repository names must be lowercase, and 'Team/scorer' is not "
            "(did you mean 'registry.example.com:5000/team/scorer:1'?)",
        ),
    ),
    Case(
        "az-image-bad-tag",
        az(("image: scorer:1", "image: scorer:-1")),
        (
            "10: environment.image: 'scorer:-1' is not a valid image reference: the tag '-1' must be 1 to 128 "
            "letters, digits, '_', '.' and '-', and not start with '.' or '-'",
        ),
    ),
    Case(
        "az-image-short-digest",
        az(("image: scorer:1", "image: scorer@sha256:abc123")),
        (
            "10: environment.image: 'scorer@sha256:abc123' is not a valid image reference: the digest "
            "'sha256:abc123' must be sha256: and 64 lowercase hex digits (or sha384:, sha512:)",
        ),
    ),
    Case(
        "az-image-space",
        az(("image: scorer:1", "image: my scorer")),
        (
            "10: environment.image: 'my scorer' is not a valid image reference: the repository name 'my scorer' "
            "must be lowercase letters and digits, in components joined by '/' and separated inside by "
            "'.', '_', '__' or '-'",
        ),
    ),
    Case(
        "az-pattern-leaves-input",
        az(('pattern: "*.csv"', 'pattern: "../*"')),
        (
            "13: input.pattern: pattern '../*' leaves input.path ('..'); a pattern is matched inside input.path: "
            "point input.path at the folder instead",
        ),
    ),
    Case(
        "az-pattern-absolute",
        az(('pattern: "*.csv"', 'pattern: "/srv/data/*.csv"')),
        (
            "13: input.pattern: pattern '/srv/data/*.csv' is absolute, but it is matched inside input.path; "
            "put the folder in input.path and keep only the file pattern here ('*.csv')",
        ),
    ),
    Case(
        "az-output-is-input",
        az(("  path: out", "  path: ./data/")),
        (
            "15: output.path: output.path {dir}/data is the input folder; the plan never reads files inside the "
            "output folder, so no input file would be left; write the output to another folder (a subfolder of "
            "the input folder is fine)",
        ),
    ),
    Case(
        "ep-output-holds-input",
        ep(("path: out-green", "path: .")),
        (
            "21: deployments[1].output.path: output.path {dir} holds the input folder {dir}/data; the plan never "
            "reads files inside the output folder, so no input file would be left; write the output to another "
            "folder (a subfolder of the input folder is fine)",
        ),
    ),
    # ---------------------------------------------------------------- settings that do not fit together
    Case(
        "az-output-file-name-bad-suffix",
        az(("predictions.csv", "predictions.xlsx")),
        (
            "18: settings.output_file_name: output_file_name 'predictions.xlsx' must end with one of "
            ".csv, .parquet, .jsonl (output_layout table)",
        ),
    ),
    Case(
        "az-azure-layout-with-parquet",
        az(("  output_file_name: predictions.csv", "  output_layout: azure\n  output_file_name: predictions.parquet")),
        (
            "19: settings.output_file_name: output_file_name 'predictions.parquet' must end with one of "
            ".csv, .txt (output_layout azure)",
        ),
    ),
    Case(
        "az-more-workers-than-gpus",
        az(
            ("  mini_batch_size: 4", "  mini_batch_size: 4\n  max_concurrency_per_instance: 4"),
            ("  instance_count: 1", "  instance_count: 1\n  gpus: 2"),
        ),
        (
            "18: settings.max_concurrency_per_instance: settings.max_concurrency_per_instance is 4 but resources.gpus "
            "gives each container 2 GPU(s), so worker processes would share GPUs; lower max_concurrency_per_instance, "
            "raise resources.gpus, or set resources.share_gpus: true",
        ),
    ),
    Case(
        "ep-more-workers-than-gpus",
        ep(
            ("      mini_batch_size: 4", "      mini_batch_size: 4\n      max_concurrency_per_instance: 3"),
            ("      instance_count: 2", "      instance_count: 2\n      gpus: [0]"),
        ),
        (
            "24: deployments[1].settings.max_concurrency_per_instance: settings.max_concurrency_per_instance is 3 but "
            "resources.gpus gives each container 1 GPU(s), so worker processes would share GPUs; lower "
            "max_concurrency_per_instance, raise resources.gpus, or set resources.share_gpus: true",
        ),
    ),
]


#: Files that load alone (:func:`load_endpoint`) but that the DAG load and ``check`` refuse: a
#: clash with a file before them in the folder (name order), or a DAG id batchscore keeps.
LOADS_ALONE = [
    Case(
        "zz-endpoint-name-taken",
        VALID.replace("path: out-good", "path: out-twin"),
        ("2: endpoint_name: endpoint 'good-endpoint' is already defined in {dir}/valid.yaml:2",),
    ),
    Case(
        "zz-reserved-dag-id",
        edit(VALID, ("good-endpoint", "batchscore_invalid_deployments"), ("out-good", "out-x")),
        (
            "2: endpoint_name: 'batchscore_invalid_deployments' is the DAG id batchscore reports invalid files "
            "under; choose another name",
        ),
    ),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every case as ``<id>.yaml``, plus ``valid.yaml``, beside a model folder and a code folder."""
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "model").mkdir()
    (folder / "code").mkdir()
    (folder / "code" / "score.py").write_text("def init():\n    pass\n\n\ndef run(mini_batch):\n    return mini_batch\n")
    for case in CASES + LOADS_ALONE:
        target = folder / f"{case.id}.yaml"
        if isinstance(case.content, bytes):
            target.write_bytes(case.content)
        else:
            target.write_text(case.content, encoding="utf-8")
    (folder / "valid.yaml").write_text(VALID, encoding="utf-8")
    return folder


def expected_error(folder: Path, case: Case) -> str:
    path = folder / f"{case.id}.yaml"
    return "\n".join(f"{path}:{issue.replace('{dir}', str(folder))}" for issue in case.expected)


def test_the_corpus_is_large_and_the_bases_are_valid(corpus: Path) -> None:
    assert len(CASES) >= 35
    assert len({c.id for c in CASES}) == len(CASES)
    for text, name in ((AZURE, "base-azure"), (ENDPOINT, "base-endpoint")):
        path = corpus / f"{name}.txt"  # not a .yaml: the DAG file and `check` skip it
        path.write_text(text)
        assert load_endpoint(path).deployments
    assert load_endpoint(corpus / "valid.yaml").dag_id == "good-endpoint"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_each_malformed_file_names_its_file_line_and_key(corpus: Path, case: Case) -> None:
    with pytest.raises(DeploymentSpecError) as info:
        load_endpoint(corpus / f"{case.id}.yaml")

    assert str(info.value) == expected_error(corpus, case)
    assert all(issue.line for issue in info.value.issues), "every issue has a line"


def test_the_folder_level_cases_load_alone(corpus: Path) -> None:
    for case in LOADS_ALONE:  # so only the DAG load and `check` can refuse them
        assert load_endpoint(corpus / f"{case.id}.yaml").deployments


@pytest.fixture(scope="module")
def dag_load(corpus: Path) -> DagBag:
    """The corpus through the repository's DAG file, in a real DagBag (as Airflow's dag-processor)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("BATCHSCORE_DEPLOYMENTS_DIR", str(corpus))
        return DagBag(dag_folder=str(LOADER), safe_mode=False)


@pytest.fixture(scope="module")
def check_run(corpus: Path) -> subprocess.CompletedProcess:
    """``python -m batchscore check`` on the corpus, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "batchscore", "check", str(corpus)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=os.environ.copy(),
        timeout=300,
    )


def test_the_dag_file_loads_the_valid_yaml_and_lists_every_bad_file_in_one_import_error(corpus: Path, dag_load: DagBag) -> None:
    bag = dag_load

    assert bag.dag_ids == ["good-endpoint"]
    assert sorted(bag.dags["good-endpoint"].task_ids) == [
        "blue.merge",
        "blue.plan",
        "blue.score",
        "blue.start_workers",
        "blue.stop_workers",
    ]
    assert list(bag.import_errors) == [str(LOADER)]
    cases = sorted(CASES + LOADS_ALONE, key=lambda c: corpus / f"{c.id}.yaml")
    assert bag.import_errors[str(LOADER)] == "InvalidDeploymentFilesError: " + "\n".join(expected_error(corpus, c) for c in cases)


def test_check_lists_every_file_and_fails(corpus: Path, check_run: subprocess.CompletedProcess) -> None:
    result = check_run

    assert result.returncode == 1, result.stderr
    expected = {corpus / f"{c.id}.yaml": f"FAIL {expected_error(corpus, c)}" for c in CASES + LOADS_ALONE}
    expected[corpus / "valid.yaml"] = f"ok   {corpus / 'valid.yaml'}: endpoint good-endpoint, 1 deployment(s)"
    assert result.stdout.splitlines() == "\n".join(expected[p] for p in sorted(expected)).splitlines()


def test_check_and_the_dag_load_refuse_the_same_files_with_the_same_messages(
    check_run: subprocess.CompletedProcess, dag_load: DagBag
) -> None:
    entries: list[str] = []  # one per file: "ok   ..." or "FAIL ..." and the lines of its error
    for line in check_run.stdout.splitlines():
        if line.startswith(("ok   ", "FAIL ")):
            entries.append(line)
        else:
            entries[-1] += "\n" + line
    passed = [e.split(": endpoint ")[1].split(",")[0] for e in entries if e.startswith("ok   ")]
    failed = [e.removeprefix("FAIL ") for e in entries if e.startswith("FAIL ")]

    assert len(failed) == len(CASES + LOADS_ALONE)
    assert passed == dag_load.dag_ids
    assert "InvalidDeploymentFilesError: " + "\n".join(failed) == dag_load.import_errors[str(LOADER)]


def test_check_of_a_missing_folder_fails_as_the_dag_load_does(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "batchscore", "check", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=os.environ.copy(),
        timeout=300,
    )

    assert (result.returncode, result.stdout) == (1, f"FAIL {tmp_path / 'nope'}: the deployments folder does not exist\n")
