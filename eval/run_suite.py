"""Run an evaluation suite (every task x dataset x language it names) for any model: the ``mlmm-eval`` command
(:mod:`mlmm.cli.eval_suite`; ``--help`` for usage).
"""
import sys

from mlmm.cli.eval_suite import main

if __name__ == "__main__":
    sys.exit(main())
