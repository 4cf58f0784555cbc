/*
** wgmma_rate_lab.cu — how fast the tensor cores run the W4A8 kernels' instruction, wgmma m64nNk32
** e4m3, at the token tiles N they use, with nothing else in the loop. It bounds what any kernel
** built on that instruction can reach: at 32 rows a expert the W4A8 GEMM issues m64n32k32 with A
** (the converted weights) from registers, and the question is whether that instruction's own rate
** is part of why the compute takes 187 us where the tensor work at the dense peak is ~45 us.
**
** Each warpgroup loops over rounds: fence, G wgmma into one accumulator (G k-steps, as a K group of
** the GEMM), commit, then waits until at most F - 1 rounds are still in flight. CTAs of one warpgroup,
** C of them an SM (grid = SMs * C). Prints per configuration: median µs of 5 launches, the SM clock
** (clock64 against %globaltimer in each CTA), SM cycles per wgmma an SM (the launch's time at that
** clock over the wgmma each SM ran), and TFLOP/s (2 * 64 * N * 32 a wgmma). CTAs that do not fit an SM
** at once run in turn; the columns count the launch as a whole either way.
** Operand bytes are fixed random fp8 patterns (no NaN); the results are not checked (timing only).
*/
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../../src/cuda/wgmma.cuh"
#include "lab_timing.cuh"

constexpr int kRounds = 4096;

/* SS: the A operand (64 rows x 128 bytes) as wgmma's 128-byte swizzle from shared memory as well. */
template <int N, bool kSS, int G, int F>
__global__ void __launch_bounds__(128) rate_kernel(float *out, unsigned long long *stamps, int sink) {
    __shared__ __align__(1024) uint8_t b[128 * 128];
    __shared__ __align__(1024) uint8_t a_s[64 * 128];
    for (int i = threadIdx.x; i < 128 * 128; i += 128) b[i] = (uint8_t)((i * 37 + 11) & 0x37); /* |x| < 1, no NaN */
    for (int i = threadIdx.x; i < 64 * 128; i += 128) a_s[i] = (uint8_t)((i * 53 + 5) & 0x37);
    fence_proxy_async();
    __syncthreads();
    uint32_t a[4];
    for (int r = 0; r < 4; r++) a[r] = 0x30303030u ^ (threadIdx.x * 0x01010101u & 0x07070707u) ^ r;
    float d[N / 2];
    for (int i = 0; i < N / 2; i++) d[i] = 0.0f;
    const uint32_t blo = sw128_desc_lo(b), alo = sw128_desc_lo(a_s);
    unsigned long long g0, g1;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(g0));
    const unsigned long long t0 = clock64();
#pragma unroll 1
    for (int it = 0; it < kRounds; it++) {
        wgmma_fence();
#pragma unroll
        for (int g = 0; g < G; g++) {
            if constexpr (kSS) wgmma_ss<N>(d, sw128_desc(alo + 2 * (g & 3)), sw128_desc(blo + 2 * (g & 3)), 1);
            else wgmma_rs<N>(d, a, sw128_desc(blo + 2 * (g & 3)), 1);
        }
        wgmma_commit();
        wgmma_wait<F - 1>();
    }
    wgmma_wait<0>();
    const unsigned long long t1 = clock64();
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(g1));
    if (threadIdx.x == 0) atomicAdd(&stamps[0], t1 - t0), atomicAdd(&stamps[1], g1 - g0);
    if (sink) /* never at run time: keeps the accumulator live */
        for (int i = 0; i < N / 2; i++) out[threadIdx.x * (N / 2) + i] = d[i];
}

template <int N, bool kSS, int G, int F> static void run(int sms, int C, float *out, unsigned long long *st) {
    double ghz;
    const double t = lab_time_clocked([&] { rate_kernel<N, kSS, G, F><<<sms * C, 128>>>(out, st, 0); }, st, 5, &ghz);
    const double per_sm = (double)kRounds * G * C; /* wgmma an SM */
    const double flops = 2.0 * 64 * N * 32 * per_sm * sms;
    printf("%-3s N=%-4d G=%d F=%d CTAs/SM=%d | %8.1f us | clock %.2f GHz | %6.1f cycles/wgmma/SM | %6.0f TFLOP/s\n", kSS ? "SS" : "RS", N,
           G, F, C, t, ghz, t * 1e3 * ghz / per_sm, flops / t * 1e-6);
}

int main() {
    char title[160];
    snprintf(title, sizeof title, "wgmma m64nNk32 e4m3, %d rounds of G wgmma a warpgroup", kRounds);
    const int sms = lab_sms(title);
    float *out;
    unsigned long long *cyc;
    CU(cudaMalloc(&out, 128 * 64 * sizeof(float)));
    CU(cudaMalloc(&cyc, 2 * sizeof *cyc));
    /* the rate at full occupancy of the tensor pipe, by N */
    for (int C : {1, 2, 4}) {
        run<8, false, 8, 2>(sms, C, out, cyc);
        run<16, false, 8, 2>(sms, C, out, cyc);
        run<32, false, 8, 2>(sms, C, out, cyc);
        run<64, false, 8, 2>(sms, C, out, cyc);
        run<128, false, 8, 2>(sms, C, out, cyc);
        run<32, true, 8, 2>(sms, C, out, cyc);
        run<128, true, 8, 2>(sms, C, out, cyc);
    }
    /* the latency of one group of wgmma: one warpgroup an SM, each round waited for */
    run<32, false, 4, 1>(sms, 1, out, cyc);
    run<32, false, 8, 1>(sms, 1, out, cyc);
    run<32, false, 1, 1>(sms, 1, out, cyc);
    run<64, false, 4, 1>(sms, 1, out, cyc);
    run<128, false, 4, 1>(sms, 1, out, cyc);
    /* the T = 32 kernel's shape: 4 warpgroups an SM, a pair of groups (8 wgmma) then wait */
    run<32, false, 4, 1>(sms, 4, out, cyc);
    run<32, false, 8, 1>(sms, 4, out, cyc);
    run<32, false, 4, 2>(sms, 4, out, cyc);
    CU(cudaFree(out));
    CU(cudaFree(cyc));
    return 0;
}
