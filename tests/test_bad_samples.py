"""The reader never crashes on one bad sample: every decode error of every modality is a counted skip, logged once
per reason, in training and in evaluation (issue 18 part 4). Every bad shard is built here."""
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from mlmm.config import AudioTowerConfig, DataConfig, ImageTowerConfig, ModelConfig, TextTowerConfig, VideoTowerConfig
from mlmm.data.preprocess import CAPTION_CHARS_PER_TOKEN, load_eval_items, Preprocessor
from mlmm.data.train_stream import build_train_loader
from mlmm.data.stream import SlotPlan


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid, tiny PNG whose header claims width x height pixels (10^10: far over PIL's limit)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def write_tar(path: Path, samples: list[dict]) -> Path:
    """Samples {"__key__", ext: bytes} -> a plain tar (members in the given order)."""
    with tarfile.open(path, "w") as tar:
        for s in samples:
            for ext, data in s.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def js(obj) -> bytes:
    return json.dumps(obj).encode()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Real encoded media (jpg, mp4, wav) and a tokenizer."""
    from mlmm.synthetic.shapes import generate
    from mlmm.data.tokenization import train_tokenizer

    root = tmp_path_factory.mktemp("bad_samples")
    rows = generate(root / "gen", n_images=2, n_videos=1, n_audio=1, size=32, seed=0, progress=False)
    files = {}
    for r in rows:
        for m, ext in (("image", "jpg"), ("video", "mp4"), ("audio", "wav")):
            if m in r:
                files[ext] = (root / "gen" / r[m]).read_bytes()
    tok = train_tokenizer([c for r in rows for caps in r["captions"].values() for c in caps] + ["a cat"] * 5,
                          root / "tok", vocab_size=200)
    model = ModelConfig(image=ImageTowerConfig(), video=VideoTowerConfig(), audio=AudioTowerConfig(seconds=0.5),
                        text=TextTowerConfig(tokenizer=str(root / "tok"), max_length=16))
    return root, files, tok, model


def bad_samples(files: dict) -> tuple[list[dict], dict]:
    """(samples, expected skip counts per reason); each reason once, then the good samples."""
    cap = js({"captions": {"en": ["a cat"]}})
    bad = [
        ({"__key__": "bomb", "png": png_bomb(), "json": cap}, "decompression bomb"),
        ({"__key__": "bad-jpg", "jpg": b"\xff\xd8garbage", "json": cap}, "undecodable image"),
        ({"__key__": "bad-mp4", "mp4": b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 40, "json": cap}, "undecodable video"),
        ({"__key__": "bad-wav", "wav": b"RIFF\x10\x00\x00\x00WAVEjunk", "json": cap}, "undecodable audio"),
        ({"__key__": "cut-jpg", "jpg": files["jpg"][: len(files["jpg"]) // 3], "json": cap}, "undecodable image"),
        ({"__key__": "bad-npy", "jpg": files["jpg"], "teacher_text.npy": b"\x93NUMPY garbage", "json": cap},
         "undecodable npy"),
        ({"__key__": "bad-ref", "jpg": files["jpg"], "ref.jpg": b"not a jpeg", "json": cap}, "undecodable image"),
        ({"__key__": "not-utf8", "jpg": files["jpg"], "json": b'{"captions": {"en": "caf\xe9"}}'}, "bad json"),
        ({"__key__": "not-json", "jpg": files["jpg"], "json": b"{oops"}, "bad json"),
        ({"__key__": "json-list", "jpg": files["jpg"], "json": b"[1, 2]"}, "bad json"),
        ({"__key__": "odd-ext", "jpg": files["jpg"], "xyz": b"?", "json": cap}, "unknown extension"),
        ({"__key__": "bad-lang", "jpg": files["jpg"], "json": js({"captions": {"klingon!": "qapla"}})},
         "unknown language code"),
        ({"__key__": "blank", "jpg": files["jpg"], "json": js({"captions": {"en": ["  ", ""]}})}, "empty captions"),
        ({"__key__": "cap-type", "jpg": files["jpg"], "json": js({"captions": {"en": 5}})}, "bad captions"),
        ({"__key__": "cap-map", "jpg": files["jpg"], "json": js({"captions": ["a cat"]})}, "bad captions"),
    ]
    good = [
        {"__key__": "good-img", "jpg": files["jpg"], "json": cap},
        {"__key__": "good-vid", "mp4": files["mp4"], "json": cap},
        {"__key__": "good-wav", "wav": files["wav"], "json": cap},
        {"__key__": "long", "jpg": files["jpg"], "json": js({"captions": {"en": "a cat " * 200_000}})},  # 1.2 MB
    ]
    expected: dict[str, int] = {}
    for _, reason in bad:
        expected[reason] = expected.get(reason, 0) + 1
    return [s for s, _ in bad] + good, expected


def test_training_stream_counts_every_bad_sample_and_truncates_long_captions(media, tmp_path, caplog):
    root, files, tok, model = media
    samples, expected = bad_samples(files)
    shard = write_tar(tmp_path / "bad.tar", samples)
    cfg = DataConfig(train_shards=str(shard), batch_size=4, shuffle_buffer=0, language_policy="random_language")
    loader = build_train_loader(cfg, Preprocessor(model, tok, train=True), rank=0, world_size=1)
    with caplog.at_level("WARNING", logger="mlmm.data"):
        batch = next(iter(loader))  # the 4 good samples, after every bad one of the epoch
    assert batch.keys == ["good-img", "good-vid", "good-wav", "long"]
    assert batch.data_state["skipped"] == expected
    assert batch.data_state["notes"] == {"caption truncated": 1}
    assert len(batch.captions[3]) == CAPTION_CHARS_PER_TOKEN * 16 and batch.text_ids.shape == (4, 16)
    for reason in expected:  # logged once per reason
        assert sum(f"({reason})" in m for m in caplog.messages) == 1, (reason, caplog.messages)


def test_evaluation_counts_every_bad_sample(media, tmp_path, caplog):
    root, files, tok, model = media
    samples, expected = bad_samples(files)
    write_tar(tmp_path / "bad.tar", samples)
    with caplog.at_level("WARNING", logger="mlmm.data.preprocess"):
        items = load_eval_items(str(tmp_path / "bad.tar"), Preprocessor(model, tok, train=False),
                                ["image", "video", "audio"])
    assert items["keys"] == ["bad-npy", "bad-ref", "good-img", "good-vid", "good-wav", "long"]  # npy/ref: not read
    expected = {r: n for r, n in expected.items() if r != "undecodable npy"}
    expected["undecodable image"] -= 1  # the extra image (ref.jpg) is not an eval item
    assert items["skipped"] == expected
    assert items["notes"] == {"caption truncated": 1}
    long_caption = dict(items["captions"]["en"])[items["keys"].index("long")]
    assert len(long_caption) == CAPTION_CHARS_PER_TOKEN * 16
    assert sum("decompression bomb" in m for m in caplog.messages) == 1


def test_video_and_audio_bombs_are_skipped_at_the_limit(media, tmp_path, monkeypatch):
    from PIL import Image

    from mlmm.data import transforms

    root, files, tok, model = media
    write_tar(tmp_path / "av.tar", [{"__key__": "v", "mp4": files["mp4"], "json": js({})},
                                    {"__key__": "a", "wav": files["wav"], "json": js({})}])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 32 * 32 - 1)  # the generated 32x32 frames are "too large"
    monkeypatch.setattr(transforms, "MAX_AUDIO_SAMPLES", 100)
    items = load_eval_items(str(tmp_path / "av.tar"), Preprocessor(model, tok, train=False), ["video", "audio"])
    assert items["skipped"] == {"decompression bomb": 2} and not items["keys"]


def test_truncated_member_and_corrupt_header_are_counted(media, tmp_path):
    root, files, tok, model = media
    cap = js({"captions": {"en": ["a cat"]}})
    good = [{"__key__": f"g{i}", "jpg": files["jpg"], "json": cap} for i in range(3)]
    data = write_tar(tmp_path / "full.tar", good).read_bytes()
    cut = data.index(b"g2.jpg") + 512 + 100  # inside the data of g2's first member
    (tmp_path / "a-truncated.tar").write_bytes(data[:cut])
    corrupt = bytearray(data)
    header = data.index(b"g1.jpg")
    corrupt[header + 148: header + 156] = b"garbage!"  # the checksum field of g1.jpg's header
    (tmp_path / "b-corrupt.tar").write_bytes(bytes(corrupt))
    spec = f"{tmp_path / 'a-truncated.tar'},{tmp_path / 'b-corrupt.tar'},{tmp_path / 'full.tar'}"
    items = load_eval_items(spec, Preprocessor(model, tok, train=False), ["image"])
    assert items["skipped"] == {"truncated shard": 2}
    # the cut loses g2 and g1 (the sample before an error may be incomplete), the bad header every sample
    assert items["keys"] == ["g0", "g0", "g1", "g2"]
    # training: the lost samples are padded (indices stay aligned) and marked for counting
    raws = list(SlotPlan([str(tmp_path / "b-corrupt.tar")], seed=0, slot=0, n_slots=1).epoch_samples(0, 0))
    assert [r["__error__"].split(": ")[0] for r in raws] == ["truncated shard"]
    assert "unreadable tar header" in raws[0]["__error__"]


def test_decode_on_device_sends_only_sound_jpegs(media):
    from mlmm.data.transforms import jpeg_size

    root, files, tok, model = media
    assert jpeg_size(files["jpg"]) == (32, 32)
    assert jpeg_size(files["jpg"][:-40]) is None  # no end-of-image marker: decoded (and counted) in the loader
    assert jpeg_size(png_bomb()) is None
    pre = Preprocessor(model, tok, train=True, encoded_images=True)
    with pytest.raises(ValueError, match="undecodable image"):
        pre.media({"__key__": "cut", "jpg": files["jpg"][: len(files["jpg"]) // 3]})
    assert np.asarray(pre.media({"__key__": "ok", "jpg": files["jpg"]})["image_box"]).shape == (4,)
