/*
** w4a8_mlp.cu — the W4A8 expert MLP: GEMM1 (gate_up) -> silu(gate)·up + FP8 quant -> GEMM2.
** Spec: epmoe_w4a8_mlp_ref. The middle step (silu_mul.cu) writes the fp8 rows GEMM2 reads: in
** mode a with fresh 1x128 scales, in mode b at the static per-tensor scale.
*/
#include "common.cuh"

extern "C" epmoe_status epmoe_w4a8_mlp_cuda(const epmoe_w4a8_mlp_args *m, epmoe_stream_t stream) {
    static const char fn[] = "epmoe_w4a8_mlp_cuda";
    EPMOE_CHECK(epmoe__check_w4a8_mlp(fn, m, 1));
    const int64_t E = m->w13.E, M = m->M, H = m->w13.K, I = m->w2.K;
    if (E == 0 || M == 0) return EPMOE_OK;
    int sms; /* no GPU: said in this entry point's name, not its first GEMM's */
    EPMOE_CHECK(epmoe__need_device(fn, &sms));
    size_t o_gu, o_in, o_sc, o_gemm;
    epmoe__mlp_layout(E, M, H, I, &o_gu, &o_in, &o_sc, &o_gemm);
    void *gemm_ws = static_cast<uint8_t *>(m->workspace) + o_gemm;
    const size_t gemm_bytes = epmoe_w4a8_gemm_workspace();
    uint16_t *gate_up = reinterpret_cast<uint16_t *>(static_cast<uint8_t *>(m->workspace) + o_gu);
    uint8_t *inter = static_cast<uint8_t *>(m->workspace) + o_in;
    float *inter_scales = reinterpret_cast<float *>(static_cast<uint8_t *>(m->workspace) + o_sc);

    const epmoe_w4a8_gemm_args g1 = {m->w13, m->a, M, m->masked_m, m->a_scales, m->a_scale_fmt, m->a_tensor_scale,
                                     gate_up, 2 * I, M * 2 * I, m->expected_m, gemm_ws, gemm_bytes};
    /* Plain launches. With silu_mul and GEMM2 as programmatic dependents (GEMM2's CTAs loading their
    ** first weights under GEMM1's tail) the MLP took 22-27 us more at 1-8 rows per expert: GEMM2's
    ** CTAs, placed as GEMM1's left, could not all be resident at once (2-4 per SM over the launch;
    ** the last entered 70-75 us after the first), so a persistent grid's last ranges ran after its
    ** first. GEMM2 alone as a dependent of a plain silu_mul saved 1-2 us in bench_w4a8 (32 experts,
    ** M = rows), but the layer's MLP (128 experts, M = 256, ~8 rows each: silu_mul's grid is
    ** mostly empty blocks) then measured 863 us against 840 on another machine the same day (H200,
    ** 2026-11-30, branches w4-pdl2, w4-pdl-g2). A/B'd in the layer (R = 1: 256 experts, M = 128),
    ** GEMM2's first weights prefetched into L2 before its wait: MLP the same at 1-8 rows, 1% faster
    ** at 32, the layer 0.5% slower (H200, 2026-12-02, docs/PERFORMANCE.md W4A8 session 29). */
    EPMOE_CHECK(epmoe_w4a8_gemm_cuda(&g1, stream));
    EPMOE_CHECK(epmoe__silu_mul_launch(m->a_scales ? EPMOE_SILU_FP8_GROUP : EPMOE_SILU_FP8_TENSOR, gate_up, m->masked_m,
                                       E, M, I, inter, inter_scales, m->a2_tensor_scale,
                                       reinterpret_cast<cudaStream_t>(stream)));
    const epmoe_w4a8_gemm_args g2 = {m->w2, inter, M, m->masked_m, m->a_scales ? (const void *)inter_scales : nullptr,
                                     EPMOE_SCALE_F32_ROW, m->a2_tensor_scale, m->out, m->out_row_stride,
                                     m->out_expert_stride, m->expected_m, gemm_ws, gemm_bytes};
    return epmoe_w4a8_gemm_cuda(&g2, stream);
}
