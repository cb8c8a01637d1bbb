"""How one try of one mini-batch is scored, without Airflow: a contract (what runs) times an executor (where it runs).

* :mod:`~batchscore.scoring.attempt`: the try's claim, scratch folder, intake and failure record;
* :mod:`~batchscore.scoring.contract`: ``azure`` (a scoring script) or ``serve`` (a serving container);
* :mod:`~batchscore.scoring.executor`: ``create()`` picks :mod:`~batchscore.scoring.per_mini_batch`
  or :mod:`~batchscore.scoring.warm` (the run's warm workers, :mod:`~batchscore.scoring.workers`).

The Airflow task around it is :class:`batchscore.operators.score.ScoreOperator`.
"""
