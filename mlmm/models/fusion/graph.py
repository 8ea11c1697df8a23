"""MVSEN pair scoring: intra- and inter-modality interaction, then a cascaded graph convolution over region / word
nodes (Qin et al., "Multi-Task Visual Semantic Embedding Network for Image-Text Retrieval", JCST 2024).

    g = GraphMatching(media_width=32, text_width=32, width=32, heads=2, gcn_layers=2)
    s = g.score_pairs(img_tok, img_mask, txt_tok, txt_mask, m_idx, t_idx, global_sim=cos)   # [P]

For a (media, text) pair, with region nodes R [Tm, W] (image patches; the ViT CLS token is skipped) and word nodes
T [Tt, W] (padding masked everywhere):

1. **intra-modality interaction** (per modality, shared across pairs): one pre-norm self-attention block over the
   regions, one over the words (:class:`IntraBlock`);
2. **inter-modality interaction** (per pair): words attend to the regions and regions attend to the words
   (residual cross-attention, :class:`~mlmm.models.fusion.cross_attention.MultiHeadAttention`);
3. **cascaded graph convolution** over the joint node set X = [R; T]: layer l builds a dense affinity graph
   ``A_l = softmax((X W_q)(X W_k)^T / sqrt(W))`` over the real nodes and updates ``X <- X + GELU(LN(A_l X W_l))``;
   after every layer a readout ``[mean R, mean T, mean R * mean T]`` is scored by an MLP, and the pair's graph score
   is the sum of the per-layer scores (each layer refines the correlation inferred by the previous one);
4. **pair score** ``exp(a) * global + graph`` with a learned ``a`` (init 0).

``score_pairs`` has the signature :mod:`mlmm.evaluation.rerank` expects from ``head.interaction``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mlmm.models.fusion.alignment import media_tokens
from mlmm.models.fusion.cross_attention import MultiHeadAttention
from mlmm.models.layers import MLP


def _keep(mask: torch.Tensor) -> torch.Tensor:
    """Key mask Bool[P, T] -> [P, 1, 1, T]; a row without real keys attends everywhere (its output is unused)."""
    m = mask.bool()
    return (m | ~m.any(1, keepdim=True))[:, None, None, :]


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)[..., None]
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


class IntraBlock(nn.Module):
    """Pre-norm self-attention + MLP over one modality's tokens x [B, T, W] (mask Bool[B, T])."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(width), MultiHeadAttention(width, heads)
        self.ln_2, self.mlp = nn.LayerNorm(width), MLP(width, 2 * width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, _keep(mask))
        return x + self.mlp(self.ln_2(x))


class CrossBlock(nn.Module):
    """x [P, Tq, W] attends over ctx [P, Tk, W] (ctx_mask Bool[P, Tk]); no update for a row without context."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_q, self.ln_kv, self.attn = nn.LayerNorm(width), nn.LayerNorm(width), MultiHeadAttention(width, heads)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor) -> torch.Tensor:
        has = ctx_mask.bool().any(1).to(x.dtype)[:, None, None]  # [P, 1, 1]
        return x + has * self.attn(self.ln_q(x), self.ln_kv(ctx), _keep(ctx_mask))


class GraphLayer(nn.Module):
    """One graph convolution with a learned dense affinity: X [P, N, W], mask Bool[P, N] -> X [P, N, W]."""

    def __init__(self, width: int):
        super().__init__()
        self.q, self.k, self.w = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.ln = nn.LayerNorm(width)

    def adjacency(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Row-normalised affinity over the real nodes: [P, N, N] (rows of padding nodes are irrelevant)."""
        logits = self.q(x) @ self.k(x).transpose(1, 2) / math.sqrt(x.shape[-1])  # [P, N, N]
        logits = logits.masked_fill(~mask.bool()[:, None, :], -1e4)
        return torch.softmax(logits, dim=-1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x + F.gelu(self.ln(self.adjacency(x, mask) @ self.w(x)))


class GraphMatching(nn.Module):
    def __init__(self, media_width: int, text_width: int, width: int = 64, heads: int = 2, gcn_layers: int = 2, *,
                 skip_first: bool = True, chunk: int = 2048):
        super().__init__()
        self.skip_first, self.chunk = skip_first, chunk
        self.media_in = nn.Sequential(nn.LayerNorm(media_width), nn.Linear(media_width, width))
        self.text_in = nn.Sequential(nn.LayerNorm(text_width), nn.Linear(text_width, width))
        self.intra_media, self.intra_text = IntraBlock(width, heads), IntraBlock(width, heads)
        self.t2m, self.m2t = CrossBlock(width, heads), CrossBlock(width, heads)
        self.type_emb = nn.Parameter(torch.zeros(2, width))  # [2, W]: region / word node type
        self.gcn = nn.ModuleList([GraphLayer(width) for _ in range(gcn_layers)])
        self.readout = nn.ModuleList([nn.Sequential(nn.LayerNorm(3 * width), nn.Linear(3 * width, width), nn.GELU(),
                                                    nn.Linear(width, 1)) for _ in range(gcn_layers)])
        for r in self.readout:  # the graph term starts at 0: pair score = global at first
            nn.init.zeros_(r[-1].weight)
            nn.init.zeros_(r[-1].bias)
        self.log_w_global = nn.Parameter(torch.zeros(1))  # [1]

    def intra(self, m_tok, m_mask, t_tok, t_mask):
        """Per-modality encodings (no pairing yet): -> (R [Bm, Tm, W], mask, T [Bt, Tt, W], mask)."""
        m_tok, m_mask = media_tokens(m_tok, m_mask.bool(), self.skip_first)
        t_mask = t_mask.bool()
        r = self.intra_media(self.media_in(m_tok), m_mask)
        t = self.intra_text(self.text_in(t_tok), t_mask)
        return r, m_mask, t, t_mask

    def graph_scores(self, r: torch.Tensor, rm: torch.Tensor, t: torch.Tensor, tm: torch.Tensor) -> torch.Tensor:
        """Paired nodes: regions r [P, Tm, W], words t [P, Tt, W] -> graph score [P]."""
        t2 = self.t2m(t, r, rm)  # words attend to regions
        r2 = self.m2t(r, t, tm)  # regions attend to words
        x = torch.cat([r2 + self.type_emb[0], t2 + self.type_emb[1]], 1)  # [P, Tm+Tt, W]
        mask = torch.cat([rm, tm], 1)  # [P, Tm+Tt]
        n_r, score = r.shape[1], x.new_zeros(x.shape[0])
        for layer, head in zip(self.gcn, self.readout):
            x = layer(x, mask)
            gr, gt = _masked_mean(x[:, :n_r], rm), _masked_mean(x[:, n_r:], tm)  # [P, W] each
            score = score + head(torch.cat([gr, gt, gr * gt], -1)).squeeze(-1)
        return score

    def graph_pairs(self, m_tok, m_mask, t_tok, t_mask, m_idx, t_idx) -> torch.Tensor:
        """Graph score of the pairs (m_tok[m_idx[p]], t_tok[t_idx[p]]) -> [P]."""
        r, rm, t, tm = self.intra(m_tok, m_mask, t_tok, t_mask)
        out = [self.graph_scores(r[mi], rm[mi], t[ti], tm[ti])
               for mi, ti in zip(m_idx.split(self.chunk), t_idx.split(self.chunk))]
        return torch.cat(out) if out else r.new_zeros(0)

    def combine(self, global_sim: torch.Tensor, graph: torch.Tensor) -> torch.Tensor:
        return self.log_w_global.exp() * global_sim + graph

    def score_pairs(self, m_tok, m_mask, t_tok, t_mask, m_idx, t_idx,
                    global_sim: Optional[torch.Tensor] = None) -> torch.Tensor:
        graph = self.graph_pairs(m_tok, m_mask, t_tok, t_mask, m_idx, t_idx)
        return self.combine(torch.zeros_like(graph) if global_sim is None else global_sim.to(graph.dtype), graph)
