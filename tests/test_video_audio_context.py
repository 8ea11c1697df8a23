"""Contextual video encoder wired in the model: the audio tower's tokens join the video tower's temporal transformer
(`model.video.audio_context`), rows without audio are masked, gradients reach the audio tower; recipe
`tiny_divtr_av.yaml` trains under `python recipes/train.py` on CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mlmm.config import ConfigError, load_config
from mlmm.data.batch import Batch
from mlmm.registry import LOSSES

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "configs" / "tiny_divtr_av.yaml"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from mlmm.synthetic.av import av_captions
    from mlmm.data.tokenization import train_tokenizer

    caps = [c for col in ("red", "green", "blue") for sh in ("circle", "square") for d in ("left", "right")
            for cs in av_captions(col, sh, d).values() for c in cs]
    out = tmp_path_factory.mktemp("tok_av") / "tok"
    train_tokenizer(caps, out, vocab_size=200)
    return out


def build(tok_dir, *overrides):
    from transformers import AutoTokenizer

    from mlmm.models.model import MultimodalModel

    cfg = load_config(RECIPE, [f"model.text.tokenizer={tok_dir}", *overrides])
    torch.manual_seed(0)
    return cfg, MultimodalModel(cfg.model, AutoTokenizer.from_pretrained(str(tok_dir)))


def av_batch(model, audio_present, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, a = len(audio_present), model.cfg.audio
    enc = model.tokenizer(["a red circle moving left"] * B, padding="max_length", max_length=32, return_tensors="pt")
    return Batch(keys=[f"k{i}" for i in range(B)], video=torch.randn(B, 4, 3, 32, 32, generator=g),
                 video_mask=torch.ones(B, dtype=torch.bool), audio=torch.randn(B, 1, a.n_mels, a.frames, generator=g),
                 audio_mask=torch.tensor(audio_present), text_ids=enc["input_ids"],
                 text_attention=enc["attention_mask"], text_mask=torch.ones(B, dtype=torch.bool))


def test_audio_tokens_join_the_video_tower_and_rows_without_audio_are_masked(tok_dir):
    cfg, model = build(tok_dir)
    model.eval()
    batch = av_batch(model, [True, False, True])
    with torch.no_grad():
        out = model(batch)
        assert out["video"].shape == (3, 32) and out["video_tokens"].shape == (3, 4, 32)
        plain = model.encode("video", batch.video)  # the video tower without any audio context
        # a row without audio: exactly the frames-only encoding
        torch.testing.assert_close(out["video"][1], plain[1], rtol=1e-5, atol=1e-6)
        # rows with audio: the audio tower's tokens (all of them, CLS included) are the context
        a_tok = model.towers["audio"].forward_tokens(batch.audio[[0, 2]])  # [2, Ta, 32]
        ref, _, _ = model.encode_tokens("video", batch.video[[0, 2]], audio_tokens=a_tok,
                                        audio_mask=torch.ones(a_tok.shape[:2], dtype=torch.bool))
        torch.testing.assert_close(out["video"][[0, 2]], ref, rtol=1e-5, atol=1e-6)
        assert (out["video"][[0, 2]] - plain[[0, 2]]).abs().max() > 1e-3  # the soundtrack changes the clip embedding
        # what a row without audio holds in its (absent) audio slot does not matter
        other = av_batch(model, [True, False, True])
        other.audio[1] = 1e3
        torch.testing.assert_close(model(other)["video"], out["video"])
        # no audio at all in the batch: every row is its frames-only encoding
        none = model(av_batch(model, [False, False, False]))
        torch.testing.assert_close(none["video"], plain, rtol=1e-5, atol=1e-6)
        assert bool((none["audio"] == 0).all())


def test_audio_context_gradients_reach_the_audio_tower(tok_dir):
    cfg, model = build(tok_dir)
    out = model(av_batch(model, [True, False, True, True]))
    out["video"][:, 0].sum().backward()  # only the video embedding: its gradient reaches audio via the context
    audio_grads = [p.grad for p in model.towers["audio"].parameters() if p.requires_grad]
    assert all(g is not None for g in audio_grads)
    assert sum(float(g.abs().sum()) for g in audio_grads) > 0
    assert float(model.towers["video"].audio_proj.weight.grad.abs().sum()) > 0
    # the full training loss (DI-vTR + audio-text InfoNCE) gives every parameter a gradient, also without audio
    loss_fn = LOSSES.get(cfg.loss.name).cls(cfg.loss, model.modalities)
    for present in ([True, False, True, True], [False] * 4):
        model.zero_grad(set_to_none=True)
        batch = av_batch(model, present, seed=1)
        loss_fn(model(batch), batch)["loss"].backward()
        # proj.image only projects *image* inputs (none in a video batch); the shared image tower itself is the
        # frame encoder and must get its gradient through the video
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert missing == ["proj.image.weight"], (present, missing)


def test_default_path_unchanged_and_clear_config_errors(tok_dir):
    cfg, model = build(tok_dir, "model.video.audio_context=false")
    assert not model.audio_context and not hasattr(model.towers["video"], "audio_proj")
    model.eval()
    batch = av_batch(model, [True, True])
    with torch.no_grad():
        torch.testing.assert_close(model(batch)["video"], model.encode("video", batch.video))
    with pytest.raises(ConfigError, match="audio_width"):
        build(tok_dir, "model.video.audio_width=16")
    with pytest.raises(ConfigError, match="temporal_layers"):  # the audio tokens join the frames in that transformer
        build(tok_dir, "model.video.temporal_layers=0")
    with pytest.raises(ConfigError, match="needs model.audio"):
        build(tok_dir, "model.audio=null", "loss.terms.contrastive.pairs=[[video, text]]")


@pytest.fixture(scope="module")
def av_shards(tmp_path_factory, tok_dir):
    from mlmm.synthetic.av import generate_av
    from mlmm.data.write_shards import write_shards

    root = tmp_path_factory.mktemp("av_ctx")
    rows = generate_av(root / "gen", n_clips=16, size=32, seed=0)
    with open(root / "gen" / "mixed.jsonl", "w", encoding="utf-8") as f:  # a quarter of the clips lose their audio
        for i, r in enumerate(rows):
            f.write(json.dumps({k: v for k, v in r.items() if not (k == "audio" and i % 4 == 0)}) + "\n")
    write_shards(root / "gen" / "mixed.jsonl", root / "shards", shard_size=8, progress=False)
    return root / "shards"


def test_tiny_divtr_av_recipe_trains_with_recipes_train_py(av_shards, tok_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    cmd = [sys.executable, str(REPO / "recipes" / "train.py"), "--config", str(RECIPE),
           f"data.train_shards={av_shards}", f"model.text.tokenizer={tok_dir}", f"output_dir={tmp_path / 'run'}",
           f"train.ds_config={REPO / 'ds_config.json'}", "train.max_steps=3", "data.batch_size=8",
           "train.log_every=1", "train.progress=false"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
    export = tmp_path / "run" / "export"
    cfg = json.loads((export / "config.json").read_text())
    assert cfg["model"]["video"]["audio_context"] is True
    import mlmm

    model = mlmm.from_pretrained(str(export))
    assert model.audio_context and "towers.video.audio_proj.weight" in model.state_dict()
