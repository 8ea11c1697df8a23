"""Procedurally generated paired video + audio clips, and a temporal-order video set with known answers.

    python -m mlmm.synthetic.av --out data/av --n-av 120 --n-order 144

* :func:`generate_av` — ``av-*.mp4`` + ``av-*.wav`` per sample (one manifest row with both ``video``
  and ``audio``): a coloured shape moving left / right / up / down, and a tone whose **pitch is set
  by the shape** (circle low, square medium, triangle high) and whose **pattern by the colour**
  (red steady, green pulsing, blue rising). Video–audio retrieval is learnable; the captions (en/de/fr)
  describe both, e.g. "a red circle moving left, with a low steady tone".
* :func:`generate_order` — the re-ranking set: every clip shows ``segments`` (default 2) distinct objects
  (colour × shape) one after the other, captioned in order ("a red circle, then a blue square").
  Every ordered tuple appears, so each clip's re-ordered twins (same objects, other order, same bag of
  words in the caption) are in the gallery: a retriever must use the temporal order, which an
  order-blind global pooling cannot. Rows carry ``"class"`` (``"red circle>blue square"``) and
  ``"order"`` (the objects in order).

Both reuse the drawing / tone / mp4 helpers of :mod:`mlmm.synthetic.shapes` and are deterministic
functions of the seed.
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from mlmm.data.write_shards import write_manifest
from mlmm.synthetic.shapes import (AUDIO_SR, COLORS, DIRECTIONS, PATTERNS, PITCHES, SHAPES, VIDEO_FRAMES, _background,
                                _de_np, _write_mp4, draw_shape, tone, video_captions)

AV_COLORS = ("red", "green", "blue")
PITCH_OF_SHAPE = {"circle": "low", "square": "medium", "triangle": "high"}
PATTERN_OF_COLOR = {"red": "steady", "green": "pulsing", "blue": "rising"}


def av_captions(color: str, shape: str, direction: str) -> dict[str, list[str]]:
    """Video caption + the tone it sounds with (pitch from the shape, pattern from the colour)."""
    pitch, pattern = PITCH_OF_SHAPE[shape], PATTERN_OF_COLOR[color]
    de_p, fr_p = PITCHES[pitch][1], PITCHES[pitch][2]
    de_q, fr_q = PATTERNS[pattern]
    v = video_captions(color, shape, direction)
    return {
        "en": [f"{c}, with a {pitch} {pattern} tone" for c in v["en"]],
        "de": [f"{c}, mit einem {de_p}en, {de_q}en Ton" for c in v["de"]],
        "fr": [f"{c}, avec un son {fr_p} {fr_q}" for c in v["fr"]],
    }


def _moving_frames(rng: np.random.Generator, bg: np.ndarray, color: str, shape: str, direction: str, size: int,
                   n_frames: int) -> list[np.ndarray]:
    (dx, dy), radius = DIRECTIONS[direction][0], rng.uniform(0.15, 0.22) * size
    travel, other = size - 2 * radius, rng.uniform(radius, size - radius)
    frames = []
    for f in range(n_frames):
        along = radius + travel * f / max(n_frames - 1, 1)
        pos = along if (dx + dy) > 0 else size - along
        cx, cy = (pos, other) if dx else (other, pos)
        frames.append(np.asarray(draw_shape(bg, shape, color, cx, cy, radius)))
    return frames


def generate_av(out_dir: str | Path, n_clips: int = 120, size: int = 64, seed: int = 0,
                seconds: float = 0.5) -> list[dict[str, Any]]:
    """Write ``av/*.mp4`` + ``av/*.wav`` and ``out_dir/manifest.jsonl`` (one row per clip with both files)."""
    import soundfile as sf

    out = Path(out_dir)
    (out / "av").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    shapes, dirs = list(SHAPES), list(DIRECTIONS)
    for i in range(n_clips):
        color, shape = AV_COLORS[rng.integers(len(AV_COLORS))], shapes[rng.integers(len(shapes))]
        direction = dirs[rng.integers(len(dirs))]
        key = f"av-{i:06d}"
        _write_mp4(out / "av" / f"{key}.mp4", _moving_frames(rng, _background(rng, size), color, shape, direction,
                                                             size, VIDEO_FRAMES))
        pitch, pattern = PITCH_OF_SHAPE[shape], PATTERN_OF_COLOR[color]
        sf.write(out / "av" / f"{key}.wav", tone(rng, pitch, pattern, seconds=seconds), AUDIO_SR, subtype="PCM_16")
        rows.append({"key": key, "video": f"av/{key}.mp4", "audio": f"av/{key}.wav",
                     "captions": av_captions(color, shape, direction), "class": f"{color} {shape}",
                     "labels": [color, shape, direction, pitch, pattern]})
    write_manifest(rows, out / "manifest.jsonl")
    return rows


# ----------------------------------------------------------------------------- temporal-order set
def order_captions(*objects: tuple[str, str]) -> dict[str, list[str]]:
    """Captions of a clip showing the (colour, shape) ``objects`` one after the other (two or more)."""
    if len(objects) < 2:
        raise ValueError(f"order_captions: needs at least two objects, got {len(objects)}")
    en = [f"a {c} {s}" for c, s in objects]
    de = [_de_np(c, s, "nom") for c, s in objects]
    fr = [f"un {SHAPES[s][2]} {COLORS[c][2]}" for c, s in objects]
    return {
        "en": [", then ".join(en), "first " + ", then ".join(en)],
        "de": [", dann ".join(de), "zuerst " + ", dann ".join(de)],
        "fr": [", puis ".join(fr), "d'abord " + ", puis ".join(fr)],
    }


def order_objects(colors: Sequence[str] = AV_COLORS, shapes: Optional[Sequence[str]] = None, segments: int = 2
                  ) -> list[tuple[tuple[str, str], ...]]:
    """Every ordered tuple of ``segments`` distinct (colour, shape) objects: all orders of each set are present."""
    objects = list(itertools.product(colors, shapes or list(SHAPES)))
    return list(itertools.permutations(objects, segments))


def generate_order(out_dir: str | Path, n_repeats: int = 2, size: int = 32, seed: int = 0,
                   colors: Sequence[str] = AV_COLORS, shapes: Optional[Sequence[str]] = None,
                   manifest: str = "manifest.jsonl", segments: int = 2, frames_per_segment: int = 0
                   ) -> list[dict[str, Any]]:
    """``n_repeats`` renderings of every ordered object tuple (see module doc); writes ``order/*.mp4``.

    Each object moves in a random direction for ``frames_per_segment`` frames (default: VIDEO_FRAMES //
    segments, at least 2); sample the clip with ``model.video.frames`` >= 2 * segments so every object is seen.
    """
    if segments < 2:
        raise ValueError(f"generate_order: segments must be >= 2, got {segments}")
    out = Path(out_dir)
    (out / "order").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tuples = order_objects(colors, shapes, segments)
    per = frames_per_segment or max(VIDEO_FRAMES // segments, 2)
    rows = []
    for rep in range(n_repeats):
        for j, objs in enumerate(tuples):
            bg = _background(rng, size)
            frames = []
            for color, shape in objs:
                direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
                frames += _moving_frames(rng, bg, color, shape, direction, size, per)
            key = f"ord-{seed:03d}-{rep:03d}-{j:04d}"
            _write_mp4(out / "order" / f"{key}.mp4", frames)
            names = [" ".join(o) for o in objs]
            rows.append({"key": key, "video": f"order/{key}.mp4", "captions": order_captions(*objs),
                         "class": ">".join(names), "order": names})
    rows = [rows[i] for i in np.random.default_rng(seed + 1).permutation(len(rows))]
    write_manifest(rows, out / manifest)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Generate paired video+audio clips and a temporal-order video set.")
    p.add_argument("--out", required=True)
    p.add_argument("--n-av", type=int, default=120, help="paired video+audio clips (0 = none)")
    p.add_argument("--order-repeats", type=int, default=0, help="renderings of every ordered pair (0 = none)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.n_av:
        rows = generate_av(Path(args.out) / "av_set", args.n_av, args.size, args.seed)
        print(f"wrote {len(rows)} video+audio clips -> {Path(args.out) / 'av_set' / 'manifest.jsonl'}")
    if args.order_repeats:
        rows = generate_order(Path(args.out) / "order_set", args.order_repeats, args.size, args.seed)
        print(f"wrote {len(rows)} temporal-order clips -> {Path(args.out) / 'order_set' / 'manifest.jsonl'}")


if __name__ == "__main__":
    main()
