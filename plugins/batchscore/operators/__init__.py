"""The operators of a deployment's task group: plan → score (mapped, one per mini-batch) → merge.

Warm deployments add a setup and a teardown task around the scoring tasks (:mod:`batchscore.operators.workers`).
"""

from batchscore.operators.merge import MergeOperator
from batchscore.operators.plan import PlanOperator
from batchscore.operators.score import ScoreOperator
from batchscore.operators.workers import StartWorkersOperator, StopWorkersOperator

__all__ = ["MergeOperator", "PlanOperator", "ScoreOperator", "StartWorkersOperator", "StopWorkersOperator"]
