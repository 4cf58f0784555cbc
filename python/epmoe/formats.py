"""Formats (fp8 e4m3fn, bf16, UE8M0, int4) and the quantization ops of include/epmoe.h.

Every op takes DLPack tensors (numpy arrays, torch tensors, ...) without copying them. Host
memory runs the `_ref` entry point (the specification, scalar C); a CUDA tensor runs the `_cuda`
kernel on `stream` (default: torch's current stream for torch tensors, else the legacy default
stream), which needs a library built with CUDA (`cuda_available()`).

Results are new numpy arrays for host inputs and new torch tensors for GPU inputs, or the
caller's `out=` tensors. numpy has no bfloat16 or float8 type: those show as uint16 and uint8
bit patterns; torch outputs carry torch.bfloat16 / torch.float8_e4m3fn. Inputs of those kinds
may be either.
"""
import ctypes
import math

import numpy as np

from . import _lib
from ._lib import check, lib
from ._util import (arg, cint, i64s, keep_for_stream, launch_stream, on_device, output, ptr, raw_output, same_device,
                    torch_or_none)
from .dlpack import DLPackError, dtype

__all__ = ["SCALE_F32_ROW", "SCALE_F32_MMAJOR", "SCALE_UE8M0_ROW", "SCALE_UE8M0_MMAJOR", "F32", "BF16", "FP8_E4M3",
           "GROUP", "FP8_E4M3_MAX", "cuda_available",
           "fp8_from_float", "fp8_to_float", "bf16_from_float", "bf16_to_float", "ue8m0_from_float", "ue8m0_to_float",
           "int4_pack", "int4_unpack", "scale_bytes", "scale_offset", "scale_shape", "scale_dtypes",
           "cast_group_fp8", "cast_tensor_fp8", "requant_fp8", "dequant_fp8"]

SCALE_F32_ROW, SCALE_F32_MMAJOR, SCALE_UE8M0_ROW, SCALE_UE8M0_MMAJOR = 0, 1, 2, 3
_SCALE_FMTS = {"f32_row": 0, "f32_mmajor": 1, "ue8m0_row": 2, "ue8m0_mmajor": 3}
F32, BF16, FP8_E4M3 = 0, 1, 2
GROUP = 128
FP8_E4M3_MAX = 448.0

_BF16 = ("uint16", "bfloat16")  # the first is what a new host output gets
_FP8 = ("uint8", "float8_e4m3fn")
_FP8_OUT_GPU = ("float8_e4m3fn", "uint8")  # a new torch output gets the real fp8 type


def cuda_available():
    """True when this libepmoe has CUDA kernels and sees a GPU."""
    return lib.epmoe_cuda_device_count() > 0


def _fmt(scale_fmt):
    """A scale format from its SCALE_* number or its name ("f32_row", "ue8m0_mmajor", ...)."""
    if isinstance(scale_fmt, str):
        try:
            return _SCALE_FMTS[scale_fmt.lower()]
        except KeyError:
            raise ValueError(f"scale_fmt {scale_fmt!r}: expected one of {', '.join(_SCALE_FMTS)}") from None
    return cint(scale_fmt, "scale_fmt")


# ---- element conversions (host) -----------------------------------------------------------------
def _host_only(t, what):
    if not t.is_host:
        raise DLPackError(f"{what} runs on the host; the tensor is on {t.device_name}")


def _convert(fn, x, out, in_dtypes, out_dtypes, what):
    if x is None:
        raise TypeError(f"{what}: x is required")
    if not hasattr(x, "__dlpack__") and not isinstance(x, np.ndarray):
        x = np.asarray(x, dtype=np.dtype(in_dtypes[0]))  # lists and scalars
    xt = arg(x, "x", in_dtypes)
    _host_only(xt, what)
    res, yt = output(out, "out", xt.shape, out_dtypes, xt)
    # the row functions check nothing (they are the library's scalar primitives): in place would
    # read what they already wrote
    xa, ya = xt.data_ptr or 0, yt.data_ptr or 0
    if xt.size and xa < ya + yt.nbytes and ya < xa + xt.nbytes:
        raise _lib.error(_lib.ERR_INVALID_ARG, f"{what}: out overlaps x")
    fn(ptr(xt), ptr(yt), xt.size)
    return res


def fp8_from_float(x, out=None):
    """float32 -> fp8 e4m3fn bytes: round to nearest even, saturating to +-448, NaN -> 0x7F."""
    return _convert(lib.epmoe_fp8_e4m3_from_float_row, x, out, ("float32",), _FP8, "fp8_from_float")


def fp8_to_float(x, out=None):
    """fp8 e4m3fn bytes -> float32 (exact)."""
    return _convert(lib.epmoe_fp8_e4m3_to_float_row, x, out, _FP8, ("float32",), "fp8_to_float")


def bf16_from_float(x, out=None):
    """float32 -> bf16 bit patterns (round to nearest even, NaN kept quiet)."""
    return _convert(lib.epmoe_bf16_from_float_row, x, out, ("float32",), _BF16, "bf16_from_float")


def bf16_to_float(x, out=None):
    """bf16 bit patterns -> float32 (exact)."""
    return _convert(lib.epmoe_bf16_to_float_row, x, out, _BF16, ("float32",), "bf16_to_float")


def ue8m0_from_float(pow2_scale):
    """A power-of-two scale -> its UE8M0 byte (the exponent field, as DeepEP stores it). Anything
    else (3.0, 0, a negative) is refused: the C primitive would return the exponent field of it."""
    v = float(pow2_scale)
    if not math.isnan(v) and not (2.0 ** -127 <= v <= 2.0 ** 127 and math.frexp(v)[0] == 0.5):
        raise ValueError(f"ue8m0_from_float: {pow2_scale!r} is not a power of two in [2^-127, 2^127] (or NaN)")
    return int(lib.epmoe_ue8m0_from_float(v))


def ue8m0_to_float(b):
    """A UE8M0 byte -> 2^(b-127); 0xFF is NaN."""
    return float(lib.epmoe_ue8m0_to_float(cint(b, "ue8m0_to_float: b", ctypes.c_uint8)))


def int4_pack(vals, out=None):
    """int8 values in [-8, 7], [..., n] with n even -> uint8 [..., n/2]: element 2j in the low
    nibble of byte j (the W4AFP8 checkpoint layout)."""
    vt = arg(vals, "vals", ("int8",))
    _host_only(vt, "int4_pack")
    if vt.ndim == 0 or vt.shape[-1] % 2:
        raise ValueError(f"int4_pack: the last dimension must be even (two values per byte), got shape {vt.shape}")
    res, pt = output(out, "out", vt.shape[:-1] + (vt.shape[-1] // 2,), ("uint8", "int8"), vt)
    check(lib.epmoe_int4_pack(ptr(vt), vt.size, ptr(pt)))
    return res


def int4_unpack(packed, out=None):
    """uint8 [..., m] -> int8 [..., 2m], the inverse of int4_pack."""
    pt = arg(packed, "packed", ("uint8", "int8"))
    _host_only(pt, "int4_unpack")
    if pt.ndim == 0:
        raise ValueError("int4_unpack: needs at least one dimension")
    res, vt = output(out, "out", pt.shape[:-1] + (pt.shape[-1] * 2,), ("int8",), pt)
    check(lib.epmoe_int4_unpack(ptr(pt), pt.size * 2, ptr(vt)))
    return res


# ---- scale layouts -------------------------------------------------------------------------------
def scale_bytes(scale_fmt, M, K):
    """Bytes of one [M, K] slab's group scales (0 for an invalid format, M < 0, K % 128 != 0 or
    M * K past 2^46)."""
    return int(lib.epmoe_scale_bytes(_fmt(scale_fmt), *i64s(M=M, K=K)))


def scale_offset(scale_fmt, M, K, t, g):
    """Byte offset of scale (row t, group g) inside one slab; ValueError where the library says
    SIZE_MAX (an invalid layout, or (t, g) outside the slab)."""
    off = int(lib.epmoe_scale_offset(_fmt(scale_fmt), *i64s(M=M, K=K, t=t, g=g)))
    if off == (1 << (8 * ctypes.sizeof(ctypes.c_size_t))) - 1:
        raise ValueError(f"scale_offset: ({t}, {g}) is outside an [{M}, {K}] slab, or the layout is invalid")
    return off


def scale_shape(scale_fmt, M, K):
    """(shape, dtype name) of one slab's scales as epmoe hands them out:
    F32_ROW float32 [M, G]; F32_MMAJOR float32 [G, M]; UE8M0_ROW uint8 [M, 4P];
    UE8M0_MMAJOR int32 [P, M] (4 one-byte scales per word); G = K/128, P = ceil(G/4)."""
    fmt = _fmt(scale_fmt)
    G = K // GROUP
    P = (G + 3) // 4
    shapes = {SCALE_F32_ROW: ((M, G), "float32"), SCALE_F32_MMAJOR: ((G, M), "float32"),
              SCALE_UE8M0_ROW: ((M, 4 * P), "uint8"), SCALE_UE8M0_MMAJOR: ((P, M), "int32")}
    if fmt not in shapes:
        raise ValueError(f"scale_fmt {scale_fmt} is not one of SCALE_F32_ROW/F32_MMAJOR/UE8M0_ROW/UE8M0_MMAJOR")
    return shapes[fmt]


def scale_dtypes(scale_fmt):
    """The element types a buffer of scale_fmt's scales may have: float32 for the fp32 layouts; for
    UE8M0, whose layouts are bytes, any 8- or 32-bit integer type (DeepEP's int32 words among them);
    and uint8 for every layout, as the raw bytes of a slab. Anything else (float64 values, say)
    would be read or written as other bits: refused."""
    fmt = _fmt(scale_fmt)
    if fmt in (SCALE_F32_ROW, SCALE_F32_MMAJOR):
        return ("float32", "uint8")
    if fmt in (SCALE_UE8M0_ROW, SCALE_UE8M0_MMAJOR):
        return ("uint8", "int8", "int32", "uint32")
    return ()  # not a format: the library's own check says so


def _scales_out(scales, fmt, E, M, K, like, stream, *, batched):
    shape, dt = scale_shape(fmt, M, K)
    need = E * scale_bytes(fmt, M, K)
    return raw_output(scales, "scales", need, like, stream=stream, shape=((E,) + shape) if batched else shape, dt=dt,
                      dtypes=scale_dtypes(fmt))


def _scales_in(scales, fmt, E, M, K, like, stream):
    st = arg(scales, "scales", scale_dtypes(fmt), stream=stream)
    need = E * scale_bytes(fmt, M, K)
    if st.nbytes < need:
        raise ValueError(f"scales: {st.nbytes} bytes, {E} slab(s) of format {fmt} for [{M}, {K}] need {need}")
    return st


def _scalar_scale(s, name, like, stream):
    """A per-tensor scale: a float, or one float32 element where the op reads it (the GPU for _cuda,
    so that a CUDA graph can capture the call and a new value be written between replays)."""
    if isinstance(s, (int, float, np.floating)):
        if like.is_host:
            s = np.array([s], dtype=np.float32)
        else:
            torch = torch_or_none()
            if torch is None:
                raise TypeError(f"{name}: on the GPU pass a one-element float32 device tensor")
            s = torch.tensor([float(s)], dtype=torch.float32, device=f"cuda:{like.device[1]}")
            keep_for_stream(s, stream, like.device[1])
    t = arg(s, name, ("float32",), stream=stream)
    if t.size < 1:
        raise ValueError(f"{name}: needs one float32 element")
    return s, t


def _check_k(K, what):
    if K % GROUP:
        raise ValueError(f"{what}: the last dimension K = {K} must be a multiple of {GROUP}")


# ---- quantization ops ---------------------------------------------------------------------------
def cast_group_fp8(x, scale_fmt=SCALE_F32_ROW, round_scale=False, *, out=None, scales=None, stream=None):
    """Per-token-group fp8 cast (DeepEP's low-latency cast): bf16 x[..., K] -> (q fp8 [..., K],
    scales). Per group of 128 channels: amax = max(|x|, 1e-4), scale = amax/448 is stored,
    q = satfinite(x * 448/amax); round_scale rounds the scale up to a power of two (required by
    the UE8M0 formats). Scales come back shaped as scale_shape(scale_fmt, M, K) with M the
    number of rows (all leading dimensions); a caller's `scales` may be any contiguous buffer of
    scale_bytes(...) bytes."""
    fmt = _fmt(scale_fmt)
    s = launch_stream((x,), stream)
    xt = arg(x, "x", _BF16, stream=s)
    if xt.ndim < 1:
        raise ValueError("cast_group_fp8: x needs at least one dimension")
    K = xt.shape[-1]
    M = xt.size // K if K else 0
    q, qt = output(out, "out", xt.shape, _FP8 if xt.is_host else _FP8_OUT_GPU, xt, stream=s)
    sc, st = _scales_out(scales, fmt, 1, M, K, xt, s, batched=False)
    same_device([("x", xt), ("out", qt), ("scales", st)], "cast_group_fp8")
    if xt.is_host:
        check(lib.epmoe_cast_group_fp8_ref(ptr(xt), M, K, ptr(qt), ptr(st), fmt, int(bool(round_scale))))
    else:
        with on_device(xt):
            check(lib.epmoe_cast_group_fp8_cuda(ptr(xt), M, K, ptr(qt), ptr(st), fmt, int(bool(round_scale)), s))
    return q, sc


def cast_tensor_fp8(x, scale, *, out=None, stream=None):
    """Per-tensor fp8 cast: q = satfinite(x * (1/scale)), the reciprocal taken once in fp32.
    `scale`: a float or a one-element float32 tensor (on the GPU for GPU inputs)."""
    s = launch_stream((x, scale), stream)
    xt = arg(x, "x", _BF16, stream=s)
    _, sct = _scalar_scale(scale, "scale", xt, s)
    q, qt = output(out, "out", xt.shape, _FP8 if xt.is_host else _FP8_OUT_GPU, xt, stream=s)
    same_device([("x", xt), ("scale", sct), ("out", qt)], "cast_tensor_fp8")
    if xt.is_host:
        check(lib.epmoe_cast_tensor_fp8_ref(ptr(xt), xt.size, ptr(sct), ptr(qt)))
    else:
        with on_device(xt):
            check(lib.epmoe_cast_tensor_fp8_cuda(ptr(xt), xt.size, ptr(sct), ptr(qt), s))
    return q


def _ekm(qt, what):
    """(E, M, K) of a [E, M, K] or [M, K] fp8 tensor."""
    if qt.ndim == 3:
        E, M, K = qt.shape
    elif qt.ndim == 2:
        (M, K), E = qt.shape, 1
    else:
        raise ValueError(f"{what}: q must be [E, M, K] or [M, K], got shape {qt.shape}")
    _check_k(K, what)
    return E, M, K


def _masked(masked_m, E, like, stream, required):
    if masked_m is None and not required:
        return None
    mt = arg(masked_m, "masked_m", ("int32",), stream=stream)
    if mt.size != E:
        raise ValueError(f"masked_m: needs {E} int32 counts (one per expert), got shape {mt.shape}")
    return mt


def requant_fp8(q, scales, scale_fmt, masked_m, out_scale, *, out=None, stream=None):
    """Group -> per-tensor requant (the op of SGLang PR #22316): for expert e and row
    t < masked_m[e], y[e, t] = satfinite(fp8(q[e, t]) * s[e](t, k/128) / out_scale). Rows at or
    past masked_m[e] are not written (zeros in a new output)."""
    fmt = _fmt(scale_fmt)
    s = launch_stream((q, scales, masked_m), stream)
    qt = arg(q, "q", _FP8, stream=s)
    E, M, K = _ekm(qt, "requant_fp8")
    st = _scales_in(scales, fmt, E, M, K, qt, s)
    mt = _masked(masked_m, E, qt, s, True)
    _, ost = _scalar_scale(out_scale, "out_scale", qt, s)
    y, yt = output(out, "out", qt.shape, _FP8 if qt.is_host else _FP8_OUT_GPU, qt, stream=s, zero=True)
    same_device([("q", qt), ("scales", st), ("masked_m", mt), ("out_scale", ost), ("out", yt)], "requant_fp8")
    if qt.is_host:
        check(lib.epmoe_requant_fp8_ref(ptr(qt), ptr(st), fmt, ptr(mt), E, M, K, ptr(ost), ptr(yt)))
    else:
        with on_device(qt):
            check(lib.epmoe_requant_fp8_cuda(ptr(qt), ptr(st), fmt, ptr(mt), E, M, K, ptr(ost), ptr(yt), s))
    return y


def _dequant_dtype(out_dtype):
    """F32 or BF16 from a code or any dtype-like: "float32", np.float32, torch.bfloat16, "bf16"."""
    if isinstance(out_dtype, int) and out_dtype in (F32, BF16):
        return out_dtype
    try:
        name = "bfloat16" if isinstance(out_dtype, str) and out_dtype == "bf16" else dtype(out_dtype).name
    except TypeError:
        name = None
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"dequant_fp8: out_dtype {out_dtype!r} must be float32 or bfloat16")
    return F32 if name == "float32" else BF16


def dequant_fp8(q, scales, scale_fmt, masked_m=None, out_dtype="float32", *, out=None, stream=None):
    """y[e, t, k] = fp8(q[e, t, k]) * s[e](t, k/128) in fp32, stored as float32 or bfloat16.
    masked_m (int32 [E]) limits the rows; None converts every row."""
    fmt = _fmt(scale_fmt)
    odt = _dequant_dtype(out_dtype)
    s = launch_stream((q, scales, masked_m), stream)
    qt = arg(q, "q", _FP8, stream=s)
    E, M, K = _ekm(qt, "dequant_fp8")
    st = _scales_in(scales, fmt, E, M, K, qt, s)
    mt = _masked(masked_m, E, qt, s, False)
    out_dtypes = ("float32",) if odt == F32 else (_BF16 if qt.is_host else ("bfloat16", "uint16"))
    y, yt = output(out, "out", qt.shape, out_dtypes, qt, stream=s, zero=mt is not None)
    same_device([("q", qt), ("scales", st), ("masked_m", mt), ("out", yt)], "dequant_fp8")
    if qt.is_host:
        check(lib.epmoe_dequant_fp8_ref(ptr(qt), ptr(st), fmt, ptr(mt), E, M, K, odt, ptr(yt)))
    else:
        with on_device(qt):
            check(lib.epmoe_dequant_fp8_cuda(ptr(qt), ptr(st), fmt, ptr(mt), E, M, K, odt, ptr(yt), s))
    return y

