"""Audio loader throughput on FSDD: the plain soundfile + torchaudio per-sample loader a user writes, mlmm's loader,
and mlmm with ``data.logmel_on_device`` (workers ship waveforms, the log-mel is computed per batch on the device).

    python -m benchmarks.audio_loader --reps 3 --max-load 1.5      # the figures in docs/performance.md
    python -m benchmarks.audio_loader --reps 1 --batches 10         # quick look

Data: the 300 FSDD WAVs of ../shared/data/audio_fsdd (8 kHz, 16-bit, 0.14-1.15 s) repeated to ``--repeat`` x 300
samples, written into shards with mlmm's writer. Work per sample: the model's log-mel input [1, n_mels, frames] of
``AudioTowerConfig`` (default: 16 kHz, so FSDD is resampled; 1 s, centre-cropped or zero-padded; 32 mels, n_fft 400,
hop 160), in float32 batches of ``--batch-size``.

Loaders (every one yields [B, 1, n_mels, frames] float32 batches, checked equal to 1e-5 on the same samples):
  * plain: webdataset + ``soundfile.read`` + ``torchaudio.functional.resample`` (the rate differs) + the same crop /
    pad + ``torchaudio.transforms.MelSpectrogram`` + log, per sample, in a DataLoader;
  * mlmm: ``mlmm.data.train_stream.build_train_loader`` as it is (the log-mel per sample in the workers);
  * mlmm_device: the same with ``data.logmel_on_device``: the workers ship fixed-length float32 waveforms and
    ``Batch.audio_features`` computes the log-mel of each batch where the model runs (here: the CPU).

Every loader runs in a process of its own, pinned to one core with one torch thread, once per repetition in turn
(``--reps``, interleaved; ``--max-load`` waits for a quiet machine first and logs the load). Two layouts:
  * ``inproc`` (``num_workers=0``): the samples/s of one worker, and for mlmm_device the per-batch log-mel timed
    apart: ``worker`` is what the loader alone delivers (a GPU user's figure), ``total`` includes the features;
  * ``worker`` (``num_workers=1``, the worker on the same core): the real DataLoader path, tensors crossing process
    boundaries; CPU seconds are those of both processes.
On a CPU the "device" is the same cores, so the comparison that counts here is CPU time per sample of loader +
features (``cpu_ms_per_sample``). Medians over the repetitions. Writes ``benchmarks/results/audio_loader.json``.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_common import wait_quiet, write_result

REPO = Path(__file__).resolve().parents[1]
FSDD = REPO.parent / "shared" / "data" / "audio_fsdd"
LOADERS = ("plain", "mlmm", "mlmm_device")
LAYOUTS = ("inproc", "worker")


def audio_cfg(args):
    from mlmm.config import AudioTowerConfig

    return AudioTowerConfig(sample_rate=args.sample_rate, seconds=args.seconds, n_mels=args.n_mels, n_fft=args.n_fft,
                            hop_length=args.hop_length)


def write_bench_shards(root: Path, repeat: int, per_shard: int) -> tuple[str, int, float]:
    """``repeat`` copies of every FSDD WAV -> shards via mlmm's writer; -> (shard folder, samples, seconds)."""
    from mlmm.data.write_shards import write_shards

    rows = [json.loads(line) for line in (FSDD / "manifest.jsonl").read_text(encoding="utf-8").splitlines() if line]
    if not rows:
        raise SystemExit(f"no FSDD rows in {FSDD}")
    root.mkdir(parents=True, exist_ok=True)
    with (root / "manifest.jsonl").open("w", encoding="utf-8") as f:
        for r in range(repeat):
            for row in rows:
                f.write(json.dumps({"key": f"{Path(row['file']).stem}-{r:03d}", "audio": str(FSDD / row["file"]),
                                    "captions": row["captions"]}, ensure_ascii=False) + "\n")
    t = time.perf_counter()
    write_shards(root / "manifest.jsonl", root / "shards", shard_size=per_shard, progress=False)
    return str(root / "shards"), repeat * len(rows), time.perf_counter() - t


# ------------------------------------------------------------------------------------------ the loaders
class PlainAudio(torch.utils.data.IterableDataset):
    """What a user writes: webdataset reads the tars, soundfile decodes, torchaudio resamples and makes the log-mel of
    each sample (the MelSpectrogram module built once per worker); epochs repeat forever."""

    def __init__(self, urls: list[str], cfg):
        super().__init__()
        self.urls, self.cfg = urls, cfg

    def __iter__(self):
        import soundfile as sf
        import torchaudio
        import webdataset as wds

        from mlmm.data.transforms import LOGMEL_SCALE, LOGMEL_SHIFT

        c = self.cfg
        mel = torchaudio.transforms.MelSpectrogram(sample_rate=c.sample_rate, n_fft=c.n_fft, hop_length=c.hop_length,
                                                   n_mels=c.n_mels, center=True, power=2.0)
        target = int(c.sample_rate * c.seconds)
        while True:
            for key, data in wds.WebDataset(self.urls, shardshuffle=False, empty_check=False).to_tuple("__key__",
                                                                                                        "wav"):
                wave, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)  # [samples, channels]
                x = torch.from_numpy(wave.mean(axis=1))  # [samples]
                if sr != c.sample_rate:
                    x = torchaudio.functional.resample(x, orig_freq=sr, new_freq=c.sample_rate)
                if x.numel() > target:
                    start = (x.numel() - target) // 2
                    x = x[start : start + target]
                else:
                    x = torch.nn.functional.pad(x, (0, target - x.numel()))
                with torch.no_grad():
                    feats = (torch.log(mel(x) + 1e-6) + LOGMEL_SHIFT) / LOGMEL_SCALE  # [n_mels, frames]
                yield key, feats.unsqueeze(0)  # [1, n_mels, frames]


def make_loader(name: str, shards: str, cfg, batch_size: int, workers: int):
    """-> an infinite iterator of (keys, batch) where batch is [B, 1, n_mels, frames] log-mel (plain, mlmm) or a
    Batch with ``audio_wave`` (mlmm_device: :func:`features` makes the log-mel)."""
    if name == "plain":
        urls = [str(p) for p in sorted(Path(shards).glob("*.tar"))] if Path(shards).is_dir() else [shards]
        dl = torch.utils.data.DataLoader(PlainAudio(urls, cfg), batch_size=batch_size, num_workers=workers)
        return ((list(keys), x) for keys, x in dl)
    from mlmm.config import DataConfig, ModelConfig
    from mlmm.data.preprocess import Preprocessor
    from mlmm.data.train_stream import build_train_loader

    pre = Preprocessor(ModelConfig(audio=cfg), train=True, audio_waves=name == "mlmm_device")
    data_cfg = DataConfig(train_shards=shards, batch_size=batch_size, num_workers=workers, shuffle_buffer=0)
    loader = build_train_loader(data_cfg, pre, rank=0, world_size=1)
    return ((b.keys, b if name == "mlmm_device" else b.audio) for b in loader)


def features(name: str, batch, cfg) -> torch.Tensor:
    """mlmm_device: the per-batch log-mel on the device (here the CPU); the others are features already."""
    return batch.audio_features(cfg).audio if name == "mlmm_device" else batch


# ------------------------------------------------------------------------------------------ one timed run (child)
def child(args) -> dict:
    """Time ``args.child`` over ``args.batches`` batches after ``args.warmup``, in this process pinned to one core."""
    os.sched_setaffinity(0, {args.cpu})
    torch.set_num_threads(1)
    cfg = audio_cfg(args)
    workers = 1 if args.layout == "worker" else 0
    it = make_loader(args.child, args.shards, cfg, args.batch_size, workers)
    for _ in range(args.warmup):
        features(args.child, next(it)[1], cfg)

    def cpu() -> float:  # this process (ns resolution) + its live children (the DataLoader worker; clock ticks)
        return time.process_time() + sum(children_cpu_s().values())

    load_s = feat_s = 0.0
    n = 0
    c0 = cpu()
    w0 = time.perf_counter()
    for _ in range(args.batches):
        t = time.perf_counter()
        _, batch = next(it)
        t1 = time.perf_counter()
        out = features(args.child, batch, cfg)
        t2 = time.perf_counter()
        load_s, feat_s, n = load_s + t1 - t, feat_s + t2 - t1, n + out.shape[0]
        assert out.shape[1:] == (1, cfg.n_mels, cfg.frames) and out.dtype == torch.float32, out.shape
    wall, cpu_s = time.perf_counter() - w0, cpu() - c0
    out = {"loader": args.child, "layout": args.layout, "samples": n, "wall_s": wall, "cpu_s": cpu_s,
           "samples_per_s": n / wall, "cpu_ms_per_sample": cpu_s / n * 1e3}
    if args.layout == "inproc":  # with a worker process on the same core, waiting for a batch is not its cost
        out.update(worker_samples_per_s=n / load_s, features_ms_per_sample=feat_s / n * 1e3)
    return out


def children_cpu_s() -> dict[int, float]:
    """{pid: user + system CPU seconds} of this process's live children (/proc; clock-tick resolution)."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            pids = (task / "children").read_text().split()
        except OSError:
            continue
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # ended meanwhile
                continue
            out[int(pid)] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14, 15 of stat)
    return out


def check_equal(shard: str, cfg, batch_size: int) -> float:
    """Largest |difference| between the three loaders' features for the same samples (one shard, read in order)."""
    got = {}
    for name in LOADERS:
        keys, batch = next(make_loader(name, shard, cfg, batch_size, 0))
        got[name] = dict(zip(keys, features(name, batch, cfg)))
    common = set(got["plain"]) & set(got["mlmm"]) & set(got["mlmm_device"])
    if len(common) < batch_size:
        raise SystemExit(f"equality check: only {len(common)} common samples")
    return max(float((got[a][k] - got["plain"][k]).abs().max()) for k in common for a in ("mlmm", "mlmm_device"))


def run_child(args, name: str, layout: str, shards: str, cpu: int) -> dict:
    if args.same_process:  # the tests: no process start-up per run
        affinity, threads = os.sched_getaffinity(0), torch.get_num_threads()
        try:
            return child(argparse.Namespace(**{**vars(args), "child": name, "layout": layout, "shards": shards,
                                               "cpu": cpu}))
        finally:
            os.sched_setaffinity(0, affinity)
            torch.set_num_threads(threads)
    cmd = [sys.executable, "-m", "benchmarks.audio_loader", "--child", name, "--layout", layout, "--shards", shards,
           "--cpu", str(cpu), "--batches", str(args.batches), "--warmup", str(args.warmup),
           "--batch-size", str(args.batch_size), "--sample-rate", str(args.sample_rate), "--seconds", str(args.seconds),
           "--n-mels", str(args.n_mels), "--n-fft", str(args.n_fft), "--hop-length", str(args.hop_length)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=1800)
    if out.returncode:
        raise SystemExit(f"{name}/{layout} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=4, help="copies of each of the 300 WAVs (4: 1,200 samples)")
    ap.add_argument("--per-shard", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=150, help="timed batches per run (after --warmup)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--sample-rate", type=int, default=16000, help="model.audio.sample_rate (FSDD is 8 kHz)")
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--n-mels", type=int, default=32)
    ap.add_argument("--n-fft", type=int, default=400)
    ap.add_argument("--hop-length", type=int, default=160)
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help="inproc (num_workers=0), worker (num_workers=1)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-load", type=float, default=None)
    ap.add_argument("--cpu", type=int, default=None, help="core to pin to (default: the last one)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--same-process", action="store_true", help="time every loader in this process (quick tests)")
    ap.add_argument("--child", choices=LOADERS, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--layout", choices=LAYOUTS, default="inproc", help=argparse.SUPPRESS)
    ap.add_argument("--shards", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cpu = args.cpu if args.cpu is not None else max(os.sched_getaffinity(0))
    if args.child:
        args.cpu = cpu
        print(json.dumps(child(args)))
        return 0
    layouts = [x for x in args.layouts.split(",") if x]
    cfg = audio_cfg(args)
    with tempfile.TemporaryDirectory() as tmp:
        shards, n, write_s = write_bench_shards(Path(tmp), args.repeat, args.per_shard)
        first_shard = str(sorted(Path(shards).glob("*.tar"))[0])
        max_diff = check_equal(first_shard, cfg, args.batch_size)
        print(f"{n} samples written in {write_s:.1f} s; features of the three loaders agree to {max_diff:.2e}",
              flush=True)
        runs = [(name, layout) for layout in layouts for name in LOADERS]
        got: dict[str, list[dict]] = {f"{a}/{b}": [] for a, b in runs}
        for rep in range(args.reps):
            for name, layout in runs:
                key = f"{name}/{layout}"
                load = wait_quiet(args.max_load, label=key)
                got[key].append({**run_child(args, name, layout, shards, cpu), "load_1m": load})
            print(f"  rep {rep + 1}: " + ", ".join(f"{k} {v[-1]['samples_per_s']:.0f}/s "
                                                   f"{v[-1]['cpu_ms_per_sample']:.3f} ms" for k, v in got.items()),
                  flush=True)
    rows = []
    for key, runs_ in got.items():
        med = {m: statistics.median(r[m] for r in runs_) for m in
               ("samples_per_s", "worker_samples_per_s", "cpu_ms_per_sample", "features_ms_per_sample")
               if m in runs_[0]}
        rows.append({"loader": key, **med, "all": runs_})
    by = {r["loader"]: r for r in rows}
    for r in rows:
        layout = r["loader"].split("/")[1]
        base = by[f"plain/{layout}"]
        r["ratio_samples_per_s_vs_plain"] = r["samples_per_s"] / base["samples_per_s"]
        r["ratio_cpu_vs_plain"] = base["cpu_ms_per_sample"] / r["cpu_ms_per_sample"]
        alone = ""
        if "worker_samples_per_s" in r:
            r["ratio_worker_samples_per_s_vs_plain"] = r["worker_samples_per_s"] / base["samples_per_s"]
            alone = f" (loader alone {r['worker_samples_per_s']:7.1f})"
        print(f"  {r['loader']:20s} {r['samples_per_s']:7.1f} samples/s{alone}  {r['cpu_ms_per_sample']:.3f} CPU "
              f"ms/sample: {r['ratio_cpu_vs_plain']:.2f}x plain's CPU time")
    result = {"samples": n, "write_seconds": write_s, "cpu": cpu, "reps": args.reps, "max_load": args.max_load,
              "batch_size": args.batch_size, "batches": args.batches, "warmup": args.warmup,
              "audio": {"sample_rate": cfg.sample_rate, "seconds": cfg.seconds, "n_mels": cfg.n_mels,
                        "n_fft": cfg.n_fft, "hop_length": cfg.hop_length, "frames": cfg.frames, "source_rate": 8000},
              "max_abs_diff_vs_plain": max_diff, "rows": rows, "command": " ".join(sys.argv)}
    path = write_result("audio_loader", result, args.out)
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
