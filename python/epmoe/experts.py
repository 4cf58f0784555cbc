"""Expert weights of the bf16, w8a8_fp8_block and w4a16 schemes (include/epmoe.h, "expert GEMM and
MLP of the bf16, w8a8-fp8-block and w4a16 schemes"), read in their checkpoint layouts, no repack:

    e13 = ExpertWeights("bf16", w13)                     # bf16 [E, N, K]
    e13 = ExpertWeights("fp8_block", w13, scale_inv)      # fp8 [E, N, K] + float32 [E, N/128, K/128]
    e13 = ExpertWeights("int4", packed, scales)           # int8 [E, N, K/2] + float32 [E, N, K/group]
    with g.layer(weights=(e13, e2), scheme="w4a16") as layer: ...

int4 is signed, two per byte along K, even k in the low nibble (epmoe.int4_pack); the group (32 or
128) follows from the scales' shape. The arrays live where the calls that read them run (numpy
for the CPU backend, device tensors for NCCL groups) and are kept, not copied.
"""
import ctypes

from ._util import arg, copy_to, ptr, same_device

__all__ = ["ExpertWeights", "FORMATS"]

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
        code = FORMATS.get(format) if isinstance(format, str) else int(format)
        if code not in _FORMAT_NAMES:
            raise ValueError(f"format {format!r}: expected one of {', '.join(FORMATS)}")
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
