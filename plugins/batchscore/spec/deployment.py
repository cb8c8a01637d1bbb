"""One deployment: its model, code, image, input and output, and the checks that tie them and its settings to its contract."""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from batchscore.errors import RunParamError
from batchscore.spec.base import Name, StrictModel
from batchscore.spec.conda import CondaDependencies, read_conda_file
from batchscore.spec.paths import (
    OUTPUT_OVERLAP_ADVICE,
    ExistingDir,
    ExistingLocation,
    ExistingPath,
    Location,
    is_remote_location,
    output_overlap,
)
from batchscore.spec.registry import LATEST, is_reference, reference_model
from batchscore.spec.resources import Resources
from batchscore.spec.settings import RetrySettings, Settings
from batchscore.spec.transform import TransformSettings

#: What a serving deployment's model may be when it is a file: a model archive.
MODEL_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")


class Located(StrictModel):
    """A block whose ``path`` is a local path or a URI of object storage, read with an Airflow connection."""

    path: str | Path
    connection: str | None = Field(
        None,
        min_length=1,
        description="The Airflow connection for a URI of object storage (s3://, gs://, abfs://); default: the "
        "scheme's default connection, as Airflow's ObjectStoragePath. Credentials live there, never in the YAML.",
    )

    @property
    def remote(self) -> bool:
        """Whether ``path`` is on object storage."""
        return is_remote_location(self.path)

    @property
    def local(self) -> Path:
        """``path`` as a local path. On object storage it has none: :mod:`batchscore.run_store` gives the
        tasks a deployment whose paths are local copies (staged inputs, a cached model, a mirrored run folder)."""
        if isinstance(self.path, Path):
            return self.path
        raise RuntimeError(f"{self.path} is on object storage: place the deployment first (batchscore.run_store.place)")

    @model_validator(mode="after")
    def _connection_for_uri(self) -> Located:
        if self.connection is not None and not self.remote:
            raise ValueError(
                f"connection {self.connection!r} is for a URI of object storage (s3://, gs://, abfs://), "
                f"but path is the local path {self.path}; remove connection or give a URI"
            )
        return self


class ModelSpec(Located):
    """The model: a folder or a file, mounted read-only; the container finds it in AZUREML_MODEL_DIR.
    On object storage: a prefix (a folder) or one object (a file, such as SageMaker's model.tar.gz),
    fetched once per worker host and cached by its version token."""

    path: ExistingLocation = Field(
        description="Model folder or file, mounted read-only; AZUREML_MODEL_DIR in the container (contract serve: "
        "a folder or a model.tar.gz, at /opt/ml/model, unpacked once per run). Relative to the YAML file's folder, "
        "or a URI of object storage (s3://, gs://, abfs://, file://) with `connection`.",
    )
    name: str | None = Field(None, description="The model's name (informational, as in Azure's registry).")
    version: str | None = Field(
        None,
        description="The model's version (informational), or 'latest' for a reference to a registry on object "
        "storage, resolved when a run starts and pinned for that run.",
    )
    reference: str | None = Field(
        None, description="The azureml:<name>@latest or azureml:<name>:<version> reference this model was resolved from."
    )
    description: str | None = Field(None, description="The model's description (informational, as in Azure's registry).")
    type: str | None = Field(None, description="Azure's model type: custom_model (the default); others are refused.")
    tags: dict[str, str] = Field(default_factory=dict, description="The model's tags (informational, as in Azure's registry).")

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("type")
    @classmethod
    def _custom_model(cls, value: str | None) -> str | None:
        if value not in (None, "custom_model"):
            raise ValueError(
                f"model.type {value!r} is not supported: batchscore runs the scoring script of code_configuration, "
                "and generates none for MLflow or Triton models; use type: custom_model (or leave it out) and a scoring script"
            )
        return value

    @property
    def latest_in_registry(self) -> bool:
        """Whether ``path`` is a model's folder in a registry on object storage, its highest version to be taken."""
        return self.reference is not None and self.version == LATEST and self.remote

    @property
    def is_archive(self) -> bool:
        """Whether the model is one file named like an archive (``model.tar.gz``)."""
        return str(self.path).lower().endswith(MODEL_ARCHIVE_SUFFIXES) and (self.remote or Path(self.path).is_file())


class CodeConfiguration(StrictModel):
    """The folder with the scoring script, mounted read-only."""

    code: ExistingDir = Field(description="Folder of the scoring code, mounted read-only; relative to the YAML file's folder.")
    scoring_script: str = Field(description="File name of the scoring script, relative to `code`.")

    @field_validator("scoring_script")
    @classmethod
    def _script_in_code(cls, value: str, info: ValidationInfo) -> str:
        rel = PurePosixPath(value)
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"scoring_script must be a path inside `code`, got {value!r}")
        code = info.data.get("code")
        if code is not None and not (code / rel).is_file():
            raise ValueError(f"scoring script {value!r} not found in {code}")
        return value


# Docker's image reference grammar (github.com/distribution/reference): what the engine accepts,
# so that a bad name is told when the YAML is loaded, not as Docker's raw APIError at run time.
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
#: The digests Docker knows, and their lengths in hex digits.
_DIGESTS = {"sha256": 64, "sha384": 96, "sha512": 128}
MAX_IMAGE_NAME = 255


def image_reference_problem(ref: str) -> str | None:
    """What is wrong with an image reference, in words; ``None`` when Docker would take it.

    ``[registry[:port]/]path[:tag][@digest]``: the path's components in lowercase letters and
    digits (separated by ``.``, ``_``, ``__`` or dashes); the first component is a registry when
    it holds ``.`` or ``:``, is ``localhost``, or has capitals (Docker's own rule).
    """
    rest, _, digest = ref.partition("@")
    if "@" in ref:
        algorithm, _, hex_digits = digest.partition(":")
        size = _DIGESTS.get(algorithm)
        if size is None or not re.fullmatch(f"[a-f0-9]{{{size}}}", hex_digits):
            return f"the digest {digest!r} must be sha256: and 64 lowercase hex digits (or sha384:, sha512:)"
    name, tag = rest, None
    if ":" in rest.rpartition("/")[2]:
        name, _, tag = rest.rpartition(":")
        if not _TAG.fullmatch(tag):
            return f"the tag {tag!r} must be 1 to 128 letters, digits, '_', '.' and '-', and not start with '.' or '-'"
    if not name:
        return "the repository name is missing"
    if len(name) > MAX_IMAGE_NAME:
        return f"the name is {len(name)} characters long, more than Docker's {MAX_IMAGE_NAME}"
    first, slash, remainder = name.partition("/")
    domain = None
    if slash and (any(c in first for c in ".:") or first == "localhost" or first != first.lower()):
        domain, name = first, remainder
        if not _DOMAIN.fullmatch(domain):
            return f"the registry {domain!r} must be a host name or an IP address, with an optional :port"
    components = name.split("/")
    if all(_PATH_COMPONENT.fullmatch(c) for c in components):
        return None
    if all(_PATH_COMPONENT.fullmatch(c.lower()) for c in components):
        fixed = (
            (f"{domain}/" if domain else "")
            + name.lower()
            + (f":{tag}" if tag is not None else "")
            + (f"@{digest}" if "@" in ref else "")
        )
        return f"repository names must be lowercase, and {name!r} is not (did you mean {fixed!r}?)"
    return (
        f"the repository name {name!r} must be lowercase letters and digits, in components joined by '/' "
        "and separated inside by '.', '_', '__' or '-'"
    )


def _image(value: str) -> str:
    problem = image_reference_problem(value)
    if problem:
        raise ValueError(f"{value!r} is not a valid image reference: {problem}")
    return value


#: Environment variable: the image environments with a conda file are built on (default: the scoring image).
ENV_BASE_IMAGE_ENV = "BATCHSCORE_ENV_BASE_IMAGE"
DEFAULT_ENV_BASE_IMAGE = "batchscore-scoring:latest"
#: Azure's own base images (``mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu20.04``): they cannot be pulled
#: here and hold no Python; with a conda file batchscore's scoring base stands in for them.
AZURE_BASE_IMAGES = "mcr.microsoft.com/azureml/"


def env_base_image() -> str:
    """The base of images built from a conda file: ``BATCHSCORE_ENV_BASE_IMAGE``, else the scoring image."""
    return os.environ.get(ENV_BASE_IMAGE_ENV) or DEFAULT_ENV_BASE_IMAGE


class EnvironmentSpec(StrictModel):
    """The container image: for ``contract: azure`` the scoring image (Python 3.9+, pandas and
    pyarrow); for ``contract: serve`` the serving image, started as ``IMAGE serve``.

    Azure's ``{name, image, conda_file}``: the image is built from the conda file's pip dependencies on top
    of ``image`` (an Azure base image, ``mcr.microsoft.com/azureml/...``, or none: batchscore's scoring
    base), on the Docker host of the scoring tasks, before the first container (:mod:`batchscore.images`).
    """

    name: str | None = Field(None, description="The environment's name (Azure's); names the image built from conda_file.")
    conda_file: ExistingPath | None = Field(
        None,
        description="Azure's conda file: an image is built with its pip dependencies (python and pip are the base's; "
        "other conda packages are refused).",
    )
    image: Annotated[str, Field(min_length=1), AfterValidator(_image)] | None = Field(
        None,
        validate_default=True,
        description="A Docker image reference, [registry[:port]/]name[:tag][@sha256:digest]; the name in lowercase. "
        "With conda_file: the base of the image built (an Azure base image means batchscore's scoring base).",
    )
    description: str | None = Field(None, description="The environment's description (informational, as in Azure's YAML).")

    @model_validator(mode="before")
    @classmethod
    def _no_registry(cls, data: Any) -> Any:
        if isinstance(data, str):
            raise ValueError(
                f"environment {data!r} refers to Azure's environment registry, which batchscore does not have; "
                "give environment.image, or environment.image and environment.conda_file"
            )
        return data

    @field_validator("image")
    @classmethod
    def _image_or_conda(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None and info.data.get("conda_file") is None and "conda_file" in info.data:
            raise PydanticCustomError("missing", "Field required")  # reported with the other missing keys
        return value

    @field_validator("conda_file")
    @classmethod
    def _conda_file_readable(cls, value: Path | None) -> Path | None:
        if value is not None:
            read_conda_file(value)  # now, so that a bad conda file is an error of the YAML, with its line
        return value

    @property
    def dependencies(self) -> CondaDependencies | None:
        """The conda file's pip dependencies (read from the file), or ``None`` without a conda file."""
        return read_conda_file(self.conda_file) if self.conda_file is not None else None

    @property
    def build_base(self) -> str:
        """The image a conda file's dependencies are installed on."""
        if self.image is None or self.image.startswith(AZURE_BASE_IMAGES):
            return env_base_image()
        return self.image

    @property
    def ready_image(self) -> str:
        """The image containers run: ``image``; with a conda file, only once built (:func:`batchscore.images.prepared`)."""
        if self.conda_file is not None or self.image is None:
            raise RuntimeError("the environment's image is built from its conda file first (batchscore.images.prepared)")
        return self.image


class InputSpec(Located):
    """Where the input files are: a folder (or a prefix on object storage) and a glob pattern (``**/`` to include
    subfolders)."""

    path: Location = Field(
        description="Folder of the input files, mounted read-only (relative to the YAML file's folder), or a prefix "
        "on object storage (s3://, gs://, abfs://) with `connection`. The trigger form's input_path replaces it "
        "for one run."
    )
    pattern: str = Field(
        "*",
        min_length=1,
        description="A glob matched inside `path` ('*.csv'; '**/*.csv' includes subfolders); hidden files are "
        "skipped; no '..' and not absolute. Symbolic links are followed only inside `path` (see Deployment YAML).",
    )

    @field_validator("pattern")
    @classmethod
    def _inside_path(cls, value: str) -> str:
        if value.startswith("/"):
            raise ValueError(
                f"pattern {value!r} is absolute, but it is matched inside input.path; "
                "put the folder in input.path and keep only the file pattern here ('*.csv')"
            )
        if ".." in PurePosixPath(value).parts:
            raise ValueError(
                f"pattern {value!r} leaves input.path ('..'); "
                "a pattern is matched inside input.path: point input.path at the folder instead"
            )
        return value


class OutputSpec(Located):
    """Where each run writes its output, summary and work files: ``<path>/<run id>/`` (a folder, or a prefix on
    object storage, where the run's state lives too)."""

    path: Location = Field(
        description="Each run writes to `<path>/<run id>/`. Never the input folder or a folder holding it (a "
        "subfolder of input.path is fine: files inside the output folder are never read as input). Relative to "
        "the YAML file's folder, or a URI of object storage with `connection`. The trigger form's output_path "
        "replaces it for one run."
    )


#: Settings of the Azure contract that mean nothing to a serving container, and what to use instead.
AZURE_ONLY_SETTINGS = {
    "max_concurrency_per_instance": "transform.MaxConcurrentTransforms",
    "output_layout": None,
}
#: Defaults of ``settings`` that differ for ``contract: serve``: SageMaker fails a job when a file
#: fails, and writes one ``.out`` file per input instead of one output file.
SERVE_SETTING_DEFAULTS = {"error_threshold": 0, "output_action": "summary_only"}


class DeploymentSpec(StrictModel):
    """One deployment: a model, its scoring code (or serving image), an input and an output."""

    name: Name = Field(description="The deployment: a task group of the endpoint's DAG, unique within the endpoint.")
    description: str | None = Field(
        None,
        description="Shown in Airflow as the task group's tooltip (in Azure's deployment file, also as the DAG's description).",
    )
    tags: dict[str, str] = Field(
        default_factory=dict,
        description="Airflow tags, shown as key:value. Azure's deployment file: the DAG's tags; a deployment "
        "inside `deployments:` has none of its own (tag the endpoint).",
    )
    contract: Literal["azure", "serve"] = Field(
        "azure",
        description="azure: an Azure ML scoring script (init/run) in code_configuration; serve: a SageMaker "
        "serving container (IMAGE serve, /ping and /invocations on port 8080) with the transform settings.",
    )
    model: ModelSpec
    code_configuration: CodeConfiguration | None = Field(
        None, validate_default=True, description="contract azure (required): the scoring script."
    )
    environment: EnvironmentSpec
    input: InputSpec | None = Field(
        None, description="Required unless given with each run (run parameter input_path), as Azure's invoke --input."
    )
    output: OutputSpec | None = Field(
        None, description="Required unless given with each run (run parameter output_path), as Azure's invoke --output-path."
    )
    compute: str | None = Field(
        None,
        description="Azure's compute cluster, azureml:<name>: the scoring tasks' Airflow queue <name> "
        "(resources.queue), unless resources.queue is set.",
    )
    transform: TransformSettings | None = Field(
        None,
        validate_default=True,
        description="contract serve: SageMaker batch transform's settings, with its names and defaults.",
    )
    settings: Settings = Field(Settings(), description="Batch settings with Azure's names and defaults, and batchscore's own.")
    resources: Resources = Field(
        Resources(),
        description="Instances, GPUs, memory, network, queue and pool of the scoring containers.",
    )

    @field_validator("model", mode="before")
    @classmethod
    def _registered_model(cls, value: Any) -> Any:
        return reference_model(value) if is_reference(value) else value

    @field_validator("compute")
    @classmethod
    def _compute_name(cls, value: str | None) -> str | None:
        if value is not None and compute_queue(value) is None:
            raise ValueError(
                f"compute {value!r} must be azureml:<name> (or <name>): letters, digits, '_' and '-', as an Airflow queue"
            )
        return value

    @property
    def queue(self) -> str | None:
        """The scoring tasks' Airflow queue: ``resources.queue``, else the one ``compute`` maps to, else none."""
        return self.resources.queue or (compute_queue(self.compute) if self.compute else None)

    @property
    def input_spec(self) -> InputSpec:
        """``input``: from the YAML, or from the run's parameter; raises when neither gave it."""
        if self.input is None:
            raise RunParamError(missing_location(self.name, "input", "input_path"))
        return self.input

    @property
    def output_spec(self) -> OutputSpec:
        """``output``: from the YAML, or from the run's parameter; raises when neither gave it."""
        if self.output is None:
            raise RunParamError(missing_location(self.name, "output", "output_path"))
        return self.output

    @field_validator("code_configuration")
    @classmethod
    def _code_for_azure(cls, value: CodeConfiguration | None, info: ValidationInfo) -> CodeConfiguration | None:
        contract = info.data.get("contract", "azure")
        if contract == "azure" and value is None:
            raise PydanticCustomError("missing", "Field required")  # reported with the other missing keys
        if contract == "serve" and value is not None:
            raise ValueError("code_configuration is for contract: azure; a serving container brings its own code")
        return value

    @field_validator("transform")
    @classmethod
    def _transform_for_serve(cls, value: TransformSettings | None, info: ValidationInfo) -> TransformSettings | None:
        contract = info.data.get("contract", "azure")
        if contract == "azure" and value is not None:
            raise ValueError("transform is for contract: serve; an Azure scoring script takes settings instead")
        if contract == "serve" and value is None:
            return TransformSettings()
        return value

    @model_validator(mode="before")
    @classmethod
    def _serve_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("contract") == "serve":
            settings = data.get("settings")
            if settings is None or isinstance(settings, dict):
                data = {**data, "settings": {**SERVE_SETTING_DEFAULTS, **(settings or {})}}
        return data

    @model_validator(mode="after")
    def _contract(self) -> DeploymentSpec:
        if self.contract == "azure":
            return self
        for key, instead in AZURE_ONLY_SETTINGS.items():
            # Compared with the default, not with what was set: operators validate a full dump again.
            if getattr(self.settings, key) != Settings.model_fields[key].default:
                raise ValueError(
                    f"settings.{key} applies to contract: azure only"
                    + (f"; for a serving container use {instead}" if instead else "; remove it")
                )
        if self.settings.retry_settings.timeout != RetrySettings.model_fields["timeout"].default:
            raise ValueError(
                "settings.retry_settings.timeout applies to contract: azure only; for a serving container use "
                "transform.ModelClientConfig.InvocationsTimeoutInSeconds"
            )
        if self.settings.output_file_name.lower().endswith(".parquet") and self.settings.output_action == "append_row":
            raise ValueError(
                "settings.output_file_name: the .out files of a serving container are joined as text, "
                "so the collected output cannot be .parquet; use .csv or .jsonl"
            )
        if self.environment.conda_file is not None:
            raise ValueError("environment.conda_file is for contract: azure; a serving image brings its own packages")
        model = self.model.path
        if isinstance(model, Path) and model.is_file() and not model.name.lower().endswith(MODEL_ARCHIVE_SUFFIXES):
            raise ValueError(f"model.path {model} must be a folder or a model archive (.tar.gz) for contract: serve")
        assert self.transform is not None  # set above for contract: serve
        overlap = set(self.transform.Environment) & set(self.settings.environment_variables)
        if overlap:
            raise ValueError(f"transform.Environment and settings.environment_variables both set {', '.join(sorted(overlap))}")
        return self

    @model_validator(mode="after")
    def _output_apart_from_input(self) -> DeploymentSpec:
        if self.input is None or self.output is None:
            return self
        clash = output_overlap(self.input.path, self.output.path)
        if clash:
            raise ValueError(f"output.path {clash}; {OUTPUT_OVERLAP_ADVICE}")
        return self

    @model_validator(mode="after")
    def _workers_fit_gpus(self) -> DeploymentSpec:
        gpus, workers = self.resources.gpus, self.settings.max_concurrency_per_instance
        count = len(gpus) if isinstance(gpus, list) else gpus
        if isinstance(count, int) and 0 < count < workers and not self.resources.share_gpus:
            raise ValueError(
                f"settings.max_concurrency_per_instance is {workers} but resources.gpus gives each container "
                f"{count} GPU(s), so worker processes would share GPUs; lower max_concurrency_per_instance, "
                "raise resources.gpus, or set resources.share_gpus: true"
            )
        return self


_QUEUE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")


def compute_queue(compute: str) -> str | None:
    """The Airflow queue Azure's ``compute: azureml:<name>`` maps to: ``<name>``; ``None`` when it cannot be a queue."""
    name = compute.removeprefix("azureml:")
    return name if _QUEUE_NAME.fullmatch(name) else None


def missing_location(name: str, key: str, param: str) -> str:
    """Why a run of deployment ``name`` cannot start: its YAML has no ``key`` and the run parameter ``param`` is unset."""
    return (
        f"run parameter {param} is required: deployment {name!r} has no {key} in its YAML (as Azure's, which "
        f"takes it when a job is invoked); trigger the run with {param} set (the trigger form, or conf "
        f'{{"{param}": "..."}}), or add {key}.path to the YAML'
    )
