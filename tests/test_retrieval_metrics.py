"""Retrieval metrics vs brute-force references, chunking, ties, hand-computed example, report, chance."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mlmm.evaluation import (
    bidirectional_retrieval,
    chance_recall,
    first_positive_ranks,
    load_results,
    markdown_table,
    result_record,
    retrieval_metrics,
    save_results,
)


# ------------------------------------------------------------------------------------ references
def reference_metrics(query: np.ndarray, gallery: np.ndarray, positives: list[list[int]], ks) -> dict:
    """Full argsort per query, simple loops. Among tied scores positives sort first (optimistic rule)."""
    scores = query @ gallery.T  # [Q, G]
    ranks, hits = [], {k: 0 for k in ks}
    for q in range(len(query)):
        is_pos = np.zeros(gallery.shape[0], dtype=bool)
        is_pos[positives[q]] = True
        order = np.lexsort((~is_pos, -scores[q]))  # primary: score desc; ties: positives first
        ranked_pos = is_pos[order]
        ranks.append(int(np.argmax(ranked_pos)) + 1)
        for k in ks:
            hits[k] += bool(ranked_pos[:k].any())
    out = {f"R@{k}": 100.0 * hits[k] / len(query) for k in ks}
    out["MdR"] = float(np.median(ranks))
    out["MnR"] = float(np.mean(ranks))
    return out


def random_case(seed: int, n_q: int = 37, n_g: int = 23, dim: int = 8, discrete: bool = False):
    """Random queries/gallery (float64) and 1-4 distinct positives per query."""
    rng = np.random.default_rng(seed)
    if discrete:  # small integers -> many exactly tied scores
        query = rng.integers(-1, 2, (n_q, dim)).astype(np.float64)
        gallery = rng.integers(-1, 2, (n_g, dim)).astype(np.float64)
    else:
        query, gallery = rng.standard_normal((n_q, dim)), rng.standard_normal((n_g, dim))
    positives = [sorted(rng.choice(n_g, size=rng.integers(1, 5), replace=False).tolist()) for _ in range(n_q)]
    return query, gallery, positives


def as_mask(positives: list[list[int]], n_g: int) -> torch.Tensor:
    mask = torch.zeros(len(positives), n_g, dtype=torch.bool)  # [Q, G]
    for q, cols in enumerate(positives):
        mask[q, cols] = True
    return mask


# ------------------------------------------------------------------------------- one direction
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("discrete", [False, True])
def test_matches_bruteforce_reference_multi_positive(seed: int, discrete: bool) -> None:
    query, gallery, positives = random_case(seed, discrete=discrete)
    ks = (1, 3, 5, 10, 50)
    expected = reference_metrics(query, gallery, positives, ks)
    q, g = torch.from_numpy(query), torch.from_numpy(gallery)
    for pos in (positives, as_mask(positives, g.shape[0])):
        got = retrieval_metrics(q, g, pos, ks=ks)
        assert got.keys() == expected.keys()
        for key in expected:
            assert got[key] == pytest.approx(expected[key], abs=1e-9), key


@pytest.mark.parametrize("chunk_size", [1, 7, 10_000])
def test_chunked_equals_unchunked(chunk_size: int) -> None:
    query, gallery, positives = random_case(3, n_q=50, n_g=31)
    q, g = torch.from_numpy(query).float(), torch.from_numpy(gallery).float()
    full = first_positive_ranks(q, g, positives, chunk_size=len(query))
    assert torch.equal(first_positive_ranks(q, g, positives, chunk_size=chunk_size), full)
    assert retrieval_metrics(q, g, positives, chunk_size=chunk_size) == \
        retrieval_metrics(q, g, positives, chunk_size=50)


def test_single_positive_index_tensor_equals_lists() -> None:
    query, gallery, _ = random_case(4)
    target = torch.arange(len(query)) % len(gallery)  # Long[Q]
    q, g = torch.from_numpy(query), torch.from_numpy(gallery)
    assert retrieval_metrics(q, g, target) == retrieval_metrics(q, g, [[int(t)] for t in target])


def test_ties_are_optimistic_and_deterministic() -> None:
    query = torch.tensor([[1.0, 0.0]])
    gallery = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])  # scores 1, 1, 0, 0.5
    assert first_positive_ranks(query, gallery, [[1]]).tolist() == [1]  # tied with item 0 -> rank 1
    assert first_positive_ranks(query, gallery, [[0]]).tolist() == [1]
    assert first_positive_ranks(query, gallery, [[3]]).tolist() == [3]  # two strictly higher
    assert first_positive_ranks(query, gallery, [[2]]).tolist() == [4]
    assert first_positive_ranks(query, gallery, [[2, 3]]).tolist() == [3]  # best positive counts
    # all scores identical: every positive is rank 1, whatever its index or the chunking
    flat = torch.ones(5, 3)
    for chunk in (1, 2, 5):
        assert first_positive_ranks(flat, flat, [[4]] * 5, chunk_size=chunk).tolist() == [1] * 5


def test_query_without_positive_raises() -> None:
    q, g = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="no positive"):
        retrieval_metrics(q, g, [[0], [], [2]])
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 1] = mask[2, 0] = True
    with pytest.raises(ValueError, match="no positive"):
        retrieval_metrics(q, g, mask)


def test_bad_inputs_raise() -> None:
    q, g = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        retrieval_metrics(q, g, [[0], [5], [1]])
    with pytest.raises(ValueError, match="shape"):
        retrieval_metrics(q, g, torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="dims differ"):
        retrieval_metrics(q, torch.randn(5, 3), [[0]] * 3)
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.full((3, 4), float("nan")), g, [[0]] * 3)


# ----------------------------------------------------------------------------- hand-computed
def test_hand_computed_three_items_two_captions() -> None:
    items = torch.eye(3)  # item0 = x, item1 = y, item2 = z axis
    texts = torch.tensor(
        [
            [1.0, 0.0, 0.0],  # t0 -> item0: scores (1, 0, 0)        -> rank 1
            [0.6, 0.8, 0.0],  # t1 -> item0: scores (.6, .8, 0)      -> rank 2
            [0.0, 1.0, 0.0],  # t2 -> item1: scores (0, 1, 0)        -> rank 1
            [0.0, 0.6, 0.8],  # t3 -> item1: scores (0, .6, .8)      -> rank 2
            [0.8, 0.0, 0.6],  # t4 -> item2: scores (.8, 0, .6)      -> rank 2
            [0.64, 0.6, 0.48],  # t5 -> item2: scores (.64, .6, .48) -> rank 3
        ]
    )
    text_to_item = [0, 0, 1, 1, 2, 2]
    m = bidirectional_retrieval(items, texts, text_to_item, x_name="image", ks=(1, 2, 5, 10))
    # t2i ranks [1, 2, 1, 2, 2, 3]: R@1 = 2/6, R@2 = 5/6, R@5 = R@10 = 6/6,
    # MdR = median(1, 1, 2, 2, 2, 3) = 2, MnR = 11/6
    assert m["t2i_R@1"] == pytest.approx(100 * 2 / 6)
    assert m["t2i_R@2"] == pytest.approx(100 * 5 / 6)
    assert m["t2i_R@5"] == m["t2i_R@10"] == 100.0
    assert m["t2i_MdR"] == 2.0 and m["t2i_MnR"] == pytest.approx(11 / 6)
    # i2t: item0 scores texts by x-coord (1, .6, 0, 0, .8, .64), positives t0,t1: best 1   -> rank 1
    #      item1 by y-coord (0, .8, 1, .6, 0, .6),  positives t2,t3: best 1              -> rank 1
    #      item2 by z-coord (0, 0, 0, .8, .6, .48), positives t4,t5: best .6 < .8 (t3) -> rank 2
    # ranks [1, 1, 2]: R@1 = 2/3, R@2.. = 100, MdR = 1, MnR = 4/3
    assert m["i2t_R@1"] == pytest.approx(100 * 2 / 3)
    assert m["i2t_R@2"] == m["i2t_R@5"] == m["i2t_R@10"] == 100.0
    assert m["i2t_MdR"] == 1.0 and m["i2t_MnR"] == pytest.approx(4 / 3)
    assert m["mean_R@1"] == pytest.approx(50.0)
    # rsum over ks=(1, 2, 5, 10): 33.33 + 83.33 + 100 + 100 + 66.67 + 100 + 100 + 100
    assert m["rsum"] == pytest.approx(683.3333333, abs=1e-6)
    six = bidirectional_retrieval(items, texts, text_to_item)  # default ks (1, 5, 10)
    assert six["rsum"] == pytest.approx(100 * 2 / 6 + 100 + 100 + 100 * 2 / 3 + 100 + 100)  # = 500


def test_bidirectional_matches_reference_and_rsum() -> None:
    rng = np.random.default_rng(5)
    n_items, dim = 17, 6
    text_to_item = np.concatenate([rng.integers(0, n_items - 3, 40), [0, 1]])  # items 14..16 have no text
    x, t = rng.standard_normal((n_items, dim)), rng.standard_normal((len(text_to_item), dim))
    m = bidirectional_retrieval(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(text_to_item),
                                x_name="video", chunk_size=4)
    t2v = reference_metrics(t, x, [[int(i)] for i in text_to_item], (1, 5, 10))
    with_text = sorted(set(text_to_item.tolist()))  # x2t queries: only items that have texts
    v2t = reference_metrics(x[with_text], t, [np.flatnonzero(text_to_item == i).tolist() for i in with_text],
                            (1, 5, 10))
    for key, value in t2v.items():
        assert m[f"t2v_{key}"] == pytest.approx(value)
    for key, value in v2t.items():
        assert m[f"v2t_{key}"] == pytest.approx(value)
    six = [m[f"{d}_R@{k}"] for d in ("t2v", "v2t") for k in (1, 5, 10)]
    assert m["rsum"] == pytest.approx(sum(six))
    assert m["mean_R@5"] == pytest.approx((m["t2v_R@5"] + m["v2t_R@5"]) / 2)
    assert "t2x_R@1" in bidirectional_retrieval(torch.from_numpy(x), torch.from_numpy(t), text_to_item, x_short="x")


def test_text_positives_shared_captions() -> None:
    items = torch.eye(3)
    texts = torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.96, 0.28]])  # t0 -> item0 (also item1), t1 -> item2
    relation = torch.tensor([[True, True, False], [False, False, True]])  # t0 is also a caption of item1
    plain = bidirectional_retrieval(items, texts, [0, 2], x_name="audio")
    shared = bidirectional_retrieval(items, texts, [0, 2], x_name="audio", text_positives=relation)
    # t2a: t0 scores items (.6, .8, 0): rank 2 plain, rank 1 shared; t1 scores (0, .96, .28): rank 2
    assert plain["t2a_R@1"] == 0.0 and shared["t2a_R@1"] == 50.0
    # a2t: plain queries items 0, 2 (ranks 1, 1); shared adds item1, scoring texts (.8, .96) -> t0 rank 2
    assert plain["a2t_R@1"] == 100.0 and plain["a2t_MnR"] == 1.0
    assert shared["a2t_R@1"] == pytest.approx(200 / 3) and shared["a2t_MnR"] == pytest.approx(4 / 3)
    with pytest.raises(ValueError, match="own item"):
        bidirectional_retrieval(items, texts, [2, 2], text_positives=relation)


# ------------------------------------------------------------------------------ records & report
def _records() -> list[dict]:
    m = {"t2i_R@1": 41.234, "t2i_R@5": 70.0, "t2i_R@10": 80.5, "i2t_R@1": 50.0, "i2t_R@5": 77.777,
         "i2t_R@10": 88.0, "t2i_MdR": 2.0, "rsum": 407.511}
    return [
        result_record("retrieval", "xm3600", "en", m, 3600),
        result_record("retrieval", "xm3600", "日本語", {**m, "t2i_R@1": 12.5}, 3600),
        result_record("retrieval", "msrvtt", "de", {"t2v_R@1": 20.0, "v2t_R@1": 22.0, "rsum": 42.0}, 1000),
    ]


def test_save_load_round_trip(tmp_path) -> None:
    records = _records()
    path = save_results(records, tmp_path / "sub" / "results.json")
    assert load_results(path) == records
    assert "日本語" in path.read_text(encoding="utf-8")  # ensure_ascii=False


def test_markdown_table_rows_and_format() -> None:
    table = markdown_table(_records())
    assert "### retrieval (xm3600)" in table and "### retrieval (msrvtt)" in table
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("| language"))
    assert header == "| language | t2i_R@1 | t2i_R@5 | t2i_R@10 | i2t_R@1 | i2t_R@5 | i2t_R@10 | rsum | n |"
    assert "| en | 41.23 | 70.00 | 80.50 | 50.00 | 77.78 | 88.00 | 407.51 | 3600 |" in lines
    assert any(line.startswith("| 日本語 | 12.50 |") for line in lines)
    assert "| de | 20.00 | 22.00 | 42.00 | 1000 |" in lines
    custom = markdown_table(_records()[:1], metrics=["t2i_MdR", "missing"])
    assert "| en | 2.0 | – | 3600 |" in custom


# ------------------------------------------------------------------------------------- chance
def test_chance_recall_exact_small_cases() -> None:
    assert chance_recall(10) == pytest.approx(10.0)
    assert chance_recall(10, k=5) == pytest.approx(50.0)
    assert chance_recall(4, n_positives=2, k=2) == pytest.approx(100 * (1 - 1 / 6))
    assert chance_recall(20, 3, 5) == pytest.approx(100 * (1 - math.comb(17, 5) / math.comb(20, 5)))
    assert chance_recall(5, 1, 10) == 100.0 and chance_recall(5, 3, 3) == 100.0
    with pytest.raises(ValueError):
        chance_recall(5, n_positives=6)


def test_chance_recall_matches_monte_carlo() -> None:
    # given a query, iid Gaussian gallery embeddings give iid scores -> a uniformly random ranking
    gen = torch.Generator().manual_seed(0)
    n_q, n_g, n_pos = 4000, 20, 3
    q, g = torch.randn(n_q, 16, generator=gen), torch.randn(n_g, 16, generator=gen)
    positives = [torch.randperm(n_g, generator=gen)[:n_pos].tolist() for _ in range(n_q)]
    m = retrieval_metrics(q, g, positives, ks=(1, 5))
    for k in (1, 5):
        assert m[f"R@{k}"] == pytest.approx(chance_recall(n_g, n_pos, k), abs=3.0)
