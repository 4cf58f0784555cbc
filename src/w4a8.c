/*
** w4a8.c — the host side of the W4A8 expert MLP: weight repack (checkpoint -> kernel layout),
** argument checks shared with the CUDA entries, the MLP workspace layout, and the CPU
** references of the GEMM and the MLP (fp64 accumulation over the dequantized operands).
*/
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "format.h"
#include "internal.h"
#include "par_for.h"
#include "w4a8_layout.h"

/* The shared dimension check asks for multiples of 128: the W4A8 tile and scale group. */
_Static_assert(W4_TILE_N == EPMOE_GROUP && W4_GROUP == EPMOE_GROUP, "check_dims assumes 128-wide tiles and groups");

/* ---- checks shared with experts.c (declared in internal.h) ---------------------------- */

static int misaligned(const void *p, unsigned a) { return ((uintptr_t)p & (uintptr_t)(a - 1)) != 0; }

epmoe_status epmoe__need(const char *fn, const void *p, const char *name, unsigned align) {
    if (!p) return epmoe__fail(EPMOE_ERR_NULL_POINTER, "%s: %s is NULL", fn, name);
    if (align > 1 && misaligned(p, align))
        return epmoe__fail(EPMOE_ERR_MISALIGNED, "%s: %s = %p is not %u-byte aligned", fn, name, p, align);
    return EPMOE_OK;
}

/* An output must not share a byte with an input or another output: the kernels read and write them
** in different orders, so an overlap is garbage, not an in-place op. */
epmoe_status epmoe__need_apart(const char *fn, const void *a, size_t an, const char *a_name, const void *b, size_t bn,
                               const char *b_name) {
    const uintptr_t x = (uintptr_t)a, y = (uintptr_t)b;
    return x < y + bn && y < x + an ? epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: %s overlaps %s", fn, a_name, b_name) : EPMOE_OK;
}

size_t epmoe__out_span(int64_t E, int64_t M, int64_t N, int64_t row_stride, int64_t expert_stride) {
    return E == 0 || M == 0 ? 0 : (size_t)((E - 1) * expert_stride + (M - 1) * row_stride + N) * 2;
}

epmoe_status epmoe__acts_apart(const char *fn, const void *o, size_t on, const char *o_name, const void *a, size_t an,
                               const int32_t *masked_m, int64_t E, const void *a_scales, size_t sn) {
    if (on == 0) return EPMOE_OK;
    EPMOE_CHECK(epmoe__need_apart(fn, o, on, o_name, a, an, "a"));
    EPMOE_CHECK(epmoe__need_apart(fn, o, on, o_name, masked_m, (size_t)E * 4, "masked_m"));
    return epmoe__need_apart(fn, o, on, o_name, a_scales, sn, "a_scales");
}

epmoe_status epmoe__weights_apart(const char *fn, const void *o, size_t on, const char *o_name, const char *w_name,
                                  const char *data_field, const void *data, size_t dn, const void *scales, size_t sn) {
    if (on == 0) return EPMOE_OK;
    char name[48];
    snprintf(name, sizeof name, "%s.%s", w_name, data_field);
    EPMOE_CHECK(epmoe__need_apart(fn, o, on, o_name, data, dn, name));
    snprintf(name, sizeof name, "%s.scales", w_name);
    return epmoe__need_apart(fn, o, on, o_name, scales, sn, name);
}

/* An output (or workspace) of a W4A8 GEMM or MLP apart from a repacked weight matrix
** (epmoe_w4a8_repack_size's bytes, checked dimensions) and from the per-tensor scales of mode (b). */
static epmoe_status w4_weights_apart(const char *fn, const void *o, size_t on, const char *o_name, const char *w_name,
                                     const epmoe_w4a8_weights *w) {
    const size_t qb = (size_t)(w->E * w->N * w->K / 2), sb = (size_t)(w->E * w->N * (w->K / W4_GROUP)) * sizeof(uint16_t);
    return epmoe__weights_apart(fn, o, on, o_name, w_name, "qweight", w->qweight, qb, w->scales, sb);
}
static epmoe_status tensor_scales_apart(const char *fn, const void *o, size_t on, const char *o_name, const float *s1,
                                        const float *s2) {
    if (on == 0) return EPMOE_OK;
    EPMOE_CHECK(epmoe__need_apart(fn, o, on, o_name, s1, s1 ? 4 : 0, "a_tensor_scale"));
    return epmoe__need_apart(fn, o, on, o_name, s2, s2 ? 4 : 0, "a2_tensor_scale");
}

epmoe_status epmoe__check_dims(const char *fn, const char *what, int64_t E, int64_t N, int64_t K) {
    if (E < 0 || E > EPMOE__MAX_EXPERTS)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: %s E = %lld must be in [0, %d]", fn, what, (long long)E,
                           EPMOE__MAX_EXPERTS);
    if (N <= 0 || N % EPMOE_GROUP || N > EPMOE__MAX_DIM)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: %s N = %lld must be a positive multiple of %d, at most %lld", fn,
                           what, (long long)N, EPMOE_GROUP, (long long)EPMOE__MAX_DIM);
    if (K <= 0 || K % EPMOE_GROUP || K > EPMOE__MAX_DIM)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: %s K = %lld must be a positive multiple of %d, at most %lld", fn,
                           what, (long long)K, EPMOE_GROUP, (long long)EPMOE__MAX_DIM);
    return EPMOE_OK;
}

epmoe_status epmoe__check_out(const char *fn, int64_t E, int64_t M, int64_t N, const uint16_t *out, int64_t row_stride,
                              int64_t expert_stride) {
    /* bounded first, so the products below cannot overflow int64 */
    if (row_stride > (INT64_C(1) << 38) || expert_stride < 0 || expert_stride > (INT64_C(1) << 50))
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: out strides %lld, %lld are out of range", fn, (long long)row_stride,
                           (long long)expert_stride);
    if (row_stride < N)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: out_row_stride = %lld must be >= N = %lld", fn, (long long)row_stride, (long long)N);
    if (M > 0 && E > 1 && expert_stride < (M - 1) * row_stride + N)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: out_expert_stride = %lld overlaps the previous expert's %lld rows", fn,
                           (long long)expert_stride, (long long)M);
    if (E == 0 || M == 0) return EPMOE_OK;
    return epmoe__need(fn, out, "out", 2);
}

/* silu(gate) * up of one row, rounded to bf16 (the input of the FP8 cast, or of a bf16 GEMM2).
** The kernels use the same expression; expf may differ by an ulp between libm and CUDA (the
** tests allow for it). */
void epmoe__silu_mul_row(const uint16_t *gate_up, int64_t I, uint16_t *y) {
    for (int64_t j = 0; j < I; j++) {
        const float gt = fmt_bf16_to_float(gate_up[j]), up = fmt_bf16_to_float(gate_up[I + j]);
        const float s = gt / (1.0f + expf(-gt));
        y[j] = fmt_bf16_from_float(s * up);
    }
}

/* ---- repack ---------------------------------------------------------------------------- */

epmoe_status epmoe_w4a8_repack_size(int64_t E, int64_t N, int64_t K, size_t *qweight_bytes, size_t *scale_bytes) {
    static const char fn[] = "epmoe_w4a8_repack_size";
    EPMOE_CHECK(epmoe__check_dims(fn, "weights", E, N, K));
    EPMOE_CHECK(epmoe__need(fn, qweight_bytes, "qweight_bytes", 1));
    EPMOE_CHECK(epmoe__need(fn, scale_bytes, "scale_bytes", 1));
    *qweight_bytes = (size_t)(E * N * K / 2);
    *scale_bytes = (size_t)(E * N * (K / W4_GROUP)) * sizeof(uint16_t); /* bf16 */
    return EPMOE_OK;
}

epmoe_status epmoe_w4a8_repack(const int8_t *ckpt_w, const void *ckpt_scales, epmoe_dtype scale_dtype, int64_t group,
                               int64_t E, int64_t N, int64_t K, void *qweight, uint16_t *scales, int *encoding) {
    static const char fn[] = "epmoe_w4a8_repack";
    EPMOE_CHECK(epmoe__check_dims(fn, "weights", E, N, K));
    if (group <= 0) return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: group size %lld must be positive", fn, (long long)group);
    if (group != W4_GROUP)
        return epmoe__fail(EPMOE_ERR_UNSUPPORTED, "%s: group size %lld (only %d is supported)", fn, (long long)group, W4_GROUP);
    if (scale_dtype != EPMOE_F32 && scale_dtype != EPMOE_BF16)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: scale_dtype %d must be EPMOE_F32 or EPMOE_BF16", fn, scale_dtype);
    EPMOE_CHECK(epmoe__need(fn, encoding, "encoding", 1));
    if (*encoding != EPMOE_W4_AUTO && *encoding != EPMOE_W4_SYM7 && *encoding != EPMOE_W4_FULL)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: encoding %d is not an epmoe_w4_encoding", fn, *encoding);
    if (E == 0) { /* no weights, no -8: AUTO resolves as it would for any set without one */
        if (*encoding == EPMOE_W4_AUTO) *encoding = EPMOE_W4_SYM7;
        return EPMOE_OK;
    }
    EPMOE_CHECK(epmoe__need(fn, ckpt_w, "ckpt_w", 1));
    EPMOE_CHECK(epmoe__need(fn, ckpt_scales, "ckpt_scales", 1));
    EPMOE_CHECK(epmoe__need(fn, qweight, "qweight", 1));
    EPMOE_CHECK(epmoe__need(fn, scales, "scales", 1));

    const int64_t G = K / W4_GROUP, n_bytes = E * N * K / 2;
    const uint8_t *w = (const uint8_t *)ckpt_w;
    int has_m8 = 0;
    for (int64_t i = 0; i < n_bytes && !has_m8; i++) has_m8 = (w[i] & 0xFu) == 8u || (w[i] >> 4) == 8u;
    if (*encoding == EPMOE_W4_SYM7 && has_m8)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: encoding SYM7 was asked for but a weight is -8 (use FULL or AUTO)", fn);
    const int full = *encoding == EPMOE_W4_FULL || (*encoding == EPMOE_W4_AUTO && has_m8);

    for (int64_t i = 0; i < E * N * G; i++) {
        float s;
        if (scale_dtype == EPMOE_F32) { /* memcpy: the checkpoint's array may sit at any address */
            memcpy(&s, (const uint8_t *)ckpt_scales + 4 * i, 4);
        } else {
            uint16_t h;
            memcpy(&h, (const uint8_t *)ckpt_scales + 2 * i, 2);
            s = fmt_bf16_to_float(h);
        }
        /* s * 2^9 is exact (an fp32 overflow becomes inf); one rounding, to bf16: none from bf16
        ** checkpoints. Past (2 - 2^-8) * 2^127 it rounds to inf, so the bound on s is that / 2^9. */
        const uint16_t b = fmt_bf16_from_float(s * W4_SCALE_FOLD + 0.0f); /* + 0: -0 stored as +0 */
        if (!(s >= 0.0f) || (b & 0x7F80u) == 0x7F80u)
            return epmoe__fail(EPMOE_ERR_INVALID_ARG,
                               "%s: weight scale %lld is %g (must be finite, >= 0 and < %g, so that scale * 512 fits a bf16)",
                               fn, (long long)i, (double)s, ldexp(2.0 - 1.0 / 256, 127) / W4_SCALE_FOLD);
        const int64_t e = i / (N * G), n = (i / G) % N, g = i % G;
        scales[w4_scale_index(N, K, e, n, g)] = b;
    }
    uint8_t *out = (uint8_t *)qweight;
    memset(out, 0, (size_t)n_bytes);
    for (int64_t e = 0; e < E; e++)
        for (int64_t n = 0; n < N; n++)
            for (int64_t k = 0; k < K; k++) {
                const uint8_t b = w[((e * N + n) * K + k) / 2];
                const int v = (k & 1) ? fmt_int4_hi(b) : fmt_int4_lo(b);
                const w4_pos p = w4_locate(N, K, e, n, k);
                uint32_t q;
                memcpy(&q, out + p.word, 4);
                q = w4_word_set(q, p.hi, p.b, v, full);
                memcpy(out + p.word, &q, 4);
            }
    *encoding = full ? EPMOE_W4_FULL : EPMOE_W4_SYM7;
    return EPMOE_OK;
}

epmoe_status epmoe__check_w4a8_weights(const char *fn, const char *what, const epmoe_w4a8_weights *w, int device) {
    EPMOE_CHECK(epmoe__check_dims(fn, what, w->E, w->N, w->K));
    if (w->encoding != EPMOE_W4_SYM7 && w->encoding != EPMOE_W4_FULL)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: %s encoding %d must be EPMOE_W4_SYM7 or EPMOE_W4_FULL (from the repack)",
                           fn, what, w->encoding);
    if (w->E == 0) return EPMOE_OK;
    EPMOE_CHECK(epmoe__need(fn, w->qweight, "qweight", device ? 16 : 1));
    EPMOE_CHECK(epmoe__need(fn, w->scales, "scales", device ? 16 : 2));
    return EPMOE_OK;
}

/* Scale (e, n, g) of repacked weights in checkpoint units: exact (bf16 -> fp64, / 2^9). */
static double scale_at(const epmoe_w4a8_weights *w, int64_t e, int64_t n, int64_t g) {
    return (double)fmt_bf16_to_float(w->scales[w4_scale_index(w->N, w->K, e, n, g)]) / W4_SCALE_FOLD;
}

epmoe_status epmoe_w4a8_unpack(const epmoe_w4a8_weights *w, int64_t e, int64_t n, int64_t k, int *value, float *scale) {
    static const char fn[] = "epmoe_w4a8_unpack";
    EPMOE_CHECK(epmoe__need(fn, w, "w", 1));
    EPMOE_CHECK(epmoe__check_w4a8_weights(fn, "w", w, 0));
    EPMOE_CHECK(epmoe__need(fn, value, "value", 1));
    EPMOE_CHECK(epmoe__need(fn, scale, "scale", 1));
    if (e < 0 || e >= w->E || n < 0 || n >= w->N || k < 0 || k >= w->K)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: (e, n, k) = (%lld, %lld, %lld) is outside [%lld, %lld, %lld]", fn,
                           (long long)e, (long long)n, (long long)k, (long long)w->E, (long long)w->N, (long long)w->K);
    const w4_pos p = w4_locate(w->N, w->K, e, n, k);
    uint32_t q;
    memcpy(&q, (const uint8_t *)w->qweight + p.word, 4);
    *value = w4_word_get(q, p.hi, p.b, w->encoding == EPMOE_W4_FULL);
    *scale = (float)scale_at(w, e, n, k / W4_GROUP);
    return EPMOE_OK;
}

/* The activation side of a GEMM: a [E, M, K] fp8 plus scales in one of the two modes. */
static epmoe_status check_acts(const char *fn, int64_t E, int64_t M, int64_t K, const uint8_t *a, const int32_t *masked_m,
                               const void *a_scales, int fmt, const float *a_tensor_scale, int device) {
    if (M < 0 || M > EPMOE__MAX_DIM)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: M = %lld is out of range", fn, (long long)M);
    if (a_scales && (fmt < EPMOE_SCALE_F32_ROW || fmt > EPMOE_SCALE_UE8M0_MMAJOR))
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: a_scale_fmt %d is not an epmoe_scale_fmt", fn, fmt);
    if (E == 0 || M == 0) return EPMOE_OK;
    EPMOE_CHECK(epmoe__need(fn, a, "a", device ? 16 : 1));
    EPMOE_CHECK(epmoe__need(fn, masked_m, "masked_m", 4));
    if (a_scales) EPMOE_CHECK(epmoe__need(fn, a_scales, "a_scales", 4));
    else if (!a_tensor_scale)
        return epmoe__fail(EPMOE_ERR_NULL_POINTER, "%s: a_scales and a_tensor_scale are both NULL (one activation scale mode is needed)", fn);
    else EPMOE_CHECK(epmoe__need(fn, a_tensor_scale, "a_tensor_scale", 4));
    (void)K;
    return EPMOE_OK;
}

/* Bytes of the activations' group scales (0 in mode b: none). */
static size_t a_scale_bytes(const void *a_scales, int fmt, int64_t E, int64_t M, int64_t K) {
    return a_scales ? (size_t)E * epmoe_scale_bytes((epmoe_scale_fmt)fmt, M, K) : 0;
}

/* A region the GEMM writes, [o, o + on), apart from everything it reads: the activations, their
** scales, masked_m, the weights and (mode b) the per-tensor scale. */
static epmoe_status gemm_reads_apart(const char *fn, const epmoe_w4a8_gemm_args *g, const void *o, size_t on,
                                     const char *o_name) {
    const int64_t E = g->w.E, M = g->M, K = g->w.K;
    EPMOE_CHECK(epmoe__acts_apart(fn, o, on, o_name, g->a, (size_t)(E * M * K), g->masked_m, E, g->a_scales,
                                  a_scale_bytes(g->a_scales, g->a_scale_fmt, E, M, K)));
    EPMOE_CHECK(w4_weights_apart(fn, o, on, o_name, "w", &g->w));
    return tensor_scales_apart(fn, o, on, o_name, g->a_scales ? NULL : g->a_tensor_scale, NULL);
}
static size_t out_bytes(const epmoe_w4a8_gemm_args *g) {
    return epmoe__out_span(g->w.E, g->M, g->w.N, g->out_row_stride, g->out_expert_stride);
}

/* The wgmma GEMM (w4a8_gemm.cu) counts its work items (expert, 128-row weight tile, token tile of
** min_tile or more) in 32 bits: a 64-bit division at each item change cost 1-3% (find_item; H200
** 2026-11-30). Its TMA tensor maps address rows with 32-bit signed coordinates: the activations'
** E * M, and with tma_weights (fp8-block's and bf16's checkpoint weights) the weights' E * N. Each
** CTA keeps 2E + 1 ints (m-tiles before each expert, each expert's rows) in shared memory beside its
** stage ring: with the largest (int4 at 128 tokens: 7 x 25 KB and the 32 KB tile its storer warps
** store) that fits the 227 KB a block may have to E = 2404, so the GPU entries take E <= 2048 (T = 80
** keeps 2 CTAs an SM to E = 2026). */
#define EPMOE__MAX_WGMMA_EXPERTS 2048
epmoe_status epmoe__check_wgmma_limits(const char *fn, int64_t E, int64_t M, int64_t N, int min_tile, int tma_weights) {
    if (E > EPMOE__MAX_WGMMA_EXPERTS)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG,
                           "%s: E = %lld experts > %d (the GPU kernel keeps 2E + 1 ints in shared memory beside its stages)", fn,
                           (long long)E, EPMOE__MAX_WGMMA_EXPERTS);
    if ((double)E * (double)((M + min_tile - 1) / min_tile) * (double)(N / W4_TILE_N) >= 2147483648.0)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG,
                           "%s: E = %lld x ceil(M = %lld / %d) x N = %lld / 128 work items >= 2^31 (the GPU kernel's limit)",
                           fn, (long long)E, (long long)M, min_tile, (long long)N);
    if ((double)E * (double)M >= 2147483648.0)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: E = %lld x M = %lld activation rows >= 2^31 (the GPU kernel's limit)", fn,
                           (long long)E, (long long)M);
    if (tma_weights && (double)E * (double)N >= 2147483648.0)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: E = %lld x N = %lld weight rows >= 2^31 (the GPU kernel's limit)", fn,
                           (long long)E, (long long)N);
    return EPMOE_OK;
}

epmoe_status epmoe__check_w4a8_gemm(const char *fn, const epmoe_w4a8_gemm_args *g, int device) {
    EPMOE_CHECK(epmoe__need(fn, g, "args", 1));
    EPMOE_CHECK(epmoe__check_w4a8_weights(fn, "w", &g->w, device));
    EPMOE_CHECK(check_acts(fn, g->w.E, g->M, g->w.K, g->a, g->masked_m, g->a_scales, g->a_scale_fmt, g->a_tensor_scale, device));
    EPMOE_CHECK(epmoe__check_out(fn, g->w.E, g->M, g->w.N, g->out, g->out_row_stride, g->out_expert_stride));
    if (g->expected_m < 0)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: expected_m = %lld must be >= 0", fn, (long long)g->expected_m);
    if (device) EPMOE_CHECK(epmoe__check_wgmma_limits(fn, g->w.E, g->M, g->w.N, 8, 0));
    return gemm_reads_apart(fn, g, g->out, out_bytes(g), "out");
}

epmoe_status epmoe__w4a8_workspace_apart(const char *fn, const epmoe_w4a8_gemm_args *g, size_t ws) {
    EPMOE_CHECK(gemm_reads_apart(fn, g, g->workspace, ws, "workspace"));
    return epmoe__need_apart(fn, g->out, out_bytes(g), "out", g->workspace, ws, "workspace");
}

/* ---- MLP workspace: the one layout function of the buffer ------------------------------ */

size_t epmoe__mlp_layout(int64_t E, int64_t M, int64_t H, int64_t I, size_t *gate_up, size_t *inter, size_t *inter_scales,
                         size_t *gemm) {
    (void)H;
    size_t off = 0;
    *gemm = off; /* first: its launch counter stays put when M changes */
    off = epmoe__align256(off + epmoe_w4a8_gemm_workspace());
    *gate_up = off;
    off = epmoe__align256(off + (size_t)(E * M * 2 * I) * 2); /* bf16 [E, M, 2I] */
    *inter = off;
    off = epmoe__align256(off + (size_t)(E * M * I));         /* fp8 [E, M, I] */
    *inter_scales = off;
    off = epmoe__align256(off + (size_t)(E * M * (I / W4_GROUP)) * 4); /* f32 row-major [E, M, I/128] */
    return off;
}

size_t epmoe_w4a8_mlp_workspace(int64_t E, int64_t M, int64_t H, int64_t I) {
    if (E < 0 || M < 0 || H <= 0 || I <= 0 || E > EPMOE__MAX_EXPERTS || M > EPMOE__MAX_DIM || I > EPMOE__MAX_DIM ||
        H > EPMOE__MAX_DIM || H % W4_GROUP || I % W4_GROUP) /* the MLP's K (H, then I): multiples of 128 */
        return 0;
    size_t a, b, c, d;
    return epmoe__mlp_layout(E, M, H, I, &a, &b, &c, &d);
}

epmoe_status epmoe__check_w4a8_mlp(const char *fn, const epmoe_w4a8_mlp_args *m, int device) {
    EPMOE_CHECK(epmoe__need(fn, m, "args", 1));
    EPMOE_CHECK(epmoe__check_w4a8_weights(fn, "w13", &m->w13, device));
    EPMOE_CHECK(epmoe__check_w4a8_weights(fn, "w2", &m->w2, device));
    const int64_t E = m->w13.E, H = m->w13.K, I = m->w2.K;
    if (m->w2.E != E || m->w13.N != 2 * I || m->w2.N != H)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG,
                           "%s: w13 [%lld, %lld, %lld] and w2 [%lld, %lld, %lld] must be [E, 2I, H] and [E, H, I]", fn,
                           (long long)m->w13.E, (long long)m->w13.N, (long long)m->w13.K, (long long)m->w2.E,
                           (long long)m->w2.N, (long long)m->w2.K);
    EPMOE_CHECK(check_acts(fn, E, m->M, H, m->a, m->masked_m, m->a_scales, m->a_scale_fmt, m->a_tensor_scale, device));
    if (!m->a_scales && E > 0 && m->M > 0) EPMOE_CHECK(epmoe__need(fn, m->a2_tensor_scale, "a2_tensor_scale", 4));
    EPMOE_CHECK(epmoe__check_out(fn, E, m->M, H, m->out, m->out_row_stride, m->out_expert_stride));
    if (m->expected_m < 0)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: expected_m = %lld must be >= 0", fn, (long long)m->expected_m);
    if (device) EPMOE_CHECK(epmoe__check_wgmma_limits(fn, E, m->M, H > 2 * I ? H : 2 * I, 8, 0));
    if (E == 0 || m->M == 0) return EPMOE_OK;
    const size_t ws = epmoe_w4a8_mlp_workspace(E, m->M, H, I);
    EPMOE_CHECK(epmoe__need(fn, m->workspace, "workspace", device ? 256 : 16));
    if (m->workspace_bytes < ws)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: workspace_bytes = %zu, need epmoe_w4a8_mlp_workspace() = %zu", fn,
                           m->workspace_bytes, ws);
    const size_t on = epmoe__out_span(E, m->M, H, m->out_row_stride, m->out_expert_stride), an = (size_t)(E * m->M * H);
    const size_t sn = a_scale_bytes(m->a_scales, m->a_scale_fmt, E, m->M, H);
    EPMOE_CHECK(epmoe__acts_apart(fn, m->out, on, "out", m->a, an, m->masked_m, E, m->a_scales, sn));
    EPMOE_CHECK(epmoe__acts_apart(fn, m->workspace, ws, "workspace", m->a, an, m->masked_m, E, m->a_scales, sn));
    const float *s1 = m->a_scales ? NULL : m->a_tensor_scale, *s2 = m->a_scales ? NULL : m->a2_tensor_scale;
    for (int i = 0; i < 2; i++) { /* the output, then the workspace */
        const void *o = i ? m->workspace : (const void *)m->out;
        const size_t n = i ? ws : on;
        const char *name = i ? "workspace" : "out";
        EPMOE_CHECK(w4_weights_apart(fn, o, n, name, "w13", &m->w13));
        EPMOE_CHECK(w4_weights_apart(fn, o, n, name, "w2", &m->w2));
        EPMOE_CHECK(tensor_scales_apart(fn, o, n, name, s1, s2));
    }
    return epmoe__need_apart(fn, m->out, on, "out", m->workspace, ws, "workspace");
}

/* ---- references ------------------------------------------------------------------------ */

static float act_scale(const epmoe_w4a8_gemm_args *g, int64_t e, int64_t m, int64_t grp) {
    if (!g->a_scales) return *g->a_tensor_scale;
    const int64_t G = g->w.K / W4_GROUP;
    const uint8_t *slab = (const uint8_t *)g->a_scales + (size_t)e * (size_t)fmt_scale_slab_bytes(g->a_scale_fmt, g->M, G);
    return fmt_scale_load(slab, g->a_scale_fmt, g->M, G, m, grp);
}

/* Output rows n in [begin, end) of one expert: par_for's body (each element alone, in a fixed order). */
typedef struct w4_rows {
    const epmoe_w4a8_gemm_args *g;
    int64_t e, rows;
    const float *av;  /* the expert's fp8 activations as fp32 [rows, K] (exact) */
    const double *sa; /* their scales [rows, K/128] (the per-tensor scale in every slot in mode b) */
    int oom;          /* set by a range that could not allocate its weight row */
} w4_rows;

static void w4a8_gemm_rows(void *p, int64_t begin, int64_t end) {
    w4_rows *j = (w4_rows *)p;
    const epmoe_w4a8_gemm_args *g = j->g;
    const int64_t N = g->w.N, K = g->w.K, G = K / W4_GROUP, e = j->e;
    const int full = g->w.encoding == EPMOE_W4_FULL;
    double *sw = par_scratch((size_t)G * sizeof(double) + (size_t)K, &j->oom);
    if (!sw) return;
    int8_t *wrow = (int8_t *)(sw + G);
    for (int64_t n = begin; n < end; n++) {
        for (int64_t k = 0; k < K; k++) {
            const w4_pos pos = w4_locate(N, K, e, n, k);
            uint32_t q;
            memcpy(&q, (const uint8_t *)g->w.qweight + pos.word, 4);
            wrow[k] = (int8_t)w4_word_get(q, pos.hi, pos.b, full);
        }
        for (int64_t jg = 0; jg < G; jg++) sw[jg] = scale_at(&g->w, e, n, jg);
        for (int64_t m = 0; m < j->rows; m++) {
            double acc = 0.0;
            for (int64_t jg = 0; jg < G; jg++) {
                double part = 0.0;
                for (int64_t k = jg * W4_GROUP; k < (jg + 1) * W4_GROUP; k++) part += (double)j->av[m * K + k] * wrow[k];
                acc += j->sa[m * G + jg] * sw[jg] * part;
            }
            g->out[e * g->out_expert_stride + m * g->out_row_stride + n] = fmt_bf16_from_float((float)acc);
        }
    }
    free(sw);
}

epmoe_status epmoe_w4a8_gemm_ref(const epmoe_w4a8_gemm_args *g) {
    static const char fn[] = "epmoe_w4a8_gemm_ref";
    EPMOE_CHECK(epmoe__check_w4a8_gemm(fn, g, 0));
    const int64_t E = g->w.E, N = g->w.N, K = g->w.K, M = g->M, G = K / W4_GROUP;
    if (E == 0 || M == 0) return EPMOE_OK;
    double *sa = malloc((size_t)(M * G) * sizeof(double));
    float *av = malloc((size_t)(M * K) * sizeof(float));
    w4_rows job = {g, 0, 0, av, sa, 0};
    for (int64_t e = 0; e < E && av && sa && !job.oom; e++) {
        const int64_t rows = epmoe__valid_rows(g->masked_m, e, M);
        if (rows == 0) continue;
        for (int64_t m = 0; m < rows; m++)
            for (int64_t k = 0; k < K; k++) av[m * K + k] = fmt_fp8_to_float(g->a[(e * M + m) * K + k]);
        for (int64_t m = 0; m < rows; m++)
            for (int64_t jg = 0; jg < G; jg++) sa[m * G + jg] = act_scale(g, e, m, jg);
        job.e = e, job.rows = rows;
        par_for(N, 1 + (1 << 18) / (rows * K), w4a8_gemm_rows, &job);
    }
    const int oom = !av || !sa || job.oom;
    free(sa), free(av);
    if (oom)
        return epmoe__fail(EPMOE_ERR_OUT_OF_MEMORY, "%s: no memory for %lld x %lld activations and a weight row a thread", fn, (long long)M, (long long)K);
    return EPMOE_OK;
}

epmoe_status epmoe_w4a8_mlp_ref(const epmoe_w4a8_mlp_args *m) {
    static const char fn[] = "epmoe_w4a8_mlp_ref";
    EPMOE_CHECK(epmoe__check_w4a8_mlp(fn, m, 0));
    const int64_t E = m->w13.E, M = m->M, H = m->w13.K, I = m->w2.K, G2 = I / W4_GROUP;
    if (E == 0 || M == 0) return EPMOE_OK;
    size_t o_gu, o_in, o_sc, o_gemm;
    epmoe__mlp_layout(E, M, H, I, &o_gu, &o_in, &o_sc, &o_gemm);
    uint16_t *gate_up = (uint16_t *)((uint8_t *)m->workspace + o_gu);
    uint8_t *inter = (uint8_t *)m->workspace + o_in;
    float *inter_scales = (float *)((uint8_t *)m->workspace + o_sc);

    epmoe_w4a8_gemm_args g1 = {m->w13, m->a, M, m->masked_m, m->a_scales, m->a_scale_fmt, m->a_tensor_scale,
                               gate_up, 2 * I, M * 2 * I, m->expected_m, NULL, 0};
    EPMOE_CHECK(epmoe_w4a8_gemm_ref(&g1));
    uint16_t *y = malloc((size_t)I * 2);
    if (!y) return epmoe__fail(EPMOE_ERR_OUT_OF_MEMORY, "%s: no memory", fn);
    for (int64_t e = 0; e < E; e++) {
        const int64_t rows = epmoe__valid_rows(m->masked_m, e, M);
        for (int64_t r = 0; r < rows; r++) {
            const int64_t row = e * M + r;
            epmoe__silu_mul_row(gate_up + row * 2 * I, I, y);
            epmoe_status st = m->a_scales
                                  ? epmoe_cast_group_fp8_ref(y, 1, I, inter + row * I, inter_scales + row * G2, EPMOE_SCALE_F32_ROW, 0)
                                  : epmoe_cast_tensor_fp8_ref(y, I, m->a2_tensor_scale, inter + row * I);
            if (st != EPMOE_OK) {
                free(y);
                return st;
            }
        }
    }
    free(y);
    epmoe_w4a8_gemm_args g2 = {m->w2, inter, M, m->masked_m, m->a_scales ? (const void *)inter_scales : NULL,
                               EPMOE_SCALE_F32_ROW, m->a2_tensor_scale, m->out, m->out_row_stride, m->out_expert_stride,
                               m->expected_m, NULL, 0};
    return epmoe_w4a8_gemm_ref(&g2);
}
