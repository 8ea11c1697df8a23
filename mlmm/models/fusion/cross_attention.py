"""Cross-attention fusion encoder: query tokens attend to context tokens (ALBEF / BLIP style fusion layers).

    fusion = CrossAttentionFusion(width=64, layers=2, heads=4, query_dim=32, context_dim=32)
    fused = fusion(question_tokens, image_tokens, query_mask=q_mask, context_mask=img_mask)   # [B, Tq, 64]

Each layer is pre-norm: self-attention over the queries (key-padding mask ``query_mask``; ``causal=True`` adds a
causal mask, for decoders), cross-attention from the queries to the context (key-padding mask ``context_mask``),
then an MLP. Padding is never attended. A row whose context has no real token gets no cross-attention update
(its cross-attention output is zeroed) instead of attending over padding. Used by the VQA head (question ->
image/video) and the caption decoder (causal words -> image/video).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mlmm.models.layers import MLP, sdpa


class MultiHeadAttention(nn.Module):
    """q from ``x`` [B, Tq, D]; k, v from ``kv`` [B, Tk, D]; ``keep`` Bool broadcastable to [B, H, Tq, Tk]."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"heads={heads} does not divide width={width}")
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.kv_proj = nn.Linear(width, 2 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
        B, Tq, D = x.shape
        Tk, H = kv.shape[1], self.heads
        q = self.q_proj(x).view(B, Tq, H, D // H).transpose(1, 2)  # [B, H, Tq, d]
        k, v = self.kv_proj(kv).view(B, Tk, 2, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, Tk, d]
        out = sdpa(q, k, v, keep)  # [B, H, Tq, d]
        return self.out_proj(out.transpose(1, 2).reshape(B, Tq, D))


class FusionLayer(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.ln_self = nn.LayerNorm(width)
        self.self_attn = MultiHeadAttention(width, heads)
        self.ln_q, self.ln_ctx = nn.LayerNorm(width), nn.LayerNorm(width)
        self.cross_attn = MultiHeadAttention(width, heads)
        self.ln_mlp = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, self_keep: Optional[torch.Tensor],
                ctx_keep: Optional[torch.Tensor], ctx_rows: Optional[torch.Tensor]) -> torch.Tensor:
        h = self.ln_self(x)
        x = x + self.self_attn(h, h, self_keep)
        cross = self.cross_attn(self.ln_q(x), self.ln_ctx(ctx), ctx_keep)
        if ctx_rows is not None:  # rows without any context token: no update
            cross = cross * ctx_rows.to(cross.dtype)[:, None, None]
        x = x + cross
        return x + self.mlp(self.ln_mlp(x))


class CrossAttentionFusion(nn.Module):
    """``layers`` fusion layers of width ``width``; inputs are projected from ``query_dim`` / ``context_dim``."""

    def __init__(self, width: int, layers: int, heads: int, *, query_dim: Optional[int] = None,
                 context_dim: Optional[int] = None, mlp_ratio: float = 4.0, causal: bool = False):
        super().__init__()
        self.width, self.causal = width, causal
        self.query_in = nn.Linear(query_dim, width) if query_dim and query_dim != width else nn.Identity()
        self.context_in = nn.Linear(context_dim, width) if context_dim and context_dim != width else nn.Identity()
        self.layers = nn.ModuleList([FusionLayer(width, heads, mlp_ratio) for _ in range(layers)])
        self.ln_out = nn.LayerNorm(width)

    def forward(self, query: torch.Tensor, context: torch.Tensor, query_mask: Optional[torch.Tensor] = None,
                context_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """query [B, Tq, Dq], context [B, Tk, Dc], masks Bool [B, T] (True = real token) -> [B, Tq, width]."""
        B, Tq = query.shape[:2]
        x, ctx = self.query_in(query), self.context_in(context)
        self_keep = None
        if query_mask is not None:
            qm = query_mask.bool()
            qm = qm | ~qm.any(1, keepdim=True)  # an all-padding row attends everywhere (its output is unused)
            self_keep = qm[:, None, None, :]  # [B, 1, 1, Tq]
        if self.causal:
            tri = torch.ones(Tq, Tq, dtype=torch.bool, device=query.device).tril()[None, None]  # [1, 1, Tq, Tq]
            self_keep = tri if self_keep is None else (self_keep & tri) | torch.eye(Tq, dtype=torch.bool,
                                                                                    device=query.device)
        ctx_keep = ctx_rows = None
        if context_mask is not None:
            cm = context_mask.bool()
            ctx_rows = cm.any(1)  # [B]
            ctx_keep = (cm | ~ctx_rows[:, None])[:, None, None, :]  # [B, 1, 1, Tk]
        for layer in self.layers:
            x = layer(x, ctx, self_keep, ctx_keep, ctx_rows)
        return self.ln_out(x)
