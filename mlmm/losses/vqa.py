"""VQA loss over the answer vocabulary of the ``vqa`` head (``vqa_logits`` / ``vqa_targets`` / ``vqa_target_mask``).

* ``bce`` (default, the VQAv2 standard of Teney et al. / bottom-up attention): binary cross-entropy of every
  answer's logit against its soft VQA score, summed over answers, averaged over the rows that have answers;
* ``ce``: cross-entropy against the soft scores normalised to a distribution (rows whose answers are all out of
  the vocabulary are skipped).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mlmm.config import ConfigError
from mlmm.registry import LOSSES


@dataclass
class VQALossConfig:
    mode: str = "bce"  # bce | ce
    name: str = field(default="vqa", init=False)

    def validate(self, where: str) -> None:
        if self.mode not in ("bce", "ce"):
            raise ConfigError(f"{where}.mode: must be bce or ce, got {self.mode!r}")


def vqa_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, mode: str = "bce") -> torch.Tensor:
    """logits / targets [B, A], mask Bool[B] -> scalar (0 with a graph when no row counts)."""
    if mode == "ce":
        mask = mask & (targets.sum(1) > 0)
    if not bool(mask.any()):
        return logits.sum() * 0.0
    lg, t = logits[mask].float(), targets[mask].float()
    if mode == "bce":
        return F.binary_cross_entropy_with_logits(lg, t, reduction="sum") / lg.shape[0]
    p = t / t.sum(1, keepdim=True)
    return -(p * lg.log_softmax(-1)).sum(1).mean()


@LOSSES.register("vqa", config=VQALossConfig)
class VQALoss(nn.Module):
    @staticmethod
    def reads(cfg: VQALossConfig, model) -> set[str]:
        return {"vqa_logits", "vqa_targets", "vqa_target_mask"}

    def __init__(self, cfg: VQALossConfig, modalities: list[str]):
        super().__init__()
        self.cfg = cfg

    def forward(self, outputs: dict, batch) -> dict:
        logits = outputs["vqa_logits"]
        loss = vqa_loss(logits, outputs["vqa_targets"], outputs["vqa_target_mask"], self.cfg.mode)
        return {"loss": loss, "vqa_loss": loss}
