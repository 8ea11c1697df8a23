"""Composed image retrieval per language: the ``mlmm-eval-composed`` command (:mod:`mlmm.cli.eval_composed`; ``--help``
for usage).
"""
import sys

from mlmm.cli.eval_composed import main

if __name__ == "__main__":
    sys.exit(main())
