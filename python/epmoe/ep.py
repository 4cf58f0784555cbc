"""Expert-parallel dispatch and combine (include/epmoe.h, "expert-parallel dispatch and combine").

One EpGroup per rank. On the CPU backend a CpuWorld holds R ranks that are threads of this
process: each rank's thread creates its group and calls dispatch/combine itself, and the calls
block inside the library (with the GIL released) until the peers' data has arrived — the same
protocol the GPUs run over NVLink. `CpuWorld.run(fn)` does the threading. On GPUs, see
`epmoe.nccl.create_group`.

Outputs are numpy arrays on the CPU backend and torch tensors on GPUs; every buffer can also be
the caller's own (zero-copy, any DLPack tensor).
"""
import ctypes
import dataclasses
import sys
import threading
import warnings
import weakref

import numpy as np

from . import _lib
from ._lib import check, lib
from ._util import InUse, arg, cint, on_device, output, ptr, raw_output, same_device, stream_handle
from .dlpack import CPU, DLPackError, Tensor, current_raw_stream
from .formats import SCALE_F32_MMAJOR, _fmt, scale_dtypes, scale_shape

__all__ = ["EpConfig", "EpLayout", "EpGroup", "Dispatch", "CpuWorld", "layout_query", "dispatch_ref", "combine_ref",
           "WIRE_BF16", "WIRE_FP8", "REDUCE_AT_OWNER", "REDUCE_AT_EXPERT", "MAX_TOPK"]

WIRE_BF16, WIRE_FP8 = 0, 1
REDUCE_AT_OWNER, REDUCE_AT_EXPERT = 0, 1
BACKEND_CPU, BACKEND_NCCL_LSA = 0, 1
PHASE_SEND, PHASE_RECV, PHASE_BOTH = 1, 2, 3
MAX_TOPK = 16
_WIRES = {"bf16": WIRE_BF16, "fp8": WIRE_FP8}
# epmoe_transport (NCCL groups only; the CPU world ignores it): "auto" lets creation choose (and
# the EPMOE_EP_TRANSPORT environment variable decide), "device" / "alltoall" insist
_TRANSPORTS = {"auto": 0, "device": 1, "alltoall": 2, "gin-emulated": 3, "gin": 4}
_MODES = {"reduce_at_owner": REDUCE_AT_OWNER, "owner": REDUCE_AT_OWNER,
          "reduce_at_expert": REDUCE_AT_EXPERT, "expert": REDUCE_AT_EXPERT}
_BACKENDS = {BACKEND_CPU: "cpu", BACKEND_NCCL_LSA: "nccl_lsa"}


# ---- C structs (mirrors of include/epmoe.h; config.size lets the library catch a mismatch) --------
class _ConfigC(ctypes.Structure):
    _fields_ = [("size", ctypes.c_size_t), ("num_ranks", ctypes.c_int), ("rank", ctypes.c_int),
                ("max_tokens", ctypes.c_int), ("hidden", ctypes.c_int), ("num_experts", ctypes.c_int),
                ("top_k", ctypes.c_int), ("wire", ctypes.c_int), ("scale_fmt", ctypes.c_int),
                ("round_scale", ctypes.c_int), ("dedup", ctypes.c_int), ("combine_mode", ctypes.c_int),
                ("timeout_ms", ctypes.c_int), ("transport", ctypes.c_int)]


class _LayoutC(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("recv_x_bytes", "recv_scales_bytes", "masked_m_bytes", "src_info_bytes",
                                               "expert_out_bytes", "out_bytes", "msg_bytes", "window_bytes",
                                               "state_bytes")]


class _DispatchArgsC(ctypes.Structure):
    _fields_ = [("x", ctypes.c_void_p), ("topk_idx", ctypes.c_void_p), ("topk_idx_bits", ctypes.c_int),
                ("topk_weights", ctypes.c_void_p), ("num_tokens", ctypes.c_int), ("recv_x", ctypes.c_void_p),
                ("recv_scales", ctypes.c_void_p), ("masked_m", ctypes.c_void_p), ("recv_src_info", ctypes.c_void_p),
                ("requant_scale", ctypes.c_void_p)]


class _CombineArgsC(ctypes.Structure):
    _fields_ = [("expert_out", ctypes.c_void_p), ("topk_weights", ctypes.c_void_p), ("out", ctypes.c_void_p)]


# ---- configuration and layout -------------------------------------------------------------------
@dataclasses.dataclass
class EpConfig:
    """epmoe_ep_config. Defaults are those of EPMOE_EP_CONFIG_INIT (DeepSeek-R1 decode, EP1).

    transport (NCCL groups): "auto" (the device API where every rank can use it, else the padded
    all-to-all; EPMOE_EP_TRANSPORT decides under auto), "device", "alltoall", "gin" (put/signal
    over the NIC) or "gin-emulated" (the same protocol over NVLink, for tests).
    wire: "fp8" (per-token 1x128 scales, cast inside the send) or "bf16"; combine_mode:
    "reduce_at_expert" (each expert rank sums its share first; weights go to dispatch) or
    "reduce_at_owner" (every row travels back; weights go to combine; bit-exact vs a sequential
    fp32 sum). scale_fmt: SCALE_* or its name; UE8M0 formats need round_scale.
    """
    num_ranks: int = 1
    rank: int = 0
    max_tokens: int = 128
    hidden: int = 7168
    num_experts: int = 256
    top_k: int = 8
    wire: object = "fp8"
    scale_fmt: object = SCALE_F32_MMAJOR
    round_scale: bool = False
    dedup: bool = True
    combine_mode: object = "reduce_at_expert"
    timeout_ms: int = 10000
    transport: object = "auto"

    @property
    def local_experts(self):
        """L = E / R experts per rank (rank r owns [r*L, (r+1)*L))."""
        return self.num_experts // self.num_ranks

    @property
    def rows(self):
        """R * N: rows of each local expert's receive slab."""
        return self.num_ranks * self.max_tokens

    @property
    def wire_code(self):
        return _code(self.wire, _WIRES, "wire")

    @property
    def combine_code(self):
        return _code(self.combine_mode, _MODES, "combine_mode")

    @property
    def transport_code(self):
        return _code(self.transport, _TRANSPORTS, "transport")

    @property
    def fp8(self):
        return self.wire_code == WIRE_FP8

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def _c(self):
        c = _ConfigC()
        c.size = ctypes.sizeof(_ConfigC)
        for f in ("num_ranks", "rank", "max_tokens", "hidden", "num_experts", "top_k", "timeout_ms"):
            setattr(c, f, cint(getattr(self, f), f"EpConfig.{f}"))
        c.wire, c.scale_fmt, c.combine_mode = self.wire_code, _fmt(self.scale_fmt), self.combine_code
        c.round_scale, c.dedup = int(bool(self.round_scale)), int(bool(self.dedup))
        c.transport = self.transport_code
        return c


def _code(v, names, what):
    if isinstance(v, str):
        try:
            return names[v.lower()]
        except KeyError:
            raise ValueError(f"{what} {v!r}: expected one of {', '.join(names)}") from None
    return cint(v, what)


def _config(config, overrides):
    cfg = config if config is not None else EpConfig()
    if not isinstance(cfg, EpConfig):
        raise TypeError(f"config must be an EpConfig, got {type(cfg).__name__}")
    return cfg.replace(**overrides) if overrides else cfg


@dataclasses.dataclass(frozen=True)
class EpLayout:
    """epmoe_ep_layout: bytes of every buffer, from the configuration alone."""
    recv_x_bytes: int
    recv_scales_bytes: int
    masked_m_bytes: int
    src_info_bytes: int
    expert_out_bytes: int
    out_bytes: int
    msg_bytes: int
    window_bytes: int
    state_bytes: int

    @property
    def library_bytes(self):
        """What the library itself holds per rank (its window and private state)."""
        return self.window_bytes + self.state_bytes


def layout_query(config=None, **overrides):
    """Sizes of everything an ep uses, before creating anything (validates the configuration)."""
    cfg = _config(config, overrides)
    c, out = cfg._c(), _LayoutC()
    check(lib.epmoe_ep_layout_query(ctypes.byref(c), ctypes.byref(out)))
    return EpLayout(*(getattr(out, n) for n, _ in _LayoutC._fields_))


# ---- one dispatch ---------------------------------------------------------------------------------
class Dispatch:
    """The outputs of one dispatch on one rank, and its handle for combine.

    recv_x      [L, R*N, H] fp8 bytes (FP8 wire) or bf16 bits (BF16 wire); rows [0, masked_m[le])
                of each local expert le are valid, in (source rank, token, top-k slot) order
    recv_scales the group scales of the FP8 wire: L slabs shaped scale_shape(fmt, R*N, H)
                (None for the BF16 wire and with a per-tensor requant scale)
    masked_m    int32 [L]
    src_info    int32 [L, R*N]: source rank * N + token index (None when not asked for)
    out         after combine: bf16 [T, H] (uint16 bits in numpy)
    """

    def __init__(self, group, cfg):
        self.group, self._cfg = group, cfg
        self.handle = 0
        self.num_tokens = 0
        self.recv_x = self.recv_scales = self.masked_m = self.src_info = self.out = None
        self.received = self.combined = False
        self._args = _DispatchArgsC()
        self._keep = {}      # every tensor the library may still read or write for this call
        self._weights = None  # topk_weights given to dispatch (combine's default under REDUCE_AT_OWNER)
        self._combine = None

    def rows(self, le):
        """The valid received rows of local expert le (a view: recv_x[le, :masked_m[le]])."""
        return self.recv_x[le, : int(self.masked_m[le])]

    def __repr__(self):
        return (f"<epmoe.Dispatch handle={self.handle} rank={self._cfg.rank} tokens={self.num_tokens} "
                f"received={self.received} combined={self.combined}>")


# ---- the group --------------------------------------------------------------------------------------
class EpGroup:
    """One rank's EP group (epmoe_ep). Calls are collective: every rank makes the same sequence of
    dispatch/combine calls. Create it through CpuWorld.create_group / CpuWorld.run or
    epmoe.nccl.create_group; close() is collective too."""

    def __init__(self, handle, config, *, world=None, comm=None, device=(CPU, 0)):
        self._ep = ctypes.c_void_p(handle)
        self._use = InUse("this EP group")  # close() waits for the calls of other threads to return
        self.config = config
        self.layout = layout_query(config)
        self.device = device
        self._like_t = Tensor(0, (0,), "uint8", device)  # where outputs are allocated (_like)
        self._world, self._comm = world, comm  # destroyed after this group, never before
        self._lock = threading.Lock()
        # layers made on this group: closed before it (a layer uses the ep); weak, so a layer
        # dropped by its owner frees its buffers without waiting for the group
        self._layers = weakref.WeakSet()
        # phased layer forwards sent and not yet received on this group, in send order (layer.py):
        # their receives follow that order, and they keep what the library still reads alive
        self._forwards = []

    # -- description
    @property
    def rank(self):
        return self.config.rank

    @property
    def num_ranks(self):
        return self.config.num_ranks

    @property
    def backend(self):
        """"cpu" or "nccl_lsa"."""
        with self._use.call():
            return _BACKENDS.get(lib.epmoe_ep_backend(self._ep), "unknown")

    @property
    def closed(self):
        return not self._ep.value

    def _live(self):
        if not self._ep.value:
            raise _lib.error(_lib.ERR_INVALID_ARG, "this EP group is closed")

    def _state(self):
        try:
            return "closed" if self.closed else self.backend
        except _lib.InvalidArgument:  # closing on another thread
            return "closing"

    def __repr__(self):
        return f"<epmoe.EpGroup rank {self.rank}/{self.num_ranks} {self._state()}>"

    # -- lifetime
    def close(self):
        """Collective teardown (all ranks call it). A group that timed out leaves without waiting.
        A call of another thread still inside the library on this group (a dispatch waiting for its
        peers, a layer's forward) is waited for first: its memory goes with the group."""
        self._use.close()
        with self._lock:  # a snapshot: a layer closing on another thread takes itself out of the set
            layers = list(self._layers)
        for layer in layers:
            layer._destroy()  # even with a forward in flight: the ep goes too, nothing reaches its buffers after
        with self._lock:
            ep, self._ep = self._ep, ctypes.c_void_p(0)
        if ep.value:
            try:
                check(lib.epmoe_ep_destroy(ep))
            finally:
                if self._comm is not None:
                    self._comm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_ep", None) is not None and self._ep.value:
            # Destroy is collective: from a garbage collector it waits (at most timeout_ms) for peers
            # that may never come. Close groups explicitly.
            warnings.warn(f"epmoe.EpGroup rank {self.rank} was not closed", ResourceWarning, stacklevel=1)
            try:
                self.close()
            except Exception:
                pass

    # -- the MoE layer
    def layer(self, weights=None, *, scheme="w4afp8", intermediate=None, per_tensor_act=False, a1_scale=None,
              a2_scale=None, expected_m=0):
        """A MoE layer on this group (epmoe.layer.Layer; not collective): weights=(w13, w2) of this
        rank's local experts ([L, 2I, H] and [L, H, I]: W4A8Weights for w4afp8, ExpertWeights for the
        other schemes); intermediate I (default: from
        w2); per_tensor_act with a1_scale, a2_scale for static per-tensor activation scales;
        expected_m: rows per local expert the GEMM tiles are chosen for (0: N*R*k/E).
        layer.forward(x, topk_idx, topk_weights) is collective, like dispatch."""
        from .layer import Layer  # layer.py builds on this module
        return Layer(self, weights, scheme=scheme, intermediate=intermediate, per_tensor_act=per_tensor_act,
                     a1_scale=a1_scale, a2_scale=a2_scale, expected_m=expected_m)

    # -- control
    def set_active_ranks(self, active):
        """Mask ranks out (active[r] = 0) from the next dispatch on: same list on every live rank."""
        flags = _active_flags(active, self.num_ranks, "set_active_ranks")
        with self._use.call():
            check(lib.epmoe_ep_set_active_ranks(self._ep, flags))

    def poll(self):
        """Raise the error the GPU kernels recorded without a host sync: a peer timed out (the group
        is failed; every later call raises it too), or an expert id outside [-1, E) in an earlier
        dispatch (raised here once; its slots went out as -1 and every rank's calls completed)."""
        with self._use.call():
            check(lib.epmoe_ep_poll(self._ep))

    # -- checks shared by the calls
    def _inputs_on_device(self, tensors, what):
        dev = same_device(tensors, what)
        present = [t for _, t in tensors if t is not None]
        if self.device[0] == CPU:
            if not all(t.is_host for t in present):
                raise DLPackError(f"{what}: this group runs on the CPU backend; the tensors are on {present[0].device_name}")
        elif dev != self.device:
            raise DLPackError(f"{what}: this group runs on cuda:{self.device[1]}; the tensors are on "
                              f"{present[0].device_name}")

    def _stream(self, stream):
        """The stream of a GPU call: the caller's, else torch's current stream on the group's GPU (so
        the receive halves, which take no tensors, land on the same stream as the sends), else the
        legacy default stream. None on the CPU backend."""
        if self.device[0] == CPU:
            return None
        if stream is not None:
            return stream_handle(stream)
        torch = sys.modules.get("torch")
        return current_raw_stream(torch, self.device[1]) if torch is not None else 0

    def _like(self):
        """A placeholder Tensor on the group's device, to allocate outputs there."""
        return self._like_t

    # -- dispatch
    def dispatch(self, x, topk_idx, topk_weights=None, *, requant_scale=None, src_info=True, buffers=None,
                 stream=None, phase=PHASE_BOTH):
        """Send this rank's tokens x [T, H] (bf16) to the owners of their experts and receive this
        rank's experts' rows. topk_idx [T, k] int32 or int64, -1 = no expert; topk_weights
        [T, k] float32 (needed here under REDUCE_AT_EXPERT). requant_scale (FP8 wire): rows come
        out at this per-tensor scale (the PR #22316 requant folded into the receive).
        buffers: an earlier Dispatch (combined and no longer needed) or a dict with any of
        recv_x, recv_scales, masked_m, src_info, whose memory is reused. Returns a Dispatch."""
        self._live()
        cfg = self.config
        s = self._stream(stream)
        xt = arg(x, "x", ("uint16", "bfloat16"), ndim=2, stream=s)
        T = xt.shape[0]
        if xt.shape[1] != cfg.hidden:
            raise ValueError(f"dispatch: x is {xt.shape}, the group's hidden size is {cfg.hidden}")
        it = arg(topk_idx, "topk_idx", ("int32", "int64"), ndim=2, stream=s)
        if it.shape != (T, cfg.top_k):
            raise ValueError(f"dispatch: topk_idx is {it.shape}, expected [{T}, {cfg.top_k}] (tokens, top_k)")
        wt = arg(topk_weights, "topk_weights", ("float32",), ndim=2, stream=s, allow_none=True)
        if wt is not None and wt.shape != (T, cfg.top_k):
            raise ValueError(f"dispatch: topk_weights is {wt.shape}, expected [{T}, {cfg.top_k}]")
        rq = None
        if requant_scale is not None:
            from .formats import _scalar_scale  # the same rule as the quant ops' per-tensor scales
            requant_scale, rq = _scalar_scale(requant_scale, "requant_scale", xt, s)
        self._inputs_on_device([("x", xt), ("topk_idx", it), ("topk_weights", wt), ("requant_scale", rq)], "dispatch")

        d = Dispatch(self, cfg)
        self._receive_buffers(d, buffers, src_info, requant_scale is not None, s)
        a = d._args
        a.x, a.topk_idx, a.topk_idx_bits = ptr(xt), ptr(it), it.dtype.bits
        a.topk_weights, a.num_tokens, a.requant_scale = ptr(wt), cint(T, "dispatch: x's token count"), ptr(rq)
        d.num_tokens, d._weights = T, topk_weights
        d._keep.update(x=xt, topk_idx=it, topk_weights=wt, requant_scale=rq)
        handle = ctypes.c_uint32(0)
        with self._use.call(), on_device(self._like()):
            check(lib.epmoe_dispatch(self._ep, ctypes.byref(a), int(phase), ctypes.byref(handle), s))
        d.handle = handle.value
        d.received = bool(int(phase) & PHASE_RECV)
        return d

    def dispatch_send(self, x, topk_idx, topk_weights=None, **kw):
        """The send half of dispatch; dispatch_recv(d) completes it (overlap compute in between)."""
        return self.dispatch(x, topk_idx, topk_weights, phase=PHASE_SEND, **kw)

    def dispatch_recv(self, d, *, stream=None):
        """The receive half of a dispatch_send; receives follow dispatch order."""
        self._live()
        self._own(d)
        if d.received:
            raise _lib.error(_lib.ERR_INVALID_ARG, f"dispatch {d.handle} was already received")
        s = self._stream(stream)
        handle = ctypes.c_uint32(d.handle)
        with self._use.call(), on_device(self._like()):
            check(lib.epmoe_dispatch(self._ep, ctypes.byref(d._args), PHASE_RECV, ctypes.byref(handle), s))
        d.received = True
        return d

    def _receive_buffers(self, d, buffers, want_src, requant, s):
        cfg, lay = self.config, self.layout
        L, M, H = cfg.local_experts, cfg.rows, cfg.hidden
        like = self._like()
        if isinstance(buffers, Dispatch):
            buffers = {"recv_x": buffers.recv_x, "recv_scales": buffers.recv_scales, "masked_m": buffers.masked_m,
                       "src_info": buffers.src_info}
        buffers = dict(buffers or {})
        unknown = set(buffers) - {"recv_x", "recv_scales", "masked_m", "src_info"}
        if unknown:
            raise ValueError(f"dispatch: unknown buffers {sorted(unknown)}")
        if cfg.fp8:
            host, gpu = ("uint8", "float8_e4m3fn"), ("float8_e4m3fn", "uint8")
        else:
            host, gpu = ("uint16", "bfloat16"), ("bfloat16", "uint16")
        d.recv_x, rx = output(buffers.get("recv_x"), "recv_x", (L, M, H), host if like.is_host else gpu, like, stream=s)
        rs = None
        if cfg.fp8 and not requant:
            shape, dt = scale_shape(cfg.scale_fmt, M, H)
            d.recv_scales, rs = raw_output(buffers.get("recv_scales"), "recv_scales", lay.recv_scales_bytes, like,
                                           stream=s, shape=(L,) + shape, dt=dt, dtypes=scale_dtypes(cfg.scale_fmt))
        d.masked_m, mm = output(buffers.get("masked_m"), "masked_m", (L,), ("int32",), like, stream=s)
        si = None
        if want_src or buffers.get("src_info") is not None:
            d.src_info, si = output(buffers.get("src_info"), "src_info", (L, M), ("int32",), like, stream=s)
        a = d._args
        a.recv_x, a.recv_scales, a.masked_m, a.recv_src_info = ptr(rx), ptr(rs), ptr(mm), ptr(si)
        d._keep.update(recv_x=rx, recv_scales=rs, masked_m=mm, src_info=si)

    def _own(self, d):
        if not isinstance(d, Dispatch) or d.group is not self:
            raise _lib.error(_lib.ERR_INVALID_ARG, "this Dispatch belongs to another EP group")

    # -- combine
    def combine(self, d, expert_out, topk_weights=None, *, out=None, stream=None, phase=PHASE_BOTH):
        """Send expert outputs back and sum each token: out[t] = sum_j w[t, j] * y(t, j) in fp32,
        bf16 [T, H]. expert_out: bf16 [L, R*N, H], rows as dispatch delivered them.
        topk_weights [T, k] float32 is used under REDUCE_AT_OWNER (default: those given to
        dispatch). Returns out (None for the send half alone)."""
        self._live()
        self._own(d)
        cfg = self.config
        if not d.received:
            raise _lib.error(_lib.ERR_INVALID_ARG, f"combine: dispatch {d.handle} has not been received")
        s = self._stream(stream)
        et = arg(expert_out, "expert_out", ("uint16", "bfloat16"), ndim=3, stream=s)
        if et.shape != (cfg.local_experts, cfg.rows, cfg.hidden):
            raise ValueError(f"combine: expert_out is {et.shape}, expected [{cfg.local_experts}, {cfg.rows}, "
                             f"{cfg.hidden}] (local experts, R*N, H)")
        wt = None
        if cfg.combine_code == REDUCE_AT_OWNER:
            w = topk_weights if topk_weights is not None else d._weights
            wt = arg(w, "topk_weights", ("float32",), ndim=2, stream=s, allow_none=True)
            if wt is not None and wt.shape != (d.num_tokens, cfg.top_k):
                raise ValueError(f"combine: topk_weights is {wt.shape}, expected [{d.num_tokens}, {cfg.top_k}]")
        like = self._like()
        T, H = d.num_tokens, cfg.hidden
        o, ot = output(out, "out", (T, H), ("uint16", "bfloat16") if like.is_host else ("bfloat16", "uint16"), like,
                       stream=s)
        self._inputs_on_device([("expert_out", et), ("topk_weights", wt), ("out", ot)], "combine")
        ca = _CombineArgsC(ptr(et), ptr(wt), ptr(ot))
        d._combine = (ca, et, wt, ot)  # the library reads/writes these until the receive half is done
        d.out = o
        with self._use.call(), on_device(like):
            check(lib.epmoe_combine(self._ep, d.handle, ctypes.byref(ca), int(phase), s))
        if int(phase) & PHASE_RECV:
            d.combined = True
            return o
        return None

    def combine_send(self, d, expert_out, topk_weights=None, **kw):
        """The send half of combine; combine_recv(d) returns the output."""
        return self.combine(d, expert_out, topk_weights, phase=PHASE_SEND, **kw)

    def combine_recv(self, d, *, stream=None):
        self._live()
        self._own(d)
        if d._combine is None:
            raise _lib.error(_lib.ERR_INVALID_ARG, f"combine_recv: dispatch {d.handle} has no combine send")
        s = self._stream(stream)
        with self._use.call(), on_device(self._like()):
            check(lib.epmoe_combine(self._ep, d.handle, ctypes.byref(d._combine[0]), PHASE_RECV, s))
        d.combined = True
        return d.out


# ---- the CPU world --------------------------------------------------------------------------------
class CpuWorld:
    """R ranks as threads of this process (epmoe_cpu_world). Each rank's thread calls
    create_group(rank) — collectively — and then dispatch/combine; run(fn) does all of that. A world
    holds any number of groups, as a communicator does (made and closed in the same order on every
    rank); closing it while groups are open is allowed: it goes when the last of them is closed."""

    def __init__(self, num_ranks):
        self.num_ranks = cint(num_ranks, "num_ranks")
        w = ctypes.c_void_p()
        check(lib.epmoe_cpu_world_create(self.num_ranks, ctypes.byref(w)))
        self._w = w

    def create_group(self, rank, config=None, **overrides):
        """This rank's EpGroup (collective: every rank's thread calls it). num_ranks and rank are
        filled in from the world and `rank`."""
        if not self._w.value:
            raise _lib.error(_lib.ERR_INVALID_ARG, "this CpuWorld is closed")
        cfg = _config(config, dict(overrides, num_ranks=self.num_ranks, rank=cint(rank, "rank")))
        c, ep = cfg._c(), ctypes.c_void_p()
        check(lib.epmoe_ep_create_cpu(self._w, ctypes.byref(c), ctypes.byref(ep)))
        return EpGroup(ep.value, cfg, world=self)

    def run(self, fn, config=None, *, join_timeout=None, **overrides):
        """Run fn(group) on every rank, each in its own thread with its own group, and return the
        per-rank results. If ranks raise, the first exception that is not a peer's timeout (the
        cause rather than its echo) is raised, after every thread has ended."""
        results, errors = [None] * self.num_ranks, []

        def rank_main(r):
            try:
                g = self.create_group(r, config, **overrides)
            except BaseException as e:  # noqa: B902 - reported to the caller below
                errors.append((r, e))
                return
            try:
                results[r] = fn(g)
            except BaseException as e:  # noqa: B902
                errors.append((r, e))
            finally:
                try:
                    g.close()
                except BaseException as e:  # noqa: B902
                    errors.append((r, e))

        threads = [threading.Thread(target=rank_main, args=(r,), name=f"epmoe-rank-{r}", daemon=True)
                   for r in range(self.num_ranks)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(join_timeout)
        if any(t.is_alive() for t in threads):
            raise TimeoutError(f"CpuWorld.run: ranks still running after {join_timeout} s")
        if errors:
            errors.sort(key=lambda re_: (isinstance(re_[1], _lib.Timeout), re_[0]))
            rank, exc = errors[0]
            if hasattr(exc, "add_note"):
                exc.add_note(f"(raised on rank {rank} of {self.num_ranks}"
                             + (f"; {len(errors) - 1} other rank(s) failed too)" if len(errors) > 1 else ")"))
            raise exc
        return results

    def close(self):
        w, self._w = self._w, ctypes.c_void_p(0)
        if w.value:
            lib.epmoe_cpu_world_destroy(w)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_w", None) is not None:
            self.close()


# ---- the single-process reference ----------------------------------------------------------------
def _ref_config(config):
    """A reference's config: given, and an EpConfig (there is no default group to check against)."""
    if not isinstance(config, EpConfig):
        raise TypeError(f"config must be an EpConfig, got {type(config).__name__}")
    return config


def _per_rank(items, n, name, dtypes, shape_of):
    """One host tensor per rank; shape_of(r) is rank r's shape, None where any size goes (the tokens
    of the first list, which sets them for the others)."""
    if items is None or not hasattr(items, "__len__"):
        raise TypeError(f"{name}: needs a sequence of one entry per rank ({n}), got {type(items).__name__}")
    if len(items) != n:
        raise ValueError(f"{name}: needs one entry per rank ({n}), got {len(items)}")
    ts = []
    for r, obj in enumerate(items):
        want = shape_of(r)
        t = arg(obj, f"{name}[{r}]", dtypes, ndim=len(want))
        if not t.is_host:
            raise DLPackError(f"{name}[{r}]: the reference runs on the host")
        if any(w is not None and w != d for w, d in zip(want, t.shape)):
            shown = ", ".join("T" if w is None else str(w) for w in want)
            raise ValueError(f"{name}[{r}]: shape {t.shape}, expected [{shown}]")
        ts.append(t)
    return ts


def _tokens(ts, name):
    """The per-rank token counts (int num_tokens[R]) of the tensors that set them."""
    counts = [cint(t.shape[0], f"{name}[{r}]: the token count") for r, t in enumerate(ts)]
    return counts, (ctypes.c_int * len(counts))(*counts)


def _active_flags(active, n, what):
    """int active[n] (1 = in) from a list of n flags; None stays None (every rank in)."""
    if active is None:
        return None
    if len(active) != n:
        raise ValueError(f"{what}: active needs one flag per rank ({n}), got {len(active)}")
    return (ctypes.c_int * n)(*[int(bool(v)) for v in active])


def _ptr_array(ts):
    return (ctypes.c_void_p * len(ts))(*[ptr(t) for t in ts])


def dispatch_ref(config, xs, topk_idxs, *, active=None):
    """epmoe_ep_dispatch_ref: dispatch over all ranks in one call (the tests' oracle).
    xs[r] bf16 [T_r, H], topk_idxs[r] int32 [T_r, k]; returns one dict per rank with recv_x,
    recv_scales (FP8 wire), masked_m and src_info, laid out as EpGroup.dispatch gives them."""
    cfg = _ref_config(config)
    R, L, M, H, k = cfg.num_ranks, cfg.local_experts, cfg.rows, cfg.hidden, cfg.top_k
    xt = _per_rank(xs, R, "xs", ("uint16", "bfloat16"), lambda r: (None, H))
    Ts, n_tok = _tokens(xt, "xs")
    it = _per_rank(topk_idxs, R, "topk_idxs", ("int32",), lambda r: (Ts[r], k))
    act = _active_flags(active, R, "dispatch_ref")
    lay = layout_query(cfg)
    outs = []
    for _ in range(R):
        o = {"recv_x": np.zeros((L, M, H), np.uint8 if cfg.fp8 else np.uint16),
             "masked_m": np.zeros(L, np.int32), "src_info": np.full((L, M), -1, np.int32)}
        if cfg.fp8:
            shape, dt = scale_shape(cfg.scale_fmt, M, H)
            o["recv_scales"] = np.zeros((L,) + shape, dt)
            assert o["recv_scales"].nbytes >= lay.recv_scales_bytes
        outs.append(o)
    arrs = {key: [arg(o[key], key, ()) for o in outs] for key in outs[0]}
    c = cfg._c()
    check(lib.epmoe_ep_dispatch_ref(ctypes.byref(c), _ptr_array(xt), _ptr_array(it), n_tok, act,
                                    _ptr_array(arrs["recv_x"]),
                                    _ptr_array(arrs["recv_scales"]) if cfg.fp8 else _ptr_array([None] * R),
                                    _ptr_array(arrs["masked_m"]), _ptr_array(arrs["src_info"])))
    return outs


def combine_ref(config, expert_outs, topk_idxs, topk_weights, *, active=None):
    """epmoe_ep_combine_ref: out[r][t] = sum_j w[r][t, j] * expert_out[owner][le][row(r, t, j)],
    fp32 in top-k order, bf16 out (uint16 bits) — one [T_r, H] array per rank."""
    cfg = _ref_config(config)
    R, L, M, H, k = cfg.num_ranks, cfg.local_experts, cfg.rows, cfg.hidden, cfg.top_k
    et = _per_rank(expert_outs, R, "expert_outs", ("uint16", "bfloat16"), lambda r: (L, M, H))
    it = _per_rank(topk_idxs, R, "topk_idxs", ("int32",), lambda r: (None, k))
    Ts, n_tok = _tokens(it, "topk_idxs")
    wt = _per_rank(topk_weights, R, "topk_weights", ("float32",), lambda r: (Ts[r], k))
    act = _active_flags(active, R, "combine_ref")
    outs = [np.zeros((Ts[r], H), np.uint16) for r in range(R)]
    ot = [arg(o, "out", ()) for o in outs]
    c = cfg._c()
    check(lib.epmoe_ep_combine_ref(ctypes.byref(c), _ptr_array(et), _ptr_array(it), _ptr_array(wt), n_tok, act,
                                   _ptr_array(ot)))
    return outs

