"""The multimodal model: the towers a config names, each followed by a projection to `embed_dim`.

    model = MultimodalModel(cfg.model, tokenizer)
    out = model(batch)          # {"image": [B, E], "text": [B, E], ...}, L2-normalised
    z = model.encode("audio", log_mel)

Models return features; losses live in :mod:`mlmm.losses`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mlmm.config import ModelConfig
from mlmm.data.batch import Batch
from mlmm.models.towers import AudioTower, ImageTower, TextTower, VideoTower


class MultimodalModel(nn.Module):
    def __init__(self, cfg: ModelConfig, tokenizer=None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        towers: dict[str, nn.Module] = {}
        if cfg.image is not None:
            towers["image"] = ImageTower(cfg.image)
        if cfg.video is not None:
            towers["video"] = VideoTower(cfg.video, frame_encoder=towers["image"] if cfg.video.share_image_tower else None)
        if cfg.audio is not None:
            towers["audio"] = AudioTower(cfg.audio)
        if cfg.text is not None:
            if tokenizer is None:
                raise ValueError("model.text needs a tokenizer (model.text.tokenizer folder)")
            towers["text"] = TextTower(cfg.text, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
        self.towers = nn.ModuleDict(towers)
        self.proj = nn.ModuleDict({m: nn.Linear(t.width, cfg.embed_dim, bias=False) for m, t in towers.items()})
        for p in self.proj.values():
            nn.init.normal_(p.weight, std=p.in_features ** -0.5)

    @property
    def modalities(self) -> list[str]:
        return list(self.towers.keys())

    def _features(self, modality: str, x: torch.Tensor, attention: Optional[torch.Tensor]) -> torch.Tensor:
        if modality == "text":
            return self.towers["text"](x, attention)
        return self.towers[modality](x)

    def encode(self, modality: str, x: torch.Tensor, attention: Optional[torch.Tensor] = None,
               normalize: bool = True) -> torch.Tensor:
        """Embed one modality: [B, ...] -> [B, E] (L2-normalised unless normalize=False)."""
        z = self.proj[modality](self._features(modality, x, attention))
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(self, texts: list[str], device: Optional[torch.device] = None) -> torch.Tensor:
        """Tokenise and embed raw strings with the model's tokenizer: -> [N, E]."""
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=self.cfg.text.max_length,
                             return_tensors="pt")
        device = device or next(self.parameters()).device
        return self.encode("text", tok["input_ids"].to(device), tok["attention_mask"].to(device))

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Embed every modality the model has, for the rows of `batch` that carry it.

        Rows without the modality get zeros. Every tower always runs (on one row when none is
        present, contributing zero) so that each parameter gets a gradient on every rank —
        ZeRO's gradient hooks expect the same parameters to be used on all ranks.
        """
        out = {}
        for m in self.modalities:
            x = batch.text_ids if m == "text" else getattr(batch, m)
            if x is None:
                continue
            mask = batch.mask(m).to(x.device)
            attention = batch.text_attention if m == "text" else None
            idx = torch.nonzero(mask).squeeze(1)
            if idx.numel() == 0:
                z = self.encode(m, x[:1], None if attention is None else attention[:1])  # [1, E]
                out[m] = x.new_zeros((x.shape[0], z.shape[1]), dtype=z.dtype) + 0.0 * z.sum()
                continue
            z = self.encode(m, x[idx], None if attention is None else attention[idx])  # [n, E]
            if idx.numel() == x.shape[0]:
                out[m] = z
            else:
                out[m] = z.new_zeros((x.shape[0], z.shape[1])).index_copy(0, idx, z)  # [B, E]
        return out
