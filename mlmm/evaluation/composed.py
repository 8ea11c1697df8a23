"""Composed image retrieval evaluation: Recall@K of the target given (reference image, modification text).

    records = evaluate_composed(model, "data/cir_test/shards", languages=["en", "de", "fr"])
    records[0]["metrics"]["composed_R@1"], ["text_R@1"], ["image_R@1"], ["sum_R@1"], ["chance_R@1"]

Protocol (CIRR / FashionIQ): the gallery is every image of the shards, keyed by sample key — gallery
rows, plus the target and reference images of the triplets under their ``target`` / ``reference`` keys
when no gallery row has them. A query is one (triplet, modification phrasing) in one language; it hits at
K when its target is among the top-K gallery images, with the **reference image removed from the
gallery** for that query (as CIRR does; otherwise a query could trivially return its own reference).
Rank = 1 + #gallery images scoring strictly higher than the target (optimistic on ties, as
:mod:`mlmm.evaluation.retrieval`). Recalls are percentages.

Query modes, so that the composition can be compared with its failure cases on the same queries:

* ``composed`` — the ``composed`` head (:meth:`~mlmm.models.heads.composed.ComposedHead.encode_query`);
* ``text`` — the modification text alone (the model's text embedding);
* ``image`` — the reference image alone;
* ``sum`` — ``normalise(image + text)``, the late-fusion baseline of the CIRR paper.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from mlmm.evaluation.report import chance_recall
from mlmm.evaluation.retrieval import result_record

MODES = ("composed", "text", "image", "sum")


def find_composed_head(model) -> Optional[torch.nn.Module]:
    from mlmm.models.heads.composed import ComposedHead

    return next((h for h in getattr(model, "heads", {}).values() if isinstance(h, ComposedHead)), None)


def load_composed_items(shards: str | Sequence[str], preprocessor, reference: str = "ref") -> dict[str, Any]:
    """``{"gallery_keys": [G], "gallery": Float[G, 3, S, S], "queries": [{"key", "target", "reference",
    "modification"}], "ref_images": Float[Q, 3, S, S], "skipped": int}`` (queries whose target is not in the gallery
    are skipped). Use a ``Preprocessor(train=False)``."""
    from mlmm.data.shards import iter_samples, resolve_shards

    files = resolve_shards(shards) if isinstance(shards, str) else list(shards)
    gallery: dict[str, torch.Tensor] = {}
    fallback: dict[str, torch.Tensor] = {}  # target / reference images seen only inside triplets
    queries, refs = [], []
    for raw in iter_samples(files):
        meta = raw["json"]
        image = preprocessor.media(raw).get("image")
        if "reference" in meta and "modification" in meta:
            extra = preprocessor.extra_images(raw)
            if reference not in extra or image is None:
                continue
            queries.append({"key": raw["__key__"], "target": meta.get("target", raw["__key__"]),
                            "reference": meta["reference"], "modification": meta["modification"]})
            refs.append(extra[reference])
            fallback.setdefault(queries[-1]["target"], image)
            fallback.setdefault(meta["reference"], extra[reference])
        elif image is not None:
            gallery[raw["__key__"]] = image
    for k, v in fallback.items():
        gallery.setdefault(k, v)
    keep = [i for i, q in enumerate(queries) if q["target"] in gallery]
    keys = list(gallery)
    return {"gallery_keys": keys, "gallery": torch.stack([gallery[k] for k in keys]) if keys else torch.empty(0),
            "queries": [queries[i] for i in keep], "ref_images": torch.stack([refs[i] for i in keep]) if keep else None,
            "skipped": len(queries) - len(keep)}


def target_ranks(scores: torch.Tensor, target: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
    """scores [Q, G], target / exclude Long[Q] (gallery index of the target / of the reference; -1 = none)
    -> ranks [Q]."""
    scores = scores.float().clone()
    rows = torch.arange(scores.shape[0])
    has = exclude >= 0
    scores[rows[has], exclude[has]] = float("-inf")
    best = scores[rows, target].unsqueeze(1)  # [Q, 1]
    return 1 + (scores > best).sum(1)


@torch.no_grad()
def evaluate_composed(model, shards, *, languages: Optional[Sequence[str]] = None, dataset: str = "",
                      ks: Sequence[int] = (1, 10, 50), modes: Sequence[str] = MODES, batch_size: int = 64,
                      device="cpu") -> list[dict]:
    """One record per language: ``<mode>_R@K`` for every available mode, ``chance_R@K``, ``n`` = queries."""
    from mlmm.data.preprocess import Preprocessor
    from mlmm.evaluation.runner import embed_media

    model.eval()
    head = find_composed_head(model)
    modes = [m for m in modes if m != "composed" or head is not None]
    pre = Preprocessor(model.cfg, model.tokenizer, train=False)
    items = load_composed_items(shards, pre, head.cfg.reference if head is not None else "ref")
    if not items["queries"]:
        raise ValueError(f"evaluate_composed: no triplet with a reference image and a target in {shards}")
    index = {k: i for i, k in enumerate(items["gallery_keys"])}
    gallery = embed_media(model, "image", items["gallery"], batch_size, device)  # [G, E]
    refs = embed_media(model, "image", items["ref_images"], batch_size, device)  # [Q, E]
    dtype = next(model.parameters()).dtype
    langs = sorted({lang for q in items["queries"] for lang in q["modification"]})
    records = []
    for lang in [l for l in langs if languages is None or l in languages]:
        qi, texts = [], []  # (query index, phrasing) pairs of this language
        for i, q in enumerate(items["queries"]):
            phr = q["modification"].get(lang) or []
            for t in [phr] if isinstance(phr, str) else phr:
                qi.append(i)
                texts.append(t)
        if not texts:
            continue
        qi_t = torch.tensor(qi)
        target = torch.tensor([index[items["queries"][i]["target"]] for i in qi])
        exclude = torch.tensor([index.get(items["queries"][i]["reference"], -1) for i in qi])
        emb: dict[str, list[torch.Tensor]] = {m: [] for m in modes}
        for s in range(0, len(texts), batch_size):
            tok = model.tokenizer(texts[s:s + batch_size], padding=True, truncation=True,
                                  max_length=model.cfg.text.max_length, return_tensors="pt")
            ids, att = tok["input_ids"].to(device), tok["attention_mask"].to(device)
            t_z = model.encode("text", ids, att).float().cpu()
            r_z = refs[qi_t[s:s + batch_size]]
            if "composed" in emb:
                ref_img = items["ref_images"][qi_t[s:s + batch_size]].to(device, dtype)
                emb["composed"].append(head.encode_query(model, ref_img, ids, att).float().cpu())
            if "text" in emb:
                emb["text"].append(t_z)
            if "image" in emb:
                emb["image"].append(r_z)
            if "sum" in emb:
                emb["sum"].append(torch.nn.functional.normalize(r_z + t_z, dim=-1))
        metrics: dict[str, float] = {}
        for m in modes:
            ranks = target_ranks(torch.cat(emb[m]) @ gallery.t(), target, exclude)  # [Q]
            for k in ks:
                metrics[f"{m}_R@{k}"] = 100.0 * float((ranks <= k).float().mean())
            metrics[f"{m}_MnR"] = float(ranks.float().mean())
        g = len(items["gallery_keys"]) - int((exclude >= 0).all())
        for k in ks:
            metrics[f"chance_R@{k}"] = chance_recall(g, 1, k)
        metrics["gallery"] = float(len(items["gallery_keys"]))
        records.append(result_record("composed-image", dataset, lang, metrics, n=len(texts)))
    return records


def markdown_table(records: list[dict], modes: Sequence[str] = MODES, ks: Sequence[int] = (1, 10, 50)) -> str:
    """``| lang | mode | n | R@1 | R@10 | R@50 |`` with chance in the last row of each language."""
    lines = ["| lang | query | n | " + " | ".join(f"R@{k}" for k in ks) + " |", "|---|---|--:|" + "--:|" * len(ks)]
    for r in records:
        m = r["metrics"]
        for mode in [x for x in modes if f"{x}_R@{ks[0]}" in m] + ["chance"]:
            cells = " | ".join(f"{m[f'{mode}_R@{k}']:.1f}" for k in ks)
            lines.append(f"| {r['language']} | {mode} | {r['n']} | {cells} |")
    return "\n".join(lines)
