"""Captioning evaluation of an export with a caption head: the ``mlmm-eval-captioning`` command
(:mod:`mlmm.cli.eval_captioning`; ``--help`` for usage).
"""
import sys

from mlmm.cli.eval_captioning import main

if __name__ == "__main__":
    sys.exit(main())
