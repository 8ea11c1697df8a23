"""AST-style audio tower: the image ViT over a log-mel spectrogram treated as a 1-channel image."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mlmm.config import AudioTowerConfig
from mlmm.models.towers.image import ViT


class AudioTower(ViT):
    """Log-mel Float[B, 1, n_mels, frames] -> [B, width].

    Square ``patch_size`` patches, non-overlapping. The time axis is cropped to
    ``(cfg.frames // patch_size) * patch_size`` frames (at most patch_size - 1 trailing frames
    dropped); a shorter input is zero-padded on the right to that length.
    """

    def __init__(self, cfg: AudioTowerConfig):
        p = cfg.patch_size
        super().__init__(1, (cfg.n_mels // p, cfg.frames // p), p, cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio)
        self.cfg = cfg
        self.time_frames = (cfg.frames // p) * p

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 1, n_mels, frames] -> [B, 1, n_mels, time_frames] (cropped or zero-padded on the right); the
        tokens are then [B, 1 + (n_mels/p)*(frames//p), D], index 0 CLS."""
        t = x.shape[-1]
        return x[..., : self.time_frames] if t >= self.time_frames else F.pad(x, (0, self.time_frames - t))
