"""`python -m mlmm.data.from_hf`: a `datasets` dataset (built here with save_to_disk) -> mlmm shards."""
import io
import json

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from mlmm.config import AudioTowerConfig, ImageTowerConfig, ModelConfig, VideoTowerConfig
from mlmm.data.from_hf import convert, main, open_dataset
from mlmm.data.preprocess import load_eval_items, Preprocessor
from mlmm.data.shards import iter_samples, resolve_shards
from mlmm.data.write_shards import write_shards


@pytest.fixture(scope="module")
def hf_data(tmp_path_factory):
    """Generated image/video/audio files + a manifest, and the same rows as a DatasetDict on disk."""
    import datasets
    from datasets import Audio, ClassLabel, Features, Image as HFImage, List, Value, Video

    from mlmm.synthetic.shapes import generate

    root = tmp_path_factory.mktemp("hf")
    rows = generate(root / "gen", n_images=4, n_videos=2, n_audio=2, size=32, seed=0, progress=False)
    write_shards(root / "gen" / "manifest.jsonl", root / "ref_shards", progress=False)
    classes = sorted({r.get("class", "none") for r in rows})

    def media(r, m):
        return {"bytes": (root / "gen" / r[m]).read_bytes(), "path": r[m]} if m in r else None

    table = {
        "id": [r["key"] for r in rows],
        "image": [media(r, "image") for r in rows],
        "video": [media(r, "video") for r in rows],
        "audio": [media(r, "audio") for r in rows],
        "caption": [r["captions"]["en"] for r in rows],  # [str]
        "caption_de": [r["captions"]["de"][0] for r in rows],  # str
        "translation": [{"fr": r["captions"]["fr"][0]} for r in rows],  # {lang: str}
        "label": [classes.index(r.get("class", "none")) for r in rows],
    }
    # two extra rows: an undecodable image, and a row with neither media nor caption
    for k, v in {"id": ["bad-image", "empty"], "image": [{"bytes": b"not an image", "path": "x.png"}, None],
                 "video": [None, None], "audio": [None, None], "caption": [["broken"], []],
                 "caption_de": [None, None], "translation": [{"fr": None}, {"fr": None}], "label": [0, 0]}.items():
        table[k] += v
    blob = {"bytes": Value("binary"), "path": Value("string")}
    features = Features({"id": Value("string"), "image": HFImage(), "video": blob, "audio": blob,
                         "caption": List(Value("string")), "caption_de": Value("string"),
                         "translation": {"fr": Value("string")}, "label": ClassLabel(names=classes)})
    # as in Hub parquet files: media stored as {bytes, path} structs typed Audio() / Video() (decode=True)
    test = (datasets.Dataset.from_dict(table, features=features)
            .cast_column("audio", Audio()).cast_column("video", Video()))
    dd = datasets.DatasetDict({"test": test, "train": test.select([0])})
    dd.save_to_disk(str(root / "hf_disk"))
    return root, rows


def test_converts_every_modality_like_the_shard_writer(hf_data):
    root, rows = hf_data
    index = convert(str(root / "hf_disk"), root / "out", split="test", image_column="image",
                    video_column="video", audio_column="audio", key_column="id", shard_size=3,
                    caption_columns=["caption:en", "caption_de:de", "translation"], keep_columns=["label:class"],
                    progress=False)
    assert index["n_samples"] == len(rows) and [s["n"] for s in index["shards"]] == [3, 3, 2]
    assert index["modalities"] == ["audio", "image", "video"] and index["languages"] == ["de", "en", "fr"]
    assert {s["key"]: s["reason"].split(":")[0] for s in index["skipped"]} == {
        "bad-image": "undecodable image", "empty": "no media and no caption"}
    assert index["source"] == {"dataset": str(root / "hf_disk"), "split": "test", "config": None}
    ours = {s["__key__"]: s for s in iter_samples(resolve_shards(str(root / "out")))}
    ref = {s["__key__"]: s for s in iter_samples(resolve_shards(str(root / "ref_shards")))}
    assert sorted(ours) == sorted(ref)
    for key, r in ref.items():
        o = ours[key]
        for ext in ("jpg", "mp4", "wav"):  # the encoded bytes are copied, not re-encoded
            assert o.get(ext) == r.get(ext), (key, ext)
        want = {lang: caps[:1] if lang != "en" else caps for lang, caps in r["json"]["captions"].items()}
        assert o["json"]["captions"] == want
        assert o["json"]["modalities"] == r["json"]["modalities"]
        assert o["json"]["class"] == r["json"].get("class", "none") and o["json"]["split"] == "test"
    # the mlmm reader decodes them
    cfg = ModelConfig(image=ImageTowerConfig(), video=VideoTowerConfig(), audio=AudioTowerConfig(seconds=0.5))
    items = load_eval_items(str(root / "out"), Preprocessor(cfg, train=False), ["image", "video", "audio"])
    assert items["image"]["data"].shape == (4, 3, 32, 32) and items["video"]["data"].shape[:2] == (2, 4)
    assert items["audio"]["data"].shape[0] == 2 and not items["skipped"]


def test_decoded_and_foreign_formats_are_encoded(tmp_path):
    """PIL images, BMP bytes and decoded audio arrays become png / png / wav; the CLI writes the same."""
    import datasets
    from datasets import Features, Image as HFImage, Value

    rgb = (np.arange(16 * 16 * 3) % 255).astype(np.uint8).reshape(16, 16, 3)
    bmp = io.BytesIO()
    Image.fromarray(rgb).save(bmp, format="BMP")
    ds = datasets.Dataset.from_dict({"img": [Image.fromarray(rgb), {"bytes": bmp.getvalue(), "path": None}],
                                     "text": ["a", "b"]},
                                    features=Features({"img": HFImage(), "text": Value("string")}))
    ds.save_to_disk(str(tmp_path / "d"))
    main(["--dataset", str(tmp_path / "d"), "--split", "train", "--image-column", "img", "--caption-column", "text:vi",
          "--out", str(tmp_path / "out")])
    samples = list(iter_samples(resolve_shards(str(tmp_path / "out"))))
    assert [s["__key__"] for s in samples] == ["train-00000000", "train-00000001"]
    for s in samples:
        assert s["png"] is not None and np.array_equal(np.asarray(Image.open(io.BytesIO(s["png"]))), rgb)
    assert [s["json"]["captions"] for s in samples] == [{"vi": ["a"]}, {"vi": ["b"]}]

    from mlmm.data.from_hf import encode_audio

    wave = np.sin(np.linspace(0, 100, 8000)).astype(np.float32)
    ext, data = encode_audio({"array": wave, "sampling_rate": 16000, "path": None})
    back, sr = sf.read(io.BytesIO(data), dtype="float32")
    assert ext == "wav" and sr == 16000 and np.abs(back - wave).max() < 1e-3


def test_clear_errors(hf_data, tmp_path):
    root, _ = hf_data
    with pytest.raises(ValueError, match=r"no split 'validation' \(splits: \['test', 'train'\]\)"):
        convert(str(root / "hf_disk"), tmp_path, split="validation", image_column="image", progress=False)
    with pytest.raises(ValueError, match=r"no column\(s\) \['pixels'\]"):
        convert(str(root / "hf_disk"), tmp_path, split="train", image_column="pixels", progress=False)
    with pytest.raises(ValueError, match="nothing to convert"):
        convert(str(root / "hf_disk"), tmp_path, split="train", progress=False)
    index = convert(str(root / "hf_disk"), tmp_path / "one", split="train", caption_columns=["caption"],
                    progress=False)  # text only, streaming through the index's shard layout
    assert index["n_samples"] == 1 and json.loads((tmp_path / "one" / "index.json").read_text())["languages"] == ["en"]


def test_out_may_be_a_pipe_or_bucket_spec(hf_data, tmp_path):
    """--out pipe:CMD {name} (as write_shards, tests/test_remote_shards.py): the same shards and index.json."""
    root, _ = hf_data
    args = dict(split="test", image_column="image", caption_columns=["caption:en"], shard_size=3, progress=False)
    local = convert(str(root / "hf_disk"), tmp_path / "local", **args)
    (tmp_path / "piped").mkdir()
    piped = convert(str(root / "hf_disk"), f"pipe:cat > {tmp_path / 'piped'}/{{name}}", **args)
    assert piped["shards"] == local["shards"] and len(local["shards"]) == 3
    assert [s["key"] for s in piped["skipped"]] == [s["key"] for s in local["skipped"]]
    names = [sorted(p.name for p in (tmp_path / d).iterdir()) for d in ("piped", "local")]
    assert names[0] == names[1] and "index.json" in names[0]
    samples = [[{k: v for k, v in s.items() if k != "__url__"} for s in iter_samples(resolve_shards(str(tmp_path / d)))]
               for d in ("piped", "local")]
    assert samples[0] == samples[1] and len(samples[0]) == local["n_samples"] > 0


def test_streams_a_data_folder(tmp_path, monkeypatch):
    """A folder of data files (not save_to_disk) goes through load_dataset(streaming=True), no network."""
    import datasets
    from datasets import Features, Image as HFImage, Value

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    png = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(png, format="PNG")
    ds = datasets.Dataset.from_dict({"image": [{"bytes": png.getvalue(), "path": None}] * 3,
                                     "caption": ["x", "y", "z"]},
                                    features=Features({"image": HFImage(), "caption": Value("string")}))
    (tmp_path / "data").mkdir()
    ds.to_parquet(str(tmp_path / "data" / "test.parquet"))
    assert isinstance(open_dataset(str(tmp_path / "data"), "test"), datasets.IterableDataset)  # streamed
    index = convert(str(tmp_path / "data"), tmp_path / "out", split="test", image_column="image",
                    caption_columns=["caption:de"], progress=False)
    samples = list(iter_samples(resolve_shards(str(tmp_path / "out"))))
    assert index["n_samples"] == 3 and [s["png"] for s in samples] == [png.getvalue()] * 3
    assert [s["json"]["captions"]["de"] for s in samples] == [["x"], ["y"], ["z"]]
