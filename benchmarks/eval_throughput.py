"""Evaluation encode throughput: mlmm's zero-shot evaluator vs CLIP_benchmark's loop, same open_clip model, fp32.

    python -m benchmarks.eval_throughput --reps 3 --max-load 1.5          # the figures in docs/performance.md
    python -m benchmarks.eval_throughput --n 128 --reps 1 --arch ViT-S-32  # quick look

Test set: ``--n`` (1000) JPEGs of ``--size`` px (512) in an ImageFolder layout with 10 classes: the photos of
../shared/data/images_vi with film grain (``benchmarks/dataloader.py``'s ``source_images``), or generated pictures
when that folder is absent. Model: open_clip ``--arch`` (ViT-B-32) with random weights saved once to a file and
loaded by both sides from it (``open_clip:ARCH,pretrained=FILE``): the weights only need to be the same on both.

* CLIP_benchmark's loop, written from its description (``clip_benchmark/metrics/zeroshot_classification.py``):
  ``torchvision.datasets.ImageFolder`` with open_clip's eval ``preprocess``, a ``DataLoader`` (batch 64,
  ``--workers``), ``encode_image`` under ``torch.no_grad()`` in fp32, L2-normalised features, ``100 * f @ W`` against
  the zero-shot classifier (per class: mean of the normalised prompt embeddings, normalised), top-1 / top-5 accuracy
  and mean per-class recall.
* mlmm: ``eval/build_dataset.py image-folder`` shards of the same images, then
  ``mlmm.evaluation.zeroshot.evaluate_zeroshot`` with the same model spec, the same class names and templates, the
  same batch size and ``--workers``.

Both sides are timed end to end (classifier, every image read, decoded, preprocessed and encoded, metrics), once
per repetition in turn (``--reps``, interleaved, ``--max-load`` waits for a quiet machine; the load seen is
recorded); images/s are the medians. The metrics must agree to 1e-5 (checked). Writes
``benchmarks/results/eval_throughput.json``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.bench_common import wait_quiet, write_result
from benchmarks.dataloader import source_images

REPO = Path(__file__).resolve().parents[1]

CLASSES = 10


def write_image_folder(root: Path, n: int, size: int) -> list[str]:
    from PIL import Image

    ids = [f"class_{k:02d}" for k in range(CLASSES)]
    for cid in ids:
        (root / cid).mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(source_images(n, size, seed=0)):
        Image.fromarray(img).save(root / ids[i % CLASSES] / f"img_{i:05d}.jpg", quality=90)
    return ids


def clip_benchmark_loop(arch: str, weights: str, root: Path, names: list[str], templates: list[str],
                        batch_size: int, workers: int) -> tuple[dict, int]:
    """CLIP_benchmark's zero-shot classification loop (fp32, no autocast): -> (metrics, images encoded)."""
    import open_clip
    from torchvision.datasets import ImageFolder

    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=weights)
    model.eval()
    tokenizer = open_clip.get_tokenizer(arch)
    with torch.no_grad():
        weights_ = []
        for name in names:  # zero_shot_classifier: one class at a time
            z = F.normalize(model.encode_text(tokenizer([t.replace("{c}", name) for t in templates])), dim=-1)
            weights_.append(F.normalize(z.mean(dim=0), dim=-1))
        classifier = torch.stack(weights_, dim=1)  # [E, C]
        dataset = ImageFolder(str(root), transform=preprocess)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
        logits, targets = [], []
        for images, target in loader:
            features = F.normalize(model.encode_image(images), dim=-1)
            logits.append(100.0 * features @ classifier)
            targets.append(target)
    logits, target = torch.cat(logits), torch.cat(targets)
    top5 = logits.topk(5, dim=1).indices
    pred = logits.argmax(dim=1)
    recall = [float((pred[target == k] == k).float().mean()) for k in torch.unique(target).tolist()]
    return {"acc1": float((top5[:, 0] == target).float().mean()),
            "acc5": float((top5 == target[:, None]).any(dim=1).float().mean()),
            "mean_per_class_recall": sum(recall) / len(recall)}, len(target)


def mlmm_eval(spec: str, shards: str, batch_size: int, workers: int) -> tuple[dict, int]:
    from mlmm.evaluation.models import load_model
    from mlmm.evaluation.zeroshot import evaluate_zeroshot

    rec = evaluate_zeroshot(load_model(spec), shards, classes=shards, languages=["en"], batch_size=batch_size,
                            num_workers=workers, progress=False)[0]
    return {k: rec["metrics"][k] for k in ("acc1", "acc5", "mean_per_class_recall")}, rec["n"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--config", default=None, help="folder of open_clip model config JSONs (your own --arch)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 4], help="DataLoader workers (each side, each)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-load", type=float, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import open_clip

    from mlmm.evaluation.builders import build
    from mlmm.evaluation.prompts import class_set, load_prompts

    if args.config:
        open_clip.add_model_config(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_image_folder(tmp / "images", args.n, args.size)
        build("image-folder", tmp / "shards", root=str(tmp / "images"), progress=False)
        torch.manual_seed(0)
        weights = tmp / f"{args.arch}-random.pt"
        torch.save(open_clip.create_model(args.arch).state_dict(), weights)
        spec = f"open_clip:{args.arch},pretrained={weights}" + (f",config={args.config}" if args.config else "")
        cs = class_set(str(tmp / "shards"), load_prompts())
        names, templates = cs.names["en"], cs.templates_for("image", "en", load_prompts())
        runs = {}
        for w in args.workers:
            runs[f"clip_benchmark/w{w}"] = lambda w=w: clip_benchmark_loop(args.arch, str(weights), tmp / "images",
                                                                           names, templates, args.batch, w)
            runs[f"mlmm/w{w}"] = lambda w=w: mlmm_eval(spec, str(tmp / "shards"), args.batch, w)
        times = {k: [] for k in runs}
        loads = {k: [] for k in runs}
        metrics = {}
        for rep in range(args.reps):
            for key, fn in runs.items():
                loads[key].append(wait_quiet(args.max_load, label=key))
                t = time.perf_counter()
                metrics[key], n = fn()
                times[key].append(time.perf_counter() - t)
                assert n == args.n, (key, n)
            print(f"  rep {rep + 1}: " + ", ".join(f"{k} {args.n / v[-1]:.1f}" for k, v in times.items()) +
                  " images/s", flush=True)
    ref = next(iter(metrics.values()))
    gaps = {k: max(abs(m[x] - ref[x]) for x in ref) for k, m in metrics.items()}
    assert max(gaps.values()) <= 1e-5, f"metrics differ: {metrics}"
    rate = {k: args.n / statistics.median(v) for k, v in times.items()}
    best = {side: max((k for k in rate if k.startswith(side)), key=rate.get) for side in ("clip_benchmark", "mlmm")}
    ratio = rate[best["mlmm"]] / rate[best["clip_benchmark"]]
    rows = [{"run": k, "images_per_s": rate[k], "seconds_all": times[k], "load_1m_all": loads[k],
             "metrics": metrics[k]} for k in runs]
    for r in rows:
        print(f"  {r['run']:20s} {r['images_per_s']:8.1f} images/s   {r['metrics']}")
    print(f"best mlmm ({best['mlmm']}) / best CLIP_benchmark loop ({best['clip_benchmark']}): {ratio:.2f}x; "
          f"metrics agree to {max(gaps.values()):.1e}")
    path = write_result("eval_throughput", {
        "n": args.n, "image_px": args.size, "arch": args.arch, "weights": "random (same file on both sides)",
        "batch": args.batch, "reps": args.reps, "max_load": args.max_load, "rows": rows, "best": best,
        "ratio_mlmm_over_clip_benchmark": ratio, "max_metric_gap": max(gaps.values()),
        "command": " ".join(sys.argv)}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
