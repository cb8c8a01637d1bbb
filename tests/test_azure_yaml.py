"""Azure's own batch-deployment YAML loads and runs unmodified: a registered model, an environment with a conda
file, a compute cluster, and no input or output (given with each run, as Azure's ``invoke --input``).

The YAML below has the keys and shapes of Azure's published examples, with iris's names:

* ``Azure/azureml-examples``, ``cli/endpoints/batch/deploy-models/mnist-classifier/deployment-torch/deployment.yml``
  (``$schema``, ``type: model``, ``environment: {name, image, conda_file}``, ``compute: azureml:batch-cluster``,
  ``settings``), and its ``environment/conda.yaml`` (``channels``, ``python=``, ``pip<22.0``, ``pip:``);
* ``MicrosoftDocs/azure-docs``, ``articles/machine-learning/reference-yaml-deployment-batch.md``: the model as a
  registry reference, ``model: azureml:heart-classifier-mlflow@latest`` (and ``azureml:<model-name>:<version>``).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import shutil
import subprocess
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from batchscore import images
from batchscore.errors import DeploymentSpecError, RunParamError
from batchscore.factory import build_dag, load_folder
from batchscore.run_params import apply_run_params
from batchscore.spec import load_endpoint
from batchscore.spec.registry import sorted_versions
from batchscore_runtime.formats import Summary, run_key
from tests.helpers import S3_CONN, run_dag, upload_tree, write

#: deployment-torch/deployment.yml as published, with iris's names and the model as a registry reference.
PUBLISHED = """\
$schema: https://azuremlschemas.azureedge.net/latest/batchDeployment.schema.json
name: iris-torch-dpl
endpoint_name: iris-batch
type: model
model: azureml:iris-classifier@latest
code_configuration:
  code: code
  scoring_script: batch_driver.py
environment:
  name: batch-iris-py311
  image: mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu20.04:latest
  conda_file: environment/conda.yaml
compute: azureml:batch-cluster
resources:
  instance_count: 1
settings:
  max_concurrency_per_instance: 2
  mini_batch_size: 10
  output_action: append_row
  output_file_name: predictions.csv
  retry_settings:
    max_retries: 3
    timeout: 30
  error_threshold: -1
  logging_level: info
"""
#: deployment-torch/environment/conda.yaml as published, its pip list replaced by a wheel made by the test.
CONDA = """\
name: mnist-env
channels:
  - conda-forge
dependencies:
  - python=3.8.5
  - pip<22.0
  - pip:
    - {requirement}
"""
#: The iris example's scoring script, with a package of the conda file imported and its value in a column.
DRIVER = """\
import glob
import os

import bsazure
import joblib
import pandas as pd

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def init():
    global model
    model = joblib.load(glob.glob(os.path.join(os.environ["AZUREML_MODEL_DIR"], "*", "model.joblib"))[0])


def run(mini_batch):
    frames = []
    for path in mini_batch:
        data = pd.read_csv(path)
        frames.append(pd.DataFrame({"id": data["id"], "prediction": model.predict(data[FEATURES]), "label": bsazure.LABEL}))
    return pd.concat(frames, ignore_index=True)
"""


def tiny_wheel(folder: Path, name: str = "bsazure", version: str = "0.1") -> Path:
    """A pure-Python wheel made here (no index, no build backend): ``import bsazure; bsazure.LABEL``."""
    dist = f"{name}-{version}"
    files = {
        f"{name}/__init__.py": "LABEL = 'installed from the conda file'\n",
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: batchscore-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [
        f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},{len(text)}"
        for path, text in files.items()
    ]
    files[f"{dist}.dist-info/RECORD"] = "\n".join([*record, f"{dist}.dist-info/RECORD,,"]) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def registry(root: Path, model: Path, versions: tuple[str, ...] = ("1", "2", "10")) -> Path:
    """A model registry as Azure lays a registered model out: ``<name>/<version>/<registered folder>/...``."""
    for version in versions:
        shutil.copytree(model, root / "iris-classifier" / version / "iris-classifier")
    return root


@pytest.fixture()
def azure_folder(tmp_path: Path, monkeypatch) -> Path:
    """Azure's deployment folder (deployment.yml, code/, environment/conda.yaml) and a registry of three versions."""
    reg = tmp_path / "registry"
    for version in ("1", "2", "10"):
        (reg / "iris-classifier" / version / "iris-classifier").mkdir(parents=True)
    (reg / "mnist-classifier" / "3").mkdir(parents=True)
    monkeypatch.setenv("BATCHSCORE_MODEL_REGISTRY", str(reg))
    folder = tmp_path / "deployments"
    write(folder / "code" / "batch_driver.py", DRIVER)
    write(folder / "environment" / "conda.yaml", CONDA.format(requirement="bsazure==0.1"))
    write(folder / "deployment.yml", PUBLISHED)
    return folder


def error_of(path: Path) -> str:
    with pytest.raises(DeploymentSpecError) as info:
        load_endpoint(path)
    return str(info.value)


# --------------------------------------------------------------------------- loading


def test_the_published_yaml_loads_unmodified_and_the_dag_says_what_each_azure_key_became(azure_folder: Path) -> None:
    [loaded] = load_folder(azure_folder)
    assert loaded.error is None
    assert loaded.endpoint is not None and loaded.dag is not None
    d = loaded.endpoint.deployments[0]
    reg = azure_folder.parent / "registry"
    assert (d.model.path, d.model.name, d.model.version) == (reg / "iris-classifier" / "10", "iris-classifier", "10")
    assert d.environment.build_base == "batchscore-scoring:latest"
    assert d.environment.dependencies is not None and d.environment.dependencies.pip == ("bsazure==0.1",)
    assert (d.input, d.output, d.queue) == (None, None, "batch-cluster")
    assert d.settings.max_concurrency_per_instance == 2 and d.settings.retry_settings.timeout == 30
    score = loaded.dag.get_task("iris-torch-dpl.score")
    assert score.partial_kwargs["queue"] == "batch-cluster"
    assert loaded.dag.get_task("iris-torch-dpl.start_workers").queue == "batch-cluster"
    conda = azure_folder / "environment" / "conda.yaml"
    assert loaded.dag.doc_md.splitlines()[6:15] == [
        "Required with every run (the YAML leaves them to the run, as Azure's does): input_path, output_path.",
        "",
        "## iris-torch-dpl",
        f"- script `batch_driver.py`, image `batchscore-env-batch-iris-py311:<hash>`, built on the scoring host from "
        f"`{conda}` (pip: `bsazure==0.1`) on `batchscore-scoring:latest` (in place of Azure's base "
        "`mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu20.04:latest`); ignored from the conda file (no conda here): "
        "`name: mnist-env`, `channels: conda-forge`, `python=3.8.5`, `pip<22.0`",
        f"- model `azureml:iris-classifier@latest`: version 10, `{reg / 'iris-classifier' / '10'}`",
        "- compute `azureml:batch-cluster`: the scoring tasks run on the Airflow queue `batch-cluster`",
        "- input: none in the YAML; each run gives it (run parameter `input_path`, required), 10 files per mini-batch",
        "- output `<output_path>/<run id>/predictions.csv` and `summary.json`",
        "- a complete output updates the asset `batchscore/iris-batch/iris-torch-dpl`",
    ]


def test_a_pinned_version_resolves_to_its_folder_and_resources_queue_wins_over_compute(azure_folder: Path) -> None:
    path = azure_folder / "deployment.yml"
    text = PUBLISHED.replace("@latest", ":2").replace("  instance_count: 1\n", "  instance_count: 1\n  queue: gpu-hosts\n")
    write(path, text)
    d = load_endpoint(path).deployments[0]
    assert d.model.path == azure_folder.parent / "registry" / "iris-classifier" / "2"
    assert d.queue == "gpu-hosts"
    assert (
        "- compute `azureml:batch-cluster`: not used; resources.queue `gpu-hosts` is set" in build_dag(load_endpoint(path)).doc_md
    )


def test_latest_is_the_highest_version_as_numbers_or_in_natural_order() -> None:
    assert sorted_versions(["10", "9", "1"]) == ["1", "9", "10"]
    assert sorted_versions(["1.10", "1.9", "1.2.1"]) == ["1.2.1", "1.9", "1.10"]


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            "azureml:iris-clasifier@latest",
            "model 'azureml:iris-clasifier@latest': the registry {reg} (BATCHSCORE_MODEL_REGISTRY) has no model "
            "'iris-clasifier'; did you mean 'iris-classifier'? it holds iris-classifier, mnist-classifier",
        ),
        (
            "azureml:iris-classifier:7",
            "model 'azureml:iris-classifier:7': the registry {reg} (BATCHSCORE_MODEL_REGISTRY) has no version '7' of "
            "'iris-classifier'; available versions: 1, 2, 10",
        ),
        (
            "azureml:iris-classifier@production",
            "model 'azureml:iris-classifier@production': the only label batchscore knows is @latest; write "
            "azureml:<name>@latest or azureml:<name>:<version>",
        ),
        (
            "azureml:iris-classifier",
            "model 'azureml:iris-classifier' is not a model reference: write azureml:<name>@latest or "
            "azureml:<name>:<version>, or a mapping with path",
        ),
        (
            "azureml://registries/azureml/models/iris/versions/1",
            "model 'azureml://registries/azureml/models/iris/versions/1' is a reference to an Azure registry or workspace "
            "URI, which batchscore cannot reach; write azureml:<name>@latest or azureml:<name>:<version> to use "
            "BATCHSCORE_MODEL_REGISTRY, or give model.path",
        ),
    ],
)
def test_a_model_the_registry_lacks_is_an_error_naming_the_key_and_what_the_registry_holds(
    azure_folder: Path, model: str, message: str
) -> None:
    path = write(azure_folder / "deployment.yml", PUBLISHED.replace("azureml:iris-classifier@latest", model))
    assert error_of(path) == f"{path}:5: model: " + message.format(reg=azure_folder.parent / "registry")


def test_a_model_reference_without_a_registry_says_to_set_it(azure_folder: Path, monkeypatch) -> None:
    monkeypatch.delenv("BATCHSCORE_MODEL_REGISTRY")
    path = azure_folder / "deployment.yml"
    assert error_of(path) == (
        f"{path}:5: model: model 'azureml:iris-classifier@latest' refers to a registered model, but "
        "BATCHSCORE_MODEL_REGISTRY is not set; set it to the folder (or s3://, gs://, abfs:// URI) that holds the "
        "models as <name>/<version>/ folders, or give model.path"
    )


def test_a_registry_on_object_storage_is_not_read_at_load(azure_folder: Path, monkeypatch) -> None:
    monkeypatch.setenv("BATCHSCORE_MODEL_REGISTRY", "s3://models-bucket/registry/")
    path = azure_folder / "deployment.yml"
    latest = load_endpoint(path).deployments[0].model
    assert (latest.path, latest.version, latest.latest_in_registry) == (
        "s3://models-bucket/registry/iris-classifier",
        "latest",
        True,
    )
    write(path, PUBLISHED.replace("@latest", ":2"))
    pinned = load_endpoint(path).deployments[0].model
    assert (pinned.path, pinned.version, pinned.latest_in_registry) == (
        "s3://models-bucket/registry/iris-classifier/2",
        "2",
        False,
    )


def test_azures_inline_model_and_other_published_keys_load(azure_folder: Path, tmp_path: Path) -> None:
    (azure_folder / "model").mkdir()
    text = PUBLISHED.replace(
        "model: azureml:iris-classifier@latest\n",
        "description: A multi-class classifier of iris flowers\ntags:\n  team: flowers\n"
        "model:\n  name: iris-classifier\n  path: model\n  version: 3\n  type: custom_model\n",
    ).replace("  logging_level: info\n", "  logging_level: info\n  environment_variables:\n    LABEL: iris\n")
    d = load_endpoint(write(azure_folder / "deployment.yml", text)).deployments[0]
    assert (d.model.path, d.model.version, d.model.reference) == (azure_folder / "model", "3", None)
    assert (d.description, d.tags, d.settings.environment_variables) == (
        "A multi-class classifier of iris flowers",
        {"team": "flowers"},
        {"LABEL": "iris"},
    )


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "model: azureml:iris-classifier@latest\n",
            "model:\n  path: model\n  type: mlflow_model\n",
            "7: model.type: model.type 'mlflow_model' is not supported: batchscore runs the scoring script of "
            "code_configuration, and generates none for MLflow or Triton models; use type: custom_model (or leave it "
            "out) and a scoring script",
        ),
        (
            "environment:\n  name: batch-iris-py311\n  image: mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu20.04:latest\n"
            "  conda_file: environment/conda.yaml\n",
            "environment: azureml:batch-iris-py311:1\n",
            "9: environment: environment 'azureml:batch-iris-py311:1' refers to Azure's environment registry, which "
            "batchscore does not have; give environment.image, or environment.image and environment.conda_file",
        ),
        ("type: model\n", "type: pipeline\n", "4: type: Input should be 'model' (got 'pipeline')"),
        (
            "settings:\n  max_concurrency_per_instance: 2\n",
            "max_concurrency_per_instance: 2\nsettings:\n",
            "16: max_concurrency_per_instance: unknown key 'max_concurrency_per_instance'; Azure's legacy layout (no "
            "type:) keeps settings at the top level; batchscore reads them under settings: (as Azure does with type: "
            "model), so move it there",
        ),
    ],
)
def test_what_batchscore_cannot_carry_over_is_refused_saying_why(azure_folder: Path, old: str, new: str, message: str) -> None:
    (azure_folder / "model").mkdir()
    assert old in PUBLISHED
    path = write(azure_folder / "deployment.yml", PUBLISHED.replace(old, new))
    assert error_of(path) == f"{path}:{message}"


@pytest.mark.parametrize(
    ("dependency", "message"),
    [
        (
            "  - numpy=1.26\n",
            "conda package 'numpy=1.26' cannot be installed: batchscore builds images with pip, not conda; list it "
            "under pip: with pip's name and version (e.g. numpy)",
        ),
        (
            "  - pip:\n    - --extra-index-url https://pypi.example.org/simple\n",
            "pip option '--extra-index-url https://pypi.example.org/simple' is not supported: the wheels are downloaded "
            "by the Airflow worker's pip, so put index options in its configuration (pip.conf)",
        ),
    ],
)
def test_conda_dependencies_pip_cannot_install_are_refused_naming_the_conda_file(
    azure_folder: Path, dependency: str, message: str
) -> None:
    conda = azure_folder / "environment" / "conda.yaml"
    conda.write_text(CONDA.format(requirement="bsazure==0.1") + dependency)
    path = azure_folder / "deployment.yml"
    assert error_of(path) == f"{path}:12: environment.conda_file: conda file {conda}: {message}"


def test_a_run_without_input_or_output_fails_naming_the_parameter_and_two_such_files_load_side_by_side(
    azure_folder: Path, tmp_path: Path
) -> None:
    write(azure_folder / "other.yml", PUBLISHED.replace("endpoint_name: iris-batch", "endpoint_name: iris-batch-b"))
    loaded = load_folder(azure_folder)
    assert [r.error for r in loaded] == [None, None]  # no output folder in either: nothing to clash
    d = loaded[0].endpoint.deployments[0]  # type: ignore[union-attr]
    params = loaded[0].dag.params  # type: ignore[union-attr]
    assert not params.get_param("input_path").has_value and not params.get_param("output_path").has_value
    assert params.get_param("mini_batch_size").value is None
    with pytest.raises(RunParamError) as info:
        apply_run_params(d, {"output_path": str(tmp_path / "out")}, several_deployments=False)
    assert str(info.value) == (
        "run parameter input_path is required: deployment 'iris-torch-dpl' has no input in its YAML (as Azure's, "
        "which takes it when a job is invoked); trigger the run with input_path set (the trigger form, or conf "
        '{"input_path": "..."}), or add input.path to the YAML'
    )
    (tmp_path / "in").mkdir()
    run = apply_run_params(
        d, {"input_path": str(tmp_path / "in"), "output_path": str(tmp_path / "out")}, several_deployments=False
    )
    assert (run.input_spec.path, run.input_spec.pattern, run.output_spec.path) == (tmp_path / "in", "*", tmp_path / "out")


# --------------------------------------------------------------------------- the environment's image, and a real run


@pytest.fixture()
def offline_wheels(tmp_path: Path, monkeypatch) -> Path:
    """The wheels folder pip takes the conda file's dependencies from, alone (no package index)."""
    wheels = tmp_path / "wheels"
    tiny_wheel(wheels)
    monkeypatch.setenv("BATCHSCORE_ENV_WHEELS_DIR", str(wheels))
    monkeypatch.setenv("BATCHSCORE_SCRATCH_DIR", str(tmp_path / "scratch"))
    return wheels


def remove_images(tags: set[str]) -> None:
    for tag in tags:
        subprocess.run(["docker", "image", "rm", "-f", tag], capture_output=True, check=False)


def env_images(name: str) -> set[str]:
    listed = subprocess.run(
        ["docker", "image", "ls", "--format", "{{.Repository}}:{{.Tag}}", f"batchscore-env-{name}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(listed.stdout.split())


def test_the_conda_files_image_is_built_offline_once_and_holds_its_packages(
    scoring_image: str, azure_folder: Path, offline_wheels: Path, caplog
) -> None:
    from batchscore.engine import docker_client

    write(azure_folder / "deployment.yml", PUBLISHED.replace("batch-iris-py311", "bs-test-build"))
    spec = load_endpoint(azure_folder / "deployment.yml").deployments[0]
    log = logging.getLogger("test-images")
    try:
        with caplog.at_level(logging.INFO, logger="test-images"):
            built = images.prepared(spec, docker_client(), log)
            again = images.prepared(spec, docker_client(), log)
        tag = built.environment.ready_image
        assert tag.startswith("batchscore-env-bs-test-build:") and len(tag.rpartition(":")[2]) == 12
        assert again.environment.ready_image == tag
        messages = [r.getMessage() for r in caplog.records]
        assert sum(m.startswith("Built environment image") for m in messages) == 1
        assert messages[0] == (
            f"Ignored from the conda file {spec.environment.conda_file} (no conda here; the base's Python and pip): "
            "name: mnist-env, channels: conda-forge, python=3.8.5, pip<22.0"
        )
        assert messages[-1] == f"Environment image {tag} is on the Docker host already (conda file {spec.environment.conda_file})"
        shown = subprocess.run(
            ["docker", "run", "--rm", "--network", "none", tag, "python3", "-c", "import bsazure, pandas; print(bsazure.LABEL)"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert shown.stdout == "installed from the conda file\n"
    finally:
        remove_images(env_images("bs-test-build"))


def test_a_missing_wheel_fails_the_build_saying_where_pip_looked(
    scoring_image: str, azure_folder: Path, offline_wheels: Path
) -> None:
    from batchscore.engine import docker_client

    write(azure_folder / "environment" / "conda.yaml", CONDA.format(requirement="bsazure==0.2"))
    spec = load_endpoint(azure_folder / "deployment.yml").deployments[0]
    with pytest.raises(images.ImageBuildError) as info:
        images.prepared(spec, docker_client(), logging.getLogger("test-images"))
    message = str(info.value)
    assert message.startswith(
        f"pip could not download the wheels of the pip dependencies in {spec.environment.conda_file} (exit 1): "
    )
    assert message.endswith(
        "Each must be a wheel for CPython 3.11 on Linux x86_64, available from the folder "
        f"{offline_wheels} (BATCHSCORE_ENV_WHEELS_DIR)"
    )
    assert "bsazure==0.2" in message


def test_the_published_yaml_scores_the_iris_inputs_given_with_the_run(
    airflow_db, iris_example: Path, azure_folder: Path, offline_wheels: Path, tmp_path: Path, monkeypatch
) -> None:
    from airflow.sdk.definitions.param import ParamValidationError

    reg = registry(tmp_path / "iris-registry", iris_example / "model" / "iris-classifier", ("1", "2"))
    monkeypatch.setenv("BATCHSCORE_MODEL_REGISTRY", str(reg))
    write(azure_folder / "deployment.yml", PUBLISHED.replace("batch-iris-py311", "bs-test-run"))
    path = azure_folder / "deployment.yml"
    with pytest.raises(ParamValidationError) as refused:  # Airflow's trigger check: no run is made
        run_dag(path, monkeypatch)
    assert str(refused.value) == "Invalid input for param input_path: No value passed"
    output = tmp_path / "output"
    try:
        dag_run, endpoint = run_dag(path, monkeypatch, {"input_path": str(iris_example / "data"), "output_path": str(output)})
    finally:
        remove_images(env_images("bs-test-run"))

    assert dag_run.state == "success"
    run_dir = output / run_key(dag_run.run_id)
    predictions = pd.read_csv(run_dir / "predictions.csv")
    files = sorted((iris_example / "data").glob("*.csv"))
    inputs = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
    assert predictions["id"].tolist() == inputs["id"].tolist()
    assert set(predictions["label"]) == {"installed from the conda file"}  # the conda file's package, in the image
    assert set(predictions["prediction"]) == {"setosa", "versicolor", "virginica"}
    summary = Summary.read(run_dir / "summary.json")
    assert (summary.status, summary.rows, summary.input.files) == (Summary.SUCCEEDED, 150, 15)
    assert endpoint.deployments[0].model.path == reg / "iris-classifier" / "2"


# --------------------------------------------------------------------------- a registry on object storage


@pytest.mark.s3
def test_latest_on_a_registry_on_object_storage_is_resolved_when_the_run_pins_its_model(
    s3,
    iris_example: Path,
    azure_folder: Path,
    tmp_path: Path,
    monkeypatch,
    caplog,
) -> None:
    from batchscore import model_pin
    from batchscore.errors import StorageNotFoundError
    from batchscore.run_store import fetch_model

    local = registry(tmp_path / "registry-upload", iris_example / "model" / "iris-classifier")
    upload_tree(local, f"{s3['uri']}/registry")
    root = f"s3://{S3_CONN}@{s3['bucket']}/registry"
    monkeypatch.setenv("BATCHSCORE_MODEL_REGISTRY", root)
    spec = load_endpoint(azure_folder / "deployment.yml").deployments[0]
    log = logging.getLogger("test-registry")
    with caplog.at_level(logging.INFO, logger="test-registry"):
        pin = model_pin.resolve(spec, log)
        folder = fetch_model(spec, pin, log)
    assert (pin.location, pin.model_version, pin.connection) == (f"{s3['uri']}/registry/iris-classifier/10", "10", S3_CONN)
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        ".complete",
        "iris-classifier/model.joblib",
        "iris-classifier/model.pkl",
    ]
    assert "Model azureml:iris-classifier@latest is version 10 (the highest of 1, 2, 10)" in caplog.messages

    write(azure_folder / "deployment.yml", PUBLISHED.replace("iris-classifier@latest", "iris-clasifier@latest"))
    missing = load_endpoint(azure_folder / "deployment.yml").deployments[0]
    with pytest.raises(StorageNotFoundError) as info:
        model_pin.resolve(missing, log)  # the plan task's pin
    assert str(info.value) == (
        f"deployment 'iris-torch-dpl', key model: model 'azureml:iris-clasifier@latest': the registry {root} "
        "(BATCHSCORE_MODEL_REGISTRY) has no model 'iris-clasifier'; did you mean 'iris-classifier'? it holds iris-classifier"
    )


def test_azures_endpoint_file_beside_the_deployment_is_refused_saying_to_move_it(azure_folder: Path) -> None:
    # Azure/azureml-examples, cli/endpoints/batch/deploy-models/mnist-classifier/endpoint.yml, as published.
    path = write(
        azure_folder / "endpoint.yml",
        """\
        $schema: https://azuremlschemas.azureedge.net/latest/batchEndpoint.schema.json
        name: mnist-batch
        description: A batch endpoint for scoring images from the MNIST dataset.
        tags:
          type: deep-learning
        """,
    )
    assert error_of(path) == (
        f"{path}:1: $schema: this is Azure's batch endpoint file (batchEndpoint.schema.json), not a deployment; "
        "batchscore makes the endpoint (the DAG) from each deployment's endpoint_name, so move this file out of the "
        "deployments folder"
    )
    assert [r.error is None for r in load_folder(azure_folder)] == [True, False]  # deployment.yml loads all the same


def test_an_image_that_cannot_be_built_fails_each_mini_batch_with_the_reason_in_the_summary(
    airflow_db, iris_example: Path, azure_folder: Path, offline_wheels: Path, tmp_path: Path, monkeypatch
) -> None:
    reg = registry(tmp_path / "iris-registry", iris_example / "model" / "iris-classifier", ("1",))
    monkeypatch.setenv("BATCHSCORE_MODEL_REGISTRY", str(reg))
    write(azure_folder / "environment" / "conda.yaml", CONDA.format(requirement="bsazure==0.2"))  # no such wheel
    text = PUBLISHED.replace("    max_retries: 3\n", "    max_retries: 0\n").replace(
        "  logging_level: info\n", "  logging_level: info\n  worker_mode: per_mini_batch\n"
    )
    path = write(azure_folder / "deployment.yml", text)
    output = tmp_path / "output"
    dag_run, _ = run_dag(path, monkeypatch, {"input_path": str(iris_example / "data"), "output_path": str(output)})

    summary = Summary.read(output / run_key(dag_run.run_id) / "summary.json")
    assert [(f.mini_batch, f.reason) for f in summary.failures] == [("mb-00000", "failed"), ("mb-00001", "failed")]
    conda = azure_folder / "environment" / "conda.yaml"
    for failure in summary.failures:
        assert failure.error.startswith(
            f"ImageBuildError: pip could not download the wheels of the pip dependencies in {conda} (exit 1): "
        )


@pytest.mark.parametrize(
    ("image", "base"),
    [
        ("  image: mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu20.04:latest\n", "batchscore-scoring:gpu"),
        ("", "batchscore-scoring:gpu"),
        ("  image: team/python-base:3.11\n", "team/python-base:3.11"),
    ],
)
def test_the_base_of_a_conda_files_image_is_the_scoring_image_unless_the_yaml_names_its_own(
    azure_folder: Path, monkeypatch, image: str, base: str
) -> None:
    monkeypatch.setenv("BATCHSCORE_ENV_BASE_IMAGE", "batchscore-scoring:gpu")
    text = PUBLISHED.replace("  image: mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu20.04:latest\n", image)
    env = load_endpoint(write(azure_folder / "deployment.yml", text)).deployments[0].environment
    assert env.build_base == base


def test_a_serving_container_takes_no_conda_file(azure_folder: Path, tmp_path: Path) -> None:
    (azure_folder / "model").mkdir()
    path = write(
        azure_folder / "serve.yml",
        """\
        name: iris-serve
        endpoint_name: iris-transform
        contract: serve
        model: {path: model}
        environment: {image: batchscore-iris-serve:latest, conda_file: environment/conda.yaml}
        """,
    )
    assert error_of(path) == (
        f"{path}:5: environment.conda_file: environment.conda_file is for contract: azure; a serving image brings its "
        "own packages"
    )
