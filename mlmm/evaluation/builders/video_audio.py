"""Video-text and audio-text retrieval sets: MSR-VTT, Clotho, AudioCaps.

    build("msrvtt", videos="MSRVTT/videos/all", csv="MSRVTT_JSFUSION_test.csv", out="shards/msrvtt_1k")
    build("msrvtt", videos="MSRVTT/videos/all", annotations="MSRVTT_data.json", split="test", out="shards/msrvtt")
    build("clotho", captions="clotho_captions_evaluation.csv", audio="clotho/evaluation", out="shards/clotho")
    build("audiocaps", captions="audiocaps/test.csv", audio="audiocaps/test", out="shards/audiocaps")
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Optional

from mlmm.evaluation.builders.common import BuildError, need_dir, need_file, read_csv, read_json, safe_key

VIDEO_EXT = (".mp4", ".avi")
AUDIO_EXT = (".wav", ".flac")
AUDIOCAPS_NAMES = ("{audiocap_id}", "{youtube_id}_{start_time}", "Y{youtube_id}", "{youtube_id}")


def _media_row(key: str, folder: Path, stems: list[str], exts: tuple, modality: str, captions: list[str],
               missing: list, **extra) -> Optional[dict]:
    for stem in stems:
        for ext in exts:
            if (folder / f"{stem}{ext}").is_file():
                return {"key": safe_key(key), modality: str((folder / f"{stem}{ext}").resolve()),
                        "captions": {"en": captions}, **extra}
    tried = f" (also tried {', '.join(stems[1:])} with {'/'.join(exts)})" if len(stems) > 1 else ""
    missing.append(f"{folder / (stems[0] + exts[0])}{tried}")
    return None


def msrvtt(videos: str | Path, csv: Optional[str | Path] = None, annotations: Optional[str | Path] = None,
           split: str = "test"):
    """MSR-VTT videos (``<video_id>.mp4``) with either the 1k-A test CSV (JSFusion: ``key, vid_key, video_id,
    sentence``; one caption per video) or the full annotation JSON (``videos: [{video_id, split}], sentences:
    [{video_id, caption}]``; every caption of the videos of ``split``)."""
    videos = need_dir(videos, "MSR-VTT videos")
    if (csv is None) == (annotations is None):
        raise BuildError("msrvtt: give exactly one of --csv (1k-A test list) or --annotations (MSRVTT_data.json)")
    captions: dict[str, list[str]] = defaultdict(list)
    if csv is not None:
        for row in read_csv(need_file(csv, "MSR-VTT test CSV"), ["video_id", "sentence"]):
            captions[row["video_id"]].append(row["sentence"].strip())
    else:
        path = need_file(annotations, "MSR-VTT annotation JSON")
        data = read_json(path)
        try:
            wanted = {v["video_id"] for v in data["videos"] if v.get("split", split) == split}
            for s in data["sentences"]:
                if s["video_id"] in wanted:
                    captions[s["video_id"]].append(s["caption"].strip())
        except (KeyError, TypeError) as e:
            raise BuildError(f"{path}: not an MSR-VTT annotation file (missing {e})") from None
    rows, missing = [], []
    for vid, caps in captions.items():
        row = _media_row(vid, videos, [vid], VIDEO_EXT, "video", caps, missing, source="msrvtt")
        rows += [row] if row else []
    return rows, missing


def clotho(captions: str | Path, audio: str | Path):
    """Clotho's ``clotho_captions_<split>.csv`` (``file_name, caption_1..caption_5``) + its audio folder."""
    path, audio = need_file(captions, "Clotho captions CSV"), need_dir(audio, "Clotho audio")
    rows, missing = [], []
    for row in read_csv(path, ["file_name", "caption_1"]):
        caps = [row[k].strip() for k in sorted(row) if k.startswith("caption_") and row[k] and row[k].strip()]
        stem = Path(row["file_name"]).stem
        found = _media_row(stem, audio, [stem], (Path(row["file_name"]).suffix or ".wav",), "audio", caps, missing,
                           source="clotho")
        rows += [found] if found else []
    return rows, missing


def audiocaps(captions: str | Path, audio: str | Path, pattern: Optional[str] = None):
    """AudioCaps' ``<split>.csv`` (``audiocap_id, youtube_id, start_time, caption``; clips with several captions
    grouped by youtube_id + start_time) + the audio you downloaded, named by ``pattern`` (a format string over the
    CSV columns), else the first of ``{audiocap_id}``, ``{youtube_id}_{start_time}``, ``Y{youtube_id}``,
    ``{youtube_id}`` that exists (.wav / .flac)."""
    path, audio = need_file(captions, "AudioCaps CSV"), need_dir(audio, "AudioCaps audio")
    clips: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in read_csv(path, ["audiocap_id", "youtube_id", "start_time", "caption"]):
        clips[(row["youtube_id"], row["start_time"])].append(row)
    rows, missing = [], []
    for (yid, start), group in clips.items():
        patterns = [pattern] if pattern else list(AUDIOCAPS_NAMES)
        try:
            stems = [p.format(**group[0]) for p in patterns]
        except KeyError as e:
            raise BuildError(f"--pattern {pattern!r}: {e} is not an AudioCaps CSV column") from None
        row = _media_row(f"{yid}_{start}", audio, stems, AUDIO_EXT, "audio", [g["caption"].strip() for g in group],
                         missing, source="audiocaps")
        rows += [row] if row else []
    return rows, missing
