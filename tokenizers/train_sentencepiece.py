"""Train a multilingual sentencepiece tokenizer: the ``mlmm-sentencepiece`` command (:mod:`mlmm.data.sentencepiece`;
``--help`` for usage). This folder has no ``__init__.py`` on purpose: a package named ``tokenizers`` would shadow
the HF library."""
import sys

from mlmm.data.sentencepiece import main

if __name__ == "__main__":
    sys.exit(main())
