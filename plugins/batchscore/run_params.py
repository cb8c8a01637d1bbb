"""The trigger form's params of an endpoint's DAG, and the deployment a run with them works on.

* :func:`dag_params` are the DAG's params, which Airflow's UI shows as the trigger form:
  ``input_path``, ``output_path`` and ``mini_batch_size``. Each defaults to null, meaning "as the
  YAML says", so scheduled and asset-triggered runs behave exactly as the YAML says.
* :func:`apply_run_params` gives the deployment a run works on: the YAML's, with the run's params
  applied, checked as the YAML is (e.g. an output folder that is or holds the input folder is
  refused). Plan, score and merge of one run all call it (``DeploymentMixin.run_spec``), so they
  agree; Airflow keeps a run's conf, so a cleared and rerun task sees the same params.

What starts a run (its schedule, upstream assets) is :mod:`batchscore.schedule`.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from airflow.sdk import Param, TaskGroup
from pydantic import ValidationError

from batchscore.errors import RunParamError
from batchscore.spec import OUTPUT_OVERLAP_ADVICE, DeploymentSpec, EndpointSpec, output_overlap
from batchscore.spec.deployment import missing_location
from batchscore.spec.paths import SUPPORTED_LOCATIONS, is_remote_location, uri_scheme

INPUT_PATH = "input_path"
OUTPUT_PATH = "output_path"
MINI_BATCH_SIZE = "mini_batch_size"
#: The run parameters, in the trigger form's order.
RUN_PARAMS = (INPUT_PATH, OUTPUT_PATH, MINI_BATCH_SIZE)


def _yaml_values(endpoint: EndpointSpec, value: Any) -> str:
    if len(endpoint.deployments) == 1:
        return str(value(endpoint.deployments[0]))
    return "; ".join(f"{d.name}: {value(d)}" for d in endpoint.deployments)


#: What the trigger form takes for a path: an absolute path, or a URI (``s3://...``, ``file:///...``).
LOCATION_PATTERN = "^(/|[A-Za-z][A-Za-z0-9+.-]*://)"


def _location_param(endpoint: EndpointSpec, key: str, title: str, what: str) -> Param:
    """The trigger form's field of ``input`` or ``output``: optional ("as the YAML says") when every deployment's
    YAML gives it, required (no default) when one leaves it to the run, as Azure's deployment YAML does."""
    missing = [d.name for d in endpoint.deployments if getattr(d, key) is None]
    if missing:
        return Param(
            type="string",
            minLength=1,
            pattern=LOCATION_PATTERN,
            title=title,
            description=f"{what} Required: the YAML of {', '.join(missing)} has no {key}.",
        )
    yaml_value = _yaml_values(endpoint, lambda d: getattr(d, key).path)
    return Param(
        None,
        type=["null", "string"],
        minLength=1,
        pattern=LOCATION_PATTERN,
        title=title,
        description=f"{what} Empty: the YAML's {key}.path ({yaml_value}).",
    )


def dag_params(endpoint: EndpointSpec) -> dict[str, Param]:
    """The DAG's params: the trigger form's fields, each null ("as the YAML says") by default; ``input_path`` and
    ``output_path`` required, with no default, for deployments whose YAML leaves them to the run."""
    several = len(endpoint.deployments) > 1
    each = " It applies to every deployment." if several else ""
    return {
        INPUT_PATH: _location_param(
            endpoint,
            "input",
            "Input folder",
            "Absolute path of a folder of input files, or a URI (s3://bucket/prefix/), read with the YAML's "
            "input.pattern; a URI uses the YAML's input.connection, or the one it names (s3://conn_id@bucket/...)." + each,
        ),
        OUTPUT_PATH: _location_param(
            endpoint,
            "output",
            "Output folder",
            "Absolute path or URI; each deployment writes this run to <output folder>/<deployment name>/<run id>/."
            if several
            else "Absolute path or URI (s3://bucket/prefix/); this run writes to <output folder>/<run id>/.",
        ),
        MINI_BATCH_SIZE: Param(
            None,
            type=["null", "integer"],
            minimum=1,
            title="Files per mini-batch",
            description=(
                "A whole number, 1 or more. Empty: the YAML's settings.mini_batch_size "
                f"({_yaml_values(endpoint, lambda d: d.settings.mini_batch_size)})." + each
            ),
        ),
    }


def _absolute(name: str, value: Any) -> Path | str:
    """An absolute local path (resolved), or a URI of object storage (kept as given; the spec checks its form)."""
    if not isinstance(value, str):
        raise RunParamError(f"run parameter {name} must be a string (an absolute path or a URI), got {value!r}")
    if is_remote_location(value):
        return value
    if uri_scheme(value) == "file":
        value = value.split("://", 1)[1].removeprefix("localhost")
    elif uri_scheme(value):
        raise RunParamError(f"run parameter {name}: {value!r} has a scheme batchscore does not read; use {SUPPORTED_LOCATIONS}")
    if not PurePosixPath(value).is_absolute():
        raise RunParamError(f"run parameter {name} must be an absolute path or a URI, got {value!r}")
    return Path(value).resolve()


def _unknown(keys: list[str]) -> str:
    parts = []
    for key in keys:
        match = difflib.get_close_matches(key, RUN_PARAMS, n=1, cutoff=0.8)
        parts.append(f"{key!r}" + (f" (did you mean {match[0]!r}?)" if match else ""))
    return (
        f"unknown run parameter{'s' if len(keys) > 1 else ''} {', '.join(parts)}; "
        f"batchscore's run parameters are {', '.join(RUN_PARAMS)}"
    )


def apply_run_params(spec: DeploymentSpec, params: Mapping[str, Any], *, several_deployments: bool) -> DeploymentSpec:
    """The deployment as a run with ``params`` sees it; ``spec`` itself when no param is set.

    ``params`` is the run's ``context["params"]``: the DAG's params, with the run's conf applied
    (Airflow has checked them against their JSON schema). Null means "as the YAML says". With
    ``several_deployments``, ``output_path`` is the parent of one folder per deployment.
    Raises :class:`RunParamError` naming the parameter and its value.
    """
    unknown = sorted(k for k in params if k not in RUN_PARAMS)
    if unknown:
        raise RunParamError(_unknown(unknown))
    for key, name in (("input", INPUT_PATH), ("output", OUTPUT_PATH)):
        if getattr(spec, key) is None and params.get(name) is None:
            raise RunParamError(missing_location(spec.name, key, name))
    data = spec.model_dump(mode="json", by_alias=True)
    data["input"] = data["input"] or {}
    data["output"] = data["output"] or {}
    changed = False
    if (value := params.get(INPUT_PATH)) is not None:
        folder = _absolute(INPUT_PATH, value)
        if isinstance(folder, Path):  # object storage: listed by the plan, which says when nothing is there
            if not folder.exists():
                raise RunParamError(f"run parameter {INPUT_PATH}: folder {value!r} does not exist")
            if not folder.is_dir():
                raise RunParamError(f"run parameter {INPUT_PATH}: {value!r} is not a folder")
        data["input"]["path"], changed = str(folder), True
        if isinstance(folder, Path):
            data["input"]["connection"] = None
    if (value := params.get(OUTPUT_PATH)) is not None:
        folder = _absolute(OUTPUT_PATH, value)
        if isinstance(folder, str):
            folder = f"{folder.rstrip('/')}/{spec.name}" if several_deployments else folder
        elif several_deployments:
            folder = folder / spec.name
        if isinstance(folder, Path) and folder.exists() and not folder.is_dir():
            raise RunParamError(f"run parameter {OUTPUT_PATH}: {str(folder)!r} exists and is not a folder")
        data["output"]["path"], changed = str(folder), True
        if isinstance(folder, Path):
            data["output"]["connection"] = None
    if (value := params.get(MINI_BATCH_SIZE)) is not None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RunParamError(f"run parameter {MINI_BATCH_SIZE} must be a whole number, 1 or more, got {value!r}")
        data["settings"]["mini_batch_size"], changed = value, True
    if not changed:
        return spec
    given = " and ".join(k for k in (INPUT_PATH, OUTPUT_PATH) if params.get(k) is not None)
    clash = output_overlap(_location(data["input"]["path"]), _location(data["output"]["path"])) if given else None
    if clash:
        raise RunParamError(
            f"run parameter{'s' if ' and ' in given else ''} {given}: the output folder {clash} "
            f"(deployment {spec.name!r}); {OUTPUT_OVERLAP_ADVICE}"
        )
    try:
        return DeploymentSpec.model_validate(data)
    except ValidationError as exc:  # an invariant of the YAML's schema that the params break
        set_ = {k: params[k] for k in RUN_PARAMS if params.get(k) is not None}
        raise RunParamError(f"run parameters {set_} do not fit deployment {spec.name!r}:\n{exc}") from None


def _location(value: str) -> Path | str:
    return value if is_remote_location(value) else Path(value)


def deployment_names(dag: Any) -> list[str]:
    """The deployments of a DAG built by :func:`batchscore.factory.build_dag`: its top-level task groups."""
    return [label for label, node in dag.task_group.children.items() if isinstance(node, TaskGroup)]
