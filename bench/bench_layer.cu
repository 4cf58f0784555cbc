/*
** bench_layer.cu — the MoE layer end to end on the GPUs of one node (one thread per GPU, NCCL
** device API): DeepSeek-R1 shapes (H 7168, I 2048, 256 experts, top-8, 128 tokens per rank),
** W4AFP8 scheme, FP8 wire against BF16 wire. Per wire: the layer forward, and each stage alone on
** the same buffers (dispatch, expert MLP, combine). Each iteration starts with a host barrier of
** the rank threads and a device sync, then CUDA events around the op on each rank; the slower
** rank's median over the iterations is reported. Weights are random bytes in the repacked layout
** (every code is a valid weight); routing is uniform over the experts, distinct per token.
** Run on the GPU machine: ./build/bench/bench_layer [--tokens N] [--json FILE]
*/
#define _POSIX_C_SOURCE 200809L
#include <cuda_runtime_api.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "bench_check.h"
#include "epmoe.h"

static __global__ void fill_bytes(uint8_t *p, size_t n, uint32_t seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 2654435761u ^ seed;
        h ^= h >> 15, h *= 2246822519u, h ^= h >> 13;
        p[i] = (uint8_t)h;
    }
}
static __global__ void fill_scales(float *p, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        p[i] = 1e-3f * (1.0f + (float)(i % 7));
}

enum { WARMUP = 5, ITERS = 30, STAGES = 4 };
static const char *stage_names[STAGES] = {"layer forward", "dispatch alone", "expert MLP alone", "combine alone"};

struct Job {
    int rank, R, T;
    epmoe_ep *ep;
    epmoe_wire wire;
    pthread_barrier_t *bar;
    std::vector<float> times[STAGES];
};

static void *run_rank(void *arg) {
    Job *j = (Job *)arg;
    CU(cudaSetDevice(j->rank));
    cudaStream_t s;
    CU(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    epmoe_ep_config ec = EPMOE_EP_CONFIG_INIT;
    ec.num_ranks = j->R, ec.rank = j->rank, ec.wire = j->wire;
    const int64_t H = ec.hidden, I = 2048, L = ec.num_experts / j->R, M = (int64_t)j->R * ec.max_tokens, k = ec.top_k;
    size_t q13, s13, q2, s2;
    EP(epmoe_w4a8_repack_size(L, 2 * I, H, &q13, &s13));
    EP(epmoe_w4a8_repack_size(L, H, I, &q2, &s2));
    void *w13, *w2;
    float *sw13, *sw2;
    CU(cudaMalloc(&w13, q13));
    CU(cudaMalloc(&w2, q2));
    CU(cudaMalloc(&sw13, s13));
    CU(cudaMalloc(&sw2, s2));
    fill_bytes<<<1024, 256, 0, s>>>((uint8_t *)w13, q13, 1 + j->rank);
    fill_bytes<<<1024, 256, 0, s>>>((uint8_t *)w2, q2, 7 + j->rank);
    fill_scales<<<1024, 256, 0, s>>>(sw13, s13 / 4);
    fill_scales<<<1024, 256, 0, s>>>(sw2, s2 / 4);
    const epmoe_layer_weights w = {{L, 2 * I, H, EPMOE_W4_SYM7, w13, sw13}, {L, H, I, EPMOE_W4_SYM7, w2, sw2}, NULL, NULL};
    epmoe_layer_config lc = EPMOE_LAYER_CONFIG_INIT;
    epmoe_layer *layer;
    EP(epmoe_layer_create(j->ep, &lc, &w, &layer));

    /* inputs: bf16 tokens, k distinct experts per token */
    std::vector<uint16_t> hx((size_t)j->T * H);
    std::vector<int32_t> hidx((size_t)j->T * k);
    std::vector<float> hw((size_t)j->T * k, 1.0f / k);
    uint64_t r = 0x9E3779B97F4A7C15ull + (uint64_t)j->rank;
    for (auto &v : hx) r ^= r << 13, r ^= r >> 7, r ^= r << 17, v = epmoe_bf16_from_float((float)((r >> 40) % 200) * 0.01f - 1.0f);
    for (int t = 0; t < j->T; t++)
        for (int a = 0; a < k; a++) {
            int e;
            bool dup;
            do {
                r ^= r << 13, r ^= r >> 7, r ^= r << 17;
                e = (int)(r % (uint64_t)ec.num_experts);
                dup = false;
                for (int b = 0; b < a; b++) dup |= hidx[(size_t)t * k + b] == e;
            } while (dup);
            hidx[(size_t)t * k + a] = e;
        }
    uint16_t *x, *out, *eout;
    int32_t *idx, *masked;
    float *tw;
    void *recv_x, *recv_s, *ws;
    epmoe_ep_layout lay;
    EP(epmoe_ep_layout_query(&ec, &lay));
    const size_t wsb = epmoe_w4a8_mlp_workspace(L, M, H, I);
    CU(cudaMalloc(&x, hx.size() * 2));
    CU(cudaMalloc(&idx, hidx.size() * 4));
    CU(cudaMalloc(&tw, hw.size() * 4));
    CU(cudaMalloc(&out, (size_t)ec.max_tokens * H * 2));
    CU(cudaMalloc(&recv_x, lay.recv_x_bytes));
    CU(cudaMalloc(&recv_s, lay.recv_scales_bytes ? lay.recv_scales_bytes : 16));
    CU(cudaMalloc(&masked, lay.masked_m_bytes));
    CU(cudaMalloc(&eout, lay.expert_out_bytes));
    CU(cudaMalloc(&ws, wsb));
    CU(cudaMemset(ws, 0, wsb));
    CU(cudaMemcpy(x, hx.data(), hx.size() * 2, cudaMemcpyHostToDevice));
    CU(cudaMemcpy(idx, hidx.data(), hidx.size() * 4, cudaMemcpyHostToDevice));
    CU(cudaMemcpy(tw, hw.data(), hw.size() * 4, cudaMemcpyHostToDevice));
    CU(cudaDeviceSynchronize()); /* pageable copies may return before they land */
    /* the stages alone, on the bench's own buffers (the layer's are private); the BF16 wire
    ** stage "MLP" includes the cast after receive only in the layer row */
    uint8_t *q = NULL;
    float *qs = NULL;
    if (j->wire == EPMOE_WIRE_BF16) {
        CU(cudaMalloc(&q, (size_t)(L * M * H)));
        CU(cudaMalloc(&qs, epmoe_scale_bytes(EPMOE_SCALE_F32_ROW, L * M, H)));
    }
    epmoe_dispatch_args d = {x, idx, 32, tw, j->T, recv_x, recv_s, masked, NULL, NULL};
    epmoe_w4a8_mlp_args m = {w.w13, w.w2, j->wire == EPMOE_WIRE_FP8 ? (const uint8_t *)recv_x : q, M, masked,
                             j->wire == EPMOE_WIRE_FP8 ? recv_s : (void *)qs,
                             j->wire == EPMOE_WIRE_FP8 ? ec.scale_fmt : EPMOE_SCALE_F32_ROW, NULL, NULL, ws, wsb, eout, H,
                             M * H, 0};
    m.expected_m = (int64_t)ec.max_tokens * j->R * k / ec.num_experts;
    epmoe_combine_args c = {eout, NULL, out};
    cudaEvent_t e0, e1;
    CU(cudaEventCreate(&e0));
    CU(cudaEventCreate(&e1));
    for (int it = 0; it < WARMUP + ITERS; it++)
        for (int st = 0; st < STAGES; st++) {
            uint32_t h = 0;
            if (st == 2 || st == 3) EP(epmoe_dispatch(j->ep, &d, EPMOE_PHASE_BOTH, &h, s)); /* untimed setup */
            if (st == 2 && j->wire == EPMOE_WIRE_BF16)
                EP(epmoe_cast_group_fp8_cuda((const uint16_t *)recv_x, L * M, H, q, qs, EPMOE_SCALE_F32_ROW, 0, s));
            CU(cudaStreamSynchronize(s));
            pthread_barrier_wait(j->bar);
            CU(cudaEventRecord(e0, s));
            switch (st) {
            case 0: EP(epmoe_layer_forward(layer, x, idx, 32, tw, j->T, out, s)); break;
            case 1: EP(epmoe_dispatch(j->ep, &d, EPMOE_PHASE_BOTH, &h, s)); break;
            case 2: EP(epmoe_w4a8_mlp_cuda(&m, s)); break;
            case 3: EP(epmoe_combine(j->ep, h, &c, EPMOE_PHASE_BOTH, s)); break;
            }
            CU(cudaEventRecord(e1, s));
            CU(cudaEventSynchronize(e1));
            if (st == 1) { /* dispatch alone leaves a live handle: retire it untimed */
                EP(epmoe_combine(j->ep, h, &c, EPMOE_PHASE_BOTH, s));
                CU(cudaStreamSynchronize(s));
            }
            if (st == 2) { /* the MLP's dispatch needs its combine too */
                EP(epmoe_combine(j->ep, h, &c, EPMOE_PHASE_BOTH, s));
                CU(cudaStreamSynchronize(s));
            }
            float ms;
            CU(cudaEventElapsedTime(&ms, e0, e1));
            if (it >= WARMUP) j->times[st].push_back(ms * 1000.0f);
        }
    EP(epmoe_ep_poll(j->ep));
    epmoe_layer_destroy(layer);
    cudaFree(w13), cudaFree(w2), cudaFree(sw13), cudaFree(sw2), cudaFree(x), cudaFree(idx), cudaFree(tw);
    cudaFree(out), cudaFree(recv_x), cudaFree(recv_s), cudaFree(masked), cudaFree(eout), cudaFree(ws), cudaFree(q), cudaFree(qs);
    return NULL;
}

static double median(std::vector<float> v) {
    std::sort(v.begin(), v.end());
    return v.empty() ? 0 : v[v.size() / 2];
}

static void *destroy_rank(void *arg) {
    Job *j = (Job *)arg;
    CU(cudaSetDevice(j->rank));
    epmoe_ep_destroy(j->ep);
    return NULL;
}

int main(int argc, char **argv) {
    int T = 128;
    const char *json = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--tokens") && i + 1 < argc) T = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--json") && i + 1 < argc) json = argv[++i];
        else {
            printf("usage: %s [--tokens N (1..128)] [--json FILE]\n", argv[0]);
            return strcmp(argv[i], "--help") ? 1 : 0;
        }
    }
    if (T < 1 || T > 128) return printf("--tokens must be in 1..128\n"), 1;
    int R = 0;
    CU(cudaGetDeviceCount(&R));
    R = R >= 2 ? 2 : 1;
    printf("bench_layer: %d GPU(s), DeepSeek-R1 MoE layer (H 7168, I 2048, 256 experts, top-8), W4AFP8, %d tokens/rank\n",
           R, T);
    printf("%-6s %-18s %10s\n", "wire", "stage", "median us");
    FILE *f = json ? fopen(json, "w") : NULL;
    if (f) fprintf(f, "{\"ranks\": %d, \"tokens\": %d, \"results\": [\n", R, T);
    for (int wi = 0; wi < 2; wi++) {
        const epmoe_wire wire = wi ? EPMOE_WIRE_BF16 : EPMOE_WIRE_FP8;
        epmoe_ep_config ec = EPMOE_EP_CONFIG_INIT;
        ec.num_ranks = R, ec.wire = wire;
        epmoe_ep *eps[2];
        EP(epmoe_ep_create_nccl_local(&ec, R, NULL, eps));
        pthread_barrier_t bar;
        pthread_barrier_init(&bar, NULL, (unsigned)R);
        Job jobs[2];
        pthread_t th[2];
        for (int q = 0; q < R; q++) {
            jobs[q].rank = q, jobs[q].R = R, jobs[q].T = T, jobs[q].ep = eps[q], jobs[q].wire = wire, jobs[q].bar = &bar;
            pthread_create(&th[q], NULL, run_rank, &jobs[q]);
        }
        for (int q = 0; q < R; q++) pthread_join(th[q], NULL);
        double t[STAGES];
        for (int st = 0; st < STAGES; st++) {
            t[st] = 0;
            for (int q = 0; q < R; q++) t[st] = std::max(t[st], median(jobs[q].times[st]));
            printf("%-6s %-18s %10.1f\n", wi ? "BF16" : "FP8", stage_names[st], t[st]);
            if (f)
                fprintf(f, "  {\"wire\": \"%s\", \"stage\": \"%s\", \"us\": %.2f},\n", wi ? "bf16" : "fp8", stage_names[st], t[st]);
        }
        printf("%-6s layer / sum of the stages alone = %.1f / %.1f = %.3f\n", wi ? "BF16" : "FP8", t[0], t[1] + t[2] + t[3],
               t[0] / (t[1] + t[2] + t[3]));
        for (int q = 0; q < R; q++) pthread_create(&th[q], NULL, destroy_rank, &jobs[q]);
        for (int q = 0; q < R; q++) pthread_join(th[q], NULL);
        pthread_barrier_destroy(&bar);
    }
    if (f) fprintf(f, "  {}\n]}\n"), fclose(f);
    return 0;
}
