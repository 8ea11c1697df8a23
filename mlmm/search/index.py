"""Search indexes over binary codes (Hamming) and float embeddings (cosine), with save / load.

    index = HammingIndex(bits=64)                      # the native blocked-popcount kernel (mlmm.search.kernel),
    index.add(pack_codes(db_codes))                    # else faiss IndexBinaryFlat, else exact pure-torch popcount
    dist, ids = index.search(pack_codes(q_codes), k=10)
    index.save("db.hidx"); index = HammingIndex.load("db.hidx")

    HammingIndex(bits=64, kind="hnsw", hnsw_m=32)      # faiss IndexBinaryHNSW (approximate)
    FloatIndex(dim=512).add(emb).search(q, k=10)       # exact cosine baseline (faiss IndexFlatIP or torch)

File format (one safetensors file, never a pickle): tensor ``codes`` Uint8[N, bits/8] (or ``vectors``
Float[N, D]) plus, for faiss HNSW, ``faiss_index`` (the serialised faiss index bytes, so the graph is not
rebuilt); metadata holds the kind, bits / dim and format version. An index saved with faiss loads without
faiss (flat: identical results; HNSW: exact torch search instead, with a warning).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Union

import numpy as np
import torch
from torch import Tensor

from mlmm.search.codes import as_tensor_u8, cosine_topk, hamming_topk

log = logging.getLogger("mlmm")
FORMAT_VERSION = "1"
BACKENDS = ("auto", "faiss", "torch")
HAMMING_BACKENDS = ("auto", "native", "faiss", "torch")
_warned_native = False


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "faiss" if faiss_available() else "torch"
    if backend == "faiss" and not faiss_available():
        raise ImportError("backend='faiss' needs faiss-cpu (pip install faiss-cpu); use backend='torch'")
    return backend


def _resolve_hamming_backend(backend: str, kind: str) -> str:
    """auto -> native kernel for exact search (HNSW: faiss); without it faiss, else torch, with a one-line warning."""
    global _warned_native
    from mlmm.search import kernel

    if backend not in HAMMING_BACKENDS:
        raise ValueError(f"backend must be one of {HAMMING_BACKENDS}, got {backend!r}")
    if backend == "native":
        if not kernel.native_available():
            raise RuntimeError(f"backend='native': the Hamming kernel is {kernel.native_status()}; "
                               "use backend='faiss' or 'torch'")
        return "native"
    if backend != "auto":
        return _resolve_backend(backend)
    if kind == "hnsw" and faiss_available():
        return "faiss"
    if kernel.native_available():
        return "native"
    fallback = _resolve_backend("auto")
    if not _warned_native and os.environ.get("MLMM_NATIVE_KERNELS", "1") != "0":
        _warned_native = True
        log.warning("mlmm.search: native Hamming kernel %s; using %s (exact, slower)", kernel.native_status(),
                    "faiss IndexBinaryFlat" if fallback == "faiss" else "the torch popcount")
    return fallback


class HammingIndex:
    """Exact (``kind="flat"``) or HNSW (``kind="hnsw"``, faiss only) Hamming k-NN over packed codes.

    Backends: ``native`` (the blocked popcount kernel of :mod:`mlmm.search.kernel`, exact), ``faiss``
    (``IndexBinaryFlat`` / ``IndexBinaryHNSW``), ``torch`` (exact, slow) or ``auto`` (native for flat, faiss
    for HNSW; without a C compiler faiss or torch, with a one-line warning).

    Results are ``(Int32[Q, k] distances, Int64[Q, k] ids)``, nearest first. The native and torch backends order
    exact ties by index (identical results); faiss returns the same distances (flat) but may choose other ids
    among equal distances. When the database has fewer than k codes, missing slots are ``(bits + 1, -1)``.
    """

    def __init__(self, bits: int, kind: str = "flat", backend: str = "auto", hnsw_m: int = 32,
                 ef_search: int = 128, ef_construction: int = 80, chunk_size: int = 32):
        if bits < 8 or bits % 8:
            raise ValueError(f"bits must be a positive multiple of 8, got {bits}")
        if kind not in ("flat", "hnsw"):
            raise ValueError(f"kind must be 'flat' or 'hnsw', got {kind!r}")
        self.bits, self.kind = int(bits), kind
        self.hnsw_m, self.ef_search, self.ef_construction = hnsw_m, ef_search, ef_construction
        self.chunk_size = chunk_size
        if kind == "hnsw" and backend not in ("auto", "faiss"):
            raise ValueError("kind='hnsw' needs the faiss backend (pip install faiss-cpu)")
        self.backend = _resolve_hamming_backend(backend, kind)
        if kind == "hnsw" and self.backend != "faiss":
            raise ValueError("kind='hnsw' needs the faiss backend (pip install faiss-cpu)")
        self._codes: list[Tensor] = []  # appended chunks, concatenated lazily
        self._grouped = None  # native backend: the kernel's layout of all codes, rebuilt after add()
        self._faiss = self._new_faiss() if self.backend == "faiss" else None

    # ------------------------------------------------------------------ building
    def _new_faiss(self):
        import faiss

        if self.kind == "flat":
            return faiss.IndexBinaryFlat(self.bits)
        index = faiss.IndexBinaryHNSW(self.bits, self.hnsw_m)
        index.hnsw.efConstruction = self.ef_construction
        index.hnsw.efSearch = self.ef_search
        return index

    def add(self, packed: Union[Tensor, np.ndarray]) -> "HammingIndex":
        """Append Uint8[N, bits / 8] packed codes (see :func:`mlmm.search.pack_codes`)."""
        packed = as_tensor_u8(packed).cpu()
        if packed.shape[1] * 8 != self.bits:
            raise ValueError(f"codes have {packed.shape[1] * 8} bits, the index has {self.bits}")
        # the codes are always kept (save() writes them; a torch search needs them)
        self._codes.append(packed.clone())
        self._grouped = None
        if self._faiss is not None:
            self._faiss.add(packed.numpy())
        return self

    @property
    def codes(self) -> Tensor:
        """All database codes Uint8[N, bits / 8]."""
        if len(self._codes) != 1:
            self._codes = [torch.cat(self._codes) if self._codes else torch.empty(0, self.bits // 8, dtype=torch.uint8)]
        return self._codes[0]

    def __len__(self) -> int:
        return sum(c.shape[0] for c in self._codes)

    # ------------------------------------------------------------------ search
    def search(self, queries: Union[Tensor, np.ndarray], k: int) -> tuple[Tensor, Tensor]:
        """k nearest database codes of each packed query -> (Int32[Q, k] distances, Int64[Q, k] ids)."""
        queries = as_tensor_u8(queries).cpu()
        if queries.shape[1] * 8 != self.bits:
            raise ValueError(f"queries have {queries.shape[1] * 8} bits, the index has {self.bits}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        n = len(self)
        if n == 0:
            raise ValueError("search on an empty index")
        if self._faiss is not None:
            if self.kind == "hnsw":
                self._faiss.hnsw.efSearch = max(self.ef_search, k)
            d, i = self._faiss.search(queries.numpy(), k)
            dist, ids = torch.from_numpy(d).to(torch.int32), torch.from_numpy(i).to(torch.int64)
            missing = ids < 0
            if bool(missing.any()):
                dist = dist.masked_fill(missing, self.bits + 1)
            return dist, ids
        if self.backend == "native":
            from mlmm.search.kernel import group_codes, grouped_knn

            if self._grouped is None:
                self._grouped = group_codes(self.codes.numpy())
            d, i = grouped_knn(self._grouped, n, queries.numpy(), k, self.bits)  # k > n: (bits + 1, -1) slots
            return torch.from_numpy(d), torch.from_numpy(i)
        dist, ids = hamming_topk(queries, self.codes, min(k, n), chunk_size=self.chunk_size)
        if k > n:
            pad = k - n
            dist = torch.cat([dist, torch.full((dist.shape[0], pad), self.bits + 1, dtype=torch.int32)], 1)
            ids = torch.cat([ids, torch.full((ids.shape[0], pad), -1, dtype=torch.int64)], 1)
        return dist, ids

    # ------------------------------------------------------------------ persistence
    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write the index as one safetensors file (atomically)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"codes": self.codes.contiguous()}
        if self._faiss is not None and self.kind == "hnsw":
            import faiss

            tensors["faiss_index"] = torch.from_numpy(faiss.serialize_index_binary(self._faiss).copy())
        meta = {"mlmm_index": "hamming", "format": FORMAT_VERSION, "bits": str(self.bits), "kind": self.kind,
                "hnsw_m": str(self.hnsw_m), "ef_search": str(self.ef_search),
                "ef_construction": str(self.ef_construction)}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike], backend: str = "auto") -> "HammingIndex":
        """Read an index written by :meth:`save`. Without faiss an HNSW index becomes an exact flat index."""
        tensors, meta = _read(path, "hamming")
        bits, kind = int(meta["bits"]), meta["kind"]
        backend = _resolve_hamming_backend(backend, kind)
        if kind == "hnsw" and backend != "faiss":
            log.warning("%s: HNSW index loaded without faiss: using exact %s Hamming search instead", path, backend)
            kind = "flat"
        index = cls(bits, kind=kind, backend=backend, hnsw_m=int(meta["hnsw_m"]), ef_search=int(meta["ef_search"]),
                    ef_construction=int(meta["ef_construction"]))
        codes = tensors["codes"]
        if kind == "hnsw" and "faiss_index" in tensors:
            import faiss

            index._faiss = faiss.deserialize_index_binary(tensors["faiss_index"].numpy())
            index._faiss.hnsw.efSearch = index.ef_search
            index._codes = [codes]
            if index._faiss.ntotal != codes.shape[0]:
                raise ValueError(f"{path}: faiss index holds {index._faiss.ntotal} codes, file holds {codes.shape[0]}")
        else:
            index.add(codes)
        return index


class FloatIndex:
    """Exact cosine top-k over float embeddings (the baseline Hamming search is compared with).

    Rows are L2-normalised on ``add`` and ``search``. Backend faiss = ``IndexFlatIP``; torch = chunked matmul.
    """

    def __init__(self, dim: int, backend: str = "auto", chunk_size: int = 256):
        self.dim, self.chunk_size = int(dim), chunk_size
        self.backend = _resolve_backend(backend)
        self._vectors: list[Tensor] = []
        self._faiss = None
        if self.backend == "faiss":
            import faiss

            self._faiss = faiss.IndexFlatIP(self.dim)

    def add(self, vectors: Tensor) -> "FloatIndex":
        vectors = torch.as_tensor(vectors)
        if vectors.dim() != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"vectors must be [N, {self.dim}], got {tuple(vectors.shape)}")
        v = torch.nn.functional.normalize(vectors.detach().float().cpu(), dim=1).contiguous()
        self._vectors.append(v)
        if self._faiss is not None:
            self._faiss.add(v.numpy())
        return self

    @property
    def vectors(self) -> Tensor:
        if len(self._vectors) != 1:
            self._vectors = [torch.cat(self._vectors) if self._vectors else torch.empty(0, self.dim)]
        return self._vectors[0]

    def __len__(self) -> int:
        return sum(v.shape[0] for v in self._vectors)

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """-> (Float[Q, k] cosine similarities, Int64[Q, k] ids), most similar first."""
        q = torch.nn.functional.normalize(torch.as_tensor(queries).detach().float().cpu(), dim=1).contiguous()
        if q.dim() != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be [Q, {self.dim}], got {tuple(q.shape)}")
        if len(self) == 0:
            raise ValueError("search on an empty index")
        k = min(int(k), len(self))
        if self._faiss is not None:
            s, i = self._faiss.search(q.numpy(), k)
            return torch.from_numpy(s), torch.from_numpy(i).long()
        return cosine_topk(q, self.vectors, k, chunk_size=self.chunk_size, normalize=False)

    def save(self, path: Union[str, os.PathLike]) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"vectors": self.vectors}, str(tmp),
                  metadata={"mlmm_index": "float", "format": FORMAT_VERSION, "dim": str(self.dim)})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike], backend: str = "auto") -> "FloatIndex":
        tensors, meta = _read(path, "float")
        return cls(int(meta["dim"]), backend=backend).add(tensors["vectors"])


def _read(path: Union[str, os.PathLike], expected: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: index file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable index file (truncated or not an mlmm index?): {e}") from None
    if meta.get("mlmm_index") != expected:
        raise ValueError(f"{path}: not an mlmm {expected} index (metadata {meta.get('mlmm_index')!r})")
    if meta.get("format", "0") > FORMAT_VERSION:
        raise ValueError(f"{path}: written by a newer mlmm (index format {meta['format']})")
    return tensors, meta


def hamming_rerank_search(index: HammingIndex, query_codes: Tensor, query_emb: Tensor, database_emb: Tensor,
                          k: int, candidates: int = 100) -> tuple[Tensor, Tensor]:
    """Two-stage search: Hamming top-``candidates`` from ``index``, then exact cosine re-rank to top-k.

    Args:
        query_codes: Uint8[Q, bits / 8] packed query codes; query_emb: Float[Q, D];
        database_emb: Float[N, D] float embeddings of the indexed items (same order as the codes).
    Returns: (Float[Q, k] cosine similarities, Int64[Q, k] ids).
    """
    from mlmm.search.codes import rerank

    if database_emb.shape[0] != len(index):
        raise ValueError(f"database_emb has {database_emb.shape[0]} rows, the index {len(index)}")
    _, cand = index.search(query_codes, max(candidates, k))
    return rerank(query_emb, database_emb, cand, k)
