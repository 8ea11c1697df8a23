"""Native blocked-popcount Hamming k-NN (``_hamming.c``), compiled on first use and loaded with ctypes.

    from mlmm.search.kernel import native_hamming_topk, native_status
    dist, ids = native_hamming_topk(q_packed, db_packed, k=10)     # exact, ordered by (distance, index)
    mlmm-hamming-kernel  (python -m mlmm.search.kernel)              # build now and print the status

Nothing is built at ``pip install``: the first call compiles ``_hamming.c`` (about a second, with the C compiler
in ``$CC``, default ``cc``) into ``$MLMM_CACHE`` (default ``~/.cache/mlmm``)/kernels, atomically, so concurrent
ranks or test workers never load a half-written file. The library carries a portable loop and an AVX-512
VPOPCNTDQ one chosen at run time, so one build serves every x86-64 CPU. When it cannot be built (no compiler,
read-only cache and temp dir) :func:`native_status` says why and ``HammingIndex(backend="auto")`` falls back to
faiss or torch with a one-line warning; ``MLMM_NATIVE_KERNELS=0`` disables it without a warning.

The search is threaded from Python (ctypes releases the GIL): many queries are split across threads, each
thread scanning the whole database for its share; few queries split the database instead and the per-thread
top-k lists are merged by (distance, index). Both give the same result as one thread.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger("mlmm")

SOURCE = Path(__file__).with_name("_hamming.c")
IMPLS = {"auto": 0, "portable": 1, "avx512": 2}
CFLAGS = ["-O3", "-std=gnu11", "-shared", "-fPIC"]
BLOCK_BYTES = 32 * 1024  # database bytes scored against every query of a call before the next block is read

SMALL_WORK = 1 << 20  # query x code pairs below which one thread answers (a thread hand-off costs more)

_lib: Optional[ctypes.CDLL] = None
_error: Optional[str] = None
_tried = False
_pool: Optional[ThreadPoolExecutor] = None
_pool_key: tuple = ()


def cache_dir() -> Path:
    root = os.environ.get("MLMM_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                        os.path.expanduser("~/.cache"), "mlmm")
    return Path(root) / "kernels"


def _compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CC", "cc"))


def _library_name(cc: str) -> str:
    """File name keyed by the source, the compiler (path + version), the flags and the platform."""
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), cc.encode(), version.encode(), " ".join(CFLAGS).encode(),
                 platform.machine().encode(), sys.platform.encode()):
        h.update(part)
        h.update(b"\0")
    return f"hamming-{h.hexdigest()[:16]}.so"


def _build(cc: str) -> Path:
    name = _library_name(cc)
    for folder in (cache_dir(), Path(tempfile.gettempdir()) / f"mlmm-kernels-{os.getuid()}"):
        target = folder / name
        if target.is_file():
            return target
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=name + ".", suffix=".tmp", dir=folder)
            os.close(fd)
        except OSError:
            continue
        try:
            proc = subprocess.run([cc, *CFLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                first = (proc.stderr.strip().splitlines() or ["no output"])[0]
                raise RuntimeError(f"{cc} failed (exit {proc.returncode}): {first}")
            os.replace(tmp, target)  # atomic: a concurrent reader sees the old name absent or the whole file
            return target
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError(f"no writable folder for the compiled kernel (tried {cache_dir()} and the temp dir)")


def load() -> Optional[ctypes.CDLL]:
    """The compiled library, building it on first call; None (see :func:`native_status`) when unavailable."""
    global _lib, _error, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("MLMM_NATIVE_KERNELS", "1") == "0":
        _error = "disabled by MLMM_NATIVE_KERNELS=0"
        return None
    cc = _compiler()
    if cc is None:
        _error = f"no C compiler ({os.environ.get('CC', 'cc')!r} not found; set CC or install gcc)"
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _error = f"could not build {SOURCE.name}: {e}"
        return None
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
    lib.mlmm_hamming_knn.argtypes = [ptr, i64, i64, i64, ptr, i64, ctypes.c_int, ctypes.c_int, i32, ptr, ptr,
                                     ctypes.c_int, i64]
    lib.mlmm_hamming_knn.restype = ctypes.c_int
    lib.mlmm_hamming_best_impl.restype = ctypes.c_int
    _lib = lib
    return lib


def native_available() -> bool:
    return load() is not None


def native_status() -> str:
    """One line: the implementation in use, or why the native kernel is unavailable."""
    lib = load()
    if lib is None:
        return f"unavailable: {_error}"
    return "avx512-vpopcntdq" if lib.mlmm_hamming_best_impl() == IMPLS["avx512"] else "portable (popcount loop)"


def _reset_for_tests() -> None:
    global _lib, _error, _tried
    _lib, _error, _tried = None, None, False


# ---------------------------------------------------------------------------------------------------- layout
def _words(packed: np.ndarray) -> np.ndarray:
    """Uint8[N, B] -> Uint64[N, ceil(B / 8)], zero-padded (zero bits add nothing to a XOR popcount)."""
    n, nbytes = packed.shape
    w = -(-nbytes // 8)
    if nbytes != 8 * w:
        padded = np.zeros((n, 8 * w), dtype=np.uint8)
        padded[:, :nbytes] = packed
        packed = padded
    return np.ascontiguousarray(packed).view(np.uint64).reshape(n, w)


def group_codes(packed: np.ndarray) -> np.ndarray:
    """Database Uint8[N, B] -> the kernel's grouped layout Uint64[ceil(N / 8), W, 8] (see ``_hamming.c``)."""
    words = _words(packed)
    n, w = words.shape
    groups = -(-n // 8)
    if n != 8 * groups:
        words = np.concatenate([words, np.zeros((8 * groups - n, w), dtype=np.uint64)])
    return np.ascontiguousarray(words.reshape(groups, 8, w).transpose(0, 2, 1))


# ---------------------------------------------------------------------------------------------------- search
def _threads_map(fn, count: int) -> list:
    """``[fn(0), ..., fn(count - 1)]`` on a process-wide thread pool (rebuilt after a fork or a size change)."""
    global _pool, _pool_key
    key = (os.getpid(), count)
    if _pool is None or _pool_key != key:
        if _pool is not None and _pool_key[0] == os.getpid():
            _pool.shutdown(wait=False)
        _pool, _pool_key = ThreadPoolExecutor(count, thread_name_prefix="mlmm-hamming"), key
    return list(_pool.map(fn, range(count)))


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def _knn_call(lib, grouped: np.ndarray, n: int, g0: int, g1: int, q: np.ndarray, k: int, sentinel: int, impl: int,
              block_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    nq, w = q.shape
    d = np.empty((nq, k), dtype=np.int32)
    i = np.empty((nq, k), dtype=np.int64)
    rc = lib.mlmm_hamming_knn(_ptr(grouped), n, g0, g1, _ptr(q), nq, w, k, sentinel, _ptr(d), _ptr(i), impl,
                              block_bytes)
    if rc == -2:
        raise RuntimeError("this CPU cannot run the requested Hamming kernel (impl='avx512' needs AVX-512 VPOPCNTDQ)")
    if rc != 0:
        raise ValueError(f"mlmm_hamming_knn rejected its arguments (rc {rc})")
    return d, i


def grouped_knn(grouped: np.ndarray, n: int, queries: np.ndarray, k: int, bits: int, threads: Optional[int] = None,
                impl: str = "auto", block_bytes: int = BLOCK_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """k-NN of Uint8[Q, B] queries over a :func:`group_codes` database of n codes -> (Int32[Q, k], Int64[Q, k]).

    Ordered by (distance, index); slots beyond n are (bits + 1, -1). ``threads`` defaults to torch's.
    """
    lib = load()
    if lib is None:
        raise RuntimeError(f"native Hamming kernel {native_status()}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {sorted(IMPLS)}, got {impl!r}")
    q = _words(np.ascontiguousarray(queries, dtype=np.uint8))
    if q.shape[1] != grouped.shape[1]:
        raise ValueError(f"queries have {q.shape[1]} 64-bit words, the database {grouped.shape[1]}")
    groups = grouped.shape[0]
    threads = max(1, int(threads or torch.get_num_threads()))
    nq, sentinel, code = q.shape[0], bits + 1, IMPLS[impl]
    if threads == 1 or nq * n < SMALL_WORK or (nq < 4 * threads and groups < 2 * threads):
        return _knn_call(lib, grouped, n, 0, groups, q, k, sentinel, code, block_bytes)
    if nq >= 4 * threads:  # split the queries: each thread scans the whole database for its share
        cuts = np.linspace(0, nq, threads + 1).astype(int)
        parts = _threads_map(lambda t: _knn_call(lib, grouped, n, 0, groups, q[cuts[t]:cuts[t + 1]], k, sentinel,
                                                 code, block_bytes), threads)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    # few queries: split the database, then merge the per-range top-k lists by (distance, index)
    cuts = np.linspace(0, groups, threads + 1).astype(int)
    parts = _threads_map(lambda t: _knn_call(lib, grouped, n, cuts[t], cuts[t + 1], q, k, sentinel, code,
                                             block_bytes), threads)
    d = np.concatenate([p[0] for p in parts], axis=1)  # [Q, threads * k]
    i = np.concatenate([p[1] for p in parts], axis=1)
    order = np.lexsort((np.where(i < 0, np.iinfo(np.int64).max, i), d), axis=1)[:, :k]
    return np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)


def native_hamming_topk(queries: Tensor, database: Tensor, k: int, threads: Optional[int] = None,
                        impl: str = "auto") -> tuple[Tensor, Tensor]:
    """Exact Hamming k-NN like :func:`mlmm.search.hamming_topk` (same order and ties), with the native kernel.

    queries Uint8[Q, B], database Uint8[N, B] -> (Int32[Q, min(k, N)] distances, Int64[Q, min(k, N)] ids).
    """
    from mlmm.search.codes import as_tensor_u8

    queries, database = as_tensor_u8(queries).cpu(), as_tensor_u8(database).cpu()
    if queries.shape[1] != database.shape[1]:
        raise ValueError(f"code sizes differ: queries {queries.shape[1]} bytes, database {database.shape[1]} bytes")
    n = database.shape[0]
    k = min(int(k), n)
    if k < 1:
        raise ValueError("k must be >= 1 and the database non-empty")
    d, i = grouped_knn(group_codes(database.numpy()), n, queries.numpy(), k, 8 * database.shape[1], threads, impl)
    return torch.from_numpy(d), torch.from_numpy(i)


def main(argv=None) -> int:
    """Build the kernel now (if it is not in the cache) and print its status; exit code 1 when it cannot be used."""
    import argparse

    argparse.ArgumentParser(description=main.__doc__).parse_args(argv)
    print(f"mlmm native Hamming kernel: {native_status()}")
    return 0 if native_available() else 1


if __name__ == "__main__":
    sys.exit(main())
