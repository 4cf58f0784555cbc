/*
** rescale_lab.cu — kernel lab for the masked FP8 requant (llm.c-style: variants, each checked
** against the CPU reference, then timed). Not part of the library; the winner goes to
** src/cuda/rescale.cu.
**
**   v0  the library kernel (epmoe_requant_fp8_cuda)
**   v1  flat prefix-sum mapping, 32-byte units, unroll 4
**   v2  flat prefix-sum mapping, 16-byte units, unroll 8
**   v3  expert grid (blockIdx.y = expert, no scan), 32-byte units, unroll 2
**   copy  a plain 16-byte copy of the same number of bytes: the floor at this size
** Timing: L2 flushed (256 MB memset) before every repeat, CUDA events, median of 100.
** Build: make dev-labs; run: ./build/dev/rescale_lab
*/
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../../src/cuda/common.cuh"

#define CK(x)                                                                                                          \
    do {                                                                                                               \
        cudaError_t e_ = (x);                                                                                          \
        if (e_ != cudaSuccess) {                                                                                       \
            printf("CUDA %s at %d\n", cudaGetErrorString(e_), __LINE__);                                              \
            exit(1);                                                                                                   \
        }                                                                                                              \
    } while (0)

constexpr int kThreads = 256;

template <int kFmt>
__device__ __forceinline__ float lab_scale(const uint8_t *slab, int M, int G, int t, int g) {
    const uint8_t *p = slab + fmt_scale_offset(kFmt, M, G, t, g);
    if (fmt_scale_is_ue8m0(kFmt)) return fmt_ue8m0_to_float(__ldg(p));
    return __ldg(reinterpret_cast<const float *>(p));
}

__device__ __forceinline__ uint32_t rq_word(uint32_t w, float s, float inv) {
    const float2 a = fp8x2_to_float(w), b = fp8x2_to_float(w >> 16);
    return fp8x2_from_float(__fmul_rn(__fmul_rn(a.x, s), inv), __fmul_rn(__fmul_rn(a.y, s), inv)) |
           (fp8x2_from_float(__fmul_rn(__fmul_rn(b.x, s), inv), __fmul_rn(__fmul_rn(b.y, s), inv)) << 16);
}

__device__ __forceinline__ uint4 rq_vec(uint4 v, float s, float inv) {
    return make_uint4(rq_word(v.x, s, inv), rq_word(v.y, s, inv), rq_word(v.z, s, inv), rq_word(v.w, s, inv));
}

__device__ void lab_scan(const int32_t *masked_m, int E, int M, int *prefix) {
    __shared__ int ws[kThreads / 32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int running = 0;
    if (threadIdx.x == 0) prefix[0] = 0;
    for (int base = 0; base < E; base += kThreads) {
        const int e = base + threadIdx.x;
        int v = e < E ? min(max(__ldg(masked_m + e), 0), M) : 0;
        for (int off = 1; off < 32; off <<= 1) {
            int u = __shfl_up_sync(~0u, v, off);
            if (lane >= off) v += u;
        }
        if (lane == 31) ws[warp] = v;
        __syncthreads();
        int before = 0, total = 0;
        for (int w = 0; w < kThreads / 32; w++) before += w < warp ? ws[w] : 0, total += ws[w];
        if (e < E) prefix[e + 1] = running + before + v;
        running += total;
        __syncthreads();
    }
    __syncthreads();
}

__device__ __forceinline__ int lab_owner(const int *prefix, int E, int row) {
    int lo = 0, hi = E - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (prefix[mid] <= row) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

/* Flat mapping: units of kVecs x 16 bytes over the live rows of all experts. */
template <int kFmt, int kVecs, int kUnroll>
__global__ void __launch_bounds__(kThreads, 4) flat_kernel(const uint4 *q, const uint8_t *scales, const int32_t *masked_m,
                                                           int E, int M, int K, const float *out_scale, uint4 *y) {
    extern __shared__ int prefix[];
    lab_scan(masked_m, E, M, prefix);
    const float inv = 1.0f / __ldg(out_scale);
    const int G = K / 128, upr = K / (16 * kVecs);
    const int64_t slab = fmt_scale_slab_bytes(kFmt, M, G);
    const uint32_t units = (uint32_t)prefix[E] * upr, stride = gridDim.x * kThreads;
    for (uint32_t u0 = blockIdx.x * kThreads + threadIdx.x; u0 < units; u0 += stride * kUnroll) {
        uint4 in[kUnroll][kVecs];
        float s[kUnroll];
        int64_t off[kUnroll];
#pragma unroll
        for (int j = 0; j < kUnroll; j++) {
            const uint32_t u = u0 + j * stride;
            off[j] = -1;
            if (u < units) {
                const int row = u / upr, c = u - row * upr;
                const int e = lab_owner(prefix, E, row), t = row - prefix[e];
                off[j] = (((int64_t)e * M + t) * K) / 16 + c * kVecs;
#pragma unroll
                for (int v = 0; v < kVecs; v++) in[j][v] = __ldcs(q + off[j] + v);
                s[j] = lab_scale<kFmt>(scales + e * slab, M, G, t, c * kVecs / 8);
            }
        }
#pragma unroll
        for (int j = 0; j < kUnroll; j++)
            if (off[j] >= 0)
#pragma unroll
                for (int v = 0; v < kVecs; v++) __stcs(y + off[j] + v, rq_vec(in[j][v], s[j], inv));
    }
}

/* Expert grid: blockIdx.y is the expert; no scan, one masked_m load per block. */
template <int kFmt, int kVecs, int kUnroll>
__global__ void __launch_bounds__(kThreads, 4) expert_kernel(const uint4 *q, const uint8_t *scales,
                                                             const int32_t *masked_m, int E, int M, int K,
                                                             const float *out_scale, uint4 *y) {
    const int e = blockIdx.y;
    const int rows = min(max(__ldg(masked_m + e), 0), M);
    const float inv = 1.0f / __ldg(out_scale);
    const int G = K / 128, upr = K / (16 * kVecs);
    const uint8_t *slab = scales + e * fmt_scale_slab_bytes(kFmt, M, G);
    const uint4 *qe = q + (int64_t)e * M * K / 16;
    uint4 *ye = y + (int64_t)e * M * K / 16;
    const uint32_t units = (uint32_t)rows * upr, stride = gridDim.x * kThreads;
    for (uint32_t u0 = blockIdx.x * kThreads + threadIdx.x; u0 < units; u0 += stride * kUnroll) {
        uint4 in[kUnroll][kVecs];
        float s[kUnroll];
        int64_t off[kUnroll];
#pragma unroll
        for (int j = 0; j < kUnroll; j++) {
            const uint32_t u = u0 + j * stride;
            off[j] = -1;
            if (u < units) {
                const int t = u / upr, c = u - t * upr;
                off[j] = (int64_t)t * K / 16 + c * kVecs;
#pragma unroll
                for (int v = 0; v < kVecs; v++) in[j][v] = __ldcs(qe + off[j] + v);
                s[j] = lab_scale<kFmt>(slab, M, G, t, c * kVecs / 8);
            }
        }
#pragma unroll
        for (int j = 0; j < kUnroll; j++)
            if (off[j] >= 0)
#pragma unroll
                for (int v = 0; v < kVecs; v++) __stcs(ye + off[j] + v, rq_vec(in[j][v], s[j], inv));
    }
}

__global__ void copy_kernel(const uint4 *a, uint4 *b, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        __stcs(b + i, __ldcs(a + i));
}

struct Case {
    const char *name;
    int E, M, K, fmt;
    std::vector<int32_t> masked;
};

static float median(std::vector<float> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

template <class F> static float time_it(F launch, void *flush) {
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    std::vector<float> ts;
    for (int i = 0; i < 110; i++) {
        CK(cudaMemsetAsync(flush, i, 256 << 20));
        CK(cudaEventRecord(a));
        launch();
        CK(cudaEventRecord(b));
        CK(cudaEventSynchronize(b));
        float ms;
        CK(cudaEventElapsedTime(&ms, a, b));
        if (i >= 10) ts.push_back(ms * 1000.0f);
    }
    CK(cudaGetLastError());
    return median(ts);
}

int main() {
    int sms;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    void *flush;
    CK(cudaMalloc(&flush, 256 << 20));
    std::vector<Case> cases;
    srand(1);
    std::vector<int32_t> ds(32);
    for (int t = 0; t < 1024 * 8; t++) { /* 1024 tokens x top-8 of 256 experts; we own 32 */
        int e = rand() % 256;
        if (e < 32) ds[e]++;
    }
    cases.push_back({"ds_r1_ep8_decode", 32, 1024, 7168, 1, ds});
    cases.push_back({"full_32x1024", 32, 1024, 7168, 0, std::vector<int32_t>(32, 1024)});
    std::vector<int32_t> skew(32, 1);
    skew[3] = 1000;
    cases.push_back({"skewed_one_hot_expert", 32, 1024, 7168, 1, skew});
    printf("%-22s %6s %-28s %9s %8s %6s\n", "case", "rows", "variant", "us", "GB/s", "ok");
    for (auto &c : cases) {
        const size_t n = (size_t)c.E * c.M * c.K, slab = epmoe_scale_bytes((epmoe_scale_fmt)c.fmt, c.M, c.K);
        std::vector<uint8_t> q(n), s(c.E * slab), ref(n, 0x55), out(n);
        for (size_t i = 0; i < n; i++) q[i] = (uint8_t)(rand() & 0xFF) & 0xF7; /* avoid NaN codes */
        for (size_t i = 0; i < c.E * slab / 4; i++) ((float *)s.data())[i] = 0.001f + (rand() % 1000) * 1e-5f;
        const float osc = 0.02f;
        epmoe_requant_fp8_ref(q.data(), s.data(), (epmoe_scale_fmt)c.fmt, c.masked.data(), c.E, c.M, c.K, &osc, ref.data());
        uint8_t *dq, *ds_, *dy, *dc;
        int32_t *dm;
        float *dsc;
        CK(cudaMalloc(&dq, n));
        CK(cudaMalloc(&dy, n));
        CK(cudaMalloc(&dc, n));
        CK(cudaMalloc(&ds_, c.E * slab));
        CK(cudaMalloc(&dm, c.E * 4));
        CK(cudaMalloc(&dsc, 4));
        CK(cudaMemcpy(dq, q.data(), n, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(ds_, s.data(), c.E * slab, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(dm, c.masked.data(), c.E * 4, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(dsc, &osc, 4, cudaMemcpyHostToDevice));
        int64_t rows = 0;
        for (int e = 0; e < c.E; e++) rows += std::min(std::max(c.masked[e], 0), c.M);
        const double bytes = (double)rows * c.K * 2 + rows * (c.K / 128) * 4 + c.E * 4;
        const size_t smem = (c.E + 1) * 4;
        const unsigned blocks = sms * 4;
        auto report = [&](const char *name, float us, bool check) {
            bool ok = true;
            if (check) {
                CK(cudaMemcpy(out.data(), dy, n, cudaMemcpyDeviceToHost));
                ok = out == ref;
            }
            printf("%-22s %6lld %-28s %9.2f %8.0f %6s\n", c.name, (long long)rows, name, us, bytes / us / 1e3,
                   check ? (ok ? "yes" : "NO") : "-");
        };
        auto reset = [&] { CK(cudaMemset(dy, 0x55, n)); };
#define LAB(label, launch)                                                                                              \
    do {                                                                                                               \
        reset();                                                                                                       \
        launch;                                                                                                        \
        CK(cudaDeviceSynchronize());                                                                                   \
        bool ok_ = true;                                                                                               \
        CK(cudaMemcpy(out.data(), dy, n, cudaMemcpyDeviceToHost));                                                     \
        ok_ = out == ref;                                                                                              \
        float us_ = time_it([&] { launch; }, flush);                                                                   \
        printf("%-22s %6lld %-28s %9.2f %8.0f %6s\n", c.name, (long long)rows, label, us_, bytes / us_ / 1e3,         \
               ok_ ? "yes" : "NO");                                                                                    \
    } while (0)
        const uint4 *qv = (const uint4 *)dq;
        uint4 *yv = (uint4 *)dy;
        if (c.fmt == 1) {
            LAB("v0 library", epmoe_requant_fp8_cuda(dq, ds_, EPMOE_SCALE_F32_MMAJOR, dm, c.E, c.M, c.K, dsc, dy, 0));
            LAB("v1 flat 32B x4", (flat_kernel<1, 2, 4><<<blocks, kThreads, smem>>>(qv, ds_, dm, c.E, c.M, c.K, dsc, yv)));
            LAB("v2 flat 16B x8", (flat_kernel<1, 1, 8><<<blocks, kThreads, smem>>>(qv, ds_, dm, c.E, c.M, c.K, dsc, yv)));
            LAB("v3 expert-grid 32B x2",
                (expert_kernel<1, 2, 2><<<dim3((blocks + c.E - 1) / c.E, c.E), kThreads>>>(qv, ds_, dm, c.E, c.M, c.K, dsc, yv)));
            LAB("v3b expert-grid 16B x4",
                (expert_kernel<1, 1, 4><<<dim3(2 * (blocks + c.E - 1) / c.E, c.E), kThreads>>>(qv, ds_, dm, c.E, c.M, c.K, dsc, yv)));
        } else {
            LAB("v0 library", epmoe_requant_fp8_cuda(dq, ds_, EPMOE_SCALE_F32_ROW, dm, c.E, c.M, c.K, dsc, dy, 0));
            LAB("v1 flat 32B x4", (flat_kernel<0, 2, 4><<<blocks, kThreads, smem>>>(qv, ds_, dm, c.E, c.M, c.K, dsc, yv)));
            LAB("v2 flat 16B x8", (flat_kernel<0, 1, 8><<<blocks, kThreads, smem>>>(qv, ds_, dm, c.E, c.M, c.K, dsc, yv)));
            LAB("v3 expert-grid 32B x2",
                (expert_kernel<0, 2, 2><<<dim3((blocks + c.E - 1) / c.E, c.E), kThreads>>>(qv, ds_, dm, c.E, c.M, c.K, dsc, yv)));
            LAB("v3b expert-grid 16B x4",
                (expert_kernel<0, 1, 4><<<dim3(2 * (blocks + c.E - 1) / c.E, c.E), kThreads>>>(qv, ds_, dm, c.E, c.M, c.K, dsc, yv)));
        }
        const int64_t nv = rows * c.K / 16;
        float us = time_it([&] { copy_kernel<<<sms * 8, 256>>>((const uint4 *)dq, (uint4 *)dc, nv); }, flush);
        report("copy kernel (same bytes)", us, false);
        us = time_it([&] { cudaMemcpyAsync(dc, dq, rows * c.K, cudaMemcpyDeviceToDevice); }, flush);
        report("cudaMemcpyAsync (same)", us, false);
        cudaFree(dq), cudaFree(dy), cudaFree(dc), cudaFree(ds_), cudaFree(dm), cudaFree(dsc);
    }
    return 0;
}
