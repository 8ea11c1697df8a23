"""Zero-shot classification per language of any model: the ``mlmm-eval-zeroshot`` command
(:mod:`mlmm.cli.eval_zeroshot`; ``--help`` for usage).
"""
import sys

from mlmm.cli.eval_zeroshot import main

if __name__ == "__main__":
    sys.exit(main())
