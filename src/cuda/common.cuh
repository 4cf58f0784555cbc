/*
** common.cuh — shared pieces of the CUDA kernels: status mapping, launch geometry, and the
** vector conversions between bf16/fp8 registers and floats. Every conversion that produces
** bytes a test compares uses the rule of format.h or an instruction proven equal to it.
*/
#pragma once

#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <atomic>
#include <mutex>

#include "format.h"
#include "internal.h"

/* Map the launch status to epmoe_status (launches are asynchronous: a fault inside the kernel
** surfaces at the caller's next synchronization, as with every CUDA library). */
static inline epmoe_status epmoe__launched(const char *fn) {
    cudaError_t err = cudaGetLastError();
    if (err == cudaSuccess) return EPMOE_OK;
    return epmoe__fail(EPMOE_ERR_CUDA, "%s: kernel launch failed: %s (%s)", fn, cudaGetErrorString(err),
                       cudaGetErrorName(err));
}

/* Multiprocessors of the current device, for persistent grids (0 on error). */
static inline int epmoe__sm_count(void) {
    int dev = 0, n = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return 0;
    return n;
}

/* cudaGetErrorString, said plainly where the runtime's words mislead on a machine without a GPU:
** the statically linked runtime reports "driver version is insufficient" when no NVIDIA driver is
** loaded at all. For the calls that first touch the device. */
static inline const char *epmoe__cuda_str(cudaError_t e) {
    switch (e) {
    case cudaErrorInsufficientDriver:
        return "no CUDA GPU/driver available (no NVIDIA driver is loaded, or it is older than the CUDA runtime this "
               "libepmoe was built with)";
    case cudaErrorStubLibrary:
        return "no CUDA GPU/driver available (the libcuda found is the CUDA toolkit's stub, not an NVIDIA driver)";
    case cudaErrorNoDevice: return "no CUDA GPU/driver available (no CUDA-capable device is visible)";
    default: return cudaGetErrorString(e);
    }
}

static inline epmoe_status epmoe__need_device(const char *fn, int *sms) {
    *sms = epmoe__sm_count();
    if (*sms > 0) return EPMOE_OK;
    cudaError_t err = cudaGetLastError();
    return epmoe__fail(EPMOE_ERR_CUDA, "%s: no usable CUDA device: %s", fn, epmoe__cuda_str(err));
}

/* Two floats -> two e4m3 bytes (low byte first). cvt.rn.satfinite.e4m3x2.f32 is RNE and
** saturating like fmt_fp8_from_float; the GPU suite proves the two equal on all 2^32 inputs. */
static __device__ __forceinline__ uint32_t fp8x2_from_float(float a, float b) {
    return (uint32_t)__nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);
}

/* Two e4m3 bytes (low 16 bits) -> two floats. The fp16 step is exact for every e4m3 value. */
static __device__ __forceinline__ float2 fp8x2_to_float(uint32_t v) {
    __half2_raw h = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(v & 0xFFFFu), __NV_E4M3);
    return __half22float2(*reinterpret_cast<__half2 *>(&h));
}

/* bf16 pair (one 32-bit word, low half first) -> floats, exact. */
static __device__ __forceinline__ float bf16_lo(uint32_t w) { return __uint_as_float(w << 16); }
static __device__ __forceinline__ float bf16_hi(uint32_t w) { return __uint_as_float(w & 0xFFFF0000u); }

/* Two floats -> bf16 pair with format.h's rule (RNE, NaN kept quiet). */
static __device__ __forceinline__ uint32_t bf16x2_from_float(float a, float b) {
    return (uint32_t)fmt_bf16_from_float(a) | ((uint32_t)fmt_bf16_from_float(b) << 16);
}
/* The same rounding by the hardware (cvt.rn): format.h's bits but a NaN's sign and payload (the
** canonical NaN), one instruction where the bit arithmetic takes ~6 an element. The wgmma GEMMs'
** outputs use it (w4a8_gemm.cu; epmoe.h says so). */
static __device__ __forceinline__ uint16_t bf16_rn(float f) {
    uint16_t r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}
static __device__ __forceinline__ uint32_t bf16x2_rn(float lo, float hi) {
    uint32_t r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

/* silu(g) = g / (1 + expf(-g)) of eight gate values, bit for bit __fdiv_rn's quotient (the
** reference's IEEE expression; expf is CUDA's, within 2 ulp of libm's). __fdiv_rn is a fast path
** (rcp, two Newton steps, a residual correction) guarded by a range check that branches to a slow
** routine per element, which kept the compiler from interleaving the elements: silu_mul ran at
** ~45 instructions an element, instruction-bound (H200, 2026-12-01). Here the same fast path runs
** for all eight without a branch, and one test on the inputs sends the eight to __fdiv_rn only when
** one leaves the range where that fast path is exact: |g| in [2^-60, 2^60] and g > -40 keep the
** quotient normal and 1 + expf(-g) below 2^58. fp8_exhaustive proves the two equal on all 65536
** bf16 gate values. */
static __device__ __forceinline__ void silu8(const float g[8], float s[8]) {
    float d[8];
    bool fast = true;
#pragma unroll
    for (int h = 0; h < 8; h++) {
        d[h] = __fadd_rn(1.0f, expf(-g[h]));
        float r, q;
        asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(d[h]));
        r = __fmaf_rn(r, __fmaf_rn(-d[h], r, 1.0f), r);
        q = __fmul_rn(g[h], r);
        s[h] = __fmaf_rn(r, __fmaf_rn(-d[h], q, g[h]), q);
        fast &= fabsf(g[h]) >= 0x1p-60f && fabsf(g[h]) <= 0x1p60f && g[h] > -40.0f; /* false for NaN */
    }
    if (!fast) {
#pragma unroll
        for (int h = 0; h < 8; h++) s[h] = __fdiv_rn(g[h], d[h]);
    }
}

/* kChunks 16-byte chunks of bf16 a lane -> fp8, DeepEP's per-128-group cast. The 16 / kChunks
** lanes holding one group (aligned, in lane order) call this together, and mask names them; every
** lane gets the group's scale_inv. The max is exact in any order, so every kChunks gives the same
** bytes: the cast kernel, dispatch (one chunk a lane) and silu_mul (two) agree. */
template <int kChunks>
static __device__ __forceinline__ void cast_chunks(const uint4 (&v)[kChunks], int round_scale, unsigned mask,
                                                   uint2 (&q)[kChunks], float *scale_inv) {
    float f[kChunks][8], amax = FMT_AMAX_FLOOR;
#pragma unroll
    for (int k = 0; k < kChunks; k++) {
        const uint32_t w[4] = {v[k].x, v[k].y, v[k].z, v[k].w};
#pragma unroll
        for (int i = 0; i < 4; i++) f[k][2 * i] = bf16_lo(w[i]), f[k][2 * i + 1] = bf16_hi(w[i]);
#pragma unroll
        for (int i = 0; i < 8; i++) amax = fmaxf(amax, fabsf(f[k][i])); /* fmaxf drops NaN, as the ref */
    }
#pragma unroll
    for (int off = 8 / kChunks; off; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(mask, amax, off));
    float mul;
    fmt_group_scales(amax, round_scale, &mul, scale_inv);
#pragma unroll
    for (int k = 0; k < kChunks; k++) {
        q[k].x = fp8x2_from_float(__fmul_rn(f[k][0], mul), __fmul_rn(f[k][1], mul)) |
                 (fp8x2_from_float(__fmul_rn(f[k][2], mul), __fmul_rn(f[k][3], mul)) << 16);
        q[k].y = fp8x2_from_float(__fmul_rn(f[k][4], mul), __fmul_rn(f[k][5], mul)) |
                 (fp8x2_from_float(__fmul_rn(f[k][6], mul), __fmul_rn(f[k][7], mul)) << 16);
    }
}
static __device__ __forceinline__ uint2 cast_chunk8(uint4 v, int round_scale, unsigned half_mask, float *scale_inv) {
    const uint4 c[1] = {v};
    uint2 q[1];
    cast_chunks<1>(c, round_scale, half_mask, q, scale_inv);
    return q[0];
}

/* Four fp8 at group scale s -> four fp8 at 1/inv: fmt_requant per element, decoded by the instruction. */
static __device__ __forceinline__ uint32_t requant_word(uint32_t w, float s, float inv) {
    const float2 lo = fp8x2_to_float(w), hi = fp8x2_to_float(w >> 16);
    return fp8x2_from_float(__fmul_rn(__fmul_rn(lo.x, s), inv), __fmul_rn(__fmul_rn(lo.y, s), inv)) |
           (fp8x2_from_float(__fmul_rn(__fmul_rn(hi.x, s), inv), __fmul_rn(__fmul_rn(hi.y, s), inv)) << 16);
}

/* cp.async: 16 (or 4) bytes global -> shared without a register round trip, committed and waited
** for in groups (the W4A8 GEMM's activation scales, the EP kernels' rows and messages). */
static __device__ __forceinline__ uint32_t smem_u32(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

/* 16 bytes global -> shared; bytes = 0 writes zeros without reading (rows past masked_m). */
static __device__ __forceinline__ void cp_async16(void *dst, const void *src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(bytes) : "memory");
}
static __device__ __forceinline__ void cp_async4(void *dst, const void *src, int bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(bytes) : "memory");
}
static __device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> static __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

/* silu(gate) * up of an MLP's GEMM1 output (bf16 [E, M, 2I], rows < masked_m), rounded to bf16,
** into inter: bf16 [E, M, I], or fp8 [E, M, I] with fresh 1x128 scales (f32 row-major
** [E, M, I/128]) or at the per-tensor scale *tensor_scale (silu_mul.cu). */
enum { EPMOE_SILU_BF16 = 0, EPMOE_SILU_FP8_GROUP = 1, EPMOE_SILU_FP8_TENSOR = 2 };
epmoe_status epmoe__silu_mul_launch(int out_kind, const uint16_t *gate_up, const int32_t *masked_m, int64_t E,
                                    int64_t M, int64_t I, void *inter, float *scales, const float *tensor_scale,
                                    cudaStream_t s);

/* The dynamic shared-memory attribute is per function and per device, shared by every host
** thread, and a launch needing more than it fails. It only ever grows, under a lock, so a launch
** needing less never undoes a bigger one in another thread, it stays at what launches need, and
** a launch that needs no more costs an atomic load instead of a driver call. (A cudaDeviceReset
** would reset the attribute behind this cache.) */
template <auto Kernel> cudaError_t grow_smem_attr(size_t bytes) {
    constexpr int kDevices = 64;
    static std::atomic<size_t> set[kDevices];
    static std::mutex mu;
    int dev = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err != cudaSuccess || dev >= kDevices) return err != cudaSuccess ? err : cudaErrorInvalidDevice;
    if (set[dev].load(std::memory_order_acquire) >= bytes) return cudaSuccess;
    std::lock_guard<std::mutex> lk(mu);
    if (set[dev].load(std::memory_order_relaxed) >= bytes) return cudaSuccess;
    err = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
    if (err == cudaSuccess) set[dev].store(bytes, std::memory_order_release);
    return err;
}

/* CTAs of Kernel that fit on one SM at this block size and dynamic shared memory. The driver's
** occupancy query took microseconds of host time in every call of a persistent kernel (the W4A8
** GEMM's whole host cost was 7.5 us a call, H200 2026-11-30), so the last answer per device is kept
** in one word, (bytes << 24 | threads << 8 | blocks): a reader sees a matching pair or misses, and
** a launch with another size only asks again. */
template <auto Kernel> cudaError_t blocks_per_sm(int threads, size_t bytes, int *blocks) {
    constexpr int kDevices = 64;
    static std::atomic<uint64_t> last[kDevices];
    int dev = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err != cudaSuccess || dev >= kDevices) return err != cudaSuccess ? err : cudaErrorInvalidDevice;
    const uint64_t key = (uint64_t)bytes << 24 | (uint64_t)(threads & 0xFFFF) << 8;
    const uint64_t hit = last[dev].load(std::memory_order_relaxed);
    if (hit != 0 && (hit & ~(uint64_t)0xFF) == key) {
        *blocks = (int)(hit & 0xFF);
        return cudaSuccess;
    }
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, Kernel, threads, bytes);
    if (err == cudaSuccess && *blocks > 0 && *blocks < 256) last[dev].store(key | (uint64_t)*blocks, std::memory_order_relaxed);
    return err;
}
