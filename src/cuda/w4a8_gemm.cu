/*
** w4a8_gemm.cu — masked grouped GEMM, int4 weights x fp8 activations -> bf16, on Hopper wgmma.
** Spec: epmoe_w4a8_gemm_ref. Weight layout and conversion: w4a8_layout.h. The same kernels run
** the fp8-block scheme's expert GEMM (fp8 weights with 128 x 128 block scales, read by the tensor
** cores from shared memory: kWt; spec epmoe_expert_gemm_ref), and the bf16 scheme's from 33 rows
** (bf16 weights and tokens, no scales).
**
** Swap-AB: weights are wgmma's A operand (64 rows per warpgroup, converted in registers: 3
** integer ops per 8 weights), the tokens of one expert are N (tile T = 8..128, from expected_m).
** (fp8 weights at T = 128 the other way round: tokens as M, kTokM.)
** Two (computing) warpgroups of a CTA own 128 weight rows x T tokens and walk K in 128-wide groups, two
** per pipeline step to T = 16 (groups 2s and 2s + 1; the last step of an item has one when K/128
** is odd), one for larger tiles (kGroups).
** After the 4 wgmma of a group it promotes the group's fp32 partial with the scales, in group order:
**   acc += sw[n, g] * (sa[m, g] * partial)       (mode a, per-token 1x128 activation scales)
**   acc += sw[n, g] * partial, x sa at the end   (mode b, one per-tensor activation scale)
** so every product is exact and nothing is rounded twice. Two groups a step halve the step's fixed
** cost per weight byte (barriers, the producer's issue; to T = 16 also the wgmma commit and wait:
** both groups' 8 wgmma in flight together, kPairedT): decode (T = 8) was latency/issue bound with
** DRAM ~65% busy at one group a step. Each step's stage is filled by warp 0 (kProducerWarp): bulk
** copies (the 16 KB weight tiles of both groups, contiguous in the repacked layout; the 128 bf16
** scales of each), TMA tensor copies (T rows x 128 activation bytes per group, in wgmma's swizzle) and
** cp.async (the activation scales), completing on one mbarrier; S stages in flight. To T = 16
** warp 0 also computes; T = 24 to 80 (in eights), 96, 112 and 128 have a producer warpgroup of
** their own, and T = 24, 32 and 96 to 128 take steps in pairs into two partials (kWarpSpecialized,
** kPairs, w4a8_gemm_ws_kernel).
**
** Work: persistent CTAs. Each reads masked_m on the device (CUDA-graph safe) and counts m-tiles
** per expert with a warp scan; items (expert, n-tile, m-tile; empty experts have none) x K steps
** form one step sequence. T >= 40 deals whole waves of items round-robin first (L2 reuse,
** kDataParallel); the rest is split into equal ranges per CTA (stream-K, see the kernel), or,
** with no workspace for the partials (the fp8-block and bf16 entries), into ranges of whole items.
*/
#include <cstddef> /* offsetof */
#include <cuda.h>   /* CUtensorMap */
#include <cudaTypedefs.h>

#include "common.cuh"
#include "w4a8_layout.h"
#include "wgmma.cuh"

namespace {

constexpr int kThreads = 256;

/* ---- dev only (-DEPMOE_W4A8_TRACE, `make dev-trace`): when each CTA ran --------------------
** globaltimer per CTA at entry, when its first stage landed, after its last step and at exit, to
** tell the launch ramp from the tail: Nsight Compute gives totals only (at decode the SMs are
** active 90-93% of the elapsed cycles, 2026-11-30). Nothing of it is compiled in otherwise. */
#ifdef EPMOE_W4A8_TRACE
constexpr int kTraceCtas = 4096;
__device__ unsigned long long g_trace[kTraceCtas][5]; /* 4 stamps, then the CTA's SM */
__device__ __forceinline__ void trace_point(int pt, int slot, int lead) {
    if ((int)threadIdx.x == lead && slot < kTraceCtas) {
        unsigned long long t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
        g_trace[slot][pt] = t;
        if (pt == 0) {
            unsigned sm;
            asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
            g_trace[slot][4] = sm;
        }
    }
}
/* a GEMM with N > K (an MLP's GEMM2) stamps the upper half: one MLP call leaves both */
/* stamped by thread `lead`: the first consumer thread for points 1 and 2 (warp-specialized consumers start at 128) */
#define W4_TRACE_BY(pt, lead) trace_point(pt, (int)blockIdx.x + (p.N > p.K ? kTraceCtas / 2 : 0), lead)
#define W4_TRACE(pt) W4_TRACE_BY(pt, 0)
#else
#define W4_TRACE_BY(pt, lead) ((void)0)
#define W4_TRACE(pt) ((void)0)
#endif

/* K groups per pipeline step: two to kPairedT tokens, both groups' 8 wgmma in flight into two
** partials, one commit, one wait. Larger tiles take one group a step (the warp-specialized kernel
** pairs steps instead, at T = 24, 32 and 80-128): in the 256-thread kernel a second partial and 16 more fragment registers
** spilled (T = 64 at its 128 registers, T = 128 at 255), and two groups one after the other
** measured 3-8% slower at 128-1024 rows (fewer stages in the same bytes; bench_w4a8, H200,
** 2026-11-30). Registers with pairs (ptxas -v, CUDA 13.0): T = 8 71-79, 16
** 92-98, 32 117-128. kPairedT = 8 (T = 16 one group a step, 6 stages at 3 CTAs/SM, 58-62
** registers) measured slower at 16 rows: 249 against 224 us (DeepSeek-R1 W13 + W2, 2026-11-30).
** T = 32 runs warp-specialized since 2026-12-01 (see kWarpSpecialized), one group a step. */
constexpr int kPairedT = 16;
template <int T> constexpr int kGroups = T <= kPairedT ? 2 : 1;
/* Warp 0 issues every stage's loads, after its own wgmma of the step are in flight: lane 0 the
** bulk copies and the activations' tensor copies (TMA, in wgmma's swizzle), the lanes the activation
** scales (cp.async, up to kTok = ceil(T / 32) tokens each). The other warps run no producer code: at T = 8 every
** thread's address updates and arrivals were a quarter of the kernel's issue slots (Nsight Compute,
** 2026-11-30). */
constexpr int kProducerWarp = 0;
/* Named barriers: 1 is the consumer warpgroups' own barrier in the warp-specialized kernel
** (kConsumerBar); in the other, kStageBar + s says every warp is done with stage s (the other warps arrive, the producer warp syncs before refilling it:
** one arrival per warp in hardware; an mbarrier took 32 arrivals per warp, or a __syncwarp and one
** lane's arrival that racecheck cannot follow). */
constexpr int kConsumerBar = 1, kStageBar = 3;
/* The warp-specialized kernel's consumer warpgroups take turns at issuing their wgmma (kTurnBar + w
** is warpgroup w's turn; that kernel uses no kStageBar). Both read the same stages, so without turns
** they ran in step: both issued, both waited, and both promoted their last partial while the tensor
** cores idled (Nsight Compute, fp8-block W13 at 1024 rows: a wgmma wait or a stage wait in a quarter
** of the stall samples outside the producer's idle warps, the tensor pipe 57% busy). With turns, one
** promotes while the other's wgmma run. W13 + W2, DeepSeek-R1, medians of three interleaved runs
** each (bench_w4a8, H200, 2026-12-01): W4A8 mode (a) 32 rows 220.8 -> 218.3 us, 64 296.6 -> 289.9,
** 128 495.5 -> 471.0, 256 907.2 -> 891.6, 1024 3740.5 -> 3672.3; fp8-block 128 477.2 -> 454.0, 256
** 955.5 -> 928.6, 1024 3300.1 -> 3201.3; 80 rows and bf16 the same (docs/PERFORMANCE.md, session 25). */
constexpr int kTurnBar = 2;
/* T = 24 and up run warp-specialized (w4a8_gemm_ws_kernel): a producer warpgroup that
** gives its registers to the two consumer warpgroups (setmaxnreg), and at T = 24, 32 and 96-128 each
** consumer takes an item's steps in pairs into two partials (kPairs), promoting the first while the
** second's wgmma run. The 256-thread kernel at T = 128 (warp 0 also the producer, one partial, the warpgroups taking turns
** at the tensor cores) ran W13 at 1024 rows at 620-655 TFLOP/s in mode (a), 833 in mode (b), this
** one 828-836 and 1062-1092; at T = 64 (2 CTAs/SM there) W13 + W2 at 40 and 64 rows went 351-356
** -> 328-332 us (bench_w4a8, DeepSeek-R1, H200, 2026-12-01).
** T = 32 runs it at 2 CTAs/SM (kWsCtas: 80 registers a thread at launch, 32 / 104 after setmaxnreg;
** 8 one-group stages a CTA then, 5 since), so an SM keeps four computing warpgroups, as the
** 256-thread kernel did: W13 + W2 at 20 and 32 rows 228-231 -> 218-224 us against that kernel (2 CTAs/SM, two groups a
** step, warp 0 also computing). At 1 CTA/SM (16 or 12 stages) it had been 6-9% slower, and T = 16
** warp-specialized at 2 CTAs/SM measured the same as the 256-thread kernel (204 us at 16 rows), which
** it keeps (bench_w4a8, DeepSeek-R1, H200, 2026-12-01).
** T = 64 runs at 2 CTAs/SM too, one step at a time (kPairs): its accumulator, one partial and one
** step's fragments fit the 104 registers where a pair's second partial and fragments would not.
** Four computing warpgroups an SM, each waiting on its own step, beat two that pair their steps:
** W13 + W2 at 40 and 64 rows 330-331 / 332 -> 298-299 / 303 us (1 CTA/SM with pairs; bench_w4a8,
** DeepSeek-R1, H200, 2026-12-01). fp8-block and bf16 measured the same either way at T = 64.
** T = 40, 48 and 56 (int4 only: 33-40, 41-48, 49-56 rows) run as T = 64 does (2 CTAs/SM, one step at
** a time, 4 stages, whole waves first: kDataParallel), with 5/8, 3/4 and 7/8 of its tensor and
** promotion work, which bound these sizes: W13 + W2 at 33-40 rows 286-287 -> 234-236 us, 48 rows
** 289 -> 250-251, 56 rows 291-292 -> 273 (DeepSeek-R1, H200, 2026-12-01). T = 48 measured 1% slower
** without the whole waves first and 2-3% slower at 6 stages. T = 24 (int4, 17-24 rows) runs as T = 32
** (pairs, 5 stages): 17-24 rows 214-215 -> 204-207 us. T = 96 and 112 (int4, 81-112 rows) run as
** T = 128 (1 CTA/SM, pairs, 8 stages): 96 rows 478-480 -> 413-414, 112 rows 490-501 -> 454-455 (the
** same bench and day). T = 72 and 80 (int4, 65-80 rows) run as T = 64 (2 CTAs/SM, one step at a
** time, 4 stages): at 72 / 80 rows 370.9 / 373.2 -> 315.7 / 330.6 us against T = 80 as T = 128 runs
** (bench_w4a8, DeepSeek-R1, H200, 2026-12-01; their stream-K slots grew the workspace's share to
** 80 KB an SM, kSlotBytesPerSm).
** At T = 24 and 32 the pairs are what pays: one step at a time measured 1.5-5% slower at 17-32 rows,
** at 2 CTAs/SM and at 3 (72 registers a consumer: six computing warpgroups an SM, no faster than
** four); so did clusters of two CTAs sharing the activation tile by TMA multicast, 6-7% slower at
** 28-32 rows, the two CTAs waiting for each other every stage (bench_w4a8, DeepSeek-R1, H200,
** 2026-12-01).
** Pairs only: with four or eight groups in flight between full waits ptxas keeps every group's A
** fragments live and spills 38-100 registers (the lab's U = 4 and 8: 643 and 623 TFLOP/s).
** Splitting a step's tile into two token halves in two commit groups measured 5-6% slower (the A
** fragments go to the tensor cores twice), and so did two 128-row weight tiles per CTA sharing the
** activations at T = 32 (512 threads, 1 CTA/SM: 2-6% slower at 32 rows); H200, 2026-11-30,
** branches w4-halves and w4-w2. */
template <int T> constexpr bool kWarpSpecialized = T >= 24;
template <int T> constexpr int kWsCtas = T <= 80 ? 2 : 1;
template <int T> constexpr bool kPairs = T == 24 || T == 32 || T > 80; /* steps in pairs into two partials (see above) */
constexpr int kWsThreads = 384; /* producer warpgroup + two consumer warpgroups */
/* setmaxnreg: what the producer warpgroup keeps and each consumer thread gets. They must fit in what
** the CTA was given at launch (launch() checks ptxas's count: 1 CTA/SM 384 x 168 = 128 x 40 +
** 256 x 232; T = 24 to 80 at 2 CTAs/SM 384 x 80 = 128 x 32 + 256 x 104), or the consumers'
** setmaxnreg.inc would wait forever. */
template <int T> constexpr int kWsProducerRegs = kWsCtas<T> == 2 ? 32 : 40;
template <int T> constexpr int kWsConsumerRegs = kWsCtas<T> == 2 ? 104 : 232;
/* A consumer thread's index, 0..255: its fragments, weight rows and slot column. */
template <int T> __device__ __forceinline__ int consumer_tid() { return (int)threadIdx.x - (kWarpSpecialized<T> ? 128 : 0); }
/* The tile's weight row of the thread's accumulator rows 0 and 1 (row + 8 holds 2 and 3); with
** tokens as M (kTokM) the tile's token. */
template <int T> __device__ __forceinline__ int acc_row() {
    const int tid = consumer_tid<T>();
    return (tid >> 7) * 64 + ((tid >> 5) & 3) * 16 + ((tid & 31) >> 2);
}

/* The weights (kWt): int4 in the repacked layout, converted to the fp8 A operand in registers (the
** offset or the full encoding, w4a8_layout.h); or fp8 in the fp8-block scheme's checkpoint layout
** ([E, N, K] bytes, one fp32 scale per 128 x 128 block), a 128 x 128 TMA box a group in wgmma's
** 128-byte swizzle, read by the tensor cores straight from shared memory (wgmma SS). Before, the
** fp8-block expert GEMM ran mma.sync with both operands converted to f16 (expert_gemm.cu).
** fp8 weights run the warp-specialized kernel only (T >= 32: at decode the bytes, not the tile's
** tokens, set the time). bf16 weights (the bf16 scheme, kWtBf16) the same way, with bf16 tokens
** and no scales: a "group" is then 128 bytes of K (64 elements) and K is counted in bytes. bf16 also
** takes a 256-token tile from 129 expected rows (its accumulator, kAccDirect, is all it holds: 128
** registers): W13 + W2 at 129 / 192 / 256 / 512 / 1024 rows 1380 / 1277-1304 / 1264-1347 /
** 2545-2589 / 5017-5038 -> 1060-1124 / 1106-1110 / 1184 / 2259-2392 / 4612-4633 us (each weight
** tile read once for 256 tokens instead of 128, where L2 was 86% busy; DeepSeek-R1, bench_w4a8,
** H200, the same call, 2026-12-01). */
constexpr int kWtInt4 = 0, kWtInt4Full = 1, kWtFp8 = 2, kWtBf16 = 3;
template <int kWt> constexpr bool kWtTma = kWt >= kWtFp8; /* weights by TMA box, read by wgmma SS */
template <int kWt> constexpr int kWGroupBytes = kWtTma<kWt> ? W4_TILE_N * W4_GROUP : W4_TILE_BYTES;
/* Tokens as wgmma's M (kTokM): at T = 128 the fp8 weights need no registers, so either operand can
** be A. With the tile's 128 tokens as M (64 per warpgroup) and its 128 weight rows as N, a thread's
** accumulator holds 2 tokens x 32 weight rows instead of 2 weight rows x 32 tokens: the promotion
** needs 2 activation scales a group instead of T / 4 (one FMA an element either way), and the
** tile goes to the storer warps as token rows, by stmatrix without .trans (hand_over). (The DeepGEMM
** layout; the same shared-memory reads.)
** fp8-block W13 + W2 at 128 / 256 / 1024 rows: 464-467 / 969-976 / 3455-3471 -> 430 / 872-877 /
** 3177-3217 us. bf16 weights (no promotion) measured 1-3% slower this way, so they keep weights as M
** (DeepSeek-R1, H200, same call, 2026-12-01). A 256-token tile (two m64 halves a warpgroup, the
** accumulator rescaled in place by s_prev / s_new to leave no partial) measured the same at 256-1024
** rows with L2 59% busy instead of 80%: the busiest SM pipe (the tensor cores') stays at 55-57%
** (Nsight Compute, W13 at 1024 rows, H200, 2026-12-01). In place it would also
** lose the promotion: the fp8 tensor core keeps ~14 bits of the running sum (see epmoe.h). */
template <int T, int kWt> constexpr bool kTokM = kWt == kWtFp8 && T == 128;
/* bf16 weights: no scales, so their wgmma accumulate straight into the accumulator (scale-d = 1): no
** partial, no fp32 add a step, and 64 registers fewer at T = 128. W13 + W2 at 128 / 256 / 1024 rows
** 786-807 -> 767, 1582-1601 -> 1268-1275, 5825-5876 -> 5031-5068 us (DeepSeek-R1, bench_w4a8, H200,
** the same call, 2026-12-01); the sums' order changed, not their bound. */
template <int kWt> constexpr bool kAccDirect = kWt == kWtBf16;
static_assert(W4_TILE_N == 128, "kTokM: the weight tile is wgmma's N = 128 = T, so part[T / 2] and wgmma_ss<T> hold");

/* Tiles to T = 32 copy their weights evict-first in L2. Their CTAs walk stream-K ranges only, so the
** ~12 CTAs that share an expert's activations read each group of them at different times over the
** whole launch; streamed in at the normal priority, the weights (read once) pushed those rows out
** between the reads, and every miss went back to DRAM. Evict-first, W13 + W2 at 1 / 8 / 32 rows went
** 187.8-188.1 -> 178.7-179.3, 193.6-193.8 -> 182.2-182.5, 218.7-218.9 -> 214.6-215.8 us (DeepSeek-R1;
** Kimi-K2 in another call 275.1 -> 262.8-263.8, 286.8-287.8 -> 271.2-273.3, 334.9-335.3 ->
** 323.5-324.0), fp8-block at 1-32 rows 1-3% faster (bf16 runs mma.sync there). Tiles from T = 40
** deal whole waves first (the CTAs that share an expert's activations read them together): there
** evict-first bought nothing (W4A8 at 64 rows 300 us either way) and cost fp8-block and bf16 7% at 64
** rows (378 -> 405, 709 -> 761 us), and at T = 128 it cost W4A8 3-4% at 1024 rows (bench_w4a8, H200,
** 2026-12-01). */
template <int T> constexpr bool kWeightsOnce = T <= 32;

/* One step's groups, [h] = group kGroups * s + h. A step with one group of two (K/128 odd, the
** item's last) leaves the [1] halves stale. */
template <int T, int kWt> struct alignas(1024) Stage {
    uint8_t w[kGroups<T>][kWGroupBytes<kWt>]; /* int4: the threads' fragments, [half][thread][16] (w4a8_layout.h);
                                                 fp8, bf16: 128 rows x 128 bytes in the 128-byte swizzle */
    uint8_t a[kGroups<T>][T][128];          /* activations: token t's 128 bytes of the group, 16-byte chunk c
                                               at (c ^ t % 8) * 16 (the 128-byte swizzle of TMA and wgmma) */
    uint16_t sw[kGroups<T>][W4_TILE_N];     /* weight scales of the tile's rows, bf16 (2^9 folded in); 256
                                               bytes a group, after a: bulk-copy destinations 16-byte aligned.
                                               fp8: the block's fp32 scale in the first 4 bytes */
    uint32_t sa[kGroups<T>][T];             /* activation scale words: fp32 bits, or the UE8M0 word ([0]
                                               only: a step's two groups share it, see Producer) */
};

struct Problem {
    const uint8_t *qw;
    const uint16_t *sw; /* bf16 */
    const float *bs;    /* fp8 weights: the block scales [E, N/128, G] */
    const uint8_t *a;
    const uint8_t *sa;
    const float *sa_tensor;
    const int32_t *masked_m;
    uint16_t *out;
    int64_t N, K, M, row_stride, expert_stride, sa_slab;
    int64_t sa_tok, sa_step; /* activation scales: bytes to the next token's word, to the next
                                group's (UE8M0: the next 4 groups'), from fmt_scale_offset */
    int E, NT, G, fmt;
    float *slots;    /* stream-K: one fp32 partial tile per CTA, [cta][T/2][256] */
    uint32_t *flags; /* flag[cta] = epoch + 1 once its partial tile is in slots */
    unsigned long long *sync; /* the launch counter (launch_epoch) */
    size_t slots_bytes;
};

/* One work item: expert, token tile, weight tile, valid rows of the expert. */
struct Item {
    int e, mt, nt, rows;
};

/* Token tiles from which whole waves of items go to the CTAs round-robin before the stream-K
** tail (kDataParallel). With stream-K ranges alone, the CTAs run items ~steps/P apart: at 1024 rows
** (T = 128) they read 11.9 GB from DRAM for 0.7 GB of operands, L2 hit rate 20% and L2 throughput
** 95% (Nsight Compute, W13 DeepSeek-R1, H200 2026-11-30). In a wave the 132 CTAs share weight tiles
** and activation tiles through L2: L2 hit rate 90%, DRAM 7% busy; W13 + W2 at 1024 rows 5030 ->
** 4660 us. Decode tiles read each weight once either way. */
template <int T> constexpr bool kDataParallel = T >= 40;

/* A CTA's work, in shared memory (see the kernel's note on registers): dp steps of whole items
** (waves x P: items w * grid + r), then its stream-K range of the tail items. */
struct Range {
    int64_t total;   /* the tail's steps (all CTAs) */
    int64_t tail0;   /* the tail's first item */
    int64_t first;   /* the item of the CTA's first tail step */
    int off, steps;  /* that step's index within its item; the CTA's steps (whole items and tail) */
    int dp;          /* the CTA's steps of whole items */
    uint32_t epoch;  /* the launch's number (launch_epoch) */
};

/* The item of a CTA's step j, and the first group of its first step in that item (the stream-K
** range may begin inside one). */
template <int T>
__device__ __forceinline__ int64_t step_item(const Range &rg, int r, int grid, int P, int j) {
    if (kDataParallel<T> && j < rg.dp) return (int64_t)((uint32_t)j / (uint32_t)P) * grid + r;
    return rg.first + (uint32_t)(rg.off + j - (kDataParallel<T> ? rg.dp : 0)) / (uint32_t)P;
}
template <int T> __device__ __forceinline__ int step_off(const Range &rg, int j) {
    return j == (kDataParallel<T> ? rg.dp : 0) ? rg.off : 0;
}

template <int T>
__device__ __forceinline__ Item find_item(const Problem &p, const int *prefix, int64_t w) {
    /* 32-bit unsigned divisions: items < 2^31 (epmoe__check_w4a8_gemm). A 64-bit one is a called
    ** subroutine in the SASS, and every thread runs this at each item change (W2's items are 8 steps) */
    const uint32_t wi = (uint32_t)w, t = wi / (uint32_t)p.NT;
    int lo = 0, hi = p.E; /* largest e with prefix[e] <= t; prefix is non-decreasing */
    while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if ((uint32_t)prefix[mid] <= t) lo = mid;
        else hi = mid;
    }
    /* now prefix[lo] <= t < prefix[lo + 1]: expert lo has tiles (empty experts never match) */
    Item it;
    it.e = lo;
    const int tiles = prefix[lo + 1] - prefix[lo];
    const uint32_t local = wi - (uint32_t)prefix[lo] * (uint32_t)p.NT;
    it.nt = (int)(local / (uint32_t)max(tiles, 1)); /* (item == all items: the producer's look past the end) */
    it.mt = (int)local - it.nt * tiles;
    it.rows = prefix[p.E + 1 + lo]; /* plan's clamped masked_m: no global round trip before a stage's first copy */
    return it;
}

/* The loads of one CTA, walking its items and their K steps in order (warp 0). Pointers advance
** by a constant per step, so a step costs a few adds; only an item change recomputes them. Each
** pointer is group 2s's; group 2s + 1 is a constant further (weights W4_TILE_BYTES, scales N
** bf16, activations one 128-byte column of the tensor map, activation scales sa_step). */
template <int T, int kSa, int kWt> struct Producer {
    using St = Stage<T, kWt>;
    static constexpr int kTok = (T + 31) / 32; /* activation-scale tokens per lane */
    const uint8_t *w;
    const uint16_t *sw;
    const float *bs;   /* fp8: the block scale of (tile, g) */
    int wrow;          /* fp8, bf16: the tile's first row in the weights' tensor map: e * N + nt * 128 */
    const uint8_t *sa; /* the 4-byte word holding scale (lane's token, g) */
    int g;             /* the step's first group (even) */
    int row;           /* the tile's first activation row in the tensor map: e * M + mt * T */
    int live;          /* rows of the tile below masked_m (the rest are loaded, never used) */

    __device__ void start(const Problem &p, const int *prefix, int64_t item, int g0) {
        const int lane = threadIdx.x & 31;
        g = g0;
        const Item it = find_item<T>(p, prefix, item);
        if (kWtTma<kWt>) {
            wrow = it.e * (int)p.N + it.nt * W4_TILE_N; /* < 2^31: epmoe__check_wgmma_limits */
            if (kWt == kWtFp8) bs = p.bs + ((int64_t)it.e * p.NT + it.nt) * p.G + g0;
        } else {
            w = p.qw + (((int64_t)it.e * p.NT + it.nt) * p.G + g0) * W4_TILE_BYTES;
            sw = p.sw + ((int64_t)it.e * p.G + g0) * p.N + it.nt * W4_TILE_N;
        }
        row = it.e * (int)p.M + it.mt * T; /* < 2^31: epmoe__check_w4a8_gemm */
        live = it.rows - it.mt * T;
        /* fmt_scale_offset(m, g0) & ~3, with strides from the host: a runtime format switch here
        ** leaves values the compiler hoists into registers T = 8 does not have (see the kernel) */
        if (kSa != 0)
            sa = p.sa + p.sa_slab * it.e + (int64_t)(it.mt * T + lane) * p.sa_tok + (kSa == 2 ? g0 >> 2 : g0) * p.sa_step;
    }

    /* The loads of group g, and of g + 1 when steps take two (not when g is the last group: G odd). */
    static constexpr int kG = kGroups<T>;
    __device__ void issue(const Problem &p, const CUtensorMap &tm, const CUtensorMap &tmw, Stage<T, kWt> &s, uint64_t *full) {
        const int lane = threadIdx.x & 31;
        const bool two = kG == 2 && g + 1 < p.G;
        if (kWtTma<kWt> && lane == 0) { /* one group: the weight box, the activation rows; fp8's block scale by cp.async */
            static_assert(!kWtTma<kWt> || (kG == 1 && offsetof(St, a) % 1024 == 0), "fp8, bf16: one group a step; boxes on the swizzle's 1024 bytes");
            mbar_expect_tx(full, W4_TILE_N * W4_GROUP + T * W4_GROUP);
            if (kWeightsOnce<T>) tma_load_2d_hint(&s.w[0][0], &tmw, g * W4_GROUP, wrow, full, l2_evict_first());
            else tma_load_2d(&s.w[0][0], &tmw, g * W4_GROUP, wrow, full);
            tma_load_2d(&s.a[0][0][0], &tm, g * W4_GROUP, row, full);
            if (kWt == kWtFp8) cp_async4(&s.sw[0][0], bs, 4);
        } else if (!kWtTma<kWt> && lane == 0) { /* the weight tiles (adjacent in the repacked layout: one copy), 128 bf16 scales
                            each, T activation rows of 128 bytes each: every byte on one expect_tx */
            constexpr uint32_t kScaleBytes = sizeof(St::sw[0]); /* W4_TILE_N bf16 = 256 */
            static_assert(kScaleBytes % 16 == 0 && offsetof(St, sw) % 16 == 0 && offsetof(St, a) % 1024 == 0,
                          "bulk copies: 16-byte aligned multiples of 16; the activations on the swizzle's 1024 bytes");
            mbar_expect_tx(full, (two ? 2 : 1) * (W4_TILE_BYTES + kScaleBytes + T * W4_GROUP));
            if (kWeightsOnce<T>) bulk_copy_hint(&s.w[0][0], w, (two ? 2 : 1) * W4_TILE_BYTES, full, l2_evict_first());
            else bulk_copy(&s.w[0][0], w, (two ? 2 : 1) * W4_TILE_BYTES, full);
            bulk_copy(s.sw[0], sw, kScaleBytes, full);
            tma_load_2d(&s.a[0][0][0], &tm, g * W4_GROUP, row, full);
            if (two) {
                bulk_copy(s.sw[kG - 1], sw + p.N, kScaleBytes, full);
                tma_load_2d(&s.a[kG - 1][0][0], &tm, (g + 1) * W4_GROUP, row, full);
            }
        }
        if (kSa != 0)
#pragma unroll
            for (int i = 0; i < kTok; i++) {
                const int t = lane + 32 * i;
                if (t < T && t < live) {
                    const uint8_t *src = sa + (int64_t)(32 * i) * p.sa_tok;
                    cp_async4(&s.sa[0][t], src, 4);
                    /* UE8M0: g is even, so groups g and g + 1 are bytes of the word just copied */
                    if (kSa != 2 && two) cp_async4(&s.sa[kG - 1][t], src + p.sa_step, 4);
                }
            }
        cp_async_arrive_noinc(full);
    }

    /* To the CTA's step `next` (counted from its first); on an item change the item comes from
    ** that and the range in shared memory, not from a register kept for it. */
    __device__ void advance(const Problem &p, const int *prefix, const Range &rg, int P, int next) {
        if (kWt == kWtFp8) bs += kG;
        else if (!kWtTma<kWt>) w += kG * W4_TILE_BYTES, sw += kG * p.N;
        /* UE8M0: the next step's group(s) are in the next word when this step ends one (g + kG - 1
        ** is 3 mod 4; two a step: g % 4 == 2) */
        if (kSa != 0 && (kSa != 2 || ((g + kG - 1) & 3) == 3)) sa += kSa == 2 ? p.sa_step : kG * p.sa_step;
        /* Past the last item too, unguarded (a guard here cost 8-12% at 32 rows in the group-scale
        ** modes, measured 2026-11-30): start() only computes addresses, and issue() is never called
        ** beyond the CTA's steps (next <= steps: at most the item past the CTA's last). */
        if ((g += kG) >= p.G) {
            const int grid = gridDim.x, r = grid - 1 - (int)blockIdx.x;
            start(p, prefix, step_item<T>(rg, r, grid, P, next), kG * step_off<T>(rg, next));
        }
    }
};

/* Group h's weight fragments in the stage, converted to the fp8 A operand of its 4 wgmma. */
template <int T, int kWt>
__device__ __forceinline__ void convert(const Stage<T, kWt> &s, int h, uint32_t (&a)[4][4]) {
    if (kWtTma<kWt>) return; /* the tensor cores read the fp8 or bf16 tile itself */
    constexpr bool kFull = kWt == kWtInt4Full;
    const int tid = consumer_tid<T>();
    const uint4 h0 = *reinterpret_cast<const uint4 *>(&s.w[h][tid * 16]);
    const uint4 h1 = *reinterpret_cast<const uint4 *>(&s.w[h][(kThreads + tid) * 16]);
    const uint32_t q[8] = {h0.x, h0.y, h0.z, h0.w, h1.x, h1.y, h1.z, h1.w};
#pragma unroll
    for (int ks = 0; ks < 4; ks++) {
        a[ks][0] = w4_word_to_fp8(q[2 * ks], 0, kFull);
        a[ks][1] = w4_word_to_fp8(q[2 * ks], 1, kFull);
        a[ks][2] = w4_word_to_fp8(q[2 * ks + 1], 0, kFull);
        a[ks][3] = w4_word_to_fp8(q[2 * ks + 1], 1, kFull);
#pragma unroll
        for (int r = 0; r < 4; r++) reg_fence(a[ks][r]);
    }
}

/* The 4 wgmma of group h: part = (the group's weights) x (its activations), 64 rows x T per warpgroup;
** with kAdd, part += that (kAccDirect). */
template <int T, int kWt, bool kAdd = false>
__device__ __forceinline__ void mma_group(const Stage<T, kWt> &s, int h, const uint32_t (&a)[4][4], float (&part)[T / 2]) {
    const uint32_t lo = sw128_desc_lo(&s.a[h][0][0]);
    if constexpr (kTokM<T, kWt>) { /* A: the warpgroup's 64 tokens (8 KB into the activations), B: the 128 weight rows */
        const uint32_t alo = sw128_desc_lo(&s.a[h][(consumer_tid<T>() >> 7) * 64][0]), blo = sw128_desc_lo(&s.w[h][0]);
#pragma unroll
        for (int ks = 0; ks < 4; ks++) wgmma_ss<T>(part, sw128_desc(alo + 2 * ks), sw128_desc(blo + 2 * ks), ks);
    } else if constexpr (kWtTma<kWt>) { /* the warpgroup's 64 rows: 8 KB into the tile, whole swizzle atoms */
        const uint32_t alo = sw128_desc_lo(&s.w[h][(consumer_tid<T>() >> 7) * 64 * W4_GROUP]);
#pragma unroll
        for (int ks = 0; ks < 4; ks++) {
            if constexpr (kWt == kWtFp8) wgmma_ss<T>(part, sw128_desc(alo + 2 * ks), sw128_desc(lo + 2 * ks), ks);
            else wgmma_ss_bf16<T>(part, sw128_desc(alo + 2 * ks), sw128_desc(lo + 2 * ks), kAdd ? 1 : ks);
        }
    } else {
#pragma unroll
        for (int ks = 0; ks < 4; ks++) wgmma_rs<T>(part, a[ks], sw128_desc(lo + 2 * ks), ks);
    }
}

/* A group's scales for this thread: its two weight rows, and (mode a) the activation scales of
** its token columns. Read from the stage into registers while the group's wgmma still runs, so
** the shared-memory latency is off the step's critical path (decode steps are latency-bound). */
template <int T, int kSa> struct GroupScales {
    float sw0, sw1;
    float sa[kSa != 0 ? T / 8 : 1][2];
};

/* The activation-scale words of the thread's token columns jj * 8 + 2 * (lane % 4) + 0 and 1. They
** are adjacent, so with kPair one 8-byte load (a row starts on 8 bytes: the callers assert it). Taken
** (kSaPair) for fp32 scales in the int4 tiles to T = 80, at 2-3 CTAs/SM; UE8M0 words stay one load
** each (not timed as pairs). Measured with pairs at every tile, beside main: W13 at 64 rows
** 183.4-184.1 -> 178.4-178.9 us (W13 + W2 295.1-296.3 -> 288.2-288.8, Kimi-K2 428.0 -> 418.2); 1, 8,
** 16 and 32 rows the same; at T = 128 (1 CTA/SM) 0.8-0.9% slower at 128 and 1024 rows, so T = 96-128
** keep single loads (DeepSeek-R1, bench_w4a8, H200, the same call, 2026-12-01). T = 24, 40-56, 72 and
** 80 take them as their measured neighbours do. */
template <int T, int kSa, int kWt> constexpr bool kSaPair = kSa == 1 && T <= 80 && !kWtTma<kWt>;
/* The tiles that run one step at a time at 2 CTAs/SM (T = 40-64, int4, fp32 scales) load a step's
** activation-scale words into registers right after its wgmma are issued (kSaPre), so the promotion
** after the wait finds them there. W13 + W2 at 40 / 48 / 56 / 64 rows 231.2-233.3 / 251.6-252.3 /
** 266.4-266.8 / 285.2 -> 229.8-230.1 / 243.1 / 262.1-262.7 / 278.1 us, 32 rows the same (this build
** against main's, one call). Also at T = 32 (steps in pairs: twice the registers) ptxas spilled 4
** bytes and 32 rows ran 1.5% slower; the two weight scales loaded early as well cost 2-9% at 32-64
** rows (another call; DeepSeek-R1, bench_w4a8, H200, 2026-12-02). A probe with no scale loads at all
** (results wrong) had run 64 rows 3.5% and 1024 rows 4.5% faster (docs/PERFORMANCE.md, W4A8,
** session 30). */
template <int T, int kSa, int kWt> constexpr bool kSaPre = kSa == 1 && !kWtTma<kWt> && T >= 40 && T <= 64;
template <int T, int kSa, int kWt> constexpr int kSaPreN = kSaPre<T, kSa, kWt> ? T / 8 : 1;
template <bool kPair> __device__ __forceinline__ uint2 sa_words(const uint32_t *row, int jj) {
    const uint32_t *w = &row[jj * 8 + 2 * (threadIdx.x & 3)];
    if (kPair) return *reinterpret_cast<const uint2 *>(w);
    return make_uint2(w[0], w[1]);
}
/* A word as the scale of group g: fp32 bits, or UE8M0's byte g & 3. */
template <int kSa> __device__ __forceinline__ float sa_value(uint32_t wv, int g) {
    return kSa == 2 ? fmt_ue8m0_to_float((uint8_t)(wv >> (8 * (g & 3)))) : __uint_as_float(wv);
}

/* Group g = 2s + h of the stage; UE8M0 words are in sa[0] for both (g & 3 picks the byte). */
template <int T, int kSa, class St>
__device__ __forceinline__ GroupScales<T, kSa> load_scales(const St &s, int h, int g) {
    static_assert(offsetof(St, sa) % 8 == 0 && T % 8 == 0, "sa_words: 8-byte pairs");
    const int row = acc_row<T>();
    GroupScales<T, kSa> gs;
    gs.sw0 = fmt_bf16_to_float(s.sw[h][row]), gs.sw1 = fmt_bf16_to_float(s.sw[h][row + 8]); /* exact */
    if (kSa != 0)
#pragma unroll
        for (int jj = 0; jj < T / 8; jj++) {
            const uint2 wv = sa_words<kSaPair<T, kSa, kWtInt4>>(s.sa[kSa == 2 ? 0 : h], jj); /* int4 only: T <= 16 */
            gs.sa[jj][0] = sa_value<kSa>(wv.x, g), gs.sa[jj][1] = sa_value<kSa>(wv.y, g);
        }
    return gs;
}

/* acc += sw[row] * (sa[col] * part) (mode a) or sw[row] * part (mode b), for a finished group;
** sa2_of(jj) gives the activation scales of columns jj * 8 + 2 * (lane % 4) + 0 and 1. */
template <int T, int kSa, class Sa2Of>
__device__ __forceinline__ void promote(float sw0, float sw1, Sa2Of sa2_of, const float (&part)[T / 2], float (&acc)[T / 2]) {
#pragma unroll
    for (int jj = 0; jj < T / 8; jj++) {
        const float2 sa2 = kSa != 0 ? sa2_of(jj) : make_float2(1.0f, 1.0f);
#pragma unroll
        for (int c = 0; c < 2; c++) {
            float x0 = part[jj * 4 + c], x1 = part[jj * 4 + 2 + c];
            if (kSa != 0) {
                const float sa = c ? sa2.y : sa2.x;
                x0 = __fmul_rn(x0, sa), x1 = __fmul_rn(x1, sa);
            }
            acc[jj * 4 + c] = fmaf(x0, sw0, acc[jj * 4 + c]);
            acc[jj * 4 + 2 + c] = fmaf(x1, sw1, acc[jj * 4 + 2 + c]);
        }
    }
}
template <int T, int kSa>
__device__ __forceinline__ void promote(const GroupScales<T, kSa> &gs, const float (&part)[T / 2], float (&acc)[T / 2]) {
    promote<T, kSa>(gs.sw0, gs.sw1, [&](int jj) { return make_float2(gs.sa[jj][0], gs.sa[jj][1]); }, part, acc);
}

/* bf16 rows < masked_m of one finished item, then a fresh accumulator. It rounds by the hardware
** (bf16_rn, common.cuh; the tests match NaN to NaN): 768 fewer instructions in the T = 128 kernel
** than the portable bit arithmetic. W13 + W2 at 32 / 64 / 128 rows 213.7-214.1 / 284.4-285.3 /
** 464.0-470.9 -> 211.0-211.2 / 281.8-282.8 / 453.7-454.5 us, 1024 rows the same (DeepSeek-R1, H200,
** one call, 2026-12-01). An epilogue with no stores at all (results wrong) had run 5% / 9-10% / 10%
** faster at 32 / 128 / 1024 rows: most of its cost is the stores while both warpgroups wait, not
** the rounding; staging them through shared memory (stmatrix, 16-byte stores) measured slower
** (docs/PERFORMANCE.md, W4A8, session 26). */
template <int T, int kSa, int kWt>
__device__ __forceinline__ void epilogue(const Problem &p, const Item &it, float (&acc)[T / 2]) {
    const int lane = threadIdx.x & 31, row = acc_row<T>();
    const float ts = kSa != 0 || kWt == kWtBf16 ? 1.0f : __ldg(p.sa_tensor); /* bf16 weights: no scale at all */
    static_assert(!kTokM<T, kWt>, "tokens as M: the storer warps store the tile (hand_over)");
    uint16_t *out = p.out + (int64_t)it.e * p.expert_stride + (int64_t)it.nt * W4_TILE_N + row;
#pragma unroll
    for (int jj = 0; jj < T / 8; jj++)
#pragma unroll
        for (int c = 0; c < 2; c++) {
            const int m = it.mt * T + jj * 8 + 2 * (lane & 3) + c;
            if (m < it.rows) {
                out[m * p.row_stride] = bf16_rn(__fmul_rn(acc[jj * 4 + c], ts));
                out[m * p.row_stride + 8] = bf16_rn(__fmul_rn(acc[jj * 4 + 2 + c], ts));
            }
            acc[jj * 4 + c] = 0.0f;
            acc[jj * 4 + 2 + c] = 0.0f;
        }
}

/* The warp-specialized int4 tiles hand each finished tile to the producer warpgroup's three idle
** warps (kEpiWarps), which store it while the consumers go on. At an item's end both consumer
** warpgroups had stored their tiles themselves (T / 2 two-byte stores a thread) while no wgmma of
** the CTA ran: a build with no epilogue stores at all (results wrong) ran W13 + W2 at 32 / 128 /
** 1024 rows 5 / 9-10 / 10% faster (DeepSeek-R1, H200, 2026-12-01). Now each consumer warpgroup
** rounds its tile to bf16, writes it transposed by stmatrix into its half of the buffer (a token's
** 64 weight rows, 128 bytes, in a row; 16-byte chunks XOR-swizzled by the token, so a matrix's 8
** rows hit 8 bank groups) with the item beside it, and arrives on full[g]; the storer warps wait on
** it, store rows < the item's rows in 16-byte runs (2-byte stores when the output is not laid out
** in them), and arrive on empty[g], which the warpgroup waits for before its next tile (items take
** 16 or more steps, so it has long been done). Both warpgroups finish the same items in the same
** order, so the storers take their tiles in turn. A tile with rows = -1 ends it. The buffer (2T x
** 128 bytes) takes a stage at T = 112 and 128 (7 stages). Measured beside the plain epilogue: W13 +
** W2 0.8-1.6% faster at 32-64 rows, 2.4-5.0% at 72-1024 (W2 6-13% from 72 rows; W13 0.4-2.5% slower
** at 112-1024, the lost stage); DeepSeek-R1, H200, 2026-12-01.
** The fp8 and bf16 weights' tiles at T = 64 and 128 do the same (T = 128 at 5 stages); with tokens
** as M (kTokM) a warpgroup's tile is its 64 tokens' rows of 128 weight rows (256 bytes, 16 chunks),
** written by stmatrix without .trans. Not at T = 32 (2 CTAs/SM: the buffer does not fit beside 5
** stages) nor bf16's 256 (its buffer would be 64 KB). fp8-block W13 + W2 at 64 / 128 / 1024 rows
** 382-383 / 430-449 / 3125-3248 -> 377 / 416-418 / 2844-2918 us, bf16 at 128 rows 769-771 -> 751-755
** (DeepSeek-R1, H200, the same call, 2026-12-01). */
template <int T, int kWt> constexpr bool kEpiWarps = kWarpSpecialized<T> && (!kWtTma<kWt> || T == 64 || T == 128);
template <int T, int kWt> constexpr size_t kEpiBytes = kEpiWarps<T, kWt> ? 2 * (size_t)T * 128 : 0;
/* A warpgroup's tile in the buffer: rows of kEpiChunks 16-byte chunks (T tokens x 64 weight rows, or
** with tokens as M its 64 tokens x 128 weight rows); the same T x 128 bytes either way. */
template <int T, int kWt> constexpr int kEpiChunks = kTokM<T, kWt> ? 16 : 8;
constexpr int kStorers = 96; /* warps 1-3 */
struct EpiHand {
    uint64_t full[2], empty[2];
    Item it[2];
};
__device__ __forceinline__ bool out_in_runs(const Problem &p) {
    return ((uintptr_t)p.out & 15) == 0 && (p.row_stride & 7) == 0 && (p.expert_stride & 7) == 0;
}
/* Consumer side: wait until the storers have the previous tile out of the buffer (k > 0), hand over
** this one (or, with it == nullptr, the end), count it. */
template <int T, int kSa, int kWt>
__device__ __forceinline__ void hand_over(const Problem &p, const Item *it, float (&acc)[T / 2], uint8_t *buf, EpiHand &eh, uint32_t &k) {
    const int tid = consumer_tid<T>(), lane = tid & 31, w = (tid >> 5) & 3, g = tid >> 7;
    if (k > 0) mbar_wait(&eh.empty[g], (k - 1) & 1);
    if constexpr (kTokM<T, kWt>) {
        if (it) {
            const float ts = kSa != 0 ? 1.0f : __ldg(p.sa_tensor);
            const uint32_t base = smem_u32(buf) + (uint32_t)(g * T * 128);
            /* stmatrix: matrix q of an x4 is (jj + q / 2, tokens 8 * (q % 2) of the warp's 16), thread t's
            ** pair its (token t / 4, weight rows 2 (t % 4) + 0, 1) as in the accumulator; thread t gives
            ** the address of token 16 w + 8 (q % 2) + t % 8 of matrix q = t / 8 */
            const int q = lane >> 3, i = lane & 7;
#pragma unroll
            for (int jj = 0; jj < T / 8; jj += 2) {
                const int tok = 16 * w + 8 * (q & 1) + i, jq = jj + (q >> 1);
                const uint32_t addr = base + (uint32_t)(tok * 256 + ((jq ^ i) << 4));
                uint32_t r[4];
#pragma unroll
                for (int m = 0; m < 4; m++)
                    r[m] = bf16x2_rn(__fmul_rn(acc[(jj + m / 2) * 4 + 2 * (m & 1)], ts), __fmul_rn(acc[(jj + m / 2) * 4 + 2 * (m & 1) + 1], ts));
                asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r[0]), "r"(r[1]),
                             "r"(r[2]), "r"(r[3]) : "memory");
            }
#pragma unroll
            for (int c = 0; c < T / 2; c++) acc[c] = 0.0f;
        }
    } else if (it) {
        const float ts = kSa != 0 || kWt == kWtBf16 ? 1.0f : __ldg(p.sa_tensor); /* bf16 weights: no scale at all */
        const uint32_t base = smem_u32(buf) + (uint32_t)(g * T * 128);
        /* stmatrix.trans: matrix q of an x4 is (jj + q / 2, weight rows h = q % 2 of the warp's 16);
        ** thread t gives the address of row t % 8 (token 8 jj' + t % 8) of matrix t / 8 */
        const int q = lane >> 3, i = lane & 7;
#pragma unroll
        for (int jj = 0; jj < T / 8; jj += 2) {
            const int jq = jj + (q >> 1) < T / 8 ? jj + (q >> 1) : jj, h = q & 1;
            const uint32_t addr = base + (uint32_t)((jq * 8 + i) * 128 + (((2 * w + h) ^ i) << 4));
            const uint32_t r0 = bf16x2_rn(__fmul_rn(acc[jj * 4], ts), __fmul_rn(acc[jj * 4 + 1], ts));
            const uint32_t r1 = bf16x2_rn(__fmul_rn(acc[jj * 4 + 2], ts), __fmul_rn(acc[jj * 4 + 3], ts));
            if (jj + 1 < T / 8) {
                const uint32_t r2 = bf16x2_rn(__fmul_rn(acc[jj * 4 + 4], ts), __fmul_rn(acc[jj * 4 + 5], ts));
                const uint32_t r3 = bf16x2_rn(__fmul_rn(acc[jj * 4 + 6], ts), __fmul_rn(acc[jj * 4 + 7], ts));
                asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r0),
                             "r"(r1), "r"(r2), "r"(r3) : "memory");
            } else { /* T / 8 odd: the last jj alone (threads 0-15 give the addresses) */
                asm volatile("stmatrix.sync.aligned.m8n8.x2.trans.shared.b16 [%0], {%1, %2};\n" ::"r"(addr), "r"(r0), "r"(r1)
                             : "memory");
            }
        }
#pragma unroll
        for (int c = 0; c < T / 2; c++) acc[c] = 0.0f;
    }
    if ((tid & 127) == 0) {
        Item v = {0, 0, 0, -1};
        eh.it[g] = it ? *it : v;
    }
    mbar_arrive(&eh.full[g]); /* release: the tile and the item, to the storers' wait */
    k++;
}
/* Storer side (warps 1-3 of the producer warpgroup): the tiles in the order they come, warpgroup 0's
** then 1's, until the end. */
template <int T, int kWt>
__device__ __forceinline__ void store_tiles(const Problem &p, const uint8_t *buf, EpiHand &eh) {
    constexpr int kC = kEpiChunks<T, kWt>;
    constexpr bool kTm = kTokM<T, kWt>;
    const int st = (int)threadIdx.x - 32;
    const bool runs = out_in_runs(p);
#pragma unroll 1
    for (uint32_t k = 0;; k++)
#pragma unroll 1
        for (int g = 0; g < 2; g++) {
            mbar_wait(&eh.full[g], k & 1);
            const Item it = eh.it[g];
            if (it.rows < 0) return;
            const uint8_t *b = buf + g * T * 128;
            uint16_t *out = p.out + (int64_t)it.e * p.expert_stride + (int64_t)it.nt * W4_TILE_N + (kTm ? 0 : g * 64);
#pragma unroll 1
            for (int job = st; job < T * 8; job += kStorers) {
                const int mr = job >> (kTm ? 4 : 3), ch = job & (kC - 1), m = it.mt * T + (kTm ? g * 64 : 0) + mr;
                if (m < it.rows) {
                    const uint4 v = *reinterpret_cast<const uint4 *>(b + mr * (kC * 16) + ((ch ^ (mr & 7)) << 4));
                    uint16_t *dst = out + (int64_t)m * p.row_stride + ch * 8;
                    if (runs) { /* one 16-byte store (a uint4 assignment compiled to four 4-byte ones) */
                        asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(dst), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
                                     : "memory");
                    } else {
                        const uint32_t wv[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
                        for (int c = 0; c < 4; c++) dst[2 * c] = (uint16_t)wv[c], dst[2 * c + 1] = (uint16_t)(wv[c] >> 16);
                    }
                }
            }
            mbar_arrive(&eh.empty[g]); /* after this thread's last read of the buffer */
        }
}

/* Whether step j of the CTA is in its first tail item and that item began in an earlier range
** (then the CTA contributes its partial instead of finishing the item). */
template <int T> __device__ __forceinline__ bool is_head(const Range &rg, int j, int P) {
    const int dp = kDataParallel<T> ? rg.dp : 0;
    return rg.off != 0 && j >= dp && rg.off + j - dp < P;
}

/* Stream-K, where a CTA's range meets its neighbours' (consumer threads; sync: a barrier of all of
** them). The CTA's partial of an item that began in an earlier range goes to its slot, flagged with
** the launch's epoch. */
template <int T, class Sync>
__device__ __forceinline__ void contribute_partial(const Problem &p, int r, uint32_t epoch, float (&acc)[T / 2], Sync sync) {
    const int tid = consumer_tid<T>();
    float *slot = p.slots + (int64_t)r * (T / 2) * kThreads;
#pragma unroll
    for (int i = 0; i < T / 2; i++) __stcg(slot + i * kThreads + tid, acc[i]), acc[i] = 0.0f;
    __threadfence();
    sync();
    if (tid == 0) asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(p.flags + r), "r"(epoch + 1u) : "memory");
}
/* The range ends inside an item (cg != 0): contribute if the whole range lies inside it, else add
** the later ranges' partials in range order (deterministic) and finish the item. */
template <int T, class Sync, class Epi>
__device__ __forceinline__ void finish_range(const Problem &p, const int *prefix, const Range &rg, int r, int grid, int P, int steps,
                                             float (&acc)[T / 2], Sync sync, Epi epi) {
    const int tid = consumer_tid<T>();
    const int64_t item = step_item<T>(rg, r, grid, P, steps - 1);
    if (is_head<T>(rg, steps - 1, P)) { /* the whole range lies inside one item */
        contribute_partial<T>(p, r, rg.epoch, acc, sync);
        return;
    }
    const int64_t end = (item - rg.tail0 + 1) * P, total = rg.total;
    for (int q = r + 1; q < grid && total * q / grid < end; q++) {
        if (total * (q + 1) / grid == total * q / grid) continue; /* owns no step */
        if (tid == 0) {
            uint32_t f;
            do asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(f) : "l"(p.flags + q) : "memory");
            while (f != rg.epoch + 1u);
        }
        sync();
        const float *slot = p.slots + (int64_t)q * (T / 2) * kThreads;
#pragma unroll
        for (int i = 0; i < T / 2; i++) acc[i] += __ldcg(slot + i * kThreads + tid);
    }
    epi(find_item<T>(p, prefix, item));
}
/* The launch counter (a 64-bit word at p.sync): every CTA adds its share of kLaunchUnit at entry
** (the shares of one launch sum to it, whatever the grid) and reads what was there, so every CTA
** of the L-th launch reads L * kLaunchUnit plus the shares of the CTAs of its own launch that came
** first (less than kLaunchUnit): the launch's epoch, with nothing to do at the kernel's end. That
** end had been an atomic, and for the last CTA out a store, a fence and a second atomic (the last
** CTA's steps ended 2.5 and 2.7 us before its exit at decode, W13 and W2; without them W13 + W2 at
** 1 and 8 rows is 0.3-0.7% faster: bench_w4a8, H200, 2026-12-01). Launches that overlap on the GPU (other streams, graph branches) must not share a
** workspace (epmoe.h); a programmatic dependent would have to add after griddepcontrol.wait. The
** epoch is taken modulo 2^32 - 1, so a flag (epoch + 1) is never 0, the value of one never written. */
constexpr unsigned long long kLaunchUnit = 1ull << 20; /* > any grid: launch() checks */
__device__ __forceinline__ uint32_t launch_epoch(const Problem &p, int grid) {
    const unsigned long long share = kLaunchUnit / grid + (blockIdx.x == 0 ? kLaunchUnit % grid : 0);
    return (uint32_t)(atomicAdd(p.sync, share) / kLaunchUnit % 0xFFFFFFFFull);
}

/* Lane 0 of warp 1, at entry: the launch's epoch for the stream-K flags (none without the workspace:
** whole items). Its atomic is a round trip every CTA makes to one word; on warp 0, after the plan,
** it stood between masked_m's load and the first stage's copies. */
__device__ __forceinline__ uint32_t start_epoch(const Problem &p, int grid) {
    return p.slots == nullptr ? 0u : launch_epoch(p, grid);
}

/* floor(n * r / grid) for 0 <= r <= grid < 2^20: one division of n (32-bit when n < 2^32), the rest in
** 32 bits. Each 64-bit division is a called subroutine in the SASS, and the plan sits between every
** CTA's entry and its first copies. */
__device__ __forceinline__ int64_t share(int64_t n, int r, int grid) {
    const int64_t q = n < (1ll << 32) ? (int64_t)((uint32_t)n / (uint32_t)grid) : n / grid;
    const uint64_t x = (uint64_t)(n - q * grid) * (uint32_t)r; /* remainder (< grid) x r */
    return q * r + (int64_t)(x < (1ull << 32) ? (uint64_t)((uint32_t)x / (uint32_t)grid) : x / (uint32_t)grid);
}

/* Warp 0, at entry: m-tiles before each expert (prefix[E + 1], a warp scan of masked_m), then each
** expert's rows clamped to [0, M] (prefix[E + 1 + e], what find_item reports), and this
** CTA's range of the step sequence (see the kernel's note on stream-K). */
template <int T>
__device__ __forceinline__ void plan(const Problem &p, Range &rg, int *prefix, int r, int grid, int P) {
    const int lane = threadIdx.x & 31;
    int *rows_of = prefix + p.E + 1;
    /* every load first, unrolled so several are in flight (one round trip per 32 experts, each
    ** waited for before the next, was the layer's 128-256 experts' ramp) */
#pragma unroll 4
    for (int e = lane; e < p.E; e += 32) {
        const int rows = __ldg(p.masked_m + e);
        rows_of[e] = rows < 0 ? 0 : (rows > p.M ? (int)p.M : rows);
    }
    __syncwarp();
    int carry = 0;
    for (int base = 0; base < p.E; base += 32) {
        const int e = base + lane;
        int v = e < p.E ? (rows_of[e] + T - 1) / T : 0;
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
            const int y = __shfl_up_sync(0xFFFFFFFFu, v, off);
            if (lane >= off) v += y;
        }
        if (e < p.E) prefix[e + 1] = carry + v;
        carry += __shfl_sync(0xFFFFFFFFu, v, 31);
    }
    if (lane == 0) { /* carry: all m-tiles */
        const int64_t items = (int64_t)carry * p.NT;
        const int64_t per = (uint32_t)items / (uint32_t)grid; /* items < 2^31 (epmoe__check_w4a8_gemm) */
        const int64_t waves = kDataParallel<T> && per > 1 ? per - 1 : 0; /* the tail: >= grid items */
        const int64_t tail = items - waves * grid, total = tail * P;
        /* no workspace (slots NULL): the ranges end on item boundaries, so no CTA leaves a partial */
        const bool whole = p.slots == nullptr;
        const int64_t s0 = whole ? share(tail, r, grid) * P : share(total, r, grid);
        const int64_t s1 = whole ? share(tail, r + 1, grid) * P : share(total, r + 1, grid);
        prefix[0] = 0;
        rg.total = total;
        rg.tail0 = waves * grid;
        const int64_t q = s0 < (1ll << 32) ? (int64_t)((uint32_t)s0 / (uint32_t)P) : s0 / P;
        rg.first = rg.tail0 + q, rg.off = (int)(s0 - q * P);
        rg.dp = (int)(waves * P);
        rg.steps = rg.dp + (int)(s1 - s0);
    }
}

/* Per step j: wait for stage j's loads, convert the weights, issue the wgmma of step j; warp 0
** then starts the loads of step j + S - 1 into the stage step j - 1 used, once every warp has
** released it (a named barrier per stage: no CTA barrier, so the other warps never wait for the
** producer); wait, release the stage, promote group 2s then 2s + 1: the fp32 operations and their
** order are those of one group a step, so the bits are too. Each warpgroup waits on its own wgmma:
** the tensor cores stay busy through the other warpgroups on the SM (2 per CTA, 2-3 CTAs per SM at
** decode tiles). (Two commit groups with
** wgmma.wait_group 1, promoting part0 while part1 runs, would overlap more within a warpgroup, but
** ptxas then serializes every wgmma: C7514.)
**
** Registers: T = 8 runs 3 CTAs/SM, so at most 80 a thread, of which the two groups' fragments
** take 32 and the partials 8 while the wgmma run. So what the loop only needs at an item's end
** (the item's index, whether it began in an earlier range, the stream-K epoch and total) is not
** kept in registers: the range is in shared memory and the item comes from the step index. */
template <int T, int kSa, int kWt, int S>
__global__ void __launch_bounds__(kThreads, T <= 8 ? 3 : 2) /* T = 8: at most 80 registers */
w4a8_gemm_kernel(const __grid_constant__ Problem p, const __grid_constant__ CUtensorMap tm, const __grid_constant__ CUtensorMap tmw) {
    static_assert(!kWarpSpecialized<T> && kGroups<T> == 2 && !kWtTma<kWt>,
                  "T <= 16: two groups a step, int4; larger tiles, fp8 and bf16 run w4a8_gemm_ws_kernel");
    W4_TRACE(0);
    extern __shared__ __align__(128) uint8_t smem_raw[];
    /* the swizzle is of address bits: every stage on a 1024-byte boundary (launch adds the slack) */
    uint8_t *smem = smem_raw + ((1024u - (smem_u32(smem_raw) & 1023u)) & 1023u);
    Stage<T, kWt> *ring = reinterpret_cast<Stage<T, kWt> *>(smem);
    uint64_t *full = reinterpret_cast<uint64_t *>(smem + S * sizeof(Stage<T, kWt>)); /* stage j landed */
    Range &rg = *reinterpret_cast<Range *>(full + S);
    int *prefix = reinterpret_cast<int *>(&rg + 1); /* m-tiles before expert e, then rows of e (plan) */
    const int tid = threadIdx.x, warp = tid >> 5;
    constexpr int kG = kGroups<T>;
    const int P = (p.G + kG - 1) / kG; /* steps per item (two a step: the last alone if G is odd) */

    /* Stream-K: every CTA owns an equal range [s0, s1) of the flattened (item, step) steps, so
    ** all stream the same weight bytes (whole items per CTA leave a partial last wave: 22% of the
    ** SM time idle at decode). Ranges go to CTAs in reverse (range r to CTA grid-1-r), so an item
    ** split between ranges r and r+1 is started (last steps) by the lower CTA, first thing in its
    ** range, which leaves its fp32 partial in its slot; the higher CTA reaches the item's end last
    ** and finishes it: partials added in range order (deterministic), bf16 rows written. A CTA only
    ** ever waits for lower-numbered CTAs, which the hardware starts first, and by then they are
    ** long past that point. */
    const int grid = gridDim.x, r = grid - 1 - (int)blockIdx.x;
    if (tid < S) mbar_init(&full[tid], 32 + 1); /* the producer warp's cp.async + the copies' expect_tx */
    fence_proxy_async();
    if (warp == 0) plan<T>(p, rg, prefix, r, grid, P);
    if (warp == 1 && (tid & 31) == 0) rg.epoch = start_epoch(p, grid);
    __syncthreads();
    const int steps = rg.steps;

    if (steps > 0) {
        const bool producer = warp == kProducerWarp;
        Producer<T, kSa, kWt> prod;
        if (producer) {
            prod.start(p, prefix, step_item<T>(rg, r, grid, P, 0), kG * step_off<T>(rg, 0));
#pragma unroll 1
            for (int i = 0; i < S - 1 && i < steps; i++) {
                prod.issue(p, tm, tmw, ring[i], &full[i]);
                prod.advance(p, prefix, rg, P, i + 1);
            }
        }
        /* The stage barriers pair up one to one: the other warps release step j's stage exactly
        ** when warp 0 will refill it with step i = j + S (release: j + S < steps; refill: S <= i <
        ** steps), so no barrier is left half-arrived at the CTA's end. A warp's next arrival on the
        ** same barrier (step j + S) waits for full[] of a load issued after warp 0's sync, so an
        ** instance always completes before it is reused. Keep the two conditions in step.
        ** The ids are registers, so ptxas reserves all 16 named barriers: 64 a SM cap the kernel at
        ** 4 CTAs/SM (T = 8 runs 3). */
        auto release = [&](int j) { /* after this warp's last read of step j's stage */
            if (!producer && j + S < steps) named_bar_arrive(kStageBar + j % S, kThreads);
        };
        /* Step j + S - 1 into the stage of step j - 1, once every warp is done with it. Called by
        ** the producer warp while its wgmma of step j run. */
        auto refill = [&](int j) {
            const int i = j + S - 1;
            if (i >= steps) return;
            if (i >= S) named_bar_sync(kStageBar + i % S, kThreads); /* counts as warp 0's own release */
            /* the stage's generic reads (fragments, scales) by every thread, then the TMA overwrite */
            fence_proxy_async();
            prod.issue(p, tm, tmw, ring[i % S], &full[i % S]);
            prod.advance(p, prefix, rg, P, i + 1);
        };

        float acc[T / 2];
#pragma unroll
        for (int i = 0; i < T / 2; i++) acc[i] = 0.0f;
        int cg = kG * step_off<T>(rg, 0); /* the step's first group */
        /* The item of the CTA's step j. */
        auto item_of = [&](int j) { return step_item<T>(rg, r, grid, P, j); };
        auto sync = [] { __syncthreads(); };
        auto contribute = [&]() { contribute_partial<T>(p, r, rg.epoch, acc, sync); };
#pragma unroll 1
        for (int j = 0; j < steps; j++) {
            mbar_wait(&full[j % S], (uint32_t)(j / S) & 1u); /* TMA wrote the activations: no proxy fence */
            if (j == 0) W4_TRACE(1);
            const Stage<T, kWt> &s = ring[j % S];
            const bool two = cg + 1 < p.G; /* else the item's last step with G odd */
            float part0[T / 2], part1[T / 2]; /* fresh per step: the first wgmma of each overwrites */
            uint32_t a0[4][4], a1[4][4];
            convert<T, kWt>(s, 0, a0);
            convert<T, kWt>(s, 1, a1);
#pragma unroll
            for (int i = 0; i < T / 2; i++) reg_fence(part0[i]), reg_fence(part1[i]);
            wgmma_fence();
            mma_group<T, kWt>(s, 0, a0, part0);
            /* also when the step has one group (stale stage bytes, the partial unused): a
            ** branch here makes ptxas inject a warpgroup.arrive (C7519) */
            mma_group<T, kWt>(s, 1, a1, part1);
            wgmma_commit();
            if (producer) refill(j);
            /* the scales while the wgmma run */
            const GroupScales<T, kSa> gs0 = load_scales<T, kSa>(s, 0, cg), gs1 = load_scales<T, kSa>(s, 1, cg + 1);
            wgmma_wait<0>();
            release(j);
#pragma unroll
            for (int i = 0; i < T / 2; i++) reg_fence(part0[i]), reg_fence(part1[i]);
            promote<T, kSa>(gs0, part0, acc);
            if (two) promote<T, kSa>(gs1, part1, acc);
            if ((cg += kG) >= p.G) { /* step j ended its item */
                if (is_head<T>(rg, j, P)) contribute();
                else epilogue<T, kSa, kWt>(p, find_item<T>(p, prefix, item_of(j)), acc);
                cg = kG * step_off<T>(rg, j + 1);
            }
        }
        W4_TRACE(2);
        if (cg != 0)
            finish_range<T>(p, prefix, rg, r, grid, P, steps, acc, sync, [&](const Item &it) { epilogue<T, kSa, kWt>(p, it, acc); });
        cp_async_wait<0>();
    }
    __syncthreads(); /* no longer needed for the launch counter; removed only together with the warp-specialized kernel's, which then spilled */
    W4_TRACE(3);
}

/* T = 24 to 128, warp-specialized (kWarpSpecialized): the same step sequence, stream-K ranges, stages,
** conversion, promotion and epilogue as the kernel above, in another division of labour.
** Warpgroup 0 produces: it hands its registers to the consumers (setmaxnreg), and warp 0 walks the
** CTA's steps issuing each stage's loads once the consumers have released it (empty[], an
** mbarrier of the 256 consumer threads). Warpgroups 1 and 2 consume, 64 weight rows each, and take
** turns at issuing (kTurnBar). A pair of steps of one item goes out as two commit groups into two
** partials: the first is promoted while the second's wgmma run (wgmma.wait_group 1), in group order,
** so the fp32 operations and their bits are those of one group a step. A step with no partner in its
** item (the item's last when its range has an odd count left) runs alone, and so does every step at
** T = 40 to 64 (kPairs). */
template <int T, int kSa, int kWt, int S>
__global__ void __launch_bounds__(kWsThreads, kWsCtas<T>)
w4a8_gemm_ws_kernel(const __grid_constant__ Problem p, const __grid_constant__ CUtensorMap tm, const __grid_constant__ CUtensorMap tmw) {
    static_assert(kWarpSpecialized<T> && kGroups<T> == 1, "one group a step");
    W4_TRACE(0);
    extern __shared__ __align__(128) uint8_t smem_raw[];
    uint8_t *smem = smem_raw + ((1024u - (smem_u32(smem_raw) & 1023u)) & 1023u);
    Stage<T, kWt> *ring = reinterpret_cast<Stage<T, kWt> *>(smem);
    uint8_t *epi_buf = smem + S * sizeof(Stage<T, kWt>); /* kEpiBytes: the tiles handed to the storer warps */
    uint64_t *full = reinterpret_cast<uint64_t *>(epi_buf + kEpiBytes<T, kWt>), *empty = full + S;
    EpiHand &eh = *reinterpret_cast<EpiHand *>(empty + S);
    Range &rg = *reinterpret_cast<Range *>(&eh + 1);
    int *prefix = reinterpret_cast<int *>(&rg + 1);
    const int warp = threadIdx.x >> 5, P = p.G;
    const int grid = gridDim.x, r = grid - 1 - (int)blockIdx.x;
    if (threadIdx.x < S) mbar_init(&full[threadIdx.x], 32 + 1), mbar_init(&empty[threadIdx.x], 2 * 128);
    if (kEpiWarps<T, kWt> && threadIdx.x < 2)
        mbar_init(&eh.full[threadIdx.x], 128), mbar_init(&eh.empty[threadIdx.x], kStorers);
    fence_proxy_async();
    if (warp == 0) plan<T>(p, rg, prefix, r, grid, P);
    if (warp == 1 && (threadIdx.x & 31) == 0) rg.epoch = start_epoch(p, grid);
    __syncthreads();
    const int steps = rg.steps;
    if (threadIdx.x < 128) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kWsProducerRegs<T>));
        if (warp == 0 && steps > 0) {
            Producer<T, kSa, kWt> prod;
            prod.start(p, prefix, step_item<T>(rg, r, grid, P, 0), step_off<T>(rg, 0));
#pragma unroll 1
            for (int i = 0; i < steps; i++) {
                if (i >= S) {
                    mbar_wait(&empty[i % S], (uint32_t)(i / S - 1) & 1u);
                    fence_proxy_async(); /* the consumers' generic reads of the stage, then the TMA overwrite */
                }
                prod.issue(p, tm, tmw, ring[i % S], &full[i % S]);
                prod.advance(p, prefix, rg, P, i + 1);
            }
            /* no wait for the copies here: each completes on its full[] (cp.async through its noinc
            ** arrival), and the consumers wait for every full[] before the final barrier */
        } else if (kEpiWarps<T, kWt> && steps > 0) {
            store_tiles<T, kWt>(p, epi_buf, eh);
        }
    } else if (steps > 0) {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kWsConsumerRegs<T>));
        float acc[T / 2];
#pragma unroll
        for (int i = 0; i < T / 2; i++) acc[i] = 0.0f;
        int cg = step_off<T>(rg, 0);
        auto sync = [] { named_bar_sync(kConsumerBar, 2 * 128); };
        uint32_t handed = 0; /* tiles handed to the storer warps (kEpiWarps) */
        auto epi = [&](const Item &it) {
            if constexpr (kEpiWarps<T, kWt>) hand_over<T, kSa, kWt>(p, &it, acc, epi_buf, eh, handed);
            else epilogue<T, kSa, kWt>(p, it, acc);
        };
        /* the turns' barrier ids (kTurnBar): from threadIdx at each use, since an id held in a register
        ** across the loop spilled in the int4 tiles at T = 128 */
        auto my_turn = [] { return kTurnBar - 1 + (int)(threadIdx.x >> 7); };
        auto your_turn = [] { return kTurnBar + 2 - (int)(threadIdx.x >> 7); };
        if (my_turn() == kTurnBar + 1) named_bar_arrive(kTurnBar, 2 * 128); /* warpgroup 0 issues first */
        /* step i's 4 wgmma into part (one commit group); then, once waited for, its promotion. bf16
        ** weights have no scales to apply, so their wgmma accumulate into acc itself (kAccDirect) */
        auto issue = [&](int i, uint32_t(&a)[4][4], float(&part)[T / 2], uint2(&pre)[kSaPreN<T, kSa, kWt>]) {
            mbar_wait(&full[i % S], (uint32_t)(i / S) & 1u);
            if (i == 0) W4_TRACE_BY(1, 128);
            convert<T, kWt>(ring[i % S], 0, a);
            float(&d)[T / 2] = kAccDirect<kWt> ? acc : part;
#pragma unroll
            for (int q = 0; q < T / 2; q++) reg_fence(d[q]);
            wgmma_fence();
            mma_group<T, kWt, kAccDirect<kWt>>(ring[i % S], 0, a, d);
            wgmma_commit();
            if constexpr (kSaPre<T, kSa, kWt>)
#pragma unroll
                for (int jj = 0; jj < T / 8; jj++) pre[jj] = sa_words<true>(ring[i % S].sa[0], jj);
        };
        /* the scales are read as the promotion uses them (but kSaPre's words, read in issue): loaded
        ** whole first (GroupScales), UE8M0's 32 conversions held 32 more registers and spilled ~60 */
        auto retire = [&](int i, int g, float(&part)[T / 2], const uint2(&pre)[kSaPreN<T, kSa, kWt>]) {
#pragma unroll
            for (int q = 0; q < T / 2; q++) reg_fence(part[q]);
            const Stage<T, kWt> &st = ring[i % S];
            using St = Stage<T, kWt>;
            static_assert(offsetof(St, sa) % 8 == 0 && T % 8 == 0, "sa_words: 8-byte pairs");
            const int row = acc_row<T>();
            auto sa2_of = [&](int jj) {
                uint2 wv;
                if constexpr (kSaPre<T, kSa, kWt>) wv = pre[jj];
                else wv = sa_words<kSaPair<T, kSa, kWt>>(st.sa[0], jj);
                return make_float2(sa_value<kSa>(wv.x, g), sa_value<kSa>(wv.y, g));
            };
            if constexpr (kTokM<T, kWt>) {
                /* tokens as M: the thread's two tokens' sw * sa, then one FMA an element */
                const float sw = *reinterpret_cast<const float *>(&st.sw[0][0]);
                auto sa_tok = [&](int t) {
                    const uint32_t wv = st.sa[0][t];
                    return kSa == 2 ? fmt_ue8m0_to_float((uint8_t)(wv >> (8 * (g & 3)))) : __uint_as_float(wv);
                };
                const float s0 = __fmul_rn(sw, sa_tok(row)), s1 = __fmul_rn(sw, sa_tok(row + 8));
#pragma unroll
                for (int jj = 0; jj < T / 8; jj++)
#pragma unroll
                    for (int c = 0; c < 2; c++) {
                        acc[jj * 4 + c] = fmaf(part[jj * 4 + c], s0, acc[jj * 4 + c]);
                        acc[jj * 4 + 2 + c] = fmaf(part[jj * 4 + 2 + c], s1, acc[jj * 4 + 2 + c]);
                    }
            } else if constexpr (kWt == kWtFp8) {
                /* one block scale for all the tile's rows (a 128-row tile is one block): the column's
                ** sw * sa once, then one FMA an element where int4's per-row scales take two */
                const float sw = *reinterpret_cast<const float *>(&st.sw[0][0]);
#pragma unroll
                for (int jj = 0; jj < T / 8; jj++) {
                    const float2 sa2 = sa2_of(jj);
#pragma unroll
                    for (int c = 0; c < 2; c++) {
                        const float s = __fmul_rn(sw, c ? sa2.y : sa2.x);
                        acc[jj * 4 + c] = fmaf(part[jj * 4 + c], s, acc[jj * 4 + c]);
                        acc[jj * 4 + 2 + c] = fmaf(part[jj * 4 + 2 + c], s, acc[jj * 4 + 2 + c]);
                    }
                }
            } else if constexpr (kAccDirect<kWt>) {
                /* accumulated by the wgmma themselves (issue); acc is touched only after the last wait */
            } else {
                promote<T, kSa>(fmt_bf16_to_float(st.sw[0][row]), fmt_bf16_to_float(st.sw[0][row + 8]), sa2_of, part, acc);
            }
            mbar_arrive(&empty[i % S]); /* after the stage's last read */
        };
#pragma unroll 1
        for (int j = 0; j < steps;) {
            const bool two = kPairs<T> && j + 1 < steps && cg + 1 < p.G; /* a partner in the same item */
            float part0[T / 2], part1[T / 2];
            uint32_t a0[4][4], a1[4][4];
            uint2 pre0[kSaPreN<T, kSa, kWt>], pre1[kSaPreN<T, kSa, kWt>];
            named_bar_sync(my_turn(), 2 * 128); /* each round of issues (a pair or one step) is one turn */
            if (two) { /* straight-line: a branch between the commits and the waits makes ptxas add waits (C7517) */
                issue(j, a0, part0, pre0);
                issue(j + 1, a1, part1, pre1);
                named_bar_arrive(your_turn(), 2 * 128);
                wgmma_wait<1>();
                retire(j, cg, part0, pre0);
                wgmma_wait<0>();
                retire(j + 1, cg + 1, part1, pre1);
            } else {
                issue(j, a0, part0, pre0);
                named_bar_arrive(your_turn(), 2 * 128);
                wgmma_wait<0>();
                retire(j, cg, part0, pre0);
            }
            if constexpr (kAccDirect<kWt>) {
#pragma unroll
                for (int q = 0; q < T / 2; q++) reg_fence(acc[q]); /* every wgmma into it waited for */
            }
            j += two ? 2 : 1;
            if ((cg += two ? 2 : 1) >= p.G) { /* step j - 1 ended its item */
                const int last = j - 1;
                if (is_head<T>(rg, last, P)) contribute_partial<T>(p, r, rg.epoch, acc, sync);
                else epi(find_item<T>(p, prefix, step_item<T>(rg, r, grid, P, last)));
                cg = step_off<T>(rg, j);
            }
        }
        /* both warpgroups run the same rounds; warpgroup 1's last pass is taken here, so no barrier is
        ** left with a pending arrival */
        if (my_turn() == kTurnBar) named_bar_sync(kTurnBar, 2 * 128);
        W4_TRACE_BY(2, 128);
        if (cg != 0) finish_range<T>(p, prefix, rg, r, grid, P, steps, acc, sync, epi);
        if constexpr (kEpiWarps<T, kWt>) hand_over<T, kSa, kWt>(p, nullptr, acc, epi_buf, eh, handed); /* the end */
    }
    __syncthreads(); /* without it ptxas spills in the T = 128 consumers (16-184 bytes) */
    W4_TRACE(3);
}

/* Workspace: [launch counter: 8 bytes, in 256 B][flags: one word per CTA][slots: (T/2) x 256 floats per CTA].
** Bounds over every tile: at most kMaxCtasPerSm CTAs per SM and 80 KB of slots per SM (T = 80 at
** 2 CTAs/SM: (T/2) * 256 * 4 bytes each; T = 128 at 1 CTA/SM takes 64; launch() asserts it). */
constexpr int kMaxCtasPerSm = 8;
constexpr size_t kSlotBytesPerSm = 80 * 1024;
size_t flags_bytes(int sms) { return ((size_t)sms * kMaxCtasPerSm * 4 + 255) / 256 * 256; }

/* A [rows, K bytes] matrix as a TMA tensor: box_rows x 128-byte boxes in the 128-byte swizzle, zero
** past the last row. The activations [E * M, K] (T-row boxes) and fp8 or bf16 weights [E * N, K] (128-row
** boxes). cuTensorMapEncodeTiled is a driver entry point: taken through the runtime, so the library
** links no libcuda. */
epmoe_status tensor_map(const char *fn, const void *base, int64_t K, int64_t rows, int box_rows, CUtensorMap *tm) {
    static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
        void *f = nullptr;
        cudaDriverEntryPointQueryResult q;
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) != cudaSuccess ||
            q != cudaDriverEntryPointSuccess) {
            cudaGetLastError();
            f = nullptr;
        }
        return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
    }();
    if (!encode) return epmoe__fail(EPMOE_ERR_CUDA, "%s: the driver has no cuTensorMapEncodeTiled", fn);
    const cuuint64_t dim[2] = {(cuuint64_t)K, (cuuint64_t)rows}, stride[1] = {(cuuint64_t)K};
    const cuuint32_t box[2] = {W4_GROUP, (cuuint32_t)box_rows}, estride[2] = {1, 1};
    const CUresult rc = encode(tm, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<void *>(base), dim, stride, box, estride,
                               CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                               CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (rc != CUDA_SUCCESS) return epmoe__fail(EPMOE_ERR_CUDA, "%s: cuTensorMapEncodeTiled failed (%d)", fn, (int)rc);
    return EPMOE_OK;
}

template <int T, int kSa, int kWt, int S> constexpr auto kernel_of() {
    if constexpr (kWarpSpecialized<T>) return w4a8_gemm_ws_kernel<T, kSa, kWt, S>;
    else return w4a8_gemm_kernel<T, kSa, kWt, S>;
}

template <int T, int kSa, int kWt>
epmoe_status launch(const char *fn, const Problem &p, int sms, cudaStream_t stream) {
    /* two groups a step: T = 8 3 stages, the bytes of 6 one-group stages (3 CTAs/SM, all the shared
    ** memory), 4 groups ahead of the consumer; T = 16 (2 CTAs/SM) 4 stages: 1% faster than 3 at
    ** 16 rows, 5 2% slower (DeepSeek-R1 W13 + W2, H200, 2026-11-30). Warp-specialized, one group a
    ** stage: T = 32 (2 CTAs/SM) 5, 1.5-2.5% faster at 20 and 32 rows than the 8 it had, 4 and 6 the
    ** same as 5; T = 64 (2 CTAs/SM) 4, 1.5% faster at 40 and 64 rows than 6 (what fits) and than 3;
    ** T = 128 (1 CTA/SM) 8: the lab's schedule ran 3% faster at 1024 rows than with 6
    ** (w4a8_prefill_lab; H200, 2026-12-01). The tiles between take their neighbour's: T = 24 5, 40-56
    ** 4 (T = 48: 2-3% slower at 6), 72 and 80 4 (as 64, not measured apart), 96 8. T = 112 and 128
    ** give a stage to the storer warps' tile (kEpiWarps): 7. */
    constexpr bool kWs = kWarpSpecialized<T>;
    /* fp8 and bf16 weights: twice the bytes a stage; T = 32 5 stages and 64 3 (2 CTAs/SM), 128 5 (6
    ** before the storer warps' tile took one: 4 at T = 64 and 5 at 128 had measured the same or 0.5%
    ** slower, 2026-12-01), bf16's 256 4 (what fits); only those tiles were measured for them (their
    ** entry points below pick no other) */
    static_assert(!kWtTma<kWt> || T == 32 || T == 64 || T == 128 || (T == 256 && kWt == kWtBf16), "fp8 and bf16 weights: a measured tile");
    constexpr int S = kWtTma<kWt> ? (T == 256 ? 4 : T == 64 ? 3 : 5) : kGroups<T> == 2 ? (T >= 16 ? 4 : 3) : T > 32 && T <= 80 ? 4 : T == 32 || T == 24 ? 5 : T >= 112 ? 7 : 8;
    constexpr int threads = kWs ? kWsThreads : kThreads;
    constexpr auto kernel = kernel_of<T, kSa, kWt, S>();
    static_assert(kWs || kStageBar + S <= 16, "a named barrier per stage");
    static_assert(kWtTma<kWt> || (size_t)(kWs ? kWsCtas<T> : T <= 8 ? 3 : 2) * (T / 2) * kThreads * sizeof(float) <= kSlotBytesPerSm,
                  "the stream-K slots of an SM's CTAs (at the designed occupancy) fit the workspace's share");
    const size_t smem = 1024 + S * (sizeof(Stage<T, kWt>) + (kWs ? 2 : 1) * sizeof(uint64_t)) + kEpiBytes<T, kWt> +
                        (kWs ? sizeof(EpiHand) : 0) + sizeof(Range) + (size_t)(2 * p.E + 1) * sizeof(int);
    cudaError_t err = grow_smem_attr<kernel>(smem);
    int per_sm = 0;
    if (err == cudaSuccess) err = blocks_per_sm<kernel>(threads, smem, &per_sm);
    if constexpr (kWs) {
        static const int regs = [] {
            cudaFuncAttributes fa;
            return cudaFuncGetAttributes(&fa, kernel) == cudaSuccess ? fa.numRegs : -1;
        }();
        if (regs < 0 || 128 * kWsProducerRegs<T> + 256 * kWsConsumerRegs<T> > kWsThreads * regs)
            return epmoe__fail(EPMOE_ERR_INTERNAL, "%s: the T = %d kernel was built with %d registers a thread, fewer than its setmaxnreg split needs", fn, T, regs);
    }
    if (per_sm > kMaxCtasPerSm) per_sm = kMaxCtasPerSm;
    if (err != cudaSuccess) cudaGetLastError(); /* not a failure of the caller's next launch */
    if (err != cudaSuccess || per_sm < 1)
        return epmoe__fail(EPMOE_ERR_CUDA, "%s: cannot fit the T = %d kernel (%zu bytes of shared memory): %s", fn, T,
                           smem, cudaGetErrorString(err));
    if ((unsigned long long)sms * per_sm > kLaunchUnit ||
        (p.slots && (size_t)sms * per_sm * (T / 2) * kThreads * sizeof(float) > p.slots_bytes))
        return epmoe__fail(EPMOE_ERR_INTERNAL, "%s: the T = %d grid exceeds the launch counter's unit or its stream-K slots the workspace", fn, T);
    CUtensorMap tm, tmw = {};
    EPMOE_CHECK(tensor_map(fn, p.a, p.K, (int64_t)p.E * p.M, T, &tm));
    if (kWtTma<kWt>) EPMOE_CHECK(tensor_map(fn, p.qw, p.K, (int64_t)p.E * p.N, W4_TILE_N, &tmw));
    kernel<<<sms * per_sm, threads, smem, stream>>>(p, tm, tmw);
    return epmoe__launched(fn);
}

/* kSa: 0 per-tensor activation scale, 1 fp32 group scales, 2 UE8M0 group scales. */
template <int T>
epmoe_status pick_mode(const char *fn, const Problem &p, bool group, bool full, int sms, cudaStream_t stream) {
    if (!group) return full ? launch<T, 0, kWtInt4Full>(fn, p, sms, stream) : launch<T, 0, kWtInt4>(fn, p, sms, stream);
    if (fmt_scale_is_ue8m0(p.fmt))
        return full ? launch<T, 2, kWtInt4Full>(fn, p, sms, stream) : launch<T, 2, kWtInt4>(fn, p, sms, stream);
    return full ? launch<T, 1, kWtInt4Full>(fn, p, sms, stream) : launch<T, 1, kWtInt4>(fn, p, sms, stream);
}
template <int T> epmoe_status launch_fp8(const char *fn, const Problem &p, int sms, cudaStream_t stream) {
    return fmt_scale_is_ue8m0(p.fmt) ? launch<T, 2, kWtFp8>(fn, p, sms, stream) : launch<T, 1, kWtFp8>(fn, p, sms, stream);
}

/* What both entry points set alike: the shapes, the output, the fp8 activation rows [E, M, K] and
** their 1x128 scales if any. */
void set_common(Problem &p, int64_t E, int64_t N, int64_t K, int64_t M, const int32_t *masked_m, uint16_t *out,
                int64_t row_stride, int64_t expert_stride, const void *a, const void *sa, int fmt) {
    p.masked_m = masked_m;
    p.out = out;
    p.N = N, p.K = K, p.M = M;
    p.row_stride = row_stride, p.expert_stride = expert_stride;
    p.E = (int)E, p.NT = (int)(N / W4_TILE_N), p.G = (int)(K / W4_GROUP);
    p.a = static_cast<const uint8_t *>(a);
    p.sa = static_cast<const uint8_t *>(sa);
    p.fmt = sa ? fmt : 0;
    p.sa_slab = sa ? fmt_scale_slab_bytes(p.fmt, p.M, p.G) : 0;
    p.sa_tok = fmt_scale_offset(p.fmt, p.M, p.G, 1, 0) - fmt_scale_offset(p.fmt, p.M, p.G, 0, 0);
    p.sa_step = fmt_scale_offset(p.fmt, p.M, p.G, 0, fmt_scale_is_ue8m0(p.fmt) ? 4 : 1) - fmt_scale_offset(p.fmt, p.M, p.G, 0, 0);
}

} // namespace

#ifdef EPMOE_W4A8_TRACE
/* The trace buffer [kTraceCtas][5] (dev builds only; bench_w4a8 reads it). */
extern "C" unsigned long long *epmoe__w4a8_trace(int *ctas) {
    void *p = nullptr;
    if (cudaGetSymbolAddress(&p, g_trace) != cudaSuccess) return nullptr;
    *ctas = kTraceCtas;
    return static_cast<unsigned long long *>(p);
}
#endif

extern "C" size_t epmoe_w4a8_gemm_workspace(void) {
    const int sms = epmoe__sm_count();
    return sms > 0 ? 256 + flags_bytes(sms) + (size_t)sms * kSlotBytesPerSm : 0;
}

extern "C" epmoe_status epmoe_w4a8_gemm_cuda(const epmoe_w4a8_gemm_args *g, epmoe_stream_t stream) {
    static const char fn[] = "epmoe_w4a8_gemm_cuda";
    EPMOE_CHECK(epmoe__check_w4a8_gemm(fn, g, 1));
    if (g->w.E == 0 || g->M == 0) return EPMOE_OK;
    int sms;
    EPMOE_CHECK(epmoe__need_device(fn, &sms));
    const size_t ws = epmoe_w4a8_gemm_workspace();
    if (!g->workspace)
        return epmoe__fail(EPMOE_ERR_NULL_POINTER, "%s: workspace is NULL (need epmoe_w4a8_gemm_workspace() = %zu bytes)", fn, ws);
    if (((uintptr_t)g->workspace & 255u) != 0)
        return epmoe__fail(EPMOE_ERR_MISALIGNED, "%s: workspace = %p is not 256-byte aligned", fn, g->workspace);
    if (g->workspace_bytes < ws)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: workspace_bytes = %zu, need epmoe_w4a8_gemm_workspace() = %zu", fn,
                           g->workspace_bytes, ws);
    EPMOE_CHECK(epmoe__w4a8_workspace_apart(fn, g, ws));
    Problem p;
    p.sync = static_cast<unsigned long long *>(g->workspace);
    p.flags = reinterpret_cast<uint32_t *>(static_cast<uint8_t *>(g->workspace) + 256);
    p.slots = reinterpret_cast<float *>(static_cast<uint8_t *>(g->workspace) + 256 + flags_bytes(sms));
    p.slots_bytes = ws - 256 - flags_bytes(sms);
    p.qw = static_cast<const uint8_t *>(g->w.qweight);
    p.sw = g->w.scales;
    p.bs = nullptr;
    p.sa_tensor = g->a_tensor_scale;
    set_common(p, g->w.E, g->w.N, g->w.K, g->M, g->masked_m, g->out, g->out_row_stride, g->out_expert_stride, g->a, g->a_scales,
               (int)g->a_scale_fmt);
    const bool group = g->a_scales != nullptr, full = g->w.encoding == EPMOE_W4_FULL;
    /* The token tile: the smallest that covers the expected rows (fp8-block's entry below, from 32).
    ** Tiles every 8 tokens to 64 and every 16 to 128: a larger tile's tensor and promotion work bound
    ** these sizes (see kWsCtas). */
    const int64_t em = g->expected_m > 0 ? g->expected_m : g->M;
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    if (em <= 8) return pick_mode<8>(fn, p, group, full, sms, s);
    if (em <= 16) return pick_mode<16>(fn, p, group, full, sms, s);
    if (em <= 24) return pick_mode<24>(fn, p, group, full, sms, s);
    if (em <= 32) return pick_mode<32>(fn, p, group, full, sms, s);
    if (em <= 40) return pick_mode<40>(fn, p, group, full, sms, s);
    if (em <= 48) return pick_mode<48>(fn, p, group, full, sms, s);
    if (em <= 56) return pick_mode<56>(fn, p, group, full, sms, s);
    if (em <= 64) return pick_mode<64>(fn, p, group, full, sms, s);
    if (em <= 72) return pick_mode<72>(fn, p, group, full, sms, s);
    if (em <= 80) return pick_mode<80>(fn, p, group, full, sms, s);
    if (em <= 96) return pick_mode<96>(fn, p, group, full, sms, s);
    if (em <= 112) return pick_mode<112>(fn, p, group, full, sms, s);
    return pick_mode<128>(fn, p, group, full, sms, s);
}

/* The fp8-block scheme's expert GEMM (epmoe_expert_gemm_cuda with FP8_BLOCK weights, checked by
** the caller, its limits included): fp8 weights in the checkpoint layout with their 128 x 128 block
** scales, fp8 activations with 1x128 scales, no workspace (whole items per CTA, so no stream-K
** partials). */
extern "C" epmoe_status epmoe__fp8_block_gemm_launch(const epmoe_expert_gemm_args *g, epmoe_stream_t stream) {
    static const char fn[] = "epmoe_expert_gemm_cuda";
    int sms;
    EPMOE_CHECK(epmoe__need_device(fn, &sms));
    /* the 32-bit TMA coordinates (rows E * M, E * N) and item counts: checked with the arguments
    ** (epmoe__check_wgmma_limits) */
    Problem p = {};
    p.qw = static_cast<const uint8_t *>(g->w.data);
    p.bs = g->w.scales;
    set_common(p, g->w.E, g->w.N, g->w.K, g->M, g->masked_m, g->out, g->out_row_stride, g->out_expert_stride, g->a, g->a_scales,
               (int)g->a_scale_fmt);
    const int64_t em = g->expected_m > 0 ? g->expected_m : g->M;
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    if (em <= 32) return launch_fp8<32>(fn, p, sms, s);
    if (em <= 64) return launch_fp8<64>(fn, p, sms, s);
    return launch_fp8<128>(fn, p, sms, s);
}

/* The bf16 scheme's expert GEMM (epmoe_expert_gemm_cuda with BF16 weights, checked by the caller,
** its limits included): bf16 weights [E, N, K] and tokens [E, M, K], both seen as rows of 2K bytes,
** so a step is 64 elements of K; no scales, no workspace (whole items per CTA). */
extern "C" epmoe_status epmoe__bf16_gemm_launch(const epmoe_expert_gemm_args *g, epmoe_stream_t stream) {
    static const char fn[] = "epmoe_expert_gemm_cuda";
    int sms;
    EPMOE_CHECK(epmoe__need_device(fn, &sms));
    Problem p = {};
    p.qw = static_cast<const uint8_t *>(g->w.data);
    set_common(p, g->w.E, g->w.N, 2 * g->w.K, g->M, g->masked_m, g->out, g->out_row_stride, g->out_expert_stride, g->a, nullptr, 0);
    const int64_t em = g->expected_m > 0 ? g->expected_m : g->M;
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    if (em <= 64) return launch<64, 0, kWtBf16>(fn, p, sms, s); /* from 33 rows: expert_gemm.cu keeps fewer */
    if (em <= 128) return launch<128, 0, kWtBf16>(fn, p, sms, s);
    return launch<256, 0, kWtBf16>(fn, p, sms, s); /* 4 stages: what fits */
}
