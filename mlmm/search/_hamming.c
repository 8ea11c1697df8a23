/* Exact Hamming k-nearest-neighbour search over binary codes: a blocked popcount kernel.
 *
 * Built at first use by mlmm/search/kernel.py (cc -O3 -shared; no -march flag: the AVX-512 code path is
 * compiled with a target attribute and chosen at run time with __builtin_cpu_supports, so one cached
 * library runs on any x86-64 CPU and on other architectures through the portable path).
 *
 * Database layout ("grouped"): codes of W 64-bit words (zero-padded) in groups of 8 codes; word w of code
 * 8g + j sits at db[(g * W + w) * 8 + j]. One 512-bit load then holds word w of 8 consecutive codes.
 * Queries are row-major, W words each, zero-padded the same way (zero bits add nothing to a XOR popcount).
 *
 * Blocking: the database is scanned in blocks of about 32 KiB; every query of the call is scored against
 * one block (kept in L1) before the next block is read, four queries per loaded vector (W = 1). So the
 * database streams from memory once per call, not once per query as in a per-query scan.
 *
 * Top-k: one binary max-heap of (distance, index) per query, filled with sentinels (sentinel_d, INT64_MAX).
 * A SIMD compare against the heap root's distance filters the 8 distances of a group; survivors go through
 * the heap. Indices grow within a call, so a later candidate at the root's distance is never better: the
 * strict compare keeps the (distance, index)-smallest k, the same order as mlmm.search.hamming_topk.
 * On return each query's k results are sorted ascending by (distance, index); unfilled slots are
 * (sentinel_d, -1).
 */
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#define MLMM_X86 1
#include <immintrin.h>
#endif

#define GROUP 8

static inline int heap_worse(int32_t da, int64_t ia, int32_t db, int64_t ib) {
    return da > db || (da == db && ia > ib);
}

/* replace the root of the max-heap (hd, hi)[0..k) by (d, i) and sift it down */
static inline void heap_replace_root(int32_t *hd, int64_t *hi, int k, int32_t d, int64_t i) {
    int pos = 0;
    for (;;) {
        int c = 2 * pos + 1;
        if (c >= k) break;
        if (c + 1 < k && heap_worse(hd[c + 1], hi[c + 1], hd[c], hi[c])) c++;
        if (!heap_worse(hd[c], hi[c], d, i)) break;
        hd[pos] = hd[c];
        hi[pos] = hi[c];
        pos = c;
    }
    hd[pos] = d;
    hi[pos] = i;
}

static void heap_sort_ascending(int32_t *hd, int64_t *hi, int k, int32_t sentinel_d) {
    for (int end = k - 1; end > 0; end--) {
        int32_t d = hd[end];
        int64_t i = hi[end];
        hd[end] = hd[0];
        hi[end] = hi[0];
        heap_replace_root(hd, hi, end, d, i);
    }
    for (int j = 0; j < k; j++)
        if (hd[j] >= sentinel_d) hi[j] = -1;
}

static void heaps_init(int32_t *out_d, int64_t *out_i, int64_t nq, int k, int32_t sentinel_d) {
    for (int64_t j = 0; j < nq * (int64_t)k; j++) {
        out_d[j] = sentinel_d;
        out_i[j] = INT64_MAX;
    }
}

/* a group's distance d of code `idx` for query heap (hd, hi); returns the heap's new threshold */
static inline int32_t offer(int32_t *hd, int64_t *hi, int k, int32_t d, int64_t idx, int64_t n) {
    if (idx < n && d < hd[0]) heap_replace_root(hd, hi, k, d, idx);
    return hd[0];
}

/* ------------------------------------------------------------------------------------------ portable */
__attribute__((always_inline))
static inline void knn_portable_body(const uint64_t *db, int64_t n, int64_t g0, int64_t g1, const uint64_t *q,
                                     int64_t nq, int W, int k, int32_t *out_d, int64_t *out_i,
                                     int64_t block_groups) {
    for (int64_t b0 = g0; b0 < g1; b0 += block_groups) {
        int64_t b1 = b0 + block_groups < g1 ? b0 + block_groups : g1;
        for (int64_t qi = 0; qi < nq; qi++) {
            const uint64_t *qw = q + qi * W;
            int32_t *hd = out_d + qi * k;
            int64_t *hi = out_i + qi * k;
            int32_t thr = hd[0];
            for (int64_t g = b0; g < b1; g++) {
                const uint64_t *base = db + g * W * GROUP;
                for (int j = 0; j < GROUP; j++) {
                    int32_t d = 0;
                    for (int w = 0; w < W; w++) d += __builtin_popcountll(base[w * GROUP + j] ^ qw[w]);
                    if (d < thr) thr = offer(hd, hi, k, d, g * GROUP + j, n);
                }
            }
        }
    }
}

static void knn_portable(const uint64_t *db, int64_t n, int64_t g0, int64_t g1, const uint64_t *q, int64_t nq,
                         int W, int k, int32_t *out_d, int64_t *out_i, int64_t block_groups) {
    knn_portable_body(db, n, g0, g1, q, nq, W, k, out_d, out_i, block_groups);
}

#if defined(MLMM_X86)
/* the same loop with the POPCNT instruction (every x86-64 CPU since about 2008; checked at run time) */
__attribute__((target("popcnt")))
static void knn_popcnt(const uint64_t *db, int64_t n, int64_t g0, int64_t g1, const uint64_t *q, int64_t nq,
                       int W, int k, int32_t *out_d, int64_t *out_i, int64_t block_groups) {
    knn_portable_body(db, n, g0, g1, q, nq, W, k, out_d, out_i, block_groups);
}
#endif

/* ------------------------------------------------------------------------------------------ AVX-512 */
#if defined(MLMM_X86)
#define AVX512 __attribute__((target("avx512f,avx512vpopcntdq")))

AVX512 static inline int32_t offer_mask(int32_t *hd, int64_t *hi, int k, __m512i dist, __mmask8 m, int64_t g,
                                        int64_t n) {
    int64_t lanes[GROUP];
    _mm512_storeu_si512((void *)lanes, dist);
    int32_t thr = hd[0];
    while (m) {
        int j = __builtin_ctz(m);
        m &= (__mmask8)(m - 1);
        if ((int32_t)lanes[j] < thr) thr = offer(hd, hi, k, (int32_t)lanes[j], g * GROUP + j, n);
    }
    return thr;
}

/* W = 1 (codes of up to 64 bits): four queries share each loaded vector of 8 codes */
AVX512 static void knn_avx512_w1(const uint64_t *db, int64_t n, int64_t g0, int64_t g1, const uint64_t *q,
                                 int64_t nq, int k, int32_t *out_d, int64_t *out_i, int64_t block_groups) {
    for (int64_t b0 = g0; b0 < g1; b0 += block_groups) {
        int64_t b1 = b0 + block_groups < g1 ? b0 + block_groups : g1;
        int64_t qi = 0;
        for (; qi + 4 <= nq; qi += 4) {
            int32_t *hd0 = out_d + qi * k, *hd1 = hd0 + k, *hd2 = hd1 + k, *hd3 = hd2 + k;
            int64_t *hi0 = out_i + qi * k, *hi1 = hi0 + k, *hi2 = hi1 + k, *hi3 = hi2 + k;
            __m512i q0 = _mm512_set1_epi64((long long)q[qi]), q1 = _mm512_set1_epi64((long long)q[qi + 1]);
            __m512i q2 = _mm512_set1_epi64((long long)q[qi + 2]), q3 = _mm512_set1_epi64((long long)q[qi + 3]);
            __m512i t0 = _mm512_set1_epi64(hd0[0]), t1 = _mm512_set1_epi64(hd1[0]);
            __m512i t2 = _mm512_set1_epi64(hd2[0]), t3 = _mm512_set1_epi64(hd3[0]);
            for (int64_t g = b0; g < b1; g++) {
                __m512i v = _mm512_loadu_si512((const void *)(db + g * GROUP));
                __m512i d0 = _mm512_popcnt_epi64(_mm512_xor_si512(v, q0));
                __m512i d1 = _mm512_popcnt_epi64(_mm512_xor_si512(v, q1));
                __m512i d2 = _mm512_popcnt_epi64(_mm512_xor_si512(v, q2));
                __m512i d3 = _mm512_popcnt_epi64(_mm512_xor_si512(v, q3));
                __mmask8 m0 = _mm512_cmplt_epi64_mask(d0, t0), m1 = _mm512_cmplt_epi64_mask(d1, t1);
                __mmask8 m2 = _mm512_cmplt_epi64_mask(d2, t2), m3 = _mm512_cmplt_epi64_mask(d3, t3);
                if (__builtin_expect((m0 | m1 | m2 | m3) != 0, 0)) {
                    if (m0) t0 = _mm512_set1_epi64(offer_mask(hd0, hi0, k, d0, m0, g, n));
                    if (m1) t1 = _mm512_set1_epi64(offer_mask(hd1, hi1, k, d1, m1, g, n));
                    if (m2) t2 = _mm512_set1_epi64(offer_mask(hd2, hi2, k, d2, m2, g, n));
                    if (m3) t3 = _mm512_set1_epi64(offer_mask(hd3, hi3, k, d3, m3, g, n));
                }
            }
        }
        for (; qi < nq; qi++) {
            int32_t *hd = out_d + qi * k;
            int64_t *hi = out_i + qi * k;
            __m512i qv = _mm512_set1_epi64((long long)q[qi]), t = _mm512_set1_epi64(hd[0]);
            for (int64_t g = b0; g < b1; g++) {
                __m512i d = _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_loadu_si512((const void *)(db + g * GROUP)), qv));
                __mmask8 m = _mm512_cmplt_epi64_mask(d, t);
                if (__builtin_expect(m != 0, 0)) t = _mm512_set1_epi64(offer_mask(hd, hi, k, d, m, g, n));
            }
        }
    }
}

/* any W: one query at a time, W loads per group (the block stays in L1 across the queries) */
AVX512 static void knn_avx512_wn(const uint64_t *db, int64_t n, int64_t g0, int64_t g1, const uint64_t *q,
                                 int64_t nq, int W, int k, int32_t *out_d, int64_t *out_i, int64_t block_groups) {
    __m512i qv[32];
    for (int64_t b0 = g0; b0 < g1; b0 += block_groups) {
        int64_t b1 = b0 + block_groups < g1 ? b0 + block_groups : g1;
        for (int64_t qi = 0; qi < nq; qi++) {
            int32_t *hd = out_d + qi * k;
            int64_t *hi = out_i + qi * k;
            const uint64_t *qw = q + qi * W;
            __m512i t = _mm512_set1_epi64(hd[0]);
            if (W <= 32) {
                for (int w = 0; w < W; w++) qv[w] = _mm512_set1_epi64((long long)qw[w]);
                for (int64_t g = b0; g < b1; g++) {
                    const uint64_t *base = db + g * W * GROUP;
                    __m512i d = _mm512_setzero_si512();
                    for (int w = 0; w < W; w++)
                        d = _mm512_add_epi64(d, _mm512_popcnt_epi64(
                                _mm512_xor_si512(_mm512_loadu_si512((const void *)(base + w * GROUP)), qv[w])));
                    __mmask8 m = _mm512_cmplt_epi64_mask(d, t);
                    if (m) t = _mm512_set1_epi64(offer_mask(hd, hi, k, d, m, g, n));
                }
            } else {
                for (int64_t g = b0; g < b1; g++) {
                    const uint64_t *base = db + g * W * GROUP;
                    __m512i d = _mm512_setzero_si512();
                    for (int w = 0; w < W; w++)
                        d = _mm512_add_epi64(d, _mm512_popcnt_epi64(_mm512_xor_si512(
                                _mm512_loadu_si512((const void *)(base + w * GROUP)),
                                _mm512_set1_epi64((long long)qw[w]))));
                    __mmask8 m = _mm512_cmplt_epi64_mask(d, t);
                    if (m) t = _mm512_set1_epi64(offer_mask(hd, hi, k, d, m, g, n));
                }
            }
        }
    }
}
#endif

/* ------------------------------------------------------------------------------------------ API */
#define IMPL_PORTABLE 1
#define IMPL_AVX512 2

/* best implementation this CPU runs */
int mlmm_hamming_best_impl(void) {
#if defined(MLMM_X86)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq")) return IMPL_AVX512;
#endif
    return IMPL_PORTABLE;
}

/* k nearest codes of each of nq queries among database codes [8 * g0, min(8 * g1, n)).
 * Returns 0 on success, -1 on bad arguments, -2 if `impl` is not runnable here. */
int mlmm_hamming_knn(const uint64_t *db, int64_t n, int64_t g0, int64_t g1, const uint64_t *q, int64_t nq, int W,
                     int k, int32_t sentinel_d, int32_t *out_d, int64_t *out_i, int impl, int64_t block_bytes) {
    if (W < 1 || k < 1 || nq < 0 || g0 < 0 || g1 < g0 || 8 * g1 > n + 7 || block_bytes < 64) return -1;
    if (impl == 0) impl = mlmm_hamming_best_impl();
    int64_t block_groups = block_bytes / (64 * (int64_t)W);
    if (block_groups < 1) block_groups = 1;
    heaps_init(out_d, out_i, nq, k, sentinel_d);
    if (impl == IMPL_AVX512) {
#if defined(MLMM_X86)
        if (mlmm_hamming_best_impl() != IMPL_AVX512) return -2;
        if (W == 1)
            knn_avx512_w1(db, n, g0, g1, q, nq, k, out_d, out_i, block_groups);
        else
            knn_avx512_wn(db, n, g0, g1, q, nq, W, k, out_d, out_i, block_groups);
#else
        return -2;
#endif
    } else if (impl == IMPL_PORTABLE) {
#if defined(MLMM_X86)
        if (__builtin_cpu_supports("popcnt"))
            knn_popcnt(db, n, g0, g1, q, nq, W, k, out_d, out_i, block_groups);
        else
#endif
            knn_portable(db, n, g0, g1, q, nq, W, k, out_d, out_i, block_groups);
    } else {
        return -1;
    }
    for (int64_t qi = 0; qi < nq; qi++) heap_sort_ascending(out_d + qi * k, out_i + qi * k, k, sentinel_d);
    return 0;
}
