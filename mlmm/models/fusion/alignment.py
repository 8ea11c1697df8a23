"""Token-level alignment scores between media tokens (image patches / frames) and words, for P paired sequences.

    s = maxsim_alignment(v, v_mask, w, w_mask)                      # [P]: each word to its best patch and back
    s = attention_alignment(v, v_mask, w, w_mask, lam=10.0)         # [P]: SCAN-style attended context, both ways
    S = pairwise(maxsim_alignment, v, v_mask, w, w_mask)            # [Bv, Bw]: every media x every text

Inputs are L2-normalised token features in a shared space: ``v`` [P, N, d] with ``v_mask`` Bool[P, N] and ``w``
[P, L, d] with ``w_mask`` Bool[P, L] (True = real token). Padding never contributes: it is masked out of every max,
softmax and mean. A pair where either side has no real token scores 0.

* :func:`maxsim_alignment` (VSE alignment module; FILIP / ColBERT late interaction):
  ``0.5 * (mean_l max_n <w_l, v_n> + mean_n max_l <v_n, w_l>)``.
* :func:`attention_alignment` (ASCL local fusion; SCAN, Lee et al. 2018, both directions): each word attends over
  the patches with ``softmax_n(lam * <w_l, v_n>)``; its relevance is the cosine between the word and its attended
  visual context; the text-to-image score is the mean relevance over words, and symmetrically image-to-text.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

NEG = -1e4  # masked logit (finite: keeps gradients NaN-free)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x [P, T], mask Bool[P, T] -> [P] (0 for a row without any True)."""
    m = mask.to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


def maxsim_alignment(v: torch.Tensor, v_mask: torch.Tensor, w: torch.Tensor, w_mask: torch.Tensor,
                     direction: str = "both") -> torch.Tensor:
    """-> [P]: 0.5 * (mean over words of the best patch similarity + mean over patches of the best word).

    ``direction``: ``both`` (default), ``t2m`` (words to patches only: right when a caption describes part of the
    image) or ``m2t`` (patches to words only).
    """
    sim = w @ v.transpose(1, 2)  # [P, L, N]
    both = w_mask[:, :, None] & v_mask[:, None, :]  # [P, L, N]
    sim = sim.masked_fill(~both, NEG)
    t2v = _masked_mean(sim.max(dim=2).values, w_mask & v_mask.any(1, keepdim=True))  # [P]
    if direction == "t2m":
        return t2v
    v2t = _masked_mean(sim.max(dim=1).values, v_mask & w_mask.any(1, keepdim=True))  # [P]
    return v2t if direction == "m2t" else 0.5 * (t2v + v2t)


def attention_alignment(v: torch.Tensor, v_mask: torch.Tensor, w: torch.Tensor, w_mask: torch.Tensor,
                        lam: torch.Tensor | float = 10.0) -> torch.Tensor:
    """-> [P]: 0.5 * (mean_l cos(w_l, attended patches) + mean_n cos(v_n, attended words))."""
    sim = w @ v.transpose(1, 2)  # [P, L, N]
    both = w_mask[:, :, None] & v_mask[:, None, :]  # [P, L, N]
    logits = (lam * sim).masked_fill(~both, NEG)
    ctx_v = torch.softmax(logits, dim=2) @ v  # [P, L, d]: visual context of each word
    ctx_w = torch.softmax(logits, dim=1).transpose(1, 2) @ w  # [P, N, d]: textual context of each patch
    rel_t = F.cosine_similarity(w, ctx_v, dim=-1)  # [P, L]
    rel_v = F.cosine_similarity(v, ctx_w, dim=-1)  # [P, N]
    t2v = _masked_mean(rel_t, w_mask & v_mask.any(1, keepdim=True))
    v2t = _masked_mean(rel_v, v_mask & w_mask.any(1, keepdim=True))
    return 0.5 * (t2v + v2t)


def gather_pairs(fn: Callable[..., torch.Tensor], v: torch.Tensor, v_mask: torch.Tensor, w: torch.Tensor,
                 w_mask: torch.Tensor, v_idx: torch.Tensor, w_idx: torch.Tensor, chunk: int = 4096,
                 **kwargs) -> torch.Tensor:
    """Score the pairs (v[v_idx[p]], w[w_idx[p]]) with ``fn`` in chunks of ``chunk`` pairs -> [P]."""
    out = []
    for s in range(0, v_idx.numel(), chunk):
        vi, wi = v_idx[s:s + chunk], w_idx[s:s + chunk]
        out.append(fn(v[vi], v_mask[vi], w[wi], w_mask[wi], **kwargs))
    return torch.cat(out) if out else v.new_zeros(0)


def pairwise(fn: Callable[..., torch.Tensor], v: torch.Tensor, v_mask: torch.Tensor, w: torch.Tensor,
             w_mask: torch.Tensor, chunk: int = 4096, **kwargs) -> torch.Tensor:
    """Every media row x every text row: v [Bv, N, d], w [Bw, L, d] -> [Bv, Bw]."""
    Bv, Bw = v.shape[0], w.shape[0]
    vi = torch.arange(Bv, device=v.device).repeat_interleave(Bw)  # [Bv*Bw]
    wi = torch.arange(Bw, device=v.device).repeat(Bv)  # [Bv*Bw]
    return gather_pairs(fn, v, v_mask, w, w_mask, vi, wi, chunk, **kwargs).view(Bv, Bw)


def media_tokens(tokens: torch.Tensor, mask: torch.Tensor, skip_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the CLS token of a ViT (token 0) when ``skip_first``: [B, 1+N, D] -> [B, N, D] (and the mask)."""
    return (tokens[:, 1:], mask[:, 1:]) if skip_first else (tokens, mask)


def trim_padding(tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the trailing positions that are padding in every row: [B, T, D] -> [B, T', D] (exact: padding never
    contributes to the scores; saves work when captions are much shorter than max_length)."""
    keep = torch.nonzero(mask.bool().any(0))
    t = int(keep.max()) + 1 if keep.numel() else 1
    return tokens[:, :t], mask[:, :t]


def project(x: torch.Tensor, proj: torch.nn.Module, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Project tokens into the shared space and L2-normalise: [B, T, D] -> [B, T, d] (padding zeroed)."""
    y = F.normalize(proj(x), dim=-1)
    return y if mask is None else y * mask[..., None].to(y.dtype)
