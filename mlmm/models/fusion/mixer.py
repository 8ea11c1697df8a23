"""CMMAE cross-modal mixer: one shared transformer over the concatenated token sequences of several modalities.

    mixer = CrossModalMixer(width=32, layers=2, heads=2, modalities=("video", "audio"))
    mixed = mixer({"video": (v [B, Tv, D], v_mask), "audio": (a [B, Ta, D], a_mask)})
    mixed["video"]  # [B, Tv, D]: the video tokens, in their original order, after attending to the audio too

Fuse-then-separate: a learned modality embedding is added to each sequence, the sequences are
concatenated in the mixer's fixed modality order, run through the transformer (padding masked as
keys), and split back into per-modality tensors with their original lengths and order. The mixer
adds no positional information of its own: the towers / the MAE encoder already put it in the tokens.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from mlmm.models.layers import Transformer


class CrossModalMixer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, modalities: Sequence[str] = ("video", "audio"),
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.modalities = tuple(modalities)
        self.width = width
        self.modality_embedding = nn.ParameterDict(
            {m: nn.Parameter(width ** -0.5 * torch.randn(width)) for m in self.modalities})
        self.transformer = Transformer(width, layers, heads, mlp_ratio)
        self.ln = nn.LayerNorm(width)

    def fuse(self, inputs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, list]:
        """-> (tokens [B, sum T_m, D] with modality embeddings, mask Bool[B, sum T_m], [(modality, length)])."""
        missing = [m for m in self.modalities if m not in inputs]
        if missing:
            raise KeyError(f"CrossModalMixer: missing inputs for {missing}")
        xs, masks, spans = [], [], []
        for m in self.modalities:
            x, mask = inputs[m]
            xs.append(x + self.modality_embedding[m].to(x.dtype))
            masks.append(mask.bool())
            spans.append((m, x.shape[1]))
        return torch.cat(xs, 1), torch.cat(masks, 1), spans

    @staticmethod
    def separate(x: torch.Tensor, spans: list) -> dict[str, torch.Tensor]:
        """[B, sum T_m, D] -> {modality: [B, T_m, D]} (inverse of the concatenation in :meth:`fuse`)."""
        parts = torch.split(x, [t for _, t in spans], dim=1)
        return {m: p for (m, _), p in zip(spans, parts)}

    def forward(self, inputs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """{modality: (tokens [B, T_m, D], mask Bool[B, T_m])} -> {modality: mixed tokens [B, T_m, D]}."""
        x, mask, spans = self.fuse(inputs)
        return self.separate(self.ln(self.transformer(x, key_padding_mask=mask)), spans)
