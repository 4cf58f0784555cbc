/*
** quant_ref.c — scalar CPU references of the quantization ops: the specification of each
** kernel in src/cuda/ and the oracle of the tests. Float operations are written one per
** statement in the order the kernels perform them (the build uses -ffp-contract=off), so
** both produce identical bytes.
*/
#include <math.h>

#include "format.h"
#include "internal.h"

/* Quantize one group of 128 bf16 values; returns the scale to store (fp32). */
static float cast_group_one(const uint16_t *x, uint8_t *q, int round_scale) {
    float amax = FMT_AMAX_FLOOR;
    for (int i = 0; i < FMT_GROUP; i++) amax = fmaxf(amax, fabsf(fmt_bf16_to_float(x[i]))); /* fmaxf drops NaN */
    float mul, scale_inv;
    fmt_group_scales(amax, round_scale, &mul, &scale_inv);
    for (int i = 0; i < FMT_GROUP; i++) q[i] = fmt_fp8_from_float(fmt_bf16_to_float(x[i]) * mul);
    return scale_inv;
}

static void scale_store(uint8_t *slab, int fmt, int64_t M, int64_t G, int64_t t, int64_t g, float s) {
    uint8_t *p = slab + fmt_scale_offset(fmt, M, G, t, g);
    if (fmt_scale_is_ue8m0(fmt)) *p = fmt_ue8m0_from_float(s);
    else memcpy(p, &s, sizeof s);
}

epmoe_status epmoe_cast_group_fp8_ref(const uint16_t *x, int64_t M, int64_t K, uint8_t *q, void *scales,
                                      epmoe_scale_fmt fmt, int round_scale) {
    EPMOE_CHECK(epmoe__check_cast_group("epmoe_cast_group_fp8_ref", x, M, K, q, scales, fmt, round_scale, 0));
    const int64_t G = K / FMT_GROUP;
    uint8_t *slab = (uint8_t *)scales;
    for (int64_t t = 0; t < M; t++) {
        for (int64_t g = 0; g < G; g++)
            scale_store(slab, fmt, M, G, t, g, cast_group_one(x + t * K + g * FMT_GROUP, q + t * K + g * FMT_GROUP, round_scale != 0));
        for (int64_t g = G; fmt_scale_is_ue8m0(fmt) && g % 4; g++) slab[fmt_scale_offset(fmt, M, G, t, g)] = 0;
    }
    return EPMOE_OK;
}

epmoe_status epmoe_cast_tensor_fp8_ref(const uint16_t *x, int64_t n, const float *scale, uint8_t *q) {
    EPMOE_CHECK(epmoe__check_cast_tensor("epmoe_cast_tensor_fp8_ref", x, n, scale, q, 0));
    if (n == 0) return EPMOE_OK;
    const float inv = 1.0f / *scale;
    for (int64_t i = 0; i < n; i++) q[i] = fmt_fp8_from_float(fmt_bf16_to_float(x[i]) * inv);
    return EPMOE_OK;
}

/* requant and dequant share everything but the last step: y = q * s (* inv, then cast). */
static epmoe_status rescale_ref(const char *fn, int requant, const uint8_t *q, const void *scales, int fmt,
                                const int32_t *masked_m, int64_t E, int64_t M, int64_t K, const float *out_scale,
                                int out_dtype, void *y) {
    EPMOE_CHECK(epmoe__check_rescale(fn, requant, q, scales, fmt, masked_m, E, M, K, out_scale, out_dtype, y, 0));
    if (E == 0 || M == 0) return EPMOE_OK;
    const int64_t G = K / FMT_GROUP, slab_bytes = fmt_scale_slab_bytes(fmt, M, G);
    const float inv = requant ? 1.0f / *out_scale : 1.0f;
    for (int64_t e = 0; e < E; e++) {
        const uint8_t *slab = (const uint8_t *)scales + e * slab_bytes;
        const int64_t rows = epmoe__valid_rows(masked_m, e, M);
        for (int64_t t = 0; t < rows; t++) {
            const int64_t row = (e * M + t) * K;
            for (int64_t k = 0; k < K; k++) {
                const float s = fmt_scale_load(slab, fmt, M, G, t, k / FMT_GROUP);
                const float v = fmt_fp8_to_float(q[row + k]) * s;
                if (requant) {
                    ((uint8_t *)y)[row + k] = fmt_requant(q[row + k], s, inv);
                } else if (out_dtype == EPMOE_BF16) {
                    ((uint16_t *)y)[row + k] = fmt_bf16_from_float(v);
                } else {
                    ((float *)y)[row + k] = v;
                }
            }
        }
    }
    return EPMOE_OK;
}

epmoe_status epmoe_requant_fp8_ref(const uint8_t *q, const void *scales, epmoe_scale_fmt fmt, const int32_t *masked_m,
                                   int64_t E, int64_t M, int64_t K, const float *out_scale, uint8_t *y) {
    return rescale_ref("epmoe_requant_fp8_ref", 1, q, scales, fmt, masked_m, E, M, K, out_scale, EPMOE_FP8_E4M3, y);
}

epmoe_status epmoe_dequant_fp8_ref(const uint8_t *q, const void *scales, epmoe_scale_fmt fmt, const int32_t *masked_m,
                                   int64_t E, int64_t M, int64_t K, epmoe_dtype out_dtype, void *y) {
    return rescale_ref("epmoe_dequant_fp8_ref", 0, q, scales, fmt, masked_m, E, M, K, NULL, out_dtype, y);
}
