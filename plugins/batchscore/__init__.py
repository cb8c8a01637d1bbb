"""batchscore: batch scoring of ML models on Apache Airflow and Docker.

spec (the deployment YAML) → factory (one DAG per YAML) → plan → score (one container per
mini-batch) → merge. The in-container side is the separate package ``batchscore_runtime``.
"""

__version__ = "0.1.0"
