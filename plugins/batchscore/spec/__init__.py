"""The deployment YAML: its schema, its loading, and errors that name file, line and key.

Two layouts are accepted, and both give an :class:`EndpointSpec` (one Airflow DAG):

* an **endpoint file** with a ``deployments:`` list; each deployment becomes a task group;
* an **Azure deployment file**: Azure ML's batch-deployment YAML (``name``, ``endpoint_name``,
  ``model``, ``code_configuration``, ``environment``, ``settings``, ...) plus batchscore's
  ``input`` and ``output`` blocks; it is an endpoint with that one deployment.

Relative paths are resolved against the YAML file's folder. Unknown keys are errors, with a
"did you mean" suggestion.

Its modules, each owning one thing (they import one another, never this package):

* :mod:`~batchscore.spec.paths`: the path policy (relative paths, ``BATCHSCORE_ALLOWED_ROOTS``, output apart from input);
* :mod:`~batchscore.spec.base`: the strict base model and the name grammars every model shares;
* :mod:`~batchscore.spec.settings`, :mod:`~batchscore.spec.transform`, :mod:`~batchscore.spec.resources`:
  a deployment's ``settings``, ``transform`` (contract: serve) and ``resources``;
* :mod:`~batchscore.spec.deployment`: one deployment (model, code, image, input, output) and its contract's checks;
* :mod:`~batchscore.spec.endpoint`: an endpoint, its schedule and upstream assets, and Azure's deployment file;
* :mod:`~batchscore.spec.loading`: reading a YAML file into an :class:`EndpointSpec`, and keys' lines;
* :mod:`~batchscore.spec.issues`: validation errors in words, each with its line and key;
* :mod:`~batchscore.spec.schema`: the JSON schema (``python -m batchscore.spec`` prints it).
"""

from __future__ import annotations

from batchscore.spec.deployment import (
    CodeConfiguration,
    DeploymentSpec,
    EnvironmentSpec,
    InputSpec,
    ModelSpec,
    OutputSpec,
    image_reference_problem,
)
from batchscore.spec.endpoint import AssetSchedule, AssetSpec, DeploymentFile, EndpointSpec, upstream_asset
from batchscore.spec.loading import key_line, load_endpoint
from batchscore.spec.paths import ALLOWED_ROOTS_ENV, OUTPUT_OVERLAP_ADVICE, allowed_roots, output_overlap
from batchscore.spec.resources import Resources, memory_bytes
from batchscore.spec.schema import json_schema
from batchscore.spec.settings import RetrySettings, SecretRef, Settings, size_bytes
from batchscore.spec.transform import DataProcessing, ModelClientConfig, TransformSettings

__all__ = [
    "ALLOWED_ROOTS_ENV",
    "OUTPUT_OVERLAP_ADVICE",
    "AssetSchedule",
    "AssetSpec",
    "CodeConfiguration",
    "DataProcessing",
    "DeploymentFile",
    "DeploymentSpec",
    "EndpointSpec",
    "EnvironmentSpec",
    "InputSpec",
    "ModelClientConfig",
    "ModelSpec",
    "OutputSpec",
    "Resources",
    "RetrySettings",
    "SecretRef",
    "Settings",
    "TransformSettings",
    "allowed_roots",
    "image_reference_problem",
    "json_schema",
    "key_line",
    "load_endpoint",
    "memory_bytes",
    "output_overlap",
    "size_bytes",
    "upstream_asset",
]
