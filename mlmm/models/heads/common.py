"""Helpers shared by the pair-scoring heads (DI-vTR, ASCL, VSE, MVSEN)."""
from __future__ import annotations

import torch

from mlmm.contracts import token_keys


def pair_reads(media: str) -> set[str]:
    """What a head scoring (media, text) pairs reads: both embeddings and both towers' tokens."""
    return {media, "text", *token_keys(media), *token_keys("text")}


def valid_rows(batch, media: str, device) -> tuple[torch.Tensor, bool]:
    """Rows with both the media and a caption (Long[n]); a one-row placeholder and False when there is none (the
    head then still runs on row 0, so every parameter keeps a zero gradient: ZeRO expects one for each)."""
    valid = batch.mask(media).to(device) & batch.mask("text").to(device)
    rows = torch.nonzero(valid).squeeze(1)
    if rows.numel() == 0:
        return torch.zeros(1, dtype=torch.long, device=device), False
    return rows, True
