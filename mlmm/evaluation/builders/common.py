"""What every dataset builder shares: path checks with one-line errors, shard-safe keys, writing the eval shards."""
from __future__ import annotations

import csv
import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

log = logging.getLogger(__name__)
IMAGE_EXT = (".jpg", ".jpeg", ".png")


class BuildError(ValueError):
    """A builder input that is missing or malformed; the message is one line naming the file."""


def need_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise BuildError(f"{path}: {what} not found")
    return path


def need_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise BuildError(f"{path}: {what} folder not found")
    return path


def first_file(candidates: Iterable[Path], what: str) -> Path:
    """The first existing file of ``candidates``; else a BuildError naming the first one."""
    candidates = list(candidates)
    hit = next((c for c in candidates if c.is_file()), None)
    if hit is None:  # name the candidate whose folder exists: where the file was expected
        expected = next((c for c in candidates if c.parent.is_dir()), candidates[0])
        raise BuildError(f"{expected}: {what} not found")
    return hit


def read_lines(path: Path) -> list[str]:
    """Text lines (UTF-8, ``.gz`` transparently), without the trailing newline."""
    import gzip

    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        return raw.decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BuildError(f"{path}: unreadable ({e})") from None


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BuildError(f"{path}: unreadable JSON ({e})") from None


def read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    """CSV rows as dicts; a BuildError naming the file when a required column is missing."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
            header = rows and list(rows[0]) or []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise BuildError(f"{path}: unreadable CSV ({e})") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise BuildError(f"{path}: CSV column(s) {missing} missing (has {header})")
    return rows


def safe_key(text: str) -> str:
    """A WebDataset-safe sample key (letters, digits, _-:+=@, only)."""
    return re.sub(r"[^A-Za-z0-9_\-:+=@,]", "_", str(text)) or "_"


def find_media(folder: Path, name: str, subfolders: Sequence[str] = ("",)) -> Optional[Path]:
    for sub in subfolders:
        p = folder / sub / name if sub else folder / name
        if p.is_file():
            return p
    return None


def expected_path(folder: Path, name: str, subfolders: Sequence[str] = ("",)) -> str:
    """Where a missing media file was expected: in the first of ``subfolders`` that exists (root last)."""
    for sub in [s for s in subfolders if s] + [""]:
        if (folder / sub).is_dir():
            return str(folder / sub / name)
    return str(folder / name)


def write_eval_shards(rows: list[dict], missing: list[str], out: str | Path, *, name: str, skip_missing: bool,
                      shard_size: int = 1000, progress: bool = True) -> dict[str, Any]:
    """Rows (absolute media paths) -> ``out/shard-*.tar`` + ``index.json`` via :func:`mlmm.data.write_shards`,
    plus ``out/build.json`` (builder, counts, missing files). A missing media file is an error naming it unless
    ``skip_missing`` (then listed in build.json and the summary)."""
    from mlmm.data.write_shards import write_shards

    if missing and not skip_missing:
        raise BuildError(f"{missing[0]}: file not found ({len(missing)} missing in all; --skip-missing leaves "
                         "them out and lists them in build.json)")
    if not rows:
        raise BuildError(f"{name}: nothing to write (every item is missing its media file)")
    keys = [r["key"] for r in rows]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise BuildError(f"{name}: two items map to the key {dup!r}")
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "manifest.jsonl"
        manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        index = write_shards(manifest, out, shard_size=shard_size, progress=progress)
    report = {"builder": name, "n_items": index["n_samples"], "languages": index.get("languages"),
              "missing": missing, "skipped": index.get("skipped", [])}
    (Path(out) / "build.json").write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    log.info("%s: %d items, languages %s, %d missing, %d skipped -> %s", name, report["n_items"],
             report["languages"], len(missing), len(report["skipped"]), out)
    return report
