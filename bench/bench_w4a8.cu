/*
** bench_w4a8.cu — the W4A8 expert GEMMs and MLP, and the expert GEMMs of the bf16, fp8-block and
** w4a16 schemes (epmoe_expert_gemm_cuda), on one GPU, side by side in the same run with
** cuBLAS BF16 and cuBLASLt FP8 (per-tensor scales) on the same shapes in two forms: one GEMM per
** expert captured in one CUDA graph per GEMM, and one strided-batched call over all experts (the
** grouped form for equal rows; cuBLAS has no masked grouped GEMM). The ratios use the faster form.
** Also measured in the same run: the HBM read ceiling (a streaming read kernel over 4 GiB) that
** the bandwidth targets use.
**
** Shapes: DeepSeek-R1 (H 7168, I 2048, 32 local experts) and Kimi-K2 (48 local experts); every
** expert gets the same rows (masked_m = rows, M = rows). Weights are random bytes in the
** repacked layout (every SYM7 code is a valid weight), scales random positive; the anchors' fp8
** weights are bf16 values cast to fp8, and every fp8 activation is a bf16 row cast by the
** library's 1x128 cast, as dispatch delivers it (quantize_rows: the values matter to the speed).
** Timing: CUDA events around one launch (or graph), 5 warm-ups, median of 25. Before each timed
** launch a 100 us spin kernel holds the stream while the host enqueues the events and the launch,
** so the events time the GPU's work (as bench_ep, and as an engine that runs ahead of the GPU or
** replays a CUDA graph sees it), for ours and the cuBLAS graphs alike; `--host-in-timing` leaves
** the spin out (the method until 2026-11-30: an idle GPU then waits for the host's launch). The
** host's own cost per call is measured apart ("host us per call"). The weights of all experts
** (727 MB int4 for DeepSeek) dwarf the 50 MB L2, so no flush is needed.
** Metrics: GB/s over the weight bytes read (int4: N*K/2 + N*K/128*2, bf16 scales, per expert; fp8 N*K;
** bf16 2*N*K), TFLOP/s = 2 * rows * N * K * experts / time.
** Run: ./build/bench/bench_w4a8 [--model deepseek-r1|kimi-k2|all] [--rows 1,8,32] [--json FILE]
**      [--host-in-timing]
*/
#include <chrono>
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <string>
#include <vector>

#include "epmoe.h"
#include "bench_check.h"
#include "bench_hold.cuh"


static cudaStream_t stream, stream2;
static cudaEvent_t fork_ev, join_ev;
static bool hold = true; /* spin before each timed launch (see the top) */

/* Deterministic fill on the device: bytes with the given mask (the int4 weights: every byte). */
__global__ void fill_bytes(uint8_t *p, size_t n, uint32_t seed, uint8_t mask) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 2654435761u ^ seed;
        h ^= h >> 15, h *= 2246822519u, h ^= h >> 13;
        p[i] = (uint8_t)h & mask;
    }
}
/* lo + span * [0, 1) as float or bf16 (scales: the W4A8 weights' are bf16, the activations' fp32). */
template <typename T> __global__ void fill_range(T *p, size_t n, float lo, float span) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        p[i] = T(lo + span * (float)((i * 2654435761u) % 1000u) / 1000.0f);
}
__global__ void fill_bf16(__nv_bfloat16 *p, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        p[i] = __float2bfloat16(0.01f * (float)((int)((i * 2654435761u) % 201u) - 100));
}
__global__ void read_kernel(const uint4 *p, size_t n, uint32_t *sink) {
    uint32_t x = 0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const uint4 v = __ldcs(p + i);
        x ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (x == 0x12345678u) *sink = x;
}

template <typename F> static double time_us(F &&f, int warm = 5, int iters = 25) {
    cudaEvent_t a, b;
    CU(cudaEventCreate(&a));
    CU(cudaEventCreate(&b));
    for (int i = 0; i < warm; i++) f();
    std::vector<float> t;
    int short_holds = 0;
    for (int i = 0; i < iters; i++) {
        if (hold) bench_hold<<<1, 1, 0, stream>>>(100000);
        CU(cudaEventRecord(a, stream));
        f();
        CU(cudaEventRecord(b, stream));
        /* the start event already passed: the host took longer than the hold to enqueue f */
        const cudaError_t q = hold ? cudaEventQuery(a) : cudaErrorNotReady;
        if (q == cudaSuccess) short_holds++;
        else if (q != cudaErrorNotReady) CU(q);
        CU(cudaEventSynchronize(b));
        float ms;
        CU(cudaEventElapsedTime(&ms, a, b));
        t.push_back(ms * 1000.0f);
    }
    cudaEventDestroy(a), cudaEventDestroy(b);
    if (short_holds) printf("warning: the 100 us hold ended before the host had enqueued the call in %d of %d runs\n",
                            short_holds, iters);
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
}

/* The host's time to enqueue one call (checks, tensor map, launch), median of 9 batches of 50
** behind a spin that keeps the GPU busy, so no call waits for the device. Callers pass calls with
** no rows (masked_m all 0): the host's work is the same, the GPU's is not. */
template <typename F> static double host_us(F &&f) {
    std::vector<double> t;
    for (int b = 0; b < 9; b++) {
        bench_hold<<<1, 1, 0, stream>>>(20000000); /* 20 ms */
        const auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < 50; i++) f();
        t.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / 50);
        CU(cudaStreamSynchronize(stream));
    }
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
}

static double hbm_read_ceiling(void) {
    const size_t bytes = (size_t)4 << 30;
    uint4 *p;
    uint32_t *sink;
    CU(cudaMalloc(&p, bytes));
    CU(cudaMalloc(&sink, 4));
    CU(cudaMemset(p, 1, bytes));
    int sms;
    CU(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    const double us = time_us([&] { read_kernel<<<sms * 8, 512, 0, stream>>>(p, bytes / 16, sink); }, 2, 9);
    cudaFree(p), cudaFree(sink);
    return bytes / us / 1e3; /* GB/s */
}

/* One GEMM [E experts: rows x K] x [N x K]^T per expert through cuBLAS, captured in a graph. */
struct Blas {
    cublasHandle_t h;
    cublasLtHandle_t lt;
    void *ws;
    size_t ws_bytes = 64u << 20;
};

static double bench_bf16(Blas &b, int E, int rows, int N, int K, const __nv_bfloat16 *w, const __nv_bfloat16 *x,
                         __nv_bfloat16 *out, bool batched) {
    const float one = 1.0f, zero = 0.0f;
    if (batched) { /* one call over all experts */
        auto call = [&] {
            return cublasGemmStridedBatchedEx(b.h, CUBLAS_OP_T, CUBLAS_OP_N, N, rows, K, &one, w, CUDA_R_16BF, K, (long long)N * K,
                                              x, CUDA_R_16BF, K, (long long)rows * K, &zero, out, CUDA_R_16BF, N,
                                              (long long)rows * N, E, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
        };
        if (call() != CUBLAS_STATUS_SUCCESS) return -1;
        return time_us([&] { call(); });
    }
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CU(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    for (int e = 0; e < E; e++)
        if (cublasGemmEx(b.h, CUBLAS_OP_T, CUBLAS_OP_N, N, rows, K, &one, w + (size_t)e * N * K, CUDA_R_16BF, K,
                         x + (size_t)e * rows * K, CUDA_R_16BF, K, &zero, out + (size_t)e * rows * N, CUDA_R_16BF, N,
                         CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS) {
            cudaStreamEndCapture(stream, &g);
            return -1;
        }
    CU(cudaStreamEndCapture(stream, &g));
    CU(cudaGraphInstantiate(&ge, g, 0));
    const double us = time_us([&] { CU(cudaGraphLaunch(ge, stream)); });
    cudaGraphExecDestroy(ge), cudaGraphDestroy(g);
    return us;
}

/* cuBLASLt FP8 (e4m3 x e4m3 -> bf16, fp32 accumulate, per-tensor scales = 1), per expert in a graph
** or one strided-batched call; -1 if unsupported. */
static double bench_fp8(Blas &b, int E, int rows, int N, int K, const uint8_t *w, const uint8_t *x, __nv_bfloat16 *out,
                        bool batched) {
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t la, lb, lc;
    cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F);
    cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta);
    cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb);
    cublasLtMatrixLayoutCreate(&la, CUDA_R_8F_E4M3, K, N, K);
    cublasLtMatrixLayoutCreate(&lb, CUDA_R_8F_E4M3, K, rows, K);
    cublasLtMatrixLayoutCreate(&lc, CUDA_R_16BF, N, rows, N);
    if (batched) {
        const int32_t count = E;
        const int64_t sa = (int64_t)N * K, sb = (int64_t)rows * K, sc = (int64_t)rows * N;
        for (auto [l, st] : {std::make_pair(la, sa), std::make_pair(lb, sb), std::make_pair(lc, sc)}) {
            cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof count);
            cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &st, sizeof st);
        }
    }
    cublasLtMatmulPreference_t pref;
    cublasLtMatmulPreferenceCreate(&pref);
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &b.ws_bytes, sizeof b.ws_bytes);
    cublasLtMatmulHeuristicResult_t heur;
    int found = 0;
    double us = -1;
    if (cublasLtMatmulAlgoGetHeuristic(b.lt, op, la, lb, lc, lc, pref, 1, &heur, &found) == CUBLAS_STATUS_SUCCESS && found) {
        const float one = 1.0f, zero = 0.0f;
        auto call = [&](int e) { /* expert e's GEMM, or all of them from e = 0 when batched */
            return cublasLtMatmul(b.lt, op, &one, w + (size_t)e * N * K, la, x + (size_t)e * rows * K, lb, &zero,
                                  out + (size_t)e * rows * N, lc, out + (size_t)e * rows * N, lc, &heur.algo, b.ws,
                                  b.ws_bytes, stream) == CUBLAS_STATUS_SUCCESS;
        };
        if (batched) {
            if (call(0)) us = time_us([&] { call(0); });
        } else {
            cudaGraph_t g;
            cudaGraphExec_t ge;
            CU(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
            bool ok = true;
            for (int e = 0; e < E && ok; e++) ok = call(e);
            CU(cudaStreamEndCapture(stream, &g));
            if (ok) {
                CU(cudaGraphInstantiate(&ge, g, 0));
                us = time_us([&] { CU(cudaGraphLaunch(ge, stream)); });
                cudaGraphExecDestroy(ge);
            }
            cudaGraphDestroy(g);
        }
    }
    cublasLtMatmulPreferenceDestroy(pref);
    cublasLtMatrixLayoutDestroy(la), cublasLtMatrixLayoutDestroy(lb), cublasLtMatrixLayoutDestroy(lc);
    cublasLtMatmulDescDestroy(op);
    return us;
}

struct Row {
    const char *model;
    std::string what; /* a copy: callers format it in a local buffer */
    int E, rows, N, K;
    double us, gbs, tflops;
};
static std::vector<Row> results;

static void report(const char *model, const char *what, int E, int rows, int N, int K, double us, double wbytes) {
    Row r = {model, what, E, rows, N, K, us, us > 0 ? wbytes / us / 1e3 : 0,
             us > 0 ? 2.0 * rows * (double)N * K * E / us / 1e6 : 0};
    results.push_back(r);
    if (us > 0)
        printf("%-12s %-26s E%-3d rows %-5d N %-5d K %-5d %9.1f us %8.0f GB/s %7.1f TFLOP/s\n", model, what, E, rows, N,
               K, us, r.gbs, r.tflops);
    else
        printf("%-12s %-26s E%-3d rows %-5d N %-5d K %-5d   (not supported by the library)\n", model, what, E, rows, N, K);
    fflush(stdout);
}

#ifdef EPMOE_W4A8_TRACE
/* dev only (make dev-trace): when the GEMM's CTAs ran (src/cuda/w4a8_gemm.cu), medians over 11
** launches after 5 warm-ups, in us after the first CTA entered: the last entry (the launch ramp),
** the median first stage landed, the first / median / last CTA done with its steps and out
** (the tail), and the share of CTA-time before a CTA's entry or after its exit within the span.
** A second line: per SM, the mean time its CTAs were done with their steps (min / median / max
** over the SMs), the mean spread between the CTAs of one SM, and the correlation of those times
** between consecutive launches, per SM and per CTA, with the share of CTAs that ran on another SM
** than the launch before (near 1 with the CTAs on the same SMs every time cannot tell a slow SM
** from a slow range of addresses). */
extern "C" unsigned long long *epmoe__w4a8_trace(int *ctas);
/* One traced call: clear the stamps d, run it, copy them to h. */
template <typename C> static void traced(C &&call, unsigned long long *d, std::vector<unsigned long long> &h) {
    CU(cudaMemsetAsync(d, 0, h.size() * 8, stream));
    call();
    CU(cudaMemcpyAsync(h.data(), d, h.size() * 8, cudaMemcpyDeviceToHost, stream));
    CU(cudaStreamSynchronize(stream));
}
/* One MLP call's two GEMMs on one time line (GEMM2 stamps the upper half of the buffer), medians of
** 11 calls after 5, us after GEMM1's first CTA entered: GEMM1's CTAs done (median, last) and out;
** GEMM2's CTAs in (first, median, last), first stage landed, done and out; how many GEMM2 CTAs each
** SM ran over the launch (3 when all were resident at once at T = 8). The gap between GEMM1's last
** CTA out and GEMM2's first in is silu_mul and two launches. */
static void trace_mlp(const char *model, int rows, const epmoe_w4a8_mlp_args *m) {
    constexpr int F = 5;
    int n = 0;
    unsigned long long *d = epmoe__w4a8_trace(&n);
    if (!d) return;
    std::vector<unsigned long long> h((size_t)n * F);
    std::vector<std::vector<double>> v(12);
    for (int it = 0; it < 16; it++) {
        traced([&] { EP(epmoe_w4a8_mlp_cuda(m, stream)); }, d, h);
        if (it < 5) continue;
        unsigned long long t0 = ~0ull;
        for (int c = 0; c < n / 2; c++)
            if (h[c * F]) t0 = std::min(t0, h[c * F]);
        std::vector<double> pt[2][4];
        std::vector<int> sms2(1024, 0);
        for (int half = 0; half < 2; half++)
            for (int c = half * n / 2; c < (half + 1) * n / 2; c++)
                if (h[c * F]) {
                    for (int q = 0; q < 4; q++)
                        if (h[c * F + q]) pt[half][q].push_back(((double)h[c * F + q] - (double)t0) / 1e3);
                    if (half == 1 && h[c * F + 4] < 1024) sms2[h[c * F + 4]]++;
                }
        for (auto &a : pt)
            for (auto &x : a) std::sort(x.begin(), x.end());
        auto med = [](const std::vector<double> &x) { return x.empty() ? 0.0 : x[x.size() / 2]; };
        auto first = [](const std::vector<double> &x) { return x.empty() ? 0.0 : x.front(); };
        auto last = [](const std::vector<double> &x) { return x.empty() ? 0.0 : x.back(); };
        int sm_min = 1 << 30, sm_max = 0;
        for (int sm = 0; sm < 1024; sm++)
            if (sms2[sm]) sm_min = std::min(sm_min, sms2[sm]), sm_max = std::max(sm_max, sms2[sm]);
        const double vals[12] = {med(pt[0][2]), last(pt[0][2]), last(pt[0][3]), first(pt[1][0]), med(pt[1][0]), last(pt[1][0]),
                                 first(pt[1][1]), med(pt[1][1]), med(pt[1][2]), last(pt[1][2]), last(pt[1][3]),
                                 (double)sm_min * 100 + sm_max};
        for (int q = 0; q < 12; q++) v[q].push_back(vals[q]);
    }
    double r[12];
    for (int q = 0; q < 12; q++) {
        std::sort(v[q].begin(), v[q].end());
        r[q] = v[q].empty() ? 0 : v[q][v[q].size() / 2];
    }
    printf("%-12s rows %-5d MLP trace: GEMM1 done med %.1f last %.1f, exit last %.1f | GEMM2 entry first %.1f med %.1f "
           "last %.1f, first stage first %.1f med %.1f, done med %.1f last %.1f, exit last %.1f | GEMM2 CTAs per SM %d..%d\n",
           model, rows, r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10], (int)r[11] / 100, (int)r[11] % 100);
}
static void trace_gemm(const char *model, const char *what, int rows, const epmoe_w4a8_gemm_args *g) {
    constexpr int F = 5; /* stamps per CTA: entry, first stage, steps done, exit, SM */
    int n = 0;
    unsigned long long *d = epmoe__w4a8_trace(&n);
    if (!d) return;
    std::vector<unsigned long long> h((size_t)n * F);
    std::vector<std::vector<double>> v(16); /* [13..15]: launch-to-launch, from the second launch */
    std::vector<double> prev_sm, prev_cta;
    std::vector<unsigned long long> prev_smid;
    std::vector<double> rank_t[8], blk_t[8];
    /* Pearson over the entries >= 0 in both */
    auto pearson = [](const std::vector<double> &x, const std::vector<double> &y) {
        double sx = 0, sy = 0, sxx = 0, syy = 0, sxy = 0, k = 0;
        for (size_t i = 0; i < x.size() && i < y.size(); i++)
            if (x[i] >= 0 && y[i] >= 0) sx += x[i], sy += y[i], sxx += x[i] * x[i], syy += y[i] * y[i], sxy += x[i] * y[i], k++;
        if (k < 2) return 0.0;
        const double vx = sxx - sx * sx / k, vy = syy - sy * sy / k;
        return vx > 0 && vy > 0 ? (sxy - sx * sy / k) / sqrt(vx * vy) : 0.0;
    };
    for (int it = 0; it < 16; it++) {
        traced([&] { EP(epmoe_w4a8_gemm_cuda(g, stream)); }, d, h);
        if (it < 5) continue;
        unsigned long long t0 = ~0ull;
        std::vector<double> pt[4];
        for (int c = 0; c < n; c++)
            if (h[c * F]) t0 = std::min(t0, h[c * F]);
        for (int c = 0; c < n; c++)
            for (int q = 0; q < 4; q++)
                if (h[c * F] && h[c * F + q]) pt[q].push_back((h[c * F + q] - t0) / 1e3);
        if (pt[0].empty() || pt[3].empty()) return;
        for (auto &x : pt) std::sort(x.begin(), x.end());
        auto med = [](const std::vector<double> &x) { return x.empty() ? 0.0 : x[x.size() / 2]; };
        const double span = pt[3].back();
        double busy = 0;
        for (int c = 0; c < n; c++)
            if (h[c * F] && h[c * F + 3]) busy += (h[c * F + 3] - h[c * F]) / 1e3;
        /* per SM: mean and range of its CTAs' steps-done times */
        std::vector<double> sum(1024, 0), lo(1024, 1e30), hi(1024, -1e30);
        std::vector<int> cnt(1024, 0);
        for (int c = 0; c < n; c++)
            if (h[c * F] && h[c * F + 2] && h[c * F + 4] < 1024) {
                const int sm = (int)h[c * F + 4];
                const double t = (h[c * F + 2] - t0) / 1e3;
                sum[sm] += t, cnt[sm]++, lo[sm] = std::min(lo[sm], t), hi[sm] = std::max(hi[sm], t);
            }
        std::vector<double> sm_t, cur(1024, -1), cta(n, -1);
        std::vector<unsigned long long> smid(n, ~0ull);
        double within = 0;
        for (int sm = 0; sm < 1024; sm++)
            if (cnt[sm]) sm_t.push_back(cur[sm] = sum[sm] / cnt[sm]), within += hi[sm] - lo[sm];
        within /= (double)std::max<size_t>(sm_t.size(), 1);
        int moved = 0, seen = 0;
        for (int c = 0; c < n; c++)
            if (h[c * F] && h[c * F + 2]) {
                cta[c] = (h[c * F + 2] - t0) / 1e3, smid[c] = h[c * F + 4];
                if (!prev_smid.empty() && prev_smid[c] != ~0ull) seen++, moved += prev_smid[c] != smid[c];
            }
        if (!prev_sm.empty()) {
            v[13].push_back(pearson(cur, prev_sm));
            v[14].push_back(pearson(cta, prev_cta));
            v[15].push_back(seen ? 100.0 * moved / seen : 0.0);
        }
        prev_sm = cur, prev_cta = cta, prev_smid = smid;
        /* steps-done time by the CTA's rank of entry on its SM and by blockIdx / (the SMs that ran a CTA);
        ** CTAs with no steps leave no steps-done stamp and are not ranked */
        {
            std::vector<std::vector<std::pair<double, int>>> on(1024);
            for (int c = 0; c < n; c++)
                if (h[c * F] && h[c * F + 2] && h[c * F + 4] < 1024) on[h[c * F + 4]].push_back({(h[c * F] - t0) / 1e3, c});
            int nsm = 0;
            for (auto &o : on) nsm += !o.empty();
            double rs[8] = {0}, bs[8] = {0};
            int rc[8] = {0}, bc[8] = {0};
            for (auto &o : on) {
                std::sort(o.begin(), o.end());
                for (size_t k = 0; k < o.size() && k < 8; k++) {
                    const int c = o[k].second;
                    const double t = (h[c * F + 2] - t0) / 1e3;
                    rs[k] += t, rc[k]++;
                    const int b = nsm ? (c % (n / 2)) / nsm : 0; /* W2 stamps the upper half */
                    if (b < 8) bs[b] += t, bc[b]++;
                }
            }
            for (int k = 0; k < 8; k++) { /* only ranks present in this launch (no zeros in the medians) */
                if (rc[k]) rank_t[k].push_back(rs[k] / rc[k]);
                if (bc[k]) blk_t[k].push_back(bs[k] / bc[k]);
            }
        }
        if (sm_t.empty()) continue;
        std::sort(sm_t.begin(), sm_t.end());
        const double vals[13] = {pt[0].back(), med(pt[1]), pt[2].empty() ? 0 : pt[2].front(), med(pt[2]),
                                 pt[2].empty() ? 0 : pt[2].back(), pt[3].front(), pt[3].back(), span,
                                 100.0 * (1.0 - busy / (span * (double)pt[0].size())),
                                 sm_t.front(), med(sm_t), sm_t.back(), within};
        for (int q = 0; q < 13; q++) v[q].push_back(vals[q]);
    }
    double m[16] = {0};
    for (size_t q = 0; q < v.size(); q++) std::sort(v[q].begin(), v[q].end()), m[q] = v[q].empty() ? 0 : v[q][v[q].size() / 2];
    printf("%-12s trace %-26s rows %-5d last entry %.1f | first stage %.1f | steps done %.1f / %.1f / %.1f | exit %.1f .. %.1f us"
           " | idle %.1f%% of CTA-time\n", model, what, rows, m[0], m[1], m[2], m[3], m[4], m[5], m[6], m[8]);
    printf("%-12s trace %-26s rows %-5d per SM steps done %.1f / %.1f / %.1f us | spread within an SM %.1f us"
           " | launch to launch: correlation per SM %.2f, per CTA %.2f, CTAs on another SM %.0f%%\n", model, what, rows,
           m[9], m[10], m[11], m[12], m[13], m[14], m[15]);
    printf("%-12s trace %-26s rows %-5d steps done by entry rank on the SM:", model, what, rows);
    for (int k = 0; k < 8; k++) {
        std::sort(rank_t[k].begin(), rank_t[k].end());
        if (!rank_t[k].empty() && rank_t[k][rank_t[k].size() / 2] > 0) printf(" %.1f", rank_t[k][rank_t[k].size() / 2]);
    }
    printf(" | by blockIdx / SMs:");
    for (int k = 0; k < 8; k++) {
        std::sort(blk_t[k].begin(), blk_t[k].end());
        if (!blk_t[k].empty() && blk_t[k][blk_t[k].size() / 2] > 0) printf(" %.1f", blk_t[k][blk_t[k].size() / 2]);
    }
    printf(" us\n");
}
#endif

/* fp8 activations as dispatch delivers them: the bf16 rows x [E, M, K] cast by the library's
** 1x128 group cast into q with f32 M-major scales, one slab an expert. (Random bytes masked to
** small positive values, the fill until 2026-12-01, ran W13 + W2 1.5-4.5% faster at 32-1024
** rows than these, and cuBLASLt FP8 up to 2% faster at 1024; the same at 1-8 rows. H200,
** 2026-12-02: most likely the tensor cores' power, the clock not measured.) */
static void quantize_rows(const __nv_bfloat16 *x, int E, int64_t M, int64_t K, uint8_t *q, float *sa) {
    const size_t slab = epmoe_scale_bytes(EPMOE_SCALE_F32_MMAJOR, M, K);
    for (int e = 0; e < E; e++)
        EP(epmoe_cast_group_fp8_cuda(reinterpret_cast<const uint16_t *>(x) + (size_t)e * M * K, M, K, q + (size_t)e * M * K,
                                     reinterpret_cast<uint8_t *>(sa) + (size_t)e * slab, EPMOE_SCALE_F32_MMAJOR, 0, stream));
}

static void run_model(Blas &b, const char *model, int E, int H, int I, const std::vector<int> &rows_list) {
    const int N1 = 2 * I, K1 = H, N2 = H, K2 = I;
    size_t q13, s13, q2, s2;
    EP(epmoe_w4a8_repack_size(E, N1, K1, &q13, &s13));
    EP(epmoe_w4a8_repack_size(E, N2, K2, &q2, &s2));
    uint8_t *w13, *w2;
    __nv_bfloat16 *sw13, *sw2;
    CU(cudaMalloc(&w13, q13));
    CU(cudaMalloc(&w2, q2));
    CU(cudaMalloc(&sw13, s13));
    CU(cudaMalloc(&sw2, s2));
    fill_bytes<<<1024, 256, 0, stream>>>(w13, q13, 1, 0xFF);
    fill_bytes<<<1024, 256, 0, stream>>>(w2, q2, 2, 0xFF);
    fill_range<<<1024, 256, 0, stream>>>(sw13, s13 / 2, 0.5f, 1.0f);
    fill_range<<<1024, 256, 0, stream>>>(sw2, s2 / 2, 0.5f, 1.0f);
    const epmoe_w4a8_weights W13 = {E, N1, K1, EPMOE_W4_SYM7, w13, reinterpret_cast<const uint16_t *>(sw13)},
                             W2 = {E, N2, K2, EPMOE_W4_SYM7, w2, reinterpret_cast<const uint16_t *>(sw2)};
    const double wb13 = (double)(q13 + s13), wb2 = (double)(q2 + s2); /* the bytes the kernel reads */
    /* baselines' weights: fp8 and bf16 copies of the same shapes (values irrelevant to speed) */
    uint8_t *f13, *f2;
    __nv_bfloat16 *b13, *b2;
    CU(cudaMalloc(&f13, (size_t)E * N1 * K1));
    CU(cudaMalloc(&f2, (size_t)E * N2 * K2));
    CU(cudaMalloc(&b13, (size_t)E * N1 * K1 * 2));
    CU(cudaMalloc(&b2, (size_t)E * N2 * K2 * 2));
    fill_bf16<<<1024, 256, 0, stream>>>(b13, (size_t)E * N1 * K1);
    fill_bf16<<<1024, 256, 0, stream>>>(b2, (size_t)E * N2 * K2);
    float *wscale; /* the fp8 copies: the bf16 values (|x| <= 1) at scale 1/448, so every fp8 binade is used */
    const float inv448 = 1.0f / 448.0f;
    CU(cudaMalloc(&wscale, 4));
    CU(cudaMemcpy(wscale, &inv448, 4, cudaMemcpyHostToDevice));
    EP(epmoe_cast_tensor_fp8_cuda(reinterpret_cast<const uint16_t *>(b13), (int64_t)E * N1 * K1, wscale, f13, stream));
    EP(epmoe_cast_tensor_fp8_cuda(reinterpret_cast<const uint16_t *>(b2), (int64_t)E * N2 * K2, wscale, f2, stream));

    /* scales for the other schemes' weights (values irrelevant to speed): int4 g32 needs the most */
    float *xsc;
    const size_t xsc_n = (size_t)E * (N1 > N2 ? N1 : N2) * (K1 > K2 ? K1 : K2) / 32;
    CU(cudaMalloc(&xsc, xsc_n * 4));
    fill_range<<<1024, 256, 0, stream>>>(xsc, xsc_n, 1e-3f, 1e-3f);
    for (int rows : rows_list) {
        const int M = rows;
        uint8_t *a, *a2;
        float *sa;
        __nv_bfloat16 *xb, *xb2, *ob;
        uint16_t *out;
        int32_t *masked;
        void *ws;
        const size_t wsb = epmoe_w4a8_mlp_workspace(E, M, H, I);
        CU(cudaMalloc(&a, (size_t)E * M * H));
        CU(cudaMalloc(&a2, (size_t)E * M * I));
        CU(cudaMalloc(&sa, epmoe_scale_bytes(EPMOE_SCALE_F32_MMAJOR, M, H) * E));
        CU(cudaMalloc(&xb, (size_t)E * M * H * 2));
        CU(cudaMalloc(&xb2, (size_t)E * M * I * 2));
        const int NMAX = N1 > N2 ? N1 : N2;
        CU(cudaMalloc(&ob, (size_t)E * M * NMAX * 2));
        CU(cudaMalloc(&out, (size_t)E * M * NMAX * 2));
        CU(cudaMalloc(&masked, E * 4));
        CU(cudaMalloc(&ws, wsb));
        fill_bf16<<<1024, 256, 0, stream>>>(xb, (size_t)E * M * H);
        fill_bf16<<<1024, 256, 0, stream>>>(xb2, (size_t)E * M * I);
        /* GEMM2's input scales: the same per-token group layout, I/128 groups */
        float *sa2;
        CU(cudaMalloc(&sa2, epmoe_scale_bytes(EPMOE_SCALE_F32_MMAJOR, M, I) * E));
        quantize_rows(xb, E, M, H, a, sa);
        quantize_rows(xb2, E, M, I, a2, sa2);
        std::vector<int32_t> hm_rows(E, rows);
        CU(cudaMemcpy(masked, hm_rows.data(), E * 4, cudaMemcpyHostToDevice));
        CU(cudaDeviceSynchronize()); /* the copy and the fills on `stream` both landed */

        const float one = 1.0f;
        float *done;
        CU(cudaMalloc(&done, 4));
        CU(cudaMemcpy(done, &one, 4, cudaMemcpyHostToDevice));

        const size_t gwsb = epmoe_w4a8_gemm_workspace();
        void *gws;
        CU(cudaMalloc(&gws, gwsb));
        CU(cudaMemset(gws, 0, gwsb));
        CU(cudaMemset(ws, 0, wsb));
        epmoe_w4a8_gemm_args g1 = {W13, a, M, masked, sa, EPMOE_SCALE_F32_MMAJOR, NULL, out, N1, (int64_t)M * N1, rows, gws, gwsb};
        epmoe_w4a8_gemm_args g2 = {W2, a2, M, masked, sa2, EPMOE_SCALE_F32_MMAJOR, NULL, out, N2, (int64_t)M * N2, rows, gws, gwsb};
        epmoe_w4a8_gemm_args g1b = g1;
        g1b.a_scales = NULL, g1b.a_tensor_scale = done;
        epmoe_w4a8_mlp_args mlp = {W13, W2, a, M, masked, sa, EPMOE_SCALE_F32_MMAJOR, NULL, NULL, ws, wsb, out, H,
                                   (int64_t)M * H, rows};
        /* 55 warm-ups (~10 ms at decode), not 5: the first timed GEMM after the weights' setup (host
        ** work, the GPU idle) measured up to 10% slow with 5 (Kimi-K2, 1 row) */
        const double t1 = time_us([&] { EP(epmoe_w4a8_gemm_cuda(&g1, stream)); }, 55);
        const double t2 = time_us([&] { EP(epmoe_w4a8_gemm_cuda(&g2, stream)); });
        const double t1b = time_us([&] { EP(epmoe_w4a8_gemm_cuda(&g1b, stream)); });
        const double tm = time_us([&] { EP(epmoe_w4a8_mlp_cuda(&mlp, stream)); });
        /* the two GEMMs back to back in one timed call: W13 + W2 as a sequence, without silu_mul */
        const double tp = time_us([&] { EP(epmoe_w4a8_gemm_cuda(&g1, stream)); EP(epmoe_w4a8_gemm_cuda(&g2, stream)); });
        /* the bound on overlapping the two GEMMs (a fused or pipelined MLP): W2 on independent inputs,
        ** its own workspace and output, on a second stream forked from and joined to the timed one */
        void *gws2;
        CU(cudaMalloc(&gws2, gwsb));
        CU(cudaMemset(gws2, 0, gwsb));
        epmoe_w4a8_gemm_args g2c = g2;
        g2c.workspace = gws2, g2c.out = reinterpret_cast<uint16_t *>(ob);
        const double tc = time_us([&] {
            CU(cudaEventRecord(fork_ev, stream));
            CU(cudaStreamWaitEvent(stream2, fork_ev, 0));
            EP(epmoe_w4a8_gemm_cuda(&g1, stream));
            EP(epmoe_w4a8_gemm_cuda(&g2c, stream2));
            CU(cudaEventRecord(join_ev, stream2));
            CU(cudaStreamWaitEvent(stream, join_ev, 0));
        });
        CU(cudaStreamSynchronize(stream));
        CU(cudaFree(gws2));
        CU(cudaMemsetAsync(masked, 0, E * 4, stream)); /* rows 0 for the host cost, then back */
        const double hg = host_us([&] { EP(epmoe_w4a8_gemm_cuda(&g1, stream)); });
        const double hmlp = host_us([&] { EP(epmoe_w4a8_mlp_cuda(&mlp, stream)); });
        CU(cudaMemcpyAsync(masked, hm_rows.data(), E * 4, cudaMemcpyHostToDevice, stream));
#ifdef EPMOE_W4A8_TRACE
        trace_gemm(model, "W13 (group scales)", rows, &g1);
        trace_gemm(model, "W2 (group scales)", rows, &g2);
        trace_mlp(model, rows, &mlp);
#endif
        report(model, "w4a8 W13 (group scales)", E, rows, N1, K1, t1, wb13);
        report(model, "w4a8 W13 (per-tensor)", E, rows, N1, K1, t1b, wb13);
        report(model, "w4a8 W2 (group scales)", E, rows, N2, K2, t2, wb2);
        report(model, "w4a8 W13+W2", E, rows, N1 + N2, 0, t1 + t2, wb13 + wb2);
        report(model, "w4a8 W13 then W2", E, rows, N1 + N2, 0, tp, wb13 + wb2);
        report(model, "w4a8 W13 | W2 (2 streams)", E, rows, N1 + N2, 0, tc, wb13 + wb2);
        report(model, "w4a8 MLP (one call)", E, rows, N1 + N2, 0, tm, wb13 + wb2);
        printf("%-12s rows %-5d host us per call: GEMM %.1f, MLP %.1f\n", model, rows, hg, hmlp);
        /* the anchors in both forms: per expert in a graph ("cuBLASLt FP8 W13"), and one strided-batched
        ** call ("... batched ..."); the ratios take the faster form of each GEMM */
        auto best = [](double x, double y) { return x <= 0 ? y : y <= 0 ? x : std::min(x, y); };
        const double fg1 = bench_fp8(b, E, rows, N1, K1, f13, a, ob, false), fg2 = bench_fp8(b, E, rows, N2, K2, f2, a2, ob, false);
        const double fb1 = bench_fp8(b, E, rows, N1, K1, f13, a, ob, true), fb2 = bench_fp8(b, E, rows, N2, K2, f2, a2, ob, true);
        const double hg1 = bench_bf16(b, E, rows, N1, K1, b13, xb, ob, false), hg2 = bench_bf16(b, E, rows, N2, K2, b2, xb2, ob, false);
        const double hb1 = bench_bf16(b, E, rows, N1, K1, b13, xb, ob, true), hb2 = bench_bf16(b, E, rows, N2, K2, b2, xb2, ob, true);
        const struct { const char *what; double g1, g2; double bytes; } anchors[] = {
            {"cuBLASLt FP8", fg1, fg2, 1.0}, {"cuBLASLt FP8 batched", fb1, fb2, 1.0},
            {"cuBLAS BF16", hg1, hg2, 2.0}, {"cuBLAS BF16 batched", hb1, hb2, 2.0}};
        char what[64];
        for (const auto &an : anchors) {
            snprintf(what, sizeof what, "%s W13", an.what);
            report(model, what, E, rows, N1, K1, an.g1, an.bytes * E * N1 * K1);
            snprintf(what, sizeof what, "%s W2", an.what);
            report(model, what, E, rows, N2, K2, an.g2, an.bytes * E * N2 * K2);
            snprintf(what, sizeof what, "%s W13+W2", an.what);
            if (an.g1 > 0 && an.g2 > 0) report(model, what, E, rows, N1 + N2, 0, an.g1 + an.g2, an.bytes * E * (N1 * K1 + N2 * K2));
        }
        const double f1 = best(fg1, fb1), f2t = best(fg2, fb2), h1 = best(hg1, hb1), h2 = best(hg2, hb2);
        printf("%-12s rows %-5d W13+W2: w4a8 %.1f us | FP8 %.2fx slower | BF16 %.2fx slower (each the faster form)\n", model, rows,
               t1 + t2, (f1 + f2t) / (t1 + t2), (h1 + h2) / (t1 + t2));
        /* the other schemes' expert GEMMs (epmoe_expert_gemm_cuda) on the same shapes and buffers */
        const struct { epmoe_weight_format f; int64_t group; const char *name; double bpw; } xs[] = {
            {EPMOE_WEIGHT_BF16, 0, "bf16", 2.0}, {EPMOE_WEIGHT_FP8_BLOCK, 0, "fp8-block", 1.0},
            {EPMOE_WEIGHT_INT4, 128, "w4a16 g128", 0.5}, {EPMOE_WEIGHT_INT4, 32, "w4a16 g32", 0.5}};
        for (const auto &x : xs) {
            const void *d13 = x.f == EPMOE_WEIGHT_BF16 ? (const void *)b13 : x.f == EPMOE_WEIGHT_FP8_BLOCK ? (const void *)f13 : w13;
            const void *d2 = x.f == EPMOE_WEIGHT_BF16 ? (const void *)b2 : x.f == EPMOE_WEIGHT_FP8_BLOCK ? (const void *)f2 : w2;
            const int fp8 = x.f == EPMOE_WEIGHT_FP8_BLOCK;
            const epmoe_expert_weights X13 = {x.f, E, N1, K1, x.group, d13, xsc}, X2 = {x.f, E, N2, K2, x.group, d2, xsc};
            const epmoe_expert_gemm_args e1 = {X13, fp8 ? (const void *)a : xb, M, masked, fp8 ? sa : NULL,
                                               EPMOE_SCALE_F32_MMAJOR, out, N1, (int64_t)M * N1, rows};
            const epmoe_expert_gemm_args e2 = {X2, fp8 ? (const void *)a2 : xb2, M, masked, fp8 ? sa2 : NULL,
                                               EPMOE_SCALE_F32_MMAJOR, out, N2, (int64_t)M * N2, rows};
            const double u1 = time_us([&] { EP(epmoe_expert_gemm_cuda(&e1, stream)); });
            const double u2 = time_us([&] { EP(epmoe_expert_gemm_cuda(&e2, stream)); });
            const int64_t gr = x.f == EPMOE_WEIGHT_INT4 ? x.group : 128 * (x.f == EPMOE_WEIGHT_FP8_BLOCK ? 128 : 0);
            const double sb13 = gr ? 4.0 * E * N1 * K1 / gr : 0, sb2 = gr ? 4.0 * E * N2 * K2 / gr : 0;
            snprintf(what, sizeof what, "%s W13", x.name);
            report(model, what, E, rows, N1, K1, u1, x.bpw * E * N1 * K1 + sb13);
            snprintf(what, sizeof what, "%s W2", x.name);
            report(model, what, E, rows, N2, K2, u2, x.bpw * E * N2 * K2 + sb2);
            snprintf(what, sizeof what, "%s W13+W2", x.name);
            report(model, what, E, rows, N1 + N2, 0, u1 + u2, x.bpw * E * (N1 * K1 + N2 * K2) + sb13 + sb2);
            const double base = x.f == EPMOE_WEIGHT_BF16 ? h1 + h2 : f1 + f2t;
            printf("%-12s rows %-5d W13+W2: %s %.1f us | %s %.2fx slower\n", model, rows, x.name, u1 + u2,
                   x.f == EPMOE_WEIGHT_BF16 ? "cuBLAS BF16" : "cuBLASLt FP8", base / (u1 + u2));
        }
        cudaFree(a), cudaFree(a2), cudaFree(sa), cudaFree(sa2), cudaFree(xb), cudaFree(xb2), cudaFree(ob), cudaFree(out);
        cudaFree(masked), cudaFree(ws), cudaFree(done), cudaFree(gws);
    }
    cudaFree(w13), cudaFree(w2), cudaFree(sw13), cudaFree(sw2), cudaFree(f13), cudaFree(f2), cudaFree(b13), cudaFree(b2);
    cudaFree(xsc), cudaFree(wscale);
}

int main(int argc, char **argv) {
    const char *model = "all", *json = NULL, *rows_arg = "1,8,32,64,128,256,1024";
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--model") && i + 1 < argc) model = argv[++i];
        else if (!strcmp(argv[i], "--rows") && i + 1 < argc) rows_arg = argv[++i];
        else if (!strcmp(argv[i], "--json") && i + 1 < argc) json = argv[++i];
        else if (!strcmp(argv[i], "--host-in-timing")) hold = false;
        else {
            printf("usage: %s [--model deepseek-r1|kimi-k2|all] [--rows 1,8,32,...] [--json FILE] [--host-in-timing]\n",
                   argv[0]);
            return strcmp(argv[i], "--help") ? 1 : 0;
        }
    }
    std::vector<int> rows;
    for (const char *p = rows_arg; *p;) {
        rows.push_back(atoi(p));
        while (*p && *p != ',') p++;
        if (*p) p++;
    }
    CU(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    CU(cudaStreamCreateWithFlags(&stream2, cudaStreamNonBlocking));
    CU(cudaEventCreateWithFlags(&fork_ev, cudaEventDisableTiming));
    CU(cudaEventCreateWithFlags(&join_ev, cudaEventDisableTiming));
    cudaDeviceProp prop;
    CU(cudaGetDeviceProperties(&prop, 0));
    const double ceiling = hbm_read_ceiling();
    printf("bench_w4a8 on %s: HBM read ceiling %.0f GB/s (streaming read of 4 GiB, same run); host launch cost %s\n",
           prop.name, ceiling, hold ? "hidden (spin ahead)" : "in the timing");
    Blas b;
    cublasCreate(&b.h);
    cublasLtCreate(&b.lt);
    CU(cudaMalloc(&b.ws, b.ws_bytes));
    cublasSetStream(b.h, stream);
    cublasSetWorkspace(b.h, b.ws, b.ws_bytes);
    if (!strcmp(model, "all") || !strcmp(model, "deepseek-r1")) run_model(b, "deepseek-r1", 32, 7168, 2048, rows);
    if (!strcmp(model, "all") || !strcmp(model, "kimi-k2")) run_model(b, "kimi-k2", 48, 7168, 2048, rows);
    if (json) {
        FILE *f = fopen(json, "w");
        if (f) {
            fprintf(f, "{\"gpu\": \"%s\", \"hbm_read_gbs\": %.1f, \"results\": [\n", prop.name, ceiling);
            for (size_t i = 0; i < results.size(); i++) {
                const Row &r = results[i];
                fprintf(f, "  {\"model\": \"%s\", \"what\": \"%s\", \"E\": %d, \"rows\": %d, \"N\": %d, \"K\": %d, \"us\": %.2f, "
                           "\"gbs\": %.1f, \"tflops\": %.1f}%s\n",
                        r.model, r.what.c_str(), r.E, r.rows, r.N, r.K, r.us, r.gbs, r.tflops, i + 1 < results.size() ? "," : "");
            }
            fprintf(f, "]}\n");
            fclose(f);
        }
    }
    return 0;
}
