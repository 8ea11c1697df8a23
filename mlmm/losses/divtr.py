"""DI-vTR loss: InfoNCE on the global (media, text) embeddings + cross-entropy of the interaction scores.

The interaction term reads the ``divtr`` head's ``divtr_t2m_logits`` / ``divtr_m2t_logits``
[n, 1 + k] (column 0 = the positive, then the top-k in-batch hard negatives by global similarity,
``-inf`` on invalid slots) and trains the combined score ``exp(global_scale) * cos + interaction``
to rank the positive first among them, in both directions::

    loss = global_weight * InfoNCE(media, text) + interaction_weight * 0.5 * (CE(t2m, 0) + CE(m2t, 0))
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mlmm.config import ConfigError
from mlmm.data.batch import Batch
from mlmm.losses.contrastive import at_least_fp32, media_text_term
from mlmm.registry import LOSSES


@dataclass
class DIVTRLossConfig:
    media: str = "video"
    global_weight: float = 1.0
    interaction_weight: float = 1.0
    learn_temperature: bool = True
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = math.log(100.0)
    RANGES: ClassVar[dict] = {"global_weight": ">= 0", "interaction_weight": ">= 0", "init_logit_scale": "any",
                              "max_logit_scale": "any"}
    name: str = field(default="divtr", init=False)

    def validate(self, where: str) -> None:
        if self.media not in ("video", "audio", "image"):
            raise ConfigError(f"{where}.media: must be video, audio or image, got {self.media!r}")


def interaction_ce(logits: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy with target column 0 over the rows of logits [n, 1 + k] (-inf = invalid slot)."""
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(at_least_fp32(logits), target)


@LOSSES.register("divtr", config=DIVTRLossConfig)
class DIVTRLoss(nn.Module):
    @staticmethod
    def reads(cfg: DIVTRLossConfig, model) -> set[str]:
        return {cfg.media, "text", "divtr_t2m_logits", "divtr_m2t_logits"}

    def __init__(self, cfg: DIVTRLossConfig, modalities: list[str]):
        super().__init__()
        self.cfg = cfg
        self.contrastive = media_text_term(cfg, modalities)

    def forward(self, outputs: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        glob = self.contrastive(outputs, batch)["loss"]
        t2m, m2t = outputs["divtr_t2m_logits"], outputs["divtr_m2t_logits"]
        inter = 0.5 * (interaction_ce(t2m) + interaction_ce(m2t))
        with torch.no_grad():  # how often the positive wins among the hard negatives
            acc = 0.5 * ((t2m.argmax(1) == 0).float().mean() + (m2t.argmax(1) == 0).float().mean())
        total = self.cfg.global_weight * glob + self.cfg.interaction_weight * inter
        return {"loss": total, "global_loss": glob, "interaction_loss": inter, "interaction_acc": acc}

    def temperatures(self) -> dict[str, float]:
        return self.contrastive.temperatures()
