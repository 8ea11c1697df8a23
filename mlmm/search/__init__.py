"""Binary-code (Hamming) and float (cosine) nearest-neighbour search for cross-modal hashing.

    from mlmm.search import pack_codes, HammingIndex
    index = HammingIndex(bits=64).add(pack_codes(image_codes))       # native popcount kernel, else faiss / torch
    dist, ids = index.search(pack_codes(text_codes), k=10)

See :mod:`mlmm.search.codes` for the bit conventions, :mod:`mlmm.search.index` for the index file format and
:mod:`mlmm.search.kernel` for the native kernel (compiled with the system C compiler on first use).
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
from mlmm.search.kernel import native_available, native_hamming_topk, native_status

__all__ = ["ITQ", "POPCOUNT_TABLE", "FloatIndex", "HammingIndex", "cosine_topk", "faiss_available", "hamming_distances",
           "hamming_rerank_search", "hamming_topk", "native_available", "native_hamming_topk", "native_status",
           "pack_codes", "popcount64", "popcount_bytes", "recall_at_k", "rerank", "unpack_codes"]
