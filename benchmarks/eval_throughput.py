"""Evaluation encode throughput: mlmm's evaluators vs CLIP_benchmark's loops, same open_clip model, fp32.

    python -m benchmarks.eval_throughput --reps 3 --workers 2 --max-load 1.5                    # zero-shot
    python -m benchmarks.eval_throughput --mode retrieval --reps 3 --workers 2 --max-load 1.5   # retrieval, en
    python -m benchmarks.eval_throughput --mode retrieval --languages en de --reps 3 --workers 2  # a 2-language suite
    python -m benchmarks.eval_throughput --n 128 --reps 1 --arch ViT-S-32                       # quick look

Images: ``--n`` (1000) JPEGs of ``--size`` px (512): the photos of ../shared/data/images_vi with film grain
(``benchmarks/dataloader.py``'s ``source_images``), or generated pictures when that folder is absent. Model: open_clip
``--arch`` (ViT-B-32) with random weights saved once to a file and loaded by both sides from it
(``open_clip:ARCH,pretrained=FILE``): the weights only need to be the same on both.

``--mode zeroshot`` (the images in an ImageFolder layout with 10 classes):

* CLIP_benchmark's loop, written from its description (``clip_benchmark/metrics/zeroshot_classification.py``):
  ``torchvision.datasets.ImageFolder`` with open_clip's eval ``preprocess``, a ``DataLoader`` (batch 64,
  ``--workers``), ``encode_image`` under ``torch.no_grad()`` in fp32, L2-normalised features, ``100 * f @ W`` against
  the zero-shot classifier (per class: mean of the normalised prompt embeddings, normalised), top-1 / top-5 accuracy
  and mean per-class recall.
* mlmm: ``eval/build_dataset.py image-folder`` shards of the same images, then
  ``mlmm.evaluation.zeroshot.evaluate_zeroshot`` with the same model spec, the same class names and templates, the
  same batch size and ``--workers``.

``--mode retrieval`` (5 captions per image, real ones: Multi30K's, ``--captions``, with their real lengths; rows
whose caption in a requested language was already used are passed over, so every caption is distinct):

* CLIP_benchmark's loop, written from its description (``clip_benchmark/metrics/zeroshot_retrieval.py``): a
  ``DataLoader`` over (image, its 5 captions) (batch 64, ``--workers``, images through open_clip's eval
  ``preprocess``); per batch the 5 x 64 captions are tokenised (77 tokens), ``encode_image`` and ``encode_text``
  run under ``torch.no_grad()`` in fp32, L2-normalised; then text x image scores and recall@k by ``topk``: a text
  hits if its image is in its top-k images, an image if any of its captions is in its top-k texts. One run per
  language, as its CLI evaluates one ``--language`` at a time (each run encodes the images again).
* mlmm: shards of the same images and captions (``mlmm.data.write_shards``), then
  ``mlmm.evaluation.runner.evaluate_retrieval`` with the same model spec, batch size and ``--workers``, every
  language in one call.

Both sides are timed end to end (model loading, every image read, decoded, preprocessed and encoded, every text
tokenised and encoded, metrics), once per repetition in turn (``--reps``, interleaved, ``--max-load`` waits for a
quiet machine; the load seen is recorded); images/s are the medians. The metrics must agree to 1e-5 (checked).
Writes ``benchmarks/results/eval_throughput.json`` (zero-shot) or ``eval_throughput_retrieval[_LANGS].json``.
"""
from __future__ import annotations

import argparse
import json
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


CAPTIONS = REPO.parent / "shared" / "data" / "multi30k" / "train_5k.jsonl"
KS = (1, 5, 10)
PER_IMAGE = 5


def pick_captions(paths: list[Path], n: int, languages: list[str]) -> list[dict[str, list[str]]]:
    """``n`` images' captions, ``PER_IMAGE`` per language each, in file order from ``paths`` (JSONL rows
    ``{"captions": {lang: str}}``); a row whose caption in any of ``languages`` was used before is passed over."""
    rows, seen = [], set()
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            caps = json.loads(line)["captions"]
            if all(caps.get(lang) and (lang, caps[lang]) not in seen for lang in languages):
                seen.update((lang, caps[lang]) for lang in languages)
                rows.append(caps)
    if len(rows) < n * PER_IMAGE:
        raise SystemExit(f"{', '.join(map(str, paths))}: {len(rows)} rows with distinct {'/'.join(languages)} "
                         f"captions, {n * PER_IMAGE} needed for --n {n}")
    return [{lang: [rows[i * PER_IMAGE + j][lang] for j in range(PER_IMAGE)] for lang in languages}
            for i in range(n)]


def write_caption_set(root: Path, n: int, size: int, captions: list[dict[str, list[str]]]) -> list[Path]:
    """JPEGs + a manifest (image, captions) -> ``root/shards``; -> the image paths, in order."""
    from PIL import Image

    from mlmm.data.write_shards import write_manifest, write_shards

    (root / "images").mkdir(parents=True)
    paths, rows = [], []
    for i, img in enumerate(source_images(n, size, seed=0)):
        paths.append(root / "images" / f"img_{i:05d}.jpg")
        Image.fromarray(img).save(paths[-1], quality=90)
        rows.append({"key": f"img_{i:05d}", "image": str(paths[-1]), "captions": captions[i]})
    write_shards(write_manifest(rows, root / "manifest.jsonl"), root / "shards", shard_size=250, progress=False)
    return paths


class ImageCaptions(torch.utils.data.Dataset):
    """(preprocessed image, its captions in one language), as CLIP_benchmark's retrieval datasets return them."""

    def __init__(self, paths: list[Path], captions: list[list[str]], preprocess):
        self.paths, self.captions, self.preprocess = paths, captions, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.preprocess(Image.open(self.paths[i]).convert("RGB")), self.captions[i]


def image_captions_collate(batch):
    """Images stacked, captions kept as one list per image."""
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


def recall_any(scores: torch.Tensor, positives: torch.Tensor, k: int) -> float:
    """Fraction of the rows of ``scores`` [Q, G] with a positive (Bool [Q, G]) among their top-k by ``topk``."""
    top = scores.topk(k, dim=1).indices  # [Q, k]
    return float(positives.gather(1, top).any(dim=1).float().mean())


def clip_benchmark_retrieval(arch: str, weights: str, paths: list[Path], captions: list[dict[str, list[str]]],
                             languages: list[str], batch_size: int, workers: int) -> tuple[dict, int]:
    """CLIP_benchmark's retrieval loop (fp32, no autocast), one run per language: -> (metrics, images encoded)."""
    import open_clip

    metrics, n = {}, 0
    for lang in languages:  # one CLI run per --language: the model is loaded and the images encoded each time
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=weights)
        model.eval()
        tokenizer = open_clip.get_tokenizer(arch)
        dataset = ImageCaptions(paths, [c[lang] for c in captions], preprocess)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                             collate_fn=image_captions_collate)
        images, texts, text_image = [], [], []
        start = 0
        for batch_images, batch_texts in loader:
            tokens = tokenizer([t for caps in batch_texts for t in caps])  # [5B, 77]
            text_image += [start + i for i, caps in enumerate(batch_texts) for _ in caps]
            start += len(batch_texts)
            with torch.no_grad():
                images.append(F.normalize(model.encode_image(batch_images), dim=-1))
                texts.append(F.normalize(model.encode_text(tokens), dim=-1))
        images, texts = torch.cat(images), torch.cat(texts)  # [N, E], [M, E]
        scores = texts @ images.T  # [M, N]
        positives = torch.zeros_like(scores, dtype=torch.bool)
        positives[torch.arange(len(texts)), torch.tensor(text_image)] = True
        for k in KS:
            metrics[f"{lang}/image_retrieval_recall@{k}"] = recall_any(scores, positives, k)
            metrics[f"{lang}/text_retrieval_recall@{k}"] = recall_any(scores.T, positives.T, k)
        n = len(images)
    return metrics, n


def mlmm_retrieval(spec: str, shards: str, languages: list[str], batch_size: int, workers: int) -> tuple[dict, int]:
    from mlmm.evaluation.models import load_model
    from mlmm.evaluation.runner import evaluate_retrieval

    records = evaluate_retrieval(load_model(spec), shards, languages=languages, batch_size=batch_size, ks=KS,
                                 num_workers=workers, progress=False)
    metrics = {}
    for r in records:  # percentages -> CLIP_benchmark's fractions
        for k in KS:
            metrics[f"{r['language']}/image_retrieval_recall@{k}"] = r["metrics"][f"t2i_R@{k}"] / 100
            metrics[f"{r['language']}/text_retrieval_recall@{k}"] = r["metrics"][f"i2t_R@{k}"] / 100
    return metrics, records[0]["n"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("zeroshot", "retrieval"), default="zeroshot")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--config", default=None, help="folder of open_clip model config JSONs (your own --arch)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 4], help="DataLoader workers (each side, each)")
    ap.add_argument("--languages", nargs="+", default=["en"], help="retrieval: caption languages")
    ap.add_argument("--captions", nargs="+", type=Path,
                    default=[CAPTIONS, CAPTIONS.with_name("test_2016_flickr.jsonl")],
                    help="retrieval: Multi30K-style JSONL files ({'captions': {lang: str}} a line)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-load", type=float, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import open_clip

    if args.config:
        open_clip.add_model_config(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        weights = tmp / f"{args.arch}-random.pt"
        torch.save(open_clip.create_model(args.arch).state_dict(), weights)
        spec = f"open_clip:{args.arch},pretrained={weights}" + (f",config={args.config}" if args.config else "")
        runs, extra = {}, {}
        if args.mode == "zeroshot":
            from mlmm.evaluation.builders import build
            from mlmm.evaluation.prompts import class_set, load_prompts

            write_image_folder(tmp / "images", args.n, args.size)
            build("image-folder", tmp / "shards", root=str(tmp / "images"), progress=False)
            cs = class_set(str(tmp / "shards"), load_prompts())
            names, templates = cs.names["en"], cs.templates_for("image", "en", load_prompts())
            for w in args.workers:
                runs[f"clip_benchmark/w{w}"] = lambda w=w: clip_benchmark_loop(
                    args.arch, str(weights), tmp / "images", names, templates, args.batch, w)
                runs[f"mlmm/w{w}"] = lambda w=w: mlmm_eval(spec, str(tmp / "shards"), args.batch, w)
        else:
            missing = [str(p) for p in args.captions if not p.is_file()]
            if missing:
                raise SystemExit(f"--captions: no such file: {', '.join(missing)} (see ../shared/data/README.md)")
            captions = pick_captions(args.captions, args.n, args.languages)
            paths = write_caption_set(tmp, args.n, args.size, captions)
            tokens = open_clip.get_tokenizer(args.arch)([t for c in captions for lang in args.languages
                                                         for t in c[lang]])
            extra = {"languages": args.languages, "captions_per_image": PER_IMAGE,
                     "texts": len(tokens), "context_length": tokens.shape[1],
                     "mean_tokens_per_text": float((tokens != 0).sum(1).float().mean()),
                     "captions_from": [str(p) for p in args.captions]}
            for w in args.workers:
                runs[f"clip_benchmark/w{w}"] = lambda w=w: clip_benchmark_retrieval(
                    args.arch, str(weights), paths, captions, args.languages, args.batch, w)
                runs[f"mlmm/w{w}"] = lambda w=w: mlmm_retrieval(spec, str(tmp / "shards"), args.languages,
                                                                args.batch, w)
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
    assert all(set(m) == set(ref) for m in metrics.values()), {k: sorted(m) for k, m in metrics.items()}
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
    name = "eval_throughput" if args.mode == "zeroshot" else "eval_throughput_retrieval" + (
        "" if args.languages == ["en"] else "_" + "_".join(args.languages))
    path = write_result(name, {
        "mode": args.mode, "n": args.n, "image_px": args.size, "arch": args.arch,
        "weights": "random (same file on both sides)", "batch": args.batch, "reps": args.reps,
        "max_load": args.max_load, **extra, "rows": rows, "best": best, "ratio_mlmm_over_clip_benchmark": ratio,
        "max_metric_gap": max(gaps.values()), "command": " ".join(sys.argv)}, args.out)
    print(f"wrote {path}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
