/*
** tool_util.h — what the CLI's commands share: a monotonic clock, a median helper, a seeded
** xorshift generator, and int4 weights quantized the way W4AFP8 checkpoints are (any group).
*/
#ifndef EPMOE_TOOL_UTIL_H
#define EPMOE_TOOL_UTIL_H

#include <math.h>
#include <stdint.h>
#include <time.h>

static inline double tool_wall_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec * 1e-3;
}

static inline int tool_cmp_double(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static inline double tool_urand(uint64_t *s) { /* [0, 1) */
    *s ^= *s << 13, *s ^= *s >> 7, *s ^= *s << 17;
    return (double)(*s >> 11) / 9007199254740992.0;
}

static inline double tool_nrand(uint64_t *s) {
    const double u = tool_urand(s), v = tool_urand(s);
    return sqrt(-2.0 * log(u + 1e-300)) * cos(6.283185307179586 * v);
}

/* n values (n even) as symmetric int4 with one scale, the way W4AFP8 checkpoints quantize a
** group: scale = amax/7 (so no -8 occurs), values rounded to nearest and clamped to [-8, 7], two
** per byte, even index in the low nibble. */
static inline void tool_quantize_int4_group(const float *v, int64_t n, int8_t *w, float *scale) {
    float amax = 1e-12f;
    for (int64_t i = 0; i < n; i++) amax = fmaxf(amax, fabsf(v[i]));
    const float sc = amax / 7.0f;
    *scale = sc;
    for (int64_t i = 0; i < n; i += 2) {
        long lo = lrintf(v[i] / sc), hi = lrintf(v[i + 1] / sc);
        lo = lo < -8 ? -8 : lo > 7 ? 7 : lo, hi = hi < -8 ? -8 : hi > 7 ? 7 : hi;
        w[i / 2] = (int8_t)(uint8_t)((lo & 0xF) | ((hi & 0xF) << 4));
    }
}

/* rows x K weights uniform in +-0.02, quantized per 128 along K like W4AFP8 checkpoints
** (tool_quantize_int4_group), int4 two per byte, even k in the low nibble. */
static inline void tool_quantize_w4(uint64_t *rng, int64_t rows, int64_t K, int8_t *w, float *scales) {
    float v[128];
    for (int64_t r = 0; r < rows; r++)
        for (int64_t g = 0; g < K / 128; g++) {
            for (int i = 0; i < 128; i++) v[i] = (float)((tool_urand(rng) * 2 - 1) * 0.02);
            tool_quantize_int4_group(v, 128, w + (r * K + g * 128) / 2, &scales[r * (K / 128) + g]);
        }
}

#endif
