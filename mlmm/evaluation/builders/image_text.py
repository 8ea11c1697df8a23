"""Image-text retrieval sets: XTD10, Multi30K, Crossmodal-3600 (XM3600), COCO / Flickr30k Karpathy splits.

    build("xtd10", captions="Cross-lingual-Test-Dataset-XTD10", images="coco/train2014", out="shards/xtd10")
    build("multi30k", root="multi30k-dataset", images="flickr30k-images", out="shards/m30k", split="test_2016_flickr")
    build("xm3600", captions="xm3600/captions.jsonl", images="xm3600/images", out="shards/xm3600")
    build("karpathy", annotations="dataset_coco.json", images="coco", out="shards/coco_test", split="test")
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from mlmm.evaluation.builders.common import (BuildError, expected_path, find_media, first_file, need_dir, need_file,
                                             read_json, read_lines, safe_key)

XTD_LANG = {"jp": "ja"}  # XTD10 file code -> BCP-47


def _image_row(key: str, image: Optional[Path], wanted: str, captions: dict, missing: list, **extra) -> Optional[dict]:
    if image is None:
        missing.append(wanted)
        return None
    return {"key": safe_key(key), "image": str(image.resolve()), "captions": captions, **extra}


def _parallel_rows(names: list[str], files: dict[str, Path], languages: Optional[Sequence[str]], images: Path,
                   subfolders: tuple[str, ...], *, expected: str, source: str):
    """Line-aligned caption files ``{lang: path}`` (line i = image i of ``names``) -> (rows, missing files).

    ``expected`` names where a requested language's file was looked for (``{lang}`` is filled in)."""
    for lang in languages or []:
        if lang not in files:
            raise BuildError(f"{expected.format(lang=lang)}: captions not found (have {sorted(files)})")
    files = {lang: p for lang, p in files.items() if not languages or lang in languages}
    if not files:
        raise BuildError(f"{expected.format(lang='<lang>')}: no caption files")
    caps = {lang: read_lines(p) for lang, p in files.items()}
    for lang, lines in caps.items():
        if len(lines) != len(names):
            raise BuildError(f"{files[lang]}: {len(lines)} lines for {len(names)} images")
    rows, missing = [], []
    for i, name in enumerate(names):
        found = find_media(images, name, subfolders)
        row = _image_row(Path(name).stem, found, expected_path(images, name, subfolders),
                         {lang: [lines[i].strip()] for lang, lines in caps.items()}, missing, source=source)
        rows += [row] if row else []
    return rows, missing


def xtd10(captions: str | Path, images: str | Path, languages: Optional[Sequence[str]] = None):
    """The XTD10 repo (``test_image_names.txt`` + ``test_1kcaptions_<lang>.txt`` in XTD10/, MIC/, STAIR/) + the
    COCO images it names (``images/<name>``, or in ``train2014/`` / ``val2014/`` under it)."""
    root, images = need_dir(captions, "XTD10 captions"), need_dir(images, "COCO images")
    dirs = [root, root / "XTD10", root / "MIC", root / "STAIR"]
    names = read_lines(first_file((d / "test_image_names.txt" for d in (dirs[1], dirs[0])), "XTD10 image list"))
    names = [n.strip() for n in names if n.strip()]
    files = {p.stem[len("test_1kcaptions_"):]: p for d in dirs if d.is_dir() for p in d.glob("test_1kcaptions_*.txt")}
    return _parallel_rows(names, {XTD_LANG.get(code, code): p for code, p in files.items()}, languages, images,
                          ("", "train2014", "val2014"), expected=str(dirs[1] / "test_1kcaptions_{lang}.txt"),
                          source="xtd10")


def multi30k(root: str | Path, images: str | Path, split: str = "test_2016_flickr",
             languages: Optional[Sequence[str]] = None):
    """A Multi30K checkout (``data/task1/raw/<split>.<lang>[.gz]`` + ``data/task1/image_splits/<split>.txt``) +
    the Flickr30k images folder."""
    root, images = need_dir(root, "Multi30K"), need_dir(images, "Flickr30k images")
    bases = [root / "data" / "task1", root]
    names = read_lines(first_file((b / "image_splits" / f"{split}.txt" for b in bases), f"{split} image list"))
    names = [n.strip() for n in names if n.strip()]
    found = {}
    for base in bases:
        for p in sorted((base / "raw").glob(f"{split}.*")) if (base / "raw").is_dir() else []:
            found.setdefault(p.name[len(split) + 1:].removesuffix(".gz"), p)
    return _parallel_rows(names, found, languages, images, ("", "flickr30k-images"),
                          expected=str(bases[0] / "raw" / f"{split}.{{lang}}.gz"), source="multi30k")


def xm3600(captions: str | Path, images: str | Path, languages: Optional[Sequence[str]] = None):
    """Crossmodal-3600 ``captions.jsonl`` (``{"image/key", <lang>: {"caption": [...]}}``) + ``images/<key>.jpg``."""
    path, images = need_file(captions, "XM3600 captions.jsonl"), need_dir(images, "XM3600 images")
    rows, missing = [], []
    for n, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            key = item["image/key"]
        except (ValueError, KeyError, TypeError) as e:
            raise BuildError(f"{path}:{n}: not an XM3600 line ({type(e).__name__}: {e})") from None
        caps = {lang: list(v["caption"]) for lang, v in item.items()
                if isinstance(v, dict) and "caption" in v and (not languages or lang in languages)}
        row = _image_row(key, find_media(images, f"{key}.jpg"), str(images / f"{key}.jpg"), caps, missing,
                         source="xm3600")
        rows += [row] if row else []
    return rows, missing


def karpathy(annotations: str | Path, images: str | Path, split: str = "test"):
    """Karpathy's ``dataset_coco.json`` / ``dataset_flickr30k.json`` (``images: [{filepath?, filename, split,
    sentences: [{raw}]}]``) + the images folder (``<filepath>/<filename>`` or ``<filename>``)."""
    path, images = need_file(annotations, "Karpathy split JSON"), need_dir(images, "images")
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise BuildError(f"{path}: expected {{'images': [...]}} (Karpathy's dataset_*.json)")
    name = str(data.get("dataset", path.stem))
    rows, missing = [], []
    for item in data["images"]:
        if item.get("split") != split:
            continue
        rel = Path(item.get("filepath", "")) / item["filename"]
        found = find_media(images, str(rel)) or find_media(images, item["filename"])
        row = _image_row(Path(item["filename"]).stem, found,
                         str(images / rel), {"en": [s["raw"].strip() for s in item.get("sentences", [])]}, missing,
                         source=f"karpathy-{name}")
        rows += [row] if row else []
    if not rows and not missing:
        raise BuildError(f"{path}: no image with split {split!r}")
    return rows, missing
