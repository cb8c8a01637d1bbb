"""One Airflow DAG per deployment YAML in dags/deployments/ (docs/deployment-yaml.md).

Set BATCHSCORE_DEPLOYMENTS_DIR to read the YAML files from another folder.
"""

import os
from pathlib import Path

from batchscore.factory import build_dags

build_dags(os.environ.get("BATCHSCORE_DEPLOYMENTS_DIR", Path(__file__).parent / "deployments"), globals())
