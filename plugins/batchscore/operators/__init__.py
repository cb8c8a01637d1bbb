"""The operators of a deployment's task group: plan → score (mapped, one per mini-batch) → merge."""

from batchscore.operators.merge import MergeOperator
from batchscore.operators.plan import PlanOperator
from batchscore.operators.score import ScoreMiniBatchOperator

__all__ = ["MergeOperator", "PlanOperator", "ScoreMiniBatchOperator"]
