"""Losses: ``forward(outputs, batch) -> {"loss": total, "<name>_loss": term, ...}``.

Importing this package registers every loss in :data:`mlmm.registry.LOSSES`.
"""
from mlmm.losses.contrastive import ContrastiveLoss, ContrastiveLossConfig, info_nce, masked_info_nce
from mlmm.losses.multi import MultiLoss, MultiLossConfig

__all__ = ["ContrastiveLoss", "ContrastiveLossConfig", "MultiLoss", "MultiLossConfig", "info_nce",
           "masked_info_nce"]
