"""Data: shard writing, decoding/transforms, the training/eval pipeline and tokenizers.

Names are imported lazily so that ``python -m mlmm.data.write_shards`` does not import its own
module twice (and so that ``import mlmm.data`` stays cheap).
"""
import importlib

_EXPORTS = {
    "Batch": "batch",
    "Preprocessor": "pipeline", "SampleError": "pipeline", "build_train_loader": "pipeline", "collate": "pipeline",
    "iter_samples": "pipeline", "load_eval_items": "pipeline", "resolve_shards": "pipeline",
    "select_captions": "pipeline",
    "load_tokenizer": "tokenization", "train_tokenizer": "tokenization",
    "shared_data_manifest": "write_shards",
}
# (the function `write_shards` lives in the module of the same name: `from mlmm.data.write_shards import
# write_shards`; exporting it here would be shadowed by the submodule once that is imported)
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"mlmm.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'mlmm.data' has no attribute {name!r}")
