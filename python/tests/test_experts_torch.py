"""epmoe.experts on the GPU through torch: the kernels of every weight format against the CPU
references, within tests/gpu/test_experts_gpu.c's error model; the MLP within its relative L2
bounds; masked_m omitted; DeepEP's scale tensors; a call captured in a CUDA graph and replayed on
new inputs. Skipped where torch, a GPU, or a CUDA build is missing.

Error model of one GEMM output (test_experts_gpu.c): |got - want| <= TOL_BF16 |want| + TOL_SUM
sum_k |a_k w_k| (dequantized operands), TOL_BF16 = 2^-7 (the two bf16 roundings one ulp apart),
TOL_SUM = 2^-12 for the fp32 sums of bf16 and int4, 2^-8 for fp8_block's tensor-core sums (~14 bits
kept before each group's promotion), whose rare tail may reach 2x the bound for at most one element
per million (at least one)."""
import numpy as np
import pytest

import epmoe
import models as mdl
from epmoe import experts
from test_experts import FORMATS, make_inputs, mlp_case
from test_layer import dequant, expert_weights

torch = pytest.importorskip("torch")
gpu = pytest.mark.skipif(not (torch.cuda.is_available() and epmoe.cuda_available()),
                         reason="needs a GPU, torch with CUDA and a CUDA build of libepmoe")

TOL_BF16, TOL_SUM, TOL_SUM_WGMMA = 2.0 ** -7, 2.0 ** -12, 2.0 ** -8
TOL_MLP_BF16, TOL_MLP_FP8 = 2.0 ** -8, 2.0 ** -5


def bits(t):
    return t.view(torch.int16).cpu().numpy().view(np.uint16)


def dev(x):
    return torch.from_numpy(np.ascontiguousarray(x)).cuda()


def magnitudes(w, av, sa):
    """sum_k |a_k w_k| over the dequantized operands, [E, M, N]."""
    a = np.abs(av) * (np.repeat(sa, 128, axis=2) if sa is not None else 1.0)
    return np.einsum("emk,enk->emn", a, np.abs(dequant(w)))


def check_within_model(got, want, mag, masked, wgmma):
    """got, want: bf16 bits [E, M, N]; rows past masked_m of got must be the new output's zeros."""
    tol = TOL_SUM_WGMMA if wgmma else TOL_SUM
    g, r = mdl.bf16_value(got).astype(np.float64), mdl.bf16_value(want).astype(np.float64)
    over, beyond, n = 0, 0, 0
    for e in range(got.shape[0]):
        rows = int(min(max(masked[e], 0), got.shape[1]))
        assert (got[e, rows:] == 0).all(), f"expert {e}: rows past masked_m = {masked[e]} were written"
        ratio = np.abs(g[e, :rows] - r[e, :rows]) / (TOL_BF16 * np.abs(r[e, :rows]) + tol * mag[e, :rows])
        over += int((ratio > 1).sum())
        beyond += int((ratio > 2).sum())
        n += ratio.size
    assert n > 0 and beyond == 0, f"{beyond} of {n} outputs beyond twice the bound"
    tail = max(1, n // 10 ** 6) if wgmma else 0  # only fp8's tensor-core sums have a tail
    assert over <= tail, f"{over} of {n} outputs beyond the bound (allowed {tail})"


@gpu
@pytest.mark.parametrize("fmt,group", FORMATS)
@pytest.mark.parametrize("E,N,K,M,masked,expected", [(3, 256, 384, 9, [9, 0, 3], 0), (2, 384, 640, 40, [33, 1], 40),
                                                     (1, 128, 128, 1, [1], 1)])
def test_gemm_kernel_within_error_model(fmt, group, E, N, K, M, masked, expected):
    rng = np.random.default_rng(500 + N + K + group)
    w = expert_weights(rng, fmt, E, N, K, group or 128)
    a, slabs, sa, av = make_inputs(rng, fmt, E, M, K, epmoe.SCALE_F32_MMAJOR)
    masked = np.array(masked, np.int32)
    want = experts.gemm(w, a, masked, slabs, epmoe.SCALE_F32_MMAJOR)
    wg = w.to("cuda")
    assert wg.device == (epmoe.dlpack.CUDA, torch.cuda.current_device())
    got = experts.gemm(wg, dev(a), dev(masked), dev(slabs) if slabs is not None else None, epmoe.SCALE_F32_MMAJOR,
                       expected_m=expected)
    torch.cuda.synchronize()
    assert got.dtype == torch.bfloat16 and got.shape == (E, M, N)
    check_within_model(bits(got), want, magnitudes(w, av, sa), masked, fmt == "fp8_block")


@gpu
@pytest.mark.parametrize("fmt,group", FORMATS)
def test_mlp_kernel_close_to_reference(fmt, group):
    E, M, H, I = 2, 7, 256, 384
    w13, w2, a, slabs, _, _ = mlp_case(600 + group + len(fmt), fmt, group, E, M, H, I, epmoe.SCALE_F32_ROW)
    masked = np.array([7, 2], np.int32)
    ref = experts.mlp(w13, w2, a, masked, slabs)
    got = experts.mlp(w13.to("cuda"), w2.to("cuda"), dev(a), dev(masked), dev(slabs) if slabs is not None else None)
    torch.cuda.synchronize()
    g, r = mdl.bf16_value(bits(got)).astype(np.float64), mdl.bf16_value(ref).astype(np.float64)
    assert (bits(got)[1, 2:] == 0).all()  # rows past masked_m: the new output's zeros
    tol = TOL_MLP_FP8 if fmt == "fp8_block" else TOL_MLP_BF16
    rel = np.sqrt(((g - r) ** 2).sum() / (r ** 2).sum())
    assert np.abs(r).max() > 0 and rel <= tol, f"relative L2 {rel:.3e} (bound {tol:.3e})"
    ws = epmoe.experts._gemm.ws_cache["experts"][torch.cuda.current_device()]
    again = experts.mlp(w13.to("cuda"), w2.to("cuda"), dev(a), dev(masked), dev(slabs) if slabs is not None else None)
    assert epmoe.experts._gemm.ws_cache["experts"][torch.cuda.current_device()] is ws  # kept
    torch.cuda.synchronize()
    assert (bits(again) == bits(got)).all()


@gpu
def test_deepep_scales_masked_m_omitted_and_a_cuda_graph():
    """fp8_block weights fed as DeepEP's low-latency dispatch delivers: scales as its transposed
    view; masked_m None (every row); then the MLP captured once in a CUDA graph and replayed with new
    activations and counts written in place, each replay equal to an eager call on the same inputs."""
    rng = np.random.default_rng(700)
    E, M, H, I = 3, 6, 384, 256
    w13 = expert_weights(rng, "fp8_block", E, 2 * I, H, 128).to("cuda")
    w2 = expert_weights(rng, "fp8_block", E, H, I, 128).to("cuda")
    a, slabs, _, _ = make_inputs(rng, "fp8_block", E, M, H, epmoe.SCALE_F32_MMAJOR)
    ag, sg = dev(a), dev(slabs)
    deepep = sg.view(torch.float32).reshape(E, H // 128, M).transpose(1, 2)
    assert deepep.stride() == (H // 128 * M, 1, M)
    full = torch.full((E,), M, dtype=torch.int32, device="cuda")
    want = experts.gemm(w13, ag, full, sg, epmoe.SCALE_F32_MMAJOR)
    assert (bits(experts.gemm(w13, ag, None, deepep, epmoe.SCALE_F32_MMAJOR)) == bits(want)).all()

    counts = torch.tensor([6, 0, 3], dtype=torch.int32, device="cuda")
    out = torch.zeros(E, M, H, dtype=torch.bfloat16, device="cuda")
    experts.mlp(w13, w2, ag, counts, deepep, epmoe.SCALE_F32_MMAJOR, out=out)  # the workspace, before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        experts.mlp(w13, w2, ag, counts, deepep, epmoe.SCALE_F32_MMAJOR, out=out)
    for i in range(3):
        a2, s2, _, _ = make_inputs(rng, "fp8_block", E, M, H, epmoe.SCALE_F32_MMAJOR)
        c2 = rng.integers(0, M + 1, E).astype(np.int32)
        ag.copy_(dev(a2)), sg.copy_(dev(s2)), counts.copy_(dev(c2))
        out.zero_()
        graph.replay()
        eager = experts.mlp(w13, w2, ag, counts, deepep, epmoe.SCALE_F32_MMAJOR)
        torch.cuda.synchronize()
        assert (bits(out) == bits(eager)).all(), f"replay {i}"
        assert np.abs(mdl.bf16_value(bits(eager))).max() > 0 or c2.sum() == 0
