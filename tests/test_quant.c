/*
** test_quant.c — the CPU references of the quantization ops: hand-computed cases, the FP8
** error model on random data, every scale format, awkward shapes, masking, non-finite inputs
** and every bad argument (for the _ref and the _cuda entry points: argument checks run
** before any device work, so they are testable without a GPU).
*/
#include "test.h"

/* Error model of the group cast. x·mul is rounded to e4m3: relative error ≤ 2^-4 (half an ulp
** of a 3-bit mantissa) for normals, absolute ≤ 2^-10 (half the subnormal spacing 2^-9)
** below 2^-6. Dequantizing multiplies by scale_inv, which is not the exact reciprocal of mul
** (each is rounded once in fp32), adding at most a few fp32 ulps. */
#define FP8_REL_ERR 0.0625
#define FP8_SUB_ABS 0.0009765625
#define F32_SLACK (8.0 * 5.96e-8)

static const int64_t SHAPES_M[] = {0, 1, 3, 127, 129};
static const int64_t SHAPES_K[] = {128, 384, 7168};

static uint16_t bf(float f) { return epmoe_bf16_from_float(f); }
static float fbf(uint16_t v) { return epmoe_bf16_to_float(v); }
static float fp8f(uint8_t v) { return epmoe_fp8_e4m3_to_float(v); }

/* Tokens with per-token magnitude spread and a few outlier channels. */
static void fill_activations(test_rng *r, uint16_t *x, int64_t M, int64_t K) {
    for (int64_t t = 0; t < M; t++) {
        double tok = exp(rng_normal(r));
        for (int64_t k = 0; k < K; k++) {
            double v = rng_normal(r) * tok;
            if (k % 97 == 5) v *= 100.0;
            x[t * K + k] = bf((float)v);
        }
    }
}

/* Scale (t, g) of one slab, read through the public layout function. */
static float scale_at(const void *slab, epmoe_scale_fmt fmt, int64_t M, int64_t K, int64_t t, int64_t g) {
    const uint8_t *p = (const uint8_t *)slab + epmoe_scale_offset(fmt, M, K, t, g);
    if (fmt >= EPMOE_SCALE_UE8M0_ROW) return epmoe_ue8m0_to_float(*p);
    float s;
    memcpy(&s, p, sizeof s);
    return s;
}

static void test_cast_group_hand(void) {
    /* x = i - 64 for i < 128: amax 64, mul = 448/64 = 7, scale_inv = 64 * (1/448). */
    uint16_t x[128];
    uint8_t q[128];
    float s;
    for (int i = 0; i < 128; i++) x[i] = bf((float)(i - 64));
    CHECK_STATUS(epmoe_cast_group_fp8_ref(x, 1, 128, q, &s, EPMOE_SCALE_F32_ROW, 0), EPMOE_OK);
    CHECK(s == 64.0f * (1.0f / 448.0f), "scale %g", s);
    CHECK(q[0] == 0xFE, "x=-64 -> -448: 0x%02x", q[0]);        /* 7*-64 = -448 */
    CHECK(q[64] == 0x00, "x=0 -> 0: 0x%02x", q[64]);
    CHECK(q[65] == 0x4E, "x=1 -> 7 = 1.75*2^2: 0x%02x", q[65]); /* e=9, m=6 */
    CHECK(q[66] == 0x56, "x=2 -> 14: 0x%02x", q[66]);           /* e=10, m=6 */
    /* x = 63: 441 lies between 416 (0x7D) and 448 (0x7E) and is nearer 448. */
    CHECK(q[127] == 0x7E, "x=63 -> 441 -> 448: 0x%02x", q[127]);
    /* round_scale: amax 64 -> 64/448 = 0.1428 -> 2^-2 = 0.25 stored, multiply by 4. */
    CHECK_STATUS(epmoe_cast_group_fp8_ref(x, 1, 128, q, &s, EPMOE_SCALE_F32_ROW, 1), EPMOE_OK);
    CHECK(s == 0.25f, "round scale %g", s);
    /* 4 = 1.0 * 2^2: exponent field 9 -> 0x48; -256 = -1.0 * 2^8: field 15 -> 0xF8 */
    CHECK(q[65] == 0x48 && q[0] == 0xF8, "x=1 -> 4 (0x48), x=-64 -> -256 (0xF8): 0x%02x 0x%02x", q[65], q[0]);
    /* An all-zero group keeps amax at the 1e-4 floor and quantizes to zeros. */
    for (int i = 0; i < 128; i++) x[i] = 0;
    epmoe_cast_group_fp8_ref(x, 1, 128, q, &s, EPMOE_SCALE_F32_ROW, 0);
    CHECK(s == 1e-4f * (1.0f / 448.0f), "zero group scale %g", s);
    int nz = 0;
    for (int i = 0; i < 128; i++) nz += q[i] != 0;
    CHECK(nz == 0, "zero group: %d nonzero bytes", nz);
}

static void test_cast_group_error_model(void) {
    test_rng r = {0x1234567};
    for (size_t a = 0; a < sizeof SHAPES_M / sizeof *SHAPES_M; a++)
        for (size_t b = 0; b < sizeof SHAPES_K / sizeof *SHAPES_K; b++)
            for (int round = 0; round < 2; round++) {
                const int64_t M = SHAPES_M[a], K = SHAPES_K[b], G = K / 128;
                uint16_t *x = malloc((size_t)(M * K + 1) * 2);
                uint8_t *q = malloc((size_t)(M * K + 1));
                float *s = malloc((size_t)(M * G + 1) * 4);
                fill_activations(&r, x, M, K);
                memset(q, 0xAB, (size_t)(M * K + 1));
                CHECK_STATUS(epmoe_cast_group_fp8_ref(x, M, K, q, s, EPMOE_SCALE_F32_ROW, round), EPMOE_OK);
                double worst = 0;
                for (int64_t t = 0; t < M; t++)
                    for (int64_t g = 0; g < G; g++) {
                        double amax = 1e-4, sg = s[t * G + g];
                        for (int k = 0; k < 128; k++) amax = fmax(amax, fabs(fbf(x[t * K + g * 128 + k])));
                        int has_max = 0;
                        for (int k = 0; k < 128; k++) {
                            int64_t i = t * K + g * 128 + k;
                            double v = fbf(x[i]), d = fp8f(q[i]) * sg;
                            double bound = fabs(v) * (FP8_REL_ERR + F32_SLACK) + FP8_SUB_ABS * sg;
                            if (fabs(d - v) / (bound + 1e-300) > worst) worst = fabs(d - v) / bound;
                            has_max |= (q[i] & 0x7F) == 0x7E;
                        }
                        /* without rounding the group's largest element lands on ±448 */
                        if (!round) CHECK(has_max || amax <= 1e-4, "group (%lld,%lld) never reaches 448", (long long)t, (long long)g);
                        if (round) CHECK(sg == ldexp(1.0, ilogb(sg)) && sg * 448.0 >= amax && sg * 224.0 < amax,
                                         "round scale %g for amax %g", sg, amax);
                    }
                CHECK(worst <= 1.0, "M=%lld K=%lld round=%d: error %.3f of the bound", (long long)M, (long long)K, round, worst);
                CHECK(q[M * K] == 0xAB, "wrote past the end");
                free(x), free(q), free(s);
            }
}

/* Every scale format gives the same fp8 bytes and the same scales, at the layout's positions. */
static void test_cast_group_formats(void) {
    test_rng r = {99};
    const int64_t M = 5, K = 640, G = 5; /* G % 4 != 0: UE8M0 has padding */
    uint16_t x[5 * 640];
    uint8_t q_ref[5 * 640], q[5 * 640];
    float s_ref[5 * 5];
    uint8_t s[256];
    fill_activations(&r, x, M, K);
    for (int round = 0; round < 2; round++) {
        epmoe_cast_group_fp8_ref(x, M, K, q_ref, s_ref, EPMOE_SCALE_F32_ROW, round);
        for (int fmt = 0; fmt < 4; fmt++) {
            if (fmt >= 2 && !round) continue;
            memset(s, 0xAB, sizeof s);
            memset(q, 0xCD, sizeof q);
            CHECK_STATUS(epmoe_cast_group_fp8_ref(x, M, K, q, s, (epmoe_scale_fmt)fmt, round), EPMOE_OK);
            CHECK(memcmp(q, q_ref, sizeof q) == 0, "fmt %d round %d: fp8 bytes differ", fmt, round);
            for (int64_t t = 0; t < M; t++)
                for (int64_t g = 0; g < G; g++)
                    CHECK(scale_at(s, (epmoe_scale_fmt)fmt, M, K, t, g) == s_ref[t * G + g], "fmt %d scale (%lld,%lld)", fmt,
                          (long long)t, (long long)g);
            size_t bytes = epmoe_scale_bytes((epmoe_scale_fmt)fmt, M, K);
            CHECK(s[bytes] == 0xAB, "fmt %d wrote past its %zu scale bytes", fmt, bytes);
            if (fmt >= 2)
                for (int64_t t = 0; t < M; t++)
                    for (int64_t g = G; g < 8; g++)
                        CHECK(s[epmoe_scale_offset((epmoe_scale_fmt)fmt, M, K, t, g)] == 0, "padding (%lld,%lld) not zero",
                              (long long)t, (long long)g);
        }
    }
}

static void test_cast_group_nonfinite(void) {
    uint16_t x[256];
    uint8_t q[256];
    float s[2];
    for (int i = 0; i < 256; i++) x[i] = bf((float)(i % 7) - 3.0f);
    x[5] = 0x7FC0;         /* NaN in group 0 */
    x[130] = bf(INFINITY); /* +inf in group 1 */
    x[131] = bf(-INFINITY);
    CHECK_STATUS(epmoe_cast_group_fp8_ref(x, 1, 256, q, s, EPMOE_SCALE_F32_ROW, 0), EPMOE_OK);
    CHECK(s[0] == 3.0f * (1.0f / 448.0f), "NaN is not part of amax: scale %g", s[0]);
    CHECK(q[5] == 0x7F, "NaN encodes as 0x7F: 0x%02x", q[5]);
    CHECK(q[6] == 0x7E || q[6] == 0xFE, "amax element of group 0 at 448: 0x%02x", q[6]);
    CHECK(isinf(s[1]), "an inf group has an inf scale: %g", s[1]);
    CHECK(q[130] == 0x7F && q[131] == 0x7F, "inf elements become NaN: 0x%02x 0x%02x", q[130], q[131]);
    int finite_zero = 1;
    for (int i = 128; i < 256; i++)
        if (i != 130 && i != 131) finite_zero &= (q[i] & 0x7F) == 0;
    CHECK(finite_zero, "finite elements of an inf group encode as zero");
    uint8_t u[2 * 4];
    CHECK_STATUS(epmoe_cast_group_fp8_ref(x, 1, 256, q, u, EPMOE_SCALE_UE8M0_ROW, 1), EPMOE_OK);
    CHECK(u[1] == 0xFF && isnan(epmoe_ue8m0_to_float(u[1])), "inf group UE8M0 byte 0x%02x", u[1]);
}

static void test_cast_tensor(void) {
    const float scale = 0.5f; /* q = x * 2 */
    uint16_t x[5] = {bf(1.0f), bf(-3.0f), bf(224.0f), bf(300.0f), 0x7FC0};
    uint8_t q[6];
    memset(q, 0xAB, sizeof q);
    CHECK_STATUS(epmoe_cast_tensor_fp8_ref(x, 5, &scale, q), EPMOE_OK);
    /* 2 = 1.0 * 2^1 -> 0x40; -6 = -1.5 * 2^2: field 9, mantissa 4 -> 0xCC */
    CHECK(q[0] == 0x40 && q[1] == 0xCC && q[2] == 0x7E && q[3] == 0x7E && q[4] == 0x7F,
          "2, -6, 448, sat(600), NaN: %02x %02x %02x %02x %02x", q[0], q[1], q[2], q[3], q[4]);
    CHECK(q[5] == 0xAB, "wrote past n");
    /* zero scale (documented): nonzero -> ±448, zero -> NaN */
    const float zero = 0.0f;
    CHECK_STATUS(epmoe_cast_tensor_fp8_ref(x, 2, &zero, q), EPMOE_OK);
    CHECK(q[0] == 0x7E && q[1] == 0xFE, "zero scale saturates: %02x %02x", q[0], q[1]);
    test_rng r = {7};
    const int64_t ns[] = {0, 1, 3, 127, 129, 7168 * 3 + 5};
    for (size_t i = 0; i < sizeof ns / sizeof *ns; i++) {
        int64_t n = ns[i];
        uint16_t *xs = malloc((size_t)(n + 1) * 2);
        uint8_t *qs = malloc((size_t)(n + 1));
        const float sc = 0.037f;
        for (int64_t k = 0; k < n; k++) xs[k] = bf((float)(rng_normal(&r) * 4.0));
        memset(qs, 0xAB, (size_t)(n + 1));
        CHECK_STATUS(epmoe_cast_tensor_fp8_ref(xs, n, &sc, qs), EPMOE_OK);
        const float inv = 1.0f / sc;
        long bad = 0;
        for (int64_t k = 0; k < n; k++) bad += qs[k] != epmoe_fp8_e4m3_from_float(fbf(xs[k]) * inv);
        CHECK(bad == 0 && qs[n] == 0xAB, "n=%lld: %ld bytes differ from satfinite(x * (1/s))", (long long)n, bad);
        free(xs), free(qs);
    }
}

/* Build a masked [E, M, K] fp8 tensor with group scales in `fmt` from random activations. */
static void make_masked(test_rng *r, int64_t E, int64_t M, int64_t K, epmoe_scale_fmt fmt, uint8_t *q, uint8_t *s) {
    uint16_t *x = malloc((size_t)(M * K + 1) * 2);
    size_t slab = epmoe_scale_bytes(fmt, M, K);
    for (int64_t e = 0; e < E; e++) {
        fill_activations(r, x, M, K);
        epmoe_cast_group_fp8_ref(x, M, K, q + e * M * K, s + e * slab, fmt, fmt >= EPMOE_SCALE_UE8M0_ROW);
    }
    free(x);
}

static void test_requant_dequant(void) {
    test_rng r = {0xC0FFEE};
    const int64_t Ks[] = {128, 384, 7168};
    for (size_t kb = 0; kb < 3; kb++)
        for (int fmt = 0; fmt < 4; fmt++) {
            const int64_t E = 5, M = kb == 2 ? 33 : 129, K = Ks[kb];
            const int32_t masked[5] = {0, 1, (int32_t)M, 3, kb == 2 ? 40 : -2}; /* zeros, partial, full, >M, <0 */
            const size_t slab = epmoe_scale_bytes((epmoe_scale_fmt)fmt, M, K), n = (size_t)(E * M * K);
            uint8_t *q = malloc(n), *s = malloc(E * slab), *y = malloc(n);
            float *yf = malloc(n * 4);
            uint16_t *yb = malloc(n * 2);
            make_masked(&r, E, M, K, (epmoe_scale_fmt)fmt, q, s);
            const float out_scale = 0.02f, inv = 1.0f / out_scale;
            memset(y, 0xAB, n);
            memset(yf, 0xAB, n * 4);
            memset(yb, 0xAB, n * 2);
            CHECK_STATUS(epmoe_requant_fp8_ref(q, s, (epmoe_scale_fmt)fmt, masked, E, M, K, &out_scale, y), EPMOE_OK);
            CHECK_STATUS(epmoe_dequant_fp8_ref(q, s, (epmoe_scale_fmt)fmt, masked, E, M, K, EPMOE_F32, yf), EPMOE_OK);
            CHECK_STATUS(epmoe_dequant_fp8_ref(q, s, (epmoe_scale_fmt)fmt, masked, E, M, K, EPMOE_BF16, yb), EPMOE_OK);
            long bad_y = 0, bad_f = 0, bad_b = 0, touched = 0;
            for (int64_t e = 0; e < E; e++) {
                int64_t rows = masked[e] < 0 ? 0 : masked[e] > M ? M : masked[e];
                for (int64_t t = 0; t < M; t++)
                    for (int64_t k = 0; k < K; k++) {
                        size_t i = (size_t)((e * M + t) * K + k);
                        uint32_t fbits;
                        memcpy(&fbits, &yf[i], 4);
                        if (t >= rows) {
                            touched += y[i] != 0xAB || fbits != 0xABABABABu || yb[i] != 0xABAB;
                            continue;
                        }
                        float sc = scale_at(s + e * slab, (epmoe_scale_fmt)fmt, M, K, t, k / 128);
                        float d = fp8f(q[i]) * sc, v = d * inv;
                        bad_y += y[i] != epmoe_fp8_e4m3_from_float(v);
                        bad_f += !same_float(yf[i], d);
                        bad_b += yb[i] != epmoe_bf16_from_float(d);
                    }
            }
            CHECK(bad_y == 0 && bad_f == 0 && bad_b == 0, "K=%lld fmt %d: %ld/%ld/%ld wrong requant/f32/bf16 values",
                  (long long)K, fmt, bad_y, bad_f, bad_b);
            CHECK(touched == 0, "K=%lld fmt %d: %ld elements past masked_m were written", (long long)K, fmt, touched);
            /* dequant without masked_m covers every row */
            CHECK_STATUS(epmoe_dequant_fp8_ref(q, s, (epmoe_scale_fmt)fmt, NULL, E, M, K, EPMOE_F32, yf), EPMOE_OK);
            long unwritten = 0;
            for (size_t i = 0; i < n; i++) {
                uint32_t fbits;
                memcpy(&fbits, &yf[i], 4);
                unwritten += fbits == 0xABABABABu;
            }
            CHECK(unwritten == 0, "dequant(masked_m = NULL) left %ld elements", unwritten);
            free(q), free(s), free(y), free(yf), free(yb);
        }
    /* Saturation (the baseline's case): 448 at group scale 4 requantized to scale 1 -> 448. */
    uint8_t q1[128], y1[128];
    float s1 = 4.0f, one = 1.0f;
    int32_t m1 = 1;
    memset(q1, 0x7E, sizeof q1);
    CHECK_STATUS(epmoe_requant_fp8_ref(q1, &s1, EPMOE_SCALE_F32_ROW, &m1, 1, 1, 128, &one, y1), EPMOE_OK);
    CHECK(y1[0] == 0x7E && y1[127] == 0x7E, "1792 saturates to 448: 0x%02x", y1[0]);
}

/* Empty work is a no-op on the GPU; a build without CUDA says so even then. */
#define EMPTY_OK (EPMOE_HAVE_CUDA ? EPMOE_OK : EPMOE_ERR_UNSUPPORTED)

static void test_bad_args(void) {
    _Alignas(16) uint16_t x[256] = {0}; /* 16-byte aligned: the misaligned cases below name the pointer they break */
    _Alignas(16) uint8_t q[256], y[256];
    _Alignas(16) float s[4] = {1, 1, 1, 1};
    int32_t m[2] = {1, 1};
    const epmoe_scale_fmt F = EPMOE_SCALE_F32_ROW;
    /* Each case runs against the reference and the GPU entry (which checks before any GPU work). */
#define BOTH_CAST_GROUP(want, ...)                                                                                     \
    CHECK_STATUS(epmoe_cast_group_fp8_ref(__VA_ARGS__), want);                                                         \
    CHECK_STATUS(epmoe_cast_group_fp8_cuda(__VA_ARGS__, NULL), want)
    BOTH_CAST_GROUP(EPMOE_ERR_NULL_POINTER, NULL, 1, 128, q, s, F, 0);
    BOTH_CAST_GROUP(EPMOE_ERR_NULL_POINTER, x, 1, 128, NULL, s, F, 0);
    BOTH_CAST_GROUP(EPMOE_ERR_NULL_POINTER, x, 1, 128, q, NULL, F, 0);
    BOTH_CAST_GROUP(EPMOE_ERR_INVALID_ARG, x, 1, 100, q, s, F, 0);
    BOTH_CAST_GROUP(EPMOE_ERR_INVALID_ARG, x, 1, 0, q, s, F, 0);
    BOTH_CAST_GROUP(EPMOE_ERR_INVALID_ARG, x, -1, 128, q, s, F, 0);
    BOTH_CAST_GROUP(EPMOE_ERR_INVALID_ARG, x, INT64_MAX / 64, 256, q, s, F, 0);
    BOTH_CAST_GROUP(EPMOE_ERR_INVALID_ARG, x, 1, 128, q, s, (epmoe_scale_fmt)9, 0);
    BOTH_CAST_GROUP(EPMOE_ERR_INVALID_ARG, x, 1, 128, q, s, EPMOE_SCALE_UE8M0_ROW, 0);
    /* outputs that share bytes with an input or with each other: refused before any write */
    BOTH_CAST_GROUP(EPMOE_ERR_INVALID_ARG, x, 1, 128, (uint8_t *)x + 128, s, F, 0);
    CHECK(strstr(epmoe_last_error(), "q overlaps x") != NULL, "message: %s", epmoe_last_error());
    BOTH_CAST_GROUP(EPMOE_ERR_INVALID_ARG, x, 1, 128, q, (float *)(void *)(q + 124), F, 0);
    CHECK(strstr(epmoe_last_error(), "scales overlaps q") != NULL, "message: %s", epmoe_last_error());
    BOTH_CAST_GROUP(EPMOE_ERR_INVALID_ARG, x, 1, 128, q, (float *)(void *)x, F, 0);
    CHECK_STATUS(epmoe_cast_group_fp8_ref(NULL, 0, 128, NULL, NULL, F, 0), EPMOE_OK);
    CHECK_STATUS(epmoe_cast_group_fp8_cuda(NULL, 0, 128, NULL, NULL, F, 0, NULL), EMPTY_OK);
    CHECK_STATUS(epmoe_cast_group_fp8_cuda((const uint16_t *)((char *)x + 2), 1, 128, q, s, F, 0, NULL), EPMOE_ERR_MISALIGNED);
    CHECK_STATUS(epmoe_cast_group_fp8_cuda(x, 1, 128, q + 1, s, F, 0, NULL), EPMOE_ERR_MISALIGNED);
    CHECK_STATUS(epmoe_cast_group_fp8_cuda(x, 1, 128, q, (char *)s + 1, F, 0, NULL), EPMOE_ERR_MISALIGNED);

    CHECK_STATUS(epmoe_cast_tensor_fp8_ref(NULL, 4, s, q), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_cast_tensor_fp8_ref(x, 4, NULL, q), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_cast_tensor_fp8_ref(x, -4, s, q), EPMOE_ERR_INVALID_ARG);
    CHECK_STATUS(epmoe_cast_tensor_fp8_cuda(x, 4, s, NULL, NULL), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_cast_tensor_fp8_cuda(x, 4, s, q + 3, NULL), EPMOE_ERR_MISALIGNED);
    CHECK_STATUS(epmoe_cast_tensor_fp8_ref(x, 4, s, (uint8_t *)x + 7), EPMOE_ERR_INVALID_ARG); /* q inside x */
    CHECK_STATUS(epmoe_cast_tensor_fp8_cuda(x, 16, s, (uint8_t *)x, NULL), EPMOE_ERR_INVALID_ARG);
    CHECK_STATUS(epmoe_cast_tensor_fp8_ref(NULL, 0, NULL, NULL), EPMOE_OK);
    CHECK_STATUS(epmoe_cast_tensor_fp8_cuda(NULL, 0, NULL, NULL, NULL), EMPTY_OK);
    CHECK_STATUS(epmoe_cast_tensor_fp8_ref(x, 4, s, NULL), EPMOE_ERR_NULL_POINTER);
    CHECK(strstr(epmoe_last_error(), "q is NULL") != NULL, "message: %s", epmoe_last_error());
    CHECK_STATUS(epmoe_cast_tensor_fp8_ref(x, (INT64_C(1) << 46) + 1, s, q), EPMOE_ERR_INVALID_ARG); /* past the bound */
    CHECK_STATUS(epmoe_cast_tensor_fp8_cuda(x, (INT64_C(1) << 46) + 1, s, q, NULL), EPMOE_ERR_INVALID_ARG);
    CHECK_STATUS(epmoe_cast_tensor_fp8_cuda((const uint16_t *)((char *)x + 2), 4, s, q, NULL), EPMOE_ERR_MISALIGNED);
    CHECK(strstr(epmoe_last_error(), "x =") != NULL, "message: %s", epmoe_last_error());
    CHECK_STATUS(epmoe_cast_tensor_fp8_cuda(x, 4, (const float *)(void *)((char *)s + 2), q, NULL), EPMOE_ERR_MISALIGNED);
    CHECK(strstr(epmoe_last_error(), "scale =") != NULL, "message: %s", epmoe_last_error());

#define BOTH_REQUANT(want, ...)                                                                                        \
    CHECK_STATUS(epmoe_requant_fp8_ref(__VA_ARGS__), want);                                                            \
    CHECK_STATUS(epmoe_requant_fp8_cuda(__VA_ARGS__, NULL), want)
    BOTH_REQUANT(EPMOE_ERR_NULL_POINTER, q, s, F, NULL, 2, 1, 128, s, y);
    BOTH_REQUANT(EPMOE_ERR_NULL_POINTER, q, s, F, m, 2, 1, 128, NULL, y);
    BOTH_REQUANT(EPMOE_ERR_NULL_POINTER, NULL, s, F, m, 2, 1, 128, s, y);
    BOTH_REQUANT(EPMOE_ERR_NULL_POINTER, q, NULL, F, m, 2, 1, 128, s, y);
    BOTH_REQUANT(EPMOE_ERR_INVALID_ARG, q, s, F, m, -1, 1, 128, s, y);
    BOTH_REQUANT(EPMOE_ERR_INVALID_ARG, q, s, F, m, 2, 1, 200, s, y);
    BOTH_REQUANT(EPMOE_ERR_INVALID_ARG, q, s, (epmoe_scale_fmt)-1, m, 2, 1, 128, s, y);
    BOTH_REQUANT(EPMOE_ERR_INVALID_ARG, q, s, F, m, 2, 1, 128, s, q);      /* in place */
    BOTH_REQUANT(EPMOE_ERR_INVALID_ARG, q, s, F, m, 2, 1, 128, s, q + 64); /* overlap */
    CHECK_STATUS(epmoe_requant_fp8_ref(NULL, NULL, F, NULL, 0, 1, 128, NULL, NULL), EPMOE_OK);
    CHECK_STATUS(epmoe_requant_fp8_cuda(NULL, NULL, F, NULL, 0, 1, 128, NULL, NULL, NULL), EMPTY_OK);
    CHECK_STATUS(epmoe_requant_fp8_cuda(q, s, F, m, 2, 1, 128, s, y + 8, NULL), EPMOE_ERR_MISALIGNED);
    CHECK_STATUS(epmoe_requant_fp8_cuda(q, s, F, (const int32_t *)((char *)m + 2), 2, 1, 128, s, y, NULL), EPMOE_ERR_MISALIGNED);
    BOTH_REQUANT(EPMOE_ERR_NULL_POINTER, q, s, F, m, 2, 1, 128, s, NULL);
    CHECK(strstr(epmoe_last_error(), "y is NULL") != NULL, "message: %s", epmoe_last_error());
    BOTH_REQUANT(EPMOE_ERR_INVALID_ARG, q, s, F, m, 2, -1, 128, s, y);
    CHECK_STATUS(epmoe_requant_fp8_cuda(q + 8, s, F, m, 1, 1, 128, s, y, NULL), EPMOE_ERR_MISALIGNED);
    CHECK(strstr(epmoe_last_error(), "q =") != NULL, "message: %s", epmoe_last_error());
    CHECK_STATUS(epmoe_requant_fp8_cuda(q, (char *)s + 2, F, m, 2, 1, 128, s, y, NULL), EPMOE_ERR_MISALIGNED);
    CHECK(strstr(epmoe_last_error(), "scales =") != NULL, "message: %s", epmoe_last_error());
    CHECK_STATUS(epmoe_requant_fp8_cuda(q, s, F, m, 2, 1, 128, (const float *)(void *)((char *)s + 1), y, NULL),
                 EPMOE_ERR_MISALIGNED);
    CHECK(strstr(epmoe_last_error(), "out_scale =") != NULL, "message: %s", epmoe_last_error());

#define BOTH_DEQUANT(want, ...)                                                                                        \
    CHECK_STATUS(epmoe_dequant_fp8_ref(__VA_ARGS__), want);                                                            \
    CHECK_STATUS(epmoe_dequant_fp8_cuda(__VA_ARGS__, NULL), want)
    float yf[256];
    BOTH_DEQUANT(EPMOE_ERR_INVALID_ARG, q, s, F, NULL, 1, 1, 128, EPMOE_FP8_E4M3, yf);
    BOTH_DEQUANT(EPMOE_ERR_INVALID_ARG, q, s, F, NULL, 1, 1, 128, (epmoe_dtype)7, yf);
    BOTH_DEQUANT(EPMOE_ERR_NULL_POINTER, q, s, F, NULL, 1, 1, 128, EPMOE_F32, NULL);
    BOTH_DEQUANT(EPMOE_ERR_NULL_POINTER, NULL, s, F, NULL, 1, 1, 128, EPMOE_F32, yf);
    CHECK(strstr(epmoe_last_error(), "q is NULL") != NULL, "message: %s", epmoe_last_error());
    BOTH_DEQUANT(EPMOE_ERR_NULL_POINTER, q, NULL, F, NULL, 1, 1, 128, EPMOE_F32, yf);
    CHECK(strstr(epmoe_last_error(), "scales is NULL") != NULL, "message: %s", epmoe_last_error());
    BOTH_DEQUANT(EPMOE_ERR_INVALID_ARG, q, s, F, NULL, 1, 1, 100, EPMOE_F32, yf);
    BOTH_DEQUANT(EPMOE_ERR_INVALID_ARG, q, s, F, NULL, 1, 1, 0, EPMOE_F32, yf);
    BOTH_DEQUANT(EPMOE_ERR_INVALID_ARG, q, s, (epmoe_scale_fmt)4, NULL, 1, 1, 128, EPMOE_F32, yf);
    BOTH_DEQUANT(EPMOE_ERR_INVALID_ARG, q, s, F, NULL, -1, 1, 128, EPMOE_F32, yf);
    /* the reference stores y as its type: an element-misaligned y is refused there too */
    BOTH_DEQUANT(EPMOE_ERR_MISALIGNED, q, s, F, NULL, 1, 1, 128, EPMOE_F32, (char *)yf + 2);
    BOTH_DEQUANT(EPMOE_ERR_MISALIGNED, q, s, F, NULL, 1, 1, 128, EPMOE_BF16, (char *)yf + 1);
    CHECK_STATUS(epmoe_dequant_fp8_ref(q, s, F, NULL, 1, 1, 128, EPMOE_BF16, (char *)yf + 2), EPMOE_OK);
    BOTH_DEQUANT(EPMOE_ERR_INVALID_ARG, q, s, F, NULL, 1, -3, 128, EPMOE_F32, yf);
    BOTH_DEQUANT(EPMOE_ERR_INVALID_ARG, q, yf + 120, F, NULL, 1, 1, 128, EPMOE_F32, yf); /* y over its own scales */
    CHECK(strstr(epmoe_last_error(), "y overlaps scales") != NULL, "message: %s", epmoe_last_error());
    BOTH_REQUANT(EPMOE_ERR_INVALID_ARG, q, (float *)(void *)(y + 200), F, m, 2, 1, 128, s, y);

    /* Valid arguments on a machine without a usable GPU: a clear status, never a crash. */
    if (epmoe_cuda_device_count() == 0) {
        epmoe_status st = epmoe_cast_group_fp8_cuda(x, 1, 128, q, s, F, 0, NULL);
        CHECK(st == EPMOE_ERR_UNSUPPORTED || st == EPMOE_ERR_CUDA, "no GPU: status %d (%s)", st, epmoe_last_error());
        st = epmoe_requant_fp8_cuda(q, s, F, m, 2, 1, 128, s, y, NULL);
        CHECK(st == EPMOE_ERR_UNSUPPORTED || st == EPMOE_ERR_CUDA, "no GPU: status %d (%s)", st, epmoe_last_error());
    }
}

int main(void) {
    test_cast_group_hand();
    test_cast_group_error_model();
    test_cast_group_formats();
    test_cast_group_nonfinite();
    test_cast_tensor();
    test_requant_dequant();
    test_bad_args();
    return test_report("test_quant");
}
