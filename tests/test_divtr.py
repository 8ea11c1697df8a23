"""DI-vTR: dual interaction module (shapes, padding never attended), hard negatives, head + loss, re-ranking."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mlmm.config import ConfigError, load_config
from mlmm.data.batch import Batch
from mlmm.evaluation.rerank import ranks_from_scores, rerank_ranks, rerank_topk
from mlmm.models.fusion.dual_interaction import CrossAttentionBlock, DualInteraction, hard_negatives
from mlmm.registry import LOSSES

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------- interaction
def test_interaction_shapes_and_padding_never_attended():
    torch.manual_seed(0)
    inter = DualInteraction(media_width=24, text_width=16, width=32, heads=4, layers=2).eval()
    P, Tm, Tt = 5, 6, 9
    m, t = torch.randn(P, Tm, 24), torch.randn(P, Tt, 16)
    m_mask = torch.ones(P, Tm, dtype=torch.bool)
    t_mask = torch.ones(P, Tt, dtype=torch.bool)
    m_mask[1, 4:] = False
    m_mask[3, 1:] = False
    t_mask[0, 5:] = False
    t_mask[2, 2:] = False
    out = inter(m, m_mask, t, t_mask)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"t2m": (P,), "m2t": (P,), "interaction": (P,)}
    torch.testing.assert_close(out["interaction"], 0.5 * (out["t2m"] + out["m2t"]))
    # overwrite every padding position with garbage: nothing changes (keys masked, padded queries not averaged)
    m2, t2 = m.clone(), t.clone()
    m2[~m_mask] = 1e3 * torch.randn(int((~m_mask).sum()), 24)
    t2[~t_mask] = 1e3 * torch.randn(int((~t_mask).sum()), 16)
    out2 = inter(m2, m_mask, t2, t_mask)
    for k in out:
        torch.testing.assert_close(out2[k], out[k], rtol=1e-5, atol=1e-5)
    # while a real token does change the score of its pair (and only of its pair)
    m3 = m.clone()
    m3[1, 0] += torch.randn(24)
    out3 = inter(m3, m_mask, t, t_mask)
    assert abs(float((out3["interaction"][1] - out["interaction"][1]).detach())) > 1e-4
    keep = torch.tensor([0, 2, 3, 4])
    torch.testing.assert_close(out3["interaction"][keep], out["interaction"][keep])


def test_cross_attention_matches_reference_and_ignores_empty_context():
    torch.manual_seed(1)
    blk = CrossAttentionBlock(8, 2).eval()
    x, ctx = torch.randn(2, 3, 8), torch.randn(2, 4, 8)
    mask = torch.tensor([[True, True, False, True], [False, False, False, False]])
    y = blk(x, ctx, mask)
    # reference for row 0: softmax attention over the 3 real keys, per head, by hand
    q = blk.q_proj(blk.ln_q(x[0])).view(3, 2, 4).transpose(0, 1)  # [H, 3, 4]
    kv = blk.kv_proj(blk.ln_kv(ctx[0, mask[0]])).view(3, 2, 2, 4)  # [3, 2(kv), H, d]
    k, v = kv[:, 0].transpose(0, 1), kv[:, 1].transpose(0, 1)  # [H, 3, d]
    a = torch.softmax(q @ k.transpose(1, 2) / 2.0, -1) @ v  # [H, 3, d]
    ref = x[0] + blk.out_proj(a.transpose(0, 1).reshape(3, 8))
    ref = ref + blk.mlp(blk.ln_2(ref))
    torch.testing.assert_close(y[0], ref, rtol=1e-5, atol=1e-5)
    # a row without any real key gets no attention update (only the MLP on the residual)
    torch.testing.assert_close(y[1], x[1] + blk.mlp(blk.ln_2(x[1])))


# ----------------------------------------------------------------------------------- hard negatives
def test_hard_negatives_match_brute_force():
    g = torch.Generator().manual_seed(0)
    n, k = 7, 3
    sim = torch.randn(n, n, generator=g)
    exclude = torch.rand(n, n, generator=g) < 0.3
    exclude[5] = True  # query 5: every candidate excluded -> all slots invalid
    exclude[6] = True
    exclude[6, 2] = False  # query 6: one allowed candidate
    idx, ok = hard_negatives(sim, k, exclude)
    assert idx.shape == ok.shape == (n, k)
    for i in range(n):
        allowed = [j for j in range(n) if j != i and not exclude[i, j]]
        expect = sorted(allowed, key=lambda j: -float(sim[i, j]))[:k]
        assert idx[i, : len(expect)].tolist() == expect
        assert ok[i].tolist() == [True] * len(expect) + [False] * (k - len(expect))
    # k larger than the batch: clipped to n - 1
    idx, ok = hard_negatives(sim[:3, :3], 10)
    assert idx.shape == (3, 2) and bool(ok.all())
    assert all(i not in idx[i].tolist() for i in range(3))


# ----------------------------------------------------------------------------------- head + loss
@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from mlmm.synthetic.shapes import video_captions
    from mlmm.synthetic.av import order_captions
    from mlmm.data.tokenization import train_tokenizer

    caps = [c for col in ("red", "blue", "green") for sh in ("circle", "square") for d in ("left", "right")
            for cs in video_captions(col, sh, d).values() for c in cs]
    caps += [c for cs in order_captions(("red", "circle"), ("blue", "square")).values() for c in cs]
    out = tmp_path_factory.mktemp("tok") / "tok"
    train_tokenizer(caps, out, vocab_size=200)
    return out


def tiny_model(tok_dir, *overrides):
    from transformers import AutoTokenizer

    from mlmm.models.model import MultimodalModel

    cfg = load_config(REPO / "recipes" / "configs" / "tiny_divtr.yaml", [f"model.text.tokenizer={tok_dir}", *overrides])
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(0)
    return cfg, MultimodalModel(cfg.model, tok), tok


def make_batch(tok, texts, video_present, keys=None):
    B = len(texts)
    enc = tok(texts, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    return Batch(keys=keys or [f"k{i}" for i in range(B)], video=torch.randn(B, 4, 3, 32, 32),
                 video_mask=torch.tensor(video_present), text_ids=enc["input_ids"],
                 text_attention=enc["attention_mask"], text_mask=torch.ones(B, dtype=torch.bool))


def test_divtr_head_config_errors_name_the_key(tok_dir):
    for override, key in (("model.heads.divtr.tower_grad=1.5", "tower_grad"),
                          ("model.heads.divtr.init_interaction_scale=0", "init_interaction_scale"),
                          ("model.heads.divtr.hard_negatives=0", "hard_negatives"),
                          ("model.heads.divtr.media=text", "media")):
        with pytest.raises(ConfigError, match=rf"model\.heads\.divtr\.{key}"):
            tiny_model(tok_dir, override)


def test_divtr_head_selects_valid_hard_negatives_and_scores_pairs(tok_dir):
    cfg, model, tok = tiny_model(tok_dir, "model.heads.divtr.hard_negatives=3")
    model.eval()
    texts = ["a red circle moving left", "a blue square moving right", "a red circle moving left",
             "a green circle moving right", "a blue circle moving left", "ein roter Kreis bewegt sich nach links",
             "a green square moving left"]
    present = [True, True, True, True, False, True, True]
    keys = ["a", "b", "c", "d", "e", "a", "g"]  # row 5 = sample "a" in German
    batch = make_batch(tok, texts, present, keys)
    with torch.no_grad():
        out = model(batch)
    rows = out["divtr_rows"]
    assert rows.tolist() == [0, 1, 2, 3, 5, 6]  # row 4 has no video
    n = rows.numel()
    t2m, m2t, neg = out["divtr_t2m_logits"], out["divtr_m2t_logits"], out["divtr_t2m_negatives"]
    assert t2m.shape == m2t.shape == (n, 4) and neg.shape == (n, 3)
    # brute-force selection on the global similarities, excluding same key (0<->5) and same caption (0<->2)
    sim = out["text"][rows] @ out["video"][rows].t()
    bad = {(0, 2), (2, 0), (0, 4), (4, 0)}  # positions inside `rows`
    for i in range(n):
        allowed = [j for j in range(n) if j != i and (i, j) not in bad]
        expect = sorted(allowed, key=lambda j: -float(sim[i, j]))[:3]
        assert neg[i].tolist()[: len(expect)] == expect
        assert torch.isfinite(t2m[i, : 1 + len(expect)]).all()
        assert torch.isinf(t2m[i, 1 + len(expect):]).all()
    # column 0 = combined score of the positive pair, computed directly
    head = model.heads["divtr"]
    vt, vm = out["video_tokens"][rows], out["video_token_mask"][rows]
    tt, tm = out["text_tokens"][rows], out["text_token_mask"][rows]
    direct = head.interaction.combine(torch.diagonal(sim), head.interaction(vt, vm, tt, tm)["interaction"])
    torch.testing.assert_close(t2m[:, 0], direct, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m2t[:, 0], direct, rtol=1e-5, atol=1e-5)
    # first t2m negative of text 1 = its hardest video, scored as a pair
    j = int(neg[1, 0])
    pair = head.interaction(vt[j:j + 1], vm[j:j + 1], tt[1:2], tm[1:2])["interaction"]
    torch.testing.assert_close(t2m[1, 1:2], head.interaction.combine(sim[1, j:j + 1], pair), rtol=1e-5, atol=1e-5)


def test_other_renderings_captioned_alike_are_never_hard_negatives(tok_dir):
    from mlmm.synthetic.av import order_captions

    same = order_captions(("red", "circle"), ("blue", "square"))
    other = order_captions(("blue", "square"), ("red", "circle"))  # the reversed twin
    texts = [same["en"][0], same["de"][1], other["en"][0], same["fr"][0]]
    _, _, tok = tiny_model(tok_dir)
    batch = make_batch(tok, texts, [True] * 4, keys=["r0", "r1", "t0", "r0"])
    batch.captions = texts
    batch.meta = [{"captions": same}, {"captions": same}, {"captions": other}, {"captions": same}]
    excl = batch.not_negatives(torch.arange(4))
    # rows 0, 1, 3 show the same scene (two renderings; row 3 = row 0 in French): never each other's negatives
    assert excl[[0, 0, 1, 1, 3, 3], [1, 3, 0, 3, 0, 1]].all()
    # the reversed twin is a real (hard) negative in both directions
    assert not excl[[0, 1, 3, 2, 2, 2], [2, 2, 2, 0, 1, 3]].any()
    batch.meta = [{} for _ in texts]  # without sample captions: only the key and identical captions count
    excl = batch.not_negatives(torch.arange(4))
    assert bool(excl[0, 3]) and not bool(excl[0, 1])


def test_divtr_loss_equals_reference_and_reaches_every_head_parameter(tok_dir):
    cfg, model, tok = tiny_model(tok_dir)
    loss_fn = LOSSES.get("divtr").cls(cfg.loss, model.modalities)
    batch = make_batch(tok, ["a red circle moving left", "a blue square moving right", "a green circle moving right",
                             "a blue circle moving left", "a green square moving left"], [True] * 5)
    out = model(batch)
    res = loss_fn(out, batch)
    scale = loss_fn.contrastive.logit_scale["video_text"].exp()
    logits = scale * out["video"] @ out["text"].t()
    lab = torch.arange(5)
    glob = 0.5 * (F.cross_entropy(logits, lab) + F.cross_entropy(logits.t(), lab))
    inter = 0.5 * (F.cross_entropy(out["divtr_t2m_logits"], torch.zeros(5, dtype=torch.long))
                   + F.cross_entropy(out["divtr_m2t_logits"], torch.zeros(5, dtype=torch.long)))
    torch.testing.assert_close(res["global_loss"], glob)
    torch.testing.assert_close(res["interaction_loss"], inter)
    torch.testing.assert_close(res["loss"], glob + inter)
    res["loss"].backward()
    for name, p in model.heads.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert float(model.heads["divtr"].interaction.t2m.blocks[0].q_proj.weight.grad.abs().sum()) > 0


def test_divtr_head_without_pairs_keeps_graph(tok_dir):
    cfg, model, tok = tiny_model(tok_dir)
    loss_fn = LOSSES.get("divtr").cls(cfg.loss, model.modalities)
    batch = make_batch(tok, ["a red circle", "a blue square"], [False, False])
    out = model(batch)
    res = loss_fn(out, batch)
    assert float(res["interaction_loss"].detach()) == 0.0
    res["loss"].backward()  # every head parameter still receives a (zero) gradient
    assert all(p.grad is not None for p in model.heads.parameters())


# ----------------------------------------------------------------------------------- re-ranking
def test_rerank_only_changes_order_inside_topk():
    g = torch.Generator().manual_seed(3)
    Q, G, k = 9, 20, 5
    scores = torch.randn(Q, G, generator=g)
    new_pair = torch.randn(Q, G, generator=g)  # the "interaction" score of every pair
    calls = []

    def scorer(q, gi, glob):
        calls.append(q.numel())
        torch.testing.assert_close(glob, scores[q, gi])
        return new_pair[q, gi]

    out = rerank_topk(scores, k, scorer)
    assert calls == [Q * k]  # only the top-k pairs are scored
    old_order, new_order = scores.argsort(1, descending=True), out.argsort(1, descending=True)
    for q in range(Q):
        top = old_order[q, :k]
        assert set(new_order[q, :k].tolist()) == set(top.tolist())  # same top-k set
        assert new_order[q, k:].tolist() == old_order[q, k:].tolist()  # untouched outside
        expect = top[new_pair[q, top].argsort(descending=True)]
        assert new_order[q, :k].tolist() == expect.tolist()  # ordered by the new score
    # ranks of positives outside the top-k do not move; R@k at depth k is unchanged
    pos = torch.zeros(Q, G, dtype=torch.bool)
    pos[torch.arange(Q), torch.randint(0, G, (Q,), generator=g)] = True
    r0, r1 = ranks_from_scores(scores, pos), ranks_from_scores(out, pos)
    assert torch.equal(r0 > k, r1 > k)
    assert torch.equal(r0[r0 > k], r1[r0 > k])
    # a perfect pair scorer puts every positive found in the top-k at rank 1
    perfect = rerank_topk(scores, k, lambda q, gi, glob: pos[q, gi].float())
    r2 = ranks_from_scores(perfect, pos)
    assert torch.equal(r2[r0 <= k], torch.ones(int((r0 <= k).sum()), dtype=torch.long))


def test_chunked_rerank_scores_only_topk_pairs_and_matches_scoring_everything():
    g = torch.Generator().manual_seed(5)
    Q, G, E, k, chunk = 23, 17, 8, 4, 5
    q_emb = F.normalize(torch.randn(Q, E, generator=g), dim=1)
    g_emb = F.normalize(torch.randn(G, E, generator=g), dim=1)
    pair = torch.randn(Q, G, generator=g)  # the head's score of every pair
    pos = torch.rand(Q, G, generator=g) < 0.15
    pos[torch.arange(Q), torch.randint(0, G, (Q,), generator=g)] = True
    full = q_emb @ g_emb.t()  # [Q, G]
    top = full.topk(k, dim=1).indices  # [Q, k]
    calls = []

    def scorer(qi, gi, glob):
        calls.append((qi.clone(), gi.clone()))
        torch.testing.assert_close(glob, full[qi, gi])
        return pair[qi, gi]

    ranks = rerank_ranks(q_emb, g_emb, pos, k, scorer, chunk_size=chunk)
    # the scorer only saw each query's global top-k pairs, at most chunk * k per call, each pair once
    assert all(qi.numel() <= chunk * k for qi, _ in calls) and len(calls) == -(-Q // chunk)
    seen = sorted((int(a), int(b)) for qi, gi in calls for a, b in zip(qi, gi))
    assert seen == sorted((q, int(j)) for q in range(Q) for j in top[q])
    # reference: score every pair, then re-order each query's global top-k by that score
    ref = rerank_topk(full, k, lambda qi, gi, glob: pair[qi, gi], chunk_size=Q)  # one call over the whole matrix
    assert torch.equal(ranks, ranks_from_scores(ref, pos))
    manual = []
    for q in range(Q):
        order = top[q][pair[q, top[q]].argsort(descending=True)].tolist()
        order += [int(j) for j in full[q].argsort(descending=True) if int(j) not in order]
        manual.append(1 + min(order.index(j) for j in torch.nonzero(pos[q]).flatten().tolist()))
    assert ranks.tolist() == manual
    with pytest.raises(ValueError, match="chunk_size"):
        rerank_ranks(q_emb, g_emb, pos, k, scorer, chunk_size=0)


def test_ranks_from_scores_match_metrics_module():
    from mlmm.evaluation.retrieval import first_positive_ranks

    g = torch.Generator().manual_seed(4)
    q, x = F.normalize(torch.randn(6, 8, generator=g), dim=1), F.normalize(torch.randn(11, 8, generator=g), dim=1)
    pos = torch.rand(6, 11, generator=g) < 0.25
    pos[torch.arange(6), torch.arange(6)] = True
    assert torch.equal(ranks_from_scores(q @ x.t(), pos), first_positive_ranks(q, x, pos))


def test_contextual_video_encoder_attends_to_audio_tokens_but_not_padding():
    from mlmm.config import ImageTowerConfig, VideoTowerConfig
    from mlmm.models.towers.video import VideoTower

    torch.manual_seed(0)
    cfg = VideoTowerConfig(frames=4, share_image_tower=False, audio_context=True, audio_width=24,
                           frame_encoder=ImageTowerConfig(image_size=16, patch_size=8, width=32, layers=1, heads=2))
    tower = VideoTower(cfg).eval()
    x = torch.randn(2, 4, 3, 16, 16)
    audio, mask = torch.randn(2, 5, 24), torch.tensor([[True] * 5, [True, True, False, False, False]])
    plain = tower.forward_tokens(x)
    ctx = tower.forward_tokens(x, audio, mask)
    assert ctx.shape == plain.shape == (2, 4, 32)  # tokens = frames, audio only as context
    assert not torch.allclose(ctx, plain)
    audio2 = audio.clone()
    audio2[1, 2:] = 1e3  # padding: no effect
    torch.testing.assert_close(tower.forward_tokens(x, audio2, mask), ctx)
    audio2[1, 0] = torch.randn(24)  # a real audio token: changes row 1 only
    out = tower.forward_tokens(x, audio2, mask)
    assert not torch.allclose(out[1], ctx[1])
    torch.testing.assert_close(out[0], ctx[0])
    with pytest.raises(ValueError, match="audio_context"):
        VideoTower(VideoTowerConfig(frames=4, share_image_tower=False, frame_encoder=cfg.frame_encoder)).forward_tokens(
            x, audio, mask)


@pytest.mark.slow
def test_reranking_gains_on_generated_order_set(tmp_path):
    """Known answers: each caption's clip and its reversed twin are both in the gallery. benchmarks/video_rerank.py
    (recipes/configs/tiny_divtr.yaml, 1000 steps, ~3 min on one CPU core). Measured 2026-11-25 over seeds 0, 1, 2
    and across a rounding-level change of the frame encoder: re-ranking the top-10 lowers the mean rank in every run,
    language and direction, while the R@1 gain swings by about ±6 points with the seed and with float rounding (seed
    0 went from +9..+10 to -2..+3 t2v). Only the robust property is asserted, on seed 0."""
    import json
    from benchmarks.video_rerank import main

    out = tmp_path / "video_rerank.json"
    assert main(["--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    summary = json.loads(out.read_text())["summary"]
    assert set(summary) == {"en", "de", "fr"}
    for lang, s in summary.items():
        assert s["t2v_R@1_global"] > 5 * s["chance_t2v_R@1"], (lang, s)  # the global retriever itself works
        for d in ("t2v", "v2t"):
            assert s[f"{d}_MnR_rerank"] < s[f"{d}_MnR_global"], (lang, d, s)


def test_candidate_pairs_respect_an_asymmetric_exclusion():
    """exclude[i, j] (text i, media j): media j is never text i's negative, and text i never media j's."""
    from mlmm.models.fusion.dual_interaction import candidate_pairs

    g = torch.Generator().manual_seed(7)
    n, k = 5, 3
    sim = torch.rand(n, n, generator=g)
    sim[0, 3] = sim[1, 3] = 9.0  # media 3 is the hardest negative of texts 0 and 1
    exclude = torch.zeros(n, n, dtype=torch.bool)
    exclude[0, 3] = True  # ... but text 0 is a caption of clip 3
    cand = candidate_pairs(sim, k, exclude)
    assert 3 not in cand.neg_t2m[0].tolist() and cand.neg_t2m[1, 0] == 3
    assert 0 not in cand.neg_m2t[3].tolist()  # media 3's text candidates skip text 0
    assert cand.m_idx.shape == cand.t_idx.shape == (2 * n * (1 + k),) and cand.valid.shape == (2 * n, 1 + k)
    t2m, m2t = cand.split(torch.arange(2 * n * (1 + k), dtype=torch.float))
    assert t2m[2, 0] == 2 * (1 + k) and m2t[0, 0] == n * (1 + k)  # the positives lead each block's rows
    assert torch.equal(cand.m_idx[: n * (1 + k)].view(n, 1 + k)[:, 1:], cand.neg_t2m)
    assert torch.equal(cand.t_idx[n * (1 + k):].view(n, 1 + k)[:, 1:], cand.neg_m2t)
    few = candidate_pairs(sim[:3, :3], k, torch.ones(3, 3, dtype=torch.bool))  # nothing allowed: all slots invalid
    t2m, _ = few.split(torch.zeros(2 * 3 * 3))
    assert torch.isinf(t2m[:, 1:]).all() and torch.isfinite(t2m[:, 0]).all()
