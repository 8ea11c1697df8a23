"""CMMAE: mixer fuse-then-separate, masking, visible-patch encoder, masked-patch MSE reference, matching, head+loss."""
from pathlib import Path

import pytest
import torch

from mlmm.config import load_config
from mlmm.data.batch import Batch
from mlmm.losses.cmmae import masked_patch_mse
from mlmm.models.fusion.mixer import CrossModalMixer
from mlmm.models.heads.cmmae import encode_visible, patchify, random_masking
from mlmm.registry import LOSSES

REPO = Path(__file__).resolve().parents[1]


def test_mixer_fuse_then_separate_keeps_each_modality_in_order():
    torch.manual_seed(0)
    mixer = CrossModalMixer(16, layers=2, heads=2, modalities=("video", "audio")).eval()
    v, a = torch.randn(3, 5, 16), torch.randn(3, 7, 16)
    vm, am = torch.ones(3, 5, dtype=torch.bool), torch.ones(3, 7, dtype=torch.bool)
    am[1, 4:] = False
    out = mixer({"audio": (a, am), "video": (v, vm)})  # input dict order does not matter
    assert out["video"].shape == (3, 5, 16) and out["audio"].shape == (3, 7, 16)
    # fuse -> separate without the transformer returns exactly the inputs (+ modality embedding), in order
    x, mask, spans = mixer.fuse({"video": (v, vm), "audio": (a, am)})
    assert spans == [("video", 5), ("audio", 7)] and x.shape == (3, 12, 16)
    back = mixer.separate(x, spans)
    torch.testing.assert_close(back["video"], v + mixer.modality_embedding["video"])
    torch.testing.assert_close(back["audio"], a + mixer.modality_embedding["audio"])
    assert torch.equal(mask, torch.cat([vm, am], 1))
    # equivariance: permuting the video tokens permutes the mixed video tokens the same way (no reordering)
    perm = torch.tensor([3, 0, 4, 1, 2])
    out_p = mixer({"video": (v[:, perm], vm), "audio": (a, am)})
    torch.testing.assert_close(out_p["video"], out["video"][:, perm], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_p["audio"], out["audio"], rtol=1e-5, atol=1e-5)
    # the mixer really mixes: changing the audio changes the video tokens; padded audio never matters
    a2 = a.clone()
    a2[1, 4:] = 1e3
    torch.testing.assert_close(mixer({"video": (v, vm), "audio": (a2, am)})["video"], out["video"],
                               rtol=1e-5, atol=1e-5)
    a2[1, 0] += torch.randn(16)  # (not a constant: LayerNorm removes constant shifts)
    assert not torch.allclose(mixer({"video": (v, vm), "audio": (a2, am)})["video"][1], out["video"][1])


def test_random_masking_and_patchify():
    g = torch.Generator().manual_seed(0)
    keep, mask = random_masking(4, 16, 5, generator=g)
    assert keep.shape == (4, 5) and mask.shape == (4, 16)
    assert (mask.sum(1) == 11).all()
    for i in range(4):
        assert keep[i].tolist() == sorted(keep[i].tolist())
        assert not mask[i, keep[i]].any()
    assert len({tuple(k.tolist()) for k in keep}) > 1  # rows are masked independently
    # patch i of patchify is what conv1 (a patch-sized, patch-strided conv) sees at flattened position i
    x = torch.randn(2, 3, 16, 16)
    conv = torch.nn.Conv2d(3, 4, 8, 8, bias=False)
    ref = conv(x).flatten(2).transpose(1, 2)  # [2, 4, 4]
    torch.testing.assert_close(patchify(x, 8) @ conv.weight.flatten(1).t(), ref, rtol=1e-5, atol=1e-5)


def test_encode_visible_equals_tower_with_every_patch_and_ignores_masked_ones():
    from mlmm.config import ImageTowerConfig
    from mlmm.models.towers.image import ImageTower

    torch.manual_seed(0)
    vit = ImageTower(ImageTowerConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2)).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(encode_visible(vit, x, None), vit.forward_tokens(x), rtol=1e-5, atol=1e-5)
    keep = torch.tensor([[0, 5, 9, 15], [1, 2, 3, 4]])
    y = encode_visible(vit, x, keep)
    assert y.shape == (2, 5, 32)
    # masked patches do not reach the encoder: changing pixels of a dropped patch changes nothing
    x2 = x.clone()
    x2[0, :, 8:16, 8:16] = 100.0  # patch 5 of row 0 (kept) ...
    x2[1, :, 24:32, 24:32] = 100.0  # ... patch 15 of row 1 (masked)
    y2 = encode_visible(vit, x2, keep)
    assert not torch.allclose(y2[0], y[0])
    torch.testing.assert_close(y2[1], y[1])


def test_masked_patch_mse_equals_reference_on_fixed_mask():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(2, 4, 6, generator=g), 3 + 2 * torch.randn(2, 4, 6, generator=g)
    mask = torch.tensor([[True, False, True, False], [False, False, False, True]])
    # reference: MAE norm_pix_loss written out patch by patch
    total, count = 0.0, 0
    for i in range(2):
        for j in range(4):
            if mask[i, j]:
                t = target[i, j]
                mu = sum(t.tolist()) / 6
                var = sum((v - mu) ** 2 for v in t.tolist()) / 5  # unbiased, as torch.var / MAE
                tn = [(v - mu) / (var + 1e-6) ** 0.5 for v in t.tolist()]
                total += sum((p - q) ** 2 for p, q in zip(pred[i, j].tolist(), tn)) / 6
                count += 1
    assert abs(float(masked_patch_mse(pred, target, mask)) - total / count) < 1e-5
    # without normalisation: plain MSE over the masked patches; row weights drop rows
    raw = ((pred - target) ** 2).mean(-1)[mask].mean()
    torch.testing.assert_close(masked_patch_mse(pred, target, mask, norm_pix=False), raw)
    only_row1 = ((pred[1] - target[1]) ** 2).mean(-1)[mask[1]].mean()
    torch.testing.assert_close(masked_patch_mse(pred, target, mask, norm_pix=False,
                                                row_weight=torch.tensor([0.0, 1.0])), only_row1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoTokenizer

    from mlmm.synthetic.av import av_captions
    from mlmm.data.tokenization import train_tokenizer
    from mlmm.models.model import MultimodalModel

    caps = [c for cs in av_captions("red", "circle", "left").values() for c in cs]
    tok_dir = tmp_path_factory.mktemp("tok") / "tok"
    train_tokenizer(caps, tok_dir, vocab_size=120)
    cfg = load_config(REPO / "recipes" / "configs" / "tiny_cmmae.yaml", [f"model.text.tokenizer={tok_dir}"])
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    return cfg, MultimodalModel(cfg.model, tok), tok


def av_batch(tok, present_video, present_audio, keys=None):
    B = len(present_video)
    enc = tok(["a red circle"] * B, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    return Batch(keys=keys or [f"k{i}" for i in range(B)], video=torch.randn(B, 4, 3, 32, 32),
                 video_mask=torch.tensor(present_video), audio=torch.randn(B, 1, 32, 51),
                 audio_mask=torch.tensor(present_audio), text_ids=enc["input_ids"],
                 text_attention=enc["attention_mask"], text_mask=torch.ones(B, dtype=torch.bool))


def test_cmmae_head_and_loss(tiny):
    cfg, model, tok = tiny
    batch = av_batch(tok, [True, True, False, True, True], [True, False, True, True, True],
                     keys=["a", "b", "c", "d", "a"])
    out = model(batch)
    n = 3  # rows 0, 3, 4 have both
    head = model.heads["cmmae"]
    assert out["cmmae_video_pred"].shape == (n, 4 * 16, 3 * 64) == out["cmmae_video_target"].shape
    assert out["cmmae_audio_pred"].shape == (n, 4 * 6, 64) == out["cmmae_audio_target"].shape
    assert (out["cmmae_video_mask"].view(n, 4, 16).sum(-1) == 16 - head.v_keep).all()  # 75 % per frame
    assert (out["cmmae_audio_mask"].sum(-1) == 24 - head.a_keep).all() and head.a_keep == 12
    # targets are the raw patches of the present rows
    torch.testing.assert_close(out["cmmae_video_target"][1].view(4, 16, -1)[2], patchify(batch.video[3, 2:3], 8)[0])
    # matching labels: n true pairs, then shuffled pairs (row i with row i+1's audio); rows 4 -> 0 share key "a"
    assert out["cmmae_match_labels"].tolist() == [1, 1, 1, 0, 0, 1]
    loss_fn = LOSSES.get("multi").cls(cfg.loss, model.modalities)
    res = loss_fn(out, batch)
    for k in ("cmmae/video_mae_loss", "cmmae/audio_mae_loss", "cmmae/match_loss", "contrastive/audio_video_loss"):
        assert torch.isfinite(res[k]), k
    torch.testing.assert_close(res["cmmae/video_mae_loss"], masked_patch_mse(
        out["cmmae_video_pred"], out["cmmae_video_target"], out["cmmae_video_mask"]))
    res["loss"].backward()
    for name, p in model.heads.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    # the reconstruction trains the towers themselves (the encoder of the retriever)
    assert float(model.towers["audio"].conv1.weight.grad.abs().sum()) > 0


def test_cmmae_without_av_rows_is_zero_with_graph(tiny):
    cfg, model, tok = tiny
    model.zero_grad()
    batch = av_batch(tok, [True, False], [False, True])
    out = model(batch)
    res = LOSSES.get("cmmae").cls(cfg.loss.terms["cmmae"], model.modalities)(out, batch)
    assert float(res["loss"].detach()) == 0.0
    res["loss"].backward()
    assert all(p.grad is not None for p in model.heads.parameters())
