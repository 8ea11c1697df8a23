"""Retrieval evaluation of a model on shards: embed every item and caption, score per language.

    records = evaluate_retrieval(model, "shards/test", languages=["en", "de"], dataset="demo")

Identical captions of different items (e.g. "the spoken digit seven" for every recording of a 7)
are merged into one text query whose positives are all those items, so that indistinguishable
texts never count against each other.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from mlmm.evaluation.report import chance_recall
from mlmm.evaluation.retrieval import bidirectional_retrieval, result_record

SHORT = {"image": "i", "video": "v", "audio": "a"}


@torch.no_grad()
def embed_media(model, modality: str, data: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """[N, ...] preprocessed inputs -> [N, E] L2-normalised embeddings."""
    dtype = next(model.parameters()).dtype
    out = [model.encode(modality, data[i:i + batch_size].to(device, dtype)).float().cpu()
           for i in range(0, len(data), batch_size)]
    return torch.cat(out) if out else torch.empty(0, model.cfg.embed_dim)


@torch.no_grad()
def embed_texts(model, texts: Sequence[str], batch_size: int, device) -> torch.Tensor:
    out = [model.encode_text(list(texts[i:i + batch_size]), device=device).float().cpu()
           for i in range(0, len(texts), batch_size)]
    return torch.cat(out) if out else torch.empty(0, model.cfg.embed_dim)


def text_queries(captions: list[tuple[int, str]], item_rows: dict[int, int]) -> tuple[list[str], torch.Tensor]:
    """Unique caption strings and their positives: Bool[M, N] over the modality's rows."""
    by_text: dict[str, set[int]] = defaultdict(set)
    for item, text in captions:
        if item in item_rows:
            by_text[text].add(item_rows[item])
    texts = sorted(by_text)
    positives = torch.zeros(len(texts), len(item_rows), dtype=torch.bool)
    for j, t in enumerate(texts):
        positives[j, sorted(by_text[t])] = True
    return texts, positives


def chance_metrics(positives: torch.Tensor, x: str, ks: Sequence[int]) -> dict[str, float]:
    """Expected recall of a random ranking, averaged over queries (percent), both directions."""
    out = {}
    for k in ks:
        t2x = [chance_recall(positives.shape[1], int(p), k) for p in positives.sum(1)]
        x2t = [chance_recall(positives.shape[0], int(p), k) for p in positives.sum(0) if p > 0]
        out[f"chance_t2{x}_R@{k}"] = sum(t2x) / max(len(t2x), 1)
        out[f"chance_{x}2t_R@{k}"] = sum(x2t) / max(len(x2t), 1)
    return out


def evaluate_retrieval(model, shards, *, languages: Optional[Sequence[str]] = None, dataset: str = "",
                       batch_size: int = 64, device="cpu", ks: Sequence[int] = (1, 5, 10),
                       progress: bool = True, rerank_topk: int = 0) -> list[dict]:
    """One record per (media modality with text, language): t2x/x2t R@k, MdR, MnR, rsum, chance.

    Also one ``video-audio`` record (v2a / a2v, positives = the same sample) when the model has both
    towers and the shards have samples with both. ``rerank_topk`` > 0: for each media modality that has a DI-vTR
    interaction head, an extra ``<m>-text+rerank@K`` record re-ranks every query's global top-K with it
    (:mod:`mlmm.evaluation.rerank`).
    """
    from mlmm.data.pipeline import Preprocessor, load_eval_items

    model.eval()
    media = [m for m in model.modalities if m != "text"]
    if "text" not in model.modalities or not media:
        raise ValueError(f"retrieval needs a text tower and a media tower; the model has {model.modalities}")
    pre = Preprocessor(model.cfg, model.tokenizer, train=False)
    items = load_eval_items(shards, pre, media, languages)
    records = []
    tasks = [(m, lang) for m in media if m in items for lang in sorted(items["captions"])]
    for m in media:
        if m not in items:
            continue
        x_emb = embed_media(model, m, items[m]["data"], batch_size, device)  # [N, E]
        rows = {int(item): r for r, item in enumerate(items[m]["items"])}
        for lang in tqdm([t[1] for t in tasks if t[0] == m], desc=f"{m}-text retrieval", disable=not progress,
                         leave=False):
            texts, positives = text_queries(items["captions"][lang], rows)
            if not texts:
                continue
            t_emb = embed_texts(model, texts, batch_size, device)  # [M, E]
            first = positives.float().argmax(1)
            metrics = bidirectional_retrieval(x_emb, t_emb, first, x_name=m, ks=ks, text_positives=positives)
            metrics.update(chance_metrics(positives, SHORT.get(m, m[0]), ks))
            metrics["n_texts"] = len(texts)
            records.append(result_record(f"{m}-text", dataset, lang, metrics, n=len(rows)))
            if rerank_topk > 0:
                from mlmm.evaluation.rerank import find_interaction_head, rerank_retrieval

                head = find_interaction_head(model, m)
                if head is not None:
                    rr = rerank_retrieval(model, head, m, items[m]["data"], texts, positives, k=rerank_topk, ks=ks,
                                          batch_size=batch_size, device=device, x_short=SHORT.get(m, m[0]))
                    rr.update(chance_metrics(positives, SHORT.get(m, m[0]), ks))
                    rr["n_texts"] = len(texts)
                    records.append(result_record(f"{m}-text+rerank@{rerank_topk}", dataset, lang, rr, n=len(rows)))
    records.extend(media_pair_records(model, items, dataset, batch_size, device, ks))
    return records


def media_pair_records(model, items: dict, dataset: str, batch_size: int, device, ks: Sequence[int],
                       pairs: Sequence[tuple[str, str]] = (("video", "audio"),)) -> list[dict]:
    """Media-media retrieval (e.g. video<->audio) over the samples that have both: positives = the same sample."""
    from mlmm.evaluation.retrieval import retrieval_metrics

    records = []
    for a, b in pairs:
        if a not in items or b not in items:
            continue
        rows_b = {int(item): r for r, item in enumerate(items[b]["items"])}
        both = [(ra, rows_b[int(item)]) for ra, item in enumerate(items[a]["items"]) if int(item) in rows_b]
        if len(both) < 2:
            continue
        ia, ib = (torch.tensor(x, dtype=torch.long) for x in zip(*both))
        za = embed_media(model, a, items[a]["data"][ia], batch_size, device)  # [N, E]
        zb = embed_media(model, b, items[b]["data"][ib], batch_size, device)  # [N, E]
        sa, sb, n = SHORT.get(a, a[0]), SHORT.get(b, b[0]), len(both)
        metrics = {}
        for (q, g, name) in ((za, zb, f"{sa}2{sb}"), (zb, za, f"{sb}2{sa}")):
            metrics.update({f"{name}_{k}": v for k, v in retrieval_metrics(q, g, torch.arange(n), ks=ks).items()})
        for k in ks:
            metrics[f"chance_{sa}2{sb}_R@{k}"] = metrics[f"chance_{sb}2{sa}_R@{k}"] = chance_recall(n, 1, k)
        metrics["rsum"] = sum(metrics[f"{x}_R@{k}"] for x in (f"{sa}2{sb}", f"{sb}2{sa}") for k in ks)
        records.append(result_record(f"{a}-{b}", dataset, "-", metrics, n=n))
    return records
