"""Generalized Pooling Operator (GPO; Chen et al., "Learning the Best Pooling Strategy for Visual Semantic
Embedding", CVPR 2021 — VSE-infinity), a pooling option of the image and text towers (``pooling: gpo``).

For a set of K token features {phi_k} in R^D, GPO sorts every dimension in descending order and takes a weighted sum
over the sorted positions: ``v_i = sum_k theta_k * maxk(phi_{., i}, k)`` where ``maxk(., k)`` is the k-th largest
value. The weights theta [K] depend only on the set size K: a bidirectional GRU reads sinusoidal positional encodings
of the positions 1..K, a linear layer scores each position and ``softmax(scores / 0.1)`` over the K positions gives
theta. One-hot theta on the first position is max pooling, uniform theta is mean pooling, so GPO learns its way
between them (and to top-k means, etc.).

    gpo = GPO(d_pe=32, d_hidden=32)
    pooled = gpo(tokens, mask)                  # tokens [B, T, D], mask Bool[B, T] (True = real) -> [B, D]
    pooled = gpo_pool(tokens, mask, weights)    # explicit weights [B, T] (positions >= length are ignored)
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


def positional_encoding_1d(d_model: int, length: int) -> torch.Tensor:
    """Transformer sinusoidal encoding -> [length, d_model] (sin on even, cos on odd channels)."""
    if d_model % 2:
        raise ValueError(f"positional encoding needs an even width, got {d_model}")
    pe = torch.zeros(length, d_model)
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)  # [length, 1]
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / d_model))  # [d/2]
    pe[:, 0::2] = torch.sin(position * div)
    pe[:, 1::2] = torch.cos(position * div)
    return pe


def gpo_pool(features: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """features [B, T, D], mask Bool[B, T], weights [B, T] over sorted positions -> [B, D].

    Each dimension is sorted in descending order over the real tokens (padding sorts last and counts as 0).
    """
    mask = mask.bool()
    big = torch.finfo(features.dtype).max
    x = features.masked_fill(~mask[..., None], -big)  # padding sorts last
    x = x.sort(dim=1, descending=True).values  # [B, T, D]
    n = mask.sum(1, keepdim=True)  # [B, 1]
    real = torch.arange(features.shape[1], device=features.device)[None, :] < n  # [B, T]: first n sorted slots
    x = x.masked_fill(~real[..., None], 0.0)
    return (x * (weights * real.to(weights.dtype))[..., None]).sum(1)  # [B, D]


class GPO(nn.Module):
    """Learned pooling weights from the set size (BiGRU over positional encodings) + :func:`gpo_pool`."""

    def __init__(self, d_pe: int = 32, d_hidden: int = 32, temperature: float = 0.1):
        super().__init__()
        self.d_pe, self.d_hidden, self.temperature = d_pe, d_hidden, temperature
        self.gru = nn.GRU(d_pe, d_hidden, num_layers=1, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(d_hidden, 1, bias=False)

    def weights(self, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        """lengths Long[B] (>= 1) -> weights [B, max_len] (0 beyond each length, rows sum to 1).

        The GRU runs once per distinct length (weights depend on the length only).
        """
        lengths = lengths.clamp(min=1, max=max_len)
        uniq, inverse = torch.unique(lengths, return_inverse=True)  # [U], [B]
        pe = positional_encoding_1d(self.d_pe, max_len).to(self.linear.weight)  # [T, d_pe]
        keep = torch.arange(max_len, device=lengths.device)[None, :] < uniq[:, None]  # [U, T]
        seqs = pe[None].expand(uniq.numel(), -1, -1) * keep[..., None].to(pe.dtype)  # [U, T, d_pe]
        packed = pack_padded_sequence(seqs, uniq.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=max_len)  # [U, T, 2h]
        out = 0.5 * (out[..., : self.d_hidden] + out[..., self.d_hidden:])  # mean of both directions
        scores = self.linear(out).squeeze(-1).masked_fill(~keep, -10000.0)  # [U, T]
        return torch.softmax(scores / self.temperature, dim=1)[inverse]  # [B, T]

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """features [B, T, D], mask Bool[B, T] -> pooled [B, D]."""
        w = self.weights(mask.bool().sum(1), features.shape[1]).to(features.dtype)
        return gpo_pool(features, mask, w)
