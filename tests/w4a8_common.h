/*
** w4a8_common.h — what the CPU and GPU tests of the W4A8 GEMM share: random checkpoint-format
** weights and their repack, fp8 activations with group scales made by the library's cast, and
** a naive oracle computed from the checkpoint arrays (not the repacked ones), in fp64, that
** also returns the magnitude sum the tolerances scale with.
**
** Error model of a kernel output against the oracle (per element):
**   |got - want| <= W4_TOL_BF16 * |want| + W4_TOL_SUM * sum_g |sa sw| sum_k |a w|
** W4_TOL_BF16: the bf16 output rounding (half an ulp = 2^-9) with room for the fp32 rounding
** before it. W4_TOL_SUM: the per-group tensor-core sum. Hopper's fp8 wgmma aligns and truncates
** inside its accumulation (~14 bits kept, DeepSeek-V3 §3.3), once per k32 step; on an H200 the
** worst elements seen over many seeds were 2.3e-3 * mag (UE8M0 scales, K = 384; 2026-11-30), so
** 2^-8 leaves 1.7x margin for all but a rare tail: one element in 5.2M (K = 256, seed 1796068426,
** 2026-11-30) landed at 1.09x the bound, 6.5e-3 * mag, the same on every run and build (so not a
** race). The truncation's worst case is not modelled exactly, so w4_check_out allows such a tail:
** at most one element per million (at least one) between 1x and 2x the bound, none beyond.
** A wrong fragment, scale or row is still far outside: it moves a whole row or tile of outputs,
** each by about its own size, and |out| ~ mag / sqrt(K) on random data (K = 7168: 0.015 mag, 4x
** the bound); the accuracy test (NMSE within 5% of the fp64 model) is the fine check.
** Weight scales: the checkpoints here are fp32, and the repack stores bf16(s * 512). The oracle
** applies that one rounding itself (w4_ckpt_scale: the public bf16 rule on the checkpoint array,
** not the repacked one, so a repack that put a scale in the wrong place still fails), which keeps
** the model above unchanged. Against the unrounded scales each group's term could move by up to
** 2^-8 of itself (bf16's unit roundoff), adding 2^-8 * mag to the bound: W4_TOL_SUM doubled, every
** check weaker.
*/
#ifndef EPMOE_W4A8_COMMON_H
#define EPMOE_W4A8_COMMON_H

#include "par_for.h"
#include "test.h"

#define W4_TOL_BF16 (1.0 / 256)
#define W4_TOL_SUM (1.0 / 256)

typedef struct w4_mat {
    int64_t E, N, K;
    int8_t *ckpt_w;  /* [E, N, K/2] packed int4 */
    float *ckpt_s;   /* [E, N, K/128] */
    void *qw;        /* repacked (host) */
    uint16_t *sw;    /* repacked scales, bf16 [E, K/128, N] */
    int enc;
} w4_mat;

/* Weights uniform in [-7, 7] (or [-8, 7] with m8), scales around `scale`. */
static inline void w4_mat_make(test_rng *r, w4_mat *w, int64_t E, int64_t N, int64_t K, int m8, double scale, int want_enc) {
    w->E = E, w->N = N, w->K = K;
    w->ckpt_w = malloc((size_t)(E * N * K / 2));
    w->ckpt_s = malloc((size_t)(E * N * (K / 128)) * sizeof(float));
    for (int64_t i = 0; i < E * N * K / 2; i++) {
        int lo = (int)(rng_u64(r) % (m8 ? 16 : 15)) - (m8 ? 8 : 7), hi = (int)(rng_u64(r) % (m8 ? 16 : 15)) - (m8 ? 8 : 7);
        w->ckpt_w[i] = (int8_t)(uint8_t)((lo & 0xF) | ((hi & 0xF) << 4));
    }
    for (int64_t i = 0; i < E * N * (K / 128); i++) w->ckpt_s[i] = (float)(scale * (0.5 + rng_uniform(r)));
    size_t qb, sb;
    epmoe_w4a8_repack_size(E, N, K, &qb, &sb);
    w->qw = malloc(qb ? qb : 1);
    w->sw = malloc(sb ? sb : 2);
    w->enc = want_enc;
    epmoe_status st = epmoe_w4a8_repack(w->ckpt_w, w->ckpt_s, EPMOE_F32, 128, E, N, K, w->qw, w->sw, &w->enc);
    if (st != EPMOE_OK) {
        printf("repack failed: %s\n", epmoe_last_error());
        exit(2);
    }
}

static inline void w4_mat_free(w4_mat *w) { free(w->ckpt_w), free(w->ckpt_s), free(w->qw), free(w->sw); }

static inline int w4_ckpt_value(const w4_mat *w, int64_t e, int64_t n, int64_t k) {
    const uint8_t b = (uint8_t)w->ckpt_w[((e * w->N + n) * w->K + k) / 2];
    const int nib = (k & 1) ? b >> 4 : b & 0xF;
    return nib >= 8 ? nib - 16 : nib;
}

/* Group scale (e, n, g) as the kernels apply it: the checkpoint's fp32, rounded to bf16 with the
** 2^9 folded in (epmoe_w4a8_repack), exact in fp64. */
static inline double w4_ckpt_scale(const w4_mat *w, int64_t e, int64_t n, int64_t g) {
    const float s = w->ckpt_s[(e * w->N + n) * (w->K / 128) + g];
    return (double)epmoe_bf16_to_float(epmoe_bf16_from_float(s * 512.0f)) / 512.0;
}

/* Activations: bf16 gaussian tokens with per-token spread (x 2^U(-2,2)), optionally `outliers`
** channels x200 (the DESIGN accuracy model), quantized per expert slab by the library's group cast into fmt. */
typedef struct w4_acts {
    int64_t E, M, K;
    epmoe_scale_fmt fmt;
    uint16_t *x;   /* bf16 [E, M, K] */
    uint8_t *a;    /* fp8 [E, M, K] */
    uint8_t *sa;   /* E slabs of fmt */
    size_t slab;
} w4_acts;

static inline void w4_acts_make(test_rng *r, w4_acts *A, int64_t E, int64_t M, int64_t K, epmoe_scale_fmt fmt, int outliers) {
    A->E = E, A->M = M, A->K = K, A->fmt = fmt;
    A->x = malloc((size_t)(E * M * K) * 2 + 2);
    A->a = malloc((size_t)(E * M * K) + 1);
    A->slab = epmoe_scale_bytes(fmt, M, K);
    A->sa = malloc(A->slab * (size_t)E + 4);
    for (int64_t t = 0; t < E * M; t++) {
        const double spread = pow(2.0, 4.0 * rng_uniform(r) - 2.0);
        for (int64_t k = 0; k < K; k++) {
            double v = rng_normal(r) * spread;
            if (outliers && (k * 7919) % K < outliers) v *= 200.0;
            A->x[t * K + k] = epmoe_bf16_from_float((float)v);
        }
    }
    const int round = fmt >= EPMOE_SCALE_UE8M0_ROW;
    for (int64_t e = 0; e < E && M > 0; e++)
        epmoe_cast_group_fp8_ref(A->x + e * M * K, M, K, A->a + e * M * K, A->sa + A->slab * (size_t)e, fmt, round);
}

static inline void w4_acts_free(w4_acts *A) { free(A->x), free(A->a), free(A->sa); }

static inline double w4_act_scale(const w4_acts *A, int64_t e, int64_t m, int64_t g) {
    const uint8_t *p = A->sa + A->slab * (size_t)e + epmoe_scale_offset(A->fmt, A->M, A->K, m, g);
    if (A->fmt >= EPMOE_SCALE_UE8M0_ROW) return epmoe_ue8m0_to_float(*p);
    float s;
    memcpy(&s, p, 4);
    return s;
}

/* The oracle: out[e, m, n] in fp64 from the checkpoint arrays (the weight scales rounded as the
** repack rounds them, see the top); tensor_scale > 0 selects mode (b)
** (activation scales ignored). *mag gets sum_g |sa sw| sum_k |a w|. */
static inline double w4_oracle(const w4_mat *w, const w4_acts *A, double tensor_scale, int64_t e, int64_t m, int64_t n,
                        double *mag) {
    const int64_t K = w->K, G = K / 128;
    double acc = 0.0, abs_acc = 0.0;
    for (int64_t g = 0; g < G; g++) {
        double part = 0.0, apart = 0.0;
        for (int64_t k = g * 128; k < (g + 1) * 128; k++) {
            const double p = (double)epmoe_fp8_e4m3_to_float(A->a[(e * A->M + m) * K + k]) * w4_ckpt_value(w, e, n, k);
            part += p;
            apart += fabs(p);
        }
        const double s = (tensor_scale > 0 ? tensor_scale : w4_act_scale(A, e, m, g)) * w4_ckpt_scale(w, e, n, g);
        acc += s * part;
        abs_acc += fabs(s) * apart;
    }
    *mag = abs_acc;
    return acc;
}

/* silu(gate) * up of two bf16 values in fp32, rounded to bf16: the MLP's middle step by hand (the
** library's expression; the GPU's expf may differ from libm's by an ulp). */
static inline uint16_t w4_silu_mul(uint16_t gate, uint16_t up) {
    const float g = epmoe_bf16_to_float(gate);
    return epmoe_bf16_from_float(g / (1.0f + expf(-g)) * epmoe_bf16_to_float(up));
}

/* Compare one output element with the oracle under the error model; NaN must match NaN. */
static inline double w4_bound(double want, double mag) { return W4_TOL_BF16 * fabs(want) + W4_TOL_SUM * mag; }
static inline int w4_close(double got, double want, double mag) {
    if (isnan(want) || isnan(got)) return isnan(want) && isnan(got);
    return fabs(got - want) <= w4_bound(want, mag);
}

/* The oracle over a block of rows [m0, m0 + rows) x [0, N) of expert e, into want / mag (row-major):
** par_for's body. */
typedef struct w4_block {
    const w4_mat *w;
    const w4_acts *A;
    double ts;
    int64_t e, m0;
    double *want, *mag;
} w4_block;
static void w4_block_rows(void *p, int64_t begin, int64_t end) {
    const w4_block *b = (const w4_block *)p;
    const int64_t N = b->w->N;
    for (int64_t i = begin; i < end; i++) b->want[i] = w4_oracle(b->w, b->A, b->ts, b->e, b->m0 + i / N, i % N, &b->mag[i]);
}

/* Compare a host copy of an output [E, M, rs] (expert stride es) with the oracle; elements past
** masked_m or N must still hold W4_POISON16, the bf16 NaN no computation here produces. The oracle
** runs on every core a block of rows at a time (src/par_for.h); the comparison is serial, in order. */
#define W4_POISON16 0x7FBFu
static inline void w4_check_out(const char *what, const w4_mat *w, const w4_acts *A, const int32_t *masked, double ts,
                         const uint16_t *out, int64_t rs, int64_t es) {
    const int64_t E = w->E, N = w->N, M = A->M, blk = par_block_rows(N);
    long bad = 0, far = 0, touched = 0, checked = 0;
    double worst = 0.0; /* the largest |got - want| / bound */
    double *want = malloc((size_t)(blk * N) * sizeof(double)), *mags = malloc((size_t)(blk * N) * sizeof(double));
    CHECK(want && mags, "%s: no memory for the oracle's block", what);
    for (int64_t e = 0; e < E && want && mags; e++) {
        const int64_t rows = masked[e] < 0 ? 0 : (masked[e] > M ? M : masked[e]);
        for (int64_t m0 = 0; m0 < M; m0 += blk) {
            const int64_t in = rows - m0 < 0 ? 0 : rows - m0 < blk ? rows - m0 : blk; /* rows of the block to check */
            w4_block b = {w, A, ts, e, m0, want, mags};
            par_for(in * N, 1 + 65536 / w->K, w4_block_rows, &b);
            for (int64_t m = m0; m < M && m < m0 + blk; m++)
                for (int64_t n = 0; n < rs; n++) {
                    const uint16_t got = out[e * es + m * rs + n];
                    if (m >= rows || n >= N) {
                        touched += got != W4_POISON16;
                        continue;
                    }
                    const double wv = want[(m - m0) * N + n], mag = mags[(m - m0) * N + n];
                    checked++;
                    const double g = epmoe_bf16_to_float(got);
                    if (w4_close(g, wv, mag)) continue;
                    const double ratio = isnan(g) || isnan(wv) ? INFINITY : fabs(g - wv) / w4_bound(wv, mag);
                    worst = ratio > worst ? ratio : worst;
                    far += ratio > 2.0;
                    if (++bad <= 4)
                        printf("    %s: (e %lld, m %lld, n %lld) got %g want %g (mag %g): %.2fx the bound\n", what,
                               (long long)e, (long long)m, (long long)n, g, wv, mag, ratio);
                }
        }
    }
    free(want), free(mags);
    const long tail = checked / 1000000 > 1 ? checked / 1000000 : 1; /* the truncation's tail (top) */
    CHECK(far == 0 && bad <= tail, "%s: %ld of %ld elements outside the error model (%ld beyond 2x; allowed: %ld within "
          "2x), worst %.2fx", what, bad, checked, far, tail, worst);
    CHECK(touched == 0, "%s: %ld elements past masked_m or N were written", what, touched);
}

/* A CPU reference's output must not depend on its thread count (src/par_for.h): runs call(args)
** again with EPMOE_CPU_THREADS = 1 and 3, its output (*outp, n bf16) redirected to a poisoned
** buffer, and checks each result equals `want` bit for bit. (setenv: the including test file
** defines _POSIX_C_SOURCE.) */
static inline void check_ref_threads(const char *what, epmoe_status (*call)(void *), void *args, uint16_t **outp,
                                     const uint16_t *want, size_t n) {
    static const char *const counts[] = {"1", "3"};
    uint16_t *again = malloc(n * 2 + 2), *keep = *outp;
    CHECK(again != NULL, "%s: no memory for the second output", what);
    for (int i = 0; i < 2 && again; i++) {
        for (size_t j = 0; j < n; j++) again[j] = W4_POISON16;
        setenv("EPMOE_CPU_THREADS", counts[i], 1);
        *outp = again;
        CHECK_STATUS(call(args), EPMOE_OK);
        CHECK(memcmp(want, again, n * 2) == 0, "%s: the reference on %s thread(s) differs from its default's", what,
              counts[i]);
    }
    unsetenv("EPMOE_CPU_THREADS");
    *outp = keep;
    free(again);
}

#endif
