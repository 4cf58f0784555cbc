"""DLPack in and out, with ctypes: tensors from torch, numpy or any DLPack producer reach the C
library as (pointer, device, dtype, shape) without copies, and epmoe's tensors go back out the
same way.

Import (`from_dlpack`) reads the C structs of the DLPack ABI — the versioned 1.x
DLManagedTensorVersioned when the producer offers it, else the legacy (0.x) DLManagedTensor —
takes ownership of the capsule the way the protocol says (rename it "used_..."), and calls the
producer's deleter when the last view of the memory goes away.

Export (`Tensor.__dlpack__`) never runs a Python-level deleter. A ctypes callback cannot
preserve an exception that is already pending when it is called, and consumers do free
tensors while an exception unwinds (a failed import, a temporary dropped by a raising
expression): the pending exception would be replaced by a SystemError. So the capsule comes
from a C producer that owns the memory's lifetime already — the object the tensor was
imported from, or, for host memory, a numpy view of it — and for the dtypes numpy has no
name for (bfloat16, float8_e4m3fn) the type code in that capsule's DLTensor is set to the
DLPack code before it is handed over. The pointer, shape and strides are untouched.
"""
import ctypes
import sys

import numpy as np

__all__ = ["Tensor", "from_dlpack", "as_tensor", "DType", "dtype", "DLPackError",
           "CPU", "CUDA", "CUDA_HOST", "CUDA_MANAGED"]

# ---- the C ABI ---------------------------------------------------------------------------------
CPU, CUDA, CUDA_HOST, CUDA_MANAGED = 1, 2, 3, 13
_DEVICE_NAMES = {CPU: "cpu", CUDA: "cuda", CUDA_HOST: "cuda_host", CUDA_MANAGED: "cuda_managed", 10: "rocm"}
# memory the CPU can read and write directly
_HOST_DEVICES = (CPU, CUDA_HOST, CUDA_MANAGED)

FLAG_READ_ONLY = 1 << 0


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", DLDevice), ("ndim", ctypes.c_int32), ("dtype", DLDataType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


class DLManagedTensor(ctypes.Structure):
    """The legacy (DLPack <= 0.8) managed tensor; capsule name "dltensor"."""
    # deleter as a plain address: we only ever call the producer's, never install our own
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


class DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class DLManagedTensorVersioned(ctypes.Structure):
    """The DLPack >= 1.0 managed tensor; capsule name "dltensor_versioned"."""
    _fields_ = [("version", DLPackVersion), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p),
                ("flags", ctypes.c_uint64), ("dl_tensor", DLTensor)]


# void (*deleter)(DLManagedTensor*) and its versioned twin have the same C signature
_DELETER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)

# The version we read: 1.x (layout fixed by major 1; minor versions only add enum values).
MAX_VERSION = (1, 1)

# ---- PyCapsule through the C API ----------------------------------------------------------------
_api = ctypes.pythonapi
_api.PyCapsule_IsValid.restype, _api.PyCapsule_IsValid.argtypes = ctypes.c_int, [ctypes.py_object, ctypes.c_char_p]
_api.PyCapsule_GetName.restype, _api.PyCapsule_GetName.argtypes = ctypes.c_char_p, [ctypes.py_object]
_api.PyCapsule_GetPointer.restype = ctypes.c_void_p
_api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_api.PyCapsule_SetName.restype, _api.PyCapsule_SetName.argtypes = ctypes.c_int, [ctypes.py_object, ctypes.c_char_p]

# The capsule keeps the name pointer, not a copy: these module-level bytes live as long as the
# interpreter, so a renamed capsule never points at freed memory.
_NAME_LEGACY, _NAME_VERSIONED = b"dltensor", b"dltensor_versioned"
_NAME_USED_LEGACY, _NAME_USED_VERSIONED = b"used_dltensor", b"used_dltensor_versioned"


def _is_capsule(obj):
    return type(obj).__name__ == "PyCapsule"


class DLPackError(BufferError):
    """A tensor that cannot cross DLPack as asked (wrong layout, device, version or dtype)."""


# ---- dtypes ------------------------------------------------------------------------------------
class DType:
    """A DLPack data type, with the numpy dtype of the same width used to view its bytes on the host
    (bfloat16 shows as uint16 and float8_e4m3fn as uint8 in numpy, which has neither)."""
    __slots__ = ("name", "code", "bits", "storage")

    def __init__(self, name, code, bits, storage):
        self.name, self.code, self.bits, self.storage = name, code, bits, np.dtype(storage)

    @property
    def itemsize(self):
        return self.bits // 8

    def __repr__(self):
        return f"epmoe.dtype({self.name!r})"

    def __eq__(self, other):
        return isinstance(other, DType) and (self.code, self.bits) == (other.code, other.bits)

    def __hash__(self):
        return hash((self.code, self.bits))


_INT, _UINT, _FLOAT, _BFLOAT, _BOOL, _F8E4M3FN = 0, 1, 2, 4, 6, 10
_DTYPES = [DType("float32", _FLOAT, 32, np.float32), DType("float64", _FLOAT, 64, np.float64),
           DType("float16", _FLOAT, 16, np.float16), DType("bfloat16", _BFLOAT, 16, np.uint16),
           DType("float8_e4m3fn", _F8E4M3FN, 8, np.uint8), DType("bool", _BOOL, 8, np.bool_)]
for _bits in (8, 16, 32, 64):
    _DTYPES.append(DType(f"int{_bits}", _INT, _bits, f"int{_bits}"))
    _DTYPES.append(DType(f"uint{_bits}", _UINT, _bits, f"uint{_bits}"))
_BY_NAME = {d.name: d for d in _DTYPES}
_BY_CODE = {(d.code, d.bits): d for d in _DTYPES}


def dtype(spec):
    """A DType from a name ("bfloat16"), a numpy dtype, a torch dtype or a DType."""
    if isinstance(spec, DType):
        return spec
    name = str(spec)
    if name.startswith("torch."):  # torch dtypes print as torch.bfloat16, ...
        name = name[len("torch."):]
    if name in _BY_NAME:
        return _BY_NAME[name]
    try:
        name = np.dtype(spec).name
    except TypeError:
        pass
    if name in _BY_NAME:
        return _BY_NAME[name]
    raise TypeError(f"epmoe has no dtype {spec!r}; known: {', '.join(sorted(_BY_NAME))}")


def _dtype_from_dl(dt):
    if dt.lanes != 1:
        raise DLPackError(f"vector DLPack types (lanes = {dt.lanes}) are not supported")
    try:
        return _BY_CODE[(dt.code, dt.bits)]
    except KeyError:
        raise DLPackError(f"DLPack type code {dt.code} with {dt.bits} bits has no epmoe dtype") from None


# ---- the tensor --------------------------------------------------------------------------------
def _compact_strides(shape):
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(int(n), 1)
    return tuple(reversed(strides))


class _Imported:
    """Owns one consumed DLPack tensor: calls the producer's deleter once, when the last view dies."""
    __slots__ = ("_ptr", "_deleter")

    def __init__(self, ptr, deleter):
        self._ptr, self._deleter = ptr, deleter

    def release(self):
        ptr, deleter, self._ptr, self._deleter = self._ptr, self._deleter, None, None
        if ptr and deleter:
            _DELETER(deleter)(ptr)

    def __del__(self):
        # __del__ runs with any pending exception saved and restored by the interpreter, so
        # calling the producer's C deleter here is safe even while an exception unwinds.
        self.release()


class _HostView:
    """The __array_interface__ numpy uses to wrap host memory; numpy keeps it as the array's base,
    which keeps `keep` (and through it the producer's memory) alive."""
    __slots__ = ("__array_interface__", "keep")

    def __init__(self, iface, keep):
        self.__array_interface__, self.keep = iface, keep


class Tensor:
    """A view of memory described by DLPack: address, device, dtype, shape, strides.

    Made by `from_dlpack` / `as_tensor` (no copy) or by epmoe itself. `__dlpack__` exports it again,
    so `numpy.from_dlpack(t)` (host memory) and `torch.from_dlpack(t)` work without copies;
    `numpy()` is the same as numpy.from_dlpack for dtypes numpy lacks (bfloat16 and float8 show
    as uint16 and uint8). `data_ptr` is the address the C library receives.
    """
    __slots__ = ("data_ptr", "shape", "strides", "dtype", "device", "readonly", "_owner", "_source")

    def __init__(self, data_ptr, shape, dtype_, device=(CPU, 0), strides=None, readonly=False, owner=None,
                 source=None):
        self.data_ptr = int(data_ptr or 0)
        self.shape = tuple(map(int, shape))
        self.dtype = dtype_ if type(dtype_) is DType else dtype(dtype_)
        self.strides = None if strides is None else tuple(map(int, strides))
        self.device = (int(device[0]), int(device[1]))
        self.readonly = bool(readonly)
        self._owner = owner    # keeps the memory alive (an _Imported, a numpy array, a torch tensor)
        self._source = source  # the object this view came from unchanged, if it can export itself

    # -- description
    @property
    def ndim(self):
        return len(self.shape)

    @property
    def size(self):
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self):
        return self.size * self.dtype.itemsize

    @property
    def is_host(self):
        """True when the CPU can address the memory (CPU, pinned or managed CUDA memory)."""
        return self.device[0] in _HOST_DEVICES

    @property
    def is_cuda(self):
        return self.device[0] == CUDA

    @property
    def device_name(self):
        kind = _DEVICE_NAMES.get(self.device[0], f"device_type {self.device[0]}")
        return kind if self.device[0] == CPU else f"{kind}:{self.device[1]}"

    def is_contiguous(self):
        """Dense row-major (C order); dimensions of size 1 may carry any stride."""
        if self.strides is None or self.size == 0:
            return True
        return all(n == 1 or s == c for n, s, c in zip(self.shape, self.strides, _compact_strides(self.shape)))

    def __repr__(self):
        return (f"epmoe.Tensor(shape={self.shape}, dtype={self.dtype.name}, device={self.device_name}, "
                f"data_ptr=0x{self.data_ptr:x}{', strides=' + str(self.strides) if self.strides else ''})")

    # -- views
    def view(self, dtype_):
        """The same bytes as another dtype of the same width (uint16 <-> bfloat16, uint8 <-> float8)."""
        dt = dtype(dtype_)
        if dt.bits != self.dtype.bits:
            raise TypeError(f"view({dt.name}): {self.dtype.name} has {self.dtype.bits} bits, {dt.name} {dt.bits}")
        return Tensor(self.data_ptr, self.shape, dt, self.device, self.strides, self.readonly, self._owner)

    def reshape(self, *shape):
        """A contiguous tensor with another shape of the same size (one -1 is inferred)."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        shape = list(shape)
        if shape.count(-1) == 1:
            rest = 1
            for n in shape:
                rest *= n if n != -1 else 1
            shape[shape.index(-1)] = self.size // rest if rest else 0
        new = Tensor(self.data_ptr, shape, self.dtype, self.device, None, self.readonly, self._owner)
        if new.size != self.size:
            raise ValueError(f"reshape: {self.shape} has {self.size} elements, {tuple(shape)} {new.size}")
        require_contiguous(self, "reshape")
        return new

    def numpy(self):
        """A numpy array over the same memory (host memory only); bfloat16/float8 as uint16/uint8."""
        if not self.is_host:
            raise DLPackError(f"numpy() needs host memory; this tensor is on {self.device_name}")
        store = self.dtype.storage
        if self.size == 0:  # numpy rejects a NULL address; an empty array shares nothing anyway
            return np.empty(self.shape, dtype=store)
        iface = {"version": 3, "shape": self.shape, "typestr": store.str, "data": (self.data_ptr, self.readonly),
                 "strides": None if self.strides is None else tuple(s * store.itemsize for s in self.strides)}
        return np.asarray(_HostView(iface, self))

    def to_torch(self):
        """torch.from_dlpack(self): a torch tensor over the same memory (needs torch)."""
        import torch
        return torch.from_dlpack(self)

    # -- export
    def __dlpack_device__(self):
        return self.device

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        kwargs = {"stream": stream, "max_version": max_version, "dl_device": dl_device, "copy": copy}
        if self._source is not None:
            # Unchanged view of a producer's object: let the producer export itself, which also
            # gives CUDA tensors the producer's own stream ordering.
            return _call_dlpack(self._source, kwargs)
        if not self.is_host:
            raise DLPackError(f"a {self.device_name} tensor can be exported again only while it is an unchanged "
                              "view of the object it came from; keep that object (e.g. the torch tensor) instead")
        cap = _call_dlpack(self.numpy(), kwargs)
        if self.dtype.code != _dtype_from_capsule(cap).code:
            _dl_tensor_of(cap).dtype.code = self.dtype.code  # bfloat16 / float8 over numpy's uint view
        return cap


def _call_dlpack(obj, kwargs):
    """obj.__dlpack__ with the 1.x keywords, or with stream only for producers older than 1.0."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None or k == "stream"}
    try:
        return obj.__dlpack__(**kwargs)
    except TypeError:
        if set(kwargs) - {"stream"} and kwargs.get("copy") is None and kwargs.get("dl_device") is None:
            return obj.__dlpack__(stream=kwargs["stream"])
        raise


def _dl_tensor_of(capsule):
    """The DLTensor inside an unconsumed capsule (a view into the producer's struct)."""
    if _api.PyCapsule_IsValid(capsule, _NAME_VERSIONED):
        return DLManagedTensorVersioned.from_address(_api.PyCapsule_GetPointer(capsule, _NAME_VERSIONED)).dl_tensor
    if _api.PyCapsule_IsValid(capsule, _NAME_LEGACY):
        return DLManagedTensor.from_address(_api.PyCapsule_GetPointer(capsule, _NAME_LEGACY)).dl_tensor
    raise DLPackError(f"not an unconsumed DLPack capsule (name {_api.PyCapsule_GetName(capsule)!r})")


def _dtype_from_capsule(capsule):
    return _dl_tensor_of(capsule).dtype


# ---- import ------------------------------------------------------------------------------------
def _consume(capsule, source=None):
    """Take ownership of a DLPack capsule and describe its tensor."""
    if _api.PyCapsule_IsValid(capsule, _NAME_VERSIONED):
        versioned, name, used = True, _NAME_VERSIONED, _NAME_USED_VERSIONED
    elif _api.PyCapsule_IsValid(capsule, _NAME_LEGACY):
        versioned, name, used = False, _NAME_LEGACY, _NAME_USED_LEGACY
    else:
        raise DLPackError(f"not an unconsumed DLPack capsule (its name is {_api.PyCapsule_GetName(capsule)!r}); "
                          "a capsule can be imported once")
    ptr = _api.PyCapsule_GetPointer(capsule, name)
    managed = (DLManagedTensorVersioned if versioned else DLManagedTensor).from_address(ptr)
    # From here on we own it: the capsule's destructor sees the "used_" name and leaves it alone,
    # and the _Imported calls the deleter however this function ends.
    if _api.PyCapsule_SetName(capsule, used) != 0:
        raise DLPackError("could not mark the DLPack capsule as consumed")
    owner = _Imported(ptr, managed.deleter)
    readonly = False
    if versioned:
        if managed.version.major != MAX_VERSION[0]:
            raise DLPackError(f"DLPack {managed.version.major}.{managed.version.minor} tensor: this package reads "
                              f"{MAX_VERSION[0]}.x")
        readonly = bool(managed.flags & FLAG_READ_ONLY)
    t = managed.dl_tensor
    if t.ndim < 0:
        raise DLPackError(f"DLPack tensor with ndim = {t.ndim}")
    shape = tuple(t.shape[i] for i in range(t.ndim))
    strides = tuple(t.strides[i] for i in range(t.ndim)) if t.strides else None
    dt = _dtype_from_dl(t.dtype)
    data = (t.data or 0) + t.byte_offset
    return Tensor(data, shape, dt, (t.device.device_type, t.device.device_id), strides, readonly, owner, source)


def _stream_for_producer(stream):
    """The DLPack `stream` argument for a CUDA producer: our launch stream, with 0 (the legacy
    default stream, which the protocol cannot name as 0) sent as 1."""
    if stream is None:
        return None
    s = int(stream)
    return 1 if s == 0 else s


def current_raw_stream(torch, device):
    """torch's current stream on a CUDA device (an int index), as the int cudaStream_t."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # what torch.cuda.current_stream wraps
    return raw(device) if raw is not None else torch.cuda.current_stream(device).cuda_stream


_TORCH_DTYPES = {}  # torch dtype -> DType (None: none), filled as they are met


def torch_dtype(dt):
    """The DType of a torch dtype, or None."""
    try:
        return _TORCH_DTYPES[dt]
    except KeyError:
        v = _TORCH_DTYPES[dt] = _BY_NAME.get(str(dt)[len("torch."):])
        return v


def _torch_cuda_view(obj, stream):
    """A Tensor over a torch CUDA tensor read from its attributes, where DLPack's exchange would
    only describe it: used on torch's current stream of its device (the handshake orders nothing
    then), strided, no autograd or lazy conjugate/negative bits (which torch refuses to export).
    The exchange's Python (capsule, structs, torch's stream checks) took ~0.3 ms of a dispatch +
    combine pair's ~0.55 ms of host time (cProfile, H200, 2026-12-02). None: take the exchange."""
    torch = sys.modules.get("torch")
    if stream is None or torch is None or not isinstance(obj, torch.Tensor) or not obj.is_cuda:
        return None
    if obj.requires_grad or obj.layout is not torch.strided or obj.is_conj() or obj.is_neg():
        return None
    dt = torch_dtype(obj.dtype)
    if dt is None:
        return None
    dev = obj.device.index
    if int(stream) != current_raw_stream(torch, dev):
        return None
    # strides only where they matter: a contiguous tensor's are implied (is_contiguous reads None so)
    return Tensor(obj.data_ptr(), obj.shape, dt, (CUDA, dev), None if obj.is_contiguous() else obj.stride(), False,
                  obj, obj)


def from_dlpack(obj, *, stream=None):
    """A Tensor over the memory of `obj`, without copying.

    `obj` is anything with `__dlpack__` (torch tensors, numpy >= 1.22 arrays, CuPy, JAX, ...) or a
    DLPack capsule itself. For CUDA producers `stream` is the stream epmoe will use the memory on
    (the producer orders its pending work before it); None asks for no particular stream.
    """
    if isinstance(obj, Tensor):
        return obj
    fast = _torch_cuda_view(obj, stream)
    if fast is not None:
        return fast
    if _is_capsule(obj):
        return _consume(obj)
    if not hasattr(obj, "__dlpack__"):
        raise TypeError(f"{type(obj).__name__} is not a DLPack tensor (it has no __dlpack__); pass a torch "
                        "tensor, a numpy array or a DLPack capsule")
    device = obj.__dlpack_device__() if hasattr(obj, "__dlpack_device__") else (CPU, 0)
    kwargs = {"stream": _stream_for_producer(stream) if device[0] == CUDA else None,
              "max_version": MAX_VERSION}
    return _consume(_call_dlpack(obj, kwargs), source=obj)


def as_tensor(obj, *, stream=None):
    """from_dlpack for DLPack objects; other array-likes (lists, scalars) become numpy arrays first."""
    if isinstance(obj, Tensor) or _is_capsule(obj) or hasattr(obj, "__dlpack__"):
        return from_dlpack(obj, stream=stream)
    return from_dlpack(np.asarray(obj))


def require_contiguous(t, what):
    if not t.is_contiguous():
        raise DLPackError(f"{what}: needs a contiguous row-major tensor, got shape {t.shape} with strides "
                          f"{t.strides} (in elements); pass .contiguous() (torch) or numpy.ascontiguousarray(...)")
