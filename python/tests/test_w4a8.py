"""epmoe.w4a8 on the host: the repack against an independent numpy reading of the checkpoint
format, the GEMM reference against a numpy fp64 model (both activation scale modes, F32_ROW and
F32_MMAJOR layouts, masked rows untouched), the MLP reference against its steps composed in numpy
(silu in fp32, bf16 via ml_dtypes, the intermediate cast by the package's cast_group_fp8), and
errors surfacing as the right exceptions."""
import numpy as np
import pytest

import epmoe
import models as mdl
from epmoe import w4a8

POISON = np.uint16(0x7FBF)  # a bf16 NaN no computation here produces: marks "never written"


def make_ckpt(rng, E, N, K, *, m8, scale=0.02, bf16_scales=False):
    """Checkpoint weights uniform in [-7, 7] (or [-8, 7] with m8, with at least one -8)."""
    lo = -8 if m8 else -7
    vals = rng.integers(lo, 8, size=(E, N, K)).astype(np.int8)
    if m8:
        vals[0, 0, 1] = -8  # a high nibble, to catch a reader that only looks at low nibbles
    s = (scale * (0.5 + rng.random((E, N, K // 128)))).astype(np.float32)
    if bf16_scales:
        s = mdl.bf16_bits(s)
    return mdl.int4_ckpt(vals), s, vals


def make_acts(rng, E, M, K, fmt):
    """fp8 activations [E, M, K] and their 1x128 scales (E slabs of fmt), by the numpy cast model;
    also the scales as float [E, M, G]."""
    a = np.zeros((E, M, K), np.uint8)
    slabs, sa = [], np.zeros((E, M, K // 128), np.float32)
    for e in range(E):
        x = (rng.standard_normal((M, K)) * np.exp2(rng.uniform(-2, 2, (M, 1)))).astype(np.float32)
        q, s = mdl.group_cast(mdl.bf16_bits(x), round_scale=fmt >= 2)
        a[e], sa[e] = q, s
        slabs.append(mdl.scales_to_layout(s, fmt))
    return a, np.concatenate(slabs), sa


def small_mlp(rng, E, M, H, I, *, m8_w2=False):
    """Repacked w13 [E, 2I, H] and w2 [E, H, I] (w2 with a -8 when m8_w2), fp8 activations [E, M, H]
    and their row-major 1x128 scale slabs: an MLP case for the argument checks."""
    w13 = w4a8.repack(*make_ckpt(rng, E, 2 * I, H, m8=False)[:2])
    w2 = w4a8.repack(*make_ckpt(rng, E, H, I, m8=m8_w2)[:2])
    a, slabs, _ = make_acts(rng, E, M, H, epmoe.SCALE_F32_ROW)
    return w13, w2, a, slabs


# ---- repack / unpack ------------------------------------------------------------------------------
@pytest.mark.parametrize("m8", [False, True])
@pytest.mark.parametrize("bf16_scales", [False, True])
def test_repack_unpack_round_trip(m8, bf16_scales):
    rng = np.random.default_rng(11 + m8 + 2 * bf16_scales)
    E, N, K = 2, 128, 256
    ckpt_w, ckpt_s, vals = make_ckpt(rng, E, N, K, m8=m8, bf16_scales=bf16_scales)
    assert (mdl.int4_values(ckpt_w) == vals).all()  # the numpy model reads its own checkpoint back
    w = w4a8.repack(ckpt_w, ckpt_s)
    assert (w.E, w.N, w.K) == (E, N, K)
    assert w.encoding == (w4a8.ENC_FULL if m8 else w4a8.ENC_SYM7)
    assert w.encoding_name == ("full" if m8 else "sym7")
    assert w.qweight.dtype == np.uint8 and w.qweight.nbytes == E * N * K // 2
    assert w.scales.dtype == np.uint16 and w.scales.shape == (E, K // 128, N)  # bf16 bits
    assert w.qweight.ctypes.data % 16 == 0 and w.scales.ctypes.data % 16 == 0
    # [E, K/128, N] = bf16(s * 512) by ml_dtypes' rounding: bit-exact from bf16, nearest even from float32
    s = mdl.bf16_value(ckpt_s) if bf16_scales else ckpt_s
    assert (w.scales == mdl.bf16_bits(np.swapaxes(s, 1, 2) * np.float32(512))).all()
    got_v, got_s = w4a8.unpack(w)
    want_s = mdl.w4_scales(ckpt_s).astype(np.float32)
    assert (want_s == s).all() == bf16_scales  # float32 scales do move (by at most 2^-8)
    assert (np.abs(want_s - s) <= s / 256).all()
    assert (got_v == vals).all()
    assert (got_s == want_s).all()
    assert w.value(1, 77, 129) == (int(vals[1, 77, 129]), float(want_s[1, 77, 1]))
    # the package's int4 pack of the values is the checkpoint again
    assert (epmoe.int4_pack(got_v).view(np.int8) == ckpt_w).all()


def test_repack_encoding_choice():
    rng = np.random.default_rng(5)
    clean_w, clean_s, clean_v = make_ckpt(rng, 1, 128, 128, m8=False)
    m8_w, m8_s, m8_v = make_ckpt(rng, 1, 128, 128, m8=True)
    assert w4a8.repack(clean_w, clean_s, "sym7").encoding == w4a8.ENC_SYM7
    full = w4a8.repack(clean_w, clean_s, "full")
    assert full.encoding == w4a8.ENC_FULL
    sym = w4a8.repack(clean_w, clean_s)
    assert (full.qweight != sym.qweight).any()  # two encodings of the same values...
    assert (w4a8.unpack(full)[0] == clean_v).all()  # ...that read back the same
    assert w4a8.repack(m8_w, m8_s, w4a8.ENC_FULL).encoding == w4a8.ENC_FULL
    with pytest.raises(epmoe.InvalidArgument, match="-8"):
        w4a8.repack(m8_w, m8_s, "sym7")


def test_weights_rebuilt_from_saved_arrays():
    rng = np.random.default_rng(6)
    w = w4a8.repack(*make_ckpt(rng, 1, 128, 128, m8=False)[:2])
    again = w4a8.W4A8Weights(w.qweight.copy(), w.scales.copy(), 1, 128, 128, w.encoding_name)
    assert again.value(0, 3, 4) == w.value(0, 3, 4)
    with pytest.raises(ValueError, match="bytes"):
        w4a8.W4A8Weights(w.qweight[:-1], w.scales, 1, 128, 128, "sym7")
    with pytest.raises(ValueError, match="encoding"):
        w4a8.W4A8Weights(w.qweight, w.scales, 1, 128, 128, "auto")
    with pytest.raises(epmoe.InvalidArgument):
        w.value(0, 128, 0)


def test_repack_errors():
    rng = np.random.default_rng(7)
    cw, cs, _ = make_ckpt(rng, 1, 128, 256, m8=False)
    with pytest.raises(epmoe.Unsupported, match="group size 64"):  # a group-64 checkpoint
        w4a8.repack(cw, np.repeat(cs, 2, axis=2))
    with pytest.raises(epmoe.InvalidArgument, match="N = 200"):
        w4a8.repack(np.zeros((1, 200, 64), np.int8), np.ones((1, 200, 1), np.float32))
    with pytest.raises(epmoe.InvalidArgument, match="K = 100"):
        w4a8.repack(np.zeros((1, 128, 50), np.int8), np.ones((1, 128, 1), np.float32))
    with pytest.raises(ValueError, match="does not fit"):
        w4a8.repack(cw, cs[:, :64])
    with pytest.raises(ValueError, match="dimensions"):
        w4a8.repack(cw[0], cs[0])
    with pytest.raises(TypeError, match="dtype"):
        w4a8.repack(cw, cs.astype(np.float64))
    with pytest.raises(ValueError, match="encoding"):
        w4a8.repack(cw, cs, "int4")
    for bad in (np.nan, -1.0, np.inf, 6.64e35):  # the last: * 512 is a finite float32 but no bf16
        s = cs.copy()
        s[0, 3, 1] = bad
        with pytest.raises(epmoe.InvalidArgument, match="weight scale"):
            w4a8.repack(cw, s)


# ---- the GEMM reference -------------------------------------------------------------------------
def run_gemm(w, a, masked, **kw):
    E, M, _ = a.shape
    out = np.full((E, M, w.N), POISON, np.uint16)
    res = w4a8.gemm(w, a, masked, out=out, **kw)
    assert res is out
    return out


def check_gemm(out, want, masked):
    """Valid rows equal the model's bf16 rounding of the fp64 sum; the others hold the poison."""
    E, M, _ = out.shape
    for e in range(E):
        rows = int(min(max(masked[e], 0), M))
        assert (out[e, rows:] == POISON).all(), f"expert {e}: rows past masked_m = {masked[e]} were written"
        # fp64 -> fp32 -> bf16: a float result rounded to bf16; fp64 ulps never reach bf16 here
        bits = mdl.bf16_bits(want[e, :rows].astype(np.float32))
        diff = out[e, :rows] != bits
        assert not diff.any(), f"expert {e}: {int(diff.sum())} of {diff.size} outputs differ from the fp64 model"


@pytest.mark.parametrize("fmt", [epmoe.SCALE_F32_ROW, epmoe.SCALE_F32_MMAJOR, epmoe.SCALE_UE8M0_MMAJOR])
@pytest.mark.parametrize("E,N,K,M,masked", [(3, 128, 256, 5, [5, 0, 2]), (2, 256, 384, 4, [-2, 9])])
def test_gemm_ref_group_scales_match_fp64_model(fmt, E, N, K, M, masked):
    rng = np.random.default_rng(100 + fmt + K)
    cw, cs, vals = make_ckpt(rng, E, N, K, m8=K == 384)
    w = w4a8.repack(cw, cs)
    a, slabs, sa = make_acts(rng, E, M, K, fmt)
    masked = np.array(masked, np.int32)
    out = run_gemm(w, a, masked, a_scales=slabs, scale_fmt=fmt)
    want, _ = mdl.w4a8_gemm(vals, cs, a, sa, masked)
    check_gemm(out, want, masked)
    valid = want[~np.isnan(want)]
    assert valid.size and np.isfinite(valid).all() and np.abs(valid).max() > 0  # the check saw real numbers


def test_gemm_ref_per_tensor_scale_and_defaults():
    rng = np.random.default_rng(21)
    E, N, K, M = 2, 128, 256, 3
    cw, cs, vals = make_ckpt(rng, E, N, K, m8=True)
    w = w4a8.repack(cw, cs)
    a = mdl.fp8_sat(rng.standard_normal((E, M, K)) * 40)
    masked = np.array([3, 1], np.int32)
    ts = np.float32(0.0375)
    out = run_gemm(w, a, masked, a_tensor_scale=ts)
    want, _ = mdl.w4a8_gemm(vals, cs, a, np.full((E, M, K // 128), ts), masked)
    check_gemm(out, want, masked)
    # as a one-element array, and with masked_m omitted (every row) into a new, zeroed output
    full = w4a8.gemm(w, a, a_tensor_scale=np.array([ts]))
    want_all, _ = mdl.w4a8_gemm(vals, cs, a, np.full((E, M, K // 128), ts), [M] * E)
    assert full.dtype == np.uint16 and full.shape == (E, M, N)
    assert (full == mdl.bf16_bits(want_all.astype(np.float32))).all()
    # [M, K] activations for a single expert
    one = w4a8.repack(cw[:1], cs[:1])
    assert (w4a8.gemm(one, a[0], a_tensor_scale=ts) == full[0]).all()


def test_gemm_errors():
    rng = np.random.default_rng(3)
    cw, cs, _ = make_ckpt(rng, 2, 128, 256, m8=False)
    w = w4a8.repack(cw, cs)
    a, slabs, _ = make_acts(rng, 2, 4, 256, epmoe.SCALE_F32_ROW)
    with pytest.raises(ValueError, match="does not fit"):
        w4a8.gemm(w, np.ascontiguousarray(a[:, :, :128]), a_scales=slabs)
    with pytest.raises(ValueError, match="does not fit"):
        w4a8.gemm(w, a[:1], a_scales=slabs)
    with pytest.raises(ValueError, match="not both"):
        w4a8.gemm(w, a, a_scales=slabs, a_tensor_scale=1.0)
    with pytest.raises(epmoe.NullPointer, match="both NULL"):  # neither mode: the library's message
        w4a8.gemm(w, a)
    with pytest.raises(ValueError, match="masked_m"):
        w4a8.gemm(w, a, np.array([1, 2, 3], np.int32), a_scales=slabs)
    with pytest.raises(ValueError, match="a_scales"):
        w4a8.gemm(w, a, a_scales=slabs[:8])
    with pytest.raises(ValueError, match="scale_fmt"):
        w4a8.gemm(w, a, a_scales=slabs, scale_fmt="f16_row")
    with pytest.raises(TypeError, match="W4A8Weights"):
        w4a8.gemm((cw, cs), a, a_scales=slabs)
    with pytest.raises(TypeError, match="dtype"):
        w4a8.gemm(w, a.astype(np.float32), a_scales=slabs)
    with pytest.raises(ValueError, match="shape"):
        w4a8.gemm(w, a, a_scales=slabs, out=np.zeros((2, 4, 256), np.uint16))


# ---- the MLP reference ----------------------------------------------------------------------------
def mlp_model(vals13, s13, vals2, s2, a, sa, masked, I, *, tensor_scales=None):
    """The MLP composed in numpy: GEMM1 (fp64 model, bf16), silu(gate) * up in fp32 rounded to bf16,
    the fp8 cast of the intermediate (the package's cast_group_fp8 in mode (a), cast_tensor_fp8 in
    mode (b)), GEMM2 (fp64 model). Returns the fp64 output [E, M, H]."""
    E, M, _ = a.shape
    gate_up, _ = mdl.w4a8_gemm(vals13, s13, a, sa, masked)
    inter = np.zeros((E, M, I), np.uint8)
    isa = np.zeros((E, M, I // 128), np.float32)
    for e, rows, y in mdl.mlp_intermediates(gate_up, masked, I):
        if tensor_scales is None:
            inter[e, :rows], isa[e, :rows] = epmoe.cast_group_fp8(y, epmoe.SCALE_F32_ROW)
        else:
            inter[e, :rows] = epmoe.cast_tensor_fp8(y, tensor_scales[1])
            isa[e] = tensor_scales[1]
    out, _ = mdl.w4a8_gemm(vals2, s2, inter, isa, masked)
    return out


@pytest.mark.parametrize("fmt", [epmoe.SCALE_F32_MMAJOR, epmoe.SCALE_UE8M0_ROW])
def test_mlp_ref_equals_its_steps(fmt):
    rng = np.random.default_rng(40 + fmt)
    E, M, H, I = 2, 5, 256, 128
    cw13, cs13, v13 = make_ckpt(rng, E, 2 * I, H, m8=False)
    cw2, cs2, v2 = make_ckpt(rng, E, H, I, m8=True)
    w13, w2 = w4a8.repack(cw13, cs13), w4a8.repack(cw2, cs2)
    a, slabs, sa = make_acts(rng, E, M, H, fmt)
    masked = np.array([5, 2], np.int32)
    out = np.full((E, M, H), POISON, np.uint16)
    assert w4a8.mlp(w13, w2, a, masked, slabs, fmt, out=out) is out
    want = mlp_model(v13, cs13, v2, cs2, a, sa, masked, I)
    check_gemm(out, want, masked)


@pytest.mark.parametrize("fmt", [epmoe.SCALE_F32_MMAJOR, epmoe.SCALE_UE8M0_MMAJOR])
def test_gemm_and_mlp_take_deepeps_scale_tensors(fmt):
    """DeepEP's low-latency scales ([E, M, G] in strides (G*M, 1, M): the M-major slabs transposed,
    as deep_ep.Buffer and DeepEP hand them out) pass as they are, with the same results."""
    rng = np.random.default_rng(60 + fmt)
    E, M, H, I = 2, 6, 640, 128  # H = 5 groups: UE8M0 words padded
    cw13, cs13, _ = make_ckpt(rng, E, 2 * I, H, m8=False)
    cw2, cs2, _ = make_ckpt(rng, E, H, I, m8=True)
    w13, w2 = w4a8.repack(cw13, cs13), w4a8.repack(cw2, cs2)
    a, slabs, _ = make_acts(rng, E, M, H, fmt)
    G = H // 128 if fmt == epmoe.SCALE_F32_MMAJOR else (H // 128 + 3) // 4
    words = slabs.view(np.float32 if fmt == epmoe.SCALE_F32_MMAJOR else np.int32).reshape(E, G, M)
    deepep = words.swapaxes(1, 2)
    assert deepep.shape == (E, M, G) and deepep.strides == (G * M * 4, 4, M * 4)
    masked = np.array([6, 4], np.int32)
    assert (w4a8.gemm(w13, a, masked, deepep, fmt) == w4a8.gemm(w13, a, masked, slabs, fmt)).all()
    assert (w4a8.mlp(w13, w2, a, masked, deepep, fmt) == w4a8.mlp(w13, w2, a, masked, slabs, fmt)).all()
    wide = np.concatenate([words, words], axis=2).swapaxes(1, 2)[:, :M]  # strides (2GM, 1, 2M): not DeepEP's
    with pytest.raises(epmoe.DLPackError, match="contiguous"):
        w4a8.gemm(w13, a, masked, wide, fmt)
    with pytest.raises(epmoe.DLPackError, match="contiguous"):  # the view with a row-major format
        w4a8.gemm(w13, a, masked, deepep, "f32_row")


def test_mlp_ref_per_tensor_scales():
    rng = np.random.default_rng(47)
    E, M, H, I = 2, 3, 256, 128
    cw13, cs13, v13 = make_ckpt(rng, E, 2 * I, H, m8=True)
    cw2, cs2, v2 = make_ckpt(rng, E, H, I, m8=False)
    w13, w2 = w4a8.repack(cw13, cs13), w4a8.repack(cw2, cs2)
    s1, s2 = np.float32(0.05), np.float32(0.001)
    a = mdl.fp8_sat(rng.standard_normal((E, M, H)) * 30)
    masked = np.array([1, 3], np.int32)
    out = np.full((E, M, H), POISON, np.uint16)
    w4a8.mlp(w13, w2, a, masked, a_tensor_scale=s1, a2_tensor_scale=s2, out=out)
    want = mlp_model(v13, cs13, v2, cs2, a, np.full((E, M, H // 128), s1), masked, I, tensor_scales=(s1, s2))
    check_gemm(out, want, masked)


def test_mlp_errors():
    rng = np.random.default_rng(9)
    E, M, H, I = 1, 2, 256, 128
    w13, w2, a, slabs = small_mlp(rng, E, M, H, I)
    with pytest.raises(epmoe.InvalidArgument, match="must be \\[E, 2I, H\\]"):  # w2 and w13 swapped
        w4a8.mlp(w2, w13, np.ascontiguousarray(a[:, :, :128]), a_scales=slabs)
    with pytest.raises(epmoe.NullPointer, match="a2_tensor_scale"):  # mode (b) needs both scales
        w4a8.mlp(w13, w2, a, a_tensor_scale=1.0)
    with pytest.raises(ValueError, match="not both"):
        w4a8.mlp(w13, w2, a, a_scales=slabs, a2_tensor_scale=1.0)
    with pytest.raises(epmoe.InvalidArgument, match="workspace_bytes"):
        w4a8.mlp(w13, w2, a, a_scales=slabs, workspace=np.zeros(64, np.uint8))
    assert w4a8.mlp_workspace_bytes(E, M, H, I) >= E * M * (2 * I * 2 + I + I // 128 * 4)


# ---- argument checks -------------------------------------------------------------------------------
def test_weights_refuse_checkpoint_order_scales():
    """W4A8Weights takes repack()'s [E, K/128, N] scales: checkpoint-order [E, N, K/128] ones have the
    same bytes and would silently give another GEMM."""
    rng = np.random.default_rng(12)
    w = w4a8.repack(*make_ckpt(rng, 1, 128, 256, m8=False)[:2])
    assert w.scales.shape == (1, 2, 128)
    ckpt_order = np.ascontiguousarray(w.scales.transpose(0, 2, 1))
    with pytest.raises(ValueError, match=r"shape \(1, 128, 2\).*\[1, 2, 128\].*repack\(ckpt_w, ckpt_scales\)"):
        w4a8.W4A8Weights(w.qweight, ckpt_order, 1, 128, 256, w.encoding)
    with pytest.raises(ValueError, match=r"\[1, 2, 128\]"):  # nor flattened
        w4a8.W4A8Weights(w.qweight, w.scales.reshape(-1), 1, 128, 256, w.encoding)
    again = w4a8.W4A8Weights(w.qweight, w.scales, 1, 128, 256, w.encoding)  # repack's arrays as they are
    assert again.value(0, 5, 200) == w.value(0, 5, 200)


def test_read_only_workspace_is_refused():
    rng = np.random.default_rng(13)
    E, M, H, I = 1, 2, 128, 128
    w13, w2, a, slabs = small_mlp(rng, E, M, H, I)
    n = w4a8.mlp_workspace_bytes(E, M, H, I) + 256
    frozen = np.zeros(n, np.uint8)
    frozen.flags.writeable = False
    immutable = bytes(n)
    for ws in (frozen, np.frombuffer(immutable, np.uint8)):
        with pytest.raises(epmoe.DLPackError, match="workspace: the tensor is read-only"):
            w4a8.mlp(w13, w2, a, a_scales=slabs, workspace=ws)
    assert not frozen.any() and immutable == bytes(n)  # nothing was written
    ws = np.zeros(n, np.uint8)  # a writable one is taken
    assert (w4a8.mlp(w13, w2, a, a_scales=slabs, workspace=ws) == w4a8.mlp(w13, w2, a, a_scales=slabs)).all()


def test_opaque_arguments_get_clear_errors():
    rng = np.random.default_rng(14)
    w = w4a8.repack(*make_ckpt(rng, 1, 128, 128, m8=False)[:2])
    with pytest.raises(TypeError, match="w must be W4A8Weights"):
        w4a8.unpack("x")
    # integers past int64_t are refused, not wrapped (2**64 would reach the library as 0)
    with pytest.raises(ValueError, match=r"e = 18446744073709551616 is outside the range"):
        w.value(2 ** 64, 0, 0)
    with pytest.raises(ValueError, match="E = 18446744073709551617 is outside the range"):
        w4a8.repack_size(2 ** 64 + 1, 128, 128)
    with pytest.raises(ValueError, match="expected_m"):
        w4a8.gemm(w, np.zeros((1, 2, 128), np.uint8), a_tensor_scale=1.0, expected_m=2 ** 64)


def test_weights_on_a_device_that_is_not_cuda_are_refused():
    from test_dlpack import Crafted
    rng = np.random.default_rng(15)
    w = w4a8.repack(*make_ckpt(rng, 1, 128, 128, m8=False)[:2])
    rocm = (10, 0)  # DLPack kDLROCM: no epmoe entry point reads it (it went to the _cuda ones)
    made = [Crafted(w.qweight, w.qweight.shape, 1, 8, versioned=False, device=rocm),
            Crafted(w.scales, w.scales.shape, 1, 16, versioned=False, device=rocm)]
    q, s = (epmoe.from_dlpack(c.capsule()) for c in made)
    with pytest.raises(epmoe.DLPackError, match=r"qweight: is on rocm:0 \(DLPack device type 10\)"):
        w4a8.W4A8Weights(q, s, 1, 128, 128, w.encoding)
    a = Crafted(np.zeros((1, 2, 128), np.uint8), (1, 2, 128), 1, 8, versioned=False, device=rocm)
    at = epmoe.from_dlpack(a.capsule())
    with pytest.raises(epmoe.DLPackError, match=r"a: is on rocm:0 \(DLPack device type 10\)"):
        w4a8.gemm(w, at, a_tensor_scale=1.0)
    del q, s, at
