/*
** layer_common.h — what the CPU and GPU tests of the MoE layer share: one case (EP config, layer
** config, per-rank weights of its scheme: W4A8 in checkpoint form and repacked, or bf16 / fp8-block
** / int4 in their checkpoint layouts; tokens, routing), the reference output from epmoe_layer_ref,
** the comparison, and an fp64 model of the whole layer.
**
** Error model against the reference (host fp64 MLP, fp32 combine in top-k order):
**   CPU backend, REDUCE_AT_OWNER: the same functions on the same bytes -> bit-exact.
**   CPU backend, REDUCE_AT_EXPERT: each rank's partial sum is rounded to bf16 once before the
**     owner adds them: relative L2 <= LAYER_PARTIAL_L2 (2^-8: a few bf16 half-ulps summed).
**   GPU: the MLP on the tensor cores flips some fp8 roundings of the intermediate (see
**     test_w4a8_gpu.c: rel. L2 ~1e-2 at the MLP output); LAYER_GPU_L2 bounds the layer output.
**
** Error model against the fp64 model (layer_model: the dequantized weights and the bf16 tokens
** exactly, no rounding anywhere else): every rounding on the way moves each element by at most its
** format's unit roundoff u (bf16 2^-8, e4m3 2^-4, for normal values), so the relative L2 error of
** that stage is at most u, and the linear maps that follow (random weights) carry a relative L2
** error through without growing it on average. The layer's error is at most the sum over its
** roundings: to fp8 (fp8 schemes: the tokens and the intermediate, 2 u8, and a third in the
** per-tensor compat mode on the FP8 wire, whose tokens are cast at send and requantized at
** receive), gate and up (2 u16), silu·up (u16), the expert output (u16), the bf16 partial sum
** (REDUCE_AT_EXPERT, u16) and the layer output (u16): LAYER_MODEL_L2(fp8 roundings, partial).
** Static per-tensor scales are calibrated (amax / 448, layer_calibrate) so that nothing saturates.
*/
#ifndef EPMOE_LAYER_COMMON_H
#define EPMOE_LAYER_COMMON_H

#include "experts_common.h"

#define LAYER_PARTIAL_L2 (1.0 / 256)
#define LAYER_GPU_L2 3e-2
#define LAYER_MAX_R 4
#define LAYER_U_BF16 (1.0 / 256)
#define LAYER_U_FP8 (1.0 / 16)
#define LAYER_MODEL_L2(n_fp8, partial) ((n_fp8) * LAYER_U_FP8 + (5.0 + (partial)) * LAYER_U_BF16)

typedef struct layer_case {
    epmoe_ep_config ec;
    epmoe_layer_config lc;
    int T[LAYER_MAX_R];
    uint64_t seed;
    int64_t group;                           /* w4a16: the INT4 group (0: 128) */
    int num_routed;                          /* > 0: top-k ids drawn from [0, num_routed) only */
    w4_mat w13[LAYER_MAX_R], w2[LAYER_MAX_R]; /* w4afp8 */
    xw_mat e13[LAYER_MAX_R], e2[LAYER_MAX_R]; /* bf16, w8a8_fp8_block, w4a16 */
    float a1, a2;
    epmoe_layer_weights hw[LAYER_MAX_R]; /* host pointers */
    uint16_t *x[LAYER_MAX_R];
    int32_t *topk[LAYER_MAX_R];
    float *tw[LAYER_MAX_R];
    uint16_t *ref[LAYER_MAX_R];
} layer_case;

/* Weight (n, k) of local expert le of rank q, dequantized (w13 when up = 1, else w2): exact (W4A8:
** with the scale as repacked, rounded to bf16; w4a8_common.h). */
static inline double layer_weight(const layer_case *c, int up, int q, int64_t le, int64_t n, int64_t k) {
    if (c->lc.scheme != EPMOE_SCHEME_W4AFP8) return xw_value(up ? &c->e13[q] : &c->e2[q], le, n, k);
    const w4_mat *w = up ? &c->w13[q] : &c->w2[q];
    return w4_ckpt_value(w, le, n, k) * w4_ckpt_scale(w, le, n, k / 128);
}

/* The fp64 model's intermediate of token x at global expert e: h[0, I) = silu(g) * u, where
** [g | u] = W13_e x (h has room for 2I); returns max |h[i]|. */
static inline double layer_model_inter(const layer_case *c, int e, const uint16_t *x, double *h) {
    const int H = c->ec.hidden, L = c->ec.num_experts / c->ec.num_ranks, owner = e / L, le = e % L;
    const int64_t I = c->lc.intermediate;
    double amax = 0;
    for (int64_t n = 0; n < 2 * I; n++) {
        double acc = 0;
        for (int k = 0; k < H; k++) acc += layer_weight(c, 1, owner, le, n, k) * epmoe_bf16_to_float(x[k]);
        h[n] = acc;
    }
    for (int64_t i = 0; i < I; i++) {
        h[i] = h[i] / (1.0 + exp(-h[i])) * h[I + i];
        amax = fmax(amax, fabs(h[i]));
    }
    return amax;
}

/* The fp64 model of rank q's output [T, H]: sum_j w_j * W2_e (silu(g) * u), [g | u] = W13_e x. */
static inline double *layer_model(const layer_case *c, int q) {
    const int H = c->ec.hidden, k = c->ec.top_k, L = c->ec.num_experts / c->ec.num_ranks;
    const int64_t I = c->lc.intermediate;
    double *out = calloc((size_t)c->T[q] * H + 1, sizeof(double)), *h = malloc((size_t)(2 * I) * sizeof(double));
    for (int t = 0; t < c->T[q]; t++)
        for (int j = 0; j < k; j++) {
            const int e = c->topk[q][t * k + j];
            if (e < 0) continue;
            layer_model_inter(c, e, c->x[q] + (int64_t)t * H, h);
            for (int n = 0; n < H; n++) {
                double acc = 0;
                for (int64_t i = 0; i < I; i++) acc += layer_weight(c, 0, e / L, e % L, n, i) * h[i];
                out[(int64_t)t * H + n] += c->tw[q][t * k + j] * acc;
            }
        }
    free(h);
    return out;
}

/* Static per-tensor scales as a checkpoint calibrates them, amax / 448, from the tokens (a1) and
** the model's intermediates (a2): no value saturates, so fp8 keeps its relative precision. */
static inline void layer_calibrate(layer_case *c) {
    const int H = c->ec.hidden, k = c->ec.top_k;
    double *h = malloc((size_t)(2 * c->lc.intermediate) * sizeof(double)), ax = 0, ah = 0;
    for (int q = 0; q < c->ec.num_ranks; q++)
        for (int t = 0; t < c->T[q]; t++) {
            const uint16_t *x = c->x[q] + (int64_t)t * H;
            for (int i = 0; i < H; i++) ax = fmax(ax, fabs(epmoe_bf16_to_float(x[i])));
            for (int j = 0; j < k; j++)
                if (c->topk[q][t * k + j] >= 0) ah = fmax(ah, layer_model_inter(c, c->topk[q][t * k + j], x, h));
        }
    free(h);
    if (ax > 0) c->a1 = (float)(ax / 448);
    if (ah > 0) c->a2 = (float)(ah / 448);
}

static inline void layer_case_make(layer_case *c) {
    test_rng r = {c->seed | 1};
    const int R = c->ec.num_ranks, L = c->ec.num_experts / R, H = c->ec.hidden, k = c->ec.top_k;
    const int64_t I = c->lc.intermediate;
    c->a1 = 0.02f, c->a2 = 0.004f;
    for (int q = 0; q < R; q++) {
        memset(&c->hw[q], 0, sizeof c->hw[q]);
        c->hw[q].a1_scale = &c->a1, c->hw[q].a2_scale = &c->a2;
        if (c->lc.scheme == EPMOE_SCHEME_W4AFP8) {
            w4_mat_make(&r, &c->w13[q], L, 2 * I, H, q & 1, 0.02, EPMOE_W4_AUTO);
            w4_mat_make(&r, &c->w2[q], L, H, I, 0, 0.02, EPMOE_W4_AUTO);
            const epmoe_w4a8_weights w13 = {L, 2 * I, H, c->w13[q].enc, c->w13[q].qw, c->w13[q].sw},
                                     w2 = {L, H, I, c->w2[q].enc, c->w2[q].qw, c->w2[q].sw};
            c->hw[q].w13 = w13, c->hw[q].w2 = w2;
        } else {
            const epmoe_weight_format f = c->lc.scheme == EPMOE_SCHEME_BF16 ? EPMOE_WEIGHT_BF16
                                          : c->lc.scheme == EPMOE_SCHEME_W4A16 ? EPMOE_WEIGHT_INT4
                                                                               : EPMOE_WEIGHT_FP8_BLOCK;
            const int64_t group = c->group ? c->group : 128;
            xw_mat_make(&r, &c->e13[q], f, L, 2 * I, H, group, 0.1);
            xw_mat_make(&r, &c->e2[q], f, L, H, I, group, 0.1);
            c->hw[q].e13 = xw_weights(&c->e13[q]), c->hw[q].e2 = xw_weights(&c->e2[q]);
        }
        const int N = c->ec.max_tokens;
        c->x[q] = malloc((size_t)N * H * 2 + 2);
        c->topk[q] = malloc((size_t)N * k * 4 + 4);
        c->tw[q] = malloc((size_t)N * k * 4 + 4);
        c->ref[q] = malloc((size_t)N * H * 2 + 2);
        for (int t = 0; t < c->T[q]; t++) {
            const double spread = 0.5 + rng_uniform(&r);
            for (int h = 0; h < H; h++) c->x[q][(int64_t)t * H + h] = epmoe_bf16_from_float((float)(rng_normal(&r) * spread));
            for (int j = 0; j < k; j++) {
                int e = (int)(rng_u64(&r) % (uint64_t)(c->num_routed > 0 ? c->num_routed : c->ec.num_experts));
                if (rng_u64(&r) % 5 == 0) e = -1; /* -1 slots */
                c->topk[q][t * k + j] = e;
                c->tw[q][t * k + j] = (float)(0.2 + rng_uniform(&r));
            }
        }
    }
    if (c->lc.per_tensor_act) layer_calibrate(c);
    const uint16_t *xs[LAYER_MAX_R];
    const int32_t *ids[LAYER_MAX_R];
    const float *ws[LAYER_MAX_R];
    for (int q = 0; q < R; q++) xs[q] = c->x[q], ids[q] = c->topk[q], ws[q] = c->tw[q];
    CHECK_STATUS(epmoe_layer_ref(&c->ec, &c->lc, c->hw, xs, ids, ws, c->T, c->ref), EPMOE_OK);
}

static inline void layer_case_free(layer_case *c) {
    for (int q = 0; q < c->ec.num_ranks; q++) {
        if (c->lc.scheme == EPMOE_SCHEME_W4AFP8) w4_mat_free(&c->w13[q]), w4_mat_free(&c->w2[q]);
        else xw_mat_free(&c->e13[q]), xw_mat_free(&c->e2[q]);
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

/* Rank q's output against the fp64 model: relative L2 <= max_l2; returns the relative L2. */
static inline double layer_check_model(const layer_case *c, int q, const uint16_t *out, double max_l2, const char *name) {
    double *want = layer_model(c, q), num = 0, den = 0;
    const int64_t n = (int64_t)c->T[q] * c->ec.hidden;
    for (int64_t i = 0; i < n; i++) {
        const double d = epmoe_bf16_to_float(out[i]) - want[i];
        num += d * d, den += want[i] * want[i];
    }
    free(want);
    const double rel = sqrt(num / (den > 0 ? den : 1));
    CHECK(rel <= max_l2, "%s rank %d: rel. L2 %.3e against the fp64 model, above %.3e", name, q, rel, max_l2);
    return rel;
}

#endif
