"""What the expert GEMM and MLP calls of `w4a8` and `experts` share: their activations, row counts
and 1x128 scale arguments, the weights' place, and the workspaces (host buffers per call, one
cached buffer per GPU and kind)."""
import contextlib
import ctypes
import threading

import numpy as np

from . import _lib
from ._lib import check
from ._util import arg, empty, keep_for_stream, torch_or_none, writable
from .dlpack import DLPackError, Tensor, current_raw_stream, require_contiguous
from .formats import GROUP, SCALE_F32_MMAJOR, SCALE_UE8M0_MMAJOR, _fmt, scale_bytes, scale_dtypes

BF16_HOST, BF16_GPU = ("uint16", "bfloat16"), ("bfloat16", "uint16")
FP8 = ("uint8", "float8_e4m3fn")


def host_buffer(nbytes, dt, shape, align=256):
    """Zeroed host memory at an `align`-byte boundary: the library asks 16 bytes of weights and 256
    of workspaces, more than numpy promises. The view keeps the larger block alive."""
    raw = np.zeros(nbytes + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + nbytes].view(dt).reshape(shape)


# ---- workspaces ------------------------------------------------------------------------------------
# One buffer per GPU and kind, zeroed when it is allocated and kept. "w4a8": shared by w4a8.gemm and
# w4a8.mlp, whose workspaces both start with the GEMM's launch counter at offset 0, so the largest
# request serves every smaller one and the counter stays valid across calls. "experts": the other
# schemes' MLP, whose workspace holds only its intermediates (it must not share the W4A8 buffer:
# it would overwrite that counter).
_ws_lock = threading.Lock()
ws_cache = {"w4a8": {}, "experts": {}}
# Buffers a larger request replaced: kept, since a CUDA graph captured with one replays into it (its
# memory must never go to another tensor); growth happens a few times a process. Freed only by
# release_workspaces().
_retired = []


def current(device):
    """The GPU whose SM count sizes a workspace; the current one when None or without torch."""
    torch = torch_or_none() if device is not None else None
    if torch is None:
        return contextlib.nullcontext()
    return torch.cuda.device(torch.device(device))


def release_workspaces():
    """Drop every cached GPU workspace, the replaced ones too (the next call on each device allocates
    and zeroes again). No CUDA graph captured with one of them may replay after this."""
    with _ws_lock:
        for cache in ws_cache.values():
            cache.clear()
        _retired.clear()


def _capturing(torch, stream, dev):
    """Whether torch's current stream, where the buffer would be made, or the call's stream is being
    captured into a graph."""
    if torch.cuda.is_current_stream_capturing():
        return True
    if stream is None or stream == current_raw_stream(torch, dev):
        return False
    with torch.cuda.stream(torch.cuda.ExternalStream(stream, device=f"cuda:{dev}")):
        return torch.cuda.is_current_stream_capturing()


def _device_workspace(kind, like, nbytes, stream):
    torch = torch_or_none()
    if torch is None:
        raise _lib.error(_lib.ERR_UNSUPPORTED, f"a GPU call without torch cannot allocate its workspace; pass "
                         f"workspace= ({nbytes} bytes, 256-byte aligned, zeroed once)")
    dev, cache = like.device[1], ws_cache[kind]
    with _ws_lock:
        buf = cache.get(dev)
        if buf is not None and buf.numel() >= nbytes:
            return buf
        cur = torch.cuda.current_stream(dev)
        if _capturing(torch, stream, dev):
            raise _lib.error(_lib.ERR_INVALID_ARG, f"the {kind} workspace would be allocated inside CUDA graph "
                             "capture; make one call at the largest shape before capturing (or pass workspace=)")
        if buf is not None:
            _retired.append(buf)  # graphs captured with it replay into it: never freed (see _retired)
        buf = torch.zeros(max(int(nbytes), 256), dtype=torch.uint8, device=f"cuda:{dev}")
        if stream is not None and stream != cur.cuda_stream:
            cur.synchronize()  # the zeros were written on torch's stream; the kernel runs on another
        cache[dev] = buf
        return buf


def workspace(kind, given, nbytes, like, stream):
    """(keep-alive object, Tensor) of the workspace of a call, or (None, None) when none is needed:
    the caller's (`given`), a host buffer for the references, else the cached buffer of `kind`."""
    if given is not None:
        t = arg(given, "workspace", (), stream=stream)
        writable(t, "workspace", like)
        return given, t
    if nbytes == 0:
        return None, None
    if like.is_host:
        buf = host_buffer(nbytes, np.uint8, (nbytes,))
        return buf, arg(buf, "workspace", ())
    buf = _device_workspace(kind, like, nbytes, stream)
    return buf, arg(buf, "workspace", (), stream=stream)


# ---- arguments -------------------------------------------------------------------------------------
def weights_place(w, name, like):
    """Refuse weights (W4A8Weights, ExpertWeights) that are not where the activations are."""
    if w.device != like.device and not (w.is_host and like.is_host):
        hint = f"{name}.to('cuda:{like.device[1]}')" if like.is_cuda else f"{name}.to('cpu')"
        raise DLPackError(f"{name}: the weights are on {w.device_name}, the activations on {like.device_name}; "
                          f"copy them once with {hint}")


def acts(a, w, name, s, dtypes):
    """(Tensor, E, M) of activations [E, M, K] ([M, K] when E = 1) of `dtypes` for weights w."""
    at = arg(a, name, dtypes, ndim=(2, 3), stream=s)
    E, M, K = (1,) + at.shape if at.ndim == 2 else at.shape
    if (E, K) != (w.E, w.K):
        raise ValueError(f"{name}: shape {at.shape} does not fit weights [E={w.E}, N={w.N}, K={w.K}]: expected "
                         f"[{w.E}, M, {w.K}]")
    return at, E, M


def masked_m(counts, E, M, like, s):
    """int32 [E] row counts; None means every row (made where the call runs)."""
    if counts is None:
        if like.is_host:
            obj, t = empty((E,), "int32", like)
            obj[...] = M
            return obj, t
        # filled on torch's current stream, then imported for the call's: the exchange orders the fill first
        torch, dev = torch_or_none(), like.device[1]
        obj = torch.full((E,), M, dtype=torch.int32, device=f"cuda:{dev}")
        t = arg(obj, "masked_m", ("int32",), stream=s)
        keep_for_stream(obj, s, dev)
        return obj, t
    t = arg(counts, "masked_m", ("int32",), stream=s)
    if t.size != E:
        raise ValueError(f"masked_m: needs {E} int32 counts (one per expert), got shape {t.shape}")
    return counts, t


def _deepep_mmajor(t, fmt, E, M, K):
    """DeepEP's low-latency scales, [E, M, G] with strides (G*M, 1, M) (float32 G = K/128, or int32
    UE8M0 words G = ceil(K/512)): the M-major slabs of SCALE_F32_MMAJOR / SCALE_UE8M0_MMAJOR seen
    transposed. The slabs themselves as a Tensor, or None when t is not that view."""
    if fmt not in (SCALE_F32_MMAJOR, SCALE_UE8M0_MMAJOR):
        return None
    G = K // GROUP if fmt == SCALE_F32_MMAJOR else (K // GROUP + 3) // 4
    if t.shape != (E, M, G) or t.strides != (G * M, 1, M) or t.dtype.name != ("float32" if fmt == SCALE_F32_MMAJOR else "int32"):
        return None
    return Tensor(t.data_ptr, (E, G, M), t.dtype, t.device, None, t.readonly, t._owner)


def group_scales(a_scales, scale_fmt, E, M, K, s):
    """(format code, Tensor) of E slabs of 1x128 activation scales in `scale_fmt`."""
    fmt = _fmt(scale_fmt)
    t = arg(a_scales, "a_scales", (), stream=s, contiguous=False)
    if not t.is_contiguous():  # DeepEP's view, or refused
        view = _deepep_mmajor(t, fmt, E, M, K)
        if view is None:
            require_contiguous(t, "a_scales")
        t = view
    if scale_dtypes(fmt) and t.dtype.name not in scale_dtypes(fmt):
        raise TypeError(f"a_scales: dtype {t.dtype.name} is not accepted for scale format {fmt}; expected "
                        f"{' or '.join(scale_dtypes(fmt))}")
    need = E * scale_bytes(fmt, M, K)
    if t.nbytes < need:
        raise ValueError(f"a_scales: {t.nbytes} bytes; {E} slab(s) of scale format {fmt} for [{M}, {K}] need {need}")
    return fmt, t


def run(like, ref, cuda, args, stream):
    """The call of args (a ctypes struct): its reference on host arrays, its kernel on CUDA tensors."""
    if like.is_host:
        check(ref(ctypes.byref(args)))
    else:
        check(cuda(ctypes.byref(args), stream))
