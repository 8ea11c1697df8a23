"""Helpers shared by the pair-scoring heads (DI-vTR, ASCL, VSE, MVSEN)."""
from __future__ import annotations

from typing import NamedTuple

import torch

from mlmm.contracts import token_keys
from mlmm.models.fusion.alignment import trim_padding


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


class PairInputs(NamedTuple):
    """What a pair-scoring head reads for its n valid rows (:func:`valid_rows`)."""
    rows: torch.Tensor  # Long[n]
    any_valid: bool
    m_tok: torch.Tensor  # [n, Lm, Dm]
    m_mask: torch.Tensor  # Bool[n, Lm]
    t_tok: torch.Tensor  # [n, L', Dt]: padding columns no row uses trimmed
    t_mask: torch.Tensor  # Bool[n, L']
    glob: torch.Tensor  # [n, n] media x text: cosine of the global embeddings
    exclude: torch.Tensor  # Bool[n, n] text x media: off-diagonal pairs that are not negatives


def pair_inputs(outputs: dict[str, torch.Tensor], batch, media: str) -> PairInputs:
    """The valid rows' tokens, their global similarities and the pairs that are not negatives (same sample /
    identical caption / media owning the caption)."""
    device = outputs[media].device
    rows, any_valid = valid_rows(batch, media, device)
    n = rows.numel()
    m_tok, m_mask = outputs[f"{media}_tokens"][rows], outputs[f"{media}_token_mask"][rows]
    t_tok, t_mask = trim_padding(outputs["text_tokens"][rows], outputs["text_token_mask"][rows])  # [n, L', D]
    glob = outputs[media][rows] @ outputs["text"][rows].t()  # [n, n] media x text
    exclude = batch.not_negatives(rows) & ~torch.eye(n, dtype=torch.bool, device=device)  # text x media
    return PairInputs(rows, any_valid, m_tok, m_mask, t_tok, t_mask, glob, exclude)
