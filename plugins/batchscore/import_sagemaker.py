"""SageMaker's ``CreateTransformJob`` request (and its model's ``CreateModel`` request) as a deployment YAML.

``python -m batchscore import-transform-job REQUEST.json [--model CREATE_MODEL.json] [-o OUT.yaml]``: the
request's settings are carried over to the serving contract's keys (``contract: serve``; the ``transform:`` keys
are ``CreateTransformJob``'s own names), its data and model locations become ``input``, ``output`` and ``model``
on ``s3://``, and its instances become ``resources``. Every field that cannot be carried over is listed with the
reason, on stderr and as a comment block at the top of the YAML; fields carried over with a change of meaning are
listed the same way. The YAML is loaded with batchscore's own loader before it is written: what this writes loads.

A request that cannot be run as it says (a manifest of input keys, an inference pipeline of several containers, a
multi-model container) is refused, naming the file and the field, rather than turned into a job that does something
else. The answers of ``aws sagemaker describe-transform-job`` and ``describe-model`` are accepted too: their state
fields (``TransformJobStatus``, ``CreationTime``...) are listed as not carried.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from batchscore.errors import DeploymentSpecError, RequestImportError
from batchscore.spec.base import short
from batchscore.spec.deployment import MODEL_ARCHIVE_SUFFIXES
from batchscore.spec.loading import load_endpoint
from batchscore.spec.transform import SAGEMAKER_ENVIRONMENT

#: Fields of DescribeTransformJob's and DescribeModel's answers that record a job's or a model's state, not a setting.
RESPONSE_FIELDS = frozenset(
    {
        "TransformJobArn", "TransformJobStatus", "FailureReason", "CreationTime", "TransformStartTime",
        "TransformEndTime", "LabelingJobArn", "AutoMLJobArn", "ModelArn", "DeploymentRecommendation",
        "ResponseMetadata",
    }
)  # fmt: skip
#: GPUs of SageMaker's GPU instance types with more than one (ml.p*, ml.g*); the other sizes of ml.g4dn, g5, g6,
#: g6e have one. From AWS's instance type pages.
GPU_COUNTS = {
    "ml.p2.xlarge": 1, "ml.p2.8xlarge": 8, "ml.p2.16xlarge": 16,
    "ml.p3.2xlarge": 1, "ml.p3.8xlarge": 4, "ml.p3.16xlarge": 8, "ml.p3dn.24xlarge": 8,
    "ml.p4d.24xlarge": 8, "ml.p4de.24xlarge": 8, "ml.p5.48xlarge": 8, "ml.p5e.48xlarge": 8, "ml.p5en.48xlarge": 8,
}  # fmt: skip
_MULTI_GPU_SIZES = {"12xlarge": 4, "24xlarge": 4, "48xlarge": 8}
_ONE_GPU_FAMILIES = ("g4dn", "g5", "g6", "g6e")

#: The order of the keys under ``transform:`` (TransformSettings' own).
TRANSFORM_ORDER = (
    "SplitType", "BatchStrategy", "MaxPayloadInMB", "MaxConcurrentTransforms", "CompressionType", "ContentType",
    "Accept", "AssembleWith", "ModelClientConfig", "Environment", "DataProcessing",
)  # fmt: skip
NOT_A_SETTING = "a field of the Describe... answer (the job's or model's state), not a setting"
UNKNOWN = "not a field of {api} in AWS's API reference (a typo, or a newer field?)"


@dataclass(frozen=True)
class Note:
    """One field of a request and what became of it: why it is not carried over, or how its meaning changes."""

    field: str
    reason: str

    def format(self) -> str:
        return f"{self.field}: {self.reason}"


@dataclass
class Imported:
    """The deployment YAML made from a request: its document, and the fields mapped, not carried, or left to fill."""

    document: dict[str, Any]
    request: Path
    sources: list[str]
    mapped: list[Note] = field(default_factory=list)
    not_carried: list[Note] = field(default_factory=list)
    todo: list[Note] = field(default_factory=list)
    #: YAML key (dotted) -> (file, request field) it came from, to name the field when the YAML does not load.
    origin: dict[str, tuple[Path, str]] = field(default_factory=dict)

    def report(self) -> list[str]:
        """The lists, as lines (the YAML's comment block without ``#``, and what stderr shows)."""
        lines: list[str] = []
        for title, notes in (
            ("To fill in before it loads", self.todo),
            ("Carried over with a change of meaning", self.mapped),
            ("Not carried over", self.not_carried),
        ):
            if notes:
                lines.append(f"{title} ({len(notes)}):")
                for note in notes:
                    lines += textwrap.wrap(
                        note.format(), 100, initial_indent="  - ", subsequent_indent="    ",
                        break_on_hyphens=False, break_long_words=False,
                    )  # fmt: skip
        return lines

    def checkable_text(self) -> str:
        """The YAML with any placeholder replaced by a value that loads, to check everything else."""
        if not self.todo:
            return self.yaml_text()
        doc = {**self.document, "environment": {"image": "placeholder:latest"}}
        doc["model"] = {**doc["model"], "path": "s3://placeholder/model.tar.gz"}
        return yaml.safe_dump(doc, sort_keys=False)

    def yaml_text(self) -> str:
        """The YAML file: the comment block, then the document."""
        head = ["Made by `python -m batchscore import-transform-job` from:", *(f"  {s}" for s in self.sources)]
        comments = "".join(f"# {line}".rstrip() + "\n" for line in head + self.report())
        body = yaml.safe_dump(self.document, sort_keys=False, allow_unicode=True, width=120)
        return comments + body


class _Fields:
    """A JSON object of a request, read field by field with type checks; errors name the file and the field."""

    def __init__(self, path: Path, data: dict[str, Any], prefix: str = "", api: str = "CreateTransformJob"):
        self.path, self.data, self.prefix, self.api = path, data, prefix, api
        self.read: set[str] = set()

    def name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def error(self, key: str, message: str) -> RequestImportError:
        return RequestImportError(f"{self.path}: {self.name(key)}: {message}")

    def get(self, key: str, kind: type | tuple[type, ...], *, required: bool = False) -> Any:
        self.read.add(key)
        value = self.data.get(key)
        if value is None:
            if required:
                raise self.error(key, f"missing; {self.api} requires it")
            return None
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.error(key, f"must be {_KIND_WORDS[kind]}, got {short(value)}")
        return value

    def sub(self, key: str, *, required: bool = False) -> _Fields | None:
        value = self.get(key, dict, required=required)
        return None if value is None else _Fields(self.path, value, f"{self.prefix}{key}.", self.api)

    def uri(self, key: str, *, required: bool = True) -> str | None:
        value = self.get(key, str, required=required)
        if value is not None and not value.lower().startswith("s3://"):
            raise self.error(key, f"must be an s3:// URI, got {short(value)}")
        return value

    def rest(self) -> list[str]:
        """The keys not read (yet)."""
        return [k for k in self.data if k not in self.read]


_KIND_WORDS: dict[Any, str] = {
    dict: "a JSON object",
    list: "a JSON list",
    str: "a string",
    int: "a whole number",
    bool: "true or false",
    (dict, str): "a JSON object or a string",
}


def read_request(path: Path, what: str) -> dict[str, Any]:
    """A request file's JSON object. :raises RequestImportError: unreadable, not JSON, or not an object."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RequestImportError(f"{path}: cannot read the {what} request: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestImportError(
            f"{path}: not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}; "
            f"give the {what} request as JSON (aws sagemaker {_cli(what)} --generate-cli-skeleton shows its form)"
        ) from None
    if not isinstance(data, dict):
        raise RequestImportError(f"{path}: the top level must be a JSON object (a {what} request), not {short(data)}")
    return data


def _cli(what: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"-\1", what).lower()


def import_transform_job(request: Path, model: Path | None = None, *, connection: str | None = None) -> Imported:
    """The deployment YAML's document made from a ``CreateTransformJob`` request and, optionally, its ``CreateModel``.

    :param request: the ``CreateTransformJob`` request (JSON; a ``describe-transform-job`` answer also works).
    :param model: the ``CreateModel`` request of the job's ``ModelName``; without it, ``model.path`` and
        ``environment.image`` are placeholders to fill in (the YAML does not load until they are).
    :param connection: the Airflow connection written as ``connection:`` of ``model``, ``input`` and ``output``.
    :raises RequestImportError: a file is not JSON, a required field is missing or has the wrong type, the model's
        ``ModelName`` is not the job's, or a field says something batchscore cannot run (named in the message).
    """
    job = _Fields(Path(request), read_request(request, "CreateTransformJob"))
    sources = [f"CreateTransformJob request: {request}"]
    doc: dict[str, Any] = {}
    out = Imported(doc, job.path, sources)
    job_name = job.get("TransformJobName", str, required=True)
    model_name = job.get("ModelName", str, required=True)
    doc["name"] = model_name
    doc["endpoint_name"] = job_name
    doc["contract"] = "serve"
    doc["description"] = f"SageMaker transform job {job_name}, imported from its CreateTransformJob request."
    out.origin.update({"name": (job.path, "ModelName"), "endpoint_name": (job.path, "TransformJobName")})
    located = {"connection": connection} if connection else {}
    transform: dict[str, Any] = {}
    environment: dict[str, str] = {}
    tags: dict[str, str] = {}

    # TransformInput
    tin = job.sub("TransformInput", required=True)
    assert tin is not None
    data_source = tin.sub("DataSource", required=True)
    assert data_source is not None
    s3 = data_source.sub("S3DataSource", required=True)
    assert s3 is not None
    data_type = s3.get("S3DataType", str, required=True)
    uri = s3.uri("S3Uri")
    assert uri is not None
    if data_type in ("ManifestFile", "AugmentedManifestFile"):
        raise s3.error(
            "S3DataType",
            f"{data_type} (a list of object keys) cannot be carried over: batchscore reads every object under one "
            "prefix that matches one pattern (input.path, input.pattern); put the objects under one prefix and "
            "give it with S3DataType S3Prefix",
        )
    if data_type != "S3Prefix":
        raise s3.error("S3DataType", f"must be S3Prefix (or ManifestFile, which is refused), got {short(data_type)}")
    doc_input = {**_input(out, s3.name("S3Uri"), uri), **located}
    out.origin["input"] = (job.path, s3.name("S3Uri"))
    for key in ("ContentType", "CompressionType", "SplitType"):
        _carry(out, tin, key, str, transform)
    _rest(out, s3, data_source, tin)

    # TransformOutput
    tout = job.sub("TransformOutput", required=True)
    assert tout is not None
    output = tout.uri("S3OutputPath")
    assert output is not None  # required
    doc_output = {"path": output, **located}
    out.origin["output"] = (job.path, tout.name("S3OutputPath"))
    out.mapped.append(
        Note(
            tout.name("S3OutputPath"),
            f"output.path; each run writes into a folder of its own, {output.rstrip('/')}/<run id>/: the .out "
            "files (<input file>.out, subfolders kept) beside summary.json, processed_mini-batches.csv and errors.csv",
        )
    )
    for key in ("Accept", "AssembleWith"):
        _carry(out, tout, key, str, transform)
    if tout.get("KmsKeyId", str) is not None:
        _skip(
            out,
            tout.name("KmsKeyId"),
            "batchscore writes objects with the bucket's default encryption: make that key the bucket's default "
            "(SSE-KMS, aws s3api put-bucket-encryption) to have the outputs encrypted with it",
        )
    _rest(out, tout)

    # the job's own settings
    for key, kind in (("BatchStrategy", str), ("ModelClientConfig", dict), ("DataProcessing", dict)):
        _carry(out, job, key, kind, transform)
    payload = job.get("MaxPayloadInMB", int)
    if payload == 0:
        _skip(
            out,
            "MaxPayloadInMB",
            "0 asks for unlimited payloads sent with HTTP chunked encoding, which batchscore does not do; left "
            "unset: the container's /execution-parameters answer, else 6 MB. Set transform.MaxPayloadInMB (1 to 100) "
            "if a record or file is bigger",
        )
    elif payload is not None:
        transform["MaxPayloadInMB"] = payload
        out.origin["transform.MaxPayloadInMB"] = (job.path, "MaxPayloadInMB")
    concurrent = job.get("MaxConcurrentTransforms", int)
    if concurrent == 0:
        out.mapped.append(Note("MaxConcurrentTransforms", "0 means unset, as in SageMaker: the container's answer, else 1"))
    elif concurrent is not None:
        transform["MaxConcurrentTransforms"] = concurrent
        out.origin["transform.MaxConcurrentTransforms"] = (job.path, "MaxConcurrentTransforms")
    _environment(out, job, environment)
    _tags(out, job, tags, override=True)

    # TransformResources
    resources = job.sub("TransformResources", required=True)
    assert resources is not None
    instance_type = resources.get("InstanceType", str, required=True)
    count = resources.get("InstanceCount", int, required=True)
    doc_resources: dict[str, Any] = {"instance_count": count}
    out.origin["resources.instance_count"] = (job.path, resources.name("InstanceCount"))
    out.mapped.append(
        Note(
            resources.name("InstanceCount"),
            f"resources.instance_count: {count}: mini-batches of a run scored at the same time, each by a serving "
            "container of its own, on the Airflow workers' hosts (SageMaker shares the files out among instances)",
        )
    )
    gpus = _instance_type(out, resources, instance_type)
    if gpus:
        doc_resources["gpus"] = gpus
    for key, reason in (
        ("VolumeKmsKeyId", "the files of a mini-batch are staged in BATCHSCORE_SCRATCH_DIR on the worker host: "
         "encrypt that disk"),
        ("TransformAmiVersion", "the serving container runs on the worker host's Docker engine and NVIDIA driver"),
    ):  # fmt: skip
        if resources.get(key, str) is not None:
            _skip(out, resources.name(key), reason)
    _rest(out, resources)

    for key, reason in (
        ("DataCaptureConfig", "batchscore does not copy inputs and outputs to a capture location for Model Monitor; "
         "each run's plan (the input objects and their versions), .out files, ledger and errors stay in "
         "<output.path>/<run id>/"),
        ("ExperimentConfig", "no SageMaker Experiments here: each run is an Airflow DAG run, with its summary.json"),
    ):  # fmt: skip
        if job.get(key, dict) is not None:
            _skip(out, key, reason)
    _rest(out, job)

    # model and image: from CreateModel, or placeholders
    if model is not None:
        sources.append(f"CreateModel request: {model}")
        container = _model(out, Path(model), (job.path, model_name), environment, tags)
        doc["model"] = {"name": model_name, "path": container["path"], **located}
        doc["environment"] = {"image": container["image"]}
    else:
        doc["model"] = {"name": model_name, "path": f"<PrimaryContainer.ModelDataUrl of model {model_name}>", **located}
        doc["environment"] = {"image": f"<PrimaryContainer.Image of model {model_name}>"}
        out.todo.append(
            Note(
                "model.path, environment.image",
                f"no CreateModel request given (--model): copy PrimaryContainer.ModelDataUrl and Image of model "
                f"{model_name} (aws sagemaker describe-model --model-name {model_name}), or run the import again "
                "with --model",
            )
        )
    doc["input"], doc["output"] = doc_input, doc_output
    if tags:
        doc["tags"] = tags
    if environment:
        transform["Environment"] = environment
    if transform:
        doc["transform"] = {key: transform[key] for key in TRANSFORM_ORDER if key in transform}
    doc["resources"] = doc_resources
    return out


def _model(out: Imported, path: Path, job: tuple[Path, str], environment: dict[str, str], tags: dict[str, str]) -> dict[str, str]:
    """The image and model path of a ``CreateModel`` request; its environment and tags go into those given."""
    model = _Fields(path, read_request(path, "CreateModel"), api="CreateModel")
    request, model_name = job
    name = model.get("ModelName", str, required=True)
    if name != model_name:
        raise model.error(
            "ModelName",
            f"{name!r} is not the transform job's ModelName {model_name!r} (in {request}); give the CreateModel request of "
            f"model {model_name!r}",
        )
    primary = model.sub("PrimaryContainer")
    containers = model.get("Containers", list)
    if primary is not None and containers is not None:
        raise model.error("Containers", "give PrimaryContainer or Containers, not both (SageMaker refuses both too)")
    if containers is not None:
        if len(containers) != 1:
            raise model.error(
                "Containers",
                f"{len(containers)} containers (an inference pipeline) cannot be carried over: batchscore sends "
                "each request to one serving container; put the steps in one image, or make one deployment per model",
            )
        if not isinstance(containers[0], dict):
            raise model.error("Containers", f"[0] must be a JSON object, got {short(containers[0])}")
        primary = _Fields(path, containers[0], "Containers[0].", "CreateModel")
    if primary is None:
        raise model.error("PrimaryContainer", "missing; CreateModel requires PrimaryContainer (or Containers)")
    note = f"CreateModel.{primary.prefix}"

    if primary.get("ModelPackageName", str) is not None:
        raise primary.error(
            "ModelPackageName",
            "a model package cannot be carried over: give its image and model in PrimaryContainer.Image and "
            "ModelDataUrl (aws sagemaker describe-model-package: InferenceSpecification.Containers[0])",
        )
    mode = primary.get("Mode", str)
    if mode not in (None, "SingleModel"):
        raise primary.error(
            "Mode",
            f"{mode} (one container serving many models from a prefix) cannot be carried over: batchscore gives a "
            "serving container one model; make one deployment per model",
        )
    if primary.get("AdditionalModelDataSources", list):
        raise primary.error(
            "AdditionalModelDataSources",
            "cannot be carried over: batchscore gives the serving container one model, in /opt/ml/model; put "
            "those files into the model archive",
        )
    image = primary.get("Image", str, required=True)
    out.origin["environment.image"] = (path, primary.name("Image"))
    registry, slash, _ = image.partition("/")
    if slash and ("." in registry or ":" in registry):  # a registry's image, such as ECR's
        out.mapped.append(
            Note(
                f"{note}Image",
                "environment.image: pulled by the Docker engine of each worker host, which must be logged in to "
                f"{registry} (for ECR: aws ecr get-login-password | docker login), or have the image already",
            )
        )
    url = primary.uri("ModelDataUrl", required=False)
    source = primary.sub("ModelDataSource")
    if url is not None and source is not None:
        raise primary.error("ModelDataSource", "give ModelDataUrl or ModelDataSource, not both")
    if source is not None:
        url = _model_data_source(out, source)
    elif url is not None and not url.lower().endswith(MODEL_ARCHIVE_SUFFIXES):
        raise primary.error(
            "ModelDataUrl",
            f"{url} does not end with .tar.gz: batchscore unpacks a model object into /opt/ml/model only when its "
            "name ends with .tar.gz or .tgz; copy it to such a key",
        )
    if url is None:
        raise primary.error(
            "ModelDataUrl",
            "missing: batchscore needs model.path; an image that holds its model still needs one (an empty model.tar.gz will do)",
        )
    out.origin["model.path"] = (path, primary.name("ModelDataUrl" if source is None else "ModelDataSource"))
    _environment(out, primary, environment, label=note)
    for key, reason in (
        ("ImageConfig", "registry access is the Docker engine's: docker login on each worker host"),
        ("ContainerHostname", "one serving container per mini-batch, reached at 127.0.0.1:8080; no host name"),
        ("MultiModelConfig", "multi-model containers are refused (Mode)"),
        ("InferenceSpecificationName", "model packages are refused (ModelPackageName)"),
    ):
        if primary.get(key, (dict, str)) is not None:
            _skip(out, f"{note}{key}", reason)
    _rest(out, primary, label="CreateModel.")

    for key, reason in (
        ("ExecutionRoleArn", "an IAM role SageMaker assumes; here S3 is read and written with the credentials of "
         "the Airflow connection named by connection: (--connection), or of the worker host"),
        ("VpcConfig", "the serving container has no network at all (resources.network: false), and the S3 "
         "transfers are made by the Airflow workers, on their hosts' network"),
        ("InferenceExecutionConfig", "only for several containers, which are refused"),
    ):  # fmt: skip
        if model.get(key, (dict, str)) is not None:
            _skip(out, f"CreateModel.{key}", reason)
    if model.get("EnableNetworkIsolation", bool) is False:
        _skip(
            out,
            "CreateModel.EnableNetworkIsolation",
            "false is not carried: the serving container has no network unless resources.network: true",
        )
    _tags(out, model, tags, override=False)
    _rest(out, model, label="CreateModel.")
    return {"image": image, "path": url}


def _model_data_source(out: Imported, source: _Fields) -> str:
    """``ModelDataSource.S3DataSource``: a ``model.tar.gz`` object, or an uncompressed prefix (a folder)."""
    s3 = source.sub("S3DataSource", required=True)
    assert s3 is not None
    uri = s3.uri("S3Uri")
    assert uri is not None
    kind = s3.get("S3DataType", str, required=True)
    compression = s3.get("CompressionType", str, required=True)
    if (kind, compression) == ("S3Prefix", "None"):
        out.mapped.append(Note(f"CreateModel.{s3.prefix}S3Uri", "model.path: every object under the prefix, as a folder"))
    elif (kind, compression) == ("S3Object", "Gzip") and uri.lower().endswith(MODEL_ARCHIVE_SUFFIXES):
        pass  # the same as ModelDataUrl
    else:
        raise s3.error(
            "S3DataType",
            f"{kind} with CompressionType {compression} for {uri} cannot be carried over: give S3Object with Gzip "
            "(a model .tar.gz) or S3Prefix with None (a folder)",
        )
    for key in ("ModelAccessConfig", "HubAccessConfig", "ManifestS3Uri", "ETag", "ManifestEtag"):
        if s3.get(key, (dict, str)) is not None:
            _skip(out, f"CreateModel.{s3.prefix}{key}", "not used: batchscore reads the object or prefix as it is")
    _rest(out, s3, source, label="CreateModel.")
    return uri


def _input(out: Imported, name: str, uri: str) -> dict[str, str]:
    """``input.path`` and ``input.pattern`` of an ``S3Prefix`` URI, which SageMaker reads as a key name prefix."""
    if uri.endswith("/"):
        out.mapped.append(
            Note(
                name,
                f'input.path {uri} with input.pattern "**/*": every object under the prefix, at any depth '
                "(names starting with a dot are skipped)",
            )  # fmt: skip
        )
        return {"path": uri, "pattern": "**/*"}
    parent, _, last = uri.rpartition("/")
    if "." in last:  # a file name: the object itself, and any other whose name starts the same
        pattern = glob.escape(last) + "*"
        out.mapped.append(
            Note(
                name,
                f"input.path {parent}/ with input.pattern {pattern!r}: the objects directly under {parent}/ whose "
                f"names start with {last!r}; SageMaker would also read objects in folders whose names start so",
            )  # fmt: skip
        )
        return {"path": parent + "/", "pattern": pattern}
    out.mapped.append(
        Note(
            name,
            f'input.path {uri}/ with input.pattern "**/*": the folder {last}/, at any depth; SageMaker would '
            f"also read keys that merely start with {last!r} ({last}.csv, {last}-2/...): if you meant those, set "
            f"input.path to {parent}/ and input.pattern to '{glob.escape(last)}*'",
        )  # fmt: skip
    )
    return {"path": uri + "/", "pattern": "**/*"}


def _instance_type(out: Imported, resources: _Fields, instance_type: str) -> int:
    """The GPUs of an instance type (0 for CPU types); notes what of it is not carried."""
    name = resources.name("InstanceType")
    family = instance_type.split(".")[1] if instance_type.count(".") == 2 else ""
    size = instance_type.rsplit(".", 1)[-1]
    if family.startswith(("p", "g")) and family[1:2].isdigit():
        count = GPU_COUNTS.get(instance_type)
        if count is None and family in _ONE_GPU_FAMILIES:
            count = _MULTI_GPU_SIZES.get(size, 8 if size == "metal" else 1)
        if count is None:
            count = 1
            said = "1 (the importer does not know this type's GPU count: set resources.gpus to it)"
        else:
            said = str(count)
        out.mapped.append(
            Note(
                name,
                f"{instance_type} has NVIDIA GPUs: resources.gpus: {said}, leased on the worker host for each "
                "serving container; its vCPUs and memory are not carried (the container shares the host; "
                "resources.memory sets a limit)",
            )  # fmt: skip
        )
        out.origin["resources.gpus"] = (resources.path, name)
        return count
    if family.startswith(("inf", "trn")):
        _skip(out, name, f"{instance_type}'s AWS Inferentia/Trainium chips have no equivalent here: the image must run "
              "on CPU or an NVIDIA GPU (resources.gpus)")  # fmt: skip
        return 0
    _skip(out, name, f"{instance_type} is a CPU instance: the serving container runs on an Airflow worker's host, with "
          "no CPU or memory reserved (resources.memory sets a limit; resources.queue picks the hosts)")  # fmt: skip
    return 0


def _carry(out: Imported, fields: _Fields, key: str, kind: type, transform: dict[str, Any]) -> None:
    """A field whose name and meaning are the same under ``transform:``."""
    value = fields.get(key, kind)
    if value is not None:
        transform[key] = value
        out.origin[f"transform.{key}"] = (fields.path, fields.name(key))


def _environment(out: Imported, fields: _Fields, environment: dict[str, str], label: str = "") -> None:
    """``Environment`` into ``transform.Environment`` (the job's over the model's); batchscore's own names dropped."""
    given = fields.get("Environment", dict)
    if given is None:
        return
    name = f"{label}Environment"
    out.origin.setdefault("transform.Environment", (fields.path, fields.name("Environment")))
    for key, value in given.items():
        if not isinstance(value, str):
            raise fields.error("Environment", f"{key}: must be a string, got {short(value)}")
        if key in SAGEMAKER_ENVIRONMENT:
            source = SAGEMAKER_ENVIRONMENT[key]
            _skip(out, f"{name}.{key}", "set by batchscore" + (f" from transform.{source}" if source else " (true)"))
            continue
        if key in environment and environment[key] != value:
            out.mapped.append(Note(f"{name}.{key}", f"also set by the transform job; its value {environment[key]!r} is kept"))
            continue
        environment.setdefault(key, value)
        if value.lower().startswith(("s3://", "https://")):
            out.mapped.append(
                Note(
                    f"{name}.{key}",
                    f"names {value}: the serving container has no network and no AWS credentials, "
                    "so it cannot fetch it; put what it points at in the image or the model archive",
                )  # fmt: skip
            )


def _tags(out: Imported, fields: _Fields, tags: dict[str, str], *, override: bool) -> None:
    """``Tags`` (``[{Key, Value}]``) into the endpoint's ``tags`` mapping."""
    given = fields.get("Tags", list)
    if given is None:
        return
    out.origin.setdefault("tags", (fields.path, fields.name("Tags")))
    for i, tag in enumerate(given):
        if not (isinstance(tag, dict) and isinstance(tag.get("Key"), str) and isinstance(tag.get("Value", ""), str)):
            raise fields.error("Tags", f'[{i}] must be {{"Key": ..., "Value": ...}} with strings, got {short(tag)}')
        if override or tag["Key"] not in tags:
            tags[tag["Key"]] = tag.get("Value", "")


def _skip(out: Imported, name: str, reason: str) -> None:
    out.not_carried.append(Note(name, reason))


def _rest(out: Imported, *objects: _Fields, label: str = "") -> None:
    """Fields of these objects that were not read: response state, or unknown to the API."""
    for fields in objects:
        for key in fields.rest():
            reason = NOT_A_SETTING if key in RESPONSE_FIELDS else UNKNOWN.format(api=fields.api)
            out.not_carried.append(Note(f"{label}{fields.name(key)}", reason))


def check_loads(imported: Imported) -> None:
    """Load the YAML (placeholders filled) with batchscore's loader; a problem is told as the request field it came from.

    :raises RequestImportError: the YAML does not load (e.g. a value the serving contract refuses).
    """
    with tempfile.TemporaryDirectory(prefix="batchscore-import-") as tmp:  # every path in it is a URI
        path = Path(tmp) / "deployment.yaml"
        path.write_text(imported.checkable_text(), encoding="utf-8")
        try:
            load_endpoint(path)
        except DeploymentSpecError as exc:
            raise RequestImportError("\n".join(_explain(imported, issue.key, issue.message) for issue in exc.issues)) from None


def _explain(imported: Imported, key: str | None, message: str) -> str:
    """A loader's issue as ``FILE: FIELD: message`` when the YAML key came from a request field."""
    best = None
    for yaml_key in imported.origin:
        if key is not None and (key == yaml_key or key.startswith((f"{yaml_key}.", f"{yaml_key}["))):
            if best is None or len(yaml_key) > len(best):
                best = yaml_key
    if best is None:
        return f"{imported.request}: the deployment YAML made from it does not load: " + (f"{key}: {message}" if key else message)
    path, name = imported.origin[best]
    return f"{path}: {name}: {message} (YAML key {key})"


def main(request: Path, model: Path | None, output: Path | None, connection: str | None, stderr: TextIO) -> int:
    """The command: write the YAML to ``output`` (or stdout), the lists to ``stderr``; 2 when a file is refused."""
    try:
        imported = import_transform_job(request, model, connection=connection)
        text = imported.yaml_text()
        check_loads(imported)
    except RequestImportError as exc:
        print(f"error: {exc}", file=stderr)
        return 2
    for line in imported.report():
        print(line, file=stderr)
    if output is None:
        sys.stdout.write(text)
        return 0
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, output)
    print(f"wrote {output}" + (" (fill in the placeholders above before it loads)" if imported.todo else ""), file=stderr)
    return 0
