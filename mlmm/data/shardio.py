"""Shards anywhere: local files, ``http(s)://``, ``pipe:CMD``, ``s3://``, ``gs://`` — opened with webdataset's gopen.

    reader = ShardReader(retries=3, backoff=1.0, sizes="https://host/shards/sizes.json")
    reader.counts(["https://host/shards/shard-000000.tar", ...])   # samples per shard, None when unknown
    for raw in reader.read("pipe:aws s3 cp s3://bucket/shard-000000.tar -", expected=1000): ...

Opening is :func:`webdataset.gopen.gopen`: ``http(s)`` through ``curl`` (webdataset's own retries on connection
errors and 5xx answers), ``pipe:CMD`` through a shell whose stdout is the tar stream, ``gs://`` through
``gsutil cat`` and ``s3://`` through ``aws s3 cp URL -`` (the pipe form open_clip documents, registered in gopen's
scheme table when webdataset has none). Credentials come from the environment of these tools (``AWS_*``,
``GOOGLE_APPLICATION_CREDENTIALS``, gcloud / boto config), never from a config: a ``user:password@`` URL is refused.
Everything logged goes through :func:`redact` (userinfo, query strings and ``*SECRET*=``-style words removed).

A shard is read with :meth:`ShardReader.read`: raw samples ``{"__key__", "__url__", <ext>: bytes}`` in order. A failed
open or a stream cut mid-shard (a curl or pipe exit status, a tar that ends early) is retried with exponential backoff
(``backoff * 2**k`` seconds) up to ``retries`` times; a retry re-opens the shard and drops the samples already given
out, so nothing is duplicated or lost. When the retries are spent the shard ends with one
``{"__error__": "unreadable shard: ..."}`` marker, which the reader of a slot turns into one bad sample per sample the
shard still held (:mod:`mlmm.data.stream`), so raw indices stay aligned and ``data.max_bad_fraction`` counts them. A
local tar that is corrupt is not retried (reading it again gives the same bytes): it ends with a
``"truncated shard"`` marker.

Sample counts (for skipping whole shards on resume without opening them) come, first match wins, from the
``sizes`` file passed in (``data.shard_sizes``: a path, URL or ``pipe:`` spec of a JSON file), else from the
``index.json`` beside the shard (written by mlmm's shard writers), else from a ``sizes.json`` beside it (open_clip's
``{shard_name: n}``). "Beside" is the shard's folder for local files and URLs; ``pipe:`` shards have no folder, so
their counts come from ``data.shard_sizes`` only. A shard's name is the last path component of its URL, or of the
last ``*.tar`` word of a ``pipe:`` command.
"""
from __future__ import annotations

import functools
import json
import logging
import posixpath
import re
import shlex
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence
from urllib.parse import urlsplit

log = logging.getLogger("mlmm.data")

TRUNCATED = "truncated shard"
UNREADABLE = "unreadable shard"
_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s'\"]*@)?(?P<rest>[^\s'\"?#]*)"
                  r"(?P<query>[?#][^\s'\"]*)?")
_SECRET_WORD = re.compile(r"(?i)\b([A-Z0-9_]*(?:SECRET|TOKEN|PASSWORD|PASSWD|SIGNATURE|CREDENTIAL|API_?KEY|"
                          r"ACCESS_?KEY)[A-Z0-9_]*)=(\S+)")


def redact(text: str) -> str:
    """``text`` with the secrets a URL or a shell command may carry removed: ``user:pw@`` and ``?query`` of every URL
    in it become ``***@`` / ``?***``, and words like ``AWS_SECRET_ACCESS_KEY=...`` keep only their name."""
    def url(m: re.Match) -> str:
        return m["scheme"] + ("***@" if m["userinfo"] else "") + m["rest"] + ("?***" if m["query"] else "")

    return _SECRET_WORD.sub(r"\1=***", _URL.sub(url, str(text)))


def scheme(url: str) -> str:
    """``""`` for a local path, else the URL scheme (``pipe``, ``http``, ``s3``, ...), lower case."""
    if url.startswith("pipe:"):
        return "pipe"
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", url)
    return m.group(1).lower() if m and len(m.group(1)) > 1 else ""  # "C:" is a drive letter, not a scheme


def is_local(url: str) -> bool:
    return scheme(url) in ("", "file")


def local_path(url: str) -> str:
    """``file:///x/y.tar`` -> ``/x/y.tar``; local paths unchanged."""
    return urlsplit(url).path if scheme(url) == "file" else url


def check_url(url: str, where: str) -> None:
    """Refuse shard specs webdataset cannot open, and credentials written into a URL (they belong in the
    environment, where the transfer tools read them)."""
    gopen = _gopen_module()

    _register_schemes()
    s = scheme(url)
    if s and s != "file" and s not in gopen.gopen_schemes:
        raise ValueError(f"{where}: {redact(url)!r}: unknown scheme {s!r} (webdataset opens "
                         f"{', '.join(sorted(k for k in gopen.gopen_schemes if k != '__default__'))}, local paths "
                         "and pipe:CMD)")
    for m in _URL.finditer(url):
        if m["userinfo"] and ":" in m["userinfo"]:
            raise ValueError(f"{where}: {redact(url)!r} holds a password; give credentials through the environment "
                             "of the transfer tool (AWS_*, GOOGLE_APPLICATION_CREDENTIALS, ~/.netrc with "
                             "pipe:curl -n ...), never in a config")


def shard_name(url: str) -> Optional[str]:
    """The file name a shard is known by in index.json / sizes.json (None for a pipe command naming no .tar)."""
    if scheme(url) == "pipe":
        try:
            words = shlex.split(url[len("pipe:"):])
        except ValueError:
            words = url[len("pipe:"):].split()
        tars = [w for w in words if ".tar" in w]
        return posixpath.basename(urlsplit(tars[-1]).path) if tars else None
    return posixpath.basename(urlsplit(url).path if scheme(url) else url) or None


def beside(url: str, name: str) -> Optional[str]:
    """The URL or path of file `name` in the folder of shard `url` (None for pipe: shards)."""
    s = scheme(url)
    if s == "pipe":
        return None
    if not s or s == "file":
        return str(Path(local_path(url)).parent / name)
    parts = urlsplit(url)
    return parts._replace(path=posixpath.join(posixpath.dirname(parts.path), name), query="", fragment="").geturl()


# ------------------------------------------------------------------------------------------ opening
def _gopen_module():
    """webdataset's ``gopen`` module (``webdataset.gopen`` the attribute is the function of the same name)."""
    import importlib

    return importlib.import_module("webdataset.gopen")


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    """``s3://b/k`` through the AWS CLI, the form open_clip documents (``pipe:aws s3 cp s3://b/k -``)."""
    Pipe = _gopen_module().Pipe

    if mode[0] == "r":
        return Pipe(["aws", "s3", "cp", url, "-"], mode=mode, bufsize=bufsize, ignore_status=[141])
    if mode[0] == "w":
        return Pipe(["aws", "s3", "cp", "-", url], mode=mode, bufsize=bufsize, ignore_status=[141])
    raise ValueError(f"{mode}: unknown mode")


@functools.lru_cache(maxsize=None)
def _register_schemes() -> None:
    gopen = _gopen_module()

    gopen.gopen_schemes.setdefault("s3", _gopen_s3)


def open_stream(url: str, mode: str = "rb"):
    """A binary stream of ``url`` (any form above) through webdataset's gopen."""
    gopen = _gopen_module()

    _register_schemes()
    return gopen.gopen(local_path(url), mode)


def _close(stream: Any, quiet: bool, wait: float = 0.0) -> Optional[int]:
    """Close a gopen stream; a pipe's exit status raises unless `quiet`. Quiet: a pipe still running after `wait`
    seconds is killed, and the exit status it ended with on its own is returned (None if killed or not a pipe)."""
    proc = getattr(stream, "proc", None)
    if not quiet:
        stream.close()
        return None
    status = None
    if proc is not None:
        try:
            status = proc.wait(timeout=wait) if wait else proc.poll()
        except subprocess.TimeoutExpired:
            status = None
        if status is None:
            proc.kill()
    try:
        stream.close()
    except Exception:  # noqa: BLE001 - the read already failed or was abandoned; that error is the one to report
        pass
    return status


# what the exit status of webdataset's `curl -f -s -L` means (curl's man page, EXIT CODES)
_CURL_EXIT = {6: "could not resolve the host", 7: "could not connect", 18: "transfer cut short",
              22: "HTTP error status (>= 400)", 28: "timed out", 35: "TLS handshake failed", 52: "empty reply",
              55: "send failed", 56: "connection reset"}


def _describe(error: BaseException, stream: Any, status: Optional[int]) -> str:
    """A one-line, secret-free account of a failed read."""
    text = str(error).split(" @ ")[0]  # tar_file_iterator appends " @ <stream>" (a Pipe prints its command)
    args = getattr(stream, "args", None)
    if status:
        cmd = args[0][0] if args and args[0] else None
        tool = cmd[0] if isinstance(cmd, (list, tuple)) else "pipe command"
        meaning = _CURL_EXIT.get(status, "") if tool == "curl" else ""
        text = f"{tool} exited with status {status}{f' ({meaning})' if meaning else ''}"
    elif args is not None and re.search(r"exit -?\d+", text):
        text = "pipe command " + re.search(r"exit -?\d+.*", text).group(0)
    return redact(text)[:300]


def read_json(url: str) -> Any:
    """A JSON document from a local path, URL or ``pipe:`` spec."""
    stream = open_stream(url)
    try:
        data = stream.read()
    except BaseException:
        _close(stream, quiet=True)
        raise
    _close(stream, quiet=False)
    return json.loads(data)


def _sizes_from(doc: Any) -> dict[str, int]:
    """``{name: n}`` from an mlmm index.json (``{"shards": [{"name", "n"}]}``) or an open_clip sizes.json."""
    if isinstance(doc, dict) and isinstance(doc.get("shards"), list):
        return {str(e["name"]): int(e["n"]) for e in doc["shards"]}
    if isinstance(doc, dict):
        return {str(k): int(v) for k, v in doc.items()}
    raise ValueError("expected {shard_name: n} or an index.json with a 'shards' list")


@functools.lru_cache(maxsize=256)
def _sizes_file(url: str, required: bool) -> tuple[tuple[str, int], ...]:
    """Cached ``(name, n)`` pairs of one sizes / index file; () when an optional file is absent or unreadable."""
    if is_local(url) and not Path(local_path(url)).is_file():
        if required:
            raise FileNotFoundError(f"data.shard_sizes: {url} does not exist")
        return ()
    try:
        return tuple(_sizes_from(read_json(url)).items())
    except (OSError, ValueError, KeyError, TypeError) as e:
        if required:
            raise ValueError(f"data.shard_sizes: cannot read sample counts from {redact(url)}: {redact(e)}") from e
        if not is_local(url):
            log.info("no sample counts from %s (%s)", redact(url), redact(str(e))[:200])
        return ()


# ------------------------------------------------------------------------------------------ reading
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's meta entries (skipped, as its tar_file_iterator does)


def _split_name(name: str) -> tuple[str, str]:
    """'dir/key.ext.more' -> ('dir/key', 'ext.more') — WebDataset's key/extension convention."""
    base = name.rsplit("/", 1)
    stem, _, ext = base[-1].partition(".")
    return (base[0] + "/" + stem if len(base) == 2 else stem), ext


def _samples(stream: Any, url: str) -> Iterator[dict[str, Any]]:
    """Complete samples of one open tar stream (regular members grouped by key, as webdataset's tar_file_iterator
    reads them); a sample is given out when the next one starts or the tar ends, so a stream cut mid-sample never
    yields a partial sample. tarfile stops without an error at a corrupt member header: data after the archive's end
    raises here instead (a clean tar ends in zero blocks)."""
    current: Optional[dict[str, Any]] = None
    tar = tarfile.open(fileobj=stream, mode="r|*")
    for member in tar:
        if not member.isreg() or _META.match(member.name):
            continue
        key, ext = _split_name(member.name)
        data = tar.extractfile(member).read()
        tar.members = []  # a stream: keep no member list
        if not ext:
            continue
        if current is not None and current["__key__"] != key:
            yield current
            current = None
        if current is None:
            current = {"__key__": key, "__url__": url}
        current[ext.lower()] = data
    while chunk := tar.fileobj.read(1 << 16):  # the rest of tarfile's buffer, then of the stream
        if chunk.strip(b"\0"):
            raise tarfile.ReadError(f"unreadable tar header near byte {tar.offset} (the rest of the shard is lost)")
    if current is not None:
        yield current


class ShardReader:
    """Opens shards of any form, reads them with retries, and knows their sample counts (see the module doc)."""

    def __init__(self, retries: int = 3, backoff: float = 1.0, sizes: Optional[str] = None):
        self.retries, self.backoff, self.sizes = int(retries), float(backoff), sizes or None

    @classmethod
    def from_config(cls, data_cfg: Any) -> "ShardReader":
        return cls(getattr(data_cfg, "io_retries", 3), getattr(data_cfg, "io_backoff", 1.0),
                   getattr(data_cfg, "shard_sizes", None))

    def counts(self, shards: Sequence[str]) -> list[Optional[int]]:
        """Samples per shard (None when no source knows it)."""
        given = dict(_sizes_file(self.sizes, True)) if self.sizes else {}
        out: list[Optional[int]] = []
        for s in shards:
            name = shard_name(s)
            n = given.get(name) if name else None
            for file in ("index.json", "sizes.json"):
                where = beside(s, file) if n is None and name else None
                if where is not None:
                    n = dict(_sizes_file(where, False)).get(name)
            out.append(n)
        return out

    def read(self, url: str, expected: Optional[int] = None) -> Iterator[dict[str, Any]]:
        """Raw samples of shard `url` in order; a shard that cannot be read ends with one ``__error__`` marker."""
        local, seen, attempt = is_local(url), 0, 0
        while True:
            got, stream, status = 0, None, None  # got: samples of this attempt, incl. the `seen` ones dropped again
            try:
                stream = open_stream(url)
                try:
                    for raw in _samples(stream, url):
                        got += 1
                        if got > seen:  # a retry drops what an earlier attempt already gave out
                            seen += 1
                            yield raw
                except GeneratorExit:  # the caller stopped reading: stop the transfer
                    _close(stream, quiet=True)
                    raise
                except BaseException:  # the stream failed: a pipe about to exit tells why with its status
                    status = _close(stream, quiet=True, wait=1.0)
                    raise
                _close(stream, quiet=False)  # a pipe's exit status raises here
                if expected is not None and seen > expected:
                    raise RuntimeError(f"shard {redact(url)} holds more than the {expected} samples its sample count "
                                       "says (index.json / sizes.json / data.shard_sizes is stale)")
                if expected is not None and seen < expected:
                    raise EOFError(f"the tar ended after {seen} of its {expected} samples")
                return
            except (OSError, EOFError, tarfile.TarError, ValueError) as e:
                error, why = e, _describe(e, stream, status)
            corrupt = local and not isinstance(error, OSError)  # same bytes on every read: no retry
            if corrupt or attempt >= self.retries:
                tries = f" (after {attempt + 1} attempts)" if attempt else ""
                yield {"__error__": f"{TRUNCATED if corrupt else UNREADABLE}: {shard_name(url) or redact(url)}: "
                                    f"{why}{tries}", "__url__": url}
                return
            attempt += 1
            delay = self.backoff * 2 ** (attempt - 1)
            log.warning("reading %s failed after %d samples: %s; retry %d of %d in %.1f s", redact(url), seen, why,
                        attempt, self.retries, delay)
            time.sleep(delay)
