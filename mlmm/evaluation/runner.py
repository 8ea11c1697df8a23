"""Retrieval evaluation of a model on shards: embed every item and caption (streamed), score per language.

    records = evaluate_retrieval(model, "shards/test", languages=["en", "de"], dataset="demo")

``model`` is any :class:`~mlmm.evaluation.models.EvalModel` (mlmm, open_clip, transformers, M-CLIP-style; see
:func:`mlmm.evaluation.models.load_model`) or an mlmm ``MultimodalModel``. The test set is streamed once
(:mod:`mlmm.evaluation.stream`: decoded in loader workers, split over ranks under ``torchrun``); only embeddings
are kept. Identical captions of different items (e.g. "the spoken digit seven" for every recording of a 7)
are merged into one text query whose positives are all those items, so that indistinguishable
texts never count against each other.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional, Sequence

import torch

from mlmm.evaluation.distributed import split_encode
from mlmm.evaluation.models.mlmm_model import as_eval_model
from mlmm.evaluation.report import chance_recall
from mlmm.evaluation.retrieval import bidirectional_retrieval, result_record, retrieval_metrics
from mlmm.modalities import MEDIA, modality



@torch.no_grad()
def embed_media(model, modality: str, data: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """[N, ...] preprocessed inputs -> [N, E] L2-normalised embeddings (an mlmm MultimodalModel)."""
    dtype = next(model.parameters()).dtype
    out = [model.encode(modality, data[i:i + batch_size].to(device, dtype)).float().cpu()
           for i in range(0, len(data), batch_size)]
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


def annotate(records: list[dict], model, skipped: Optional[dict[str, int]] = None) -> list[dict]:
    """Add the CLIP_benchmark-style ``model`` / ``pretrained`` keys and the per-reason skip counts (when given;
    a record may carry its own) to records."""
    for r in records:
        r.update(model=model.name, pretrained=model.pretrained)
        if skipped is not None:
            r["skipped"] = dict(skipped)
    return records


def evaluate_retrieval(model, shards, *, languages: Optional[Sequence[str]] = None, dataset: str = "",
                       batch_size: int = 64, device=None, ks: Sequence[int] = (1, 5, 10),
                       progress: bool = True, rerank_topk: int = 0, num_workers: int = 0) -> list[dict]:
    """One record per (media modality with text, language): t2x/x2t R@k, MdR, MnR, rsum, chance.

    Also one ``video-audio`` record (v2a / a2v, positives = the same sample) when the model has both
    towers and the shards have samples with both. ``rerank_topk`` > 0 (mlmm models): for each media modality that
    has a DI-vTR interaction head, an extra ``<m>-text+rerank@K`` record re-ranks every query's global top-K with it
    (:mod:`mlmm.evaluation.rerank`; this keeps the test set's media and token sequences in memory). Records carry
    ``model``, ``pretrained`` and ``skipped`` ({reason: count} of the samples left out).
    """
    from mlmm.evaluation.stream import captions_of, embed_test_set

    model = as_eval_model(model, device)
    media = [m for m in model.modalities if m != "text"]
    if "text" not in model.modalities or not media:
        raise ValueError(f"retrieval needs a text tower and a media tower; the model has {list(model.modalities)}")
    data = embed_test_set(model, shards, media, keep=captions_of(languages), batch_size=batch_size,
                          num_workers=num_workers, progress=progress, desc="retrieval")
    captions = data.captions()
    rerank_media = _rerank_media(model, shards, data, media, languages) if rerank_topk > 0 else {}
    records = []
    for m in media:
        if m not in data.emb:
            continue
        x_emb = data.emb[m]  # [N, E]
        rows = {int(item): r for r, item in enumerate(data.rows[m])}
        for lang in sorted(captions):
            texts, positives = text_queries(captions[lang], rows)
            if not texts:
                continue
            t_emb = split_encode(lambda t: model.encode_text(t, batch_size), texts, batch_size,
                                 order=model.text_order(texts))  # [M, E], in the order of texts
            first = positives.float().argmax(1)
            code = modality(m).code  # t2<code>, <code>2t
            metrics = bidirectional_retrieval(x_emb, t_emb, first, x_name=m, ks=ks, text_positives=positives,
                                              x_short=code)
            metrics.update(chance_metrics(positives, code, ks))
            metrics["n_texts"] = len(texts)
            records.append(result_record(modality(m).text_task, dataset, lang, metrics, n=len(rows)))
            if m in rerank_media:
                from mlmm.evaluation.rerank import rerank_retrieval

                head, media_data = rerank_media[m]
                rr = rerank_retrieval(model.mlmm, head, m, media_data, texts, positives, k=rerank_topk, ks=ks,
                                      batch_size=batch_size, device=model.device, x_short=code)
                rr.update(chance_metrics(positives, code, ks))
                rr["n_texts"] = len(texts)
                records.append(result_record(f"{modality(m).text_task}+rerank@{rerank_topk}", dataset, lang, rr,
                                             n=len(rows)))
    records.extend(media_pair_records(data, dataset, ks))
    return annotate(records, model, data.skipped)


def _rerank_media(model, shards, data, media: Sequence[str], languages) -> dict:
    """{modality: (interaction head, preprocessed media in the rows' order)} for the modalities with a head."""
    from mlmm.data.preprocess import Preprocessor, load_eval_items
    from mlmm.evaluation.rerank import find_interaction_head

    heads = {m: h for m in media if model.mlmm is not None and (h := find_interaction_head(model.mlmm, m)) is not None}
    if not heads:
        return {}
    items = load_eval_items(shards, Preprocessor(model.mlmm.cfg, model.tokenizer, train=False), list(heads),
                            languages)
    out = {}
    for m, head in heads.items():
        where = {k: i for i, k in enumerate(items[m]["keys"])}
        order = [where[data.keys[int(r)]] for r in data.rows[m]]
        out[m] = (head, items[m]["data"][torch.tensor(order, dtype=torch.long)])
    return out


def media_pair_records(data, dataset: str, ks: Sequence[int],
                       pairs: Optional[Sequence[tuple[str, str]]] = None) -> list[dict]:
    """Media-media retrieval over the samples that have both, positives = the same sample: ``pairs`` or every
    modality's ``pairs`` in :mod:`mlmm.modalities` (video <-> audio)."""
    records = []
    pairs = pairs if pairs is not None else [(a, b) for a in MEDIA for b in modality(a).pairs]
    for a, b in pairs:
        if a not in data.emb or b not in data.emb:
            continue
        rows_b = {int(item): r for r, item in enumerate(data.rows[b])}
        both = [(ra, rows_b[int(item)]) for ra, item in enumerate(data.rows[a]) if int(item) in rows_b]
        if len(both) < 2:
            continue
        ia, ib = (torch.tensor(x, dtype=torch.long) for x in zip(*both))
        za, zb = data.emb[a][ia], data.emb[b][ib]  # [N, E] each
        sa, sb, n = modality(a).code, modality(b).code, len(both)
        metrics = {}
        for (q, g, name) in ((za, zb, f"{sa}2{sb}"), (zb, za, f"{sb}2{sa}")):
            metrics.update({f"{name}_{k}": v for k, v in retrieval_metrics(q, g, torch.arange(n), ks=ks).items()})
        for k in ks:
            metrics[f"chance_{sa}2{sb}_R@{k}"] = metrics[f"chance_{sb}2{sa}_R@{k}"] = chance_recall(n, 1, k)
        metrics["rsum"] = sum(metrics[f"{x}_R@{k}"] for x in (f"{sa}2{sb}", f"{sb}2{sa}") for k in ks)
        records.append(result_record(modality(a).pair_task(b), dataset, "-", metrics, n=n))
    return records
