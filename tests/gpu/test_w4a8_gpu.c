/*
** test_w4a8_gpu.c — the W4A8 GEMM and MLP kernels on the GPU against the CPU oracle.
**  1. GEMM: every token tile (T = 8..128 via expected_m), both activation-scale modes, all four
**     group-scale layouts, both weight encodings; masked_m patterns {all 0, all 1, 3, 32, skewed,
**     full M}; M not a multiple of any tile; N, K multiples of 128 other than DeepSeek's; NaN/Inf
**     tokens; outputs poisoned, rows past masked_m and columns past N checked untouched; outputs at
**     odd strides 2 bytes past 16-byte alignment.
**  2. CUDA graph: the GEMM captured once, replayed with new masked_m and activations; the decode
**     tiles (T = 8, 16, 32: stream-K ranges that end inside items) replayed 100 times on two sets
**     of activations in turn, bitwise equal to each set's own launch.
**  3. MLP against epmoe_w4a8_mlp_ref, modes (a) and (b).
**  4. Accuracy on the W13 shape (K = 7168, N = 4096, 256 bf16 tokens): NMSE of mode (a), per-token
**     group scales, against mode (b), per-tensor after the requant op, on gaussian and outlier
**     activations; each kernel within 5% of the fp64 model of its path with the output rounded
**     to bf16 (the GEMM's output format), and of the unrounded model (15% with outliers, where the
**     rounding alone is ~6%).
** EPMOE_TEST_QUICK=1 (memcheck) runs smaller cases; EPMOE_SEED=n repeats a run.
*/
#define _POSIX_C_SOURCE 200809L /* w4a8_common.h's check_ref_threads uses setenv */
#include "cuda_check.h"
#include <time.h>

#include "../w4a8_common.h"

#define POISON16 W4_POISON16

static cudaStream_t stream;
static int quick;
static void *gws; /* the GEMMs' workspace, zeroed once */
static size_t gws_bytes;

/* cudaMemcpy from pageable memory may return before the DMA lands, and the kernels run on a
** non-blocking stream that does not wait for the legacy one: synchronize the device first. */
static void *dev_copy(const void *h, size_t bytes) {
    void *p;
    CUDA_OK(cudaMalloc(&p, bytes ? bytes : 16));
    if (bytes) CUDA_OK(cudaMemcpy(p, h, bytes, cudaMemcpyHostToDevice));
    CUDA_OK(cudaDeviceSynchronize());
    return p;
}

static uint16_t *dev_poisoned16(int64_t n) {
    uint16_t *h = malloc((size_t)n * 2), *d;
    for (int64_t i = 0; i < n; i++) h[i] = POISON16;
    d = dev_copy(h, (size_t)n * 2);
    free(h);
    return d;
}

typedef struct dev_w4 {
    epmoe_w4a8_weights w;
    void *qw;
    uint16_t *sw; /* bf16 */
} dev_w4;

static dev_w4 dev_weights(const w4_mat *m) {
    size_t qb, sb;
    epmoe_w4a8_repack_size(m->E, m->N, m->K, &qb, &sb);
    dev_w4 d;
    d.qw = dev_copy(m->qw, qb);
    d.sw = dev_copy(m->sw, sb);
    epmoe_w4a8_weights w = {m->E, m->N, m->K, m->enc, d.qw, d.sw};
    d.w = w;
    return d;
}

static void dev_weights_free(dev_w4 *d) { cudaFree(d->qw), cudaFree(d->sw); }

/* Check a device output [E, M, rs] against the oracle; untouched elements must keep the poison. */
static void check_out(const char *what, const w4_mat *w, const w4_acts *A, const int32_t *masked, double ts,
                      const uint16_t *dout, int64_t rs, int64_t es) {
    const int64_t E = w->E;
    uint16_t *out = malloc((size_t)(E * es) * 2);
    CUDA_OK(cudaMemcpy(out, dout, (size_t)(E * es) * 2, cudaMemcpyDeviceToHost));
    w4_check_out(what, w, A, masked, ts, out, rs, es);
    free(out);
}

typedef struct gcase {
    int64_t E, N, K, M;
    int pattern; /* 0 all 0, 1 all 1, 2 all 3, 3 all 32, 4 skewed, 5 full M */
    int mode;    /* 0..3 group scales in that epmoe_scale_fmt, 4 per-tensor */
    int m8;      /* weights with -8 (FULL encoding) */
    int64_t expected_m;
    int nan_token;
    int odd_out; /* out 2 bytes past 16-byte alignment, odd strides */
} gcase;

static void make_masked(test_rng *r, int pattern, int64_t E, int64_t M, int32_t *masked) {
    for (int64_t e = 0; e < E; e++) {
        int64_t v;
        switch (pattern) {
        case 0: v = 0; break;
        case 1: v = 1; break;
        case 2: v = 3; break;
        case 3: v = 32; break;
        case 4: v = (e % 3 == 0) ? M : (int64_t)(rng_u64(r) % (uint64_t)(M / 4 + 1)); break; /* a few hot experts */
        default: v = M;
        }
        masked[e] = (int32_t)(v > M ? M : v);
    }
}

static void run_case(test_rng *r, const gcase *c) {
    const epmoe_scale_fmt fmt = c->mode < 4 ? (epmoe_scale_fmt)c->mode : EPMOE_SCALE_F32_MMAJOR;
    w4_mat w;
    w4_mat_make(r, &w, c->E, c->N, c->K, c->m8, 0.01, EPMOE_W4_AUTO);
    w4_acts A;
    if (c->nan_token) { /* poison one token of expert 0 with a NaN and one with an Inf before the cast */
        w4_acts_make(r, &A, c->E, c->M, c->K, fmt, 0);
        A.x[0 * c->K + 5] = 0x7FC0;
        if (c->M > 2) A.x[2 * c->K + 200 % c->K] = 0x7F80;
        const int round = fmt >= EPMOE_SCALE_UE8M0_ROW;
        epmoe_cast_group_fp8_ref(A.x, c->M, c->K, A.a, A.sa, fmt, round);
    } else {
        w4_acts_make(r, &A, c->E, c->M, c->K, fmt, (int)(rng_u64(r) % 3));
    }
    int32_t *masked = malloc((size_t)c->E * 4);
    make_masked(r, c->pattern, c->E, c->M, masked);
    const double ts = c->mode == 4 ? 0.0123 : 0.0;
    const float tsf = (float)ts;

    dev_w4 dw = dev_weights(&w);
    uint8_t *da = dev_copy(A.a, (size_t)(c->E * c->M * c->K));
    void *dsa = dev_copy(A.sa, A.slab * (size_t)c->E);
    int32_t *dm = dev_copy(masked, (size_t)c->E * 4);
    float *dts = dev_copy(&tsf, 4);
    const int64_t rs = c->N + (c->odd_out ? 3 : 24), es = c->M * rs + (c->odd_out ? 5 : 40);
    uint16_t *dbase = dev_poisoned16(c->E * es + 1), *dout = dbase + (c->odd_out ? 1 : 0);
    epmoe_w4a8_gemm_args g = {dw.w, da, c->M, dm, c->mode == 4 ? NULL : dsa, fmt, dts, dout, rs, es, c->expected_m,
                              gws, gws_bytes};
    CHECK_STATUS(epmoe_w4a8_gemm_cuda(&g, stream), EPMOE_OK);
    CUDA_OK(cudaStreamSynchronize(stream));
    char what[160];
    snprintf(what, sizeof what, "E%lld N%lld K%lld M%lld pat%d mode%d enc%d em%lld%s%s", (long long)c->E, (long long)c->N,
             (long long)c->K, (long long)c->M, c->pattern, c->mode, w.enc, (long long)c->expected_m,
             c->nan_token ? " nan" : "", c->odd_out ? " odd-out" : "");
    check_out(what, &w, &A, masked, ts, dout, rs, es);
    cudaFree(da), cudaFree(dsa), cudaFree(dm), cudaFree(dts), cudaFree(dbase);
    dev_weights_free(&dw);
    free(masked);
    w4_acts_free(&A);
    w4_mat_free(&w);
}

static void test_gemm_cases(test_rng *r) {
    /* every tile instance x mode x encoding on one small shape */
    const int64_t ems[] = {1, 16, 24, 32, 40, 48, 56, 64, 72, 80, 96, 112, 128};
    for (int t = 0; t < 13; t++)
        for (int mode = 0; mode < 5; mode++) {
            gcase c = {3, 256, 384, quick ? 40 : 150, 4, mode, (t + mode) & 1, ems[t], 0, 0};
            run_case(r, &c);
        }
    /* every tile writing to an output 2 bytes past 16-byte alignment with odd strides (the API asks
    ** only for 2-byte alignment and strides >= N) */
    for (int t = 0; t < 13; t += quick ? 3 : 1) {
        gcase c = {3, 256, 384, quick ? 40 : 150, 4, t % 5, t & 1, ems[t], 0, 1};
        run_case(r, &c);
    }
    /* masked_m patterns, awkward M, other N/K, NaN */
    const gcase more[] = {
        {4, 128, 128, 1, 0, 0, 0, 0, 0, 0},     {4, 128, 128, 1, 1, 1, 1, 0, 0, 0},   {5, 384, 256, 3, 2, 2, 0, 0, 0, 0},
        {3, 256, 512, 127, 3, 3, 1, 0, 0, 0},   {3, 256, 512, 129, 4, 0, 0, 0, 0, 0}, {2, 128, 1152, 200, 5, 1, 1, 64, 0, 0},
        {2, 512, 640, 33, 5, 4, 0, 16, 0, 0},   {6, 128, 256, 8, 4, 4, 1, 8, 0, 0},   {2, 256, 256, 9, 5, 0, 0, 0, 1, 0},
        {2, 256, 256, 9, 5, 4, 1, 0, 1, 0},     {1, 128, 7168, 5, 5, 1, 0, 0, 0, 0},
    };
    for (size_t i = 0; i < sizeof more / sizeof more[0]; i++) {
        if (quick && more[i].K > 1024) continue;
        run_case(r, &more[i]);
    }
    /* T = 40, 64 and 128 with more than two waves of items: whole waves round-robin, then the
    ** stream-K tail (kDataParallel in w4a8_gemm.cu); skewed rows leave empty experts in the waves.
    ** T = 40: 8 x 16 x 5 = 640 items, the last m-tile part-filled (190 rows) */
    const gcase waves[] = {
        {8, 2048, 128, 640, 5, 1, 0, 128, 0, 0},
        {8, 2048, 256, 320, 5, 2, 1, 64, 0, 0},
        {8, 2048, 256, 190, 5, 3, 0, 40, 0, 0},
        {16, 1024, 128, 512, 4, 0, 0, 128, 0, 0},
    };
    for (size_t i = 0; i < sizeof waves / sizeof waves[0]; i++) run_case(r, &waves[i]);
    /* T = 24 to 128 (the warp-specialized kernel) with several steps a CTA: its steps go in pairs
    ** within an item (T = 40 to 64: one at a time), a step without a partner alone, and stream-K ranges
    ** begin and end inside items at odd and even offsets; {5, 2048, 256, 512} takes a whole wave of
    ** items first. 18, 9 and 2 groups an item; every scale format and per-tensor. The cases above
    ** have at most one step a CTA at T = 128, and two groups an item at T = 64. T = 24 to 64 run 2
    ** CTAs/SM (264 on an H200): 6.5, 1.1-1.6 and up to 1.6 steps a CTA below at T = 32; at 40, 48
    ** and 56 (one step at a time, as at 64) up to 3.3, with part-filled last m-tiles (79 and 111
    ** rows); at T = 24 (pairs, as at 32) 6.5, 47 rows in two m-tiles; at T = 96 and 112 (1 CTA/SM,
    ** pairs, as at 128) up to 2.2 and 2.2, with 170 (skewed) and 224 rows (two whole m-tiles); at
    ** T = 72 and 80 (2 CTAs/SM, one step at a time, as at 64) 3.3 and 2.2, with 137 and 150 rows in
    ** two m-tiles. */
    const gcase pairs[] = {
        {2, 512, 2304, 256, 5, 1, 0, 128, 0, 0},  {2, 512, 2304, 200, 4, 3, 1, 128, 0, 0},
        {3, 1024, 1152, 256, 5, 0, 1, 128, 0, 0}, {3, 1024, 1152, 130, 5, 2, 0, 128, 0, 0},
        {2, 1536, 1152, 256, 5, 4, 0, 128, 0, 0}, {5, 2048, 256, 512, 5, 1, 0, 128, 0, 0},
        {2, 512, 2304, 192, 5, 1, 0, 64, 0, 0},   {3, 1024, 1152, 100, 4, 2, 1, 64, 0, 0},
        {3, 2048, 2304, 64, 5, 1, 0, 32, 0, 0},   {4, 1024, 1152, 40, 4, 2, 1, 32, 0, 0},
        {2, 1536, 2304, 32, 5, 4, 0, 32, 0, 0},   {3, 2048, 1152, 96, 4, 2, 1, 48, 0, 0},
        {3, 2048, 1152, 79, 5, 1, 0, 40, 0, 0},   {2, 1536, 2304, 111, 4, 0, 1, 56, 0, 0},
        {3, 2048, 2304, 47, 5, 3, 1, 24, 0, 0},   {2, 1024, 2304, 150, 5, 2, 0, 80, 0, 0},
        {3, 512, 2304, 170, 4, 4, 1, 96, 0, 0},   {2, 1024, 1152, 224, 5, 1, 1, 112, 0, 0},
        {3, 2048, 1152, 137, 5, 0, 0, 72, 0, 0},
    };
    for (size_t i = 0; i < sizeof pairs / sizeof pairs[0]; i++)
        if (!quick || i < 2 || i == 6 || i == 8 || i >= 11) run_case(r, &pairs[i]);
    /* T = 8, 16 and 32 with items of 18, 9 and 5 groups (two groups a step at T = 8 and 16, so an
    ** item's last step has one when G is odd; pairs of steps and a single one at T = 32), skewed rows,
    ** and, last, 8 m-tiles an expert: 1024 items of 18 groups over the CTAs' stream-K ranges. */
    const gcase decode[] = {
        {4, 1024, 2304, 8, 5, 1, 0, 1, 0, 0},   {4, 1024, 1152, 19, 4, 2, 1, 16, 0, 0}, {3, 1024, 1152, 40, 5, 3, 0, 32, 0, 0},
        {2, 512, 640, 7, 5, 4, 1, 1, 0, 0},     {8, 2048, 2304, 64, 5, 1, 0, 1, 0, 0},
    };
    for (size_t i = 0; i < sizeof decode / sizeof decode[0]; i++)
        if (!quick || i < 2) run_case(r, &decode[i]);
    /* max tokens: T=128 tiles over a large masked slab */
    if (!quick) {
        gcase c = {2, 256, 256, 1024, 5, 1, 0, 0, 0, 0};
        run_case(r, &c);
    }
}

/* The workspace is checked like every argument. */
static void test_workspace_args(test_rng *r) {
    w4_mat w;
    w4_mat_make(r, &w, 1, 128, 128, 0, 0.01, EPMOE_W4_AUTO);
    dev_w4 dw = dev_weights(&w);
    uint8_t *da = dev_copy(NULL, 0);
    int32_t one = 1, *dm = dev_copy(&one, 4);
    float *dsa = dev_copy(NULL, 0);
    uint16_t *dout = dev_poisoned16(128);
    epmoe_w4a8_gemm_args g = {dw.w, da, 1, dm, dsa, EPMOE_SCALE_F32_ROW, NULL, dout, 128, 128, 0, NULL, gws_bytes};
    CHECK_STATUS(epmoe_w4a8_gemm_cuda(&g, stream), EPMOE_ERR_NULL_POINTER);
    g.workspace = (uint8_t *)gws + 16;
    CHECK_STATUS(epmoe_w4a8_gemm_cuda(&g, stream), EPMOE_ERR_MISALIGNED);
    g.workspace = gws, g.workspace_bytes = gws_bytes - 1;
    CHECK_STATUS(epmoe_w4a8_gemm_cuda(&g, stream), EPMOE_ERR_INVALID_ARG);
    /* the kernel writes its workspace: it must share no byte with what the call reads or writes
    ** (refused before anything launches) */
    g.workspace_bytes = gws_bytes;
    epmoe_w4a8_gemm_args b = g;
    b.out = (uint16_t *)gws + 1024;
    CHECK_STATUS(epmoe_w4a8_gemm_cuda(&b, stream), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "out overlaps workspace") != NULL, "message: %s", epmoe_last_error());
    b = g, b.masked_m = (const int32_t *)((uint8_t *)gws + 512);
    CHECK_STATUS(epmoe_w4a8_gemm_cuda(&b, stream), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "workspace overlaps masked_m") != NULL, "message: %s", epmoe_last_error());
    b = g, b.w.scales = (const uint16_t *)((uint8_t *)gws + 256);
    CHECK_STATUS(epmoe_w4a8_gemm_cuda(&b, stream), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "workspace overlaps w.scales") != NULL, "message: %s", epmoe_last_error());
    cudaFree(da), cudaFree(dm), cudaFree(dsa), cudaFree(dout);
    dev_weights_free(&dw);
    w4_mat_free(&w);
}

/* One GEMM call captured into a graph on the test's stream, instantiated. */
static cudaGraphExec_t capture_gemm(const epmoe_w4a8_gemm_args *g, cudaGraph_t *graph) {
    cudaGraphExec_t exec;
    CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    CHECK_STATUS(epmoe_w4a8_gemm_cuda(g, stream), EPMOE_OK);
    CUDA_OK(cudaStreamEndCapture(stream, graph));
    CUDA_OK(cudaGraphInstantiate(&exec, *graph, 0));
    return exec;
}

/* Captured once; masked_m and the activations change on the device between replays. */
static void test_graph(test_rng *r) {
    const int64_t E = 4, N = 256, K = 256, M = 48;
    w4_mat w;
    w4_mat_make(r, &w, E, N, K, 0, 0.01, EPMOE_W4_AUTO);
    dev_w4 dw = dev_weights(&w);
    uint8_t *da;
    void *dsa;
    int32_t *dm;
    const size_t slab = epmoe_scale_bytes(EPMOE_SCALE_F32_MMAJOR, M, K);
    CUDA_OK(cudaMalloc((void **)&da, (size_t)(E * M * K)));
    CUDA_OK(cudaMalloc(&dsa, slab * E));
    CUDA_OK(cudaMalloc((void **)&dm, (size_t)E * 4));
    const int64_t rs = N, es = M * N;
    uint16_t *dout = dev_poisoned16(E * es);
    epmoe_w4a8_gemm_args g = {dw.w, da, M, dm, dsa, EPMOE_SCALE_F32_MMAJOR, NULL, dout, rs, es, 32, gws, gws_bytes};
    cudaGraph_t graph;
    cudaGraphExec_t exec = capture_gemm(&g, &graph);
    for (int rep = 0; rep < (quick ? 2 : 6); rep++) {
        w4_acts A;
        w4_acts_make(r, &A, E, M, K, EPMOE_SCALE_F32_MMAJOR, rep & 1);
        int32_t masked[4];
        make_masked(r, rep % 6, E, M, masked);
        CUDA_OK(cudaMemcpyAsync(da, A.a, (size_t)(E * M * K), cudaMemcpyHostToDevice, stream));
        CUDA_OK(cudaMemcpyAsync(dsa, A.sa, slab * E, cudaMemcpyHostToDevice, stream));
        CUDA_OK(cudaMemcpyAsync(dm, masked, sizeof masked, cudaMemcpyHostToDevice, stream));
        uint16_t *h = malloc((size_t)(E * es) * 2);
        for (int64_t i = 0; i < E * es; i++) h[i] = POISON16;
        CUDA_OK(cudaMemcpyAsync(dout, h, (size_t)(E * es) * 2, cudaMemcpyHostToDevice, stream));
        CUDA_OK(cudaGraphLaunch(exec, stream));
        CUDA_OK(cudaStreamSynchronize(stream));
        free(h);
        char what[64];
        snprintf(what, sizeof what, "graph replay %d", rep);
        check_out(what, &w, &A, masked, 0.0, dout, rs, es);
        w4_acts_free(&A);
    }
    cudaGraphExecDestroy(exec), cudaGraphDestroy(graph);
    cudaFree(da), cudaFree(dsa), cudaFree(dm), cudaFree(dout);
    dev_weights_free(&dw);
    w4_mat_free(&w);
}

/* A tile's result does not depend on when each CTA ran: stream-K partials are added in range
** order, whatever order the CTAs finish in (here every item is in the stream-K tail). Two sets of activations, each launched once
** (checked against the oracle), then a graph of the same GEMM replayed 100 times on them in turn,
** every output bitwise equal to that set's launch. The launch counter in the workspace gives each
** launch its own flags, so a replay that took the previous launch's partial (the other inputs')
** would differ. */
static void test_replay_bits(test_rng *r) {
    const int64_t E = 6, N = 1024, K = 2304, M = quick ? 8 : 24, reps = quick ? 6 : 100;
    w4_mat w;
    w4_mat_make(r, &w, E, N, K, 0, 0.01, EPMOE_W4_AUTO);
    w4_acts A[2];
    w4_acts_make(r, &A[0], E, M, K, EPMOE_SCALE_F32_ROW, 2);
    w4_acts_make(r, &A[1], E, M, K, EPMOE_SCALE_F32_ROW, 0);
    int32_t masked[6];
    make_masked(r, 5, E, M, masked);
    masked[1] = 0, masked[4] = (int32_t)(M / 2 + 1);
    dev_w4 dw = dev_weights(&w);
    const size_t ab = (size_t)(E * M * K), sb = A[0].slab * (size_t)E;
    uint8_t *da = dev_copy(A[0].a, ab), *dset[2] = {dev_copy(A[0].a, ab), dev_copy(A[1].a, ab)};
    void *dsa = dev_copy(A[0].sa, sb), *dsset[2] = {dev_copy(A[0].sa, sb), dev_copy(A[1].sa, sb)};
    int32_t *dm = dev_copy(masked, sizeof masked);
    const int64_t rs = N, es = M * N, n = E * es;
    uint16_t *dout = dev_poisoned16(n), *poison = dev_poisoned16(n), *again = malloc((size_t)n * 2);
    uint16_t *first[2] = {malloc((size_t)n * 2), malloc((size_t)n * 2)};
    /* T = 8, 16, 24, 32, 40 and 80 (one step at a time), 96 (1 CTA/SM) */
    const int64_t ems[] = {1, 16, 24, 32, 40, 80, 96};
    for (int t = 0; t < 7; t++) {
        const int64_t em = ems[t];
        epmoe_w4a8_gemm_args g = {dw.w, da, M, dm, dsa, EPMOE_SCALE_F32_ROW, NULL, dout, rs, es, em, gws, gws_bytes};
        char what[64];
        snprintf(what, sizeof what, "replayed bits em%lld", (long long)em);
        for (int i = 0; i < 2; i++) {
            CUDA_OK(cudaMemcpyAsync(da, dset[i], ab, cudaMemcpyDeviceToDevice, stream));
            CUDA_OK(cudaMemcpyAsync(dsa, dsset[i], sb, cudaMemcpyDeviceToDevice, stream));
            CUDA_OK(cudaMemcpyAsync(dout, poison, (size_t)n * 2, cudaMemcpyDeviceToDevice, stream));
            CHECK_STATUS(epmoe_w4a8_gemm_cuda(&g, stream), EPMOE_OK);
            CUDA_OK(cudaStreamSynchronize(stream));
            check_out(what, &w, &A[i], masked, 0.0, dout, rs, es);
            CUDA_OK(cudaMemcpy(first[i], dout, (size_t)n * 2, cudaMemcpyDeviceToHost));
        }
        cudaGraph_t graph;
        cudaGraphExec_t exec = capture_gemm(&g, &graph);
        long bad = 0;
        for (int rep = 0; rep < reps; rep++) {
            const int i = rep & 1;
            CUDA_OK(cudaMemcpyAsync(da, dset[i], ab, cudaMemcpyDeviceToDevice, stream));
            CUDA_OK(cudaMemcpyAsync(dsa, dsset[i], sb, cudaMemcpyDeviceToDevice, stream));
            CUDA_OK(cudaMemcpyAsync(dout, poison, (size_t)n * 2, cudaMemcpyDeviceToDevice, stream));
            CUDA_OK(cudaGraphLaunch(exec, stream));
            CUDA_OK(cudaStreamSynchronize(stream));
            CUDA_OK(cudaMemcpy(again, dout, (size_t)n * 2, cudaMemcpyDeviceToHost));
            bad += memcmp(first[i], again, (size_t)n * 2) != 0;
        }
        CHECK(bad == 0, "%s: %ld of %lld replays differ from their inputs' launch", what, bad, (long long)reps);
        cudaGraphExecDestroy(exec), cudaGraphDestroy(graph);
    }
    free(first[0]), free(first[1]), free(again);
    cudaFree(da), cudaFree(dsa), cudaFree(dm), cudaFree(dout), cudaFree(poison);
    for (int i = 0; i < 2; i++) cudaFree(dset[i]), cudaFree(dsset[i]), w4_acts_free(&A[i]);
    dev_weights_free(&dw);
    w4_mat_free(&w);
}

/* The MLP on the GPU, each stage against what it was given. GEMM1 on the tensor cores against
** fp64 flips the bf16 rounding of some gate/up values, and CUDA's expf against libm's (each
** within 2 ulp) some silu values; each flip moves the fp8 rounding of its element with
** probability ~2^-9/2^-4 (1.8% of the bytes differ on an H200 in mode a, 0.5% in mode b,
** 2026-11-30). So the stages are checked apart:
** - GEMM1's gate_up (bf16, in the workspace) per element against the oracle of the inputs, under
**   the GEMM's error model (w4a8_common.h);
** - the intermediate fp8 bytes: at most MLP_BYTES_DIFF of them differ from epmoe_w4a8_mlp_ref's;
** - silu_mul alone: the intermediate against the host's steps from the GPU's own gate_up;
** - GEMM2's output per element against the oracle of the GPU's own intermediate bytes and
**   scales (the workspace), under the same model.
** An end-to-end bound on the output against the reference cannot be tight: which bytes flip, and
** how large those elements are, decides it (with outlier channels one flip in a large element
** moved the relative L2 error to 1.4x a 2^-3 * sqrt(share) estimate; seed 1796068467), so the
** end-to-end error is printed, not checked. */
#define MLP_BYTES_DIFF 0.05

/* silu_mul alone: the GPU's intermediate against the host's steps from the GPU's own gate_up
** (silu(g) * u in fp32 with libm's expf, rounded to bf16, cast by the reference). Only expf
** differs (CUDA's within 2 ulp, libm's within 1; fp8_exhaustive proves the kernel's silu equal to
** the IEEE expression with CUDA's expf), so a silu value moves by a few fp32 ulps, which flips the
** bf16 rounding of y = silu * u with probability ~2^-14 at most, by one bf16 step: so few bytes
** differ (SILU_DIFF bounds the share) and a differing group scale is within one step (2^-7). */
#define SILU_DIFF 1e-3
static void check_silu_mul(int mode, int64_t E, int64_t M, int64_t I, const int32_t *masked, const float *tensor_scale,
                           const uint16_t *gate_up, const uint8_t *inter, const float *scales) {
    uint16_t *y = malloc((size_t)I * 2);
    uint8_t *q = malloc((size_t)I);
    float *qs = malloc((size_t)(I / 128) * 4);
    long bytes = 0, bdiff = 0, groups = 0, sdiff = 0, sfar = 0;
    for (int64_t e = 0; e < E; e++)
        for (int64_t t = 0; t < masked[e]; t++) {
            const int64_t row = e * M + t;
            const uint16_t *gu = gate_up + row * 2 * I;
            for (int64_t j = 0; j < I; j++) y[j] = w4_silu_mul(gu[j], gu[I + j]);
            CHECK_STATUS(mode ? epmoe_cast_tensor_fp8_ref(y, I, tensor_scale, q)
                              : epmoe_cast_group_fp8_ref(y, 1, I, q, qs, EPMOE_SCALE_F32_ROW, 0), EPMOE_OK);
            for (int64_t j = 0; j < I; j++) bdiff += inter[row * I + j] != q[j];
            bytes += I;
            for (int64_t g = 0; !mode && g < I / 128; g++, groups++) {
                const float got = scales[row * (I / 128) + g];
                sdiff += got != qs[g], sfar += !(fabs((double)got - qs[g]) <= 0x1p-7 * qs[g]);
            }
        }
    printf("  MLP mode %c silu_mul from the GPU's gate_up: %ld of %ld bytes, %ld of %ld scales differ from the host's\n",
           mode ? 'b' : 'a', bdiff, bytes, sdiff, groups);
    CHECK(bdiff <= SILU_DIFF * bytes && sdiff <= SILU_DIFF * groups + 1 && sfar == 0,
          "MLP mode %c silu_mul: %ld bytes and %ld scales differ (%ld by more than 2^-7)", mode ? 'b' : 'a', bdiff, sdiff, sfar);
    free(y), free(q), free(qs);
}
static void test_mlp(test_rng *r) {
    const int64_t E = 4, M = quick ? 24 : 72, H = quick ? 256 : 512, I = quick ? 256 : 640; /* 640: 5 groups a row */
    w4_mat w13, w2;
    w4_mat_make(r, &w13, E, 2 * I, H, 0, 0.02, EPMOE_W4_AUTO);
    w4_mat_make(r, &w2, E, H, I, 1, 0.02, EPMOE_W4_AUTO);
    dev_w4 d13 = dev_weights(&w13), d2 = dev_weights(&w2);
    /* the workspace layout (epmoe__mlp_layout): GEMM workspace, gate_up bf16 [E, M, 2I],
    ** inter fp8 [E, M, I], inter_scales f32 [E, M, I/128], each 256-byte aligned */
    const size_t o_gu = (epmoe_w4a8_gemm_workspace() + 255) / 256 * 256;
    const size_t o_in = o_gu + ((size_t)(E * M * 2 * I) * 2 + 255) / 256 * 256;
    const size_t o_sc = o_in + ((size_t)(E * M * I) + 255) / 256 * 256;
    for (int mode = 0; mode < 2; mode++) {
        w4_acts A;
        w4_acts_make(r, &A, E, M, H, EPMOE_SCALE_F32_MMAJOR, mode ? 0 : 4);
        int32_t masked[4] = {(int32_t)M, 0, 5, (int32_t)(M / 2 + 1)};
        const float s1 = 0.02f, s2 = 0.004f;
        const size_t ws = epmoe_w4a8_mlp_workspace(E, M, H, I);
        uint8_t *hws = aligned_alloc(256, (ws + 255) / 256 * 256);
        uint16_t *href = malloc((size_t)(E * M * H) * 2);
        for (int64_t i = 0; i < E * M * H; i++) href[i] = POISON16;
        epmoe_w4a8_mlp_args m = {{E, 2 * I, H, w13.enc, w13.qw, w13.sw}, {E, H, I, w2.enc, w2.qw, w2.sw}, A.a, M, masked,
                                 mode ? NULL : A.sa, A.fmt, &s1, &s2, hws, ws, href, H, M * H, 0};
        CHECK_STATUS(epmoe_w4a8_mlp_ref(&m), EPMOE_OK);

        uint8_t *da = dev_copy(A.a, (size_t)(E * M * H));
        void *dsa = dev_copy(A.sa, A.slab * E);
        int32_t *dm = dev_copy(masked, sizeof masked);
        float *ds1 = dev_copy(&s1, 4), *ds2 = dev_copy(&s2, 4);
        void *dws;
        CUDA_OK(cudaMalloc(&dws, ws));
        CUDA_OK(cudaMemset(dws, 0, ws));
        uint16_t *dgu = dev_poisoned16(E * M * 2 * I); /* gate_up poisoned too: rows past masked_m stay so */
        uint16_t *dout = dev_poisoned16(E * M * H), *dpoison = dev_poisoned16(E * M * H);
        uint16_t *got = malloc((size_t)(E * M * H) * 2);
        uint8_t *gwsh = aligned_alloc(256, (ws + 255) / 256 * 256);
        /* two calls on one workspace, each over freshly poisoned gate_up, intermediate and output:
        ** the largest token tile (expected_m = 0), then 8-token tiles (the other GEMM kernel) */
        for (int rep = 0; rep < 2; rep++) {
            CUDA_OK(cudaMemcpy((uint8_t *)dws + o_gu, dgu, (size_t)(E * M * 2 * I) * 2, cudaMemcpyDeviceToDevice));
            CUDA_OK(cudaMemset((uint8_t *)dws + o_in, 0x7F, (size_t)(E * M * I))); /* fp8 NaN */
            CUDA_OK(cudaMemset((uint8_t *)dws + o_sc, 0xFF, (size_t)(E * M * (I / 128)) * 4)); /* f32 NaN */
            CUDA_OK(cudaMemcpy(dout, dpoison, (size_t)(E * M * H) * 2, cudaMemcpyDeviceToDevice));
            epmoe_w4a8_mlp_args dmargs = {d13.w, d2.w, da, M, dm, mode ? NULL : dsa, A.fmt, ds1, ds2, dws, ws, dout, H, M * H,
                                          rep ? 8 : 0};
            CHECK_STATUS(epmoe_w4a8_mlp_cuda(&dmargs, stream), EPMOE_OK);
            CUDA_OK(cudaStreamSynchronize(stream));
            CUDA_OK(cudaMemcpy(got, dout, (size_t)(E * M * H) * 2, cudaMemcpyDeviceToHost));
            CUDA_OK(cudaMemcpy(gwsh, dws, ws, cudaMemcpyDeviceToHost));
            char what[64];
            snprintf(what, sizeof what, "MLP mode %c, %s tiles, GEMM1", mode ? 'b' : 'a', rep ? "8-token" : "largest");
            w4_check_out(what, &w13, &A, masked, mode ? s1 : 0.0, (const uint16_t *)(gwsh + o_gu), 2 * I, M * 2 * I);
            long diff = 0, total = 0;
            double num = 0, den = 0;
            for (int64_t e = 0; e < E; e++)
                for (int64_t t = 0; t < masked[e]; t++) {
                    for (int64_t j = 0; j < I; j++, total++) diff += gwsh[o_in + (e * M + t) * I + j] != hws[o_in + (e * M + t) * I + j];
                    for (int64_t n = 0; n < H; n++) {
                        const int64_t i = (e * M + t) * H + n;
                        const double a = epmoe_bf16_to_float(got[i]), b = epmoe_bf16_to_float(href[i]);
                        num += (a - b) * (a - b), den += b * b;
                    }
                }
            printf("  MLP mode %c, %s tiles: %ld of %ld intermediate fp8 bytes differ from the reference, output rel. L2 %.2e\n",
                   mode ? 'b' : 'a', rep ? "8-token" : "largest", diff, total, sqrt(num / (den > 0 ? den : 1)));
            CHECK(diff <= MLP_BYTES_DIFF * total, "MLP mode %d: %ld intermediate bytes differ", mode, diff);
            check_silu_mul(mode, E, M, I, masked, &s2, (const uint16_t *)(gwsh + o_gu), gwsh + o_in, (const float *)(gwsh + o_sc));
            /* GEMM2's input as the GPU left it: its fp8 bytes and (mode a) its f32 row-major scales */
            w4_acts inter = {E, M, I, EPMOE_SCALE_F32_ROW, NULL, gwsh + o_in, gwsh + o_sc,
                             epmoe_scale_bytes(EPMOE_SCALE_F32_ROW, M, I)};
            snprintf(what, sizeof what, "MLP mode %c, %s tiles, GEMM2", mode ? 'b' : 'a', rep ? "8-token" : "largest");
            w4_check_out(what, &w2, &inter, masked, mode ? s2 : 0.0, got, H, M * H);
        }
        cudaFree(dgu), cudaFree(dpoison);
        free(got), free(gwsh), free(hws), free(href);
        cudaFree(da), cudaFree(dsa), cudaFree(dm), cudaFree(ds1), cudaFree(ds2), cudaFree(dws), cudaFree(dout);
        w4_acts_free(&A);
    }
    dev_weights_free(&d13), dev_weights_free(&d2);
    w4_mat_free(&w13), w4_mat_free(&w2);
}

/* ---- accuracy of the two activation paths on the W13 shape ----------------------------- */

/* The kernel's NMSE against the fp64 model of its path (exact products, exact sums), and against
** that model's output rounded to bf16, the GEMM's output format: a kernel that summed exactly
** would return the rounded model bit for bit. The rounding alone adds ~2.7e-6 of NMSE (bf16 keeps
** 8 significant bits: a half-ulp error has a variance of 2^-14 / (12 m^2) of y^2 for a mantissa m
** in [1, 2), ~2.7e-6 on average), 0.4% of the gaussian case's 6.6e-4 but 6% of the outlier case's
** ~4.5e-5. On an H200 (2026-12-01, three seeds) the kernel landed within 0.5% of the rounded model
** in both cases and modes, and 6.5-7.9% above the unrounded one with outliers: that gap, read in
** session 11 as the fp8 wgmma's truncated alignment, is the output rounding. MODEL_MATCH (the
** issue's 5%) bounds the gap to the rounded model in both cases, and to the unrounded one on
** gaussian tokens (where the rounding is 0.4%); MODEL_MATCH_OUTLIERS the unrounded gap with outliers. */
#define MODEL_MATCH 0.05
#define MODEL_MATCH_OUTLIERS 0.15

static void accuracy_case(test_rng *r, const w4_mat *w, int outliers, const char *name) {
    const int64_t T = 256, K = w->K, NS = 256; /* NMSE over the first NS output channels */
    w4_acts A;
    w4_acts_make(r, &A, 1, T, K, EPMOE_SCALE_F32_MMAJOR, outliers);
    int32_t masked = (int32_t)T;
    /* mode (b) input: requant of the group-scaled fp8 to one per-tensor scale = the batch amax/448 */
    float out_scale = 0;
    for (int64_t t = 0; t < T; t++)
        for (int64_t g = 0; g < K / 128; g++) out_scale = fmaxf(out_scale, (float)w4_act_scale(&A, 0, t, g));
    uint8_t *da = dev_copy(A.a, (size_t)(T * K)), *db;
    void *dsa = dev_copy(A.sa, A.slab);
    int32_t *dm = dev_copy(&masked, 4);
    float *dos = dev_copy(&out_scale, 4);
    CUDA_OK(cudaMalloc((void **)&db, (size_t)(T * K)));
    CHECK_STATUS(epmoe_requant_fp8_cuda(da, dsa, A.fmt, dm, 1, T, K, dos, db, stream), EPMOE_OK);
    dev_w4 dw = dev_weights(w);
    uint16_t *dout_a, *dout_b;
    CUDA_OK(cudaMalloc((void **)&dout_a, (size_t)(T * w->N) * 2));
    CUDA_OK(cudaMalloc((void **)&dout_b, (size_t)(T * w->N) * 2));
    epmoe_w4a8_gemm_args ga = {dw.w, da, T, dm, dsa, A.fmt, NULL, dout_a, w->N, T * w->N, 0, gws, gws_bytes};
    epmoe_w4a8_gemm_args gb = {dw.w, db, T, dm, NULL, A.fmt, dos, dout_b, w->N, T * w->N, 0, gws, gws_bytes};
    CHECK_STATUS(epmoe_w4a8_gemm_cuda(&ga, stream), EPMOE_OK);
    CHECK_STATUS(epmoe_w4a8_gemm_cuda(&gb, stream), EPMOE_OK);
    CUDA_OK(cudaStreamSynchronize(stream)); /* the copies below run on the legacy stream */
    uint16_t *oa = malloc((size_t)(T * w->N) * 2), *ob = malloc((size_t)(T * w->N) * 2);
    uint8_t *qb = malloc((size_t)(T * K));
    CUDA_OK(cudaMemcpy(oa, dout_a, (size_t)(T * w->N) * 2, cudaMemcpyDeviceToHost));
    CUDA_OK(cudaMemcpy(ob, dout_b, (size_t)(T * w->N) * 2, cudaMemcpyDeviceToHost));
    CUDA_OK(cudaMemcpy(qb, db, (size_t)(T * K), cudaMemcpyDeviceToHost));

    /* fp64: truth from bf16 activations; models of path a (group fp8) and b (per-tensor fp8). The
    ** weights as repacked (scales rounded to bf16, w4_ckpt_scale): this compares activation paths */
    double *wd = malloc((size_t)(NS * K) * 8), *xt = malloc((size_t)K * 8), *xa = malloc((size_t)K * 8),
           *xb = malloc((size_t)K * 8);
    for (int64_t n = 0; n < NS; n++)
        for (int64_t k = 0; k < K; k++) wd[n * K + k] = w4_ckpt_value(w, 0, n, k) * w4_ckpt_scale(w, 0, n, k / 128);
    double se_ka = 0, se_kb = 0, se_ma = 0, se_mb = 0, se_ra = 0, se_rb = 0, ss = 0;
    for (int64_t t = 0; t < T; t++) {
        for (int64_t k = 0; k < K; k++) {
            xt[k] = epmoe_bf16_to_float(A.x[t * K + k]);
            xa[k] = epmoe_fp8_e4m3_to_float(A.a[t * K + k]) * w4_act_scale(&A, 0, t, k / 128);
            xb[k] = epmoe_fp8_e4m3_to_float(qb[t * K + k]) * (double)out_scale;
        }
        for (int64_t n = 0; n < NS; n++) {
            double yt = 0, ya = 0, yb = 0;
            for (int64_t k = 0; k < K; k++) {
                yt += xt[k] * wd[n * K + k];
                ya += xa[k] * wd[n * K + k];
                yb += xb[k] * wd[n * K + k];
            }
            const double ka = epmoe_bf16_to_float(oa[t * w->N + n]), kb = epmoe_bf16_to_float(ob[t * w->N + n]);
            se_ka += (ka - yt) * (ka - yt), se_kb += (kb - yt) * (kb - yt);
            se_ma += (ya - yt) * (ya - yt), se_mb += (yb - yt) * (yb - yt);
            const double ra = epmoe_bf16_to_float(epmoe_bf16_from_float((float)ya)),
                         rb = epmoe_bf16_to_float(epmoe_bf16_from_float((float)yb));
            se_ra += (ra - yt) * (ra - yt), se_rb += (rb - yt) * (rb - yt);
            ss += yt * yt;
        }
    }
    const double ka = se_ka / ss, kb = se_kb / ss, ma = se_ma / ss, mb = se_mb / ss, ra = se_ra / ss, rb = se_rb / ss;
    printf("  accuracy %-9s NMSE vs bf16 truth: (a) group scales kernel %.3e model %.3e, rounded to bf16 %.3e (%+.1f%%, "
           "%+.1f%% unrounded) | (b) requant+per-tensor kernel %.3e model %.3e, rounded %.3e (%+.1f%%) | b/a %.1fx\n",
           name, ka, ma, ra, 100 * (ka / ra - 1), 100 * (ka / ma - 1), kb, mb, rb, 100 * (kb / rb - 1), kb / ka);
    CHECK(fabs(ka / ra - 1) <= MODEL_MATCH, "%s: mode (a) kernel NMSE %g vs model rounded to bf16 %g", name, ka, ra);
    CHECK(fabs(kb / rb - 1) <= MODEL_MATCH, "%s: mode (b) kernel NMSE %g vs model rounded to bf16 %g", name, kb, rb);
    const double match = outliers ? MODEL_MATCH_OUTLIERS : MODEL_MATCH;
    CHECK(fabs(ka / ma - 1) <= match, "%s: mode (a) kernel NMSE %g vs model %g", name, ka, ma);
    CHECK(fabs(kb / mb - 1) <= match, "%s: mode (b) kernel NMSE %g vs model %g", name, kb, mb);
    CHECK(kb / ka >= (outliers ? 10.0 : 1.5), "%s: mode (a) is not clearly better than (b): %g vs %g", name, ka, kb);
    free(wd), free(xt), free(xa), free(xb), free(oa), free(ob), free(qb);
    cudaFree(da), cudaFree(db), cudaFree(dsa), cudaFree(dm), cudaFree(dos), cudaFree(dout_a), cudaFree(dout_b);
    dev_weights_free(&dw);
    w4_acts_free(&A);
}

static void test_accuracy(test_rng *r) {
    w4_mat w;
    w4_mat_make(r, &w, 1, 4096, 7168, 0, 0.002, EPMOE_W4_AUTO);
    accuracy_case(r, &w, 0, "gaussian");
    accuracy_case(r, &w, 8, "outliers");
    w4_mat_free(&w);
}

int main(void) {
    quick = getenv("EPMOE_TEST_QUICK") != NULL;
    const char *seed_env = getenv("EPMOE_SEED");
    const uint64_t seed = seed_env ? strtoull(seed_env, NULL, 0) : (uint64_t)time(NULL);
    printf("test_w4a8_gpu: seed %llu%s\n", (unsigned long long)seed, quick ? " (quick)" : "");
    test_rng r = {seed | 1};
    CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    gws_bytes = epmoe_w4a8_gemm_workspace();
    CHECK(gws_bytes > 0, "no GEMM workspace size on a GPU");
    CUDA_OK(cudaMalloc(&gws, gws_bytes));
    CUDA_OK(cudaMemset(gws, 0, gws_bytes));
    test_workspace_args(&r);
    test_gemm_cases(&r);
    test_graph(&r);
    test_replay_bits(&r);
    test_mlp(&r);
    if (!quick) test_accuracy(&r);
    return test_report("test_w4a8_gpu");
}
