/*
** wgmma_contend_lab.cu — does a wgmma in flight take issue slots from the other warps of its
** schedulers? The chain lab (w4a8_chain_lab.cu) fits the T = 32 consumer's step as "its
** instructions plus ~19 cycles for each of its 4 register-A (RS) wgmma", as if each RS wgmma held
** its scheduler for about its tensor time. This lab measures that directly, RS against SS (both
** operands from shared memory), at the token tiles N the W4A8 kernels use.
**
** One CTA an SM: warpgroup 0 loops over rounds of 4 wgmma m64nNk32 (fence, 4 wgmma, commit,
** wait until one round is left in flight) — or, as the control, does nothing — beside A warpgroups
** (0-2) of other work, each thread 8 independent chains, 64 steps a loop iteration (a loop of 8
** issued at ~0.3 a cycle: the back branch): FFMA, or the conversion's kind of integer work (SHF and
** LOP3, 2 instructions a step, a half-rate pipe). Each warpgroup's span in SM cycles (clock64, thread
** 0 of each) is printed: the other work's warp-instructions a scheduler-cycle (the A warpgroups'
** together; each scheduler holds one warp of each warpgroup), and the cycles a wgmma. Variants:
** scale-d = 0 (the wgmma does not read its accumulator, as the first of a group into a partial), and
** the issue (fence to commit) timed by clock64 inside the loop.
** Timing only: operands are fixed fp8 patterns, results unchecked (kept live by a never-taken store).
*/
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "../../src/cuda/wgmma.cuh"
#include "lab_timing.cuh"

constexpr int kRounds = 2048;  /* rounds of 4 wgmma */
constexpr int kAlu = 1024;     /* ALU iterations of 64 FFMA (8 chains, 8 deep) */

enum { kNone, kRS, kSS };
enum { kFfma, kInt }; /* the other warpgroups' work: FFMA chains, or the conversion's kind (SHF + LOP3) */

template <int N, int kMode, int A, int kOp = kFfma, int kScaleD = 1, bool kIssue = false>
__global__ void __launch_bounds__(128 * (1 + A)) contend_kernel(float *out, unsigned long long *spans, int sink) {
    __shared__ __align__(1024) uint8_t b[128 * 128];
    __shared__ __align__(1024) uint8_t a_s[64 * 128];
    for (int i = threadIdx.x; i < 128 * 128; i += blockDim.x) b[i] = (uint8_t)((i * 37 + 11) & 0x37); /* |x| < 1, no NaN */
    for (int i = threadIdx.x; i < 64 * 128; i += blockDim.x) a_s[i] = (uint8_t)((i * 53 + 5) & 0x37);
    fence_proxy_async();
    __syncthreads();
    const unsigned long long t0 = clock64();
    if (threadIdx.x < 128) {
        if constexpr (kMode != kNone) {
            uint32_t a[4];
            for (int r = 0; r < 4; r++) a[r] = 0x30303030u ^ (threadIdx.x * 0x01010101u & 0x07070707u) ^ r;
            float d[N / 2];
            for (int i = 0; i < N / 2; i++) d[i] = 0.0f;
            const uint32_t blo = sw128_desc_lo(b), alo = sw128_desc_lo(a_s);
            unsigned long long issue = 0; /* cycles from the fence to the commit: the round's issue */
#pragma unroll 1
            for (int it = 0; it < kRounds; it++) {
                unsigned long long i0 = 0;
                if constexpr (kIssue) i0 = clock64();
                wgmma_fence();
#pragma unroll
                for (int g = 0; g < 4; g++) {
                    if constexpr (kMode == kSS) wgmma_ss<N>(d, sw128_desc(alo + 2 * g), sw128_desc(blo + 2 * g), kScaleD);
                    else wgmma_rs<N>(d, a, sw128_desc(blo + 2 * g), kScaleD);
                }
                wgmma_commit();
                if constexpr (kIssue) issue += clock64() - i0;
                wgmma_wait<1>();
            }
            wgmma_wait<0>();
            if (threadIdx.x == 0) atomicAdd(&spans[2], issue);
            if (sink)
                for (int i = 0; i < N / 2; i++) out[threadIdx.x * (N / 2) + i] = d[i];
        }
        if (threadIdx.x == 0) atomicAdd(&spans[0], clock64() - t0);
    } else {
        float x[8];
        uint32_t q[8];
        const float m = 0.999f + 1e-7f * threadIdx.x, c = 1e-3f;
        for (int i = 0; i < 8; i++) x[i] = (float)(threadIdx.x + i), q[i] = threadIdx.x * 0x9e3779b9u + i;
#pragma unroll 1
        for (int it = 0; it < kAlu; it++) {
#pragma unroll
            for (int j = 0; j < 64; j++) {
                if constexpr (kOp == kFfma) x[j & 7] = fmaf(x[j & 7], m, c);
                else q[j & 7] = __funnelshift_r(q[j & 7], q[j & 7], 4) & 0x87878787u; /* half of an FFMA step's count */
            }
        }
        if (threadIdx.x % 128 == 0) atomicAdd(&spans[1], clock64() - t0);
        if (sink)
            for (int i = 0; i < 8; i++) out[threadIdx.x * 8 + i] = x[i] + (float)q[i];
    }
}

template <int N, int kMode, int A, int kOp = kFfma, int kScaleD = 1, bool kIssue = false> static void run(int sms, float *out, unsigned long long *spans) {
    double wg = 0, alu = 0, issue = 0;
    const int reps = 5;
    contend_kernel<N, kMode, A, kOp, kScaleD, kIssue><<<sms, 128 * (1 + A)>>>(out, spans, 0); /* warm-up */
    CU(cudaDeviceSynchronize());
    for (int r = 0; r < reps; r++) {
        CU(cudaMemset(spans, 0, 3 * sizeof *spans));
        contend_kernel<N, kMode, A, kOp, kScaleD, kIssue><<<sms, 128 * (1 + A)>>>(out, spans, 0);
        CU(cudaGetLastError());
        unsigned long long h[3];
        CU(cudaMemcpy(h, spans, sizeof h, cudaMemcpyDeviceToHost));
        wg += (double)h[0] / sms / reps, issue += (double)h[2] / sms / reps, alu += A ? (double)h[1] / A / sms / reps : 0; /* mean span */
    }
    const char *name = kMode == kNone ? "none" : kMode == kRS ? "RS" : "SS";
    printf("%-4s N=%-4d scale-d %d A=%d %-4s", name, kMode == kNone ? 0 : N, kScaleD, A, A ? (kOp == kFfma ? "FFMA" : "INT") : "");
    /* the INT step is 2 instructions (SHF, LOP3): counted as such */
    if (A) printf(" | ALU %8.0f cycles, %.3f warp-instr/scheduler/cycle", alu, A * kAlu * 64.0 * (kOp == kInt ? 2 : 1) / alu);
    if (kMode != kNone)
        printf(" | wgmma %8.0f cycles, %5.1f cycles/wgmma", wg, wg / (kRounds * 4.0));
    if (kIssue) printf(", %5.1f of them issuing", issue / (kRounds * 4.0));
    printf("\n");
}

int main() {
    const int sms = lab_sms("one wgmma warpgroup beside A FFMA or integer warpgroups, one CTA an SM");
    float *out;
    unsigned long long *spans;
    CU(cudaMalloc(&out, 256 * 64 * sizeof(float)));
    CU(cudaMalloc(&spans, 3 * sizeof *spans));
    run<32, kNone, 1>(sms, out, spans);
    run<32, kNone, 2>(sms, out, spans);
    run<32, kRS, 0>(sms, out, spans);
    run<32, kRS, 1>(sms, out, spans);
    run<32, kRS, 2>(sms, out, spans);
    run<32, kSS, 0>(sms, out, spans);
    run<32, kSS, 1>(sms, out, spans);
    run<32, kSS, 2>(sms, out, spans);
    run<64, kRS, 0>(sms, out, spans);
    run<64, kRS, 2>(sms, out, spans);
    run<64, kSS, 0>(sms, out, spans);
    run<64, kSS, 2>(sms, out, spans);
    run<128, kRS, 0>(sms, out, spans);
    run<128, kRS, 2>(sms, out, spans);
    run<128, kSS, 0>(sms, out, spans);
    run<128, kSS, 2>(sms, out, spans);
    /* beside the integer pipe (the conversion's SHF and LOP3) */
    run<32, kNone, 2, kInt>(sms, out, spans);
    run<32, kRS, 2, kInt>(sms, out, spans);
    run<32, kSS, 2, kInt>(sms, out, spans);
    run<128, kRS, 2, kInt>(sms, out, spans);
    run<128, kSS, 2, kInt>(sms, out, spans);
    /* a fresh accumulator (scale-d = 0: the first wgmma of a group into a partial) */
    run<32, kRS, 1, kFfma, 0>(sms, out, spans);
    run<32, kRS, 2, kFfma, 0>(sms, out, spans);
    /* the same rounds with the issue (fence to commit) timed by clock64 in the loop, which itself
    ** changes the schedule: read it as where the time goes, not as the undisturbed rate */
    run<32, kRS, 0, kFfma, 1, true>(sms, out, spans);
    run<32, kRS, 2, kFfma, 1, true>(sms, out, spans);
    run<32, kSS, 0, kFfma, 1, true>(sms, out, spans);
    run<32, kSS, 2, kFfma, 1, true>(sms, out, spans);
    run<128, kRS, 0, kFfma, 1, true>(sms, out, spans);
    run<128, kRS, 2, kFfma, 1, true>(sms, out, spans);
    run<128, kSS, 0, kFfma, 1, true>(sms, out, spans);
    run<128, kSS, 2, kFfma, 1, true>(sms, out, spans);
    CU(cudaFree(out));
    CU(cudaFree(spans));
    return 0;
}
