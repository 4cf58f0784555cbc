/*
** fp8_exhaustive.cu — proves that the conversion instructions the kernels use give the bytes of
** format.h's rules: cvt.rn.satfinite.e4m3x2.f32 vs fmt_fp8_from_float on all 2^32 float bit
** patterns (both lanes of the pair), the e4m3 -> f16 -> f32 decode vs fmt_fp8_to_float on all
** 256 codes (NaN compared as NaN), cvt.rn.bf16x2.f32 vs fmt_bf16_from_float on all 2^32 floats
** (NaN as NaN), and silu_mul's branch-free silu8 vs the IEEE expression g / (1 + expf(-g)) with
** __fdiv_rn on all 65536 bf16 gate values. A mismatch here means the GPU and CPU paths disagree.
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
    const uint32_t hb = bf16x2_rn(f, g), sb = fmt_bf16_from_float(f) | ((uint32_t)fmt_bf16_from_float(g) << 16);
    const bool lo_ok = (hb & 0xFFFFu) == (sb & 0xFFFFu) || (isnan(f) && isnan(bf16_lo(hb)));
    const bool hi_ok = (hb >> 16) == (sb >> 16) || (isnan(g) && isnan(bf16_hi(hb)));
    if (!lo_ok || !hi_ok) {
        atomicAdd(bad + 2, 1ull);
        atomicMin(first + 2, (unsigned long long)u);
    }
}

/* silu8 against the expression the reference writes, one __fdiv_rn at a time. Each thread takes
** the gate value of code t eight times (silu8 then takes its fast path wherever that value is in
** its range) and the eight codes 8 (t % 8192) .. + 7 (lanes kept apart; ranges mixed at the edges). */
__global__ void silu_all(unsigned long long *bad, unsigned long long *first) {
    const uint32_t t = blockIdx.x * blockDim.x + threadIdx.x;
    for (int pass = 0; pass < 2; pass++) {
        float g[8], s[8];
        for (int h = 0; h < 8; h++) g[h] = __uint_as_float((pass ? 8 * (t % 8192) + h : t) << 16);
        silu8(g, s);
        for (int h = 0; h < 8; h++) {
            const float want = __fdiv_rn(g[h], __fadd_rn(1.0f, expf(-g[h])));
            if (__float_as_uint(s[h]) != __float_as_uint(want) && !(isnan(s[h]) && isnan(want))) {
                atomicAdd(bad, 1ull);
                atomicMin(first, (unsigned long long)(__float_as_uint(g[h]) >> 16));
            }
        }
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
    unsigned long long *d, h[6];
    int *dbad, hbad = 0;
    if (cudaMalloc(&d, sizeof h) != cudaSuccess || cudaMalloc(&dbad, 4) != cudaSuccess) {
        printf("fp8_exhaustive: no CUDA device\n");
        return 1;
    }
    for (int i = 0; i < 6; i += 2) h[i] = 0, h[i + 1] = ~0ull; /* {count, first} of fp8, bf16, silu */
    cudaMemcpy(d, h, sizeof h, cudaMemcpyHostToDevice);
    cudaMemset(dbad, 0, 4);
    for (uint32_t hi = 0; hi < 256; hi++) sweep<<<(1u << 24) / 256, 256>>>(hi, d, d + 1);
    decode_all<<<1, 256>>>(dbad);
    silu_all<<<65536 / 256, 256>>>(d + 4, d + 5);
    cudaError_t err = cudaDeviceSynchronize();
    cudaMemcpy(h, d, sizeof h, cudaMemcpyDeviceToHost);
    cudaMemcpy(&hbad, dbad, 4, cudaMemcpyDeviceToHost);
    if (err != cudaSuccess) {
        printf("fp8_exhaustive: CUDA error %s\n", cudaGetErrorString(err));
        return 1;
    }
    printf("fp8_exhaustive: cvt.rn.satfinite.e4m3x2 vs fmt_fp8_from_float over 2^32 floats: %llu mismatches%s\n", h[0],
           h[0] ? "" : " (identical)");
    if (h[0]) printf("  first mismatching pattern 0x%08llx\n", h[1]);
    printf("fp8_exhaustive: e4m3 decode vs fmt_fp8_to_float over 256 codes: %d mismatches\n", hbad);
    printf("fp8_exhaustive: cvt.rn.bf16x2 vs fmt_bf16_from_float over 2^32 floats: %llu mismatches\n", h[2]);
    if (h[2]) printf("  first mismatching pattern 0x%08llx\n", h[3]);
    printf("fp8_exhaustive: silu8 vs g / (1 + expf(-g)) over 65536 bf16: %llu mismatches\n", h[4]);
    if (h[4]) printf("  first mismatching bf16 code 0x%04llx\n", h[5]);
    return h[0] || hbad || h[2] || h[4] ? 1 : 0;
}
