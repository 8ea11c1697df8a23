"""Writes that a crash cannot leave half done: atomic files, atomic folder replacement, fsync, a kill test hook.

    write_atomic(path, text)                                   # temp file + fsync + rename
    with replace_folder(out, owned=("shard-*.tar", "index.json")) as tmp:
        ...write everything into tmp...                        # out is swapped for tmp only when this block ends

:func:`replace_folder` builds the new content in a temporary sibling folder (``.<name>.tmp-<pid>-<random>``) and,
only when the block ends without an exception, fsyncs it and swaps it with ``out`` in one step
(``renameat2(RENAME_EXCHANGE)`` on Linux). An exception or a kill at any moment before the swap leaves ``out``
byte-identical; after it, ``out`` holds the complete new content. Where the kernel or file system cannot exchange
two folders (NFS, macOS) the swap is two renames; a kill between them leaves the previous folder as
``.<name>.old-<pid>``, which the next :func:`replace_folder` on ``out`` puts back before it starts.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator, Sequence


def fault(point: str) -> None:
    """Test hook: ``MLMM_INJECT_FAULT=<point>`` kills this process with SIGKILL when it reaches ``point``."""
    if os.environ.get("MLMM_INJECT_FAULT") == point:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file under ``path``, then ``path`` itself."""
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(Path(path))


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file, fsync and rename: readers see the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recover(out: Path) -> None:
    """Put back a previous folder left by a kill inside a two-rename swap; remove temp folders of dead writers."""
    for stale in sorted(out.parent.glob(f".{out.name}.old-*")):
        pid = stale.name[len(f".{out.name}.old-"):]
        if pid.isdigit() and _alive(int(pid)):
            continue  # another writer is between its two renames
        if not out.exists():
            os.rename(stale, out)
        else:
            shutil.rmtree(stale, ignore_errors=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        pid = stale.name[len(f".{out.name}.tmp-"):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def check_replaceable(out: Path, owned: Sequence[str], what: str) -> None:
    """Refuse to replace ``out`` when it is a file or holds entries that no pattern of ``owned`` matches."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{what} {out}: exists and is not a folder")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if not any(fnmatch.fnmatch(p.name, g) for g in owned))
        if foreign:
            raise FileExistsError(f"{what} {out}: holds {foreign[:5]}, which a rewrite would delete (it replaces the "
                                  f"whole folder, expected only {list(owned)}); choose an empty or new folder")


@contextlib.contextmanager
def replace_folder(out: str | Path, *, owned: Sequence[str], what: str = "output folder") -> Iterator[Path]:
    """Yield an empty temporary sibling of ``out``; swap it into place when the block ends without an exception.

    ``owned``: glob patterns of the entries ``out`` may hold (what a previous run of the writer left); anything
    else makes it refuse before writing (it would be deleted). ``what`` names the folder in messages.
    Fault points (see :func:`fault`): ``folder_before_swap``, ``folder_after_swap``.
    """
    out = Path(os.path.abspath(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    _recover(out)
    check_replaceable(out, owned, what)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        fault("folder_before_swap")
        if not out.exists():
            os.rename(tmp, out)
        elif not _exchange(tmp, out):
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            os.rename(old, tmp)
        fsync_dir(out.parent)
        fault("folder_after_swap")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the previous content after a swap, the partial one otherwise
