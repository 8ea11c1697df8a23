"""Convert a Hugging Face ``datasets`` dataset (image / audio / video / text columns) into mlmm WebDataset shards.

    python -m mlmm.data.from_hf --dataset data/hf_coco_vi --split test --image-column image \
        --caption-column caption:vi --caption-column caption_en:en --out data/shards_vi
    python -m mlmm.data.from_hf --dataset org/name --split train --audio-column audio \
        --caption-column transcription:fr --keep-column speaker_id --out data/shards_fr --shard-size 1000

``--dataset`` is a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (read memory-mapped,
row by row), any other local folder or Hub name ``load_dataset`` understands (opened with ``streaming=True``; with
``HF_HUB_OFFLINE=1`` only the local cache is used). Rows are converted one at a time, so memory stays flat.

* Media columns are read *undecoded* (``Image/Audio/Video(decode=False)``): the encoded bytes go into the shard as
  they are when the mlmm reader takes the format (jpg/png/webp, wav/flac/ogg, mp4/avi/mkv). Other image formats are
  re-encoded as PNG, other audio as FLAC; decoded values (PIL images, ``{"array", "sampling_rate"}``) are encoded.
* ``--caption-column COL[:LANG]`` (repeatable; LANG defaults to ``--language``): a string, a list of strings, or a
  ``{lang: str | [str]}`` mapping (e.g. a ``Translation`` feature; its own languages are used). ``a.b`` reads a
  nested field.
* ``--keep-column COL[:NAME]`` copies a JSON value into the sample json (``ClassLabel`` ids become their names), e.g.
  ``label:class`` for the hashing/eval relevance key.
* Output = what ``python -m mlmm.data.write_shards`` writes: ``shard-NNNNNN.tar`` + ``index.json`` (counts,
  languages, modalities, every skipped row with its reason; ``source`` replaces ``manifest``). The per-row checks,
  caption normalisation and key rules are the shard writer's own (:mod:`mlmm.data.write_shards`); a row whose
  captions are all blank is skipped (listed in ``index.json`` and the summary line). As there, the output folder is
  replaced all at once when the conversion is complete: a failure or a kill leaves the previous shards as they were.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from tqdm import tqdm

from mlmm.atomic import fault, replace_folder
from mlmm.data.shard_output import remote_out
from mlmm.data.write_shards import (LANG_CODE, SHARD_FILES, CaptionError, ShardSink, SkipSample, check_media,
                                    normalise_captions, run_writer, summary, write_index)
from mlmm.modalities import MEDIA

log = logging.getLogger(__name__)

IMAGE_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # PIL format -> shard extension (reader's set)
AUDIO_FORMATS = {"WAV": "wav", "FLAC": "flac", "OGG": "ogg"}  # soundfile format -> shard extension
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-:+=@,]")


# ------------------------------------------------------------------------------------------ loading
def open_dataset(dataset: str, split: str, config_name: Optional[str] = None) -> Any:
    """A ``save_to_disk`` folder (memory-mapped) or a ``load_dataset(..., streaming=True)`` split."""
    import datasets

    path = Path(dataset)
    if path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "dataset_info.json", "state.json")):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"--dataset {dataset}: no split {split!r} (splits: {sorted(ds)})")
            ds = ds[split]
        return ds
    try:
        return datasets.load_dataset(dataset, name=config_name, split=split, streaming=True)
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        raise ValueError(f"--dataset {dataset}: cannot open split {split!r} with datasets.load_dataset "
                         f"(a save_to_disk folder, a data folder or a Hub dataset name): {e}") from e


def undecoded(ds: Any, columns: Iterable[str]) -> Any:
    """Cast Image / Audio / Video columns to ``decode=False`` so rows carry the encoded bytes."""
    from datasets import Audio, Image, Video

    features = getattr(ds, "features", None) or {}
    for col in columns:
        feat = features.get(col)
        if isinstance(feat, Audio) and feat.decode:
            ds = ds.cast_column(col, Audio(sampling_rate=feat.sampling_rate, decode=False))
        elif isinstance(feat, (Image, Video)) and feat.decode:
            ds = ds.cast_column(col, type(feat)(decode=False))
    return ds


# ------------------------------------------------------------------------------------------ values
def _field(row: dict[str, Any], column: str) -> Any:
    """``row["a"]["b"]`` for ``"a.b"``; over a list of dicts, the list of their fields."""
    value: Any = row
    for part in column.split("."):
        if isinstance(value, list) and value and all(isinstance(v, dict) and part in v for v in value):
            value = [v[part] for v in value]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            raise KeyError(column)
    return value


def _raw_bytes(value: Any, what: str) -> Optional[bytes]:
    """Encoded bytes of a ``{"bytes", "path"}`` dict, raw bytes or a file path; None for decoded values."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict) and ("bytes" in value or "path" in value) and "array" not in value:
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, str):
        p = Path(value)
        if not p.is_file():
            raise SkipSample(f"missing {what} file: {value}")
        return p.read_bytes()
    return None


def encode_image(value: Any) -> tuple[str, bytes]:
    """-> (extension, bytes); PIL images / arrays / unsupported formats become PNG."""
    from PIL import Image, UnidentifiedImageError

    data = _raw_bytes(value, "image")
    if data is not None:
        try:
            with Image.open(io.BytesIO(data)) as img:
                fmt = img.format
                if fmt in IMAGE_FORMATS:
                    return IMAGE_FORMATS[fmt], data
                value = img.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise SkipSample(f"undecodable image: {e}") from e
    if not isinstance(value, Image.Image):
        try:
            import numpy as np

            value = Image.fromarray(np.asarray(value))
        except (TypeError, ValueError) as e:
            raise SkipSample(f"unsupported image value {type(value).__name__}") from e
    buf = io.BytesIO()
    value.convert("RGB").save(buf, format="PNG")
    return "png", buf.getvalue()


def encode_audio(value: Any) -> tuple[str, bytes]:
    """-> (extension, bytes); decoded arrays become WAV, formats the reader lacks become FLAC."""
    import numpy as np
    import soundfile as sf

    data = _raw_bytes(value, "audio")
    if data is not None:
        try:
            fmt = sf.info(io.BytesIO(data)).format
            if fmt in AUDIO_FORMATS:
                return AUDIO_FORMATS[fmt], data
            wave, sr = sf.read(io.BytesIO(data), dtype="float32")
        except (RuntimeError, sf.LibsndfileError) as e:
            raise SkipSample(f"undecodable audio: {e}") from e
        ext, fmt_out = "flac", "FLAC"
    elif isinstance(value, dict) and "array" in value and "sampling_rate" in value:
        wave, sr, ext, fmt_out = np.asarray(value["array"], dtype=np.float32), int(value["sampling_rate"]), "wav", "WAV"
    else:
        raise SkipSample(f"unsupported audio value {type(value).__name__}")
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format=fmt_out)
    return ext, buf.getvalue()


def encode_video(value: Any) -> tuple[str, bytes]:
    """-> (extension, bytes) of an mp4 / avi / mkv container (anything else is skipped)."""
    import av

    data = _raw_bytes(value, "video")
    if data is None:
        raise SkipSample(f"unsupported video value {type(value).__name__} (need encoded bytes or a path)")
    try:
        with av.open(io.BytesIO(data)) as container:
            names = set(container.format.name.split(","))
    except (av.error.FFmpegError, ValueError) as e:
        raise SkipSample(f"undecodable video: {e}") from e
    for ext, aliases in (("mp4", {"mp4", "mov"}), ("avi", {"avi"}), ("mkv", {"matroska", "webm"})):
        if names & aliases:
            return ext, data
    raise SkipSample(f"unsupported video container {sorted(names)} (convert to mp4)")


ENCODERS = {"image": encode_image, "audio": encode_audio, "video": encode_video}


def parse_column_spec(spec: str, default: str) -> tuple[str, str]:
    """``"col:lang"`` -> (col, lang); ``"col"`` -> (col, default)."""
    col, _, second = spec.partition(":")
    if not col:
        raise ValueError(f"column spec {spec!r}: empty column name")
    return col, second or default


def row_to_sample(row: dict[str, Any], key: str, *, media: dict[str, str], captions: Sequence[tuple[str, str]],
                  keep: Sequence[tuple[str, str]], class_names: dict[str, Any],
                  extra: dict[str, Any]) -> dict[str, Any]:
    """One dataset row -> a shard sample ``{"__key__", <ext>: bytes, ..., "json": bytes}`` (or SkipSample)."""
    caps: dict[str, list[str]] = {}
    for col, lang in captions:
        try:
            value = _field(row, col)
        except KeyError:
            raise ValueError(f"--caption-column {col}: no such column (row keys: {sorted(row)})") from None
        found = value if isinstance(value, dict) else {lang: value}
        if not isinstance(value, (str, list, dict, type(None))):
            raise ValueError(f"--caption-column {col}: holds {type(value).__name__}, expected str, [str] or "
                             "{lang: str}")
        try:
            found = normalise_captions({k: v for k, v in found.items() if v is not None}, f"column {col}")
        except CaptionError as e:
            if e.reason != "empty captions":
                raise
            raise SkipSample(f"blank captions: {e}") from None
        for lg, c in found.items():
            caps.setdefault(lg, []).extend(c)
    meta: dict[str, Any] = {**extra, "captions": caps}
    for col, name in keep:
        value = _field(row, col)
        meta[name] = class_names[col].int2str(value) if col in class_names and isinstance(value, int) else value
    sample: dict[str, Any] = {"__key__": key}
    modalities = []
    for modality in MEDIA:
        col = media.get(modality)
        if col is None or _field(row, col) is None:
            continue
        ext, data = ENCODERS[modality](_field(row, col))
        check_media(modality, data)
        sample[ext] = data
        modalities.append(modality)
    if not modalities and not any(caps.values()):
        raise SkipSample("no media and no caption")
    meta["modalities"] = modalities
    sample["json"] = json.dumps(meta, ensure_ascii=False, default=str).encode("utf-8")
    return sample


# ------------------------------------------------------------------------------------------ writing
@remote_out
def convert(dataset: str, out_dir: str | Path, *, split: str = "train", image_column: Optional[str] = None,
            audio_column: Optional[str] = None, video_column: Optional[str] = None,
            caption_columns: Sequence[str] = (), language: str = "en", keep_columns: Sequence[str] = (),
            key_column: Optional[str] = None, shard_size: int = 1000, limit: Optional[int] = None,
            config_name: Optional[str] = None, progress: bool = True,
            on_shard: Optional[Callable[[Path], None]] = None) -> dict[str, Any]:
    """Stream ``dataset[split]`` into ``out_dir/shard-*.tar`` + ``index.json``; returns the index. ``out_dir`` may
    be a bucket, URL or ``pipe:`` spec (:mod:`mlmm.data.shard_output`, which passes ``on_shard``).

    Arguments and columns are checked before the output folder is touched, which is replaced only when the
    conversion is complete (fault points for tests: ``shard_row:<i>``, ``folder_before_swap``, ...)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    media = {m: c for m, c in (("image", image_column), ("audio", audio_column), ("video", video_column)) if c}
    captions = [parse_column_spec(s, language) for s in caption_columns]
    keep = [(c, name) for c, name in (parse_column_spec(s, "") for s in keep_columns)]
    keep = [(c, name or c.split(".")[-1]) for c, name in keep]
    if not media and not captions:
        raise ValueError("nothing to convert: give --image/--audio/--video-column and/or --caption-column")
    bad = [f"{col}:{lang}" for col, lang in captions if not LANG_CODE.match(lang)]
    if bad:
        raise ValueError(f"--caption-column / --language: {bad} do not end in a language code (BCP-47-like: en, "
                         "de, pt-BR, zh_Hant)")
    ds = open_dataset(dataset, split, config_name)
    features = getattr(ds, "features", None) or {}
    named = [c.split(".")[0] for c in [*media.values(), *(c for c, _ in captions), *(c for c, _ in keep)]]
    if key_column:
        named.append(key_column)
    missing = sorted({c for c in named if features and c not in features})
    if missing:
        raise ValueError(f"--dataset {dataset} [{split}]: no column(s) {missing} (columns: {sorted(features)})")
    if features:  # read only the columns used: others are never decoded
        ds = ds.select_columns(sorted(set(named)))
    ds = undecoded(ds, media.values())
    from datasets import ClassLabel

    class_names = {c: features[c] for c, _ in keep if isinstance(features.get(c), ClassLabel)}
    total = len(ds) if hasattr(ds, "__len__") else None
    total = min(total, limit) if total is not None and limit is not None else total or limit
    out = Path(out_dir)
    seen: set[str] = set()
    extra = {"source": str(dataset), "split": split}
    with replace_folder(out, owned=SHARD_FILES, what="--out") as tmp:
        sink = ShardSink(tmp, shard_size, on_shard)
        rows = tqdm(ds, total=total, desc=f"{Path(str(dataset)).name}[{split}] -> {out.name}", disable=not progress)
        for i, row in enumerate(rows):
            if limit is not None and i >= limit:
                break
            key = _BAD_KEY_CHARS.sub("_", str(row[key_column])) if key_column else f"{split}-{i:08d}"
            try:
                if key in seen:
                    raise SkipSample(f"duplicate key {key!r}")
                sink.write(row_to_sample(row, key, media=media, captions=captions, keep=keep,
                                         class_names=class_names, extra=extra))
                seen.add(key)
            except SkipSample as e:
                sink.skip(key, str(e))
            fault(f"shard_row:{i + 1}")
        index = sink.index(source={"dataset": str(dataset), "split": split, "config": config_name})
        write_index(tmp, index)
    if index["skipped"]:
        log.warning("%s", summary(index, out))
    return index


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description="Convert a Hugging Face datasets split into mlmm WebDataset shards.")
    p.add_argument("--dataset", required=True, help="save_to_disk folder, data folder or Hub dataset name")
    p.add_argument("--split", default="train")
    p.add_argument("--config-name", help="dataset configuration (load_dataset name=)")
    p.add_argument("--image-column")
    p.add_argument("--audio-column")
    p.add_argument("--video-column")
    p.add_argument("--caption-column", action="extend", nargs="+", default=[], metavar="COL[:LANG]")
    p.add_argument("--language", default="en", help="language of caption columns given without :LANG")
    p.add_argument("--keep-column", action="extend", nargs="+", default=[], metavar="COL[:NAME]")
    p.add_argument("--key-column", help="column giving each sample's key (default SPLIT-<row index>)")
    p.add_argument("--out", required=True, help="shard folder, or a bucket / URL prefix or pipe:CMD with {name} "
                                               "(mlmm.data.shard_output)")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--limit", type=int, help="convert only the first N rows")
    args = p.parse_args(argv)
    run_writer(lambda: convert(args.dataset, args.out, split=args.split, image_column=args.image_column,
                               audio_column=args.audio_column, video_column=args.video_column,
                               caption_columns=args.caption_column, language=args.language,
                               keep_columns=args.keep_column, key_column=args.key_column, shard_size=args.shard_size,
                               limit=args.limit, config_name=args.config_name), args.out)


if __name__ == "__main__":
    main()
