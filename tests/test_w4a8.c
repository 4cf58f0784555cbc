/*
** test_w4a8.c — the host side of the W4A8 GEMM: the nibble encoding and the kernel's
** conversion for every int4 value and slot, the repacked layout (a bijection), repack/unpack
** round trips, the scales' bf16 rounding (exact from bf16, nearest even from fp32), the reference
** GEMM against the naive checkpoint-array oracle (every scale format, per-tensor mode, masked rows
** left untouched, awkward shapes), hand-computed cases, the MLP reference against its steps, and
** every bad argument (_ref and _cuda).
*/
#define _POSIX_C_SOURCE 200809L /* setenv: check_ref_threads */
#include "../src/w4a8_layout.h"
#include "w4a8_common.h"

#define POISON16 W4_POISON16

static void test_encoding(void) {
    test_rng r = {0x1234};
    for (int full = 0; full < 2; full++)
        for (int hi = 0; hi < 2; hi++)
            for (int b = 0; b < 4; b++)
                for (int v = full ? -8 : -7; v <= 7; v++)
                    for (int trial = 0; trial < 8; trial++) {
                        const uint32_t q0 = (uint32_t)rng_u64(&r);
                        const uint32_t q = w4_word_set(q0, hi, b, v, full);
                        CHECK(w4_word_get(q, hi, b, full) == v, "full %d hi %d b %d: %d -> %d", full, hi, b, v,
                              w4_word_get(q, hi, b, full));
                        /* the register byte is exactly v * 2^-9 as e4m3 */
                        const uint8_t byte = (uint8_t)(w4_word_to_fp8(q, hi, full) >> (8 * b));
                        CHECK(epmoe_fp8_e4m3_to_float(byte) * 512.0f == (float)v, "byte %02x for %d", byte, v);
                        /* the other 7 slots keep their values */
                        for (int h2 = 0; h2 < 2; h2++)
                            for (int b2 = 0; b2 < 4; b2++)
                                if (h2 != hi || b2 != b)
                                    CHECK(w4_word_get(q, h2, b2, full) == w4_word_get(q0, h2, b2, full),
                                          "slot (%d,%d) changed by (%d,%d)", h2, b2, hi, b);
                    }
}

static void test_layout_bijection(void) {
    const int64_t E = 2, N = 256, K = 384;
    const int64_t nib = E * N * K;
    uint8_t *seen = calloc((size_t)nib, 1);
    long dup = 0, out = 0;
    for (int64_t e = 0; e < E; e++)
        for (int64_t n = 0; n < N; n++)
            for (int64_t k = 0; k < K; k++) {
                const w4_pos p = w4_locate(N, K, e, n, k);
                const int64_t slot = (p.word / 4) * 8 + p.hi * 4 + p.b;
                if (p.word < 0 || p.word % 4 || slot >= nib) {
                    out++;
                    continue;
                }
                dup += seen[slot]++ != 0;
            }
    CHECK(dup == 0 && out == 0, "w4_locate: %ld duplicate and %ld out-of-range slots", dup, out);
    free(seen);
}

static void test_repack_roundtrip(void) {
    test_rng r = {0x77};
    for (int m8 = 0; m8 < 2; m8++) {
        w4_mat w;
        w4_mat_make(&r, &w, 3, 256, 384, m8, 0.01, EPMOE_W4_AUTO);
        CHECK(w.enc == (m8 ? EPMOE_W4_FULL : EPMOE_W4_SYM7), "AUTO picked %d with m8 = %d", w.enc, m8);
        epmoe_w4a8_weights pw = {w.E, w.N, w.K, w.enc, w.qw, w.sw};
        long bad = 0;
        for (int64_t e = 0; e < w.E; e++)
            for (int64_t n = 0; n < w.N; n++)
                for (int64_t k = 0; k < w.K; k++) {
                    int v;
                    float s;
                    epmoe_w4a8_unpack(&pw, e, n, k, &v, &s);
                    const float cs = w.ckpt_s[(e * w.N + n) * 3 + k / 128]; /* fp32: within bf16's 2^-8 */
                    bad += v != w4_ckpt_value(&w, e, n, k) || s != (float)w4_ckpt_scale(&w, e, n, k / 128) ||
                           fabsf(s - cs) > cs / 256;
                }
        CHECK(bad == 0, "repack/unpack: %ld of %lld values differ (m8 = %d)", bad, (long long)(w.E * w.N * w.K), m8);
        /* SYM7 refused when a -8 is present; FULL always accepted */
        int enc = EPMOE_W4_SYM7;
        CHECK_STATUS(epmoe_w4a8_repack(w.ckpt_w, w.ckpt_s, EPMOE_F32, 128, 3, 256, 384, w.qw, w.sw, &enc),
                     m8 ? EPMOE_ERR_INVALID_ARG : EPMOE_OK);
        enc = EPMOE_W4_FULL;
        CHECK_STATUS(epmoe_w4a8_repack(w.ckpt_w, w.ckpt_s, EPMOE_F32, 128, 3, 256, 384, w.qw, w.sw, &enc), EPMOE_OK);
        CHECK(enc == EPMOE_W4_FULL, "FULL asked, %d given", enc);
        w4_mat_free(&w);
    }
    /* bf16 scales are read as bf16 */
    int8_t cw[128 * 64];
    uint16_t cs[128];
    memset(cw, 0x11, sizeof cw);
    for (int i = 0; i < 128; i++) cs[i] = epmoe_bf16_from_float(0.5f + (float)i / 64);
    uint8_t qw[128 * 64];
    uint16_t sw[128];
    int enc = EPMOE_W4_AUTO;
    CHECK_STATUS(epmoe_w4a8_repack(cw, cs, EPMOE_BF16, 128, 1, 128, 128, qw, sw, &enc), EPMOE_OK);
    { /* the checkpoint's bf16 array at an odd address (a byte buffer's slice): the same result */
        static uint8_t odd[2 * 128 + 1];
        uint8_t qw2[128 * 64];
        uint16_t sw2[128];
        int enc2 = EPMOE_W4_AUTO;
        memcpy(odd + 1, cs, sizeof cs);
        CHECK_STATUS(epmoe_w4a8_repack(cw, odd + 1, EPMOE_BF16, 128, 1, 128, 128, qw2, sw2, &enc2), EPMOE_OK);
        CHECK(enc2 == enc && memcmp(qw2, qw, sizeof qw) == 0 && memcmp(sw2, sw, sizeof sw) == 0, "odd-address bf16 scales");
    }
    epmoe_w4a8_weights pw = {1, 128, 128, enc, qw, sw};
    int v;
    float s;
    epmoe_w4a8_unpack(&pw, 0, 77, 5, &v, &s);
    CHECK(v == 1 && s == epmoe_bf16_to_float(cs[77]), "bf16 scale: v %d s %g", v, s);
    /* no experts: AUTO still resolves (as for weights without a -8), so the GEMMs take the result */
    enc = EPMOE_W4_AUTO;
    CHECK_STATUS(epmoe_w4a8_repack(NULL, NULL, EPMOE_F32, 128, 0, 128, 128, NULL, NULL, &enc), EPMOE_OK);
    CHECK(enc == EPMOE_W4_SYM7, "E = 0: encoding %d, want SYM7", enc);
    /* the MLP's workspace: K of both GEMMs (H, I) must be multiples of 128, as the MLP requires */
    CHECK(epmoe_w4a8_mlp_workspace(1, 1, 128, 128) > 0, "a valid MLP has a workspace");
    CHECK(epmoe_w4a8_mlp_workspace(1, 1, 100, 100) == 0 && epmoe_w4a8_mlp_workspace(1, 1, 128, 100) == 0 &&
              epmoe_w4a8_mlp_workspace(1, 1, 100, 128) == 0,
          "H or I not a multiple of 128: no workspace");
}

/* Zero weights [1, 128, 128] with these 128 checkpoint scales: repacked scale n is sw[n]. */
static epmoe_status repack_scales(const void *cs, epmoe_dtype dtype, uint16_t *sw) {
    static int8_t cw[128 * 64];
    static uint8_t qw[128 * 64];
    int enc = EPMOE_W4_AUTO;
    return epmoe_w4a8_repack(cw, cs, dtype, 128, 1, 128, 128, qw, sw, &enc);
}

/* The repacked scales are bf16(s * 512), rounded to nearest even: every bf16 checkpoint scale
** bit for bit times 512 (all non-negative finite patterns; refused where * 512 overflows), fp32
** ones rounded once, ties to even, refused where that rounding overflows. */
static void test_repack_scales(void) {
    uint16_t cs[128], sw[128];
    long bad = 0, refused = 0;
    for (uint32_t base = 0; base < 0x7F80u; base += 128) { /* 128 patterns, one exponent, a call */
        for (int i = 0; i < 128; i++) cs[i] = (uint16_t)(base + i);
        const int fits = base < 0x7B00u; /* exponent + 9 < 255: finite times 512 */
        if (repack_scales(cs, EPMOE_BF16, sw) != (fits ? EPMOE_OK : EPMOE_ERR_INVALID_ARG)) {
            bad++;
            continue;
        }
        refused += !fits;
        for (int i = 0; fits && i < 128; i++) /* normal: the exponent field + 9; subnormal: exact too */
            bad += epmoe_bf16_to_float(sw[i]) != epmoe_bf16_to_float(cs[i]) * 512.0f ||
                   (cs[i] >= 0x80u && sw[i] != cs[i] + (9u << 7));
    }
    CHECK(bad == 0 && refused == (0x7F80 - 0x7B00) / 128, "bf16 scales: %ld blocks or values not exactly x 512", bad);

    /* fp32: s * 512 as bits (the fold is exact), then the one rounding */
    static const struct { uint32_t s512; uint16_t want; } r[] = {
        {0x3F808000u, 0x3F80u}, /* 1 + 2^-8: the tie between 1 and 1 + 2^-7, to even (down) */
        {0x3F818000u, 0x3F82u}, /* tie, to even (up; truncation would give 0x3F81) */
        {0x3F807FFFu, 0x3F80u}, {0x3F808001u, 0x3F81u}, /* either side of a tie */
        {0x3F7FFFFFu, 0x3F80u}, /* the carry into the exponent */
        {0x7F7F7FFFu, 0x7F7Fu}, /* just below the overflow tie: bf16's largest */
        {0x7F7F0000u, 0x7F7Fu}, /* bf16's largest itself */
    };
    const int nr = (int)(sizeof r / sizeof r[0]);
    float cf[128] = {0};
    for (int i = 0; i < nr; i++) {
        uint32_t u = r[i].s512;
        memcpy(&cf[i], &u, 4);
        cf[i] /= 512.0f;
    }
    CHECK_STATUS(repack_scales(cf, EPMOE_F32, sw), EPMOE_OK);
    for (int i = 0; i < nr; i++)
        CHECK(sw[i] == r[i].want, "fp32 scale * 512 = 0x%08x: bf16 0x%04x, want 0x%04x", r[i].s512, sw[i], r[i].want);
    /* (2 - 2^-8) * 2^127, the tie between bf16's largest (odd) and inf: rounds to inf, refused */
    uint32_t u = 0x7F7F8000u;
    memcpy(&cf[nr], &u, 4);
    cf[nr] /= 512.0f;
    CHECK_STATUS(repack_scales(cf, EPMOE_F32, sw), EPMOE_ERR_INVALID_ARG);
}

static epmoe_status run_ref(void *g) { return epmoe_w4a8_gemm_ref((const epmoe_w4a8_gemm_args *)g); }

/* Run the reference GEMM and compare with the oracle; rows past masked_m must keep the poison; the
** same bits on 1 and 3 threads. */
static void check_gemm(const char *what, const w4_mat *w, const w4_acts *A, const int32_t *masked, double tensor_scale) {
    const int64_t E = w->E, N = w->N, M = A->M;
    const int64_t rs = N + 8, es = M * rs + 16; /* strides wider than the data */
    uint16_t *out = malloc((size_t)(E * es) * 2 + 2);
    for (int64_t i = 0; i < E * es; i++) out[i] = POISON16;
    const float ts = (float)tensor_scale;
    epmoe_w4a8_gemm_args g = {{E, N, w->K, w->enc, w->qw, w->sw}, A->a, M, masked,
                              tensor_scale > 0 ? NULL : A->sa, A->fmt, &ts, out, rs, es, 0, NULL, 0};
    CHECK_STATUS(epmoe_w4a8_gemm_ref(&g), EPMOE_OK);
    w4_check_out(what, w, A, masked, tensor_scale, out, rs, es);
    check_ref_threads(what, run_ref, &g, &g.out, out, (size_t)(E * es));
    free(out);
}

static void test_ref_vs_oracle(void) {
    test_rng r = {0xBEEF};
    const epmoe_scale_fmt fmts[] = {EPMOE_SCALE_F32_ROW, EPMOE_SCALE_F32_MMAJOR, EPMOE_SCALE_UE8M0_ROW,
                                    EPMOE_SCALE_UE8M0_MMAJOR};
    const struct { int64_t E, N, K, M; int32_t masked[3]; } cases[] = {
        {3, 128, 128, 1, {1, 0, 1}},  {2, 256, 384, 5, {5, 3, 0}}, {3, 128, 640, 7, {0, 7, 9}},
        {1, 384, 256, 3, {-2, 0, 0}}, {2, 128, 1152, 4, {4, 2, 0}},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
        for (int f = 0; f < 5; f++) {
            w4_mat w;
            w4_mat_make(&r, &w, cases[c].E, cases[c].N, cases[c].K, (int)(c & 1), 0.02, EPMOE_W4_AUTO);
            w4_acts A;
            w4_acts_make(&r, &A, cases[c].E, cases[c].M, cases[c].K, fmts[f % 4], (int)(c % 3));
            char what[64];
            snprintf(what, sizeof what, "case %zu %s", c, f == 4 ? "tensor" : "group");
            check_gemm(what, &w, &A, cases[c].masked, f == 4 ? 0.0375 : 0.0);
            w4_acts_free(&A);
            w4_mat_free(&w);
        }
}

/* All weights w, all activations 1.0 at scale 1, weight scale s: out = 128 * G * w * s. */
static void test_gemm_hand(void) {
    for (int wv = -8; wv <= 7; wv += 5) {
        const int64_t N = 128, K = 256;
        int8_t cw[128 * 128];
        float cs[128 * 2];
        memset(cw, (wv & 0xF) | ((wv & 0xF) << 4), sizeof cw);
        for (int i = 0; i < 256; i++) cs[i] = 0.25f;
        static uint8_t qw[128 * 128];
        uint16_t sw[256];
        int enc = EPMOE_W4_AUTO;
        CHECK_STATUS(epmoe_w4a8_repack(cw, cs, EPMOE_F32, 128, 1, N, K, qw, sw, &enc), EPMOE_OK);
        uint8_t a[2 * 256];
        memset(a, epmoe_fp8_e4m3_from_float(1.0f), sizeof a);
        float sa[4] = {1.0f, 1.0f, 2.0f, 2.0f}; /* row-major [M=2, G=2]: token 1 at scale 2 */
        int32_t masked = 2;
        uint16_t out[2 * 128];
        epmoe_w4a8_gemm_args g = {{1, N, K, enc, qw, sw}, a, 2, &masked, sa, EPMOE_SCALE_F32_ROW, NULL, out, 128, 256, 0, NULL, 0};
        CHECK_STATUS(epmoe_w4a8_gemm_ref(&g), EPMOE_OK);
        CHECK(epmoe_bf16_to_float(out[5]) == 64.0f * wv && epmoe_bf16_to_float(out[128 + 100]) == 128.0f * wv,
              "w = %d: got %g and %g", wv, epmoe_bf16_to_float(out[5]), epmoe_bf16_to_float(out[228]));
    }
}

/* The MLP reference equals its steps done by hand: GEMM1 ref, silu·up in fp32 rounded to bf16,
** the library's cast, GEMM2 ref. And mode (a) error against an fp64 model without any
** quantization of the intermediate is at the fp8 level, not worse. */
static void test_mlp_ref(void) {
    test_rng r = {0x5151};
    const int64_t E = 2, M = 5, H = 256, I = 256;
    w4_mat w13, w2;
    w4_mat_make(&r, &w13, E, 2 * I, H, 0, 0.02, EPMOE_W4_AUTO);
    w4_mat_make(&r, &w2, E, H, I, 1, 0.02, EPMOE_W4_AUTO);
    w4_acts A;
    w4_acts_make(&r, &A, E, M, H, EPMOE_SCALE_F32_MMAJOR, 0);
    int32_t masked[2] = {5, 2};
    const size_t ws = epmoe_w4a8_mlp_workspace(E, M, H, I);
    CHECK(ws >= (size_t)(E * M * (2 * I * 2 + I + I / 128 * 4)), "workspace %zu too small", ws);
    uint8_t *work = aligned_alloc(256, (ws + 255) / 256 * 256);
    uint16_t *out = malloc((size_t)(E * M * H) * 2);
    for (int64_t i = 0; i < E * M * H; i++) out[i] = POISON16;
    epmoe_w4a8_mlp_args m = {{E, 2 * I, H, w13.enc, w13.qw, w13.sw}, {E, H, I, w2.enc, w2.qw, w2.sw}, A.a, M, masked,
                             A.sa, A.fmt, NULL, NULL, work, ws, out, H, M * H, 0};
    CHECK_STATUS(epmoe_w4a8_mlp_ref(&m), EPMOE_OK);

    /* by hand, from the oracle of GEMM1 */
    long bad = 0, touched = 0;
    w4_acts Y = {E, M, I, EPMOE_SCALE_F32_ROW, malloc((size_t)(E * M * I) * 2), malloc((size_t)(E * M * I)),
                 malloc((size_t)(E * M * (I / 128)) * 4), (size_t)(M * (I / 128)) * 4};
    memset(Y.a, 0, (size_t)(E * M * I));
    memset(Y.sa, 0, (size_t)(E * M * (I / 128)) * 4);
    for (int64_t e = 0; e < E; e++)
        for (int64_t t = 0; t < masked[e]; t++) {
            for (int64_t j = 0; j < I; j++) {
                double mag;
                const uint16_t gt = epmoe_bf16_from_float((float)w4_oracle(&w13, &A, 0, e, t, j, &mag));
                const uint16_t up = epmoe_bf16_from_float((float)w4_oracle(&w13, &A, 0, e, t, I + j, &mag));
                Y.x[(e * M + t) * I + j] = w4_silu_mul(gt, up);
            }
            epmoe_cast_group_fp8_ref(Y.x + (e * M + t) * I, 1, I, Y.a + (e * M + t) * I,
                                     Y.sa + Y.slab * (size_t)e + (size_t)t * (I / 128) * 4, EPMOE_SCALE_F32_ROW, 0);
        }
    for (int64_t e = 0; e < E; e++)
        for (int64_t t = 0; t < M; t++)
            for (int64_t n = 0; n < H; n++) {
                const uint16_t got = out[(e * M + t) * H + n];
                if (t >= masked[e]) {
                    touched += got != POISON16;
                    continue;
                }
                double mag;
                const double want = w4_oracle(&w2, &Y, 0, e, t, n, &mag);
                bad += !w4_close(epmoe_bf16_to_float(got), want, mag);
            }
    CHECK(bad == 0, "MLP ref vs its steps: %ld elements differ", bad);
    CHECK(touched == 0, "MLP ref wrote %ld masked elements", touched);

    /* mode (b): static scales; output finite and rows past masked_m untouched */
    const float s1 = 0.05f, s2 = 0.001f;
    m.a_scales = NULL, m.a_tensor_scale = &s1, m.a2_tensor_scale = &s2;
    for (int64_t i = 0; i < E * M * H; i++) out[i] = POISON16;
    CHECK_STATUS(epmoe_w4a8_mlp_ref(&m), EPMOE_OK);
    long nonfinite = 0;
    touched = 0;
    for (int64_t e = 0; e < E; e++)
        for (int64_t t = 0; t < M; t++)
            for (int64_t n = 0; n < H; n++) {
                const float v = epmoe_bf16_to_float(out[(e * M + t) * H + n]);
                if (t >= masked[e]) touched += out[(e * M + t) * H + n] != POISON16;
                else nonfinite += !isfinite(v);
            }
    CHECK(nonfinite == 0 && touched == 0, "MLP ref mode b: %ld non-finite, %ld masked written", nonfinite, touched);
    w4_acts_free(&Y);
    w4_acts_free(&A);
    w4_mat_free(&w13);
    w4_mat_free(&w2);
    free(work);
    free(out);
}

static void test_bad_args(void) {
    static uint8_t qw[2 * 128 * 256];
    static uint16_t sw[2 * 256 * 2];
    static uint8_t a[2 * 4 * 256];
    static float sa[2 * 4 * 2];
    static _Alignas(16) uint16_t out[2 * 4 * 256];
    int32_t masked[2] = {4, 4};
    const epmoe_w4a8_gemm_args good = {{2, 256, 256, EPMOE_W4_SYM7, qw, sw}, a, 4, masked, sa, EPMOE_SCALE_F32_ROW,
                                       NULL, out, 256, 1024, 0, NULL, 0};
    CHECK_STATUS(epmoe_w4a8_gemm_ref(&good), EPMOE_OK);
    epmoe_w4a8_gemm_args g;
/* var = good with one field changed, refused by fn##_ref and fn##_cuda with `want` */
#define BAD_FIELD(fn, var, good, field, value, want)                                                                   \
    do {                                                                                                               \
        var = good;                                                                                                    \
        var.field = value;                                                                                             \
        CHECK_STATUS(fn##_ref(&var), want);                                                                            \
        CHECK_STATUS(fn##_cuda(&var, NULL), want);                                                                     \
    } while (0)
#define BAD(field, value, want) BAD_FIELD(epmoe_w4a8_gemm, g, good, field, value, want)
    BAD(w.N, 200, EPMOE_ERR_INVALID_ARG);
    BAD(w.N, 0, EPMOE_ERR_INVALID_ARG);
    BAD(w.K, 100, EPMOE_ERR_INVALID_ARG);
    BAD(w.E, -1, EPMOE_ERR_INVALID_ARG);
    BAD(w.encoding, 7, EPMOE_ERR_INVALID_ARG);
    BAD(w.qweight, NULL, EPMOE_ERR_NULL_POINTER);
    BAD(w.scales, NULL, EPMOE_ERR_NULL_POINTER);
    BAD(a, NULL, EPMOE_ERR_NULL_POINTER);
    BAD(masked_m, NULL, EPMOE_ERR_NULL_POINTER);
    BAD(a_scale_fmt, (epmoe_scale_fmt)9, EPMOE_ERR_INVALID_ARG);
    BAD(a_scales, NULL, EPMOE_ERR_NULL_POINTER); /* and no tensor scale either */
    BAD(out, NULL, EPMOE_ERR_NULL_POINTER);
    BAD(out_row_stride, 128, EPMOE_ERR_INVALID_ARG);
    BAD(out_expert_stride, 512, EPMOE_ERR_INVALID_ARG);
    BAD(M, -3, EPMOE_ERR_INVALID_ARG);
    BAD(expected_m, -1, EPMOE_ERR_INVALID_ARG);
    BAD(out_row_stride, INT64_MAX - 10, EPMOE_ERR_INVALID_ARG); /* must not overflow the overlap check */
    BAD(out_expert_stride, -1024, EPMOE_ERR_INVALID_ARG);
    /* the output over an input: refused (the results would be garbage), by the reference too */
    BAD(out, (uint16_t *)(void *)(a + 1024), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "out overlaps a") != NULL, "message: %s", epmoe_last_error());
    BAD(a_scales, out + 8, EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "out overlaps a_scales") != NULL, "message: %s", epmoe_last_error());
    BAD(masked_m, (const int32_t *)(void *)(out + 2000), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "out overlaps masked_m") != NULL, "message: %s", epmoe_last_error());
    BAD(w.qweight, (const void *)(out + 1024), EPMOE_ERR_INVALID_ARG); /* the output over the weights */
    CHECK(strstr(epmoe_last_error(), "out overlaps w") != NULL, "message: %s", epmoe_last_error());
    BAD(w.scales, out + 1024, EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "out overlaps w") != NULL, "message: %s", epmoe_last_error());
    g = good, g.a_scales = NULL, g.a_tensor_scale = (const float *)(const void *)(out + 8); /* mode (b)'s scale */
    CHECK_STATUS(epmoe_w4a8_gemm_ref(&g), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "out overlaps a_tensor_scale") != NULL, "message: %s", epmoe_last_error());
    g.a_scales = sa; /* mode (a): the tensor scale is not read, so not checked */
    CHECK_STATUS(epmoe_w4a8_gemm_ref(&g), EPMOE_OK);
    g = good;
    g.a = a + 1; /* the GPU path needs 16-byte rows */
    CHECK_STATUS(epmoe_w4a8_gemm_cuda(&g, NULL), EPMOE_ERR_MISALIGNED);
    g = good;
    g.w.qweight = qw + 4;
    CHECK_STATUS(epmoe_w4a8_gemm_cuda(&g, NULL), EPMOE_ERR_MISALIGNED);
    g = good;
    g.a_scales = (const uint8_t *)sa + 2;
    CHECK_STATUS(epmoe_w4a8_gemm_cuda(&g, NULL), EPMOE_ERR_MISALIGNED);
    CHECK_STATUS(epmoe_w4a8_gemm_ref(NULL), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_w4a8_gemm_cuda(NULL, NULL), EPMOE_ERR_NULL_POINTER);
    /* pointers read as their types, on the host too: 4-byte scalars and counts, 2-byte bf16 */
    g = good;
    g.a_scales = NULL, g.a_tensor_scale = (const float *)(const void *)((const char *)sa + 2); /* mode (b) */
    CHECK_STATUS(epmoe_w4a8_gemm_ref(&g), EPMOE_ERR_MISALIGNED);
    CHECK_STATUS(epmoe_w4a8_gemm_cuda(&g, NULL), EPMOE_ERR_MISALIGNED);
    CHECK(strstr(epmoe_last_error(), "a_tensor_scale") != NULL, "message: %s", epmoe_last_error());
    BAD(w.scales, (const uint16_t *)(const void *)((const char *)sw + 1), EPMOE_ERR_MISALIGNED);
    CHECK(strstr(epmoe_last_error(), "scales =") != NULL, "message: %s", epmoe_last_error());
    g = good;
    g.w.scales = sw + 1; /* the GPU reads 16-byte vectors of them */
    CHECK_STATUS(epmoe_w4a8_gemm_cuda(&g, NULL), EPMOE_ERR_MISALIGNED);
    BAD(masked_m, (const int32_t *)(const void *)((const char *)masked + 2), EPMOE_ERR_MISALIGNED);
    CHECK(strstr(epmoe_last_error(), "masked_m") != NULL, "message: %s", epmoe_last_error());
    BAD(out, (uint16_t *)(void *)((char *)out + 1), EPMOE_ERR_MISALIGNED);
    CHECK(strstr(epmoe_last_error(), "out =") != NULL, "message: %s", epmoe_last_error());
    /* shapes past the per-expert bounds (E <= 4096, M <= 2^24) are refused by the reference too */
    BAD(w.E, 4097, EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "4096") != NULL, "the limit named: %s", epmoe_last_error());
    BAD(M, (INT64_C(1) << 24) + 1, EPMOE_ERR_INVALID_ARG);
    /* the GPU kernel counts work items (expert x 128-row weight tile x 8-token tile) in 32 bits: 2^16
    ** experts x 2^14 token tiles x 2 weight tiles is refused before anything is read */
    g = good;
    g.w.E = 1 << 16, g.M = 1 << 17, g.out_expert_stride = g.M * 256;
    CHECK_STATUS(epmoe_w4a8_gemm_cuda(&g, NULL), EPMOE_ERR_INVALID_ARG);
    /* and addresses activation rows (E x M) with 32-bit signed TMA coordinates: 1100 experts x 2^21
    ** rows (2.3e9) is refused too */
    g = good;
    g.w.E = 1100, g.M = 1 << 21, g.out_expert_stride = g.M * 256;
    CHECK_STATUS(epmoe_w4a8_gemm_cuda(&g, NULL), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "activation rows") != NULL, "the limit named: %s", epmoe_last_error());
    /* and keeps 2E + 1 ints a CTA in shared memory: more than 2048 experts are refused on the GPU */
    g = good;
    g.w.E = 2049, g.out_expert_stride = 4 * 256;
    CHECK_STATUS(epmoe_w4a8_gemm_cuda(&g, NULL), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "2048") != NULL, "the limit named: %s", epmoe_last_error());
    /* nothing to do is fine: no experts, or M = 0 */
    g = good;
    g.w.E = 0;
    CHECK_STATUS(epmoe_w4a8_gemm_ref(&g), EPMOE_OK);
    g = good;
    g.M = 0;
    CHECK_STATUS(epmoe_w4a8_gemm_ref(&g), EPMOE_OK);
#undef BAD

    /* repack */
    int8_t cw[128 * 64] = {0};
    float cs[128] = {0};
    uint8_t rq[128 * 64];
    uint16_t rs[128];
    int enc = EPMOE_W4_AUTO;
    CHECK_STATUS(epmoe_w4a8_repack(cw, cs, EPMOE_F32, 64, 1, 128, 128, rq, rs, &enc), EPMOE_ERR_UNSUPPORTED);
    CHECK_STATUS(epmoe_w4a8_repack(cw, cs, EPMOE_F32, 0, 1, 128, 128, rq, rs, &enc), EPMOE_ERR_INVALID_ARG);
    CHECK_STATUS(epmoe_w4a8_repack(cw, cs, EPMOE_F32, -128, 1, 128, 128, rq, rs, &enc), EPMOE_ERR_INVALID_ARG);
    CHECK_STATUS(epmoe_w4a8_repack(cw, cs, EPMOE_FP8_E4M3, 128, 1, 128, 128, rq, rs, &enc), EPMOE_ERR_INVALID_ARG);
    CHECK_STATUS(epmoe_w4a8_repack(cw, cs, EPMOE_F32, 128, 1, 100, 128, rq, rs, &enc), EPMOE_ERR_INVALID_ARG);
    CHECK_STATUS(epmoe_w4a8_repack(NULL, cs, EPMOE_F32, 128, 1, 128, 128, rq, rs, &enc), EPMOE_ERR_NULL_POINTER);
    enc = 5;
    CHECK_STATUS(epmoe_w4a8_repack(cw, cs, EPMOE_F32, 128, 1, 128, 128, rq, rs, &enc), EPMOE_ERR_INVALID_ARG);
    enc = EPMOE_W4_AUTO;
    cs[3] = NAN;
    CHECK_STATUS(epmoe_w4a8_repack(cw, cs, EPMOE_F32, 128, 1, 128, 128, rq, rs, &enc), EPMOE_ERR_INVALID_ARG);
    cs[3] = -1.0f;
    CHECK_STATUS(epmoe_w4a8_repack(cw, cs, EPMOE_F32, 128, 1, 128, 128, rq, rs, &enc), EPMOE_ERR_INVALID_ARG);
    cs[3] = 1e36f; /* finite, but not once the 2^9 is folded in */
    CHECK_STATUS(epmoe_w4a8_repack(cw, cs, EPMOE_F32, 128, 1, 128, 128, rq, rs, &enc), EPMOE_ERR_INVALID_ARG);
    size_t qb, sb;
    CHECK_STATUS(epmoe_w4a8_repack_size(2, 256, 384, &qb, &sb), EPMOE_OK);
    CHECK(qb == 2 * 256 * 384 / 2 && sb == 2 * 256 * 3 * 2, "repack_size %zu %zu", qb, sb); /* bf16 scales */
    CHECK_STATUS(epmoe_w4a8_repack_size(2, 256, 380, &qb, &sb), EPMOE_ERR_INVALID_ARG);
    CHECK_STATUS(epmoe_w4a8_repack_size(2, 256, 384, NULL, &sb), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_w4a8_repack_size(2, 256, 384, &qb, NULL), EPMOE_ERR_NULL_POINTER);
    CHECK(strstr(epmoe_last_error(), "scale_bytes") != NULL, "message: %s", epmoe_last_error());
    enc = EPMOE_W4_AUTO;
    CHECK_STATUS(epmoe_w4a8_repack(cw, NULL, EPMOE_F32, 128, 1, 128, 128, rq, rs, &enc), EPMOE_ERR_NULL_POINTER);
    CHECK(strstr(epmoe_last_error(), "ckpt_scales") != NULL, "message: %s", epmoe_last_error());
    CHECK_STATUS(epmoe_w4a8_repack(cw, cs, EPMOE_F32, 128, 1, 128, 128, NULL, rs, &enc), EPMOE_ERR_NULL_POINTER);
    CHECK(strstr(epmoe_last_error(), "qweight") != NULL, "message: %s", epmoe_last_error());
    CHECK_STATUS(epmoe_w4a8_repack(cw, cs, EPMOE_F32, 128, 1, 128, 128, rq, NULL, &enc), EPMOE_ERR_NULL_POINTER);
    CHECK(strstr(epmoe_last_error(), "scales is NULL") != NULL, "message: %s", epmoe_last_error());
    CHECK_STATUS(epmoe_w4a8_repack(cw, cs, EPMOE_F32, 128, 1, 128, 128, rq, rs, NULL), EPMOE_ERR_NULL_POINTER);
    CHECK(strstr(epmoe_last_error(), "encoding") != NULL, "message: %s", epmoe_last_error());
    CHECK_STATUS(epmoe_w4a8_repack(cw, cs, EPMOE_F32, 128, -1, 128, 128, rq, rs, &enc), EPMOE_ERR_INVALID_ARG);

    /* unpack: the weights as the GEMM checks them, then an index inside [E, N, K] */
    const epmoe_w4a8_weights ugood = {2, 256, 256, EPMOE_W4_SYM7, qw, sw};
    epmoe_w4a8_weights uw = ugood;
    int uv;
    float us;
    CHECK_STATUS(epmoe_w4a8_unpack(&uw, 1, 255, 255, &uv, &us), EPMOE_OK);
    CHECK_STATUS(epmoe_w4a8_unpack(NULL, 0, 0, 0, &uv, &us), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_w4a8_unpack(&uw, 0, 0, 0, NULL, &us), EPMOE_ERR_NULL_POINTER);
    CHECK(strstr(epmoe_last_error(), "value") != NULL, "message: %s", epmoe_last_error());
    CHECK_STATUS(epmoe_w4a8_unpack(&uw, 0, 0, 0, &uv, NULL), EPMOE_ERR_NULL_POINTER);
    CHECK(strstr(epmoe_last_error(), "scale is NULL") != NULL, "message: %s", epmoe_last_error());
    uw.qweight = NULL;
    CHECK_STATUS(epmoe_w4a8_unpack(&uw, 0, 0, 0, &uv, &us), EPMOE_ERR_NULL_POINTER);
    uw = ugood, uw.scales = NULL;
    CHECK_STATUS(epmoe_w4a8_unpack(&uw, 0, 0, 0, &uv, &us), EPMOE_ERR_NULL_POINTER);
    uw = ugood;
    CHECK_STATUS(epmoe_w4a8_unpack(&uw, 2, 0, 0, &uv, &us), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "outside") != NULL, "message: %s", epmoe_last_error());
    CHECK_STATUS(epmoe_w4a8_unpack(&uw, -1, 0, 0, &uv, &us), EPMOE_ERR_INVALID_ARG);
    CHECK_STATUS(epmoe_w4a8_unpack(&uw, 0, 256, 0, &uv, &us), EPMOE_ERR_INVALID_ARG);
    CHECK_STATUS(epmoe_w4a8_unpack(&uw, 0, -1, 0, &uv, &us), EPMOE_ERR_INVALID_ARG);
    CHECK_STATUS(epmoe_w4a8_unpack(&uw, 0, 0, 256, &uv, &us), EPMOE_ERR_INVALID_ARG);
    CHECK_STATUS(epmoe_w4a8_unpack(&uw, 0, 0, -1, &uv, &us), EPMOE_ERR_INVALID_ARG);
    uw.encoding = EPMOE_W4_AUTO; /* a repack input, never a stored encoding */
    CHECK_STATUS(epmoe_w4a8_unpack(&uw, 0, 0, 0, &uv, &us), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "encoding") != NULL, "message: %s", epmoe_last_error());
    uw = ugood, uw.E = 0; /* no experts: no index is inside */
    CHECK_STATUS(epmoe_w4a8_unpack(&uw, 0, 0, 0, &uv, &us), EPMOE_ERR_INVALID_ARG);

    /* MLP: shape mismatch, workspace, mode (b) without the second scale */
    static _Alignas(256) uint8_t ws[1 << 16];
    const float one = 1.0f;
    const epmoe_w4a8_mlp_args mgood = {{2, 256, 256, 0, qw, sw}, {2, 256, 128, 0, qw, sw}, a, 4, masked, sa,
                                       EPMOE_SCALE_F32_ROW, NULL, NULL, ws, sizeof ws, out, 256, 1024, 0};
    CHECK_STATUS(epmoe_w4a8_mlp_ref(&mgood), EPMOE_OK);
    epmoe_w4a8_mlp_args m = mgood;
    m.w2.K = 256; /* I from w2 disagrees with w13's 2I */
    CHECK_STATUS(epmoe_w4a8_mlp_ref(&m), EPMOE_ERR_INVALID_ARG);
    m = mgood;
    m.workspace_bytes = 100;
    CHECK_STATUS(epmoe_w4a8_mlp_ref(&m), EPMOE_ERR_INVALID_ARG);
    CHECK_STATUS(epmoe_w4a8_mlp_cuda(&m, NULL), EPMOE_ERR_INVALID_ARG);
    m = mgood;
    m.a_scales = NULL, m.a_tensor_scale = &one;
    CHECK_STATUS(epmoe_w4a8_mlp_ref(&m), EPMOE_ERR_NULL_POINTER);
    m = mgood;
    m.workspace = ws + 16;
    CHECK_STATUS(epmoe_w4a8_mlp_cuda(&m, NULL), EPMOE_ERR_MISALIGNED);
    /* the output, the workspace and the inputs apart */
    m = mgood, m.out = (uint16_t *)(void *)(ws + 256); /* inside the part the MLP uses */
    CHECK_STATUS(epmoe_w4a8_mlp_ref(&m), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "out overlaps workspace") != NULL, "message: %s", epmoe_last_error());
    m = mgood, m.a = ws + 4096;
    CHECK_STATUS(epmoe_w4a8_mlp_ref(&m), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "workspace overlaps a") != NULL, "message: %s", epmoe_last_error());
    m = mgood, m.w2.qweight = out + 512; /* the output over w2 */
    CHECK_STATUS(epmoe_w4a8_mlp_ref(&m), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "out overlaps w2") != NULL, "message: %s", epmoe_last_error());
    m = mgood, m.w13.scales = (const uint16_t *)(const void *)(ws + 1024); /* the workspace over w13's scales */
    CHECK_STATUS(epmoe_w4a8_mlp_ref(&m), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "workspace overlaps w13") != NULL, "message: %s", epmoe_last_error());
    m = mgood, m.a_scales = NULL, m.a_tensor_scale = &one, m.a2_tensor_scale = (const float *)(const void *)(ws + 512);
    CHECK_STATUS(epmoe_w4a8_mlp_ref(&m), EPMOE_ERR_INVALID_ARG); /* mode (b): GEMM2's scale inside the workspace */
    CHECK(strstr(epmoe_last_error(), "workspace overlaps a2_tensor_scale") != NULL, "message: %s", epmoe_last_error());
    m = mgood, m.out = (uint16_t *)(void *)a;
    CHECK_STATUS(epmoe_w4a8_mlp_ref(&m), EPMOE_ERR_INVALID_ARG);
    CHECK_STATUS(epmoe_w4a8_mlp_cuda(&m, NULL), EPMOE_ERR_INVALID_ARG);
    CHECK(epmoe_w4a8_mlp_workspace(-1, 4, 256, 128) == 0, "negative E has no workspace");
#define BAD_MLP(field, value, want) BAD_FIELD(epmoe_w4a8_mlp, m, mgood, field, value, want)
    CHECK_STATUS(epmoe_w4a8_mlp_ref(NULL), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_w4a8_mlp_cuda(NULL, NULL), EPMOE_ERR_NULL_POINTER);
    BAD_MLP(a, NULL, EPMOE_ERR_NULL_POINTER);
    BAD_MLP(masked_m, NULL, EPMOE_ERR_NULL_POINTER);
    BAD_MLP(out, NULL, EPMOE_ERR_NULL_POINTER);
    BAD_MLP(workspace, NULL, EPMOE_ERR_NULL_POINTER);
    CHECK(strstr(epmoe_last_error(), "workspace is NULL") != NULL, "message: %s", epmoe_last_error());
    BAD_MLP(M, -1, EPMOE_ERR_INVALID_ARG);
    BAD_MLP(expected_m, -1, EPMOE_ERR_INVALID_ARG);
    BAD_MLP(w13.encoding, EPMOE_W4_AUTO, EPMOE_ERR_INVALID_ARG);
    BAD_MLP(w2.encoding, 2, EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "w2 encoding") != NULL, "message: %s", epmoe_last_error());
    BAD_MLP(a_scale_fmt, (epmoe_scale_fmt)4, EPMOE_ERR_INVALID_ARG);
    /* per-tensor mode: the second scale is read as a float too */
    m = mgood;
    m.a_scales = NULL, m.a_tensor_scale = &one, m.a2_tensor_scale = (const float *)(const void *)((const char *)sa + 2);
    CHECK_STATUS(epmoe_w4a8_mlp_ref(&m), EPMOE_ERR_MISALIGNED);
    CHECK_STATUS(epmoe_w4a8_mlp_cuda(&m, NULL), EPMOE_ERR_MISALIGNED);
    CHECK(strstr(epmoe_last_error(), "a2_tensor_scale") != NULL, "message: %s", epmoe_last_error());
#undef BAD_MLP
#undef BAD_FIELD
}

int main(void) {
    test_encoding();
    test_layout_bijection();
    test_repack_roundtrip();
    test_repack_scales();
    test_gemm_hand();
    test_ref_vs_oracle();
    test_mlp_ref();
    test_bad_args();
    return test_report("test_w4a8");
}
