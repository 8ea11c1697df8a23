"""A compact pre-norm transformer shared by the vision, audio and video towers.

Parameter names mirror open_clip (``resblocks.{i}.ln_1 / attn.in_proj_weight / attn.out_proj /
ln_2 / mlp.c_fc / mlp.c_proj``) and ``nn.MultiheadAttention``, so open_clip weights load with a
prefix rename only. Attention is one fused qkv projection + ``F.scaled_dot_product_attention``.

Two exact work reductions (same outputs where they are read, less compute):

* **Packed padding.** With a key padding mask, every token-wise op (LayerNorms, qkv and output projections, MLP)
  runs on the N real tokens only, laid out as [N, D] rows (:class:`Packing`); only attention sees the padded
  [B, H, T, d] layout. Text padded to the batch's longest caption is about half padding on real captions.
* **First token only.** ``Transformer(x, first_token_only=True)`` runs the last block for token 0 alone (keys and
  values still come from every token): what a CLS-pooled tower reads, at ~10/12 less of that block's compute.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

# Measured on a 2-core Zen 4 CPU (AVX512-bf16), fwd + bwd, 64-dim heads: in bf16 the math kernel beats the CPU
# flash kernel up to ~128 tokens (T=50: 9.5 vs 16.1 ms, T=77: 12.0 vs 29.9 ms) and loses beyond (T=256: 121 vs 73);
# in fp32 the two are close at short lengths and flash wins with masks, so fp32 keeps the default choice.
CPU_MATH_MAX_TOKENS = 128


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` (q [..., Tq, d], k / v [..., Tk, d] -> [..., Tq, d]), with the math kernel
    for short bf16 / fp16 sequences on CPU, where PyTorch's default (flash) kernel is 1.7-2.5x slower. Both kernels
    accumulate in fp32 on CPU: same results to bf16 rounding (tested); CUDA keeps PyTorch's choice."""
    if (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
            and max(q.shape[-2], k.shape[-2]) <= CPU_MATH_MAX_TOKENS):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


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

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                packing: Optional["Packing"] = None, first_token_only: bool = False) -> torch.Tensor:
        """x [B, T, D] (or packed [N, D] with ``packing``); attn_mask bool, broadcastable to [B, H, T, T], True = may
        attend -> same shape as x, or [B, 1, D] with ``first_token_only`` (:meth:`forward_first`)."""
        if first_token_only:  # through __call__, so that module hooks (ZeRO-3 gathering) see it
            return self.forward_first(x, attn_mask)
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, T, 3D] / [N, 3D]
        if packing is not None:
            qkv = packing.unpack(qkv)  # [B, T, 3D], zeros at padding (never attended)
        B, T, D3 = qkv.shape
        D = D3 // 3
        q, k, v = qkv.view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, T, d]
        x = sdpa(q, k, v, attn_mask)  # [B, H, T, d]
        x = x.transpose(1, 2).reshape(B, T, D)  # [B, T, D]
        return self.out_proj(x if packing is None else packing.pack(x))

    def forward_first(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, T, D] -> [B, 1, D]: the output at token 0 only (its query against every key)."""
        B, T, D = x.shape
        H = self.heads
        q = F.linear(x[:, :1], self.in_proj_weight[:D], self.in_proj_bias[:D])  # [B, 1, D]
        kv = F.linear(x, self.in_proj_weight[D:], self.in_proj_bias[D:])  # [B, T, 2D]
        k, v = kv.view(B, T, 2, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)  # 2 x [B, H, T, d]
        o = sdpa(q.view(B, 1, H, D // H).transpose(1, 2), k, v, attn_mask)
        return self.out_proj(o.transpose(1, 2).reshape(B, 1, D))  # [B, H, 1, d] -> [B, 1, D]


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

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                packing: Optional["Packing"] = None, first_token_only: bool = False) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D], or [B, 1, D] = the output at token 0 only with ``first_token_only``."""
        if first_token_only:
            x = x[:, :1] + self.attn(self.ln_1(x), attn_mask, first_token_only=True)
        else:
            x = x + self.attn(self.ln_1(x), attn_mask, packing)
        return x + self.mlp(self.ln_2(x))

    def forward_first(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, T, D] -> [B, 1, D]: this block's output at token 0 (= ``forward(x)[:, :1]``)."""
        return self(x, attn_mask, first_token_only=True)


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


class Packing:
    """The real tokens of a padded batch as rows: ``pack`` [B, T, C] -> [N, C], ``unpack`` [N, C] -> [B, T, C].

    ``key_padding_mask`` Bool[B, T] (True = real token). ``unpack`` puts zeros at the padding.
    """

    def __init__(self, key_padding_mask: torch.Tensor):
        keep = key_padding_mask.bool()
        self.batch, self.length = keep.shape
        self.index = keep.flatten().nonzero().squeeze(1)  # Long[N]: flat positions of the real tokens

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(0, 1).index_select(0, self.index)  # [B, T, C] -> [N, C]

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros((self.batch * self.length, x.shape[-1]))
        return out.index_copy(0, self.index, x).view(self.batch, self.length, x.shape[-1])  # [N, C] -> [B, T, C]


class Transformer(nn.Module):
    """``layers`` pre-norm blocks of width ``width``; no final LayerNorm (towers add their own).

    ``pack_padding`` (default on): with padding in ``key_padding_mask`` the blocks run on the real tokens only
    (:class:`Packing`); outputs at real tokens are unchanged, outputs at padding are 0.
    """

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, pack_padding: bool = True):
        super().__init__()
        self.width = width
        self.grad_checkpointing = False
        self.pack_padding = pack_padding
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers)])

    def _run(self, fn, *args) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None,
                first_token_only: bool = False) -> torch.Tensor:
        """x [B, T, D], key_padding_mask Bool[B, T] (True = real token) -> [B, T, D], or [B, 1, D] (token 0's output)
        with ``first_token_only``."""
        attn_mask = padding_to_attn_mask(key_padding_mask)
        blocks = list(self.resblocks)
        last = blocks.pop() if first_token_only and blocks else None
        packing = Packing(key_padding_mask) if attn_mask is not None and self.pack_padding and blocks else None
        if packing is not None:
            x = packing.pack(x)  # [N, D]
        for block in blocks:
            x = self._run(block, x, attn_mask, packing)
        if packing is not None:
            x = packing.unpack(x)  # [B, T, D]
        if last is not None:  # called as a module (not a bound method): ZeRO-3 gathers its partitions on the call
            return self._run(last, x, attn_mask, None, True)  # [B, 1, D]
        return x[:, :1] if first_token_only else x
