"""MVSEN loss: InfoNCE + text-text matching + multi-label classification + graph matching (multi-task VSE).

    loss:
      name: mvsen
      media: image
      text_text_weight: 0.5
      label_weight: 1.0
      graph_weight: 1.0

With the ``mvsen`` head's outputs (see :mod:`mlmm.models.heads.mvsen`)::

    global    = InfoNCE(media, text) on the pooled embeddings (gathered across ranks)
    text_text = 0.5 * (CE(s_tt * T Y^T, diag) + CE(s_tt * Y T^T, diag))   T = captions, Y = their sibling captions
                (other rows of the same sample / identical captions are not negatives)
    label     = mean BCE-with-logits over the valid rows and the C labels, media and text classifiers averaged
    graph     = 0.5 * (CE(t2m, 0) + CE(m2t, 0))   on the graph pair scores (positive in column 0)
    loss      = global + text_text_weight * text_text + label_weight * label + graph_weight * graph
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mlmm.config import ConfigError
from mlmm.losses.contrastive import at_least_fp32, media_text_term, temperature
from mlmm.losses.divtr import interaction_ce
from mlmm.registry import LOSSES


@dataclass
class MVSENLossConfig:
    media: str = "image"
    global_weight: float = 1.0
    text_text_weight: float = 0.5
    label_weight: float = 1.0
    graph_weight: float = 1.0
    learn_temperature: bool = True
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = math.log(100.0)
    RANGES: ClassVar[dict] = {"global_weight": ">= 0", "text_text_weight": ">= 0", "label_weight": ">= 0",
                              "graph_weight": ">= 0", "init_logit_scale": "any", "max_logit_scale": "any"}
    name: str = field(default="mvsen", init=False)

    def validate(self, where: str) -> None:
        if self.media not in ("image", "video"):
            raise ConfigError(f"{where}.media: must be image or video, got {self.media!r}")


def text_text_infonce(t: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE between captions t [S, E] and their siblings y [S, E]; ``same`` Bool[S, S] off-diagonal
    pairs that are not negatives (same sample / identical caption)."""
    logits = (scale * at_least_fp32(t) @ at_least_fp32(y).t()).masked_fill(same, float("-inf"))  # [S, S]
    target = torch.arange(t.shape[0], device=t.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def multilabel_bce(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits over valid rows x labels (0 with a graph when no row is valid)."""
    if not bool(valid.any()):
        return logits.sum() * 0.0
    logits = at_least_fp32(logits)
    return F.binary_cross_entropy_with_logits(logits[valid], targets[valid].to(logits.dtype))


@LOSSES.register("mvsen", config=MVSENLossConfig)
class MVSENLoss(nn.Module):
    @staticmethod
    def reads(cfg: MVSENLossConfig, model) -> set[str]:
        return {cfg.media, "text", *(f"mvsen_{k}" for k in (
            "t2m_logits", "m2t_logits", "weight", "label_logits_media", "label_logits_text", "label_targets_media",
            "label_valid_media", "label_targets_text", "label_valid_text", "sibling", "sibling_rows"))}

    def __init__(self, cfg: MVSENLossConfig, modalities: list[str]):
        super().__init__()
        self.cfg = cfg
        self.contrastive = media_text_term(cfg, modalities)
        self.text_scale = nn.Parameter(torch.full((1,), cfg.init_logit_scale), requires_grad=cfg.learn_temperature)

    def forward(self, outputs: dict[str, torch.Tensor], batch) -> dict[str, torch.Tensor]:
        c = self.cfg
        glob = self.contrastive(outputs, batch)["loss"]
        w = outputs["mvsen_weight"]
        graph = 0.5 * (interaction_ce(outputs["mvsen_t2m_logits"]) + interaction_ce(outputs["mvsen_m2t_logits"])) * w
        label = 0.5 * (multilabel_bce(outputs["mvsen_label_logits_media"], outputs["mvsen_label_targets_media"],
                                      outputs["mvsen_label_valid_media"])
                       + multilabel_bce(outputs["mvsen_label_logits_text"], outputs["mvsen_label_targets_text"],
                                        outputs["mvsen_label_valid_text"]))
        rows, y = outputs["mvsen_sibling_rows"], outputs["mvsen_sibling"]
        scale = temperature(self.text_scale, c.max_logit_scale)
        if rows.numel() >= 2:
            t = outputs["text"][rows]  # [S, E]
            # captions of one sample (or identical ones) are not each other's negatives
            same = batch.not_negatives(rows) & ~torch.eye(rows.numel(), dtype=torch.bool, device=t.device)  # [S, S]
            tt = text_text_infonce(t, y, scale, same)
        else:  # keep the temperature in the graph
            tt = scale * 0.0 + y.sum() * 0.0
        total = c.global_weight * glob + c.text_text_weight * tt + c.label_weight * label + c.graph_weight * graph
        return {"loss": total, "global_loss": glob, "text_text_loss": tt, "label_loss": label, "graph_loss": graph}

    def temperatures(self) -> dict[str, float]:
        return {**self.contrastive.temperatures(), "text_text_logit_scale": float(self.text_scale.detach().exp())}
