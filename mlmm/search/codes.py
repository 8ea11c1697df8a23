"""Binary codes: sign -> packed bits (uint8), popcount, Hamming distances and exact Hamming top-k in torch.

    packed = pack_codes(h)                    # h Float[N, bits] (relaxed codes) -> Uint8[N, bits / 8]
    d = hamming_distances(q_packed, packed)   # Int32[Q, N]
    dist, ids = hamming_topk(q_packed, packed, k=10)

Conventions (shared with faiss' binary indexes, so both backends give the same distances):

* bit ``j`` of a code is 1 iff ``h[j] > 0`` (``sign`` with 0 mapped to -1 / bit 0);
* bits are packed most-significant-first, as ``numpy.packbits``: bit ``j`` is bit ``7 - j % 8`` of byte ``j // 8``;
* Hamming distance = popcount(a XOR b), an integer in ``[0, bits]``;
* top-k order is ascending ``(distance, database index)``: exact ties are broken by the lower index, so the
  result is deterministic (faiss returns the same distances; among equal distances it may pick other ids).

The pure-torch popcount works on the packed bytes viewed as 64-bit words when ``bytes % 8 == 0`` (SWAR bit
counting, no table) and otherwise via a 256-entry lookup table over bytes. Everything is chunked over queries
so that at most ``chunk x N`` distances exist at once.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
POPCOUNT_TABLE = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.uint8)  # Uint8[256]

# SWAR masks as signed int64 (torch has no uint64 arithmetic): 0x5555..., 0x3333..., 0x0f0f...
_M1 = 0x5555555555555555
_M2 = 0x3333333333333333
_M4 = 0x0F0F0F0F0F0F0F0F


def as_tensor_u8(x) -> Tensor:
    """numpy / torch packed codes -> contiguous Uint8 tensor [N, nbytes] (no copy when possible)."""
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    if t.dtype != torch.uint8 or t.dim() != 2:
        raise ValueError(f"packed codes must be Uint8[N, bytes], got {t.dtype} {tuple(t.shape)}")
    return t.contiguous()


def pack_codes(codes: Tensor) -> Tensor:
    """Relaxed or binary codes Float[N, bits] (any real values; bit = value > 0) -> Uint8[N, bits / 8].

    ``bits`` must be a multiple of 8. Bits are packed MSB-first (``numpy.packbits`` order).
    """
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [N, bits], got shape {tuple(codes.shape)}")
    n, bits = codes.shape
    if bits % 8:
        raise ValueError(f"the number of bits must be a multiple of 8, got {bits}")
    b = (codes.detach() > 0).to(torch.uint8).view(n, bits // 8, 8)  # [N, bytes, 8]
    return (b * _BIT_WEIGHTS.to(b.device)).sum(dim=2, dtype=torch.uint8)  # [N, bytes] (max 255: no overflow)


def unpack_codes(packed: Tensor, signed: bool = True) -> Tensor:
    """Uint8[N, bytes] -> Float[N, 8 * bytes] in {-1, +1} (``signed``) or {0, 1}. Inverse of :func:`pack_codes`."""
    packed = as_tensor_u8(packed)
    bits = (packed.unsqueeze(-1) & _BIT_WEIGHTS.to(packed.device)).ne(0)  # [N, bytes, 8]
    bits = bits.flatten(1).float()
    return bits * 2 - 1 if signed else bits


def popcount_bytes(x: Tensor) -> Tensor:
    """Per-byte popcount of a Uint8 tensor (table lookup) -> Uint8 tensor of the same shape."""
    return POPCOUNT_TABLE.to(x.device)[x.long()]


def popcount64(x: Tensor) -> Tensor:
    """Per-word popcount of an Int64 tensor (SWAR, two's complement) -> Int64 tensor in [0, 64]."""
    x = x - ((x >> 1) & _M1)  # arithmetic shift: the sign-extended top bit is masked off by _M1
    x = (x & _M2) + ((x >> 2) & _M2)
    x = (x + (x >> 4)) & _M4  # each byte holds its count (<= 8)
    x = x + (x >> 8)
    x = x + (x >> 16)
    x = x + (x >> 32)
    return x & 0x7F


def _words(packed: Tensor) -> Tensor:
    """Uint8[N, bytes] with bytes % 8 == 0 -> Int64[N, bytes / 8] (same memory)."""
    return packed.view(torch.int64)


def hamming_distances(queries: Tensor, database: Tensor, method: str = "auto") -> Tensor:
    """All pairwise Hamming distances: Uint8[Q, bytes] x Uint8[N, bytes] -> Int32[Q, N].

    ``method``: ``"swar"`` (64-bit words; needs bytes % 8 == 0), ``"lut"`` (byte table) or ``"auto"``.
    Memory is O(Q x N x words); use :func:`hamming_topk` (chunked) for large problems.
    """
    queries, database = as_tensor_u8(queries), as_tensor_u8(database)
    if queries.shape[1] != database.shape[1]:
        raise ValueError(f"code sizes differ: queries {queries.shape[1]} bytes, database {database.shape[1]} bytes")
    nbytes = queries.shape[1]
    if method == "auto":
        method = "swar" if nbytes % 8 == 0 else "lut"
    if method == "swar":
        if nbytes % 8:
            raise ValueError(f"swar popcount needs a multiple of 64 bits, got {8 * nbytes}")
        q, d = _words(queries), _words(database)  # [Q, W], [N, W]
        out = popcount64(q[:, None, 0] ^ d[None, :, 0])  # [Q, N]
        for w in range(1, q.shape[1]):
            out += popcount64(q[:, None, w] ^ d[None, :, w])
        return out.to(torch.int32)
    if method == "lut":
        table = POPCOUNT_TABLE.to(queries.device).to(torch.int32)
        out = table[(queries[:, None, 0] ^ database[None, :, 0]).long()]  # [Q, N]
        for b in range(1, nbytes):
            out += table[(queries[:, None, b] ^ database[None, :, b]).long()]
        return out
    raise ValueError(f"method must be auto|swar|lut, got {method!r}")


def hamming_topk(queries: Tensor, database: Tensor, k: int, chunk_size: int = 64,
                 method: str = "auto") -> tuple[Tensor, Tensor]:
    """Exact Hamming k-nearest neighbours, ordered by (distance, index).

    Args:
        queries: Uint8[Q, bytes] packed codes; database: Uint8[N, bytes].
        k: neighbours per query (clipped to N).
        chunk_size: queries scored at once (memory ~ chunk_size x N x 8 bytes).

    Returns:
        (Int32[Q, k] distances, Int64[Q, k] database indices).
    """
    queries, database = as_tensor_u8(queries), as_tensor_u8(database)
    n = database.shape[0]
    k = min(int(k), n)
    if k < 1:
        raise ValueError("k must be >= 1 and the database non-empty")
    dist_out = torch.empty(queries.shape[0], k, dtype=torch.int32)
    ids_out = torch.empty(queries.shape[0], k, dtype=torch.int64)
    bits = 8 * database.shape[1]
    # composite key = distance * N + index: distance major, index minor -> deterministic order under ties.
    # int32 when it fits (faster top-k), else int64.
    key_dtype = torch.int32 if (bits + 1) * n < 2**31 else torch.int64
    index = torch.arange(n, dtype=key_dtype, device=database.device)
    for start in range(0, queries.shape[0], chunk_size):
        d = hamming_distances(queries[start:start + chunk_size], database, method)  # [c, N] int32
        key = d.to(key_dtype).mul_(n).add_(index)  # [c, N]
        top = torch.topk(key, k, dim=1, largest=False, sorted=True).values.long()  # [c, k]
        dist_out[start:start + len(d)] = (top // n).to(torch.int32).cpu()
        ids_out[start:start + len(d)] = (top % n).cpu()
    return dist_out, ids_out


def cosine_topk(queries: Tensor, database: Tensor, k: int, chunk_size: int = 256,
                normalize: bool = True) -> tuple[Tensor, Tensor]:
    """Exact float top-k by cosine similarity (dot product of L2-normalised rows), largest first.

    Returns (Float[Q, k] similarities, Int64[Q, k] indices). ``normalize=False`` scores raw dot products.
    """
    if queries.dim() != 2 or database.dim() != 2 or queries.shape[1] != database.shape[1]:
        raise ValueError(f"need [Q, D] and [N, D], got {tuple(queries.shape)} and {tuple(database.shape)}")
    k = min(int(k), database.shape[0])
    db = torch.nn.functional.normalize(database.float(), dim=1) if normalize else database.float()
    sims, ids = [], []
    for start in range(0, queries.shape[0], chunk_size):
        q = queries[start:start + chunk_size].float()
        q = torch.nn.functional.normalize(q, dim=1) if normalize else q
        s, i = torch.topk(q @ db.T, k, dim=1, largest=True, sorted=True)  # [c, k]
        sims.append(s)
        ids.append(i)
    return torch.cat(sims), torch.cat(ids)


def rerank(queries: Tensor, database: Tensor, candidates: Tensor, k: int,
           normalize: bool = True) -> tuple[Tensor, Tensor]:
    """Re-score candidate ids with exact cosine similarity and keep the best k.

    Args:
        queries: Float[Q, D]; database: Float[N, D] (float embeddings of the whole database).
        candidates: Int64[Q, C] candidate ids per query (e.g. Hamming top-C), -1 for padding.
    Returns:
        (Float[Q, k] similarities, Int64[Q, k] ids), largest similarity first.
    """
    if candidates.dim() != 2 or candidates.shape[0] != queries.shape[0]:
        raise ValueError(f"candidates must be [Q, C] with Q = {queries.shape[0]}, got {tuple(candidates.shape)}")
    k = min(int(k), candidates.shape[1])
    valid = candidates >= 0
    cand = candidates.clamp(min=0)
    vecs = database[cand].float()  # [Q, C, D]
    q = queries.float()
    if normalize:
        vecs = torch.nn.functional.normalize(vecs, dim=-1)
        q = torch.nn.functional.normalize(q, dim=-1)
    sims = torch.einsum("qd,qcd->qc", q, vecs).masked_fill(~valid, float("-inf"))  # [Q, C]
    s, j = torch.topk(sims, k, dim=1)
    return s, torch.gather(candidates, 1, j)


def recall_at_k(found: Tensor, truth: Tensor, k: Optional[int] = None) -> float:
    """Mean over queries of |found[:, :k] ∩ truth[:, :k]| / k (the ANN "k-recall@k")."""
    k = k or truth.shape[1]
    f, t = found[:, :k], truth[:, :k]
    hits = (f.unsqueeze(2) == t.unsqueeze(1)).any(dim=2).sum(dim=1)  # [Q]
    return float(hits.float().mean() / k)
