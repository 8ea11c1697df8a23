"""Attribute-sensitive retrieval: does the true caption beat captions that differ from it by one attribute?

    m = distractor_accuracy(model, "shards/test", languages=["en", "de"])      # global cosine
    m = distractor_accuracy(model, "shards/test", head=find_interaction_head(model, "image"))   # head's pair score

Each evaluated sample's json holds ``"distractors": {lang: {type: caption}}`` (see
:func:`mlmm.synthetic.scenes.attribute_scenes`): the sample's first caption in ``lang`` with exactly one
attribute changed (``size`` / ``color`` / ``shape`` swapped, ``insert``: an attribute the image does not have).
For every (image, language) the candidates are the true caption and its distractors:

* ``R@1`` — percent of (image, language) queries whose true caption scores strictly above every distractor
  (ties count as misses), i.e. image-to-text R@1 among candidates that differ by one attribute;
* ``<type>_acc`` — percent of (image, distractor of that type) pairs where the true caption scores higher;
* ``chance_R@1`` — the same R@1 for a random scorer (mean of 1 / #candidates).

``types`` restricts the distractors to those types. With ``head`` (an object with ``.interaction.score_pairs``
like the DI-vTR / ASCL / VSE / MVSEN heads), pairs are scored by the head from the towers' tokens with the global
cosine passed in; otherwise by the global cosine.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional, Sequence

import torch


@torch.no_grad()
def distractor_accuracy(model, shards, *, languages: Optional[Sequence[str]] = None, head=None, media: str = "image",
                        types: Optional[Sequence[str]] = None, field: str = "distractors", batch_size: int = 64,
                        device="cpu") -> dict[str, float]:
    from mlmm.data.preprocess import Preprocessor, load_eval_items
    from mlmm.evaluation.rerank import media_tokens, text_tokens

    model.eval()
    items = load_eval_items(shards, Preprocessor(model.cfg, model.tokenizer, train=False), [media], languages)
    if media not in items:
        raise ValueError(f"distractor_accuracy: no {media} items in {shards}")
    rows = items[media]["items"].tolist()
    pairs: list[tuple[int, int, str, str]] = []  # (media row, query id, type, caption); type "" = the true caption
    queries = 0
    for r, item in enumerate(rows):
        meta = items["meta"][item]
        for lang, dis in sorted((meta.get(field) or {}).items()):
            caps = (meta.get("captions") or {}).get(lang)
            if not dis or not caps or (languages is not None and lang not in languages):
                continue
            true = caps if isinstance(caps, str) else caps[0]
            pairs.append((r, queries, "", true))
            pairs.extend((r, queries, t, c) for t, c in sorted(dis.items()) if types is None or t in types)
            queries += 1
    if not queries:
        raise ValueError(f"distractor_accuracy: no sample in {shards} has '{field}'")
    data = items[media]["data"]
    z_m, m_tok, m_mask = media_tokens(model, media, data, batch_size, device)  # [N, E], [N, T, D], [N, T]
    texts = sorted({p[3] for p in pairs})
    index = {t: i for i, t in enumerate(texts)}
    z_t, t_tok, t_mask = text_tokens(model, texts, batch_size, device)  # [M, E], [M, L, D], [M, L]
    mi = torch.tensor([p[0] for p in pairs])
    ti = torch.tensor([index[p[3]] for p in pairs])
    scores = (z_m[mi] * z_t[ti]).sum(-1)  # [P] global cosine
    if head is not None:
        inter = head.interaction
        dev = next(inter.parameters()).device
        scores = torch.cat([inter.score_pairs(m_tok.to(dev), m_mask.to(dev), t_tok.to(dev), t_mask.to(dev),
                                              mi[s:s + 4096].to(dev), ti[s:s + 4096].to(dev),
                                              global_sim=scores[s:s + 4096].to(dev)).float().cpu()
                            for s in range(0, len(pairs), 4096)])
    true_score = torch.empty(queries)
    n_cand = torch.zeros(queries)
    for p, (_, q, t, _) in enumerate(pairs):
        n_cand[q] += 1
        if t == "":
            true_score[q] = scores[p]
    best_other = torch.full((queries,), float("-inf"))
    wins: dict[str, list[float]] = defaultdict(list)
    for p, (_, q, t, _) in enumerate(pairs):
        if t:
            best_other[q] = torch.maximum(best_other[q], scores[p])
            wins[t].append(float(true_score[q] > scores[p]))
    out = {"R@1": 100.0 * float((true_score > best_other).float().mean()),
           "chance_R@1": 100.0 * float((1.0 / n_cand).mean()), "n_queries": float(queries)}
    out.update({f"{t}_acc": 100.0 * sum(v) / len(v) for t, v in sorted(wins.items())})
    return out
