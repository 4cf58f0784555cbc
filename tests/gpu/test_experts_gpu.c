/*
** test_experts_gpu.c — the expert GEMM and MLP of the bf16, w8a8-fp8-block and w4a16 schemes on
** the GPU against the CPU references (epmoe_expert_gemm_ref / epmoe_expert_mlp_ref).
**  1. GEMM: BF16, FP8_BLOCK in all four activation-scale layouts, INT4 group 32 and 128;
**     masked_m patterns {all 0, all 1, 3, full M, skewed, < 0 and > M}; M = 1, 3, 9, 64, 65, 129;
**     E = 1; N, K multiples of 128 other than powers of two, and K = 7168; more work items than
**     CTAs; a NaN token; outputs
**     poisoned, rows past masked_m, columns past N and the gap between experts checked untouched.
**  2. CUDA graph: the GEMM captured once, replayed with masked_m and activations changed on the device.
**  3. MLP, per stage: GEMM1's bf16 output (in the workspace) against the reference GEMM, GEMM2's
**     output against the reference GEMM run on the GPU's own intermediate, and the whole MLP
**     against epmoe_expert_mlp_ref within the intermediate's rounding.
** EPMOE_TEST_QUICK=1 (memcheck) runs fewer cases; EPMOE_SEED=n repeats a run.
**
** Error model of one output element (the kernel: exact products, fp32 sums per group, scaled
** partials added in fp32, one bf16 rounding; the reference: fp64, one bf16 rounding):
**   |got - want| <= TOL_BF16 * |want| + TOL_SUM * sum_k |a_k w_k|   (dequantized operands)
** TOL_BF16 = 2^-7: the two bf16 roundings of nearly the same value may land on adjacent values,
** one ulp apart, and an ulp is up to 2^-7 of the value (at the bottom of a binade). TOL_SUM = 2^-12: the fp32 sums,
** K/16 <= 512 mma accumulations of at most 2^-22 relative each (2^-13), with 2x margin. A wrong
** fragment slot, scale or row moves an element by O(|a||w|), far outside.
** FP8_BLOCK runs the W4A8 kernel's fp8 wgmma (w4a8_gemm.cu), whose tensor-core sum aligns and
** truncates (~14 bits kept, DeepSeek-V3 §3.3) before each group's fp32 promotion: its TOL_SUM is
** W4A8's, TOL_SUM_WGMMA = 2^-8, with W4A8's rare tail (w4a8_common.h: at most one element per
** million, at least one, between 1x and 2x the bound, none beyond).
*/
#include "cuda_check.h"
#include <time.h>

#include "../test.h"
#include "par_for.h"

#define TOL_BF16 (1.0 / 128)
#define TOL_SUM (1.0 / 4096)
#define TOL_SUM_WGMMA (1.0 / 256)
#define POISON16 0x7FBFu /* a bf16 NaN no computation here produces */
/* MLP end to end: the intermediate may round differently by one step (silu's expf differs by an
** ulp between libm and CUDA): a bf16 step is 2^-8, an fp8 step 2^-3 of an element; averaged over
** the K of GEMM2 the output moves by far less. Relative L2 bounds: */
#define TOL_MLP_BF16 (1.0 / 256)
#define TOL_MLP_FP8 (1.0 / 32)

static cudaStream_t stream;
static int quick;

static void *dev_copy(const void *h, size_t bytes) {
    void *p;
    CUDA_OK(cudaMalloc(&p, bytes ? bytes : 16));
    if (bytes) CUDA_OK(cudaMemcpy(p, h, bytes, cudaMemcpyHostToDevice));
    CUDA_OK(cudaDeviceSynchronize()); /* pageable copies may land after return; the stream is non-blocking */
    return p;
}

static void *host_copy(const void *d, size_t bytes) {
    void *h = malloc(bytes ? bytes : 16);
    CUDA_OK(cudaMemcpy(h, d, bytes, cudaMemcpyDeviceToHost));
    return h;
}

static uint16_t *poisoned16(int64_t n) {
    uint16_t *h = malloc((size_t)n * 2);
    for (int64_t i = 0; i < n; i++) h[i] = POISON16;
    return h;
}

static const char *fmt_name(epmoe_weight_format f, int64_t group) {
    return f == EPMOE_WEIGHT_BF16 ? "bf16" : f == EPMOE_WEIGHT_FP8_BLOCK ? "fp8-block" : group == 32 ? "int4-g32" : "int4-g128";
}

/* ---- host operands ---- */
typedef struct mat {
    epmoe_expert_weights w; /* host pointers */
    size_t data_bytes, scale_bytes;
} mat;

static mat make_weights(test_rng *r, epmoe_weight_format f, int64_t group, int64_t E, int64_t N, int64_t K) {
    mat m;
    memset(&m, 0, sizeof m);
    m.w.format = f, m.w.E = E, m.w.N = N, m.w.K = K, m.w.group = f == EPMOE_WEIGHT_INT4 ? group : 0;
    const int64_t n = E * N * K;
    if (f == EPMOE_WEIGHT_BF16) {
        uint16_t *d = malloc((size_t)n * 2);
        for (int64_t i = 0; i < n; i++) d[i] = epmoe_bf16_from_float((float)(0.05 * rng_normal(r)));
        m.w.data = d, m.data_bytes = (size_t)n * 2;
    } else if (f == EPMOE_WEIGHT_FP8_BLOCK) {
        uint8_t *d = malloc((size_t)n);
        for (int64_t i = 0; i < n; i++) d[i] = epmoe_fp8_e4m3_from_float((float)(100.0 * rng_normal(r)));
        const int64_t ns = E * (N / 128) * (K / 128);
        float *s = malloc((size_t)ns * 4);
        for (int64_t i = 0; i < ns; i++) s[i] = (float)(1e-4 * (0.5 + rng_uniform(r)));
        m.w.data = d, m.w.scales = s, m.data_bytes = (size_t)n, m.scale_bytes = (size_t)ns * 4;
    } else {
        uint8_t *d = malloc((size_t)n / 2);
        for (int64_t i = 0; i < n / 2; i++) d[i] = (uint8_t)rng_u64(r); /* every nibble, -8 included */
        const int64_t ns = E * N * (K / group);
        float *s = malloc((size_t)ns * 4);
        for (int64_t i = 0; i < ns; i++) s[i] = (float)(0.01 * (0.5 + rng_uniform(r)));
        m.w.data = d, m.w.scales = s, m.data_bytes = (size_t)n / 2, m.scale_bytes = (size_t)ns * 4;
    }
    return m;
}

static void free_mat(mat *m) { free((void *)m->w.data), free((void *)m->w.scales); }

/* Dequantized weight (e, n, k), computed here from the format's definition. */
static double w_at(const epmoe_expert_weights *w, int64_t e, int64_t n, int64_t k) {
    const int64_t i = (e * w->N + n) * w->K + k;
    if (w->format == EPMOE_WEIGHT_BF16) return epmoe_bf16_to_float(((const uint16_t *)w->data)[i]);
    if (w->format == EPMOE_WEIGHT_FP8_BLOCK)
        return (double)epmoe_fp8_e4m3_to_float(((const uint8_t *)w->data)[i]) *
               w->scales[(e * (w->N / 128) + n / 128) * (w->K / 128) + k / 128];
    int8_t v[2];
    epmoe_int4_unpack((const uint8_t *)w->data + i / 2, 2, v);
    return (double)v[i & 1] * w->scales[(e * w->N + n) * (w->K / w->group) + k / w->group];
}

typedef struct acts {
    int64_t E, M, K;
    int fp8;
    epmoe_scale_fmt fmt;
    void *a;      /* bf16 or fp8 [E, M, K] */
    uint8_t *sa;  /* fp8: E slabs */
    size_t a_bytes, slab;
} acts;

static acts make_acts(test_rng *r, int fp8, epmoe_scale_fmt fmt, int64_t E, int64_t M, int64_t K, int nan_token) {
    acts A = {E, M, K, fp8, fmt, NULL, NULL, 0, 0};
    const int64_t n = E * M * K;
    uint16_t *x = malloc((size_t)n * 2);
    for (int64_t row = 0; row < E * M; row++) {
        const double spread = exp(2.0 * rng_uniform(r) - 1.0); /* per-token scale spread */
        for (int64_t k = 0; k < K; k++) x[row * K + k] = epmoe_bf16_from_float((float)(spread * rng_normal(r)));
    }
    if (nan_token && M > 1) x[1 * K + 7] = 0x7FC0; /* expert 0, token 1 */
    if (!fp8) {
        A.a = x, A.a_bytes = (size_t)n * 2;
        return A;
    }
    A.slab = epmoe_scale_bytes(fmt, M, K);
    A.a = malloc((size_t)n), A.sa = malloc(A.slab * (size_t)E), A.a_bytes = (size_t)n;
    for (int64_t e = 0; e < E; e++)
        epmoe_cast_group_fp8_ref(x + e * M * K, M, K, (uint8_t *)A.a + e * M * K, A.sa + e * A.slab, fmt,
                                 fmt >= EPMOE_SCALE_UE8M0_ROW);
    free(x);
    return A;
}

static double a_at(const acts *A, int64_t e, int64_t m, int64_t k) {
    const int64_t i = (e * A->M + m) * A->K + k;
    if (!A->fp8) return epmoe_bf16_to_float(((const uint16_t *)A->a)[i]);
    const uint8_t *p = A->sa + e * A->slab + epmoe_scale_offset(A->fmt, A->M, A->K, m, k / 128);
    const double s = A->fmt >= EPMOE_SCALE_UE8M0_ROW ? epmoe_ue8m0_to_float(*p) : *(const float *)p;
    return (double)epmoe_fp8_e4m3_to_float(((const uint8_t *)A->a)[i]) * s;
}

static void make_masked(test_rng *r, int pattern, int64_t E, int64_t M, int32_t *masked) {
    for (int64_t e = 0; e < E; e++) {
        int64_t v;
        switch (pattern) {
        case 0: v = 0; break;
        case 1: v = 1; break;
        case 2: v = 3; break;
        case 3: v = M; break;
        case 5: /* out of range: the kernels clamp to [0, M] */
            masked[e] = (int32_t)(e % 3 == 0 ? -5 : e % 3 == 1 ? M + 7 : 2);
            continue;
        default: v = (e % 3 == 0) ? M : (int64_t)(rng_u64(r) % (uint64_t)(M / 2 + 1)); /* hot and cold experts */
        }
        masked[e] = (int32_t)(v > M ? M : v);
    }
}

/* The rows an op computes for expert e: masked_m clamped to [0, M]. */
static int64_t rows_of(const int32_t *masked, int64_t e, int64_t M) {
    return masked[e] < 0 ? 0 : masked[e] > M ? M : masked[e];
}

/* The error bound's sum_k |a_k w_k| over a block of rows [m0, m0 + rows) x [0, N) of expert e
** (par_for's body: a_at and w_at only read). */
typedef struct mag_block {
    const epmoe_expert_weights *w;
    const acts *A;
    int64_t e, m0;
    double *mag;
} mag_block;
static void mag_block_rows(void *p, int64_t begin, int64_t end) {
    const mag_block *b = (const mag_block *)p;
    const int64_t N = b->w->N;
    for (int64_t i = begin; i < end; i++) {
        const int64_t m = b->m0 + i / N, n = i % N;
        double mag = 0;
        for (int64_t k = 0; k < b->w->K; k++) mag += fabs(a_at(b->A, b->e, m, k) * w_at(b->w, b->e, n, k));
        b->mag[i] = mag;
    }
}

/* got (host copy, [E, M, rs], expert stride es) against want (the reference's output, same layout)
** with the error model above; elements past masked_m or N must hold the poison. The bounds'
** magnitudes are computed on every core a block of rows at a time (src/par_for.h); the comparison is
** serial, in order, so the output does not depend on EPMOE_CPU_THREADS. */
static void check_gemm_out(const char *what, const epmoe_expert_weights *w, const acts *A, const int32_t *masked,
                           const uint16_t *got, const uint16_t *want, int64_t rs, int64_t es) {
    const int wgmma = w->format == EPMOE_WEIGHT_FP8_BLOCK;
    const double tol_sum = wgmma ? TOL_SUM_WGMMA : TOL_SUM;
    const int64_t N = w->N, blk = par_block_rows(N);
    long bad = 0, far = 0, touched = 0, checked = 0;
    double worst = 0;
    double *mags = malloc((size_t)(blk * N) * sizeof(double));
    CHECK(mags != NULL, "%s: no memory for the bounds' block", what);
    for (int64_t e = 0; e < w->E; e++)
        for (int64_t i = e * es + A->M * rs; i < (e + 1) * es; i++) touched += got[i] != POISON16; /* gap between experts */
    for (int64_t e = 0; e < w->E && mags; e++) {
        const int64_t rows = rows_of(masked, e, A->M);
        for (int64_t m0 = 0; m0 < A->M; m0 += blk) {
            const int64_t in = rows - m0 < 0 ? 0 : rows - m0 < blk ? rows - m0 : blk; /* rows of the block to check */
            mag_block b = {w, A, e, m0, mags};
            par_for(in * N, 1 + 65536 / w->K, mag_block_rows, &b);
            for (int64_t m = m0; m < A->M && m < m0 + blk; m++)
                for (int64_t n = 0; n < rs; n++) {
                    const int64_t i = e * es + m * rs + n;
                    if (m >= rows || n >= N) {
                        touched += got[i] != POISON16;
                        continue;
                    }
                    const double g = epmoe_bf16_to_float(got[i]), t = epmoe_bf16_to_float(want[i]);
                    checked++;
                    if (isnan(t) || isnan(g)) {
                        if (!(isnan(t) && isnan(g))) bad++, far++; /* never in the tail */
                        continue;
                    }
                    const double mag = mags[(m - m0) * N + n];
                    const double err = fabs(g - t), lim = TOL_BF16 * fabs(t) + tol_sum * mag;
                    if (lim > 0 && err / lim > worst) worst = err / lim;
                    if (err > lim) {
                        far += !wgmma || err > 2 * lim;
                        if (++bad <= 3)
                            printf("    %s: e %lld m %lld n %lld: got %.6g want %.6g (limit %.3g)\n", what, (long long)e,
                                   (long long)m, (long long)n, g, t, lim);
                    }
                }
        }
    }
    free(mags);
    const long tail = wgmma ? (checked / 1000000 > 1 ? checked / 1000000 : 1) : 0;
    CHECK(far == 0 && bad <= tail, "%s: %ld of %ld elements outside the error model (%ld beyond the tail's 2x; %ld allowed in it)",
          what, bad, checked, far, tail);
    CHECK(touched == 0, "%s: %ld elements past masked_m or N were written", what, touched);
    if (!quick) printf("    %-44s %7ld elements, worst %.2f of the bound\n", what, checked, worst);
}

typedef struct dev_ops {
    epmoe_expert_weights w; /* device pointers */
    void *a, *sa;
    int32_t *masked;
    uint16_t *out;
} dev_ops;

static dev_ops to_device(const mat *m, const acts *A, const int32_t *masked, const uint16_t *out_init, size_t out_n) {
    dev_ops d;
    d.w = m->w;
    d.w.data = dev_copy(m->w.data, m->data_bytes);
    d.w.scales = m->w.scales ? dev_copy(m->w.scales, m->scale_bytes) : NULL;
    d.a = dev_copy(A->a, A->a_bytes);
    d.sa = A->fp8 ? dev_copy(A->sa, A->slab * (size_t)A->E) : NULL;
    d.masked = dev_copy(masked, (size_t)A->E * 4);
    d.out = dev_copy(out_init, out_n * 2);
    return d;
}

static void free_dev(dev_ops *d) {
    cudaFree((void *)d->w.data), cudaFree((void *)d->w.scales), cudaFree(d->a), cudaFree(d->sa), cudaFree(d->masked),
        cudaFree(d->out);
}

typedef struct gcase {
    epmoe_weight_format f;
    int64_t group;
    epmoe_scale_fmt fmt;
    int64_t E, N, K, M;
    int pattern, nan_token;
    int64_t expected_m; /* 0: M; small values pick the 16-token tile */
} gcase;

static void run_gemm(test_rng *r, const gcase *c) {
    const int fp8 = c->f == EPMOE_WEIGHT_FP8_BLOCK;
    mat m = make_weights(r, c->f, c->group, c->E, c->N, c->K);
    acts A = make_acts(r, fp8, c->fmt, c->E, c->M, c->K, c->nan_token);
    int32_t *masked = malloc((size_t)c->E * 4);
    make_masked(r, c->pattern, c->E, c->M, masked);
    const int64_t rs = c->N + 8, es = c->M * rs + 16, out_n = c->E * es;
    uint16_t *want = poisoned16(out_n), *init = poisoned16(out_n);
    epmoe_expert_gemm_args h = {m.w, A.a, c->M, masked, A.sa, c->fmt, want, rs, es, 0};
    CHECK_STATUS(epmoe_expert_gemm_ref(&h), EPMOE_OK);
    dev_ops d = to_device(&m, &A, masked, init, (size_t)out_n);
    epmoe_expert_gemm_args g = {d.w, d.a, c->M, d.masked, d.sa, c->fmt, d.out, rs, es, c->expected_m};
    CHECK_STATUS(epmoe_expert_gemm_cuda(&g, stream), EPMOE_OK);
    CUDA_OK(cudaStreamSynchronize(stream));
    uint16_t *got = host_copy(d.out, (size_t)out_n * 2);
    char what[128];
    snprintf(what, sizeof what, "%s%s E%lld N%lld K%lld M%lld x%lld pat %d%s", fmt_name(c->f, c->group),
             fp8 ? (const char *[]){" f32row", " f32mm", " ue8row", " ue8mm"}[c->fmt] : "", (long long)c->E,
             (long long)c->N, (long long)c->K, (long long)c->M, (long long)c->expected_m, c->pattern,
             c->nan_token ? " NaN" : "");
    check_gemm_out(what, &m.w, &A, masked, got, want, rs, es);
    free(got), free(init), free(want), free(masked);
    free_dev(&d);
    free_mat(&m), free(A.a), free(A.sa);
}

/* The GEMM captured once in a graph; replays see new masked_m and activations written on the device. */
static void run_graph(test_rng *r, epmoe_weight_format f, int64_t group) {
    const int64_t E = 4, N = 256, K = 384, M = 40;
    const int fp8 = f == EPMOE_WEIGHT_FP8_BLOCK;
    mat m = make_weights(r, f, group, E, N, K);
    acts A = make_acts(r, fp8, EPMOE_SCALE_F32_MMAJOR, E, M, K, 0);
    int32_t masked[4] = {0, 0, 0, 0};
    const int64_t es = M * N, out_n = E * es;
    uint16_t *init = poisoned16(out_n);
    dev_ops d = to_device(&m, &A, masked, init, (size_t)out_n);
    epmoe_expert_gemm_args g = {d.w, d.a, M, d.masked, d.sa, EPMOE_SCALE_F32_MMAJOR, d.out, N, es, 8};
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    CHECK_STATUS(epmoe_expert_gemm_cuda(&g, stream), EPMOE_OK);
    CUDA_OK(cudaStreamEndCapture(stream, &graph));
    CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
    for (int rep = 0; rep < 3; rep++) {
        acts B = make_acts(r, fp8, EPMOE_SCALE_F32_MMAJOR, E, M, K, 0);
        make_masked(r, rep == 0 ? 4 : rep == 1 ? 3 : 2, E, M, masked);
        CUDA_OK(cudaMemcpyAsync(d.a, B.a, B.a_bytes, cudaMemcpyHostToDevice, stream));
        if (fp8) CUDA_OK(cudaMemcpyAsync(d.sa, B.sa, B.slab * (size_t)E, cudaMemcpyHostToDevice, stream));
        CUDA_OK(cudaMemcpyAsync(d.masked, masked, sizeof masked, cudaMemcpyHostToDevice, stream));
        CUDA_OK(cudaMemcpyAsync(d.out, init, (size_t)out_n * 2, cudaMemcpyHostToDevice, stream));
        CUDA_OK(cudaGraphLaunch(exec, stream));
        CUDA_OK(cudaStreamSynchronize(stream));
        uint16_t *want = poisoned16(out_n), *got = host_copy(d.out, (size_t)out_n * 2);
        epmoe_expert_gemm_args h = {m.w, B.a, M, masked, B.sa, EPMOE_SCALE_F32_MMAJOR, want, N, es, 0};
        CHECK_STATUS(epmoe_expert_gemm_ref(&h), EPMOE_OK);
        char what[96];
        snprintf(what, sizeof what, "graph replay %d %s", rep, fmt_name(f, group));
        check_gemm_out(what, &m.w, &B, masked, got, want, N, es);
        free(want), free(got), free(B.a), free(B.sa);
    }
    cudaGraphExecDestroy(exec), cudaGraphDestroy(graph);
    free(init);
    free_dev(&d);
    free_mat(&m), free(A.a), free(A.sa);
}

/* The MLP stage by stage, then end to end. */
static void run_mlp(test_rng *r, epmoe_weight_format f, int64_t group, int64_t E, int64_t H, int64_t I, int64_t M,
                    int pattern) {
    const int fp8 = f == EPMOE_WEIGHT_FP8_BLOCK;
    mat w13 = make_weights(r, f, group, E, 2 * I, H), w2 = make_weights(r, f, group, E, H, I);
    acts A = make_acts(r, fp8, EPMOE_SCALE_F32_MMAJOR, E, M, H, 0);
    int32_t *masked = malloc((size_t)E * 4);
    make_masked(r, pattern, E, M, masked);
    const size_t wsb = epmoe_expert_mlp_workspace(f, E, M, H, I);
    /* the workspace layout (internal.h): gate_up, inter, inter_scales, each 256-byte aligned */
    const size_t o_gu = 0, o_in = ((size_t)(E * M * 2 * I) * 2 + 255) / 256 * 256,
                 o_sc = o_in + ((size_t)(E * M * I) * (fp8 ? 1 : 2) + 255) / 256 * 256;
    const int64_t out_n = E * M * H;
    uint16_t *init = poisoned16(out_n);
    dev_ops d = to_device(&w13, &A, masked, init, (size_t)out_n);
    epmoe_expert_weights d2 = w2.w;
    d2.data = dev_copy(w2.w.data, w2.data_bytes);
    d2.scales = w2.w.scales ? dev_copy(w2.w.scales, w2.scale_bytes) : NULL;
    void *dws;
    CUDA_OK(cudaMalloc(&dws, wsb));
    epmoe_expert_mlp_args g = {d.w, d2, d.a, M, d.masked, d.sa, EPMOE_SCALE_F32_MMAJOR, dws, wsb, d.out, H, M * H, 0};
    CHECK_STATUS(epmoe_expert_mlp_cuda(&g, stream), EPMOE_OK);
    CUDA_OK(cudaStreamSynchronize(stream));
    uint8_t *ws = host_copy(dws, wsb);
    uint16_t *got = host_copy(d.out, (size_t)out_n * 2);
    char what[128];
    /* stage 1: GEMM1 into gate_up (rows past masked_m are not checked: the workspace is not poisoned) */
    {
        uint16_t *want = poisoned16(E * M * 2 * I), *gu = (uint16_t *)(ws + o_gu);
        epmoe_expert_gemm_args h = {w13.w, A.a, M, masked, A.sa, EPMOE_SCALE_F32_MMAJOR, want, 2 * I, M * 2 * I, 0};
        CHECK_STATUS(epmoe_expert_gemm_ref(&h), EPMOE_OK);
        for (int64_t e = 0; e < E; e++)
            for (int64_t mm = rows_of(masked, e, M); mm < M; mm++)
                memcpy(gu + (e * M + mm) * 2 * I, want + (e * M + mm) * 2 * I, (size_t)(4 * I));
        snprintf(what, sizeof what, "MLP %s GEMM1 E%lld H%lld I%lld M%lld", fmt_name(f, group), (long long)E,
                 (long long)H, (long long)I, (long long)M);
        check_gemm_out(what, &w13.w, &A, masked, gu, want, 2 * I, M * 2 * I);
        free(want);
    }
    /* stage 3: GEMM2 on the GPU's own intermediate */
    {
        acts B = {E, M, I, fp8, EPMOE_SCALE_F32_ROW, ws + o_in, fp8 ? ws + o_sc : NULL, 0,
                  fp8 ? epmoe_scale_bytes(EPMOE_SCALE_F32_ROW, M, I) : 0};
        uint16_t *want = poisoned16(out_n);
        epmoe_expert_gemm_args h = {w2.w, B.a, M, masked, B.sa, EPMOE_SCALE_F32_ROW, want, H, M * H, 0};
        CHECK_STATUS(epmoe_expert_gemm_ref(&h), EPMOE_OK);
        snprintf(what, sizeof what, "MLP %s GEMM2 on the GPU's intermediate", fmt_name(f, group));
        check_gemm_out(what, &w2.w, &B, masked, got, want, H, M * H);
        free(want);
    }
    /* end to end against the reference MLP */
    {
        uint16_t *want = poisoned16(out_n);
        void *hws = calloc(1, wsb);
        epmoe_expert_mlp_args h = {w13.w, w2.w, A.a, M, masked, A.sa, EPMOE_SCALE_F32_MMAJOR, hws, wsb, want, H, M * H, 0};
        CHECK_STATUS(epmoe_expert_mlp_ref(&h), EPMOE_OK);
        double num = 0, den = 0;
        long touched = 0;
        for (int64_t e = 0; e < E; e++)
            for (int64_t mm = 0; mm < M; mm++)
                for (int64_t n = 0; n < H; n++) {
                    const int64_t i = (e * M + mm) * H + n;
                    if (mm >= rows_of(masked, e, M)) {
                        touched += got[i] != POISON16;
                        continue;
                    }
                    const double a = epmoe_bf16_to_float(got[i]), b = epmoe_bf16_to_float(want[i]);
                    num += (a - b) * (a - b), den += b * b;
                }
        const double rel = den > 0 ? sqrt(num / den) : sqrt(num);
        const double tol = fp8 ? TOL_MLP_FP8 : TOL_MLP_BF16;
        CHECK(rel <= tol, "MLP %s: relative L2 error %.3g against the reference (bound %.3g)", fmt_name(f, group), rel, tol);
        CHECK(touched == 0, "MLP %s: %ld output elements past masked_m were written", fmt_name(f, group), touched);
        if (!quick) printf("    MLP %-12s end to end: relative L2 %.2e (bound %.2e)\n", fmt_name(f, group), rel, tol);
        free(want), free(hws);
    }
    free(ws), free(got), free(init), free(masked);
    cudaFree(dws), cudaFree((void *)d2.data), cudaFree((void *)d2.scales);
    free_dev(&d);
    free_mat(&w13), free_mat(&w2), free(A.a), free(A.sa);
}

int main(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
        printf("test_experts_gpu: no CUDA device\n");
        return 1;
    }
    quick = getenv("EPMOE_TEST_QUICK") != NULL;
    const char *seed_env = getenv("EPMOE_SEED");
    const uint64_t seed = seed_env ? strtoull(seed_env, NULL, 10) : (uint64_t)time(NULL);
    printf("test_experts_gpu: seed %llu (EPMOE_SEED to repeat)%s\n", (unsigned long long)seed, quick ? ", quick" : "");
    test_rng r = {seed * 2654435761u + 1};
    CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

    const struct { epmoe_weight_format f; int64_t group; } fmts[] = {
        {EPMOE_WEIGHT_BF16, 0}, {EPMOE_WEIGHT_FP8_BLOCK, 0}, {EPMOE_WEIGHT_INT4, 32}, {EPMOE_WEIGHT_INT4, 128}};
    printf("  GEMM\n");
    for (int fi = 0; fi < 4; fi++) {
        const epmoe_weight_format f = fmts[fi].f;
        const int64_t gr = fmts[fi].group;
        const int nfmt = f == EPMOE_WEIGHT_FP8_BLOCK ? 4 : 1;
        for (int sf = 0; sf < nfmt; sf++) {
            const epmoe_scale_fmt sfm = (epmoe_scale_fmt)sf;
            const gcase cases[] = {
                {f, gr, sfm, 3, 128, 128, 1, 1, 0, 0},   {f, gr, sfm, 3, 384, 640, 3, 2, 0, 0},
                {f, gr, sfm, 4, 256, 384, 64, 3, 1, 0},  {f, gr, sfm, 2, 256, 128, 300, 3, 0, 0},
                {f, gr, sfm, 5, 128, 256, 65, 4, 0, 0},
                {f, gr, sfm, 3, 640, 128, 129, 3, 0, 0}, {f, gr, sfm, 4, 128, 384, 20, 0, 0, 0},
                {f, gr, sfm, 4, 256, 256, 70, 3, 0, 8},  {f, gr, sfm, 3, 128, 384, 40, 4, 1, 200},
                {f, gr, sfm, 5, 128, 256, 24, 5, 0, 0},  /* masked_m < 0 and > M */
                {f, gr, sfm, 1, 256, 7168, 9, 3, 0, 0},  /* E = 1, DeepSeek's K */
            };
            for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
                if (quick && i > 3) break; /* (i = 3: bf16's 256-token tile, several m-tiles) */
                run_gemm(&r, &cases[i]);
            }
        }
        /* More work items (expert, 128 weight rows, token tile) than the persistent grid has CTAs
        ** (132 SMs: 264 at 32- and 64-token tiles, 132 at 128 and 256): each CTA walks several, and
        ** from 64 tokens, with more than two items a CTA, whole waves go round-robin before the rest.
        ** Expected rows 8, 48 and 200 take every tile of the wgmma kernels (fp8-block 32, 64, 128; bf16
        ** its mma.sync decode tile, 64, 256): 288 items at 48 (one a CTA, then whole-item ranges), 576
        ** at 48 with E = 12 (a wave first); 600 rows: bf16's 256-token tile with 3 m-tiles an
        ** expert, the last part-filled (72 items: fewer than CTAs); 100 and 300 rows: bf16 at 128 and
        ** 256 tokens with a wave of items first (384 items each; bf16 accumulates in place); and
        ** DeepSeek's K = 7168 on the wgmma kernels (200 rows, skewed), where the in-place bf16 sum
        ** runs over the whole K in the tensor cores */
        const gcase many[] = {{f, gr, EPMOE_SCALE_F32_ROW, 6, 6144, 256, 40, 4, 0, 8},
                              {f, gr, EPMOE_SCALE_F32_ROW, 6, 6144, 256, 40, 3, 0, 48},
                              {f, gr, EPMOE_SCALE_UE8M0_ROW, 12, 6144, 256, 40, 3, 0, 48},
                              {f, gr, EPMOE_SCALE_UE8M0_MMAJOR, 8, 4096, 256, 200, 3, 0, 0},
                              {f, gr, EPMOE_SCALE_F32_ROW, 3, 1024, 256, 600, 3, 0, 0},
                              {f, gr, EPMOE_SCALE_F32_ROW, 12, 4096, 128, 100, 3, 0, 0},
                              {f, gr, EPMOE_SCALE_F32_ROW, 6, 4096, 128, 300, 3, 0, 0},
                              {f, gr, EPMOE_SCALE_UE8M0_ROW, 2, 256, 7168, 200, 4, 0, 0}};
        for (size_t i = 0; i < sizeof many / sizeof many[0] && !quick; i++) run_gemm(&r, &many[i]);
    }
    printf("  limits\n");
    { /* the fp8-block kernel's 32-bit TMA row coordinates: E * N >= 2^31 is refused before anything
      ** is read (the pointers are aligned but never dereferenced); E = 2048 is within the experts'
      ** own limit (2048), so this is the check that refuses it */
        uint8_t *fake = (uint8_t *)(uintptr_t)0x100000;
        int32_t *masked = (int32_t *)(uintptr_t)0x100000;
        const epmoe_expert_weights w = {EPMOE_WEIGHT_FP8_BLOCK, 2048, INT64_C(1) << 20, 128, 0, fake, (float *)fake};
        epmoe_expert_gemm_args g = {w, fake, 1, masked, fake, EPMOE_SCALE_F32_ROW, (uint16_t *)fake, w.N, w.N, 0};
        CHECK_STATUS(epmoe_expert_gemm_cuda(&g, stream), EPMOE_ERR_INVALID_ARG);
        CHECK(strstr(epmoe_last_error(), "2^31") != NULL, "the limit's message names it: %s", epmoe_last_error());
    }
    printf("  CUDA graph\n");
    for (int fi = 0; fi < 4; fi++) run_graph(&r, fmts[fi].f, fmts[fi].group);
    printf("  MLP\n");
    for (int fi = 0; fi < 4; fi++) {
        run_mlp(&r, fmts[fi].f, fmts[fi].group, 3, 256, 128, 9, 4); /* 9 rows: the 16-token tile */
        if (!quick) run_mlp(&r, fmts[fi].f, fmts[fi].group, 2, 384, 256, 70, 3);
    }
    CUDA_OK(cudaStreamDestroy(stream));
    return test_report("test_experts_gpu");
}
