"""Helpers shared by the pair-scoring heads (DI-vTR, ASCL, VSE, MVSEN)."""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from mlmm.config import ConfigError


def require_towers(model, head: str, modalities: Iterable[str]) -> None:
    """ConfigError naming the head when ``model`` lacks a tower it reads."""
    for m in modalities:
        if m not in model.widths:
            raise ConfigError(f"model.heads.{head}: needs a {m} tower (model has {sorted(model.widths)})")


def valid_rows(batch, media: str, device) -> tuple[torch.Tensor, bool]:
    """Rows with both the media and a caption (Long[n]); a one-row placeholder and False when there is none (the
    head then still runs on row 0, so every parameter keeps a zero gradient: ZeRO expects one for each)."""
    valid = batch.mask(media).to(device) & batch.mask("text").to(device)
    rows = torch.nonzero(valid).squeeze(1)
    if rows.numel() == 0:
        return torch.zeros(1, dtype=torch.long, device=device), False
    return rows, True


def text_encoder(model) -> Callable[[list[str], torch.device], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``encode(texts, device) -> (embedding [N, E] L2-normalised, tokens [N, L, D], mask Bool[N, L])`` with the
    model's own tokenizer, text tower and projection (:meth:`MultimodalModel.encode_tokens`); the closure keeps the
    model without registering it as a submodule of the head."""

    def encode(texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, att = model.tokenize_text(texts, device)
        return model.encode_tokens("text", ids, att)

    return encode
