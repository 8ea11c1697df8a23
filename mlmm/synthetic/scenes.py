"""Generated scenes for the fine-grained image-text methods of issue 8 (ASCL, VSE, MVSEN), in en/de/fr.

    python -m mlmm.synthetic.scenes --kind attributes --out data/attr --n 600
    python -m mlmm.synthetic.scenes --kind objects --out data/objects --n 600

* :func:`attribute_scenes` — **one object** with four attributes: colour (6) x shape (3) x size (small / big) x
  pattern (plain / striped: horizontal gaps through the shape). Captions name every attribute ("a big striped red
  circle", "ein großer gestreifter roter Kreis", "un grand cercle rouge rayé"); a second caption per language leaves
  the size out (text says less than the image). 72 classes, so a training batch rarely holds two images that differ
  by one attribute: in-batch InfoNCE learns colour and shape first and the fine attributes late. Each row carries
  ``"distractors": {lang: {type: caption}}``: the full caption with exactly one attribute changed — ``size``,
  ``color``, ``shape`` swapped, and ``insert`` ("striped" added to a plain object: text says more than the image) —
  for the attribute-sensitive metric (:func:`mlmm.evaluation.fine_grained.distractor_accuracy`).
* :func:`object_scenes` — **two or three small objects** (colour x shape) in distinct quadrants; each caption
  describes *one* of them ("a red circle", "an image with a red circle"). A single pooled vector has to hold a set,
  while matching each word to its best patch finds the object. ``labels`` lists every colour and shape in the scene
  (informative beyond the one-object caption) and ``objects`` the (colour, shape) pairs.

Rows also carry ``"class"`` and ``"labels"`` like :mod:`mlmm.synthetic.shapes`. Deterministic functions of the seed.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from mlmm.data.write_shards import write_manifest
from mlmm.synthetic.shapes import COLORS, SHAPES, _background, draw_shape

# name -> (German adjective stem, French adjective); French adjectives of size go before the noun
SIZES: dict[str, tuple[str, str, tuple[float, float]]] = {
    "small": ("klein", "petit", (0.12, 0.15)),  # radius range as a fraction of the image side
    "big": ("groß", "grand", (0.38, 0.44)),
}
STRIPED = ("gestreift", "rayé")
LANGS = ("en", "de", "fr")


def _de_ending(shape: str) -> str:
    """Strong adjective ending after 'ein' (nominative): masculine -er, neuter -es."""
    return "er" if SHAPES[shape][1] == "m" else "es"


def attribute_caption(lang: str, color: str, shape: str, size: str | None, striped: bool) -> str:
    """The caption of one object; ``size=None`` leaves the size out."""
    if lang == "en":
        words = ["a"] + ([size] if size else []) + (["striped"] if striped else []) + [color, shape]
        return " ".join(words)
    if lang == "de":
        e = _de_ending(shape)
        adj = ([SIZES[size][0] + e] if size else []) + ([STRIPED[0] + e] if striped else []) + [COLORS[color][1] + e]
        return " ".join(["ein", *adj, SHAPES[shape][0]])
    if lang == "fr":
        words = ["un"] + ([SIZES[size][1]] if size else []) + [SHAPES[shape][2], COLORS[color][2]]
        return " ".join(words + ([STRIPED[1]] if striped else []))
    raise ValueError(f"unknown language {lang!r} (have {LANGS})")


def object_caption(lang: str, color: str, shape: str, framed: bool = False) -> str:
    """'a red circle' / 'an image with a red circle' (framed) in en, de, fr."""
    if lang == "en":
        np_ = f"a {color} {shape}"
        return f"an image with {np_}" if framed else np_
    if lang == "de":
        if framed:
            return f"ein Bild mit einem {COLORS[color][1]}en {SHAPES[shape][0]}"
        return f"ein {COLORS[color][1]}{_de_ending(shape)} {SHAPES[shape][0]}"
    if lang == "fr":
        np_ = f"un {SHAPES[shape][2]} {COLORS[color][2]}"
        return f"une image avec {np_}" if framed else np_
    raise ValueError(f"unknown language {lang!r} (have {LANGS})")


def stripe(img: Image.Image, bg: np.ndarray, cy: float, radius: float, period: int = 4) -> Image.Image:
    """Cut horizontal gaps (1/2 of every ``period`` rows) through the object, showing the background."""
    arr = np.asarray(img).copy()
    top, bottom = max(0, int(cy - radius) - 1), min(arr.shape[0], int(cy + radius) + 2)
    for y in range(top, bottom):
        if (y - top) % period >= period // 2:
            arr[y] = bg[y]
    return Image.fromarray(arr)


def attribute_scenes(out_dir: str | Path, n: int = 600, size: int = 32, seed: int = 0,
                     prefix: str = "attr") -> list[dict[str, Any]]:
    """One object per image (colour, shape, size, pattern); writes images + ``manifest.jsonl``."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colors, shapes, sizes = list(COLORS), list(SHAPES), list(SIZES)
    rows = []
    for i in range(n):
        color, shape = colors[rng.integers(len(colors))], shapes[rng.integers(len(shapes))]
        sz, striped = sizes[rng.integers(2)], bool(rng.integers(2))
        lo, hi = SIZES[sz][2]
        radius = rng.uniform(lo, hi) * size
        cx, cy = rng.uniform(radius + 1, size - radius - 1, 2)
        bg = _background(rng, size)
        img = draw_shape(bg, shape, color, cx, cy, radius)
        if striped:
            img = stripe(img, bg, cy, radius)
        key = f"{prefix}-{i:06d}"
        img.save(out / "images" / f"{key}.jpg", quality=95)
        other = lambda seq, cur: [x for x in seq if x != cur][rng.integers(len(seq) - 1)]  # noqa: E731
        wrong = {"size": other(sizes, sz), "color": other(colors, color), "shape": other(shapes, shape)}
        distractors = {}
        for lang in LANGS:
            d = {"size": attribute_caption(lang, color, shape, wrong["size"], striped),
                 "color": attribute_caption(lang, wrong["color"], shape, sz, striped),
                 "shape": attribute_caption(lang, color, wrong["shape"], sz, striped)}
            if not striped:
                d["insert"] = attribute_caption(lang, color, shape, sz, True)
            distractors[lang] = d
        labels = [color, shape, sz] + (["striped"] if striped else [])
        rows.append({"key": key, "image": f"images/{key}.jpg",
                     "captions": {lang: [attribute_caption(lang, color, shape, sz, striped),
                                         attribute_caption(lang, color, shape, None, striped)] for lang in LANGS},
                     "class": " ".join(labels), "labels": labels, "distractors": distractors})
    write_manifest(rows, out / "manifest.jsonl")
    return rows


AND = {"en": "and", "de": "und", "fr": "et"}


def scene_caption(lang: str, objects: Sequence[tuple[str, str]]) -> str:
    """'a red circle and a blue square' (every object, in the given order)."""
    return f" {AND[lang]} ".join(object_caption(lang, c, s) for c, s in objects)


def object_scenes(out_dir: str | Path, n: int = 600, size: int = 32, seed: int = 0, n_objects: Sequence[int] = (2, 3),
                  prefix: str = "obj", describe: str = "one") -> list[dict[str, Any]]:
    """2-3 distinct small objects per image, one per quadrant.

    ``describe="one"``: one caption per object (and language). ``describe="all"``: objects of distinct colours and
    shapes, captions name all of them ("a red circle and a blue square", in two orders), and ``distractors``
    ``{lang: {"binding": ...}}`` is the first caption with the colours rotated among the objects — the same bag of
    words, bound wrongly (the binding failure of pooled embeddings).
    """
    if describe not in ("one", "all"):
        raise ValueError(f"describe must be 'one' or 'all', got {describe!r}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    kinds = [(c, s) for c in COLORS for s in SHAPES]
    half = size / 2
    rows = []
    for i in range(n):
        k = int(n_objects[rng.integers(len(n_objects))])
        if describe == "all":  # distinct colours and shapes, so that rotating the colours changes the scene
            cs, ss = rng.choice(len(COLORS), size=k, replace=False), rng.choice(len(SHAPES), size=k, replace=False)
            objects = [(list(COLORS)[c], list(SHAPES)[t]) for c, t in zip(cs, ss)]
        else:
            objects = [kinds[j] for j in rng.choice(len(kinds), size=k, replace=False)]
        quads = rng.choice(4, size=k, replace=False)
        img = Image.fromarray(_background(rng, size))
        for (color, shape), q in zip(objects, quads):
            radius = rng.uniform(0.30, 0.40) * half  # about a third of the quadrant
            x0, y0 = (q % 2) * half, (q // 2) * half
            cx, cy = x0 + rng.uniform(radius, half - radius), y0 + rng.uniform(radius, half - radius)
            img = draw_shape(np.asarray(img), shape, color, cx, cy, radius)
        key = f"{prefix}-{i:06d}"
        img.save(out / "images" / f"{key}.jpg", quality=95)
        row: dict[str, Any] = {"key": key, "image": f"images/{key}.jpg"}
        if describe == "one":
            row["captions"] = {lang: [object_caption(lang, c, s) for c, s in objects]
                               + [object_caption(lang, c, s, True) for c, s in objects] for lang in LANGS}
        else:
            rotated = [(objects[(j + 1) % k][0], objects[j][1]) for j in range(k)]
            row["captions"] = {lang: [scene_caption(lang, objects), scene_caption(lang, objects[::-1])]
                               for lang in LANGS}
            row["distractors"] = {lang: {"binding": scene_caption(lang, rotated)} for lang in LANGS}
        row.update({"class": " + ".join(sorted(f"{c} {s}" for c, s in objects)),
                    "labels": sorted({c for c, _ in objects} | {s for _, s in objects}),
                    "objects": [list(o) for o in objects]})
        rows.append(row)
    write_manifest(rows, out / "manifest.jsonl")
    return rows


def clutter_scenes(out_dir: str | Path, n: int = 600, size: int = 32, seed: int = 0, n_clutter: Sequence[int] = (5, 8),
                   prefix: str = "clut") -> list[dict[str, Any]]:
    """One small coloured object among grey clutter shapes; the captions name the coloured object."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colors, shapes = list(COLORS), list(SHAPES)
    rows = []
    for i in range(n):
        arr = _background(rng, size)
        for _ in range(int(n_clutter[rng.integers(len(n_clutter))])):  # grey shapes of any size and shade
            grey = int(rng.integers(70, 190))
            r = rng.uniform(0.06, 0.22) * size
            cx, cy = rng.uniform(0, size, 2)
            img = draw_shape(arr, shapes[rng.integers(len(shapes))], "white", cx, cy, r)
            mask = np.asarray(img)[..., 0] >= 249  # where the white shape was drawn
            arr = arr.copy()
            arr[mask] = grey
        color, shape = colors[rng.integers(len(colors))], shapes[rng.integers(len(shapes))]
        r = rng.uniform(0.15, 0.19) * size
        cx, cy = rng.uniform(r + 1, size - r - 1, 2)
        img = draw_shape(arr, shape, color, cx, cy, r)
        key = f"{prefix}-{i:06d}"
        img.save(out / "images" / f"{key}.jpg", quality=95)
        rows.append({"key": key, "image": f"images/{key}.jpg",
                     "captions": {lang: [object_caption(lang, color, shape), object_caption(lang, color, shape, True)]
                                  for lang in LANGS},
                     "class": f"{color} {shape}", "labels": [color, shape]})
    write_manifest(rows, out / "manifest.jsonl")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate fine-grained scenes (attributes / objects) with captions.")
    parser.add_argument("--kind", choices=("attributes", "objects"), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--objects", type=int, nargs="+", default=[2, 3], help="objects per scene (kind objects)")
    args = parser.parse_args(argv)
    if args.kind == "attributes":
        rows = attribute_scenes(args.out, n=args.n, size=args.size, seed=args.seed)
    else:
        rows = object_scenes(args.out, n=args.n, size=args.size, seed=args.seed, n_objects=args.objects)
    print(f"wrote {len(rows)} samples -> {Path(args.out) / 'manifest.jsonl'}")


if __name__ == "__main__":
    main()
