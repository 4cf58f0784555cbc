"""Expert weights of the bf16, w8a8_fp8_block and w4a16 schemes (include/epmoe.h, "expert GEMM and
MLP of the bf16, w8a8-fp8-block and w4a16 schemes"), read in their checkpoint layouts, no repack:

    e13 = ExpertWeights("bf16", w13)                     # bf16 [E, N, K]
    e13 = ExpertWeights("fp8_block", w13, scale_inv)      # fp8 [E, N, K] + float32 [E, N/128, K/128]
    e13 = ExpertWeights("int4", packed, scales)           # int8 [E, N, K/2] + float32 [E, N, K/group]
    with g.layer(weights=(e13, e2), scheme="w4a16") as layer: ...
    y = epmoe.experts.mlp(e13, e2, x, masked_m, x_scales, "f32_mmajor")   # or on their own

int4 is signed, two per byte along K, even k in the low nibble (epmoe.int4_pack); the group (32 or
128) follows from the scales' shape. The arrays live where the calls that read them run (numpy
for the CPU backend, device tensors for NCCL groups) and are kept, not copied.

`gemm` and `mlp` run the masked grouped expert GEMM and MLP of these formats outside a layer (as
epmoe.w4a8's do for W4A8), e.g. on what epmoe.deep_ep.Buffer.low_latency_dispatch delivers: host
arrays run the `_ref` entry points (fp64 accumulation, the specification), CUDA tensors the kernels
on `stream` (default: torch's current stream). Activations: fp8 [E, M, K] with 1x128 scales for
"fp8_block" weights, bf16 [E, M, K] for "bf16" and "int4".
"""
import ctypes
import numbers

from . import _gemm
from ._lib import lib
from ._util import arg, copy_to, i64s, launch_stream, on_device, output, ptr, same_device

__all__ = ["ExpertWeights", "FORMATS", "gemm", "mlp", "mlp_workspace_bytes", "release_workspaces"]

FORMATS = {"bf16": 0, "fp8_block": 1, "int4": 2}
_FORMAT_NAMES = {v: k for k, v in FORMATS.items()}
_DATA_DTYPES = {0: ("uint16", "bfloat16"), 1: ("uint8", "float8_e4m3fn"), 2: ("int8", "uint8")}


class _ExpertWeightsC(ctypes.Structure):  # epmoe_expert_weights
    _fields_ = [("format", ctypes.c_int), ("E", ctypes.c_int64), ("N", ctypes.c_int64), ("K", ctypes.c_int64),
                ("group", ctypes.c_int64), ("data", ctypes.c_void_p), ("scales", ctypes.c_void_p)]


class ExpertWeights:
    """One weight matrix [E, N, K] of format "bf16", "fp8_block" or "int4" (epmoe_expert_weights).
    Shapes are checked here; the values of E, N, K and the group are the library's to judge."""

    def __init__(self, format, data, scales=None):
        code = _format_code(format)
        dt = arg(data, "data", _DATA_DTYPES[code], ndim=3)
        E, N, K = dt.shape[0], dt.shape[1], dt.shape[2] * (2 if code == 2 else 1)
        st, group = None, 0
        if code != 0:
            st = arg(scales, "scales", ("float32",), ndim=3)
            want = (E, N // 128, K // 128) if code == 1 else (E, N)
            if tuple(st.shape[:len(want)]) != want or st.shape[2] == 0 or (code == 2 and K % st.shape[2]):
                raise ValueError(f"scales: shape {st.shape} does not fit {_FORMAT_NAMES[code]} data {dt.shape}")
            group = K // st.shape[2] if code == 2 else 0
            same_device([("data", dt), ("scales", st)], "ExpertWeights")
        elif scales is not None:
            raise ValueError("bf16 weights have no scales")
        self.format, self.E, self.N, self.K, self.group = code, E, N, K, group
        self.data, self.scales = data, scales
        self._dt, self._st = dt, st

    @property
    def format_name(self):
        return _FORMAT_NAMES[self.format]

    @property
    def shape(self):
        return (self.E, self.N, self.K)

    @property
    def device(self):
        """(DLPack device type, id) of the arrays."""
        return self._dt.device

    @property
    def device_name(self):
        return self._dt.device_name

    @property
    def is_host(self):
        return self._dt.is_host

    def __repr__(self):
        g = f" g{self.group}" if self.format == 2 else ""
        return f"<epmoe.ExpertWeights {self.format_name}{g} [{self.E}, {self.N}, {self.K}] on {self.device_name}>"

    def to(self, device, *, non_blocking=False):
        """A copy on `device` ("cuda", "cuda:1", a torch.device, "cpu"). Needs torch."""
        def move(obj):
            return copy_to(obj, device, non_blocking=non_blocking, what="ExpertWeights.to")

        return ExpertWeights(self.format, move(self.data), move(self.scales))

    def _c(self):
        return _ExpertWeightsC(self.format, self.E, self.N, self.K, self.group, ptr(self._dt),
                               ptr(self._st) if self._st is not None else None)


# ---- the GEMM and the MLP ----------------------------------------------------------------------------
class _GemmArgsC(ctypes.Structure):  # epmoe_expert_gemm_args
    _fields_ = [("w", _ExpertWeightsC), ("a", ctypes.c_void_p), ("M", ctypes.c_int64), ("masked_m", ctypes.c_void_p),
                ("a_scales", ctypes.c_void_p), ("a_scale_fmt", ctypes.c_int), ("out", ctypes.c_void_p),
                ("out_row_stride", ctypes.c_int64), ("out_expert_stride", ctypes.c_int64),
                ("expected_m", ctypes.c_int64)]


class _MlpArgsC(ctypes.Structure):  # epmoe_expert_mlp_args
    _fields_ = [("w13", _ExpertWeightsC), ("w2", _ExpertWeightsC), ("a", ctypes.c_void_p), ("M", ctypes.c_int64),
                ("masked_m", ctypes.c_void_p), ("a_scales", ctypes.c_void_p), ("a_scale_fmt", ctypes.c_int),
                ("workspace", ctypes.c_void_p), ("workspace_bytes", ctypes.c_size_t), ("out", ctypes.c_void_p),
                ("out_row_stride", ctypes.c_int64), ("out_expert_stride", ctypes.c_int64),
                ("expected_m", ctypes.c_int64)]


def mlp_workspace_bytes(format, E, M, H, I):
    """epmoe_expert_mlp_workspace: the bytes of mlp's workspace (0 for sizes the library refuses)."""
    code = _format_code(format)
    return int(lib.epmoe_expert_mlp_workspace(code, *i64s(E=E, M=M, H=H, I=I)))


def release_workspaces():
    """Drop the cached GPU workspaces, of epmoe.w4a8 too (the next call on each device allocates again)."""
    _gemm.release_workspaces()


def _format_code(format):
    code = FORMATS.get(format) if isinstance(format, str) else format
    if isinstance(code, bool) or not isinstance(code, numbers.Integral) or int(code) not in _FORMAT_NAMES:
        raise ValueError(f"format {format!r}: expected one of {', '.join(FORMATS)}")
    return int(code)


def _weights(w, name):
    if not isinstance(w, ExpertWeights):
        raise TypeError(f"{name} must be ExpertWeights, got {type(w).__name__}")


def _inputs(w, a, masked_m, a_scales, scale_fmt, s):
    """(activations Tensor, E, M, scale format code, scales Tensor or None, masked_m (keep-alive, Tensor))."""
    fp8 = w.format == FORMATS["fp8_block"]
    at, E, M = _gemm.acts(a, w, "a", s, _gemm.FP8 if fp8 else _gemm.BF16_GPU)
    fmt, st = 0, None
    if fp8:
        if a_scales is None:
            raise ValueError("a_scales: fp8_block weights take fp8 activations with their 1x128 scales")
        fmt, st = _gemm.group_scales(a_scales, scale_fmt, E, M, w.K, s)
    elif a_scales is not None:
        raise ValueError(f"a_scales: {w.format_name} weights take bf16 activations, which have no scales")
    return at, E, M, fmt, st, _gemm.masked_m(masked_m, E, M, at, s)


def gemm(w, a, masked_m=None, a_scales=None, scale_fmt="f32_row", *, out=None, expected_m=0, stream=None):
    """Masked grouped GEMM (epmoe_expert_gemm): out[e, m, n] = sum_k a[e, m, k] * w[e, n, k], with the
    weights' scales (and for fp8_block the activations' 1x128 scales) applied per group, for rows
    m < masked_m[e] (int32 [E], None = all M rows); bf16 [E, M, N], rows past masked_m not written
    (zeros in a new `out`).

    a: bf16 [E, M, K] (uint16 bits or bfloat16) for "bf16" and "int4" weights; fp8 [E, M, K] (uint8
    bits or float8_e4m3fn) for "fp8_block", with `a_scales` in `scale_fmt` (as epmoe.w4a8.gemm takes
    them, DeepEP's transposed scale tensors included). [M, K] when E = 1. expected_m: the typical
    rows per expert (0: M), which picks the kernel's token tile."""
    _weights(w, "w")
    s = launch_stream((a, a_scales, masked_m), stream)
    at, E, M, fmt, st, (_, mt) = _inputs(w, a, masked_m, a_scales, scale_fmt, s)
    _gemm.weights_place(w, "w", at)
    res, ot = output(out, "out", (E, M, w.N) if at.ndim == 3 else (M, w.N),
                     _gemm.BF16_HOST if at.is_host else _gemm.BF16_GPU, at, stream=s, zero=True)
    same_device([("a", at), ("a_scales", st), ("masked_m", mt), ("out", ot)], "gemm")
    g = _GemmArgsC(w._c(), ptr(at), M, ptr(mt), ptr(st), fmt, ptr(ot), w.N, M * w.N, *i64s(expected_m=expected_m))
    with on_device(at):
        _gemm.run(at, lib.epmoe_expert_gemm_ref, lib.epmoe_expert_gemm_cuda, g, s)
    return res


def mlp(w13, w2, a, masked_m=None, a_scales=None, scale_fmt="f32_row", *, out=None, expected_m=0, workspace=None,
        stream=None):
    """Expert MLP (epmoe_expert_mlp): out = W2 . act(silu(gate) * up), [gate | up] = W13 . a, per
    expert, rows m < masked_m[e]; bf16 [E, M, H]. w13: [E, 2I, H] (rows [0, I) gate, [I, 2I) up),
    w2: [E, H, I], both of one format; a as in `gemm` (K = H). The intermediate is rounded to bf16,
    and for fp8_block cast to fp8 with fresh 1x128 scales. The workspace
    (mlp_workspace_bytes(format, E, M, H, I)) is made per call on the host and cached per device on
    the GPU (one buffer serves the calls of one stream at a time: concurrent streams pass their own
    `workspace=`, 256-byte aligned)."""
    _weights(w13, "w13")
    _weights(w2, "w2")
    s = launch_stream((a, a_scales, masked_m), stream)
    at, E, M, fmt, st, (_, mt) = _inputs(w13, a, masked_m, a_scales, scale_fmt, s)
    _gemm.weights_place(w13, "w13", at)
    _gemm.weights_place(w2, "w2", at)
    H, I = w13.K, w2.K
    res, ot = output(out, "out", (E, M, w2.N) if at.ndim == 3 else (M, w2.N),
                     _gemm.BF16_HOST if at.is_host else _gemm.BF16_GPU, at, stream=s, zero=True)
    same_device([("a", at), ("a_scales", st), ("masked_m", mt), ("out", ot)], "mlp")
    with on_device(at):
        nbytes = int(lib.epmoe_expert_mlp_workspace(w13.format, E, M, H, I))
        _, wst = _gemm.workspace("experts", workspace, nbytes, at, s)
        m = _MlpArgsC(w13._c(), w2._c(), ptr(at), M, ptr(mt), ptr(st), fmt, ptr(wst),
                      wst.nbytes if wst is not None else 0, ptr(ot), w2.N, M * w2.N, *i64s(expected_m=expected_m))
        _gemm.run(at, lib.epmoe_expert_mlp_ref, lib.epmoe_expert_mlp_cuda, m, s)
    return res
