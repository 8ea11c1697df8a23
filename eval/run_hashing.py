"""Cross-modal hashing evaluation of an export with a hash head: the ``mlmm-eval-hashing`` command
(:mod:`mlmm.cli.eval_hashing`; ``--help`` for usage).
"""
import sys

from mlmm.cli.eval_hashing import main

if __name__ == "__main__":
    sys.exit(main())
