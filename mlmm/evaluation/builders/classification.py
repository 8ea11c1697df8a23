"""Classification sets for zero-shot evaluation: an image folder per class (ImageNet-style) or a CSV, with class
names per language; writes the shards and ``classes.yaml`` (see :mod:`mlmm.evaluation.prompts`).

    build("image-folder", root="imagenet/val", names="imagenet_names.csv", out="shards/imagenet_val")
    build("csv", csv="labels.csv", names="names.csv", out="shards/my_set")     # rows: image|audio|video, label

Class names: a CSV ``id,<lang>,<lang>...`` (one row per class id) or a YAML ``{<lang>: [names in class order]}``;
without one, the class ids (folder names with ``_`` as spaces) are the English names.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from mlmm.evaluation.builders.common import IMAGE_EXT, BuildError, need_dir, need_file, read_csv, safe_key

MEDIA_COLUMNS = ("image", "audio", "video")


def read_names(path: Optional[str | Path], ids: list[str]) -> dict[str, list[str]]:
    """{lang: [name of each id, in ``ids`` order]} from a names CSV / YAML, else the ids as English names."""
    if path is None:
        return {"en": [i.replace("_", " ") for i in ids]}
    path = need_file(path, "class names file")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        raw = raw.get("classes", raw)
        for lang, names in raw.items():
            if not isinstance(names, list) or len(names) != len(ids):
                raise BuildError(f"{path}: {lang}: expected {len(ids)} names (one per class), got "
                                 f"{len(names) if isinstance(names, list) else type(names).__name__}")
        return {str(lang): [str(n) for n in names] for lang, names in raw.items()}
    rows = read_csv(path, ["id"])
    table = {r["id"]: r for r in rows}
    absent = [i for i in ids if i not in table]
    if absent:
        raise BuildError(f"{path}: no row for class id(s) {absent[:5]}")
    langs = [c for c in rows[0] if c != "id"]
    return {lang: [table[i][lang].strip() or i for i in ids] for lang in langs}


def image_folder(root: str | Path, names: Optional[str | Path] = None):
    """``root/<class id>/*.jpg|png``: class ids are the sorted folder names; label = class index."""
    root = need_dir(root, "image-folder root")
    ids = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not ids:
        raise BuildError(f"{root}: no class sub-folders")
    rows = []
    for label, cid in enumerate(ids):
        for f in sorted((root / cid).iterdir()):
            if f.suffix.lower() in IMAGE_EXT:
                rows.append({"key": safe_key(f"{cid}-{f.stem}"), "image": str(f.resolve()), "label": label,
                             "class": cid})
    if not rows:
        raise BuildError(f"{root}: no images ({', '.join(IMAGE_EXT)}) in the class folders")
    return rows, [], {"ids": ids, "names": read_names(names, ids), "modality": "image"}


def csv_set(csv: str | Path, names: Optional[str | Path] = None, media_root: Optional[str | Path] = None):
    """A CSV with a media column (``image``, ``audio`` or ``video``: paths relative to ``media_root``, default the
    CSV's folder) and ``label`` (the class id); class order: the names CSV's rows, else sorted ids."""
    path = need_file(csv, "classification CSV")
    rows_in = read_csv(path, ["label"])
    column = next((c for c in MEDIA_COLUMNS if c in rows_in[0]), None) if rows_in else None
    if column is None:
        raise BuildError(f"{path}: needs a media column ({', '.join(MEDIA_COLUMNS)}) and a label column")
    base = Path(media_root) if media_root else path.parent
    labels = [r["label"].strip() for r in rows_in]
    ids = [r["id"] for r in read_csv(need_file(names, "class names CSV"), ["id"])] \
        if names and Path(names).suffix == ".csv" else sorted(set(labels))
    index = {cid: i for i, cid in enumerate(ids)}
    rows, missing = [], []
    for n, (r, cid) in enumerate(zip(rows_in, labels), 2):
        if cid not in index:
            raise BuildError(f"{path}:{n}: label {cid!r} is not a class of {names}")
        f = Path(r[column]) if Path(r[column]).is_absolute() else base / r[column]
        if not f.is_file():
            missing.append(str(f))
            continue
        rows.append({"key": safe_key(f"{cid}-{f.stem}"), column: str(f.resolve()), "label": index[cid], "class": cid})
    return rows, missing, {"ids": ids, "names": read_names(names, ids), "modality": column}
