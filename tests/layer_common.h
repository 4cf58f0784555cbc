/*
** layer_common.h — what the CPU and GPU tests of the MoE layer share: one case (EP config, layer
** config, per-rank weights in checkpoint form and repacked, tokens, routing), the reference
** output from epmoe_layer_ref, and the comparison.
**
** Error model against the reference (host fp64 MLP, fp32 combine in top-k order):
**   CPU backend, REDUCE_AT_OWNER: the same functions on the same bytes -> bit-exact.
**   CPU backend, REDUCE_AT_EXPERT: each rank's partial sum is rounded to bf16 once before the
**     owner adds them: relative L2 <= LAYER_PARTIAL_L2 (2^-8: a few bf16 half-ulps summed).
**   GPU: the MLP on the tensor cores flips some fp8 roundings of the intermediate (see
**     test_w4a8_gpu.c: rel. L2 ~1e-2 at the MLP output); LAYER_GPU_L2 bounds the layer output.
*/
#ifndef EPMOE_LAYER_COMMON_H
#define EPMOE_LAYER_COMMON_H

#include "w4a8_common.h"

#define LAYER_PARTIAL_L2 (1.0 / 256)
#define LAYER_GPU_L2 3e-2
#define LAYER_MAX_R 4

typedef struct layer_case {
    epmoe_ep_config ec;
    epmoe_layer_config lc;
    int T[LAYER_MAX_R];
    uint64_t seed;
    w4_mat w13[LAYER_MAX_R], w2[LAYER_MAX_R];
    float a1, a2;
    epmoe_layer_weights hw[LAYER_MAX_R]; /* host pointers */
    uint16_t *x[LAYER_MAX_R];
    int32_t *topk[LAYER_MAX_R];
    float *tw[LAYER_MAX_R];
    uint16_t *ref[LAYER_MAX_R];
} layer_case;

static inline void layer_case_make(layer_case *c) {
    test_rng r = {c->seed | 1};
    const int R = c->ec.num_ranks, L = c->ec.num_experts / R, H = c->ec.hidden, k = c->ec.top_k;
    const int64_t I = c->lc.intermediate;
    c->a1 = 0.02f, c->a2 = 0.004f;
    for (int q = 0; q < R; q++) {
        w4_mat_make(&r, &c->w13[q], L, 2 * I, H, q & 1, 0.02, EPMOE_W4_AUTO);
        w4_mat_make(&r, &c->w2[q], L, H, I, 0, 0.02, EPMOE_W4_AUTO);
        const epmoe_layer_weights hw = {{L, 2 * I, H, c->w13[q].enc, c->w13[q].qw, c->w13[q].sw},
                                        {L, H, I, c->w2[q].enc, c->w2[q].qw, c->w2[q].sw}, &c->a1, &c->a2};
        c->hw[q] = hw;
        const int N = c->ec.max_tokens;
        c->x[q] = malloc((size_t)N * H * 2 + 2);
        c->topk[q] = malloc((size_t)N * k * 4 + 4);
        c->tw[q] = malloc((size_t)N * k * 4 + 4);
        c->ref[q] = malloc((size_t)N * H * 2 + 2);
        for (int t = 0; t < c->T[q]; t++) {
            const double spread = 0.5 + rng_uniform(&r);
            for (int h = 0; h < H; h++) c->x[q][(int64_t)t * H + h] = epmoe_bf16_from_float((float)(rng_normal(&r) * spread));
            for (int j = 0; j < k; j++) {
                int e = (int)(rng_u64(&r) % (uint64_t)c->ec.num_experts);
                if (rng_u64(&r) % 5 == 0) e = -1; /* -1 slots */
                c->topk[q][t * k + j] = e;
                c->tw[q][t * k + j] = (float)(0.2 + rng_uniform(&r));
            }
        }
    }
    const uint16_t *xs[LAYER_MAX_R];
    const int32_t *ids[LAYER_MAX_R];
    const float *ws[LAYER_MAX_R];
    for (int q = 0; q < R; q++) xs[q] = c->x[q], ids[q] = c->topk[q], ws[q] = c->tw[q];
    CHECK_STATUS(epmoe_layer_ref(&c->ec, &c->lc, c->hw, xs, ids, ws, c->T, c->ref), EPMOE_OK);
}

static inline void layer_case_free(layer_case *c) {
    for (int q = 0; q < c->ec.num_ranks; q++) {
        w4_mat_free(&c->w13[q]), w4_mat_free(&c->w2[q]);
        free(c->x[q]), free(c->topk[q]), free(c->tw[q]), free(c->ref[q]);
    }
}

/* Compare rank q's output with the reference: exact (max_l2 == 0) or relative L2 <= max_l2. */
static inline void layer_check(const layer_case *c, int q, const uint16_t *out, double max_l2, const char *name) {
    const int64_t n = (int64_t)c->T[q] * c->ec.hidden;
    long differ = 0;
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        const double a = epmoe_bf16_to_float(out[i]), b = epmoe_bf16_to_float(c->ref[q][i]);
        differ += out[i] != c->ref[q][i];
        num += (a - b) * (a - b), den += b * b;
    }
    const double rel = sqrt(num / (den > 0 ? den : 1));
    if (max_l2 == 0) CHECK(differ == 0, "%s rank %d: %ld of %lld outputs differ from the reference", name, q, differ, (long long)n);
    else CHECK(rel <= max_l2, "%s rank %d: rel. L2 %.3e above %.3e", name, q, rel, max_l2);
    CHECK(n == 0 || den > 0, "%s rank %d: the reference is all zero (the test would prove nothing)", name, q);
}

#endif
