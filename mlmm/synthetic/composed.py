"""Composed image retrieval triplets over generated scenes (reference image + modification text -> target image).

    python -m mlmm.synthetic.composed --out data/cir_train --n-scenes 300 --seed 0 --no-gallery
    python -m mlmm.synthetic.composed --out data/cir_test --n-scenes 60 --seed 1

A *scene* is one shape (circle / square / triangle) of one colour (6) at a random position and size
on a random grey, plain or noisy background. Each scene is rendered three times: the **reference**
(shape s, colour c), a **colour variant** (s, c') and a **shape variant** (s', c), all with the same
background, position and size. Four triplets per scene, each with a modification text in en/de/fr
(two phrasings per language):

* reference -> colour variant: "make the circle blue" / "mach den Kreis blau" / "rends le cercle bleu";
* reference -> shape variant: "turn the circle into a square" / "mach aus dem Kreis ein Quadrat" / ...;
* and both back to the reference ("make the circle red", "turn the square into a circle").

Why this is the failure case of single-modality queries: the text alone names the target's class
(colour x shape), shared by ~1/18 of the gallery, but not *which* scene; the reference image alone
names the scene, but its variants differ only by the attribute the text changes. Only the
composition finds the target.

Manifest rows (``out/manifest.jsonl``; :func:`write_composed_shards` packs ``out/shards``):

* gallery rows (``--gallery``, for evaluation): ``{"key": "<p>img-000007-c", "image": ..., "captions": ...,
  "class", "labels", "scene"}`` — every rendered image once;
* triplet rows: ``{"key": "<p>cir-000007-1", "image": <target>, "extra_images": {"ref": <reference>},
  "reference": <gallery key>, "target": <gallery key>, "modification": {lang: [str, str]}, "kind": "color" |
  "shape", "class": <target class>, "scene"}``. The shard sample holds the target as ``jpg`` and the
  reference as ``ref.jpg`` (decoded into ``Batch.extras["ref"]``); train with ``data.text_field: modification``.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mlmm.data.write_shards import write_manifest
from mlmm.synthetic.shapes import COLORS, SHAPES, _background, draw_shape, image_captions

LANGUAGES = ("en", "de", "fr")


def _de_article(shape: str, case: str) -> str:
    """German article of a shape noun: accusative definite (den / das), dative definite (dem), accusative
    indefinite (einen / ein)."""
    masc = SHAPES[shape][1] == "m"
    return {"acc": "den" if masc else "das", "dat": "dem", "indef": "einen" if masc else "ein"}[case]


def color_modification(shape: str, new_color: str) -> dict[str, list[str]]:
    de_noun, _, fr_noun = SHAPES[shape]
    de_adj, fr_adj = COLORS[new_color][1], COLORS[new_color][2]
    return {
        "en": [f"make the {shape} {new_color}", f"change the {shape} to {new_color}"],
        "de": [f"mach {_de_article(shape, 'acc')} {de_noun} {de_adj}",
               f"färbe {_de_article(shape, 'acc')} {de_noun} {de_adj}"],
        "fr": [f"rends le {fr_noun} {fr_adj}", f"colore le {fr_noun} en {fr_adj}"],
    }


def shape_modification(shape: str, new_shape: str) -> dict[str, list[str]]:
    de_old, de_new = SHAPES[shape][0], SHAPES[new_shape][0]
    fr_old, fr_new = SHAPES[shape][2], SHAPES[new_shape][2]
    return {
        "en": [f"turn the {shape} into a {new_shape}", f"replace the {shape} with a {new_shape}"],
        "de": [f"mach aus dem {de_old} {_de_article(new_shape, 'indef')} {de_new}",
               f"ersetze {_de_article(shape, 'acc')} {de_old} durch {_de_article(new_shape, 'indef')} {de_new}"],
        "fr": [f"transforme le {fr_old} en {fr_new}", f"remplace le {fr_old} par un {fr_new}"],
    }


def generate_composed(out_dir: str | Path, n_scenes: int = 100, size: int = 64, seed: int = 0, gallery: bool = True,
                      prefix: str = "", progress: bool = True) -> list[dict[str, Any]]:
    """Render ``3 * n_scenes`` images and write ``out_dir/manifest.jsonl``; return its rows (see module doc)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colors, shapes = list(COLORS), list(SHAPES)
    rows: list[dict[str, Any]] = []
    for i in tqdm(range(n_scenes), desc="composed scenes", disable=not progress):
        color, shape = colors[rng.integers(len(colors))], shapes[rng.integers(len(shapes))]
        other_color = [c for c in colors if c != color][rng.integers(len(colors) - 1)]
        other_shape = [s for s in shapes if s != shape][rng.integers(len(shapes) - 1)]
        radius = rng.uniform(0.18, 0.32) * size
        cx, cy = rng.uniform(radius, size - radius, 2)
        bg = _background(rng, size)
        variants = {"r": (shape, color), "c": (shape, other_color), "s": (other_shape, color)}
        keys, paths = {}, {}
        for v, (sh, co) in variants.items():
            keys[v] = f"{prefix}img-{i:06d}-{v}"
            paths[v] = f"images/{keys[v]}.jpg"
            draw_shape(bg, sh, co, cx, cy, radius).save(out / paths[v], quality=92)
            if gallery:
                rows.append({"key": keys[v], "image": paths[v], "captions": image_captions(co, sh),
                             "class": f"{co} {sh}", "labels": [co, sh], "scene": i})
        triplets = [("r", "c", "color", color_modification(shape, other_color)),
                    ("r", "s", "shape", shape_modification(shape, other_shape)),
                    ("c", "r", "color", color_modification(shape, color)),
                    ("s", "r", "shape", shape_modification(other_shape, shape))]
        for t, (ref, tgt, kind, text) in enumerate(triplets):
            sh, co = variants[tgt]
            rows.append({"key": f"{prefix}cir-{i:06d}-{t}", "image": paths[tgt], "extra_images": {"ref": paths[ref]},
                         "reference": keys[ref], "target": keys[tgt], "modification": text, "kind": kind,
                         "class": f"{co} {sh}", "scene": i})
    write_manifest(rows, out / "manifest.jsonl")
    return rows


def write_composed_shards(out_dir: str | Path, n_scenes: int = 100, size: int = 64, seed: int = 0,
                          gallery: bool = True, prefix: str = "", shard_size: int = 1000,
                          progress: bool = False) -> list[dict[str, Any]]:
    """:func:`generate_composed` + ``out_dir/shards`` (WebDataset); returns the manifest rows."""
    from mlmm.data.write_shards import write_shards

    rows = generate_composed(out_dir, n_scenes, size, seed, gallery, prefix, progress)
    write_shards(Path(out_dir) / "manifest.jsonl", Path(out_dir) / "shards", shard_size=shard_size, progress=progress)
    return rows


def all_texts(rows: list[dict[str, Any]]) -> list[str]:
    """Every caption and modification text of ``rows`` (e.g. to train a tokenizer)."""
    out = []
    for r in rows:
        for field in ("captions", "modification"):
            for texts in (r.get(field) or {}).values():
                out.extend([texts] if isinstance(texts, str) else texts)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate composed image retrieval triplets (en/de/fr).")
    parser.add_argument("--out", required=True)
    parser.add_argument("--n-scenes", type=int, default=100)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefix", default="", help="key prefix (keep train and test keys apart)")
    parser.add_argument("--no-gallery", action="store_true", help="triplets only (training data)")
    parser.add_argument("--shard-size", type=int, default=1000)
    args = parser.parse_args(argv)
    rows = write_composed_shards(args.out, args.n_scenes, args.size, args.seed, not args.no_gallery, args.prefix,
                                 args.shard_size, progress=True)
    print(f"wrote {len(rows)} rows -> {Path(args.out) / 'shards'}")


if __name__ == "__main__":
    main()
