"""A compact pre-norm transformer shared by the vision, audio and video towers.

Parameter names mirror open_clip (``resblocks.{i}.ln_1 / attn.in_proj_weight / attn.out_proj /
ln_2 / mlp.c_fc / mlp.c_proj``) and ``nn.MultiheadAttention``, so open_clip weights load with a
prefix rename only. Attention is one fused qkv projection + ``F.scaled_dot_product_attention``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class Attention(nn.Module):
    """Multi-head self-attention; same parameters (and layout) as ``nn.MultiheadAttention``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"heads={heads} does not divide width={width}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))  # rows: q | k | v
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)  # as nn.MultiheadAttention._reset_parameters
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, T, D]; attn_mask bool, broadcastable to [B, H, T, T], True = may attend."""
        B, T, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, T, 3D]
        q, k, v = qkv.view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, T, d]
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, H, T, d]
        x = x.transpose(1, 2).reshape(B, T, D)  # [B, T, D]
        return self.out_proj(x)


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask)
        return x + self.mlp(self.ln_2(x))


def padding_to_attn_mask(key_padding_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Bool[B, T] (True = real token) -> Bool[B, 1, 1, T] for SDPA, or None when nothing is padded.

    Returning None keeps SDPA on its fused mask-free kernels. A row with no real token at all
    attends everywhere instead of nowhere (which would give NaN); its output is meaningless anyway.
    """
    if key_padding_mask is None:
        return None
    keep = key_padding_mask.bool()
    if bool(keep.all()):  # one host sync per forward, not per layer
        return None
    keep = keep | ~keep.any(dim=1, keepdim=True)
    return keep[:, None, None, :]  # [B, 1, 1, T]


class Transformer(nn.Module):
    """``layers`` pre-norm blocks of width ``width``; no final LayerNorm (towers add their own)."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.width = width
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers)])

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, T, D], key_padding_mask Bool[B, T] (True = real token) -> [B, T, D]."""
        attn_mask = padding_to_attn_mask(key_padding_mask)
        for block in self.resblocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, attn_mask, use_reentrant=False)
            else:
                x = block(x, attn_mask)
        return x
