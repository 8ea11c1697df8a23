"""Pack a JSONL manifest of image / video / audio files + multilingual captions into WebDataset shards.

    python -m mlmm.data.write_shards --manifest data/synth/manifest.jsonl --out data/synth_shards --shard-size 1000

Manifest rows (paths relative to the manifest's folder, or absolute)::

    {"key": "img-000001", "image": "images/1.jpg", "captions": {"en": ["a cat", ...], "de": "eine Katze"}, ...}

``image`` / ``video`` / ``audio`` are optional; other keys are kept in the sample json. Every row is checked before
the output folder is touched; a bad row stops the run with one line naming the file and line (not UTF-8, invalid
JSON, not an object, a bad or duplicate ``key``, a path that is not a string, ``captions`` that is not a mapping of
BCP-47-like language codes to a string or a list of strings, a language whose captions are all blank). ``extra_images``
(``{name: path}``, e.g. ``{"ref": "images/3.jpg"}``) stores further images as ``<name>.jpg`` entries of the
sample; the reader decodes them into ``Batch.extras[name]`` (see ``Preprocessor.extra_images``). Each
sample in ``out/shard-000000.tar ...`` holds the raw file bytes under the file's extension (the ones its modality
lists in :mod:`mlmm.modalities`, which the reader takes too: ``jpg`` (also for .jpeg), ``png``, ``webp``, ``mp4``,
``avi``, ``webm``, ``mkv``, ``wav``, ``flac``, ``ogg``) and ``json`` = the row
without the path keys, captions normalised to ``{lang: [str, ...]}`` (stripped, empty strings
removed) plus ``"modalities"``. ``out/index.json`` lists shards, counts, languages, modalities and
every skipped sample with its reason (a missing or undecodable file, or nothing to learn from); the run ends with
a one-line summary of the skips per reason. The reader checks ``index.json`` against the tars beside it (shard names,
sample counts) and refuses a folder where they disagree.

The shards are written into a temporary sibling folder that replaces ``out`` only when complete
(:func:`mlmm.atomic.replace_folder`): a failure or a kill at any point leaves the previous shards and ``index.json``
as they were. ``out`` may only hold what a previous run wrote (``shard-*.tar``, ``index.json``).
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from tqdm import tqdm

from mlmm.atomic import fault, replace_folder
from mlmm.data.shard_output import UploadError, remote_out, tar_writer
from mlmm.modalities import MEDIA
from mlmm.modalities import modality as spec_of

log = logging.getLogger(__name__)

SHARD_FILES = ("shard-*.tar", "index.json")  # what a shard folder written by mlmm holds
# WebDataset splits "<key>.<ext>" at the first dot of the file name: keys may not hold "." or "/".
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-:+=@,]+$")
LANG_CODE = re.compile(r"^[a-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})*$")  # BCP-47-like: en, de, pt-BR, zh_Hant


class SkipSample(Exception):
    """A manifest row that cannot be written; the message is the reason recorded in index.json."""


class CaptionError(ValueError):
    """Captions that break the schema; ``reason`` is the category the reader counts them under (``bad captions``,
    ``unknown language code``, ``empty captions``)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def normalise_captions(captions: Any, where: str) -> dict[str, list[str]]:
    """``{lang: str | [str]}`` -> ``{lang: [str, ...]}`` (stripped, blank strings removed).

    Raises :class:`CaptionError` naming ``where`` for a non-mapping, a language code that is not BCP-47-like, a
    value that is not a string or a list of strings, or a language whose captions are all blank (an empty list is
    allowed: no caption in that language, e.g. an uncaptioned clip).
    """
    if captions is None:
        return {}
    if not isinstance(captions, dict):
        raise CaptionError("bad captions", f"{where}: 'captions' must be a mapping lang -> caption(s), got "
                                           f"{type(captions).__name__}")
    out: dict[str, list[str]] = {}
    for lang, caps in captions.items():
        if not LANG_CODE.match(str(lang)):
            raise CaptionError("unknown language code", f"{where}: captions: {lang!r} is not a language code "
                                                        "(BCP-47-like: en, de, pt-BR, zh_Hant)")
        caps = [caps] if isinstance(caps, str) else caps
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise CaptionError("bad captions", f"{where}: captions[{lang!r}] must be a string or a list of strings")
        out[str(lang)] = [c.strip() for c in caps if c.strip()]
        if caps and not out[str(lang)]:
            raise CaptionError("empty captions", f"{where}: captions[{lang!r}] holds only blank strings")
    return out


def check_media(name: str, data: bytes) -> None:
    """Cheap decodability check (the modality's ``check``, :mod:`mlmm.modalities`); raises :class:`SkipSample` with
    the reason."""
    try:
        spec_of(name).load("check")(data)
    except Exception as e:  # noqa: BLE001 - any decoder failure means the file is unusable
        raise SkipSample(f"undecodable {name}: {type(e).__name__}: {e}") from e


def _read_row(row: dict[str, Any], base: Path, where: str, video_fps: Optional[float] = None,
              video_size: Optional[int] = None) -> dict[str, Any]:
    """Manifest row -> {"__key__", <ext>: bytes, ..., "json": bytes}; raises SkipSample for bad files.

    ``video_fps`` / ``video_size``: re-encode the video once (``mlmm.data.video.transcode_video``: that frame rate,
    shorter side, all-intra H.264 mp4); what was done goes into the json as ``video_transcode``.
    """
    sample: dict[str, Any] = {"__key__": row["key"]}
    meta = {k: v for k, v in row.items() if k not in MEDIA}
    meta["captions"] = normalise_captions(row.get("captions"), where)
    modalities = []
    for modality in MEDIA:
        rel = row.get(modality)
        if rel is None:
            continue
        path = Path(rel) if Path(rel).is_absolute() else base / rel
        suffixes = spec_of(modality).writer_suffixes()  # file suffix -> the sample member it is stored as
        ext = suffixes.get(path.suffix.lower())
        if ext is None:
            raise SkipSample(f"unsupported {modality} file type {path.suffix!r} (allowed: {sorted(suffixes)})")
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
            ext = "mp4"
        sample[ext] = data
        modalities.append(modality)
    extra = row.get("extra_images") or {}  # {name: path}: further images stored as "<name>.<ext>" (e.g. ref.jpg)
    meta.pop("extra_images", None)
    for name, rel in sorted(extra.items()):
        path = Path(rel) if Path(rel).is_absolute() else base / rel
        ext = spec_of("image").writer_suffixes().get(path.suffix.lower())
        if ext is None:
            raise SkipSample(f"extra image {name!r}: expected an image file, got {path.name}")
        if not path.is_file():
            raise SkipSample(f"missing extra image {name!r}: {path}")
        data = path.read_bytes()
        check_media("image", data)
        sample[f"{name}.{ext}"] = data
    if not modalities and not any(meta["captions"].values()):
        raise SkipSample("no media file and no caption")
    meta["modalities"] = modalities
    sample["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    return sample


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of every non-blank line (a UTF-8 BOM on line 1 is allowed); a line that is not
    UTF-8 or not JSON raises ValueError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start} of the line)") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {e}") from None


def check_row(row: Any, where: str) -> None:
    """The field types of one manifest row; raises ValueError naming ``where`` (``file:line``)."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: each line must be a JSON object, got {type(row).__name__}")
    key = row.get("key")
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(f"{where}: 'key' must be a non-empty string of letters, digits and "
                         f"_-:+=@, (no '.' or '/'), got {key!r}")
    for field in MEDIA:
        value = row.get(field)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ValueError(f"{where}: {field!r} must be a file path (a non-empty string), got {value!r}")
    extra = row.get("extra_images")
    if extra is not None and (not isinstance(extra, dict) or not all(
            isinstance(n, str) and re.fullmatch(r"[a-z0-9_]+", n) and isinstance(p, str) for n, p in extra.items())):
        raise ValueError(f"{where}: 'extra_images' must map lower-case names [a-z0-9_] to image paths, got {extra!r}")
    normalise_captions(row.get("captions"), where)


def absolute_paths(row: dict[str, Any], base: Path) -> dict[str, Any]:
    """A copy of a manifest row whose media paths are absolute (relative ones resolved against ``base``, the
    manifest's folder): for a manifest written elsewhere."""
    return {**row, **{m: str((base / row[m]).resolve()) for m in MEDIA if row.get(m)}}


def read_manifest(manifest_path: str | Path) -> list[dict[str, Any]]:
    """Parse and check every row of a manifest (see :func:`check_row`; keys unique) before anything is written."""
    path = Path(manifest_path)
    rows, seen = [], {}
    for lineno, row in iter_jsonl(path):
        check_row(row, f"{path}:{lineno}")
        key = row["key"]
        if key in seen:
            raise ValueError(f"{path}:{lineno}: duplicate key {key!r} (first on line {seen[key]})")
        seen[key] = lineno
        rows.append(row)
    return rows


def write_manifest(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Write ``rows`` as a manifest, one JSON object a line (UTF-8, non-ASCII kept); -> the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


class ShardSink:
    """Samples -> ``folder/shard-NNNNNN.tar`` of ``shard_size`` samples each, plus what ``index.json`` says of them.

    ``write(sample)`` / ``skip(key, reason)`` per row (``on_shard(path)`` is called on each shard once closed);
    ``index(**extra)`` closes the last shard and returns the index (``shards`` [{name, n}], ``n_samples``,
    ``languages``, ``modalities``, ``skipped`` [{key, reason}])."""

    def __init__(self, folder: Path, shard_size: int, on_shard: Optional[Callable[[Path], None]] = None):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.folder, self.shard_size = Path(folder), shard_size
        self.shards: list[dict[str, Any]] = []
        self.skipped: list[dict[str, str]] = []
        self.languages: set[str] = set()
        self.modalities: set[str] = set()
        self.writer: Any = None
        self.on_shard = on_shard  # called with each closed shard's path (remote outputs upload it then)

    def write(self, sample: dict[str, Any]) -> None:
        if self.writer is None or self.shards[-1]["n"] >= self.shard_size:
            self._close()
            name = f"shard-{len(self.shards):06d}.tar"
            self.writer = tar_writer(self.folder / name)
            self.shards.append({"name": name, "n": 0})
        self.writer.write(sample)
        self.shards[-1]["n"] += 1
        meta = json.loads(sample["json"])
        self.languages.update(lang for lang, caps in meta["captions"].items() if caps)
        self.modalities.update(meta["modalities"])

    def skip(self, key: str, reason: str) -> None:
        log.warning("skipping %s: %s", key, reason)
        self.skipped.append({"key": key, "reason": reason})

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            if self.on_shard is not None:
                self.on_shard(self.folder / self.shards[-1]["name"])

    def index(self, **extra: Any) -> dict[str, Any]:
        self._close()
        shards = [shard_entry(self.folder / s["name"], s["n"]) for s in self.shards]
        return {"shards": shards, "n_samples": sum(s["n"] for s in shards), "languages": sorted(self.languages),
                "modalities": sorted(self.modalities), "skipped": self.skipped, **extra}


def shard_entry(path: Path, n: int) -> dict[str, Any]:
    """The ``index.json`` entry of a written shard: its name and sample count (the reader checks both)."""
    return {"name": Path(path).name, "n": int(n)}


def write_index(folder: Path, index: dict[str, Any]) -> None:
    (Path(folder) / "index.json").write_text(json.dumps(index, ensure_ascii=False, indent=1), encoding="utf-8")


def summary(index: dict[str, Any], out: str | Path) -> str:
    """One line: samples, shards, languages, modalities and the skips per reason (listed in index.json)."""
    reasons = collections.Counter(s["reason"].split(":")[0] for s in index["skipped"])
    skipped = (f"skipped {len(index['skipped'])} of {index['n_samples'] + len(index['skipped'])}"
               + (f" ({', '.join(f'{r}: {n}' for r, n in sorted(reasons.items()))}; listed in index.json)"
                  if reasons else ""))
    return (f"{index['n_samples']} samples in {len(index['shards'])} shards -> {out} (languages {index['languages']}, "
            f"modalities {index['modalities']}, {skipped})")


@remote_out
def write_shards(
    manifest_path: str | Path, out_dir: str | Path, shard_size: int = 1000, progress: bool = True,
    on_shard: Optional[Callable[[Path], None]] = None, video_fps: Optional[float] = None,
    video_size: Optional[int] = None,
) -> dict[str, Any]:
    """Write ``out_dir/shard-NNNNNN.tar`` + ``out_dir/index.json`` (all at once, see the module doc); return the
    index. ``out_dir`` may be a bucket, URL or ``pipe:`` spec (:mod:`mlmm.data.shard_output`, which passes
    ``on_shard``: called on each closed shard). Fault points (tests): ``shard_row:<i>`` after the i-th row (1-based),
    ``folder_before_swap``...

    ``video_fps`` / ``video_size`` transcode every video once, here, so that each epoch decodes less (see
    :func:`_read_row`; the frames training then samples are documented in docs/data.md).
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if video_fps is not None and not video_fps > 0:
        raise ValueError(f"video_fps must be > 0, got {video_fps}")
    if video_size is not None and video_size < 2:
        raise ValueError(f"video_size must be >= 2, got {video_size}")
    manifest_path = Path(manifest_path)
    rows = read_manifest(manifest_path)  # every row checked before the output folder is touched
    out = Path(out_dir)
    with replace_folder(out, owned=SHARD_FILES, what="shard folder") as tmp:
        sink = ShardSink(tmp, shard_size, on_shard)
        for i, row in enumerate(tqdm(rows, desc=f"shards {out.name}", disable=not progress), 1):
            try:
                where = f"{manifest_path}: key {row['key']!r}"
                sink.write(_read_row(row, manifest_path.parent, where, video_fps, video_size))
            except SkipSample as e:
                sink.skip(row["key"], str(e))
            fault(f"shard_row:{i}")
        index = sink.index(manifest=str(manifest_path))
        write_index(tmp, index)
    if index["skipped"]:
        log.warning("%s", summary(index, out))
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
    return write_manifest(rows, out_path)


def run_writer(write: Callable[[], dict[str, Any]], out: str) -> None:
    """What a shard-writing command does around ``write()`` (-> the index): log INFO to stderr, a refused write
    (bad input, output in use, failed upload) is one line and exit 2, else print :func:`summary`."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        index = write()
    except (ValueError, FileNotFoundError, FileExistsError, UploadError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(summary(index, out))


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
    run_writer(lambda: write_shards(args.manifest, args.out, args.shard_size, video_fps=args.video_fps,
                                    video_size=args.video_size), args.out)


if __name__ == "__main__":
    main()
