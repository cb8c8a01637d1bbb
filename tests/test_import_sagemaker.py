"""``python -m batchscore import-transform-job``: SageMaker's CreateTransformJob and CreateModel requests as a deployment YAML.

The requests are written with the keys and shapes of AWS's API reference:

* CreateTransformJob, "Request Syntax" (https://docs.aws.amazon.com/sagemaker/latest/APIReference/API_CreateTransformJob.html):
  ``TransformJobName``, ``ModelName``, ``MaxConcurrentTransforms``, ``ModelClientConfig {InvocationsTimeoutInSeconds,
  InvocationsMaxRetries}``, ``MaxPayloadInMB``, ``BatchStrategy``, ``Environment {string: string}``, ``TransformInput
  {DataSource {S3DataSource {S3DataType, S3Uri}}, ContentType, CompressionType, SplitType}``, ``TransformOutput
  {S3OutputPath, Accept, AssembleWith, KmsKeyId}``, ``DataCaptureConfig {DestinationS3Uri, KmsKeyId,
  GenerateInferenceId}``, ``TransformResources {InstanceType, InstanceCount, VolumeKmsKeyId}``, ``DataProcessing
  {InputFilter, OutputFilter, JoinSource}``, ``Tags [{Key, Value}]``, ``ExperimentConfig {ExperimentName, TrialName,
  TrialComponentDisplayName, RunName}``.
* The DataProcessing values are the CSV example of "Associate Prediction Results with Input Records"
  (https://docs.aws.amazon.com/sagemaker/latest/dg/batch-transform-data-processing.html): ``"InputFilter": "$[1:]"``
  (drop the ID column), ``"JoinSource": "Input"``, ``"OutputFilter": "$[0,-1]"`` (keep the ID and the prediction).
* TransformS3DataSource (https://docs.aws.amazon.com/sagemaker/latest/APIReference/API_TransformS3DataSource.html): "A key
  name prefix might look like this: s3://bucketname/exampleprefix/", "A manifest might look like this:
  s3://bucketname/example.manifest".
* CreateModel, "Request Syntax" (https://docs.aws.amazon.com/sagemaker/latest/APIReference/API_CreateModel.html):
  ``ModelName``, ``PrimaryContainer {Image, ModelDataUrl, Environment, Mode, ModelDataSource {S3DataSource {S3Uri,
  S3DataType, CompressionType}}}``, ``Containers [...]``, ``ExecutionRoleArn``, ``VpcConfig {SecurityGroupIds,
  Subnets}``, ``EnableNetworkIsolation``, ``Tags``.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from batchscore.errors import DeploymentSpecError, RequestImportError
from batchscore.import_sagemaker import Note, check_loads, import_transform_job, main
from batchscore.spec import load_endpoint
from tests.helpers import S3_CONN, read_object, upload_tree

REPO = Path(__file__).resolve().parent.parent

JOB: dict[str, Any] = {
    "TransformJobName": "churn-scoring-2026-11-28",
    "ModelName": "churn-xgboost",
    "MaxConcurrentTransforms": 4,
    "ModelClientConfig": {"InvocationsTimeoutInSeconds": 120, "InvocationsMaxRetries": 2},
    "MaxPayloadInMB": 6,
    "BatchStrategy": "MultiRecord",
    "Environment": {"LOG_LEVEL": "info"},
    "TransformInput": {
        "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": "s3://bucketname/exampleprefix/"}},
        "ContentType": "text/csv",
        "CompressionType": "None",
        "SplitType": "Line",
    },
    "TransformOutput": {
        "S3OutputPath": "s3://bucketname/output/",
        "Accept": "text/csv",
        "AssembleWith": "Line",
        "KmsKeyId": "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
    },
    "DataCaptureConfig": {"DestinationS3Uri": "s3://bucketname/capture/", "GenerateInferenceId": True},
    "TransformResources": {
        "InstanceType": "ml.p3.8xlarge",
        "InstanceCount": 2,
        "VolumeKmsKeyId": "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
    },
    "DataProcessing": {"InputFilter": "$[1:]", "JoinSource": "Input", "OutputFilter": "$[0,-1]"},
    "Tags": [{"Key": "team", "Value": "churn"}, {"Key": "cost-center", "Value": "42"}],
    "ExperimentConfig": {"ExperimentName": "churn", "TrialName": "nightly"},
}

MODEL: dict[str, Any] = {
    "ModelName": "churn-xgboost",
    "PrimaryContainer": {
        "Image": "111122223333.dkr.ecr.us-east-1.amazonaws.com/churn-serve:1.4",
        "ModelDataUrl": "s3://bucketname/models/churn/model.tar.gz",
        "Environment": {"MODEL_THREADS": "2", "LOG_LEVEL": "debug"},
        "Mode": "SingleModel",
    },
    "ExecutionRoleArn": "arn:aws:iam::111122223333:role/SageMakerExecution",
    "VpcConfig": {"SecurityGroupIds": ["sg-0123456789abcdef0"], "Subnets": ["subnet-0123456789abcdef0"]},
    "EnableNetworkIsolation": True,
    "Tags": [{"Key": "team", "Value": "models"}, {"Key": "owner", "Value": "ana"}],
}

#: The YAML's document for JOB and MODEL, every value.
DOCUMENT = {
    "name": "churn-xgboost",
    "endpoint_name": "churn-scoring-2026-11-28",
    "contract": "serve",
    "description": "SageMaker transform job churn-scoring-2026-11-28, imported from its CreateTransformJob request.",
    "model": {"name": "churn-xgboost", "path": "s3://bucketname/models/churn/model.tar.gz", "connection": "data_s3"},
    "environment": {"image": "111122223333.dkr.ecr.us-east-1.amazonaws.com/churn-serve:1.4"},
    "input": {"path": "s3://bucketname/exampleprefix/", "pattern": "**/*", "connection": "data_s3"},
    "output": {"path": "s3://bucketname/output/", "connection": "data_s3"},
    "tags": {"team": "churn", "cost-center": "42", "owner": "ana"},
    "transform": {
        "SplitType": "Line",
        "BatchStrategy": "MultiRecord",
        "MaxPayloadInMB": 6,
        "MaxConcurrentTransforms": 4,
        "CompressionType": "None",
        "ContentType": "text/csv",
        "Accept": "text/csv",
        "AssembleWith": "Line",
        "ModelClientConfig": {"InvocationsTimeoutInSeconds": 120, "InvocationsMaxRetries": 2},
        "Environment": {"LOG_LEVEL": "info", "MODEL_THREADS": "2"},
        "DataProcessing": {"InputFilter": "$[1:]", "JoinSource": "Input", "OutputFilter": "$[0,-1]"},
    },
    "resources": {"instance_count": 2, "gpus": 4},
}

NOT_CARRIED = [
    Note(
        "TransformOutput.KmsKeyId",
        "batchscore writes objects with the bucket's default encryption: make that key the bucket's default "
        "(SSE-KMS, aws s3api put-bucket-encryption) to have the outputs encrypted with it",
    ),
    Note(
        "TransformResources.VolumeKmsKeyId",
        "the files of a mini-batch are staged in BATCHSCORE_SCRATCH_DIR on the worker host: encrypt that disk",
    ),
    Note(
        "DataCaptureConfig",
        "batchscore does not copy inputs and outputs to a capture location for Model Monitor; each run's plan (the "
        "input objects and their versions), .out files, ledger and errors stay in <output.path>/<run id>/",
    ),
    Note("ExperimentConfig", "no SageMaker Experiments here: each run is an Airflow DAG run, with its summary.json"),
    Note(
        "CreateModel.ExecutionRoleArn",
        "an IAM role SageMaker assumes; here S3 is read and written with the credentials of the Airflow connection "
        "named by connection: (--connection), or of the worker host",
    ),
    Note(
        "CreateModel.VpcConfig",
        "the serving container has no network at all (resources.network: false), and the S3 transfers are made by "
        "the Airflow workers, on their hosts' network",
    ),
]

MAPPED_FIELDS = [
    "TransformInput.DataSource.S3DataSource.S3Uri",
    "TransformOutput.S3OutputPath",
    "TransformResources.InstanceCount",
    "TransformResources.InstanceType",
    "CreateModel.PrimaryContainer.Image",
    "CreateModel.PrimaryContainer.Environment.LOG_LEVEL",
]


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


def requests(tmp_path: Path, job: dict | None = None, model: dict | None = None) -> tuple[Path, Path]:
    return write_json(tmp_path / "job.json", job or JOB), write_json(tmp_path / "model.json", model or MODEL)


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m batchscore import-transform-job ...``, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "batchscore", "import-transform-job", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=os.environ.copy(),
        timeout=120,
    )


def run_main(*paths: Path | None, connection: str | None = None) -> tuple[int, str, str]:
    """The command in-process: its exit status, stdout and stderr."""
    request, model = paths[0], paths[1] if len(paths) > 1 else None
    stdout, stderr = io.StringIO(), io.StringIO()
    old, sys.stdout = sys.stdout, stdout
    try:
        status = main(request, model, None, connection, stderr)  # type: ignore[arg-type]
    finally:
        sys.stdout = old
    return status, stdout.getvalue(), stderr.getvalue()


# ------------------------------------------------------------------------------------------------ what is carried


def test_the_request_and_its_model_become_the_serve_contract_s_keys(tmp_path: Path) -> None:
    job, model = requests(tmp_path)
    imported = import_transform_job(job, model, connection="data_s3")

    assert imported.document == DOCUMENT
    assert imported.not_carried == NOT_CARRIED
    assert [n.field for n in imported.mapped] == MAPPED_FIELDS
    assert imported.todo == []
    mapped = {n.field: n.reason for n in imported.mapped}
    assert mapped["TransformResources.InstanceType"] == (
        "ml.p3.8xlarge has NVIDIA GPUs: resources.gpus: 4, leased on the worker host for each serving container; "
        "its vCPUs and memory are not carried (the container shares the host; resources.memory sets a limit)"
    )
    assert mapped["TransformOutput.S3OutputPath"] == (
        "output.path; each run writes into a folder of its own, s3://bucketname/output/<run id>/: the .out files "
        "(<input file>.out, subfolders kept) beside summary.json, processed_mini-batches.csv and errors.csv"
    )
    assert mapped["CreateModel.PrimaryContainer.Environment.LOG_LEVEL"] == (
        "also set by the transform job; its value 'info' is kept"
    )


def test_the_command_writes_a_yaml_that_loads_with_the_lists_on_stderr_and_at_its_top(tmp_path: Path) -> None:
    job, model = requests(tmp_path)
    out = tmp_path / "deployments" / "churn.yaml"

    result = cli(str(job), "--model", str(model), "-o", str(out), "--connection", "data_s3", cwd=REPO)

    assert (result.returncode, result.stdout) == (0, "")
    imported = import_transform_job(job, model, connection="data_s3")
    report = imported.report()
    assert result.stderr == "\n".join(report) + f"\nwrote {out}\n"
    assert report[report.index("Not carried over (6):") + 1 :][:3] == [
        "  - TransformOutput.KmsKeyId: batchscore writes objects with the bucket's default encryption: make",
        "    that key the bucket's default (SSE-KMS, aws s3api put-bucket-encryption) to have the outputs",
        "    encrypted with it",
    ]
    text = out.read_text(encoding="utf-8")
    head = [line for line in text.splitlines() if line.startswith("#")]
    assert head[:3] == [
        "# Made by `python -m batchscore import-transform-job` from:",
        f"#   CreateTransformJob request: {job}",
        f"#   CreateModel request: {model}",
    ]
    assert head[3:] == [f"# {line}".rstrip() for line in report]
    assert yaml.safe_load(text) == DOCUMENT

    (d,) = load_endpoint(out).deployments  # batchscore's own loader
    t = d.transform
    assert (d.contract, d.name, str(d.model.path), d.model.connection) == (
        "serve",
        "churn-xgboost",
        "s3://bucketname/models/churn/model.tar.gz",
        "data_s3",
    )
    assert (t.SplitType, t.BatchStrategy, t.MaxPayloadInMB, t.MaxConcurrentTransforms) == ("Line", "MultiRecord", 6, 4)
    assert (t.client_config.InvocationsTimeoutInSeconds, t.client_config.InvocationsMaxRetries) == (120, 2)
    assert (t.data_processing.InputFilter, t.data_processing.JoinSource, t.data_processing.OutputFilter) == (
        "$[1:]",
        "Input",
        "$[0,-1]",
    )
    assert (d.resources.instance_count, d.resources.gpus) == (2, 4)
    assert (d.settings.error_threshold, d.settings.output_action) == (0, "summary_only")  # SageMaker's behaviour
    assert load_endpoint(out).tags == {"team": "churn", "cost-center": "42", "owner": "ana"}


def test_without_the_model_the_yaml_has_placeholders_and_does_not_load_until_they_are_filled(tmp_path: Path) -> None:
    job, _ = requests(tmp_path)
    out = tmp_path / "churn.yaml"

    result = cli(str(job), "-o", str(out), cwd=tmp_path)

    assert result.returncode == 0
    assert result.stderr.splitlines()[:4] == [
        "To fill in before it loads (1):",
        "  - model.path, environment.image: no CreateModel request given (--model): copy",
        "    PrimaryContainer.ModelDataUrl and Image of model churn-xgboost (aws sagemaker describe-model",
        "    --model-name churn-xgboost), or run the import again with --model",
    ]
    assert result.stderr.endswith(f"wrote {out} (fill in the placeholders above before it loads)\n")
    with pytest.raises(DeploymentSpecError) as info:
        load_endpoint(out)
    message = str(info.value)
    assert "model.path: path " in message and "<PrimaryContainer.ModelDataUrl of model churn-xgboost> does not exist" in message
    assert "environment.image: '<PrimaryContainer.Image of model churn-xgboost>' is not a valid image reference" in message
    doc = yaml.safe_load(out.read_text())
    doc["model"]["path"], doc["environment"]["image"] = "s3://bucketname/m/model.tar.gz", "churn-serve:1.4"
    filled = tmp_path / "filled.yaml"
    filled.write_text(yaml.safe_dump(doc))
    assert load_endpoint(filled).deployments[0].transform.ContentType == "text/csv"  # the rest loads as it is


def test_without_o_the_yaml_goes_to_stdout(tmp_path: Path) -> None:
    job, model = requests(tmp_path)
    status, stdout, stderr = run_main(job, model)
    assert status == 0 and "Not carried over (6):" in stderr
    assert yaml.safe_load(stdout) == {
        **DOCUMENT,
        "model": {"name": "churn-xgboost", "path": "s3://bucketname/models/churn/model.tar.gz"},
        "input": {"path": "s3://bucketname/exampleprefix/", "pattern": "**/*"},
        "output": {"path": "s3://bucketname/output/"},
    }


# ------------------------------------------------------------------------------------------------ how fields map


@pytest.mark.parametrize(
    ("uri", "path", "pattern"),
    [
        ("s3://bucketname/exampleprefix/", "s3://bucketname/exampleprefix/", "**/*"),
        ("s3://bucketname/exampleprefix", "s3://bucketname/exampleprefix/", "**/*"),
        ("s3://bucketname/batch/test.csv", "s3://bucketname/batch/", "test.csv*"),
        ("s3://bucketname/batch/part[1].csv", "s3://bucketname/batch/", "part[[]1].csv*"),
    ],
)
def test_an_s3_prefix_becomes_input_path_and_pattern(tmp_path: Path, uri: str, path: str, pattern: str) -> None:
    job = copy.deepcopy(JOB)
    job["TransformInput"]["DataSource"]["S3DataSource"]["S3Uri"] = uri
    imported = import_transform_job(requests(tmp_path, job)[0], tmp_path / "model.json")
    assert imported.document["input"] == {"path": path, "pattern": pattern}


def test_a_prefix_without_a_slash_says_which_keys_sagemaker_would_also_read(tmp_path: Path) -> None:
    job = copy.deepcopy(JOB)
    job["TransformInput"]["DataSource"]["S3DataSource"]["S3Uri"] = "s3://bucketname/batch/input"
    imported = import_transform_job(requests(tmp_path, job)[0])
    (note,) = [n for n in imported.mapped if n.field == "TransformInput.DataSource.S3DataSource.S3Uri"]
    assert note.reason == (
        'input.path s3://bucketname/batch/input/ with input.pattern "**/*": the folder input/, at any depth; SageMaker '
        "would also read keys that merely start with 'input' (input.csv, input-2/...): if you meant those, set "
        "input.path to s3://bucketname/batch/ and input.pattern to 'input*'"
    )


@pytest.mark.parametrize(
    ("instance_type", "gpus", "note"),
    [
        ("ml.g4dn.xlarge", 1, None),
        ("ml.g5.12xlarge", 4, None),
        ("ml.p4d.24xlarge", 8, None),
        (
            "ml.m5.xlarge",
            None,
            "ml.m5.xlarge is a CPU instance: the serving container runs on an Airflow worker's host, with no CPU or "
            "memory reserved (resources.memory sets a limit; resources.queue picks the hosts)",
        ),
        (
            "ml.inf1.xlarge",
            None,
            "ml.inf1.xlarge's AWS Inferentia/Trainium chips have no equivalent here: the image must run on CPU or an "
            "NVIDIA GPU (resources.gpus)",
        ),
    ],
)
def test_the_instance_type_gives_gpus_or_is_listed(
    tmp_path: Path, instance_type: str, gpus: int | None, note: str | None
) -> None:
    job = copy.deepcopy(JOB)
    job["TransformResources"] = {"InstanceType": instance_type, "InstanceCount": 1}
    job_path, model_path = requests(tmp_path, job)
    imported = import_transform_job(job_path, model_path)
    assert imported.document["resources"].get("gpus") == gpus
    listed = [n.reason for n in imported.not_carried if n.field == "TransformResources.InstanceType"]
    assert listed == ([note] if note else [])
    assert run_main(job_path, model_path)[0] == 0  # and it loads


def test_zeros_reserved_environment_and_describe_answers(tmp_path: Path) -> None:
    # aws sagemaker describe-transform-job answers with the request's keys plus the job's state.
    job = {
        **copy.deepcopy(JOB),
        "MaxPayloadInMB": 0,
        "MaxConcurrentTransforms": 0,
        "Environment": {"SAGEMAKER_BATCH": "true", "SAGEMAKER_SUBMIT_DIRECTORY": "s3://bucketname/code/sourcedir.tar.gz"},
        "TransformJobArn": "arn:aws:sagemaker:us-east-1:111122223333:transform-job/churn-scoring-2026-11-28",
        "TransformJobStatus": "Completed",
        "CreationTime": 1764288000.0,
        "BatchDataCaptureConfig": {"DestinationS3Uri": "s3://bucketname/capture/"},
    }
    for key in ("DataCaptureConfig", "ExperimentConfig", "Tags"):
        del job[key]
    job["TransformOutput"].pop("KmsKeyId")
    job["TransformResources"].pop("VolumeKmsKeyId")
    model = {**MODEL, "ModelArn": "arn:aws:sagemaker:us-east-1:111122223333:model/churn-xgboost", "EnableNetworkIsolation": False}
    del model["VpcConfig"], model["ExecutionRoleArn"]
    imported = import_transform_job(*requests(tmp_path, job, model))

    assert imported.not_carried == [
        Note(
            "MaxPayloadInMB",
            "0 asks for unlimited payloads sent with HTTP chunked encoding, which batchscore does not do; left unset: the "
            "container's /execution-parameters answer, else 6 MB. Set transform.MaxPayloadInMB (1 to 100) if a record or "
            "file is bigger",
        ),
        Note("Environment.SAGEMAKER_BATCH", "set by batchscore (true)"),
        Note("TransformJobArn", "a field of the Describe... answer (the job's or model's state), not a setting"),
        Note("TransformJobStatus", "a field of the Describe... answer (the job's or model's state), not a setting"),
        Note("CreationTime", "a field of the Describe... answer (the job's or model's state), not a setting"),
        Note("BatchDataCaptureConfig", "not a field of CreateTransformJob in AWS's API reference (a typo, or a newer field?)"),
        Note(
            "CreateModel.EnableNetworkIsolation",
            "false is not carried: the serving container has no network unless resources.network: true",
        ),
        Note("CreateModel.ModelArn", "a field of the Describe... answer (the job's or model's state), not a setting"),
    ]
    transform = imported.document["transform"]
    assert "MaxPayloadInMB" not in transform and "MaxConcurrentTransforms" not in transform
    assert transform["Environment"] == {
        "SAGEMAKER_SUBMIT_DIRECTORY": "s3://bucketname/code/sourcedir.tar.gz",
        "MODEL_THREADS": "2",
        "LOG_LEVEL": "debug",
    }
    mapped = {n.field: n.reason for n in imported.mapped}
    assert mapped["MaxConcurrentTransforms"] == "0 means unset, as in SageMaker: the container's answer, else 1"
    assert mapped["Environment.SAGEMAKER_SUBMIT_DIRECTORY"] == (
        "names s3://bucketname/code/sourcedir.tar.gz: the serving container has no network and no AWS credentials, so "
        "it cannot fetch it; put what it points at in the image or the model archive"
    )


def test_an_uncompressed_model_prefix_and_a_one_container_list(tmp_path: Path) -> None:
    container = {
        "Image": "churn-serve:1.4",
        "ModelDataSource": {
            "S3DataSource": {"S3Uri": "s3://bucketname/models/churn/", "S3DataType": "S3Prefix", "CompressionType": "None"}
        },
    }
    model = {"ModelName": "churn-xgboost", "Containers": [container]}
    imported = import_transform_job(*requests(tmp_path, JOB, model))
    assert imported.document["model"] == {"name": "churn-xgboost", "path": "s3://bucketname/models/churn/"}
    assert imported.document["environment"] == {"image": "churn-serve:1.4"}
    assert (
        Note(
            "CreateModel.Containers[0].ModelDataSource.S3DataSource.S3Uri",
            "model.path: every object under the prefix, as a folder",
        )
        in imported.mapped
    )


# ------------------------------------------------------------------------------------------------ refused


def broken(data: dict, path: str, value: Any) -> dict:
    """``data`` with the field at the dotted ``path`` set to ``value`` (``...`` removes it)."""
    data = copy.deepcopy(data)
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node[part]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return data


@pytest.mark.parametrize(
    ("job", "model", "message"),
    [
        (broken(JOB, "ModelName", ...), None, "{job}: ModelName: missing; CreateTransformJob requires it"),
        (
            broken(JOB, "TransformInput.DataSource", ...),
            None,
            "{job}: TransformInput.DataSource: missing; CreateTransformJob requires it",
        ),
        (
            broken(JOB, "TransformResources.InstanceCount", "2"),
            None,
            "{job}: TransformResources.InstanceCount: must be a whole number, got '2'",
        ),
        (
            broken(JOB, "TransformOutput.S3OutputPath", "/data/out"),
            None,
            "{job}: TransformOutput.S3OutputPath: must be an s3:// URI, got '/data/out'",
        ),
        (
            broken(
                JOB,
                "TransformInput.DataSource.S3DataSource",
                {"S3DataType": "ManifestFile", "S3Uri": "s3://bucketname/example.manifest"},
            ),
            None,
            "{job}: TransformInput.DataSource.S3DataSource.S3DataType: ManifestFile (a list of object keys) cannot be "
            "carried over: batchscore reads every object under one prefix that matches one pattern (input.path, "
            "input.pattern); put the objects under one prefix and give it with S3DataType S3Prefix",
        ),
        (
            broken(JOB, "MaxPayloadInMB", 200),
            None,
            "{job}: MaxPayloadInMB: Input should be less than or equal to 100 (got 200) (YAML key transform.MaxPayloadInMB)",
        ),
        (
            broken(JOB, "TransformOutput.S3OutputPath", "s3://bucketname/exampleprefix"),
            None,
            "{job}: TransformOutput.S3OutputPath: output.path s3://bucketname/exampleprefix is the input folder; the plan "
            "never reads files inside the output folder, so no input file would be left; write the output to another "
            "folder (a subfolder of the input folder is fine) (YAML key output.path)",
        ),
        (
            JOB,
            broken(MODEL, "ModelName", "churn-lightgbm"),
            "{model}: ModelName: 'churn-lightgbm' is not the transform job's ModelName 'churn-xgboost' (in {job}); give "
            "the CreateModel request of model 'churn-xgboost'",
        ),
        (
            JOB,
            {"ModelName": "churn-xgboost", "Containers": [MODEL["PrimaryContainer"], {"Image": "post:1"}]},
            "{model}: Containers: 2 containers (an inference pipeline) cannot be carried over: batchscore sends each "
            "request to one serving container; put the steps in one image, or make one deployment per model",
        ),
        (
            JOB,
            broken(MODEL, "PrimaryContainer.Mode", "MultiModel"),
            "{model}: PrimaryContainer.Mode: MultiModel (one container serving many models from a prefix) cannot be "
            "carried over: batchscore gives a serving container one model; make one deployment per model",
        ),
        (
            JOB,
            broken(MODEL, "PrimaryContainer.ModelDataUrl", "s3://bucketname/models/churn/model"),
            "{model}: PrimaryContainer.ModelDataUrl: s3://bucketname/models/churn/model does not end with .tar.gz: "
            "batchscore unpacks a model object into /opt/ml/model only when its name ends with .tar.gz or .tgz; copy it "
            "to such a key",
        ),
        (
            JOB,
            broken(MODEL, "PrimaryContainer.Image", "Churn_Serve"),
            "{model}: PrimaryContainer.Image: 'Churn_Serve' is not a valid image reference: repository "
            "names must be lowercase, and 'Churn_Serve' is not (did you mean 'churn_serve'?) (YAML key environment.image)",
        ),
    ],
)
def test_what_cannot_be_imported_is_refused_naming_the_file_and_the_field(
    tmp_path: Path, job: dict, model: dict | None, message: str
) -> None:
    job_path = write_json(tmp_path / "job.json", job)
    model_path = write_json(tmp_path / "model.json", model) if model is not None else None
    with pytest.raises(RequestImportError) as info:
        check_loads(import_transform_job(job_path, model_path))
    assert str(info.value) == message.format(job=job_path, model=model_path)
    status, stdout, stderr = run_main(job_path, model_path)
    assert (status, stdout, stderr) == (2, "", f"error: {message.format(job=job_path, model=model_path)}\n")


def test_invalid_json_exits_with_2_and_writes_nothing(tmp_path: Path) -> None:
    job = tmp_path / "job.json"
    job.write_text('{"TransformJobName": "churn",\n  "ModelName": }\n', encoding="utf-8")
    out = tmp_path / "out.yaml"

    result = cli(str(job), "-o", str(out), cwd=tmp_path)

    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f"error: {job}: not valid JSON: Expecting value at line 2, column 16; give the CreateTransformJob request as "
        "JSON (aws sagemaker create-transform-job --generate-cli-skeleton shows its form)\n"
    )
    assert list(tmp_path.iterdir()) == [job]


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.s3
@pytest.mark.docker
def test_an_imported_job_runs_unchanged_on_s3_and_writes_sagemaker_s_out_files(
    airflow_db,
    serving_image: str,
    iris_example: Path,
    tmp_path: Path,
    s3,  # noqa: F811 - the fixture imported above
    monkeypatch,
) -> None:
    from batchscore import storage
    from batchscore_runtime.formats import Summary, run_key
    from tests.helpers import run_dag
    from tests.test_serving_contract import containers_left, expected_predictions

    bucket = s3["uri"]
    archive = iris_example / "model" / "iris-classifier.tar.gz"
    storage.upload(archive, storage.location(f"{bucket}/models/iris/model.tar.gz", S3_CONN))
    upload_tree(iris_example / "data-serve", f"{bucket}/transform-input")  # headerless id,features CSV
    job = {
        "TransformJobName": "iris-transform-job",
        "ModelName": "iris-model",
        "BatchStrategy": "MultiRecord",
        "TransformInput": {
            "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": f"{bucket}/transform-input/"}},
            "ContentType": "text/csv",
            "SplitType": "Line",
        },
        "TransformOutput": {"S3OutputPath": f"{bucket}/transform-output/", "Accept": "text/csv", "AssembleWith": "Line"},
        "TransformResources": {"InstanceType": "ml.m5.xlarge", "InstanceCount": 2},
        "DataProcessing": {"InputFilter": "$[1:]", "JoinSource": "Input", "OutputFilter": "$[0,-1]"},
    }
    model = {
        "ModelName": "iris-model",
        "PrimaryContainer": {"Image": serving_image, "ModelDataUrl": f"{bucket}/models/iris/model.tar.gz"},
        "ExecutionRoleArn": "arn:aws:iam::111122223333:role/SageMakerExecution",
    }
    job_path, model_path = requests(tmp_path, job, model)
    out = tmp_path / "deployments" / "iris.yaml"
    result = cli(str(job_path), "--model", str(model_path), "-o", str(out), "--connection", S3_CONN, cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    dag_run, _ = run_dag(out, monkeypatch)  # the YAML as written, not edited

    assert dag_run.state == "success"
    run_uri = f"{bucket}/transform-output/{run_key(dag_run.run_id)}"
    expected = expected_predictions(iris_example / "model" / "iris-classifier", iris_example / "data-serve")
    objects = storage.list_objects(storage.location(run_uri, S3_CONN))
    outs = sorted(o.name for o in objects if o.name.endswith(".out") and "/" not in o.name)  # not the work files
    assert outs == [f"iris-{n:03d}.csv.out" for n in range(15)]
    joined = [line for name in outs for line in read_object(f"{run_uri}/{name}").decode().splitlines()]
    assert joined == expected  # id,prediction per input row, as SageMaker's join and filter give
    summary = Summary.from_json(json.loads(read_object(f"{run_uri}/summary.json")))
    assert (summary.status, summary.rows, summary.custom_outputs.files) == (Summary.SUCCEEDED, 150, 15)
    assert containers_left("iris-transform-job") == []


def test_the_guide_s_before_and_after_is_what_the_command_writes(tmp_path: Path) -> None:
    guide = (REPO / "docs" / "migrate-sagemaker.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```(json|yaml)\n(.*?)```", guide, flags=re.S)
    job_text, model_text = (text for kind, text in blocks if kind == "json")
    (yaml_text,) = (text for kind, text in blocks if kind == "yaml")
    assert (json.loads(job_text), json.loads(model_text)) == (JOB, MODEL)
    write_json(tmp_path / "job.json", JOB), write_json(tmp_path / "model.json", MODEL)

    result = cli("job.json", "--model", "model.json", "--connection", "data_s3", "-o", "churn.yaml", cwd=tmp_path)

    assert result.returncode == 0
    assert (tmp_path / "churn.yaml").read_text(encoding="utf-8") == yaml_text
