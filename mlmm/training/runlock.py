"""One run per output folder: ``<output_dir>/run.lock`` names the process that owns the folder.

    lock, note = acquire(Path("runs/tiny"))   # raises OutputDirInUse naming the holder's pid and host
    ...
    lock.release()                             # removes run.lock (also at interpreter exit)

The file holds ``{"pid", "host", "started", "proc_start", "command"}``. A second run on the same host
refuses while that pid is alive (same process start time, not a zombie); a lock whose process is gone is
taken over, and the returned note says so. A lock written on another host cannot be checked from here: it
refuses, naming the host and the file to delete once that run is over. An ``flock`` on the file, held for
the whole run, closes the race between two runs starting at the same moment (and marks the holder alive on
file systems that share flocks between hosts). Only rank 0 of a distributed run calls this.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

from mlmm.training.errors import OutputDirInUse

try:
    import fcntl
except ImportError:  # Windows: the pid/host check alone
    fcntl = None

LOCK_NAME = "run.lock"


def _proc_stat(pid: int) -> Optional[list[str]]:
    """Fields of /proc/<pid>/stat after the command name (Linux), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def _proc_start(pid: int) -> Optional[int]:
    """Start time of `pid` in clock ticks since boot (tells a reused pid from the holder), or None."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def _alive(pid: int, proc_start: Optional[int]) -> bool:
    """Is `pid` (started at `proc_start`) still running on this host?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    fields = _proc_stat(pid)
    if fields and fields[0] in ("Z", "X"):  # killed, not yet reaped
        return False
    return proc_start is None or fields is None or int(fields[19]) == proc_start


def describe(holder: dict) -> str:
    if not holder:
        return "a run that is starting (its lock file is still empty)"
    return (f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('started', '?')}: "
            f"{holder.get('command') or '?'})")


class RunLock:
    """The lock this process holds; :meth:`release` is idempotent."""

    def __init__(self, path: Path, fd: int, record: dict):
        self.path, self.fd, self.record = path, fd, record

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            try:
                mine = json.loads(self.path.read_text()) == self.record
            except (OSError, ValueError):
                mine = False
            if mine:
                self.path.unlink()
        finally:
            os.close(self.fd)  # drops the flock
            self.fd = None


def _refuse(path: Path, holder: dict, reason: str) -> OutputDirInUse:
    return OutputDirInUse(f"output_dir {path.parent} is in use by {describe(holder)}: {reason}")


def acquire(output_dir: Path) -> tuple[RunLock, Optional[str]]:
    """Take ``output_dir/run.lock`` (creating the folder). Returns the lock and a note when a stale lock of a
    dead process was taken over; raises :class:`OutputDirInUse` when another run holds it."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_NAME
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "proc_start": _proc_start(os.getpid()),
              "command": " ".join(sys.argv)[:300]}
    for _ in range(5):  # the file may be replaced between open and flock: retry on the new one
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            note = _take(path, fd, record)
        except BaseException:
            os.close(fd)
            raise
        if note is not _RETRY:
            return RunLock(path, fd, record), note
        os.close(fd)
    raise OutputDirInUse(f"output_dir {output_dir}: {path} keeps changing (several runs starting at once?)")


_RETRY = object()


def _take(path: Path, fd: int, record: dict):
    here = record["host"]
    flocked = False
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            flocked = True
        except BlockingIOError:
            holder = _read(path)
            if holder.get("pid") == os.getpid() and holder.get("host") == here:
                raise _refuse(path, holder, "this process (an earlier Trainer on this output_dir that was not "
                                            "cleaned up: call its cleanup())") from None
            raise _refuse(path, holder, "that run is alive; wait for it to end or use another output_dir") from None
        except OSError:  # a file system without flock: the pid/host check alone
            pass
    try:
        if os.fstat(fd).st_ino != os.stat(path).st_ino:
            return _RETRY
    except FileNotFoundError:  # released (unlinked) between our open and flock
        return _RETRY
    raw = os.pread(fd, 1 << 16, 0)
    note = None
    if raw.strip():
        try:
            holder = json.loads(raw)
            pid = int(holder["pid"])
        except (ValueError, KeyError, TypeError):
            raise OutputDirInUse(f"output_dir {path.parent}: {path} is not an mlmm lock file; delete it if no run "
                                 "is using this folder") from None
        if holder.get("host") != here:
            raise _refuse(path, holder, f"mlmm cannot check a process on another host (this is {here}); if that "
                                        f"run has ended, delete {path} and start again")
        if pid == os.getpid() and not flocked:
            raise _refuse(path, holder, "this process (an earlier Trainer on this output_dir that was not cleaned "
                                        "up: call its cleanup())")
        if _alive(pid, holder.get("proc_start")):
            raise _refuse(path, holder, "that run is alive; wait for it to end or use another output_dir")
        note = f"output_dir {path.parent}: took over the stale lock of {describe(holder)}: that process is gone"
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    os.fsync(fd)
    return note


def _read(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}
