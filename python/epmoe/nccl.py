"""EP groups on GPUs, over an NCCL communicator made next to torch.distributed.

One process per GPU, launched the usual way (torchrun, mpirun). The processes already share a
torch.distributed process group; epmoe needs its own NCCL communicator (the EP backend
registers a symmetric window on it), so:

  1. rank 0 of the group gets an NCCL unique id (ncclGetUniqueId, 128 bytes) and
     torch.distributed.broadcast_object_list hands it to every rank;
  2. every rank calls ncclCommInitRank through ctypes on its GPU;
  3. epmoe_ep_create_nccl builds the EP group on that communicator.

    import torch.distributed as dist, epmoe
    dist.init_process_group("nccl")                       # torchrun sets rank and size
    torch.cuda.set_device(local_rank)
    g = epmoe.nccl.create_group(epmoe.EpConfig(max_tokens=128, hidden=7168, num_experts=256, top_k=8))
    d = g.dispatch(x, topk_idx, topk_weights)             # torch tensors on the GPU, no copies
    out = g.combine(d, expert_out)
    g.close()                                             # collective; destroys the communicator too

Launchers without torch can exchange the id themselves (get_unique_id on one rank, any
transport) and call create_group_from_unique_id. Without torch, without libnccl or with a
libepmoe built without NCCL, these functions raise epmoe.Unsupported saying which.

libnccl: the copy libepmoe.so was linked against is already loaded with it, and dlopen by
soname returns that same copy, so the communicator made here is the one the library
understands. The NCCL device API must run against the libnccl it was compiled with: put the
matching one first on LD_LIBRARY_PATH (or set $EPMOE_NCCL_LIB to its path).
"""
import ctypes
import os

from . import _lib
from ._lib import check, lib
from ._util import cint
from .dlpack import CUDA
from .ep import EpConfig, EpGroup, _config

__all__ = ["get_unique_id", "unique_id_from_process_group", "NcclComm", "create_group",
           "create_group_from_unique_id", "create_group_on_comm", "has_nccl_backend", "nccl_version", "UNIQUE_ID_BYTES"]

UNIQUE_ID_BYTES = 128  # sizeof(ncclUniqueId): NCCL_UNIQUE_ID_BYTES in nccl.h


class _UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_char * UNIQUE_ID_BYTES)]


def _unsupported(msg):
    return _lib.error(_lib.ERR_UNSUPPORTED, msg)


_nccl = None


def _load_nccl():
    global _nccl
    if _nccl is not None:
        return _nccl
    path = os.environ.get("EPMOE_NCCL_LIB") or "libnccl.so.2"
    try:
        nccl = ctypes.CDLL(path)
    except OSError as e:
        raise _unsupported(f"cannot load NCCL ({path}): {e}. Install NCCL or put its lib folder on "
                           "LD_LIBRARY_PATH, or set $EPMOE_NCCL_LIB to libnccl.so.2") from None
    res = ctypes.c_int
    sigs = {"ncclGetVersion": (res, [ctypes.POINTER(ctypes.c_int)]),
            "ncclGetUniqueId": (res, [ctypes.POINTER(_UniqueId)]),
            # the unique id goes by value: ncclCommInitRank(ncclComm_t*, int, ncclUniqueId, int)
            "ncclCommInitRank": (res, [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, _UniqueId, ctypes.c_int]),
            "ncclCommDestroy": (res, [ctypes.c_void_p]),
            "ncclGetErrorString": (ctypes.c_char_p, [res])}
    for name, (rt, args) in sigs.items():
        f = getattr(nccl, name)
        f.restype, f.argtypes = rt, args
    _nccl = nccl
    return nccl


def _nccl_check(result, what):
    if result != 0:
        msg = _load_nccl().ncclGetErrorString(result).decode(errors="replace")
        raise _lib.error(_lib.ERR_NCCL, f"{what}: NCCL error {result}: {msg}")


def nccl_version():
    """The loaded libnccl's version code (e.g. 22809 for 2.28.9)."""
    v = ctypes.c_int(0)
    _nccl_check(_load_nccl().ncclGetVersion(ctypes.byref(v)), "ncclGetVersion")
    return v.value


def has_nccl_backend():
    """True when this libepmoe was built with the NCCL EP backend. (Probed by asking for a group on
    a NULL communicator: a NCCL build refuses the pointer, a CPU-only build the whole call.)"""
    c, ep = EpConfig()._c(), ctypes.c_void_p()
    return lib.epmoe_ep_create_nccl(None, ctypes.byref(c), ctypes.byref(ep)) != _lib.ERR_UNSUPPORTED


def get_unique_id():
    """A new NCCL unique id (128 bytes): made on one rank, sent to all by any means."""
    uid = _UniqueId()
    _nccl_check(_load_nccl().ncclGetUniqueId(ctypes.byref(uid)), "ncclGetUniqueId")
    return ctypes.string_at(ctypes.addressof(uid), UNIQUE_ID_BYTES)


def _torch_dist():
    try:
        import torch
        import torch.distributed as dist
    except ImportError:
        raise _unsupported("epmoe.nccl.create_group / unique_id_from_process_group need torch (torch.distributed); "
                           "without torch, exchange get_unique_id() yourself and call "
                           "create_group_from_unique_id") from None
    if not dist.is_available() or not dist.is_initialized():
        raise _unsupported("torch.distributed is not initialized: call torch.distributed.init_process_group first")
    return torch, dist


def unique_id_from_process_group(group=None, src=None):
    """An NCCL unique id shared by every rank of a torch.distributed process group: made on `src`
    (a global rank; default: the group's first rank) and broadcast with broadcast_object_list.
    Collective over `group`. With an NCCL process group the broadcast runs on the current CUDA
    device, so set it (torch.cuda.set_device) first."""
    torch, dist = _torch_dist()
    if src is None:
        src = dist.get_global_rank(group, 0) if group is not None else 0
    obj = [get_unique_id() if dist.get_rank() == src else None]
    dist.broadcast_object_list(obj, src=src, group=group)
    uid = obj[0]
    if not isinstance(uid, (bytes, bytearray)) or len(uid) != UNIQUE_ID_BYTES:
        raise _lib.error(_lib.ERR_NCCL, f"the broadcast NCCL unique id is not {UNIQUE_ID_BYTES} bytes")
    return bytes(uid)


def _device_index(device):
    """A CUDA device index from None (torch's current device), an int, "cuda:1" or a torch.device."""
    if device is None:
        try:
            import torch
        except ImportError:
            return 0
        return torch.cuda.current_device()
    if isinstance(device, int):
        return device
    idx = getattr(device, "index", None)
    if idx is not None:
        return int(idx)
    s = str(device)
    return int(s.split(":", 1)[1]) if ":" in s else 0


def _set_device(index):
    try:
        import torch
    except ImportError:
        return  # the caller made `index` current (e.g. cudaSetDevice) before calling us
    torch.cuda.set_device(index)


class NcclComm:
    """An NCCL communicator made with ncclCommInitRank (collective: every rank constructs it with the
    same unique id). `handle` is the ncclComm_t. close() destroys it."""

    def __init__(self, unique_id, num_ranks, rank, device=None):
        if len(unique_id) != UNIQUE_ID_BYTES:
            raise ValueError(f"an NCCL unique id has {UNIQUE_ID_BYTES} bytes, got {len(unique_id)}")
        num_ranks, rank = cint(num_ranks, "num_ranks"), cint(rank, "rank")  # ncclCommInitRank's ints
        nccl = _load_nccl()
        self.device = _device_index(device)
        _set_device(self.device)
        uid = _UniqueId()
        ctypes.memmove(ctypes.addressof(uid), bytes(unique_id), UNIQUE_ID_BYTES)
        comm = ctypes.c_void_p()
        _nccl_check(nccl.ncclCommInitRank(ctypes.byref(comm), num_ranks, uid, rank),
                    f"ncclCommInitRank(rank {rank} of {num_ranks})")
        self._comm, self.num_ranks, self.rank = comm, num_ranks, rank

    @property
    def handle(self):
        return self._comm.value

    def close(self):
        comm, self._comm = self._comm, ctypes.c_void_p(0)
        if comm.value:
            _nccl_check(_load_nccl().ncclCommDestroy(comm), "ncclCommDestroy")

    def __del__(self):
        if getattr(self, "_comm", None) is not None and self._comm.value:
            try:
                self.close()
            except Exception:
                pass


def _require_backend():
    if not has_nccl_backend():
        raise _unsupported(f"{_lib.LIBRARY_PATH} was built without the NCCL EP backend (needs nvcc and NCCL's device "
                           "API headers at build time); only the CPU backend is available")


def create_group_on_comm(comm, config=None, **overrides):
    """This rank's EpGroup on an existing NcclComm (collective over its ranks; num_ranks and rank
    come from it). Several groups may share one communicator (each registers its own window). The
    group does not own it: close every group made on it before comm.close()."""
    _require_backend()
    if not isinstance(comm, NcclComm):
        raise TypeError(f"create_group_on_comm: comm must be an epmoe.nccl.NcclComm, got {type(comm).__name__}")
    if not comm.handle:
        raise _lib.error(_lib.ERR_INVALID_ARG, "create_group_on_comm: the communicator is closed")
    cfg = _config(config, dict(overrides, num_ranks=comm.num_ranks, rank=comm.rank))
    _set_device(comm.device)
    c, ep = cfg._c(), ctypes.c_void_p()
    check(lib.epmoe_ep_create_nccl(comm.handle, ctypes.byref(c), ctypes.byref(ep)))
    g = EpGroup(ep.value, cfg, device=(CUDA, comm.device))
    g._comm_ref = comm  # alive while the group is (the library uses it until the group is destroyed)
    return g


def create_group_from_unique_id(unique_id, num_ranks, rank, config=None, *, device=None, **overrides):
    """This rank's EpGroup on a new NCCL communicator (collective). The group owns the
    communicator and destroys it when it is closed."""
    _require_backend()
    comm = NcclComm(unique_id, num_ranks, rank, device)
    try:
        g = create_group_on_comm(comm, config, **overrides)
    except BaseException:
        comm.close()
        raise
    g._comm = comm  # closed after the group (EpGroup.close)
    return g


def create_group(config=None, *, process_group=None, device=None, **overrides):
    """This rank's EpGroup over the ranks of a torch.distributed process group (default: WORLD),
    one GPU per rank (`device`, default torch's current device). Collective over the group."""
    _require_backend()
    torch, dist = _torch_dist()
    index = _device_index(device)
    torch.cuda.set_device(index)
    rank, size = dist.get_rank(process_group), dist.get_world_size(process_group)
    uid = unique_id_from_process_group(process_group)
    return create_group_from_unique_id(uid, size, rank, config, device=index, **overrides)
