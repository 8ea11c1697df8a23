"""DI-vTR head: dual inter-modal interaction between a media modality (video frames / audio patches) and text.

    model:
      heads:
        divtr: {name: divtr, media: video, width: 64, heads: 2, layers: 1, hard_negatives: 4}

In ``forward`` the head picks, for each row that has both the media and text, the ``hard_negatives``
most similar in-batch candidates by *global* similarity (both directions; other rows of the same
sample and rows with an identical caption are never negatives) and scores the positive and those
negatives with :class:`~mlmm.models.fusion.dual_interaction.DualInteraction`. Outputs (consumed by
the ``divtr`` loss), with n = rows with both modalities and k' = min(k, n - 1):

* ``divtr_t2m_logits`` [n, 1 + k']: combined score of each text with its own media (column 0) and
  its hard-negative media; ``-inf`` on invalid slots;
* ``divtr_m2t_logits`` [n, 1 + k']: same for each media against texts;
* ``divtr_t2m_negatives`` / ``divtr_m2t_negatives`` Long[n, k'] (batch row indices), ``divtr_rows`` Long[n].

Hard negatives are taken from this rank's rows (the global InfoNCE of the loss gathers across ranks).
At retrieval time :mod:`mlmm.evaluation.rerank` uses ``head.interaction.score_pairs`` to re-rank
the global top-k with the same combined score.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from mlmm.config import ConfigError
from mlmm.data.batch import Batch
from mlmm.models.fusion.dual_interaction import DualInteraction, candidate_pairs
from mlmm.models.heads.common import pair_reads, valid_rows
from mlmm.registry import HEADS


@dataclass
class DIVTRHeadConfig:
    media: str = "video"  # video | audio: the modality whose tokens interact with the text tokens
    width: int = 64
    heads: int = 2
    layers: int = 1
    hard_negatives: int = 4  # in-batch negatives per query, top-k by global similarity
    init_global_scale: float = 10.0  # combined score = exp(global_scale) * cosine + interaction
    init_interaction_scale: float = 10.0  # interaction = exp(interaction_scale) * mean of the branch cosines
    tower_grad: float = 1.0  # scale of the interaction loss's gradient into the towers' tokens (0 = detached)
    frame_positions: bool = True  # media=video: a learned frame-index embedding on the frame tokens in the head
    RANGES: ClassVar[dict] = {"width": ">= 1", "heads": ">= 1", "layers": ">= 1", "hard_negatives": ">= 1",
                              "init_global_scale": "> 0", "init_interaction_scale": "> 0", "tower_grad": "[0, 1]"}
    name: str = field(default="divtr", init=False)

    def validate(self, where: str) -> None:
        if self.media not in ("video", "audio", "image"):
            raise ConfigError(f"{where}.media: must be video, audio or image, got {self.media!r}")
        if self.width % self.heads:
            raise ConfigError(f"{where}.heads: {self.heads} does not divide width {self.width}")


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity in the forward pass; the gradient reaching ``x`` is multiplied by ``scale``."""
    if scale == 1.0:
        return x
    return x.detach() if scale == 0.0 else scale * x + (1.0 - scale) * x.detach()


@HEADS.register("divtr", config=DIVTRHeadConfig)
class DIVTRHead(nn.Module):
    @staticmethod
    def reads(cfg: DIVTRHeadConfig, model) -> set[str]:
        return pair_reads(cfg.media)

    @staticmethod
    def writes(cfg: DIVTRHeadConfig, model) -> set[str]:
        return {"divtr_t2m_logits", "divtr_m2t_logits", "divtr_t2m_negatives", "divtr_m2t_negatives", "divtr_rows"}

    def __init__(self, cfg: DIVTRHeadConfig, model):
        super().__init__()
        widths = model.widths
        self.cfg = cfg
        self.media = cfg.media
        positions = model.cfg.video.frames if cfg.media == "video" and cfg.frame_positions else 0
        self.interaction = DualInteraction(widths[cfg.media], widths["text"], cfg.width, cfg.heads, cfg.layers,
                                           cfg.init_global_scale, media_positions=positions,
                                           init_interaction_scale=cfg.init_interaction_scale)

    def forward(self, outputs: dict[str, torch.Tensor], batch: Batch, model) -> dict[str, torch.Tensor]:
        m = self.media
        z_m, z_t = outputs[m], outputs["text"]  # [B, E]
        device = z_m.device
        rows, any_valid = valid_rows(batch, m, device)  # [n]; no such row: row 0, zero graph kept
        sim = z_t[rows] @ z_m[rows].t()  # [n, n]: text i vs media j
        cand = candidate_pairs(sim, self.cfg.hard_negatives, batch.not_negatives(rows))
        glob = sim.detach()[cand.t_idx, cand.m_idx]  # the global term trains through the contrastive loss only
        m_tok, m_mask = scale_grad(outputs[f"{m}_tokens"][rows], self.cfg.tower_grad), outputs[f"{m}_token_mask"][rows]
        t_tok, t_mask = scale_grad(outputs["text_tokens"][rows], self.cfg.tower_grad), outputs["text_token_mask"][rows]
        scores = self.interaction.score_pairs(m_tok, m_mask, t_tok, t_mask, cand.m_idx, cand.t_idx,
                                              global_sim=glob)  # [2n(1+k)]
        t2m, m2t = cand.split(scores)  # [n, 1+k] each, -inf on invalid slots
        neg_t2m, neg_m2t = cand.neg_t2m, cand.neg_m2t
        if not any_valid:
            t2m, m2t = t2m[:, :1], m2t[:, :1]  # one column: zero cross-entropy, graph kept
        return {"divtr_t2m_logits": t2m, "divtr_m2t_logits": m2t, "divtr_t2m_negatives": neg_t2m,
                "divtr_m2t_negatives": neg_m2t, "divtr_rows": rows}
