"""epmoe.w4a8 on the GPU through torch: the kernels against the CPU references (the error model of
tests/w4a8_common.h for the GEMM, relative L2 for the MLP, whose intermediate fp8 roundings may
flip), weights moved with W4A8Weights.to, and the per-device workspace kept across calls.
Skipped where torch, a GPU, or a CUDA build is missing."""
import numpy as np
import pytest

import epmoe
import models as mdl
from epmoe import w4a8
from test_w4a8 import make_acts, make_ckpt, small_mlp

torch = pytest.importorskip("torch")
gpu = pytest.mark.skipif(not (torch.cuda.is_available() and epmoe.cuda_available()),
                         reason="needs a GPU, torch with CUDA and a CUDA build of libepmoe")


def bits(t):
    return t.view(torch.int16).cpu().numpy().view(np.uint16)


@gpu
@pytest.mark.parametrize("fmt", [epmoe.SCALE_F32_MMAJOR, epmoe.SCALE_UE8M0_MMAJOR])
def test_gemm_kernel_within_error_model_and_workspace_kept(fmt):
    rng = np.random.default_rng(200 + fmt)
    E, N, K, M = 3, 256, 384, 7
    cw, cs, vals = make_ckpt(rng, E, N, K, m8=True)
    w = w4a8.repack(cw, cs)
    wg = w.to("cuda")
    assert wg.device == (epmoe.dlpack.CUDA, torch.cuda.current_device()) and "cuda" in repr(wg)
    a, slabs, sa = make_acts(rng, E, M, K, fmt)
    masked = np.array([7, 0, 3], np.int32)
    dev = lambda x: torch.from_numpy(x).cuda()  # noqa: E731
    out = w4a8.gemm(wg, dev(a), dev(masked), dev(slabs), fmt)
    ws = w4a8._ws_cache[torch.cuda.current_device()]
    again = w4a8.gemm(wg, dev(a), dev(masked), dev(slabs), fmt)
    assert w4a8._ws_cache[torch.cuda.current_device()] is ws  # zeroed once, then kept
    torch.cuda.synchronize()
    assert out.dtype == torch.bfloat16 and out.shape == (E, M, N)
    want, mag = mdl.w4a8_gemm(vals, cs, a, sa, masked)
    got = mdl.bf16_value(bits(out)).astype(np.float64)
    for e in range(E):
        r = masked[e]
        assert (bits(out)[e, r:] == 0).all()  # rows past masked_m: the new output's zeros
        err = np.abs(got[e, :r] - want[e, :r])
        assert (err <= np.abs(want[e, :r]) / 256 + mag[e, :r] / 256).all(), f"expert {e}"
    assert (bits(again) == bits(out)).all()


@gpu
def test_gemm_without_masked_m_on_a_side_stream():
    """masked_m=None: the library makes the counts on torch's current stream; a call on another
    stream (stream=) must still see them (all M rows), the output equal to explicit counts. Then
    the scales as DeepEP's transposed view."""
    rng = np.random.default_rng(321)
    E, N, K, M = 2, 128, 256, 5
    cw, cs, _ = make_ckpt(rng, E, N, K, m8=True)
    wg = w4a8.repack(cw, cs).to("cuda")
    a, slabs, _ = make_acts(rng, E, M, K, epmoe.SCALE_F32_MMAJOR)
    ag, sg = torch.from_numpy(a).cuda(), torch.from_numpy(slabs).cuda()
    want = w4a8.gemm(wg, ag, torch.full((E,), M, dtype=torch.int32, device="cuda"), sg, epmoe.SCALE_F32_MMAJOR)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    torch.cuda._sleep(20_000_000)  # keeps the current stream busy: an unordered fill would land late
    got = w4a8.gemm(wg, ag, None, sg, epmoe.SCALE_F32_MMAJOR, stream=side)
    torch.cuda.synchronize()
    assert (bits(got) == bits(want)).all()
    # mode (b) with the scale a float: its one-element device tensor, made on the current stream and
    # dropped at return, must live until the side stream has read it (new tensors then reuse freed
    # blocks at once: without the guard they would take its memory while the GEMM still waits)
    want_b = w4a8.gemm(wg, ag, None, a_tensor_scale=0.0375)
    torch.cuda._sleep(20_000_000)
    side.wait_stream(torch.cuda.current_stream())
    got_b = w4a8.gemm(wg, ag, None, a_tensor_scale=0.0375, stream=side)
    junk = [torch.full((1,), 1e30, device="cuda") for _ in range(64)]  # would take a freed scale's block
    torch.cuda.synchronize()
    assert len(junk) == 64 and (bits(got_b) == bits(want_b)).all()
    # DeepEP's scale tensor (the M-major slabs transposed) passes as it is
    deepep = sg.view(torch.float32).reshape(E, K // 128, M).transpose(1, 2)
    assert deepep.stride() == (K // 128 * M, 1, M)
    got = w4a8.gemm(wg, ag, torch.full((E,), M, dtype=torch.int32, device="cuda"), deepep, epmoe.SCALE_F32_MMAJOR)
    torch.cuda.synchronize()
    assert (bits(got) == bits(want)).all()


@gpu
def test_mlp_kernel_close_to_reference():
    rng = np.random.default_rng(300)
    E, M, H, I = 2, 9, 256, 256
    w13, w2, a, slabs = small_mlp(rng, E, M, H, I, m8_w2=True)
    masked = np.array([9, 4], np.int32)
    ref = w4a8.mlp(w13, w2, a, masked, slabs)
    got = w4a8.mlp(w13.to("cuda"), w2.to("cuda"), torch.from_numpy(a).cuda(), torch.from_numpy(masked).cuda(),
                   torch.from_numpy(slabs).cuda())
    torch.cuda.synchronize()
    g, r = mdl.bf16_value(bits(got)).astype(np.float64), mdl.bf16_value(ref).astype(np.float64)
    assert np.sqrt(((g - r) ** 2).sum() / (r ** 2).sum()) <= 3e-2
    # mode (b), scales as device scalars made from floats
    got_b = w4a8.mlp(w13.to("cuda"), w2.to("cuda"), torch.from_numpy(a).cuda(), torch.from_numpy(masked).cuda(),
                     a_tensor_scale=0.05, a2_tensor_scale=0.001)
    torch.cuda.synchronize()
    assert np.isfinite(mdl.bf16_value(bits(got_b))).all()


@gpu
def test_host_weights_with_device_activations_are_refused():
    rng = np.random.default_rng(1)
    w = w4a8.repack(*make_ckpt(rng, 1, 128, 128, m8=False)[:2])
    a = torch.zeros(1, 2, 128, dtype=torch.uint8, device="cuda")
    with pytest.raises(epmoe.DLPackError, match="w.to\\('cuda"):
        w4a8.gemm(w, a, a_tensor_scale=1.0)
