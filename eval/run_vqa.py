"""VQA evaluation of an export with a vqa head: the ``mlmm-eval-vqa`` command (:mod:`mlmm.cli.eval_vqa`; ``--help`` for
usage).
"""
import sys

from mlmm.cli.eval_vqa import main

if __name__ == "__main__":
    sys.exit(main())
