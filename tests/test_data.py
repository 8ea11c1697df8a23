"""Tests for mlmm.data: generation, shard writing, decoding, splitting, batching, tokenizers."""
from __future__ import annotations

import io
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mlmm.config import AudioTowerConfig, DataConfig, ImageTowerConfig, ModelConfig, TextTowerConfig, VideoTowerConfig
from mlmm.data.collate import collate
from mlmm.data.preprocess import Preprocessor, load_eval_items, select_captions
from mlmm.data.shards import epoch_shards, iter_samples, resolve_shards, slot_samples
from mlmm.data.tokenization import load_tokenizer, train_tokenizer
from mlmm.data.train_stream import build_train_loader
from mlmm.data.transforms import SampleError
from mlmm.data.write_shards import shared_data_manifest, write_shards
from mlmm.synthetic.shapes import audio_captions, generate, image_captions, video_captions
from mlmm.data.tokenization import main as tokenization_main
from mlmm.data.transforms import audio_to_logmel, decode_audio, decode_image, decode_video, image_to_tensor

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
AUDIO = dict(sample_rate=16000, seconds=0.5, n_mels=32, n_fft=400, hop_length=160)


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def data_synth(tmp_path_factory) -> tuple[Path, list[dict]]:
    """A small generated data set: 8 images, 3 videos, 5 audio clips (32 px)."""
    out = tmp_path_factory.mktemp("synth")
    rows = generate(out, n_images=8, n_videos=3, n_audio=5, size=32, seed=0, progress=False)
    return out, rows


@pytest.fixture(scope="module")
def data_shards(data_synth, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(data_synth[0] / "manifest.jsonl", out, shard_size=4, progress=False)
    return out


@pytest.fixture(scope="module")
def data_tokenizer(data_synth, tmp_path_factory):
    texts = [c for r in data_synth[1] for caps in r["captions"].values() for c in caps]
    texts += ["Một người đàn ông đang đứng trên đá .", "die gesprochene Ziffer fünf", "le chiffre parlé zéro"]
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=300)


def tiny_model(tok_dir: str = "tok", **kw) -> ModelConfig:
    parts = dict(image=ImageTowerConfig(image_size=32), video=VideoTowerConfig(frames=4),
                 audio=AudioTowerConfig(seconds=0.5), text=TextTowerConfig(tokenizer=tok_dir, max_length=16))
    parts.update(kw)
    return ModelConfig(**parts)


def write_text_shards(tmp: Path, n_samples: int, shard_size: int) -> tuple[Path, list[str]]:
    """Caption-only samples (cheap) packed into shards; returns the folder and the keys."""
    rows = [{"key": f"s{i:03d}", "captions": {"en": [f"sample {i}"], "de": f"Probe {i}"}} for i in range(n_samples)]
    manifest = tmp / "text.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_shards(manifest, tmp / "shards", shard_size=shard_size, progress=False)
    return tmp / "shards", [r["key"] for r in rows]


# ------------------------------------------------------------------------------- writing + decoding
def test_generate_is_deterministic_and_multilingual(data_synth, tmp_path):
    out, rows = data_synth
    assert len(rows) == 16 and len({r["key"] for r in rows}) == 16
    again = generate(tmp_path, n_images=8, n_videos=3, n_audio=5, size=32, seed=0, progress=False)
    assert again == rows
    assert (tmp_path / "images" / "img-000000.jpg").read_bytes() == (out / "images" / "img-000000.jpg").read_bytes()
    for r in rows:
        assert set(r["captions"]) == {"en", "de", "fr"} and all(r["captions"].values())
    assert image_captions("red", "circle")["de"][0] == "ein roter Kreis"
    assert image_captions("blue", "square")["de"][1] == "ein Foto von einem blauen Quadrat"
    assert video_captions("white", "triangle", "left")["fr"][0] == "un triangle blanc se déplace vers la gauche"
    assert audio_captions("high", "steady")["de"][0] == "ein hoher, gleichmäßiger Ton"


def test_shard_round_trip_every_modality(data_synth, data_shards):
    out, rows = data_synth
    index = json.loads((data_shards / "index.json").read_text())
    assert index["n_samples"] == 16 and [s["n"] for s in index["shards"]] == [4, 4, 4, 4]
    assert index["languages"] == ["de", "en", "fr"] and index["modalities"] == ["audio", "image", "video"]
    assert index["skipped"] == []
    samples = list(iter_samples(resolve_shards(str(data_shards))))
    assert [s["__key__"] for s in samples] == [r["key"] for r in rows]
    by_ext = Counter()
    for s, r in zip(samples, rows):
        modality = next(m for m in ("image", "video", "audio") if m in r)
        ext = {"image": "jpg", "video": "mp4", "audio": "wav"}[modality]
        assert s[ext] == (out / r[modality]).read_bytes()
        assert s["json"]["captions"] == r["captions"] and s["json"]["modalities"] == [modality]
        assert s["json"]["class"] == r["class"] and modality not in s["json"]
        by_ext[ext] += 1
        if ext == "jpg":
            assert image_to_tensor(decode_image(s[ext]), 32, train=False).shape == (3, 32, 32)
        elif ext == "mp4":
            video = decode_video(s[ext], num_frames=4, size=32)
            assert video.shape == (4, 3, 32, 32) and torch.isfinite(video).all()
            assert decode_video(s[ext], num_frames=12, size=16).shape == (12, 3, 16, 16)  # 8 frames -> repeats
        else:
            wave, sr = decode_audio(s[ext])
            assert sr == 16000 and wave.dtype == np.float32 and wave.ndim == 1
            assert audio_to_logmel(wave, sr, **AUDIO).shape == (1, 32, AudioTowerConfig(seconds=0.5).frames)
    assert by_ext == {"jpg": 8, "mp4": 3, "wav": 5}


def test_avi_decoding_and_audio_resample_pad(tmp_path):
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="avi") as c:
        stream = c.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 40, 24, "yuv420p"
        for i in range(3):
            frame = np.full((24, 40, 3), 60 * i, dtype=np.uint8)
            for p in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(p)
        for p in stream.encode():
            c.mux(p)
    video = decode_video(buf.getvalue(), num_frames=4, size=16)
    assert video.shape == (4, 3, 16, 16)
    assert video[0].mean() < video[-1].mean()  # frames in temporal order: dark -> bright
    with pytest.raises(ValueError, match="video"):
        decode_video(b"not a video at all", num_frames=4, size=16)
    with pytest.raises(ValueError, match="image"):
        decode_image(b"\x00garbage")
    with pytest.raises(ValueError, match="audio"):
        decode_audio(b"RIFF....garbage")
    short = np.ones(800, dtype=np.float32) * 0.1  # 0.1 s at 8 kHz -> resampled, padded
    assert audio_to_logmel(short, 8000, **AUDIO).shape == (1, 32, 51)


def test_skipped_samples_are_reported(tmp_path, data_synth):
    out, rows = data_synth
    src = next(r for r in rows if "image" in r)
    (tmp_path / "ok.jpg").write_bytes((out / src["image"]).read_bytes())
    (tmp_path / "bad.jpg").write_bytes(b"definitely not a jpeg")
    (tmp_path / "bad.wav").write_bytes(b"RIFF garbage")
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 64)
    manifest = [
        {"key": "ok", "image": "ok.jpg", "captions": {"en": "a thing", "vi": ["  một cái  ", ""]}, "extra": 1},
        {"key": "missing", "image": "nope.jpg", "captions": {"en": ["x"]}},
        {"key": "corrupt-img", "image": "bad.jpg", "captions": {"en": ["x"]}},
        {"key": "corrupt-wav", "audio": "bad.wav", "captions": {"en": ["x"]}},
        {"key": "corrupt-mp4", "video": "bad.mp4", "captions": {"en": ["x"]}},
        {"key": "empty", "captions": {"en": []}},
        {"key": "wrong-type", "image": "ok.wav"},
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in manifest))
    index = write_shards(path, tmp_path / "out", progress=False)
    assert index["n_samples"] == 1
    reasons = {s["key"]: s["reason"] for s in index["skipped"]}
    assert set(reasons) == {"missing", "corrupt-img", "corrupt-wav", "corrupt-mp4", "empty", "wrong-type"}
    assert reasons["missing"].startswith("missing image file")
    assert reasons["corrupt-img"].startswith("undecodable image")
    assert reasons["corrupt-wav"].startswith("undecodable audio")
    assert reasons["corrupt-mp4"].startswith("undecodable video")
    assert "no media file and no caption" in reasons["empty"] and "unsupported" in reasons["wrong-type"]
    (sample,) = iter_samples(resolve_shards(str(tmp_path / "out")))
    assert sample["json"]["captions"] == {"en": ["a thing"], "vi": ["một cái"]} and sample["json"]["extra"] == 1
    assert json.loads((tmp_path / "out" / "index.json").read_text())["skipped"] == index["skipped"]

    path.write_text(json.dumps({"key": "a", "captions": {"en": "x"}}) + "\n" + json.dumps({"key": "a"}) + "\n")
    with pytest.raises(ValueError, match="duplicate key 'a'"):
        write_shards(path, tmp_path / "dup", progress=False)
    path.write_text(json.dumps({"key": "a.b", "captions": {"en": "x"}}) + "\n")
    with pytest.raises(ValueError, match="'key'"):
        write_shards(path, tmp_path / "dot", progress=False)


def test_resolve_shards(tmp_path):
    folder, _ = write_text_shards(tmp_path, 6, 2)
    names = [str(folder / f"shard-{i:06d}.tar") for i in range(3)]
    assert resolve_shards(str(folder)) == names
    assert resolve_shards(str(folder / "shard-*.tar")) == names
    assert resolve_shards(f"{names[2]},{names[0]}") == [names[2], names[0]]
    assert resolve_shards(str(folder / "shard-{000000..000002}.tar")) == names  # webdataset / open_clip brace range
    assert resolve_shards(f"{folder}/shard-{{000002,000000}}.tar,{names[1]}") == [names[2], names[0], names[1]]
    with pytest.raises(FileNotFoundError, match="shard-000003.tar"):
        resolve_shards(str(folder / "shard-{000000..000003}.tar"))
    (folder / "index.json").unlink()
    assert resolve_shards(str(folder)) == names
    for spec in ("", str(tmp_path / "nowhere"), str(tmp_path / "x*.tar")):
        with pytest.raises(FileNotFoundError, match="shard spec"):
            resolve_shards(spec)


# --------------------------------------------------------------------------------------- splitting
@pytest.mark.parametrize("n_samples,shard_size", [(24, 3), (10, 5)])  # 8 shards >= 4 slots; 2 shards < 4 slots
def test_split_covers_every_sample_once_per_epoch(tmp_path, n_samples, shard_size):
    folder, keys = write_text_shards(tmp_path, n_samples, shard_size)
    shards = resolve_shards(str(folder))
    world_size, workers = 2, 2
    n_slots = world_size * workers
    orders = []
    for epoch in range(2):
        seen = []
        for rank in range(world_size):
            for worker in range(workers):
                slot = rank * workers + worker
                got = [s["__key__"] for s in slot_samples(shards, seed=3, epoch=epoch, slot=slot, n_slots=n_slots)]
                assert got, f"slot {slot} got nothing"
                seen += got
        assert sorted(seen) == keys  # every sample exactly once, no duplicates across ranks x workers
        orders.append(epoch_shards(shards, 3, epoch))
    assert epoch_shards(shards, 3, 0) == orders[0]  # reproducible
    if len(shards) > 2:
        assert orders[0] != orders[1]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_ranks_and_workers_cover_epoch(tmp_path, data_tokenizer, num_workers):
    folder, keys = write_text_shards(tmp_path, 16, 2)  # 8 shards; 2 ranks x 2 workers -> 4 samples per slot
    tok_dir = str(tmp_path / "tok")
    data_tokenizer.save_pretrained(tok_dir)
    model = ModelConfig(text=TextTowerConfig(tokenizer=tok_dir, max_length=8))
    cfg = DataConfig(train_shards=str(folder), batch_size=2, num_workers=num_workers, shuffle_buffer=0, seed=1)
    pre = Preprocessor(model, load_tokenizer(tok_dir), train=True)
    batches_per_epoch = len(keys) // 2 // cfg.batch_size  # per rank
    seen = []
    for rank in range(2):
        loader = build_train_loader(cfg, pre, rank=rank, world_size=2)
        it = iter(loader)
        batches = [next(it) for _ in range(batches_per_epoch + 1)]  # one more: the stream goes on into epoch 1
        del it
        for b in batches:
            assert b.text_ids.shape == (2, 8) and b.text_mask.all() and b.image is None
        seen += [k for b in batches[:batches_per_epoch] for k in b.keys]
    assert sorted(seen) == keys


def test_loader_multimodal_batches_and_reproducible(data_shards, data_tokenizer, tmp_path):
    data_tokenizer.save_pretrained(tmp_path / "tok")
    pre = Preprocessor(tiny_model(str(tmp_path / "tok")), data_tokenizer, train=True)
    cfg = DataConfig(train_shards=str(data_shards), batch_size=5, shuffle_buffer=8, seed=0)
    runs = []
    for _ in range(2):
        it = iter(build_train_loader(cfg, pre, rank=0, world_size=1))
        runs.append([next(it) for _ in range(4)])  # 20 samples: crosses an epoch boundary
    for a, b in zip(*runs):
        assert a.keys == b.keys and a.lang == b.lang and torch.equal(a.image, b.image)
    b = runs[0][0]
    assert b.image.shape == (5, 3, 32, 32) and b.video.shape == (5, 4, 3, 32, 32)
    assert b.audio.shape == (5, 1, 32, 51) and b.text_ids.shape[0] == 5
    # text is padded to the batch's longest caption rounded up to 8 (<= model.text.max_length = 16)
    longest = int(b.text_attention.sum(1).max())
    assert b.text_ids.shape[1] == min(16, max(8, -(-longest // 8) * 8))
    modal = torch.stack([b.image_mask, b.video_mask, b.audio_mask]).sum(0)
    assert torch.equal(modal, torch.ones(5, dtype=torch.long))  # each generated sample has one medium
    written = {s["__key__"] for s in iter_samples(resolve_shards(str(data_shards)))}
    assert set(runs[0][0].keys + runs[0][1].keys + runs[0][2].keys) <= written


def test_loader_skips_undecodable_samples_and_counts_reasons(tmp_path, data_synth, data_tokenizer, caplog):
    import webdataset as wds

    out, rows = data_synth
    good = [r for r in rows if "image" in r][:3]
    with wds.TarWriter(str(tmp_path / "mixed.tar")) as w:
        for r in good:
            w.write({"__key__": r["key"], "jpg": (out / r["image"]).read_bytes(), "json": json.dumps(r).encode()})
        w.write({"__key__": "bad1", "jpg": b"not an image", "json": b'{"captions": {}}'})
        w.write({"__key__": "bad2", "jpg": b"still not", "json": b'{"captions": {}}'})
        w.write({"__key__": "nojson", "wav": b"x", "json": b"{oops"})
    cfg = DataConfig(train_shards=str(tmp_path / "mixed.tar"), batch_size=3, shuffle_buffer=0)
    loader = build_train_loader(cfg, Preprocessor(ModelConfig(image=ImageTowerConfig()), train=True), rank=0,
                                world_size=1)
    it = iter(loader)
    with caplog.at_level("WARNING", logger="mlmm.data.preprocess"):
        batch = next(it)
        assert next(it).keys == batch.keys  # epoch 1: the bad samples of epoch 0 were skipped on the way
    assert batch.keys == [r["key"] for r in good] and batch.image_mask.all()
    assert loader.dataset.skipped == {"undecodable image": 2, "bad json": 1}
    assert sum("undecodable image" in m for m in caplog.messages) == 1  # logged once per reason

    lonely, _ = write_text_shards(tmp_path, 2, 2)  # 2 samples, 4 slots: slot 3 gets nothing
    cfg = DataConfig(train_shards=str(lonely), batch_size=1, shuffle_buffer=0)
    pre = Preprocessor(ModelConfig(text=TextTowerConfig(tokenizer="t")), data_tokenizer, train=True)
    assert next(iter(build_train_loader(cfg, pre, rank=1, world_size=4))).keys == ["s001"]
    with pytest.raises(RuntimeError, match="slot 3/4 got no usable sample in epoch 0"):
        next(iter(build_train_loader(cfg, pre, rank=3, world_size=4)))


# -------------------------------------------------------------------------------- batching + policies
def test_collate_masks_for_mixed_batch():
    s1 = {"key": "a", "image": torch.ones(3, 8, 8), "text_ids": torch.tensor([2, 5, 3, 0]),
          "text_attention": torch.tensor([1, 1, 1, 0]), "lang": "en", "meta": {"k": 1}}
    s2 = {"key": "b", "audio": torch.full((1, 4, 6), 2.0), "lang": "", "meta": {}}
    s3 = {"key": "c", "image": torch.full((3, 8, 8), 3.0), "audio": torch.ones(1, 4, 6),
          "text_ids": torch.tensor([2, 7, 3, 0]), "text_attention": torch.tensor([1, 1, 1, 0]), "lang": "de",
          "meta": {}}
    b = collate([s1, s2, s3], shapes={"video": (2, 3, 8, 8), "text": (4,)})
    assert b.keys == ["a", "b", "c"] and b.lang == ["en", "", "de"] and b.meta[0] == {"k": 1}
    assert b.image_mask.tolist() == [True, False, True] and b.image[1].abs().sum() == 0 and b.image[2].mean() == 3
    assert b.audio_mask.tolist() == [False, True, True] and b.audio.shape == (3, 1, 4, 6)
    assert b.video.shape == (3, 2, 3, 8, 8) and not b.video_mask.any() and not b.has("video")
    assert b.text_mask.tolist() == [True, False, True]
    assert b.text_ids[1].tolist() == [0, 0, 0, 0] and b.text_attention[1].sum() == 0
    assert b.text_ids.dtype == torch.long and b.image_mask.dtype == torch.bool
    with pytest.raises(ValueError, match="shape"):
        collate([s1, {**s3, "image": torch.ones(3, 4, 4)}])


def test_language_policies():
    caps = {"en": ["a", "b"], "de": ["c"], "fr": [], "vi": "d"}
    rng = random.Random(0)
    langs = Counter(select_captions(caps, rng)[0][0] for _ in range(600))
    assert set(langs) == {"en", "de", "vi"} and min(langs.values()) > 150  # uniform over usable languages
    assert select_captions(caps, random.Random(5)) == select_captions(caps, random.Random(5))
    assert {select_captions(caps, rng, languages=["de", "fr"])[0] for _ in range(20)} == {("de", "c")}
    every = select_captions(caps, rng, "all_languages")
    assert [lang for lang, _ in every] == ["de", "en", "vi"] and dict(every)["vi"] == "d"
    assert {select_captions(caps, rng, "fixed", ["en"])[0][1] for _ in range(50)} == {"a", "b"}
    assert select_captions(caps, rng, "fixed", ["fr"]) == [] and select_captions({}, rng) == []
    with pytest.raises(ValueError, match="fixed"):
        select_captions(caps, rng, "fixed")
    with pytest.raises(ValueError, match="language_policy"):
        select_captions(caps, rng, "every")


def test_preprocessor_shapes_and_policies(data_shards, data_tokenizer):
    model = tiny_model(video=VideoTowerConfig(frames=3, share_image_tower=False,
                                              frame_encoder=ImageTowerConfig(image_size=16, patch_size=8)))
    pre = Preprocessor(model, data_tokenizer, train=False)
    assert pre.shapes == {"image": (3, 32, 32), "video": (3, 3, 16, 16), "audio": (1, 32, 51), "text": (16,)}
    raws = {s["json"]["modalities"][0]: s for s in iter_samples(resolve_shards(str(data_shards)))}
    rng = random.Random(0)
    (img,) = pre(raws["image"], rng)
    assert img["image"].shape == (3, 32, 32) and img["lang"] in ("en", "de", "fr")
    assert img["text_ids"].shape == (16,) and img["text_ids"][0] == data_tokenizer.cls_token_id
    assert img["caption"] in raws["image"]["json"]["captions"][img["lang"]]
    assert pre(raws["video"], rng)[0]["video"].shape == (3, 3, 16, 16)
    assert pre(raws["audio"], rng)[0]["audio"].shape == (1, 32, 51)
    copies = pre(raws["audio"], rng, language_policy="all_languages")
    assert [c["lang"] for c in copies] == ["de", "en", "fr"] and len({c["key"] for c in copies}) == 1
    no_text = pre(raws["image"], rng, language_policy="fixed", languages=["vi"])  # no vi caption: still flows
    assert len(no_text) == 1 and no_text[0]["lang"] == "" and "text_ids" not in no_text[0]
    assert not pre.collate(no_text).text_mask.any()
    # tokenize=False (the training stream): collate tokenises the batch's captions in one call, same batch
    mixed = [raws["image"], raws["video"], raws["audio"]]
    eager = pre.collate([s for r in mixed for s in pre(r, random.Random(1), language_policy="all_languages")] + no_text)
    lazy = [s for r in mixed for s in pre(r, random.Random(1), language_policy="all_languages", tokenize=False)]
    assert all("text_ids" not in s for s in lazy)
    deferred = pre.collate(lazy + no_text)
    assert torch.equal(deferred.text_ids, eager.text_ids) and torch.equal(deferred.text_attention, eager.text_attention)
    assert deferred.text_mask.tolist() == eager.text_mask.tolist() == [True] * 9 + [False]
    audio_only = Preprocessor(ModelConfig(audio=AudioTowerConfig(seconds=0.5)), train=False)
    with pytest.raises(SampleError, match="nothing the model uses"):
        audio_only(raws["image"], rng)  # image-only sample, audio-only model: nothing usable
    broken = {**raws["image"], "jpg": b"garbage"}
    with pytest.raises(SampleError, match="undecodable image"):
        pre(broken, rng)
    with pytest.raises(ValueError, match="tokenizer"):
        Preprocessor(model, None, train=False)


def test_load_eval_items(data_synth, data_shards, data_tokenizer):
    pre = Preprocessor(tiny_model(), data_tokenizer, train=False)
    items = load_eval_items(str(data_shards), pre, ["image", "audio"], languages=["en", "de"])
    rows = data_synth[1]
    expected = [r["key"] for r in rows if "image" in r or "audio" in r]
    assert items["keys"] == expected and items["skipped"] == {"no image/audio": 3}
    assert items["image"]["data"].shape == (8, 3, 32, 32) and items["audio"]["data"].shape == (5, 1, 32, 51)
    assert [items["keys"][i] for i in items["image"]["items"]] == items["image"]["keys"]
    assert set(items["captions"]) == {"en", "de"}
    n_en = sum(len(r["captions"]["en"]) for r in rows if r["key"] in expected)
    assert len(items["captions"]["en"]) == n_en  # every caption, not one per item
    i, cap = items["captions"]["de"][0]
    assert cap in rows[[r["key"] for r in rows].index(items["keys"][i])]["captions"]["de"]
    with pytest.raises(ValueError, match="modalities"):
        load_eval_items(str(data_shards), Preprocessor(ModelConfig(image=ImageTowerConfig()), train=False), ["audio"])


# ------------------------------------------------------------------------------------------ tokenizer
def test_tokenizer_train_save_load(tmp_path, data_synth):
    manifest = data_synth[0] / "manifest.jsonl"
    tokenization_main(["--manifest", str(manifest), "--out", str(tmp_path / "tok"), "--vocab-size", "200"])
    tok = load_tokenizer(tmp_path / "tok")
    ids = [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id]
    assert ids == [0, 1, 2, 3, 4]
    enc = tok(["Ein ROTER Kreis", "un cercle rouge"], max_length=12, padding="max_length", truncation=True)
    assert all(len(ids) == 12 for ids in enc["input_ids"])
    first = enc["input_ids"][0]
    assert first[0] == 2 and first[sum(enc["attention_mask"][0]) - 1] == 3 and first[-1] == 0
    assert tok.decode(first, skip_special_tokens=True) == "ein roter kreis"

    vi = ["Một người đàn ông đang đứng trên đá .", "Người leo núi chiêm ngưỡng vẻ đẹp"]
    direct = train_tokenizer(vi * 3, tmp_path / "vi", vocab_size=120)
    again = load_tokenizer(tmp_path / "vi")
    assert again(vi)["input_ids"] == direct(vi)["input_ids"]
    assert again.decode(again(vi[0])["input_ids"], skip_special_tokens=True) == vi[0].lower()
    with pytest.raises(ValueError, match="no non-empty texts"):
        train_tokenizer(["", "  "], tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path)


# ------------------------------------------------------------------------------------------ real data
@pytest.mark.skipif(not SHARED.is_dir(), reason="shared real data folder not present")
def test_real_data_decodes_and_converts(tmp_path):
    manifest = shared_data_manifest(SHARED, tmp_path / "real.jsonl")
    rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
    keys = {r["key"] for r in rows}
    assert {"vi-0000001", "fsdd-7_theo_3", "video-video9818", "video-jPBxl9gFqNY_110_117"} <= keys
    subset = [r for r in rows if r["key"] in {"vi-0000001", "fsdd-7_theo_3", "video-jPBxl9gFqNY_110_117"}]
    (tmp_path / "subset.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in subset))
    index = write_shards(tmp_path / "subset.jsonl", tmp_path / "shards", progress=False)
    assert index["n_samples"] == 3 and index["skipped"] == [] and index["languages"] == ["de", "en", "es", "fr", "vi"]
    msvd = next(s for s in iter_samples(resolve_shards(str(tmp_path / "shards"))) if "avi" in s)
    assert msvd["json"]["captions"] == {"en": []} and msvd["json"]["modalities"] == ["video"]
    image = decode_image((SHARED / "images_vi" / "0000001.jpg").read_bytes(), draft_size=32)
    assert image.mode == "RGB" and image_to_tensor(image, 32, train=True).shape == (3, 32, 32)
    wave, sr = decode_audio((SHARED / "audio_fsdd" / "7_theo_3.wav").read_bytes())
    assert sr == 8000 and audio_to_logmel(wave, sr, **AUDIO).shape == (1, 32, 51)
    for name in ("video9818.mp4", "jPBxl9gFqNY_110_117.avi"):
        assert decode_video((SHARED / "video" / name).read_bytes(), num_frames=4, size=32).shape == (4, 3, 32, 32)
