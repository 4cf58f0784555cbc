"""The MoE layer (include/epmoe.h, "the MoE layer"): dispatch -> expert MLP -> combine in one call
on an EP group.

    def rank(g):                                   # CpuWorld.run: each rank's thread
        with g.layer(weights=(w13[g.rank], w2[g.rank]), intermediate=128) as layer:
            return layer.forward(x[g.rank], topk_idx[g.rank], topk_weights[g.rank])

A layer belongs to one rank's group and owns its buffers (`bytes`); creating it is not
collective, forward is (every rank calls it, like dispatch and combine). The scheme decides what
the experts compute, which weights they read and which dispatch wire they can read: w4afp8
(W4A8Weights) and w8a8_fp8_block (ExpertWeights "fp8_block") take the FP8 wire with 1x128 scales
or the BF16 wire (cast after receive); bf16 and w4a16 (ExpertWeights "bf16", "int4") the BF16
wire only. A layer whose scheme cannot read the group's wire is refused at creation; create a
group with `wire=scheme_default_wire(...)`.

The forward also runs in three phases, so other work overlaps the waits for the peers (the shared
expert after SEND, the next micro-batch's attention before RECV) and two forwards can be in
flight on a group (micro-batches: S(a) S(b) X(a) X(b) R(a) R(b)):

        fa = layer.forward_send(xa, idx_a, w_a)   # LAYER_SEND: the tokens leave; a LayerForward
        fb = layer.forward_send(xb, idx_b, w_b)
        layer.forward_experts(fa)                 # LAYER_EXPERTS: receive, expert MLP, send back
        layer.forward_experts(fb)
        out_a = layer.forward_recv(fa)            # LAYER_RECV: out is written
        out_b = layer.forward_recv(fb)

The LayerForward keeps x, topk_idx, topk_weights and out for the later phases (and alive while
the library may read them); forward_phase(x or forward, ..., phases=...) runs any run of phases.
"""
import ctypes
import threading

import numpy as np

from . import _lib
from ._lib import check, lib
from ._util import Both, InUse, arg, cint, i64s, on_device, output, ptr
from .dlpack import DLPackError
from .ep import WIRE_BF16, WIRE_FP8, _per_rank, _ptr_array, _ref_config, _tokens
from .formats import _scalar_scale
from .experts import ExpertWeights, _ExpertWeightsC
from .w4a8 import W4A8Weights, _WeightsC

__all__ = ["Layer", "LayerForward", "layer_ref", "scheme_default_wire", "scheme_accepts_wire", "SCHEMES", "LAYER_SEND",
           "LAYER_EXPERTS", "LAYER_RECV", "LAYER_ALL"]

SCHEMES = {"bf16": 0, "w8a8_fp8_block": 1, "w4afp8": 2, "w4a16": 3}
_SCHEME_NAMES = {v: k for k, v in SCHEMES.items()}
_WIRE_NAMES = {WIRE_BF16: "bf16", WIRE_FP8: "fp8"}
# epmoe_layer_phase: a forward's phases, in the order they run; OR-ed, a run of them in one call
LAYER_SEND, LAYER_EXPERTS, LAYER_RECV, LAYER_ALL = 1, 2, 4, 7
_PHASES = {"send": LAYER_SEND, "experts": LAYER_EXPERTS, "recv": LAYER_RECV, "all": LAYER_ALL}
_RUNS = (LAYER_SEND, LAYER_EXPERTS, LAYER_RECV, LAYER_SEND | LAYER_EXPERTS, LAYER_EXPERTS | LAYER_RECV, LAYER_ALL)


class _LayerConfigC(ctypes.Structure):
    _fields_ = [("size", ctypes.c_size_t), ("scheme", ctypes.c_int), ("intermediate", ctypes.c_int64),
                ("per_tensor_act", ctypes.c_int), ("expected_m", ctypes.c_int64)]


class _LayerWeightsC(ctypes.Structure):
    _fields_ = [("w13", _WeightsC), ("w2", _WeightsC), ("a1_scale", ctypes.c_void_p), ("a2_scale", ctypes.c_void_p),
                ("e13", _ExpertWeightsC), ("e2", _ExpertWeightsC)]


def _scheme(scheme):
    if isinstance(scheme, str):
        try:
            return SCHEMES[scheme.lower()]
        except KeyError:
            raise ValueError(f"scheme {scheme!r}: expected one of {', '.join(SCHEMES)}") from None
    return cint(scheme, "scheme")  # a number outside the enum is the library's to refuse


def _wire(wire):
    from .ep import _WIRES, _code
    return _code(wire, _WIRES, "wire")


def scheme_default_wire(scheme):
    """The wire ("fp8" or "bf16") a scheme dispatches by default (epmoe_scheme_default_wire)."""
    code = _scheme(scheme)
    wire = lib.epmoe_scheme_default_wire(code)
    if wire not in _WIRE_NAMES:  # (epmoe_wire)-1: not an epmoe_scheme
        raise ValueError(f"scheme {scheme!r} is not an epmoe scheme")
    return _WIRE_NAMES[wire]


def expected_rows(tokens_per_rank, ranks, top_k, experts):
    """The expected_m hint for experts fed by dispatch (epmoe_expected_rows): the mean rows per expert
    under uniform routing plus 2.5 sqrt of it, at least 1."""
    n, = i64s(tokens_per_rank=tokens_per_rank)
    return int(lib.epmoe_expected_rows(n, cint(int(ranks), "ranks"), cint(int(top_k), "top_k"),
                                       cint(experts, "experts")))


def scheme_accepts_wire(scheme, wire):
    """Whether a scheme's experts can consume a dispatch wire (epmoe_scheme_accepts_wire): bf16-input
    schemes must never read the FP8 wire."""
    return bool(lib.epmoe_scheme_accepts_wire(_scheme(scheme), _wire(wire)))


def _check_wire(code, wire):
    # The library checks the scheme's availability first; asked for a scheme that cannot read the
    # group's wire, we say so first, since that is a configuration error building the scheme won't fix.
    if code in _SCHEME_NAMES and not lib.epmoe_scheme_accepts_wire(code, wire):  # other numbers: the library's
        raise _lib.error(_lib.ERR_INVALID_ARG,
                         f"scheme {_SCHEME_NAMES.get(code, code)} cannot consume the group's "
                         f"{_WIRE_NAMES[wire].upper()} wire; use a group with wire="
                         f"{scheme_default_wire(code)!r}")


def _phases(phases):
    """LAYER_* bits from an int or names ("send", "experts|recv", "all"); only runs of phases."""
    if isinstance(phases, str):
        from .ep import _code
        code = 0
        for part in phases.replace("+", "|").split("|"):
            code |= _code(part.strip(), _PHASES, "phase")
    else:
        code = int(phases)
    if code not in _RUNS:
        raise _lib.error(_lib.ERR_INVALID_ARG, f"phases = {phases!r} is not SEND, EXPERTS, RECV or a run of them "
                         "(SEND|EXPERTS, EXPERTS|RECV, ALL)")
    return code


def _phase_names(code):
    return "|".join(n.upper() for n, b in _PHASES.items() if b != LAYER_ALL and code & b) or "none"


def _config_c(code, intermediate, per_tensor_act, expected_m):
    intermediate, expected_m = i64s(intermediate=intermediate or 0, expected_m=expected_m)
    return _LayerConfigC(ctypes.sizeof(_LayerConfigC), code, intermediate, int(bool(per_tensor_act)), expected_m)


def _weights_pair(weights):
    if weights is None:
        return None, None
    try:
        w13, w2 = weights
    except (TypeError, ValueError):
        raise TypeError("weights must be a pair (w13, w2) of W4A8Weights or of ExpertWeights") from None
    for name, w in (("w13", w13), ("w2", w2)):
        if not isinstance(w, (W4A8Weights, ExpertWeights)):
            raise TypeError(f"weights: {name} must be W4A8Weights (epmoe.w4a8.repack) or ExpertWeights, "
                            f"got {type(w).__name__}")
    return w13, w2


def _weights_c(w13, w2, a1, a2):
    """W4A8Weights go to w13/w2 (w4afp8), ExpertWeights to e13/e2 (the other schemes); the library
    checks that they are what the scheme reads."""
    def c(w, kind, empty):
        return w._c() if isinstance(w, kind) else empty
    return _LayerWeightsC(c(w13, W4A8Weights, _WeightsC()), c(w2, W4A8Weights, _WeightsC()), ptr(a1), ptr(a2),
                          c(w13, ExpertWeights, _ExpertWeightsC()), c(w2, ExpertWeights, _ExpertWeightsC()))


class Layer:
    """One rank's MoE layer on an EP group (epmoe_layer). Made by EpGroup.layer.

    weights: (w13 [L, 2I, H], w2 [L, H, I]) of this rank's L local experts: W4A8Weights (w4afp8)
    or ExpertWeights of the scheme's format (the other schemes). The layer
    reads them where they are for every forward (no copy), so they must live where the group
    works: host arrays on the CPU backend; on an NCCL group host weights are copied to its GPU
    once (needs torch) and the copies kept. per_tensor_act: static per-tensor activation
    scales a1_scale, a2_scale (SGLang's compat mode) instead of 1x128 group scales.
    """

    def __init__(self, group, weights=None, *, scheme="w4afp8", intermediate=None, per_tensor_act=False,
                 a1_scale=None, a2_scale=None, expected_m=0):
        group._live()
        self.group = group
        self._h = ctypes.c_void_p()
        self._use = InUse("this layer")  # close() waits for the calls of other threads to return
        self._lock = threading.Lock()  # one destroy, when a layer close and its group's close race
        code = _scheme(scheme)
        _check_wire(code, group.config.wire_code)
        w13, w2 = _weights_pair(weights)
        like = group._like()
        if not like.is_host:
            w13, w2 = (None if w is None else w if w.device == like.device else w.to(f"cuda:{like.device[1]}")
                       for w in (w13, w2))
        else:
            for name, w in (("w13", w13), ("w2", w2)):
                if w is not None and not w.is_host:
                    raise DLPackError(f"weights: {name} is on {w.device_name}; this group runs on the CPU backend")
        if intermediate is None and w2 is not None:
            intermediate = w2.K
        if not per_tensor_act and (a1_scale is not None or a2_scale is not None):
            raise ValueError("a1_scale and a2_scale are the per-tensor mode's scales: pass per_tensor_act=True")
        a1 = a2 = None
        if a1_scale is not None:
            a1_scale, a1 = _scalar_scale(a1_scale, "a1_scale", like, None)
        if a2_scale is not None:
            a2_scale, a2 = _scalar_scale(a2_scale, "a2_scale", like, None)
        for name, t in (("a1_scale", a1), ("a2_scale", a2)):  # the library reads them where the group works
            if t is not None and t.device != like.device and not (t.is_host and like.is_host):
                raise DLPackError(f"{name}: is on {t.device_name}; the group works on {like.device_name}")
        self.scheme, self.intermediate = _SCHEME_NAMES.get(code, code), intermediate
        self.per_tensor_act = bool(per_tensor_act)
        self.weights = (w13, w2)
        self._cfg = _config_c(code, intermediate, per_tensor_act, expected_m)
        self._w = _weights_c(w13, w2, a1, a2)
        # the library keeps these pointers: the objects live as long as the layer
        self._keep = (w13, w2, a1_scale, a2_scale, a1, a2)
        with group._use.call(), on_device(like):
            check(lib.epmoe_layer_create(group._ep, ctypes.byref(self._cfg), ctypes.byref(self._w),
                                         ctypes.byref(self._h)))
            with group._lock:  # inside the call: a group closing now waits for it, then destroys this layer
                group._layers.add(self)

    @property
    def closed(self):
        return not self._h.value

    @property
    def bytes(self):
        """Bytes of the buffers the layer allocated (epmoe_layer_bytes)."""
        with self._calls():
            return int(lib.epmoe_layer_bytes(self._h))

    def _live(self):
        if not self._h.value:
            raise _lib.error(_lib.ERR_INVALID_ARG, "this layer is closed")
        self.group._live()

    def _calls(self):
        """A call into the library on this layer: counted in by its group (whose ep it uses) and by
        the layer, so that closing either from another thread waits for it."""
        return Both(self.group._use, self._use)

    def _args(self, x, topk_idx, topk_weights, out, s, what):
        """x, topk_idx, topk_weights and out checked for this layer's group (forward's arguments)."""
        g, cfg = self.group, self.group.config
        xt = arg(x, "x", ("uint16", "bfloat16"), ndim=2, stream=s)
        T = cint(xt.shape[0], f"{what}: x's token count")  # num_tokens is an int
        if xt.shape[1] != cfg.hidden:
            raise ValueError(f"{what}: x is {xt.shape}, the group's hidden size is {cfg.hidden}")
        it = arg(topk_idx, "topk_idx", ("int32", "int64"), ndim=2, stream=s)
        if it.shape != (T, cfg.top_k):
            raise ValueError(f"{what}: topk_idx is {it.shape}, expected [{T}, {cfg.top_k}] (tokens, top_k)")
        wt = arg(topk_weights, "topk_weights", ("float32",), ndim=2, stream=s)
        if wt.shape != (T, cfg.top_k):
            raise ValueError(f"{what}: topk_weights is {wt.shape}, expected [{T}, {cfg.top_k}]")
        like = g._like()
        o, ot = output(out, "out", (T, cfg.hidden), ("uint16", "bfloat16") if like.is_host else ("bfloat16", "uint16"),
                       like, stream=s)
        g._inputs_on_device([("x", xt), ("topk_idx", it), ("topk_weights", wt), ("out", ot)], what)
        return xt, it, wt, o, ot

    def _receive_order(self, f, what):
        """A group's forwards receive in the order they were sent: refuse an EXPERTS phase while an
        earlier forward has not run its own (before anything moves; a call that also sends would
        otherwise be refused by the library after its tokens left, and the peers would wait)."""
        for e in self.group._forwards:
            if e is f:
                return
            if not e.phases & LAYER_EXPERTS:
                this = "this forward" if f is None else f"forward {f.handle}"
                raise _lib.error(_lib.ERR_INVALID_ARG,
                                 f"{what}: forward {e.handle} was sent before {this} and has not run its EXPERTS "
                                 f"phase; forwards receive in the order they were sent (call forward_experts on "
                                 f"forward {e.handle} first)")

    def forward(self, x, topk_idx, topk_weights, *, out=None, stream=None):
        """out[T, H] bf16 = sum_j topk_weights[t, j] * MLP_{topk_idx[t, j]}(x[t]) over this rank's
        tokens. x bf16 [T, H], topk_idx int32/int64 [T, k] (-1 = no expert), topk_weights float32
        [T, k]. Collective over the group. On GPUs: no host synchronization, capturable."""
        self._live()
        s = self.group._stream(stream)
        xt, it, wt, o, ot = self._args(x, topk_idx, topk_weights, out, s, "forward")
        self._receive_order(None, "forward")
        with self._calls(), on_device(self.group._like()):
            check(lib.epmoe_layer_forward(self._h, ptr(xt), ptr(it), it.dtype.bits, ptr(wt), xt.shape[0], ptr(ot), s))
        return o

    __call__ = forward

    # -- the forward in phases (epmoe_layer_forward_phase)
    def forward_phase(self, x, topk_idx=None, topk_weights=None, *, phases, out=None, stream=None):
        """Run phases (LAYER_SEND, LAYER_EXPERTS, LAYER_RECV or a run of them OR-ed; names such as
        "send|experts" too) of one forward; returns its LayerForward (out is `.out` once RECV ran).
        With SEND, x, topk_idx, topk_weights (and out=) are forward's and start a new forward; the
        later phases take the LayerForward instead of x and read its arguments. A forward's phases
        run in order, and the EXPERTS phases of a group's forwards in the order they were sent; a
        phase out of order raises InvalidArgument before anything moves. Once SEND has run, run the
        remaining phases on every rank: the peers wait for them. Each call runs on `stream` (else
        torch's current stream on the group's GPU)."""
        return self._phase(x, topk_idx, topk_weights, _phases(phases), out, stream, "forward_phase")

    def forward_send(self, x, topk_idx, topk_weights, *, out=None, stream=None):
        """LAYER_SEND: this rank's tokens leave for their experts' ranks. Returns the LayerForward
        that forward_experts and forward_recv take (it keeps x, topk_idx, topk_weights and out)."""
        return self._phase(x, topk_idx, topk_weights, LAYER_SEND, out, stream, "forward_send")

    def forward_experts(self, forward, *, stream=None):
        """LAYER_EXPERTS: receive this rank's experts' rows, run the expert MLP, send the rows back.
        Returns the LayerForward."""
        return self._phase(forward, None, None, LAYER_EXPERTS, None, stream, "forward_experts")

    def forward_recv(self, forward, *, stream=None):
        """LAYER_RECV: sum each token's rows; returns out (bf16 [T, H], the LayerForward's .out)."""
        return self._phase(forward, None, None, LAYER_RECV, None, stream, "forward_recv").out

    def _phase(self, x, topk_idx, topk_weights, code, out, stream, what):
        self._live()
        g = self.group
        s = g._stream(stream)
        if isinstance(x, LayerForward):
            f = x
            if topk_idx is not None or topk_weights is not None or out is not None:
                raise TypeError(f"{what}: forward {f.handle} keeps the topk_idx, topk_weights and out it was sent "
                                "with; pass only the LayerForward")
            if f.layer is not self:
                raise _lib.error(_lib.ERR_INVALID_ARG, f"{what}: forward {f.handle} belongs to another layer")
            if f.done:
                raise _lib.error(_lib.ERR_INVALID_ARG, f"{what}: forward {f.handle} is complete (its RECV phase ran)")
            if code & f.phases:
                raise _lib.error(_lib.ERR_INVALID_ARG, f"{what}: forward {f.handle} already ran its "
                                 f"{_phase_names(code & f.phases)} phase")
            nxt = f.phases + 1  # 1, 3: the bit after the phases that ran
            if not code & nxt:
                raise _lib.error(_lib.ERR_INVALID_ARG, f"{what}: {_phase_names(code)} of forward {f.handle} before its "
                                 f"{_phase_names(nxt)} phase (a forward's phases run SEND, EXPERTS, RECV)")
        else:
            if not code & LAYER_SEND:
                raise TypeError(f"{what}: phases {_phase_names(code)} continue a sent forward: pass the LayerForward "
                                "that forward_send returned instead of x")
            xt, it, wt, o, ot = self._args(x, topk_idx, topk_weights, out, s, what)
            if not ot.is_host and xt.shape[0] and ptr(ot) % 16:  # RECV would refuse it, after the send
                raise _lib.error(_lib.ERR_MISALIGNED, f"{what}: out is not 16-byte aligned")
            f = LayerForward(self, x, topk_idx, topk_weights, o, (xt, it, wt, ot))
        if code & LAYER_EXPERTS:
            self._receive_order(f, what)
        xt, it, wt, ot = f._tensors
        h = ctypes.c_uint32(f.handle)
        with self._calls(), on_device(g._like()):
            st = lib.epmoe_layer_forward_phase(self._h, ptr(xt), ptr(it), it.dtype.bits, ptr(wt), xt.shape[0], ptr(ot),
                                               code, ctypes.byref(h), s)
            failed = None
            try:
                check(st)  # on this thread, right after the call: epmoe_last_error is per thread
            except _lib.Error as e:
                failed = e
        if code & LAYER_SEND and h.value:  # *handle is set once the send went out, even if a later phase failed
            f.handle = h.value
            f.phases |= LAYER_SEND
            g._forwards.append(f)  # keeps f (and what the library still reads) alive until its RECV
        if failed is not None:
            if f.phases & LAYER_SEND and code & LAYER_SEND:
                failed.forward = f
                if hasattr(failed, "add_note"):
                    failed.add_note(f"forward {f.handle} was sent: the peers wait for its remaining phases "
                                    "(the exception's .forward is its LayerForward)")
            raise failed
        f.phases |= code
        if f.done:
            g._forwards.remove(f)
        return f

    def close(self):
        """Free the layer's buffers (not collective). Refused (InvalidArgument, the layer stays usable)
        while one of its forwards is sent and not received: its remaining phases are collective, the
        peers wait for them, and they use these buffers; epmoe_layer_destroy cannot finish or cancel
        them. Closing its group closes it in any case."""
        pending = [f for f in self.group._forwards if f.layer is self] if self._h.value else []
        if pending:
            f = pending[0]
            todo = "forward_recv" if f.phases & LAYER_EXPERTS else "forward_experts, then forward_recv"
            more = f"; {len(pending) - 1} more after it" if len(pending) > 1 else ""
            raise _lib.error(_lib.ERR_INVALID_ARG, f"close: forward {f.handle} of this layer is in flight (it ran "
                             f"{_phase_names(f.phases)}){more}; finish it on every rank first: {todo}")
        self._destroy()

    def _destroy(self):
        self._use.close()
        with self._lock:  # a second closer waits here until the first has freed the layer
            h, self._h = self._h, ctypes.c_void_p(0)
            if h.value:
                with on_device(self.group._like()):  # its GPU buffers are freed on the group's device
                    lib.epmoe_layer_destroy(h)
                with self.group._lock:
                    self.group._layers.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        try:
            self.close()
        except _lib.InvalidArgument:
            if exc_type is None:
                raise
            # the block's own exception is the one to see; the layer, with its forward in flight,
            # stays open and goes with its group

    def __del__(self):
        if getattr(self, "_h", None) is not None and self._h.value:
            try:
                self.close()  # not collective, so safe from a garbage collector
            except Exception:
                pass

    def __repr__(self):
        state = "closed" if self.closed else self.group._state()
        return (f"<epmoe.Layer {self.scheme} I={self.intermediate} rank {self.group.rank}/{self.group.num_ranks} "
                f"{state}>")


class LayerForward:
    """One forward of a Layer run phase by phase (Layer.forward_send, forward_phase): what its later
    phases read, kept here (and alive) so they are not passed again.

    x, topk_idx, topk_weights  the caller's objects, as given to the SEND phase
    out       bf16 [T, H] (uint16 bits in numpy): the caller's out= or a new tensor; RECV writes it
    handle    the library's name of the forward (its dispatch's handle; 0 before SEND)
    phases    the LAYER_* bits of the phases that have run
    """

    def __init__(self, layer, x, topk_idx, topk_weights, out, tensors):
        self.layer = layer
        self.x, self.topk_idx, self.topk_weights, self.out = x, topk_idx, topk_weights, out
        self._tensors = tensors  # the imported Tensors the C call reads: x, topk_idx, topk_weights, out
        self.handle = 0
        self.phases = 0

    @property
    def num_tokens(self):
        return self._tensors[0].shape[0]

    @property
    def done(self):
        """Whether its RECV phase ran (out holds the result)."""
        return bool(self.phases & LAYER_RECV)

    def __repr__(self):
        return (f"<epmoe.LayerForward handle={self.handle} rank={self.layer.group.rank} tokens={self.num_tokens} "
                f"ran={_phase_names(self.phases)}>")


def layer_ref(config, weights, xs, topk_idxs, topk_weights, *, scheme="w4afp8", intermediate=None,
              per_tensor_act=False, a1_scale=None, a2_scale=None, expected_m=0):
    """epmoe_layer_ref: the layer over all ranks in one call, on the host (the tests' oracle):
    dispatch_ref, the MLP reference per local expert, combine in fp32 in top-k order.

    weights[r] = (w13, w2) of rank r's local experts; xs[r] bf16 [T_r, H]; topk_idxs[r] int32
    [T_r, k]; topk_weights[r] float32 [T_r, k]; a1_scale / a2_scale (per_tensor_act): one float
    for every rank or one per rank. Returns bf16 [T_r, H] per rank (uint16 bits)."""
    cfg = _ref_config(config)
    R, H, k = cfg.num_ranks, cfg.hidden, cfg.top_k
    code = _scheme(scheme)
    if weights is None or not hasattr(weights, "__len__"):
        raise TypeError(f"weights: needs a sequence of one (w13, w2) pair per rank ({R}), got {type(weights).__name__}")
    _check_wire(code, cfg.wire_code)
    if len(weights) != R:
        raise ValueError(f"weights: needs one (w13, w2) pair per rank ({R}), got {len(weights)}")
    pairs = [_weights_pair(w) for w in weights]
    for r, pair in enumerate(pairs):
        for name, w in zip(("w13", "w2"), pair):
            if w is not None and not w.is_host:
                raise DLPackError(f"weights[{r}]: {name} is on {w.device_name}; the reference runs on the host")
    if intermediate is None and pairs and pairs[0][1] is not None:
        intermediate = pairs[0][1].K
    if not per_tensor_act and (a1_scale is not None or a2_scale is not None):
        raise ValueError("a1_scale and a2_scale are the per-tensor mode's scales: pass per_tensor_act=True")

    def per_rank_scale(s, name):
        if s is None:
            return [None] * R
        if isinstance(s, (list, tuple)):
            if len(s) != R:
                raise ValueError(f"{name}: needs one scale per rank ({R}), got {len(s)}")
            return [np.asarray([v], np.float32) for v in s]
        return [np.asarray([s], np.float32)] * R

    a1s, a2s = per_rank_scale(a1_scale, "a1_scale"), per_rank_scale(a2_scale, "a2_scale")
    a1t = [None if v is None else arg(v, "a1_scale", ("float32",)) for v in a1s]
    a2t = [None if v is None else arg(v, "a2_scale", ("float32",)) for v in a2s]
    xt = _per_rank(xs, R, "xs", ("uint16", "bfloat16"), lambda r: (None, H))
    Ts, n_tok = _tokens(xt, "xs")
    it = _per_rank(topk_idxs, R, "topk_idxs", ("int32",), lambda r: (Ts[r], k))
    wt = _per_rank(topk_weights, R, "topk_weights", ("float32",), lambda r: (Ts[r], k))
    outs = [np.zeros((Ts[r], H), np.uint16) for r in range(R)]
    ot = [arg(o, "out", ()) for o in outs]
    wc = (_LayerWeightsC * R)(*[_weights_c(p[0], p[1], a1t[r], a2t[r]) for r, p in enumerate(pairs)])
    lc = _config_c(code, intermediate, per_tensor_act, expected_m)
    c = cfg._c()
    check(lib.epmoe_layer_ref(ctypes.byref(c), ctypes.byref(lc), wc, _ptr_array(xt), _ptr_array(it), _ptr_array(wt),
                              n_tok, _ptr_array(ot)))
    return outs
