"""The MoE layer through the package on the CPU backend (ranks are Python threads): EpGroup.layer
forward against epmoe.layer_ref (bit-exact under REDUCE_AT_OWNER, within the bf16 partial-sum
bound under REDUCE_AT_EXPERT) for R = 1, 2, both wires and both activation scale modes; the
reference against its parts composed in Python (dispatch_ref, w4a8.mlp, combine_ref); the forward
in phases with two micro-batches in flight (S S X X R R) and every run of phases against the plain
forward and layer_ref; and the errors: weights of another scheme, wires a scheme cannot read,
shapes, closed groups, phases out of order."""
import numpy as np
import pytest

import epmoe
import models as mdl
from epmoe import w4a8

H, I = 256, 128
A1, A2 = 0.02, 0.004  # static per-tensor scales that fit the random data below


def make_case(R, wire, mode, *, seed, Ts=None, N=6, k=3):
    cfg = epmoe.EpConfig(num_ranks=R, max_tokens=N, hidden=H, num_experts=4 * R, top_k=k, wire=wire,
                         scale_fmt=epmoe.SCALE_F32_MMAJOR, combine_mode=mode, timeout_ms=20000)
    rng = np.random.default_rng(seed)
    L = cfg.local_experts
    weights = []
    for r in range(R):
        pair = []
        for n_, k_ in ((2 * I, H), (H, I)):
            vals = rng.integers(-8 if r % 2 else -7, 8, size=(L, n_, k_)).astype(np.int8)
            s = (0.02 * (0.5 + rng.random((L, n_, k_ // 128)))).astype(np.float32)
            pair.append(w4a8.repack(mdl.int4_ckpt(vals), s))
        weights.append(tuple(pair))
    Ts = Ts or [N - r % 2 for r in range(R)]
    xs, idxs, ws = [], [], []
    for T in Ts:
        x = (rng.standard_normal((T, H)) * (0.5 + rng.random((T, 1)))).astype(np.float32)
        xs.append(mdl.bf16_bits(x))
        idx = rng.integers(0, cfg.num_experts, size=(T, k)).astype(np.int32)
        idx[rng.random((T, k)) < 0.2] = -1
        idxs.append(idx)
        ws.append((0.2 + rng.random((T, k))).astype(np.float32))
    return cfg, weights, xs, idxs, ws


def run_layer(cfg, weights, xs, idxs, ws, *, per_tensor=False, rounds=2):
    """Every rank builds its layer in its own thread and runs `rounds` forwards (the later ones reuse
    the buffers: rows left from an earlier forward must not leak in). Returns each rank's outputs."""
    def rank(g):
        kw = dict(per_tensor_act=True, a1_scale=A1, a2_scale=A2) if per_tensor else {}
        with g.layer(weights=weights[g.rank], intermediate=I, **kw) as layer:
            assert layer.bytes > 0 and not layer.closed
            return [layer.forward(xs[g.rank], idxs[g.rank], ws[g.rank]) for _ in range(rounds)]

    with epmoe.CpuWorld(cfg.num_ranks) as world:
        return world.run(rank, cfg)


def reference(cfg, weights, xs, idxs, ws, *, per_tensor=False):
    kw = dict(per_tensor_act=True, a1_scale=A1, a2_scale=A2) if per_tensor else {}
    return epmoe.layer_ref(cfg, weights, xs, idxs, ws, intermediate=I, **kw)


@pytest.mark.parametrize("R", [1, 2])
@pytest.mark.parametrize("wire,per_tensor", [("fp8", False), ("fp8", True), ("bf16", False), ("bf16", True)])
def test_layer_forward_equals_reference_reduce_at_owner(R, wire, per_tensor):
    case = make_case(R, wire, "reduce_at_owner", seed=10 * R + (wire == "fp8") * 2 + per_tensor)
    outs = run_layer(*case, per_tensor=per_tensor)
    ref = reference(*case, per_tensor=per_tensor)
    for r in range(R):
        assert ref[r].shape == (case[2][r].shape[0], H)
        assert np.abs(mdl.bf16_value(ref[r])).max() > 0, "the reference is all zero: the test would prove nothing"
        for it, out in enumerate(outs[r]):
            assert out.dtype == np.uint16
            differ = int((out != ref[r]).sum())
            assert differ == 0, f"rank {r} forward {it}: {differ} of {out.size} outputs differ from layer_ref"


def test_layer_reduce_at_expert_within_bound():
    # each expert rank rounds its share of a token to bf16 before the owner adds them
    case = make_case(2, "fp8", "reduce_at_expert", seed=77)
    outs = run_layer(*case, rounds=1)
    ref = reference(*case)
    for r in range(2):
        got, want = mdl.bf16_value(outs[r][0]).astype(np.float64), mdl.bf16_value(ref[r]).astype(np.float64)
        rel = np.sqrt(((got - want) ** 2).sum() / (want ** 2).sum())
        assert rel <= 2.0 ** -8, f"rank {r}: relative L2 {rel:.3e}"


def test_zero_tokens_and_int64_ids():
    cfg, weights, xs, idxs, ws = make_case(2, "fp8", "reduce_at_owner", seed=5, Ts=[0, 6])
    ref = reference(cfg, weights, xs, idxs, ws)
    outs = run_layer(cfg, weights, xs, [i.astype(np.int64) for i in idxs], ws, rounds=1)
    assert outs[0][0].shape == (0, H)
    assert (outs[1][0] == ref[1]).all()


@pytest.mark.parametrize("wire,per_tensor", [("fp8", False), ("fp8", True), ("bf16", False)])
def test_reference_is_dispatch_mlp_combine(wire, per_tensor):
    """layer_ref against the parts the package exposes, composed here: what the layer means."""
    cfg, weights, xs, idxs, ws = make_case(2, wire, "reduce_at_owner", seed=31 + per_tensor)
    recv = epmoe.dispatch_ref(cfg, xs, idxs)
    expert_outs = []
    for r, d in enumerate(recv):
        w13, w2 = weights[r]
        L, M = cfg.local_experts, cfg.rows
        if wire == "bf16":  # the layer casts after a BF16 receive (1x128, F32_ROW) or per tensor
            flat = d["recv_x"].reshape(L * M, H)
            if per_tensor:
                q, s, fmt = epmoe.cast_tensor_fp8(flat, A1), None, None
            else:
                q, s = epmoe.cast_group_fp8(flat, epmoe.SCALE_F32_ROW)
                fmt = epmoe.SCALE_F32_ROW
            q = q.reshape(L, M, H)
        elif per_tensor:  # FP8 wire, compat mode: rows requantized to the static scale at receive
            q = epmoe.requant_fp8(d["recv_x"], d["recv_scales"], cfg.scale_fmt, d["masked_m"], A1)
            s, fmt = None, None
        else:
            q, s, fmt = d["recv_x"], d["recv_scales"], cfg.scale_fmt
        if per_tensor:
            y = w4a8.mlp(w13, w2, q, d["masked_m"], a_tensor_scale=A1, a2_tensor_scale=A2)
        else:
            y = w4a8.mlp(w13, w2, q, d["masked_m"], s, fmt)
        expert_outs.append(y)
    composed = epmoe.combine_ref(cfg, expert_outs, idxs, ws)
    ref = reference(cfg, weights, xs, idxs, ws, per_tensor=per_tensor)
    for r in range(2):
        assert (composed[r] == ref[r]).all(), f"rank {r}"


# ---- the bf16, w8a8_fp8_block and w4a16 schemes: ExpertWeights in checkpoint layouts -------------
# Against the fp64 model of the layer (weights dequantized, no rounding anywhere else), the error is
# at most the sum of the unit roundoffs of the roundings on the way (as tests/layer_common.h argues):
# gate and up, silu·up, the expert output and the layer output in bf16 (5 * 2^-8), and for fp8_block
# the tokens and the intermediate in fp8 (2 * 2^-4).
U_BF16, U_FP8 = 2.0 ** -8, 2.0 ** -4
EXPERT_CASES = [("bf16", "bf16", 0), ("w4a16", "bf16", 32), ("w4a16", "bf16", 128), ("w8a8_fp8_block", "fp8", 0),
                ("w8a8_fp8_block", "bf16", 0)]
_FMT = {"bf16": "bf16", "w4a16": "int4", "w8a8_fp8_block": "fp8_block"}


def expert_weights(rng, fmt, L, N, K, group):
    if fmt == "bf16":
        return epmoe.ExpertWeights("bf16", mdl.bf16_bits(0.05 * rng.standard_normal((L, N, K))))
    if fmt == "fp8_block":
        s = (0.002 * (0.5 + rng.random((L, N // 128, K // 128)))).astype(np.float32)
        return epmoe.ExpertWeights("fp8_block", mdl.fp8_sat(32 * rng.standard_normal((L, N, K))), s)
    s = (0.01 * (0.5 + rng.random((L, N, K // group)))).astype(np.float32)
    return epmoe.ExpertWeights("int4", mdl.int4_ckpt(rng.integers(-8, 8, size=(L, N, K))), s)


def dequant(w):
    """fp64 [E, N, K] of ExpertWeights (host)."""
    if w.format_name == "bf16":
        return mdl.bf16_value(w.data).astype(np.float64)
    if w.format_name == "fp8_block":
        s = np.repeat(np.repeat(w.scales, 128, axis=1), 128, axis=2)
        return mdl.fp8_value(w.data).astype(np.float64) * s
    return mdl.int4_values(w.data).astype(np.float64) * np.repeat(w.scales, w.group, axis=2)


def make_expert_case(R, scheme, wire, group, *, seed, N=6, k=3):
    cfg, _, xs, idxs, ws = make_case(R, wire, "reduce_at_owner", seed=seed, N=N, k=k)
    rng = np.random.default_rng(seed + 1000)
    L = cfg.local_experts
    weights = [tuple(expert_weights(rng, _FMT[scheme], L, n_, k_, group) for n_, k_ in ((2 * I, H), (H, I)))
               for _ in range(R)]
    return cfg, weights, xs, idxs, ws


def layer_model(cfg, weights, xs, idxs, ws):
    L = cfg.local_experts
    deq = [(dequant(a), dequant(b)) for a, b in weights]
    outs = []
    for x, idx, tw in zip(xs, idxs, ws):
        xv = mdl.bf16_value(x).astype(np.float64)
        out = np.zeros(xv.shape)
        for t in range(xv.shape[0]):
            for j, e in enumerate(idx[t]):
                if e < 0:
                    continue
                w13, w2 = deq[e // L][0][e % L], deq[e // L][1][e % L]
                g, u = np.split(w13 @ xv[t], 2)
                out[t] += tw[t, j] * (w2 @ (g / (1 + np.exp(-g)) * u))
        outs.append(out)
    return outs


@pytest.mark.parametrize("R", [1, 2])
@pytest.mark.parametrize("scheme,wire,group", EXPERT_CASES)
def test_expert_schemes_forward(R, scheme, wire, group):
    cfg, weights, xs, idxs, ws = make_expert_case(R, scheme, wire, group, seed=50 + R)

    def rank(g):
        with g.layer(weights=weights[g.rank], scheme=scheme) as layer:  # intermediate from e2
            return [layer.forward(xs[g.rank], idxs[g.rank], ws[g.rank]) for _ in range(2)]

    with epmoe.CpuWorld(R) as world:
        outs = world.run(rank, cfg)
    ref = epmoe.layer_ref(cfg, weights, xs, idxs, ws, scheme=scheme)
    model = layer_model(cfg, weights, xs, idxs, ws)
    bound = 5 * U_BF16 + (2 * U_FP8 if scheme == "w8a8_fp8_block" else 0)
    for r in range(R):
        for out in outs[r]:
            assert (out == ref[r]).all(), f"rank {r}: {int((out != ref[r]).sum())} outputs differ from layer_ref"
        got = mdl.bf16_value(ref[r]).astype(np.float64)
        assert np.abs(model[r]).max() > 0
        rel = np.sqrt(((got - model[r]) ** 2).sum() / (model[r] ** 2).sum())
        assert rel <= bound, f"rank {r}: rel. L2 {rel:.3e} against the fp64 model (bound {bound:.3e})"


def test_expert_weights_errors():
    z8, z16, z4 = np.zeros((2, 256, 128), np.uint8), np.zeros((2, 256, 128), np.uint16), np.zeros((2, 256, 64), np.int8)
    with pytest.raises(ValueError, match="format"):
        epmoe.ExpertWeights("int3", z8)
    with pytest.raises(ValueError, match="no scales"):
        epmoe.ExpertWeights("bf16", z16, np.ones((2, 2, 1), np.float32))
    with pytest.raises(ValueError, match="does not fit"):
        epmoe.ExpertWeights("fp8_block", z8, np.ones((2, 256, 1), np.float32))
    with pytest.raises(TypeError, match="scales"):
        epmoe.ExpertWeights("int4", z4)  # int4 needs its scales
    w = epmoe.ExpertWeights("int4", z4, np.ones((2, 256, 2), np.float32))
    assert (w.shape, w.group, w.is_host, w.format_name) == ((2, 256, 128), 64, True, "int4")
    cfg, weights, xs, idxs, ws = make_expert_case(1, "w4a16", "bf16", 128, seed=9)
    g64 = tuple(epmoe.ExpertWeights("int4", e.data, np.repeat(e.scales, 2, axis=2)) for e in weights[0])
    with pytest.raises(epmoe.InvalidArgument, match="group"):  # the library allows 32 and 128
        epmoe.layer_ref(cfg, [g64], xs, idxs, ws, scheme="w4a16")
    with pytest.raises(epmoe.InvalidArgument, match="takes EPMOE_WEIGHT_BF16 weights; e13 has EPMOE_WEIGHT_INT4"):
        epmoe.layer_ref(cfg, weights, xs, idxs, ws, scheme="bf16")
    with pytest.raises(epmoe.InvalidArgument, match="weights w13"):  # w4afp8 reads W4A8Weights
        epmoe.layer_ref(cfg.replace(wire="fp8"), weights, xs, idxs, ws, scheme="w4afp8")


# ---- schemes, wires and errors -------------------------------------------------------------------
def test_scheme_wires():
    assert epmoe.scheme_default_wire("w4afp8") == "fp8"
    assert epmoe.scheme_default_wire("bf16") == "bf16"
    assert epmoe.scheme_default_wire("w4a16") == "bf16"
    # the default tile hint: mean rows per expert + ceil(2.5 sqrt(mean)), at least 1
    assert epmoe.expected_rows(128, 2, 8, 256) == 16
    assert epmoe.expected_rows(256, 2, 8, 256) == 26
    assert epmoe.expected_rows(1, 1, 1, 256) == 1
    assert epmoe.scheme_accepts_wire("w4afp8", "fp8") and epmoe.scheme_accepts_wire("w4afp8", "bf16")
    assert not epmoe.scheme_accepts_wire("bf16", "fp8")  # would quantize what bf16 experts read
    assert not epmoe.scheme_accepts_wire("w4a16", epmoe.WIRE_FP8)
    with pytest.raises(ValueError, match="scheme"):
        epmoe.scheme_default_wire("int3")


@pytest.fixture
def one_rank():
    """A single-rank CPU group (R = 1 needs no peer threads) and fitting weights and tokens."""
    cfg, weights, xs, idxs, ws = make_case(1, "fp8", "reduce_at_owner", seed=3)
    world = epmoe.CpuWorld(1)
    g = world.create_group(0, cfg)
    yield g, weights[0], xs[0], idxs[0], ws[0]
    g.close()
    world.close()


def test_layer_creation_errors(one_rank):
    g, w, x, idx, tw = one_rank
    with pytest.raises(epmoe.InvalidArgument, match="cannot consume the group's FP8 wire"):
        g.layer(weights=w, scheme="bf16")
    with pytest.raises(epmoe.InvalidArgument, match="not an epmoe_scheme"):
        g.layer(weights=w, scheme=7)
    with pytest.raises(ValueError, match="scheme"):
        g.layer(weights=w, scheme="fp4")
    with pytest.raises(epmoe.InvalidArgument, match="weights w13"):  # the weights are for I = 128
        g.layer(weights=w, intermediate=256)
    with pytest.raises(epmoe.InvalidArgument, match="weights w13"):  # w13 and w2 swapped
        g.layer(weights=(w[1], w[0]))
    with pytest.raises(epmoe.NullPointer, match="a1_scale and a2_scale"):
        g.layer(weights=w, per_tensor_act=True, a1_scale=A1)
    with pytest.raises(ValueError, match="per_tensor_act"):
        g.layer(weights=w, a1_scale=A1, a2_scale=A2)
    with pytest.raises(TypeError, match="pair"):
        g.layer(weights=w[0])
    with pytest.raises(TypeError, match="W4A8Weights"):
        g.layer(weights=(w[0], "w2"))


def test_other_schemes_refuse_w4a8_weights():
    # bf16, w8a8_fp8_block and w4a16 read their own weights (epmoe_layer_weights.e13/e2), not W4A8's
    cfg = make_case(1, "bf16", "reduce_at_owner", seed=4)[0]
    weights = make_case(1, "bf16", "reduce_at_owner", seed=4)[1][0]
    with epmoe.CpuWorld(1) as world:
        g = world.create_group(0, cfg)
        try:
            for scheme in ("bf16", "w8a8_fp8_block", "w4a16"):
                with pytest.raises(epmoe.InvalidArgument, match="weights e13"):
                    g.layer(weights=weights, scheme=scheme)
        finally:
            g.close()


def test_forward_errors_and_lifetime(one_rank):
    g, w, x, idx, tw = one_rank
    layer = g.layer(weights=w)
    ok = layer(x, idx, tw)  # __call__ is forward
    assert ok.shape == x.shape
    with pytest.raises(ValueError, match="hidden size"):
        layer.forward(np.ascontiguousarray(x[:, :128]), idx, tw)
    with pytest.raises(ValueError, match="topk_idx"):
        layer.forward(x, np.ascontiguousarray(idx[:, :2]), tw)
    with pytest.raises(ValueError, match="topk_weights"):
        layer.forward(x, idx, tw[:-1])
    with pytest.raises(TypeError, match="topk_weights"):
        layer.forward(x, idx, None)
    bad = idx.copy()
    bad[0, 0] = 99  # no such expert: the library refuses the dispatch
    with pytest.raises(epmoe.InvalidArgument, match="99"):
        layer.forward(x, bad, tw)
    big = np.zeros((g.config.max_tokens + 1, H), np.uint16)
    with pytest.raises(epmoe.InvalidArgument):
        layer.forward(big, np.zeros((len(big), 3), np.int32), np.ones((len(big), 3), np.float32))
    out = np.zeros_like(x)
    assert layer.forward(x, idx, tw, out=out) is out and (out == ok).all()  # still usable after the errors
    g.close()  # closing the group closes its layers first
    assert layer.closed
    with pytest.raises(epmoe.InvalidArgument, match="closed"):
        layer.forward(x, idx, tw)


def test_layer_ref_errors():
    cfg, weights, xs, idxs, ws = make_case(2, "fp8", "reduce_at_owner", seed=8)
    with pytest.raises(ValueError, match="one \\(w13, w2\\) pair per rank"):
        epmoe.layer_ref(cfg, weights[:1], xs, idxs, ws)
    with pytest.raises(epmoe.InvalidArgument, match="cannot consume"):
        epmoe.layer_ref(cfg, weights, xs, idxs, ws, scheme="bf16")
    with pytest.raises(epmoe.InvalidArgument, match="weights e13"):  # w4a16 reads int4 checkpoint weights
        epmoe.layer_ref(cfg.replace(wire="bf16"), weights, xs, idxs, ws, scheme="w4a16")
    with pytest.raises(epmoe.NullPointer):
        epmoe.layer_ref(cfg, weights, xs, idxs, ws, per_tensor_act=True)
    with pytest.raises(TypeError, match="dtype"):  # the reference takes int32 ids
        epmoe.layer_ref(cfg, weights, xs, [i.astype(np.int64) for i in idxs], ws)
    # per-rank static scales
    a = epmoe.layer_ref(cfg, weights, xs, idxs, ws, per_tensor_act=True, a1_scale=[A1, A1], a2_scale=A2)
    b = epmoe.layer_ref(cfg, weights, xs, idxs, ws, per_tensor_act=True, a1_scale=A1, a2_scale=A2)
    assert all((p == q).all() for p, q in zip(a, b))


# ---- the forward in phases (Layer.forward_send / forward_experts / forward_recv, forward_phase) ----
PHASE_CASES = [  # (R, scheme, wire, per_tensor, combine mode, tokens per rank or None)
    (2, "w4afp8", "fp8", False, "reduce_at_owner", None),
    (3, "w4afp8", "bf16", True, "reduce_at_owner", [6, 0, 5]),  # a rank whose micro-batches are empty
    (2, "w4a16", "bf16", False, "reduce_at_owner", None),
    (2, "w8a8_fp8_block", "fp8", False, "reduce_at_owner", [1, 5]),  # micro-batches of 0 and 1 tokens
    (2, "w4afp8", "fp8", False, "reduce_at_expert", None),
]


def phase_case(R, scheme, wire, per_tensor, mode, Ts, seed):
    if scheme == "w4afp8":
        cfg, weights, xs, idxs, ws = make_case(R, wire, mode, seed=seed, Ts=Ts)
    else:
        cfg, weights, xs, idxs, ws = make_expert_case(R, scheme, wire, 128, seed=seed)
        if Ts:
            xs, idxs, ws = ([a[:T].copy() for a, T in zip(arrs, Ts)] for arrs in (xs, idxs, ws))
    kw = dict(scheme=scheme, intermediate=I)
    if per_tensor:
        kw.update(per_tensor_act=True, a1_scale=A1, a2_scale=A2)
    return cfg.replace(combine_mode=mode), weights, xs, idxs, ws, kw


@pytest.mark.parametrize("R,scheme,wire,per_tensor,mode,Ts", PHASE_CASES)
def test_phases_two_micro_batches_in_flight(R, scheme, wire, per_tensor, mode, Ts):
    """Each rank splits its batch in two micro-batches a, b and runs S(a) S(b) X(a) X(b) R(a) R(b),
    then the whole batch as one forward and as the other runs of phases (S|X R, S X|R, ALL). Under
    REDUCE_AT_OWNER a token's output does not depend on its batch: every one equals layer_ref bit for
    bit (and the plain forward); under REDUCE_AT_EXPERT within the bf16 partial-sum bound."""
    import gc
    cfg, weights, xs, idxs, ws, kw = phase_case(R, scheme, wire, per_tensor, mode, Ts, seed=90 + R)

    def rank(g):
        r = g.rank
        x, idx, tw = xs[r], idxs[r], ws[r]
        h = len(x) // 2
        with g.layer(weights=weights[r], **kw) as layer:
            # fresh copies only the LayerForwards hold; b's ids in int64 and b's out the caller's
            fa = layer.forward_send(x[:h].copy(), idx[:h].copy(), tw[:h].copy())
            out_b = np.full((len(x) - h, H), 0xFFFF, np.uint16)
            fb = layer.forward_send(x[h:].copy(), idx[h:].astype(np.int64), tw[h:].copy(), out=out_b)
            gc.collect()
            assert (fa.phases, fb.phases, fb.handle) == (epmoe.LAYER_SEND, epmoe.LAYER_SEND, fa.handle + 1)
            assert g._forwards == [fa, fb]
            assert layer.forward_experts(fa) is fa
            layer.forward_experts(fb)
            assert fa.phases == epmoe.LAYER_SEND | epmoe.LAYER_EXPERTS and not fa.done
            out_a = layer.forward_recv(fa)
            assert layer.forward_recv(fb) is out_b and fb.out is out_b
            assert fa.done and fb.phases == epmoe.LAYER_ALL and g._forwards == []
            split = np.concatenate([out_a, out_b])
            plain = layer.forward(x, idx, tw)
            f = layer.forward_phase(x, idx, tw, phases=epmoe.LAYER_SEND | epmoe.LAYER_EXPERTS)
            sx_r = layer.forward_phase(f, phases="recv").out
            f = layer.forward_phase(x, idx, tw, phases="send")
            s_xr = layer.forward_phase(f, phases="experts|recv").out
            whole = layer.forward_phase(x, idx, tw, phases=epmoe.LAYER_ALL)
            assert whole.done and repr(whole).endswith("ran=SEND|EXPERTS|RECV>")
            return {"S(a) S(b) X(a) X(b) R(a) R(b)": split, "forward": plain, "S|X R": sx_r, "S X|R": s_xr,
                    "ALL": whole.out}

    with epmoe.CpuWorld(R) as world:
        outs = world.run(rank, cfg)
    ref = epmoe.layer_ref(cfg, weights, xs, idxs, ws, **kw)
    for r in range(R):
        if len(xs[r]):
            assert np.abs(mdl.bf16_value(ref[r])).max() > 0
        for name, out in outs[r].items():
            assert out.shape == ref[r].shape, f"rank {r} {name}"
            if mode == "reduce_at_owner":
                differ = int((out != ref[r]).sum())
                assert differ == 0, f"rank {r} {name}: {differ} of {out.size} outputs differ from layer_ref"
            elif out.size:
                got, want = mdl.bf16_value(out).astype(np.float64), mdl.bf16_value(ref[r]).astype(np.float64)
                rel = np.sqrt(((got - want) ** 2).sum() / (want ** 2).sum())
                assert rel <= 2.0 ** -8, f"rank {r} {name}: relative L2 {rel:.3e}"


def test_phase_order_errors(one_rank):
    """Phases out of order raise InvalidArgument before anything moves: the forwards then finish and
    equal the reference."""
    g, w, x, idx, tw = one_rank
    ref = epmoe.layer_ref(g.config, [w], [x], [idx], [tw])[0]
    layer, other = g.layer(weights=w), g.layer(weights=w)
    fa = layer.forward_send(x, idx, tw)
    with pytest.raises(epmoe.InvalidArgument, match="RECV of forward 1 before its EXPERTS phase"):
        layer.forward_recv(fa)
    with pytest.raises(epmoe.InvalidArgument, match="forward 1 already ran its SEND phase"):
        layer.forward_phase(fa, phases=epmoe.LAYER_SEND | epmoe.LAYER_EXPERTS)
    for bad in (0, 5, 8, "send|recv"):
        with pytest.raises(epmoe.InvalidArgument, match="not SEND, EXPERTS, RECV or a run of them"):
            layer.forward_phase(fa, phases=bad)
    with pytest.raises(ValueError, match="phase 'combine'"):
        layer.forward_phase(fa, phases="combine")
    with pytest.raises(TypeError, match="pass the LayerForward"):
        layer.forward_experts(x)
    with pytest.raises(TypeError, match="pass only the LayerForward"):
        layer.forward_phase(fa, idx, tw, phases="experts")
    with pytest.raises(epmoe.InvalidArgument, match="forward 1 belongs to another layer"):
        other.forward_experts(fa)
    fb = layer.forward_send(x, idx, tw)
    # a group's forwards receive in send order, whichever layer sent them
    for call in (lambda: layer.forward_experts(fb), lambda: layer.forward(x, idx, tw),
                 lambda: other.forward_phase(x, idx, tw, phases="send|experts")):
        with pytest.raises(epmoe.InvalidArgument, match="forward 1 was sent before .* has not run its EXPERTS phase"):
            call()
    with pytest.raises(epmoe.InvalidArgument, match="still in flight"):  # the library's: two at most
        other.forward_send(x, idx, tw)
    layer.forward_experts(fa)
    with pytest.raises(epmoe.InvalidArgument, match="forward 1 already ran its EXPERTS phase"):
        layer.forward_experts(fa)
    layer.forward_experts(fb)
    out_a, out_b = layer.forward_recv(fa), layer.forward_recv(fb)
    with pytest.raises(epmoe.InvalidArgument, match="forward 2 is complete"):
        layer.forward_recv(fb)
    assert (out_a == ref).all() and (out_b == ref).all() and g._forwards == []
    # a send the library refuses starts nothing
    bad = idx.copy()
    bad[0, 0] = 99
    with pytest.raises(epmoe.InvalidArgument, match="99"):
        layer.forward_send(x, bad, tw)
    assert g._forwards == [] and (layer.forward(x, idx, tw) == ref).all()
    layer.close()
    with pytest.raises(epmoe.InvalidArgument, match="closed"):
        layer.forward_send(x, idx, tw)


def test_phase_order_the_library_refuses(one_rank):
    """A dispatch the layer does not see (EpGroup.dispatch_send) is still ordered by the library: a
    forward sent after it cannot receive first. SEND with EXPERTS is one dispatch call, refused before
    anything goes out: no forward is left for the peers to wait on, and one sent alone still is."""
    g, w, x, idx, tw = one_rank
    ref = epmoe.layer_ref(g.config, [w], [x], [idx], [tw])[0]
    layer = g.layer(weights=w)
    d = g.dispatch_send(x, idx, tw)
    with pytest.raises(epmoe.InvalidArgument, match="receives follow dispatch order") as exc:
        layer.forward_phase(x, idx, tw, phases=epmoe.LAYER_SEND | epmoe.LAYER_EXPERTS)
    assert "nothing was sent" in str(exc.value) and not hasattr(exc.value, "forward") and g._forwards == []
    f = layer.forward_send(x, idx, tw)  # SEND alone goes out behind d; its EXPERTS must wait for d
    assert f.handle == d.handle + 1 and g._forwards == [f]
    with pytest.raises(epmoe.InvalidArgument, match="receives follow dispatch order"):
        layer.forward_experts(f)
    g.dispatch_recv(d)
    cfg = g.config
    g.combine(d, np.zeros((cfg.local_experts, cfg.rows, H), np.uint16))
    assert (layer.forward_recv(layer.forward_experts(f)) == ref).all()


def test_close_with_a_forward_in_flight_is_refused(one_rank):
    """epmoe_layer_destroy cannot finish or cancel a sent forward (its remaining phases are collective
    and write the layer's buffers): close() names it and leaves the layer usable; the group's close,
    which destroys the ep too, closes the layer regardless."""
    g, w, x, idx, tw = one_rank
    ref = epmoe.layer_ref(g.config, [w], [x], [idx], [tw])[0]
    layer = g.layer(weights=w)
    f = layer.forward_send(x, idx, tw)
    with pytest.raises(epmoe.InvalidArgument, match="close: forward 1 of this layer is in flight.*forward_experts, "
                                                   "then forward_recv"):
        layer.close()
    layer.forward_experts(f)
    with pytest.raises(epmoe.InvalidArgument, match=r"close: forward 1 .* ran SEND\|EXPERTS\).*: forward_recv$"):
        layer.close()
    assert not layer.closed and (layer.forward_recv(f) == ref).all()
    layer.close()
    assert layer.closed
    with pytest.raises(RuntimeError, match="boom"):  # leaving a with block by an exception keeps that exception
        with g.layer(weights=w) as other:
            other.forward_send(x, idx, tw)
            raise RuntimeError("boom")
    assert not other.closed
    g.close()
    assert other.closed


def test_a_call_on_a_closed_layer_leaves_its_group_closable(one_rank):
    """The layer's guard refuses the call after the group's guard counted it in: the group's count
    must be given back, or the group's close would wait for that call forever."""
    import threading
    g, w, x, idx, tw = one_rank
    layer = g.layer(weights=w)
    layer.close()
    for _ in range(3):  # bytes goes through the two guards (forward is refused before them)
        with pytest.raises(epmoe.InvalidArgument, match="closed"):
            layer.bytes  # noqa: B018
    t = threading.Thread(target=g.close, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive() and g.closed


def test_layer_integers_outside_their_c_type_are_refused(one_rank):
    g, w, x, idx, tw = one_rank
    with pytest.raises(ValueError, match="scheme = 4294967298 is outside"):  # would be scheme 2, w4afp8
        g.layer(weights=w, scheme=2 ** 32 + 2)
    with pytest.raises(ValueError, match="expected_m = 18446744073709551616 is outside"):
        g.layer(weights=w, expected_m=2 ** 64)
    with pytest.raises(ValueError, match="ranks = 4294967297 is outside"):
        epmoe.expected_rows(128, 2 ** 32 + 1, 8, 256)
    with pytest.raises(ValueError, match=r"xs\[0\]: expected 2 dimensions"):
        epmoe.layer_ref(g.config, [w], [np.uint16(1)], [idx], [tw])


def test_a_layer_and_its_group_closed_at_once_from_two_threads():
    """Layer.close on one thread and EpGroup.close (which closes the group's layers) on another, at
    the same moment: one of them frees the layer, once (both had freed it: double free, abort)."""
    import sys
    import threading
    cfg = epmoe.EpConfig(num_ranks=1, max_tokens=4, hidden=128, num_experts=1, top_k=1, wire="fp8")
    w13 = w4a8.repack(np.zeros((1, 256, 64), np.int8), np.full((1, 256, 1), 0.01, np.float32))
    w2 = w4a8.repack(np.zeros((1, 128, 64), np.int8), np.full((1, 128, 1), 0.01, np.float32))
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # thread switches anywhere, so the two closes interleave
    try:
        with epmoe.CpuWorld(1) as world:
            for _ in range(2000):
                g = world.create_group(0, cfg)
                lay = g.layer(weights=(w13, w2), intermediate=128)
                b = threading.Barrier(2)
                ts = [threading.Thread(target=lambda: (b.wait(), lay.close())),
                      threading.Thread(target=lambda: (b.wait(), g.close()))]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join()
                assert lay.closed and g.closed
    finally:
        sys.setswitchinterval(old)
