"""W4A8 expert GEMM and MLP (include/epmoe.h, "W4A8 expert GEMM and MLP"): int4 g128 weights x
fp8 activations -> bf16.

    w13 = epmoe.w4a8.repack(ckpt_w13, ckpt_s13)     # checkpoint int8 [E, 2I, H/2] + scales [E, 2I, H/128]
    w2 = epmoe.w4a8.repack(ckpt_w2, ckpt_s2)        # [E, H, I/2] + [E, H, I/128]
    y = epmoe.w4a8.mlp(w13, w2, a, masked_m, a_scales, "f32_mmajor")   # numpy: the CPU reference
    w13g, w2g = w13.to("cuda"), w2.to("cuda")        # torch: the kernels on torch's current stream

Weights are repacked once, on the host, into the layout the kernel reads (W4A8Weights). Host
arguments run the `_ref` entry points (fp64 accumulation, the specification); CUDA tensors run
the `_cuda` kernels on `stream` (default: torch's current stream), with the workspace they need
allocated, zeroed once and kept per device (see `gemm`).

Activation scales, one of two modes, as in the C API:
  (a) `a_scales` + `scale_fmt`: per-token 1x128 group scales, E slabs in any epmoe scale layout
      (what dispatch delivers);
  (b) `a_tensor_scale` (and for the MLP `a2_tensor_scale`): static per-tensor scales, a float or
      a one-element float32 tensor where the call runs (the GPU for _cuda: graph-capturable).
"""
import ctypes

import numpy as np

from . import _gemm
from ._lib import check, lib
from ._util import arg, cint, copy_to, i64s, launch_stream, on_device, output, ptr, same_device
from .dlpack import DLPackError
from .formats import BF16, F32, GROUP, _scalar_scale

__all__ = ["W4A8Weights", "repack", "repack_size", "unpack", "gemm", "mlp", "gemm_workspace_bytes",
           "mlp_workspace_bytes", "release_workspaces", "ENC_AUTO", "ENC_SYM7", "ENC_FULL"]

ENC_AUTO, ENC_SYM7, ENC_FULL = -1, 0, 1
_ENCODINGS = {"auto": ENC_AUTO, "sym7": ENC_SYM7, "full": ENC_FULL}
_ENC_NAMES = {ENC_SYM7: "sym7", ENC_FULL: "full"}

_BF16_HOST, _BF16_GPU, _FP8 = _gemm.BF16_HOST, _gemm.BF16_GPU, _gemm.FP8


# ---- C structs (mirrors of include/epmoe.h) ---------------------------------------------------------
class _WeightsC(ctypes.Structure):
    _fields_ = [("E", ctypes.c_int64), ("N", ctypes.c_int64), ("K", ctypes.c_int64), ("encoding", ctypes.c_int),
                ("qweight", ctypes.c_void_p), ("scales", ctypes.c_void_p)]


class _GemmArgsC(ctypes.Structure):
    _fields_ = [("w", _WeightsC), ("a", ctypes.c_void_p), ("M", ctypes.c_int64), ("masked_m", ctypes.c_void_p),
                ("a_scales", ctypes.c_void_p), ("a_scale_fmt", ctypes.c_int), ("a_tensor_scale", ctypes.c_void_p),
                ("out", ctypes.c_void_p), ("out_row_stride", ctypes.c_int64), ("out_expert_stride", ctypes.c_int64),
                ("expected_m", ctypes.c_int64), ("workspace", ctypes.c_void_p), ("workspace_bytes", ctypes.c_size_t)]


class _MlpArgsC(ctypes.Structure):
    _fields_ = [("w13", _WeightsC), ("w2", _WeightsC), ("a", ctypes.c_void_p), ("M", ctypes.c_int64),
                ("masked_m", ctypes.c_void_p), ("a_scales", ctypes.c_void_p), ("a_scale_fmt", ctypes.c_int),
                ("a_tensor_scale", ctypes.c_void_p), ("a2_tensor_scale", ctypes.c_void_p),
                ("workspace", ctypes.c_void_p), ("workspace_bytes", ctypes.c_size_t), ("out", ctypes.c_void_p),
                ("out_row_stride", ctypes.c_int64), ("out_expert_stride", ctypes.c_int64),
                ("expected_m", ctypes.c_int64)]


def _encoding(enc, *, allow_auto):
    if isinstance(enc, str):
        try:
            code = _ENCODINGS[enc.lower()]
        except KeyError:
            raise ValueError(f"encoding {enc!r}: expected one of {', '.join(_ENCODINGS)}") from None
    else:
        code = cint(enc, "encoding")
    allowed = (ENC_AUTO, ENC_SYM7, ENC_FULL) if allow_auto else (ENC_SYM7, ENC_FULL)
    if code not in allowed:
        raise ValueError(f"encoding {enc!r}: expected {' or '.join(n for n, c in _ENCODINGS.items() if c in allowed)}")
    return code


def repack_size(E, N, K):
    """(qweight bytes, scale bytes) of a repacked [E, N, K] matrix (N, K multiples of 128)."""
    qb, sb = ctypes.c_size_t(), ctypes.c_size_t()
    check(lib.epmoe_w4a8_repack_size(*i64s(E=E, N=N, K=K), ctypes.byref(qb), ctypes.byref(sb)))
    return qb.value, sb.value


# ---- repacked weights ------------------------------------------------------------------------------
class W4A8Weights:
    """One repacked weight matrix [E, N, K] (epmoe_w4a8_weights).

    qweight   the kernel-layout nibbles, repack_size(E, N, K)[0] bytes (uint8)
    scales    bf16 [E, K/128, N] (uint16 bits; torch.bfloat16 accepted too): the checkpoint's group
              scales transposed, multiplied by a power of two the kernel folds in and rounded to
              bf16 (nearest even: exact from bf16 checkpoints, within 2^-8 from float32 ones);
              `unpack` gives them back in checkpoint units
    encoding  ENC_SYM7 (int4 in -7..7) or ENC_FULL (-8..7), as the repack chose (trusted: the other
              one of the two gives wrong results, not an error)

    Both arrays live where the calls that read them run: numpy for the CPU references and the CPU
    backend, device tensors (`to("cuda")`, needs torch) for the kernels and NCCL groups. Built by
    `repack`; the constructor takes arrays saved from an earlier repack.
    """

    def __init__(self, qweight, scales, E, N, K, encoding):
        self.E, self.N, self.K = (cint(v, n, ctypes.c_int64) for v, n in ((E, "E"), (N, "N"), (K, "K")))
        self.encoding = _encoding(encoding, allow_auto=False)
        qb, _ = repack_size(self.E, self.N, self.K)
        qt = arg(qweight, "qweight", ("uint8", "int8"))
        st = arg(scales, "scales", _BF16_HOST)
        if qt.nbytes != qb:
            raise ValueError(f"qweight: {qt.nbytes} bytes, a repacked [{E}, {N}, {K}] matrix has {qb}")
        # the shape, not only the size: checkpoint-order [E, N, K/128] scales have the same bytes
        if st.shape != (self.E, self.K // GROUP, self.N):
            raise ValueError(f"scales: shape {st.shape}; a repacked [{E}, {N}, {K}] matrix has bf16 scales "
                             f"[E, K/128, N] = [{E}, {K // GROUP}, {N}], as repack() makes them (checkpoint-order "
                             "[E, N, K/128] scales go to repack(ckpt_w, ckpt_scales))")
        same_device([("qweight", qt), ("scales", st)], "W4A8Weights")
        self.qweight, self.scales = qweight, scales
        self._qt, self._st = qt, st

    @property
    def encoding_name(self):
        return _ENC_NAMES[self.encoding]

    @property
    def shape(self):
        return (self.E, self.N, self.K)

    @property
    def device(self):
        """(DLPack device type, id) of the arrays."""
        return self._qt.device

    @property
    def device_name(self):
        return self._qt.device_name

    @property
    def is_host(self):
        return self._qt.is_host

    @property
    def nbytes(self):
        return self._qt.nbytes + self._st.nbytes

    def __repr__(self):
        return (f"<epmoe.w4a8.W4A8Weights [{self.E}, {self.N}, {self.K}] {self.encoding_name} on "
                f"{self._qt.device_name}>")

    def to(self, device, *, non_blocking=False):
        """A copy on `device` ("cuda", "cuda:1", a torch.device, "cpu"): torch tensors on a GPU,
        numpy arrays on the host. Needs torch."""
        def move(obj):
            return copy_to(obj, device, non_blocking=non_blocking, what="W4A8Weights.to")

        return W4A8Weights(move(self.qweight), move(self.scales), self.E, self.N, self.K, self.encoding)

    def _c(self):
        return _WeightsC(self.E, self.N, self.K, self.encoding, ptr(self._qt), ptr(self._st))

    def value(self, e, n, k):
        """(int4 value, its scale as repacked) of weight (e, n, k): epmoe_w4a8_unpack (host arrays)."""
        _need_host(self, "value")
        c, v, s = self._c(), ctypes.c_int(), ctypes.c_float()
        check(lib.epmoe_w4a8_unpack(ctypes.byref(c), *i64s(e=e, n=n, k=k), ctypes.byref(v), ctypes.byref(s)))
        return v.value, s.value


def _need_host(w, what):
    if not w.is_host:
        raise DLPackError(f"{what} reads the weights on the host; they are on {w._qt.device_name} "
                          "(w.to('cpu') copies them back)")


def repack(ckpt_w, ckpt_scales, encoding="auto"):
    """Checkpoint -> kernel layout, on the host (epmoe_w4a8_repack).

    ckpt_w       int8 [E, N, K/2]: signed int4, element 2j in the low nibble of byte j (W4AFP8)
    ckpt_scales  float32 or bfloat16 [E, N, K/128] (bf16 as torch.bfloat16 or uint16 bits)
    encoding     "auto" (SYM7 when no weight is -8, else FULL), "sym7" (an error if a -8 is
                 present) or "full"
    N and K must be multiples of 128 and the group 128 (another group size is Unsupported).
    Returns W4A8Weights with numpy arrays."""
    enc = _encoding(encoding, allow_auto=True)
    wt = arg(ckpt_w, "ckpt_w", ("int8", "uint8"), ndim=3)
    st = arg(ckpt_scales, "ckpt_scales", ("float32", "bfloat16", "uint16"), ndim=3)
    for name, t in (("ckpt_w", wt), ("ckpt_scales", st)):
        if not t.is_host:
            raise DLPackError(f"repack runs on the host; {name} is on {t.device_name} (repack once, then .to(device))")
    E, N, K = wt.shape[0], wt.shape[1], 2 * wt.shape[2]
    qb, _ = repack_size(E, N, K)  # the library's word on E, N and K first
    G = st.shape[2]
    if st.shape[:2] != (E, N) or G == 0 or K % G:
        raise ValueError(f"ckpt_scales: shape {st.shape} does not fit ckpt_w {wt.shape}: expected [{E}, {N}, K/group] "
                         f"with K = {K}")
    qweight = _gemm.host_buffer(qb, np.uint8, (qb,))
    scales = _gemm.host_buffer(E * (K // GROUP) * N * 2, np.uint16, (E, K // GROUP, N))  # bf16 bits
    c_enc = ctypes.c_int(enc)
    check(lib.epmoe_w4a8_repack(ptr(wt), ptr(st), F32 if st.dtype.name == "float32" else BF16, K // G, E, N, K,
                                ptr(arg(qweight, "qweight", ())), ptr(arg(scales, "scales", ())),
                                ctypes.byref(c_enc)))
    return W4A8Weights(qweight, scales, E, N, K, c_enc.value)


def unpack(w):
    """The checkpoint values back from repacked host weights: (int8 values [E, N, K], float32 scales
    [E, N, K/128] as repacked, bf16(s * 512) / 512). One epmoe_w4a8_unpack call per weight, so it is
    meant for tests and tools on small matrices; int4_pack(values) gives the checkpoint's packed bytes."""
    _weights_type(w, "w")
    _need_host(w, "unpack")
    E, N, K = w.shape
    values = np.empty((E, N, K), np.int8)
    scales = np.empty((E, N, K // GROUP), np.float32)
    c, v, s = w._c(), ctypes.c_int(), ctypes.c_float()
    fn, cref, vref, sref = lib.epmoe_w4a8_unpack, ctypes.byref(c), ctypes.byref(v), ctypes.byref(s)
    flat_v, flat_s = values.reshape(-1), scales.reshape(-1)
    i = 0
    for e in range(E):
        for n in range(N):
            for k in range(K):
                check(fn(cref, e, n, k, vref, sref))
                flat_v[i] = v.value
                i += 1
                if k % GROUP == 0:
                    flat_s[(e * N + n) * (K // GROUP) + k // GROUP] = s.value
    return values, scales


# ---- workspaces ------------------------------------------------------------------------------------
# One buffer per GPU, shared by gemm and mlp (_gemm.workspace, kind "w4a8"): zeroed once, it keeps
# the GEMM's launch counter.
_ws_cache = _gemm.ws_cache["w4a8"]


def gemm_workspace_bytes(device=None):
    """epmoe_w4a8_gemm_workspace() on a CUDA device (0 without CUDA)."""
    with _gemm.current(device):
        return int(lib.epmoe_w4a8_gemm_workspace())


def mlp_workspace_bytes(E, M, H, I, device=None):
    """epmoe_w4a8_mlp_workspace(E, M, H, I) on a CUDA device (the host references need it too)."""
    with _gemm.current(device):
        return int(lib.epmoe_w4a8_mlp_workspace(*i64s(E=E, M=M, H=H, I=I)))


def release_workspaces():
    """Drop the cached GPU workspaces, of epmoe.experts too (the next call on each device allocates
    and zeroes again)."""
    _gemm.release_workspaces()


def _weights_type(w, name):
    if not isinstance(w, W4A8Weights):
        raise TypeError(f"{name} must be W4A8Weights (from epmoe.w4a8.repack), got {type(w).__name__}")


# ---- the GEMM and the MLP ------------------------------------------------------------------------
def gemm(w, a, masked_m=None, a_scales=None, scale_fmt="f32_row", *, a_tensor_scale=None, out=None, expected_m=0,
         workspace=None, stream=None):
    """Masked grouped GEMM: out[e, m, n] = sum_g sa(e, m, g) * sw[e, n, g] * sum_k fp8(a[e, m, k]) * w[e, n, k]
    for m < masked_m[e] (int32 [E], None = all M rows), bf16 [E, M, N].

    a: fp8 [E, M, K] (uint8 bits or float8_e4m3fn). Scales: mode (a) `a_scales` in `scale_fmt`
    (SCALE_* or "f32_row", "f32_mmajor", "ue8m0_row", "ue8m0_mmajor"; DeepEP's low-latency scale
    tensors, [E, M, K/128] float32 or [E, M, K/512] int32 in its transposed strides, pass as they are
    with "f32_mmajor" / "ue8m0_mmajor"), or mode (b) `a_tensor_scale`. Rows past masked_m are not written (zeros in a new `out`).

    On the GPU the kernel needs a workspace (epmoe_w4a8_gemm_workspace() bytes, zeroed once: it
    holds a launch counter). By default one buffer per device is allocated at the first call and
    kept; it serves one GEMM at a time, so calls issued concurrently on several streams must each
    pass their own `workspace=` (256-byte aligned, zeroed once by the caller)."""
    _weights_type(w, "w")
    s = launch_stream((a, a_scales, masked_m, a_tensor_scale), stream)
    at, E, M = _gemm.acts(a, w, "a", s, _FP8)
    _gemm.weights_place(w, "w", at)
    st, fmt, tt = None, 0, None
    if a_scales is not None and a_tensor_scale is not None:
        raise ValueError("gemm: give a_scales (mode a) or a_tensor_scale (mode b), not both")
    if a_scales is not None:
        fmt, st = _gemm.group_scales(a_scales, scale_fmt, E, M, w.K, s)
    elif a_tensor_scale is not None:
        a_tensor_scale, tt = _scalar_scale(a_tensor_scale, "a_tensor_scale", at, s)
    mm, mt = _gemm.masked_m(masked_m, E, M, at, s)
    res, ot = output(out, "out", (E, M, w.N) if at.ndim == 3 else (M, w.N), _BF16_HOST if at.is_host else _BF16_GPU,
                     at, stream=s, zero=True)
    same_device([("a", at), ("a_scales", st), ("a_tensor_scale", tt), ("masked_m", mt), ("out", ot)], "gemm")
    g = _GemmArgsC(w._c(), ptr(at), M, ptr(mt), ptr(st), fmt, ptr(tt), ptr(ot), w.N, M * w.N,
                   *i64s(expected_m=expected_m), None, 0)
    if at.is_host:  # the reference needs no workspace
        check(lib.epmoe_w4a8_gemm_ref(ctypes.byref(g)))
        return res
    with on_device(at):
        _, wst = _gemm.workspace("w4a8", workspace, int(lib.epmoe_w4a8_gemm_workspace()), at, s)
        g.workspace, g.workspace_bytes = ptr(wst), wst.nbytes if wst is not None else 0
        check(lib.epmoe_w4a8_gemm_cuda(ctypes.byref(g), s))
    return res


def mlp(w13, w2, a, masked_m=None, a_scales=None, scale_fmt="f32_row", *, a_tensor_scale=None, a2_tensor_scale=None,
        out=None, expected_m=0, workspace=None, stream=None):
    """Expert MLP: out = W2 . fp8q(silu(gate) * up), [gate | up] = W13 . a, per expert, rows
    m < masked_m[e]; bf16 [E, M, H].

    w13: [E, 2I, H] (rows [0, I) gate, [I, 2I) up); w2: [E, H, I]; a: fp8 [E, M, H]. Mode (a):
    `a_scales` in `scale_fmt`, and the intermediate gets fresh 1x128 group scales; mode (b):
    `a_tensor_scale` and `a2_tensor_scale`, static per-tensor scales of the two GEMM inputs.
    The workspace (epmoe_w4a8_mlp_workspace bytes) is made per call on the host and cached per
    device on the GPU, shared with gemm (see gemm for concurrent streams)."""
    _weights_type(w13, "w13")
    _weights_type(w2, "w2")
    s = launch_stream((a, a_scales, masked_m, a_tensor_scale, a2_tensor_scale), stream)
    at, E, M = _gemm.acts(a, w13, "a", s, _FP8)
    _gemm.weights_place(w13, "w13", at)
    _gemm.weights_place(w2, "w2", at)
    H, I = w13.K, w2.K
    st, fmt, tt, t2 = None, 0, None, None
    if a_scales is not None and (a_tensor_scale is not None or a2_tensor_scale is not None):
        raise ValueError("mlp: give a_scales (mode a) or a_tensor_scale and a2_tensor_scale (mode b), not both")
    if a_scales is not None:
        fmt, st = _gemm.group_scales(a_scales, scale_fmt, E, M, H, s)
    if a_tensor_scale is not None:
        a_tensor_scale, tt = _scalar_scale(a_tensor_scale, "a_tensor_scale", at, s)
    if a2_tensor_scale is not None:
        a2_tensor_scale, t2 = _scalar_scale(a2_tensor_scale, "a2_tensor_scale", at, s)
    mm, mt = _gemm.masked_m(masked_m, E, M, at, s)
    res, ot = output(out, "out", (E, M, w2.N) if at.ndim == 3 else (M, w2.N), _BF16_HOST if at.is_host else _BF16_GPU,
                     at, stream=s, zero=True)
    same_device([("a", at), ("a_scales", st), ("a_tensor_scale", tt), ("a2_tensor_scale", t2), ("masked_m", mt),
                 ("out", ot)], "mlp")
    with on_device(at):
        _, wst = _gemm.workspace("w4a8", workspace, int(lib.epmoe_w4a8_mlp_workspace(E, M, H, I)), at, s)
        m = _MlpArgsC(w13._c(), w2._c(), ptr(at), M, ptr(mt), ptr(st), fmt, ptr(tt), ptr(t2), ptr(wst),
                      wst.nbytes if wst is not None else 0, ptr(ot), w2.N, M * w2.N, *i64s(expected_m=expected_m))
        _gemm.run(at, lib.epmoe_w4a8_mlp_ref, lib.epmoe_w4a8_mlp_cuda, m, s)
    return res
