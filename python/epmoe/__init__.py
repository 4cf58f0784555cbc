"""epmoe — thin ctypes binding of libepmoe (the C library is the whole implementation).

The library is found through $EPMOE_LIB, next to this package (installed wheels), or in the
repository's build/ folder. Arrays are numpy; GPU entry points take raw device pointers and a
stream handle (ints), so torch tensors pass as `t.data_ptr()` without copies.
"""
import ctypes
import os

import numpy as np

__all__ = ["lib", "Error", "fp8_from_float", "fp8_to_float", "bf16_from_float", "bf16_to_float",
           "SCALE_F32_ROW", "SCALE_F32_MMAJOR", "SCALE_UE8M0_ROW", "SCALE_UE8M0_MMAJOR",
           "F32", "BF16", "FP8_E4M3"]

SCALE_F32_ROW, SCALE_F32_MMAJOR, SCALE_UE8M0_ROW, SCALE_UE8M0_MMAJOR = 0, 1, 2, 3
F32, BF16, FP8_E4M3 = 0, 1, 2


def _find_library():
    env = os.environ.get("EPMOE_LIB")
    here = os.path.dirname(os.path.abspath(__file__))
    for path in (env, os.path.join(here, "libepmoe.so"),
                 os.path.join(here, "..", "..", "build", "libepmoe.so")):
        if path and os.path.exists(path):
            return os.path.abspath(path)
    raise OSError("libepmoe.so not found: build it with `make lib` or set EPMOE_LIB")


lib = ctypes.CDLL(_find_library())

_p, _i64, _int, _sz = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_size_t
_SIGNATURES = {
    "epmoe_status_str": (ctypes.c_char_p, [_int]),
    "epmoe_last_error": (ctypes.c_char_p, []),
    "epmoe_version_string": (ctypes.c_char_p, []),
    "epmoe_cuda_device_count": (_int, []),
    "epmoe_fp8_e4m3_from_float_row": (None, [_p, _p, _sz]),
    "epmoe_fp8_e4m3_to_float_row": (None, [_p, _p, _sz]),
    "epmoe_bf16_from_float_row": (None, [_p, _p, _sz]),
    "epmoe_bf16_to_float_row": (None, [_p, _p, _sz]),
    "epmoe_scale_bytes": (_sz, [_int, _i64, _i64]),
    "epmoe_cast_group_fp8_ref": (_int, [_p, _i64, _i64, _p, _p, _int, _int]),
    "epmoe_cast_group_fp8_cuda": (_int, [_p, _i64, _i64, _p, _p, _int, _int, _p]),
    "epmoe_cast_tensor_fp8_ref": (_int, [_p, _i64, _p, _p]),
    "epmoe_cast_tensor_fp8_cuda": (_int, [_p, _i64, _p, _p, _p]),
    "epmoe_requant_fp8_ref": (_int, [_p, _p, _int, _p, _i64, _i64, _i64, _p, _p]),
    "epmoe_requant_fp8_cuda": (_int, [_p, _p, _int, _p, _i64, _i64, _i64, _p, _p, _p]),
    "epmoe_dequant_fp8_ref": (_int, [_p, _p, _int, _p, _i64, _i64, _i64, _int, _p]),
    "epmoe_dequant_fp8_cuda": (_int, [_p, _p, _int, _p, _i64, _i64, _i64, _int, _p, _p]),
}
for _name, (_res, _args) in _SIGNATURES.items():
    _f = getattr(lib, _name)
    _f.restype, _f.argtypes = _res, _args


class Error(RuntimeError):
    """A non-zero epmoe_status, with the library's detailed message."""

    def __init__(self, status):
        self.status = status
        super().__init__(f"{lib.epmoe_status_str(status).decode()}: {lib.epmoe_last_error().decode()}")


def check(status):
    if status != 0:
        raise Error(status)


def version():
    return lib.epmoe_version_string().decode()


def _ptr(a):
    return a.ctypes.data_as(ctypes.c_void_p)


def _convert(fn, x, in_dtype, out_dtype):
    x = np.ascontiguousarray(x, dtype=in_dtype)
    y = np.empty(x.shape, dtype=out_dtype)
    fn(_ptr(x), _ptr(y), x.size)
    return y


def fp8_from_float(x):
    """float32 array -> uint8 e4m3fn bytes (RNE, saturating, NaN -> 0x7F)."""
    return _convert(lib.epmoe_fp8_e4m3_from_float_row, x, np.float32, np.uint8)


def fp8_to_float(x):
    return _convert(lib.epmoe_fp8_e4m3_to_float_row, x, np.uint8, np.float32)


def bf16_from_float(x):
    """float32 array -> uint16 bf16 bit patterns (RNE)."""
    return _convert(lib.epmoe_bf16_from_float_row, x, np.float32, np.uint16)


def bf16_to_float(x):
    return _convert(lib.epmoe_bf16_to_float_row, x, np.uint16, np.float32)


def cast_group_fp8(x_bf16, scale_fmt=SCALE_F32_ROW, round_scale=False):
    """CPU reference of the per-token-group cast: uint16 [M, K] -> (uint8 [M, K], scale bytes)."""
    x = np.ascontiguousarray(x_bf16, dtype=np.uint16)
    M, K = x.shape
    q = np.empty((M, K), dtype=np.uint8)
    s = np.empty(max(lib.epmoe_scale_bytes(scale_fmt, M, K), 1), dtype=np.uint8)
    check(lib.epmoe_cast_group_fp8_ref(_ptr(x), M, K, _ptr(q), _ptr(s), scale_fmt, int(round_scale)))
    return q, s
