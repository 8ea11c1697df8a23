"""Cross-modal retrieval metrics over precomputed embeddings (no model, no data loading).

    m = bidirectional_retrieval(image_emb, text_emb, text_to_item, x_name="image")
    m["t2i_R@1"], m["i2t_R@1"], m["rsum"]

Conventions (CLIP_benchmark / MSR-VTT literature):

* similarity = dot product; the caller L2-normalises, so this is cosine similarity.
* a query *hits* at k if ANY of its positives is among its top-k gallery items;
  recalls are percentages in [0, 100].
* the *rank* of a query is the 1-based rank of its best-ranked (first) positive;
  MdR / MnR are the median / mean of these ranks (median as ``numpy.median``: for an even
  number of queries it is the mean of the two middle ranks).
* **Tie rule (optimistic, deterministic):**
  ``rank = 1 + #{gallery items whose score is strictly higher than the best positive's score}``.
  A gallery item tied with the best positive never pushes it down, and ``hit@k <=> rank <= k``.
  Implementations based on ``torch.topk`` (CLIP_benchmark) break exact ties by kernel order, so
  they can differ from this rule only on exactly tied scores.
* memory: queries are processed in chunks; at most ``chunk_size x G`` scores exist at once (the
  comparison is done in place), so 100k x 10k evaluations fit on a laptop.
  Scores are computed in at least float32 (float64 inputs stay float64).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from mlmm.modalities import MODALITIES, modality

# A positive relation: Bool[Q, G] mask, Long[Q] (one positive per query) or one index list per query.
Positives = Union[Tensor, Sequence[Sequence[int]]]
TEXT_SHORT = modality("text").code


# ------------------------------------------------------------------------------- positives (CSR)
@dataclass(frozen=True)
class _CSR:
    """Positives of Q queries as compressed rows: query q owns ``cols[offsets[q]:offsets[q + 1]]``."""

    offsets: Tensor  # Long[Q + 1], offsets[0] == 0
    cols: Tensor  # Long[P], gallery indices

    def rows_cols(self, start: int, end: int) -> tuple[Tensor, Tensor]:
        """(row within the chunk, gallery index) pairs of queries ``start:end``: two Long[P_chunk]."""
        lo, hi = int(self.offsets[start]), int(self.offsets[end])
        lengths = self.offsets[start + 1 : end + 1] - self.offsets[start:end]  # [c]
        rows = torch.repeat_interleave(torch.arange(end - start, device=lengths.device), lengths)
        return rows, self.cols[lo:hi]


def _csr_from_lists(lists: Sequence[Sequence[int]]) -> _CSR:
    lengths = torch.tensor([len(p) for p in lists], dtype=torch.long)  # [Q]
    cols = torch.tensor([int(c) for p in lists for c in p], dtype=torch.long)  # [P]
    offsets = torch.zeros(len(lists) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(lengths, 0)
    return _CSR(offsets, cols)


def _normalise_positives(positives: Union[Positives, _CSR], n_queries: int, n_gallery: int) -> Union[Tensor, _CSR]:
    """Check ``positives`` against [Q, G] and return a Bool[Q, G] mask or a :class:`_CSR`.

    Raises ValueError for a wrong shape, an out-of-range index or a query without any positive.
    """
    if isinstance(positives, _CSR):
        pos: Union[Tensor, _CSR] = positives
    elif isinstance(positives, Tensor) and positives.dim() == 2:
        if tuple(positives.shape) != (n_queries, n_gallery):
            raise ValueError(f"positives mask has shape {tuple(positives.shape)}, "
                             f"expected [Q, G] = [{n_queries}, {n_gallery}]")
        pos = positives if positives.dtype == torch.bool else positives != 0
    elif isinstance(positives, Tensor):
        if positives.dim() != 1 or positives.is_floating_point() or positives.dtype == torch.bool:
            raise ValueError("a positives tensor must be a Bool[Q, G] mask or an integer [Q] index "
                             "(one positive per query)")
        if positives.numel() != n_queries:
            raise ValueError(f"positives index has {positives.numel()} entries, expected Q = {n_queries}")
        pos = _CSR(torch.arange(n_queries + 1), positives.detach().long().cpu())
    else:
        if len(positives) != n_queries:
            raise ValueError(f"positives has {len(positives)} lists, expected Q = {n_queries}")
        pos = _csr_from_lists(positives)

    if isinstance(pos, _CSR):
        if pos.cols.numel() and (int(pos.cols.min()) < 0 or int(pos.cols.max()) >= n_gallery):
            raise ValueError(f"positive indices must be in [0, {n_gallery}), "
                             f"got [{int(pos.cols.min())}, {int(pos.cols.max())}]")
        has_pos = pos.offsets[1:] > pos.offsets[:-1]  # [Q]
    else:
        has_pos = pos.any(dim=1).cpu()  # [Q]
    if not bool(has_pos.all()):
        missing = torch.nonzero(~has_pos).flatten()
        raise ValueError(
            f"{missing.numel()} of {n_queries} queries have no positive (first: {missing[:5].tolist()}); "
            "filter them out before calling"
        )
    return pos


def _check_embeddings(query_emb: Tensor, gallery_emb: Tensor) -> None:
    if query_emb.dim() != 2 or gallery_emb.dim() != 2:
        raise ValueError(f"embeddings must be 2-D, got query {tuple(query_emb.shape)} "
                         f"and gallery {tuple(gallery_emb.shape)}")
    if query_emb.shape[1] != gallery_emb.shape[1]:
        raise ValueError(f"embedding dims differ: query D={query_emb.shape[1]}, gallery D={gallery_emb.shape[1]}")
    if query_emb.shape[0] == 0 or gallery_emb.shape[0] == 0:
        raise ValueError(f"need at least one query and one gallery item, "
                         f"got Q={query_emb.shape[0]}, G={gallery_emb.shape[0]}")
    for name, emb in (("query", query_emb), ("gallery", gallery_emb)):
        if not bool(torch.isfinite(emb).all()):
            raise ValueError(f"{name} embeddings contain NaN or inf")


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of integers >= 1, got {ks}")
    return ks


# ------------------------------------------------------------------------------------ core metric
def first_positive_ranks(
    query_emb: Tensor,
    gallery_emb: Tensor,
    positives: Union[Positives, _CSR],
    chunk_size: int = 1024,
) -> Tensor:
    """1-based rank of each query's best-ranked positive (optimistic tie rule, see module doc).

    Args:
        query_emb: [Q, D] query embeddings (L2-normalised by the caller).
        gallery_emb: [G, D] gallery embeddings.
        positives: Bool[Q, G] mask, Long[Q] single positive per query, or list of index lists.
        chunk_size: queries scored at once; bounds memory to chunk_size x G scores.

    Returns:
        Long[Q] on CPU, values in [1, G].
    """
    _check_embeddings(query_emb, gallery_emb)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n_queries, n_gallery = query_emb.shape[0], gallery_emb.shape[0]
    pos = _normalise_positives(positives, n_queries, n_gallery)
    device = gallery_emb.device
    dtype = torch.promote_types(torch.promote_types(query_emb.dtype, gallery_emb.dtype), torch.float32)
    gallery = gallery_emb.detach().to(dtype)  # [G, D]
    if isinstance(pos, _CSR):
        pos = _CSR(pos.offsets.to(device), pos.cols.to(device))

    ranks = torch.empty(n_queries, dtype=torch.long)  # [Q]
    sum_dtype = dtype if n_gallery < 2**24 else torch.float64  # counts of 0/1 floats stay exact
    with torch.no_grad():
        for start in range(0, n_queries, chunk_size):
            end = min(start + chunk_size, n_queries)
            scores = query_emb[start:end].detach().to(device=device, dtype=dtype) @ gallery.T  # [c, G]
            if isinstance(pos, _CSR):
                rows, cols = pos.rows_cols(start, end)  # [P_c], [P_c]
            else:
                rows, cols = torch.nonzero(pos[start:end].to(device), as_tuple=True)  # [P_c], [P_c]
            best = torch.full((end - start,), float("-inf"), dtype=dtype, device=device)  # [c]
            best.scatter_reduce_(0, rows, scores[rows, cols], reduce="amax")
            # positives never score strictly above `best`, so this counts only better non-positives.
            # In place (scores becomes 0./1.): a bool mask + its int64 sum would cost 9 bytes x c x G.
            scores.gt_(best[:, None])  # [c, G]
            ranks[start:end] = 1 + scores.sum(dim=1, dtype=sum_dtype).round().long().cpu()
            del scores  # free this chunk before the next matmul allocates its own
    return ranks


def _metrics_from_ranks(ranks: Tensor, ks: Sequence[int]) -> dict[str, float]:
    """R@k (percent), MdR (numpy-style median) and MnR of Long[Q] ranks."""
    n = ranks.numel()
    out = {f"R@{k}": 100.0 * int((ranks <= k).sum()) / n for k in ks}
    ordered = torch.sort(ranks).values.double()  # [Q]
    out["MdR"] = float((ordered[(n - 1) // 2] + ordered[n // 2]) / 2)
    out["MnR"] = float(ranks.double().mean())
    return out


def retrieval_metrics(
    query_emb: Tensor,
    gallery_emb: Tensor,
    positives: Positives,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@k, median rank and mean rank for one retrieval direction.

    Args:
        query_emb: [Q, D] (L2-normalised by the caller; similarity is the dot product).
        gallery_emb: [G, D].
        positives: Bool[Q, G] mask, Long[Q] single positive per query, or ``list[list[int]]``.
            Every query needs at least one positive (ValueError otherwise).
        ks: cut-offs for recall.
        chunk_size: queries per chunk (memory bound chunk_size x G).

    Returns:
        ``{"R@k": percent for k in ks, "MdR": median rank, "MnR": mean rank}`` where the rank is
        that of the best positive, 1-based, ``1 + #(gallery scores > best positive score)``.
    """
    ks = _check_ks(ks)
    return _metrics_from_ranks(first_positive_ranks(query_emb, gallery_emb, positives, chunk_size), ks)


def _short_name(x_name: str, x_short: Optional[str]) -> str:
    short = x_short if x_short is not None else modality(x_name).code if x_name in MODALITIES else x_name[:1].lower()
    if not short or short == TEXT_SHORT:
        raise ValueError(f"short name {short!r} for modality {x_name!r} is empty or clashes with text ('t'); "
                         "pass x_short=")
    return short


def bidirectional_retrieval(
    x_emb: Tensor,
    t_emb: Tensor,
    text_to_item: Union[Tensor, Sequence[int]],
    x_name: str = "image",
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
    text_positives: Optional[Tensor] = None,
    x_short: Optional[str] = None,
) -> dict[str, float]:
    """Text<->X retrieval with several texts per item (CLIP / MSR-VTT protocol).

    Args:
        x_emb: [N, D] item embeddings (images, videos, audio clips).
        t_emb: [M, D] text embeddings.
        text_to_item: Long[M] (or list) — the item index of each text.
        x_name: modality name; keys use its code (mlmm.modalities: "image" -> "i", "video" -> "v", "audio" -> "a"),
            the first letter of a name that is not a registered modality.
        ks: recall cut-offs.
        chunk_size: queries per chunk.
        text_positives: optional Bool[M, N] relation replacing ``text_to_item`` as the set of
            positives (e.g. identical captions shared by several items); must contain each text's own item.
        x_short: explicit short name overriding that.

    t2x: every text queries all N items (items without texts stay in the gallery).
    x2t: every item with at least one positive text queries all M texts; its positives are the
    transpose of the same relation. Items without texts are skipped as queries.

    Returns:
        ``t2{x}_R@k``, ``t2{x}_MdR``, ``t2{x}_MnR``, ``{x}2t_R@k``, ``{x}2t_MdR``, ``{x}2t_MnR``,
        ``mean_R@k`` (mean of both directions) and ``rsum`` (sum of the recalls of both directions
        over ``ks``; the usual six-recall rSum for ks=(1, 5, 10)).
    """
    ks = _check_ks(ks)
    x0 = _short_name(x_name, x_short)
    _check_embeddings(t_emb, x_emb)
    n_items, n_texts = x_emb.shape[0], t_emb.shape[0]
    item_of_text = torch.as_tensor(text_to_item, dtype=torch.long).cpu().flatten()  # [M]
    if item_of_text.numel() != n_texts:
        raise ValueError(f"text_to_item has {item_of_text.numel()} entries but there are {n_texts} texts")
    if int(item_of_text.min()) < 0 or int(item_of_text.max()) >= n_items:
        raise ValueError(f"text_to_item values must be in [0, {n_items})")

    if text_positives is None:
        t2x_pos: Union[Tensor, _CSR] = _CSR(torch.arange(n_texts + 1), item_of_text)
        rel_text, rel_item = torch.arange(n_texts), item_of_text  # [P], [P]
    else:
        if tuple(text_positives.shape) != (n_texts, n_items):
            raise ValueError(f"text_positives has shape {tuple(text_positives.shape)}, "
                             f"expected [M, N] = [{n_texts}, {n_items}]")
        rel = (text_positives if text_positives.dtype == torch.bool else text_positives != 0).cpu()  # [M, N]
        if not bool(rel[torch.arange(n_texts), item_of_text].all()):
            raise ValueError("text_positives must mark each text's own item (text_to_item) as positive")
        t2x_pos = rel
        rel_text, rel_item = torch.nonzero(rel, as_tuple=True)  # [P], [P]

    # x2t relation = transpose: group the (text, item) pairs by item
    order = torch.argsort(rel_item, stable=True)
    counts = torch.bincount(rel_item, minlength=n_items)  # [N]
    queries = torch.nonzero(counts > 0).flatten()  # [N'] items with at least one text
    offsets = torch.zeros(queries.numel() + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(counts[queries], 0)
    x2t_pos = _CSR(offsets, rel_text[order])

    t2x = _metrics_from_ranks(first_positive_ranks(t_emb, x_emb, t2x_pos, chunk_size), ks)
    x_queries = x_emb[queries.to(x_emb.device)]  # [N', D]
    x2t = _metrics_from_ranks(first_positive_ranks(x_queries, t_emb, x2t_pos, chunk_size), ks)

    out: dict[str, float] = {}
    for prefix, metrics in ((f"t2{x0}", t2x), (f"{x0}2t", x2t)):
        out.update({f"{prefix}_{key}": value for key, value in metrics.items()})
    for k in ks:
        out[f"mean_R@{k}"] = (t2x[f"R@{k}"] + x2t[f"R@{k}"]) / 2
    out["rsum"] = sum(t2x[f"R@{k}"] + x2t[f"R@{k}"] for k in ks)
    return out


# ----------------------------------------------------------------------------------- result JSON
def result_record(task: str, dataset: str, language: str, metrics: Mapping[str, Any], n: int) -> dict[str, Any]:
    """One eval result: ``{"task", "dataset", "language", "n", "metrics": {name: float}}``."""
    if int(n) < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return {
        "task": str(task),
        "dataset": str(dataset),
        "language": str(language),
        "n": int(n),
        "metrics": {str(k): float(v) for k, v in metrics.items()},
    }


def save_results(records: Sequence[Mapping[str, Any]], path: Union[str, os.PathLike]) -> Path:
    """Write ``{"results": records}`` as pretty UTF-8 JSON (atomically, via a temp file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"results": list(records)}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_results(path: Union[str, os.PathLike]) -> list[dict[str, Any]]:
    """Read the records written by :func:`save_results`."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise ValueError(f"{path}: expected a JSON object with a 'results' list")
    return data["results"]
