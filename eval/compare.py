"""Merge results files into one markdown table and one plot: the ``mlmm-compare`` command (:mod:`mlmm.cli.compare`;
``--help`` for usage).
"""
import sys

from mlmm.cli.compare import main

if __name__ == "__main__":
    sys.exit(main())
