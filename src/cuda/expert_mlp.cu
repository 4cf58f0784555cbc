/*
** expert_mlp.cu — the expert MLP of the bf16, w8a8-fp8-block and w4a16 schemes: GEMM1 (gate_up)
** -> silu(gate)·up (bf16, or fp8 with fresh 1x128 scales for FP8_BLOCK) -> GEMM2, three launches
** on the caller's stream. Spec: epmoe_expert_mlp_ref.
*/
#include "common.cuh"

extern "C" epmoe_status epmoe__expert_gemm_launch(const epmoe_expert_gemm_args *g, epmoe_stream_t stream);

extern "C" epmoe_status epmoe_expert_mlp_cuda(const epmoe_expert_mlp_args *m, epmoe_stream_t stream) {
    EPMOE_CHECK(epmoe__check_expert_mlp("epmoe_expert_mlp_cuda", m, 1));
    const int64_t E = m->w13.E, M = m->M, H = m->w13.K, I = m->w2.K;
    if (E == 0 || M == 0) return EPMOE_OK;
    int sms; /* no GPU: said in this entry point's name, not its first GEMM's */
    EPMOE_CHECK(epmoe__need_device("epmoe_expert_mlp_cuda", &sms));
    const int fp8 = m->w13.format == EPMOE_WEIGHT_FP8_BLOCK;
    size_t o_gu, o_in, o_sc;
    epmoe__expert_mlp_layout(m->w13.format, E, M, H, I, &o_gu, &o_in, &o_sc);
    uint8_t *ws = static_cast<uint8_t *>(m->workspace);
    uint16_t *gate_up = reinterpret_cast<uint16_t *>(ws + o_gu);
    float *inter_scales = fp8 ? reinterpret_cast<float *>(ws + o_sc) : nullptr;
    const epmoe_expert_gemm_args g1 = {m->w13, m->a, M, m->masked_m, m->a_scales, m->a_scale_fmt,
                                       gate_up, 2 * I, M * 2 * I, m->expected_m};
    EPMOE_CHECK(epmoe__expert_gemm_launch(&g1, stream));
    EPMOE_CHECK(epmoe__silu_mul_launch(fp8 ? EPMOE_SILU_FP8_GROUP : EPMOE_SILU_BF16, gate_up, m->masked_m, E, M, I,
                                       ws + o_in, inter_scales, nullptr, reinterpret_cast<cudaStream_t>(stream)));
    const epmoe_expert_gemm_args g2 = {m->w2, ws + o_in, M, m->masked_m, inter_scales, EPMOE_SCALE_F32_ROW,
                                       m->out, m->out_row_stride, m->out_expert_stride, m->expected_m};
    return epmoe__expert_gemm_launch(&g2, stream);
}
