"""VSE head ``vse``: token-level alignment module + multimodal fusion encoder over the towers' tokens.

    model:
      image: {..., pooling: gpo}          # GPO pooling of the towers (mlmm.models.pooling), optional
      text: {..., pooling: gpo}
      heads:
        vse: {name: vse, media: image, width: 32, fusion_width: 32, fusion_layers: 1, heads: 2, hard_negatives: 4}

For the rows with both the media and text (n of them) the head outputs, for the ``vse`` loss:

* ``vse_align_scores`` [n, n]: alignment score (each word to its best patch and back) of media i with text j;
* ``vse_t2m_logits`` / ``vse_m2t_logits`` [n, 1 + k]: the full pair score
  ``exp(a) * cos + exp(b) * align + fusion`` of each query with its positive (column 0) and its k hardest in-batch
  negatives by ``cos + align`` (``hard_negatives: 0``: every other row; ``-inf`` on invalid slots); cos and align
  enter detached, so this term trains the fusion encoder and the combination weights while the matrices train
  through their own terms;
* ``vse_exclude`` Bool[n, n] media x text, like the alignment scores (same sample / identical caption / media owning
  the caption: never negatives), ``vse_weight`` [] (0 = no row).

At retrieval time ``head.interaction.score_pairs`` re-ranks the global top-k (``evaluate_retrieval(rerank_topk=K)``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from mlmm.config import ConfigError
from mlmm.models.fusion.dual_interaction import candidate_pairs
from mlmm.models.fusion.vse_fusion import AlignFusion
from mlmm.models.heads.common import pair_inputs, pair_reads
from mlmm.registry import HEADS


@dataclass
class VSEHeadConfig:
    media: str = "image"  # image (CLS token skipped) | video (frame tokens)
    width: int = 64  # alignment space
    fusion_width: int = 64
    fusion_layers: int = 1
    heads: int = 2
    align_direction: str = "both"  # both (each word to its best patch and back) | t2m | m2t
    hard_negatives: int = 4  # in-batch negatives per query scored by the fusion encoder; 0 = every in-batch pair
    chunk: int = 4096  # pairs scored at once
    RANGES: ClassVar[dict] = {"width": ">= 1", "fusion_width": ">= 1", "fusion_layers": ">= 1", "heads": ">= 1",
                              "hard_negatives": ">= 0", "chunk": ">= 1"}
    name: str = field(default="vse", init=False)

    def validate(self, where: str) -> None:
        if self.media not in ("image", "video"):
            raise ConfigError(f"{where}.media: must be image or video, got {self.media!r}")
        if self.fusion_width % self.heads:
            raise ConfigError(f"{where}.heads: {self.heads} does not divide fusion_width {self.fusion_width}")
        if self.align_direction not in ("both", "t2m", "m2t"):
            raise ConfigError(f"{where}.align_direction: must be both, t2m or m2t, got {self.align_direction!r}")


@HEADS.register("vse", config=VSEHeadConfig)
class VSEHead(nn.Module):
    @staticmethod
    def reads(cfg: VSEHeadConfig, model) -> set[str]:
        return pair_reads(cfg.media)

    @staticmethod
    def writes(cfg: VSEHeadConfig, model) -> set[str]:
        return {"vse_align_scores", "vse_t2m_logits", "vse_m2t_logits", "vse_exclude", "vse_weight"}

    def __init__(self, cfg: VSEHeadConfig, model):
        super().__init__()
        self.cfg, self.media = cfg, cfg.media
        self.interaction = AlignFusion(model.widths[cfg.media], model.widths["text"], cfg.width, cfg.fusion_width,
                                       cfg.fusion_layers, cfg.heads, skip_first=cfg.media == "image",
                                       direction=cfg.align_direction, chunk=cfg.chunk)

    def forward(self, outputs: dict[str, torch.Tensor], batch, model) -> dict[str, torch.Tensor]:
        inter = self.interaction
        device = outputs[self.media].device
        rows, any_valid, m_tok, m_mask, t_tok, t_mask, glob, exclude = pair_inputs(outputs, batch, self.media)
        n = rows.numel()
        align = inter.align_matrix(m_tok, m_mask, t_tok, t_mask)  # [n, n]
        base = inter.combine(glob.detach(), align.detach())  # [n, n] media x text: what the fusion encoder refines
        cand = candidate_pairs(base.t(), self.cfg.hard_negatives or n - 1, exclude)  # 0: every other row
        if cand.valid.shape[1] >= n:  # every pair is a candidate: score each (media, text) pair once
            m_all, t_all = torch.arange(n, device=device).repeat_interleave(n), torch.arange(n, device=device).repeat(n)
            fusion = inter.fusion_pairs(m_tok, m_mask, t_tok, t_mask, m_all, t_all).view(n, n)  # [n, n]
            full = inter.combine(glob.detach(), align.detach(), fusion)  # [n, n] media x text
            scores = full[cand.m_idx, cand.t_idx]
        else:
            fusion = inter.fusion_pairs(m_tok, m_mask, t_tok, t_mask, cand.m_idx, cand.t_idx)  # [2 n (1+k)]
            pick = (cand.m_idx, cand.t_idx)
            scores = inter.combine(glob.detach()[pick], align.detach()[pick], fusion)
        t2m, m2t = cand.split(scores)  # [n, 1+k] each, -inf on invalid slots
        return {"vse_align_scores": align, "vse_t2m_logits": t2m, "vse_m2t_logits": m2t, "vse_exclude": exclude.t(),
                "vse_weight": torch.tensor(float(any_valid), device=device)}
