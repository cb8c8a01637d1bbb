"""The Airflow UI plugin: a "Batch scoring" tab on the DAG-run page (docs/ui.md).

:mod:`~batchscore.ui.plugin` registers it (the ``airflow.plugins`` entry point), :mod:`~batchscore.ui.app`
serves the page and its JSON under ``/batchscore`` behind Airflow's auth manager, :mod:`~batchscore.ui.report`
reads a run's progress, timeline and failures from its run folder, :mod:`~batchscore.ui.folders` finds that
folder. The page itself (``static/``) is plain HTML, CSS and JavaScript, served by the plugin: no CDN.
"""
