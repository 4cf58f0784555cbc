/*
** copy_lab.cu — which device-to-device copy pattern reaches cudaMemcpyAsync's bandwidth on this GPU?
** Issue #2's full-row requant (32 x 1024 x 7168 fp8 in, the same out) runs at 3.46 TB/s while
** cudaMemcpyAsync moves the same bytes at 4.19 TB/s and our plain copy kernel at 3.76 (rescale_lab):
** the requant's conversion is cheap, so the copy pattern is the open lead. Each variant copies
** the same bytes (16-byte vectors) and is checked; "cold": 256 MB memset before every repeat, CUDA
** events, median of 50 (lab_timing.cuh). GB/s counts bytes read + written.
**
**   gs1        grid-stride, one 16-byte load in flight a thread (rescale_lab's copy), .cs hints
**   gsU        grid-stride, U loads in flight then U stores, .cs hints
**   gsU-def    the same with default caching
**   blkU       each block owns one contiguous span; U loads in flight, a block-wide stride
**   gsU-nc256  loads ld.global.nc.L1::no_allocate.L2::256B, stores .cs
**   gsU-ef     loads and stores with an L2 evict_first cache policy
**   memcpy     cudaMemcpyAsync
** Build: make dev-labs; run: ./build/dev/copy_lab
*/
#include <cstdint>

#include "lab_timing.cuh"

enum Mode { kCs = 0, kDefault = 1, kNc256 = 2, kEvictFirst = 3 };

template <int kMode> __device__ __forceinline__ uint4 load(const uint4 *p, uint64_t pol) {
    uint4 v;
    if (kMode == kCs) return __ldcs(p);
    if (kMode == kDefault) return *p;
    if (kMode == kNc256)
        asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
                     : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                     : "l"(p));
    else
        asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0,%1,%2,%3}, [%4], %5;"
                     : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                     : "l"(p), "l"(pol));
    return v;
}

template <int kMode> __device__ __forceinline__ void store(uint4 *p, uint4 v, uint64_t pol) {
    if (kMode == kCs || kMode == kNc256) __stcs(p, v);
    else if (kMode == kDefault) *p = v;
    else
        asm volatile("st.global.L1::no_allocate.L2::cache_hint.v4.u32 [%0], {%1,%2,%3,%4}, %5;" ::"l"(p), "r"(v.x),
                     "r"(v.y), "r"(v.z), "r"(v.w), "l"(pol)
                     : "memory");
}

__device__ __forceinline__ uint64_t evict_first_policy() {
    uint64_t pol;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
    return pol;
}

/* grid-stride, U vectors in flight per thread */
template <int U, int kMode> __global__ void gs_kernel(const uint4 *a, uint4 *b, int64_t n) {
    const uint64_t pol = kMode == kEvictFirst ? evict_first_policy() : 0;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i0 = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i0 < n; i0 += stride * U) {
        uint4 v[U];
#pragma unroll
        for (int u = 0; u < U; u++)
            if (i0 + u * stride < n) v[u] = load<kMode>(a + i0 + u * stride, pol);
#pragma unroll
        for (int u = 0; u < U; u++)
            if (i0 + u * stride < n) store<kMode>(b + i0 + u * stride, v[u], pol);
    }
}

/* each block one contiguous span of n / grid vectors, walked blockDim x U at a time */
template <int U, int kMode> __global__ void blk_kernel(const uint4 *a, uint4 *b, int64_t n) {
    const uint64_t pol = kMode == kEvictFirst ? evict_first_policy() : 0;
    const int64_t lo = n * blockIdx.x / gridDim.x, hi = n * (blockIdx.x + 1) / gridDim.x;
    for (int64_t i0 = lo + threadIdx.x; i0 < hi; i0 += (int64_t)blockDim.x * U) {
        uint4 v[U];
#pragma unroll
        for (int u = 0; u < U; u++)
            if (i0 + u * blockDim.x < hi) v[u] = load<kMode>(a + i0 + u * blockDim.x, pol);
#pragma unroll
        for (int u = 0; u < U; u++)
            if (i0 + u * blockDim.x < hi) store<kMode>(b + i0 + u * blockDim.x, v[u], pol);
    }
}

int main() {
    int sms;
    CU(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    void *flush;
    CU(cudaMalloc(&flush, 256 << 20));
    const size_t bytes = (size_t)32 * 1024 * 7168; /* issue #2's full-row requant: 235 MB each way */
    const int64_t n = bytes / 16;
    uint8_t *src, *dst;
    CU(cudaMalloc(&src, bytes));
    CU(cudaMalloc(&dst, bytes));
    std::vector<uint8_t> h(bytes), back(bytes);
    for (size_t i = 0; i < bytes; i++) h[i] = (uint8_t)(i * 2654435761u >> 13);
    CU(cudaMemcpy(src, h.data(), bytes, cudaMemcpyHostToDevice));
    const uint4 *a = (const uint4 *)src;
    uint4 *b = (uint4 *)dst;
    printf("%-28s %9s %9s %4s\n", "variant", "us", "GB/s", "ok");
    auto lab = [&](const char *name, auto launch) {
        CU(cudaMemset(dst, 0, bytes));
        launch();
        CU(cudaDeviceSynchronize());
        CU(cudaMemcpy(back.data(), dst, bytes, cudaMemcpyDeviceToHost));
        const bool ok = back == h;
        const float us = lab_time_cold(launch, flush, 5, 50);
        printf("%-28s %9.2f %9.0f %4s\n", name, us, 2.0 * bytes / us / 1e3, ok ? "yes" : "NO");
    };
    char name[64];
#define GS(U, MODE, BPS, THR, LABEL)                                                                                    \
    snprintf(name, sizeof name, "gs%d%s %dx%d", U, LABEL, BPS, THR);                                                  \
    lab(name, [&] { gs_kernel<U, MODE><<<sms * BPS, THR>>>(a, b, n); })
#define BLK(U, MODE, BPS, THR, LABEL)                                                                                   \
    snprintf(name, sizeof name, "blk%d%s %dx%d", U, LABEL, BPS, THR);                                                 \
    lab(name, [&] { blk_kernel<U, MODE><<<sms * BPS, THR>>>(a, b, n); })
    GS(1, kCs, 8, 256, "");
    GS(2, kCs, 8, 256, "");
    GS(4, kCs, 8, 256, "");
    GS(4, kCs, 4, 256, "");
    GS(8, kCs, 4, 256, "");
    GS(4, kDefault, 8, 256, "-def");
    GS(4, kNc256, 8, 256, "-nc256");
    GS(4, kEvictFirst, 8, 256, "-ef");
    GS(8, kEvictFirst, 4, 256, "-ef");
    GS(4, kCs, 2, 1024, "");
    BLK(4, kCs, 8, 256, "");
    BLK(8, kCs, 4, 256, "");
    BLK(4, kDefault, 8, 256, "-def");
    BLK(4, kEvictFirst, 8, 256, "-ef");
    BLK(4, kCs, 1, 1024, "");
    BLK(2, kCs, 16, 128, "");
    lab("memcpy", [&] { CU(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice)); });
    return 0;
}
