"""Sweeps at equal compute (``hgscale sweep``): the paper's question, Hourglass against vanilla Transformers matched
to it, asked at several training-FLOPs budgets, over seeds, with every model tuned alike.

- ``options``: the command line's values (models, matching, budgets, seeds, grid, tuning), checked;
- ``plan``: matched baselines, steps per budget, the runs and their overrides, ``plan.json``;
- ``runs``: which runs are finished, the tuning choice, one run after another on this machine;
- ``mlflow_runs``: the sweep's parent run and the tags of its runs;
- ``slurm``: a job array, one run per task, from ``slurm/sweep_array.sh``.

Sits above ``training`` (it reads the parallel layout) and below ``commands``.
"""
