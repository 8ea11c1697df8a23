"""Parallel-caption JSONL (``{"captions": {lang: str | [str]}, ...}`` per line, e.g. Multi30K) -> mlmm shards.

    python -m mlmm.distill.parallel --jsonl ../shared/data/multi30k/train_5k.jsonl --out data/multi30k_train \
        [--teacher recipes/configs/multi30k_distill_text.yaml]

Writes ``OUT/manifest.jsonl`` (key ``<prefix>-<line>``, other fields kept), ``OUT/raw`` (text-only shards via
:mod:`mlmm.data.write_shards`) and, with ``--teacher``, ``OUT/shards`` = ``OUT/raw`` + precomputed teacher
embeddings (:mod:`mlmm.distill.precompute`); without it ``OUT/shards`` is the raw shards.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path
from typing import Optional


def read_parallel(path: str | Path) -> list[dict]:
    """Rows of a parallel JSONL with captions normalised to ``{lang: [str, ...]}`` (empty ones dropped)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            caps = row.get("captions")
            if not isinstance(caps, dict):
                raise ValueError(f"{path}:{lineno}: expected {{'captions': {{lang: str | [str]}}}}")
            row["captions"] = {k: [c for c in ([v] if isinstance(v, str) else v) if c.strip()] for k, v in caps.items()}
            rows.append(row)
    return rows


def jsonl_to_manifest(jsonl: str | Path, out: str | Path, prefix: Optional[str] = None) -> Path:
    prefix = re.sub(r"[^A-Za-z0-9_\-]", "_", prefix or Path(jsonl).stem)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for i, row in enumerate(read_parallel(jsonl)):
            row = {k: v for k, v in row.items() if k not in ("image", "video", "audio")}  # file names, no files
            f.write(json.dumps({"key": f"{prefix}-{i:07d}", **row}, ensure_ascii=False) + "\n")
    return out


def main(argv: Optional[list[str]] = None) -> None:
    from mlmm.data.write_shards import write_shards

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jsonl", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--teacher", default=None, help="YAML with a teacher: also precompute its embeddings")
    p.add_argument("--shard-size", type=int, default=1000)
    args = p.parse_args(argv)
    out = Path(args.out)
    manifest = jsonl_to_manifest(args.jsonl, out / "manifest.jsonl")
    index = write_shards(manifest, out / "raw", shard_size=args.shard_size, progress=False)
    if args.teacher:
        from mlmm.distill.precompute import precompute, teacher_from_yaml

        cfg, frames = teacher_from_yaml(args.teacher)
        index = precompute(cfg, str(out / "raw"), out / "shards", frames=frames)
    else:
        shutil.copytree(out / "raw", out / "shards", dirs_exist_ok=True)
    print(f"{index['n_samples']} samples -> {out / 'shards'}")


if __name__ == "__main__":
    main()
