"""Anchor: the requant kernel of SGLang PR #22316 (Triton, per-token-group FP8 -> per-tensor FP8),
as reproduced from the PR's description in the project's shared baseline script
(shared/baselines/sglang_requant.py): same kernel, grid (K/1024, 32, E) and num_warps=8.
Kept verbatim in behaviour so that bench_quant.py times it next to ours in one process."""
import triton
import triton.language as tl


@triton.jit
def _fp8_per_token_quant_to_per_tensor_quant_kernel(
        x_ptr, x_scale_ptr, x_scale_stride0, x_scale_stride1, x_scale_stride2,
        masked_m_ptr, output_scale_ptr, output_ptr, m, k,
        K_SCALE_BLOCK_SIZE: tl.constexpr, K_BLOCK_SIZE: tl.constexpr):
    pid_k, pid_m, pid_e = tl.program_id(axis=0), tl.program_id(axis=1), tl.program_id(axis=2)
    pid_m_dim = tl.num_programs(1)
    token_id = pid_m
    last_effective_id = tl.load(masked_m_ptr + pid_e)
    if token_id >= last_effective_id:
        return
    output_scale_val_inv = 1.0 / tl.load(output_scale_ptr).to(tl.float32)
    k_offsets = pid_k * K_BLOCK_SIZE + tl.arange(0, K_BLOCK_SIZE)
    scale_offsets = (k_offsets // K_SCALE_BLOCK_SIZE) * x_scale_stride2
    x_ptrs = x_ptr + pid_e * m * k + k_offsets
    output_ptrs = output_ptr + pid_e * m * k + k_offsets
    x_scale_ptrs = x_scale_ptr + pid_e * x_scale_stride0 + scale_offsets
    for tok_idx in tl.range(token_id, last_effective_id, pid_m_dim):
        hidden = tl.load(x_ptrs + tok_idx * k).to(tl.float32)
        scale_fp32 = tl.load(x_scale_ptrs + tok_idx * x_scale_stride1).to(tl.float32)
        hidden = hidden * scale_fp32 * output_scale_val_inv
        tl.store(output_ptrs + tok_idx * k, hidden.to(output_ptr.dtype.element_ty))


def sglang_requant(x, x_scale, masked_m, output_scale, output):
    assert x.dim() == 3 and x.size(2) % 1024 == 0 and x.is_contiguous()
    assert x_scale.size(2) == x.size(2) // 128 and output_scale.numel() == 1
    grid = (x.size(2) // 1024, 32, x.size(0))
    _fp8_per_token_quant_to_per_tensor_quant_kernel[grid](
        x, x_scale, *x_scale.stride(), masked_m, output_scale, output, x.size(1), x.size(2),
        K_SCALE_BLOCK_SIZE=128, K_BLOCK_SIZE=1024, num_warps=8)
