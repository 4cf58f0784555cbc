/*
** rescale.cu — the masked rescale of grouped FP8 rows, one kernel for two ops:
**   requant  fp8 + group scales -> fp8 at one per-tensor scale (SGLang PR #22316's op)
**   dequant  fp8 + group scales -> fp32 / bf16
** over [E, M, K] with masked_m[E] read on the GPU. Spec: rescale_ref in src/ref/quant_ref.c.
**
** Why a persistent grid over live rows: the host does not know masked_m (no sync), and a grid
** sized by E*M would launch mostly idle blocks (the Triton kernel's cost at decode sizes). Each
** block scans masked_m into shared prefix sums, then threads stride over the 16-byte chunks of
** the live rows only, so skewed experts balance across the whole GPU.
*/
#include "common.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kMaxExperts = 8192; /* prefix sums in shared memory: (E+1) int32 */
constexpr int kUnroll = 4;        /* independent 16-byte loads in flight per thread */
constexpr int kBlocksPerSm = 4;   /* resident at <= 64 registers: 1024 threads per SM, one wave */

/* prefix[e] = sum of valid rows of experts < e, for e in [0, E]. Block-wide scan. */
__device__ void scan_rows(const int32_t *__restrict__ masked_m, int E, int M, int *prefix) {
    __shared__ int warp_sums[kThreads / 32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int running = 0;
    if (threadIdx.x == 0) prefix[0] = 0;
    for (int base = 0; base < E; base += kThreads) {
        const int e = base + threadIdx.x;
        int v = 0;
        if (e < E) v = masked_m ? min(max(__ldg(masked_m + e), 0), M) : M;
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
            const int u = __shfl_up_sync(0xFFFFFFFFu, v, off);
            if (lane >= off) v += u;
        }
        if (lane == 31) warp_sums[warp] = v;
        __syncthreads();
        int before = 0, total = 0;
#pragma unroll
        for (int w = 0; w < kThreads / 32; w++) {
            const int s = warp_sums[w];
            before += w < warp ? s : 0;
            total += s;
        }
        if (e < E) prefix[e + 1] = running + before + v;
        running += total;
        __syncthreads(); /* warp_sums is reused by the next round */
    }
    __syncthreads();
}

/* Largest e with prefix[e] <= row (then row < prefix[e+1], so expert e owns the row). */
__device__ __forceinline__ int owner(const int *prefix, int E, int row) {
    int lo = 0, hi = E - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (prefix[mid] <= row) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

/* Scale (t, g) of one slab: format.h's layout, with typed loads (its memcpy would be bytes). */
template <int kFmt>
__device__ __forceinline__ float scale_load(const uint8_t *slab, int M, int G, int t, int g) {
    const uint8_t *p = slab + fmt_scale_offset(kFmt, M, G, t, g);
    if (fmt_scale_is_ue8m0(kFmt)) return fmt_ue8m0_to_float(__ldg(p));
    return __ldg(reinterpret_cast<const float *>(p));
}

/* 32-bit words of output per 16-byte input chunk (16 values). */
template <int kOut> __host__ __device__ constexpr int out_words() { return kOut == EPMOE_FP8_E4M3 ? 4 : kOut == EPMOE_BF16 ? 8 : 16; }

template <int kOut>
__device__ __forceinline__ void convert(const uint4 in, float s, float inv, uint32_t (&o)[out_words<kOut>()]) {
    const uint32_t w[4] = {in.x, in.y, in.z, in.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        if (kOut == EPMOE_FP8_E4M3) {
            o[i] = requant_word(w[i], s, inv);
            continue;
        }
        const float2 a = fp8x2_to_float(w[i]), b = fp8x2_to_float(w[i] >> 16);
        const float r0 = __fmul_rn(a.x, s), r1 = __fmul_rn(a.y, s), r2 = __fmul_rn(b.x, s), r3 = __fmul_rn(b.y, s);
        if (kOut == EPMOE_BF16) {
            o[2 * i] = bf16x2_from_float(r0, r1);
            o[2 * i + 1] = bf16x2_from_float(r2, r3);
        } else {
            o[4 * i] = __float_as_uint(r0);
            o[4 * i + 1] = __float_as_uint(r1);
            o[4 * i + 2] = __float_as_uint(r2);
            o[4 * i + 3] = __float_as_uint(r3);
        }
    }
}

template <int kFmt, int kOut>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) rescale_kernel(const uint4 *__restrict__ q, const uint8_t *__restrict__ scales,
                                                          const int32_t *__restrict__ masked_m, int E, int M, int K,
                                                          const float *__restrict__ out_scale, uint4 *__restrict__ y) {
    extern __shared__ int prefix[];
    scan_rows(masked_m, E, M, prefix);
    const float inv = kOut == EPMOE_FP8_E4M3 ? 1.0f / __ldg(out_scale) : 1.0f;
    const int G = K / FMT_GROUP, cpr = K / 16; /* 16-byte chunks per row */
    const int64_t slab = fmt_scale_slab_bytes(kFmt, M, G);
    const int64_t units = (int64_t)prefix[E] * cpr;
    const int64_t stride = (int64_t)gridDim.x * kThreads;
    constexpr int kOutVecs = out_words<kOut>() / 4;

    for (int64_t u0 = (int64_t)blockIdx.x * kThreads + threadIdx.x; u0 < units; u0 += stride * kUnroll) {
        uint4 in[kUnroll];
        float s[kUnroll];
        int64_t dst[kUnroll];
#pragma unroll
        for (int j = 0; j < kUnroll; j++) { /* issue every load before the first use */
            const int64_t u = u0 + j * stride;
            dst[j] = -1;
            if (u < units) {
                /* 32-bit division whenever it suffices: 64-bit division is a long software loop. */
                const int row = units <= UINT32_MAX ? (int)((uint32_t)u / (uint32_t)cpr) : (int)(u / cpr);
                const int c = (int)(u - (int64_t)row * cpr);
                const int e = owner(prefix, E, row), t = row - prefix[e];
                const int64_t off = ((int64_t)e * M + t) * K + (int64_t)c * 16;
                in[j] = __ldcs(q + off / 16);
                s[j] = scale_load<kFmt>(scales + e * slab, M, G, t, c / 8);
                dst[j] = off;
            }
        }
#pragma unroll
        for (int j = 0; j < kUnroll; j++) {
            if (dst[j] < 0) continue;
            uint32_t o[out_words<kOut>()];
            convert<kOut>(in[j], s[j], inv, o);
#pragma unroll
            for (int i = 0; i < kOutVecs; i++)
                __stcs(y + dst[j] / 16 * kOutVecs + i, make_uint4(o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]));
        }
    }
}

template <int kOut>
epmoe_status launch(const char *fn, const uint8_t *q, const void *scales, int fmt, const int32_t *masked_m, int64_t E,
                    int64_t M, int64_t K, const float *out_scale, void *y, cudaStream_t stream) {
    if (E > kMaxExperts || E * M > INT32_MAX || K > INT32_MAX)
        return epmoe__fail(EPMOE_ERR_UNSUPPORTED, "%s: E = %lld (max %d) and E*M = %lld (max 2^31-1) exceed the kernel",
                           fn, (long long)E, kMaxExperts, (long long)(E * M));
    int sms;
    EPMOE_CHECK(epmoe__need_device(fn, &sms));
    /* Enough resident threads to cover the bandwidth-latency product, never more blocks than
    ** the upper bound of work (E*M rows) needs. */
    const int64_t want = (E * M * (K / 16) + kThreads - 1) / kThreads, cap = (int64_t)sms * kBlocksPerSm;
    const unsigned blocks = (unsigned)(want < cap ? want : cap);
    const size_t smem = (size_t)(E + 1) * sizeof(int);
    const uint4 *qv = reinterpret_cast<const uint4 *>(q);
    const uint8_t *sv = static_cast<const uint8_t *>(scales);
    uint4 *yv = static_cast<uint4 *>(y);
#define EPMOE_RESCALE_CASE(F)                                                                                          \
    case F:                                                                                                            \
        if (smem > 48 * 1024) cudaFuncSetAttribute(rescale_kernel<F, kOut>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem); \
        rescale_kernel<F, kOut><<<blocks, kThreads, smem, stream>>>(qv, sv, masked_m, (int)E, (int)M, (int)K, out_scale, yv); \
        break;
    switch (fmt) { /* the one place the variant is chosen */
        EPMOE_RESCALE_CASE(EPMOE_SCALE_F32_ROW)
        EPMOE_RESCALE_CASE(EPMOE_SCALE_F32_MMAJOR)
        EPMOE_RESCALE_CASE(EPMOE_SCALE_UE8M0_ROW)
        EPMOE_RESCALE_CASE(EPMOE_SCALE_UE8M0_MMAJOR)
    }
#undef EPMOE_RESCALE_CASE
    return epmoe__launched(fn);
}

} // namespace

extern "C" epmoe_status epmoe_requant_fp8_cuda(const uint8_t *q, const void *scales, epmoe_scale_fmt fmt,
                                               const int32_t *masked_m, int64_t E, int64_t M, int64_t K,
                                               const float *out_scale, uint8_t *y, epmoe_stream_t stream) {
    static const char fn[] = "epmoe_requant_fp8_cuda";
    EPMOE_CHECK(epmoe__check_rescale(fn, 1, q, scales, fmt, masked_m, E, M, K, out_scale, EPMOE_FP8_E4M3, y, 1));
    if (E == 0 || M == 0) return EPMOE_OK;
    return launch<EPMOE_FP8_E4M3>(fn, q, scales, fmt, masked_m, E, M, K, out_scale, y, stream);
}

extern "C" epmoe_status epmoe_dequant_fp8_cuda(const uint8_t *q, const void *scales, epmoe_scale_fmt fmt,
                                               const int32_t *masked_m, int64_t E, int64_t M, int64_t K,
                                               epmoe_dtype out_dtype, void *y, epmoe_stream_t stream) {
    static const char fn[] = "epmoe_dequant_fp8_cuda";
    EPMOE_CHECK(epmoe__check_rescale(fn, 0, q, scales, fmt, masked_m, E, M, K, NULL, out_dtype, y, 1));
    if (E == 0 || M == 0) return EPMOE_OK;
    if (out_dtype == EPMOE_BF16) return launch<EPMOE_BF16>(fn, q, scales, fmt, masked_m, E, M, K, NULL, y, stream);
    return launch<EPMOE_F32>(fn, q, scales, fmt, masked_m, E, M, K, NULL, y, stream);
}
