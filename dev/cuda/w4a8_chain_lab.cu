/*
** w4a8_chain_lab.cu — the W4A8 GEMM's consumer work at T = 32 with nothing else: no producer, no
** copies, no mbarriers, no items. Each warpgroup loops over K groups of a 4-stage ring that was filled
** once: two 16-byte shared loads of its weight fragment, the int4 -> e4m3 conversion
** (w4_word_to_fp8), 4 wgmma m64n32k32 (A from registers), the wait, and the promotion
** acc += sw[row] * (sa[col] * part) with the scales read from the stage as the GEMM reads them.
** Steps one at a time (wait for each group) or in pairs (two groups issued, the first promoted
** under the second), as the GEMM's kPairs; optionally two warpgroups a CTA taking turns at issuing
** (the GEMM's named-barrier turns). So it measures how fast the consumer's own chain can run at a
** given number of warpgroups an SM: the floor for the T = 32 kernel's structure, to set against its
** 187 µs with no weight bytes (docs/PERFORMANCE.md, W4A8 session 31).
**
** Prints per configuration: median µs of 5 launches, the SM clock (clock64 against %globaltimer),
** SM cycles per group-step of a warpgroup (per SM, all warpgroups together), and what that rate
** gives for DeepSeek-R1's W13 + W2 at 32 rows an expert (1303 warpgroup group-steps an SM). Results
** are not checked (the operands are fixed patterns; timing only).
*/
#include <cstdio>
#include <vector>

#include "../../src/cuda/wgmma.cuh"
#include "../../src/w4a8_layout.h"
#include "lab_timing.cuh"

constexpr int T = 32, kStages = 4, kGroups = 4096;
constexpr double kSteps32 = 1303.0; /* W13 (32 x 64 x 56 x 2) + W2 (32 x 112 x 16) warpgroup steps, over 132 SMs */

struct alignas(1024) Stage {
    uint8_t b[T * 128];       /* activations: T tokens x 128 k, wgmma's 128-byte swizzle */
    uint8_t w[2 * 128 * 16];  /* one warpgroup's 64 rows x 128 k of int4: [half][thread][16 B] */
    uint16_t sw[64];          /* bf16 weight scales of the rows */
    uint32_t sa[T];           /* fp32 activation scales of the tokens */
};

__device__ __forceinline__ void convert(const Stage &s, int tid, uint32_t (&a)[4][4]) {
    const uint4 h0 = *reinterpret_cast<const uint4 *>(&s.w[tid * 16]);
    const uint4 h1 = *reinterpret_cast<const uint4 *>(&s.w[(128 + tid) * 16]);
    const uint32_t q[8] = {h0.x, h0.y, h0.z, h0.w, h1.x, h1.y, h1.z, h1.w};
#pragma unroll
    for (int ks = 0; ks < 4; ks++) {
        a[ks][0] = w4_word_to_fp8(q[2 * ks], 0, 0);
        a[ks][1] = w4_word_to_fp8(q[2 * ks], 1, 0);
        a[ks][2] = w4_word_to_fp8(q[2 * ks + 1], 0, 0);
        a[ks][3] = w4_word_to_fp8(q[2 * ks + 1], 1, 0);
#pragma unroll
        for (int r = 0; r < 4; r++) reg_fence(a[ks][r]);
    }
}

/* kProbe takes one part out (timing only; the results are wrong): 1 no promotion, 2 no conversion
** (the loaded words go to the wgmma as they are), 3 no weight loads either (the registers of the
** last load), 4 no wgmma (the promotion works on the converted words). */
template <int kProbe>
__device__ __forceinline__ void issue(const Stage &s, int tid, uint32_t (&a)[4][4], float (&part)[T / 2]) {
    if (kProbe == 2) {
        const uint4 h0 = *reinterpret_cast<const uint4 *>(&s.w[tid * 16]), h1 = *reinterpret_cast<const uint4 *>(&s.w[(128 + tid) * 16]);
        const uint32_t q[8] = {h0.x, h0.y, h0.z, h0.w, h1.x, h1.y, h1.z, h1.w};
#pragma unroll
        for (int ks = 0; ks < 4; ks++)
#pragma unroll
            for (int r = 0; r < 4; r++) a[ks][r] = q[(2 * ks + r / 2) & 7], reg_fence(a[ks][r]);
    } else if (kProbe != 3) {
        convert(s, tid, a);
    }
    if constexpr (kProbe == 4) {
#pragma unroll
        for (int q = 0; q < T / 2; q++) part[q] = __uint_as_float(a[q / 4][q % 4] & 0x3f7fffffu);
    } else {
#pragma unroll
        for (int q = 0; q < T / 2; q++) reg_fence(part[q]);
        wgmma_fence();
        const uint32_t lo = sw128_desc_lo(s.b);
#pragma unroll
        for (int ks = 0; ks < 4; ks++) wgmma_rs<T>(part, a[ks], sw128_desc(lo + 2 * ks), ks);
        wgmma_commit();
    }
}

template <bool kSa, int kProbe> __device__ __forceinline__ void promote(const Stage &s, int tid, float (&part)[T / 2], float (&acc)[T / 2]) {
    if constexpr (kProbe == 1) { /* one add keeps the wgmma (ptxas drops one whose results are all unused) */
        acc[0] += part[0];
    } else {
#pragma unroll
        for (int q = 0; q < T / 2; q++) reg_fence(part[q]);
        const int row = ((tid >> 5) & 3) * 16 + ((tid & 31) >> 2);
        const float sw0 = __uint_as_float((uint32_t)s.sw[row] << 16), sw1 = __uint_as_float((uint32_t)s.sw[row + 8] << 16);
#pragma unroll
        for (int jj = 0; jj < T / 8; jj++) {
            const uint2 wv = *reinterpret_cast<const uint2 *>(&s.sa[jj * 8 + 2 * (tid & 3)]);
#pragma unroll
            for (int c = 0; c < 2; c++) {
                float x0 = part[jj * 4 + c], x1 = part[jj * 4 + 2 + c];
                if (kSa) {
                    const float sa = __uint_as_float(c ? wv.y : wv.x);
                    x0 = __fmul_rn(x0, sa), x1 = __fmul_rn(x1, sa);
                }
                acc[jj * 4 + c] = fmaf(x0, sw0, acc[jj * 4 + c]);
                acc[jj * 4 + 2 + c] = fmaf(x1, sw1, acc[jj * 4 + 2 + c]);
            }
        }
    }
}

/* kWg warpgroups a CTA; with kWg = 2 they take turns at issuing (bar 1 / 2), as the GEMM's consumers. */
template <bool kPairs, bool kSa, int kWg, int kProbe = 0>
__global__ void __launch_bounds__(128 * kWg) chain_kernel(float *out, unsigned long long *stamps, int sink) {
    extern __shared__ __align__(1024) uint8_t smem_raw[];
    Stage *ring = reinterpret_cast<Stage *>(smem_raw + ((1024u - (smem_u32(smem_raw) & 1023u)) & 1023u)) + 0;
    const int tid = threadIdx.x & 127, wg = threadIdx.x >> 7;
    ring += wg * kStages;
    for (int i = tid; i < kStages * (int)sizeof(Stage); i += 128) {
        uint8_t *p = reinterpret_cast<uint8_t *>(ring) + i;
        const int off = i % (int)sizeof(Stage);
        *p = off < (int)offsetof(Stage, sw) ? (uint8_t)((i * 37 + 11) & 0x37) : (uint8_t)(off & 1 ? 0x3c : 0x00); /* scales ~1 */
    }
    fence_proxy_async();
    __syncthreads();
    unsigned long long c0 = clock64(), g0;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(g0));
    float acc[T / 2];
#pragma unroll
    for (int i = 0; i < T / 2; i++) acc[i] = 0.0f;
    uint32_t a0[4][4], a1[4][4]; /* kProbe 3: the first load's words throughout */
    convert(ring[0], tid, a0), convert(ring[1], tid, a1);
    const int mine = 1 + wg, yours = 2 - wg;
    if (kWg == 2 && wg == 1) named_bar_arrive(1, 256); /* warpgroup 0 issues first */
#pragma unroll 1
    for (int g = 0; g < kGroups;) {
        float part0[T / 2], part1[T / 2];
        if (kWg == 2) named_bar_sync(mine, 256);
        if (kPairs) {
            issue<kProbe>(ring[g % kStages], tid, a0, part0);
            issue<kProbe>(ring[(g + 1) % kStages], tid, a1, part1);
            if (kWg == 2) named_bar_arrive(yours, 256);
            wgmma_wait<1>();
            promote<kSa, kProbe>(ring[g % kStages], tid, part0, acc);
            wgmma_wait<0>();
            promote<kSa, kProbe>(ring[(g + 1) % kStages], tid, part1, acc);
            g += 2;
        } else {
            issue<kProbe>(ring[g % kStages], tid, a0, part0);
            if (kWg == 2) named_bar_arrive(yours, 256);
            wgmma_wait<0>();
            promote<kSa, kProbe>(ring[g % kStages], tid, part0, acc);
            g += 1;
        }
    }
    if (kWg == 2 && wg == 0) named_bar_sync(1, 256); /* warpgroup 1's last arrival */
    unsigned long long c1 = clock64(), g1;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(g1));
    if (tid == 0) atomicAdd(&stamps[0], c1 - c0), atomicAdd(&stamps[1], g1 - g0);
    if (sink)
        for (int i = 0; i < T / 2; i++) out[threadIdx.x * (T / 2) + i] = acc[i];
}

template <bool kPairs, bool kSa, int kWg, int kProbe = 0> static void run(int sms, int ctas, float *out, unsigned long long *st) {
    static const char *probes[] = {"", " no promotion", " no conversion", " no weight loads", " no wgmma"};
    const size_t smem = kWg * kStages * sizeof(Stage) + 1024;
    auto k = chain_kernel<kPairs, kSa, kWg, kProbe>;
    CU(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    int fit = 0;
    CU(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&fit, k, 128 * kWg, smem));
    cudaFuncAttributes fa;
    CU(cudaFuncGetAttributes(&fa, k));
    if (fit < ctas) {
        printf("%-6s %s %d WG/CTA x %d CTAs/SM: only %d CTAs fit (%d registers), skipped\n", kPairs ? "pairs" : "single",
               kSa ? "(a)" : "(b)", kWg, ctas, fit, fa.numRegs);
        return;
    }
    double ghz;
    const double t = lab_time_clocked([&] { k<<<sms * ctas, 128 * kWg, smem>>>(out, st, 0); }, st, 5, &ghz);
    const double mhz = ghz * 1e3;
    const double steps = (double)kGroups * kWg * ctas; /* warpgroup group-steps an SM */
    const double cyc = t * mhz / steps;
    printf("%-6s %s %d WG/CTA x %d CTAs/SM (%3d regs) | %7.1f us | %4.0f MHz | %6.1f cycles a step an SM | W13 + W2 at 32 rows: %6.1f us%s\n",
           kPairs ? "pairs" : "single", kSa ? "(a)" : "(b)", kWg, ctas, fa.numRegs, t, mhz, cyc, kSteps32 * cyc / mhz, probes[kProbe]);
}

int main() {
    char title[160];
    snprintf(title, sizeof title, "T = 32 consumer chain, %d groups a warpgroup, %d stages filled once", kGroups, kStages);
    const int sms = lab_sms(title);
    float *out;
    unsigned long long *st;
    CU(cudaMalloc(&out, 256 * T / 2 * sizeof(float)));
    CU(cudaMalloc(&st, 2 * sizeof *st));
    for (int c : {1, 2, 4, 6, 8}) {
        run<false, true, 1>(sms, c, out, st);
        run<true, true, 1>(sms, c, out, st);
    }
    run<true, false, 1>(sms, 4, out, st);
    for (int c : {1, 2, 3}) {
        run<false, true, 2>(sms, c, out, st);
        run<true, true, 2>(sms, c, out, st);
    }
    run<true, false, 2>(sms, 2, out, st);
    /* the GEMM's shape with one part taken out at a time (timing probes) */
    run<true, true, 2, 1>(sms, 2, out, st);
    run<true, true, 2, 2>(sms, 2, out, st);
    run<true, true, 2, 3>(sms, 2, out, st);
    run<true, true, 2, 4>(sms, 2, out, st);
    run<true, true, 1, 1>(sms, 4, out, st);
    run<true, true, 1, 4>(sms, 4, out, st);
    CU(cudaFree(out));
    CU(cudaFree(st));
    return 0;
}
