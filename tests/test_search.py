"""mlmm.search: bit packing, popcount, exact Hamming / cosine top-k, faiss <-> torch agreement, index files."""
import numpy as np
import pytest
import torch

from mlmm.search import (FloatIndex, HammingIndex, cosine_topk, faiss_available, hamming_distances,
                         hamming_rerank_search, hamming_topk, pack_codes, popcount64, recall_at_k, rerank,
                         unpack_codes)

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss-cpu not installed")


def brute_hamming(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Reference: count differing signs of relaxed codes a [Q, K], b [N, K] -> Long[Q, N]."""
    return ((a[:, None, :] > 0) != (b[None, :, :] > 0)).sum(-1)


def brute_topk(dist: torch.Tensor, k: int):
    """Ascending (distance, index) order."""
    order = torch.sort(dist, dim=1, stable=True).indices[:, :k]
    return torch.gather(dist, 1, order), order


@pytest.mark.parametrize("bits", [8, 24, 64, 128])
def test_pack_round_trip_and_numpy_bit_order(bits):
    g = torch.Generator().manual_seed(bits)
    h = torch.randn(37, bits, generator=g)
    h[0, :3] = 0.0  # 0 maps to bit 0 / -1
    packed = pack_codes(h)
    assert packed.dtype == torch.uint8 and packed.shape == (37, bits // 8)
    np.testing.assert_array_equal(packed.numpy(), np.packbits((h > 0).numpy(), axis=1))
    assert torch.equal(unpack_codes(packed), torch.where(h > 0, 1.0, -1.0))
    assert torch.equal(unpack_codes(packed, signed=False), (h > 0).float())
    assert torch.equal(pack_codes(unpack_codes(packed)), packed)


def test_pack_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_codes(torch.randn(3, 12))
    with pytest.raises(ValueError, match="2-D"):
        pack_codes(torch.randn(12))


def test_popcount64_matches_python_on_signed_words():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2**63, 2**63 - 1, (2000,), dtype=torch.int64, generator=g)
    x[:4] = torch.tensor([0, -1, -2**63, 2**63 - 1])
    expected = torch.tensor([bin(v & (2**64 - 1)).count("1") for v in x.tolist()])
    assert torch.equal(popcount64(x), expected)


@pytest.mark.parametrize("bits,method", [(64, "swar"), (128, "swar"), (64, "lut"), (24, "lut"), (24, "auto")])
def test_hamming_distances_equal_brute_force(bits, method):
    g = torch.Generator().manual_seed(bits)
    q, d = torch.randn(13, bits, generator=g), torch.randn(101, bits, generator=g)
    dist = hamming_distances(pack_codes(q), pack_codes(d), method)
    assert dist.dtype == torch.int32
    assert torch.equal(dist.long(), brute_hamming(q, d))


def test_hamming_topk_is_ordered_by_distance_then_index():
    g = torch.Generator().manual_seed(1)
    # 16-bit codes from a small pool: many exact ties, the tie rule matters
    pool = torch.randn(20, 16, generator=g)
    db = pool[torch.randint(0, 20, (500,), generator=g)]
    q = torch.randn(30, 16, generator=g)
    dist, ids = hamming_topk(pack_codes(q), pack_codes(db), k=25, chunk_size=7)
    ref_d, ref_i = brute_topk(brute_hamming(q, db), 25)
    assert torch.equal(dist.long(), ref_d) and torch.equal(ids, ref_i)


def test_torch_index_search_padding_and_save_load(tmp_path):
    g = torch.Generator().manual_seed(2)
    db, q = torch.randn(50, 32, generator=g), torch.randn(5, 32, generator=g)
    index = HammingIndex(32, backend="torch").add(pack_codes(db[:20])).add(pack_codes(db[20:]))
    assert len(index) == 50
    dist, ids = index.search(pack_codes(q), 60)  # k > N: padded
    ref_d, ref_i = brute_topk(brute_hamming(q, db), 50)
    assert torch.equal(dist[:, :50].long(), ref_d) and torch.equal(ids[:, :50], ref_i)
    assert (ids[:, 50:] == -1).all() and (dist[:, 50:] == 33).all()
    path = index.save(tmp_path / "db.hidx")
    again = HammingIndex.load(path, backend="torch")
    assert torch.equal(again.codes, index.codes)
    assert all(torch.equal(a, b) for a, b in zip(again.search(pack_codes(q), 7), index.search(pack_codes(q), 7)))
    (tmp_path / "bad.hidx").write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="unreadable index file"):
        HammingIndex.load(tmp_path / "bad.hidx")
    FloatIndex(4, backend="torch").add(torch.randn(3, 4)).save(tmp_path / "f.idx")
    with pytest.raises(ValueError, match="not an mlmm hamming index"):
        HammingIndex.load(tmp_path / "f.idx")
    with pytest.raises(ValueError, match="bits"):
        index.search(pack_codes(torch.randn(2, 64)), 3)


def assert_same_knn(dist_a, ids_a, dist_b, ids_b, true_dist):
    """Equal distances; ids may differ only among ties at the k-th distance; reported distances are true."""
    assert torch.equal(dist_a.long(), dist_b.long())
    for ids, dist in ((ids_a, dist_a), (ids_b, dist_b)):
        assert torch.equal(torch.gather(true_dist, 1, ids), dist.long())
    kth = dist_a[:, -1:].long()
    for r in range(ids_a.shape[0]):
        inner_a = set(ids_a[r][dist_a[r] < kth[r]].tolist())
        inner_b = set(ids_b[r][dist_b[r] < kth[r]].tolist())
        assert inner_a == inner_b


@needs_faiss
@pytest.mark.parametrize("bits", [32, 64, 128])
def test_faiss_flat_and_torch_agree(bits):
    g = torch.Generator().manual_seed(bits)
    db, q = torch.randn(3000, bits, generator=g), torch.randn(40, bits, generator=g)
    pd, pq = pack_codes(db), pack_codes(q)
    fa = HammingIndex(bits, backend="faiss").add(pd)
    to = HammingIndex(bits, backend="torch").add(pd)
    (fd, fi), (td, ti) = fa.search(pq, 20), to.search(pq, 20)
    assert_same_knn(fd, fi, td, ti, brute_hamming(q, db))


@needs_faiss
def test_faiss_hnsw_recall_and_save_load_without_rebuild(tmp_path):
    g = torch.Generator().manual_seed(3)
    centers = torch.randn(50, 64, generator=g)
    db = centers[torch.randint(0, 50, (4000,), generator=g)] + 0.6 * torch.randn(4000, 64, generator=g)
    q = centers[torch.randint(0, 50, (50,), generator=g)] + 0.6 * torch.randn(50, 64, generator=g)
    hnsw = HammingIndex(64, kind="hnsw", backend="faiss", hnsw_m=16, ef_search=64).add(pack_codes(db))
    exact_d, _ = HammingIndex(64, backend="torch").add(pack_codes(db)).search(pack_codes(q), 10)
    hd, hi = hnsw.search(pack_codes(q), 10)
    # approximate: the returned distances are true ones and (nearly) as small as the exact k-NN's
    assert torch.equal(torch.gather(brute_hamming(q, db), 1, hi), hd.long())
    assert float((hd.float().mean(1) - exact_d.float().mean(1)).mean()) < 0.5
    path = hnsw.save(tmp_path / "h.hidx")
    again = HammingIndex.load(path)
    assert again.kind == "hnsw" and again._faiss.ntotal == 4000
    d2, i2 = again.search(pack_codes(q), 10)
    assert torch.equal(d2, hd) and torch.equal(i2, hi)
    fallback = HammingIndex.load(path, backend="torch")  # without faiss: exact search over the stored codes
    assert fallback.kind == "flat" and torch.equal(fallback.search(pack_codes(q), 10)[0], exact_d)


def test_cosine_topk_rerank_and_recall():
    g = torch.Generator().manual_seed(4)
    db, q = torch.randn(300, 16, generator=g), torch.randn(20, 16, generator=g)
    s, i = cosine_topk(q, db, 10, chunk_size=6)
    ref = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(db, dim=1).T
    rs, ri = torch.topk(ref, 10, dim=1)
    torch.testing.assert_close(s, rs)
    assert torch.equal(i, ri)
    all_ids = torch.arange(300).expand(20, 300)
    s2, i2 = rerank(q, db, all_ids, 10)
    assert torch.equal(i2, ri)
    cand = torch.cat([ri[:, :5], torch.full((20, 3), -1)], 1)  # padding ids are never returned
    _, i3 = rerank(q, db, cand, 8)
    assert (i3[:, :5] == ri[:, :5]).all() and (i3[:, 5:] == -1).all()
    found, truth = torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([[3, 2, 9], [7, 8, 9]])
    assert recall_at_k(found, truth) == pytest.approx(2 / 6)


@pytest.mark.parametrize("backend", ["torch", pytest.param("faiss", marks=needs_faiss)])
def test_float_index_and_two_stage_search(backend, tmp_path):
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(400, 32, generator=g)
    q = emb[:25] + 0.1 * torch.randn(25, 32, generator=g)
    fidx = FloatIndex(32, backend=backend).add(emb)
    s, i = fidx.search(q, 10)
    rs, ri = cosine_topk(q, emb, 10)
    torch.testing.assert_close(s, rs, rtol=1e-5, atol=1e-5)
    assert torch.equal(i, ri)
    again = FloatIndex.load(fidx.save(tmp_path / "f.idx"), backend=backend)
    assert torch.equal(again.search(q, 10)[1], i)
    # codes = signs of a random projection (LSH): re-ranking all candidates recovers the float top-k exactly
    proj = torch.randn(32, 64, generator=g)
    hidx = HammingIndex(64, backend=backend).add(pack_codes(emb @ proj))
    _, full = hamming_rerank_search(hidx, pack_codes(q @ proj), q, emb, k=10, candidates=400)
    assert torch.equal(full, ri)
    _, ham = hidx.search(pack_codes(q @ proj), 10)
    _, two = hamming_rerank_search(hidx, pack_codes(q @ proj), q, emb, k=10, candidates=100)
    assert recall_at_k(two, ri) >= recall_at_k(ham, ri)
