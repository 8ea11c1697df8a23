"""mlmm.search.kernel: the native blocked-popcount Hamming k-NN is exact (against torch and faiss), orders ties by
index on every code path, and falls back with a one-line warning when it cannot be built."""
import logging
import os
import stat
import time

import numpy as np
import pytest
import torch

from mlmm.search import HammingIndex, faiss_available, hamming_topk, kernel
from mlmm.search.index import _resolve_hamming_backend

needs_native = pytest.mark.skipif(not kernel.native_available(), reason=f"native kernel {kernel.native_status()}")
needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss-cpu not installed")
IMPLS = ["portable", pytest.param("avx512", marks=pytest.mark.skipif(
    not kernel.native_available() or not kernel.native_status().startswith("avx512"),
    reason="CPU without AVX-512 VPOPCNTDQ"))]


def tied_codes(g, n, nbytes, pool=12):
    """Codes drawn from a small pool (many exact distance ties), every third row random."""
    base = torch.randint(0, 256, (pool, nbytes), dtype=torch.uint8, generator=g)
    db = base[torch.randint(0, pool, (n,), generator=g)]
    db[::3] = torch.randint(0, 256, (len(db[::3]), nbytes), dtype=torch.uint8, generator=g)
    return db


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """A kernel module state rebuilt from scratch in a private cache; restored afterwards."""
    monkeypatch.setenv("MLMM_CACHE", str(tmp_path / "cache"))
    kernel._reset_for_tests()
    monkeypatch.setattr("mlmm.search.index._warned_native", False)
    yield
    kernel._reset_for_tests()


@needs_native
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bits", [8, 24, 64, 72, 256])
def test_native_topk_equals_torch_including_ties(impl, bits, monkeypatch):
    monkeypatch.setattr(kernel, "SMALL_WORK", 0)  # thread even these tiny problems: every split path runs
    g = torch.Generator().manual_seed(bits)
    for n in (5, 203):  # fewer codes than k, and a last group of 3 codes (203 = 25 * 8 + 3)
        db, q = tied_codes(g, n, bits // 8), torch.randint(0, 256, (11, bits // 8), dtype=torch.uint8, generator=g)
        for k in (1, 7, n):
            ref_d, ref_i = hamming_topk(q, db, k)
            # threads=1: one call; 2 with 11 queries: the queries are split; 3 with 1-2 queries: the database is
            for threads, rows in ((1, 11), (2, 11), (3, 1), (3, 2)):
                d, i = kernel.native_hamming_topk(q[:rows], db, k, threads=threads, impl=impl)
                assert d.dtype == torch.int32 and i.dtype == torch.int64
                assert torch.equal(d, ref_d[:rows]) and torch.equal(i, ref_i[:rows]), (n, k, threads, rows)


@needs_native
@needs_faiss
@pytest.mark.parametrize("bits", [32, 64, 128])
def test_native_index_matches_faiss_flat(bits):
    """Same distances as faiss IndexBinaryFlat; same ids except where faiss picks another among equal distances."""
    import faiss

    g = torch.Generator().manual_seed(bits + 1)
    db, q = tied_codes(g, 5000, bits // 8, pool=200), torch.randint(0, 256, (37, bits // 8), dtype=torch.uint8,
                                                                   generator=g)
    native = HammingIndex(bits, backend="native").add(db[:1999]).add(db[1999:])
    fa = faiss.IndexBinaryFlat(bits)
    fa.add(db.numpy())
    fd, fi = fa.search(q.numpy(), 20)
    d, i = native.search(q, 20)
    assert torch.equal(d, torch.from_numpy(fd))
    true = kernel.native_hamming_topk(q, db, len(db))  # every distance, sorted: the reference ranking
    dist_of = torch.empty(37, len(db), dtype=torch.int32).scatter_(1, true[1], true[0])
    assert torch.equal(torch.gather(dist_of, 1, torch.from_numpy(fi)), d)  # faiss' ids are at those distances
    for r in range(37):  # and below the k-th distance both hold the same ids
        inner = d[r] < d[r, -1]
        assert set(i[r][inner].tolist()) == set(fi[r][inner.numpy()].tolist())
    assert torch.equal(i, hamming_topk(q, db, 20)[1])  # while native == torch exactly, ties included


@needs_native
def test_index_auto_uses_native_and_round_trips(tmp_path):
    g = torch.Generator().manual_seed(7)
    db, q = tied_codes(g, 300, 8), torch.randint(0, 256, (9, 8), dtype=torch.uint8, generator=g)
    index = HammingIndex(64).add(db)
    assert index.backend == "native"
    d, i = index.search(q, 310)  # k > N: (bits + 1, -1) slots, as for the other backends
    td, ti = HammingIndex(64, backend="torch").add(db).search(q, 310)
    assert torch.equal(d, td) and torch.equal(i, ti)
    assert (i[:, 300:] == -1).all() and (d[:, 300:] == 65).all()
    index.add(q)  # the grouped layout is rebuilt after add
    assert torch.equal(index.search(q, 1)[0], torch.zeros(9, 1, dtype=torch.int32))
    again = HammingIndex.load(index.save(tmp_path / "db.hidx"))
    assert again.backend == "native" and torch.equal(again.search(q, 12)[1], index.search(q, 12)[1])


def test_missing_compiler_warns_once_and_falls_back_exactly(fresh_kernel, monkeypatch, caplog):
    monkeypatch.setenv("CC", "/nonexistent/mlmm-cc")
    assert not kernel.native_available()
    assert "no C compiler" in kernel.native_status() and "/nonexistent/mlmm-cc" in kernel.native_status()
    g = torch.Generator().manual_seed(8)
    db, q = tied_codes(g, 100, 8), torch.randint(0, 256, (4, 8), dtype=torch.uint8, generator=g)
    with caplog.at_level(logging.WARNING, logger="mlmm"):
        a = HammingIndex(64).add(db)
        b = HammingIndex(64).add(db)
    warnings = [r.getMessage() for r in caplog.records if "native Hamming kernel" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0] and "no C compiler" in warnings[0]
    assert a.backend == b.backend == ("faiss" if faiss_available() else "torch")
    assert torch.equal(a.search(q, 5)[0], hamming_topk(q, db, 5)[0])
    with pytest.raises(RuntimeError, match="backend='native'.*no C compiler"):
        HammingIndex(64, backend="native")


def test_failed_build_is_reported_and_disabling_is_silent(fresh_kernel, monkeypatch, tmp_path, caplog):
    bad_cc = tmp_path / "bad-cc"
    bad_cc.write_text("#!/bin/sh\n[ \"$1\" = --version ] && exit 0\necho 'bad-cc: broken toolchain' >&2\nexit 3\n")
    bad_cc.chmod(bad_cc.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(bad_cc))
    assert not kernel.native_available()
    assert "exit 3" in kernel.native_status() and "broken toolchain" in kernel.native_status()
    leftovers = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert leftovers == []  # no half-written library left to be loaded later
    kernel._reset_for_tests()
    monkeypatch.setenv("MLMM_NATIVE_KERNELS", "0")
    with caplog.at_level(logging.WARNING, logger="mlmm"):
        backend = _resolve_hamming_backend("auto", "flat")
    assert backend in ("faiss", "torch") and not caplog.records


@needs_native
def test_build_is_cached_by_source_and_compiler(fresh_kernel, tmp_path):
    assert kernel.native_available()
    built = list((tmp_path / "cache" / "kernels").iterdir())
    assert len(built) == 1 and built[0].name.startswith("hamming-") and built[0].suffix == ".so"
    mtime = os.stat(built[0]).st_mtime_ns
    kernel._reset_for_tests()
    assert kernel.native_available()  # second process-level load: the cached file, not a rebuild
    assert [p.name for p in (tmp_path / "cache" / "kernels").iterdir()] == [built[0].name]
    assert os.stat(built[0]).st_mtime_ns == mtime


def _search_in_child(queue, q, db):
    d, i = kernel.native_hamming_topk(q, db, 5, threads=2)
    queue.put((d.numpy(), i.numpy()))  # numpy: pickled by value (torch tensors would go through shared memory)


@needs_native
def test_threaded_search_works_in_a_forked_child(monkeypatch):
    """The thread pool is per process: a DataLoader-style fork after a threaded search must not hang."""
    import multiprocessing as mp

    monkeypatch.setattr(kernel, "SMALL_WORK", 0)
    g = torch.Generator().manual_seed(9)
    db, q = tied_codes(g, 500, 8), torch.randint(0, 256, (16, 8), dtype=torch.uint8, generator=g)
    ref = kernel.native_hamming_topk(q, db, 5, threads=2)  # creates the parent's pool
    while len(kernel._pool._threads) < 2:  # both workers exist (a forked child inherits none of them)
        kernel._pool.submit(time.sleep, 0.05)
        kernel._pool.submit(time.sleep, 0.05).result()
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_search_in_child, args=(queue, q, db))
    child.start()
    try:
        got = queue.get(timeout=60)
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
    assert np.array_equal(got[0], ref[0].numpy()) and np.array_equal(got[1], ref[1].numpy())


@needs_native
def test_group_layout_and_bad_arguments():
    packed = np.arange(9 * 3, dtype=np.uint8).reshape(9, 3)  # 24-bit codes: zero-padded to one 64-bit word
    grouped = kernel.group_codes(packed)
    assert grouped.shape == (2, 1, 8) and grouped.dtype == np.uint64
    assert grouped[1, 0, 0] == int.from_bytes(bytes(packed[8]) + b"\0" * 5, "little") and grouped[1, 0, 1] == 0
    with pytest.raises(ValueError, match="impl"):
        kernel.native_hamming_topk(torch.zeros(1, 3, dtype=torch.uint8), torch.from_numpy(packed), 2, impl="gpu")
    with pytest.raises(ValueError, match="code sizes differ"):
        kernel.native_hamming_topk(torch.zeros(1, 4, dtype=torch.uint8), torch.from_numpy(packed), 2)


@needs_native
def test_hashing_benchmark_times_every_method_and_checks_exactness(tmp_path):
    import json

    from conftest import import_benchmark

    hashing_search = import_benchmark("hashing_search")
    out = tmp_path / "hs.json"
    assert hashing_search.main(["--n", "3000", "--queries", "24", "--dim", "16", "--reps", "2", "--torch-queries", "8",
                                "--latency-queries", "2", "--out", str(out)]) == 0
    s = json.loads(out.read_text())["speed"]
    names = [r["method"] for r in s["rows"]]
    assert names[0].startswith("hamming mlmm native kernel") and "float torch matmul + topk" in names
    for r in s["rows"]:
        assert len(r["seconds_all"]) == 2 and len(r["load_1m_all"]) == 2 and r["queries_per_s"] > 0
    assert s["speedup"] > 0 and s["latency"]["median_ms"]
    assert "load_average_1m_5m_15m" in json.loads(out.read_text())["machine"]
