"""Shard specs and raw samples: which tar files a spec names, and their samples as dicts.

    resolve_shards("data/shards")                    # folder (index.json, else *.tar), glob, brace range, "a,b"
    resolve_shards("https://host/d/shard-{000000..000127}.tar")      # URLs, pipe:CMD, s3://, gs:// (mlmm.data.shardio)
    for raw in iter_samples(shards): ...             # {"__key__", <ext>: bytes, "json": dict}, in order
    slot_samples(shards, seed=0, epoch=0, slot=1, n_slots=4)    # what one loader slot reads in an epoch

Decoding and batching live in :mod:`mlmm.data.preprocess`, the resumable training stream in
:mod:`mlmm.data.train_stream` / :mod:`mlmm.data.stream`.
"""
from __future__ import annotations

import glob
import json
from pathlib import Path
from urllib.parse import urlsplit
from typing import Any, Iterator, Optional, Sequence

from mlmm.data.shardio import ShardReader, check_url, is_local, local_path, redact, scheme


def _split_spec(spec: str) -> list[str]:
    """"a.tar,b-{000..009}.tar" -> parts, with webdataset/open_clip brace ranges expanded (commas inside braces
    kept)."""
    from braceexpand import braceexpand  # a webdataset dependency

    parts, depth, cur = [], 0, ""
    for ch in spec or "":
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [q for p in parts if p.strip() for q in (braceexpand(p.strip()) if "{" in p else [p.strip()])]


def resolve_shards(spec: str) -> list[str]:
    """Shards from a folder (its index.json, else its sorted *.tar), a glob, a brace range
    ("shards/train-{000000..000127}.tar", as webdataset and open_clip write it), or "a.tar,b.tar".

    Every part may also be a URL webdataset's gopen opens (``http(s)://``, ``s3://``, ``gs://``, ...) or a
    ``pipe:CMD`` whose stdout is the tar (``pipe:aws s3 cp s3://b/x-{000..009}.tar -``), brace ranges expanded.
    Remote parts are not contacted here: a missing remote shard shows when it is read (a counted bad shard).
    """
    files: list[str] = []
    for part in _split_spec(spec):
        if not is_local(part):
            if scheme(part) != "pipe" and any(c in urlsplit(part).path for c in "*?["):
                raise ValueError(f"shard spec {redact(spec)!r}: {redact(part)!r}: globs work on local paths only; "
                                 "name remote shards with a brace range such as shard-{000000..000127}.tar")
            check_url(part, f"shard spec {redact(spec)!r}")
            files.append(part)
            continue
        part = local_path(part)
        path = Path(part)
        if path.is_dir():
            index = path / "index.json"
            if index.is_file():
                found = [str(path / name) for name in check_index(path)]
            else:
                found = sorted(str(p) for p in path.glob("*.tar"))
        elif any(c in part for c in "*?["):
            found = sorted(glob.glob(part))
        elif path.is_file():
            found = [str(path)]
        else:
            raise FileNotFoundError(f"shard spec {spec!r}: {part!r} does not exist")
        if not found:
            raise FileNotFoundError(f"shard spec {spec!r}: no .tar shards in {part!r}")
        files.extend(found)
    if not files:
        raise FileNotFoundError(f"shard spec {spec!r}: empty (expected a folder, a glob or a comma list)")
    return files


def check_index(folder: Path) -> list[str]:
    """The shard names ``folder/index.json`` lists, after checking it agrees with the tars beside it: every listed
    shard exists, no other tar is there, and ``n_samples`` is the sum of the shards' counts (each shard's own count
    is checked when the training stream reads it, :meth:`mlmm.data.shardio.ShardReader.read`). A disagreement raises
    FileNotFoundError naming both counts."""
    index_path = folder / "index.json"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        entries = {e["name"]: e for e in index["shards"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FileNotFoundError(f"{index_path}: unreadable shard index: {e}") from None
    tars = sorted(p.name for p in folder.glob("*.tar"))
    missing, unlisted = sorted(set(entries) - set(tars)), sorted(set(tars) - set(entries))
    if missing or unlisted:
        raise FileNotFoundError(f"{index_path} lists {len(entries)} shards, the folder holds {len(tars)} .tar files "
                                f"(missing: {missing[:3]}, not listed: {unlisted[:3]}): the index and the shards "
                                "disagree (rewrite them together)")
    total = sum(int(e.get("n", 0)) for e in entries.values())
    if "n_samples" in index and int(index["n_samples"]) != total:
        raise FileNotFoundError(f"{index_path}: n_samples is {index['n_samples']}, its shards count {total}")
    return list(entries)


def _parse(sample: dict[str, Any]) -> dict[str, Any]:
    """Raw tar entry group -> {"__key__", "__url__", <ext>: bytes, "json": dict}; a json member that is not UTF-8,
    not JSON or not an object becomes ``{"__error__": ...}`` (a counted bad sample downstream)."""
    out = {k.lower() if not k.startswith("__") else k: v for k, v in sample.items()}
    raw = out.get("json")
    try:
        out["json"] = json.loads(raw) if isinstance(raw, (bytes, str)) else (raw or {})
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        out["json"] = {"__error__": f"invalid json: {e}"}
    if not isinstance(out["json"], dict):
        out["json"] = {"__error__": f"json is a {type(out['json']).__name__}, not an object"}
    return out


def iter_samples(shards: Sequence[str], reader: Optional[ShardReader] = None, *,
                 errors: str = "raise") -> Iterator[dict[str, Any]]:
    """Raw samples of ``shards`` in order, in this process: ``{"__key__", <ext>: bytes, "json": dict}``.

    Shards of any form (:func:`resolve_shards`), read with retries by ``reader`` (default
    :class:`~mlmm.data.shardio.ShardReader`). A shard that stays unreadable after them raises ``OSError`` naming it
    (``errors="raise"``), or ends with one ``{"__error__": "<reason>: ...", "__url__"}`` sample for the caller to
    count (``errors="yield"``).
    """
    if errors not in ("raise", "yield"):
        raise ValueError(f"iter_samples: errors must be 'raise' or 'yield', got {errors!r}")
    reader = reader or ShardReader()
    for shard in shards:
        for raw in reader.read(str(shard)):
            if "__error__" in raw and errors == "raise":
                raise OSError(raw["__error__"])
            yield raw if "__error__" in raw else _parse(raw)


def epoch_shards(shards: Sequence[str], seed: int, epoch: int) -> list[str]:
    """The epoch's shard order: a copy of ``shards`` shuffled with ``Random(seed + epoch)``."""
    from mlmm.data.stream import SlotPlan

    return SlotPlan(shards, seed=seed, slot=0, n_slots=1).epoch_order(epoch)


def slot_samples(shards: Sequence[str], *, seed: int, epoch: int, slot: int, n_slots: int) -> Iterator[dict[str, Any]]:
    """The raw samples that slot ``slot`` of ``n_slots`` reads in ``epoch`` (see module docstring)."""
    from mlmm.data.stream import SlotPlan

    if not 0 <= slot < n_slots:
        raise ValueError(f"slot {slot} out of range for {n_slots} slots")
    for raw in SlotPlan(shards, seed=seed, slot=slot, n_slots=n_slots).epoch_samples(epoch, 0):
        yield _parse(raw)


# ------------------------------------------------------------------------------------ preprocessing
