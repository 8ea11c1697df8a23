"""Hamming search vs float search: speed at 1M items, and recall on a trained tiny hashing model.

    python -m benchmarks.hashing_search --export runs/tiny_hashing/export        # ~3-5 min on 2 cores
    python -m benchmarks.hashing_search --n 100000 --queries 200                  # quick look

    python -m benchmarks.hashing_search --reps 3 --max-load 1.5                   # the figures in docs/hashing.md

Part 1 (speed): N database items as 64-bit codes (packed, 8 bytes each) vs as 512-d float32 embeddings
(2 KB each), Q queries, top-10:
  * Hamming, exact: mlmm's native blocked-popcount kernel (``mlmm.search.kernel``), faiss ``IndexBinaryFlat``,
    and the pure-torch popcount fallback (timed on a subset of the queries: it is the slow, dependency-free path);
  * Hamming, not exact (levers, reported beside and never in the ratio): faiss ``IndexBinaryMultiHash``
    (multi-index hashing; the share of queries whose top-k distances are exact is recorded) and, with
    ``--hnsw``, ``IndexBinaryHNSW``;
  * float, exact: faiss ``IndexFlatIP`` (BLAS) and torch matmul + top-k (cosine on L2-normalised rows).
  Every method is timed once per repetition, in turn (``--reps``, interleaved), and the median is reported;
  ``--max-load`` waits for a quiet machine before each timing and the load seen is recorded. The speed-up is the
  fastest exact Hamming search over the fastest exact float search. All exact Hamming methods are checked to
  return the same distances (native and torch: the same ids too). Single-query latency: ``--latency-queries``
  queries one at a time, methods interleaved, median in ms.
Part 2 (quality, needs ``--export`` of a model with a hash head, e.g. ``recipes/configs/tiny_hashing.yaml``):
  generated held-out images form the database (hash codes + float embeddings from the same model), captions in
  en/de/fr are the queries. Reported: k-recall@10 of Hamming top-10 against the float top-10 (neighbour
  overlap), the same after Hamming top-100 -> float re-rank, and the retrieval quality of each (P@10 with
  class relevance, i.e. same colour and shape) relative to float search.
Writes ``benchmarks/results/hashing_search.json`` with the date and machine info (incl. the load average:
numbers measured on a busy machine are slower).
"""
from __future__ import annotations

import argparse
import datetime
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_common import LOAD_LOG, machine_info, wait_quiet
from mlmm.search import (FloatIndex, HammingIndex, cosine_topk, faiss_available, hamming_topk,
                         native_available, native_status, pack_codes, recall_at_k, rerank)

REPO = Path(__file__).resolve().parents[1]


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t, out


# ------------------------------------------------------------------------------------------ part 1
def _median(xs):
    return statistics.median(xs)


def speed(n: int, queries: int, bits: int, dim: int, k: int, torch_queries: int, hnsw: bool, reps: int = 3,
          max_load: float | None = None, latency_queries: int = 50, multihash: bool = True) -> dict:
    g = torch.Generator().manual_seed(0)
    print(f"[speed] database: {n:,} x {bits}-bit codes ({n * bits // 8 / 2**20:.0f} MiB) vs {n:,} x {dim} float32 "
          f"({n * dim * 4 / 2**30:.2f} GiB); {queries} queries, top-{k}; {reps} interleaved repetitions", flush=True)
    codes = torch.randint(0, 256, (n, bits // 8), dtype=torch.uint8, generator=g)
    q_codes = torch.randint(0, 256, (queries, bits // 8), dtype=torch.uint8, generator=g)
    fl_torch = FloatIndex(dim, backend="torch").add(torch.randn(n, dim, generator=g))  # rows L2-normalised
    q_emb = torch.nn.functional.normalize(torch.randn(queries, dim, generator=g), dim=1)
    tq, fq = min(torch_queries, queries), min(max(torch_queries, 256), queries)
    # name -> (kind, exact, queries timed, search function); every one is timed once per repetition, in turn
    methods: dict[str, tuple] = {}
    native = HammingIndex(bits, backend="native").add(codes) if native_available() else None
    if native is not None:
        methods[f"hamming mlmm native kernel ({native_status()})"] = ("hamming", True, queries,
                                                                      lambda qs: native.search(qs, k))
    else:
        print(f"  native kernel {native_status()}: not timed", flush=True)
    if faiss_available():
        import faiss

        fb = HammingIndex(bits, backend="faiss").add(codes)
        methods["hamming faiss IndexBinaryFlat"] = ("hamming", True, queries, lambda qs: fb.search(qs, k))
        if multihash:  # multi-index hashing: 8 tables of 8-bit substrings, 1 flipped bit each (exact to radius 15)
            mih = faiss.IndexBinaryMultiHash(bits, bits // 8, 8)
            mih.nflip = 1
            mih.add(codes.numpy())
            methods["hamming faiss IndexBinaryMultiHash(8 x 8 bits, nflip=1)"] = (
                "hamming-approx", False, queries, lambda qs: tuple(map(torch.from_numpy, mih.search(qs.numpy(), k))))
        if hnsw:
            h = HammingIndex(bits, kind="hnsw", backend="faiss", hnsw_m=16, ef_search=64)
            timed(h.add, codes)
            methods["hamming faiss IndexBinaryHNSW(M=16,ef=64)"] = ("hamming-approx", False, queries,
                                                                   lambda qs: h.search(qs, k))
        ff = faiss.IndexFlatIP(dim)  # the same normalised rows (FloatIndex would keep a second 2 GiB copy)
        ff.add(fl_torch.vectors.numpy())
        methods["float faiss IndexFlatIP"] = ("float", True, queries,
                                              lambda qs: tuple(map(torch.from_numpy, ff.search(qs.numpy(), k))))
    methods["hamming torch popcount (SWAR, fallback)"] = ("hamming", True, tq,
                                                          lambda qs: hamming_topk(qs, codes, k, 8))
    methods["float torch matmul + topk"] = ("float", True, fq, lambda qs: fl_torch.search(qs, k))

    def inputs(kind, nq):
        return (q_emb if kind == "float" else q_codes)[:nq]

    for kind, _, nq, fn in methods.values():  # warm-up (page-in, thread pools), not timed
        fn(inputs(kind, min(nq, 8)))
    times: dict[str, list] = {name: [] for name in methods}
    loads: dict[str, list] = {name: [] for name in methods}
    results = {}
    for rep in range(reps):
        for name, (kind, _, nq, fn) in methods.items():
            loads[name].append(wait_quiet(max_load, label=name))
            dt, results[name] = timed(fn, inputs(kind, nq))
            times[name].append(dt)
        print(f"  rep {rep + 1}/{reps}: " + ", ".join(f"{name.split(' (')[0]} {methods[name][2] / times[name][-1]:.0f}"
                                                     for name in methods) + " q/s", flush=True)
    rows = []
    for name, (kind, exact, nq, _) in methods.items():
        sec = _median(times[name])
        rows.append({"method": name, "kind": kind, "exact": exact, "queries": nq, "seconds": sec,
                     "queries_per_s": nq / sec, "seconds_all": times[name], "load_1m_all": loads[name]})
        print(f"  {name:58s} {nq / sec:12.1f} q/s  (median of {reps}: {nq} queries in {sec:.3f} s)", flush=True)
    # exactness: every exact Hamming method has the same distances; native and torch also the same ids (ties)
    ham = [name for name, m in methods.items() if m[0] == "hamming"]
    ref_d = results[ham[0]][0]
    for name in ham:
        d = results[name][0]
        assert torch.equal(d.to(torch.int32), ref_d[:len(d)].to(torch.int32)), f"{name}: distances differ"
    if native is not None:
        name = next(n for n in ham if "torch" in n)
        assert torch.equal(results[name][1], results[ham[0]][1][:tq]), "native and torch ids differ"
    for row in rows:
        if row["kind"] == "hamming-approx":
            d = results[row["method"]][0].to(torch.int32)
            row["queries_with_exact_distances"] = float((d == ref_d).all(1).float().mean())
    best = {kind: max((r for r in rows if r["kind"] == kind), key=lambda r: r["queries_per_s"])
            for kind in ("hamming", "float")}
    ratio = best["hamming"]["queries_per_s"] / best["float"]["queries_per_s"]
    print(f"  speed-up: {best['hamming']['method']} / {best['float']['method']} = {ratio:.1f}x", flush=True)
    out = {"n": n, "bits": bits, "dim": dim, "queries": queries, "k": k, "reps": reps, "max_load": max_load,
           "rows": rows, "best_hamming": best["hamming"]["method"], "best_float": best["float"]["method"],
           "speedup": ratio, "memory_bytes": {"codes": n * bits // 8, "float": n * dim * 4}}
    faiss_row = next((r for r in rows if r["method"] == "hamming faiss IndexBinaryFlat"), None)
    if native is not None and faiss_row is not None:
        out["native_over_faiss_binary"] = rows[0]["queries_per_s"] / faiss_row["queries_per_s"]
    out["latency"] = latency({name: m for name, m in methods.items() if m[1] and m[2] == queries}, inputs,
                             latency_queries, max_load)
    return out


def latency(methods: dict, inputs, n_single: int, max_load: float | None) -> dict:
    """Single-query latency: ``n_single`` queries one at a time, the methods interleaved per query; median ms."""
    if n_single < 1:
        return {}
    ms: dict[str, list] = {name: [] for name in methods}
    load = wait_quiet(max_load, label="latency")
    for j in range(n_single):
        for name, (kind, _, _, fn) in methods.items():
            x = inputs(kind, j + 1)[j:j + 1]
            dt, _ = timed(fn, x)
            ms[name].append(1000 * dt)
    out = {"queries": n_single, "load_1m": load,
           "median_ms": {name: _median(v) for name, v in ms.items()}}
    for name, v in out["median_ms"].items():
        print(f"  single query: {name:58s} {v:9.2f} ms (median of {n_single})", flush=True)
    return out


# ------------------------------------------------------------------------------------------ part 2
def quality(export: str, n_items: int, queries: int, k: int, candidates: int, seed: int) -> dict:
    from mlmm.synthetic.shapes import generate
    from mlmm.data.preprocess import Preprocessor, load_eval_items
    from mlmm.evaluation.hashing import encode_media_codes, encode_text_codes, find_hash_head
    from mlmm.hub import from_pretrained

    model = from_pretrained(export)
    head = find_hash_head(model)
    with tempfile.TemporaryDirectory() as tmp:
        from mlmm.data.write_shards import write_shards

        print(f"[quality] generating {n_items} held-out images (seed {seed}) ...", flush=True)
        generate(Path(tmp) / "gen", n_images=n_items, n_videos=0, n_audio=0,
                 size=model.cfg.image.image_size, seed=seed, progress=False)
        write_shards(Path(tmp) / "gen" / "manifest.jsonl", Path(tmp) / "shards", shard_size=1000, progress=False)
        items = load_eval_items(str(Path(tmp) / "shards"), Preprocessor(model.cfg, model.tokenizer, train=False),
                                ["image"])
    x_codes, x_emb = encode_media_codes(model, head, "image", items["image"]["data"])
    labels = [frozenset(items["meta"][int(i)]["labels"]) for i in items["image"]["items"]]
    rng = random.Random(seed)
    picks = [rng.randrange(len(labels)) for _ in range(queries)]
    texts, q_labels = [], []
    for p in picks:
        caps = items["meta"][int(items["image"]["items"][p])]["captions"]
        lang = rng.choice(sorted(caps))
        texts.append(rng.choice(caps[lang]))
        q_labels.append(labels[p])
    t_codes, t_emb = encode_text_codes(model, head, texts)
    db_packed, q_packed = pack_codes(x_codes), pack_codes(t_codes)
    hidx = HammingIndex(head.bits).add(db_packed)
    _, float_ids = cosine_topk(t_emb, x_emb, k)
    _, ham_ids = hidx.search(q_packed, k)
    _, cand = hidx.search(q_packed, candidates)
    _, rr_ids = rerank(t_emb, x_emb, cand, k)

    def precision(ids):  # class relevance: same colour and shape
        return sum(sum(labels[j] == q_labels[r] for j in row.tolist()) for r, row in enumerate(ids)) / ids.numel()

    p_float, p_ham, p_rr = precision(float_ids), precision(ham_ids), precision(rr_ids)
    out = {"export": str(export), "bits": head.bits, "database": len(labels), "queries": queries, "k": k,
           "candidates": candidates, "languages": sorted({lang for lang in items["captions"]}),
           "knn_recall@10_hamming": recall_at_k(ham_ids, float_ids, k),
           "knn_recall@10_hamming_rerank": recall_at_k(rr_ids, float_ids, k),
           "P@10_float": p_float, "P@10_hamming": p_ham, "P@10_hamming_rerank": p_rr,
           "P@10_ratio_hamming_vs_float": p_ham / max(p_float, 1e-12),
           "P@10_ratio_rerank_vs_float": p_rr / max(p_float, 1e-12),
           "P@10_chance": sum(sum(lab == q for lab in labels) for q in q_labels) / (len(q_labels) * len(labels))}
    # ITQ codes of the same float embeddings: neighbour-preserving (not semantic) codes for speeding up float search
    from mlmm.search.itq import ITQ

    out["itq"] = []
    for bits in (32, 64, 128):  # at most the embedding width
        if bits > min(x_emb.shape):
            continue
        itq = ITQ(bits=bits).fit(x_emb)
        iidx = HammingIndex(bits).add(pack_codes(itq.encode(x_emb)))
        q_itq = pack_codes(itq.encode(t_emb))
        _, i_ids = iidx.search(q_itq, k)
        row = {"bits": bits, f"knn_recall@{k}_hamming": recall_at_k(i_ids, float_ids, k)}
        for c in (candidates, 4 * candidates):
            _, i_cand = iidx.search(q_itq, c)
            _, i_rr = rerank(t_emb, x_emb, i_cand, k)
            row[f"knn_recall@{k}_rerank_top{c}"] = recall_at_k(i_rr, float_ids, k)
            row[f"P@{k}_rerank_top{c}"] = precision(i_rr)
        out["itq"].append(row)
        print(f"  ITQ {bits} bits on the float embeddings: k-recall@{k} " + ", ".join(
            f"{key.split('_', 1)[1]} {v:.3f}" for key, v in row.items() if key.startswith("knn")), flush=True)
    print(f"  k-recall@{k} vs float top-{k}: Hamming {out['knn_recall@10_hamming']:.3f}, "
          f"Hamming top-{candidates} + re-rank {out['knn_recall@10_hamming_rerank']:.3f}")
    print(f"  P@{k} (same class): float {p_float:.3f}, Hamming {p_ham:.3f} "
          f"({out['P@10_ratio_hamming_vs_float']:.2f}x), re-rank {p_rr:.3f} "
          f"({out['P@10_ratio_rerank_vs_float']:.2f}x), "
          f"chance {out['P@10_chance']:.3f}", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--bits", type=int, default=64)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--torch-queries", type=int, default=32, help="queries timed for the torch popcount fallback")
    ap.add_argument("--hnsw", action="store_true", help="also build and time a faiss IndexBinaryHNSW (slow to build)")
    ap.add_argument("--no-multihash", action="store_true", help="skip faiss IndexBinaryMultiHash")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions; the median is reported")
    ap.add_argument("--max-load", type=float, default=None,
                    help="before every timed repetition wait until the 1-minute load average is below this")
    ap.add_argument("--latency-queries", type=int, default=50, help="single queries timed one at a time")
    ap.add_argument("--export", default=None, help="export folder of a model with a hash head (part 2)")
    ap.add_argument("--items", type=int, default=3000, help="part 2: held-out database images")
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "hashing_search.json"))
    ap.add_argument("--skip-speed", action="store_true",
                    help="only part 2; keep the speed results already in --out (recorded as such)")
    args = ap.parse_args(argv)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info(), "command": " ".join(sys.argv)}
    print(f"machine: {result['machine']}", flush=True)
    if args.skip_speed:
        previous = json.loads(Path(args.out).read_text())
        result["speed"] = previous["speed"]
        result["speed_measured"] = {"date": previous["date"], "machine": previous["machine"],
                                    "command": previous.get("command", "")}
    else:
        result["speed"] = speed(args.n, args.queries, args.bits, args.dim, args.k, args.torch_queries, args.hnsw,
                                args.reps, args.max_load, args.latency_queries, not args.no_multihash)
    if args.export:
        result["quality"] = quality(args.export, args.items, args.queries, args.k, args.candidates, seed=11)
    elif Path(args.out).is_file() and "quality" in (previous := json.loads(Path(args.out).read_text())):
        result["quality"] = previous["quality"]  # part 2 not re-run: keep it, with when and where it was measured
        result["quality_measured"] = previous.get("quality_measured") or {
            "date": previous["date"], "machine": previous["machine"], "command": previous.get("command", "")}
    result["load_log"] = list(LOAD_LOG)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    s = result["speed"]
    print("\n| method | queries/s |\n|---|---:|")
    for r in s["rows"]:
        print(f"| {r['method']} | {r['queries_per_s']:.1f} |")
    print(f"\nspeed-up (best Hamming / best float): {s['speedup']:.1f}x  ->  {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
