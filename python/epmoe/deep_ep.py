"""DeepEP's low-latency Buffer on epmoe: for engines written against `deep_ep.Buffer`.

    from epmoe import deep_ep                       # instead of `import deep_ep`
    buf = deep_ep.Buffer(group, 0, deep_ep.Buffer.get_low_latency_rdma_size_hint(N, H, R, E),
                         low_latency_mode=True, num_qps_per_rank=E // R)
    (x_fp8, scales), count, handle, event, hook = buf.low_latency_dispatch(x, topk_idx, N, E, use_fp8=True)
    ...                                             # experts on rows [0, count[le]) of x_fp8[le]
    out, event, hook = buf.low_latency_combine(y, topk_idx, topk_weights, handle)

The calls, arguments and outputs are those of DeepEP V1's low-latency mode (its legacy `Buffer`;
the fields are listed in shared/reference/deepep.md, section 1): bf16 x [T, H] and int64 (or
int32) topk_idx [T, k] with -1 for none; recv_x [L, R*N, H] as fp8 e4m3 with fp32 scales [L, R*N,
H/128] in the M-major strides (R*N*H/128, 1, R*N), or int32 UE8M0 words [L, R*N, H/512] with
use_ue8m0, or bf16; recv_count = masked_m int32 [L]; combine sums w[t, j] * y in fp32 in top-k
order and writes bf16 [T, H], zeros for a token with every slot -1. DeepEP's checks hold (T <= N,
E % R == 0, use_ue8m0 needs round_scale, async_finish excludes return_recv_hook) and the library's
own reject bad shapes, expert ids and dtypes with a clear epmoe.Error.

What differs, on purpose:
- Rows of an expert come in (source rank, token, top-k slot) order, the same on every run; DeepEP's
  depend on atomics. The handle indexes like DeepEP's tuple (src_info: the token's index on its
  source rank, int32 [L, R*N]; layout_range; N; hidden; num_experts); layout_range is computed when
  first read.
- low_latency_combine routes by the dispatch's topk_idx (the handle keeps it): its topk_idx argument
  is checked for its shape, and its values are not read again. Pass the tensor given to the dispatch,
  as engines do; a slot turned -1 between the two still gets its row (weight it 0 instead).
- Two dispatches may be in flight, but their receive hooks run in dispatch order (epmoe.InvalidArgument
  otherwise), as two-batch overlap calls them.
- Every call runs on the caller's current stream, so the returned events have nothing to wait for
  (`current_stream_wait()` does nothing) and async_finish changes nothing.
- The buffer's memory is sized per configuration (epmoe_ep_layout), not by num_rdma_bytes, which is
  accepted and ignored, as are num_qps_per_rank, allow_nvlink_for_low_latency_mode and allow_mnnvl
  (the transport is NCCL's device API over NVLink where every rank can use it, else an all-to-all;
  `transport=` chooses). An EP group is made for each (N, H, E, top-k, wire, scale format) at its
  first call, collectively: make the first call of each before capturing a CUDA graph.
- combine_mode="reduce_at_owner" (the default here) sums each token's rows where it lives, like
  DeepEP, and matches a sequential fp32 sum bit for bit. "reduce_at_expert" sums a token's rows on
  each expert rank first and moves a quarter of the bytes at R = 2; it needs topk_weights at
  dispatch (a keyword DeepEP does not have), and combine must then get that same tensor.
- Not supported, each raising epmoe.Unsupported: normal (high-throughput) mode (Buffer(...,
  low_latency_mode=False), get_dispatch_layout, dispatch, combine, internode_*), LogFMT combine, the
  wait-time statistics tensors, get_local_buffer_tensor, use_fabric=True (NCCL allocates the buffers),
  enable_shrink (a peer that times out fails the group with epmoe.Timeout; ranks known to have
  failed can be masked with low_latency_update_mask_buffer). The names engines read while choosing
  a mode are there: Config, topk_idx_t, Buffer.num_sms / set_num_sms / get_dispatch_config /
  get_combine_config / is_sm90_compiled / capture, and the buffer's group, num_nvl_bytes,
  num_rdma_bytes and low_latency_mode.

Without GPUs the same Buffer runs on the CPU backend: Buffer(world=epmoe.CpuWorld(R), rank=r) in
each rank's thread, numpy arrays in and out (bf16 as uint16 bits, fp8 as uint8).
"""
import sys
import warnings

import numpy as np

from . import _lib
from ._util import arg, cint, empty, launch_stream, output
from .ep import REDUCE_AT_EXPERT, EpConfig, layout_query
from .formats import SCALE_F32_MMAJOR, SCALE_UE8M0_MMAJOR

__all__ = ["Buffer", "Config", "EventHandle", "EventOverlap", "LowLatencyHandle", "install"]


def install():
    """Make `import deep_ep` (and importlib.util.find_spec("deep_ep"), which engines such as vLLM use
    to tell whether DeepEP is there) give this module, for engines that import it in many places.
    Call it before the engine's first import of deep_ep, in every process that imports it (worker
    processes an engine spawns too, e.g. from a sitecustomize module). Refused if a real deep_ep is
    loaded."""
    mod = sys.modules[__name__]
    have = sys.modules.get("deep_ep")
    if have is not None and have is not mod:
        raise _lib.error(_lib.ERR_INVALID_ARG, f"install: a deep_ep module is already imported ({have!r})")
    sys.modules["deep_ep"] = mod
    return mod


def __getattr__(name):
    """topk_idx_t: the dtype of DeepEP's topk_idx (torch.int64), read from torch only when asked
    (without torch the name is absent, so hasattr says False)."""
    if name == "topk_idx_t":
        try:
            import torch
        except ImportError:
            raise AttributeError(f"module {__name__!r} has no attribute 'topk_idx_t' without torch") from None
        return torch.int64
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _unsupported(what):
    return _lib.error(_lib.ERR_UNSUPPORTED, f"epmoe.deep_ep: {what}")


class Config:
    """DeepEP's Config (normal mode's SM and chunk sizes). Engines build and size with it while
    choosing a mode; epmoe has no normal mode, so it only holds the values, and its buffer size
    hints are 0 (epmoe sizes its own buffers)."""

    def __init__(self, num_sms=20, num_max_nvl_chunked_send_tokens=6, num_max_nvl_chunked_recv_tokens=256,
                 num_max_rdma_chunked_send_tokens=6, num_max_rdma_chunked_recv_tokens=256):
        self.num_sms = num_sms
        self.num_max_nvl_chunked_send_tokens = num_max_nvl_chunked_send_tokens
        self.num_max_nvl_chunked_recv_tokens = num_max_nvl_chunked_recv_tokens
        self.num_max_rdma_chunked_send_tokens = num_max_rdma_chunked_send_tokens
        self.num_max_rdma_chunked_recv_tokens = num_max_rdma_chunked_recv_tokens

    def get_nvl_buffer_size_hint(self, hidden_bytes, num_ranks):
        return 0

    def get_rdma_buffer_size_hint(self, hidden_bytes, num_ranks):
        return 0


class EventHandle:
    """DeepEP's EventHandle (an event recorded on the current stream). epmoe's calls run on the
    caller's stream, so there is nothing to record."""

    def current_stream_wait(self):
        pass


class EventOverlap:
    """DeepEP's EventOverlap. epmoe's calls run on the caller's stream, so what they wrote is
    ordered before whatever that stream runs next: there is nothing to wait for. Hooks registered
    to run after the wait run at current_stream_wait; extra_tensors are held, as DeepEP holds them."""

    def __init__(self, event=None, extra_tensors=None):
        self.event, self.extra_tensors = event, extra_tensors
        self._hooks = []
        self._release_on_exit = False

    def current_stream_wait(self, release_handle=False):
        hooks, self._hooks = self._hooks, []
        for h in hooks:
            h()
        if release_handle:
            self.event = None

    def register_hook_after_wait(self, hook_after_wait):
        self._hooks.append(hook_after_wait)

    def __call__(self, release_handle=False):
        """`with event(release_handle=True):` releases the event when the block ends, as DeepEP's."""
        self._release_on_exit = release_handle
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.current_stream_wait(release_handle=self._release_on_exit)
        self._release_on_exit = False


def _layout_range(src_info, masked_m, N, R):
    """DeepEP's layout_range [L, R] int64: (begin << 32) | count, the rows of each local expert that
    came from each rank. Rows come in source-rank order, so each rank's are one run."""
    L, M = src_info.shape
    if isinstance(src_info, np.ndarray):
        valid = np.arange(M)[None, :] < np.asarray(masked_m)[:, None]
        src = np.where(valid, src_info // N, R)
        count = np.stack([np.bincount(src[le], minlength=R + 1)[:R] for le in range(L)]).astype(np.int64)
    else:  # torch on the GPU: no host sync
        import torch
        valid = torch.arange(M, device=src_info.device)[None, :] < masked_m[:, None]
        src = torch.where(valid, torch.div(src_info, N, rounding_mode="floor"), R).long()
        count = torch.zeros(L, R + 1, dtype=torch.int64, device=src_info.device)
        count = count.scatter_add_(1, src, torch.ones_like(src))[:, :R]
    begin = count.cumsum(1) - count
    return (begin << 32) | count


class LowLatencyHandle:
    """What low_latency_dispatch hands to low_latency_combine. Indexes like DeepEP's handle tuple
    (src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden, num_experts); src_info holds,
    as DeepEP's, each valid row's token index on its source rank (the dispatch's own src_info,
    handle.dispatch.src_info, is source rank * N + that index)."""

    def __init__(self, buffer, group, dispatch, N, hidden, num_experts, parity):
        self._buffer, self._group, self.dispatch = buffer, group, dispatch
        self.num_max_dispatch_tokens_per_rank, self.hidden, self.num_experts = N, hidden, num_experts
        self._parity = parity
        self._layout = self._src = None

    @property
    def src_info(self):
        if self._src is None:
            if not self.dispatch.received:
                raise _lib.error(_lib.ERR_INVALID_ARG, "src_info: call the dispatch's receive hook first")
            self._src = self.dispatch.src_info % self.num_max_dispatch_tokens_per_rank
        return self._src

    @property
    def layout_range(self):
        if self._layout is None:
            if not self.dispatch.received:
                raise _lib.error(_lib.ERR_INVALID_ARG, "layout_range: call the dispatch's receive hook first")
            self._layout = _layout_range(self.dispatch.src_info, self.dispatch.masked_m,
                                         self.num_max_dispatch_tokens_per_rank, self._group.num_ranks)
        return self._layout

    def _received(self):
        """Inside a CUDA graph capture, src_info and layout_range are computed as the receive ends,
        so the graph holds their kernels and each replay refreshes them; read lazily after capture,
        they would be computed once, from the capture's data."""
        torch = sys.modules.get("torch")
        on_gpu = torch is not None and isinstance(self.dispatch.src_info, torch.Tensor)
        if on_gpu and torch.cuda.is_current_stream_capturing():
            self.src_info, self.layout_range  # noqa: B018 - computed for their kernels (a new handle: neither yet)

    def __len__(self):
        return 5

    def __getitem__(self, i):
        if isinstance(i, slice):
            return tuple(self[j] for j in range(*i.indices(5)))
        return (lambda: self.src_info, lambda: self.layout_range, lambda: self.num_max_dispatch_tokens_per_rank,
                lambda: self.hidden, lambda: self.num_experts)[i]()

    def __iter__(self):
        return (self[i] for i in range(5))

    def __repr__(self):
        return (f"<epmoe.deep_ep.LowLatencyHandle N={self.num_max_dispatch_tokens_per_rank} hidden={self.hidden} "
                f"experts={self.num_experts} {self.dispatch!r}>")


class Buffer:
    """DeepEP's Buffer, low-latency mode. On GPUs: `group` is a torch.distributed process group
    (default WORLD), one GPU per rank (torch's current device); construction is collective. On the
    CPU backend: world=epmoe.CpuWorld(R) and this thread's rank. DeepEP's arguments come in its
    order (legacy.py of DeepEP 2.x, shared/reference/deepep.md 1.1); V1's use_fabric is a keyword,
    and True (DeepEP: allocate with CUDA fabric handles, for multi-node NVLink) raises
    epmoe.Unsupported, since epmoe's buffers come from NCCL and never from fabric handles. The
    keywords after DeepEP's own: combine_mode ("reduce_at_owner" or "reduce_at_expert", see the
    module), timeout_ms (a peer that never answers raises epmoe.Timeout after it) and transport
    (epmoe.EpConfig.transport)."""

    num_sms = 20  # DeepEP's: the SMs of its normal-mode kernels (Buffer.set_num_sms); unused here

    def __init__(self, group=None, num_nvl_bytes=0, num_rdma_bytes=0, low_latency_mode=False, num_qps_per_rank=24,
                 allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False, explicitly_destroy=False,
                 enable_shrink=False, comm=None, *, use_fabric=False, world=None, rank=None,
                 combine_mode="reduce_at_owner", timeout_ms=10000, transport="auto"):
        if not low_latency_mode:
            raise _unsupported("only DeepEP's low-latency mode is implemented: pass low_latency_mode=True")
        if use_fabric:
            raise _unsupported("use_fabric: epmoe's buffers come from NCCL, not from CUDA fabric memory handles; "
                               "drop the flag (NCCL reaches the peers over NVLink where it can)")
        if enable_shrink:
            raise _unsupported("enable_shrink: a peer that times out fails the group (epmoe.Timeout); mask ranks known "
                               "to have failed with low_latency_update_mask_buffer")
        if comm is not None:
            raise _unsupported("comm (an mpi4py communicator): pass a torch.distributed process group")
        self._base = EpConfig(combine_mode=combine_mode, timeout_ms=int(timeout_ms), transport=transport)
        self._base.combine_code  # noqa: B018 - a bad combine_mode fails here, not at the first dispatch
        self._base.transport_code  # noqa: B018
        self.explicitly_destroy = bool(explicitly_destroy)
        self.group, self.num_nvl_bytes, self.num_rdma_bytes = group, num_nvl_bytes, num_rdma_bytes
        self.low_latency_mode = True
        self._groups = {}       # (N, H, E, k, fp8, round_scale, ue8m0) -> EpGroup
        self._zero_copy = {}    # EpGroup -> the two combine buffers get_next_low_latency_combine_buffer hands out
        self._calls = {}        # EpGroup -> dispatches so far (which of the two is next)
        self._nccl = None
        if world is not None:
            if rank is None or not 0 <= int(rank) < world.num_ranks:
                raise ValueError(f"Buffer(world=...): rank must be in [0, {world.num_ranks}), got {rank}")
            self.rank, self.group_size = int(rank), world.num_ranks
            # the factories hold no reference to self: with no cycle the buffer goes before what it holds
            me = self.rank
            self._make = lambda cfg: world.create_group(me, cfg)
        else:
            from . import nccl
            nccl._require_backend()
            torch, dist = nccl._torch_dist()
            self.rank, self.group_size = dist.get_rank(group), dist.get_world_size(group)
            uid = nccl.unique_id_from_process_group(group)
            comm = self._nccl = nccl.NcclComm(uid, self.group_size, self.rank, torch.cuda.current_device())
            self._make = lambda cfg: nccl.create_group_on_comm(comm, cfg)
        self._active = [1] * self.group_size

    # -- DeepEP's static helpers (normal mode's settings: held, unused)
    @staticmethod
    def set_num_sms(new_num_sms):
        if new_num_sms % 2:
            raise ValueError("set_num_sms: the SM count must be even (as DeepEP asks)")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def is_sm90_compiled():
        """Whether this libepmoe has its GPU kernels (built for sm_90a only) and sees a GPU."""
        from .formats import cuda_available
        return cuda_available()

    @staticmethod
    def capture():
        """An event on the current stream: epmoe's calls are on it already, so nothing to wait for."""
        return EventOverlap(EventHandle())

    @staticmethod
    def get_dispatch_config(num_ranks):
        return Config(Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks):
        return Config(Buffer.num_sms)

    def get_comm_stream(self):
        """epmoe has no communication stream of its own: its calls run on the caller's stream."""
        import torch
        return torch.cuda.current_stream()

    def get_local_buffer_tensor(self, dtype, size=None, offset=0, use_rdma_buffer=False):
        raise _unsupported("get_local_buffer_tensor: epmoe's buffers are the EP groups' windows, not one raw buffer")

    def _normal_mode(self, *args, **kwargs):
        raise _unsupported("normal (high-throughput) mode (get_dispatch_layout, dispatch, combine, internode_*) is "
                           "not implemented: use the low-latency calls")

    get_dispatch_layout = dispatch = combine = internode_dispatch = internode_combine = _normal_mode

    # -- sizes
    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts, top_k=8):
        """The most one configuration of a Buffer allocates a rank (its window and private state,
        library_bytes): the BF16 wire, the larger, under either combine mode. DeepEP's hint sizes its
        buffer; epmoe allocates its own, so the value is for accounting."""
        return max(layout_query(num_ranks=num_ranks, max_tokens=num_max_dispatch_tokens_per_rank, hidden=hidden,
                                num_experts=num_experts, top_k=top_k, wire=w, combine_mode=m).library_bytes
                   for w in ("bf16", "fp8") for m in ("reduce_at_owner", "reduce_at_expert"))

    @property
    def library_bytes(self):
        """Window and private state of every EP group made so far (device memory on GPUs)."""
        return sum(g.layout.library_bytes for g in self._groups.values())

    # -- groups
    def _group(self, N, H, E, k, fp8, round_scale, ue8m0):
        key = (int(N), int(H), int(E), int(k), bool(fp8), bool(round_scale), bool(ue8m0))
        g = self._groups.get(key)
        if g is None:
            if self._make is None:
                raise _lib.error(_lib.ERR_INVALID_ARG, "this Buffer was destroyed")
            cfg = self._base.replace(max_tokens=key[0], hidden=key[1], num_experts=key[2], top_k=key[3],
                                     wire="fp8" if fp8 else "bf16", round_scale=bool(round_scale),
                                     scale_fmt=SCALE_UE8M0_MMAJOR if ue8m0 else SCALE_F32_MMAJOR)
            g = self._make(cfg)
            if not all(self._active):
                g.set_active_ranks(self._active)
            self._groups[key], self._calls[g] = g, 0
        return g

    # -- dispatch
    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                             cumulative_local_expert_recv_stats=None, dispatch_wait_recv_cost_stats=None,
                             use_fp8=True, round_scale=False, use_ue8m0=False, async_finish=False,
                             return_recv_hook=False, *, topk_weights=None):
        """Returns (recv_x, recv_count, handle, event, hook): recv_x is (fp8 [L, R*N, H], scales)
        with use_fp8, else bf16 [L, R*N, H]; hook is None unless return_recv_hook, when only the
        send half has run and hook() runs the receive (recv_x and recv_count are valid after it).
        topk_weights (epmoe's keyword): fp32 [T, k], needed under combine_mode="reduce_at_expert"."""
        if dispatch_wait_recv_cost_stats is not None:
            raise _unsupported("dispatch_wait_recv_cost_stats is not collected")
        if async_finish and return_recv_hook:
            raise ValueError("low_latency_dispatch: async_finish and return_recv_hook exclude each other")
        if use_fp8 and use_ue8m0 and not round_scale:
            raise ValueError("low_latency_dispatch: use_ue8m0 needs round_scale=True")
        # Every argument is checked before _group: making a group is collective, and shapes read off
        # a wrong argument would make one for a configuration nobody asked for.
        N = cint(num_max_dispatch_tokens_per_rank, "low_latency_dispatch: num_max_dispatch_tokens_per_rank")
        E = cint(num_experts, "low_latency_dispatch: num_experts")
        if E <= 0 or E % self.group_size:
            raise _lib.error(_lib.ERR_INVALID_ARG, f"low_latency_dispatch: num_experts = {E} must be a positive "
                             f"multiple of the {self.group_size} ranks")
        s = launch_stream((x, topk_idx), None)  # torch's current stream: the one the group's calls use
        xt = arg(x, "x", ("uint16", "bfloat16"), ndim=2, stream=s)
        it = arg(topk_idx, "topk_idx", ("int64", "int32"), ndim=2, stream=s)
        T, H, k = xt.shape[0], xt.shape[1], it.shape[1]
        if it.shape[0] != T:
            raise ValueError(f"low_latency_dispatch: topk_idx is {it.shape}, x has {T} tokens")
        if T > N:
            raise _lib.error(_lib.ERR_INVALID_ARG, f"low_latency_dispatch: x has {T} tokens, more than "
                             f"num_max_dispatch_tokens_per_rank = {N}")
        if self._base.combine_code == REDUCE_AT_EXPERT and topk_weights is None:
            raise ValueError("low_latency_dispatch: combine_mode reduce_at_expert takes topk_weights here")
        stats = cumulative_local_expert_recv_stats
        if stats is not None:  # DeepEP's int32 [L], added to in place
            output(stats, "cumulative_local_expert_recv_stats", (E // self.group_size,), ("int32",), xt, stream=s)
        g = self._group(N, H, E, k, use_fp8, round_scale, use_fp8 and use_ue8m0)

        def count(d):  # DeepEP adds the received counts as the receive ends
            if stats is not None:
                stats[...] += d.masked_m

        parity = self._calls[g] & 1
        self._calls[g] += 1
        hook = None
        if return_recv_hook:
            d = g.dispatch_send(xt, it, topk_weights)

            def hook():
                count(g.dispatch_recv(d))
                handle._received()
        else:
            d = g.dispatch(xt, it, topk_weights)
            count(d)
        recv_x = (d.recv_x, d.recv_scales.swapaxes(1, 2)) if use_fp8 else d.recv_x
        handle = LowLatencyHandle(self, g, d, N, H, E, parity)
        if not return_recv_hook:
            handle._received()
        return recv_x, d.masked_m, handle, EventOverlap(), hook

    # -- combine
    def _own(self, handle):
        if not isinstance(handle, LowLatencyHandle) or handle._buffer is not self:
            raise _lib.error(_lib.ERR_INVALID_ARG, "low_latency_combine: the handle is not one of this Buffer's dispatches")
        return handle._group, handle.dispatch

    def get_next_low_latency_combine_buffer(self, handle):
        """bf16 [L, R*N, H] for the experts to write into, then low_latency_combine(..., zero_copy=True).
        Two per configuration, taken in turn by its dispatches (as DeepEP's two buffers are)."""
        g, _ = self._own(handle)
        bufs = self._zero_copy.get(g)
        if bufs is None:
            cfg = g.config
            shape = (cfg.local_experts, cfg.rows, cfg.hidden)
            bufs = self._zero_copy[g] = [empty(shape, "bfloat16", g._like(), zero=True)[0] for _ in range(2)]
        return bufs[handle._parity]

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, use_logfmt=False, zero_copy=False,
                            async_finish=False, return_recv_hook=False, out=None, combine_wait_recv_cost_stats=None):
        """Returns (combined_x bf16 [T, H], event, hook); with return_recv_hook only the send half has
        run and hook() completes combined_x. The routing is the dispatch's (the handle keeps it):
        topk_idx is checked for its shape only, its values are not read again."""
        if use_logfmt:
            raise _unsupported("use_logfmt (LogFMT combine)")
        if combine_wait_recv_cost_stats is not None:
            raise _unsupported("combine_wait_recv_cost_stats is not collected")
        if async_finish and return_recv_hook:
            raise ValueError("low_latency_combine: async_finish and return_recv_hook exclude each other")
        g, d = self._own(handle)
        if tuple(np.shape(topk_idx)) != (d.num_tokens, g.config.top_k):  # np.shape: lists too
            raise ValueError(f"low_latency_combine: topk_idx is {tuple(np.shape(topk_idx))}, the dispatch had "
                             f"[{d.num_tokens}, {g.config.top_k}]")
        w = topk_weights
        if g.config.combine_code == REDUCE_AT_EXPERT:
            if topk_weights is not d._weights:
                raise ValueError("low_latency_combine: under reduce_at_expert the expert ranks applied the weights given "
                                 "to low_latency_dispatch; pass that same topk_weights tensor")
            w = None
        y = x
        if zero_copy:
            if g not in self._zero_copy:
                raise _lib.error(_lib.ERR_INVALID_ARG, "low_latency_combine(zero_copy=True): write the expert outputs into "
                                 "get_next_low_latency_combine_buffer(handle) first")
            y = self._zero_copy[g][handle._parity]
        if return_recv_hook:
            g.combine_send(d, y, w, out=out)

            def hook():
                g.combine_recv(d)
            return d.out, EventOverlap(), hook
        return g.combine(d, y, w, out=out), EventOverlap(), None

    # -- housekeeping DeepEP needs and epmoe does not
    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank=None, hidden=None, num_experts=None):
        """Nothing to clean: epmoe's signals carry the call's number, so no buffer needs zeroing."""

    def _set_active(self, active):
        for g in self._groups.values():
            g.set_active_ranks(active)
        self._active = active

    def low_latency_update_mask_buffer(self, rank_to_mask, mask=False):
        """Mask rank_to_mask out (mask=True) from the next dispatch on; every live rank must make the
        same updates (epmoe.EpGroup.set_active_ranks). A rank masked out of a group that exists cannot
        rejoin it: unmasking it raises epmoe.Unsupported (DeepEP's elastic rejoin is not implemented).
        The mask also applies to the groups made later, but making one (at a configuration's first
        dispatch) is collective over every rank, masked ones included: a rank that has failed
        stalls it. Make each configuration's first dispatch while every rank is alive."""
        if not 0 <= int(rank_to_mask) < self.group_size:
            raise ValueError(f"low_latency_update_mask_buffer: rank {rank_to_mask} is not in [0, {self.group_size})")
        active = list(self._active)
        active[int(rank_to_mask)] = 0 if mask else 1
        self._set_active(active)

    def low_latency_query_mask_buffer(self, mask_status):
        """mask_status int32 [R]: 1 for the masked ranks (written in place, numpy or torch)."""
        if tuple(np.shape(mask_status)) != (self.group_size,):
            raise ValueError(f"low_latency_query_mask_buffer: mask_status is {tuple(np.shape(mask_status))}, "
                             f"expected ({self.group_size},)")
        for r, a in enumerate(self._active):
            mask_status[r] = 0 if a else 1

    def low_latency_clean_mask_buffer(self):
        """Every rank back in (see low_latency_update_mask_buffer)."""
        self._set_active([1] * self.group_size)

    # -- lifetime
    def destroy(self):
        """Collective: closes every EP group, then the communicator."""
        groups, self._groups, self._zero_copy, self._make = self._groups, {}, {}, None
        try:
            for g in groups.values():
                g.close()
        finally:
            if self._nccl is not None:
                self._nccl.close()
                self._nccl = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.destroy()

    def __del__(self):
        if getattr(self, "_groups", None) or getattr(self, "_nccl", None) is not None:
            # collective, like EpGroup.close: from a garbage collector it may wait for peers
            warnings.warn(f"epmoe.deep_ep.Buffer rank {self.rank} was not destroyed", ResourceWarning, stacklevel=1)
            try:
                self.destroy()
            except Exception:
                pass
