"""Training shards prepared on first use from a parallel-caption JSONL (``data.parallel_jsonl``), cached.

    data: {parallel_jsonl: ../shared/data/multi30k/train_5k.jsonl, train_shards: data/multi30k_train}

On the first run, ``train_shards`` is written from the JSONL (:mod:`mlmm.distill.parallel`: text-only shards)
with the loss teacher's embeddings precomputed into it (:mod:`mlmm.distill.precompute`), plus
``prepared.json`` = what it was made from: the JSONL's sha1, the teacher's fingerprint (sha1 of its config and
weights), the shard size. Later runs reuse the folder when all three match, and rebuild it (with a warning
naming what changed) when one differs, so a changed teacher or JSONL is never silently reused. A folder that
holds shards but no ``prepared.json`` (made by hand) is refused rather than overwritten. The build goes to a
temporary sibling folder that replaces ``train_shards`` only when complete.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

from mlmm.config import ConfigError
from mlmm.distill.teacher import Teacher

log = logging.getLogger("mlmm")

MARKER = "prepared.json"
FORMAT = 1  # bump when the prepared layout changes


def file_sha1(path: str | Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prepared_record(jsonl: str | Path, teacher: Optional[Teacher], shard_size: int) -> dict:
    """What a prepared folder is made from (compared on reuse)."""
    return {"format": FORMAT, "source": str(jsonl), "source_sha1": file_sha1(jsonl),
            "teacher": teacher.fingerprint if teacher is not None else None, "shard_size": shard_size}


def _changed(old: dict, new: dict) -> list[str]:
    return [k for k in ("format", "source_sha1", "teacher", "shard_size") if old.get(k) != new.get(k)]


def prepare_parallel_shards(jsonl: str | Path, out: str | Path, teacher: Optional[Teacher] = None,
                            shard_size: int = 1000, progress: bool = True) -> Path:
    """``out`` = shards of the parallel JSONL (+ ``teacher`` embeddings when given), built unless cached."""
    from mlmm.data.write_shards import write_shards
    from mlmm.distill.parallel import jsonl_to_manifest
    from mlmm.distill.precompute import precompute

    jsonl, out = Path(jsonl), Path(out)
    if not jsonl.is_file():
        raise ConfigError(f"data.parallel_jsonl: {jsonl} not found")
    record = prepared_record(jsonl, teacher, shard_size)
    marker = out / MARKER
    if marker.is_file():
        old = json.loads(marker.read_text(encoding="utf-8"))
        changed = _changed(old, record)
        if not changed:
            log.info("data.train_shards: reusing %s (prepared from %s, teacher %s)", out, jsonl, record["teacher"])
            return out
        log.warning("data.train_shards: %s was prepared with other %s (%s -> %s); rebuilding it", out,
                    "/".join(changed), [old.get(k) for k in changed], [record[k] for k in changed])
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"data.train_shards: {out} exists and was not prepared from data.parallel_jsonl "
                          f"(no {MARKER}); remove it, or unset data.parallel_jsonl to train on it as is")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("data.train_shards: preparing %s from %s%s", out, jsonl,
             f" with teacher {record['teacher']} embeddings" if teacher is not None else "")
    manifest = jsonl_to_manifest(jsonl, tmp / "manifest.jsonl")
    write_shards(manifest, tmp / "raw", shard_size=shard_size, progress=progress)
    if teacher is not None:
        precompute(teacher.cfg, str(tmp / "raw"), tmp / "shards", progress=progress, teacher=teacher)
    else:
        (tmp / "raw").rename(tmp / "shards")
    (tmp / "shards" / MARKER).write_text(json.dumps(record, indent=1), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    (tmp / "shards").rename(out)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def loss_teachers(loss) -> list[Teacher]:
    """The distinct teachers of a loss and its sub-modules (``multi`` terms), by fingerprint."""
    found: dict[str, Teacher] = {}
    for mod in loss.modules():
        t = getattr(mod, "teacher", None)
        if isinstance(t, Teacher):
            found.setdefault(t.fingerprint, t)
    return list(found.values())


def prepare_train_data(data_cfg, loss, is_main: bool = True) -> None:
    """``data.parallel_jsonl`` set: rank 0 prepares (or reuses) ``data.train_shards``; every rank waits for it."""
    from mlmm.training import distributed

    if not data_cfg.parallel_jsonl:
        return
    teachers = loss_teachers(loss)
    if len(teachers) > 1:
        raise ConfigError(f"data.parallel_jsonl: the loss has {len(teachers)} different teachers; shards hold one "
                          f"teacher's embeddings (precompute them with `python -m mlmm.distill.precompute`)")
    if is_main:
        prepare_parallel_shards(data_cfg.parallel_jsonl, data_cfg.train_shards, teachers[0] if teachers else None)
    distributed.barrier()
