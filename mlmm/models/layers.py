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

# Measured on a 2-core Zen 4 CPU (AVX512-bf16), fwd + bwd, 64-dim heads, 16 x 8-12 heads: PyTorch's CPU kernels for
# bf16 are slow at short lengths (flash: T=50 13.0 ms, T=77 15.5 ms; math, which upcasts q, k, v and runs every matmul
# in fp32: 6.0 / 8.7 ms). `_BF16Attention` below takes 2.7 / 3.1 ms and stays ahead of flash up to ~128 tokens
# (T=128: 8.1 ms against math 17.1, flash 23.9); beyond, flash wins (T=256: flash 46, this 66, math 94 ms). fp32
# and CUDA keep PyTorch's own choice.
CPU_SHORT_MAX_TOKENS = 128


class _BF16Attention(torch.autograd.Function):
    """Attention for bf16 q [..., Tq, d], k / v [..., Tk, d] on CPU -> [..., Tq, d] bf16, with the numerics of a
    flash kernel: logits and softmax in fp32 (q and k upcast, one fp32 matmul), the probabilities rounded to bf16 for
    a bf16 matmul with v (fp32 accumulation); backward: bf16 matmuls with fp32 accumulation, the softmax gradient in
    fp32. ``keep`` Bool broadcastable to [..., Tq, Tk] (True = may attend) or None; a query row that may attend
    nothing gives 0 and passes no gradient, as PyTorch's math kernel does.

    Against an fp64 reference on fp32 inputs its output and gradient errors are 1.07-1.18x those of PyTorch's math
    kernel (0.99-1.01x with peaked attention; tested), at 2.2-2.7x its speed. Eager bf16 attention (logits rounded to
    bf16 too, as ``softmax(q @ k.T)`` in bf16) ran 1.0-1.4x faster than this but had 1.45-1.65x the math kernel's
    error (1.6x with peaked attention), so it is not used."""

    @staticmethod
    def forward(ctx, q, k, v, keep):
        with torch.autocast("cpu", enabled=False):
            scale = q.shape[-1] ** -0.5
            q32 = q.to(torch.float32, memory_format=torch.contiguous_format).mul_(scale)  # [..., Tq, d]
            k32 = k.to(torch.float32, memory_format=torch.contiguous_format)  # [..., Tk, d]
            s = torch.matmul(q32, k32.transpose(-2, -1))  # fp32 logits [..., Tq, Tk]
            dead = None
            if keep is not None:
                alive = keep.any(-1, keepdim=True)  # [..., Tq, 1]: rows that may attend something
                if not bool(alive.all()):  # CPU: a cheap host read
                    dead = ~alive
                    keep = keep | dead  # an all -inf row would give NaN; its output is zeroed below
                s.masked_fill_(~keep, float("-inf"))
            p = torch.softmax(s, -1)  # fp32
            if dead is not None:
                p.masked_fill_(dead, 0.0)  # output 0, no gradient through the row
            p_low = p.to(q.dtype)
            ctx.save_for_backward(q, k, v, p, p_low)
            ctx.scale = scale
            return torch.matmul(p_low, v)  # [..., Tq, d]

    @staticmethod
    def backward(ctx, grad):
        q, k, v, p, p_low = ctx.saved_tensors
        with torch.autocast("cpu", enabled=False):
            grad_v = torch.matmul(p_low.transpose(-2, -1), grad)  # [..., Tk, d]
            grad_p = torch.matmul(grad, v.transpose(-2, -1))  # [..., Tq, Tk]
            grad_s = torch._softmax_backward_data(grad_p.float(), p, -1, torch.float32).mul_(ctx.scale).to(q.dtype)
            return torch.matmul(grad_s, k), torch.matmul(grad_s.transpose(-2, -1), q), grad_v, None


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` (q [..., Tq, d], k / v [..., Tk, d] -> [..., Tq, d]; a bool ``attn_mask``
    is True where a query may attend). On CPU, up to ``CPU_SHORT_MAX_TOKENS``: bf16 takes :class:`_BF16Attention`
    (2.2-2.7x PyTorch's fastest kernel there), fp16 PyTorch's math kernel (fp32 inside: no fp16 overflow of
    loss-scaled gradients); everything else keeps PyTorch's choice."""
    if q.device.type == "cpu" and max(q.shape[-2], k.shape[-2]) <= CPU_SHORT_MAX_TOKENS:
        if (q.dtype == k.dtype == v.dtype == torch.bfloat16 and q.shape[:-2] == k.shape[:-2] == v.shape[:-2]
                and (attn_mask is None or attn_mask.dtype == torch.bool)):
            return _BF16Attention.apply(q, k, v, attn_mask)
        if q.dtype in (torch.bfloat16, torch.float16):
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
