/*
** silu_mul.cu — the middle step of every expert MLP: silu(gate) * up of the bf16 rows GEMM1
** wrote, rounded to bf16, then kept in bf16 or cast to fp8 (fresh 1x128 group scales, or one
** per-tensor scale) for GEMM2. Spec: the MLP references (epmoe_w4a8_mlp_ref,
** epmoe_expert_mlp_ref); the casts share device code with epmoe_cast_group_fp8 / _tensor_fp8.
*/
#include "common.cuh"

namespace {

/* One warp per row and four 128-groups of it (8 lanes a group, two 16-byte chunks a lane, 64
** channels apart so each load instruction reads whole 128-byte lines): blockIdx.z picks the four.
** A warp looping over a row's groups waited a load round trip per step, 8 in a row at I = 2048: the
** DeepSeek-R1 W4A8 MLP at 1-8 rows per expert took 7 us more (201.8 against 194.6 us at 1 row; the
** dev trace had put 13 us between GEMM1's last CTA out and GEMM2's first in; H200, 2026-11-30).
** Sixteen channels a lane rather than eight halve the per-lane work of indexing, the group max and
** its scale. Five blocks an SM (48 registers, 8 bytes spilled in the FP8-group kernel) rather than
** the four its 52 registers allowed: 1024 rows 113.9 -> 106.1 us, 1-128 rows the same; 32 channels
** a lane: 1024 rows 107.1 us but 32 rows 6.9 against 6.4 (Nsight Compute, H200, 2026-12-01). */
constexpr int kRowsPerBlock = 8, kMinBlocks = 5, kChunks = 2, kGroupLanes = 16 / kChunks, kGroupsPerWarp = 32 / kGroupLanes;

/* silu(g) * u of 8 channels, rounded to bf16 like the reference (same expression, IEEE ops; the
** rounding by cvt.rn gives format.h's bits, a NaN canonical: fp8_exhaustive). */
__device__ __forceinline__ uint4 silu_mul8(uint4 gv, uint4 uv) {
    const uint32_t gw[4] = {gv.x, gv.y, gv.z, gv.w}, uw[4] = {uv.x, uv.y, uv.z, uv.w};
    float g[8], s[8];
#pragma unroll
    for (int i = 0; i < 4; i++) g[2 * i] = bf16_lo(gw[i]), g[2 * i + 1] = bf16_hi(gw[i]);
    silu8(g, s);
    uint32_t o[4];
#pragma unroll
    for (int i = 0; i < 4; i++) o[i] = bf16x2_rn(__fmul_rn(s[2 * i], bf16_lo(uw[i])), __fmul_rn(s[2 * i + 1], bf16_hi(uw[i])));
    return make_uint4(o[0], o[1], o[2], o[3]);
}

template <int kOut>
__global__ void __launch_bounds__(kRowsPerBlock * 32, kMinBlocks)
    silu_mul_kernel(const uint16_t *__restrict__ gate_up, const int32_t *__restrict__ masked_m, int64_t M, int64_t I,
                    void *__restrict__ inter_v, float *__restrict__ scales, const float *__restrict__ tensor_scale) {
    const int e = blockIdx.y, lane = threadIdx.x & 31;
    const int64_t m = (int64_t)blockIdx.x * kRowsPerBlock + (threadIdx.x >> 5);
    int64_t rows = __ldg(masked_m + e);
    rows = rows < 0 ? 0 : (rows > M ? M : rows);
    if (m >= rows) return;
    const int64_t row = (int64_t)e * M + m, G = I / FMT_GROUP;
    /* cast_chunks' shuffles stay within a group's lanes, so a group past the row may leave */
    const int64_t g = (int64_t)blockIdx.z * kGroupsPerWarp + lane / kGroupLanes;
    if (g >= G) return;
    const uint16_t *gu = gate_up + row * 2 * I;
    const int64_t c = g * FMT_GROUP + (lane % kGroupLanes) * 8; /* chunk k at c + 64 k */
    uint4 y[kChunks];
#pragma unroll
    for (int k = 0; k < kChunks; k++)
        y[k] = silu_mul8(*reinterpret_cast<const uint4 *>(gu + c + 64 * k), *reinterpret_cast<const uint4 *>(gu + I + c + 64 * k));
    if (kOut == EPMOE_SILU_BF16) {
#pragma unroll
        for (int k = 0; k < kChunks; k++) *reinterpret_cast<uint4 *>(static_cast<uint16_t *>(inter_v) + row * I + c + 64 * k) = y[k];
        return;
    }
    uint2 q[kChunks];
    if (kOut == EPMOE_SILU_FP8_GROUP) {
        float s;
        const unsigned group_mask = ((1u << kGroupLanes) - 1) << (lane & ~(kGroupLanes - 1));
        cast_chunks<kChunks>(y, 0, group_mask, q, &s);
        if (lane % kGroupLanes == 0) scales[row * G + g] = s;
    } else {
        const float inv = 1.0f / __ldg(tensor_scale);
#pragma unroll
        for (int k = 0; k < kChunks; k++) {
            const uint32_t w[4] = {y[k].x, y[k].y, y[k].z, y[k].w};
            uint32_t b[4];
#pragma unroll
            for (int i = 0; i < 4; i++) b[i] = fp8x2_from_float(__fmul_rn(bf16_lo(w[i]), inv), __fmul_rn(bf16_hi(w[i]), inv));
            q[k] = make_uint2(b[0] | (b[1] << 16), b[2] | (b[3] << 16));
        }
    }
#pragma unroll
    for (int k = 0; k < kChunks; k++) *reinterpret_cast<uint2 *>(static_cast<uint8_t *>(inter_v) + row * I + c + 64 * k) = q[k];
}

} // namespace

epmoe_status epmoe__silu_mul_launch(int out_kind, const uint16_t *gate_up, const int32_t *masked_m, int64_t E,
                                    int64_t M, int64_t I, void *inter, float *scales, const float *tensor_scale,
                                    cudaStream_t s) {
    const dim3 grid((unsigned)((M + kRowsPerBlock - 1) / kRowsPerBlock), (unsigned)E, (unsigned)((I / FMT_GROUP + kGroupsPerWarp - 1) / kGroupsPerWarp));
    switch (out_kind) {
    case EPMOE_SILU_BF16:
        silu_mul_kernel<EPMOE_SILU_BF16><<<grid, kRowsPerBlock * 32, 0, s>>>(gate_up, masked_m, M, I, inter, scales,
                                                                            tensor_scale);
        break;
    case EPMOE_SILU_FP8_GROUP:
        silu_mul_kernel<EPMOE_SILU_FP8_GROUP><<<grid, kRowsPerBlock * 32, 0, s>>>(gate_up, masked_m, M, I, inter,
                                                                                 scales, tensor_scale);
        break;
    default:
        silu_mul_kernel<EPMOE_SILU_FP8_TENSOR><<<grid, kRowsPerBlock * 32, 0, s>>>(gate_up, masked_m, M, I, inter,
                                                                                  scales, tensor_scale);
    }
    return epmoe__launched("silu(gate) * up");
}
