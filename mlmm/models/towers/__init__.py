"""Modality towers: ``forward(x) -> [B, D]`` pooled features, ``forward_tokens(x) -> [B, T, D]``.

Towers expose ``width`` (D) and have no projection to the shared embedding and no losses.
"""
from mlmm.models.towers.audio import AudioTower
from mlmm.models.towers.image import ImageTower, ViT
from mlmm.models.towers.text import TextTower
from mlmm.models.towers.text_native import NativeTextTower
from mlmm.models.towers.video import VideoTower

__all__ = ["AudioTower", "ImageTower", "NativeTextTower", "TextTower", "VideoTower", "ViT"]
