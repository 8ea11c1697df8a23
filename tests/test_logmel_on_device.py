"""data.logmel_on_device: loader workers ship fixed-length waveforms, Batch.audio_features computes the log-mel per
batch where the model runs; the features, the training and the evaluation equal the per-sample path."""
import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from mlmm.config import AudioTowerConfig, ConfigError, ModelConfig
from mlmm.data.preprocess import Preprocessor

REPO = Path(__file__).resolve().parents[1]


def wav(seconds: float, sr: int, seed: int, subtype: str = "PCM_16") -> bytes:
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds)) / sr
    x = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 900) * t) + 0.05 * rng.standard_normal(t.size)
    buf = io.BytesIO()
    sf.write(buf, x.astype(np.float32), sr, format="WAV", subtype=subtype)
    return buf.getvalue()


@pytest.mark.parametrize("sample_rate", [16000, 8000])
def test_batched_logmel_equals_the_per_sample_logmel(sample_rate):
    """Clips shorter than, exactly and longer than model.audio.seconds, at the model's rate and at another one (so
    resampled), plus a row without audio: the per-batch features equal the per-sample ones to float tolerance, with
    the same crop / pad rule (centre crop, zero pad at the end) and zeros for the row without audio."""
    cfg = ModelConfig(embed_dim=8, image=None, text=None,
                      audio=AudioTowerConfig(sample_rate=sample_rate, seconds=0.5, n_mels=32, patch_size=8))
    clips = [wav(0.2, 16000, 0), wav(0.5, sample_rate, 1), wav(1.3, 8000, 2), wav(0.5, 22050, 3, "FLOAT"),
             wav(0.73, sample_rate, 4)]
    batches = {}
    for waves in (False, True):
        pre = Preprocessor(cfg, train=True, audio_waves=waves)
        samples = [{"key": f"k{i}", "meta": {}, "lang": "", **pre.media({"__key__": f"k{i}", "wav": c})}
                   for i, c in enumerate(clips)]
        samples.insert(2, {"key": "none", "meta": {}, "lang": ""})  # a row without audio
        batches[waves] = pre.collate(samples)
    plain, wave = batches[False], batches[True]
    n_samples = int(sample_rate * 0.5)
    assert wave.audio is None and wave.audio_wave.shape == (6, n_samples) and wave.audio_wave.dtype == torch.float32
    assert wave.rows("audio") == plain.rows("audio") == (0, 1, 3, 4, 5)
    feats = wave.audio_features(cfg.audio)
    assert feats.audio_wave is None and feats.audio.shape == plain.audio.shape == (6, 1, 32, cfg.audio.frames)
    torch.testing.assert_close(feats.audio, plain.audio, rtol=0, atol=1e-5)
    assert torch.count_nonzero(feats.audio[2]) == 0
    assert plain.audio_features(cfg.audio) is plain  # nothing to do without waveforms


def test_waveforms_stay_float32_on_the_way_to_the_device_and_features_take_the_compute_dtype():
    """Batch.to(dtype=bf16) casts the features of a plain batch; the waveforms stay float32 so that their log-mel is
    the float32 one, cast once (what the per-sample path gives after its own cast)."""
    cfg = ModelConfig(embed_dim=8, image=None, text=None, audio=AudioTowerConfig(seconds=0.5))
    out = {}
    for waves in (False, True):
        pre = Preprocessor(cfg, train=True, audio_waves=waves)
        media = pre.media({"__key__": "a", "wav": wav(0.4, 16000, 5)})
        b = pre.collate([{"key": "a", "meta": {}, "lang": "", **media}])
        b = b.to("cpu", torch.bfloat16)
        assert waves is False or b.audio_wave.dtype == torch.float32
        out[waves] = b.audio_features(cfg.audio, torch.bfloat16).audio
    assert out[True].dtype == torch.bfloat16
    torch.testing.assert_close(out[True], out[False], rtol=0, atol=0)


def test_training_with_it_equals_training_without_and_evaluation_gets_features(tmp_path):
    """A tiny image / video / audio / text run with data.logmel_on_device gives the loader's waveforms, the same
    features per batch and the same losses; the trained model is evaluated (audio-text retrieval) from its config,
    whose evaluators compute features per sample whatever the switch."""
    from conftest import build_tiny_data, tiny_clip_losses
    from mlmm.config import load_config
    from mlmm.data.train_stream import build_train_loader
    from mlmm.evaluation.runner import evaluate_retrieval
    from mlmm.training import Trainer
    from mlmm.training.trainer import load_tokenizer

    data = build_tiny_data(tmp_path / "data", n_images=8, n_videos=4, n_audio=12, shard_size=40, seed=4)
    base = [f"data.train_shards={data / 'shards'}", f"model.text.tokenizer={data / 'tok'}",
            f"train.ds_config={REPO / 'ds_config.json'}", "train.progress=false", "train.max_steps=3",
            "train.log_every=1", "data.batch_size=8", "data.shuffle_buffer=0", "train.zero_stage=0"]
    cfg = load_config(REPO / "recipes" / "configs" / "tiny_clip.yaml", [*base, f"output_dir={tmp_path / 'x'}"])
    tok = load_tokenizer(cfg)
    first = {w: next(iter(build_train_loader(cfg.data, Preprocessor(cfg.model, tok, train=False, audio_waves=w),
                                             rank=0, world_size=1))) for w in (False, True)}
    assert first[True].audio is None and first[True].audio_wave is not None and first[True].has("audio")
    torch.testing.assert_close(first[True].audio_features(cfg.model.audio).audio, first[False].audio, rtol=0,
                               atol=1e-5)
    plain = tiny_clip_losses(base, tmp_path / "plain")
    trainer = Trainer(load_config(REPO / "recipes" / "configs" / "tiny_clip.yaml",
                                  [*base, "data.logmel_on_device=true", f"output_dir={tmp_path / 'wave'}"])).setup()
    try:
        assert trainer.preprocessor.audio_waves
        on_device = [h["loss"] for h in trainer.train()]
        records = evaluate_retrieval(trainer.model, str(data / "shards"), progress=False)
    finally:
        trainer.cleanup()
    assert on_device == pytest.approx(plain, rel=1e-5)
    audio = [r for r in records if r["task"].startswith("audio")]
    assert audio and all(r["n"] == 12 and any(k.endswith("R@1") for k in r["metrics"])
                         and np.isfinite(list(r["metrics"].values())).all() for r in audio), records


def test_a_model_without_audio_refuses_the_switch(tmp_path):
    from mlmm.config import build_config

    raw = {"model": {"embed_dim": 8, "text": {"tokenizer": "org/tok"}, "image": {"image_size": 32}},
           "data": {"logmel_on_device": True}}
    with pytest.raises(ConfigError, match=r"^data\.logmel_on_device: the model has no audio tower"):
        build_config(raw)
    raw["model"]["audio"] = {"seconds": 0.5}
    assert build_config(raw).data.logmel_on_device


@pytest.mark.parametrize("orig,new", [(8000, 16000), (22050, 16000), (44100, 16000), (16000, 8000)])
def test_the_cached_resampler_is_bit_identical_to_torchaudio_resample(orig, new):
    """The loader resamples with a kernel built once per rate pair (torchaudio.functional.resample rebuilds it on
    every call); the waveforms are the same bits."""
    import torchaudio

    from mlmm.data.transforms import decode_audio, fit_waveform

    for seed, seconds in enumerate((0.13, 0.5, 1.7)):
        x, sr = decode_audio(wav(seconds, orig, seed))
        ref = torchaudio.functional.resample(torch.from_numpy(x), orig_freq=orig, new_freq=new)
        got = fit_waveform(x, sr, sample_rate=new, seconds=10.0)[: ref.numel()]
        assert torch.equal(got, ref)


@pytest.mark.parametrize("rows", [None, 3, 40])
def test_logmel_equals_torchaudio_melspectrogram(rows):
    """mlmm's log-mel (power as re² + im², CPU batches in cache-sized chunks) equals torchaudio's MelSpectrogram +
    the fixed normalisation to float tolerance, for one clip and for batches split into several chunks."""
    import torchaudio

    from mlmm.data.transforms import LOGMEL_SCALE, LOGMEL_SHIFT, logmel

    g = torch.Generator().manual_seed(0)
    x = 0.2 * torch.randn(*(() if rows is None else (rows,)), 16000, generator=g)  # [(rows,) samples]
    x[..., 9000:] = 0.0  # a silent tail: the log of ~0 power
    ref = torchaudio.transforms.MelSpectrogram(sample_rate=16000, n_fft=400, hop_length=160, n_mels=32)(x)
    ref = (torch.log(ref + 1e-6) + LOGMEL_SHIFT) / LOGMEL_SCALE  # [(rows,) 32, 101]
    got = logmel(x, sample_rate=16000, n_mels=32, n_fft=400, hop_length=160)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
