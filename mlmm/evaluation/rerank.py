"""Re-rank the global top-k with an interaction head (DI-vTR); only the order inside the top-k changes.

    new_scores = rerank_topk(global_scores, k, pair_scorer)          # generic
    metrics = rerank_retrieval(model, head, "video", video, texts, positives, k=10)   # t2v / v2t with the head

``rerank_topk`` keeps every query's global top-k set and every score outside it; the top-k items
are moved above all others in the order of ``pair_scorer`` (the head's combined score
``exp(global_scale) * cos + interaction``). Ranks then follow the metrics module's rule
(``1 + #items scoring strictly above the best positive``), so a positive outside the global top-k
keeps its rank and R@k for the re-ranking depth k is unchanged by construction.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from mlmm.evaluation.retrieval import _metrics_from_ranks, _check_ks


def rerank_topk(scores: Tensor, k: int, pair_scorer: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Tensor:
    """scores [Q, G] -> re-ranked scores [Q, G].

    ``pair_scorer(q_idx Long[P], g_idx Long[P], global Float[P]) -> Float[P]`` scores the top-k pairs.
    For each query the top-k entries become ``max(scores[q]) + 1 + (s - min_topk(s))`` (above every
    other entry, ordered by the new score); the others are untouched.
    """
    scores = scores.float()
    Q, G = scores.shape
    k = min(int(k), G)
    if k <= 0 or Q == 0:
        return scores.clone()
    top = scores.topk(k, dim=1).indices  # [Q, k]
    q_idx = torch.arange(Q).repeat_interleave(k)
    g_idx = top.flatten()
    new = pair_scorer(q_idx, g_idx, scores[q_idx, g_idx]).float().view(Q, k)  # [Q, k]
    base = scores.max(dim=1, keepdim=True).values + 1.0  # [Q, 1]
    out = scores.clone()
    out.scatter_(1, top, base + (new - new.min(dim=1, keepdim=True).values))
    return out


def ranks_from_scores(scores: Tensor, positives: Tensor) -> Tensor:
    """scores [Q, G], positives Bool[Q, G] -> Long[Q]: 1 + #(scores strictly above the best positive)."""
    if not bool(positives.any(1).all()):
        raise ValueError("every query needs at least one positive")
    best = scores.masked_fill(~positives, float("-inf")).max(dim=1, keepdim=True).values  # [Q, 1]
    return 1 + (scores > best).sum(1)


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
                     x_short: Optional[str] = None) -> dict[str, float]:
    """t2x and x2t metrics after re-ranking each query's global top-k with ``head`` (positives Bool[M texts, N])."""
    ks = _check_ks(ks)
    x = x_short or media[0]
    z_m, m_tok, m_mask = media_tokens(model, media, media_data, batch_size, device)
    z_t, t_tok, t_mask = text_tokens(model, texts, batch_size, device)
    inter = head.interaction
    dev = next(inter.parameters()).device

    def scorer(m_of_pair: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]):
        def score(q: Tensor, g: Tensor, glob: Tensor) -> Tensor:
            mi, ti = m_of_pair(q, g)
            return inter.score_pairs(m_tok.to(dev), m_mask.to(dev), t_tok.to(dev), t_mask.to(dev), mi.to(dev),
                                     ti.to(dev), global_sim=glob.to(dev)).float().cpu()
        return score

    sim = z_t @ z_m.t()  # [M, N]
    out: dict[str, float] = {}
    t2x = rerank_topk(sim, k, scorer(lambda q, g: (g, q)))  # query = text, gallery = media
    items = torch.nonzero(positives.any(0)).flatten()  # media with at least one text
    x2t = rerank_topk(sim.t()[items], k, scorer(lambda q, g: (items[q], g)))
    for prefix, sc, pos in ((f"t2{x}", t2x, positives), (f"{x}2t", x2t, positives.t()[items])):
        out.update({f"{prefix}_{key}": v for key, v in _metrics_from_ranks(ranks_from_scores(sc, pos), ks).items()})
    for kk in ks:
        out[f"mean_R@{kk}"] = (out[f"t2{x}_R@{kk}"] + out[f"{x}2t_R@{kk}"]) / 2
    out["rsum"] = sum(out[f"t2{x}_R@{kk}"] + out[f"{x}2t_R@{kk}"] for kk in ks)
    out["rerank_topk"] = float(k)
    return out
