/*
** fp8_exhaustive.cu — proves that the conversion instructions the kernels use give the bytes of
** format.h's rules: cvt.rn.satfinite.e4m3x2.f32 vs fmt_fp8_from_float on all 2^32 float bit
** patterns (both lanes of the pair), the e4m3 -> f16 -> f32 decode vs fmt_fp8_to_float on all
** 256 codes (NaN compared as NaN). A mismatch here means the GPU and CPU paths disagree.
*/
#include <cstdio>

#include "../../src/cuda/common.cuh"

__global__ void sweep(uint32_t hi, unsigned long long *bad, unsigned long long *first) {
    /* 2^32 patterns in 2^8 launches of 2^24: each thread tests one pattern in each lane. */
    const uint32_t u = (hi << 24) | (blockIdx.x * blockDim.x + threadIdx.x);
    const float f = __uint_as_float(u), g = __uint_as_float(~u);
    const uint32_t hw = fp8x2_from_float(f, g);
    const uint32_t sw = fmt_fp8_from_float(f) | ((uint32_t)fmt_fp8_from_float(g) << 8);
    if (hw != sw) {
        atomicAdd(bad, 1ull);
        atomicMin(first, (unsigned long long)u);
    }
}

__global__ void decode_all(int *bad) {
    const uint32_t c = threadIdx.x;
    const float2 hw = fp8x2_to_float(c | (c << 8));
    const float sw = fmt_fp8_to_float((uint8_t)c);
    const bool ok = (isnan(sw) && isnan(hw.x) && isnan(hw.y)) ||
                    (__float_as_uint(sw) == __float_as_uint(hw.x) && __float_as_uint(sw) == __float_as_uint(hw.y));
    if (!ok) atomicAdd(bad, 1);
}

int main() {
    unsigned long long *d, h[2];
    int *dbad, hbad = 0;
    if (cudaMalloc(&d, 16) != cudaSuccess || cudaMalloc(&dbad, 4) != cudaSuccess) {
        printf("fp8_exhaustive: no CUDA device\n");
        return 1;
    }
    h[0] = 0, h[1] = ~0ull;
    cudaMemcpy(d, h, 16, cudaMemcpyHostToDevice);
    cudaMemset(dbad, 0, 4);
    for (uint32_t hi = 0; hi < 256; hi++) sweep<<<(1u << 24) / 256, 256>>>(hi, d, d + 1);
    decode_all<<<1, 256>>>(dbad);
    cudaError_t err = cudaDeviceSynchronize();
    cudaMemcpy(h, d, 16, cudaMemcpyDeviceToHost);
    cudaMemcpy(&hbad, dbad, 4, cudaMemcpyDeviceToHost);
    if (err != cudaSuccess) {
        printf("fp8_exhaustive: CUDA error %s\n", cudaGetErrorString(err));
        return 1;
    }
    printf("fp8_exhaustive: cvt.rn.satfinite.e4m3x2 vs fmt_fp8_from_float over 2^32 floats: %llu mismatches%s\n", h[0],
           h[0] ? "" : " (identical)");
    if (h[0]) printf("  first mismatching pattern 0x%08llx\n", h[1]);
    printf("fp8_exhaustive: e4m3 decode vs fmt_fp8_to_float over 256 codes: %d mismatches\n", hbad);
    return h[0] || hbad ? 1 : 0;
}
