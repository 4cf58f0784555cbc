/*
** experts_common.h — what the tests of the expert GEMM and MLP (bf16, fp8-block and int4 weights)
** share: random weights in the checkpoint layouts of epmoe.h, activations (bf16, or fp8 with 1x128
** scales in any layout, made by the library's cast: w4_acts), and an oracle computed differently
** from the reference: every weight and activation is dequantized to fp64 first (value times its
** scale), then each output is one plain dot product over K.
**
** Error models of an output element against the oracle:
**   reference (tol_bf16 = tol_sum = 0): the reference and the oracle add the same exact values in
**     different orders (fp8, bf16 and int4 products are exact in fp64; so are their fp32 scales'
**     products: 28-bit significands), so their fp64 sums differ by at most XW_REF_SLACK ulps of
**     fp64 per unit of magnitude (Higham: a sum of n terms is within n*u*sum|terms|; the oracle
**     adds K terms each rounded once, the reference K/g partials of g terms then the scaled
**     partials: together below (2K + 4) u). Both round once to bf16 (through fp32), so the output
**     must be exactly one of the bf16 values of [want - slack, want + slack]: a single value (the
**     exact check) unless want is that close to a rounding boundary, where one bf16 ulp is allowed.
**   GPU kernels: |got - want| <= tol_bf16 * |want| + tol_sum * sum|products| (chosen by the caller
**     for the kernel's fp32 partial sums).
*/
#ifndef EPMOE_EXPERTS_COMMON_H
#define EPMOE_EXPERTS_COMMON_H

#include "w4a8_common.h"

#define XW_FP64_U (1.0 / 9007199254740992.0) /* 2^-53: unit roundoff of fp64 */
#define XW_REF_SLACK(K) (2.0 * (double)(K) + 4.0)
#define XW_POISON16 W4_POISON16

typedef struct xw_mat {
    epmoe_weight_format format;
    int64_t E, N, K, group; /* group: INT4 only (0 otherwise) */
    void *data;             /* bf16 [E, N, K] | fp8 [E, N, K] | int8 [E, N, K/2], 16-byte aligned */
    float *scales;          /* FP8_BLOCK [E, N/128, K/128] | INT4 [E, N, K/group] | NULL */
    size_t data_bytes, scale_bytes;
} xw_mat;

static inline int64_t xw_scale_count(epmoe_weight_format f, int64_t E, int64_t N, int64_t K, int64_t group) {
    if (f == EPMOE_WEIGHT_FP8_BLOCK) return E * (N / 128) * (K / 128);
    return f == EPMOE_WEIGHT_INT4 ? E * N * (K / group) : 0;
}

/* Random weights (cheap generators: the big cases have millions): bf16 uniform in (-scale, scale)
** times 2^(0..-7) (so sums see several exponents); fp8 any e4m3 code but NaN (subnormals and
** +-448 included) with block scales around scale / 64; int4 uniform in [-8, 7] with group scales
** around scale / 4. */
static inline void xw_mat_make(test_rng *r, xw_mat *w, epmoe_weight_format f, int64_t E, int64_t N, int64_t K,
                               int64_t group, double scale) {
    w->format = f, w->E = E, w->N = N, w->K = K, w->group = f == EPMOE_WEIGHT_INT4 ? group : 0;
    const int64_t n = E * N * K, ns = xw_scale_count(f, E, N, K, group);
    w->data_bytes = (size_t)(f == EPMOE_WEIGHT_BF16 ? 2 * n : (f == EPMOE_WEIGHT_FP8_BLOCK ? n : n / 2));
    w->scale_bytes = (size_t)ns * 4;
    w->data = aligned_alloc(16, (w->data_bytes + 15) / 16 * 16 + 16);
    w->scales = ns ? aligned_alloc(16, (w->scale_bytes + 15) / 16 * 16) : NULL;
    for (int64_t i = 0; i < n; i++) {
        const uint64_t u = rng_u64(r);
        if (f == EPMOE_WEIGHT_BF16)
            ((uint16_t *)w->data)[i] = epmoe_bf16_from_float((float)((2.0 * (double)(u >> 11) / 9007199254740992.0 - 1.0) *
                                                                     scale / (double)(1u << (u & 7))));
        else if (f == EPMOE_WEIGHT_FP8_BLOCK) ((uint8_t *)w->data)[i] = (u & 0x7F) == 0x7F ? 0 : (uint8_t)u;
        else if (i % 2 == 0) {
            const int lo = (int)(u % 16) - 8, hi = (int)((u >> 4) % 16) - 8;
            ((uint8_t *)w->data)[i / 2] = (uint8_t)((lo & 0xF) | ((hi & 0xF) << 4));
        }
    }
    const double s0 = f == EPMOE_WEIGHT_FP8_BLOCK ? scale / 64 : scale / 4;
    for (int64_t i = 0; i < ns; i++) w->scales[i] = (float)(s0 * (0.5 + rng_uniform(r)));
}

static inline void xw_mat_free(xw_mat *w) { free(w->data), free(w->scales); }

static inline epmoe_expert_weights xw_weights(const xw_mat *w) {
    const epmoe_expert_weights x = {w->format, w->E, w->N, w->K, w->group, w->data, w->scales};
    return x;
}

/* Weight (e, n, k) times its scale: exact in fp64. */
static inline double xw_value(const xw_mat *w, int64_t e, int64_t n, int64_t k) {
    const int64_t N = w->N, K = w->K, i = (e * N + n) * K + k;
    switch (w->format) {
    case EPMOE_WEIGHT_BF16: return epmoe_bf16_to_float(((const uint16_t *)w->data)[i]);
    case EPMOE_WEIGHT_FP8_BLOCK:
        return (double)epmoe_fp8_e4m3_to_float(((const uint8_t *)w->data)[i]) *
               w->scales[(e * (N / 128) + n / 128) * (K / 128) + k / 128];
    default: {
        const uint8_t b = ((const uint8_t *)w->data)[i / 2];
        const int nib = (k & 1) ? b >> 4 : b & 0xF;
        return (double)(nib >= 8 ? nib - 16 : nib) * w->scales[(e * N + n) * (K / w->group) + k / w->group];
    }
    }
}

/* The whole weight matrix dequantized: fp64 [E, N, K]. */
static inline double *xw_dequant_weights(const xw_mat *w) {
    double *d = malloc((size_t)(w->E * w->N * w->K) * sizeof(double) + 8);
    for (int64_t e = 0; e < w->E; e++)
        for (int64_t n = 0; n < w->N; n++)
            for (int64_t k = 0; k < w->K; k++) d[(e * w->N + n) * w->K + k] = xw_value(w, e, n, k);
    return d;
}

/* The activations a GEMM of format f reads: fp8 (FP8_BLOCK) or the bf16 tokens. */
static inline const void *xw_act_ptr(const w4_acts *A, epmoe_weight_format f) {
    return f == EPMOE_WEIGHT_FP8_BLOCK ? (const void *)A->a : (const void *)A->x;
}

/* ... and dequantized: fp64 [E, M, K] (fp8 times its group scale, or the bf16 value). */
static inline double *xw_dequant_acts(const w4_acts *A, epmoe_weight_format f) {
    const int64_t E = A->E, M = A->M, K = A->K;
    double *d = malloc((size_t)(E * M * K) * sizeof(double) + 8);
    for (int64_t e = 0; e < E; e++)
        for (int64_t m = 0; m < M; m++)
            for (int64_t k = 0; k < K; k++) {
                const int64_t i = (e * M + m) * K + k;
                d[i] = f == EPMOE_WEIGHT_FP8_BLOCK ? epmoe_fp8_e4m3_to_float(A->a[i]) * w4_act_scale(A, e, m, k / 128)
                                                   : epmoe_bf16_to_float(A->x[i]);
            }
    return d;
}

/* The oracle: one dot product of dequantized rows; *mag gets sum |products|. */
static inline double xw_dot(const double *a, const double *w, int64_t K, double *mag) {
    double acc = 0.0, abs_acc = 0.0;
    for (int64_t k = 0; k < K; k++) {
        acc += a[k] * w[k];
        abs_acc += fabs(a[k] * w[k]);
    }
    *mag = abs_acc;
    return acc;
}

/* x rounded as the reference stores it: fp64 -> fp32 -> bf16 (RNE both), as a float. */
static inline float xw_round(double x) { return epmoe_bf16_to_float(epmoe_bf16_from_float((float)x)); }

typedef struct xw_stats {
    long checked, slack_used, bad, touched;
    double worst; /* GPU rule: the largest |got - want| / bound */
} xw_stats;

/* The oracle over a block of rows [m0, m0 + rows) x [0, N) of expert e (par_for's body). */
typedef struct xw_block {
    const double *Wd, *Ad;
    int64_t M, N, K, e, m0;
    double *want, *mag;
} xw_block;
static void xw_block_rows(void *p, int64_t begin, int64_t end) {
    const xw_block *b = (const xw_block *)p;
    for (int64_t i = begin; i < end; i++) {
        const int64_t m = b->m0 + i / b->N, n = i % b->N;
        b->want[i] = xw_dot(b->Ad + (b->e * b->M + m) * b->K, b->Wd + (b->e * b->N + n) * b->K, b->K, &b->mag[i]);
    }
}

/* Compare out (e, m, n) at out[e * es + m * rs + n] with the oracle (Wd [E, N, K], Ad [E, M, K]);
** elements past masked_m or N must still hold XW_POISON16. Rule: see the top of this file. The
** oracle runs on every core a block of rows at a time (src/par_for.h); the comparison is serial, in order. */
static inline xw_stats xw_check_out(const char *what, const double *Wd, const double *Ad, int64_t E, int64_t M,
                                    int64_t N, int64_t K, const int32_t *masked, const uint16_t *out, int64_t rs,
                                    int64_t es, double tol_bf16, double tol_sum) {
    xw_stats s = {0, 0, 0, 0, 0.0};
    const int exact_rule = tol_bf16 == 0 && tol_sum == 0;
    const int64_t blk = par_block_rows(N);
    double *want = malloc((size_t)(blk * N) * sizeof(double)), *mags = malloc((size_t)(blk * N) * sizeof(double));
    CHECK(want && mags, "%s: no memory for the oracle's block", what);
    for (int64_t e = 0; e < E && want && mags; e++) {
        const int64_t rows = masked[e] < 0 ? 0 : (masked[e] > M ? M : masked[e]);
        for (int64_t m0 = 0; m0 < M; m0 += blk) {
            const int64_t in = rows - m0 < 0 ? 0 : rows - m0 < blk ? rows - m0 : blk; /* rows of the block to check */
            xw_block b = {Wd, Ad, M, N, K, e, m0, want, mags};
            par_for(in * N, 1 + 65536 / K, xw_block_rows, &b);
            for (int64_t m = m0; m < M && m < m0 + blk; m++)
                for (int64_t n = 0; n < rs; n++) {
                    const uint16_t bits = out[e * es + m * rs + n];
                    if (m >= rows || n >= N) {
                        s.touched += bits != XW_POISON16;
                        continue;
                    }
                    const double wv = want[(m - m0) * N + n], mag = mags[(m - m0) * N + n];
                    const float got = epmoe_bf16_to_float(bits);
                    int ok;
                    s.checked++;
                    if (exact_rule) {
                        const double slack = XW_REF_SLACK(K) * XW_FP64_U * mag;
                        const float lo = xw_round(wv - slack), hi = xw_round(wv + slack);
                        s.slack_used += lo != hi;
                        ok = got >= lo && got <= hi;
                    } else {
                        const double bound = tol_bf16 * fabs(wv) + tol_sum * mag, err = fabs((double)got - wv);
                        ok = err <= bound;
                        if (bound > 0 && err / bound > s.worst) s.worst = err / bound;
                    }
                    if (!ok && ++s.bad <= 4)
                        printf("    %s: (e %lld, m %lld, n %lld) got %.9g want %.17g (bf16 %.9g, mag %g)\n", what,
                               (long long)e, (long long)m, (long long)n, got, wv, xw_round(wv), mag);
                }
        }
    }
    free(want), free(mags);
    CHECK(s.bad == 0, "%s: %ld of %ld elements outside the error model", what, s.bad, s.checked);
    CHECK(s.touched == 0, "%s: %ld elements past masked_m or N were written", what, s.touched);
    return s;
}

#endif
