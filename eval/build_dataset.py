"""Build mlmm eval shards from a standard benchmark's files: the ``mlmm-build-dataset`` command
(:mod:`mlmm.cli.build_dataset`; ``--help`` for usage).
"""
import sys

from mlmm.cli.build_dataset import main

if __name__ == "__main__":
    sys.exit(main())
