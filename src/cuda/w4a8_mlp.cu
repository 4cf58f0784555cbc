/*
** w4a8_mlp.cu — the W4A8 expert MLP: GEMM1 (gate_up) -> silu(gate)·up + FP8 quant -> GEMM2.
** Spec: epmoe_w4a8_mlp_ref. The middle step is one kernel: it reads the bf16 gate/up rows
** GEMM1 wrote, and writes the fp8 rows (and, in mode a, fresh 1x128 scales) GEMM2 reads, with
** the cast rules of epmoe_cast_group_fp8 / epmoe_cast_tensor_fp8 (shared device code).
*/
#include "common.cuh"

namespace {

constexpr int kRowsPerBlock = 8; /* one warp per row */

/* silu(g) * u of 8 channels, rounded to bf16 like the reference (same expression, IEEE ops). */
__device__ __forceinline__ uint4 silu_mul8(uint4 gv, uint4 uv) {
    const uint32_t gw[4] = {gv.x, gv.y, gv.z, gv.w}, uw[4] = {uv.x, uv.y, uv.z, uv.w};
    uint32_t o[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float y[2];
        const float gg[2] = {bf16_lo(gw[i]), bf16_hi(gw[i])}, uu[2] = {bf16_lo(uw[i]), bf16_hi(uw[i])};
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const float s = __fdiv_rn(gg[h], __fadd_rn(1.0f, expf(-gg[h])));
            y[h] = __fmul_rn(s, uu[h]);
        }
        o[i] = bf16x2_from_float(y[0], y[1]);
    }
    return make_uint4(o[0], o[1], o[2], o[3]);
}

template <bool kGroup>
__global__ void __launch_bounds__(kRowsPerBlock * 32)
    silu_quant_kernel(const uint16_t *__restrict__ gate_up, const int32_t *__restrict__ masked_m, int64_t M, int64_t I,
                      uint8_t *__restrict__ inter, float *__restrict__ scales, const float *__restrict__ tensor_scale) {
    const int e = blockIdx.y, lane = threadIdx.x & 31;
    const int64_t m = (int64_t)blockIdx.x * kRowsPerBlock + (threadIdx.x >> 5);
    int64_t rows = __ldg(masked_m + e);
    rows = rows < 0 ? 0 : (rows > M ? M : rows);
    if (m >= rows) return;
    const int64_t row = (int64_t)e * M + m, G = I / FMT_GROUP;
    const uint16_t *gu = gate_up + row * 2 * I;
    const unsigned half_mask = 0xFFFFu << (lane & 16);
    const float inv = kGroup ? 0.0f : 1.0f / __ldg(tensor_scale);
    /* A half-warp per 128-group; both halves loop while either has a group (uniform for shuffles
    ** within a half, which is all cast_chunk8 needs). */
    for (int64_t g = lane >> 4; g < G; g += 2) {
        const int64_t c = g * FMT_GROUP + (lane & 15) * 8;
        const uint4 y = silu_mul8(*reinterpret_cast<const uint4 *>(gu + c), *reinterpret_cast<const uint4 *>(gu + I + c));
        uint2 q;
        if (kGroup) {
            float s;
            q = cast_chunk8(y, 0, half_mask, &s);
            if ((lane & 15) == 0) scales[row * G + g] = s;
        } else {
            const uint32_t w[4] = {y.x, y.y, y.z, y.w};
            uint32_t b[4];
#pragma unroll
            for (int i = 0; i < 4; i++) b[i] = fp8x2_from_float(__fmul_rn(bf16_lo(w[i]), inv), __fmul_rn(bf16_hi(w[i]), inv));
            q = make_uint2(b[0] | (b[1] << 16), b[2] | (b[3] << 16));
        }
        *reinterpret_cast<uint2 *>(inter + row * I + c) = q;
    }
}

} // namespace

extern "C" epmoe_status epmoe_w4a8_mlp_cuda(const epmoe_w4a8_mlp_args *m, epmoe_stream_t stream) {
    static const char fn[] = "epmoe_w4a8_mlp_cuda";
    EPMOE_CHECK(epmoe__check_w4a8_mlp(fn, m, 1));
    const int64_t E = m->w13.E, M = m->M, H = m->w13.K, I = m->w2.K;
    if (E == 0 || M == 0) return EPMOE_OK;
    size_t o_gu, o_in, o_sc, o_gemm;
    epmoe__mlp_layout(E, M, H, I, &o_gu, &o_in, &o_sc, &o_gemm);
    void *gemm_ws = static_cast<uint8_t *>(m->workspace) + o_gemm;
    const size_t gemm_bytes = epmoe_w4a8_gemm_workspace();
    uint16_t *gate_up = reinterpret_cast<uint16_t *>(static_cast<uint8_t *>(m->workspace) + o_gu);
    uint8_t *inter = static_cast<uint8_t *>(m->workspace) + o_in;
    float *inter_scales = reinterpret_cast<float *>(static_cast<uint8_t *>(m->workspace) + o_sc);

    const epmoe_w4a8_gemm_args g1 = {m->w13, m->a, M, m->masked_m, m->a_scales, m->a_scale_fmt, m->a_tensor_scale,
                                     gate_up, 2 * I, M * 2 * I, m->expected_m, gemm_ws, gemm_bytes};
    EPMOE_CHECK(epmoe_w4a8_gemm_cuda(&g1, stream));
    const dim3 grid((unsigned)((M + kRowsPerBlock - 1) / kRowsPerBlock), (unsigned)E);
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    if (m->a_scales)
        silu_quant_kernel<true><<<grid, kRowsPerBlock * 32, 0, s>>>(gate_up, m->masked_m, M, I, inter, inter_scales, nullptr);
    else
        silu_quant_kernel<false><<<grid, kRowsPerBlock * 32, 0, s>>>(gate_up, m->masked_m, M, I, inter, nullptr,
                                                                     m->a2_tensor_scale);
    EPMOE_CHECK(epmoe__launched(fn));
    const epmoe_w4a8_gemm_args g2 = {m->w2, inter, M, m->masked_m, m->a_scales ? (const void *)inter_scales : nullptr,
                                     EPMOE_SCALE_F32_ROW, m->a2_tensor_scale, m->out, m->out_row_stride,
                                     m->out_expert_stride, m->expected_m, gemm_ws, gemm_bytes};
    return epmoe_w4a8_gemm_cuda(&g2, stream);
}
