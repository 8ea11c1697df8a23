"""Console commands (``[project.scripts]`` in pyproject.toml) whose code has no other home in the library: one
module per command, each with ``main(argv=None) -> exit code``. The scripts in ``recipes/`` and ``eval/`` are thin
wrappers around them, so ``python eval/run_suite.py ...`` and ``mlmm-eval ...`` run the same code."""
