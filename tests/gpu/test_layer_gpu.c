/*
** test_layer_gpu.c — the MoE layer on the GPUs of one node (epmoe_ep_create_nccl_local, one thread
** per GPU) against the single-process layer reference, at R = 1 and R = 2 (when two GPUs exist):
** FP8 wire with 1x128 scales, the per-tensor compat mode (requant inside dispatch), the BF16 wire
** with the cast after receive; both combine modes; a CUDA graph of the whole forward replayed;
** the phased forward with two forwards in flight.
** The bf16, w8a8_fp8_block (both wires) and w4a16 (group 32 and 128) schemes the same way.
** An FP8-wire layer and BF16-wire layers (w4afp8 on the BF16 wire, bf16, w4a16) live in the same
** process (each on its own group) and run interleaved: each gives its own correct result — there
** is no process-wide wire switch (SGLang PR #22316's bug).
**
** Bounds against the reference: LAYER_GPU_L2 where fp8 roundings of the intermediate may flip
** (layer_common.h); schemes without fp8 only see bf16 flips of gate/up and the intermediate (one
** ulp, 2^-8 relative, on few elements) and fp32 summation order: LAYER_GPU_L2_BF16.
*/
#define _POSIX_C_SOURCE 200809L
#include "cuda_check.h"
#include <pthread.h>

#include "../layer_common.h"

#define LAYER_GPU_L2_BF16 (1.0 / 128)

typedef struct {
    layer_case *c;
    epmoe_ep *ep;
    int rank, graph; /* graph: 0 plain forwards, 1 a CUDA graph replayed, 2 the phased forward */
    uint16_t *out; /* host copy of the output */
    epmoe_status st;
    char err[256];
    uint16_t *out2; /* phased: host copy of the second forward's output, rows back in the batch's order */
} gpu_job;

static double gpu_bound(const layer_case *c) {
    const int fp8 = c->lc.scheme == EPMOE_SCHEME_W4AFP8 || c->lc.scheme == EPMOE_SCHEME_W8A8_FP8_BLOCK;
    return fp8 ? LAYER_GPU_L2 : LAYER_GPU_L2_BF16;
}

static void *to_dev(const void *h, size_t n) {
    void *d;
    CUDA_OK(cudaMalloc(&d, n ? n : 16));
    if (n) CUDA_OK(cudaMemcpy(d, h, n, cudaMemcpyHostToDevice));
    CUDA_OK(cudaDeviceSynchronize()); /* the copy may return before its DMA lands; the stream is non-blocking */
    return d;
}

static void *run_rank(void *arg) {
    gpu_job *j = arg;
    layer_case *c = j->c;
    const int q = j->rank, H = c->ec.hidden, k = c->ec.top_k, N = c->ec.max_tokens;
    CUDA_OK(cudaSetDevice(q));
    cudaStream_t s;
    CUDA_OK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    size_t q13, s13, q2, s2;
    epmoe_w4a8_repack_size(c->hw[q].w13.E, c->hw[q].w13.N, c->hw[q].w13.K, &q13, &s13);
    epmoe_w4a8_repack_size(c->hw[q].w2.E, c->hw[q].w2.N, c->hw[q].w2.K, &q2, &s2);
    epmoe_layer_weights w = c->hw[q];
    if (c->lc.scheme == EPMOE_SCHEME_W4AFP8) {
        w.w13.qweight = to_dev(c->hw[q].w13.qweight, q13), w.w13.scales = to_dev(c->hw[q].w13.scales, s13);
        w.w2.qweight = to_dev(c->hw[q].w2.qweight, q2), w.w2.scales = to_dev(c->hw[q].w2.scales, s2);
    } else {
        w.w13.qweight = w.w13.scales = NULL, w.w2.qweight = w.w2.scales = NULL;
        w.e13.data = to_dev(c->e13[q].data, c->e13[q].data_bytes);
        w.e13.scales = c->e13[q].scales ? to_dev(c->e13[q].scales, c->e13[q].scale_bytes) : NULL;
        w.e2.data = to_dev(c->e2[q].data, c->e2[q].data_bytes);
        w.e2.scales = c->e2[q].scales ? to_dev(c->e2[q].scales, c->e2[q].scale_bytes) : NULL;
    }
    w.a1_scale = to_dev(&c->a1, 4), w.a2_scale = to_dev(&c->a2, 4);
    uint16_t *x = to_dev(c->x[q], (size_t)N * H * 2), *out;
    int32_t *ids = to_dev(c->topk[q], (size_t)N * k * 4);
    float *tw = to_dev(c->tw[q], (size_t)N * k * 4);
    CUDA_OK(cudaMalloc((void **)&out, (size_t)N * H * 2));
    epmoe_layer *layer = NULL;
    j->st = epmoe_layer_create(j->ep, &c->lc, &w, &layer);
    if (j->st == EPMOE_OK && !j->graph) {
        for (int it = 0; it < 2 && j->st == EPMOE_OK; it++)
            j->st = epmoe_layer_forward(layer, x, ids, 32, tw, c->T[q], out, s);
    } else if (j->st == EPMOE_OK && j->graph == 2) {
        /* phased: two forwards in flight, the second on the batch in reverse token order (a token's
        ** output does not depend on its batch), so one forward's buffers cannot stand in for the other's */
        const int T = c->T[q];
        uint16_t *hx = malloc((size_t)N * H * 2), *out2;
        int32_t *hi = malloc((size_t)N * k * 4);
        float *hw = malloc((size_t)N * k * 4);
        for (int t = 0; t < T; t++) {
            memcpy(hx + (size_t)t * H, c->x[q] + (size_t)(T - 1 - t) * H, (size_t)H * 2);
            memcpy(hi + (size_t)t * k, c->topk[q] + (size_t)(T - 1 - t) * k, (size_t)k * 4);
            memcpy(hw + (size_t)t * k, c->tw[q] + (size_t)(T - 1 - t) * k, (size_t)k * 4);
        }
        uint16_t *x2 = to_dev(hx, (size_t)N * H * 2);
        int32_t *ids2 = to_dev(hi, (size_t)N * k * 4);
        float *tw2 = to_dev(hw, (size_t)N * k * 4);
        CUDA_OK(cudaMalloc((void **)&out2, (size_t)N * H * 2));
        uint32_t h[2] = {0, 0};
        const uint16_t *xs[2] = {x, x2};
        const int32_t *is[2] = {ids, ids2};
        const float *ws[2] = {tw, tw2};
        uint16_t *outs[2] = {out, out2};
        static const int order[6][2] = {{0, EPMOE_LAYER_SEND}, {1, EPMOE_LAYER_SEND}, {0, EPMOE_LAYER_EXPERTS},
                                        {1, EPMOE_LAYER_EXPERTS}, {0, EPMOE_LAYER_RECV}, {1, EPMOE_LAYER_RECV}};
        for (int i = 0; i < 6 && j->st == EPMOE_OK; i++) {
            const int b = order[i][0];
            j->st = epmoe_layer_forward_phase(layer, xs[b], is[b], 32, ws[b], T, outs[b], order[i][1], &h[b], s);
        }
        CUDA_OK(cudaStreamSynchronize(s));
        CUDA_OK(cudaMemcpy(hx, out2, (size_t)N * H * 2, cudaMemcpyDeviceToHost));
        for (int t = 0; t < T; t++) memcpy(j->out2 + (size_t)t * H, hx + (size_t)(T - 1 - t) * H, (size_t)H * 2);
        free(hx), free(hi), free(hw);
        cudaFree(x2), cudaFree(ids2), cudaFree(tw2), cudaFree(out2);
    } else if (j->st == EPMOE_OK) { /* captured once, replayed 10 times */
        cudaGraph_t g;
        cudaGraphExec_t ge;
        CUDA_OK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
        j->st = epmoe_layer_forward(layer, x, ids, 32, tw, c->T[q], out, s);
        CUDA_OK(cudaStreamEndCapture(s, &g));
        if (j->st == EPMOE_OK) {
            CUDA_OK(cudaGraphInstantiate(&ge, g, 0));
            for (int it = 0; it < 10; it++) {
                CUDA_OK(cudaMemsetAsync(out, 0xFF, (size_t)N * H * 2, s)); /* each replay must rewrite it */
                CUDA_OK(cudaGraphLaunch(ge, s));
            }
            cudaGraphExecDestroy(ge);
        }
        cudaGraphDestroy(g);
    }
    CUDA_OK(cudaStreamSynchronize(s));
    if (j->st == EPMOE_OK) j->st = epmoe_ep_poll(j->ep);
    if (j->st != EPMOE_OK) snprintf(j->err, sizeof j->err, "%s", epmoe_last_error());
    CUDA_OK(cudaMemcpy(j->out, out, (size_t)N * H * 2, cudaMemcpyDeviceToHost));
    epmoe_layer_destroy(layer);
    cudaFree(x), cudaFree(ids), cudaFree(tw), cudaFree(out);
    cudaFree((void *)w.w13.qweight), cudaFree((void *)w.w13.scales), cudaFree((void *)w.w2.qweight);
    cudaFree((void *)w.w2.scales), cudaFree((void *)w.a1_scale), cudaFree((void *)w.a2_scale);
    cudaFree((void *)w.e13.data), cudaFree((void *)w.e13.scales), cudaFree((void *)w.e2.data);
    cudaFree((void *)w.e2.scales);
    cudaStreamDestroy(s);
    return NULL;
}

typedef struct {
    epmoe_ep *ep;
} destroy_job;
static void *destroy_rank(void *arg) {
    destroy_job *d = arg;
    epmoe_ep_destroy(d->ep);
    return NULL;
}

/* Make the groups, run the layer on every rank, compare, tear down. */
static void run_case(layer_case *c, int graph, const char *name) {
    layer_case_make(c);
    const int R = c->ec.num_ranks;
    epmoe_ep *eps[LAYER_MAX_R];
    epmoe_status st = epmoe_ep_create_nccl_local(&c->ec, R, NULL, eps);
    CHECK(st == EPMOE_OK, "%s: creating the groups: %s", name, epmoe_last_error());
    if (st != EPMOE_OK) {
        layer_case_free(c);
        return;
    }
    gpu_job jobs[LAYER_MAX_R];
    pthread_t th[LAYER_MAX_R];
    for (int q = 0; q < R; q++) {
        jobs[q] = (gpu_job){c, eps[q], q, graph, malloc((size_t)c->ec.max_tokens * c->ec.hidden * 2), EPMOE_OK, "",
                            graph == 2 ? malloc((size_t)c->ec.max_tokens * c->ec.hidden * 2) : NULL};
        pthread_create(&th[q], NULL, run_rank, &jobs[q]);
    }
    for (int q = 0; q < R; q++) pthread_join(th[q], NULL);
    for (int q = 0; q < R; q++) {
        CHECK(jobs[q].st == EPMOE_OK, "%s rank %d: %s", name, q, jobs[q].err);
        if (jobs[q].st == EPMOE_OK) layer_check(c, q, jobs[q].out, gpu_bound(c), name);
        if (jobs[q].st == EPMOE_OK && jobs[q].out2) layer_check(c, q, jobs[q].out2, gpu_bound(c), name);
        free(jobs[q].out2);
        free(jobs[q].out);
    }
    destroy_job d[LAYER_MAX_R];
    for (int q = 0; q < R; q++) d[q].ep = eps[q], pthread_create(&th[q], NULL, destroy_rank, &d[q]);
    for (int q = 0; q < R; q++) pthread_join(th[q], NULL);
    printf("  %-52s checked against the layer reference\n", name);
    layer_case_free(c);
}

static layer_case base(int R, epmoe_wire wire, epmoe_combine_mode mode, int per_tensor, uint64_t seed) {
    layer_case c;
    memset(&c, 0, sizeof c);
    /* DeepSeek-R1 hidden size, fewer experts and a smaller I to keep the reference quick */
    const epmoe_ep_config ec = {sizeof(epmoe_ep_config), R, 0, 16, 7168, 8 * R, 4, wire, EPMOE_SCALE_F32_MMAJOR, 0, 1,
                                mode, 10000, EPMOE_TRANSPORT_AUTO};
    const epmoe_layer_config lc = {sizeof(epmoe_layer_config), EPMOE_SCHEME_W4AFP8, 256, per_tensor, 0};
    c.ec = ec, c.lc = lc;
    for (int q = 0; q < R; q++) c.T[q] = q ? 16 : 13; /* T = N on rank 1 */
    c.seed = seed;
    return c;
}

int main(void) {
    int gpus = 0;
    CUDA_OK(cudaGetDeviceCount(&gpus));
    printf("test_layer_gpu: %d GPU(s)\n", gpus);
    char name[128];
    for (int R = 1; R <= (gpus >= 2 ? 2 : 1); R++)
        for (int wire = 0; wire < 2; wire++)
            for (int mode = 0; mode < 2; mode++)
                for (int pt = 0; pt < 2; pt++) {
                    if (mode == 0 && pt == 1 && wire == 0) continue; /* keep the run short; covered on CPU */
                    layer_case c = base(R, (epmoe_wire)wire, (epmoe_combine_mode)mode, pt, 77u + (uint64_t)R * 8 + wire * 4 + mode * 2 + pt);
                    snprintf(name, sizeof name, "R=%d %s wire, reduce at %s, %s", R, wire ? "FP8" : "BF16",
                             mode ? "expert" : "owner", pt ? "per-tensor" : "1x128 scales");
                    run_case(&c, 0, name);
                }
    /* the whole forward in a CUDA graph, replayed */
    layer_case g = base(gpus >= 2 ? 2 : 1, EPMOE_WIRE_FP8, EPMOE_COMBINE_REDUCE_AT_EXPERT, 0, 991);
    run_case(&g, 1, "graph: FP8 wire, reduce at expert, 10 replays");
    /* the phased forward: two forwards in flight, S S X X R R */
    {
        layer_case c = base(gpus >= 2 ? 2 : 1, EPMOE_WIRE_FP8, EPMOE_COMBINE_REDUCE_AT_EXPERT, 0, 993);
        run_case(&c, 2, "phased: two forwards in flight (S S X X R R), the second reversed");
    }
    /* the other schemes: bf16, fp8-block on both wires, w4a16 with both groups */
    const struct { epmoe_scheme scheme; epmoe_wire wire; int64_t group; const char *name; } xs[] = {
        {EPMOE_SCHEME_BF16, EPMOE_WIRE_BF16, 0, "bf16"},
        {EPMOE_SCHEME_W8A8_FP8_BLOCK, EPMOE_WIRE_FP8, 0, "w8a8_fp8_block, FP8 wire"},
        {EPMOE_SCHEME_W8A8_FP8_BLOCK, EPMOE_WIRE_BF16, 0, "w8a8_fp8_block, BF16 wire"},
        {EPMOE_SCHEME_W4A16, EPMOE_WIRE_BF16, 32, "w4a16 g32"},
        {EPMOE_SCHEME_W4A16, EPMOE_WIRE_BF16, 128, "w4a16 g128"}};
    for (int R = 1; R <= (gpus >= 2 ? 2 : 1); R++)
        for (size_t i = 0; i < sizeof xs / sizeof xs[0]; i++) {
            layer_case c = base(R, xs[i].wire, (epmoe_combine_mode)((R + (int)i) & 1), 0, 300u + (uint64_t)R * 16 + i);
            c.lc.scheme = xs[i].scheme, c.group = xs[i].group;
            snprintf(name, sizeof name, "R=%d %s, reduce at %s", R, xs[i].name, (R + (int)i) & 1 ? "expert" : "owner");
            run_case(&c, 0, name);
        }
    {
        layer_case c = base(gpus >= 2 ? 2 : 1, EPMOE_WIRE_BF16, EPMOE_COMBINE_REDUCE_AT_EXPERT, 0, 992);
        c.lc.scheme = EPMOE_SCHEME_W4A16, c.group = 32;
        run_case(&c, 1, "graph: w4a16 g32, 10 replays");
    }
    /* An FP8-wire layer and BF16-wire layers alive at once in this process, run interleaved, each
    ** checked against its own reference (the bf16 and w4a16 ones bit for bit in what they read). */
    {
        layer_case a = base(1, EPMOE_WIRE_FP8, EPMOE_COMBINE_REDUCE_AT_EXPERT, 0, 5),
                   b = base(1, EPMOE_WIRE_BF16, EPMOE_COMBINE_REDUCE_AT_EXPERT, 0, 6),
                   f = base(1, EPMOE_WIRE_BF16, EPMOE_COMBINE_REDUCE_AT_EXPERT, 0, 7),
                   w = base(1, EPMOE_WIRE_BF16, EPMOE_COMBINE_REDUCE_AT_EXPERT, 0, 8);
        f.lc.scheme = EPMOE_SCHEME_BF16, w.lc.scheme = EPMOE_SCHEME_W4A16, w.group = 32;
        layer_case *cs[4] = {&a, &b, &f, &w};
        epmoe_ep *eps[4];
        gpu_job js[4];
        for (int i = 0; i < 4; i++) {
            layer_case_make(cs[i]);
            CHECK_STATUS(epmoe_ep_create_nccl_local(&cs[i]->ec, 1, NULL, &eps[i]), EPMOE_OK);
            js[i] = (gpu_job){cs[i], eps[i], 0, 0, malloc((size_t)16 * 7168 * 2), EPMOE_OK, "", NULL};
        }
        const int order[] = {0, 1, 2, 0, 3, 2, 0}; /* FP8, BF16, bf16, FP8, w4a16, bf16, FP8 */
        for (size_t i = 0; i < sizeof order / sizeof order[0]; i++) run_rank(&js[order[i]]);
        static const char *names[4] = {"FP8 layer next to BF16-wire layers", "BF16-wire w4afp8 next to an FP8 layer",
                                       "bf16 layer next to an FP8 layer", "w4a16 layer next to an FP8 layer"};
        for (int i = 0; i < 4; i++) {
            CHECK(js[i].st == EPMOE_OK, "%s: %s", names[i], js[i].err);
            layer_check(cs[i], 0, js[i].out, gpu_bound(cs[i]), names[i]);
            epmoe_ep_destroy(eps[i]);
            free(js[i].out);
            layer_case_free(cs[i]);
        }
        printf("  %-52s checked against the layer reference\n", "FP8 and BF16-wire layers of 3 schemes in one process");
    }
    return test_report("test_layer_gpu");
}
