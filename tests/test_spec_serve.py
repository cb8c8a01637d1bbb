"""The serving contract's YAML: SageMaker's transform settings, their defaults and their errors."""

from __future__ import annotations

import tarfile
import textwrap
from pathlib import Path

import pytest

from batchscore.containers import serving_client, serving_environment, transform_config
from batchscore.errors import DeploymentSpecError, PlanError
from batchscore.model_archive import serving_model_dir
from batchscore.plan import run_layout
from batchscore.spec import load_endpoint
from batchscore_runtime.formats import TransformConfig
from tests.helpers import write

SERVE = textwrap.dedent(
    """
    name: blue
    endpoint_name: churn
    contract: serve
    model:
      path: model
    environment:
      image: my-serving-image:1
    input:
      path: data
    output:
      path: out
    """
).lstrip()


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(b"w")
    return tmp_path


def error_of(path: Path) -> str:
    with pytest.raises(DeploymentSpecError) as info:
        load_endpoint(path)
    return str(info.value)


def test_sagemaker_defaults_and_serve_settings_defaults(folder: Path) -> None:
    (d,) = load_endpoint(write(folder / "churn.yaml", SERVE)).deployments

    assert d.contract == "serve" and d.code_configuration is None
    t = d.transform
    assert (t.SplitType, t.BatchStrategy, t.MaxPayloadInMB, t.MaxConcurrentTransforms) == ("None", None, None, None)
    assert (t.CompressionType, t.ContentType, t.Accept, t.AssembleWith) == ("None", None, None, "None")
    assert (t.client_config.InvocationsTimeoutInSeconds, t.client_config.InvocationsMaxRetries) == (600, 3)
    assert (t.data_processing.InputFilter, t.data_processing.OutputFilter, t.data_processing.JoinSource) == (
        "$",
        "$",
        "None",
    )
    # SageMaker fails a job when a file fails, and writes .out files rather than one output.
    assert (d.settings.error_threshold, d.settings.output_action) == (0, "summary_only")
    assert serving_environment(d) == {"SAGEMAKER_BATCH": "true"}  # the other three only when set
    assert transform_config(d) == TransformConfig(startup_timeout=600.0)


def test_a_transform_job_request_copies_over(folder: Path) -> None:
    path = write(
        folder / "churn.yaml",
        SERVE
        + textwrap.dedent(
            """
            transform:
              SplitType: Line
              BatchStrategy: SINGLE_RECORD
              MaxPayloadInMB: 20
              MaxConcurrentTransforms: 4
              CompressionType: Gzip
              ContentType: text/csv
              Accept: text/csv
              AssembleWith: Line
              ModelClientConfig:
                InvocationsTimeoutInSeconds: 30
                InvocationsMaxRetries: 1
              Environment:
                MODEL_THREADS: "2"
              DataProcessing:
                InputFilter: "$[1:]"
                JoinSource: Input
                OutputFilter: "$[0,-1]"
            settings:
              error_threshold: 5
              init_timeout: 60
              environment_variables:
                LOG_FORMAT: json
            """
        ),
    )
    (d,) = load_endpoint(path).deployments

    assert d.transform.BatchStrategy == "SingleRecord"  # the environment's spelling is accepted too
    assert d.settings.error_threshold == 5  # set in the YAML: the serve default does not apply
    assert serving_environment(d) == {
        "LOG_FORMAT": "json",
        "MODEL_THREADS": "2",
        "SAGEMAKER_BATCH": "true",
        "SAGEMAKER_MAX_PAYLOAD_IN_MB": "20",
        "SAGEMAKER_BATCH_STRATEGY": "SINGLE_RECORD",
        "SAGEMAKER_MAX_CONCURRENT_TRANSFORMS": "4",
    }
    assert transform_config(d) == TransformConfig(
        split_type="Line",
        batch_strategy="SINGLE_RECORD",
        max_payload_mb=20,
        max_concurrent_transforms=4,
        compression="Gzip",
        content_type="text/csv",
        accept="text/csv",
        assemble_with="Line",
        invocation_timeout=30.0,
        invocation_max_retries=1,
        input_filter="$[1:]",
        output_filter="$[0,-1]",
        join_source="Input",
        startup_timeout=60.0,
    )
    # The client container mounts the input, its file list and result folder: never the model.
    setup = serving_client(d, run_layout(d, "run-1"), 0, 2, user="1:1", labels={}, serving_id="abc")
    assert setup.network_mode == "container:abc" and not setup.gets_secrets and not setup.devices
    assert [m["Target"] for m in setup.mounts] == [
        "/opt/batchscore/runtime/batchscore_runtime",
        "/mnt/batchscore/input",
        "/mnt/batchscore/minibatch.json",
        "/mnt/batchscore/output",
    ]
    assert setup.command[:3] == ["python3", "-m", "batchscore_runtime.serving"]
    assert TransformConfig.from_json(__import__("json").loads(setup.command[setup.command.index("--transform") + 1])) == (
        transform_config(d)
    )


@pytest.mark.parametrize(
    ("extra", "line", "message"),
    [
        (
            "transform:\n  SplitType: Lines\n",
            13,
            "transform.SplitType: Input should be 'None', 'Line', 'RecordIO' or 'TFRecord' (got 'Lines')",
        ),
        (
            "transform:\n  MaxPayloadInMB: 101\n",
            13,
            "transform.MaxPayloadInMB: Input should be less than or equal to 100 (got 101)",
        ),
        (
            "transform:\n  ModelClientConfig:\n    InvocationsMaxRetries: 4\n",
            14,
            "transform.ModelClientConfig.InvocationsMaxRetries: Input should be less than or equal to 3 (got 4)",
        ),
        (
            "transform:\n  SplitTyp: Line\n",
            13,
            "transform.SplitTyp: unknown key 'SplitTyp'; did you mean 'SplitType'?",
        ),
        (
            "transform:\n  Environment:\n    SAGEMAKER_BATCH_STRATEGY: SINGLE_RECORD\n",
            13,
            "transform.Environment: Environment: SAGEMAKER_BATCH_STRATEGY is set by batchscore from "
            "transform.BatchStrategy; set that instead",
        ),
        (
            "transform:\n  DataProcessing:\n    JoinSource: Input\n",
            13,
            "transform.DataProcessing: DataProcessing needs ContentType text/csv or a JSON type (application/jsonlines, "
            "application/x-jsonlines, application/json) to read records, got None",
        ),
        (
            "transform:\n  ContentType: text/csv\n  DataProcessing:\n    InputFilter: '$[1:]'\n",
            14,
            "transform.DataProcessing: DataProcessing needs SplitType Line (one record per line), got 'None'",
        ),
        (
            "code_configuration:\n  code: .\n  scoring_script: churn.yaml\n",
            12,
            "code_configuration: code_configuration is for contract: azure; a serving container brings its own code",
        ),
        (
            "settings:\n  max_concurrency_per_instance: 4\n",
            13,
            "settings.max_concurrency_per_instance: settings.max_concurrency_per_instance applies to contract: "
            "azure only; for a serving container use transform.MaxConcurrentTransforms",
        ),
        (
            "settings:\n  retry_settings:\n    timeout: 60\n",
            14,
            "settings.retry_settings.timeout: settings.retry_settings.timeout applies to contract: azure only; "
            "for a serving container use "
            "transform.ModelClientConfig.InvocationsTimeoutInSeconds",
        ),
    ],
)
def test_bad_transform_settings_name_file_line_and_key(folder: Path, extra: str, line: int, message: str) -> None:
    path = write(folder / "churn.yaml", SERVE + extra)
    assert error_of(path) == f"{path}:{line}: {message}"


def test_a_bad_jsonpath_is_refused_when_the_yaml_loads(folder: Path) -> None:
    path = write(
        folder / "churn.yaml",
        SERVE + "transform:\n  SplitType: Line\n  ContentType: text/csv\n  DataProcessing:\n    InputFilter: 'features'\n",
    )
    assert error_of(path).startswith(f"{path}:16: transform.DataProcessing.InputFilter: ")


def test_azure_contract_needs_its_script_and_refuses_transform(folder: Path) -> None:
    azure = SERVE.replace("contract: serve\n", "")
    path = write(folder / "churn.yaml", azure + "transform:\n  SplitType: Line\n")
    assert error_of(path) == (
        f"{path}:1: code_configuration: required key is missing\n"
        f"{path}:11: transform: transform is for contract: serve; an Azure scoring script takes settings instead"
    )


def test_model_archive_is_unpacked_once_per_run_and_a_bad_one_is_named(folder: Path) -> None:
    archive = folder / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder / "model" / "weights.bin", arcname="weights.bin")
    (d,) = load_endpoint(write(folder / "churn.yaml", SERVE.replace("path: model", "path: model.tar.gz"))).deployments
    layout = run_layout(d, "run-1")

    unpacked = serving_model_dir(d, layout)
    assert unpacked == layout.model_dir and (unpacked / "weights.bin").read_bytes() == b"w"
    (unpacked / "marker").write_text("kept")
    assert serving_model_dir(d, layout) == unpacked and (unpacked / "marker").is_file()  # not unpacked again
    assert serving_model_dir(d, run_layout(d, "run-2")) != unpacked  # another run has its own

    archive.write_bytes(b"not a tar archive")
    with pytest.raises(PlanError) as info:
        serving_model_dir(d, run_layout(d, "run-3"))
    assert str(info.value).startswith(f"cannot unpack the model archive {archive} (key model.path) of deployment 'blue': ")
    assert not run_layout(d, "run-3").model_dir.exists()


def test_a_model_file_that_is_no_archive_is_refused(folder: Path) -> None:
    (folder / "model.bin").write_bytes(b"x")
    path = write(folder / "churn.yaml", SERVE.replace("path: model", "path: model.bin"))
    assert error_of(path) == (
        f"{path}:5: model.path: model.path {folder / 'model.bin'} must be a folder or a model archive (.tar.gz) "
        "for contract: serve"
    )
