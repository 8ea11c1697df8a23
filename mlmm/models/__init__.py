"""Models: modality towers (:mod:`mlmm.models.towers`), shared layers, and the multimodal model."""
from mlmm.models.towers import AudioTower, ImageTower, TextTower, VideoTower

__all__ = ["AudioTower", "ImageTower", "TextTower", "VideoTower"]
