"""The fp8 encoder against ml_dtypes' float8_e4m3fn on every in-range float32, and the binding
of the quantization reference against a numpy model of DeepEP's cast."""
import ml_dtypes
import numpy as np
import pytest

import epmoe

CHUNK = 1 << 24
MAX_BITS = 0x43E00000  # 448.0f: every |x| <= 448 is in range for ml_dtypes (above, it gives NaN)


def test_fp8_encoder_matches_ml_dtypes_on_all_in_range_floats():
    bad = 0
    for start in range(0, MAX_BITS + 1, CHUNK):
        bits = np.arange(start, min(start + CHUNK, MAX_BITS + 1), dtype=np.uint32)
        for sign in (0, 0x80000000):
            f = (bits | np.uint32(sign)).view(np.float32)
            ours = epmoe.fp8_from_float(f)
            theirs = f.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
            bad += int(np.count_nonzero(ours != theirs))
    assert bad == 0


def test_fp8_out_of_range_saturates_where_ml_dtypes_overflows():
    f = np.array([464.0, 1e6, np.inf, -np.inf, -500.0], dtype=np.float32)
    assert list(epmoe.fp8_from_float(f)) == [0x7E, 0x7E, 0x7E, 0xFE, 0xFE]
    theirs = f.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    assert theirs[0] == 448.0  # 464 is the tie between 448 and 480 (NaN's code): even wins, for both
    assert np.isnan(theirs[1:]).all()  # ml_dtypes overflows to NaN where we saturate: documented difference
    assert epmoe.fp8_from_float(np.array([np.nan], dtype=np.float32))[0] == 0x7F


def test_fp8_decoder_matches_ml_dtypes():
    codes = np.arange(256, dtype=np.uint8)
    ours = epmoe.fp8_to_float(codes)
    theirs = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    same = (ours == theirs) | (np.isnan(ours) & np.isnan(theirs))
    assert same.all()


def test_bf16_matches_ml_dtypes():
    rng = np.random.default_rng(0)
    f = (rng.standard_normal(1 << 20) * np.exp(rng.standard_normal(1 << 20) * 8)).astype(np.float32)
    assert (epmoe.bf16_from_float(f) == f.astype(ml_dtypes.bfloat16).view(np.uint16)).all()


@pytest.mark.parametrize("M,K", [(1, 128), (3, 384), (129, 7168)])
def test_cast_group_matches_numpy_model(M, K):
    rng = np.random.default_rng(M * K)
    x = (rng.standard_normal((M, K)) * np.exp(rng.standard_normal((M, 1)))).astype(np.float32)
    xb = epmoe.bf16_from_float(x)
    q, s = epmoe.cast_group_fp8(xb)
    xf = epmoe.bf16_to_float(xb).reshape(M, K // 128, 128)
    amax = np.maximum(np.abs(xf).max(-1), np.float32(1e-4)).astype(np.float32)
    mul = (np.float32(448.0) / amax).astype(np.float32)
    want = (xf * mul[..., None]).astype(np.float32).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    assert (q == want.reshape(M, K)).all()
    scales = s.view(np.float32)[: M * (K // 128)].reshape(M, K // 128)
    assert (scales == (amax * np.float32(1.0 / 448.0)).astype(np.float32)).all()


def test_errors_raise_with_message():
    x = np.zeros((1, 100), dtype=np.uint16)
    with pytest.raises(epmoe.Error, match="multiple of 128"):
        epmoe.cast_group_fp8(x)


# ---- the quant ops through DLPack, against the numpy models of tests/models.py ------------------
from models import bf16_value, fp8_sat, fp8_value, group_cast, scales_from_layout, scales_to_layout  # noqa: E402


def _tokens(M, K, seed, outliers=False):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((M, K)) * np.exp(rng.standard_normal((M, 1)) * 2)).astype(np.float32)
    if outliers:
        x[:, rng.integers(0, K, 4)] *= 300
    return epmoe.bf16_from_float(x)


@pytest.mark.parametrize("fmt", [epmoe.SCALE_F32_ROW, epmoe.SCALE_F32_MMAJOR, epmoe.SCALE_UE8M0_ROW,
                                 epmoe.SCALE_UE8M0_MMAJOR])
@pytest.mark.parametrize("M,K", [(1, 128), (5, 640), (33, 1024)])
def test_cast_group_every_scale_format(fmt, M, K):
    round_scale = fmt >= epmoe.SCALE_UE8M0_ROW
    xb = _tokens(M, K, M + K + fmt, outliers=True)
    q, s = epmoe.cast_group_fp8(xb, fmt, round_scale)
    shape, dt = epmoe.scale_shape(fmt, M, K)
    assert s.shape == shape and s.dtype == np.dtype(dt) and s.nbytes == epmoe.scale_bytes(fmt, M, K)
    wq, ws = group_cast(xb, round_scale)
    assert (q == wq).all()
    assert (s.reshape(-1).view(np.uint8) == scales_to_layout(ws, fmt)).all()
    # and the layout function of the library agrees with the model's decoding
    assert (scales_from_layout(s, fmt, M, K // 128) == ws).all()
    t, g = M - 1, K // 128 - 1
    off = epmoe.scale_offset(fmt, M, K, t, g)
    if fmt <= epmoe.SCALE_F32_MMAJOR:
        assert s.reshape(-1).view(np.uint8)[off:off + 4].view(np.float32)[0] == ws[t, g]
    else:
        assert s.reshape(-1).view(np.uint8)[off] == epmoe.ue8m0_from_float(ws[t, g])
    with pytest.raises(ValueError):
        epmoe.scale_offset(fmt, M, K, M, 0)  # past the last row


def test_cast_group_writes_into_callers_buffers_without_copies():
    xb = _tokens(4, 256, 1)
    q = np.empty((4, 256), np.uint8)
    s = np.empty(epmoe.scale_bytes(epmoe.SCALE_F32_MMAJOR, 4, 256), np.uint8)  # raw bytes are fine
    q2, s2 = epmoe.cast_group_fp8(xb, "f32_mmajor", out=q, scales=s)
    assert q2 is q and s2 is s
    wq, ws = group_cast(xb)
    assert (q == wq).all() and (s.view(np.float32).reshape(2, 4) == ws.T).all()
    with pytest.raises(ValueError, match="bytes"):
        epmoe.cast_group_fp8(xb, "f32_row", scales=np.empty(31, np.uint8))


def test_cast_tensor_matches_model():
    xb = _tokens(7, 384, 2, outliers=True)
    for scale in (0.05, 1.0, 3.0):
        q = epmoe.cast_tensor_fp8(xb, scale)
        inv = np.float32(1.0) / np.float32(scale)
        assert (q == fp8_sat(bf16_value(xb) * inv)).all()
    q = epmoe.cast_tensor_fp8(xb, np.array([0.5], np.float32))  # a tensor scale, as on the GPU
    assert (q == fp8_sat(bf16_value(xb) * np.float32(2.0))).all()


@pytest.mark.parametrize("fmt", [0, 1, 2, 3])
def test_requant_and_dequant_match_model_and_respect_masked_m(fmt):
    E, M, K = 3, 9, 256
    round_scale = fmt >= 2
    qs, slabs, svals = [], [], []
    for e in range(E):
        q, s = epmoe.cast_group_fp8(_tokens(M, K, 10 + e, outliers=e == 1), fmt, round_scale)
        qs.append(q)
        slabs.append(s.reshape(-1).view(np.uint8))
        svals.append(group_cast(_tokens(M, K, 10 + e, outliers=e == 1), round_scale)[1])
    q = np.stack(qs)
    scales = np.concatenate(slabs)
    masked = np.array([M, 4, 0], np.int32)
    deq_model = [fp8_value(q[e]) * np.repeat(svals[e], 128, axis=1) for e in range(E)]

    y = epmoe.dequant_fp8(q, scales, fmt, masked)
    for e in range(E):
        m = masked[e]
        assert (y[e, :m] == deq_model[e][:m]).all() and (y[e, m:] == 0).all()
    yb = epmoe.dequant_fp8(q, scales, fmt, None, "bfloat16")
    assert yb.dtype == np.uint16 and (bf16_value(yb) == np.stack(deq_model).astype(np.float32)
                                      .astype(ml_dtypes.bfloat16).astype(np.float32)).all()

    out_scale = 0.07
    r = epmoe.requant_fp8(q, scales, fmt, masked, out_scale)
    inv = np.float32(1.0) / np.float32(out_scale)
    for e in range(E):
        m = masked[e]
        want = fp8_sat((deq_model[e] * inv).astype(np.float32))
        assert (r[e, :m] == want[:m]).all() and (r[e, m:] == 0).all()


def test_requant_errors_carry_the_library_message():
    q = np.zeros((2, 4, 128), np.uint8)
    s = np.ones(2 * 4, np.float32)
    with pytest.raises(ValueError, match="2 int32 counts"):
        epmoe.requant_fp8(q, s, 0, np.zeros(3, np.int32), 1.0)
    with pytest.raises(ValueError, match="multiple of 128"):
        epmoe.requant_fp8(np.zeros((2, 4, 100), np.uint8), s, 0, np.zeros(2, np.int32), 1.0)
    with pytest.raises(epmoe.InvalidArgument) as info:
        epmoe.requant_fp8(q, s, 7, np.zeros(2, np.int32), 1.0)  # not a scale format: the library says so
    assert info.value.status == 1 and info.value.message


def test_int4_pack_unpack_and_ue8m0():
    rng = np.random.default_rng(3)
    v = rng.integers(-8, 8, size=(4, 64)).astype(np.int8)
    p = epmoe.int4_pack(v)
    assert p.shape == (4, 32) and p.dtype == np.uint8
    lo, hi = v[:, 0::2].astype(np.uint8) & 0xF, v[:, 1::2].astype(np.uint8) & 0xF
    assert (p == (lo | (hi << 4))).all()  # element 2j in the low nibble of byte j
    assert (epmoe.int4_unpack(p) == v).all()
    v[2, 5] = 9
    with pytest.raises(epmoe.InvalidArgument, match=r"vals\[133\] = 9 is outside \[-8, 7\]"):
        epmoe.int4_pack(v)
    with pytest.raises(ValueError, match="even"):
        epmoe.int4_pack(np.zeros((2, 3), np.int8))
    assert epmoe.ue8m0_from_float(0.25) == 125 and epmoe.ue8m0_to_float(125) == 0.25
    assert np.isnan(epmoe.ue8m0_to_float(0xFF))


def test_conversions_write_into_out_without_copies():
    f = np.linspace(-500, 500, 1024, dtype=np.float32)
    q = np.empty(1024, np.uint8)
    assert epmoe.fp8_from_float(f, out=q) is q and (q == fp8_sat(f)).all()
    b = np.empty(1024, np.uint16)
    assert epmoe.bf16_from_float(f, out=b) is b
    back = np.empty(1024, np.float32)
    assert epmoe.bf16_to_float(b, out=back) is back and (back == bf16_value(b)).all()
    assert (epmoe.fp8_from_float([1.0, 448.0, 1e9]) == [0x38, 0x7E, 0x7E]).all()  # lists are accepted


def test_cuda_entry_point_without_gpu_reports_the_library_error():
    if epmoe.cuda_available():
        pytest.skip("a GPU is present")
    # a CPU build answers EPMOE_ERR_UNSUPPORTED; a CUDA build on a machine without a GPU fails in CUDA
    from test_dlpack import Crafted
    from epmoe import dlpack as dl
    # the producers must outlive the tensors (their structs and deleters live in them)
    made = [Crafted(np.zeros((2, 128), np.uint16), (2, 128), 1, 16, versioned=False, device=(dl.CUDA, 0)),
            Crafted(np.zeros((2, 128), np.uint8), (2, 128), 1, 8, versioned=False, device=(dl.CUDA, 0)),
            Crafted(np.zeros(8, np.float32), (8,), 2, 32, versioned=False, device=(dl.CUDA, 0))]
    x, q, s = (epmoe.from_dlpack(c.capsule()) for c in made)
    with pytest.raises((epmoe.Unsupported, epmoe.CudaError)) as info:
        epmoe.cast_group_fp8(x, out=q, scales=s)
    assert info.value.message
    # said plainly: not the CUDA runtime's "driver version is insufficient" when there is no driver
    assert "insufficient" not in info.value.message, info.value.message
    if isinstance(info.value, epmoe.CudaError):
        assert "no CUDA GPU/driver available" in info.value.message or "no CUDA-capable device" in info.value.message, \
            info.value.message
    del x, q, s


def test_integers_outside_their_c_type_are_refused():
    # ctypes keeps the low bits: 300 reached epmoe_ue8m0_to_float as byte 44 (2^-83)
    for bad in (300, -1):
        with pytest.raises(ValueError, match=f"ue8m0_to_float: b = {bad} is outside the range of its C type \\(0..255"):
            epmoe.ue8m0_to_float(bad)
    assert epmoe.ue8m0_to_float(np.uint8(127)) == 1.0
    with pytest.raises(ValueError, match="M = 18446744073709551620 is outside"):  # would be M = 4
        epmoe.scale_bytes(epmoe.SCALE_F32_ROW, 2 ** 64 + 4, 128)
    with pytest.raises(ValueError, match="scale_fmt = 4294967296 is outside"):  # would be F32_ROW
        epmoe.cast_group_fp8(np.zeros((1, 128), np.uint16), 2 ** 32)


def test_dequant_out_dtype_takes_dtype_likes():
    q = epmoe.fp8_from_float(np.linspace(-4, 4, 2 * 128, dtype=np.float32).reshape(2, 128))
    s = np.array([0.5, 2.0], np.float32)
    want = epmoe.dequant_fp8(q, s, "f32_row", out_dtype="float32")
    for od in (np.float32, np.dtype("float32"), epmoe.F32, epmoe.dtype("float32")):
        got = epmoe.dequant_fp8(q, s, "f32_row", out_dtype=od)
        assert got.dtype == np.float32 and (got == want).all()
    bf = epmoe.dequant_fp8(q, s, "f32_row", out_dtype="bfloat16")
    for od in (ml_dtypes.bfloat16, "bf16", epmoe.BF16):
        assert (epmoe.dequant_fp8(q, s, "f32_row", out_dtype=od) == bf).all()
    for od in (np.float64, "float16", "fp4", 7):
        with pytest.raises(ValueError, match="must be float32 or bfloat16"):
            epmoe.dequant_fp8(q, s, "f32_row", out_dtype=od)


def test_arrays_without_a_dlpack_dtype_name_the_argument():
    with pytest.raises(epmoe.DLPackError, match="^x: DLPack only supports"):  # numpy's BufferError, named
        epmoe.fp8_from_float(np.array(["a", "b"]))
    q = np.zeros((1, 2, 128), np.uint8)
    with pytest.raises(epmoe.DLPackError, match="^scales: "):
        epmoe.requant_fp8(q, np.array([object()] * 2), 0, np.array([2], np.int32), 1.0)


def test_a_device_that_is_neither_host_nor_cuda_is_refused():
    """ROCm (DLPack device type 10) memory went to the _cuda entry points, which test 'not host'."""
    from test_dlpack import Crafted
    rocm = (10, 0)
    made = [Crafted(np.zeros((2, 128), np.uint16), (2, 128), 1, 16, versioned=False, device=rocm),
            Crafted(np.zeros((2, 128), np.uint8), (2, 128), 1, 8, versioned=False, device=rocm),
            Crafted(np.zeros(8, np.float32), (8,), 2, 32, versioned=False, device=rocm)]
    x, q, s = (epmoe.from_dlpack(c.capsule()) for c in made)
    with pytest.raises(epmoe.DLPackError, match=r"x: is on rocm:0 \(DLPack device type 10\).*host \(CPU\).*CUDA"):
        epmoe.cast_group_fp8(x, out=q, scales=s)
    with pytest.raises(epmoe.DLPackError, match=r"q: is on rocm:0 \(DLPack device type 10\)"):
        epmoe.dequant_fp8(q, s, 0)
    del x, q, s


def test_outputs_overlapping_an_input_are_refused():
    """The kernels read and write in different orders, so an output sharing bytes with an input is
    garbage, not an in-place op: the library refuses it before writing anything."""
    rng = np.random.default_rng(5)
    x = epmoe.bf16_from_float(rng.standard_normal((2, 4, 256)).astype(np.float32))
    q, s = epmoe.cast_group_fp8(x.reshape(8, 256))
    q, s = q.reshape(2, 4, 256), s.reshape(2, 4, 2)
    m = np.array([4, 4], np.int32)
    with pytest.raises(epmoe.InvalidArgument, match="y overlaps q"):
        epmoe.requant_fp8(q, s, "f32_row", m, 0.01, out=q)
    buf = np.zeros(2 * 4 * 256, np.float32)  # dequant's out, whose first floats hold the scales
    buf[:s.size] = s.ravel()
    with pytest.raises(epmoe.InvalidArgument, match="y overlaps scales"):
        epmoe.dequant_fp8(q, buf[:s.size].reshape(s.shape), "f32_row", out=buf.reshape(2, 4, 256))
    assert (buf[:s.size] == s.ravel()).all() and not buf[s.size:].any()  # untouched
    qbuf = np.zeros(8 * 256 + 64, np.uint8)  # cast_group's scales inside its own q
    with pytest.raises(epmoe.InvalidArgument, match="scales overlaps q"):
        epmoe.cast_group_fp8(x.reshape(8, 256), out=qbuf[:8 * 256].reshape(8, 256),
                             scales=qbuf[8 * 256 - 64:])


def test_bad_inputs_get_clear_errors_not_crashes_or_lost_results():
    x = np.arange(8, dtype=np.float32)
    # a malformed tensor (elements at a NULL data pointer): refused, the row functions would crash
    with pytest.raises(epmoe.DLPackError, match="NULL data pointer"):
        epmoe.bf16_from_float(epmoe.Tensor(0, (4,), "float32"))
    with pytest.raises(epmoe.DLPackError, match="NULL data pointer"):
        epmoe.bf16_from_float(x[:4], out=epmoe.Tensor(0, (4,), "uint16"))
    # an output the call cannot write into (a list would be copied into a temporary, results lost)
    with pytest.raises(TypeError, match="out: must be a tensor"):
        epmoe.bf16_from_float(x, out=[0] * 8)
    q = np.zeros((1, 4, 128), np.uint8)
    with pytest.raises(TypeError, match="scales: must be a tensor"):
        epmoe.cast_group_fp8(np.zeros((4, 128), np.uint16), scales=[0.0] * 4)
    # None is not a value
    with pytest.raises(TypeError, match="x is required"):
        epmoe.bf16_from_float(None)
    # out over x: the row functions would read what they already wrote
    buf = np.zeros(16, np.float32)
    with pytest.raises(epmoe.InvalidArgument, match="out overlaps x"):
        epmoe.bf16_to_float(buf.view(np.uint16)[:8], out=buf[:8])
    # scales of another type would be read (or written) as other bits
    s64 = np.ones(4, np.float64)
    with pytest.raises(TypeError, match="scales: dtype float64"):
        epmoe.requant_fp8(q, s64, "f32_row", np.full(1, 4, np.int32), 0.01)
    with pytest.raises(TypeError, match="scales: dtype float64"):
        epmoe.cast_group_fp8(np.zeros((4, 128), np.uint16), scales=np.zeros(4, np.float64))
    ok = epmoe.requant_fp8(q, np.ones(4, np.float32).view(np.uint8), "f32_row", np.full(1, 4, np.int32), 0.01)
    assert ok is not None  # the raw bytes of a slab (uint8) are still taken
    # sizes are integers: 4.7 is refused, not truncated to 4
    with pytest.raises(TypeError, match="M: expected an integer"):
        epmoe.scale_bytes(0, 4.7, 256)
    assert epmoe.scale_bytes(0, np.int64(4), 256) == 4 * 2 * 4
    # a UE8M0 byte holds a power of two: 3.0 or -1.0 had come back as the exponent field of it
    for bad in (3.0, -1.0, 0.0, 2.0 ** -130):
        with pytest.raises(ValueError, match="not a power of two"):
            epmoe.ue8m0_from_float(bad)
    assert epmoe.ue8m0_from_float(2.0 ** -127) == 0 and epmoe.ue8m0_from_float(2.0 ** 127) == 254
    assert epmoe.ue8m0_from_float(float("nan")) == 255


def test_enum_and_size_arguments_name_themselves():
    q = np.zeros((1, 4, 128), np.uint8)
    with pytest.raises(TypeError, match="scale_fmt: expected an integer, got NoneType"):
        epmoe.requant_fp8(q, np.ones(4, np.float32), None, np.full(1, 4, np.int32), 0.01)
    with pytest.raises(TypeError, match="encoding: expected an integer"):
        epmoe.W4A8Weights(np.zeros(64, np.uint8), np.zeros(2, np.uint16), 1, 128, 128, None)
    with pytest.raises(TypeError, match="E: expected an integer, got str"):
        epmoe.W4A8Weights(np.zeros(64, np.uint8), np.zeros(2, np.uint16), "x", 128, 128, "sym7")
    with pytest.raises(TypeError, match="scheme: expected an integer"):
        epmoe.scheme_accepts_wire(None, "fp8")
