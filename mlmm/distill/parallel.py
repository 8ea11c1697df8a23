"""Parallel-caption JSONL (``{"captions": {lang: str | [str]}, ...}`` per line, e.g. Multi30K) -> mlmm shards.

    python -m mlmm.distill.parallel --jsonl ../shared/data/multi30k/train_5k.jsonl --out data/multi30k_train \
        [--teacher recipes/configs/multi30k_distill_text.yaml]

Writes ``OUT/manifest.jsonl`` (key ``<prefix>-<line>``, other fields kept), ``OUT/raw`` (text-only shards via
:mod:`mlmm.data.write_shards`) and, with ``--teacher``, ``OUT/shards`` = ``OUT/raw`` + precomputed teacher
embeddings (:mod:`mlmm.distill.precompute`); without it ``OUT/shards`` is the raw shards.

Every line of the JSONL is checked first (UTF-8, JSON, ``captions`` as the shard writer wants them; errors name the
file and line), and the teacher is built, before ``OUT`` is touched; ``OUT`` is then replaced as a whole when all
three are written (:func:`mlmm.atomic.replace_folder`), so a failure or a kill leaves the previous ``OUT`` as it was.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

from mlmm.atomic import replace_folder
from mlmm.data.write_shards import iter_jsonl, normalise_captions

OUT_FILES = ("manifest.jsonl", "raw", "shards")  # what OUT holds


def read_parallel(path: str | Path) -> list[dict]:
    """Rows of a parallel JSONL with captions normalised to ``{lang: [str, ...]}`` (stripped, blank strings dropped);
    raises ValueError naming the file and line for a line that is not UTF-8, not a JSON object, or whose captions
    are not ``{lang: str | [str]}`` with BCP-47-like codes, or are all blank for a language."""
    rows = []
    for lineno, row in iter_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("captions"), dict):
            raise ValueError(f"{path}:{lineno}: expected {{'captions': {{lang: str | [str]}}, ...}}")
        row["captions"] = normalise_captions(row["captions"], f"{path}:{lineno}")
        rows.append(row)
    return rows


def jsonl_to_manifest(jsonl: str | Path, out: str | Path, prefix: Optional[str] = None,
                      rows: Optional[list[dict]] = None) -> Path:
    """Write the mlmm manifest of a parallel JSONL (``rows``: its :func:`read_parallel` rows, if read already)."""
    prefix = re.sub(r"[^A-Za-z0-9_\-]", "_", prefix or Path(jsonl).stem)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for i, row in enumerate(read_parallel(jsonl) if rows is None else rows):
            row = {k: v for k, v in row.items() if k not in ("image", "video", "audio")}  # file names, no files
            f.write(json.dumps({"key": f"{prefix}-{i:07d}", **row}, ensure_ascii=False) + "\n")
    return out


def build(jsonl: str | Path, out: str | Path, *, teacher_yaml: Optional[str] = None, shard_size: int = 1000,
          progress: bool = False) -> dict:
    """``OUT/manifest.jsonl`` + ``OUT/raw`` + ``OUT/shards`` (see the module doc), all or nothing; -> the index of
    ``OUT/shards``."""
    from mlmm.data.write_shards import write_index, write_shards

    out = Path(out)
    rows = read_parallel(jsonl)  # every line checked before OUT is touched
    teacher = frames = None
    if teacher_yaml:
        from mlmm.distill.precompute import precompute, teacher_from_yaml
        from mlmm.distill.teacher import build_teacher

        cfg, frames = teacher_from_yaml(teacher_yaml)
        teacher = build_teacher(cfg)
    with replace_folder(out, owned=OUT_FILES, what="--out") as tmp:
        manifest = jsonl_to_manifest(jsonl, tmp / "manifest.jsonl", rows=rows)
        index = write_shards(manifest, tmp / "raw", shard_size=shard_size, progress=progress)
        index["manifest"] = str(out / "manifest.jsonl")  # where it is once OUT is in place
        write_index(tmp / "raw", index)
        if teacher is not None:
            index = precompute(teacher.cfg, str(tmp / "raw"), tmp / "shards", frames=frames, teacher=teacher,
                               progress=progress)
        else:
            shutil.copytree(tmp / "raw", tmp / "shards")
    return index


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jsonl", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--teacher", default=None, help="YAML with a teacher: also precompute its embeddings")
    p.add_argument("--shard-size", type=int, default=1000)
    args = p.parse_args(argv)
    try:
        index = build(args.jsonl, args.out, teacher_yaml=args.teacher, shard_size=args.shard_size)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"{index['n_samples']} samples -> {Path(args.out) / 'shards'}")


if __name__ == "__main__":
    main()
