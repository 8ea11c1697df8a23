"""Video loader throughput, one core: mlmm's loader vs the plain PyAV loader a user writes, and decord.

    python -m benchmarks.video_loader --reps 3 --max-load 1.5      # the figures in docs/performance.md
    python -m benchmarks.video_loader --repeat 4 --reps 1           # quick look

Data: the real clips of ../shared/data/video (MSR-VTT / MSVD, 320x240, 7-18 s, H.264) repeated to ``--repeat`` x 5
samples, written into shards with mlmm's writer twice: as they are, and transcoded once at write time
(``write_shards --video-fps 3 --video-size 256``: 3 fps, all-intra H.264; the writing time is reported as the
one-time cost). Work per sample: T = 8 frames sampled uniformly, 224 px (shorter side resized, centre / random
square crop), normalised float32 [8, 3, 224, 224]. Every loader runs in this process (no worker processes), pinned
to one core with one torch thread: the figures are per worker.

Loaders:
  * plain: webdataset + PyAV decoding every frame (``frame.to_image()``), then torchvision's
    ``Resize(224, bicubic) + CenterCrop + ToTensor + Normalize`` on the 8 sampled frames;
  * decord (when ``pip install decord`` works): ``VideoReader(..., num_threads=1).get_batch(indices)``, then the same
    resize / crop / normalise on uint8 tensors;
  * mlmm: ``mlmm.data.train_stream.build_train_loader`` (its video decoding: ``mlmm.data.video``'s sparse H.264
    decode, exact).
Each loader is timed on the original shards and on the transcoded ones, once per repetition in turn (``--reps``,
interleaved; ``--max-load`` waits for a quiet machine first and the load seen is recorded); the median counts.
Ratios are against the plain loader on the original shards. Writes ``benchmarks/results/video_loader.json``.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_common import wait_quiet, write_result

REPO = Path(__file__).resolve().parents[1]

VIDEOS = REPO.parent / "shared" / "data" / "video"
FRAMES, SIZE = 8, 224  # the work per sample (the figures); --frames / --frame-size change it (the tiny test)
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def find_clips(n: int | None = None) -> list[Path]:
    clips = sorted(p for p in VIDEOS.iterdir() if p.suffix in (".mp4", ".avi")) if VIDEOS.is_dir() else []
    if not clips:
        raise SystemExit(f"no clips in {VIDEOS}")
    return clips[:n]


def write_bench_shards(root: Path, repeat: int, clips: list[Path], fps=None, size=None) -> tuple[str, float, float]:
    """``repeat`` copies of every clip -> shards via mlmm's writer; -> (shard folder, seconds, mean KB per sample)."""
    from mlmm.data.write_shards import write_shards

    manifest = root / "manifest.jsonl"
    root.mkdir(parents=True, exist_ok=True)
    with manifest.open("w") as f:
        for r in range(repeat):
            for c in clips:
                f.write(json.dumps({"key": f"{c.stem}-{r:04d}", "video": str(c),
                                    "captions": {"en": ["a video clip"]}}) + "\n")
    extra = {} if fps is None and size is None else {"video_fps": fps, "video_size": size}
    t = time.perf_counter()
    write_shards(manifest, root / "shards", shard_size=100, progress=False, **extra)
    seconds = time.perf_counter() - t
    tars = list((root / "shards").glob("*.tar"))
    return str(root / "shards"), seconds, sum(p.stat().st_size for p in tars) / (repeat * len(clips)) / 1024


def sample_indices(n: int, frames: int) -> list[int]:
    return [int(round(i)) for i in np.linspace(0, n - 1, frames)]


def _raw_samples(shards: str):
    import webdataset as wds

    urls = sorted(str(p) for p in Path(shards).glob("*.tar"))
    return wds.WebDataset(urls, shardshuffle=False, empty_check=False).to_tuple("mp4;avi", "json")


def plain_loader(shards: str, frames: int = FRAMES, size: int = SIZE):
    """What a user writes: PyAV decodes every frame, torchvision transforms the sampled ones."""
    import av
    from torchvision import transforms as T

    tf = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(),
                    T.Normalize(MEAN, STD)])
    for data, _ in _raw_samples(shards):
        with av.open(io.BytesIO(data)) as c:
            decoded = [f.to_image() for f in c.decode(video=0)]
        yield torch.stack([tf(decoded[i]) for i in sample_indices(len(decoded), frames)])  # [T, 3, size, size]


def decord_loader(shards: str, frames: int = FRAMES, size: int = SIZE):
    import decord
    from torchvision.transforms.v2 import functional as F

    for data, _ in _raw_samples(shards):
        vr = decord.VideoReader(io.BytesIO(data), num_threads=1)
        x = torch.from_numpy(vr.get_batch(sample_indices(len(vr), frames)).asnumpy()).permute(0, 3, 1, 2)  # [T,3,H,W]
        x = F.center_crop(F.resize(x, size, interpolation=F.InterpolationMode.BICUBIC, antialias=True), size)
        yield F.normalize(x.float().div_(255), MEAN, STD)


def mlmm_loader(shards: str, tok_dir: Path, frames: int = FRAMES, size: int = SIZE):
    from mlmm.config import DataConfig, ImageTowerConfig, ModelConfig, TextTowerConfig, VideoTowerConfig
    from mlmm.data.preprocess import Preprocessor
    from mlmm.data.train_stream import build_train_loader
    from mlmm.data.tokenization import load_tokenizer, train_tokenizer

    if not (tok_dir / "tokenizer.json").is_file():
        train_tokenizer(["a video clip"] * 20, tok_dir, vocab_size=64)
    model_cfg = ModelConfig(embed_dim=32, image=ImageTowerConfig(image_size=size, patch_size=min(32, size)),
                            video=VideoTowerConfig(frames=frames),
                            text=TextTowerConfig(tokenizer=str(tok_dir), max_length=16))
    pre = Preprocessor(model_cfg, load_tokenizer(tok_dir), train=True)
    cfg = DataConfig(train_shards=shards, batch_size=1, num_workers=0, shuffle_buffer=0)
    for batch in build_train_loader(cfg, pre, rank=0, world_size=1):
        yield batch.video[0]


def time_loader(make, n: int, frames: int = FRAMES, size: int = SIZE) -> float:
    """samples/s over ``n`` samples (the first one, with start-up, excluded)."""
    it = make()
    first = next(it)
    assert first.shape == (frames, 3, size, size) and first.dtype == torch.float32, first.shape
    t = time.perf_counter()
    for _ in range(n - 1):
        next(it)
    return (n - 1) / (time.perf_counter() - t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=40, help="copies of each of the 5 clips (40: 200 samples)")
    ap.add_argument("--clips", type=int, default=None, help="use only the first N clips (default: all 5)")
    ap.add_argument("--frames", type=int, default=FRAMES, help="T, frames sampled per clip")
    ap.add_argument("--frame-size", type=int, default=SIZE, help="side of the square frames the loaders output")
    ap.add_argument("--no-decord", action="store_true", help="do not time decord even when it is installed")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-load", type=float, default=None)
    ap.add_argument("--fps", type=float, default=3.0, help="write-time transcode: frames per second")
    ap.add_argument("--size", type=int, default=256, help="write-time transcode: shorter side")
    ap.add_argument("--cpu", type=int, default=None, help="core to pin to (default: the last one)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    affinity, threads = os.sched_getaffinity(0), torch.get_num_threads()
    cpu = args.cpu if args.cpu is not None else max(affinity)
    os.sched_setaffinity(0, {cpu})
    torch.set_num_threads(1)
    try:
        return run(args, cpu)
    finally:  # called in-process by the tests: give the process its cores back
        os.sched_setaffinity(0, affinity)
        torch.set_num_threads(threads)


def run(args, cpu: int) -> int:
    has_decord = False
    if not args.no_decord:
        try:
            import decord  # noqa: F401
            has_decord = True
        except ImportError as e:
            print(f"decord not available ({e}): not timed")
    clips = find_clips(args.clips)
    frames, size = args.frames, args.frame_size
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        orig, orig_s, orig_kb = write_bench_shards(tmp / "orig", args.repeat, clips)
        tc, tc_s, tc_kb = write_bench_shards(tmp / "tc", args.repeat, clips, fps=args.fps, size=args.size)
        n = args.repeat * len(clips)
        print(f"{n} samples: original {orig_kb:.0f} KB/sample (written in {orig_s:.1f} s), transcoded to "
              f"{args.fps:g} fps / {args.size} px {tc_kb:.0f} KB/sample (written in {tc_s:.1f} s: "
              f"{tc_s / n * 1000:.0f} ms per clip, one time)", flush=True)
        loaders = {"plain": lambda s: plain_loader(s, frames, size),
                   "mlmm": lambda s: mlmm_loader(s, tmp / "tok", frames, size)}
        if has_decord:
            loaders["decord"] = lambda s: decord_loader(s, frames, size)
        runs = {f"{name}/{data}": (fn, shards) for name, fn in loaders.items()
                for data, shards in (("original", orig), ("transcoded", tc))}
        rates = {k: [] for k in runs}
        loads = {k: [] for k in runs}
        for rep in range(args.reps):
            for key, (fn, shards) in runs.items():
                loads[key].append(wait_quiet(args.max_load, label=key))
                rates[key].append(time_loader(lambda fn=fn, shards=shards: fn(shards), n, frames, size))
            print(f"  rep {rep + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rates.items()) + " samples/s",
                  flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    base = med["plain/original"]
    rows = [{"loader": k, "samples_per_s": v, "ratio_vs_plain_original": v / base, "all": rates[k],
             "load_1m_all": loads[k]} for k, v in med.items()]
    for r in rows:
        print(f"  {r['loader']:22s} {r['samples_per_s']:8.2f} samples/s  {r['ratio_vs_plain_original']:6.2f}x plain")
    result = {"samples": n, "clips": [c.name for c in clips], "frames": frames, "size": size, "cpu": cpu,
              "reps": args.reps, "max_load": args.max_load,
              "transcode": {"fps": args.fps, "size": args.size, "write_seconds": tc_s, "ms_per_clip": tc_s / n * 1000,
                            "kb_per_sample": tc_kb},
              "original": {"write_seconds": orig_s, "kb_per_sample": orig_kb}, "decord": has_decord, "rows": rows,
              "ratio_mlmm_exact": med["mlmm/original"] / base,
              "ratio_mlmm_transcoded": med["mlmm/transcoded"] / base, "command": " ".join(sys.argv)}
    if has_decord:
        result["mlmm_over_decord_original"] = med["mlmm/original"] / med["decord/original"]
        result["mlmm_over_decord_transcoded"] = med["mlmm/transcoded"] / med["decord/transcoded"]
    path = write_result("video_loader", result, args.out)
    print(f"mlmm exact path {result['ratio_mlmm_exact']:.2f}x plain; on transcoded shards "
          f"{result['ratio_mlmm_transcoded']:.2f}x -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
