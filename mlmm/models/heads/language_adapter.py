"""Language-specific adapters ("language acquirers", MLA stage 2) as a registered head.

    model:
      heads:
        acquirers: {name: language_adapter, languages: [de, fr, cs], bottleneck: 32}

For a row in language L with an adapter: ``z' = normalize(z + W_up[L] gelu(W_down[L] z + b_down[L]) + b_up[L])``
on the projected, L2-normalised text embedding ``z = outputs["text"]``; other rows pass unchanged. ``W_up`` and
``b_up`` start at zero, so a fresh adapter is the identity and stage 2 starts exactly at stage 1's solution.
MLA inserts its acquirers inside the encoder; these act on the embedding (lighter; the frozen stage-1 tower is
shared by all languages). Heads run in ``MultimodalModel.forward`` (not in ``encode_text``, which has no
language), so cross-lingual evaluation (:mod:`mlmm.evaluation.crosslingual`) embeds texts through ``forward``
with ``batch.lang`` set. Every adapter takes part in every forward (ZeRO expects a gradient for each parameter).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mlmm.config import ConfigError
from mlmm.registry import HEADS


@dataclass
class LanguageAdapterConfig:
    languages: list[str] = field(default_factory=list)  # one adapter per language
    bottleneck: int = 32
    RANGES: ClassVar[dict] = {"bottleneck": ">= 1"}
    name: str = field(default="language_adapter", init=False)

    def validate(self, where: str) -> None:
        if not self.languages:
            raise ConfigError(f"{where}.languages: at least one language is required")


@HEADS.register("language_adapter", config=LanguageAdapterConfig)
class LanguageAdapter(nn.Module):
    @staticmethod
    def reads(cfg: LanguageAdapterConfig, model) -> set[str]:
        return {"text"}

    @staticmethod
    def writes(cfg: LanguageAdapterConfig, model) -> set[str]:
        return {"text"}  # the adapted text embedding replaces the tower's

    def __init__(self, cfg: LanguageAdapterConfig, model):
        super().__init__()
        self.languages = list(cfg.languages)
        n, e, r = len(cfg.languages), model.cfg.embed_dim, cfg.bottleneck
        self.down = nn.Parameter(torch.randn(n, e, r) * e ** -0.5)  # [L, E, r]
        self.down_bias = nn.Parameter(torch.zeros(n, 1, r))  # [L, 1, r]
        self.up = nn.Parameter(torch.zeros(n, r, e))  # [L, r, E]: identity at init
        self.up_bias = nn.Parameter(torch.zeros(n, 1, e))  # [L, 1, E]

    def forward(self, outputs: dict[str, torch.Tensor], batch, model) -> dict[str, torch.Tensor]:
        z = outputs["text"]  # [B, E]
        h = F.gelu(torch.einsum("be,ler->lbr", z, self.down) + self.down_bias)  # [L, B, r]
        delta = torch.einsum("lbr,lre->lbe", h, self.up) + self.up_bias  # [L, B, E]
        index = torch.tensor([self.languages.index(x) if x in self.languages else -1 for x in batch.lang],
                             dtype=torch.long, device=z.device)  # [B]
        rows = torch.nonzero((index >= 0) & batch.mask("text").to(z.device)).flatten()
        out = z + 0.0 * delta.sum()  # keep every adapter in the graph
        if rows.numel():
            adapted = F.normalize(z[rows] + delta[index[rows], rows], dim=-1)
            out = out.index_copy(0, rows, adapted)
        return {"text": out}
