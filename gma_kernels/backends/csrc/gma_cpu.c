/* The fused GMA aggregation on CPU: one pass over every client's update, no K×N temporary.
 *
 * For the columns [lo, hi), tile by tile (TILE columns, accumulators in L2: long runs per row,
 * so the hardware prefetcher streams each row):
 *     S_j = Σ_k p̄_k x_kj          (float32, clients in order k = 0..K-1)
 *     C_j = Σ_k a_k sign(x_kj)     (a_k = 1: an exact integer count; or a_k = p̄_k)
 *     A_j = |C_j| · scale,  keep_j = |C_j| >= threshold
 *     m_j = keep_j ? 1 : (hard ? 0 : A_j)
 * and writes g_j = m_j · S_j (or S_j and m_j apart when the mask is applied after the server
 * step), optionally A_j, and the sums of m, of A and the count of non-finite S_j; or, with
 * params, makes the SGD step params_j += lr · g_j in the same pass (gma_cpu_aggregate).
 *
 * Rows are float32, bfloat16 or float16 (converted exactly to float32 on load), each a pointer of
 * its own, so a list of tensors is read where it lies. Plain C, no Python headers: the package
 * loads it with ctypes (gma_kernels/backends/native.py), which releases the GIL during the call so
 * several threads can each take a range of columns.
 */
#include <math.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>

#ifndef TILE
#define TILE 8192
#endif

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

/* Fold clients [k0, k0 + 4) (or one, R = 1) into the tile's sums: four rows per sweep of the
 * tile, so the accumulators are loaded and stored once per four rows; S still adds the clients
 * in order k0, k0 + 1, ... The unweighted count is an exact int32. */
#define DEFINE_FOLD(NAME, LOAD)                                                                  \
    MULTIVERSION                                                                               \
    static void NAME(const void *const *rows, int64_t k0, int r, int64_t start, int len,         \
                     const float *w, const float *a, float *restrict total,                    \
                     float *restrict fcount, int32_t *restrict icount) {                       \
        const void *r0 = rows[k0], *r1 = rows[k0 + (r > 1)], *r2 = rows[k0 + 2 * (r > 1)],       \
                   *r3 = rows[k0 + 3 * (r > 1)];                                               \
        float w0 = w[k0];                                                                      \
        if (r == 1 && a) {                                                                     \
            float a0 = a[k0];                                                                  \
            for (int j = 0; j < len; ++j) {                                                    \
                float x0 = LOAD(r0, start + j);                                                \
                total[j] += w0 * x0;                                                           \
                fcount[j] += a0 * sign_float(x0);                                              \
            }                                                                                  \
        } else if (r == 1) {                                                                   \
            for (int j = 0; j < len; ++j) {                                                    \
                float x0 = LOAD(r0, start + j);                                                \
                total[j] += w0 * x0;                                                           \
                icount[j] += sign_int(x0);                                                     \
            }                                                                                  \
        } else if (a) {                                                                        \
            float w1 = w[k0 + 1], w2 = w[k0 + 2], w3 = w[k0 + 3];                              \
            float a0 = a[k0], a1 = a[k0 + 1], a2 = a[k0 + 2], a3 = a[k0 + 3];                  \
            for (int j = 0; j < len; ++j) {                                                    \
                float x0 = LOAD(r0, start + j), x1 = LOAD(r1, start + j);                      \
                float x2 = LOAD(r2, start + j), x3 = LOAD(r3, start + j);                      \
                total[j] = (((total[j] + w0 * x0) + w1 * x1) + w2 * x2) + w3 * x3;             \
                fcount[j] = (((fcount[j] + a0 * sign_float(x0)) + a1 * sign_float(x1))         \
                             + a2 * sign_float(x2)) + a3 * sign_float(x3);                     \
            }                                                                                  \
        } else {                                                                               \
            float w1 = w[k0 + 1], w2 = w[k0 + 2], w3 = w[k0 + 3];                              \
            for (int j = 0; j < len; ++j) {                                                    \
                float x0 = LOAD(r0, start + j), x1 = LOAD(r1, start + j);                      \
                float x2 = LOAD(r2, start + j), x3 = LOAD(r3, start + j);                      \
                total[j] = (((total[j] + w0 * x0) + w1 * x1) + w2 * x2) + w3 * x3;             \
                icount[j] += sign_int(x0) + sign_int(x1) + sign_int(x2) + sign_int(x3);        \
            }                                                                                  \
        }                                                                                      \
    }

DEFINE_FOLD(fold_f32, load_f32)
DEFINE_FOLD(fold_bf16, load_bf16)
DEFINE_FOLD(fold_f16, load_f16)

/* Sums of m and A are float32 over runs of SUM_RUN columns, then float64: the rounding of the
 * statistics does not grow with the tile. */
#define SUM_RUN 512

MULTIVERSION
static void finish_tile(const float *restrict total, float *restrict fcount,
                        const int32_t *restrict icount, int weighted, int len, float threshold,
                        float scale, int hard, float *restrict g, float *restrict a_out,
                        float *restrict m_out, double *restrict sums) {
    for (int lo = 0; lo < len; lo += SUM_RUN) {
        int hi = len - lo < SUM_RUN ? len : lo + SUM_RUN;
        float mask_sum = 0.0f, agree_sum = 0.0f, bad = 0.0f;
        for (int j = lo; j < hi; ++j) {
            float score = weighted ? fabsf(fcount[j]) : (float)abs(icount[j]);
            float agree = score * scale;
            int keep = score >= threshold;
            float m = keep ? 1.0f : (hard ? 0.0f : agree);
            float s = total[j];
            bad += (fabsf(s) <= 3.4028234663852886e38f) ? 0.0f : 1.0f;
            mask_sum += m;
            agree_sum += agree;
            fcount[j] = agree;
            if (m_out) {
                m_out[j] = m;
                g[j] = s;
            } else {
                g[j] = m * s;
            }
        }
        sums[0] += mask_sum;
        sums[1] += agree_sum;
        sums[2] += bad;
    }
    if (a_out) memcpy(a_out, fcount, (size_t)len * sizeof(float));
}

/* The SGD step w_j += lr · g_j on one tile. With guard, nothing is written unless every new
 * w_j is finite (returns 1 then); backup, when given, first receives the old w_j. */
MULTIVERSION
static int step_tile(float *restrict w, const float *restrict g, float lr, int len, int guard,
                     float *restrict backup) {
    float next[TILE];
    float bad = 0.0f;
    for (int j = 0; j < len; ++j) {
        next[j] = w[j] + lr * g[j];
        bad += (fabsf(next[j]) <= 3.4028234663852886e38f) ? 0.0f : 1.0f;
    }
    if (guard && bad > 0.0f) return 1;
    if (backup) memcpy(backup, w, (size_t)len * sizeof(float));
    memcpy(w, next, (size_t)len * sizeof(float));
    return 0;
}

static int fold_tile(const void *const *rows, int dtype, int64_t num_clients, int64_t start,
                     int len, const float *w, const float *a, float *total, float *fcount,
                     int32_t *icount) {
    for (int64_t k = 0; k < num_clients;) {
        int r = num_clients - k >= 4 ? 4 : 1;
        if (dtype == 0)
            fold_f32(rows, k, r, start, len, w, a, total, fcount, icount);
        else if (dtype == 1)
            fold_bf16(rows, k, r, start, len, w, a, total, fcount, icount);
        else if (dtype == 2)
            fold_f16(rows, k, r, start, len, w, a, total, fcount, icount);
        else
            return -1;
        k += r;
    }
    return 0;
}

/* dtype: 0 = float32, 1 = bfloat16, 2 = float16. rows[k] points at element 0 of client k's update.
 * agree_w is NULL for the unweighted (exact count) agreement. g, a_out and m_out may be NULL
 * (g then lives in a tile buffer only); with m_out, g receives the unmasked mean S and m_out
 * the mask. With params, the SGD step params_j += lr · g_j is made in the same pass, tile by
 * tile (see step_tile): with guard, the pass stops at the first tile whose new values are not
 * all finite, having saved every stepped tile's old values into backup (when not NULL), so the
 * caller can put them back. sums[0..3] are accumulated into: Σ m, Σ A, the number of
 * non-finite S_j, and the number of columns stepped. Returns 0, 1 when the guard stopped the
 * step, or -1 for an unknown dtype. */
int gma_cpu_aggregate(const void *const *rows, int dtype, int64_t num_clients, int64_t lo,
                      int64_t hi, const float *mean_w, const float *agree_w, float threshold,
                      float scale, int hard, float *g, float *a_out, float *m_out,
                      float *params, float lr, int guard, float *backup, double *sums) {
    float total[TILE], fcount[TILE], gtile[TILE];
    int32_t icount[TILE];
    for (int64_t start = lo; start < hi; start += TILE) {
        int len = (int)(hi - start < TILE ? hi - start : TILE);
        float *gout = g ? g + start : gtile;
        memset(total, 0, sizeof total);
        memset(fcount, 0, sizeof fcount);
        memset(icount, 0, sizeof icount);
        if (fold_tile(rows, dtype, num_clients, start, len, mean_w, agree_w, total, fcount,
                      icount))
            return -1;
        finish_tile(total, fcount, icount, agree_w != NULL, len, threshold, scale, hard,
                    gout, a_out ? a_out + start : NULL, m_out ? m_out + start : NULL, sums);
        if (params) {
            if (step_tile(params + start, gout, lr, len, guard,
                          backup ? backup + start : NULL))
                return 1;
            sums[3] += len;
        }
    }
    return 0;
}

/* The streaming fold: S_j += Σ_k w_k x_kj (clients in order), C_j += Σ_k a_k sign(x_kj) (a_k = 1
 * when agree_w is NULL), for the columns [lo, hi), in place in the float32 arrays S and C. */
int gma_cpu_fold(const void *const *rows, int dtype, int64_t num_clients, int64_t lo,
                 int64_t hi, const float *w, const float *agree_w, float *S, float *C) {
    float fcount[TILE];
    int32_t icount[TILE];
    for (int64_t start = lo; start < hi; start += TILE) {
        int len = (int)(hi - start < TILE ? hi - start : TILE);
        memcpy(fcount, C + start, (size_t)len * sizeof(float));
        memset(icount, 0, sizeof icount);
        if (fold_tile(rows, dtype, num_clients, start, len, w, agree_w, S + start, fcount,
                      icount))
            return -1;
        for (int j = 0; j < len; ++j) C[start + j] = fcount[j] + (float)icount[j];
    }
    return 0;
}
