/* format.c — the exported face of format.h: scalar and row conversions, int4, scale layouts. */
#include "format.h"
#include "internal.h"

uint8_t epmoe_fp8_e4m3_from_float(float x) { return fmt_fp8_from_float(x); }
float epmoe_fp8_e4m3_to_float(uint8_t v) { return fmt_fp8_to_float(v); }
uint16_t epmoe_bf16_from_float(float x) { return fmt_bf16_from_float(x); }
float epmoe_bf16_to_float(uint16_t v) { return fmt_bf16_to_float(v); }
uint8_t epmoe_ue8m0_from_float(float pow2_scale) { return fmt_ue8m0_from_float(pow2_scale); }
float epmoe_ue8m0_to_float(uint8_t b) { return fmt_ue8m0_to_float(b); }

void epmoe_fp8_e4m3_from_float_row(const float *x, uint8_t *y, size_t n) {
    for (size_t i = 0; i < n; i++) y[i] = fmt_fp8_from_float(x[i]);
}
void epmoe_fp8_e4m3_to_float_row(const uint8_t *x, float *y, size_t n) {
    for (size_t i = 0; i < n; i++) y[i] = fmt_fp8_to_float(x[i]);
}
void epmoe_bf16_from_float_row(const float *x, uint16_t *y, size_t n) {
    for (size_t i = 0; i < n; i++) y[i] = fmt_bf16_from_float(x[i]);
}
void epmoe_bf16_to_float_row(const uint16_t *x, float *y, size_t n) {
    for (size_t i = 0; i < n; i++) y[i] = fmt_bf16_to_float(x[i]);
}

/* vals [n] and packed [n / 2]: the loops read one while writing the other, so they must not overlap;
** but pack may run in place (in_place: packed == vals), writing byte j after reading bytes 2j, 2j + 1 */
static epmoe_status int4_check(const char *fn, const int8_t *vals, const uint8_t *packed, int64_t n, int in_place) {
    if (n < 0 || n % 2) return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: n = %lld must be even and >= 0", fn, (long long)n);
    if (n && (!vals || !packed)) return epmoe__fail(EPMOE_ERR_NULL_POINTER, "%s: NULL buffer", fn);
    if (in_place && (const void *)vals == (const void *)packed) return EPMOE_OK;
    return epmoe__need_apart(fn, vals, (size_t)n, "vals", packed, (size_t)n / 2, "packed");
}

epmoe_status epmoe_int4_pack(const int8_t *vals, int64_t n, uint8_t *packed) {
    EPMOE_CHECK(int4_check("epmoe_int4_pack", vals, packed, n, 1));
    for (int64_t i = 0; i < n; i++)
        if (vals[i] < -8 || vals[i] > 7)
            return epmoe__fail(EPMOE_ERR_INVALID_ARG, "epmoe_int4_pack: vals[%lld] = %d is outside [-8, 7]",
                               (long long)i, vals[i]);
    for (int64_t j = 0; j < n / 2; j++) packed[j] = fmt_int4_pair(vals[2 * j], vals[2 * j + 1]);
    return EPMOE_OK;
}

epmoe_status epmoe_int4_unpack(const uint8_t *packed, int64_t n, int8_t *vals) {
    EPMOE_CHECK(int4_check("epmoe_int4_unpack", vals, packed, n, 0));
    for (int64_t j = 0; j < n / 2; j++) {
        vals[2 * j] = fmt_int4_lo(packed[j]);
        vals[2 * j + 1] = fmt_int4_hi(packed[j]);
    }
    return EPMOE_OK;
}

/* M x K within the quantization ops' bound, so no size below wraps */
static int scale_args_ok(epmoe_scale_fmt fmt, int64_t M, int64_t K) {
    return (unsigned)fmt <= EPMOE_SCALE_UE8M0_MMAJOR && M >= 0 && K > 0 && K % FMT_GROUP == 0 && K <= EPMOE__MAX_ELEMS &&
           M <= EPMOE__MAX_ELEMS / K;
}

size_t epmoe_scale_bytes(epmoe_scale_fmt fmt, int64_t M, int64_t K) {
    if (!scale_args_ok(fmt, M, K)) return 0;
    return (size_t)fmt_scale_slab_bytes((int)fmt, M, K / FMT_GROUP);
}

size_t epmoe_scale_offset(epmoe_scale_fmt fmt, int64_t M, int64_t K, int64_t t, int64_t g) {
    if (!scale_args_ok(fmt, M, K)) return SIZE_MAX;
    const int64_t G = K / FMT_GROUP, groups = fmt_scale_is_ue8m0((int)fmt) ? (G + 3) / 4 * 4 : G; /* UE8M0: its padding too */
    if (t < 0 || t >= M || g < 0 || g >= groups) return SIZE_MAX;
    return (size_t)fmt_scale_offset((int)fmt, M, G, t, g);
}
