"""Hierarchical cross-modal fusion (AsCL, Gong et al., ICME 2024): a global and a local similarity in one pair score.

    fusion = HierarchicalFusion(media_width=32, text_width=32, width=32, skip_first=True)
    S = fusion.score_matrix(img_tok, img_mask, txt_tok, txt_mask, global_sim)     # [Bi, Bt]
    s = fusion.score_pairs(img_tok, img_mask, txt_tok, txt_mask, m_idx, t_idx, global_sim=g)   # [P] (re-ranking)

* **global**: the cosine of the pooled, projected embeddings (computed by the model; passed in as ``global_sim``);
* **local**: token-level multimodal attention between image patches and words
  (:func:`~mlmm.models.fusion.alignment.attention_alignment`) in a learned shared space of width ``width``, with a
  learned attention sharpness ``lam``;
* **pair score** ``S = u * local + (1 - u) * global`` with ``u = sigmoid(gate)`` learned (the paper's
  ``S = u1 S_local + (1 - u1) S_global``).

``skip_first`` drops token 0 of the media (the ViT CLS token, already summarised by the global term).
``score_pairs`` has the signature :mod:`mlmm.evaluation.rerank` expects from ``head.interaction``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from mlmm.models.fusion.alignment import attention_alignment, gather_pairs, media_tokens, pairwise, project


class HierarchicalFusion(nn.Module):
    def __init__(self, media_width: int, text_width: int, width: int = 64, *, skip_first: bool = True,
                 init_lambda: float = 10.0, init_gate: float = 0.0, chunk: int = 4096):
        super().__init__()
        self.skip_first, self.chunk = skip_first, chunk
        self.media_in = nn.Sequential(nn.LayerNorm(media_width), nn.Linear(media_width, width))
        self.text_in = nn.Sequential(nn.LayerNorm(text_width), nn.Linear(text_width, width))
        self.log_lambda = nn.Parameter(torch.full((1,), math.log(init_lambda)))  # [1]: attention sharpness
        self.gate = nn.Parameter(torch.full((1,), float(init_gate)))  # [1]: u = sigmoid(gate)

    @property
    def u(self) -> torch.Tensor:
        return torch.sigmoid(self.gate).squeeze(0)

    def _prepare(self, m_tok: torch.Tensor, m_mask: torch.Tensor, t_tok: torch.Tensor, t_mask: torch.Tensor):
        m_tok, m_mask = media_tokens(m_tok, m_mask.bool(), self.skip_first)
        t_mask = t_mask.bool()
        return project(m_tok, self.media_in, m_mask), m_mask, project(t_tok, self.text_in, t_mask), t_mask

    def combine(self, global_sim: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        return self.u * local + (1 - self.u) * global_sim

    def local_pairs(self, m_tok, m_mask, t_tok, t_mask, m_idx, t_idx) -> torch.Tensor:
        """Local score of the pairs (m_tok[m_idx[p]], t_tok[t_idx[p]]) -> [P]."""
        v, vm, w, wm = self._prepare(m_tok, m_mask, t_tok, t_mask)
        lam = self.log_lambda.clamp(max=math.log(100.0)).exp().squeeze(0)
        return gather_pairs(attention_alignment, v, vm, w, wm, m_idx, t_idx, self.chunk, lam=lam)

    def local_matrix(self, m_tok, m_mask, t_tok, t_mask) -> torch.Tensor:
        """Local score of every media row x every text row -> [Bm, Bt]."""
        v, vm, w, wm = self._prepare(m_tok, m_mask, t_tok, t_mask)
        lam = self.log_lambda.clamp(max=math.log(100.0)).exp().squeeze(0)
        return pairwise(attention_alignment, v, vm, w, wm, self.chunk, lam=lam)

    def score_matrix(self, m_tok, m_mask, t_tok, t_mask, global_sim: torch.Tensor) -> torch.Tensor:
        """global_sim [Bm, Bt] (cosine) -> fused pair scores [Bm, Bt]."""
        return self.combine(global_sim, self.local_matrix(m_tok, m_mask, t_tok, t_mask))

    def score_pairs(self, m_tok, m_mask, t_tok, t_mask, m_idx, t_idx,
                    global_sim: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Fused score of P (media, text) pairs given by index -> [P]; ``global_sim`` [P] (0 when omitted)."""
        local = self.local_pairs(m_tok, m_mask, t_tok, t_mask, m_idx, t_idx)
        return self.combine(torch.zeros_like(local) if global_sim is None else global_sim.to(local.dtype), local)
