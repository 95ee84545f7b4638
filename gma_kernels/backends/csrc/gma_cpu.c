/* The fused GMA aggregation on CPU: one pass over every client's update, no K×N temporary.
 *
 * For the columns [lo, hi), run by run (FOLD_TILE columns, accumulators in L2: long runs per
 * row, so the hardware prefetcher streams each row), then TILE columns at a time:
 *     S_j = Σ_k p̄_k x_kj          (float32, clients in order k = 0..K-1)
 *     C_j = Σ_k a_k sign(x_kj)     (a_k = 1: an exact integer count; or a_k = p̄_k)
 *     A_j = |C_j| · scale,  keep_j = |C_j| >= threshold
 *     m_j = keep_j ? 1 : (hard ? 0 : A_j)
 * and writes g_j = m_j · S_j (or S_j and m_j apart when the mask is applied after the server
 * step), optionally A_j, and the sums of m, of A and the count of non-finite S_j; or, with
 * params, makes the server step (SGD, momentum, Adam, Yogi, Adagrad) in the same pass.
 *
 * Rows are float32, bfloat16 or float16 (converted exactly to float32 on load), each a pointer of
 * its own, so a list of tensors is read where it lies. Plain C, no Python headers: the package
 * loads it with ctypes (gma_kernels/backends/native.py), which releases the GIL during the call so
 * several threads can each take a range of columns.
 */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#ifndef TILE
#define TILE 8192
#endif

/* The entry points' arguments, mirrored field for field by the ctypes structures of
 * gma_kernels/backends/native.py: each entry point takes one of them, the column range [lo, hi)
 * of its chunk and (but the fold) where to add the chunk's results. */

/* The clients' rows: rows[k] points at element 0 of client k's update or, where rows is NULL,
 * row k starts at base + k * row_stride (a matrix: no pointer array to build per call). */
typedef struct {
    const void *const *rows;
    const char *base;
    int64_t row_stride;          /* bytes */
    int64_t num_clients;
    int32_t dtype;               /* 0 float32, 1 bfloat16, 2 float16 */
    const float *weights;        /* w_k: p̄_k for an aggregate, the raw p_k for a fold */
    const float *agree_weights;  /* a_k, or NULL: the exact unweighted sign count */
} Rows;

/* The mask from a score: A = |score|·scale, m = 1 where |score| >= threshold, else A or 0. */
typedef struct {
    float threshold, scale;
    int32_t hard;
    int32_t weighted;            /* finish: the score is C / weight_sum, not the exact count C */
} Mask;

/* The server step (kind: 0 none, 1 sgd, 2 momentum, 3 adam, 4 yogi, 5 adagrad) and what it
 * writes: params w and the states s1, s2 (NULL where the kind has none), in place. With guard,
 * each tile's old values are saved first, into the backups bw, bs1, bs2 (or, where NULL, the
 * tile's own buffers). With masks_step the pass hands the step the unmasked mean and m apart,
 * and m multiplies the step's direction. */
typedef struct {
    int32_t kind, masks_step, guard;
    float lr, momentum, beta1, one_minus_beta1, beta2, one_minus_beta2, eps;
    float *w, *s1, *s2, *bw, *bs1, *bs2;
} Step;

/* What a chunk adds up: Σ m, Σ A, the number of non-finite S_j and of columns stepped. */
typedef struct {
    double mask_sum, agreement_sum, nonfinite, stepped;
} Sums;

/* gma_cpu_aggregate: g = m·S (S alone with masks_step; g may be NULL: a tile buffer), A into
 * a_out (may be NULL), the step. */
typedef struct {
    Rows rows;
    Mask mask;
    float *g, *a_out;
    Step step;
} AggregateArgs;

/* gma_cpu_step: the step on a known x (mask, may be NULL, multiplies the direction). */
typedef struct {
    const float *x, *mask;
    Step step;
} StepArgs;

/* gma_cpu_finish: the accumulator's result from its sums S = total and C = count (only read):
 * mean = S / weight_sum and m_out = m (either may be NULL: tile buffers), and the step. */
typedef struct {
    const float *total, *count;
    float weight_sum;
    Mask mask;
    float *mean, *m_out;
    Step step;
} FinishArgs;

/* gma_cpu_fold: total += Σ_k w_k x_k, count += Σ_k a_k sign(x_k), in place. */
typedef struct {
    Rows rows;
    float *total, *count;
} FoldArgs;


#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64)) && !defined(__clang__)
#define MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MULTIVERSION
#endif

static inline float load_f32(const void *row, int64_t j) { return ((const float *)row)[j]; }

static inline float as_float(uint32_t bits) {
    float x;
    memcpy(&x, &bits, sizeof x);
    return x;
}

static inline uint32_t as_bits(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    return bits;
}

static inline float load_bf16(const void *row, int64_t j) {
    return as_float((uint32_t)((const uint16_t *)row)[j] << 16);
}

/* IEEE half to float, exact and branch-free (so it vectorizes), without float arithmetic on
 * subnormal inputs (a DAZ/FTZ mode set by another library cannot flush them): normals rebias
 * the exponent (15 -> 127), infinities and NaNs get the all-ones exponent and keep their
 * mantissa, subnormals are m · 2^-24 computed from the exact integer m. */
static inline float load_f16(const void *row, int64_t j) {
    uint32_t h = ((const uint16_t *)row)[j];
    uint32_t em = h & 0x7fffu;
    uint32_t special = -(uint32_t)(em >= 0x7c00u) & (112u << 23);
    uint32_t normal = (em << 13) + (112u << 23) + special;
    uint32_t subnormal = -(uint32_t)(em < 0x400u);
    uint32_t tiny = as_bits((float)(int32_t)em * 0x1p-24f);
    return as_float((tiny & subnormal) | (normal & ~subnormal) | ((h & 0x8000u) << 16));
}

static inline int sign_int(float x) { return (x > 0.0f) - (x < 0.0f); }

static inline float sign_float(float x) {
    return (x > 0.0f ? 1.0f : 0.0f) - (x < 0.0f ? 1.0f : 0.0f);
}

/* Fold four clients (or one, r = 1): rows[0..r), weights w[0..r) and a[0..r), into the tile's
 * sums: four rows per sweep of the tile, so the accumulators are loaded and stored once per four
 * rows; S still adds the clients in order 0, 1, ... The unweighted count is an exact int32. */
#define DEFINE_FOLD(NAME, LOAD)                                                                  \
    MULTIVERSION                                                                                 \
    static void NAME(const void *const *rows, int r, int64_t start, int len,                     \
                     const float *w, const float *a, int fresh, float *restrict total,           \
                     float *restrict fcount, int32_t *restrict icount) {                         \
        const void *r0 = rows[0], *r1 = rows[(r > 1)], *r2 = rows[2 * (r > 1)],                  \
                   *r3 = rows[3 * (r > 1)];                                                      \
        float w0 = w[0];                                                                         \
        if (r == 1 && a) {                                                                       \
            float a0 = a[0];                                                                     \
            for (int j = 0; j < len; ++j) {                                                      \
                float x0 = LOAD(r0, start + j);                                                  \
                total[j] = (fresh ? 0.0f : total[j]) + w0 * x0;                                  \
                fcount[j] = (fresh ? 0.0f : fcount[j]) + a0 * sign_float(x0);                    \
            }                                                                                    \
        } else if (r == 1) {                                                                     \
            for (int j = 0; j < len; ++j) {                                                      \
                float x0 = LOAD(r0, start + j);                                                  \
                total[j] = (fresh ? 0.0f : total[j]) + w0 * x0;                                  \
                icount[j] = (fresh ? 0 : icount[j]) + sign_int(x0);                              \
            }                                                                                    \
        } else if (a) {                                                                          \
            float w1 = w[1], w2 = w[2], w3 = w[3];                                               \
            float a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];                                    \
            for (int j = 0; j < len; ++j) {                                                      \
                float x0 = LOAD(r0, start + j), x1 = LOAD(r1, start + j);                        \
                float x2 = LOAD(r2, start + j), x3 = LOAD(r3, start + j);                        \
                total[j] = ((((fresh ? 0.0f : total[j]) + w0 * x0) + w1 * x1) + w2 * x2) + w3 * x3; \
                fcount[j] = ((((fresh ? 0.0f : fcount[j]) + a0 * sign_float(x0))                 \
                              + a1 * sign_float(x1))                                             \
                             + a2 * sign_float(x2)) + a3 * sign_float(x3);                       \
            }                                                                                    \
        } else {                                                                                 \
            float w1 = w[1], w2 = w[2], w3 = w[3];                                               \
            for (int j = 0; j < len; ++j) {                                                      \
                float x0 = LOAD(r0, start + j), x1 = LOAD(r1, start + j);                        \
                float x2 = LOAD(r2, start + j), x3 = LOAD(r3, start + j);                        \
                total[j] = ((((fresh ? 0.0f : total[j]) + w0 * x0) + w1 * x1) + w2 * x2) + w3 * x3; \
                icount[j] = (fresh ? 0 : icount[j])                                              \
                            + (sign_int(x0) + sign_int(x1) + sign_int(x2) + sign_int(x3));       \
            }                                                                                    \
        }                                                                                        \
    }

DEFINE_FOLD(fold_f32, load_f32)
DEFINE_FOLD(fold_bf16, load_bf16)
DEFINE_FOLD(fold_f16, load_f16)

/* On a CPU with AVX-512, the same folds written out 16 columns at a time (the same operations in
 * the same order, so the same sums bit for bit): GCC's own vectorization of the portable loops
 * ran the bfloat16 and float32 folds well below the read bandwidth, and a float16 takes one
 * VCVTPH2PS (exact, and unaffected by the DAZ mode) instead of a dozen integer operations. A
 * bfloat16 widens to float32 by a 16-bit shift. The last len % 16 columns go to the portable
 * fold. */
#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64)) && !defined(__clang__)
#define HAVE_FOLD_AVX512 1
#define LOAD16_F32(ROW) _mm512_loadu_ps((const float *)(ROW) + start + j)
#define LOAD16_BF16(ROW)                                                                         \
    _mm512_castsi512_ps(_mm512_slli_epi32(                                                       \
        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)(ROW) + start + j))), 16))
#define LOAD16_F16(ROW)                                                                          \
    _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)(ROW) + start + j)))
#define SIGN_F(X) _mm512_sub_ps(_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(X, zero, _CMP_GT_OQ), one), \
                                _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(X, zero, _CMP_LT_OQ), one))
#define SIGN_I(C, X)                                                                             \
    C = _mm512_mask_sub_epi32(                                                                   \
        _mm512_mask_add_epi32(C, _mm512_cmp_ps_mask(X, zero, _CMP_GT_OQ), C, ione),              \
        _mm512_cmp_ps_mask(X, zero, _CMP_LT_OQ), C, ione)
#define ADD_MUL(S, W, X) S = _mm512_add_ps(S, _mm512_mul_ps(W, X))

#define DEFINE_FOLD_AVX512(NAME, LOAD16, PORTABLE)                                               \
    __attribute__((target("avx512f"))) static void NAME(                                         \
            const void *const *rows, int r, int64_t start, int len, const float *w,              \
            const float *a, int fresh, float *restrict total, float *restrict fcount,            \
            int32_t *restrict icount) {                                                          \
        const void *r0 = rows[0], *r1 = rows[(r > 1)], *r2 = rows[2 * (r > 1)],                  \
                   *r3 = rows[3 * (r > 1)];                                                      \
        const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);                     \
        const __m512i ione = _mm512_set1_epi32(1);                                               \
        const __m512 w0 = _mm512_set1_ps(w[0]), w1 = _mm512_set1_ps(w[(r > 1)]),                 \
                     w2 = _mm512_set1_ps(w[2 * (r > 1)]),                                        \
                     w3 = _mm512_set1_ps(w[3 * (r > 1)]);                                        \
        int j = 0;                                                                               \
        for (; j + 16 <= len; j += 16) {                                                         \
            __m512 x0 = LOAD16(r0), s = fresh ? zero : _mm512_loadu_ps(total + j);               \
            ADD_MUL(s, w0, x0);                                                                  \
            if (r == 1) {                                                                        \
                _mm512_storeu_ps(total + j, s);                                                  \
                if (a) {                                                                         \
                    __m512 f = fresh ? zero : _mm512_loadu_ps(fcount + j);                       \
                    ADD_MUL(f, _mm512_set1_ps(a[0]), SIGN_F(x0));                                \
                    _mm512_storeu_ps(fcount + j, f);                                             \
                } else {                                                                         \
                    __m512i c = fresh ? _mm512_setzero_si512() : _mm512_loadu_si512(icount + j); \
                    SIGN_I(c, x0);                                                               \
                    _mm512_storeu_si512(icount + j, c);                                          \
                }                                                                                \
                continue;                                                                        \
            }                                                                                    \
            __m512 x1 = LOAD16(r1), x2 = LOAD16(r2), x3 = LOAD16(r3);                            \
            ADD_MUL(s, w1, x1);                                                                  \
            ADD_MUL(s, w2, x2);                                                                  \
            ADD_MUL(s, w3, x3);                                                                  \
            _mm512_storeu_ps(total + j, s);                                                      \
            if (a) {                                                                             \
                __m512 f = fresh ? zero : _mm512_loadu_ps(fcount + j);                           \
                ADD_MUL(f, _mm512_set1_ps(a[0]), SIGN_F(x0));                                    \
                ADD_MUL(f, _mm512_set1_ps(a[1]), SIGN_F(x1));                                    \
                ADD_MUL(f, _mm512_set1_ps(a[2]), SIGN_F(x2));                                    \
                ADD_MUL(f, _mm512_set1_ps(a[3]), SIGN_F(x3));                                    \
                _mm512_storeu_ps(fcount + j, f);                                                 \
            } else {                                                                             \
                __m512i c = fresh ? _mm512_setzero_si512() : _mm512_loadu_si512(icount + j);     \
                SIGN_I(c, x0);                                                                   \
                SIGN_I(c, x1);                                                                   \
                SIGN_I(c, x2);                                                                   \
                SIGN_I(c, x3);                                                                   \
                _mm512_storeu_si512(icount + j, c);                                              \
            }                                                                                    \
        }                                                                                        \
        if (j < len)                                                                             \
            PORTABLE(rows, r, start + j, len - j, w, a, fresh, total + j, fcount + j,            \
                     icount + j);                                                                \
    }

DEFINE_FOLD_AVX512(fold_f32_avx512, LOAD16_F32, fold_f32)
DEFINE_FOLD_AVX512(fold_bf16_avx512, LOAD16_BF16, fold_bf16)
DEFINE_FOLD_AVX512(fold_f16_avx512, LOAD16_F16, fold_f16)

static int have_avx512(void) {
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = __builtin_cpu_supports("avx512f");
    }
    return known;
}
#endif

/* Sums of m and A are float32 over runs of SUM_RUN columns, then float64: the rounding of the
 * statistics does not grow with the tile. Within a run each sum is kept in LANES partial sums
 * (column j in partial j % LANES), added up in lane order at the run's end: the same
 * order on every machine, and one that vectorizes (a single running float32 sum must add one
 * column after another, a chain of dependent additions that took as long as the whole fold
 * at small K). */
#define SUM_RUN 512
#define LANES 16

static inline float finish_column(const float *total, float *fcount, const int32_t *icount,
                                  int weighted, int j, float threshold, float scale, int hard,
                                  float *g, float *m_out, float *agree_out, float *bad_out) {
    float score = weighted ? fabsf(fcount[j]) : (float)abs(icount[j]);
    float agree = score * scale;
    int keep = score >= threshold;
    float m = keep ? 1.0f : (hard ? 0.0f : agree);
    float s = total[j];
    *bad_out = (fabsf(s) <= 3.4028234663852886e38f) ? 0.0f : 1.0f;
    *agree_out = agree;
    fcount[j] = agree;
    if (m_out) {
        m_out[j] = m;
        g[j] = s;
    } else {
        g[j] = m * s;
    }
    return m;
}

/* LANES columns as one vector of GCC's vector extensions: the same lane arithmetic in every
 * instruction-set clone (one zmm register, two ymm or four xmm). */
typedef float vfloat __attribute__((vector_size(4 * LANES)));
typedef int32_t vint __attribute__((vector_size(4 * LANES)));

static inline vfloat load_v(const float *p) { vfloat v; memcpy(&v, p, sizeof v); return v; }
static inline vint load_vi(const int32_t *p) { vint v; memcpy(&v, p, sizeof v); return v; }
static inline void store_v(float *p, vfloat v) { memcpy(p, &v, sizeof v); }

MULTIVERSION
static void finish_tile(const float *restrict total, float *restrict fcount,
                        const int32_t *restrict icount, int weighted, int len, float threshold,
                        float scale, int hard, float *restrict g, float *restrict a_out,
                        float *restrict m_out, Sums *restrict sums) {
    const vint one_bits = (vint){0} + (int32_t)0x3f800000, abs_bits = (vint){0} + 0x7fffffff;
    const vfloat zero = {0}, max_finite = zero + 3.4028234663852886e38f;
    for (int lo = 0; lo < len; lo += SUM_RUN) {
        int hi = len - lo < SUM_RUN ? len : lo + SUM_RUN;
        vfloat mask_v = zero, agree_v = zero, bad_v = zero;
        int j = lo;
        for (; j + LANES <= hi; j += LANES) {   /* finish_column, LANES columns at a time */
            vfloat score;
            if (weighted) {
                score = (vfloat)((vint)load_v(fcount + j) & abs_bits);
            } else {
                vint c = load_vi(icount + j), sign = c >> 31;
                score = __builtin_convertvector((c ^ sign) - sign, vfloat);
            }
            vfloat agree = score * scale, s = load_v(total + j);
            vint keep = score >= threshold;
            vint other = hard ? (vint){0} : (vint)agree;
            vfloat m = (vfloat)((keep & one_bits) | (~keep & other));
            vint finite = (vfloat)((vint)s & abs_bits) <= max_finite;
            bad_v += (vfloat)(~finite & one_bits);
            store_v(fcount + j, agree);
            if (m_out) {
                store_v(m_out + j, m);
                store_v(g + j, s);
            } else {
                store_v(g + j, m * s);
            }
            mask_v += m;
            agree_v += agree;
        }
        float mask_sum[LANES], agree_sum[LANES], bad[LANES];
        store_v(mask_sum, mask_v);
        store_v(agree_sum, agree_v);
        store_v(bad, bad_v);
        for (int l = 0; j < hi; ++j, ++l) {
            float agree, nonfinite;
            mask_sum[l] += finish_column(total, fcount, icount, weighted, j, threshold, scale,
                                         hard, g, m_out, &agree, &nonfinite);
            agree_sum[l] += agree;
            bad[l] += nonfinite;
        }
        float m_run = 0.0f, a_run = 0.0f, b_run = 0.0f;
        for (int l = 0; l < LANES; ++l) {
            m_run += mask_sum[l];
            a_run += agree_sum[l];
            b_run += bad[l];
        }
        sums->mask_sum += m_run;
        sums->agreement_sum += a_run;
        sums->nonfinite += b_run;
    }
    if (a_out) memcpy(a_out, fcount, (size_t)len * sizeof(float));
}

/* A fold of r clients (r = 4 or 1) into a run's sums, as DEFINE_FOLD writes it. */
typedef void FoldFn(const void *const *rows, int r, int64_t start, int len, const float *w,
                    const float *a, int fresh, float *restrict total, float *restrict fcount,
                    int32_t *restrict icount);

/* The fold for rows of dtype (0 float32, 1 bfloat16, 2 float16), or NULL for another code. */
static FoldFn *fold_for(int dtype) {
    static FoldFn *const portable[3] = {fold_f32, fold_bf16, fold_f16};
    if (dtype < 0 || dtype > 2) return NULL;
#ifdef HAVE_FOLD_AVX512
    static FoldFn *const wide[3] = {fold_f32_avx512, fold_bf16_avx512, fold_f16_avx512};
    if (have_avx512()) return wide[dtype];
#endif
    return portable[dtype];
}

/* Where client k's row starts. */
static inline const void *row_at(const Rows *rows, int64_t k) {
    return rows->rows ? rows->rows[k] : rows->base + k * rows->row_stride;
}

/* Fold every client into the run's sums, four at a time; with fresh the sums start at zero (they
 * are not read), else the clients are added to them. */
static int fold_tile(const Rows *rows, int64_t start, int len, int fresh, float *total,
                     float *fcount, int32_t *icount) {
    FoldFn *fold = fold_for(rows->dtype);
    if (!fold) return -1;
    const float *a = rows->agree_weights;
    for (int64_t k = 0; k < rows->num_clients;) {
        int r = rows->num_clients - k >= 4 ? 4 : 1;
        const void *group[4];
        for (int i = 0; i < r; ++i) group[i] = row_at(rows, k + i);
        fold(group, r, start, len, rows->weights + k, a ? a + k : NULL, fresh && k == 0, total,
             fcount, icount);
        k += r;
    }
    return 0;
}

/* The server step, with the float32 constants of formula.step_values, in its order of
 * operations:
 *   sgd       d = x
 *   momentum  v = v·momentum + x,  d = v
 *   adaptive  m = m·β1 + x·(1 − β1);  v = v·β2 + x²·(1 − β2)  |  v − (1 − β2)·x²·sign(v − x²)
 *             |  v + x²;  d = m / (√v + ε)
 * then d·mask when a mask is given, and w += lr·d. */

static inline int finite_f(float x) { return fabsf(x) <= 3.4028234663852886e38f; }

/* dst = src (n floats) with stores that bypass the caches where the CPU has them (x86-64, both
 * 16-byte aligned): the guard's backup is written once and read back only after a failed step,
 * so the cache lines it would fetch before writing them and the data it would evict are waste. */
static void copy_uncached(float *restrict dst, const float *restrict src, size_t n) {
#if defined(__GNUC__) && defined(__x86_64__)
    if ((((uintptr_t)dst | (uintptr_t)src) & 15) == 0) {
        size_t j = 0;
        for (; j + 4 <= n; j += 4) _mm_stream_ps(dst + j, _mm_load_ps(src + j));
        for (; j < n; ++j) dst[j] = src[j];
        _mm_sfence();
        return;
    }
#endif
    memcpy(dst, src, n * sizeof(float));
}

/* One tile of the step on x (and mask, may be NULL), in place. With st->guard, the old w, s1,
 * s2 first go to save[0], save[1], save[2] (the backups, or the tile's own buffers) and are put
 * back when a new value is not finite (returns 1 then): the tile ends as it was. One
 * branch-free loop per kind, so each vectorizes (the flag of non-finite values is an integer
 * OR, which vectorizes; a float count is a chain of dependent additions that does not). */
MULTIVERSION
static int step_tile(const Step *st, int len, const float *restrict x, const float *restrict mask,
                     float *restrict w, float *restrict s1, float *restrict s2,
                     float *const *save) {
    const int kind = st->kind, guard = st->guard;
    const float mom = st->momentum, b1 = st->beta1, c1 = st->one_minus_beta1;
    const float b2 = st->beta2, c2 = st->one_minus_beta2, eps = st->eps, lr = st->lr;
    const size_t bytes = (size_t)len * sizeof(float);
    if (guard) {
        copy_uncached(save[0], w, (size_t)len);
        if (kind >= 2) copy_uncached(save[1], s1, (size_t)len);
        if (kind >= 3) copy_uncached(save[2], s2, (size_t)len);
    }
    int bad = 0;
    if (kind == 1) {
        for (int j = 0; j < len; ++j) {
            float d = mask ? x[j] * mask[j] : x[j];
            w[j] = w[j] + lr * d;
            bad |= !finite_f(w[j]);
        }
    } else if (kind == 2) {
        for (int j = 0; j < len; ++j) {
            float v = s1[j] * mom + x[j];
            float d = mask ? v * mask[j] : v;
            s1[j] = v;
            w[j] = w[j] + lr * d;
            bad |= !finite_f(v) | !finite_f(w[j]);
        }
    } else {
#define ADAPTIVE_LOOP(NEW_V)                                                                      \
        for (int j = 0; j < len; ++j) {                                                        \
            float sq = x[j] * x[j], m1 = s1[j] * b1 + x[j] * c1, v2 = (NEW_V);                  \
            float d = m1 / (sqrtf(v2) + eps);                                                  \
            d = mask ? d * mask[j] : d;                                                        \
            s1[j] = m1;                                                                        \
            s2[j] = v2;                                                                        \
            w[j] = w[j] + lr * d;                                                              \
            bad |= !finite_f(m1) | !finite_f(v2) | !finite_f(w[j]);                            \
        }
        if (kind == 3)
            ADAPTIVE_LOOP(s2[j] * b2 + sq * c2)
        else if (kind == 4)
            ADAPTIVE_LOOP(s2[j] - (c2 * sq) * sign_float(s2[j] - sq))
        else
            ADAPTIVE_LOOP(s2[j] + sq)
#undef ADAPTIVE_LOOP
    }
    if (!guard || !bad) return 0;
    memcpy(w, save[0], bytes);
    if (kind >= 2) memcpy(s1, save[1], bytes);
    if (kind >= 3) memcpy(s2, save[2], bytes);
    return 1;
}

/* A tile's buffers, on the heap (a thread's stack may be small): 5 arrays of TILE floats. */
enum { GTILE, MTILE, SAVE_W, SAVE_S1, SAVE_S2, BUFFERS };

/* The calling thread's scratch space of at least `floats` floats, kept between calls (a fresh
 * allocation of this size each call is returned to the system and faulted in again, which
 * cost more than the whole pass at small K): NULL when out of memory. It grows when a call
 * needs more, and is freed when its thread exits; each thread that calls holds up to
 * TILE·BUFFERS + 3·FOLD_TILE floats (about 1.7 MB). */
typedef struct {
    size_t capacity;
    float data[];
} Space;

static pthread_key_t space_key;
static pthread_once_t space_once = PTHREAD_ONCE_INIT;
static void make_space_key(void) { pthread_key_create(&space_key, free); }

static float *workspace(size_t floats) {
    pthread_once(&space_once, make_space_key);
    Space *space = pthread_getspecific(space_key);
    if (!space || space->capacity < floats) {
        free(space);
        space = malloc(sizeof(Space) + sizeof(float) * floats);
        pthread_setspecific(space_key, space);
        if (!space) return NULL;
        space->capacity = floats;
    }
    return space->data;
}

/* The fold reads each row in runs of FOLD_TILE columns (its sums, 3 floats a column, stay in
 * L2): the longer a run, the better the hardware prefetcher streams it. The statistics and the
 * step then take each run TILE columns at a time. */
#ifndef FOLD_TILE
#define FOLD_TILE (16 * TILE)
#endif

static int step_range(const Step *st, int64_t start, int len, const float *x,
                      const float *mask, float *work) {
    float *backup[3] = {st->bw ? st->bw + start : work + SAVE_W * TILE,
                        st->bs1 ? st->bs1 + start : work + SAVE_S1 * TILE,
                        st->bs2 ? st->bs2 + start : work + SAVE_S2 * TILE};
    return step_tile(st, len, x, mask, st->w + start, st->s1 ? st->s1 + start : NULL,
                     st->s2 ? st->s2 + start : NULL, backup);
}

/* The pass over the clients' rows for the columns [lo, hi) (AggregateArgs): with a step
 * (step.kind > 0) it is made in the same pass, tile by tile (step_tile): with guard, the pass
 * stops at the first tile whose new values are not all finite, having saved every stepped
 * tile's old values into the backups, so the caller can put them back. Returns 0, 1 when the
 * guard stopped the step, -1 for an unknown dtype, -2 out of memory. */
int gma_cpu_aggregate(const AggregateArgs *args, int64_t lo, int64_t hi, Sums *sums) {
    const Rows *rows = &args->rows;
    const Mask *mask = &args->mask;
    const Step *st = &args->step;
    int64_t width = hi - lo < FOLD_TILE ? hi - lo : FOLD_TILE;
    float *work = workspace((size_t)TILE * BUFFERS + 3 * (size_t)width);
    if (!work) return -2;
    float *total = work + TILE * BUFFERS, *fcount = total + width;
    int32_t *icount = (int32_t *)(fcount + width);
    int code = 0;
    for (int64_t start = lo; start < hi && code == 0; start += FOLD_TILE) {
        int len = (int)(hi - start < FOLD_TILE ? hi - start : FOLD_TILE);
        if (fold_tile(rows, start, len, 1, total, fcount, icount)) {
            code = -1;
            break;
        }
        for (int off = 0; off < len && code == 0; off += TILE) {
            int sub = len - off < TILE ? len - off : TILE;
            int64_t at = start + off;
            float *gout = args->g ? args->g + at : work + GTILE * TILE;
            float *mout = st->masks_step ? work + MTILE * TILE : NULL;
            finish_tile(total + off, fcount + off, icount + off, rows->agree_weights != NULL,
                        sub, mask->threshold, mask->scale, mask->hard, gout,
                        args->a_out ? args->a_out + at : NULL, mout, sums);
            if (st->kind) {
                code = step_range(st, at, sub, gout, mout, work);
                if (code == 0) sums->stepped += sub;
            }
        }
    }
    return code;
}

/* The server step alone on a known x over the columns [lo, hi) (StepArgs), as in
 * gma_cpu_aggregate. Returns 0, 1 when the guard stopped the step, -2 out of memory. */
int gma_cpu_step(const StepArgs *args, int64_t lo, int64_t hi, Sums *sums) {
    float *work = workspace((size_t)TILE * BUFFERS);
    if (!work) return -2;
    int code = 0;
    for (int64_t start = lo; start < hi && code == 0; start += TILE) {
        int len = (int)(hi - start < TILE ? hi - start : TILE);
        code = step_range(&args->step, start, len, args->x + start,
                          args->mask ? args->mask + start : NULL, work);
        if (code == 0) sums->stepped += len;
    }
    return code;
}

/* The streaming accumulator's result over the columns [lo, hi) (FinishArgs): the mean
 * S_j / weight_sum and the mask m_j made, as finish_tile makes it, from C_j (weighted:
 * C_j / weight_sum, else the exact count C_j); then, with a step, the step in the same pass
 * on m·mean (or on mean, with m on the direction, when masks_step), so a step from the sums
 * needs no buffer of N values. Returns as gma_cpu_aggregate. */
int gma_cpu_finish(const FinishArgs *args, int64_t lo, int64_t hi, Sums *sums) {
    const Mask *mask = &args->mask;
    const Step *st = &args->step;
    const float *S = args->total, *C = args->count, weight_sum = args->weight_sum;
    float *work = workspace((size_t)TILE * BUFFERS + 2 * (size_t)TILE);
    if (!work) return -2;
    float *total = work + TILE * BUFFERS, *count = total + TILE;
    int code = 0;
    for (int64_t start = lo; start < hi && code == 0; start += TILE) {
        int len = (int)(hi - start < TILE ? hi - start : TILE);
        for (int j = 0; j < len; ++j) total[j] = S[start + j] / weight_sum;
        if (mask->weighted)
            for (int j = 0; j < len; ++j) count[j] = C[start + j] / weight_sum;
        else
            memcpy(count, C + start, (size_t)len * sizeof(float));
        float *gout = args->mean ? args->mean + start : work + GTILE * TILE;
        float *mout = args->m_out ? args->m_out + start
                                  : (st->masks_step ? work + MTILE * TILE : NULL);
        finish_tile(total, count, NULL, 1, len, mask->threshold, mask->scale, mask->hard, gout,
                    NULL, mout, sums);
        if (st->kind) {
            code = step_range(st, start, len, gout, mout, work);
            if (code == 0) sums->stepped += len;
        }
    }
    return code;
}

/* The number of non-finite values of each client's row over the columns [lo, hi), added into
 * counts[0..K-1] (float64): a value is a NaN or an infinity exactly when its exponent bits are
 * all ones, a test on the raw bits that needs no conversion (one vectorized integer loop per
 * dtype). */
#define COUNT_ALL_ONES(TYPE, EXPONENT)                                                             \
    for (int64_t j = lo; j < hi; ++j) bad += (((const TYPE *)row)[j] & (EXPONENT)) == (EXPONENT)

MULTIVERSION
static int64_t nonfinite_in(const void *row, int dtype, int64_t lo, int64_t hi) {
    int64_t bad = 0;
    if (dtype == 0)
        COUNT_ALL_ONES(uint32_t, 0x7f800000u);
    else if (dtype == 1)
        COUNT_ALL_ONES(uint16_t, 0x7f80u);
    else
        COUNT_ALL_ONES(uint16_t, 0x7c00u);
    return bad;
}

int gma_cpu_nonfinite(const Rows *rows, int64_t lo, int64_t hi, double *counts) {
    if (rows->dtype < 0 || rows->dtype > 2) return -1;
    for (int64_t k = 0; k < rows->num_clients; ++k)
        counts[k] += (double)nonfinite_in(row_at(rows, k), rows->dtype, lo, hi);
    return 0;
}

/* The streaming fold (FoldArgs): total_j += Σ_k w_k x_kj (clients in order), count_j +=
 * Σ_k a_k sign(x_kj) (a_k = 1 when agree_weights is NULL), for the columns [lo, hi), in place
 * in the float32 arrays. */
int gma_cpu_fold(const FoldArgs *args, int64_t lo, int64_t hi) {
    const Rows *rows = &args->rows;
    float *S = args->total, *C = args->count;
    int64_t width = hi - lo < FOLD_TILE ? hi - lo : FOLD_TILE;
    float *fcount = workspace(2 * (size_t)width);
    if (!fcount) return -2;
    int32_t *icount = (int32_t *)(fcount + width);
    int code = 0;
    for (int64_t start = lo; start < hi; start += FOLD_TILE) {
        int len = (int)(hi - start < FOLD_TILE ? hi - start : FOLD_TILE);
        memcpy(fcount, C + start, (size_t)len * sizeof(float));
        memset(icount, 0, sizeof(int32_t) * len);
        if (fold_tile(rows, start, len, 0, S + start, fcount, icount)) {
            code = -1;
            break;
        }
        for (int j = 0; j < len; ++j) C[start + j] = fcount[j] + (float)icount[j];
    }
    return code;
}

/* The sizes of the argument structures, in the order of native.py's mirrors: the package calls
 * the library only where each equals its mirror's (not a library built from another version of
 * this file). */
const int64_t gma_cpu_layout[] = {sizeof(Rows),          sizeof(Mask),     sizeof(Step),
                                  sizeof(Sums),          sizeof(AggregateArgs),
                                  sizeof(StepArgs),      sizeof(FinishArgs), sizeof(FoldArgs)};
