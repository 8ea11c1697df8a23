"""Data-loader throughput: mlmm's training stream vs a plain webdataset + PIL + torchvision pipeline.

    python -m benchmarks.dataloader                         # 2 shards x 1000 512-px JPEGs, workers 1 and 2
    python -m benchmarks.dataloader --n 400 --workers 1     # quick look

Both read the same shards (512-px JPEG + json with captions) and yield batches of 224-px float tensors,
normalised with the CLIP mean/std, with a train-time random crop:
  * plain: ``webdataset.WebDataset(...).decode("pil")`` + open_clip's own train transform
    (``open_clip.image_transform(224, is_train=True)``: RandomResizedCrop bicubic, ToTensor, Normalize), batched
    in the workers, the way open_clip's training data module does it (no caption tokenisation: a head start);
  * mlmm: ``mlmm.data.train_stream.build_train_loader`` (shuffle buffer, caption choice + tokenisation, resumable
    position), whose JPEG decoding uses PIL ``draft()`` (DCT-domain downscaling to the smallest scale >= 224 px) and
    resizes on uint8 before normalising.
Images: the photos of ../shared/data/images_vi upscaled to 512 px with film grain (realistic JPEG entropy), or
generated shapes with grain when that folder is absent. One epoch per measurement after a warm-up batch;
samples/s per worker count and the ratio mlmm / plain; also mlmm with ``data.normalize_on_device`` (uint8 batches: the
normalisation moves to the training device, which is how GPU runs should use it) and with ``data.decode_on_device``
(workers pass JPEG bytes; the decode moves to the training device: nvJPEG on CUDA). The latter's worker rate is not
comparable with the others (the decode is not in it): its cost on the device is timed separately, on CPU here
(``decode_on_device_ms_per_image``, one thread; on CUDA when present: nvJPEG). Writes
``benchmarks/results/dataloader_cpu.json``.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.bench_common import write_result

REPO = Path(__file__).resolve().parents[1]

PHOTOS = REPO.parent / "shared" / "data" / "images_vi"
CAPTIONS = {"en": ["a photo"], "de": ["ein Foto"], "fr": ["une photo"]}


def source_images(n: int, size: int, seed: int) -> list[np.ndarray]:
    """`n` distinct-ish size x size RGB arrays: real photos (cropped, flipped, grained) or shapes."""
    rng = np.random.default_rng(seed)
    photos = sorted(PHOTOS.glob("*.jpg"))[:64] if PHOTOS.is_dir() else []
    base = []
    for p in photos:
        base.append(np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC)))
    if not base:  # generated: smooth colour field + a few discs
        yy, xx = np.mgrid[0:size, 0:size] / size
        for _ in range(16):
            c = rng.uniform(0, 255, (3, 3))
            img = (c[0] * xx[..., None] + c[1] * yy[..., None] + c[2] * (1 - xx[..., None])) / 2
            base.append(np.clip(img, 0, 255).astype(np.uint8))
    out = []
    for i in range(n):
        img = base[i % len(base)].astype(np.float32)
        if (i // len(base)) % 2:
            img = img[:, ::-1]
        img = img + rng.normal(0, 6, img.shape)  # film grain: photo-like JPEG entropy
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def write_bench_shards(root: Path, n: int, per_shard: int, size: int, seed: int) -> str:
    """Shards of `per_shard` samples (jpg + json) with an index.json, as mlmm's writer lays them out."""
    root.mkdir(parents=True, exist_ok=True)
    index, names = [], []
    images = source_images(n, size, seed)
    for s in range(0, n, per_shard):
        name = f"bench-{s // per_shard:06d}.tar"
        with tarfile.open(root / name, "w") as tar:
            for i in range(s, min(n, s + per_shard)):
                buf = io.BytesIO()
                Image.fromarray(images[i]).save(buf, format="JPEG", quality=90)
                for ext, data in (("jpg", buf.getvalue()),
                                  ("json", json.dumps({"captions": CAPTIONS}).encode())):
                    info = tarfile.TarInfo(f"s{i:07d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        index.append({"name": name, "n": min(n, s + per_shard) - s})
        names.append(name)
    (root / "index.json").write_text(json.dumps({"shards": index}))
    return str(root / ("bench-{000000..%06d}.tar" % (len(names) - 1)))


def plain_loader(spec: str, batch: int, workers: int):
    import open_clip
    import webdataset as wds

    transform = open_clip.image_transform(224, is_train=True)
    dataset = (wds.WebDataset(spec, shardshuffle=False, nodesplitter=wds.split_by_node,
                              workersplitter=wds.split_by_worker)
               .decode("pil").to_tuple("jpg", "json").map_tuple(transform, lambda x: x)
               .batched(batch, partial=False))
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                       prefetch_factor=4 if workers else None, persistent_workers=False)


def mlmm_loader(spec: str, batch: int, workers: int, tok_dir: Path, uint8: bool = False, encoded: bool = False):
    from mlmm.config import DataConfig, ImageTowerConfig, ModelConfig, TextTowerConfig
    from mlmm.data.preprocess import Preprocessor
    from mlmm.data.train_stream import build_train_loader
    from mlmm.data.tokenization import load_tokenizer, train_tokenizer

    if not (tok_dir / "tokenizer.json").is_file():
        train_tokenizer([c for caps in CAPTIONS.values() for c in caps] * 10, tok_dir, vocab_size=64)
    model_cfg = ModelConfig(embed_dim=32, image=ImageTowerConfig(image_size=224, patch_size=32),
                            text=TextTowerConfig(tokenizer=str(tok_dir), max_length=16))
    pre = Preprocessor(model_cfg, load_tokenizer(tok_dir), train=True, uint8_images=uint8, encoded_images=encoded)
    cfg = DataConfig(train_shards=spec, batch_size=batch, num_workers=workers, shuffle_buffer=64)
    return build_train_loader(cfg, pre, rank=0, world_size=1)


def time_epoch(loader, n: int, batch: int) -> float:
    """samples/s over one epoch's worth of batches, the first (worker start-up) excluded."""
    it = iter(loader)
    first = next(it)
    images = first[0] if isinstance(first, (tuple, list)) else first.image
    assert images.shape[-2:] == (224, 224) and images.dtype in (torch.float32, torch.uint8)
    batches = n // batch - 1
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - t)


def device_decode_ms(spec: str, batch: int, tok_dir: Path, device: torch.device, reps: int = 3) -> float:
    """ms per image of ``Batch.decode_images`` (data.decode_on_device) on `device` (CPU: one thread), best of `reps`."""
    b = next(iter(mlmm_loader(spec, batch, 0, tok_dir, encoded=True))).to(device)
    times = []
    for _ in range(reps + 1):  # the first one warms up (nvJPEG handles, kernels) and is not counted
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        out = b.decode_images()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    assert out.image.dtype == torch.uint8 and out.image.shape[-2:] == (224, 224)
    return 1000 * min(times[1:]) / len(b)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="samples (1000 per shard)")
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=2, help="alternating repetitions; the best of each counts")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the loaders' own cost, per worker process
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        spec = write_bench_shards(Path(tmp) / "shards", args.n, args.per_shard, args.size, seed=0)
        mean_kb = sum(p.stat().st_size for p in (Path(tmp) / "shards").glob("*.tar")) / args.n / 1024
        print(f"wrote {args.n} {args.size}-px JPEG samples ({mean_kb:.0f} KB each) in {time.perf_counter() - t:.0f} s")
        rows = []
        for workers in args.workers:
            rates = {"plain": [], "mlmm": [], "mlmm_uint8": [], "mlmm_bytes": []}
            for _ in range(args.reps):
                rates["plain"].append(time_epoch(plain_loader(spec, args.batch, workers), args.n, args.batch))
                rates["mlmm"].append(time_epoch(mlmm_loader(spec, args.batch, workers, Path(tmp) / "tok"),
                                                args.n, args.batch))
                rates["mlmm_uint8"].append(time_epoch(mlmm_loader(spec, args.batch, workers, Path(tmp) / "tok",
                                                                  uint8=True), args.n, args.batch))
                rates["mlmm_bytes"].append(time_epoch(mlmm_loader(spec, args.batch, workers, Path(tmp) / "tok",
                                                                  encoded=True), args.n, args.batch))
            best = {k: max(v) for k, v in rates.items()}
            row = {"workers": workers, "plain_samples_per_s": best["plain"], "mlmm_samples_per_s": best["mlmm"],
                   "plain_per_worker": best["plain"] / workers, "mlmm_per_worker": best["mlmm"] / workers,
                   "ratio_mlmm_over_plain": best["mlmm"] / best["plain"],
                   # data.normalize_on_device: uint8 out, normalisation moved to the training device (GPU runs)
                   "mlmm_uint8_samples_per_s": best["mlmm_uint8"],
                   "ratio_mlmm_uint8_over_plain": best["mlmm_uint8"] / best["plain"],
                   # data.decode_on_device: workers read bytes + JPEG headers only; decode is on the device
                   "mlmm_decode_on_device_worker_samples_per_s": best["mlmm_bytes"], "all": rates}
            rows.append(row)
            print(f"workers {workers}: plain {best['plain']:7.1f} samples/s, mlmm {best['mlmm']:7.1f} samples/s "
                  f"-> {row['ratio_mlmm_over_plain']:.2f}x; uint8 out (normalize_on_device) "
                  f"{best['mlmm_uint8']:7.1f} -> {row['ratio_mlmm_uint8_over_plain']:.2f}x; JPEG bytes out "
                  f"(decode_on_device, decode not included) {best['mlmm_bytes']:7.1f}")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        decode_ms = device_decode_ms(spec, args.batch, Path(tmp) / "tok", device)
        print(f"decode_on_device: Batch.decode_images on {device} {decode_ms:.2f} ms/image")
    path = write_result("dataloader_cpu", {"n": args.n, "image_px": args.size, "batch": args.batch,
                                           "mean_sample_kb": mean_kb, "rows": rows,
                                           "decode_on_device_ms_per_image": decode_ms,
                                           "decode_on_device_device": device.type,
                                           "command": " ".join(sys.argv)}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
