"""Reader throughput over http (a local server) and pipe:cat vs local files: the same shards, samples/s.

    python -m benchmarks.remote_reader                      # 4 shards x 500 512-px JPEGs, 3 interleaved reps
    python -m benchmarks.remote_reader --n 400 --reps 3     # quick look
    python -m benchmarks.remote_reader --max-load 1.5       # each repetition waits for a quiet box (docs/data.md)

Two levels, each timed on the same shards (benchmarks/dataloader.py's 512-px JPEG + json samples) read as
  * ``local``: the shard files (``shards/bench-{000000..000003}.tar``);
  * ``http``: ``http://127.0.0.1:PORT/bench-{...}.tar`` from ``python -m http.server`` in its own process, opened
    through webdataset's gopen (curl), as a bucket behind HTTP would be;
  * ``pipe``: ``pipe:cat shards/bench-{...}.tar``.
``raw``: :meth:`mlmm.data.shardio.ShardReader.read` over every shard (transport + tar parsing, no decoding).
``stream``: the training loader (``train_stream.build_train_loader``, with 224-px crops and tokenised captions) in this
process (``num_workers=0``: with a worker process, a box shared with other jobs schedules the worker differently for
each spec and the figures swing by 2-3x), one epoch after a warm-up batch; also its samples per CPU second of this
process (curl and cat run in their own processes and are not in it). Repetitions are interleaved (local, http, pipe,
local, ...); the median counts. The server shares the machine's cores with the reader. Writes
``benchmarks/results/remote_reader.json`` with the load average before and after, and the 1-minute load at the start of
each repetition (``--max-load``: wait until it is below that first).
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from benchmarks.bench_common import wait_quiet, write_result
from benchmarks.dataloader import mlmm_loader, write_bench_shards

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(folder: Path) -> tuple[subprocess.Popen, str]:
    """``python -m http.server`` over `folder` in its own process; waits until it answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                             str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(f"{url}/index.json", timeout=1).read()
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("http.server did not start")


def raw_rate(shards: list[str]) -> float:
    """samples/s of ShardReader.read over `shards` (no decoding)."""
    from mlmm.data.shardio import ShardReader

    reader, n = ShardReader(retries=0), 0
    t = time.perf_counter()
    for shard in shards:
        for raw in reader.read(shard):
            assert "__error__" not in raw, raw
            n += 1
    return n / (time.perf_counter() - t)


def stream_rates(spec: str, n: int, batch: int, tok_dir: Path) -> tuple[float, float]:
    """(samples/s, samples per CPU second of this process) of the training loader over one epoch, in this process,
    the first batch excluded."""
    it = iter(mlmm_loader(spec, batch, 0, tok_dir))
    assert next(it).image.shape[-2:] == (224, 224)
    batches = n // batch - 1
    t, c = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - t), batches * batch / (time.process_time() - c)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--per-shard", type=int, default=500)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--max-load", type=float, default=None, help="wait for a 1-min load below this before each rep")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from mlmm.data.shards import resolve_shards

    load_before = list(os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "shards"
        local_spec = write_bench_shards(folder, args.n, args.per_shard, args.size, seed=0)
        mean_kb = sum(p.stat().st_size for p in folder.glob("*.tar")) / args.n / 1024
        server, url = serve(folder)
        try:
            specs = {"local": local_spec, "http": f"{url}/{Path(local_spec).name}", "pipe": f"pipe:cat {local_spec}"}
            rates: dict[str, dict[str, list[float]]] = {level: {k: [] for k in specs}
                                                         for level in ("raw", "stream", "stream_per_cpu_s")}
            loads = []
            for rep in range(args.reps):
                loads.append(wait_quiet(args.max_load, label=f"rep {rep + 1}"))
                for name, spec in specs.items():
                    rates["raw"][name].append(raw_rate(resolve_shards(spec)))
                for name, spec in specs.items():
                    wall, cpu = stream_rates(spec, args.n, args.batch, Path(tmp) / "tok")
                    rates["stream"][name].append(wall)
                    rates["stream_per_cpu_s"][name].append(cpu)
                figures = "; ".join(f"{level} " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in r.items())
                                    for level, r in rates.items())
                print(f"rep {rep + 1} (load {loads[-1]:.2f}): {figures} samples/s")
        finally:
            server.kill()
    median = {level: {k: statistics.median(v) for k, v in r.items()} for level, r in rates.items()}
    for level, m in median.items():
        print(f"{level:16s} median samples/s: " + ", ".join(f"{k} {v:.0f}" for k, v in m.items())
              + f"  (http / local {m['http'] / m['local']:.2f}, pipe / local {m['pipe'] / m['local']:.2f})")
    path = write_result("remote_reader", {
        "n": args.n, "per_shard": args.per_shard, "image_px": args.size, "batch": args.batch,
        "mean_sample_kb": mean_kb, "reps": args.reps, "median_samples_per_s": median, "all": rates,
        "load_average_before": load_before, "load_average_after": list(os.getloadavg()),
        "max_load": args.max_load, "load_1m_at_each_rep": loads,
        "note": "interleaved reps, median; http.server runs in its own process on the same cores; stream in-process",
        "command": " ".join(sys.argv)}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
