"""Video tower: a frame encoder applied per frame, then a small temporal transformer.

Sharing the frame encoder with the image tower (``cfg.share_image_tower``): the VideoTower keeps
the image tower by a plain (non-module) reference, so its parameters appear once in the model's
``state_dict()`` / ``parameters()`` (under ``image``), never under ``video`` — no duplicate keys,
and safetensors ``save_file`` accepts the state dict. The owner (the multimodal model) must
register the image tower itself, and ``.to()`` / ``.train()`` on the owner reach it as usual.
When not shared, the VideoTower builds and registers its own ``ImageTower(cfg.frame_encoder)``
as the submodule ``frame_encoder``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mlmm.config import VideoTowerConfig
from mlmm.models.layers import Transformer
from mlmm.models.towers.image import ImageTower


class VideoTower(nn.Module):
    """Frames Float[B, T, 3, H, W] (T <= cfg.frames) -> [B, width]; tokens are per-frame features.

    ``frame_encoder`` is the (already registered) image tower to share when
    ``cfg.share_image_tower``; it is ignored otherwise (an own encoder is built from
    ``cfg.frame_encoder``). Any encoder with ``width`` and ``forward([N, 3, H, W]) -> [N, width]`` works.
    """

    def __init__(self, cfg: VideoTowerConfig, frame_encoder: Optional[nn.Module] = None):
        super().__init__()
        self.cfg = cfg
        self.shared = cfg.share_image_tower
        if self.shared:
            if frame_encoder is None:
                raise ValueError("video.share_image_tower is true but no frame_encoder (image tower) was given")
            self._shared_encoder = [frame_encoder]  # a list is not registered as a submodule
        else:
            if cfg.frame_encoder is None:
                raise ValueError("video.frame_encoder: required when share_image_tower is false")
            self.frame_encoder = ImageTower(cfg.frame_encoder)
        width = self.encoder.width
        self.width = width
        self.temporal_embedding = nn.Parameter(width ** -0.5 * torch.randn(cfg.frames, width))
        self.transformer = Transformer(width, cfg.temporal_layers, cfg.heads)
        self.ln_post = nn.LayerNorm(width)
        if getattr(cfg, "audio_context", False):  # contextual encoder: audio tokens join the temporal transformer
            self.audio_proj = nn.Linear(cfg.audio_width, width)
            self.audio_type_embedding = nn.Parameter(width ** -0.5 * torch.randn(width))

    @property
    def encoder(self) -> nn.Module:
        """The frame encoder in use (shared image tower or own ``frame_encoder``)."""
        return self._shared_encoder[0] if self.shared else self.frame_encoder

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable
        if not self.shared and hasattr(self.frame_encoder, "set_grad_checkpointing"):
            self.frame_encoder.set_grad_checkpointing(enable)

    def forward_tokens(self, x: torch.Tensor, audio_tokens: Optional[torch.Tensor] = None,
                       audio_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, T, 3, H, W] -> per-frame tokens [B, T, D].

        Contextual encoder (``video.audio_context: true``): ``audio_tokens`` [B, Ta, audio_width] (e.g. the
        audio tower's tokens; ``audio_mask`` Bool[B, Ta], True = real) are projected, tagged with an audio-type
        embedding and appended to the frame features inside the temporal transformer, so every frame token
        also attends to the soundtrack; only the T frame tokens are returned.
        """
        B, T = x.shape[:2]
        if T > self.cfg.frames:
            raise ValueError(f"got {T} frames, the tower was built for at most video.frames={self.cfg.frames}")
        f = self.encoder(x.flatten(0, 1))  # [B*T, D]
        f = f.view(B, T, -1) + self.temporal_embedding[:T].to(f.dtype)  # [B, T, D]
        if audio_tokens is None:
            return self.ln_post(self.transformer(f))
        if not hasattr(self, "audio_proj"):
            raise ValueError("audio_tokens given but the video tower was built with video.audio_context=false")
        a = self.audio_proj(audio_tokens.to(f.dtype)) + self.audio_type_embedding.to(f.dtype)  # [B, Ta, D]
        if audio_mask is None:
            audio_mask = torch.ones(a.shape[:2], dtype=torch.bool, device=a.device)
        keep = torch.cat([torch.ones(B, T, dtype=torch.bool, device=a.device), audio_mask.bool()], 1)  # [B, T+Ta]
        return self.ln_post(self.transformer(torch.cat([f, a], 1), key_padding_mask=keep)[:, :T])

    def pool(self, tokens: torch.Tensor, attention: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens [B, T, D] -> [B, D]: mean over frames."""
        return tokens.mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, 3, H, W] -> pooled [B, D] = mean over frames of the tokens."""
        return self.pool(self.forward_tokens(x))
