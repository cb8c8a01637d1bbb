"""The JSON schema of a deployment YAML (either layout), for editors."""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from batchscore.spec.endpoint import DeploymentFile, EndpointSpec


def json_schema() -> dict[str, Any]:
    """The JSON schema of a deployment YAML (either layout), for editors."""
    refs, schema = models_json_schema([(EndpointSpec, "validation"), (DeploymentFile, "validation")], by_alias=True)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "batchscore endpoint (deployments: [...]) or Azure-style deployment file",
        "anyOf": [refs[(EndpointSpec, "validation")], refs[(DeploymentFile, "validation")]],
        **schema,
    }
