/*
** test_experts.c — the host side of the expert GEMM and MLP of the bf16, w8a8-fp8-block and
** w4a16 schemes: the reference GEMM against the dequantize-first fp64 oracle of experts_common.h
** (BF16, FP8_BLOCK under all four activation scale layouts, INT4 with groups 32 and 128; masked_m
** all 0, 1, 3, full and skewed; M = 1, 3, 127, 129; N, K not powers of two; out strides wider than
** N; rows past masked_m left untouched), hand-computed cases with known answers, the MLP reference
** against its steps composed here (and its workspace layout), the workspace size, and every bad
** argument (_ref and _cuda; in a CPU-only build _cuda answers the check's status first, then
** EPMOE_ERR_UNSUPPORTED). EPMOE_TEST_QUICK=1 (the sanitizer run) skips the largest shapes.
*/
#define _POSIX_C_SOURCE 200809L /* setenv: check_ref_threads */
#include "experts_common.h"

#define POISON16 XW_POISON16

static int quick;

/* A format as the tests name it: FP8_BLOCK with its activation scale layout, INT4 with its group. */
typedef struct variant {
    epmoe_weight_format f;
    epmoe_scale_fmt fmt; /* FP8_BLOCK activations */
    int64_t group;       /* INT4 */
    const char *name;
} variant;

static const variant variants[] = {
    {EPMOE_WEIGHT_BF16, EPMOE_SCALE_F32_ROW, 0, "BF16"},
    {EPMOE_WEIGHT_FP8_BLOCK, EPMOE_SCALE_F32_ROW, 0, "FP8_BLOCK f32-row"},
    {EPMOE_WEIGHT_FP8_BLOCK, EPMOE_SCALE_F32_MMAJOR, 0, "FP8_BLOCK f32-mmajor"},
    {EPMOE_WEIGHT_FP8_BLOCK, EPMOE_SCALE_UE8M0_ROW, 0, "FP8_BLOCK ue8m0-row"},
    {EPMOE_WEIGHT_FP8_BLOCK, EPMOE_SCALE_UE8M0_MMAJOR, 0, "FP8_BLOCK ue8m0-mmajor"},
    {EPMOE_WEIGHT_INT4, EPMOE_SCALE_F32_ROW, 32, "INT4 g32"},
    {EPMOE_WEIGHT_INT4, EPMOE_SCALE_F32_ROW, 128, "INT4 g128"},
};
#define NUM_VARIANTS (int)(sizeof variants / sizeof variants[0])

/* Argument structs by field name (the positional order is the header's business). */
static epmoe_expert_gemm_args gemm_args(epmoe_expert_weights w, const void *a, int64_t M, const int32_t *masked,
                                        const void *a_scales, epmoe_scale_fmt fmt, uint16_t *out, int64_t rs, int64_t es) {
    const epmoe_expert_gemm_args g = {.w = w, .a = a, .M = M, .masked_m = masked, .a_scales = a_scales, .a_scale_fmt = fmt,
                                      .out = out, .out_row_stride = rs, .out_expert_stride = es};
    return g;
}

static epmoe_expert_weights wts(epmoe_weight_format f, int64_t E, int64_t N, int64_t K, int64_t group, const void *data,
                                const float *scales) {
    const epmoe_expert_weights w = {f, E, N, K, group, data, scales};
    return w;
}

static epmoe_expert_mlp_args mlp_args(epmoe_expert_weights w13, epmoe_expert_weights w2, const void *a, int64_t M,
                                      const int32_t *masked, const void *a_scales, epmoe_scale_fmt fmt, void *ws,
                                      size_t ws_bytes, uint16_t *out, int64_t rs, int64_t es) {
    const epmoe_expert_mlp_args m = {.w13 = w13, .w2 = w2, .a = a, .M = M, .masked_m = masked, .a_scales = a_scales,
                                     .a_scale_fmt = fmt, .workspace = ws, .workspace_bytes = ws_bytes, .out = out,
                                     .out_row_stride = rs, .out_expert_stride = es};
    return m;
}

static uint16_t *poisoned(int64_t n) {
    uint16_t *p = aligned_alloc(16, (size_t)((n * 2 + 15) / 16 * 16 + 16));
    for (int64_t i = 0; i < n; i++) p[i] = POISON16;
    return p;
}

/* ---- the reference GEMM against the oracle -------------------------------------------- */

static long slack_total, checked_total;

static epmoe_status run_ref(void *g) { return epmoe_expert_gemm_ref((const epmoe_expert_gemm_args *)g); }

/* The reference against the oracle; the same bits on 1 and 3 threads. */
static void check_gemm(const variant *v, int64_t E, int64_t N, int64_t K, int64_t M, const int32_t *masked,
                       uint64_t seed, const char *what) {
    test_rng r = {seed};
    xw_mat w;
    xw_mat_make(&r, &w, v->f, E, N, K, v->group, 0.05);
    w4_acts A;
    w4_acts_make(&r, &A, E, M, K, v->fmt, (int)(seed % 3)); /* some with x200 outlier channels */
    const int64_t rs = N + 24, es = M * rs + 8; /* wider than the data, still multiples of 8 */
    uint16_t *out = poisoned(E * es);
    const epmoe_expert_gemm_args g = gemm_args(xw_weights(&w), xw_act_ptr(&A, v->f), M, masked, A.sa, v->fmt, out, rs, es);
    CHECK_STATUS(epmoe_expert_gemm_ref(&g), EPMOE_OK);
    epmoe_expert_gemm_args g2 = g;
    check_ref_threads(what, run_ref, &g2, &g2.out, out, (size_t)(E * es));
    double *Wd = xw_dequant_weights(&w), *Ad = xw_dequant_acts(&A, v->f);
    const xw_stats s = xw_check_out(what, Wd, Ad, E, M, N, K, masked, out, rs, es, 0, 0);
    slack_total += s.slack_used, checked_total += s.checked;
    free(Wd), free(Ad), free(out);
    w4_acts_free(&A);
    xw_mat_free(&w);
}

static void test_ref_vs_oracle(void) {
    enum { E = 3 };
    const int64_t Ms[] = {1, 3, 127, 129};
    const struct { int64_t N, K; } shapes[] = {{384, 640}, {640, 384}, {128, 1152}};
    char what[128];
    for (int vi = 0; vi < NUM_VARIANTS; vi++)
        for (size_t mi = 0; mi < sizeof Ms / sizeof Ms[0]; mi++) {
            const int64_t M = Ms[mi];
            if (quick && M > 3) continue;
            /* masked_m patterns: all 0, 1, 3 (clamped to M), full, skewed (none, some, past M) */
            const int32_t pats[5][E] = {{0, 0, 0}, {1, 1, 1}, {3, 3, 3}, {(int32_t)M, (int32_t)M, (int32_t)M},
                                        {(int32_t)M, 0, (int32_t)(M / 2 + 1)}};
            for (int p = 0; p < 5; p++) {
                /* big M: 127 skewed, 129 full (the small patterns are covered at small M) */
                if (M > 3 && p != (M == 127 ? 4 : 3)) continue;
                const int s = (int)((vi + mi + (size_t)p) % 3);
                snprintf(what, sizeof what, "%s M=%lld N=%lld K=%lld masked#%d", variants[vi].name, (long long)M,
                         (long long)shapes[s].N, (long long)shapes[s].K, p);
                check_gemm(&variants[vi], E, shapes[s].N, shapes[s].K, M, pats[p], 0xE0 + (uint64_t)(vi * 64 + mi * 8 + p),
                           what);
            }
            /* negative masked_m counts as 0 */
            const int32_t neg[E] = {-5, (int32_t)(M > 1 ? 1 : M), INT32_MIN};
            snprintf(what, sizeof what, "%s M=%lld negative masked_m", variants[vi].name, (long long)M);
            if (M <= 3) check_gemm(&variants[vi], E, 256, 384, M, neg, 0x4E6 + (uint64_t)vi, what);
        }
    printf("  reference vs fp64 oracle: %ld outputs, %ld within one bf16 ulp of a rounding boundary (fp64 order)\n",
           checked_total, slack_total);
    /* the slack is for fp64 summation order only: it must be needed almost never */
    CHECK(slack_total * 1000 <= checked_total, "%ld of %ld outputs needed the summation-order slack", slack_total,
          checked_total);
}

/* ---- hand-computed cases ----------------------------------------------------------------- */

/* BF16: all-ones weights; row 0 of ones, row 1 of halves: out = K and K/2 in every column. */
static void test_hand_bf16(void) {
    enum { N = 128, K = 384, M = 2 };
    static _Alignas(16) uint16_t w[N * K], a[M * K], out[M * N];
    for (int i = 0; i < N * K; i++) w[i] = epmoe_bf16_from_float(1.0f);
    for (int k = 0; k < K; k++) a[k] = epmoe_bf16_from_float(1.0f), a[K + k] = epmoe_bf16_from_float(0.5f);
    const int32_t masked = 2;
    const epmoe_expert_gemm_args g =
        gemm_args(wts(EPMOE_WEIGHT_BF16, 1, N, K, 0, w, NULL), a, M, &masked, NULL, EPMOE_SCALE_F32_ROW, out, N, M * N);
    CHECK_STATUS(epmoe_expert_gemm_ref(&g), EPMOE_OK);
    long bad = 0;
    for (int n = 0; n < N; n++) bad += epmoe_bf16_to_float(out[n]) != K || epmoe_bf16_to_float(out[N + n]) != K / 2;
    CHECK(bad == 0, "BF16 all ones: %ld of %d outputs are not %d / %d", bad, 2 * N, K, K / 2);
}

/* FP8_BLOCK: one nonzero weight w[0, 5, 200] = 2 (block scale 0.25 at (0, g 1)), one nonzero
** activation a[0, 200] = 3 (scale 0.5 for group 1), in each scale layout: out[0, 5] = 0.75, else 0. */
static void test_hand_fp8(void) {
    enum { N = 256, K = 384, M = 3, G = K / 128 };
    static _Alignas(16) uint8_t w[N * K], a[M * K], sa[M * G * 4];
    static _Alignas(16) uint16_t out[M * N];
    float sw[(N / 128) * G];
    for (int i = 0; i < (N / 128) * G; i++) sw[i] = 8.0f; /* every other block: a large scale on zeros */
    sw[0 * G + 1] = 0.25f;
    memset(w, 0, sizeof w), memset(a, 0, sizeof a);
    w[5 * K + 200] = epmoe_fp8_e4m3_from_float(2.0f);
    a[0 * K + 200] = epmoe_fp8_e4m3_from_float(3.0f);
    for (int f = 0; f < 4; f++) {
        const epmoe_scale_fmt fmt = (epmoe_scale_fmt)f;
        memset(sa, 0, sizeof sa);
        for (int t = 0; t < M; t++)
            for (int g = 0; g < G; g++) {
                const float s = t == 0 && g == 1 ? 0.5f : 4.0f;
                uint8_t *p = sa + epmoe_scale_offset(fmt, M, K, t, g);
                if (f >= EPMOE_SCALE_UE8M0_ROW) *p = epmoe_ue8m0_from_float(s);
                else memcpy(p, &s, 4);
            }
        for (int i = 0; i < M * N; i++) out[i] = POISON16;
        const int32_t masked = 2;
        const epmoe_expert_gemm_args g =
            gemm_args(wts(EPMOE_WEIGHT_FP8_BLOCK, 1, N, K, 0, w, sw), a, M, &masked, sa, fmt, out, N, M * N);
        CHECK_STATUS(epmoe_expert_gemm_ref(&g), EPMOE_OK);
        long bad = 0;
        for (int m = 0; m < 2; m++)
            for (int n = 0; n < N; n++) bad += epmoe_bf16_to_float(out[m * N + n]) != (m == 0 && n == 5 ? 0.75f : 0.0f);
        for (int n = 0; n < N; n++) bad += out[2 * N + n] != POISON16;
        CHECK(bad == 0, "FP8_BLOCK single nonzero, scale layout %d: %ld outputs wrong (out[0, 5] = %g)", f, bad,
              epmoe_bf16_to_float(out[5]));
    }
}

/* INT4: every weight -8 with scale (j + 1) for group j of 32 (K = 128), activations 1:
** out = -8 * 32 * (1 + 2 + 3 + 4) = -2560; every weight 7, g128 scales 0.5 and 1.5 (K = 256):
** 7 * 128 * 2 = 1792. Then single nonzero nibbles at odd and even k, and their activations. */
static void test_hand_int4(void) {
    enum { N = 128 };
    static _Alignas(16) uint8_t w[N * 128];
    static _Alignas(16) uint16_t a[256], out[N];
    float s[N * 4];
    const int32_t masked = 1;
    for (int k = 0; k < 256; k++) a[k] = epmoe_bf16_from_float(1.0f);

    memset(w, 0x88, N * 64); /* -8 in both nibbles */
    for (int n = 0; n < N; n++)
        for (int j = 0; j < 4; j++) s[n * 4 + j] = (float)(j + 1);
    epmoe_expert_gemm_args g =
        gemm_args(wts(EPMOE_WEIGHT_INT4, 1, N, 128, 32, w, s), a, 1, &masked, NULL, EPMOE_SCALE_F32_ROW, out, N, N);
    CHECK_STATUS(epmoe_expert_gemm_ref(&g), EPMOE_OK);
    long bad = 0;
    for (int n = 0; n < N; n++) bad += epmoe_bf16_to_float(out[n]) != -2560.0f;
    CHECK(bad == 0, "INT4 g32 all -8: %ld outputs are not -2560 (out[0] = %g)", bad, epmoe_bf16_to_float(out[0]));

    memset(w, 0x77, N * 128);
    for (int n = 0; n < N; n++) s[n * 2] = 0.5f, s[n * 2 + 1] = 1.5f;
    g.w.K = 256, g.w.group = 128;
    CHECK_STATUS(epmoe_expert_gemm_ref(&g), EPMOE_OK);
    bad = 0;
    for (int n = 0; n < N; n++) bad += epmoe_bf16_to_float(out[n]) != 1792.0f;
    CHECK(bad == 0, "INT4 g128 all 7: %ld outputs are not 1792 (out[0] = %g)", bad, epmoe_bf16_to_float(out[0]));

    /* row 9: 5 at k = 33 (high nibble of byte 16), -3 at k = 34 (low nibble of byte 17); a[k] = k */
    memset(w, 0, N * 128);
    w[9 * 128 + 16] = (uint8_t)(5 << 4);
    w[9 * 128 + 17] = (uint8_t)(-3 & 0xF);
    for (int k = 0; k < 256; k++) a[k] = epmoe_bf16_from_float((float)k);
    CHECK_STATUS(epmoe_expert_gemm_ref(&g), EPMOE_OK);
    bad = 0;
    for (int n = 0; n < N; n++) bad += epmoe_bf16_to_float(out[n]) != (n == 9 ? 0.5f * (5 * 33 - 3 * 34) : 0.0f);
    CHECK(bad == 0, "INT4 nibble order: %ld outputs wrong (out[9] = %g, want %g)", bad, epmoe_bf16_to_float(out[9]),
          0.5 * (5 * 33 - 3 * 34));
}

/* ---- the MLP reference against its steps --------------------------------------------------- */

/* The steps by hand: GEMM1 (reference), silu(gate) * up in fp32 rounded to bf16 (w4_silu_mul),
** the fp8 cast (FP8_BLOCK: the library's, F32_ROW, no rounding of scales), GEMM2 (reference).
** The MLP must equal them bit for bit, and its workspace must hold them where the layout says. */
static void check_mlp(const variant *v, int64_t E, int64_t M, int64_t H, int64_t I, const int32_t *masked, uint64_t seed) {
    test_rng r = {seed};
    xw_mat w13, w2;
    xw_mat_make(&r, &w13, v->f, E, 2 * I, H, v->group, 0.05);
    xw_mat_make(&r, &w2, v->f, E, H, I, v->group, 0.05);
    w4_acts A;
    w4_acts_make(&r, &A, E, M, H, v->fmt, 0);
    const int fp8 = v->f == EPMOE_WEIGHT_FP8_BLOCK;
    const size_t ws = epmoe_expert_mlp_workspace(v->f, E, M, H, I);
    uint8_t *work = aligned_alloc(256, (ws + 255) / 256 * 256);
    memset(work, 0xA5, ws);
    const int64_t rs = H + 8, es = M * rs + 16;
    uint16_t *out = poisoned(E * es);
    const epmoe_expert_mlp_args m =
        mlp_args(xw_weights(&w13), xw_weights(&w2), xw_act_ptr(&A, v->f), M, masked, A.sa, v->fmt, work, ws, out, rs, es);
    CHECK_STATUS(epmoe_expert_mlp_ref(&m), EPMOE_OK);

    /* the steps */
    uint16_t *gu = poisoned(E * M * 2 * I), *y = malloc((size_t)(E * M * I) * 2), *want = poisoned(E * es);
    uint8_t *q = calloc((size_t)(E * M * I), 1);
    float *qs = calloc((size_t)(E * M * (I / 128)), 4);
    const epmoe_expert_gemm_args g1 =
        gemm_args(xw_weights(&w13), xw_act_ptr(&A, v->f), M, masked, A.sa, v->fmt, gu, 2 * I, M * 2 * I);
    CHECK_STATUS(epmoe_expert_gemm_ref(&g1), EPMOE_OK);
    long bad_gu = 0, bad_inter = 0;
    const uint16_t *ws_gu = (const uint16_t *)work; /* layout: gate_up first */
    const size_t o_inter = (size_t)(E * M * 2 * I * 2 + 255) / 256 * 256;
    const size_t o_scales = o_inter + (size_t)(E * M * I * (fp8 ? 1 : 2) + 255) / 256 * 256;
    for (int64_t e = 0; e < E; e++)
        for (int64_t t = 0; t < masked[e] && t < M; t++) {
            const int64_t row = e * M + t;
            for (int64_t j = 0; j < 2 * I; j++) bad_gu += ws_gu[row * 2 * I + j] != gu[row * 2 * I + j];
            for (int64_t j = 0; j < I; j++) y[row * I + j] = w4_silu_mul(gu[row * 2 * I + j], gu[row * 2 * I + I + j]);
            if (fp8) {
                epmoe_cast_group_fp8_ref(y + row * I, 1, I, q + row * I, qs + row * (I / 128), EPMOE_SCALE_F32_ROW, 0);
                bad_inter += memcmp(work + o_inter + row * I, q + row * I, (size_t)I) != 0;
                bad_inter += memcmp(work + o_scales + row * (I / 128) * 4, qs + row * (I / 128), (size_t)(I / 32)) != 0;
            } else {
                bad_inter += memcmp(work + o_inter + row * I * 2, y + row * I, (size_t)I * 2) != 0;
            }
        }
    const epmoe_expert_gemm_args g2 = gemm_args(xw_weights(&w2), fp8 ? (const void *)q : (const void *)y, M, masked,
                                       fp8 ? qs : NULL, EPMOE_SCALE_F32_ROW, want, rs, es);
    CHECK_STATUS(epmoe_expert_gemm_ref(&g2), EPMOE_OK);
    long differ = 0;
    for (int64_t i = 0; i < E * es; i++) differ += out[i] != want[i]; /* poison included: masked rows untouched */
    CHECK(bad_gu == 0, "%s MLP: %ld gate_up elements of the workspace differ from GEMM1", v->name, bad_gu);
    CHECK(bad_inter == 0, "%s MLP: %ld intermediate rows of the workspace differ from silu·up (and its cast)", v->name,
          bad_inter);
    CHECK(differ == 0, "%s MLP: %ld of %lld outputs differ from its steps", v->name, differ, (long long)(E * es));
    free(gu), free(y), free(want), free(q), free(qs), free(work), free(out);
    w4_acts_free(&A);
    xw_mat_free(&w13), xw_mat_free(&w2);
}

static void test_mlp_ref(void) {
    const int32_t masked[3] = {5, 0, 2}, full[3] = {7, 7, 7};
    for (int vi = 0; vi < NUM_VARIANTS; vi++) {
        check_mlp(&variants[vi], 3, 5, 384, 256, masked, 0x3170 + (uint64_t)vi);
        if (!quick) check_mlp(&variants[vi], 3, 7, 256, 640, full, 0x3180 + (uint64_t)vi);
    }
}

/* ---- workspace ---------------------------------------------------------------------------- */

static size_t up256(size_t x) { return (x + 255) / 256 * 256; }

static void test_workspace(void) {
    const int64_t E = 3, M = 5, H = 384, I = 384;
    const size_t gate_up = (size_t)(E * M * 2 * I) * 2, bf16_inter = (size_t)(E * M * I) * 2;
    const size_t fp8_inter = (size_t)(E * M * I), fp8_scales = (size_t)(E * M * (I / 128)) * 4;
    CHECK(epmoe_expert_mlp_workspace(EPMOE_WEIGHT_BF16, E, M, H, I) == up256(gate_up) + up256(bf16_inter),
          "BF16 workspace %zu", epmoe_expert_mlp_workspace(EPMOE_WEIGHT_BF16, E, M, H, I));
    CHECK(epmoe_expert_mlp_workspace(EPMOE_WEIGHT_INT4, E, M, H, I) == up256(gate_up) + up256(bf16_inter),
          "INT4 workspace %zu", epmoe_expert_mlp_workspace(EPMOE_WEIGHT_INT4, E, M, H, I));
    CHECK(epmoe_expert_mlp_workspace(EPMOE_WEIGHT_FP8_BLOCK, E, M, H, I) ==
              up256(gate_up) + up256(fp8_inter) + up256(fp8_scales),
          "FP8_BLOCK workspace %zu", epmoe_expert_mlp_workspace(EPMOE_WEIGHT_FP8_BLOCK, E, M, H, I));
    CHECK(epmoe_expert_mlp_workspace(EPMOE_WEIGHT_FP8_BLOCK, 0, M, H, I) == 0, "no experts, no workspace");
    CHECK(epmoe_expert_mlp_workspace(EPMOE_WEIGHT_BF16, E, 0, H, I) == 0, "no rows, no workspace");
    CHECK(epmoe_expert_mlp_workspace((epmoe_weight_format)3, E, M, H, I) == 0, "bad format");
    CHECK(epmoe_expert_mlp_workspace(EPMOE_WEIGHT_BF16, -1, M, H, I) == 0, "negative E");
    CHECK(epmoe_expert_mlp_workspace(EPMOE_WEIGHT_BF16, E, -1, H, I) == 0, "negative M");
    CHECK(epmoe_expert_mlp_workspace(EPMOE_WEIGHT_BF16, E, M, 0, I) == 0, "H = 0");
    CHECK(epmoe_expert_mlp_workspace(EPMOE_WEIGHT_BF16, E, M, H, 100) == 0, "I not a multiple of 128");
    CHECK(epmoe_expert_mlp_workspace(EPMOE_WEIGHT_BF16, 5000, M, H, I) == 0, "E above the cap");
}

/* ---- bad arguments ------------------------------------------------------------------------ */

/* _ref and _cuda refuse it with the same status. */
#define BOTH(call_ref, call_cuda, want)                                                                               \
    do {                                                                                                               \
        CHECK_STATUS(call_ref, want);                                                                                  \
        CHECK_STATUS(call_cuda, want);                                                                                 \
    } while (0)

/* var = good with one field changed, refused by fn##_ref and fn##_cuda with `want`. */
#define BAD_FIELD(fn, var, good, field, value, want)                                                                   \
    do {                                                                                                               \
        var = good;                                                                                                    \
        var.field = value;                                                                                             \
        BOTH(fn##_ref(&var), fn##_cuda(&var, NULL), want);                                                             \
    } while (0)

static _Alignas(256) uint8_t wdata[2 * 256 * 256 * 2], adata[2 * 4 * 256 * 2], ws_buf[1 << 17];
static _Alignas(16) float wscales[2 * 256 * 8], ascales[2 * 4 * 2 * 4];
static _Alignas(16) uint16_t obuf[2 * 4 * 256 + 64];

static void test_gemm_bad_args(void) {
    int32_t masked[2] = {4, 4};
    const epmoe_expert_gemm_args good = gemm_args(wts(EPMOE_WEIGHT_FP8_BLOCK, 2, 256, 256, 0, wdata, wscales), adata, 4,
                                                  masked, ascales, EPMOE_SCALE_F32_ROW, obuf, 256, 1024);
    CHECK_STATUS(epmoe_expert_gemm_ref(&good), EPMOE_OK);
#if !EPMOE_HAVE_CUDA
    CHECK_STATUS(epmoe_expert_gemm_cuda(&good, NULL), EPMOE_ERR_UNSUPPORTED);
#endif
    epmoe_expert_gemm_args g;
    /* fp8-block (and bf16) on the GPU: 32-bit TMA rows E * N and E * M, refused by the checks (the
    ** pointers are never read); int4's mma.sync kernel has no such limit */
    g = good, g.w.E = 2048, g.w.N = INT64_C(1) << 20, g.out_row_stride = g.w.N, g.out_expert_stride = 4 * g.w.N;
    CHECK_STATUS(epmoe_expert_gemm_cuda(&g, NULL), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "2^31") != NULL, "the limit named: %s", epmoe_last_error());
#if !EPMOE_HAVE_CUDA
    g.w.format = EPMOE_WEIGHT_INT4, g.w.group = 128;
    g.out = (uint16_t *)(uintptr_t)(UINT64_C(1) << 46); /* never read; its 16 GB span must not overlap a */
    CHECK_STATUS(epmoe_expert_gemm_cuda(&g, NULL), EPMOE_ERR_UNSUPPORTED);
#endif
    g = good, g.w.E = 1100, g.M = INT64_C(1) << 21, g.out_expert_stride = g.M * 256;
    CHECK_STATUS(epmoe_expert_gemm_cuda(&g, NULL), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "2^31") != NULL, "the limit named: %s", epmoe_last_error());
    /* and its shared memory: more than 2048 experts are refused on the GPU (the reference takes them) */
    g = good, g.w.E = 2049, g.out_expert_stride = 4 * 256;
    CHECK_STATUS(epmoe_expert_gemm_cuda(&g, NULL), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "2048") && strstr(epmoe_last_error(), "shared memory"), "the limit named: %s",
          epmoe_last_error());
#define BAD(field, value, want) BAD_FIELD(epmoe_expert_gemm, g, good, field, value, want)
    BAD(w.format, (epmoe_weight_format)9, EPMOE_ERR_INVALID_ARG);
    BAD(w.format, (epmoe_weight_format)-1, EPMOE_ERR_INVALID_ARG);
    BAD(w.N, 200, EPMOE_ERR_INVALID_ARG);
    BAD(w.N, 0, EPMOE_ERR_INVALID_ARG);
    BAD(w.N, -128, EPMOE_ERR_INVALID_ARG);
    BAD(w.K, 100, EPMOE_ERR_INVALID_ARG);
    BAD(w.K, INT64_C(1) << 25, EPMOE_ERR_INVALID_ARG); /* above the cap */
    BAD(w.E, -1, EPMOE_ERR_INVALID_ARG);
    BAD(w.E, 4097, EPMOE_ERR_INVALID_ARG);
    BAD(w.data, NULL, EPMOE_ERR_NULL_POINTER);
    BAD(out, (uint16_t *)(void *)adata, EPMOE_ERR_INVALID_ARG); /* the output over an input */
    CHECK(strstr(epmoe_last_error(), "out overlaps a") != NULL, "message: %s", epmoe_last_error());
    BAD(a_scales, obuf + 8, EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "out overlaps a_scales") != NULL, "message: %s", epmoe_last_error());
    BAD(w.data, (const void *)(obuf + 512), EPMOE_ERR_INVALID_ARG); /* the output over the weights */
    CHECK(strstr(epmoe_last_error(), "out overlaps w") != NULL, "message: %s", epmoe_last_error());
    BAD(w.scales, (const float *)(const void *)(obuf + 2000), EPMOE_ERR_INVALID_ARG); /* their block scales (32 bytes) */
    CHECK(strstr(epmoe_last_error(), "out overlaps w") != NULL, "message: %s", epmoe_last_error());
    g = good, g.w.scales = (const float *)(const void *)(obuf + 2 * 4 * 256); /* just past the output: apart */
    CHECK_STATUS(epmoe_expert_gemm_ref(&g), EPMOE_OK);
    BAD(w.scales, NULL, EPMOE_ERR_NULL_POINTER);
    BAD(w.scales, (const float *)((const uint8_t *)wscales + 2), EPMOE_ERR_MISALIGNED); /* 4 bytes, host too */
    BAD(a, NULL, EPMOE_ERR_NULL_POINTER);
    BAD(masked_m, NULL, EPMOE_ERR_NULL_POINTER);
    BAD(masked_m, (const int32_t *)((const uint8_t *)masked + 1), EPMOE_ERR_MISALIGNED);
    BAD(a_scales, NULL, EPMOE_ERR_NULL_POINTER);
    BAD(a_scales, (const uint8_t *)ascales + 2, EPMOE_ERR_MISALIGNED);
    BAD(a_scale_fmt, (epmoe_scale_fmt)9, EPMOE_ERR_INVALID_ARG);
    BAD(out, NULL, EPMOE_ERR_NULL_POINTER);
    BAD(out_row_stride, 128, EPMOE_ERR_INVALID_ARG);          /* < N */
    BAD(out_row_stride, 260, EPMOE_ERR_INVALID_ARG);          /* not a multiple of 8 */
    BAD(out_expert_stride, 512, EPMOE_ERR_INVALID_ARG);       /* experts overlap */
    BAD(out_expert_stride, 1028, EPMOE_ERR_INVALID_ARG);      /* not a multiple of 8 */
    BAD(out_expert_stride, -1024, EPMOE_ERR_INVALID_ARG);
    BAD(out_row_stride, INT64_MAX - 10, EPMOE_ERR_INVALID_ARG); /* must not overflow the overlap check */
    BAD(M, -3, EPMOE_ERR_INVALID_ARG);
    BAD(M, INT64_C(1) << 25, EPMOE_ERR_INVALID_ARG);
    BAD(expected_m, -1, EPMOE_ERR_INVALID_ARG);
    /* the GPU's 16-byte rule; the reference reads fp8 bytes anywhere */
    g = good, g.a = adata + 1;
    CHECK_STATUS(epmoe_expert_gemm_ref(&g), EPMOE_OK);
    CHECK_STATUS(epmoe_expert_gemm_cuda(&g, NULL), EPMOE_ERR_MISALIGNED);
    g = good, g.w.data = wdata + 4;
    CHECK_STATUS(epmoe_expert_gemm_ref(&g), EPMOE_OK);
    CHECK_STATUS(epmoe_expert_gemm_cuda(&g, NULL), EPMOE_ERR_MISALIGNED);
    g = good, g.out = obuf + 1; /* 2-byte aligned: fine on the host */
    g.out_expert_stride = 1024;
    CHECK_STATUS(epmoe_expert_gemm_ref(&g), EPMOE_OK);
    CHECK_STATUS(epmoe_expert_gemm_cuda(&g, NULL), EPMOE_ERR_MISALIGNED);
    g = good, g.out = (uint16_t *)((uint8_t *)obuf + 1);
    BOTH(epmoe_expert_gemm_ref(&g), epmoe_expert_gemm_cuda(&g, NULL), EPMOE_ERR_MISALIGNED);
    BOTH(epmoe_expert_gemm_ref(NULL), epmoe_expert_gemm_cuda(NULL, NULL), EPMOE_ERR_NULL_POINTER);

    /* INT4: the group must be 32 or 128, and the message names it */
    const epmoe_expert_gemm_args int4 = gemm_args(wts(EPMOE_WEIGHT_INT4, 2, 256, 256, 32, wdata, wscales), adata, 4,
                                                  masked, NULL, (epmoe_scale_fmt)9 /* ignored */, obuf, 256, 1024);
    CHECK_STATUS(epmoe_expert_gemm_ref(&int4), EPMOE_OK);
    g = int4, g.w.group = 128;
    CHECK_STATUS(epmoe_expert_gemm_ref(&g), EPMOE_OK);
    const int64_t groups[] = {0, 64, 256, -32};
    for (size_t i = 0; i < sizeof groups / sizeof groups[0]; i++) {
        g = int4, g.w.group = groups[i];
        BOTH(epmoe_expert_gemm_ref(&g), epmoe_expert_gemm_cuda(&g, NULL), EPMOE_ERR_INVALID_ARG);
        CHECK(strstr(epmoe_last_error(), "group") != NULL, "group %lld: the message does not name it: %s",
              (long long)groups[i], epmoe_last_error());
    }
    g = int4, g.w.scales = NULL;
    BOTH(epmoe_expert_gemm_ref(&g), epmoe_expert_gemm_cuda(&g, NULL), EPMOE_ERR_NULL_POINTER);
    g = int4, g.a = adata + 1; /* bf16 activations: 2-byte aligned on the host */
    BOTH(epmoe_expert_gemm_ref(&g), epmoe_expert_gemm_cuda(&g, NULL), EPMOE_ERR_MISALIGNED);

    /* BF16: scales, a_scales and a_scale_fmt are ignored */
    const epmoe_expert_gemm_args bf16 = gemm_args(wts(EPMOE_WEIGHT_BF16, 2, 256, 256, 77, wdata, (const float *)1), adata,
                                                  4, masked, (const void *)3, (epmoe_scale_fmt)9, obuf, 256, 1024);
    CHECK_STATUS(epmoe_expert_gemm_ref(&bf16), EPMOE_OK);
    g = bf16, g.w.data = wdata + 1; /* bf16 weights: 2-byte aligned on the host */
    BOTH(epmoe_expert_gemm_ref(&g), epmoe_expert_gemm_cuda(&g, NULL), EPMOE_ERR_MISALIGNED);

    /* nothing to do is fine, and then the pointers may be NULL (a CPU-only build still says UNSUPPORTED) */
    g = good, g.w.E = 0, g.w.data = NULL, g.w.scales = NULL, g.a = NULL, g.masked_m = NULL, g.a_scales = NULL, g.out = NULL;
    CHECK_STATUS(epmoe_expert_gemm_ref(&g), EPMOE_OK);
#if !EPMOE_HAVE_CUDA
    CHECK_STATUS(epmoe_expert_gemm_cuda(&g, NULL), EPMOE_ERR_UNSUPPORTED);
#endif
    g = good, g.M = 0, g.a = NULL, g.masked_m = NULL, g.a_scales = NULL, g.out = NULL;
    CHECK_STATUS(epmoe_expert_gemm_ref(&g), EPMOE_OK);
    g.expected_m = 64; /* a hint only */
    CHECK_STATUS(epmoe_expert_gemm_ref(&g), EPMOE_OK);
#if !EPMOE_HAVE_CUDA
    CHECK_STATUS(epmoe_expert_gemm_cuda(&g, NULL), EPMOE_ERR_UNSUPPORTED);
#endif
#undef BAD
}

static void test_mlp_bad_args(void) {
    int32_t masked[2] = {4, 4};
    const epmoe_expert_mlp_args good =
        mlp_args(wts(EPMOE_WEIGHT_INT4, 2, 256, 256, 32, wdata, wscales), wts(EPMOE_WEIGHT_INT4, 2, 256, 128, 32, wdata, wscales),
                 adata, 4, masked, NULL, EPMOE_SCALE_F32_ROW, ws_buf, sizeof ws_buf, obuf, 256, 1024);
    CHECK_STATUS(epmoe_expert_mlp_ref(&good), EPMOE_OK);
#if !EPMOE_HAVE_CUDA
    CHECK_STATUS(epmoe_expert_mlp_cuda(&good, NULL), EPMOE_ERR_UNSUPPORTED);
#endif
    epmoe_expert_mlp_args m;
#define BAD(field, value, want) BAD_FIELD(epmoe_expert_mlp, m, good, field, value, want)
    BAD(w2.format, EPMOE_WEIGHT_BF16, EPMOE_ERR_INVALID_ARG);     /* two formats */
    BAD(w2.group, 128, EPMOE_ERR_INVALID_ARG);                    /* two INT4 groups */
    BAD(w2.group, 48, EPMOE_ERR_INVALID_ARG);
    BAD(w2.K, 256, EPMOE_ERR_INVALID_ARG);                        /* w13.N != 2 * w2.K */
    BAD(w2.N, 384, EPMOE_ERR_INVALID_ARG);                        /* w2.N != w13.K */
    BAD(w2.E, 1, EPMOE_ERR_INVALID_ARG);
    BAD(w13.format, (epmoe_weight_format)5, EPMOE_ERR_INVALID_ARG);
    BAD(w13.data, NULL, EPMOE_ERR_NULL_POINTER);
    BAD(w2.scales, NULL, EPMOE_ERR_NULL_POINTER);
    BAD(a, NULL, EPMOE_ERR_NULL_POINTER);
    BAD(masked_m, NULL, EPMOE_ERR_NULL_POINTER);
    BAD(M, -1, EPMOE_ERR_INVALID_ARG);
    BAD(expected_m, -5, EPMOE_ERR_INVALID_ARG);
    BAD(out, NULL, EPMOE_ERR_NULL_POINTER);
    BAD(out_row_stride, 255, EPMOE_ERR_INVALID_ARG);
    BAD(out_row_stride, 264, EPMOE_ERR_INVALID_ARG); /* then the experts overlap */
    BAD(out_expert_stride, 1020, EPMOE_ERR_INVALID_ARG);
    BAD(workspace, NULL, EPMOE_ERR_NULL_POINTER);
    BAD(workspace_bytes, 4096, EPMOE_ERR_INVALID_ARG);
    BAD(out, (uint16_t *)(void *)(ws_buf + 1024), EPMOE_ERR_INVALID_ARG); /* inside the part the MLP uses */
    CHECK(strstr(epmoe_last_error(), "out overlaps workspace") != NULL, "message: %s", epmoe_last_error());
    BAD(a, ws_buf + 4096, EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "workspace overlaps a") != NULL, "message: %s", epmoe_last_error());
    BAD(w2.data, (const void *)(obuf + 256), EPMOE_ERR_INVALID_ARG); /* the output over w2's nibbles */
    CHECK(strstr(epmoe_last_error(), "out overlaps w2") != NULL, "message: %s", epmoe_last_error());
    BAD(w13.scales, (const float *)(const void *)(ws_buf + 2048), EPMOE_ERR_INVALID_ARG); /* the workspace over them */
    CHECK(strstr(epmoe_last_error(), "workspace overlaps w13") != NULL, "message: %s", epmoe_last_error());
    BAD(workspace, ws_buf + 8, EPMOE_ERR_MISALIGNED); /* 16 bytes on the host, 256 on the GPU */
    m = good, m.workspace = ws_buf + 16, m.workspace_bytes = sizeof ws_buf - 16;
    CHECK_STATUS(epmoe_expert_mlp_ref(&m), EPMOE_OK);
    CHECK_STATUS(epmoe_expert_mlp_cuda(&m, NULL), EPMOE_ERR_MISALIGNED);
    m = good, m.workspace_bytes = epmoe_expert_mlp_workspace(EPMOE_WEIGHT_INT4, 2, 4, 256, 128);
    CHECK_STATUS(epmoe_expert_mlp_ref(&m), EPMOE_OK); /* exactly the size asked for */
    m.workspace_bytes -= 1;
    BOTH(epmoe_expert_mlp_ref(&m), epmoe_expert_mlp_cuda(&m, NULL), EPMOE_ERR_INVALID_ARG);
    BOTH(epmoe_expert_mlp_ref(NULL), epmoe_expert_mlp_cuda(NULL, NULL), EPMOE_ERR_NULL_POINTER);

    /* FP8_BLOCK needs the activation scales, in a valid layout */
    const epmoe_expert_mlp_args fp8 =
        mlp_args(wts(EPMOE_WEIGHT_FP8_BLOCK, 2, 256, 256, 0, wdata, wscales), wts(EPMOE_WEIGHT_FP8_BLOCK, 2, 256, 128, 0, wdata, wscales),
                 adata, 4, masked, ascales, EPMOE_SCALE_UE8M0_MMAJOR, ws_buf, sizeof ws_buf, obuf, 256, 1024);
    CHECK_STATUS(epmoe_expert_mlp_ref(&fp8), EPMOE_OK);
    m = fp8, m.a_scales = NULL;
    BOTH(epmoe_expert_mlp_ref(&m), epmoe_expert_mlp_cuda(&m, NULL), EPMOE_ERR_NULL_POINTER);
    m = fp8, m.a_scale_fmt = (epmoe_scale_fmt)4;
    BOTH(epmoe_expert_mlp_ref(&m), epmoe_expert_mlp_cuda(&m, NULL), EPMOE_ERR_INVALID_ARG);
    m = fp8, m.w2.group = 32; /* ignored outside INT4 */
    CHECK_STATUS(epmoe_expert_mlp_ref(&m), EPMOE_OK);
    /* the GPU kernel's 32-bit limits, found by the checks before GEMM1 launches: w2's rows E * H >= 2^31
    ** (nothing is read: the checks come first) */
    m = fp8, m.w13.E = m.w2.E = 2048, m.w13.K = m.w2.N = INT64_C(1) << 20;
    m.out_row_stride = INT64_C(1) << 20, m.out_expert_stride = INT64_C(4) << 20;
    CHECK_STATUS(epmoe_expert_mlp_cuda(&m, NULL), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "N = 1048576 weight rows") && strstr(epmoe_last_error(), "2^31"), "the limit named: %s",
          epmoe_last_error());

    /* nothing to do: E = 0 or M = 0, pointers NULL */
    m = good, m.w13.E = m.w2.E = 0, m.w13.data = m.w2.data = NULL, m.w13.scales = m.w2.scales = NULL;
    m.a = NULL, m.masked_m = NULL, m.workspace = NULL, m.workspace_bytes = 0, m.out = NULL;
    CHECK_STATUS(epmoe_expert_mlp_ref(&m), EPMOE_OK);
#if !EPMOE_HAVE_CUDA
    CHECK_STATUS(epmoe_expert_mlp_cuda(&m, NULL), EPMOE_ERR_UNSUPPORTED);
#endif
    m = good, m.M = 0, m.a = NULL, m.masked_m = NULL, m.workspace = NULL, m.workspace_bytes = 0, m.out = NULL;
    CHECK_STATUS(epmoe_expert_mlp_ref(&m), EPMOE_OK);
#if !EPMOE_HAVE_CUDA
    CHECK_STATUS(epmoe_expert_mlp_cuda(&m, NULL), EPMOE_ERR_UNSUPPORTED);
#endif
#undef BAD
}

int main(void) {
    quick = getenv("EPMOE_TEST_QUICK") && atoi(getenv("EPMOE_TEST_QUICK"));
    test_hand_bf16();
    test_hand_fp8();
    test_hand_int4();
    test_workspace();
    test_gemm_bad_args();
    test_mlp_bad_args();
    test_ref_vs_oracle();
    test_mlp_ref();
    return test_report("test_experts");
}
