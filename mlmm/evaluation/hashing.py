"""Cross-modal hashing evaluation: mAP@all, mAP@R, P@k and Hamming-radius precision, per language.

    m = ranking_metrics(dist, relevant, ks=(10, 100), radius=2)        # one direction, any distance matrix
    m = bidirectional_hash_metrics(img_codes, txt_codes, rel_t2i)       # packed codes, t2i + i2t
    records = evaluate_hashing(model, "shards/test", languages=["en", "de"], dataset="demo")

Conventions (DCMH / DeepHash evaluation code, made deterministic):

* Ranking: database items sorted by ascending distance (Hamming for codes, ``1 - cosine`` for floats);
  **exact ties keep database order** (stable sort), so results never depend on the sort kernel.
* ``mAP@all``: AP over the whole ranked database, ``AP = (1/R) sum_i P@i * rel_i`` with R = #relevant.
* ``mAP@R`` (Musgrave et al., "A Metric Learning Reality Check"): ``(1/R) sum_{i<=R} P@i * rel_i``, i.e. AP
  truncated at R = the query's own number of relevant items (1.0 only if the top-R are all relevant).
* ``mAP@k`` (DeepHash "topk mAP"): ``sum_{i<=k} P@i rel_i / #relevant in the top-k`` (0 when there is none).
* ``P@k``: fraction of the top-k that is relevant. ``P@H<=r``: precision among items within Hamming
  distance r; a query with nothing inside the ball counts 0 (DPSH / DeepHash convention); the fraction of
  queries with a non-empty ball is reported as ``H<=r_nonempty``.
* Queries without any relevant database item are excluded (their AP is undefined) and counted in
  ``n_queries_no_relevant``. (DCMH's ``calc_map`` counts them as 0: never the case for label data.)
* Metrics are fractions in [0, 1] (not percent). ``chance_*`` are the exact expectations under a uniformly
  random ranking: ``E[AP] = (H_N + (R - 1)(N - H_N)/(N - 1)) / N`` (H_N the harmonic number),
  ``E[AP@R] = (1/R) sum_{i<=R} (R/N)(1 + (i - 1)(R - 1)/(N - 1)) / i`` and ``E[P@k] = R/N``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from mlmm.evaluation.retrieval import result_record
from mlmm.modalities import modality
from mlmm.search.codes import hamming_distances, pack_codes



# ---------------------------------------------------------------------------------------- relevance
def relevance_from_labels(query_labels: Sequence[Sequence[str]], db_labels: Sequence[Sequence[str]],
                          mode: str = "any") -> Tensor:
    """Bool[Q, N]: ``any`` = share at least one label (multi-label convention of NUS-WIDE / MIRFlickr);
    ``all`` = identical label sets (single-class convention)."""
    if mode not in ("any", "all"):
        raise ValueError(f"mode must be 'any' or 'all', got {mode!r}")
    if mode == "all":
        ids: dict[frozenset, int] = {}
        q = torch.tensor([ids.setdefault(frozenset(x), len(ids)) for x in query_labels], dtype=torch.long)
        d = torch.tensor([ids.setdefault(frozenset(x), len(ids)) for x in db_labels], dtype=torch.long)
        return q[:, None] == d[None, :]
    vocab: dict[str, int] = {}
    for labels in (*query_labels, *db_labels):
        for label in labels:
            vocab.setdefault(str(label), len(vocab))

    def multi_hot(rows: Sequence[Sequence[str]]) -> Tensor:
        out = torch.zeros(len(rows), max(len(vocab), 1))
        for i, labels in enumerate(rows):
            for label in labels:
                out[i, vocab[str(label)]] = 1.0
        return out

    return (multi_hot(query_labels) @ multi_hot(db_labels).T) > 0


# -------------------------------------------------------------------------------------- core metric
def _harmonic(n: Tensor) -> Tensor:
    """H_n for a float tensor n >= 1 (exact sum up to 10^6, asymptotic beyond)."""
    out = torch.empty_like(n, dtype=torch.float64)
    for i, v in enumerate(n.tolist()):
        v = int(v)
        if v <= 1_000_000:
            out[i] = float(torch.reciprocal(torch.arange(1, v + 1, dtype=torch.float64)).sum())
        else:
            out[i] = torch.log(torch.tensor(float(v), dtype=torch.float64)) + 0.5772156649015329 + 1 / (2 * v)
    return out


def chance_metrics(relevant: Tensor, ks: Sequence[int] = (10, 100)) -> dict[str, float]:
    """Expected mAP@all, mAP@R and P@k of a uniformly random ranking (see the module doc), averaged over
    the queries that have at least one relevant item."""
    rel = relevant.bool()
    n = rel.shape[1]
    counts = rel.sum(1).double()
    counts = counts[counts > 0]
    if counts.numel() == 0:
        return {}
    nn_ = float(n)
    h = _harmonic(torch.full((1,), nn_))[0]
    if n > 1:
        ap = (h + (counts - 1) * (nn_ - h) / (nn_ - 1)) / nn_
    else:
        ap = torch.ones_like(counts)
    map_r = []
    for r in counts.tolist():
        i = torch.arange(1, int(r) + 1, dtype=torch.float64)
        p_before = (i - 1) * (r - 1) / (nn_ - 1) if n > 1 else torch.zeros_like(i)
        map_r.append(float(((r / nn_) * (1 + p_before) / i).sum() / r))
    out = {"chance_mAP@all": float(ap.mean()), "chance_mAP@R": sum(map_r) / len(map_r)}
    for k in ks:
        out[f"chance_P@{k}"] = float((counts / nn_).mean())
    return out


def ranking_metrics(dist: Tensor, relevant: Tensor, ks: Sequence[int] = (10, 100), radius: Optional[int] = None,
                    map_at: Optional[int] = None, chunk_size: int = 256) -> dict[str, float]:
    """Ranking metrics of one direction from a distance matrix (lower = closer).

    Args:
        dist: [Q, N] distances (Hamming ints or floats). relevant: Bool[Q, N].
        ks: cut-offs for P@k (clipped to N). radius: also report ``P@H<=radius`` (for Hamming distances).
        map_at: also report the DeepHash top-k ``mAP@<map_at>``.
    Returns: ``mAP@all``, ``mAP@R``, ``P@k``..., [``mAP@k``], [``P@H<=r``, ``H<=r_nonempty``],
        ``n_queries``, ``n_queries_no_relevant``.
    """
    if dist.shape != relevant.shape or dist.dim() != 2:
        raise ValueError(f"dist {tuple(dist.shape)} and relevant {tuple(relevant.shape)} must both be [Q, N]")
    q_total, n = dist.shape
    sums = {"ap": 0.0, "apr": 0.0, "mapk": 0.0, "hr": 0.0, "hr_nonempty": 0.0}
    p_at = {k: 0.0 for k in ks}
    used = 0
    positions = torch.arange(1, n + 1, dtype=torch.float64)  # [N]
    for start in range(0, q_total, chunk_size):
        d = dist[start:start + chunk_size]
        rel_all = relevant[start:start + chunk_size].bool()
        has = rel_all.any(1)
        if not bool(has.any()):
            continue
        d, rel_all = d[has], rel_all[has]
        used += d.shape[0]
        order = torch.sort(d, dim=1, stable=True).indices  # [c, N] ascending distance, ties by index
        rel = rel_all.gather(1, order).double()  # [c, N] relevance in ranked order
        cum = rel.cumsum(1)  # [c, N] relevant items seen so far
        prec = cum / positions  # [c, N] P@i
        r = cum[:, -1:]  # [c, 1] R = number of relevant items
        sums["ap"] += float(((prec * rel).sum(1) / r.squeeze(1)).sum())
        within_r = positions[None, :] <= r  # [c, N]
        sums["apr"] += float(((prec * rel * within_r).sum(1) / r.squeeze(1)).sum())
        for k in ks:
            kk = min(k, n)
            p_at[k] += float((cum[:, kk - 1] / kk).sum())
        if map_at is not None:
            kk = min(map_at, n)
            hits = cum[:, kk - 1]
            sums["mapk"] += float(((prec[:, :kk] * rel[:, :kk]).sum(1) / hits.clamp(min=1)).sum())
        if radius is not None:
            inside = d <= radius  # [c, N]
            n_in = inside.sum(1).double()
            n_rel_in = (inside & rel_all).sum(1).double()
            sums["hr"] += float((n_rel_in / n_in.clamp(min=1)).sum())
            sums["hr_nonempty"] += float((n_in > 0).double().sum())
    out: dict[str, float] = {}
    if used:
        out["mAP@all"] = sums["ap"] / used
        out["mAP@R"] = sums["apr"] / used
        out.update({f"P@{k}": p_at[k] / used for k in ks})
        if map_at is not None:
            out[f"mAP@{map_at}"] = sums["mapk"] / used
        if radius is not None:
            out[f"P@H<={radius}"] = sums["hr"] / used
            out[f"H<={radius}_nonempty"] = sums["hr_nonempty"] / used
    out["n_queries"] = float(used)
    out["n_queries_no_relevant"] = float(q_total - used)
    return out


def _codes_to_packed(codes: Tensor) -> Tensor:
    return codes if codes.dtype == torch.uint8 else pack_codes(codes)


def hamming_ranking_metrics(query_codes: Tensor, db_codes: Tensor, relevant: Tensor, ks: Sequence[int] = (10, 100),
                            radius: int = 2, map_at: Optional[int] = None, chunk_size: int = 256) -> dict[str, float]:
    """:func:`ranking_metrics` on Hamming distances; codes are packed Uint8 or relaxed/sign Float [*, bits]."""
    q, d = _codes_to_packed(query_codes), _codes_to_packed(db_codes)
    out: dict[str, float] = {}
    parts = []
    for start in range(0, q.shape[0], chunk_size):
        parts.append(hamming_distances(q[start:start + chunk_size], d))
    dist = torch.cat(parts)  # [Q, N] int32 (eval sizes: fits)
    out.update(ranking_metrics(dist, relevant, ks, radius, map_at, chunk_size))
    return out


def cosine_ranking_metrics(query_emb: Tensor, db_emb: Tensor, relevant: Tensor, ks: Sequence[int] = (10, 100),
                           map_at: Optional[int] = None) -> dict[str, float]:
    """Float baseline: :func:`ranking_metrics` with distance ``1 - cosine``."""
    q = torch.nn.functional.normalize(query_emb.float(), dim=1)
    d = torch.nn.functional.normalize(db_emb.float(), dim=1)
    return ranking_metrics(1 - q @ d.T, relevant, ks, None, map_at)


def bidirectional_hash_metrics(x_codes: Tensor, t_codes: Tensor, relevant_t2x: Tensor, x_short: str = "i",
                               ks: Sequence[int] = (10, 100), radius: int = 2, map_at: Optional[int] = None,
                               x_emb: Optional[Tensor] = None, t_emb: Optional[Tensor] = None) -> dict[str, float]:
    """t2x (texts query items) and x2t (items query texts) hashing metrics, keys ``t2x_<metric>`` / ``x2t_<metric>``.

    relevant_t2x: Bool[M texts, N items]; x2t uses its transpose. With ``x_emb``/``t_emb`` (float embeddings)
    the float cosine baseline is added as ``t2x_float_<metric>``.
    """
    out: dict[str, float] = {}
    rel = relevant_t2x.bool()
    for prefix, q, d, r in ((f"t2{x_short}", t_codes, x_codes, rel), (f"{x_short}2t", x_codes, t_codes, rel.T)):
        out.update({f"{prefix}_{k}": v for k, v in hamming_ranking_metrics(q, d, r, ks, radius, map_at).items()})
        out.update({f"{prefix}_{k}": v for k, v in chance_metrics(r, ks).items()})
    if x_emb is not None and t_emb is not None:
        for prefix, q, d, r in ((f"t2{x_short}", t_emb, x_emb, rel), (f"{x_short}2t", x_emb, t_emb, rel.T)):
            m = cosine_ranking_metrics(q, d, r, ks, map_at)
            out.update({f"{prefix}_float_{k}": v for k, v in m.items() if not k.startswith("n_")})
    out["mean_mAP@all"] = (out.get(f"t2{x_short}_mAP@all", 0.0) + out.get(f"{x_short}2t_mAP@all", 0.0)) / 2
    return out


# ------------------------------------------------------------------------------------- model runner
def find_hash_head(model, head: Optional[str] = None):
    """The hash head instance named ``head`` (default: the only/first one) of a MultimodalModel."""
    from mlmm.models.heads.hashing import HashHead

    heads = {k: h for k, h in model.heads.items() if isinstance(h, HashHead)}
    if not heads:
        raise ValueError("the model has no hash head (model.heads: {<name>: {name: hash, ...}})")
    if head is None:
        return next(iter(heads.values()))
    if head not in heads:
        raise ValueError(f"no hash head named {head!r}; hash heads: {sorted(heads)}")
    return heads[head]


@torch.no_grad()
def encode_media_codes(model, head, modality: str, data: Tensor, batch_size: int = 64, device="cpu"
                       ) -> tuple[Tensor, Tensor]:
    """[N, ...] preprocessed media -> (relaxed codes Float[N, bits], float embeddings Float[N, E])."""
    dtype = next(model.parameters()).dtype
    codes, embs = [], []
    for i in range(0, len(data), batch_size):
        h, z = head.encode(model, modality, data[i:i + batch_size].to(device, dtype))
        codes.append(h.float().cpu())
        embs.append(z.float().cpu())
    return torch.cat(codes), torch.cat(embs)


@torch.no_grad()
def encode_text_codes(model, head, texts: Sequence[str], batch_size: int = 64, device="cpu"
                      ) -> tuple[Tensor, Tensor]:
    """Strings -> (relaxed codes Float[M, bits], float embeddings Float[M, E]) with the model's tokenizer."""
    codes, embs = [], []
    for i in range(0, len(texts), batch_size):
        tok = model.tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                              max_length=model.cfg.text.max_length, return_tensors="pt")
        h, z = head.encode(model, "text", tok["input_ids"].to(device), tok["attention_mask"].to(device))
        codes.append(h.float().cpu())
        embs.append(z.float().cpu())
    return torch.cat(codes), torch.cat(embs)


def evaluate_hashing(model, shards, *, head: Optional[str] = None, languages: Optional[Sequence[str]] = None,
                     dataset: str = "", relevance: str = "labels", ks: Sequence[int] = (10, 100), radius: int = 2,
                     map_at: Optional[int] = None, float_baseline: bool = True, batch_size: int = 64,
                     device="cpu") -> list[dict]:
    """One record per (hashed media modality, language): hashing metrics for t2x and x2t.

    relevance: ``labels`` (share a label of ``meta["labels"]``), ``class`` (identical label sets) or
    ``identity`` (a caption is relevant to the items it describes; identical captions are merged as in
    :func:`mlmm.evaluation.runner.evaluate_retrieval`). Records follow
    :func:`mlmm.evaluation.retrieval.result_record` with task ``<m>-text-hashing``.
    """
    from mlmm.data.preprocess import Preprocessor, load_eval_items
    from mlmm.evaluation.runner import text_queries

    if relevance not in ("labels", "class", "identity"):
        raise ValueError(f"relevance must be labels|class|identity, got {relevance!r}")
    model.eval()
    hh = find_hash_head(model, head)
    media = [m for m in hh.modalities if m != "text"]
    if "text" not in hh.modalities or not media:
        raise ValueError(f"hashing evaluation needs hash codes for text and a media modality; head has {hh.modalities}")
    pre = Preprocessor(model.cfg, model.tokenizer, train=False)
    items = load_eval_items(shards, pre, media, languages)
    records = []
    for m in media:
        if m not in items:
            continue
        x_codes, x_emb = encode_media_codes(model, hh, m, items[m]["data"], batch_size, device)
        item_ids = [int(i) for i in items[m]["items"]]
        rows = {item: r for r, item in enumerate(item_ids)}
        item_labels = [list(items["meta"][i].get("labels") or []) for i in item_ids]
        if relevance != "identity" and not all(item_labels):
            raise ValueError(f"relevance={relevance!r} needs meta['labels'] on every {m} item; use 'identity'")
        for lang in sorted(items["captions"]):
            texts, positives = text_queries(items["captions"][lang], rows)  # positives Bool[M, N]
            if not texts:
                continue
            t_codes, t_emb = encode_text_codes(model, hh, texts, batch_size, device)
            if relevance == "identity":
                rel = positives
            else:
                t_labels = [sorted({lab for r in torch.nonzero(positives[j]).flatten().tolist()
                                    for lab in item_labels[r]}) for j in range(len(texts))]
                rel = relevance_from_labels(t_labels, item_labels, "any" if relevance == "labels" else "all")
            metrics = bidirectional_hash_metrics(
                x_codes, t_codes, rel, modality(m).code, ks, radius, map_at,
                x_emb=x_emb if float_baseline else None, t_emb=t_emb if float_baseline else None)
            metrics["bits"] = hh.bits
            metrics["n_texts"] = len(texts)
            records.append(result_record(modality(m).hashing_task, dataset, lang, metrics, n=len(item_ids)))
    return records
