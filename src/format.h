/*
** format.h — every number format of epmoe, defined once, for C (CPU references) and CUDA
** (kernels). Each function here is the rule; a kernel may use a faster instruction only where
** a test proves it gives the same bytes (the GPU suite checks cvt.rn.satfinite.e4m3x2 against
** fmt_fp8_from_float over all 2^32 floats).
*/
#ifndef EPMOE_FORMAT_H
#define EPMOE_FORMAT_H

#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define FMT_HD static __host__ __device__ __forceinline__
#else
#define FMT_HD static inline
#endif

#define FMT_GROUP 128            /* channels per activation scale group */
#define FMT_FP8_MAX 448.0f       /* largest finite e4m3fn */
#define FMT_AMAX_FLOOR 1e-4f     /* DeepEP's kFP8Margin: keeps all-zero groups finite */
#define FMT_FP8_NAN 0x7F         /* the NaN every encoder here produces */

FMT_HD uint32_t fmt_f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

FMT_HD float fmt_f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* ---- FP8 e4m3fn ---------------------------------------------------------------------- */

/* Round-to-nearest-even, saturating. Integer-only so that it cannot depend on the FPU's
** rounding mode, flush-to-zero or contraction. */
FMT_HD uint8_t fmt_fp8_from_float(float f) {
    uint32_t u = fmt_f32_bits(f);
    uint8_t sign = (uint8_t)((u >> 24) & 0x80u);
    uint32_t a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return FMT_FP8_NAN;
    if (a >= 0x43E00000u) return (uint8_t)(sign | 0x7Eu); /* |f| >= 448, inf: saturate */
    if (a >= 0x3C800000u) {
        /* e4m3 normal (|f| >= 2^-6): keep 3 of 23 mantissa bits, RNE on bit 20; a carry
        ** into the exponent is the correct result. Rebias 127 -> 7: subtract 120 << 3. */
        uint32_t r = (a + 0x7FFFFu + ((a >> 20) & 1u)) >> 20;
        return (uint8_t)(sign | (uint8_t)(r - (120u << 3)));
    }
    /* e4m3 subnormal: |f| = mant * 2^(exp-150) in units of 2^-9 is mant >> (141 - exp). */
    uint32_t exp = a >> 23, mant = a & 0x7FFFFFu;
    if (exp) mant |= 0x800000u;
    else exp = 1;
    uint32_t s = 141u - exp; /* >= 21 here */
    if (s > 24u) return sign; /* below half of 2^-9 (mant < 2^24): rounds to zero */
    uint32_t q = mant >> s, rem = mant & ((1u << s) - 1u), half = 1u << (s - 1u);
    if (rem > half || (rem == half && (q & 1u))) q++;
    return (uint8_t)(sign | q); /* q == 8 is 2^-6, the smallest normal: still correct */
}

FMT_HD float fmt_fp8_to_float(uint8_t v) {
    uint32_t sign = (uint32_t)(v & 0x80u) << 24;
    uint32_t e = (v >> 3) & 0xFu, m = v & 7u;
    if (e == 15u && m == 7u) return fmt_f32_from_bits(sign | 0x7FC00000u);
    if (e == 0u) return fmt_f32_from_bits(sign | fmt_f32_bits((float)m * 0.001953125f)); /* m * 2^-9 */
    return fmt_f32_from_bits(sign | ((e + 120u) << 23) | (m << 20));
}

/* ---- bf16 ---------------------------------------------------------------------------- */

FMT_HD uint16_t fmt_bf16_from_float(float f) {
    uint32_t u = fmt_f32_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

FMT_HD float fmt_bf16_to_float(uint16_t v) { return fmt_f32_from_bits((uint32_t)v << 16); }

/* ---- UE8M0 power-of-two scales ------------------------------------------------------- */

FMT_HD uint8_t fmt_ue8m0_from_float(float pow2) { return (uint8_t)((fmt_f32_bits(pow2) >> 23) & 0xFFu); }

FMT_HD float fmt_ue8m0_to_float(uint8_t b) {
    if (b == 0xFFu) return fmt_f32_from_bits(0x7FC00000u);
    if (b == 0u) return fmt_f32_from_bits(0x00400000u); /* 2^-127, a float subnormal */
    return fmt_f32_from_bits((uint32_t)b << 23);
}

/* ---- per-group scales (DeepEP's LL cast) --------------------------------------------- */

/* From a group's amax (already max(|x|, 1e-4); NaN elements excluded) to the multiplier
** applied before the cast and the scale_inv that is stored. Without round_scale the two are
** computed separately, as DeepEP does, and are not exact reciprocals. */
FMT_HD void fmt_group_scales(float amax, int round_scale, float *mul, float *scale_inv) {
    if (!(amax <= 3.402823466e38f)) { /* +inf: the group is poisoned on purpose */
        *mul = 0.0f;
        *scale_inv = fmt_f32_from_bits(0x7F800000u);
        return;
    }
    if (!round_scale) {
        *scale_inv = amax * (1.0f / FMT_FP8_MAX);
        *mul = FMT_FP8_MAX / amax;
        return;
    }
    /* 2^e with e = ceil(log2(amax / 448)): the exponent field, plus one if any mantissa bit. */
    uint32_t u = fmt_f32_bits(amax * (1.0f / FMT_FP8_MAX));
    int32_t e = (int32_t)((u >> 23) & 0xFFu) - 127 + ((u & 0x7FFFFFu) != 0u);
    /* amax >= 1e-4 keeps e >= -22 and amax <= FLT_MAX keeps e <= 120, so both are normal. */
    *scale_inv = fmt_f32_from_bits((uint32_t)(e + 127) << 23);
    *mul = fmt_f32_from_bits((uint32_t)(127 - e) << 23);
}

/* Group -> per-tensor requant of one fp8 value: (q * s) * inv, two fp32 roundings, then the cast
** (SGLang PR #22316's arithmetic; inv = 1 / out_scale, taken once by the caller). */
FMT_HD uint8_t fmt_requant(uint8_t q, float s, float inv) {
    const float v = fmt_fp8_to_float(q) * s;
    return fmt_fp8_from_float(v * inv);
}

/* ---- scale layouts (the one layout function of scale buffers; see epmoe.h) ----------- */

FMT_HD int fmt_scale_is_ue8m0(int fmt) { return fmt == 2 || fmt == 3; }

/* Byte offset of (t, g) in one [M, K] slab; G = K/128 groups, P = ceil(G/4) words. */
FMT_HD int64_t fmt_scale_offset(int fmt, int64_t M, int64_t G, int64_t t, int64_t g) {
    int64_t P = (G + 3) / 4;
    switch (fmt) {
    case 0: return (t * G + g) * 4;
    case 1: return (t + g * M) * 4;
    case 2: return t * P * 4 + g;
    default: return (g / 4) * M * 4 + t * 4 + (g % 4);
    }
}

FMT_HD int64_t fmt_scale_slab_bytes(int fmt, int64_t M, int64_t G) {
    return fmt_scale_is_ue8m0(fmt) ? M * ((G + 3) / 4) * 4 : M * G * 4;
}

/* Scale (t, g) of one slab, as the fp32 the math uses. */
FMT_HD float fmt_scale_load(const uint8_t *slab, int fmt, int64_t M, int64_t G, int64_t t, int64_t g) {
    const uint8_t *p = slab + fmt_scale_offset(fmt, M, G, t, g);
    if (fmt_scale_is_ue8m0(fmt)) return fmt_ue8m0_to_float(*p);
    float s;
    memcpy(&s, p, sizeof s);
    return s;
}

/* ---- int4 (W4AFP8 checkpoints) ------------------------------------------------------- */

/* Sign-extend a nibble without relying on arithmetic right shifts of negative numbers. */
FMT_HD int8_t fmt_int4_lo(uint8_t b) { return (int8_t)((int)((b & 0xFu) ^ 8u) - 8); }
FMT_HD int8_t fmt_int4_hi(uint8_t b) { return (int8_t)((int)(((uint32_t)b >> 4) ^ 8u) - 8); }
FMT_HD uint8_t fmt_int4_pair(int8_t lo, int8_t hi) { return (uint8_t)(((uint8_t)lo & 0xFu) | ((uint8_t)hi << 4)); }

#endif /* EPMOE_FORMAT_H */
