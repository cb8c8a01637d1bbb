"""The operators of a deployment's task group: plan → score (mapped, one per mini-batch) → merge.

The score task runs an Azure-style scoring script (:class:`ScoreMiniBatchOperator`) or a
SageMaker-style serving container (:class:`ServeMiniBatchOperator`), as ``contract`` says.
"""

from batchscore.operators.merge import MergeOperator
from batchscore.operators.plan import PlanOperator
from batchscore.operators.score import ScoreMiniBatchOperator
from batchscore.operators.serve import ServeMiniBatchOperator

__all__ = ["MergeOperator", "PlanOperator", "ScoreMiniBatchOperator", "ServeMiniBatchOperator"]
