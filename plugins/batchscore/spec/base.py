"""What every model of the deployment YAML shares: the strict base model, name grammars, values quoted in messages."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

#: A deployment's or an endpoint's name (the endpoint's is the DAG id).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
#: An environment variable's name.
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class StrictModel(BaseModel):
    """A model that refuses unknown keys and is immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def short(value: Any) -> str:
    """``value`` for a message: a string quoted, anything else as JSON, cut at 60 characters."""
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
