"""What every wrapper needs: checked tensor arguments, outputs (numpy on the host, torch on the
GPU, or the caller's `out=`), the CUDA stream and device of a call, and torch only when present."""
import contextlib
import ctypes
import operator
import sys
import threading

import numpy as np

from . import _lib
from .dlpack import CPU, CUDA, DLPackError, Tensor, _is_capsule, as_tensor, current_raw_stream, dtype, require_contiguous


def cint(value, name, ctype=ctypes.c_int):
    """value as a Python int that fits the C integer type `ctype`, for a ctypes argument or struct
    field: ctypes keeps only the low bits of a larger one (2**32 + 1 reaches an int as 1)."""
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__}") from None
    bits = 8 * ctypes.sizeof(ctype)
    lo, hi = (0, (1 << bits) - 1) if ctype(-1).value > 0 else (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
    if not lo <= v <= hi:
        raise ValueError(f"{name} = {v} is outside the range of its C type ({lo}..{hi})")
    return v


def i64s(**values):
    """int64_t arguments, in order: integers (a float such as 4.7 is refused, not truncated), range-checked."""
    return [cint(v, n, ctypes.c_int64) for n, v in values.items()]


class InUse:
    """The calls of several threads into the library on one object (an EP group, a layer), so that
    close() from one thread never frees what another's call still uses: call() counts a call in (and
    refuses one on a closed object), close() marks the object closed and waits for the calls inside
    to return. A collective call waiting for peers returns at its timeout at the latest."""

    def __init__(self, what):
        self._what = what
        self._cv = threading.Condition()
        self._inside = 0
        self._closed = False

    def call(self):
        """`with guard.call():` around a call into the library (the guard is its own context manager:
        no generator a call, which a dispatch + combine pair paid four times)."""
        return self

    def __enter__(self):
        with self._cv:
            if self._closed:
                raise _lib.error(_lib.ERR_INVALID_ARG, f"{self._what} is closed")
            self._inside += 1

    def __exit__(self, *exc):
        with self._cv:
            self._inside -= 1
            if not self._inside:
                self._cv.notify_all()

    def close(self):
        """Refuse new calls, wait for the ones inside; True the first time."""
        with self._cv:
            first, self._closed = not self._closed, True
            while self._inside:
                self._cv.wait()
        return first


class Both:
    """Two guards' calls as one context manager: entered in order, left in reverse, the first left
    again if the second refuses (a layer's call, counted in by its group and by the layer itself;
    a class rather than a generator, which cost a layer call ~1 us)."""

    __slots__ = ("_a", "_b")

    def __init__(self, a, b):
        self._a, self._b = a, b

    def __enter__(self):
        self._a.__enter__()
        try:
            self._b.__enter__()
        except BaseException:
            self._a.__exit__(None, None, None)
            raise

    def __exit__(self, *exc):
        try:
            self._b.__exit__(*exc)
        finally:
            self._a.__exit__(*exc)


def torch_or_none():
    """The torch module if the process already imported it or can; None otherwise. torch is never
    required for host memory, and a CUDA tensor can only come from a library the caller imported."""
    mod = sys.modules.get("torch")
    if mod is not None:
        return mod
    try:
        import torch
        return torch
    except ImportError:
        return None


def copy_to(obj, device, *, non_blocking=False, what="copy"):
    """A copy of a tensor or array on `device` ("cuda", "cuda:1", a torch.device, "cpu"): a torch
    tensor on a GPU, a numpy array on the host; None stays None. Needs torch."""
    if obj is None:
        return None
    torch = torch_or_none()
    if torch is None:
        raise _lib.error(_lib.ERR_UNSUPPORTED, f"{what} needs torch to copy between devices")
    dev = torch.device(device)
    t = obj if isinstance(obj, torch.Tensor) else torch.from_dlpack(obj)
    t = t.to(dev, non_blocking=non_blocking)
    return t.numpy() if dev.type == "cpu" else t


def device_of(obj):
    """(device_type, id) of a tensor argument before importing it (to choose the stream first)."""
    if isinstance(obj, Tensor):
        return obj.device
    f = getattr(obj, "__dlpack_device__", None)
    return tuple(f()) if f else (CPU, 0)


def stream_handle(stream):
    """An int cudaStream_t from an int, a torch.cuda.Stream (or anything with .cuda_stream), or None."""
    if stream is None:
        return None
    return int(getattr(stream, "cuda_stream", stream))


def launch_stream(objs, stream):
    """The stream a GPU call runs on: the caller's, else torch's current stream on the tensors'
    device (what a torch user expects), else the legacy default stream (0). None for host calls."""
    if stream is not None:
        return stream_handle(stream)
    for obj in objs:
        if obj is None:
            continue
        dev = device_of(obj)
        if dev[0] != CUDA:
            continue
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(obj, torch.Tensor):
            return current_raw_stream(torch, obj.device.index)
        return 0
    return None


def on_device(t):
    """Make t's GPU the current one while a _cuda entry point launches (they use the current device).
    Needs torch to switch devices; without it the current device must already be t's. Nothing to do
    (a null context) when it already is, the common case."""
    torch = torch_or_none() if t.is_cuda else None
    if torch is None or torch.cuda.current_device() == t.device[1]:
        return _NO_SWITCH
    return torch.cuda.device(t.device[1])


_NO_SWITCH = contextlib.nullcontext()


def arg(obj, name, dtypes, *, ndim=None, stream=None, allow_none=False, contiguous=True):
    """Import one tensor argument and check what the C function needs: dtype, rank, contiguity
    (contiguous=False: the caller checks the layout)."""
    if obj is None:
        if allow_none:
            return None
        raise TypeError(f"{name} is required")
    try:
        t = as_tensor(obj, stream=stream)
    except BufferError as e:  # ours, or the producer's refusal (numpy: str and object arrays)
        raise DLPackError(f"{name}: {e}") from None
    if not (t.is_host or t.is_cuda):  # the library has host (_ref) and CUDA (_cuda) entry points only
        raise DLPackError(f"{name}: is on {t.device_name} (DLPack device type {t.device[0]}); epmoe takes host "
                          "(CPU) memory or CUDA devices")
    allowed = _allowed(dtypes)
    if allowed and t.dtype not in allowed:
        raise TypeError(f"{name}: dtype {t.dtype.name} is not accepted here; expected "
                        f"{' or '.join(d.name for d in allowed)}")
    if ndim is not None and t.ndim not in (ndim if isinstance(ndim, tuple) else (ndim,)):
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {t.shape}")
    if contiguous:
        require_contiguous(t, name)
    if t.size and not t.data_ptr:  # a producer's malformed tensor: the library would dereference NULL
        raise DLPackError(f"{name}: {t.size} elements at a NULL data pointer")
    return t


_ALLOWED = {}  # a call site's dtype names -> their DTypes


def _allowed(dtypes):
    try:
        return _ALLOWED[dtypes]
    except (KeyError, TypeError):  # TypeError: a list, not cached
        v = tuple(dtype(d) for d in dtypes)
        if isinstance(dtypes, tuple):
            _ALLOWED[dtypes] = v
        return v


def same_device(tensors, what):
    """All tensor arguments of one call live on one device; returns it."""
    present = [(n, t) for n, t in tensors if t is not None]
    dev = present[0][1].device
    for n, t in present[1:]:
        if t.device != dev and not (t.is_host and present[0][1].is_host):
            raise DLPackError(f"{what}: {n} is on {t.device_name} but {present[0][0]} on "
                              f"{present[0][1].device_name}; every tensor of a call must be on one device")
    return dev


def keep_for_stream(obj, stream, device):
    """A torch tensor made on torch's current stream for one call and dropped when the call returns:
    when the call runs on another stream, its kernels may still read it then, so the allocator must
    not hand the memory out before that stream's work is done."""
    torch = torch_or_none()
    if stream is not None and stream != current_raw_stream(torch, device):
        obj.record_stream(torch.cuda.ExternalStream(stream, device=f"cuda:{device}"))


def empty(shape, dt, like, *, zero=False, stream=None):
    """A new output: numpy for host memory, torch on the GPU (made on torch's current stream;
    `stream`: the one the call uses it on). Returns (object for the caller, Tensor)."""
    dt = dtype(dt)
    if like.is_host:
        arr = (np.zeros if zero else np.empty)(shape, dtype=dt.storage)
        natural = arr.dtype.name == dt.name
        return arr, Tensor(arr.ctypes.data, arr.shape, dt, (CPU, 0), None, False, arr, arr if natural else None)
    torch = torch_or_none()
    if torch is None or not like.is_cuda:
        raise _lib.error(_lib.ERR_UNSUPPORTED, f"cannot allocate an output on {like.device_name} without torch; "
                         "pass out= tensors")
    tt = (torch.zeros if zero else torch.empty)(shape, dtype=getattr(torch, dt.name), device=like.device[1])
    # torch made it (and zeroed it) on its current stream. A call on another stream goes through
    # DLPack's exchange, which orders that stream after torch's; on the current stream it is
    # described directly. (The exchange without a stream ordered torch's current stream before the
    # legacy default one, which a CUDA graph capture forbids: cudaErrorStreamCaptureInvalidated.)
    if stream is not None and stream != current_raw_stream(torch, like.device[1]):
        return tt, as_tensor(tt, stream=stream)
    return tt, Tensor(tt.data_ptr(), shape, dt, (CUDA, like.device[1]), None, False, tt, tt)


def _caller_buffer(out, name):
    """A caller's output must share memory with what the call writes: a tensor (DLPack), never a list
    or scalar that would first be copied into a temporary array (the results would be lost in it)."""
    if not (isinstance(out, Tensor) or hasattr(out, "__dlpack__") or _is_capsule(out)):
        raise TypeError(f"{name}: must be a tensor the call can write into (numpy array, torch tensor, any "
                        f"DLPack object), got {type(out).__name__}")


def output(out, name, shape, dtypes, like, *, stream=None, zero=False):
    """The caller's `out` checked against what the call writes, or a new tensor.
    Returns (object to hand back, Tensor)."""
    if out is None:
        return empty(shape, dtypes[0], like, zero=zero, stream=stream)
    _caller_buffer(out, name)
    t = arg(out, name, dtypes, stream=stream)
    if t.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {t.shape}")
    writable(t, name, like)
    return out, t


def raw_output(out, name, nbytes, like, *, stream=None, shape=None, dt=None, zero=False, dtypes=()):
    """A buffer whose layout the library defines (scale slabs): the caller's may be any contiguous
    tensor of at least nbytes (of `dtypes`, where given); a new one gets `shape` and `dt`."""
    if out is None:
        return empty(shape, dt, like, zero=zero, stream=stream)
    _caller_buffer(out, name)
    t = arg(out, name, dtypes, stream=stream)
    if t.nbytes < nbytes:
        raise ValueError(f"{name}: {t.nbytes} bytes, the call writes {nbytes}")
    writable(t, name, like)
    return out, t


def writable(t, name, like):
    """A caller's buffer the library writes: not read-only (a memmap opened "r", bytes) and where
    the inputs are."""
    if t.readonly:
        raise DLPackError(f"{name}: the tensor is read-only")
    if t.device != like.device and not (t.is_host and like.is_host):
        raise DLPackError(f"{name}: is on {t.device_name}, the inputs on {like.device_name}")


def ptr(t):
    """The address for the C call (None for an absent optional tensor)."""
    return None if t is None else (t.data_ptr or None)
