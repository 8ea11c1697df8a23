"""Native text tower (``model.text.arch: clip``): a CLIP-style pre-norm transformer, no dropout, one fused qkv
projection per layer and SDPA attention — the text tower of open_clip's CLIP, made bidirectional for mean / CLS / GPO
pooling over the real tokens.

    text: {tokenizer: TOK, arch: clip, hidden: 512, layers: 12, heads: 8, intermediate: 2048, max_length: 77}

Compared with the Hugging Face encoders of :class:`~mlmm.models.towers.text.TextTower` (BERT / XLM-R from scratch) it
has no dropout (CLIP-style pretraining does not use any), no token-type embeddings and a pre-norm residual stream;
the blocks are :class:`mlmm.models.layers.Transformer`, shared with the image, video and audio towers. Padding is a
key mask: padded positions are never attended, and a batch without padding takes SDPA's mask-free kernels. With
padding the blocks run on the real tokens only (:class:`~mlmm.models.layers.Packing`): on real captions padded to
the batch's longest, that is about half the text tower's compute. Use the
HF arches to start from a pretrained multilingual encoder (``pretrained:``); use ``clip`` to pretrain from scratch.
"""
from __future__ import annotations

import torch
from torch import nn

from mlmm.config import TextTowerConfig
from mlmm.models.layers import Transformer
from mlmm.models.towers.text import pool_text


class NativeTextTower(nn.Module):
    """Token ids Long[B, L] + attention Long/Bool[B, L] (1 = real token) -> [B, hidden]; same interface as TextTower."""

    def __init__(self, cfg: TextTowerConfig, vocab_size: int, pad_token_id: int):
        super().__init__()
        self.cfg, self.width, self.pad_token_id = cfg, cfg.hidden, pad_token_id
        self.token_embedding = nn.Embedding(vocab_size, cfg.hidden)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.max_length, cfg.hidden))
        self.transformer = Transformer(cfg.hidden, cfg.layers, cfg.heads, mlp_ratio=cfg.intermediate / cfg.hidden)
        self.ln_final = nn.LayerNorm(cfg.hidden)
        nn.init.normal_(self.token_embedding.weight, std=0.02)  # as open_clip's TextTransformer
        nn.init.normal_(self.positional_embedding, std=0.01)
        if cfg.pooling == "gpo":
            from mlmm.models.pooling import GPO

            self.gpo = GPO()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, L] -> token + position embeddings [B, L, D]."""
        L = ids.shape[1]
        if L > self.positional_embedding.shape[0]:
            raise ValueError(f"text: {L} tokens but the native text tower has {self.positional_embedding.shape[0]} "
                             "positions (model.text.max_length)")
        return self.token_embedding(ids) + self.positional_embedding[:L]  # [B, L, D]

    def forward_tokens(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """ids [B, L], attention [B, L] -> last hidden states [B, L, D] (ln_final of 0 at padding, never attended)."""
        return self.ln_final(self.transformer(self.embed(ids), key_padding_mask=attention.bool()))

    def pool(self, h: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """tokens [B, L, D], attention [B, L] -> [B, D] (masked mean over real tokens, first token, or GPO)."""
        return pool_text(h, attention, self.cfg.pooling, getattr(self, "gpo", None))

    def forward(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """ids [B, L], attention [B, L] -> pooled [B, D] (= ``pool(forward_tokens(...))``; ``cls`` pooling runs the
        last block for the first token only)."""
        if self.cfg.pooling == "cls":
            h = self.transformer(self.embed(ids), key_padding_mask=attention.bool(), first_token_only=True)
            return self.ln_final(h[:, 0])
        return self.pool(self.forward_tokens(ids, attention), attention)
