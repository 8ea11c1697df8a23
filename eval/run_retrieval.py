"""Retrieval evaluation per language of any model on shards: the ``mlmm-eval-retrieval`` command
(:mod:`mlmm.cli.eval_retrieval`; ``--help`` for usage).
"""
import sys

from mlmm.cli.eval_retrieval import main

if __name__ == "__main__":
    sys.exit(main())
