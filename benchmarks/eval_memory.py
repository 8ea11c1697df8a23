"""Evaluation memory: the streamed reader keeps embeddings, the in-memory loader kept every decoded test item.

    python -m benchmarks.eval_memory [--items 1000,10000] [--size 64] [--work runs/bench_eval_memory]

Generates N labelled images (``mlmm.synthetic.shapes``, en/de/fr captions) into shards, then, each in a fresh process
with 1 thread and no loader workers (so all memory is in the measured process):

* ``streamed``: :func:`mlmm.evaluation.runner.evaluate_retrieval` (what eval/run_retrieval.py and run_suite.py do);
* ``in_memory``: :func:`mlmm.data.preprocess.load_eval_items` (what every evaluator used before the streamed reader;
  VQA, captioning, hashing and re-ranking still use it), decoded items only.

Reports the peak resident memory above the process's baseline after imports and model loading (``ru_maxrss`` -
VmRSS before the evaluation), next to the size of the embeddings and of the decoded media. Writes
``benchmarks/results/eval_memory.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def vm_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(mode: str, shards: str, model_dir: str) -> dict:
    """Run one measurement in this (fresh) process."""
    import torch

    torch.set_num_threads(1)
    import mlmm
    from mlmm.data.preprocess import Preprocessor, load_eval_items
    from mlmm.evaluation.runner import evaluate_retrieval

    model = mlmm.from_pretrained(model_dir)
    before = vm_rss_mb()
    if mode == "streamed":
        records = evaluate_retrieval(model, shards, languages=["en", "de", "fr"], progress=False, batch_size=256)
        n = records[0]["n"]
    else:
        items = load_eval_items(shards, Preprocessor(model.cfg, model.tokenizer, train=False), ["image"])
        n = len(items["image"]["data"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "items": n, "baseline_rss_mb": round(before, 1), "peak_rss_mb": round(peak, 1),
            "eval_peak_above_baseline_mb": round(peak - before, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", default="1000,10000")
    p.add_argument("--size", type=int, default=64, help="image side of the generated images and of the model")
    p.add_argument("--work", default=str(REPO / "runs" / "bench_eval_memory"))
    p.add_argument("--out", default=None)
    p.add_argument("--child", nargs=3, metavar=("MODE", "SHARDS", "MODEL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    import torch
    from transformers import AutoTokenizer

    from mlmm.config import build_config
    from mlmm.synthetic.shapes import generate
    from mlmm.data.tokenization import train_tokenizer
    from mlmm.data.write_shards import write_shards
    from mlmm.hub import save_pretrained
    from mlmm.models.model import MultimodalModel

    from benchmarks.bench_common import write_result

    work = Path(args.work)
    sizes = [int(x) for x in args.items.split(",")]
    rows = generate(work / "gen", n_images=max(sizes), n_videos=0, n_audio=0, size=args.size, seed=0, progress=True)
    train_tokenizer([c for r in rows[:500] for caps in r["captions"].values() for c in caps], work / "tok",
                    vocab_size=200)
    cfg = build_config({"model": {"embed_dim": 64, "image": {"image_size": args.size, "patch_size": 16, "width": 64,
                                                             "layers": 2, "heads": 2},
                                  "text": {"tokenizer": str(work / "tok"), "hidden": 64, "layers": 2, "heads": 2,
                                           "intermediate": 128, "max_length": 32}}})
    torch.manual_seed(0)
    model_dir = save_pretrained(MultimodalModel(cfg.model, AutoTokenizer.from_pretrained(str(work / "tok"))),
                                work / "export")
    runs = []
    for n in sizes:
        manifest = work / f"manifest_{n}.jsonl"
        manifest.write_text("".join(json.dumps({**r, "image": str(work / "gen" / r["image"])}) + "\n"
                                    for r in rows[:n]))
        write_shards(manifest, work / f"shards_{n}", shard_size=1000, progress=False)
        for mode in ("streamed", "in_memory"):
            out = subprocess.run([sys.executable, "-m", "benchmarks.eval_memory", "--child", mode,
                                  str(work / f"shards_{n}"), str(model_dir)],
                                 capture_output=True, text=True, check=True,
                                 env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
            run = json.loads(out.stdout.strip().splitlines()[-1])
            run["embeddings_mb"] = round(n * 64 * 4 / 2**20, 2)  # [N, E=64] float32
            run["decoded_images_mb"] = round(n * 3 * args.size ** 2 * 4 / 2**20, 1)  # [N, 3, S, S] float32
            runs.append(run)
            print(run)
    path = write_result("eval_memory", {"image_size": args.size, "embed_dim": 64, "runs": runs}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
