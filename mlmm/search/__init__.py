"""Binary-code (Hamming) and float (cosine) nearest-neighbour search for cross-modal hashing.

    from mlmm.search import pack_codes, HammingIndex
    index = HammingIndex(bits=64).add(pack_codes(image_codes))       # faiss if installed, else torch popcount
    dist, ids = index.search(pack_codes(text_codes), k=10)

See :mod:`mlmm.search.codes` for the bit conventions and :mod:`mlmm.search.index` for the index file format.
"""
from mlmm.search.codes import (
    POPCOUNT_TABLE,
    cosine_topk,
    hamming_distances,
    hamming_topk,
    pack_codes,
    popcount64,
    popcount_bytes,
    recall_at_k,
    rerank,
    unpack_codes,
)
from mlmm.search.index import FloatIndex, HammingIndex, faiss_available, hamming_rerank_search
from mlmm.search.itq import ITQ

__all__ = ["ITQ", "POPCOUNT_TABLE", "FloatIndex", "HammingIndex", "cosine_topk", "faiss_available", "hamming_distances",
           "hamming_rerank_search", "hamming_topk", "pack_codes", "popcount64", "popcount_bytes", "recall_at_k",
           "rerank", "unpack_codes"]
