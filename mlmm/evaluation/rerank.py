"""Re-rank the global top-k with an interaction head (DI-vTR); only the order inside the top-k changes.

    new_scores = rerank_topk(global_scores, k, pair_scorer)                      # generic, [Q, G] in memory
    ranks = rerank_ranks(query_emb, gallery_emb, positives, k, pair_scorer)       # chunked, never [Q, G]
    metrics = rerank_retrieval(model, head, "video", video, texts, positives, k=10)   # t2v / v2t with the head

``rerank_topk`` keeps every query's global top-k set and every score outside it; the top-k items
are moved above all others in the order of ``pair_scorer`` (the head's combined score
``exp(global_scale) * cos + interaction``). Ranks then follow the metrics module's rule
(``1 + #items scoring strictly above the best positive``), so a positive outside the global top-k
keeps its rank and R@k for the re-ranking depth k is unchanged by construction.

Cost: the pair scorer only ever sees the Q·k top-k pairs, ``chunk_size`` queries (``chunk_size · k``
pairs) per call; :func:`rerank_ranks` computes the global scores ``chunk_size`` queries at a time too,
so memory is O(chunk_size · G) for the global scores plus O(chunk_size · k) pairs for the head,
independent of Q.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from mlmm.evaluation.retrieval import _check_ks, _metrics_from_ranks

PairScorer = Callable[[Tensor, Tensor, Tensor], Tensor]  # (q_idx Long[P], g_idx Long[P], global Float[P]) -> [P]


def _check_chunk(chunk_size: int) -> int:
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return int(chunk_size)


def rerank_topk(scores: Tensor, k: int, pair_scorer: PairScorer, chunk_size: int = 1024) -> Tensor:
    """scores [Q, G] -> re-ranked scores [Q, G].

    ``pair_scorer(q_idx Long[P], g_idx Long[P], global Float[P]) -> Float[P]`` scores the top-k pairs
    (q_idx indexes the rows of ``scores``), ``chunk_size`` queries per call. For each query the top-k entries
    become ``max(scores[q]) + 1 + (s - min_topk(s))`` (above every other entry, ordered by the new score);
    the others are untouched.
    """
    scores = scores.float()
    Q, G = scores.shape
    k, chunk_size = min(int(k), G), _check_chunk(chunk_size)
    out = scores.clone()
    if k <= 0 or Q == 0:
        return out
    for s in range(0, Q, chunk_size):
        block = scores[s:s + chunk_size]  # [C, G]
        C = block.shape[0]
        top = block.topk(k, dim=1).indices  # [C, k]
        rows = torch.arange(C).repeat_interleave(k)  # [C*k]
        g_idx = top.flatten()  # [C*k]
        new = pair_scorer(rows + s, g_idx, block[rows, g_idx]).float().view(C, k)  # [C, k]
        base = block.max(dim=1, keepdim=True).values + 1.0  # [C, 1]
        out[s:s + C].scatter_(1, top, base + (new - new.min(dim=1, keepdim=True).values))
    return out


def ranks_from_scores(scores: Tensor, positives: Tensor) -> Tensor:
    """scores [Q, G], positives Bool[Q, G] -> Long[Q]: 1 + #(scores strictly above the best positive)."""
    if not bool(positives.any(1).all()):
        raise ValueError("every query needs at least one positive")
    best = scores.masked_fill(~positives, float("-inf")).max(dim=1, keepdim=True).values  # [Q, 1]
    return 1 + (scores > best).sum(1)


def rerank_ranks(query_emb: Tensor, gallery_emb: Tensor, positives: Tensor, k: int, pair_scorer: PairScorer,
                 chunk_size: int = 256) -> Tensor:
    """Ranks Long[Q] of each query's best positive after re-ranking its global top-k, chunk by chunk.

    query_emb [Q, E], gallery_emb [G, E] (L2-normalised: global score = dot product), positives Bool[Q, G].
    Equal to ``ranks_from_scores(rerank_topk(query_emb @ gallery_emb.T, k, pair_scorer), positives)``, but
    only ``chunk_size`` rows of global scores exist at a time and the scorer sees ``chunk_size · k`` pairs per call.
    """
    if query_emb.shape[0] != positives.shape[0] or gallery_emb.shape[0] != positives.shape[1]:
        raise ValueError(f"positives {tuple(positives.shape)} do not match {query_emb.shape[0]} queries x "
                         f"{gallery_emb.shape[0]} gallery items")
    chunk_size = _check_chunk(chunk_size)
    ranks = []
    for s in range(0, query_emb.shape[0], chunk_size):
        block = query_emb[s:s + chunk_size].float() @ gallery_emb.float().t()  # [C, G]

        def shifted(q: Tensor, g: Tensor, glob: Tensor, offset: int = s) -> Tensor:  # chunk row -> query index
            return pair_scorer(q + offset, g, glob)

        new = rerank_topk(block, k, shifted, chunk_size=block.shape[0])  # [C, G]
        ranks.append(ranks_from_scores(new, positives[s:s + chunk_size].bool()))
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def find_interaction_head(model, media: str):
    """The first head of ``model`` with a DualInteraction for ``media`` (``None`` when there is none)."""
    for head in getattr(model, "heads", {}).values():
        if getattr(head, "media", None) == media and hasattr(head, "interaction"):
            return head
    return None


@torch.no_grad()
def media_tokens(model, media: str, data: Tensor, batch_size: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """[N, ...] inputs -> (emb [N, E], tokens [N, T, D], token mask Bool[N, T]) on CPU."""
    dtype = next(model.parameters()).dtype
    embs, toks, masks = [], [], []
    for i in range(0, len(data), batch_size):
        z, t, m = model.encode_tokens(media, data[i:i + batch_size].to(device, dtype))
        embs.append(z.float().cpu()), toks.append(t.float().cpu()), masks.append(m.cpu())
    return torch.cat(embs), torch.cat(toks), torch.cat(masks)


@torch.no_grad()
def text_tokens(model, texts: Sequence[str], batch_size: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """Strings -> (emb [M, E], tokens [M, L, D], mask Bool[M, L]) on CPU, padded to the model's max_length."""
    embs, toks, masks = [], [], []
    for i in range(0, len(texts), batch_size):
        tok = model.tokenizer(list(texts[i:i + batch_size]), padding="max_length", truncation=True,
                              max_length=model.cfg.text.max_length, return_tensors="pt")
        z, t, m = model.encode_tokens("text", tok["input_ids"].to(device), tok["attention_mask"].to(device))
        embs.append(z.float().cpu()), toks.append(t.float().cpu()), masks.append(m.cpu())
    return torch.cat(embs), torch.cat(toks), torch.cat(masks)


@torch.no_grad()
def rerank_retrieval(model, head, media: str, media_data: Tensor, texts: Sequence[str], positives: Tensor, *,
                     k: int, ks: Sequence[int] = (1, 5, 10), batch_size: int = 64, device="cpu",
                     x_short: Optional[str] = None, chunk_size: int = 256) -> dict[str, float]:
    """t2x and x2t metrics after re-ranking each query's global top-k with ``head`` (positives Bool[M texts, N]).

    Token sequences of every item and text are kept (O((N + M) · T)); scores are computed ``chunk_size``
    queries at a time (:func:`rerank_ranks`), so only the Q·k top-k pairs reach the interaction head.
    """
    ks = _check_ks(ks)
    x = x_short or media[0]
    z_m, m_tok, m_mask = media_tokens(model, media, media_data, batch_size, device)  # [N, E], [N, Tm, Dm]
    z_t, t_tok, t_mask = text_tokens(model, texts, batch_size, device)  # [M, E], [M, Tt, Dt]
    inter = head.interaction
    dev = next(inter.parameters()).device
    m_tok, m_mask, t_tok, t_mask = m_tok.to(dev), m_mask.to(dev), t_tok.to(dev), t_mask.to(dev)

    def scorer(pair_of: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]) -> PairScorer:
        def score(q: Tensor, g: Tensor, glob: Tensor) -> Tensor:
            mi, ti = pair_of(q, g)  # media index, text index of each pair
            return inter.score_pairs(m_tok, m_mask, t_tok, t_mask, mi.to(dev), ti.to(dev),
                                     global_sim=glob.to(dev)).float().cpu()
        return score

    items = torch.nonzero(positives.any(0)).flatten()  # media with at least one text
    t2x = rerank_ranks(z_t, z_m, positives, k, scorer(lambda q, g: (g, q)), chunk_size)  # query = text
    x2t = rerank_ranks(z_m[items], z_t, positives.t()[items], k, scorer(lambda q, g: (items[q], g)), chunk_size)
    out: dict[str, float] = {}
    for prefix, ranks in ((f"t2{x}", t2x), (f"{x}2t", x2t)):
        out.update({f"{prefix}_{key}": v for key, v in _metrics_from_ranks(ranks, ks).items()})
    for kk in ks:
        out[f"mean_R@{kk}"] = (out[f"t2{x}_R@{kk}"] + out[f"{x}2t_R@{kk}"]) / 2
    out["rsum"] = sum(out[f"t2{x}_R@{kk}"] + out[f"{x}2t_R@{kk}"] for kk in ks)
    out["rerank_topk"] = float(k)
    return out
