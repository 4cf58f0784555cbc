"""Loading libepmoe.so, its C signatures, and status codes turned into Python exceptions.

Everything else in the package goes through `lib` (a ctypes.CDLL) and `check()`. ctypes.CDLL
releases the GIL around every foreign call, which is what lets CPU-backend ranks run as
Python threads that block inside the library while their peers make progress.
"""
import ctypes
import os

# ---- finding the library -----------------------------------------------------------------------

_HERE = os.path.dirname(os.path.abspath(__file__))


def _candidates():
    """Where libepmoe.so may be, in the order we trust them, with where each came from."""
    env = os.environ.get("EPMOE_LIB")
    if env:
        # An explicit choice is never silently replaced by another copy: a wrong path is an error.
        return [(env, "$EPMOE_LIB")]
    return [
        (os.path.join(_HERE, "libepmoe.so"), "the installed package"),
        (os.path.join(_HERE, "..", "..", "build", "libepmoe.so"), "the repository's build/ folder"),
    ]


def find_library():
    """Path of the libepmoe.so this package would load (raises OSError when there is none)."""
    tried = []
    for path, origin in _candidates():
        if os.path.isfile(path):
            return os.path.abspath(path)
        tried.append(f"{path} ({origin})")
    raise OSError("libepmoe.so not found; looked at: " + "; ".join(tried) +
                  ". Build it with `make lib` in the repository, install the package with "
                  "`pip install .`, or point $EPMOE_LIB at the file.")


LIBRARY_PATH = find_library()
lib = ctypes.CDLL(LIBRARY_PATH)

# The structs and buffer sizes below are those of 0.4 (0.3's W4A8 scales were fp32, twice the bytes:
# an older library would write past the buffers this package allocates). 0.x releases may change
# the ABI, so major.minor must match.
ABI_VERSION = 4  # EPMOE_VERSION_MAJOR * 100 + EPMOE_VERSION_MINOR
lib.epmoe_version.restype = ctypes.c_int
_loaded = lib.epmoe_version()
if _loaded // 100 != ABI_VERSION:
    raise ImportError(f"{LIBRARY_PATH} is libepmoe {_loaded // 10000}.{_loaded // 100 % 100}.{_loaded % 100}; "
                      f"this package needs {ABI_VERSION // 100}.{ABI_VERSION % 100}.x (rebuild with `make lib`, "
                      "or point $EPMOE_LIB at a matching build)")

# ---- signatures ----------------------------------------------------------------------------------
# Pointers travel as c_void_p (plain ints on the Python side), so callers hand over the addresses
# they got from DLPack without building typed ctypes pointers.

_p, _i64, _int, _sz, _u32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint32
_f32, _u8, _u16 = ctypes.c_float, ctypes.c_uint8, ctypes.c_uint16

_SIGNATURES = {
    "epmoe_status_str": (ctypes.c_char_p, [_int]),
    "epmoe_last_error": (ctypes.c_char_p, []),
    "epmoe_version": (_int, []),
    "epmoe_version_string": (ctypes.c_char_p, []),
    "epmoe_cuda_device_count": (_int, []),
    # formats
    "epmoe_fp8_e4m3_from_float": (_u8, [_f32]),
    "epmoe_fp8_e4m3_to_float": (_f32, [_u8]),
    "epmoe_bf16_from_float": (_u16, [_f32]),
    "epmoe_bf16_to_float": (_f32, [_u16]),
    "epmoe_fp8_e4m3_from_float_row": (None, [_p, _p, _sz]),
    "epmoe_fp8_e4m3_to_float_row": (None, [_p, _p, _sz]),
    "epmoe_bf16_from_float_row": (None, [_p, _p, _sz]),
    "epmoe_bf16_to_float_row": (None, [_p, _p, _sz]),
    "epmoe_ue8m0_from_float": (_u8, [_f32]),
    "epmoe_ue8m0_to_float": (_f32, [_u8]),
    "epmoe_int4_pack": (_int, [_p, _i64, _p]),
    "epmoe_int4_unpack": (_int, [_p, _i64, _p]),
    "epmoe_scale_bytes": (_sz, [_int, _i64, _i64]),
    "epmoe_scale_offset": (_sz, [_int, _i64, _i64, _i64, _i64]),
    # quantization ops
    "epmoe_cast_group_fp8_ref": (_int, [_p, _i64, _i64, _p, _p, _int, _int]),
    "epmoe_cast_group_fp8_cuda": (_int, [_p, _i64, _i64, _p, _p, _int, _int, _p]),
    "epmoe_cast_tensor_fp8_ref": (_int, [_p, _i64, _p, _p]),
    "epmoe_cast_tensor_fp8_cuda": (_int, [_p, _i64, _p, _p, _p]),
    "epmoe_requant_fp8_ref": (_int, [_p, _p, _int, _p, _i64, _i64, _i64, _p, _p]),
    "epmoe_requant_fp8_cuda": (_int, [_p, _p, _int, _p, _i64, _i64, _i64, _p, _p, _p]),
    "epmoe_dequant_fp8_ref": (_int, [_p, _p, _int, _p, _i64, _i64, _i64, _int, _p]),
    "epmoe_dequant_fp8_cuda": (_int, [_p, _p, _int, _p, _i64, _i64, _i64, _int, _p, _p]),
    # W4A8 expert GEMM and MLP (w4a8.py defines the argument structs)
    "epmoe_w4a8_repack_size": (_int, [_i64, _i64, _i64, _p, _p]),
    "epmoe_w4a8_repack": (_int, [_p, _p, _int, _i64, _i64, _i64, _i64, _p, _p, _p]),
    "epmoe_w4a8_unpack": (_int, [_p, _i64, _i64, _i64, _p, _p]),
    "epmoe_w4a8_gemm_workspace": (_sz, []),
    "epmoe_w4a8_gemm_ref": (_int, [_p]),
    "epmoe_w4a8_gemm_cuda": (_int, [_p, _p]),
    "epmoe_w4a8_mlp_workspace": (_sz, [_i64, _i64, _i64, _i64]),
    "epmoe_w4a8_mlp_ref": (_int, [_p]),
    "epmoe_w4a8_mlp_cuda": (_int, [_p, _p]),
    # the other schemes' expert GEMM and MLP (experts.py defines the argument structs)
    "epmoe_expert_gemm_ref": (_int, [_p]),
    "epmoe_expert_gemm_cuda": (_int, [_p, _p]),
    "epmoe_expert_mlp_workspace": (_sz, [_int, _i64, _i64, _i64, _i64]),
    "epmoe_expert_mlp_ref": (_int, [_p]),
    "epmoe_expert_mlp_cuda": (_int, [_p, _p]),
    # expert parallelism (struct arguments are passed by pointer; ep.py defines the structs)
    "epmoe_ep_layout_query": (_int, [_p, _p]),
    "epmoe_cpu_world_create": (_int, [_int, _p]),
    "epmoe_cpu_world_destroy": (None, [_p]),
    "epmoe_ep_create_cpu": (_int, [_p, _p, _p]),
    "epmoe_ep_create_nccl": (_int, [_p, _p, _p]),
    "epmoe_ep_destroy": (_int, [_p]),
    "epmoe_ep_backend": (_int, [_p]),
    "epmoe_ep_set_active_ranks": (_int, [_p, _p]),
    "epmoe_ep_poll": (_int, [_p]),
    "epmoe_dispatch": (_int, [_p, _p, _int, _p, _p]),
    "epmoe_combine": (_int, [_p, _u32, _p, _int, _p]),
    "epmoe_ep_dispatch_ref": (_int, [_p, _p, _p, _p, _p, _p, _p, _p, _p]),
    "epmoe_ep_combine_ref": (_int, [_p, _p, _p, _p, _p, _p, _p]),
    # the MoE layer (layer.py defines the structs)
    "epmoe_scheme_default_wire": (_int, [_int]),
    "epmoe_expected_rows": (_i64, [_i64, _int, _int, _int]),
    "epmoe_scheme_accepts_wire": (_int, [_int, _int]),
    "epmoe_layer_create": (_int, [_p, _p, _p, _p]),
    "epmoe_layer_bytes": (_sz, [_p]),
    "epmoe_layer_destroy": (None, [_p]),
    "epmoe_layer_forward": (_int, [_p, _p, _p, _int, _p, _int, _p, _p]),
    "epmoe_layer_forward_phase": (_int, [_p, _p, _p, _int, _p, _int, _p, _int, _p, _p]),
    "epmoe_layer_ref": (_int, [_p, _p, _p, _p, _p, _p, _p, _p]),
}

_missing = []
for _name, (_res, _args) in _SIGNATURES.items():
    try:
        _f = getattr(lib, _name)
    except AttributeError:
        _missing.append(_name)
        continue
    _f.restype, _f.argtypes = _res, _args
if _missing:
    raise ImportError(f"{LIBRARY_PATH} lacks {', '.join(_missing)}: the library is older than this Python "
                      "package; rebuild it with `make lib` (or reinstall the package)")

# ---- status codes --------------------------------------------------------------------------------
OK = 0
ERR_INVALID_ARG, ERR_NULL_POINTER, ERR_MISALIGNED, ERR_UNSUPPORTED, ERR_OUT_OF_MEMORY = 1, 2, 3, 4, 5
ERR_CUDA, ERR_NCCL, ERR_TIMEOUT, ERR_INTERNAL = 6, 7, 8, 9


class Error(RuntimeError):
    """A non-zero epmoe_status. `status` is the code, `message` the library's epmoe_last_error().

    Subclasses also derive from the matching builtin (ValueError, MemoryError, TimeoutError, ...)
    so callers can catch either the epmoe class or the Python one.
    """

    def __init__(self, status, message=None):
        self.status = int(status)
        self.message = message if message is not None else ""
        name = lib.epmoe_status_str(self.status).decode()
        super().__init__(f"{name}: {self.message}" if self.message else name)


class InvalidArgument(Error, ValueError):
    """EPMOE_ERR_INVALID_ARG: a shape, count or option out of its documented range."""


class NullPointer(Error, ValueError):
    """EPMOE_ERR_NULL_POINTER: a required buffer was not given."""


class Misaligned(Error, ValueError):
    """EPMOE_ERR_MISALIGNED: a buffer lacks the alignment the GPU kernels need."""


class Unsupported(Error, NotImplementedError):
    """EPMOE_ERR_UNSUPPORTED: not in this build (no CUDA, no NCCL) or not on this device."""


class OutOfMemory(Error, MemoryError):
    """EPMOE_ERR_OUT_OF_MEMORY."""


class CudaError(Error):
    """EPMOE_ERR_CUDA: a CUDA runtime call failed; the message has CUDA's words."""


class NcclError(Error):
    """EPMOE_ERR_NCCL: an NCCL call failed."""


class Timeout(Error, TimeoutError):
    """EPMOE_ERR_TIMEOUT: a peer did not answer; the EP group is failed and must be destroyed."""


class InternalError(Error):
    """EPMOE_ERR_INTERNAL: a bug in epmoe; please report the message."""


_CLASSES = {ERR_INVALID_ARG: InvalidArgument, ERR_NULL_POINTER: NullPointer, ERR_MISALIGNED: Misaligned,
            ERR_UNSUPPORTED: Unsupported, ERR_OUT_OF_MEMORY: OutOfMemory, ERR_CUDA: CudaError,
            ERR_NCCL: NcclError, ERR_TIMEOUT: Timeout, ERR_INTERNAL: InternalError}


def error(status, message):
    """The exception for `status` with our own message (errors found before calling the library)."""
    return _CLASSES.get(status, Error)(status, message)


def check(status):
    """Raise the exception of a failed call. Must run on the thread that made the call, right after
    it: epmoe_last_error() is per thread and the next failing call overwrites it."""
    if status != OK:
        raise _CLASSES.get(status, Error)(status, lib.epmoe_last_error().decode(errors="replace"))
    return status
