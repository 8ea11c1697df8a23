"""Losses: ``forward(outputs, batch) -> {"loss": total, "<name>_loss": term, ...}``.

Importing this package registers every loss in :data:`mlmm.registry.LOSSES`.
"""
from mlmm.losses.contrastive import ContrastiveLoss, ContrastiveLossConfig, info_nce, masked_info_nce
from mlmm.losses.multi import MultiLoss, MultiLossConfig
from mlmm.losses.distill import Clip4VLALoss, MClipLoss, MLALoss  # noqa: E402  (distillation losses)
from mlmm.losses.distill_kd import LogitKDLoss  # noqa: E402
from mlmm.losses.hashing import HashingLoss, HashingLossConfig  # noqa: E402  (cross-modal hashing)

__all__ = ["ContrastiveLoss", "ContrastiveLossConfig", "MultiLoss", "MultiLossConfig", "info_nce",
           "masked_info_nce", "Clip4VLALoss", "MClipLoss", "MLALoss", "LogitKDLoss", "HashingLoss", "HashingLossConfig",
           "DIVTRLoss", "DIVTRLossConfig", "CMMAELoss", "CMMAELossConfig", "VQALoss", "VQALossConfig", "CaptionLoss",
           "CaptionLossConfig", "RCARLoss", "RCARLossConfig", "ASCLLoss", "ASCLLossConfig", "ComposedLoss",
           "ComposedLossConfig", "VSELoss", "VSELossConfig", "VSETripletLoss", "VSETripletLossConfig", "MVSENLoss",
           "MVSENLossConfig"]
from mlmm.losses.divtr import DIVTRLoss, DIVTRLossConfig  # noqa: E402  (DI-vTR: global + interaction)
from mlmm.losses.cmmae import CMMAELoss, CMMAELossConfig  # noqa: E402  (CMMAE: masked patches + matching)
from mlmm.losses.vqa import VQALoss, VQALossConfig  # noqa: E402  (VQA: soft-score BCE / CE)
from mlmm.losses.caption import CaptionLoss, CaptionLossConfig  # noqa: E402  (captioning: token CE)
from mlmm.losses.noisy import RCARLoss, RCARLossConfig  # noqa: E402  (RCAR: noisy correspondence, BMM soft labels)
from mlmm.losses.asymmetry import ASCLLoss, ASCLLossConfig  # noqa: E402  (ASCL: asymmetry-sensitive contrastive)
from mlmm.losses.infomax import ComposedLoss, ComposedLossConfig  # noqa: E402  (composed retrieval + Deep InfoMax)
from mlmm.losses.vse import VSELoss, VSELossConfig, VSETripletLoss, VSETripletLossConfig  # noqa: E402  (VSE++ / VSE)
from mlmm.losses.mvsen import MVSENLoss, MVSENLossConfig  # noqa: E402  (MVSEN: multi-task VSE)
