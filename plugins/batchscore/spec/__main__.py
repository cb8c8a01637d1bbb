"""``python -m batchscore.spec > schema.json``: prints the JSON schema of a deployment YAML (``make schema``)."""

from __future__ import annotations

import json

from batchscore.spec.schema import json_schema

if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(json_schema(), indent=2))
