/*
** rescale_lab.cu — kernel lab for the masked FP8 requant (llm.c-style: variants, each checked
** against the CPU reference, then timed). Not part of the library; the winner goes to
** src/cuda/rescale.cu.
**
**   v0  the library kernel (epmoe_requant_fp8_cuda)
**   v1  flat prefix-sum mapping, 32-byte units, unroll 4
**   v2  flat prefix-sum mapping, 16-byte units, unroll 8
**   v3  expert grid (blockIdx.y = expert, no scan), 32-byte units, unroll 2
**   v4  flat, warp-contiguous spans (a warp reads 32*U consecutive 16-byte chunks), unroll U
**   v5  v4 with the L2::256B prefetch hint on the loads
**   v6  bulk async copies (cp.async.bulk, TMA engine): a row per stage into shared memory,
**       converted in place, stored back with a bulk copy; S stages in flight per block
**   copy  a plain 16-byte copy of the same number of bytes: the floor at this size
** Timing: "cold": L2 flushed (256 MB memset) before every repeat, CUDA events, median of 100;
** "warm": 20 launches captured in a CUDA graph, replayed, time per launch (data in L2, as when
** the kernel follows its producer).
** Build: make dev-labs; run: ./build/dev/rescale_lab
*/
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../../src/cuda/common.cuh"
#include "lab_timing.cuh"


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

__device__ __forceinline__ uint4 ld_hint(const uint4 *p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

/* Warp-contiguous flat mapping: each warp iteration covers 32*kUnroll consecutive chunks. */
template <int kFmt, int kUnroll, bool kHint>
__global__ void __launch_bounds__(kThreads, 2) warp_kernel(const uint4 *q, const uint8_t *scales, const int32_t *masked_m,
                                                           int E, int M, int K, const float *out_scale, uint4 *y) {
    extern __shared__ int prefix[];
    lab_scan(masked_m, E, M, prefix);
    const float inv = 1.0f / __ldg(out_scale);
    const int G = K / 128, upr = K / 16, lane = threadIdx.x & 31;
    const int64_t slab = fmt_scale_slab_bytes(kFmt, M, G);
    const uint32_t units = (uint32_t)prefix[E] * upr;
    const uint32_t warp = (blockIdx.x * kThreads + threadIdx.x) >> 5, nwarps = gridDim.x * kThreads / 32;
    for (uint32_t base = warp * 32 * kUnroll; base < units; base += nwarps * 32 * kUnroll) {
        uint4 in[kUnroll];
        float s[kUnroll];
        int64_t off[kUnroll];
#pragma unroll
        for (int j = 0; j < kUnroll; j++) {
            const uint32_t u = base + j * 32 + lane;
            off[j] = -1;
            if (u < units) {
                const int row = u / upr, c = u - row * upr;
                const int e = lab_owner(prefix, E, row), t = row - prefix[e];
                off[j] = (((int64_t)e * M + t) * K) / 16 + c;
                in[j] = kHint ? ld_hint(q + off[j]) : __ldcs(q + off[j]);
                s[j] = lab_scale<kFmt>(scales + e * slab, M, G, t, c / 8);
            }
        }
#pragma unroll
        for (int j = 0; j < kUnroll; j++)
            if (off[j] >= 0) __stcs(y + off[j], rq_vec(in[j], s[j], inv));
    }
}

__device__ __forceinline__ void mbar_init(uint64_t *bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count));
}

__device__ __forceinline__ void mbar_wait(uint64_t *bar, uint32_t parity) {
    asm volatile("{\n.reg .pred p;\nWAIT_%=:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
                 "@!p bra WAIT_%=;\n}" ::"r"(smem_u32(bar)),
                 "r"(parity));
}

__device__ __forceinline__ void bulk_load(void *dst, const void *src, uint32_t bytes, uint64_t *bar) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes));
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                     smem_u32(dst)),
                 "l"(src), "r"(bytes), "r"(smem_u32(bar))
                 : "memory");
}

__device__ __forceinline__ void bulk_store(void *dst, const void *src, uint32_t bytes) {
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst), "r"(smem_u32(src)), "r"(bytes)
                 : "memory");
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}

template <int N> __device__ __forceinline__ void bulk_wait_read() {
    asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}

/* One row per stage: kStages rows in flight per block. Rows are dealt round-robin to blocks. */
template <int kFmt, int kStages, bool kConvert>
__global__ void __launch_bounds__(kThreads) bulk_kernel(const uint8_t *q, const uint8_t *scales, const int32_t *masked_m,
                                                        int E, int M, int K, const float *out_scale, uint8_t *y) {
    extern __shared__ __align__(128) uint8_t smem[];
    __shared__ uint64_t bars[kStages];
    __shared__ int prefix[1025];
    lab_scan(masked_m, E, M, prefix);
    const float inv = 1.0f / __ldg(out_scale);
    const int G = K / 128, total = prefix[E];
    const int64_t slab = fmt_scale_slab_bytes(kFmt, M, G);
    if (threadIdx.x == 0)
        for (int st = 0; st < kStages; st++) mbar_init(&bars[st], 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    __syncthreads();
    auto row_ptr = [&](int row, int64_t &off, int &e, int &t) {
        e = lab_owner(prefix, E, row);
        t = row - prefix[e];
        off = ((int64_t)e * M + t) * K;
    };
    const int first = blockIdx.x, step = gridDim.x;
    if (threadIdx.x == 0)
        for (int k = 0; k < kStages; k++) {
            const int row = first + k * step;
            if (row < total) {
                int64_t off;
                int e, t;
                row_ptr(row, off, e, t);
                bulk_load(smem + k * K, q + off, K, &bars[k]);
            }
        }
    for (int k = 0;; k++) {
        const int row = first + k * step;
        if (row >= total) break;
        const int st = k % kStages;
        mbar_wait(&bars[st], (k / kStages) & 1);
        int64_t off;
        int e, t;
        row_ptr(row, off, e, t);
        uint4 *buf = reinterpret_cast<uint4 *>(smem + st * K);
        if (kConvert)
            for (int c = threadIdx.x; c < K / 16; c += kThreads) {
                const float sc = lab_scale<kFmt>(scales + e * slab, M, G, t, c / 8);
                buf[c] = rq_vec(buf[c], sc, inv);
            }
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        __syncthreads();
        if (threadIdx.x == 0) {
            bulk_store(y + off, buf, K);
            /* the previous row's store has read its stage: refill that stage */
            bulk_wait_read<1>();
            const int prev = k - 1 + kStages, pst = (k + kStages - 1) % kStages;
            const int nrow = first + prev * step;
            if (k >= 1 && nrow < total) {
                int64_t noff;
                int ne, nt;
                row_ptr(nrow, noff, ne, nt);
                bulk_load(smem + pst * K, q + noff, K, &bars[pst]);
            }
        }
    }
    if (threadIdx.x == 0) bulk_wait_read<0>();
    __syncthreads();
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

/* Warm: 20 launches in one graph, replayed 20 times; median per-launch time. */
template <class F> static float time_warm(F launch) {
    cudaStream_t st;
    CU(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CU(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
    for (int i = 0; i < 20; i++) launch(st);
    CU(cudaStreamEndCapture(st, &g));
    CU(cudaGraphInstantiate(&ge, g, 0));
    cudaEvent_t a, b;
    CU(cudaEventCreate(&a));
    CU(cudaEventCreate(&b));
    std::vector<float> ts;
    for (int i = 0; i < 25; i++) {
        CU(cudaEventRecord(a, st));
        CU(cudaGraphLaunch(ge, st));
        CU(cudaEventRecord(b, st));
        CU(cudaEventSynchronize(b));
        float ms;
        CU(cudaEventElapsedTime(&ms, a, b));
        if (i >= 5) ts.push_back(ms * 1000.0f / 20);
    }
    cudaGraphExecDestroy(ge), cudaGraphDestroy(g), cudaStreamDestroy(st);
    return lab_median(ts);
}

int main() {
    int sms;
    CU(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    void *flush;
    CU(cudaMalloc(&flush, 256 << 20));
    CU(cudaFuncSetAttribute(bulk_kernel<0, 6, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, 6 * 7168));
    CU(cudaFuncSetAttribute(bulk_kernel<1, 6, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, 6 * 7168));
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
    printf("%-22s %6s %-28s %9s %8s %9s %6s\n", "case", "rows", "variant", "cold us", "GB/s", "warm us", "ok");
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
        CU(cudaMalloc(&dq, n));
        CU(cudaMalloc(&dy, n));
        CU(cudaMalloc(&dc, n));
        CU(cudaMalloc(&ds_, c.E * slab));
        CU(cudaMalloc(&dm, c.E * 4));
        CU(cudaMalloc(&dsc, 4));
        CU(cudaMemcpy(dq, q.data(), n, cudaMemcpyHostToDevice));
        CU(cudaMemcpy(ds_, s.data(), c.E * slab, cudaMemcpyHostToDevice));
        CU(cudaMemcpy(dm, c.masked.data(), c.E * 4, cudaMemcpyHostToDevice));
        CU(cudaMemcpy(dsc, &osc, 4, cudaMemcpyHostToDevice));
        int64_t rows = 0;
        for (int e = 0; e < c.E; e++) rows += std::min(std::max(c.masked[e], 0), c.M);
        const double bytes = (double)rows * c.K * 2 + rows * (c.K / 128) * 4 + c.E * 4;
        const size_t smem = (c.E + 1) * 4;
        const unsigned blocks = sms * 4;
        auto report = [&](const char *name, float us, bool check) {
            bool ok = true;
            if (check) {
                CU(cudaMemcpy(out.data(), dy, n, cudaMemcpyDeviceToHost));
                ok = out == ref;
            }
            printf("%-22s %6lld %-28s %9.2f %8.0f %9s %6s\n", c.name, (long long)rows, name, us, bytes / us / 1e3, "",
                   check ? (ok ? "yes" : "NO") : "-");
        };
        auto reset = [&] { CU(cudaMemset(dy, 0x55, n)); };
#define LAB(label, launch)                                                                                              \
    do {                                                                                                               \
        reset();                                                                                                       \
        { cudaStream_t st_ = 0; launch; }                                                                              \
        CU(cudaDeviceSynchronize());                                                                                   \
        bool ok_ = true;                                                                                               \
        CU(cudaMemcpy(out.data(), dy, n, cudaMemcpyDeviceToHost));                                                     \
        ok_ = out == ref;                                                                                              \
        cudaStream_t st_ = 0;                                                                                          \
        float us_ = lab_time_cold([&] { launch; }, flush, 10, 100);                                                                   \
        float warm_ = time_warm([&](cudaStream_t s_) { st_ = s_; launch; });                                           \
        printf("%-22s %6lld %-28s %9.2f %8.0f %9.2f %6s\n", c.name, (long long)rows, label, us_, bytes / us_ / 1e3,   \
               warm_, ok_ ? "yes" : "NO");                                                                             \
    } while (0)
        const uint4 *qv = (const uint4 *)dq;
        uint4 *yv = (uint4 *)dy;
        if (c.fmt == 1) {
            LAB("v0 library", epmoe_requant_fp8_cuda(dq, ds_, EPMOE_SCALE_F32_MMAJOR, dm, c.E, c.M, c.K, dsc, dy, st_));
            LAB("v1 flat 32B x4", (flat_kernel<1, 2, 4><<<blocks, kThreads, smem, st_>>>(qv, ds_, dm, c.E, c.M, c.K, dsc, yv)));
            LAB("v2 flat 16B x8", (flat_kernel<1, 1, 8><<<blocks, kThreads, smem, st_>>>(qv, ds_, dm, c.E, c.M, c.K, dsc, yv)));
            LAB("v4 warp-contig 16B x4", (warp_kernel<1, 4, false><<<sms * 2, kThreads, smem, st_>>>(qv, ds_, dm, c.E, c.M, c.K, dsc, yv)));
            LAB("v4 warp-contig 16B x8", (warp_kernel<1, 8, false><<<sms * 2, kThreads, smem, st_>>>(qv, ds_, dm, c.E, c.M, c.K, dsc, yv)));
            LAB("v5 warp-contig x8 L2hint", (warp_kernel<1, 8, true><<<sms * 2, kThreads, smem, st_>>>(qv, ds_, dm, c.E, c.M, c.K, dsc, yv)));
            LAB("v5 warp-contig x4 L2hint", (warp_kernel<1, 4, true><<<sms * 2, kThreads, smem, st_>>>(qv, ds_, dm, c.E, c.M, c.K, dsc, yv)));
            LAB("v6 bulk S=4 2blk/SM", (bulk_kernel<1, 4, true><<<sms * 2, kThreads, 4 * c.K, st_>>>(dq, ds_, dm, c.E, c.M, c.K, dsc, dy)));
            LAB("v6 bulk S=3 3blk/SM", (bulk_kernel<1, 3, true><<<sms * 3, kThreads, 3 * c.K, st_>>>(dq, ds_, dm, c.E, c.M, c.K, dsc, dy)));
            LAB("v6 bulk S=6 2blk/SM", (bulk_kernel<1, 6, true><<<sms * 2, kThreads, 6 * c.K, st_>>>(dq, ds_, dm, c.E, c.M, c.K, dsc, dy)));
            LAB("v3 expert-grid 32B x2",
                (expert_kernel<1, 2, 2><<<dim3((blocks + c.E - 1) / c.E, c.E), kThreads, 0, st_>>>(qv, ds_, dm, c.E, c.M, c.K, dsc, yv)));
            LAB("v3b expert-grid 16B x4",
                (expert_kernel<1, 1, 4><<<dim3(2 * (blocks + c.E - 1) / c.E, c.E), kThreads, 0, st_>>>(qv, ds_, dm, c.E, c.M, c.K, dsc, yv)));
        } else {
            LAB("v0 library", epmoe_requant_fp8_cuda(dq, ds_, EPMOE_SCALE_F32_ROW, dm, c.E, c.M, c.K, dsc, dy, st_));
            LAB("v1 flat 32B x4", (flat_kernel<0, 2, 4><<<blocks, kThreads, smem, st_>>>(qv, ds_, dm, c.E, c.M, c.K, dsc, yv)));
            LAB("v2 flat 16B x8", (flat_kernel<0, 1, 8><<<blocks, kThreads, smem, st_>>>(qv, ds_, dm, c.E, c.M, c.K, dsc, yv)));
            LAB("v4 warp-contig 16B x4", (warp_kernel<0, 4, false><<<sms * 2, kThreads, smem, st_>>>(qv, ds_, dm, c.E, c.M, c.K, dsc, yv)));
            LAB("v4 warp-contig 16B x8", (warp_kernel<0, 8, false><<<sms * 2, kThreads, smem, st_>>>(qv, ds_, dm, c.E, c.M, c.K, dsc, yv)));
            LAB("v5 warp-contig x8 L2hint", (warp_kernel<0, 8, true><<<sms * 2, kThreads, smem, st_>>>(qv, ds_, dm, c.E, c.M, c.K, dsc, yv)));
            LAB("v5 warp-contig x4 L2hint", (warp_kernel<0, 4, true><<<sms * 2, kThreads, smem, st_>>>(qv, ds_, dm, c.E, c.M, c.K, dsc, yv)));
            LAB("v6 bulk S=4 2blk/SM", (bulk_kernel<0, 4, true><<<sms * 2, kThreads, 4 * c.K, st_>>>(dq, ds_, dm, c.E, c.M, c.K, dsc, dy)));
            LAB("v6 bulk S=3 3blk/SM", (bulk_kernel<0, 3, true><<<sms * 3, kThreads, 3 * c.K, st_>>>(dq, ds_, dm, c.E, c.M, c.K, dsc, dy)));
            LAB("v6 bulk S=6 2blk/SM", (bulk_kernel<0, 6, true><<<sms * 2, kThreads, 6 * c.K, st_>>>(dq, ds_, dm, c.E, c.M, c.K, dsc, dy)));
            LAB("v3 expert-grid 32B x2",
                (expert_kernel<0, 2, 2><<<dim3((blocks + c.E - 1) / c.E, c.E), kThreads, 0, st_>>>(qv, ds_, dm, c.E, c.M, c.K, dsc, yv)));
            LAB("v3b expert-grid 16B x4",
                (expert_kernel<0, 1, 4><<<dim3(2 * (blocks + c.E - 1) / c.E, c.E), kThreads, 0, st_>>>(qv, ds_, dm, c.E, c.M, c.K, dsc, yv)));
        }
        {
            /* raw bulk copy of the same rows (no conversion): what the TMA engine gives here */
            const unsigned bb = sms * 2;
            CU(cudaFuncSetAttribute(bulk_kernel<0, 6, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, 6 * c.K));
            float bus = lab_time_cold([&] { bulk_kernel<0, 6, false><<<bb, kThreads, 6 * c.K>>>(dq, ds_, dm, c.E, c.M, c.K, dsc, dc); }, flush, 10, 100);
            report("bulk copy kernel (same)", bus, false);
        }
        const int64_t nv = rows * c.K / 16;
        float us = lab_time_cold([&] { copy_kernel<<<sms * 8, 256>>>((const uint4 *)dq, (uint4 *)dc, nv); }, flush, 10, 100);
        report("copy kernel (same bytes)", us, false);
        us = lab_time_cold([&] { cudaMemcpyAsync(dc, dq, rows * c.K, cudaMemcpyDeviceToDevice); }, flush, 10, 100);
        report("cudaMemcpyAsync (same)", us, false);
        cudaFree(dq), cudaFree(dy), cudaFree(dc), cudaFree(ds_), cudaFree(dm), cudaFree(dsc);
    }
    return 0;
}
