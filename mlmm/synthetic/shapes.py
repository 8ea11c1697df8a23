"""Procedurally generated multilingual (en/de/fr) image, video and audio data with captions.

A tiny model can learn retrieval on it from scratch in a few hundred steps::

    python -m mlmm.synthetic.shapes --out data/synth --n-images 300 --n-videos 60 --n-audio 200

writes ``images/*.jpg``, ``videos/*.mp4`` (h264, 8 frames), ``audio/*.wav`` (16 kHz, 0.5 s) and
``manifest.jsonl`` in the mlmm manifest format (see :mod:`mlmm.data.write_shards`). Each row also
has ``"class"`` (e.g. ``"red circle"``; samples of one class share their captions, so evaluators
can count same-class items as positives) and ``"labels"``. Rows are written in a seeded shuffled
order so that shards mix modalities. Output is a deterministic function of the seed.

* images: a coloured shape (circle / square / triangle × 6 colours) on a grey, noisy background.
* videos: such a shape moving left / right / up / down.
* audio: a tone, low / medium / high pitch × steady / pulsing / rising.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from mlmm.data.write_shards import write_manifest

# name -> (RGB, German adjective stem, French adjective (masculine: every French noun below is masc.))
COLORS: dict[str, tuple[tuple[int, int, int], str, str]] = {
    "red": ((220, 30, 30), "rot", "rouge"),
    "green": ((30, 180, 40), "grün", "vert"),
    "blue": ((30, 60, 220), "blau", "bleu"),
    "yellow": ((235, 220, 30), "gelb", "jaune"),
    "white": ((250, 250, 250), "weiß", "blanc"),
    "black": ((10, 10, 10), "schwarz", "noir"),
}
# name -> (German noun, German gender "m"/"n", French noun)
SHAPES: dict[str, tuple[str, str, str]] = {
    "circle": ("Kreis", "m", "cercle"),
    "square": ("Quadrat", "n", "carré"),
    "triangle": ("Dreieck", "n", "triangle"),
}
# name -> (unit step (dx, dy) in image coordinates, German, French)
DIRECTIONS: dict[str, tuple[tuple[int, int], str, str]] = {
    "left": ((-1, 0), "nach links", "vers la gauche"),
    "right": ((1, 0), "nach rechts", "vers la droite"),
    "up": ((0, -1), "nach oben", "vers le haut"),
    "down": ((0, 1), "nach unten", "vers le bas"),
}
# name -> (frequency Hz, German strong masc. adjective stem, French adjective)
PITCHES: dict[str, tuple[float, str, str]] = {
    "low": (220.0, "tief", "grave"),
    "medium": (550.0, "mittler", "moyen"),
    "high": (1400.0, "hoh", "aigu"),
}
# name -> (German adjective stem, French adjective)
PATTERNS: dict[str, tuple[str, str]] = {
    "steady": ("gleichmäßig", "continu"),
    "pulsing": ("pulsierend", "intermittent"),
    "rising": ("ansteigend", "montant"),
}
AUDIO_SR = 16000
AUDIO_SECONDS = 0.5
VIDEO_FRAMES = 8


# ---------------------------------------------------------------------------------------- captions
def _de_np(color: str, shape: str, case: str) -> str:
    """German noun phrase 'ein rot-er Kreis' with the indefinite article; case 'nom' or 'dat'."""
    adj, (noun, gender, _) = COLORS[color][1], SHAPES[shape]
    if case == "nom":
        return f"ein {adj}{'er' if gender == 'm' else 'es'} {noun}"
    return f"einem {adj}en {noun}"


def image_captions(color: str, shape: str) -> dict[str, list[str]]:
    fr = f"{SHAPES[shape][2]} {COLORS[color][2]}"
    return {
        "en": [f"a {color} {shape}", f"a photo of a {color} {shape}", f"a {color} {shape} on a grey background"],
        "de": [_de_np(color, shape, "nom"), f"ein Foto von {_de_np(color, shape, 'dat')}",
               f"{_de_np(color, shape, 'nom')} auf grauem Hintergrund"],
        "fr": [f"un {fr}", f"une photo d'un {fr}", f"un {fr} sur un fond gris"],
    }


def video_captions(color: str, shape: str, direction: str) -> dict[str, list[str]]:
    _, de_dir, fr_dir = DIRECTIONS[direction]
    rel = "der" if SHAPES[shape][1] == "m" else "das"
    fr = f"{SHAPES[shape][2]} {COLORS[color][2]}"
    return {
        "en": [f"a {color} {shape} moving {direction}", f"a video of a {color} {shape} moving {direction}"],
        "de": [f"{_de_np(color, shape, 'nom')} bewegt sich {de_dir}",
               f"ein Video von {_de_np(color, shape, 'dat')}, {rel} sich {de_dir} bewegt"],
        "fr": [f"un {fr} se déplace {fr_dir}", f"une vidéo d'un {fr} qui se déplace {fr_dir}"],
    }


def audio_captions(pitch: str, pattern: str) -> dict[str, list[str]]:
    de_p, fr_p = PITCHES[pitch][1], PITCHES[pitch][2]
    de_q, fr_q = PATTERNS[pattern]
    return {
        "en": [f"a {pitch} {pattern} tone", f"the sound of a {pitch} {pattern} tone"],
        "de": [f"ein {de_p}er, {de_q}er Ton", f"das Geräusch eines {de_p}en, {de_q}en Tons"],
        "fr": [f"un son {fr_p} {fr_q}", f"le bruit d'un son {fr_p} et {fr_q}"],
    }


# ------------------------------------------------------------------------------------------ pixels
def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Grey background, plain or noisy: uint8 [size, size, 3]."""
    grey = rng.integers(100, 160)
    noise = rng.normal(0, rng.choice([0.0, 12.0]), (size, size, 1))
    return np.clip(grey + noise, 0, 255).astype(np.uint8).repeat(3, axis=2)


def draw_shape(bg: np.ndarray, shape: str, color: str, cx: float, cy: float, radius: float) -> Image.Image:
    img = Image.fromarray(bg)
    draw = ImageDraw.Draw(img)
    rgb = COLORS[color][0]
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=rgb)
    elif shape == "square":
        r = radius * 0.85
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius * 0.8), (cx + radius, cy + radius * 0.8)], fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return img


def _write_mp4(path: Path, frames: list[np.ndarray], fps: int = 8) -> None:
    """Encode uint8 [H, W, 3] frames as h264 (yuv420p, even sizes) in an mp4."""
    import av

    h, w = frames[0].shape[:2]
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "20"}
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush
            container.mux(packet)


def tone(rng: np.random.Generator, pitch: str, pattern: str, sr: int = AUDIO_SR,
         seconds: float = AUDIO_SECONDS) -> np.ndarray:
    """A float32 waveform of a tone with a little noise."""
    t = np.arange(int(sr * seconds)) / sr
    f0 = PITCHES[pitch][0] * rng.uniform(0.95, 1.05)
    if pattern == "rising":
        phase = 2 * math.pi * f0 * (t + 0.5 * t**2 / seconds)  # sweeps f0 -> 1.5 f0
    else:
        phase = 2 * math.pi * f0 * t
    wave = np.sin(phase + rng.uniform(0, 2 * math.pi))
    if pattern == "pulsing":
        wave *= (np.floor(t * 8) % 2 == 0).astype(np.float64)  # 8 on/off per second
    wave = rng.uniform(0.3, 0.7) * wave + rng.normal(0, 0.01, t.shape)
    return wave.astype(np.float32)


# --------------------------------------------------------------------------------------- generator
def generate(
    out_dir: str | Path, n_images: int = 300, n_videos: int = 60, n_audio: int = 200, size: int = 64, seed: int = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Write the files and ``out_dir/manifest.jsonl``; return the manifest rows."""
    import soundfile as sf

    if size < 16 or size % 2:
        raise ValueError(f"size must be an even number >= 16 (h264 needs even sizes), got {size}")
    out = Path(out_dir)
    for sub in ("images", "videos", "audio"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colors, shapes, dirs = list(COLORS), list(SHAPES), list(DIRECTIONS)
    rows: list[dict[str, Any]] = []
    total = n_images + n_videos + n_audio
    bar = tqdm(total=total, desc="generate", disable=not progress or total == 0)

    for i in range(n_images):
        color, shape = colors[rng.integers(len(colors))], shapes[rng.integers(len(shapes))]
        radius = rng.uniform(0.18, 0.32) * size
        cx, cy = rng.uniform(radius, size - radius, 2)
        key = f"img-{i:06d}"
        draw_shape(_background(rng, size), shape, color, cx, cy, radius).save(out / "images" / f"{key}.jpg", quality=92)
        rows.append({"key": key, "image": f"images/{key}.jpg", "captions": image_captions(color, shape),
                     "class": f"{color} {shape}", "labels": [color, shape]})
        bar.update()

    for i in range(n_videos):
        color, shape, direction = (colors[rng.integers(len(colors))], shapes[rng.integers(len(shapes))],
                                   dirs[rng.integers(len(dirs))])
        (dx, dy), radius = DIRECTIONS[direction][0], rng.uniform(0.15, 0.22) * size
        travel = size - 2 * radius
        other = rng.uniform(radius, size - radius)
        bg = _background(rng, size)
        frames = []
        for f in range(VIDEO_FRAMES):
            along = radius + travel * f / (VIDEO_FRAMES - 1)
            pos = along if (dx + dy) > 0 else size - along
            cx, cy = (pos, other) if dx else (other, pos)
            frames.append(np.asarray(draw_shape(bg, shape, color, cx, cy, radius)))
        key = f"vid-{i:06d}"
        _write_mp4(out / "videos" / f"{key}.mp4", frames)
        rows.append({"key": key, "video": f"videos/{key}.mp4", "captions": video_captions(color, shape, direction),
                     "class": f"{color} {shape} {direction}", "labels": [color, shape, direction]})
        bar.update()

    pitches, patterns = list(PITCHES), list(PATTERNS)
    for i in range(n_audio):
        pitch, pattern = pitches[rng.integers(len(pitches))], patterns[rng.integers(len(patterns))]
        key = f"aud-{i:06d}"
        sf.write(out / "audio" / f"{key}.wav", tone(rng, pitch, pattern), AUDIO_SR, subtype="PCM_16")
        rows.append({"key": key, "audio": f"audio/{key}.wav", "captions": audio_captions(pitch, pattern),
                     "class": f"{pitch} {pattern}", "labels": [pitch, pattern]})
        bar.update()
    bar.close()

    # Interleave modalities so that every shard (written in manifest order) mixes them.
    rows = [rows[i] for i in np.random.default_rng(seed + 1).permutation(len(rows))]
    write_manifest(rows, out / "manifest.jsonl")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate synthetic multilingual image/video/audio data.")
    parser.add_argument("--out", required=True)
    parser.add_argument("--n-images", type=int, default=300)
    parser.add_argument("--n-videos", type=int, default=60)
    parser.add_argument("--n-audio", type=int, default=200)
    parser.add_argument("--size", type=int, default=64, help="image / video side in pixels (even)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = generate(args.out, args.n_images, args.n_videos, args.n_audio, args.size, args.seed)
    print(f"wrote {len(rows)} samples -> {Path(args.out) / 'manifest.jsonl'}")


if __name__ == "__main__":
    main()
