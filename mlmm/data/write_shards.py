"""Pack a JSONL manifest of image / video / audio files + multilingual captions into WebDataset shards.

    python -m mlmm.data.write_shards --manifest data/synth/manifest.jsonl --out data/synth_shards --shard-size 1000

Manifest rows (paths relative to the manifest's folder, or absolute)::

    {"key": "img-000001", "image": "images/1.jpg", "captions": {"en": ["a cat", ...], "de": "eine Katze"}, ...}

``image`` / ``video`` / ``audio`` are optional; other keys are kept in the sample json. ``extra_images``
(``{name: path}``, e.g. ``{"ref": "images/3.jpg"}``) stores further images as ``<name>.jpg`` entries of the
sample; the reader decodes them into ``Batch.extras[name]`` (see ``Preprocessor.extra_images``). Each
sample in ``out/shard-000000.tar ...`` holds the raw file bytes under the file's extension
(``jpg`` (also for .jpeg), ``png``, ``mp4``, ``avi``, ``wav``, ``flac``) and ``json`` = the row
without the path keys, captions normalised to ``{lang: [str, ...]}`` (stripped, empty strings
removed) plus ``"modalities"``. ``out/index.json`` lists shards, counts, languages, modalities and
every skipped sample with its reason (a missing or undecodable file, or nothing to learn from).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from tqdm import tqdm

from mlmm.data.shard_output import remote_out

log = logging.getLogger(__name__)

MEDIA_KEYS = ("image", "video", "audio")
EXTENSIONS = {  # file suffix -> (modality, shard extension)
    ".jpg": ("image", "jpg"), ".jpeg": ("image", "jpg"), ".png": ("image", "png"),
    ".mp4": ("video", "mp4"), ".avi": ("video", "avi"),
    ".wav": ("audio", "wav"), ".flac": ("audio", "flac"),
}
# WebDataset splits "<key>.<ext>" at the first dot of the file name: keys may not hold "." or "/".
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-:+=@,]+$")


class SkipSample(Exception):
    """A manifest row that cannot be written; the message is the reason recorded in index.json."""


def normalise_captions(captions: Any, where: str) -> dict[str, list[str]]:
    """``{lang: str | [str]}`` -> ``{lang: [str, ...]}`` (stripped, empty strings removed)."""
    if captions is None:
        return {}
    if not isinstance(captions, dict):
        raise ValueError(f"{where}: 'captions' must be a mapping lang -> caption(s), got {type(captions).__name__}")
    out: dict[str, list[str]] = {}
    for lang, caps in captions.items():
        caps = [caps] if isinstance(caps, str) else caps
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise ValueError(f"{where}: captions[{lang!r}] must be a string or a list of strings")
        out[str(lang)] = [c.strip() for c in caps if c.strip()]
    return out


def check_media(modality: str, data: bytes) -> None:
    """Cheap decodability check; raises :class:`SkipSample` with the reason."""
    try:
        if modality == "image":
            from PIL import Image

            Image.open(io.BytesIO(data)).verify()
        elif modality == "audio":
            import soundfile as sf

            info = sf.info(io.BytesIO(data))
            if info.frames <= 0:
                raise ValueError("no audio frames")
        else:
            import av

            with av.open(io.BytesIO(data)) as container:
                if not container.streams.video:
                    raise ValueError("no video stream")
    except Exception as e:  # noqa: BLE001 - any decoder failure means the file is unusable
        raise SkipSample(f"undecodable {modality}: {type(e).__name__}: {e}") from e


def _read_row(row: dict[str, Any], base: Path, where: str, video_fps: Optional[float] = None,
              video_size: Optional[int] = None) -> dict[str, Any]:
    """Manifest row -> {"__key__", <ext>: bytes, ..., "json": bytes}; raises SkipSample for bad files.

    ``video_fps`` / ``video_size``: re-encode the video once (``mlmm.data.video.transcode_video``: that frame rate,
    shorter side, all-intra H.264 mp4); what was done goes into the json as ``video_transcode``.
    """
    sample: dict[str, Any] = {"__key__": row["key"]}
    meta = {k: v for k, v in row.items() if k not in MEDIA_KEYS}
    meta["captions"] = normalise_captions(row.get("captions"), where)
    modalities = []
    for modality in MEDIA_KEYS:
        rel = row.get(modality)
        if rel is None:
            continue
        path = Path(rel) if Path(rel).is_absolute() else base / rel
        kind = EXTENSIONS.get(path.suffix.lower())
        if kind is None or kind[0] != modality:
            allowed = sorted(s for s, (m, _) in EXTENSIONS.items() if m == modality)
            raise SkipSample(f"unsupported {modality} file type {path.suffix!r} (allowed: {allowed})")
        if not path.is_file():
            raise SkipSample(f"missing {modality} file: {path}")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise SkipSample(f"unreadable {modality} file {path}: {e}") from e
        check_media(modality, data)
        if modality == "video" and (video_fps is not None or video_size is not None):
            from mlmm.data.video import transcode_video

            try:
                data, meta["video_transcode"] = transcode_video(data, fps=video_fps, size=video_size)
            except ValueError as e:
                raise SkipSample(f"video {path.name} not transcoded: {e}") from e
            kind = ("video", "mp4")
        sample[kind[1]] = data
        modalities.append(modality)
    extra = row.get("extra_images") or {}  # {name: path}: further images stored as "<name>.<ext>" (e.g. ref.jpg)
    if not isinstance(extra, dict):
        raise SkipSample(f"extra_images must be a mapping name -> image path, got {type(extra).__name__}")
    meta.pop("extra_images", None)
    for name, rel in sorted(extra.items()):
        path = Path(rel) if Path(rel).is_absolute() else base / rel
        kind = EXTENSIONS.get(path.suffix.lower())
        if not re.fullmatch(r"[a-z0-9_]+", str(name)) or kind is None or kind[0] != "image":
            raise SkipSample(f"extra image {name!r}: expected a lower-case name and an image file, got {path.name}")
        if not path.is_file():
            raise SkipSample(f"missing extra image {name!r}: {path}")
        data = path.read_bytes()
        check_media("image", data)
        sample[f"{name}.{kind[1]}"] = data
    if not modalities and not any(meta["captions"].values()):
        raise SkipSample("no media file and no caption")
    meta["modalities"] = modalities
    sample["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    return sample


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of every non-blank line; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {e}") from e


def read_manifest(manifest_path: str | Path) -> list[dict[str, Any]]:
    """Parse and validate a manifest: JSON objects with a unique, shard-safe string "key"."""
    path = Path(manifest_path)
    rows, seen = [], {}
    for lineno, row in iter_jsonl(path):
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: each line must be a JSON object")
        key = row.get("key")
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ValueError(f"{path}:{lineno}: 'key' must be a non-empty string of letters, digits and "
                             f"_-:+=@, (no '.' or '/'), got {key!r}")
        if key in seen:
            raise ValueError(f"{path}:{lineno}: duplicate key {key!r} (first on line {seen[key]})")
        seen[key] = lineno
        rows.append(row)
    return rows


@remote_out
def write_shards(
    manifest_path: str | Path, out_dir: str | Path, shard_size: int = 1000, progress: bool = True,
    on_shard: Optional[Callable[[Path], None]] = None, video_fps: Optional[float] = None,
    video_size: Optional[int] = None,
) -> dict[str, Any]:
    """Write ``out_dir/shard-NNNNNN.tar`` + ``out_dir/index.json``; return the index. ``out_dir`` may be a bucket,
    URL or ``pipe:`` spec (:mod:`mlmm.data.shard_output`, which passes ``on_shard``: called on each closed shard).

    ``video_fps`` / ``video_size`` transcode every video once, here, so that each epoch decodes less (see
    :func:`_read_row`; the frames training then samples are documented in docs/data.md).
    """
    import webdataset as wds

    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if video_fps is not None and not video_fps > 0:
        raise ValueError(f"video_fps must be > 0, got {video_fps}")
    if video_size is not None and video_size < 2:
        raise ValueError(f"video_size must be >= 2, got {video_size}")
    manifest_path = Path(manifest_path)
    rows = read_manifest(manifest_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("shard-*.tar"):  # never mix shards of two runs
        old.unlink()
    shards: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    languages: set[str] = set()
    modalities: set[str] = set()
    writer: Optional[wds.TarWriter] = None
    for row in tqdm(rows, desc=f"shards {out.name}", disable=not progress):
        try:
            sample = _read_row(row, manifest_path.parent, f"{manifest_path}: key {row['key']!r}", video_fps, video_size)
        except SkipSample as e:
            log.warning("skipping %s: %s", row["key"], e)
            skipped.append({"key": row["key"], "reason": str(e)})
            continue
        if writer is None or shards[-1]["n"] >= shard_size:
            if writer is not None:
                writer.close()
                if on_shard:
                    on_shard(out / shards[-1]["name"])
            name = f"shard-{len(shards):06d}.tar"
            writer = wds.TarWriter(str(out / name))
            shards.append({"name": name, "n": 0})
        writer.write(sample)
        shards[-1]["n"] += 1
        meta = json.loads(sample["json"])
        languages.update(lang for lang, caps in meta["captions"].items() if caps)
        modalities.update(meta["modalities"])
    if writer is not None:
        writer.close()
        if on_shard:
            on_shard(out / shards[-1]["name"])
    index = {
        "shards": shards,
        "n_samples": sum(s["n"] for s in shards),
        "languages": sorted(languages),
        "modalities": sorted(modalities),
        "skipped": skipped,
        "manifest": str(manifest_path),
    }
    with open(out / "index.json", "w", encoding="utf-8") as f:
        json.dump(index, f, ensure_ascii=False, indent=1)
    if skipped:
        log.warning("%d of %d samples skipped (reasons in %s)", len(skipped), len(rows), out / "index.json")
    return index


def shared_data_manifest(shared_dir: str | Path, out_path: str | Path) -> Path:
    """Convert the real test data (``images_vi``, ``audio_fsdd``, ``video``) into one mlmm manifest.

    Keys: ``vi-<id>``, ``fsdd-<file stem>``, ``video-<video_id>``; paths are absolute. Missing
    sub-folders are left out; at least one must exist. The MSVD clip without captions is kept
    (it has a video and no text).
    """
    shared = Path(shared_dir)
    rows: list[dict[str, Any]] = []

    def load(rel: str) -> list[dict[str, Any]]:
        path = shared / rel
        if not path.is_file():
            return []
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    for r in load("images_vi/captions.jsonl"):
        rows.append({"key": f"vi-{r['id']}", "image": str((shared / "images_vi" / r["image"]).resolve()),
                     "captions": r["captions"], "source": "images_vi"})
    for r in load("audio_fsdd/manifest.jsonl"):
        extra = {k: r[k] for k in ("digit", "speaker") if k in r}
        rows.append({"key": f"fsdd-{Path(r['file']).stem}", "audio": str((shared / "audio_fsdd" / r["file"]).resolve()),
                     "captions": r["captions"], "source": "audio_fsdd", "class": str(r.get("digit", "")), **extra})
    for r in load("video/manifest.jsonl"):
        extra = {k: r[k] for k in ("model_generated_en",) if k in r}
        rows.append({"key": f"video-{r['video_id']}", "video": str((shared / "video" / r["file"]).resolve()),
                     "captions": r["captions"], "source": r.get("source", "video"), **extra})
    if not rows:
        raise FileNotFoundError(f"{shared}: none of images_vi/captions.jsonl, audio_fsdd/manifest.jsonl, "
                                "video/manifest.jsonl found")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write WebDataset shards from an mlmm JSONL manifest.")
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--out", required=True, help="shard folder, or a bucket / URL prefix or pipe:CMD with {name} "
                                                    "(mlmm.data.shard_output)")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--video-fps", type=float, default=None,
                        help="re-encode videos once, here, to this frame rate (all-intra H.264 mp4): every epoch then "
                             "decodes a fraction of the frames; training samples its T frames from this stream")
    parser.add_argument("--video-size", type=int, default=None,
                        help="re-encode videos with their shorter side scaled down to this many pixels")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    index = write_shards(args.manifest, args.out, args.shard_size, video_fps=args.video_fps,
                         video_size=args.video_size)
    print(f"{index['n_samples']} samples in {len(index['shards'])} shards -> {args.out} "
          f"(languages {index['languages']}, modalities {index['modalities']}, skipped {len(index['skipped'])})")


if __name__ == "__main__":
    main()
