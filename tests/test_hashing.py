"""Cross-modal hashing: metrics vs hand-computed values, loss terms vs references, head variants, and a
tiny hashing model trained through the Trainer reaching mAP far above a random ranking."""
import itertools
from pathlib import Path

import pytest
from conftest import build_tiny_data
import torch

from mlmm.config import ConfigError, build_config, load_config
from mlmm.evaluation.hashing import (chance_metrics, evaluate_hashing, hamming_ranking_metrics, ranking_metrics,
                                     relevance_from_labels)
from mlmm.losses.hashing import (HashingLoss, balance_loss, pairwise_likelihood, quantization_loss,
                                 similarity_matrix, token_similarity)
from mlmm.models.model import MultimodalModel
from mlmm.search import pack_codes

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "configs" / "tiny_hashing.yaml"


# ------------------------------------------------------------------------------------------- metrics
def test_map_matches_hand_computed_example():
    # query 0: distances 0,1,1,2,3 (ties kept in index order), relevant items 1, 2, 4
    # query 1: relevant items 0 and 3 under distances 3,2,1,0,2 -> order 3,1,4,2,0 (ties 1<4)
    # query 2: nothing relevant -> excluded
    dist = torch.tensor([[0, 1, 1, 2, 3], [3, 2, 1, 0, 2], [0, 0, 0, 0, 0]])
    rel = torch.tensor([[0, 1, 1, 0, 1], [1, 0, 0, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    m = ranking_metrics(dist, rel, ks=(2, 10), radius=1, map_at=3)
    ap0 = (1 / 2 + 2 / 3 + 3 / 5) / 3  # relevant at ranks 2, 3, 5
    ap1 = (1 / 1 + 2 / 5) / 2  # relevant at ranks 1 and 5
    assert m["mAP@all"] == pytest.approx((ap0 + ap1) / 2)
    apr0 = (1 / 2 + 2 / 3) / 3  # R = 3: ranks 2, 3 inside the top 3
    apr1 = (1 / 1) / 2  # R = 2: rank 1 only
    assert m["mAP@R"] == pytest.approx((apr0 + apr1) / 2)
    assert m["P@2"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert m["P@10"] == pytest.approx((3 / 5 + 2 / 5) / 2)  # k clipped to N = 5
    map3_0 = (1 / 2 + 2 / 3) / 2  # DeepHash top-3 mAP: 2 relevant in the top 3
    map3_1 = 1.0
    assert m["mAP@3"] == pytest.approx((map3_0 + map3_1) / 2)
    # radius 1: query 0 sees items 0,1,2 (2 relevant of 3); query 1 sees items 2,3 (1 of 2)
    assert m["P@H<=1"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["H<=1_nonempty"] == 1.0
    assert m["n_queries"] == 2 and m["n_queries_no_relevant"] == 1


def test_hamming_metrics_from_codes_and_empty_radius_counts_zero():
    db = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [-1, -1, -1, -1, -1, -1, -1, -1], [1, 1, 1, 1, -1, -1, -1, -1.0]])
    q = torch.tensor([[1, 1, 1, 1, 1, 1, 1, -1.0], [1, -1, 1, -1, 1, -1, 1, -1.0]])
    rel = torch.tensor([[True, False, False], [False, True, False]])
    m = hamming_ranking_metrics(q, db, rel, ks=(1,), radius=2)
    # q0: distances 1, 7, 3 -> relevant first; q1: distances 4, 4, 4 -> index order, relevant at rank 2
    assert m["mAP@all"] == pytest.approx((1 + 1 / 2) / 2)
    assert m["P@1"] == pytest.approx(0.5)
    assert m["P@H<=2"] == pytest.approx(0.5) and m["H<=2_nonempty"] == pytest.approx(0.5)
    same = hamming_ranking_metrics(pack_codes(q), pack_codes(db), rel, ks=(1,), radius=2)
    assert same == m


def test_chance_metrics_equal_exact_expectation_over_all_permutations():
    n, relevant = 6, [0, 2, 3]
    rel = torch.zeros(1, n, dtype=torch.bool)
    rel[0, relevant] = True
    sums = {"mAP@all": 0.0, "mAP@R": 0.0, "P@2": 0.0}
    perms = list(itertools.permutations(range(n)))
    for perm in perms:  # a random ranking = a uniformly random distance order
        dist = torch.tensor(perm).unsqueeze(0)
        m = ranking_metrics(dist, rel, ks=(2,))
        for k in sums:
            sums[k] += m[k] / len(perms)
    chance = chance_metrics(rel, ks=(2,))
    for k in sums:
        assert chance[f"chance_{k}"] == pytest.approx(sums[k], abs=1e-12), k


def test_relevance_from_labels():
    q = [["red", "circle"], ["blue", "square"]]
    d = [["red", "square"], ["green", "triangle"], ["blue", "square"]]
    assert relevance_from_labels(q, d, "any").tolist() == [[True, False, False], [True, False, True]]
    assert relevance_from_labels(q, d, "all").tolist() == [[False, False, False], [False, False, True]]


# --------------------------------------------------------------------------------------------- losses
def test_loss_terms_match_references():
    g = torch.Generator().manual_seed(0)
    a, b = torch.tanh(torch.randn(4, 8, generator=g)), torch.tanh(torch.randn(5, 8, generator=g))
    s = (torch.rand(4, 5, generator=g) > 0.5).float()
    ref = 0.0
    for i in range(4):
        for j in range(5):
            theta = 0.5 * float(a[i] @ b[j])
            ref += -(float(s[i, j]) * theta - torch.log1p(torch.exp(torch.tensor(theta))).item())
    assert pairwise_likelihood(a, b, s, 0.5).item() == pytest.approx(ref / 20, rel=1e-5)
    h = torch.tensor([[0.5, -0.25], [1.0, -1.0]])
    assert quantization_loss(h).item() == pytest.approx((0.25 + 0.5625 + 0 + 0) / 4)
    assert balance_loss(h).item() == pytest.approx((0.75 ** 2 + 0.625 ** 2) / 2)
    # token late interaction against explicit loops (padding tokens are ignored)
    x, y = torch.nn.functional.normalize(torch.randn(2, 3, 4, generator=g), dim=-1), \
        torch.nn.functional.normalize(torch.randn(3, 2, 4, generator=g), dim=-1)
    xm = torch.tensor([[True, True, False], [True, True, True]])
    ym = torch.tensor([[True, False], [True, True], [True, True]])
    sim = token_similarity(x, xm, y, ym)
    for i in range(2):
        for j in range(3):
            xi, yj = x[i][xm[i]], y[j][ym[j]]
            c = xi @ yj.T
            ref = 0.5 * (c.max(1).values.mean() + c.max(0).values.mean())
            assert sim[i, j].item() == pytest.approx(ref.item(), abs=1e-6)


def test_similarity_modes():
    la, lb = [["red", "circle"], ["blue", "square"]], [["red", "square"], ["blue", "square"]]
    ka, kb = ["a", "b"], ["c", "b"]
    dev = torch.device("cpu")
    assert similarity_matrix(la, lb, ka, kb, "labels", dev).tolist() == [[1, 0], [1, 1]]
    assert similarity_matrix(la, lb, ka, kb, "class", dev).tolist() == [[0, 0], [0, 1]]
    assert similarity_matrix(la, lb, ka, kb, "identity", dev).tolist() == [[0, 0], [0, 1]]
    assert similarity_matrix([[], ["x"]], lb, ka, kb, "auto", dev).tolist() == [[0, 0], [0, 1]]  # no labels: identity
    with pytest.raises(ValueError, match="needs meta\\['labels'\\]"):
        similarity_matrix([[], ["x"]], lb, ka, kb, "labels", dev)


# ------------------------------------------------------------------------------------------ head / model
@pytest.fixture(scope="module")
def hash_data(tmp_path_factory):
    from mlmm.synthetic.shapes import generate
    from mlmm.data.write_shards import write_shards

    root = build_tiny_data(tmp_path_factory.mktemp("hash_data"), n_images=192, n_videos=0, n_audio=0, shard_size=64,
                           seed=1)
    generate(root / "test", n_images=72, n_videos=0, n_audio=0, size=32, seed=5, progress=False)
    write_shards(root / "test" / "manifest.jsonl", root / "test_shards", shard_size=100, progress=False)
    return root


def config(data: Path, out: Path, *overrides):
    return load_config(TINY, [f"data.train_shards={data / 'shards'}", f"model.text.tokenizer={data / 'tok'}",
                              f"output_dir={out}", f"train.ds_config={REPO / 'ds_config.json'}",
                              "train.progress=false", *overrides])


def fixed_batch(cfg, tokenizer):
    from mlmm.data.preprocess import Preprocessor
    from mlmm.data.train_stream import build_train_loader

    return next(iter(build_train_loader(cfg.data, Preprocessor(cfg.model, tokenizer, train=False), rank=0,
                                        world_size=1)))


def test_head_config_errors_name_the_key():
    base = {"model": {"embed_dim": 8, "image": {}, "text": {"tokenizer": "t"}, "heads": {}}}
    for bad, match in (({"bits": 12}, r"model.heads.h.bits: must be a positive multiple of 8"),
                       ({"source": "pixels"}, r"model.heads.h.source: must be one of"),
                       ({"modalities": ["image", "smell"]}, r"model.heads.h.modalities")):
        base["model"]["heads"] = {"h": {"name": "hash", **bad}}
        with pytest.raises(ConfigError, match=match):
            build_config(base)
    with pytest.raises(ConfigError, match=r"loss.similarity: must be one of"):
        build_config({**base, "model": {"image": {}}, "loss": {"name": "hashing", "similarity": "cosine"}})


@pytest.mark.parametrize("variant", ["embedding", "tokens", "tfidf_cnn"])
def test_head_variants_overfit_a_fixed_batch(hash_data, tmp_path, variant):
    """Each head variant + the hashing loss: shapes, masking, and the loss falls on a fixed batch."""
    from mlmm.training.trainer import load_tokenizer

    over = {"embedding": [], "tokens": ["model.heads.hash.source=tokens", "loss.terms.hashing.token_weight=0.5"],
            "tfidf_cnn": ["model.heads.hash.text_branch=tfidf", "model.heads.hash.image_branch=cnn",
                          "model.heads.hash.cnn_width=8"]}[variant]
    cfg = config(hash_data, tmp_path, "data.batch_size=16", *over)
    torch.manual_seed(0)
    tok = load_tokenizer(cfg)
    model = MultimodalModel(cfg.model, tok)
    loss = HashingLoss(cfg.loss.terms["hashing"], model.modalities)
    batch = fixed_batch(cfg, tok)
    batch.image_mask[3] = False  # one row without its image: its code must not enter the loss
    out = model(batch)
    assert out["hash_image"].shape == (16, 32) and out["hash_text"].shape == (16, 32)
    assert out["hash_image"].abs().max() < 1
    if variant == "tokens":
        assert model.token_modalities == ["image", "text"]
        assert out["hash_text_tok"].shape[:2] == batch.text_ids.shape and out["hash_text_tok_mask"].dtype == torch.bool
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(12):
        res = loss(model(batch), batch)
        opt.zero_grad()
        res["loss"].backward()
        opt.step()
        first = first if first is not None else {k: float(v.detach()) for k, v in res.items()}
    if variant == "tokens":
        assert "token_loss" in res
    assert res["pairwise_loss"].item() < first["pairwise_loss"] - 0.05, (first, res)
    if variant == "tfidf_cnn":
        enc = model.heads["hash"].encoders["text"]
        assert int(enc.n_docs) == 13 * 16 and int(enc.df[tok.pad_token_id]) == 0  # online DF, pads ignored


def test_resnet18_image_branch_gets_gradients(hash_data, tmp_path):
    from mlmm.training.trainer import load_tokenizer

    cfg = config(hash_data, tmp_path, "data.batch_size=4", "model.heads.hash.image_branch=cnn",
                 "model.heads.hash.cnn=resnet18")
    tok = load_tokenizer(cfg)
    model = MultimodalModel(cfg.model, tok)
    batch = fixed_batch(cfg, tok)
    batch.image_mask[1:] = False  # a single image row: BatchNorm falls back to running statistics
    out = model(batch)
    assert out["hash_image"].shape == (4, 32) and torch.all(out["hash_image"][1:] == 0)
    HashingLoss(cfg.loss.terms["hashing"], model.modalities)(out, batch)["loss"].backward()
    assert model.heads["hash"].encoders["image"].conv1.weight.grad.abs().sum() > 0


def test_tfidf_matches_scikit_learn_and_survives_export(hash_data, tmp_path):
    sklearn_text = pytest.importorskip("sklearn.feature_extraction.text")
    from mlmm.hub import from_pretrained, save_pretrained
    from mlmm.training.trainer import load_tokenizer

    cfg = config(hash_data, tmp_path, "model.heads.hash.text_branch=tfidf")
    tok = load_tokenizer(cfg)
    model = MultimodalModel(cfg.model, tok).eval()
    corpus = ["a red circle", "a photo of a blue square", "ein roter Kreis", "un carré bleu", "a red square"]
    head = model.heads["hash"]
    head.fit_tfidf(corpus, tok)
    enc = head.encoders["text"]
    ids = tok(corpus, padding=True, return_tensors="pt")
    ours = enc(ids["input_ids"], ids["attention_mask"])  # [5, V]
    special = set(tok.all_special_ids)
    docs = [[str(t) for t in row if t not in special] for row in tok(corpus)["input_ids"]]
    vec = sklearn_text.TfidfVectorizer(analyzer=lambda d: d)
    ref = torch.tensor(vec.fit_transform(docs).toarray(), dtype=torch.float32)
    cols = [int(t) for t in vec.get_feature_names_out()]
    torch.testing.assert_close(ours[:, cols], ref, rtol=1e-5, atol=1e-6)
    assert float(ours.sum()) == pytest.approx(float(ours[:, cols].sum()), rel=1e-5)  # nothing outside the vocab
    save_pretrained(model, tmp_path / "export")
    again = from_pretrained(tmp_path / "export")
    h1, _ = head.encode(model, "text", ids["input_ids"], ids["attention_mask"])
    h2, _ = again.heads["hash"].encode(again, "text", ids["input_ids"], ids["attention_mask"])
    torch.testing.assert_close(h1, h2, rtol=0, atol=0)


def test_tiny_hashing_model_trains_through_trainer_far_above_random(hash_data, tmp_path):
    from mlmm.hub import from_pretrained
    from mlmm.training import Trainer

    cfg = config(hash_data, tmp_path / "run", "train.max_steps=80", "train.log_every=40")
    trainer = Trainer(cfg).setup()
    history = trainer.train()
    export = trainer.export()
    trainer.cleanup()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    model = from_pretrained(export)
    # held-out images (another seed); relevance = identical label set (colour and shape), 18 classes
    records = evaluate_hashing(model, str(hash_data / "test_shards"), languages=["en", "de"], relevance="class")
    assert {r["language"] for r in records} == {"en", "de"} and all(r["task"] == "image-text-hashing" for r in records)
    for r in records:
        m = r["metrics"]
        for d in ("t2i", "i2t"):
            assert m[f"{d}_mAP@all"] > 2.0 * m[f"{d}_chance_mAP@all"], (r["language"], d, m)
            assert 0 <= m[f"{d}_P@H<=2"] <= 1 and m["bits"] == 32
    # the live model and the export give identical codes
    live = trainer.model.eval()
    batch = fixed_batch(cfg, trainer.tokenizer)
    with torch.no_grad():
        a, _ = live.heads["hash"].encode(live, "image", batch.image[:4])
        b, _ = model.heads["hash"].encode(model, "image", batch.image[:4])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the console command on the export writes the same records
    from mlmm.cli.eval_hashing import main as eval_hashing
    from mlmm.evaluation import load_results

    out = tmp_path / "hashing.json"
    assert eval_hashing(["--model", str(export), "--shards", str(hash_data / "test_shards"), "--languages", "en,de",
                         "--relevance", "class", "--device", "cpu", "--workers", "0", "--out", str(out)]) == 0
    pairs = [(r["language"], r["metrics"]) for r in records]
    assert [(r["language"], r["metrics"]) for r in load_results(out)] == pairs
