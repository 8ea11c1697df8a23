"""Towers and the shared transformer: shapes, masking, SDPA correctness, gradients, weight sharing."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mlmm.config import AudioTowerConfig, ImageTowerConfig, TextTowerConfig, VideoTowerConfig
from mlmm.models.layers import Attention, Transformer
from mlmm.models.towers import AudioTower, ImageTower, NativeTextTower, TextTower, VideoTower

D, B = 32, 2
VOCAB = 100
PAD = {"bert": 0, "xlm-roberta": 1, "clip": 0}


def image_cfg() -> ImageTowerConfig:
    return ImageTowerConfig(image_size=32, patch_size=8, width=D, layers=2, heads=2)


def audio_cfg() -> AudioTowerConfig:
    return AudioTowerConfig(sample_rate=16000, seconds=0.5, n_mels=32, patch_size=8, width=D, layers=2, heads=2)


def text_cfg(arch: str = "bert", pooling: str = "mean") -> TextTowerConfig:
    return TextTowerConfig(tokenizer="unused", arch=arch, hidden=D, layers=2, heads=2, intermediate=64,
                           max_length=16, pooling=pooling)


def text_inputs(pad: int, length: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB, (B, length), generator=g)
    attention = torch.ones(B, length, dtype=torch.long)
    attention[1, 6:] = 0
    ids[attention == 0] = pad
    return ids, attention


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ------------------------------------------------------------------------------------------ shapes
def test_image_tower_shapes():
    tower = ImageTower(image_cfg())
    x = torch.randn(B, 3, 32, 32)
    assert tower.width == D
    assert tower(x).shape == (B, D)
    assert tower.forward_tokens(x).shape == (B, 1 + 16, D)  # CLS + 4x4 patches
    with pytest.raises(ValueError, match="patch grid"):
        tower(torch.randn(B, 3, 40, 40))


def test_audio_tower_shapes_crop_and_pad():
    cfg = audio_cfg()
    assert cfg.frames == 51  # 8000 // 160 + 1
    tower = AudioTower(cfg)
    x = torch.randn(B, 1, 32, cfg.frames)
    assert tower(x).shape == (B, D)
    assert tower.forward_tokens(x).shape == (B, 1 + 4 * 6, D)  # 51 frames cropped to 48
    tower.eval()
    # trailing frames past the last full patch are ignored; a short input is zero-padded
    assert torch.equal(tower(x), tower(x[..., :48]))
    short = x[..., :40]
    assert torch.allclose(tower(short), tower(torch.nn.functional.pad(short, (0, 8))))


def test_video_tower_shapes():
    image = ImageTower(image_cfg())
    video = VideoTower(VideoTowerConfig(frames=4, temporal_layers=1, heads=2), frame_encoder=image)
    x = torch.randn(B, 4, 3, 32, 32)
    assert video.width == D
    assert video.forward_tokens(x).shape == (B, 4, D)
    assert video(x).shape == (B, D)
    assert video(x[:, :2]).shape == (B, D)  # fewer frames than configured is fine
    with pytest.raises(ValueError, match="frames"):
        video(torch.randn(B, 5, 3, 32, 32))


@pytest.mark.parametrize("arch", ["bert", "xlm-roberta"])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_text_tower_shapes(arch, pooling):
    tower = TextTower(text_cfg(arch, pooling), vocab_size=VOCAB, pad_token_id=PAD[arch])
    ids, attention = text_inputs(PAD[arch], length=16)  # the full max_length must fit
    assert tower.width == D
    assert tower.forward_tokens(ids, attention).shape == (B, 16, D)
    assert tower(ids, attention).shape == (B, D)


# -------------------------------------------------------------------------------------- attention
def test_attention_matches_reference_softmax():
    attn = Attention(D, heads=4)
    x = torch.randn(B, 7, D)
    q, k, v = torch.nn.functional.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    def split(t):
        return t.view(B, 7, 4, D // 4).transpose(1, 2)  # [B, T, D] -> [B, H, T, d]

    q, k, v = split(q), split(k), split(v)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // 4), dim=-1)
    ref = attn.out_proj((weights @ v).transpose(1, 2).reshape(B, 7, D))
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)


def test_attention_loads_multihead_attention_weights():
    """Same parameter names and layout as nn.MultiheadAttention (open_clip's attention)."""
    attn, mha = Attention(D, heads=4), nn.MultiheadAttention(D, 4, batch_first=True)
    attn.load_state_dict(mha.state_dict())
    x = torch.randn(B, 7, D)
    keep = torch.ones(B, 7, dtype=torch.bool)
    keep[0, 5:] = False
    ref, _ = mha(x, x, x, key_padding_mask=~keep, need_weights=False)
    out = attn(x, keep[:, None, None, :])
    torch.testing.assert_close(out[0, :5], ref[0, :5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], ref[1], atol=1e-5, rtol=1e-5)


def test_transformer_padding_invariance():
    tr = Transformer(D, layers=2, heads=2).eval()
    x = torch.randn(B, 5, D)
    base = tr(x)
    padded = torch.cat([x, torch.randn(B, 3, D)], dim=1)  # [B, 8, D], 3 junk tokens
    keep = torch.ones(B, 8, dtype=torch.bool)
    keep[:, 5:] = False
    torch.testing.assert_close(tr(padded, keep)[:, :5], base, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tr(x, torch.ones(B, 5, dtype=torch.bool)), base)  # all-real mask = no mask
    keep[1] = False  # a row with no real token must stay finite
    assert torch.isfinite(tr(padded, keep)).all()


def test_transformer_grad_checkpointing_same_grads():
    tr = Transformer(D, layers=2, heads=2)
    x = torch.randn(B, 5, D)
    tr(x).square().sum().backward()
    ref = [p.grad.clone() for p in tr.parameters()]
    tr.zero_grad()
    tr.grad_checkpointing = True
    tr(x).square().sum().backward()
    for g, p in zip(ref, tr.parameters()):
        torch.testing.assert_close(p.grad, g)


# ------------------------------------------------------------------------------------------- text
@pytest.mark.parametrize("arch", ["bert", "xlm-roberta"])
def test_text_padding_invariance(arch):
    tower = TextTower(text_cfg(arch), vocab_size=VOCAB, pad_token_id=PAD[arch]).eval()
    ids, attention = text_inputs(PAD[arch])
    extra = 6
    ids2 = torch.cat([ids, torch.full((B, extra), PAD[arch])], dim=1)
    att2 = torch.cat([attention, torch.zeros(B, extra, dtype=torch.long)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(tower(ids2, att2), tower(ids, attention), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "cls", "gpo"])
def test_native_text_tower_shapes_padding_and_no_dropout(pooling):
    """arch: clip — open_clip-style blocks (fused qkv, SDPA, pre-norm), bidirectional, padding never attended."""
    tower = NativeTextTower(text_cfg("clip", pooling), vocab_size=VOCAB, pad_token_id=0)
    ids, attention = text_inputs(0)
    assert tower.forward_tokens(ids, attention).shape == (B, 10, D) and tower(ids, attention).shape == (B, D)
    ids2 = torch.cat([ids, torch.randint(5, VOCAB, (B, 6))], dim=1)  # junk (not even pad ids) in the padding
    att2 = torch.cat([attention, torch.zeros(B, 6, dtype=torch.long)], dim=1)
    torch.testing.assert_close(tower(ids2, att2), tower(ids, attention), atol=1e-5, rtol=1e-5)
    train_out = tower.train()(ids, attention)
    torch.testing.assert_close(tower.eval()(ids, attention), train_out, rtol=0, atol=0)  # no dropout anywhere
    with pytest.raises(ValueError, match="max_length"):
        tower(torch.zeros(B, 17, dtype=torch.long), torch.ones(B, 17, dtype=torch.long))


def test_native_text_tower_blocks_equal_open_clip_resblocks():
    """The native tower's blocks load open_clip's text resblocks unchanged and compute the same thing (no mask)."""
    from open_clip.transformer import Transformer as OpenClipTransformer

    tower = NativeTextTower(text_cfg("clip"), vocab_size=VOCAB, pad_token_id=0).eval()
    ref = OpenClipTransformer(width=D, layers=2, heads=2, mlp_ratio=64 / D, batch_first=True).eval()
    missing, unexpected = ref.load_state_dict(tower.transformer.state_dict(), strict=False)
    assert not missing and not unexpected
    x = torch.randn(B, 9, D)
    torch.testing.assert_close(tower.transformer(x), ref(x), atol=1e-5, rtol=1e-5)


def test_text_tower_from_pretrained_round_trip(tmp_path):
    tower = TextTower(text_cfg("xlm-roberta"), vocab_size=VOCAB, pad_token_id=1).eval()
    tower.model.save_pretrained(tmp_path)
    cfg = text_cfg("xlm-roberta")
    cfg.pretrained = str(tmp_path)
    loaded = TextTower(cfg, vocab_size=VOCAB, pad_token_id=1)
    assert loaded.training  # nn.Module default, although from_pretrained returns eval()
    loaded.eval()
    ids, attention = text_inputs(1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, attention), tower(ids, attention), atol=0, rtol=0)
    with pytest.raises(ValueError, match="tokenizer has"):
        TextTower(cfg, vocab_size=VOCAB + 1, pad_token_id=1)


# ------------------------------------------------------------------------------ gradients, sharing
def _towers_and_inputs():
    image = ImageTower(image_cfg())
    own_video = VideoTower(VideoTowerConfig(frames=4, share_image_tower=False, frame_encoder=image_cfg()))
    ids, attention = text_inputs(0)
    return [
        (image, (torch.randn(B, 3, 32, 32),)),
        (AudioTower(audio_cfg()), (torch.randn(B, 1, 32, 51),)),
        (own_video, (torch.randn(B, 4, 3, 32, 32),)),
        (TextTower(text_cfg(), vocab_size=VOCAB, pad_token_id=0), (ids, attention)),
    ]


def test_gradients_reach_every_parameter():
    for tower, inputs in _towers_and_inputs():
        tower.forward_tokens(*inputs).square().mean().backward()
        tower(*inputs).square().mean().backward()
        missing = [n for n, p in tower.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing, f"{type(tower).__name__}: no gradient for {missing}"


def test_shared_frame_encoder_has_no_duplicate_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    image = ImageTower(image_cfg())
    model = nn.ModuleDict({"image": image, "video": VideoTower(VideoTowerConfig(frames=4), frame_encoder=image)})
    sd = model.state_dict()
    assert not [k for k in sd if k.startswith("video.") and ("conv1" in k or "resblocks.1" in k)]
    assert len({t.data_ptr() for t in sd.values()}) == len(sd)
    assert len(list(model.parameters())) == len(dict(model.named_parameters(remove_duplicate=False)))
    save_file(sd, tmp_path / "model.safetensors")  # refuses shared tensors
    image2 = ImageTower(image_cfg())
    model2 = nn.ModuleDict({"image": image2, "video": VideoTower(VideoTowerConfig(frames=4), frame_encoder=image2)})
    model2.load_state_dict(load_file(tmp_path / "model.safetensors"))
    x = torch.randn(B, 4, 3, 32, 32)
    model.eval(), model2.eval()
    torch.testing.assert_close(model2["video"](x), model["video"](x))
    # the video gradient reaches the shared image tower
    model["video"](x).sum().backward()
    assert image.conv1.weight.grad is not None
    # without sharing, the video tower owns (and registers) its own encoder
    own = VideoTower(VideoTowerConfig(frames=4, share_image_tower=False, frame_encoder=image_cfg()), image)
    assert own.encoder is not image and "frame_encoder.conv1.weight" in own.state_dict()


def test_tiny_parameter_counts():
    counts = {type(t).__name__: sum(p.numel() for p in t.parameters()) for t, _ in _towers_and_inputs()}
    print(counts)
    assert all(0 < n < 200_000 for n in counts.values())
