"""DI-vTR dual inter-modal interaction: score a (media, text) pair from their token sequences.

Two cross-attention branches (the media is a video — frame tokens — or an audio clip — patch tokens):

* **text-conditioned media** (``t2m``): every word token attends over the media tokens;
* **media-conditioned text** (``m2t``): every media token attends over the word tokens.

In each branch a query token is compared with what it attended to: its per-token score is the cosine
between the (projected) query token and its attended context from the last cross-attention layer,
and the branch score is a weighted mean of the per-token scores over the real query tokens (weights:
a learned softmax over the tokens, so that function words can count less). Attention decides *where*
to look (a word of the second clause looks at the late frames), the cosine *whether* it matches.
Media tokens get a learned position embedding in the head (``media_positions``: the video's frame
index), so temporal order reaches the cross-attention explicitly, not only through the tower.

The interaction score ``exp(interaction_scale) * 0.5 * (t2m + m2t)`` is *combined* with the global
(contrastive, cosine) similarity as ``exp(global_scale) * cos + interaction``: the same combined
score is trained on hard negatives (:func:`hard_negatives`, top-k by global similarity) and used to
re-rank the global top-k at retrieval time (:mod:`mlmm.evaluation.rerank`).

Padding is never attended: keys are masked in every cross-attention, and padded queries get zero
weight, so the scores do not depend on what padding positions hold.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mlmm.models.layers import MLP, sdpa


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """logits [P, T], mask Bool[P, T] -> weights [P, T] summing to 1 over the True positions (0 elsewhere;
    all 0 for a row without any)."""
    w = torch.softmax(logits.float().masked_fill(~mask, float("-inf")), dim=1)
    return torch.nan_to_num(w, nan=0.0).to(logits.dtype)


class CrossAttentionBlock(nn.Module):
    """Pre-norm block: queries x [P, Tq, D] attend over ctx [P, Tk, D] (ctx_mask True = real key), then an MLP.

    A row whose context has no real key gets no attention update (its attention output is zeroed),
    rather than attending over padding.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 2.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"heads={heads} does not divide width={width}")
        self.heads = heads
        self.ln_q, self.ln_kv = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q_proj = nn.Linear(width, width)
        self.kv_proj = nn.Linear(width, 2 * width)
        self.out_proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio))

    def attend(self, x: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor) -> torch.Tensor:
        """The attended context of every query: [P, Tq, D] (zeros for a row without any real key)."""
        P, Tq, D = x.shape
        Tk, H = ctx.shape[1], self.heads
        q = self.q_proj(self.ln_q(x)).view(P, Tq, H, D // H).transpose(1, 2)  # [P, H, Tq, d]
        k, v = self.kv_proj(self.ln_kv(ctx)).view(P, Tk, 2, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)  # [P, H, Tk, d]
        keep = ctx_mask.bool()
        has_key = keep.any(dim=1)  # [P]
        keep = keep | ~has_key[:, None]  # avoid an all -inf softmax (NaN); the update is zeroed below
        a = sdpa(q, k, v, keep[:, None, None, :])  # [P, H, Tq, d]
        return self.out_proj(a.transpose(1, 2).reshape(P, Tq, D)) * has_key[:, None, None].to(x.dtype)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor,
                return_attended: bool = False):
        """-> updated queries [P, Tq, D] (and, with ``return_attended``, the attended context [P, Tq, D])."""
        a = self.attend(x, ctx, ctx_mask)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return (x, a) if return_attended else x


class InteractionBranch(nn.Module):
    """Queries [P, Tq, W] (mask Bool[P, Tq]) attend over a context [P, Tk, W] -> pair score [P] in [-1, 1]."""

    def __init__(self, width: int, heads: int, layers: int):
        super().__init__()
        if layers < 1:
            raise ValueError(f"an interaction branch needs at least one layer, got {layers}")
        self.blocks = nn.ModuleList([CrossAttentionBlock(width, heads) for _ in range(layers)])
        self.query_out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width))  # what the token says
        self.found_out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width))  # what it found
        self.weight = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 1))  # how much the token counts

    def forward(self, q: torch.Tensor, q_mask: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor
                ) -> torch.Tensor:
        x, found = q, q
        for block in self.blocks:
            x, found = block(x, ctx, ctx_mask, return_attended=True)  # found: last layer's attended context
        s = F.cosine_similarity(self.query_out(q), self.found_out(found), dim=-1)  # [P, Tq]
        w = masked_softmax(self.weight(x).squeeze(-1), q_mask)  # [P, Tq], 0 on padding
        return (w * s).sum(1)  # [P]


class DualInteraction(nn.Module):
    """Pairwise interaction score of aligned (media, text) token sequences.

    ``forward(m_tok [P, Tm, Dm], m_mask Bool[P, Tm], t_tok [P, Tt, Dt], t_mask Bool[P, Tt])`` ->
    ``{"t2m": [P], "m2t": [P], "interaction": [P]}`` (branch scores already scaled; interaction = their mean);
    ``combine(global_sim [P], interaction [P])`` -> [P]. ``media_positions`` > 0: a learned embedding per media
    token position (at most that many media tokens).
    """

    def __init__(self, media_width: int, text_width: int, width: int = 64, heads: int = 2, layers: int = 1,
                 init_global_scale: float = 10.0, media_positions: int = 0,
                 init_interaction_scale: float = 10.0):
        super().__init__()
        self.media_in = nn.Linear(media_width, width)
        self.text_in = nn.Linear(text_width, width)
        self.media_pos = nn.Parameter(0.02 * torch.randn(media_positions, width)) if media_positions > 0 else None
        self.t2m = InteractionBranch(width, heads, layers)  # (a) words attend over media tokens
        self.m2t = InteractionBranch(width, heads, layers)  # (b) media tokens attend over words
        # shape [1] (DeepSpeed cannot broadcast 0-dim parameters)
        self.global_scale = nn.Parameter(torch.full((1,), math.log(init_global_scale)))
        self.interaction_scale = nn.Parameter(torch.full((1,), math.log(init_interaction_scale)))

    def forward(self, m_tok: torch.Tensor, m_mask: torch.Tensor, t_tok: torch.Tensor, t_mask: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        m_mask, t_mask = m_mask.bool(), t_mask.bool()
        m = self.media_in(m_tok)  # [P, Tm, W]
        if self.media_pos is not None:
            if m.shape[1] > self.media_pos.shape[0]:
                raise ValueError(f"{m.shape[1]} media tokens but the interaction head has "
                                 f"{self.media_pos.shape[0]} media positions")
            m = m + self.media_pos[: m.shape[1]].to(m.dtype)
        t = self.text_in(t_tok)  # [P, Tt, W]
        scale = self.interaction_scale.exp().squeeze(0)
        s_t2m = scale * self.t2m(t, t_mask, m, m_mask)  # [P]
        s_m2t = scale * self.m2t(m, m_mask, t, t_mask)  # [P]
        return {"t2m": s_t2m, "m2t": s_m2t, "interaction": 0.5 * (s_t2m + s_m2t)}

    def combine(self, global_sim: torch.Tensor, interaction: torch.Tensor) -> torch.Tensor:
        return self.global_scale.exp().squeeze(0) * global_sim + interaction

    def score_pairs(self, m_tok: torch.Tensor, m_mask: torch.Tensor, t_tok: torch.Tensor, t_mask: torch.Tensor,
                    m_idx: torch.Tensor, t_idx: torch.Tensor, global_sim: Optional[torch.Tensor] = None,
                    chunk_size: int = 512) -> torch.Tensor:
        """Combined (or, without ``global_sim``, interaction) score of pairs (m_idx[p], t_idx[p]): [P].

        m_tok [N, Tm, Dm] / t_tok [M, Tt, Dt] are whole galleries; pairs are scored ``chunk_size`` at a time.
        """
        out = []
        for s in range(0, m_idx.numel(), chunk_size):
            mi, ti = m_idx[s:s + chunk_size], t_idx[s:s + chunk_size]
            r = self(m_tok[mi], m_mask[mi], t_tok[ti], t_mask[ti])["interaction"]
            if global_sim is not None:
                r = self.combine(global_sim[s:s + chunk_size].to(r.dtype), r)
            out.append(r)
        return torch.cat(out) if out else m_tok.new_zeros(0)


def hard_negatives(sim: torch.Tensor, k: int, exclude: Optional[torch.Tensor] = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most similar non-positive candidates of each query.

    sim [N, N]: sim[i, j] = similarity of query i and candidate j; the positive of query i is
    candidate i (the diagonal). exclude Bool[N, N]: candidates that must not be negatives (same
    sample in another language, identical caption). Returns (Long[N, k'] candidate indices, most
    similar first; Bool[N, k'] valid) with k' = min(k, N - 1); a slot is invalid when the query
    has fewer than k' allowed candidates.
    """
    n = sim.shape[0]
    k = min(int(k), n - 1)
    if k <= 0:
        return sim.new_zeros((n, 0), dtype=torch.long), torch.zeros((n, 0), dtype=torch.bool, device=sim.device)
    banned = torch.eye(n, dtype=torch.bool, device=sim.device)
    if exclude is not None:
        banned = banned | exclude.bool()
    s = sim.detach().float().masked_fill(banned, float("-inf"))
    vals, idx = s.topk(k, dim=1)  # [N, k]
    return idx, torch.isfinite(vals)


class Candidates(NamedTuple):
    """Each text's positive + k hardest media and each media's positive + k hardest texts, as (media, text) pairs.

    ``m_idx`` / ``t_idx`` Long[2 n (1+k)]: the t2m block (text query i: media i, then its negatives) followed by the
    m2t block (media query j: text j, then its negatives); ``valid`` Bool[2 n, 1+k] (column 0, the positive, always
    True); ``neg_t2m`` / ``neg_m2t`` Long[n, k] the negatives' indices.
    """

    m_idx: torch.Tensor
    t_idx: torch.Tensor
    valid: torch.Tensor
    neg_t2m: torch.Tensor
    neg_m2t: torch.Tensor

    def split(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pair scores [2 n (1+k)] in this order -> (t2m [n, 1+k], m2t [n, 1+k]) with ``-inf`` on invalid slots."""
        n, width = self.neg_t2m.shape[0], self.valid.shape[1]
        s = scores.view(2 * n, width).masked_fill(~self.valid, float("-inf"))
        return s[:n], s[n:]


def candidate_pairs(sim: torch.Tensor, k: int, exclude: Optional[torch.Tensor] = None) -> Candidates:
    """sim [n, n]: text i vs media j (positives on the diagonal); exclude Bool[n, n], same orientation
    (True: media j is never a negative of text i). -> :class:`Candidates` (hard negatives by ``sim``)."""
    ex = exclude if exclude is not None else torch.zeros(sim.shape, dtype=torch.bool, device=sim.device)
    neg_t2m, ok_t2m = hard_negatives(sim, k, ex)  # [n, k] media candidates of each text
    neg_m2t, ok_m2t = hard_negatives(sim.t(), k, ex.t())  # [n, k] text candidates of each media
    n, k = sim.shape[0], neg_t2m.shape[1]
    ar = torch.arange(n, device=sim.device)
    ones = torch.ones((n, 1), dtype=torch.bool, device=sim.device)
    m_idx = torch.cat([torch.cat([ar[:, None], neg_t2m], 1).flatten(), ar.repeat_interleave(1 + k)])
    t_idx = torch.cat([ar.repeat_interleave(1 + k), torch.cat([ar[:, None], neg_m2t], 1).flatten()])
    valid = torch.cat([torch.cat([ones, ok_t2m], 1), torch.cat([ones, ok_m2t], 1)])  # [2n, 1+k]
    return Candidates(m_idx, t_idx, valid, neg_t2m, neg_m2t)
