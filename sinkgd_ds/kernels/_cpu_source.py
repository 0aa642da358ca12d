"""C++ source of the CPU kernels (kept in a .py file so it ships with the package; built by ``sinkgd_ds.kernels``).

Plain C ABI (no torch headers): builds in about a second with g++ and is called through ctypes with
raw pointers. OpenMP comes from the libgomp that torch already loaded (same soname), so the team size
is whatever the caller passes (torch.get_num_threads()). Every loop is written so that GCC vectorises
it (``omp simd`` reductions keep IEEE semantics; no -ffast-math).
"""

SOURCE = r"""
#include <cstdint>
#include <cstring>
#include <cmath>
#include <cfloat>
#include <vector>
#include <algorithm>
#ifdef _OPENMP
#include <omp.h>
#else
static inline int omp_get_num_threads() { return 1; }
static inline int omp_get_thread_num() { return 0; }
#endif

typedef int64_t i64;

static inline float bf2f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
static inline uint16_t f2bf(float f) {  // round to nearest even, NaN stays (quiet) NaN
    uint32_t u;
    std::memcpy(&u, &f, 4);
    uint32_t nan = (u & 0x7fffffffu) > 0x7f800000u;
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)(nan ? ((u >> 16) | 0x40u) : rounded);
}
struct F32 {
    typedef float T;
    static inline float ld(const float* p, i64 j) { return p[j]; }
    static inline void st(float* p, i64 j, float v) { p[j] = v; }
};
struct BF16 {
    typedef uint16_t T;
    static inline float ld(const uint16_t* p, i64 j) { return bf2f(p[j]); }
    static inline void st(uint16_t* p, i64 j, float v) { p[j] = f2bf(v); }
};

// Same rule as backends/reference.py guarded_scale: zero sum -> 0, else target * rsqrt(sum) (NaN stays NaN, inf -> 0).
static inline float guard(float s, float target) { return s == 0.0f ? 0.0f : target * (1.0f / std::sqrt(s)); }
static inline int nonfinite(float s) { return !(std::fabs(s) <= FLT_MAX); }

// ---------------------------------------------------------------- row passes over rows [a, b) of one block
// r_i = guard(sum_j G_ij^2 c2_j); with ACC also t_j += r_i^2 G_ij^2 while the rows are in cache.
// Rows go in groups of 4 taken from 4 bands of the range (i, i+B, i+2B, i+3B): four long sequential
// streams keep more of DRAM's bandwidth busy than one, and each c2 / t load or store serves 4 rows.
template <class GT, bool ROW, bool ACC>
static void rows_pass1(const typename GT::T* G, i64 n, i64 a, i64 b, const float* __restrict c2,
                       float* __restrict t, float* __restrict r, float rt, int& bad);

// t_j += sum_k q_k G_kj^2 over four rows, columns [j0, j1)
template <class GT>
static inline void acc4(const typename GT::T* __restrict g0, const typename GT::T* __restrict g1,
                        const typename GT::T* __restrict g2, const typename GT::T* __restrict g3, float q0, float q1,
                        float q2, float q3, float* __restrict t, i64 j0, i64 j1) {
#pragma omp simd
    for (i64 j = j0; j < j1; ++j) {
        float x0 = GT::ld(g0, j), x1 = GT::ld(g1, j), x2 = GT::ld(g2, j), x3 = GT::ld(g3, j);
        t[j] += (q0 * (x0 * x0) + q1 * (x1 * x1)) + (q2 * (x2 * x2) + q3 * (x3 * x3));
    }
}

template <class GT, bool ROW, bool ACC>
static void rows_pass(const typename GT::T* G, i64 n, i64 a, i64 b, const float* __restrict c2,
                      float* __restrict t, float* __restrict r, float rt, int& bad) {
    typedef typename GT::T T;
    const i64 B = (b - a) / 4;
    for (i64 k = 0; k < B; ++k) {
        const i64 i0 = a + k, i1 = i0 + B, i2 = i1 + B, i3 = i2 + B;
        const T* __restrict g0 = G + i0 * n;
        const T* __restrict g1 = G + i1 * n;
        const T* __restrict g2 = G + i2 * n;
        const T* __restrict g3 = G + i3 * n;
        if (ROW) {
            float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
            for (i64 j = 0; j < n; ++j) {
                float w = c2[j];
                float x0 = GT::ld(g0, j), x1 = GT::ld(g1, j), x2 = GT::ld(g2, j), x3 = GT::ld(g3, j);
                s0 += x0 * x0 * w;
                s1 += x1 * x1 * w;
                s2 += x2 * x2 * w;
                s3 += x3 * x3 * w;
            }
            bad |= nonfinite(s0) | nonfinite(s1) | nonfinite(s2) | nonfinite(s3);
            r[i0] = guard(s0, rt);
            r[i1] = guard(s1, rt);
            r[i2] = guard(s2, rt);
            r[i3] = guard(s3, rt);
        }
        if (ACC) {
            const float q0 = r[i0] * r[i0], q1 = r[i1] * r[i1], q2 = r[i2] * r[i2], q3 = r[i3] * r[i3];
            // These rows are in L1 now; meanwhile ask DRAM for the next row of each band (one cache line per
            // chunk), so the memory pipe does not idle while this loop computes.
            constexpr i64 CH = 64 / (i64)sizeof(T);
            i64 j = 0;
            for (; j + CH <= n; j += CH) {
                __builtin_prefetch(g0 + n + j);
                __builtin_prefetch(g1 + n + j);
                __builtin_prefetch(g2 + n + j);
                __builtin_prefetch(g3 + n + j);
                acc4<GT>(g0, g1, g2, g3, q0, q1, q2, q3, t, j, j + CH);
            }
            acc4<GT>(g0, g1, g2, g3, q0, q1, q2, q3, t, j, n);
        }
    }
    rows_pass1<GT, ROW, ACC>(G, n, a + 4 * B, b, c2, t, r, rt, bad);  // the last (b - a) % 4 rows
}

// One row at a time (tails), the row sum with 32 independent accumulators (no FMA latency chain).
template <class GT>
static inline float row_dot(const typename GT::T* __restrict g, const float* __restrict w, i64 n) {
    float a[32] = {0.f};
    i64 j = 0;
    for (; j + 32 <= n; j += 32)
        for (int k = 0; k < 32; ++k) {
            float x = GT::ld(g, j + k);
            a[k] += x * x * w[j + k];
        }
    float s = 0.f;
    for (; j < n; ++j) {
        float x = GT::ld(g, j);
        s += x * x * w[j];
    }
    for (int k = 0; k < 16; ++k) a[k] += a[k + 16];
    for (int k = 0; k < 8; ++k) a[k] += a[k + 8];
    for (int k = 0; k < 4; ++k) a[k] += a[k + 4];
    return s + ((a[0] + a[1]) + (a[2] + a[3]));
}

template <class GT, bool ROW, bool ACC>
static void rows_pass1(const typename GT::T* G, i64 n, i64 a, i64 b, const float* __restrict c2,
                       float* __restrict t, float* __restrict r, float rt, int& bad) {
    for (i64 i = a; i < b; ++i) {
        const typename GT::T* __restrict g0 = G + i * n;
        if (ROW) {
            float s0 = row_dot<GT>(g0, c2, n);
            bad |= nonfinite(s0);
            r[i] = guard(s0, rt);
        }
        if (ACC) {
            const float q0 = r[i] * r[i];
#pragma omp simd
            for (i64 j = 0; j < n; ++j) {
                float x0 = GT::ld(g0, j);
                t[j] += q0 * (x0 * x0);
            }
        }
    }
}

template <class GT, bool ROW, bool ACC>
static void rows_pass_runs(const typename GT::T* G, i64 n, i64 lo, i64 hi, const i64* runs, i64 nruns,
                           const float* c2, float* t, float* r, float rt, int& bad) {
    for (i64 k = 0; k < nruns; ++k) {
        i64 a = std::max(lo, runs[3 * k]), b = std::min(hi, runs[3 * k + 1]), blk = runs[3 * k + 2];
        if (a < b) rows_pass<GT, ROW, ACC>(G, n, a, b, c2 + blk * n, ACC ? t + blk * n : nullptr, r, rt, bad);
    }
}

// ---------------------------------------------------------------- whole local matrix, whole schedule
// schedule: 0 = row half, 1 = col half. A row half followed by a col half is ONE pass over G.
// r (m) and c (nb x n) are outputs. Returns 1 if any sum was non-finite.
template <class GT>
static int normalize_impl(const typename GT::T* G, i64 m, i64 n, const i64* runs, i64 nruns, i64 nb,
                          const uint8_t* sched, i64 ns, float rt, const float* ct, float* r, float* c, int nt) {
    const i64 cn = nb * n;
    std::vector<float> c2((size_t)cn, 1.0f);
    for (i64 i = 0; i < m; ++i) r[i] = 1.0f;
    for (i64 k = 0; k < cn; ++k) c[k] = 1.0f;
    bool any_col = false;
    for (i64 s = 0; s < ns; ++s) any_col |= sched[s] == 1;
    if (nt < 1) nt = 1;
    if (nt > m) nt = (int)std::max<i64>(1, m);
    std::vector<float> acc(any_col ? (size_t)nt * (size_t)cn : 0);
    int bad = 0;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        const int T = omp_get_num_threads(), tid = omp_get_thread_num();
        const i64 lo = m * tid / T, hi = m * (tid + 1) / T;
        float* my = any_col ? acc.data() + (size_t)tid * cn : nullptr;
        int mybad = 0;
        for (i64 s = 0; s < ns;) {
            const bool row = sched[s] == 0;
            const bool fused = row && s + 1 < ns && sched[s + 1] == 1;
            if (row && !fused) {  // r of my rows only; nobody else reads them before the next barrier
                rows_pass_runs<GT, true, false>(G, n, lo, hi, runs, nruns, c2.data(), nullptr, r, rt, mybad);
                s += 1;
                continue;
            }
            std::fill(my, my + cn, 0.0f);
            if (fused)
                rows_pass_runs<GT, true, true>(G, n, lo, hi, runs, nruns, c2.data(), my, r, rt, mybad);
            else
                rows_pass_runs<GT, false, true>(G, n, lo, hi, runs, nruns, c2.data(), my, r, rt, mybad);
            s += fused ? 2 : 1;
#pragma omp barrier
#pragma omp for schedule(static)
            for (i64 k = 0; k < cn; ++k) {
                float sum = 0.0f;
                for (int q = 0; q < T; ++q) sum += acc[(size_t)q * cn + k];
                mybad |= nonfinite(sum);
                float v = guard(sum, ct[k / n]);
                c[k] = v;
                c2[k] = v * v;
            }
        }
        if (mybad) {
#pragma omp atomic write
            bad = 1;
        }
    }
    return bad;
}

// ---------------------------------------------------------------- partial sums of one segment (sharded layouts)
template <class GT>
static void row_partial_impl(const typename GT::T* G, i64 rows, i64 cols, const float* c2, float* out, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (i64 i = 0; i < rows; ++i) out[i] += row_dot<GT>(G + i * cols, c2, cols);
}

template <class GT>
static void col_partial_impl(const typename GT::T* G, i64 rows, i64 cols, const float* r2, float* out, int nt) {
    if (nt > rows) nt = (int)std::max<i64>(1, rows);
    std::vector<float> acc((size_t)nt * cols, 0.0f);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        const int T = omp_get_num_threads(), tid = omp_get_thread_num();
        const i64 lo = rows * tid / T, hi = rows * (tid + 1) / T;
        float* __restrict t = acc.data() + (size_t)tid * cols;
        for (i64 i = lo; i < hi; ++i) {
            const typename GT::T* __restrict g = G + i * cols;
            const float q = r2[i];
#pragma omp simd
            for (i64 j = 0; j < cols; ++j) {
                float x = GT::ld(g, j);
                t[j] += q * (x * x);
            }
        }
#pragma omp barrier
#pragma omp for schedule(static)
        for (i64 j = 0; j < cols; ++j) {
            float s = 0.f;
            for (int q = 0; q < T; ++q) s += acc[(size_t)q * cols + j];
            out[j] += s;
        }
    }
}

// ---------------------------------------------------------------- the update, fused with decoupled weight decay
// four rows, columns [j0, j1): W <- W * d - alpha * ((G * r) * c)
template <class WT, class GT>
static inline void update4(typename WT::T* __restrict w0, typename WT::T* __restrict w1, typename WT::T* __restrict w2,
                           typename WT::T* __restrict w3, const typename GT::T* __restrict g0,
                           const typename GT::T* __restrict g1, const typename GT::T* __restrict g2,
                           const typename GT::T* __restrict g3, float r0, float r1, float r2, float r3,
                           const float* __restrict c, float d, float alpha, i64 j0, i64 j1) {
#pragma omp simd
    for (i64 j = j0; j < j1; ++j) {
        const float cj = c[j];
        WT::st(w0, j, WT::ld(w0, j) * d - alpha * ((GT::ld(g0, j) * r0) * cj));
        WT::st(w1, j, WT::ld(w1, j) * d - alpha * ((GT::ld(g1, j) * r1) * cj));
        WT::st(w2, j, WT::ld(w2, j) * d - alpha * ((GT::ld(g2, j) * r2) * cj));
        WT::st(w3, j, WT::ld(w3, j) * d - alpha * ((GT::ld(g3, j) * r3) * cj));
    }
}

// W_ij <- W_ij * decay - alpha * ((G_ij * r_i) * c_j)   (decay applied only when use_decay)
template <class WT, class GT>
static void apply_impl(typename WT::T* W, const typename GT::T* G, i64 rows, i64 cols, const float* r,
                       const float* c, float decay, float alpha, int use_decay, int nt) {
    const i64 total = rows * cols;
    if (rows == 1 && nt > 1) {  // one long (partial) row: split its columns
#pragma omp parallel for num_threads(nt) schedule(static)
        for (i64 j = 0; j < total; ++j) {
            float p = WT::ld(W, j);
            if (use_decay) p *= decay;
            WT::st(W, j, p - alpha * ((GT::ld(G, j) * r[0]) * c[j]));
        }
        return;
    }
    // rows k, k+Q, k+2Q, k+3Q together: four W and four G streams (more DRAM parallelism than one of each)
    const i64 Q = rows / 4;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (i64 k = 0; k < Q + rows % 4; ++k) {
        if (k >= Q) {  // the last rows % 4 rows, one at a time
            const i64 i = 4 * Q + (k - Q);
            typename WT::T* __restrict w0 = W + i * cols;
            const typename GT::T* __restrict g0 = G + i * cols;
            const float r0 = r[i];
#pragma omp simd
            for (i64 j = 0; j < cols; ++j) {
                float p0 = WT::ld(w0, j);
                if (use_decay) p0 *= decay;
                WT::st(w0, j, p0 - alpha * ((GT::ld(g0, j) * r0) * c[j]));
            }
            continue;
        }
        typename WT::T* __restrict w0 = W + k * cols;
        typename WT::T* __restrict w1 = w0 + Q * cols;
        typename WT::T* __restrict w2 = w1 + Q * cols;
        typename WT::T* __restrict w3 = w2 + Q * cols;
        const typename GT::T* __restrict g0 = G + k * cols;
        const typename GT::T* __restrict g1 = g0 + Q * cols;
        const typename GT::T* __restrict g2 = g1 + Q * cols;
        const typename GT::T* __restrict g3 = g2 + Q * cols;
        const float r0 = r[k], r1 = r[k + Q], r2 = r[k + 2 * Q], r3 = r[k + 3 * Q];
        const float d = use_decay ? decay : 1.0f;  // x * 1.0f == x exactly
        // Non-temporal prefetches (prefetchnta, also for W: a write-intent prefetch would be a plain one) a few
        // lines ahead: on AMD Zen the lines then bypass L2/L3 on eviction, so
        // streaming W (and re-reading G) does not push the rest of G, which the normalisation just read,
        // out of L3 before this pass gets to it (measured about 5-10% faster on the whole step).
        constexpr i64 CH = 16, AHEAD = 64;
        i64 j = 0;
        for (; j + CH <= cols; j += CH) {
            __builtin_prefetch(w0 + j + AHEAD, 0, 0);
            __builtin_prefetch(w1 + j + AHEAD, 0, 0);
            __builtin_prefetch(w2 + j + AHEAD, 0, 0);
            __builtin_prefetch(w3 + j + AHEAD, 0, 0);
            __builtin_prefetch(g0 + j + AHEAD, 0, 0);
            __builtin_prefetch(g1 + j + AHEAD, 0, 0);
            __builtin_prefetch(g2 + j + AHEAD, 0, 0);
            __builtin_prefetch(g3 + j + AHEAD, 0, 0);
            update4<WT, GT>(w0, w1, w2, w3, g0, g1, g2, g3, r0, r1, r2, r3, c, d, alpha, j, j + CH);
        }
        update4<WT, GT>(w0, w1, w2, w3, g0, g1, g2, g3, r0, r1, r2, r3, c, d, alpha, j, cols);
    }
}

// ---------------------------------------------------------------- the update into bf16 with stochastic rounding
// The same functions as sinkgd_ds/rounding.py (the reference, tested bit for bit): a counter-based hash of
// (seed, step, matrix, logical element index) gives 16 random bits, added to the fp32 result's bit pattern
// before the low 16 bits are dropped. The fp32 result is (w * decay) - (alpha * u), each operation rounded
// once: these functions are compiled without contraction into fused multiply-adds (GCC's -ffp-contract=fast,
// the default for C++, would fuse them; clang contracts within an expression unless told not to).
#if defined(__clang__)
#define SK_NO_CONTRACT
#define SK_NO_CONTRACT_BODY _Pragma("clang fp contract(off)")
#elif defined(__GNUC__)
#define SK_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#define SK_NO_CONTRACT_BODY
#else
#define SK_NO_CONTRACT
#define SK_NO_CONTRACT_BODY
#endif

static inline uint32_t fmix32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    return h ^ (h >> 16);
}
static inline uint32_t stream_key(uint32_t seed, uint32_t step, uint32_t matrix) {
    return fmix32(fmix32(fmix32(seed ^ 0x9e3779b9u) ^ step) ^ matrix);
}
static inline uint32_t random16(uint32_t stream, uint64_t index) {
    uint32_t h = fmix32((uint32_t)index ^ stream);
    return fmix32(h + ((uint32_t)(index >> 32) ^ stream)) >> 16;
}
static inline uint16_t f2bf_stochastic(float f, uint32_t r16) {  // NaN -> 0x7fc0 (as torch's conversion)
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + r16) >> 16);
}

// one row (or part of one): W_j <- SR((W_j * decay) - alpha * ((G_j * r) * c_j)), element j at index0 + j
template <class GT>
SK_NO_CONTRACT static void update_row_sr(uint16_t* __restrict w, const typename GT::T* __restrict g, float r,
                                         const float* __restrict c, i64 cols, float decay, float alpha,
                                         int use_decay, uint32_t stream, uint64_t index0) {
    SK_NO_CONTRACT_BODY
    for (i64 j = 0; j < cols; ++j) {
        const float u = (GT::ld(g, j) * r) * c[j];
        const float v = alpha * u;
        float x = bf2f(w[j]);
        if (use_decay) x = x * decay;
        const float y = x - v;
        w[j] = f2bf_stochastic(y, random16(stream, index0 + (uint64_t)j));
    }
}

// a (rows x cols) segment whose element (i, j) has logical index base + i * stride + j
template <class GT>
static void apply_sr_impl(uint16_t* W, const typename GT::T* G, i64 rows, i64 cols, const float* r, const float* c,
                          float decay, float alpha, int use_decay, uint32_t stream, i64 base, i64 stride, int nt) {
    if (rows == 1 && nt > 1) {  // one long (partial) row: split its columns
        const i64 chunk = (cols + nt - 1) / nt;
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int t = 0; t < nt; ++t) {
            const i64 a = std::min<i64>(cols, (i64)t * chunk), b = std::min<i64>(cols, a + chunk);
            update_row_sr<GT>(W + a, G + a, r[0], c + a, b - a, decay, alpha, use_decay, stream,
                              (uint64_t)(base + a));
        }
        return;
    }
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (i64 i = 0; i < rows; ++i)
        update_row_sr<GT>(W + i * cols, G + i * cols, r[i], c, cols, decay, alpha, use_decay, stream,
                          (uint64_t)(base + i * stride));
}

// How every "many" entry point spreads its items (matrices or update segments) over nt threads: an item larger
// than an even share of the total runs alone on all threads (or every item does, without spread); the others
// are spread over the threads whole (dynamic), so there is no barrier inside them and one call has one
// fork/join however many items there are. size(k): elements of item k; work(k, threads): do item k.
template <class Size, class Work>
static void share_out(i64 count, int nt, int spread, bool last_first, Size size, Work work) {
    i64 total = 0;
    for (i64 k = 0; k < count; ++k) total += size(k);
    if (nt < 1) nt = 1;
    std::vector<i64> shared;
    for (i64 q = 0; q < count; ++q) {
        const i64 k = last_first ? count - 1 - q : q;
        if (nt > 1 && (!spread || size(k) * nt > total))
            work(k, nt);
        else
            shared.push_back(k);
    }
    const i64 n = (i64)shared.size();
    const int team = (int)std::max<i64>(1, std::min<i64>(nt, n));
#pragma omp parallel for schedule(dynamic, 1) num_threads(team) if (team > 1)
    for (i64 q = 0; q < n; ++q) work(shared[(size_t)q], 1);
}

// dtype codes: 0 = float32, 1 = bfloat16
extern "C" {

int sk_abi_version() { return 7; }

int sk_has_openmp() {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int sk_normalize(const void* G, int gdt, i64 m, i64 n, const i64* runs, i64 nruns, i64 nb, const uint8_t* sched,
                 i64 ns, float rt, const float* ct, float* r, float* c, int nt) {
    if (gdt == 0) return normalize_impl<F32>((const float*)G, m, n, runs, nruns, nb, sched, ns, rt, ct, r, c, nt);
    if (gdt == 1) return normalize_impl<BF16>((const uint16_t*)G, m, n, runs, nruns, nb, sched, ns, rt, ct, r, c, nt);
    return -1;
}

// Many local matrices at once. desc: count rows of 10 int64 [G ptr, dtype, m, n, first run, nruns, nb, first
// target, r ptr, c ptr]; rt: count floats; runs / ct: concatenated; spread over the threads by share_out.
// bad: count ints (1 = non-finite sums). Returns -1 on an unknown dtype.
static auto matrix_numel(const i64* desc) {
    return [desc](i64 k) { return desc[10 * k + 2] * desc[10 * k + 3]; };
}

static int normalize_one(const i64* d, const uint8_t* sched, i64 ns, float rt, const i64* runs, const float* ct,
                         int nt) {
    return sk_normalize((const void*)d[0], (int)d[1], d[2], d[3], runs + 3 * d[4], d[5], d[6], sched, ns, rt,
                        ct + d[7], (float*)d[8], (float*)d[9], nt);
}

int sk_normalize_many(i64 count, const i64* desc, const float* rt, const i64* runs, const float* ct,
                      const uint8_t* sched, i64 ns, int nt, int spread, int* bad) {
    // last matrix first: the update pass then starts on the gradients read last (still in cache)
    share_out(count, nt, spread, true, matrix_numel(desc),
              [&](i64 k, int threads) { bad[k] = normalize_one(desc + 10 * k, sched, ns, rt[k], runs, ct, threads); });
    for (i64 k = 0; k < count; ++k)
        if (bad[k] < 0) return -1;
    return 0;
}

int sk_row_partial(const void* G, int gdt, i64 rows, i64 cols, const float* c2, float* out, int nt) {
    if (gdt == 0) row_partial_impl<F32>((const float*)G, rows, cols, c2, out, nt);
    else if (gdt == 1) row_partial_impl<BF16>((const uint16_t*)G, rows, cols, c2, out, nt);
    else return -1;
    return 0;
}

int sk_col_partial(const void* G, int gdt, i64 rows, i64 cols, const float* r2, float* out, int nt) {
    if (gdt == 0) col_partial_impl<F32>((const float*)G, rows, cols, r2, out, nt);
    else if (gdt == 1) col_partial_impl<BF16>((const uint16_t*)G, rows, cols, r2, out, nt);
    else return -1;
    return 0;
}

int sk_apply(void* W, int wdt, const void* G, int gdt, i64 rows, i64 cols, const float* r, const float* c,
             float decay, float alpha, int use_decay, int nt) {
    if (wdt == 0 && gdt == 0)
        apply_impl<F32, F32>((float*)W, (const float*)G, rows, cols, r, c, decay, alpha, use_decay, nt);
    else if (wdt == 0 && gdt == 1)
        apply_impl<F32, BF16>((float*)W, (const uint16_t*)G, rows, cols, r, c, decay, alpha, use_decay, nt);
    else if (wdt == 1 && gdt == 0)
        apply_impl<BF16, F32>((uint16_t*)W, (const float*)G, rows, cols, r, c, decay, alpha, use_decay, nt);
    else if (wdt == 1 && gdt == 1)
        apply_impl<BF16, BF16>((uint16_t*)W, (const uint16_t*)G, rows, cols, r, c, decay, alpha, use_decay, nt);
    else
        return -1;
    return 0;
}

// One update segment of an apply descriptor (a row of APPLY_WIDTH int64: W ptr, W dtype, G ptr, G dtype, rows,
// cols, r ptr, c ptr, logical index of element (0, 0), logical row stride, matrix key). With ``rounding`` a bf16
// W rounds stochastically, keyed by (seed, step, matrix key, logical index); otherwise to nearest.
static const i64 APPLY_WIDTH = 11;

static int apply_segment(const i64* e, float decay, float alpha, int use_decay, int rounding, uint32_t seed,
                         uint32_t step, int threads) {
    if (rounding && e[1] == 1) {
        const uint32_t stream = stream_key(seed, step, (uint32_t)e[10]);
        if (e[3] == 0)
            apply_sr_impl<F32>((uint16_t*)e[0], (const float*)e[2], e[4], e[5], (const float*)e[6],
                               (const float*)e[7], decay, alpha, use_decay, stream, e[8], e[9], threads);
        else if (e[3] == 1)
            apply_sr_impl<BF16>((uint16_t*)e[0], (const uint16_t*)e[2], e[4], e[5], (const float*)e[6],
                                (const float*)e[7], decay, alpha, use_decay, stream, e[8], e[9], threads);
        else
            return -1;
        return 0;
    }
    return sk_apply((void*)e[0], (int)e[1], (const void*)e[2], (int)e[3], e[4], e[5], (const float*)e[6],
                    (const float*)e[7], decay, alpha, use_decay, threads);
}

// Many update segments at once. d: count rows of APPLY_WIDTH int64 (see apply_segment); spread over the threads
// by share_out, in list order. Returns -1 on an unknown dtype.
int sk_apply_many(i64 count, const i64* d, float decay, float alpha, int use_decay, int rounding, i64 seed, i64 step,
                  int nt) {
    std::vector<int> rc((size_t)count, 0);
    share_out(
        count, nt, 1, false, [&](i64 k) { return d[APPLY_WIDTH * k + 4] * d[APPLY_WIDTH * k + 5]; },
        [&](i64 k, int threads) {
            rc[(size_t)k] = apply_segment(d + APPLY_WIDTH * k, decay, alpha, use_decay, rounding, (uint32_t)seed,
                                          (uint32_t)step, threads);
        });
    for (int v : rc)
        if (v) return v;
    return 0;
}

// A whole step that nothing else can veto: sk_normalize_many, then sk_apply_many only if no matrix had non-finite
// sums, with no return to Python in between (the thread team is still awake for the second pass). Returns -1 on
// an unknown dtype, 1 when some sum was non-finite (no weight written; bad says which), 0 when applied.
int sk_step_many(i64 count, const i64* desc, const float* rt, const i64* runs, const float* ct, const uint8_t* sched,
                 i64 ns, int nt, int spread, int* bad, i64 acount, const i64* adesc, float decay, float alpha,
                 int use_decay, int rounding, i64 seed, i64 step, int ant) {
    if (sk_normalize_many(count, desc, rt, runs, ct, sched, ns, nt, spread, bad) < 0) return -1;
    for (i64 k = 0; k < count; ++k)
        if (bad[k]) return 1;
    return sk_apply_many(acount, adesc, decay, alpha, use_decay, rounding, seed, step, ant) ? -1 : 0;
}

// Per-matrix skip: each matrix is normalised and, if its own sums are finite, updated right away, while its G
// is still in cache (G is read once from DRAM). aidx: count+1 offsets into adesc (rows of APPLY_WIDTH, as
// sk_apply_many) giving matrix k's update segments; spread over the threads by share_out. Returns -1 on an
// unknown dtype, else the number of matrices left unchanged.
int sk_fused_many(i64 count, const i64* desc, const float* rt, const i64* runs, const float* ct, const uint8_t* sched,
                  i64 ns, int nt, int spread, int* bad, const i64* aidx, const i64* adesc, float decay, float alpha,
                  int use_decay, int rounding, i64 seed, i64 step) {
    int rc = 0;
    auto one = [&](i64 k, int threads) {
        bad[k] = normalize_one(desc + 10 * k, sched, ns, rt[k], runs, ct, threads);
        if (bad[k] != 0) return;
        for (i64 q = aidx[k]; q < aidx[k + 1]; ++q)
            if (apply_segment(adesc + APPLY_WIDTH * q, decay, alpha, use_decay, rounding, (uint32_t)seed,
                              (uint32_t)step, threads) != 0)
                bad[k] = -1;
    };
    share_out(count, nt, spread, false, matrix_numel(desc), one);
    for (i64 k = 0; k < count; ++k) {
        if (bad[k] < 0) return -1;
        rc += bad[k] != 0;
    }
    return rc;
}

}  // extern "C"
"""
