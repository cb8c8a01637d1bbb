"""batchscore's scoring runtime: runs inside the scoring container, never imports Airflow.

The orchestrator mounts this package read-only into the user's image and runs
``python3 -m batchscore_runtime``; the image needs Python 3.9+, pandas and pyarrow.
"""

__version__ = "0.1.0"
