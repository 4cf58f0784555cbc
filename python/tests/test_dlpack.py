"""DLPack in and out: zero copies (data pointers), lifetimes (the producer's deleter runs once, when
the last view dies), both ABIs (legacy DLManagedTensor and 1.x versioned), dtype, shape, stride,
device and read-only errors."""
import ctypes
import gc
import weakref

import numpy as np
import pytest

import epmoe
from epmoe import dlpack as dl


def addr(a):
    return a.__array_interface__["data"][0]


# ---- import -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int8", "uint8", "int16", "uint16", "int32",
                                   "int64", "uint64", "bool"])
def test_numpy_round_trip_is_zero_copy(dtype):
    a = (np.arange(24) % 7).astype(dtype).reshape(2, 3, 4)
    t = epmoe.from_dlpack(a)
    assert t.data_ptr == addr(a) and t.shape == (2, 3, 4) and t.dtype.name == dtype
    assert t.device == (dl.CPU, 0) and t.is_contiguous()
    b = np.from_dlpack(t)  # epmoe -> numpy through the protocol
    c = t.numpy()          # epmoe -> numpy through __array_interface__
    for v in (b, c):
        assert addr(v) == addr(a) and v.dtype == a.dtype and v.shape == a.shape
        assert (v == a).all()
    b[0, 0, 0] = 1  # same memory: a write shows through every view
    assert a[0, 0, 0] == 1 and c[0, 0, 0] == 1


def test_both_capsule_abis_and_objects_are_accepted():
    a = np.arange(10, dtype=np.int32)
    legacy = a.__dlpack__()                       # DLManagedTensor, "dltensor"
    versioned = a.__dlpack__(max_version=(1, 0))  # DLManagedTensorVersioned, "dltensor_versioned"
    for cap in (legacy, versioned):
        t = epmoe.from_dlpack(cap)
        assert t.data_ptr == addr(a) and t.shape == (10,) and t.dtype.name == "int32"
    with pytest.raises(epmoe.DLPackError, match="imported once"):
        epmoe.from_dlpack(legacy)  # consumed: renamed "used_dltensor"


def test_offset_views_keep_their_address():
    a = np.arange(64, dtype=np.float32).reshape(8, 8)
    t = epmoe.from_dlpack(a[3:5])
    assert t.data_ptr == addr(a) + 3 * 8 * 4 and t.shape == (2, 8)
    assert (t.numpy() == a[3:5]).all()


def test_producer_deleter_runs_once_when_the_last_view_dies():
    a = np.arange(1000, dtype=np.float32)
    alive = weakref.ref(a)
    t = epmoe.from_dlpack(a)
    v = t.numpy()
    w = np.from_dlpack(t)
    del a
    gc.collect()
    assert alive() is not None  # the capsule's owner (numpy's manager_ctx) still holds the array
    del t
    gc.collect()
    assert alive() is not None and v[999] == 999 and w[5] == 5  # views keep it alive
    del v, w
    gc.collect()
    assert alive() is None  # every view gone: the deleter ran and released the array


def test_readonly_input_is_imported_and_refused_as_output():
    a = np.arange(256, dtype=np.float32)
    a.flags.writeable = False
    t = epmoe.from_dlpack(a)  # needs the versioned ABI: the legacy one cannot say read-only
    assert t.readonly and t.data_ptr == addr(a)
    assert not t.numpy().flags.writeable
    q = epmoe.fp8_from_float(a)
    ro = np.zeros(256, np.uint8)
    ro.flags.writeable = False
    with pytest.raises(epmoe.DLPackError, match="read-only"):
        epmoe.fp8_from_float(a, out=ro)
    assert (q == epmoe.fp8_from_float(np.array(a))).all()


def test_empty_and_zero_dim():
    e = np.zeros((0, 128), np.uint16)
    t = epmoe.from_dlpack(e)
    assert t.shape == (0, 128) and t.size == 0 and t.numpy().shape == (0, 128)
    s = epmoe.from_dlpack(np.array(3.5, np.float32))
    assert t.ndim == 2 and s.shape == () and s.numpy() == 3.5
    assert epmoe.as_tensor(np.float32(2.0)).numpy() == 2.0  # scalars and lists go through numpy first
    assert epmoe.as_tensor([1, 2]).shape == (2,)


# ---- export of dtypes numpy lacks --------------------------------------------------------------
def test_bfloat16_view_exports_with_the_dlpack_bfloat_code():
    u = np.arange(16, dtype=np.uint16)
    t = epmoe.from_dlpack(u).view("bfloat16")
    assert t.dtype.name == "bfloat16" and t.data_ptr == addr(u)
    for cap in (t.__dlpack__(), t.__dlpack__(max_version=(1, 0))):
        back = epmoe.from_dlpack(cap)
        assert back.dtype.name == "bfloat16" and back.data_ptr == addr(u)
    assert epmoe.from_dlpack(t.view("uint16")).dtype.name == "uint16"
    assert addr(t.numpy()) == addr(u) and t.numpy().dtype == np.uint16  # numpy sees the bits
    f8 = epmoe.from_dlpack(np.zeros(4, np.uint8)).view("float8_e4m3fn")
    assert epmoe.from_dlpack(f8.__dlpack__(max_version=(1, 0))).dtype.name == "float8_e4m3fn"


def test_a_consumer_that_refuses_gets_its_own_error_not_a_systemerror():
    # numpy has no bfloat16: it refuses the capsule and frees it while its exception is pending;
    # a Python-level deleter would turn that into a SystemError (why export goes through a C producer)
    t = epmoe.from_dlpack(np.arange(4, dtype=np.uint16)).view("bfloat16")
    with pytest.raises((BufferError, RuntimeError, TypeError)) as info:
        np.from_dlpack(t)
    assert not isinstance(info.value, SystemError)


def test_view_needs_the_same_width():
    t = epmoe.from_dlpack(np.zeros(4, np.float32))
    with pytest.raises(TypeError, match="32 bits"):
        t.view("bfloat16")


# ---- errors ---------------------------------------------------------------------------------
def test_non_contiguous_is_a_clear_error():
    a = np.zeros((8, 256), np.float32)
    for bad in (a.T, a[:, ::2], a[::2]):
        with pytest.raises(epmoe.DLPackError, match="contiguous row-major.*strides"):
            epmoe.fp8_from_float(bad)
    # size-1 dimensions may carry any stride: still contiguous
    assert epmoe.from_dlpack(a[:1]).is_contiguous() and epmoe.from_dlpack(a[:, None, :]).is_contiguous()


def test_dtype_and_shape_errors():
    with pytest.raises(TypeError, match="dtype float64.*float32"):
        epmoe.fp8_from_float(np.zeros(4, np.float64))
    with pytest.raises(TypeError, match="uint16 or bfloat16"):
        epmoe.cast_group_fp8(np.zeros((1, 128), np.float32))
    with pytest.raises(ValueError, match=r"expected shape \(4,\)"):
        epmoe.fp8_from_float(np.zeros(4, np.float32), out=np.zeros(5, np.uint8))
    with pytest.raises(TypeError, match="not a DLPack tensor"):
        epmoe.from_dlpack(object())
    with pytest.raises(TypeError, match="no dtype"):
        epmoe.dtype("float128")


# ---- crafted capsules: versions, byte offsets, devices -------------------------------------------
_api = ctypes.pythonapi
_api.PyCapsule_New.restype = ctypes.py_object
_api.PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


_DELETED = []  # addresses our test deleter was called with
# One module-level callback: it outlives every crafted tensor, whatever order objects die in.
_TEST_DELETER = dl._DELETER(lambda p: _DELETED.append(p))


class Crafted:
    """A hand-made producer. Its struct, shape and storage stay alive with this object; the deleter
    (a ctypes callback: fine in a test, where no exception is pending when it runs) records calls."""

    def __init__(self, storage, shape, code, bits, *, versioned, major=1, offset=0, device=(dl.CPU, 0), flags=0):
        self.storage = storage
        self.shape = (ctypes.c_int64 * len(shape))(*shape)
        m = (dl.DLManagedTensorVersioned if versioned else dl.DLManagedTensor)()
        if versioned:
            m.version.major, m.version.minor, m.flags = major, 0, flags
        t = m.dl_tensor
        t.data, t.byte_offset = addr(storage), offset
        t.device.device_type, t.device.device_id = device
        t.ndim, t.shape, t.strides = len(shape), self.shape, None
        t.dtype.code, t.dtype.bits, t.dtype.lanes = code, bits, 1
        m.deleter = ctypes.cast(_TEST_DELETER, ctypes.c_void_p).value
        self.m = m
        self.name = b"dltensor_versioned" if versioned else b"dltensor"
        _DELETED[:] = [p for p in _DELETED if p != ctypes.addressof(m)]

    @property
    def calls(self):
        return [p for p in _DELETED if p == ctypes.addressof(self.m)]

    def capsule(self):
        return _api.PyCapsule_New(ctypes.addressof(self.m), self.name, None)


def test_crafted_versioned_tensor_with_byte_offset():
    store = np.arange(32, dtype=np.uint16)
    c = Crafted(store, (2, 8), 4, 16, versioned=True, offset=16 * 2)
    t = epmoe.from_dlpack(c.capsule())
    assert t.dtype.name == "bfloat16" and t.data_ptr == addr(store) + 32 and t.strides is None
    assert (t.numpy() == store[16:].reshape(2, 8)).all()
    del t
    gc.collect()
    assert len(c.calls) == 1  # our deleter of the capsule ran exactly once


def test_crafted_unknown_major_version_and_dtype_are_refused_and_released():
    store = np.zeros(8, np.float32)
    c = Crafted(store, (8,), 2, 32, versioned=True, major=2)
    with pytest.raises(epmoe.DLPackError, match="DLPack 2.0"):
        epmoe.from_dlpack(c.capsule())
    gc.collect()
    assert len(c.calls) == 1
    c = Crafted(store, (8,), 5, 64, versioned=False)  # complex64: no epmoe dtype
    with pytest.raises(epmoe.DLPackError, match="type code 5"):
        epmoe.from_dlpack(c.capsule())
    gc.collect()
    assert len(c.calls) == 1


def test_readonly_flag_of_a_versioned_capsule():
    store = np.zeros(4, np.float32)
    c = Crafted(store, (4,), 2, 32, versioned=True, flags=dl.FLAG_READ_ONLY)
    t = epmoe.from_dlpack(c.capsule())
    assert t.readonly and not t.numpy().flags.writeable


def test_device_memory_is_refused_by_host_ops():
    store = np.zeros(4, np.float32)
    c = Crafted(store, (4,), 2, 32, versioned=False, device=(dl.CUDA, 1))
    t = epmoe.from_dlpack(c.capsule())
    assert t.is_cuda and t.device_name == "cuda:1" and not t.is_host
    with pytest.raises(epmoe.DLPackError, match="runs on the host"):
        epmoe.fp8_from_float(t)
    with pytest.raises(epmoe.DLPackError, match="host memory"):
        t.numpy()
    with pytest.raises(epmoe.DLPackError, match="unchanged view"):
        t.__dlpack__()
    with pytest.raises(epmoe.DLPackError, match="on cuda:1"):
        epmoe.bf16_to_float(np.zeros(4, np.uint16), out=t)
