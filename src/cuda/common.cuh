/*
** common.cuh — shared pieces of the CUDA kernels: status mapping, launch geometry, and the
** vector conversions between bf16/fp8 registers and floats. Every conversion that produces
** bytes a test compares uses the rule of format.h or an instruction proven equal to it.
*/
#pragma once

#include <cuda_fp8.h>
#include <cuda_runtime.h>

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

static inline epmoe_status epmoe__need_device(const char *fn, int *sms) {
    *sms = epmoe__sm_count();
    if (*sms > 0) return EPMOE_OK;
    cudaError_t err = cudaGetLastError();
    return epmoe__fail(EPMOE_ERR_CUDA, "%s: no usable CUDA device: %s", fn, cudaGetErrorString(err));
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
