/*
** quant_args.c — argument checks of the quantization ops, shared by the CPU references and
** the CUDA entries so that both reject the same inputs with the same status.
*/
#include "format.h"
#include "internal.h"

static int misaligned(const void *p, unsigned a) { return ((uintptr_t)p & (uintptr_t)(a - 1)) != 0; }

static epmoe_status need_ptr(const char *fn, const void *p, const char *name) {
    return p ? EPMOE_OK : epmoe__fail(EPMOE_ERR_NULL_POINTER, "%s: %s is NULL", fn, name);
}

static epmoe_status need_align(const char *fn, const void *p, unsigned a, const char *name) {
    return misaligned(p, a) ? epmoe__fail(EPMOE_ERR_MISALIGNED, "%s: %s = %p is not %u-byte aligned", fn, name, p, a)
                            : EPMOE_OK;
}

static epmoe_status check_fmt(const char *fn, int fmt, int round_scale) {
    if (fmt < EPMOE_SCALE_F32_ROW || fmt > EPMOE_SCALE_UE8M0_MMAJOR)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: scale format %d is not an epmoe_scale_fmt", fn, fmt);
    if (fmt_scale_is_ue8m0(fmt) && !round_scale)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: UE8M0 scales need round_scale = 1 (power-of-two scales)", fn);
    return EPMOE_OK;
}

static epmoe_status check_shape(const char *fn, int64_t E, int64_t M, int64_t K) {
    if (E < 0 || M < 0) return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: E = %lld and M = %lld must be >= 0", fn, (long long)E, (long long)M);
    if (K <= 0 || K % FMT_GROUP)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: K = %lld must be a positive multiple of %d", fn, (long long)K, FMT_GROUP);
    if (K > EPMOE__MAX_ELEMS || M > EPMOE__MAX_ELEMS / K || E > (M ? EPMOE__MAX_ELEMS / (M * K) : EPMOE__MAX_ELEMS))
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: E*M*K = %lld*%lld*%lld is too large", fn, (long long)E,
                           (long long)M, (long long)K);
    return EPMOE_OK;
}

epmoe_status epmoe__check_cast_group(const char *fn, const void *x, int64_t M, int64_t K, const void *q,
                                     const void *scales, int fmt, int round_scale, int device) {
    EPMOE_CHECK(check_shape(fn, 1, M, K));
    EPMOE_CHECK(check_fmt(fn, fmt, round_scale));
    if (M == 0) return EPMOE_OK;
    EPMOE_CHECK(need_ptr(fn, x, "x"));
    EPMOE_CHECK(need_ptr(fn, q, "q"));
    EPMOE_CHECK(need_ptr(fn, scales, "scales"));
    const size_t n = (size_t)(M * K), sn = epmoe_scale_bytes((epmoe_scale_fmt)fmt, M, K);
    EPMOE_CHECK(epmoe__need_apart(fn, q, n, "q", x, 2 * n, "x"));
    EPMOE_CHECK(epmoe__need_apart(fn, scales, sn, "scales", x, 2 * n, "x"));
    EPMOE_CHECK(epmoe__need_apart(fn, scales, sn, "scales", q, n, "q"));
    if (device) {
        EPMOE_CHECK(need_align(fn, x, 16, "x"));
        EPMOE_CHECK(need_align(fn, q, 16, "q"));
        EPMOE_CHECK(need_align(fn, scales, 4, "scales"));
    }
    return EPMOE_OK;
}

epmoe_status epmoe__check_cast_tensor(const char *fn, const void *x, int64_t n, const float *scale, const void *q,
                                      int device) {
    if (n < 0 || n > EPMOE__MAX_ELEMS) return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: n = %lld is out of range", fn, (long long)n);
    if (n == 0) return EPMOE_OK;
    EPMOE_CHECK(need_ptr(fn, x, "x"));
    EPMOE_CHECK(need_ptr(fn, q, "q"));
    EPMOE_CHECK(need_ptr(fn, scale, "scale"));
    EPMOE_CHECK(epmoe__need_apart(fn, q, (size_t)n, "q", x, 2 * (size_t)n, "x"));
    if (device) {
        EPMOE_CHECK(need_align(fn, x, 16, "x"));
        EPMOE_CHECK(need_align(fn, q, 16, "q"));
        EPMOE_CHECK(need_align(fn, scale, 4, "scale"));
    }
    return EPMOE_OK;
}

epmoe_status epmoe__check_rescale(const char *fn, int requant, const void *q, const void *scales, int fmt,
                                  const int32_t *masked_m, int64_t E, int64_t M, int64_t K, const float *out_scale,
                                  int out_dtype, const void *y, int device) {
    EPMOE_CHECK(check_shape(fn, E, M, K));
    EPMOE_CHECK(check_fmt(fn, fmt, fmt_scale_is_ue8m0(fmt)));
    if (!requant && out_dtype != EPMOE_F32 && out_dtype != EPMOE_BF16)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: out_dtype %d must be EPMOE_F32 or EPMOE_BF16", fn, out_dtype);
    if (E == 0 || M == 0) return EPMOE_OK;
    EPMOE_CHECK(need_ptr(fn, q, "q"));
    EPMOE_CHECK(need_ptr(fn, scales, "scales"));
    EPMOE_CHECK(need_ptr(fn, y, "y"));
    if (requant) EPMOE_CHECK(need_ptr(fn, masked_m, "masked_m"));
    if (requant) EPMOE_CHECK(need_ptr(fn, out_scale, "out_scale"));
    const size_t qn = (size_t)(E * M * K), yn = qn * (requant ? 1u : out_dtype == EPMOE_F32 ? 4u : 2u);
    EPMOE_CHECK(epmoe__need_apart(fn, y, yn, "y", q, qn, "q"));
    EPMOE_CHECK(epmoe__need_apart(fn, y, yn, "y", scales, (size_t)E * epmoe_scale_bytes((epmoe_scale_fmt)fmt, M, K), "scales"));
    if (device) {
        EPMOE_CHECK(need_align(fn, q, 16, "q"));
        EPMOE_CHECK(need_align(fn, y, 16, "y"));
        EPMOE_CHECK(need_align(fn, scales, 4, "scales"));
    }
    /* on the host too: the reference writes y, and reads masked_m and out_scale, as their types */
    EPMOE_CHECK(need_align(fn, y, (unsigned)(yn / qn), "y"));
    if (masked_m) EPMOE_CHECK(need_align(fn, masked_m, 4, "masked_m"));
    if (out_scale) EPMOE_CHECK(need_align(fn, out_scale, 4, "out_scale"));
    return EPMOE_OK;
}
