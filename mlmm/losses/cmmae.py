"""CMMAE loss: masked-patch reconstruction (MSE on per-patch normalised targets) + video–audio matching.

    loss = video_weight * MSE_masked(video) + audio_weight * MSE_masked(audio) + match_weight * BCE(matched vs shuffled)

``MSE_masked`` is MAE's ``norm_pix_loss``: each target patch is normalised by its own mean and
(unbiased) variance, ``(t - mean) / sqrt(var + 1e-6)``; the squared error is averaged over the
patch dimension and then over the *masked* patches only. It reads the outputs of the ``cmmae`` head.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mlmm.data.batch import Batch
from mlmm.registry import LOSSES


@dataclass
class CMMAELossConfig:
    video_weight: float = 1.0
    audio_weight: float = 1.0
    match_weight: float = 0.5
    norm_pix: bool = True
    RANGES: ClassVar[dict] = {"video_weight": ">= 0", "audio_weight": ">= 0", "match_weight": ">= 0"}
    name: str = field(default="cmmae", init=False)


def masked_patch_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True,
                     row_weight: Optional[torch.Tensor] = None, eps: float = 1e-6) -> torch.Tensor:
    """pred/target [n, N, P], mask Bool[n, N] (True = masked, scored) -> mean squared error over masked patches."""
    target = target.float()
    if norm_pix:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + eps) ** 0.5
    per_patch = ((pred.float() - target) ** 2).mean(-1)  # [n, N]
    w = mask.float()
    if row_weight is not None:
        w = w * row_weight.float()[:, None]
    return (per_patch * w).sum() / w.sum().clamp(min=1.0)


@LOSSES.register("cmmae", config=CMMAELossConfig)
class CMMAELoss(nn.Module):
    @staticmethod
    def reads(cfg: CMMAELossConfig, model) -> set[str]:
        return {f"cmmae_{k}" for k in ("video_pred", "video_target", "video_mask", "audio_pred", "audio_target",
                                       "audio_mask", "match_logits", "match_labels", "weight")}

    def __init__(self, cfg: CMMAELossConfig, modalities: list[str]):
        super().__init__()
        self.cfg = cfg

    def forward(self, outputs: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        w = outputs["cmmae_weight"]
        terms = {m: masked_patch_mse(outputs[f"cmmae_{m}_pred"], outputs[f"cmmae_{m}_target"],
                                     outputs[f"cmmae_{m}_mask"], self.cfg.norm_pix, w) for m in ("video", "audio")}
        logits, labels = outputs["cmmae_match_logits"], outputs["cmmae_match_labels"]
        bce = F.binary_cross_entropy_with_logits(logits.float(), labels, weight=w.repeat(2), reduction="sum")
        bce = bce / w.repeat(2).sum().clamp(min=1.0)
        with torch.no_grad():
            acc = (((logits > 0).float() == labels).float() * w.repeat(2)).sum() / w.repeat(2).sum().clamp(min=1.0)
        total = (self.cfg.video_weight * terms["video"] + self.cfg.audio_weight * terms["audio"]
                 + self.cfg.match_weight * bce)
        return {"loss": total, "video_mae_loss": terms["video"], "audio_mae_loss": terms["audio"],
                "match_loss": bce, "match_acc": acc}
