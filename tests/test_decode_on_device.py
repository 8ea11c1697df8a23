"""data.decode_on_device: loader workers pass JPEG bytes + crop boxes; the batch decodes them where the model runs
(nvJPEG on CUDA). Here on CPU: the same pixels as the worker path, and the same training."""
import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mlmm.data.transforms import crop_box, decode_jpegs, jpeg_size

REPO = Path(__file__).resolve().parents[1]


def photo(w=120, h=90, fmt="JPEG", mode="RGB") -> bytes:
    """A smooth, photo-like image encoded as `fmt`."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack([128 + 100 * np.sin(xx / 13.0), 128 + 90 * np.cos(yy / 11.0), (2 * xx + yy) % 256], -1)
    img = Image.fromarray(rgb.astype(np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def test_jpeg_size_reads_the_header_and_refuses_what_decode_jpeg_should_not_get():
    assert jpeg_size(photo(120, 90)) == (120, 90)
    assert jpeg_size(photo(50, 70, mode="L")) == (50, 70)
    assert jpeg_size(photo(fmt="PNG")) is None
    assert jpeg_size(photo(mode="CMYK")) is None  # CMYK JPEG: decoded in the worker
    assert jpeg_size(b"\xff\xd8 not a jpeg") is None


def test_decode_jpegs_matches_pil_decode_crop_and_bicubic_resize():
    blobs = [photo(120, 90), photo(64, 64), photo(50, 70, mode="L")]
    rng = random.Random(0)
    boxes = [crop_box(*jpeg_size(b), train, rng) for b, train in zip(blobs, (True, False, False))]
    out = decode_jpegs([torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs],
                       torch.tensor(boxes), 32, "cpu")
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.uint8
    for blob, box, got in zip(blobs, boxes, out):
        ref = Image.open(io.BytesIO(blob)).convert("RGB").resize((32, 32), Image.Resampling.BICUBIC, box=box)
        diff = (got.permute(1, 2, 0).numpy().astype(int) - np.asarray(ref).astype(int)).__abs__()
        assert diff[2:-2, 2:-2].max() <= 2 and diff.mean() < 0.6, (box, diff.max(), diff.mean())
    with pytest.raises(ValueError, match="decode_jpeg"):
        decode_jpegs([torch.frombuffer(bytearray(b"\xff\xd8\xff junk"), dtype=torch.uint8)], torch.zeros(1, 4,
                     dtype=torch.long), 32, "cpu")


def test_encoded_batches_decode_to_the_worker_batches_and_train_the_same(tmp_path):
    """JPEG rows travel as bytes and decode in Batch.decode_images; PNG rows decode in the worker. The decoded
    batch equals the worker-decoded one to JPEG-decoder rounding; a Trainer run with it trains to the same loss."""
    from conftest import build_tiny_data, tiny_clip_losses
    from mlmm.config import load_config
    from mlmm.data.collate import collate
    from mlmm.data.preprocess import Preprocessor
    from mlmm.training.trainer import load_tokenizer

    data = build_tiny_data(tmp_path / "data", n_images=24, n_videos=4, n_audio=4, shard_size=40, seed=5)
    base = [f"data.train_shards={data / 'shards'}", f"model.text.tokenizer={data / 'tok'}",
            f"train.ds_config={REPO / 'ds_config.json'}", "train.progress=false", "train.max_steps=4",
            "train.log_every=2", "data.batch_size=8", "data.shuffle_buffer=0"]
    cfg = load_config(REPO / "recipes" / "configs" / "tiny_clip.yaml", [*base, f"output_dir={tmp_path / 'a'}"])
    size = cfg.model.image.image_size
    raws = [{"__key__": f"s{i}", "json": {"captions": {"en": "a photo"}},
             "jpg" if i != 2 else "png": photo(2 * size - 4 + i, 2 * size + 7, "JPEG" if i != 2 else "PNG")}
            for i in range(4)]
    raws.append({"__key__": "text-only", "json": {"captions": {"en": "no image"}}})
    batches = {}
    for encoded in (False, True):
        pre = Preprocessor(cfg.model, load_tokenizer(cfg), train=True, uint8_images=True, encoded_images=encoded)
        batches[encoded] = collate([pre(r, random.Random(i))[0] for i, r in enumerate(raws)], shapes=pre.shapes)
    enc = batches[True]
    assert [e is not None for e in enc.image_jpeg] == [True, True, False, True, False]
    assert enc.image_mask.tolist() == [True] * 4 + [False] and not enc.image[[0, 1, 3]].any()
    decoded = enc.decode_images()
    assert decoded.image_jpeg == [] and decoded.decode_images() is decoded
    diff = (decoded.image.int() - batches[False].image.int()).abs()
    assert diff.max() <= 3 and diff.float().mean() < 0.5, (diff.max(), diff.float().mean())
    assert torch.equal(decoded.image[2], batches[False].image[2]) and not decoded.image[4].any()
    losses = {on: tiny_clip_losses([*base, f"data.decode_on_device={str(on).lower()}"], tmp_path / str(on))
              for on in (False, True)}
    assert losses[True] == pytest.approx(losses[False], rel=2e-3)
