/*
** experts.c — the host side of the expert GEMM and MLP of the bf16, w8a8-fp8-block and w4a16
** schemes (weights read in their checkpoint layouts, see epmoe.h): argument checks shared with
** the CUDA entries (src/cuda/expert_gemm.cu, or the stubs of cuda_none.c), the MLP workspace
** layout, and the CPU references: fp64 accumulation over the dequantized operands, rounded once
** to bf16 (through fp32, as the kernels store it). Tests: tests/test_experts.c.
*/
#include <stdio.h>
#include <stdlib.h>

#include "format.h"
#include "internal.h"
#include "par_for.h"

/* What each weight format is: its name, bits per weight, bytes per activation element (also the
** MLP's intermediate), and whether weights (and, for FP8_BLOCK, activations) carry scales. */
static const struct expert_format {
    const char *name;
    int weight_bits, act_bytes, weight_scales, act_scales;
} formats[] = {
    [EPMOE_WEIGHT_BF16] = {"BF16", 16, 2, 0, 0},
    [EPMOE_WEIGHT_FP8_BLOCK] = {"FP8_BLOCK", 8, 1, 1, 1},
    [EPMOE_WEIGHT_INT4] = {"INT4", 4, 2, 1, 0},
};

static int format_ok(int f) { return f >= EPMOE_WEIGHT_BF16 && f <= EPMOE_WEIGHT_INT4; }

/* Weights per scale along K: 128 (FP8_BLOCK's 128x128 blocks), the INT4 group, or the whole row
** (BF16 has no scales: one "group" of scale 1 keeps its sum a plain dot product). */
static int64_t k_per_scale(const epmoe_expert_weights *w) {
    return w->format == EPMOE_WEIGHT_INT4 ? w->group : (w->format == EPMOE_WEIGHT_FP8_BLOCK ? EPMOE_GROUP : w->K);
}

/* ---- argument checks ------------------------------------------------------------------- */

epmoe_status epmoe__check_expert_weights(const char *fn, const char *what, const epmoe_expert_weights *w, int device) {
    EPMOE_CHECK(epmoe__need(fn, w, what, 1));
    if (!format_ok(w->format))
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: %s format %d is not an epmoe_weight_format", fn, what, w->format);
    EPMOE_CHECK(epmoe__check_dims(fn, what, w->E, w->N, w->K));
    if (w->format == EPMOE_WEIGHT_INT4 && w->group != 32 && w->group != 128)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: %s INT4 group = %lld must be 32 or 128", fn, what,
                           (long long)w->group);
    if (w->E == 0) return EPMOE_OK;
    const struct expert_format *f = &formats[w->format];
    char name[48];
    snprintf(name, sizeof name, "%s.data", what);
    EPMOE_CHECK(epmoe__need(fn, w->data, name, device ? 16 : (unsigned)(f->weight_bits + 7) / 8));
    snprintf(name, sizeof name, "%s.scales", what);
    if (f->weight_scales) EPMOE_CHECK(epmoe__need(fn, w->scales, name, 4)); /* BF16: ignored */
    return EPMOE_OK;
}

/* The activation side: a [E, M, K] in the format's activation type, masked_m, and for
** FP8_BLOCK the 1x128 group scales. */
static epmoe_status check_acts(const char *fn, const epmoe_expert_weights *w, int64_t M, const void *a,
                               const int32_t *masked_m, const void *a_scales, int a_fmt, int device) {
    if (M < 0 || M > EPMOE__MAX_DIM)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: M = %lld must be in [0, %lld]", fn, (long long)M,
                           (long long)EPMOE__MAX_DIM);
    const struct expert_format *f = &formats[w->format];
    if (f->act_scales && (a_fmt < EPMOE_SCALE_F32_ROW || a_fmt > EPMOE_SCALE_UE8M0_MMAJOR))
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: a_scale_fmt %d is not an epmoe_scale_fmt", fn, a_fmt);
    if (w->E == 0 || M == 0) return EPMOE_OK;
    EPMOE_CHECK(epmoe__need(fn, a, "a", device ? 16 : (unsigned)f->act_bytes));
    EPMOE_CHECK(epmoe__need(fn, masked_m, "masked_m", 4));
    if (f->act_scales) EPMOE_CHECK(epmoe__need(fn, a_scales, "a_scales", 4));
    return EPMOE_OK;
}

/* The bf16 output: strides as for W4A8, plus multiples of 8 elements so that with a 16-byte
** aligned out (device) every row starts 16-byte aligned; and the tile hint. */
static epmoe_status check_out(const char *fn, int64_t E, int64_t M, int64_t N, const uint16_t *out, int64_t row_stride,
                              int64_t expert_stride, int64_t expected_m, int device) {
    if (expected_m < 0)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: expected_m = %lld must be >= 0", fn, (long long)expected_m);
    EPMOE_CHECK(epmoe__check_out(fn, E, M, N, out, row_stride, expert_stride));
    if (row_stride % 8 || expert_stride % 8)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: out strides %lld, %lld must be multiples of 8 elements", fn,
                           (long long)row_stride, (long long)expert_stride);
    if (E == 0 || M == 0 || !device) return EPMOE_OK;
    return epmoe__need(fn, out, "out", 16);
}

/* fp8-block and bf16 run the wgmma GEMM (w4a8_gemm.cu, tiles of 32 tokens and more, weights by
** TMA): its 32-bit limits, checked with the arguments so that an MLP fails before it launches
** anything. bf16 is checked whichever kernel its expected rows pick (mma.sync to 32 rows, which has
** no such limit): reaching them takes operands of 512 GB or more. The mma.sync kernel of int4 and
** the references have none. */
static epmoe_status check_gpu_limits(const char *fn, const epmoe_expert_weights *w, int64_t M) {
    return w->format != EPMOE_WEIGHT_INT4 ? epmoe__check_wgmma_limits(fn, w->E, M, w->N, 32, 1) : EPMOE_OK;
}

/* An output region [o, o + on) apart from the activations (in the format's type), their scales and
** masked_m (all checked before). */
static epmoe_status acts_apart(const char *fn, const void *o, size_t on, const char *o_name, const epmoe_expert_weights *w,
                               int64_t M, const void *a, const int32_t *masked_m, const void *a_scales, int a_fmt) {
    const struct expert_format *f = &formats[w->format];
    const size_t sn = f->act_scales ? (size_t)w->E * epmoe_scale_bytes((epmoe_scale_fmt)a_fmt, M, w->K) : 0;
    return epmoe__acts_apart(fn, o, on, o_name, a, (size_t)(w->E * M * w->K) * (size_t)f->act_bytes, masked_m, w->E,
                             a_scales, sn);
}

/* An output region [o, o + on) apart from a weight matrix (checked before): its data and its scales. */
static epmoe_status weights_apart(const char *fn, const void *o, size_t on, const char *o_name, const char *w_name,
                                  const epmoe_expert_weights *w) {
    const struct expert_format *f = &formats[w->format];
    const size_t dn = (size_t)(w->E * w->N * w->K) / 8 * (size_t)f->weight_bits; /* K % 128 == 0: exact, no wrap */
    const int64_t scale_rows = w->format == EPMOE_WEIGHT_FP8_BLOCK ? w->N / EPMOE_GROUP : w->N; /* 128x128 blocks */
    const size_t sn = f->weight_scales ? (size_t)(w->E * scale_rows * (w->K / k_per_scale(w))) * sizeof(float) : 0;
    return epmoe__weights_apart(fn, o, on, o_name, w_name, "data", w->data, dn, f->weight_scales ? w->scales : NULL, sn);
}

epmoe_status epmoe__check_expert_gemm(const char *fn, const epmoe_expert_gemm_args *g, int device) {
    EPMOE_CHECK(epmoe__need(fn, g, "args", 1));
    EPMOE_CHECK(epmoe__check_expert_weights(fn, "w", &g->w, device));
    EPMOE_CHECK(check_acts(fn, &g->w, g->M, g->a, g->masked_m, g->a_scales, g->a_scale_fmt, device));
    EPMOE_CHECK(check_out(fn, g->w.E, g->M, g->w.N, g->out, g->out_row_stride, g->out_expert_stride, g->expected_m, device));
    if (device) EPMOE_CHECK(check_gpu_limits(fn, &g->w, g->M));
    const size_t on = epmoe__out_span(g->w.E, g->M, g->w.N, g->out_row_stride, g->out_expert_stride);
    EPMOE_CHECK(acts_apart(fn, g->out, on, "out", &g->w, g->M, g->a, g->masked_m, g->a_scales, g->a_scale_fmt));
    return weights_apart(fn, g->out, on, "out", "w", &g->w);
}

epmoe_status epmoe__check_expert_mlp(const char *fn, const epmoe_expert_mlp_args *m, int device) {
    EPMOE_CHECK(epmoe__need(fn, m, "args", 1));
    EPMOE_CHECK(epmoe__check_expert_weights(fn, "w13", &m->w13, device));
    EPMOE_CHECK(epmoe__check_expert_weights(fn, "w2", &m->w2, device));
    const epmoe_expert_weights *w13 = &m->w13, *w2 = &m->w2;
    if (w13->format != w2->format || (w13->format == EPMOE_WEIGHT_INT4 && w13->group != w2->group))
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: w13 (%s, group %lld) and w2 (%s, group %lld) must be of one format",
                           fn, formats[w13->format].name, (long long)w13->group, formats[w2->format].name,
                           (long long)w2->group);
    const int64_t E = w13->E, H = w13->K, I = w2->K;
    if (w2->E != E || w13->N != 2 * I || w2->N != H)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG,
                           "%s: w13 [%lld, %lld, %lld] and w2 [%lld, %lld, %lld] must be [E, 2I, H] and [E, H, I]", fn,
                           (long long)w13->E, (long long)w13->N, (long long)w13->K, (long long)w2->E, (long long)w2->N,
                           (long long)w2->K);
    EPMOE_CHECK(check_acts(fn, w13, m->M, m->a, m->masked_m, m->a_scales, m->a_scale_fmt, device));
    EPMOE_CHECK(check_out(fn, E, m->M, H, m->out, m->out_row_stride, m->out_expert_stride, m->expected_m, device));
    if (device) {
        EPMOE_CHECK(check_gpu_limits(fn, w13, m->M));
        EPMOE_CHECK(check_gpu_limits(fn, w2, m->M));
    }
    if (E == 0 || m->M == 0) return EPMOE_OK;
    const size_t ws = epmoe_expert_mlp_workspace(w13->format, E, m->M, H, I);
    EPMOE_CHECK(epmoe__need(fn, m->workspace, "workspace", device ? 256 : 16));
    if (m->workspace_bytes < ws)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: workspace_bytes = %zu, need epmoe_expert_mlp_workspace() = %zu", fn,
                           m->workspace_bytes, ws);
    const size_t on = epmoe__out_span(E, m->M, H, m->out_row_stride, m->out_expert_stride);
    EPMOE_CHECK(acts_apart(fn, m->out, on, "out", w13, m->M, m->a, m->masked_m, m->a_scales, m->a_scale_fmt));
    EPMOE_CHECK(acts_apart(fn, m->workspace, ws, "workspace", w13, m->M, m->a, m->masked_m, m->a_scales, m->a_scale_fmt));
    EPMOE_CHECK(weights_apart(fn, m->out, on, "out", "w13", w13));
    EPMOE_CHECK(weights_apart(fn, m->out, on, "out", "w2", w2));
    EPMOE_CHECK(weights_apart(fn, m->workspace, ws, "workspace", "w13", w13));
    EPMOE_CHECK(weights_apart(fn, m->workspace, ws, "workspace", "w2", w2));
    return epmoe__need_apart(fn, m->out, on, "out", m->workspace, ws, "workspace");
}

/* ---- MLP workspace: the one layout function of the buffer ------------------------------ */

size_t epmoe__expert_mlp_layout(int format, int64_t E, int64_t M, int64_t H, int64_t I, size_t *gate_up, size_t *inter,
                                size_t *inter_scales) {
    (void)H;
    const int fp8 = formats[format].act_scales;
    size_t off = 0;
    *gate_up = off;
    off = epmoe__align256(off + (size_t)(E * M * 2 * I) * 2); /* bf16 [E, M, 2I] */
    *inter = off;
    off = epmoe__align256(off + (size_t)(E * M * I) * (size_t)formats[format].act_bytes); /* bf16 or fp8 [E, M, I] */
    *inter_scales = off;
    off = epmoe__align256(off + (fp8 ? (size_t)(E * M * (I / EPMOE_GROUP)) * 4 : 0)); /* f32 [E, M, I/128] */
    return off;
}

size_t epmoe_expert_mlp_workspace(epmoe_weight_format format, int64_t E, int64_t M, int64_t H, int64_t I) {
    if (!format_ok(format) || E < 0 || M < 0 || H <= 0 || I <= 0 || H % EPMOE_GROUP || I % EPMOE_GROUP ||
        E > EPMOE__MAX_EXPERTS || M > EPMOE__MAX_DIM || H > EPMOE__MAX_DIM || I > EPMOE__MAX_DIM)
        return 0;
    size_t a, b, c;
    return epmoe__expert_mlp_layout(format, E, M, H, I, &a, &b, &c);
}

/* ---- references ------------------------------------------------------------------------ */

/* Weight row (e, n) split as the sums use it: the values, exact in fp32 (bf16, fp8 or int4), and
** the scale of each run of k_per_scale() weights along K (1 for BF16). */
static void weight_row(const epmoe_expert_weights *w, int64_t e, int64_t n, float *wrow, double *sw) {
    const int64_t N = w->N, K = w->K, row = e * N + n, G = K / k_per_scale(w);
    switch (w->format) {
    case EPMOE_WEIGHT_BF16:
        for (int64_t k = 0; k < K; k++) wrow[k] = fmt_bf16_to_float(((const uint16_t *)w->data)[row * K + k]);
        sw[0] = 1.0; /* G = 1 */
        break;
    case EPMOE_WEIGHT_FP8_BLOCK:
        for (int64_t k = 0; k < K; k++) wrow[k] = fmt_fp8_to_float(((const uint8_t *)w->data)[row * K + k]);
        for (int64_t j = 0; j < G; j++) sw[j] = w->scales[(e * (N / EPMOE_GROUP) + n / EPMOE_GROUP) * G + j];
        break;
    default: { /* INT4: two per byte, even k in the low nibble */
        const uint8_t *d = (const uint8_t *)w->data + row * K / 2;
        for (int64_t k = 0; k < K; k++) wrow[k] = (k & 1) ? fmt_int4_hi(d[k / 2]) : fmt_int4_lo(d[k / 2]);
        for (int64_t j = 0; j < G; j++) sw[j] = w->scales[row * G + j];
    }
    }
}

/* Output rows n in [begin, end) of one expert: par_for's body (each element alone, in a fixed order). */
typedef struct gemm_rows {
    const epmoe_expert_gemm_args *g;
    int64_t e, rows;
    const float *av;  /* the expert's activations, dequantized to fp32 [rows, K] (exact) */
    const double *sa; /* their 1x128 scales [rows, K/128] (FP8_BLOCK) */
    int oom;          /* set by a range that could not allocate its weight row */
} gemm_rows;

static void expert_gemm_rows(void *p, int64_t begin, int64_t end) {
    gemm_rows *j = (gemm_rows *)p;
    const epmoe_expert_gemm_args *g = j->g;
    const epmoe_expert_weights *w = &g->w;
    const int64_t K = w->K, ks = k_per_scale(w), G = K / ks, GA = K / EPMOE_GROUP, e = j->e;
    const int fp8 = formats[w->format].act_scales;
    double *sw = par_scratch((size_t)G * sizeof(double) + (size_t)K * sizeof(float), &j->oom);
    if (!sw) return;
    float *wrow = (float *)(sw + G);
    for (int64_t n = begin; n < end; n++) {
        weight_row(w, e, n, wrow, sw);
        for (int64_t m = 0; m < j->rows; m++) {
            double acc = 0.0;
            for (int64_t jg = 0; jg < G; jg++) {
                double part = 0.0;
                for (int64_t k = jg * ks; k < (jg + 1) * ks; k++) part += (double)j->av[m * K + k] * wrow[k];
                acc += (fp8 ? j->sa[m * GA + jg] * sw[jg] : sw[jg]) * part; /* FP8_BLOCK: ks = 128, so jg is a's group */
            }
            g->out[e * g->out_expert_stride + m * g->out_row_stride + n] = fmt_bf16_from_float((float)acc);
        }
    }
    free(sw);
}

epmoe_status epmoe_expert_gemm_ref(const epmoe_expert_gemm_args *g) {
    static const char fn[] = "epmoe_expert_gemm_ref";
    EPMOE_CHECK(epmoe__check_expert_gemm(fn, g, 0));
    const epmoe_expert_weights *w = &g->w;
    const int64_t E = w->E, N = w->N, K = w->K, M = g->M, GA = K / EPMOE_GROUP;
    if (E == 0 || M == 0) return EPMOE_OK;
    const int fp8 = formats[w->format].act_scales;
    float *av = malloc((size_t)(M * K) * sizeof(float));
    double *sa = malloc((size_t)(M * GA) * sizeof(double));
    gemm_rows job = {g, 0, 0, av, sa, 0};
    const size_t slab = fp8 ? (size_t)fmt_scale_slab_bytes(g->a_scale_fmt, M, GA) : 0;
    for (int64_t e = 0; e < E && av && sa && !job.oom; e++) {
        const int64_t rows = epmoe__valid_rows(g->masked_m, e, M);
        for (int64_t i = 0; i < rows * K; i++)
            av[i] = fp8 ? fmt_fp8_to_float(((const uint8_t *)g->a)[e * M * K + i])
                        : fmt_bf16_to_float(((const uint16_t *)g->a)[e * M * K + i]);
        const uint8_t *sa_slab = fp8 ? (const uint8_t *)g->a_scales + (size_t)e * slab : NULL;
        for (int64_t m = 0; fp8 && m < rows; m++)
            for (int64_t j = 0; j < GA; j++) sa[m * GA + j] = fmt_scale_load(sa_slab, g->a_scale_fmt, M, GA, m, j);
        job.e = e, job.rows = rows;
        if (rows > 0) par_for(N, 1 + (1 << 18) / (rows * K), expert_gemm_rows, &job);
    }
    const int oom = !av || !sa || job.oom;
    free(av), free(sa);
    if (oom)
        return epmoe__fail(EPMOE_ERR_OUT_OF_MEMORY, "%s: no memory for %lld x %lld activations and a weight row a thread", fn, (long long)M,
                           (long long)K);
    return EPMOE_OK;
}

epmoe_status epmoe_expert_mlp_ref(const epmoe_expert_mlp_args *m) {
    static const char fn[] = "epmoe_expert_mlp_ref";
    EPMOE_CHECK(epmoe__check_expert_mlp(fn, m, 0));
    const int64_t E = m->w13.E, M = m->M, H = m->w13.K, I = m->w2.K, G2 = I / EPMOE_GROUP;
    if (E == 0 || M == 0) return EPMOE_OK;
    const int fp8 = formats[m->w13.format].act_scales;
    size_t o_gu, o_in, o_sc;
    epmoe__expert_mlp_layout(m->w13.format, E, M, H, I, &o_gu, &o_in, &o_sc);
    uint16_t *gate_up = (uint16_t *)((uint8_t *)m->workspace + o_gu);
    uint8_t *inter = (uint8_t *)m->workspace + o_in;
    float *inter_scales = (float *)((uint8_t *)m->workspace + o_sc);

    const epmoe_expert_gemm_args g1 = {.w = m->w13, .a = m->a, .M = M, .masked_m = m->masked_m, .a_scales = m->a_scales,
                                       .a_scale_fmt = m->a_scale_fmt, .out = gate_up, .out_row_stride = 2 * I,
                                       .out_expert_stride = M * 2 * I, .expected_m = m->expected_m};
    EPMOE_CHECK(epmoe_expert_gemm_ref(&g1));
    uint16_t *y = fp8 ? malloc((size_t)I * 2) : NULL; /* the bf16 formats write silu·up straight into inter */
    if (fp8 && !y) return epmoe__fail(EPMOE_ERR_OUT_OF_MEMORY, "%s: no memory", fn);
    epmoe_status st = EPMOE_OK;
    for (int64_t e = 0; e < E && st == EPMOE_OK; e++) {
        const int64_t rows = epmoe__valid_rows(m->masked_m, e, M);
        for (int64_t r = 0; r < rows && st == EPMOE_OK; r++) {
            const int64_t row = e * M + r;
            epmoe__silu_mul_row(gate_up + row * 2 * I, I, fp8 ? y : (uint16_t *)inter + row * I);
            if (fp8)
                st = epmoe_cast_group_fp8_ref(y, 1, I, inter + row * I, inter_scales + row * G2, EPMOE_SCALE_F32_ROW, 0);
        }
    }
    free(y);
    EPMOE_CHECK(st);
    const epmoe_expert_gemm_args g2 = {.w = m->w2, .a = inter, .M = M, .masked_m = m->masked_m,
                                       .a_scales = fp8 ? (const void *)inter_scales : NULL,
                                       .a_scale_fmt = EPMOE_SCALE_F32_ROW, .out = m->out,
                                       .out_row_stride = m->out_row_stride, .out_expert_stride = m->out_expert_stride,
                                       .expected_m = m->expected_m};
    return epmoe_expert_gemm_ref(&g2);
}
