"""VSE pair scoring: a token-level alignment module + a multimodal fusion encoder on top of the global cosine.

    inter = AlignFusion(media_width=32, text_width=32, width=32, fusion_width=32, layers=1, heads=2)
    A = inter.align_matrix(img_tok, img_mask, txt_tok, txt_mask)             # [Bi, Bt] alignment scores
    s = inter.score_pairs(img_tok, img_mask, txt_tok, txt_mask, m_idx, t_idx, global_sim=g)   # [P] pair scores

* **alignment module**: media tokens (patches; the ViT CLS token is skipped) and words are projected into a shared
  space of width ``width`` and L2-normalised; each word is matched to its best patch and each patch to its best word
  (:func:`~mlmm.models.fusion.alignment.maxsim_alignment`; ``direction`` keeps one way only); padding never
  takes part.
* **fusion encoder**: the words cross-attend to the patches through ``layers`` fusion layers
  (:class:`~mlmm.models.fusion.cross_attention.CrossAttentionFusion`: self-attention over the words, cross-attention
  to the patches, MLP); the masked mean of the fused words goes through an MLP to one matching score.
* **pair score** ``exp(a) * global + exp(b) * align + fusion`` with learned ``a``, ``b`` (init 0).

``score_pairs`` has the signature :mod:`mlmm.evaluation.rerank` expects from ``head.interaction``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mlmm.models.fusion.alignment import gather_pairs, maxsim_alignment, media_tokens, pairwise, project
from mlmm.models.fusion.cross_attention import CrossAttentionFusion


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x [P, T, D], mask Bool[P, T] -> [P, D]."""
    m = mask.to(x.dtype)[..., None]
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


class AlignFusion(nn.Module):
    def __init__(self, media_width: int, text_width: int, width: int = 64, fusion_width: int = 64, layers: int = 1,
                 heads: int = 2, *, skip_first: bool = True, direction: str = "both", chunk: int = 4096):
        super().__init__()
        self.skip_first, self.chunk, self.direction = skip_first, chunk, direction
        self.media_in = nn.Sequential(nn.LayerNorm(media_width), nn.Linear(media_width, width))
        self.text_in = nn.Sequential(nn.LayerNorm(text_width), nn.Linear(text_width, width))
        self.encoder = CrossAttentionFusion(fusion_width, layers, heads, query_dim=text_width, context_dim=media_width)
        self.score_head = nn.Sequential(nn.Linear(fusion_width, fusion_width), nn.GELU(), nn.Linear(fusion_width, 1))
        nn.init.zeros_(self.score_head[-1].weight)  # the fusion term starts at 0: pair score = global + align
        nn.init.zeros_(self.score_head[-1].bias)
        self.log_w_global = nn.Parameter(torch.zeros(1))  # [1]
        self.log_w_align = nn.Parameter(torch.zeros(1))  # [1]

    def _media(self, m_tok: torch.Tensor, m_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return media_tokens(m_tok, m_mask.bool(), self.skip_first)

    def align_pairs(self, m_tok, m_mask, t_tok, t_mask, m_idx, t_idx) -> torch.Tensor:
        """Alignment score of the pairs (m_tok[m_idx[p]], t_tok[t_idx[p]]) -> [P]."""
        m_tok, m_mask = self._media(m_tok, m_mask)
        v, w = project(m_tok, self.media_in, m_mask), project(t_tok, self.text_in, t_mask.bool())
        return gather_pairs(maxsim_alignment, v, m_mask, w, t_mask.bool(), m_idx, t_idx, self.chunk,
                            direction=self.direction)

    def align_matrix(self, m_tok, m_mask, t_tok, t_mask) -> torch.Tensor:
        """Alignment score of every media row x every text row -> [Bm, Bt]."""
        m_tok, m_mask = self._media(m_tok, m_mask)
        v, w = project(m_tok, self.media_in, m_mask), project(t_tok, self.text_in, t_mask.bool())
        return pairwise(maxsim_alignment, v, m_mask, w, t_mask.bool(), self.chunk, direction=self.direction)

    def fusion_pairs(self, m_tok, m_mask, t_tok, t_mask, m_idx, t_idx) -> torch.Tensor:
        """Fusion-encoder matching score of the indexed pairs -> [P]."""
        m_tok, m_mask = self._media(m_tok, m_mask)
        out = []
        for s in range(0, m_idx.numel(), self.chunk):
            mi, ti = m_idx[s:s + self.chunk], t_idx[s:s + self.chunk]
            fused = self.encoder(t_tok[ti], m_tok[mi], query_mask=t_mask[ti].bool(), context_mask=m_mask[mi])
            out.append(self.score_head(_masked_mean(fused, t_mask[ti].bool())).squeeze(-1))  # [p]
        return torch.cat(out) if out else m_tok.new_zeros(0)

    def combine(self, global_sim: torch.Tensor, align: torch.Tensor, fusion: Optional[torch.Tensor] = None):
        s = self.log_w_global.exp() * global_sim + self.log_w_align.exp() * align
        return s if fusion is None else s + fusion

    def score_pairs(self, m_tok, m_mask, t_tok, t_mask, m_idx, t_idx,
                    global_sim: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Pair score of P (media, text) pairs given by index -> [P]; ``global_sim`` [P] (0 when omitted)."""
        align = self.align_pairs(m_tok, m_mask, t_tok, t_mask, m_idx, t_idx)
        fusion = self.fusion_pairs(m_tok, m_mask, t_tok, t_mask, m_idx, t_idx)
        g = torch.zeros_like(align) if global_sim is None else global_sim.to(align.dtype)
        return self.combine(g, align, fusion)
