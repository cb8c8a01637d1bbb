"""An endpoint (one DAG): its schedule (cron, preset or upstream assets) and deployments, in either layout of the YAML."""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Discriminator, Field, PrivateAttr, Tag, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from batchscore.spec.base import Name, StrictModel, short
from batchscore.spec.deployment import DeploymentSpec

if TYPE_CHECKING:
    from airflow.sdk import Asset

#: Airflow's schedule presets.
SCHEDULE_PRESETS = (
    "@once",
    "@continuous",
    "@hourly",
    "@daily",
    "@midnight",
    "@weekly",
    "@monthly",
    "@quarterly",
    "@yearly",
    "@annually",
)

# --------------------------------------------------------------------------- schedule
# A DAG starts on a cron expression or preset, on updates of upstream Airflow assets, or only
# by hand. batchscore.schedule turns a Schedule into Airflow's schedule argument.


def upstream_asset(entry: str | AssetSpec) -> Asset:
    """The Airflow asset of one ``schedule.assets`` entry; building it is also how an entry is checked.

    A string with ``://`` is a URI, any other string a name; Airflow gives an asset with only
    one of them the other as well (the same string), so an entry matches a producer's
    ``Asset("<that string>")``. A mapping gives both, for producers that declare both.
    """
    from airflow.sdk import Asset  # imports Airflow; only files that use assets pay

    if isinstance(entry, str):
        return Asset(uri=entry) if "://" in entry else Asset(name=entry)
    name, uri = entry.name or entry.uri, entry.uri or entry.name  # the model requires one of them
    assert name is not None and uri is not None
    return Asset(name=name, uri=uri)


def _check_schedule(value: str) -> str:
    if value in SCHEDULE_PRESETS:
        return value
    from croniter import croniter  # Airflow's own cron parser

    if not croniter.is_valid(value):
        raise ValueError(
            f"schedule {value!r} is neither a cron expression ('0 2 * * *') nor a preset ({', '.join(SCHEDULE_PRESETS)})"
        )
    return value


def _check_asset(entry: str | AssetSpec) -> None:
    """Refuse what Airflow's ``Asset`` refuses, and URIs with credentials (Airflow would show them)."""
    shown = _shown(entry)
    for value in (entry,) if isinstance(entry, str) else (entry.name, entry.uri):
        if value is not None and "://" in value:
            try:
                userinfo = "@" in (urllib.parse.urlsplit(value).netloc or "")
            except ValueError as exc:
                raise ValueError(f"asset {shown}: not a valid URI ({exc})") from None
            if userinfo:
                raise ValueError(
                    f"asset {shown}: a URI must not hold a user name or password "
                    "(Airflow shows asset names and URIs to every user)"
                )
    try:
        upstream_asset(entry)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"asset {shown}: {exc}") from None


def _check_asset_string(value: str) -> str:
    _check_asset(value)
    return value


class AssetSpec(StrictModel):
    """An upstream asset by name and/or URI, spelt exactly as the producing DAG declares it."""

    name: str | None = Field(None, description="The asset's name; defaults to its URI.")
    uri: str | None = Field(None, description="The asset's URI; defaults to its name.")

    @model_validator(mode="after")
    def _valid(self) -> AssetSpec:
        if self.name is None and self.uri is None:
            raise ValueError("an asset needs a name, a uri, or both")
        _check_asset(self)
        return self


def _string_or_mapping(value: Any) -> str:
    return "mapping" if isinstance(value, (dict, BaseModel)) else "string"


#: One upstream asset: ``"s3://bucket/path"`` (a URI), ``"iris-features"`` (a name), or a
#: mapping ``{name: ..., uri: ...}``.
AssetEntry = Annotated[
    Annotated[str, AfterValidator(_check_asset_string), Tag("string")] | Annotated[AssetSpec, Tag("mapping")],
    Discriminator(_string_or_mapping),
]


class AssetSchedule(StrictModel):
    """Start a run when upstream Airflow assets are updated (a producing task succeeded, or an event was posted)."""

    assets: list[AssetEntry] = Field(
        min_length=1,
        description="Upstream assets: a URI ('s3://bucket/iris/'), a name ('iris-features'), "
        "or {name: ..., uri: ...}, as the producer declares them.",
    )
    when: Literal["all", "any"] = Field(
        "all",
        description="all: a run starts once every asset has been updated since the last run "
        "(Airflow's default); any: an update of any one of them starts a run.",
    )

    @field_validator("assets")
    @classmethod
    def _distinct(cls, assets: list[str | AssetSpec]) -> list[str | AssetSpec]:
        seen: dict[str, str | AssetSpec] = {}
        for entry in assets:
            asset = upstream_asset(entry)
            for key in (f"the name {asset.name!r}", f"the URI {asset.uri!r}"):
                if key not in seen:
                    seen[key] = entry
                elif seen[key] == entry:
                    raise ValueError(f"asset {_shown(entry)} is listed twice")
                else:
                    raise ValueError(f"assets {_shown(seen[key])} and {_shown(entry)} are one asset to Airflow (both have {key})")
        return assets


def _shown(entry: str | AssetSpec) -> str:
    """The entry for an error message, with any credentials in a URI masked (errors are public)."""
    text = repr(entry if isinstance(entry, str) else {k: v for k, v in entry.model_dump().items() if v is not None})
    return re.sub(r"(://)[^/@\s'\"]*@", r"\1***@", text)


def _schedule_kind(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, str):
        return "cron"
    return "asset-schedule" if isinstance(value, (dict, AssetSchedule)) else "other"


def _not_a_schedule(value: Any) -> None:
    raise ValueError(f"schedule must be a cron expression, a preset, or a mapping with 'assets', got {short(value)}")


#: ``None`` (manual runs only), a cron expression or preset, or an :class:`AssetSchedule`.
Schedule = Annotated[
    Annotated[None, Tag("none")]
    | Annotated[str, AfterValidator(_check_schedule), Tag("cron")]
    | Annotated[AssetSchedule, Tag("asset-schedule")]
    | Annotated[SkipJsonSchema[Any], AfterValidator(_not_a_schedule), Tag("other")],
    Discriminator(_schedule_kind),
]
SCHEDULE_DESCRIPTION = (
    "A cron expression ('0 2 * * *') or preset ('@daily', ...), or {assets: [...]} to run when upstream Airflow "
    "assets are updated; none for manual runs only."
)
ENDPOINT_NAME_DESCRIPTION = "The DAG id; no two YAML files may share one."
SCHEMA_DESCRIPTION = "The schema the file follows (Azure's or include/schema/deployment.schema.json); not read."


class EndpointSpec(StrictModel):
    """An endpoint: one Airflow DAG; each deployment is a task group plan → score → merge."""

    schema_: str | None = Field(None, alias="$schema", description=SCHEMA_DESCRIPTION)
    endpoint_name: Name = Field(description=ENDPOINT_NAME_DESCRIPTION)
    description: str | None = Field(None, description="The DAG's description, shown in Airflow.")
    schedule: Schedule = Field(None, description=SCHEDULE_DESCRIPTION)
    tags: dict[str, str] = Field(default_factory=dict, description="The DAG's tags, shown in Airflow as key:value.")
    deployments: list[DeploymentSpec] = Field(
        min_length=1, description="The deployments, each a task group plan → score → merge of the DAG."
    )
    _source: Path | None = PrivateAttr(None)

    @field_validator("deployments")
    @classmethod
    def _unique(cls, deployments: list[DeploymentSpec]) -> list[DeploymentSpec]:
        for attr, what in (("name", "name"), ("output", "output.path")):
            seen: dict[Any, str] = {}
            for d in deployments:
                value = getattr(d, attr)
                if value is None:  # an output given with each run: one folder per deployment below it
                    continue
                key = value.path if attr == "output" else value
                if key in seen:
                    raise ValueError(f"deployments {seen[key]!r} and {d.name!r} have the same {what}: {key}")
                seen[key] = d.name
        return deployments

    @model_validator(mode="after")
    def _scheduled_runs_have_locations(self) -> EndpointSpec:
        if self.schedule is None:
            return self
        for i, d in enumerate(self.deployments):
            for key in ("input", "output"):
                if getattr(d, key) is None:
                    raise ValueError(
                        f"deployments[{i}] has no {key}, so each run must give it, but a scheduled run has no "
                        f"trigger form: add {key}.path to the deployment, or remove schedule"
                    )
        return self

    @property
    def dag_id(self) -> str:
        return self.endpoint_name

    @property
    def source(self) -> Path | None:
        """The YAML file this endpoint was loaded from."""
        return self._source


class DeploymentFile(DeploymentSpec):
    """Azure's deployment YAML: one deployment, with its endpoint's name and schedule."""

    schema_: str | None = Field(None, alias="$schema", description=SCHEMA_DESCRIPTION)
    endpoint_name: Name = Field(description=ENDPOINT_NAME_DESCRIPTION)
    type: Literal["model"] = Field("model", description="Azure's `type: model`, accepted as it is.")
    schedule: Schedule = Field(None, description=SCHEDULE_DESCRIPTION)

    @model_validator(mode="after")
    def _scheduled_runs_have_locations(self) -> DeploymentFile:
        for key in ("input", "output"):
            if self.schedule is not None and getattr(self, key) is None:
                raise ValueError(
                    f"schedule is set but {key} is not, and a scheduled run has no trigger form to give it: "
                    f"add {key}.path, or remove schedule"
                )
        return self

    def to_endpoint(self, context: dict[str, Any]) -> EndpointSpec:
        own = {"schema_", "endpoint_name", "type", "schedule"}
        deployment = DeploymentSpec.model_validate(self.model_dump(exclude=own), context=context)
        return EndpointSpec(
            endpoint_name=self.endpoint_name,
            description=self.description,
            schedule=self.schedule,
            tags=self.tags,
            deployments=[deployment],
        )
