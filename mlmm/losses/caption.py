"""Captioning loss: token cross-entropy (teacher forcing) over the ``caption`` head's real target tokens."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch.nn.functional as F
from torch import nn

from mlmm.registry import LOSSES


@dataclass
class CaptionLossConfig:
    label_smoothing: float = 0.0
    RANGES: ClassVar[dict] = {"label_smoothing": "[0, 1)"}
    name: str = field(default="caption", init=False)


@LOSSES.register("caption", config=CaptionLossConfig)
class CaptionLoss(nn.Module):
    @staticmethod
    def reads(cfg: CaptionLossConfig, model) -> set[str]:
        return {"caption_logits", "caption_targets", "caption_target_mask"}

    def __init__(self, cfg: CaptionLossConfig, modalities: list[str]):
        super().__init__()
        self.cfg = cfg

    def forward(self, outputs: dict, batch) -> dict:
        logits, targets, mask = outputs["caption_logits"], outputs["caption_targets"], outputs["caption_target_mask"]
        if not bool(mask.any()):
            z = logits.sum() * 0.0
            return {"loss": z, "caption_loss": z}
        loss = F.cross_entropy(logits[mask].float(), targets[mask], label_smoothing=self.cfg.label_smoothing)
        return {"loss": loss, "caption_loss": loss}
