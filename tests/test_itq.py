"""ITQ codes of float embeddings: lower quantisation error than PCA alone, and Hamming top-C + float re-rank
recovers the float top-10."""
import torch
import torch.nn.functional as F

from mlmm.search import HammingIndex, cosine_topk, pack_codes, recall_at_k, rerank
from mlmm.search.itq import ITQ


def clustered(n, d, clusters, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, d, generator=g)
    x = centres[torch.randint(0, clusters, (n,), generator=g)] + 0.6 * torch.randn(n, d, generator=g)
    return F.normalize(x, dim=-1)


def test_rotation_lowers_the_quantisation_error():
    x = clustered(1500, 64, 20, seed=0)
    pca_only = ITQ(bits=32, iterations=0).fit(x)  # PCA + the random initial rotation
    itq = ITQ(bits=32, iterations=50).fit(x)
    assert itq.quantization_error(x) < 0.97 * pca_only.quantization_error(x)
    codes = itq.encode(x)
    assert codes.shape == (1500, 32) and codes.dtype == torch.uint8 and set(codes.unique().tolist()) <= {0, 1}
    balance = codes.float().mean(0)
    assert float(balance.min()) > 0.2 and float(balance.max()) < 0.8  # centred: bits are used


def test_hamming_candidates_rerank_recover_the_float_neighbours():
    db, queries = clustered(3000, 64, 30, seed=1), clustered(200, 64, 30, seed=1)[:200]
    noise = torch.randn(queries.shape, generator=torch.Generator().manual_seed(2))
    queries = F.normalize(queries + 0.1 * noise, dim=-1)
    _, truth = cosine_topk(queries, db, 10)
    itq = ITQ(bits=64).fit(db)
    index = HammingIndex(64).add(pack_codes(itq.encode(db)))
    _, ham = index.search(pack_codes(itq.encode(queries)), 10)
    _, cand = index.search(pack_codes(itq.encode(queries)), 200)
    _, found = rerank(queries, db, cand, 10)
    plain, reranked = recall_at_k(ham, truth), recall_at_k(found, truth)
    assert reranked >= 0.9 and reranked > plain
