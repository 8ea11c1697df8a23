"""The batch that flows from the data pipeline into models and losses.

A batch may mix samples that lack some modality: every modality tensor is present for all B rows
(zeros where the sample has none) together with a boolean presence mask.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

import torch


@dataclass
class Batch:
    keys: list[str]  # sample keys, length B
    image: Optional[torch.Tensor] = None  # [B, 3, H, W] float, normalised
    image_mask: Optional[torch.Tensor] = None  # [B] bool
    video: Optional[torch.Tensor] = None  # [B, T, 3, H, W] float, normalised
    video_mask: Optional[torch.Tensor] = None  # [B] bool
    audio: Optional[torch.Tensor] = None  # [B, 1, n_mels, frames] float log-mel
    audio_mask: Optional[torch.Tensor] = None  # [B] bool
    text_ids: Optional[torch.Tensor] = None  # [B, L] long
    text_attention: Optional[torch.Tensor] = None  # [B, L] long (1 = real token)
    text_mask: Optional[torch.Tensor] = None  # [B] bool
    lang: list[str] = field(default_factory=list)  # language of each row's text ("" when none)
    meta: list[dict] = field(default_factory=list)  # the sample json of each row

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str, dtype: Optional[torch.dtype] = None) -> "Batch":
        """Move tensors to `device`; floating tensors are cast to `dtype` when given."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device, non_blocking=True)
                if dtype is not None and v.is_floating_point():
                    v = v.to(dtype)
            out[f.name] = v
        return Batch(**out)

    def has(self, modality: str) -> bool:
        mask = getattr(self, f"{modality}_mask")
        return mask is not None and bool(mask.any())

    def mask(self, modality: str) -> torch.Tensor:
        mask = getattr(self, f"{modality}_mask")
        if mask is None:
            return torch.zeros(len(self), dtype=torch.bool)
        return mask
