"""Where shard writers put their output: a local folder, or a remote spec uploaded through webdataset's gopen.

    check_output("s3://bucket/shards", "--out")          # refuse a spec that cannot be written, before any work
    with remote_output("https://host/shards", "--out") as dest:
        ...write dest.folder / "shard-000000.tar"...; dest.done(dest.folder / "shard-000000.tar")  # uploaded now
        ...write dest.folder / "index.json"...           # uploaded when the block ends, after every tar

Remote outputs (the writers' ``--out``):

* ``http(s)://host/prefix`` (also ``sftp://``, ``ftps://``, ``scp://``): each file is PUT to ``prefix/<name>`` by
  webdataset's ``curl -T -``;
* ``s3://bucket/prefix`` through ``aws s3 cp - s3://bucket/prefix/<name>``, ``gs://bucket/prefix`` through
  ``gsutil cp - gs://...`` (``ais://`` through ``ais put``), the writing side of the reader's forms
  (:mod:`mlmm.data.shardio`);
* ``pipe:CMD`` with ``{name}`` where each file goes: ``CMD`` (``{name}`` replaced by the file name) is run by a shell
  with the file on its stdin, e.g. ``pipe:aws s3 cp - s3://bucket/shards/{name} --only-show-errors``. A URL may use
  ``{name}`` too, instead of the file name appended to its path.

Credentials come from the environment of these tools, never from the spec: a ``user:password@`` URL is refused, and
everything logged or raised goes through :func:`mlmm.data.shardio.redact`.

The writer builds each file in a local staging folder (``$TMPDIR``) and uploads it as soon as it is complete
(``done``), so the staging folder holds one shard at a time. When the writer's block ends without an error the
remaining files are uploaded, ``index.json`` last: a reader never finds an ``index.json`` whose tars are not all there.
Any non-zero exit status of the transfer tool is a failed upload: it raises an :class:`UploadError` naming the file,
nothing more is uploaded, and ``index.json`` is not written (tars uploaded before the failure stay where they are:
object stores have no folder to swap; run the writer again to overwrite them). When the upload of ``index.json``
itself fails, the error says so: an HTTP PUT or an object store keeps no part of it, a ``pipe:`` command may have.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import posixpath
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

from mlmm.data.shardio import _close, _describe, check_url, is_local, local_path, open_stream, redact, scheme

log = logging.getLogger("mlmm.data")

WRITABLE = ("http", "https", "s3", "gs", "sftp", "ftps", "scp", "ais")  # gopen's handlers with a "wb" mode
INDEX = "index.json"


class UploadError(OSError):
    """An upload that failed (the transfer tool's exit status, a broken pipe); the message names the file, ``name``."""

    def __init__(self, message: str, name: str):
        super().__init__(message)
        self.name = name


def check_output(out: str, where: str) -> None:
    """Refuse, in one line naming `where`, a remote output that cannot be written: a scheme without a write mode in
    webdataset's gopen, a ``pipe:`` command that does not say where each file goes (``{name}``), a URL holding a
    password. Local paths pass (the writer checks its folder)."""
    s = scheme(out)
    if is_local(out):
        return
    if s == "pipe" and "{name}" not in out:
        raise ValueError(f"{where}: {redact(out)!r}: a pipe: output needs {{name}} where each file goes, e.g. "
                         "'pipe:aws s3 cp - s3://bucket/shards/{name}'")
    if s != "pipe" and s not in WRITABLE:
        raise ValueError(f"{where}: {redact(out)!r}: cannot write to {s}:// (writable: a local folder, "
                         f"{', '.join(f'{w}://' for w in WRITABLE)}, pipe:CMD with {{name}})")
    check_url(out, where)
    if s != "pipe" and "{name}" not in out and not urlsplit(out).netloc:
        raise ValueError(f"{where}: {redact(out)!r}: expected {s}://HOST_OR_BUCKET/prefix")


def output_target(out: str, name: str) -> str:
    """Where file `name` of remote output `out` goes: ``{name}`` replaced, else `name` appended to the URL's path."""
    if "{name}" in out:
        return out.replace("{name}", name)
    parts = urlsplit(out)
    return parts._replace(path=posixpath.join(parts.path or "/", name)).geturl()


def upload(path: Path, target: str, chunk: int = 1 << 16) -> None:
    """Stream local file `path` to `target` through gopen; :class:`UploadError` naming the file when it fails."""
    stream, status = open_stream(target, "wb"), None
    proc = getattr(stream, "proc", None)
    try:
        with open(path, "rb") as f:
            while data := f.read(chunk):
                stream.write(data)
        _close(stream, quiet=False)  # waits for the tool; gopen ignores some statuses (SIGPIPE, curl's 26)
        status = proc.returncode if proc is not None else None
        if status:
            raise OSError(f"exit {status}")
    except (OSError, ValueError) as e:  # a broken pipe, a gopen Pipe's "exit N", a closed stream
        if status is None and proc is not None:
            status = _close(stream, quiet=True, wait=10.0)
        why = (f"the command exited with status {status} before reading the whole file"
               if isinstance(e, BrokenPipeError) and not status else _describe(e, stream, status))
        raise UploadError(f"writing {path.name} to {redact(target)} failed: {why}", path.name) from None


class RemoteOutput:
    """A local staging folder whose files are uploaded to remote output `out` (see the module doc)."""

    def __init__(self, out: str, folder: Path):
        self.out, self.folder, self.uploaded = out, Path(folder), []

    def done(self, path: str | Path) -> None:
        """File `path` (written under the staging folder) is complete: upload it now and free its space."""
        path = Path(path)
        if path.name == INDEX:
            return  # last, in finish()
        upload(path, output_target(self.out, path.name))
        path.unlink()
        self.uploaded.append(path.name)

    def finish(self) -> None:
        """Upload what is left in the staging folder: every other file first, then ``index.json``."""
        for path in sorted((p for p in self.folder.iterdir() if p.is_file()), key=lambda p: (p.name == INDEX, p.name)):
            if path.name == INDEX:
                upload(path, output_target(self.out, INDEX))
                self.uploaded.append(INDEX)
            else:
                self.done(path)


@contextlib.contextmanager
def remote_output(out: str, what: str) -> Iterator[RemoteOutput]:
    """A :class:`RemoteOutput` over a fresh staging folder; its files are uploaded when the block ends without an
    exception (``index.json`` last); on an exception nothing more is uploaded and the staging folder is deleted."""
    check_output(out, what)
    with tempfile.TemporaryDirectory(prefix="mlmm-upload-") as tmp:
        dest = RemoteOutput(out, Path(tmp))
        try:
            yield dest
            dest.finish()
        except BaseException as e:
            if dest.uploaded:
                log.error("%s %s: %d files uploaded before the failure (%s ...)", what, redact(out),
                          len(dest.uploaded), dest.uploaded[0])
            if isinstance(e, UploadError):  # the destination may hold part of the file the tool was writing
                tail = (f"{INDEX} not written" if e.name != INDEX else
                        f"every tar was uploaded; delete any partial {INDEX} the tool left, or run again")
                raise UploadError(f"{what}: {e} ({tail})", e.name) from None
            raise
        log.info("%s: %d files uploaded to %s", what, len(dest.uploaded), redact(out))


def remote_out(writer: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for a shard writer ``writer(..., out_dir, ..., on_shard=None)`` that writes a local folder and calls
    ``on_shard(path)`` on each shard it has closed: a remote ``out_dir`` is refused or accepted (:func:`check_output`)
    before the writer starts; the writer then writes a local staging folder whose shards are uploaded one by one as
    ``on_shard`` reports them, and whose ``index.json`` is uploaded last, when the writer returns."""
    signature = inspect.signature(writer)

    @functools.wraps(writer)
    def write(*args: Any, **kwargs: Any) -> Any:
        call = signature.bind(*args, **kwargs)
        out = str(call.arguments["out_dir"])
        if is_local(out):
            call.arguments["out_dir"] = local_path(out) if scheme(out) == "file" else call.arguments["out_dir"]
            return writer(*call.args, **call.kwargs)
        with remote_output(out, "--out") as dest:
            call.arguments.update(out_dir=dest.folder, on_shard=dest.done)
            return writer(*call.args, **call.kwargs)

    return write


def tar_writer(path: str | Path):
    """A ``webdataset.TarWriter`` for one shard whose members carry a whole-second mtime (the time it was opened).

    webdataset's default mtime is ``time.time()``, a float, which tarfile can only store in a pax extended header:
    1,024 more bytes per member (a 100-member shard of 1 KB samples: 471 KB instead of 266 KB) and one more header to
    parse per member on every read."""
    import webdataset as wds

    return wds.TarWriter(str(path), mtime=int(time.time()))

