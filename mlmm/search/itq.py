"""Iterative quantization (ITQ, Gong & Lazebnik, CVPR 2011): binary codes for any float embedding model.

A trained hash head (:mod:`mlmm.models.heads.hashing`) learns *semantic* codes: items of one class
collide, which is what mAP rewards. To search the float index itself faster, the codes must instead
preserve the float neighbourhoods: ITQ centres the database embeddings, projects them on their top
``bits`` principal directions and learns the rotation that minimises the quantisation error
``||sign(V R) - V R||``. Hamming distance between ITQ codes then tracks the angle between the
embeddings, so ``Hamming top-C -> float re-rank`` finds the float top-k.

    itq = ITQ(bits=64).fit(db_embeddings)                 # [N, D] float
    db_codes, q_codes = itq.encode(db_embeddings), itq.encode(query_embeddings)   # {0,1} uint8 [., bits]
"""
from __future__ import annotations

from typing import Optional

import torch


class ITQ:
    """PCA to `bits` dimensions + a learned orthogonal rotation; ``encode`` -> {0, 1} uint8 codes."""

    def __init__(self, bits: int = 64, iterations: int = 50, seed: int = 0):
        self.bits, self.iterations, self.seed = bits, iterations, seed
        self.mean: Optional[torch.Tensor] = None  # [D]
        self.projection: Optional[torch.Tensor] = None  # [D, bits] = PCA directions @ rotation

    def fit(self, x: torch.Tensor) -> "ITQ":
        """x [N, D] database embeddings (N >= bits, D >= bits)."""
        x = x.detach().double()
        n, d = x.shape
        if self.bits > min(n, d):
            raise ValueError(f"ITQ: bits={self.bits} needs at least that many items and dimensions, got {n} x {d}")
        self.mean = x.mean(dim=0)
        xc = x - self.mean
        _, _, vh = torch.linalg.svd(xc, full_matrices=False)
        pca = vh[: self.bits].t()  # [D, bits] top principal directions
        v = xc @ pca  # [N, bits]
        g = torch.Generator().manual_seed(self.seed)
        r, _ = torch.linalg.qr(torch.randn(self.bits, self.bits, generator=g, dtype=torch.float64))
        for _ in range(self.iterations):
            b = torch.sign(v @ r)  # [N, bits] fix R, update B
            b[b == 0] = 1
            u, _, wh = torch.linalg.svd(b.t() @ v)  # fix B, update R: orthogonal Procrustes
            r = (u @ wh).t()
        self.projection = pca @ r
        return self

    def quantization_error(self, x: torch.Tensor) -> float:
        v = (x.detach().double() - self.mean) @ self.projection
        return float((torch.sign(v) - v).pow(2).mean())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, D] -> codes {0, 1} uint8 [N, bits] (bit = 1 where the rotated projection is >= 0)."""
        if self.projection is None:
            raise RuntimeError("ITQ.encode before fit")
        v = (x.detach().double() - self.mean) @ self.projection
        return (v >= 0).to(torch.uint8)
