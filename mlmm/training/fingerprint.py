"""What mlmm wrote into a checkpoint folder, and whether all of it is still there, unchanged.

At save, :func:`manifest` lists every file of the folder with its size and whether it is a zip (``torch.save``
writes zips whose members carry CRC-32 checksums); it goes into ``mlmm_state.json`` as ``"files"``. Before
anything of a folder is unpickled, :func:`check` reads ``mlmm_state.json`` (JSON only) and compares:

* :class:`Damaged` - ``mlmm_state.json`` missing or unreadable, a listed file missing or of another size, a zip
  whose directory or CRC-32s do not match: the caller falls back to the previous checkpoint.
* :class:`Untrusted` - no fingerprint at all, or files that mlmm did not write: refused unless
  ``train.trust_checkpoint``, because loading them means ``torch.load(weights_only=False)``.

The fingerprint is a check against accidents (truncation, a disk that filled up, a copy that stopped half-way,
a folder from another tool), not a signature: whoever can write the folder can write a matching
``mlmm_state.json``.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

STATE_NAME = "mlmm_state.json"


class Damaged(Exception):
    """The folder is not what mlmm wrote: a file is missing, short or corrupt."""


class Untrusted(Exception):
    """The folder has files whose origin mlmm cannot vouch for."""


def _files(folder: Path, exclude: str) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()
            and p.relative_to(folder).as_posix() != exclude}


def manifest(folder: str | Path, exclude: str = STATE_NAME) -> dict[str, Any]:
    """``{"version": 1, "files": {relative path: [size, is_zip]}, "zip_crc32": bool}`` of `folder`."""
    import torch

    folder = Path(folder)
    crc = getattr(torch.serialization, "get_crc32_options", lambda: True)()
    return {"version": 1, "zip_crc32": bool(crc),
            "files": {rel: [p.stat().st_size, zipfile.is_zipfile(p)] for rel, p in _files(folder, exclude).items()}}


def check_files(folder: str | Path, fingerprint: Any, *, trust: bool = False, exclude: str = STATE_NAME) -> None:
    """Raise :class:`Damaged` / :class:`Untrusted` unless `folder` holds exactly the files of `fingerprint`."""
    folder = Path(folder)
    if not (isinstance(fingerprint, dict) and isinstance(fingerprint.get("files"), dict)):
        if trust:
            return
        raise Untrusted("no file fingerprint in its mlmm_state.json, so these are files mlmm did not write (or an "
                        "mlmm older than the fingerprint did)")
    listed: dict[str, Any] = fingerprint["files"]
    present = _files(folder, exclude)
    missing = sorted(set(listed) - set(present))
    if missing:
        raise Damaged(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    extra = sorted(set(present) - set(listed))
    if extra and not trust:
        raise Untrusted(f"holds files mlmm did not write: {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}")
    for rel, entry in listed.items():
        size, is_zip = (entry + [False])[:2] if isinstance(entry, list) else (entry, False)
        got = present[rel].stat().st_size
        if got != size:
            raise Damaged(f"{rel} has {got} bytes, {size} when it was written")
        if is_zip:
            _check_zip(present[rel], rel, crc=fingerprint.get("zip_crc32", True))


def _check_zip(path: Path, rel: str, crc: bool) -> None:
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip() if crc else None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise Damaged(f"{rel} is corrupt: {e}") from None
    if bad is not None:
        raise Damaged(f"{rel} is corrupt: checksum mismatch in {bad}")


def read_state(folder: str | Path) -> dict[str, Any]:
    """``mlmm_state.json`` of a checkpoint folder; :class:`Damaged` when missing or unreadable."""
    path = Path(folder) / STATE_NAME
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Damaged(f"no {STATE_NAME}") from None
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise Damaged(f"{STATE_NAME} is unreadable: {e}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise Damaged(f"{STATE_NAME} is unreadable: no integer 'step'")
    return state


def check(folder: str | Path, *, trust: bool = False) -> dict[str, Any]:
    """The mlmm state of checkpoint `folder` once its files match their fingerprint (see the module doc)."""
    state = read_state(folder)
    check_files(folder, state.get("files"), trust=trust)
    return state
