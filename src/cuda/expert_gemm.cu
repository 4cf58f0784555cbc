/*
** expert_gemm.cu — masked grouped GEMM of the bf16 and w4a16 schemes, weights read in their
** checkpoint layout, and the one place every scheme's expert GEMM picks its kernel (the
** w8a8-fp8-block scheme's runs on wgmma in w4a8_gemm.cu, and so does bf16 from 33 expected rows).
** Spec: epmoe_expert_gemm_ref.
**
** Swap-AB on mma.sync m16n8k16 (fp32 accumulation): weights are the A operand (16 rows per warp),
** the tokens of one expert are N (8 per n-tile). Operand types, per weight format:
**   BF16       bf16 x bf16, straight from shared memory
**   INT4       int4 -> bf16 in registers (exact: 128 + u magic, minus 136) x bf16
** A CTA of kWarps warps owns kWarps*16 weight rows of one expert and walks K in 128-wide stages
** (cp.async, kStages in flight), then the expert's next 64-token tile. Grouped formats keep an
** fp32 partial per group (32 or 128 along K) and promote it: acc += partial * scale, so every
** product is exact and only fp32 sums round. (Until 2026-12-01 FP8_BLOCK ran here too, both
** operands converted to f16: at decode 565 us for DeepSeek-R1's W13 + W2, 1130 at 32 rows and 3138
** at 128, against 342, 365 and 518 on wgmma; bench_w4a8, H200.)
**
** K order inside a stage: a thread's fragment slots hold 8 consecutive k of each 32-wide chunk
** (not the mma's natural interleave). The dot product does not care which slot holds which k as
** long as both operands agree, and this way every fragment is one contiguous load and a 32-group
** never straddles an mma. Shared-memory rows are XOR-swizzled in 16-byte chunks so that the 8
** (or 16, 32) lanes of one access phase hit distinct banks.
*/
#include <cuda_bf16.h>

#include "common.cuh"

namespace {

constexpr int kWarps = 4, kThreads = kWarps * 32, kBN = kWarps * 16, kBK = 128;

/* kBT: tokens per tile, 16 (decode: small stages, many in flight) or 64 (more rows per expert).
** As many stages as fit in ~100 KB: the weight bytes in flight are what the bandwidth needs. But
** int4's 16-token tiles are bound by their conversion, not their bytes: fewer stages put more CTAs
** on an SM. W13 + W2 at 1 / 8 rows (DeepSeek-R1, bench_w4a8, H200, 2026-12-01): group 128 at 8 stages
** (3 CTAs/SM) 387-393 us, 5 (4 CTAs) 367-371, 4 (5 CTAs) 380-386, 3 (6 CTAs) 369-373; group 32 at 8
** stages 499-506, 5 455-460, 4 464-471, 3 (5 CTAs/SM: 90 registers) 429-435. Without the fp8 code
** that was here, group 32 takes 80 registers (6 CTAs/SM at 3 stages): 432-437. */
template <int F, int kGroup, int kBT> struct Traits {
    static constexpr int kWRow = F == EPMOE_WEIGHT_BF16 ? 256 : 64; /* bytes */
    static constexpr int kARow = 256;
    /* a stage: weight tile, token tile, weight scales ([kBN][4]: up to 4 groups of 32) */
    static constexpr int kWsOff = kBN * kWRow + kBT * kARow;
    static constexpr int kStageBytes = kWsOff + kBN * 16;
    static constexpr int kFit = 100 * 1024 / kStageBytes;
    static constexpr int kStages = F == EPMOE_WEIGHT_INT4 && kBT == 16 ? (kGroup == 32 ? 3 : 5)
                                                                       : kFit < 2 ? 2 : kFit > 8 ? 8 : kFit;
};

/* Chunk q (16 bytes) of row r lands at q ^ swz(r): the lanes of one shared-memory phase read
** the same k range of different rows; this spreads those rows over all 32 banks. */
template <int kRow> __device__ __forceinline__ int swz(int r) {
    return kRow == 256 ? (r & 1) << 2 : kRow == 128 ? (r & 3) << 1 : (r >> 1) & 3;
}
template <int kRow> __device__ __forceinline__ int sm_off(int r, int byte) {
    return r * kRow + ((((byte >> 4) ^ swz<kRow>(r)) << 4) | (byte & 15));
}

__device__ __forceinline__ void cp_async16(void *smem, const void *gmem) {
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async4(void *smem, const void *gmem) {
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

/* not volatile: independent mmas must stay free to interleave */
__device__ __forceinline__ void mma(float *c, const uint32_t *a, uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* Byte b of the nibble words lo/hi (nibbles already offset by +8) -> bf16x2 (lo nibble, hi
** nibble) as exact integers: 0x43 0x(u) is the bf16 128 + u; subtracting 136 gives u - 8. */
template <int b> __device__ __forceinline__ uint32_t bf16x2_from_int4_byte(uint32_t lo, uint32_t hi) {
    constexpr uint32_t sel = b | (b << 4) | ((4 + b) << 8) | ((4 + b) << 12);
    const uint32_t x = (__byte_perm(lo, hi, sel) & 0x00FF00FFu) | 0x43004300u;
    __nv_bfloat162 v = *reinterpret_cast<const __nv_bfloat162 *>(&x);
    v = __hsub2(v, __floats2bfloat162_rn(136.0f, 136.0f));
    return *reinterpret_cast<uint32_t *>(&v);
}

struct Args {
    const uint8_t *w;
    const float *ws;
    const uint8_t *a;
    const int32_t *masked_m;
    uint16_t *out;
    int64_t N, K, M, row_stride, expert_stride;
};

template <int F, int kGroup, int kBT>
__global__ void __launch_bounds__(kThreads) expert_gemm_kernel(Args p) {
    using Tr = Traits<F, kGroup, kBT>;
    constexpr bool kGrouped = F != EPMOE_WEIGHT_BF16;
    constexpr int kJ = kBT / 8;
    extern __shared__ __align__(128) uint8_t smem[];
    const int e = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int rows = __ldg(p.masked_m + e);
    rows = rows < 0 ? 0 : (rows > p.M ? (int)p.M : rows);
    if (rows == 0) return;
    const int64_t n0 = (int64_t)blockIdx.x * kBN;
    const int KT = (int)(p.K / kBK), mtiles = (rows + kBT - 1) / kBT, steps = mtiles * KT;
    const int64_t wrow_bytes = F == EPMOE_WEIGHT_BF16 ? p.K * 2 : p.K / 2, arow_bytes = p.K * 2;
    const uint8_t *wbase = p.w + ((int64_t)e * p.N + n0) * wrow_bytes;
    const uint8_t *abase = p.a + (int64_t)e * p.M * arow_bytes;

    /* The loader walks the steps (m-tile, K stage) in order. Each thread's share of a stage is
    ** the same chunks every time, so their addresses are computed once; a step adds offsets. */
    constexpr int wc = Tr::kWRow / 16, ac = Tr::kARow / 16; /* 16-byte chunks per row */
    constexpr int kWCopies = kBN * wc / kThreads, kACopies = (kBT * ac + kThreads - 1) / kThreads;
    const uint8_t *wsrc[kWCopies];
    uint32_t wdst[kWCopies], adst[kACopies];
    int64_t asrc[kACopies];
    int arow[kACopies];
#pragma unroll
    for (int u = 0; u < kWCopies; u++) {
        const int c = threadIdx.x + u * kThreads, r = c / wc, q = c % wc;
        wsrc[u] = wbase + r * wrow_bytes + q * 16, wdst[u] = sm_off<Tr::kWRow>(r, q * 16);
    }
#pragma unroll
    for (int u = 0; u < kACopies; u++) {
        const int c = threadIdx.x + u * kThreads, r = c / ac, q = c % ac;
        arow[u] = c < kBT * ac ? r : kBT; /* kBT: never valid */
        asrc[u] = r * arow_bytes + q * 16, adst[u] = kBN * Tr::kWRow + sm_off<Tr::kARow>(r, q * 16);
    }
    constexpr int per = F == EPMOE_WEIGHT_INT4 ? kBK / kGroup : 1; /* weight-scale groups per stage */
    constexpr int kSCopies = (kBN * per + kThreads - 1) / kThreads;
    const float *ssrc[kSCopies];
#pragma unroll
    for (int u = 0; u < kSCopies; u++) {
        const int c = threadIdx.x + u * kThreads;
        ssrc[u] = p.ws + (e * p.N + n0 + c / per) * (p.K / kGroup) + c % per; /* INT4 only */
    }
    int l_step = 0, l_kt = 0, l_m0 = 0, l_stage = 0;
    auto load = [&]() { /* the next step's loads into its stage (a commit group each, empty past the end) */
        if (l_step < steps) {
            uint8_t *st = smem + l_stage * Tr::kStageBytes;
            const int nr = min(kBT, rows - l_m0);
#pragma unroll
            for (int u = 0; u < kWCopies; u++) cp_async16(st + wdst[u], wsrc[u] + l_kt * Tr::kWRow);
            const int64_t aoff = (int64_t)l_m0 * arow_bytes + l_kt * Tr::kARow;
#pragma unroll
            for (int u = 0; u < kACopies; u++)
                if (arow[u] < nr) cp_async16(st + adst[u], abase + asrc[u] + aoff);
            /* the scales ride in the same stage: loaded stages ahead, their latency never shows */
            float *ws = reinterpret_cast<float *>(st + Tr::kWsOff);
            if (F == EPMOE_WEIGHT_INT4) {
#pragma unroll
                for (int u = 0; u < kSCopies; u++) {
                    const int c = threadIdx.x + u * kThreads;
                    if (c < kBN * per) cp_async4(ws + (c / per) * 4 + c % per, ssrc[u] + l_kt * per);
                }
            }
            if (++l_kt == KT) l_kt = 0, l_m0 += kBT;
            if (++l_stage == Tr::kStages) l_stage = 0;
            l_step++;
        }
        cp_commit();
    };

    float acc[kJ][4], part[kJ][4];
#pragma unroll
    for (int j = 0; j < kJ; j++)
#pragma unroll
        for (int v = 0; v < 4; v++) acc[j][v] = 0.0f, part[j][v] = 0.0f;

#pragma unroll
    for (int i = 0; i < Tr::kStages - 1; i++) load();
    const int64_t nrow0 = n0 + warp * 16 + g; /* this thread's weight rows: nrow0, nrow0 + 8 */

    int kt = 0, m0 = 0, stage = 0;
    for (int i = 0; i < steps; i++) {
        cp_wait<Tr::kStages - 2>();
        __syncthreads();
        load();
        const uint8_t *st = smem + stage * Tr::kStageBytes;
        const uint8_t *sw = st + warp * 16 * Tr::kWRow, *sa = st + kBN * Tr::kWRow;
        const int nj = (min(kBT, rows - m0) + 7) / 8;

        /* this stage's scales, from shared memory */
        const float *ws = reinterpret_cast<const float *>(st + Tr::kWsOff);
        float wsc[4][2] = {};
        if (F == EPMOE_WEIGHT_INT4) {
#pragma unroll
            for (int c = 0; c < kBK / kGroup; c++) wsc[c][0] = ws[(warp * 16 + g) * 4 + c], wsc[c][1] = ws[(warp * 16 + g + 8) * 4 + c];
        }

#pragma unroll
        for (int c = 0; c < 4; c++) {
            /* raw operand bytes of chunk c: weights rows g, g + 8; tokens 8j + g */
            uint32_t wr[2][4];
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int r = g + 8 * h;
                if (F == EPMOE_WEIGHT_BF16) {
                    const uint4 v = *reinterpret_cast<const uint4 *>(sw + sm_off<Tr::kWRow>(r, 64 * c + 16 * t));
                    wr[h][0] = v.x, wr[h][1] = v.y, wr[h][2] = v.z, wr[h][3] = v.w;
                } else {
                    const uint32_t q = *reinterpret_cast<const uint32_t *>(sw + sm_off<Tr::kWRow>(r, 16 * c + 4 * t)) ^
                                       0x88888888u;
                    const uint32_t lo = q & 0x0F0F0F0Fu, hi = (q >> 4) & 0x0F0F0F0Fu;
                    wr[h][0] = bf16x2_from_int4_byte<0>(lo, hi), wr[h][1] = bf16x2_from_int4_byte<1>(lo, hi);
                    wr[h][2] = bf16x2_from_int4_byte<2>(lo, hi), wr[h][3] = bf16x2_from_int4_byte<3>(lo, hi);
                }
            }
            uint32_t b[kJ][4];
#pragma unroll
            for (int j = 0; j < kJ; j++) {
                if (j >= nj) continue;
                const uint4 v = *reinterpret_cast<const uint4 *>(sa + sm_off<Tr::kARow>(8 * j + g, 64 * c + 16 * t));
                b[j][0] = v.x, b[j][1] = v.y, b[j][2] = v.z, b[j][3] = v.w;
            }
#pragma unroll
            for (int s = 0; s < 2; s++) {
                /* slots: a0a1 row g k+{0,1}; a2a3 row g+8 k+{0,1}; a4a5 row g k+{2,3}; a6a7 row g+8 k+{2,3} */
                const uint32_t a[4] = {wr[0][2 * s], wr[1][2 * s], wr[0][2 * s + 1], wr[1][2 * s + 1]};
#pragma unroll
                for (int j = 0; j < kJ; j++)
                    if (j < nj) mma(kGrouped ? part[j] : acc[j], a, b[j][2 * s], b[j][2 * s + 1]);
            }
            if (F == EPMOE_WEIGHT_INT4 && (c * 32 + 32) % kGroup == 0) { /* a group ends: promote */
                const int gc = c * 32 / kGroup;
#pragma unroll
                for (int j = 0; j < kJ; j++) {
                    if (j >= nj) break;
#pragma unroll
                    for (int v = 0; v < 4; v++) {
                        acc[j][v] = fmaf(part[j][v], wsc[gc][v >> 1], acc[j][v]);
                        part[j][v] = 0.0f;
                    }
                }
            }
        }
        if (kt == KT - 1) { /* the m-tile is done: store its valid rows, start the next one from zero */
#pragma unroll
            for (int j = 0; j < kJ; j++) {
#pragma unroll
                for (int v = 0; v < 4; v++) {
                    const int m = m0 + 8 * j + 2 * t + (v & 1);
                    if (m < rows) {
                        const int64_t n = nrow0 + 8 * (v >> 1);
                        p.out[e * p.expert_stride + m * p.row_stride + n] = fmt_bf16_from_float(acc[j][v]);
                    }
                    acc[j][v] = 0.0f;
                }
            }
        }
        if (++kt == KT) kt = 0, m0 += kBT;
        if (++stage == Tr::kStages) stage = 0;
    }
    cp_wait<0>();
}

template <int F, int kGroup, int kBT> epmoe_status launch_tile(const Args &p, int64_t E, cudaStream_t s) {
    using Tr = Traits<F, kGroup, kBT>;
    const int smem = Tr::kStages * Tr::kStageBytes;
    const cudaError_t e = grow_smem_attr<expert_gemm_kernel<F, kGroup, kBT>>((size_t)smem);
    if (e != cudaSuccess)
        return epmoe__fail(EPMOE_ERR_CUDA, "epmoe_expert_gemm_cuda: %d bytes of shared memory: %s", smem, cudaGetErrorString(e));
    expert_gemm_kernel<F, kGroup, kBT><<<dim3((unsigned)(p.N / kBN), (unsigned)E), kThreads, smem, s>>>(p);
    return epmoe__launched("epmoe_expert_gemm_cuda");
}

template <int F, int kGroup = 128> epmoe_status launch(const Args &p, int64_t E, int64_t expected, cudaStream_t s) {
    return expected <= 16 ? launch_tile<F, kGroup, 16>(p, E, s) : launch_tile<F, kGroup, 64>(p, E, s);
}

} // namespace

/* bf16 from 33 expected rows runs the W4A8 kernels' wgmma (w4a8_gemm.cu: TMA boxes, SS bf16 k16).
** DeepSeek-R1 W13 + W2, us, this kernel / wgmma / cuBLAS BF16 strided-batched (bench_w4a8, one
** H200, 2026-12-01, two runs each): 1 row 632 / 662 / 680; 8 rows 643 / 672 / 690; 32 rows 707 /
** 703-704 / 705; 128 rows 1693-1802 / 797-803 / 750; 1024 rows 15188-15387 / 5877-5941 / 4104. At
** decode this kernel streams at 4460 GB/s, 4.5% ahead; from 128 rows wgmma is 2.1-2.6x faster. */
constexpr int64_t kBf16WgmmaFrom = 33;

extern "C" epmoe_status epmoe__fp8_block_gemm_launch(const epmoe_expert_gemm_args *g, epmoe_stream_t stream);
extern "C" epmoe_status epmoe__bf16_gemm_launch(const epmoe_expert_gemm_args *g, epmoe_stream_t stream);

/* The one place the format picks the kernel. */
extern "C" epmoe_status epmoe__expert_gemm_launch(const epmoe_expert_gemm_args *g, epmoe_stream_t stream) {
    const epmoe_expert_weights &w = g->w;
    if (w.E == 0 || g->M == 0) return EPMOE_OK;
    Args p;
    p.w = static_cast<const uint8_t *>(w.data), p.ws = w.scales;
    p.a = static_cast<const uint8_t *>(g->a);
    p.masked_m = g->masked_m, p.out = g->out;
    p.N = w.N, p.K = w.K, p.M = g->M;
    p.row_stride = g->out_row_stride, p.expert_stride = g->out_expert_stride;
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    const int64_t x = g->expected_m > 0 ? g->expected_m : g->M;
    switch (w.format) {
    case EPMOE_WEIGHT_BF16: /* to 32 rows here, beyond on wgmma (kBf16WgmmaFrom) */
        return x < kBf16WgmmaFrom ? launch<EPMOE_WEIGHT_BF16>(p, w.E, x, s) : epmoe__bf16_gemm_launch(g, stream);
    case EPMOE_WEIGHT_FP8_BLOCK: return epmoe__fp8_block_gemm_launch(g, stream); /* wgmma: w4a8_gemm.cu */
    default:
        return w.group == 32 ? launch<EPMOE_WEIGHT_INT4, 32>(p, w.E, x, s) : launch<EPMOE_WEIGHT_INT4, 128>(p, w.E, x, s);
    }
}

extern "C" epmoe_status epmoe_expert_gemm_cuda(const epmoe_expert_gemm_args *g, epmoe_stream_t stream) {
    EPMOE_CHECK(epmoe__check_expert_gemm("epmoe_expert_gemm_cuda", g, 1));
    if (g->w.E == 0 || g->M == 0) return EPMOE_OK;
    int sms; /* no GPU: say so, before a kernel attribute fails with the driver's words */
    EPMOE_CHECK(epmoe__need_device("epmoe_expert_gemm_cuda", &sms));
    return epmoe__expert_gemm_launch(g, stream);
}
