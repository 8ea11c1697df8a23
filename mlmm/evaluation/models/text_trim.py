"""Exact text encoding at the batch's own length, for causal text towers pooled at the end-of-text token.

open_clip tokenises every string to the tower's ``context_length`` (77 for CLIP) and its ``encode_text`` always runs
all of those positions. In a tower with a causal attention mask, position i attends to positions 0..i only, and
every other op of its blocks (LayerNorm, projections, MLP) works on one position at a time; the embedding is read at
one position (the end-of-text token: ``argmax`` of the ids, or the first ``eos_id``). So no position after the
batch's last pooled one can change what is returned: cutting the token tensor there gives the same embeddings up
to float rounding, with a fraction of the work (real captions are 10-30 tokens of 77). Batches of texts sorted by
that length (:func:`length_order`) make the cut tight.

    tower = OpenClipCausalText.of(model)      # None unless the cut is exact for this model (see `of`)
    z = tower.encode(tokens)                  # Long[B, 77] -> [B, E], = model.encode_text(tokens) to rounding

Only towers whose result cannot depend on the cut are taken: a bidirectional tower (``no_causal_mask``,
SigLIP-style, every position attends to the padding) or one pooled on the ``last`` / ``first`` position, a CoCa
tower with an appended class token, a pad mask, a subclass with its own ``encode_text`` or a tower open_clip may
have changed: ``of`` returns None, and the evaluator keeps ``model.encode_text`` on the full tokens.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

POOLS = ("argmax", "eos")  # the pooled position is the end-of-text token, never after it


def length_order(lengths: Sequence[int]) -> list[int]:
    """Indices of ``lengths`` sorted by length (stable: equal lengths keep their input order)."""
    return sorted(range(len(lengths)), key=lambda i: lengths[i])


def encode_by_length(encode: Callable[[list], torch.Tensor], items: Sequence, batch_size: int,
                     lengths: Callable[[list], Optional[Sequence[int]]]) -> Optional[torch.Tensor]:
    """``encode(batch) -> [n, E]`` over ``items`` in batches of ``batch_size``, sorted by ``lengths(items)`` so that
    batches are tight (asked only when there is more than one batch; None: the order given); rows come back in the
    order of ``items``. None when ``items`` is empty."""
    items = list(items)
    n = lengths(items) if len(items) > batch_size else None
    order = None if n is None else length_order(n)
    if order is not None:
        items = [items[i] for i in order]
    out = [encode(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]
    if not out:
        return None
    z = torch.cat(out)  # [N, E] in the sorted order
    return z if order is None else z[torch.tensor(order, device=z.device).argsort()]


def _is_causal(mask: Optional[torch.Tensor]) -> bool:
    """``mask`` is open_clip's additive causal mask: -inf strictly above the diagonal, 0 elsewhere."""
    if mask is None or mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        return False
    upper = torch.ones(mask.shape, dtype=torch.bool, device=mask.device).triu(1)
    return bool((mask[upper] == float("-inf")).all()) and bool((mask[~upper] == 0).all())


class OpenClipCausalText:
    """An open_clip text tower (``CLIP`` or ``CustomTextCLIP`` with a ``TextTransformer``) run on the tokens up to
    the batch's last pooled position, with open_clip's own modules and in ``encode_text``'s order of ops."""

    def __init__(self, tower, pool_type: str, eos_id: Optional[int]):
        self.tower, self.pool_type, self.eos_id = tower, pool_type, eos_id

    @classmethod
    def of(cls, model) -> Optional["OpenClipCausalText"]:
        """The trimmed tower of an open_clip model, or None when cutting could change its embeddings."""
        try:
            from open_clip.model import CLIP, CustomTextCLIP
            from open_clip.transformer import (CustomResidualAttentionBlock, ResidualAttentionBlock, TextTransformer,
                                               Transformer)
        except ImportError:
            return None
        if type(model).encode_text is CLIP.encode_text:  # the text modules live on the model itself
            tower, pool, eos = model, getattr(model, "text_pool_type", None), getattr(model, "text_eos_id", None)
        elif (type(model).encode_text is CustomTextCLIP.encode_text and type(getattr(model, "text", None))
              is TextTransformer):
            tower, pool, eos = model.text, model.text.pool_type, model.text.eos_id
            if tower.cls_emb is not None or tower.use_pad_mask or tower.output_tokens:
                return None  # CoCa's appended class token / pad masks attend to the padding
        else:
            return None  # an HF text tower, CoCa, or a subclass with its own encode_text
        if pool not in POOLS or (pool == "eos" and eos is None):
            return None  # "last" / "first" / "none": the pooled position is not the end of the text
        if not _is_causal(getattr(tower, "attn_mask", None)):
            return None  # bidirectional: every position attends to the padding
        blocks = getattr(tower.transformer, "resblocks", ())
        if type(tower.transformer) is not Transformer or not all(
                type(b) in (ResidualAttentionBlock, CustomResidualAttentionBlock) for b in blocks):
            return None  # blocks whose only cross-position op we have not checked to be the masked attention
        return cls(tower, pool, eos)

    def pool_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """Long[B, L] ids -> Long[B]: the position open_clip's ``text_global_pool`` reads for each row."""
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)  # the first occurrence of the largest id (EOT in CLIP's vocabulary)
        return (tokens == self.eos_id).int().argmax(dim=-1)  # the first eos_id (0 when a row has none)

    def lengths(self, tokens: torch.Tensor) -> list[int]:
        """Positions each row needs: its pooled position + 1."""
        return (self.pool_index(tokens) + 1).tolist()

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Long[B, L] ids (L <= context_length) -> [B, E] un-normalised features, as ``encode_text`` returns."""
        t = self.tower
        idx = self.pool_index(tokens)  # [B]
        n = int(idx.max()) + 1 if len(idx) else tokens.shape[1]
        tokens = tokens[:, :n]  # [B, n]: nothing after the last pooled position reaches a pooled one
        cast = t.transformer.get_cast_dtype()
        x = t.token_embedding(tokens).to(cast) + t.positional_embedding[:n].to(cast)  # [B, n, D]
        x = t.transformer(x, attn_mask=t.attn_mask[:n, :n])
        x = t.ln_final(x)[torch.arange(x.shape[0], device=x.device), idx]  # [B, D]
        if t.text_projection is None:
            return x
        return t.text_projection(x) if isinstance(t.text_projection, torch.nn.Linear) else x @ t.text_projection
