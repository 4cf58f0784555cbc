"""EP dispatch + combine on the CPU world (ranks are Python threads), checked against the numpy
model of tests/models.py over the global routing table: masked_m, the set and order of rows of
every expert, their bytes (bf16 exact; fp8 and scales by the DeepEP cast rules), src_info, and
the combine output (bit-exact for REDUCE_AT_OWNER, within the error model for REDUCE_AT_EXPERT).
Plus: -1 slots, duplicate experts, zero tokens, T = N, split halves, caller buffers, masked
ranks, timeouts, and bad input raising the library's message."""
import os
import re
import threading

import numpy as np
import pytest

import epmoe
import models as mdl

BF16_U = 2.0 ** -8


def make_inputs(cfg, Ts, seed, *, dup=False, idx64=False):
    """Per-rank tokens (bf16 bits), top-k ids with -1 slots, weights."""
    rng = np.random.default_rng(seed)
    xs, idxs, ws = [], [], []
    for r, T in enumerate(Ts):
        x = (rng.standard_normal((T, cfg.hidden)) * np.exp(rng.standard_normal((T, 1)))).astype(np.float32)
        xs.append(mdl.bf16_bits(x))
        idx = rng.integers(0, cfg.num_experts, size=(T, cfg.top_k))
        idx[rng.random((T, cfg.top_k)) < 0.2] = -1
        if dup and cfg.top_k > 1:
            idx[:, 1] = idx[:, 0]  # the same expert in two slots: reaches it once, counts twice
        if T > 2:
            idx[T // 2] = -1  # a token that goes nowhere: combine gives it zeros
        idxs.append(idx.astype(np.int64 if idx64 else np.int32))
        ws.append((0.25 + rng.random((T, cfg.top_k))).astype(np.float32))
    return xs, idxs, ws


def expert_fn(cfg, recv_x, recv_scales, masked):
    """A fake expert: y = v * (1 + le % 3) + (h % 5) / 8 on the received rows (v dequantized)."""
    L, M, H = cfg.local_experts, cfg.rows, cfg.hidden
    y = np.zeros((L, M, H), np.uint16)
    for le in range(L):
        m = int(masked[le])
        if cfg.fp8:
            s = mdl.scales_from_layout(recv_scales[le], epmoe.formats._fmt(cfg.scale_fmt), M, H // 128)
            v = mdl.fp8_value(recv_x[le, :m]) * np.repeat(s[:m], 128, axis=1)
        else:
            v = mdl.bf16_value(recv_x[le, :m])
        y[le, :m] = mdl.bf16_bits(v * (1 + le % 3) + (np.arange(H) % 5) * 0.125)
    return y


def run_ep(cfg, xs, idxs, ws, *, split=False, active=None, rounds=1, world=None):
    """Every rank: dispatch, fake expert, combine; returns per rank (outputs of the last round). On
    a new CpuWorld, or on `world` (one more group a rank there)."""
    def rank(g):
        r = g.rank
        if active is not None:
            if not active[r]:
                return None  # a failed rank: it joined the group, then does nothing
            g.set_active_ranks(active)
        got = None
        for _ in range(rounds):
            if split:
                d = g.dispatch_send(xs[r], idxs[r], ws[r])
                g.dispatch_recv(d)
            else:
                d = g.dispatch(xs[r], idxs[r], ws[r])
            y = expert_fn(g.config, d.recv_x, d.recv_scales, d.masked_m)
            if split:
                g.combine_send(d, y)
                out = g.combine_recv(d)
            else:
                out = g.combine(d, y)
            got = dict(recv_x=d.recv_x, recv_scales=d.recv_scales, masked_m=d.masked_m, src_info=d.src_info,
                       expert_out=y, out=out, thread=threading.get_ident())
        return got

    if world is not None:
        return world.run(rank, cfg)
    with epmoe.CpuWorld(cfg.num_ranks) as world:
        return world.run(rank, cfg)


def check_against_model(cfg, xs, idxs, ws, res, active=None):
    R, L, N, H = cfg.num_ranks, cfg.local_experts, cfg.max_tokens, cfg.hidden
    fmt = epmoe.formats._fmt(cfg.scale_fmt)
    act = [True] * R if active is None else active
    rows = mdl.ep_routing(cfg, [np.asarray(i) for i in idxs], active)
    for d in range(R):
        if not act[d]:
            continue
        g = res[d]
        assert g["masked_m"].tolist() == [len(rows[d][le]) for le in range(L)], f"masked_m of rank {d}"
        for le in range(L):
            want = rows[d][le]
            m = len(want)
            assert g["src_info"][le, :m].tolist() == [src * N + t for src, t in want], f"rows of expert {d * L + le}"
            if not m:
                continue
            x = np.stack([xs[src][t] for src, t in want])
            if cfg.fp8:
                q, s = mdl.group_cast(x, cfg.round_scale)
                assert (g["recv_x"][le, :m] == q).all()
                assert (mdl.scales_from_layout(g["recv_scales"][le], fmt, cfg.rows, H // 128)[:m] == s).all()
            else:
                assert (g["recv_x"][le, :m] == x).all()  # BF16 wire: bit-exact
    eo = [res[d]["expert_out"] if act[d] else None for d in range(R)]
    want_out = mdl.combine_owner(cfg, rows, idxs, ws, eo, active)
    for r in range(R):
        if not act[r]:
            continue
        got = res[r]["out"]
        assert got.shape == (len(idxs[r]), H) and got.dtype == np.uint16
        if cfg.combine_code == epmoe.REDUCE_AT_OWNER:
            assert (got == want_out[r]).all(), f"combine of rank {r}"
        else:
            gv, wv = mdl.bf16_value(got).astype(np.float64), mdl.bf16_value(want_out[r]).astype(np.float64)
            _, parts_abs, terms_abs = mdl.combine_expert_bound(cfg, rows, idxs, ws, eo, r, active)
            bound = BF16_U * (parts_abs + np.abs(gv) + np.abs(wv)) + 1e-6 * terms_abs + 1e-30
            assert (np.abs(gv - wv) <= bound).all(), f"combine of rank {r}: worst {np.max(np.abs(gv - wv) / bound)}"
        nowhere = (np.asarray(idxs[r]) < 0).all(1)
        assert (got[nowhere] == 0).all()  # tokens with every slot -1 get zeros


# ---- the matrix ----------------------------------------------------------------------------------
MODES = {"dedup+expert": dict(dedup=True, combine_mode="reduce_at_expert"),
         "dedup+owner": dict(dedup=True, combine_mode="reduce_at_owner"),
         "per-expert+owner": dict(dedup=False, combine_mode="reduce_at_owner")}


@pytest.mark.parametrize("R", [1, 2, 3])
@pytest.mark.parametrize("wire", ["bf16", "fp8"])
@pytest.mark.parametrize("mode", list(MODES))
def test_dispatch_combine_matches_numpy_model(R, wire, mode):
    N = 7
    cfg = epmoe.EpConfig(num_ranks=R, max_tokens=N, hidden=256, num_experts=4 * R, top_k=3, wire=wire,
                         scale_fmt=["f32_row", "f32_mmajor"][R % 2], timeout_ms=5000, **MODES[mode])
    Ts = [N, 0, 5][:R] if R > 1 else [N]  # T = N, a rank with no tokens, an ordinary one
    xs, idxs, ws = make_inputs(cfg, Ts, seed=R * 10 + len(mode), dup=mode == "dedup+owner",
                               idx64=mode == "per-expert+owner")
    res = run_ep(cfg, xs, idxs, ws, split=mode == "dedup+owner")
    assert len({r["thread"] for r in res}) == R  # one thread per rank
    check_against_model(cfg, xs, idxs, ws, res)


@pytest.mark.parametrize("fmt", ["ue8m0_row", "ue8m0_mmajor"])
def test_ue8m0_scales_with_padding_groups(fmt):
    cfg = epmoe.EpConfig(num_ranks=2, max_tokens=6, hidden=640, num_experts=4, top_k=2, wire="fp8", scale_fmt=fmt,
                         round_scale=True, combine_mode="reduce_at_owner", timeout_ms=5000)
    xs, idxs, ws = make_inputs(cfg, [6, 4], seed=5)
    check_against_model(cfg, xs, idxs, ws, run_ep(cfg, xs, idxs, ws))


def test_matches_the_library_reference_too():
    cfg = epmoe.EpConfig(num_ranks=3, max_tokens=5, hidden=128, num_experts=6, top_k=2, wire="fp8",
                         combine_mode="reduce_at_owner", timeout_ms=5000)
    xs, idxs, ws = make_inputs(cfg, [5, 3, 4], seed=9)
    res = run_ep(cfg, xs, idxs, ws)
    ref = epmoe.dispatch_ref(cfg, xs, idxs)
    for r in range(3):
        assert (ref[r]["masked_m"] == res[r]["masked_m"]).all()
        for le in range(cfg.local_experts):
            m = ref[r]["masked_m"][le]
            assert (ref[r]["recv_x"][le, :m] == res[r]["recv_x"][le, :m]).all()
            assert (ref[r]["src_info"][le, :m] == res[r]["src_info"][le, :m]).all()
    outs = epmoe.combine_ref(cfg, [r["expert_out"] for r in res], idxs, ws)
    for r in range(3):
        assert (outs[r] == res[r]["out"]).all()


def test_references_check_active_and_each_ranks_entry():
    cfg = epmoe.EpConfig(num_ranks=2, max_tokens=4, hidden=128, num_experts=4, top_k=2, wire="fp8",
                         combine_mode="reduce_at_owner")
    xs, idxs, ws = make_inputs(cfg, [4, 3], seed=6)
    ys = [np.zeros((cfg.local_experts, cfg.rows, cfg.hidden), np.uint16)] * 2
    for active in ([1], [1, 1, 1]):  # one flag per rank, as set_active_ranks takes them
        msg = f"active needs one flag per rank \\(2\\), got {len(active)}"
        with pytest.raises(ValueError, match="dispatch_ref: " + msg):
            epmoe.dispatch_ref(cfg, xs, idxs, active=active)
        with pytest.raises(ValueError, match="combine_ref: " + msg):
            epmoe.combine_ref(cfg, ys, idxs, ws, active=active)
    masked = epmoe.dispatch_ref(cfg, xs, idxs, active=[1, 0])
    assert all(not (d["src_info"] // cfg.max_tokens == 1).any() for d in masked)  # rank 1's tokens stay home
    with pytest.raises(ValueError, match=r"xs\[0\]: expected 2 dimensions, got shape \(\)"):
        epmoe.dispatch_ref(cfg, [np.uint16(1), xs[1]], idxs)
    with pytest.raises(ValueError, match=r"topk_idxs\[1\]: expected 2 dimensions"):
        epmoe.combine_ref(cfg, ys, [idxs[0], np.int32(1)], ws)
    with pytest.raises(ValueError, match=r"topk_idxs\[1\]: shape \(4, 2\), expected \[3, 2\]"):
        epmoe.dispatch_ref(cfg, xs, [idxs[0], idxs[0]])


def test_integers_outside_the_c_int_are_refused():
    # ctypes keeps the low 32 bits: hidden = 2**32 + 128 was the layout of hidden = 128
    with pytest.raises(ValueError, match="EpConfig.hidden = 4294967424 is outside the range of its C type"):
        epmoe.layout_query(max_tokens=4, hidden=2 ** 32 + 128, num_experts=2, top_k=2)
    with pytest.raises(ValueError, match="EpConfig.timeout_ms"):
        epmoe.layout_query(timeout_ms=2 ** 31)
    with pytest.raises(ValueError, match="wire = 4294967297"):
        epmoe.layout_query(wire=2 ** 32 + 1)
    with pytest.raises(TypeError, match="EpConfig.max_tokens: expected an integer, got float"):
        epmoe.layout_query(max_tokens=4.5)
    with pytest.raises(ValueError, match="num_ranks = 4294967297 is outside"):  # was a world of 1 rank
        epmoe.CpuWorld(2 ** 32 + 1)
    assert epmoe.layout_query(max_tokens=np.int64(4), hidden=128, num_experts=2, top_k=2).out_bytes == 4 * 128 * 2


def test_zero_tokens_everywhere():
    cfg = epmoe.EpConfig(num_ranks=2, max_tokens=4, hidden=128, num_experts=2, top_k=2, timeout_ms=5000)
    xs, idxs, ws = make_inputs(cfg, [0, 0], seed=1)
    res = run_ep(cfg, xs, idxs, ws)
    for r in res:
        assert r["masked_m"].tolist() == [0] and r["out"].shape == (0, 128)


def test_every_slot_minus_one_and_everything_to_one_expert():
    cfg = epmoe.EpConfig(num_ranks=2, max_tokens=4, hidden=128, num_experts=4, top_k=2, wire="bf16",
                         combine_mode="reduce_at_owner", timeout_ms=5000)
    xs, _, ws = make_inputs(cfg, [4, 3], seed=2)
    idxs = [np.full((4, 2), -1, np.int32), np.full((3, 2), -1, np.int32)]
    res = run_ep(cfg, xs, idxs, ws)
    assert all(r["masked_m"].tolist() == [0, 0] for r in res) and all((r["out"] == 0).all() for r in res)
    idxs = [np.full((4, 2), 3, np.int32), np.full((3, 2), 3, np.int32)]
    res = run_ep(cfg, xs, idxs, ws, rounds=3)  # several rounds: the window parities wrap
    check_against_model(cfg, xs, idxs, ws, res)
    assert res[1]["masked_m"].tolist() == [0, 7]


def test_world_closed_before_its_groups_and_two_groups_a_rank():
    """A CpuWorld closed while its groups are open lives on until they close (the block's end
    closes the world, not the groups); and a world takes any number of groups, made collectively in
    the same order on every rank, as a communicator does."""
    cfg = epmoe.EpConfig(num_ranks=2, max_tokens=4, hidden=128, num_experts=4, top_k=2, wire="bf16",
                         combine_mode="reduce_at_owner", timeout_ms=5000)
    xs, idxs, ws = make_inputs(cfg, [4, 3], seed=9)
    groups = [None, None]
    with epmoe.CpuWorld(2) as world:
        def make(r):
            groups[r] = world.create_group(r, cfg)
        ts = [threading.Thread(target=make, args=(r,)) for r in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
    res = [None, None]

    def rank(r):
        d = groups[r].dispatch(xs[r], idxs[r], ws[r])
        y = expert_fn(cfg, d.recv_x, None, d.masked_m)
        res[r] = dict(recv_x=d.recv_x, recv_scales=None, masked_m=d.masked_m, src_info=d.src_info, expert_out=y,
                      out=groups[r].combine(d, y))
        groups[r].close()
    ts = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    check_against_model(cfg, xs, idxs, ws, res)
    with epmoe.CpuWorld(2) as world:  # the same world, three times over: one group a run, a rank
        for seed in (10, 11, 12):
            xs, idxs, ws = make_inputs(cfg, [4, 3], seed=seed)
            check_against_model(cfg, xs, idxs, ws, run_ep(cfg, xs, idxs, ws, world=world))


def test_masked_rank_is_skipped():
    cfg = epmoe.EpConfig(num_ranks=3, max_tokens=5, hidden=128, num_experts=6, top_k=3, wire="bf16",
                         combine_mode="reduce_at_owner", timeout_ms=5000)
    xs, idxs, ws = make_inputs(cfg, [5, 4, 5], seed=4)
    active = [1, 1, 0]
    res = run_ep(cfg, xs, idxs, ws, active=active)
    check_against_model(cfg, xs, idxs, ws, res, active)


def test_requant_at_receive():
    cfg = epmoe.EpConfig(num_ranks=2, max_tokens=4, hidden=256, num_experts=4, top_k=2, wire="fp8",
                         scale_fmt="f32_row", timeout_ms=5000)
    xs, idxs, ws = make_inputs(cfg, [4, 4], seed=6)

    def rank(g):
        d = g.dispatch(xs[g.rank], idxs[g.rank], ws[g.rank], requant_scale=0.05)
        assert d.recv_scales is None
        g.combine(d, np.zeros((2, 8, 256), np.uint16))
        return d.recv_x, d.masked_m

    with epmoe.CpuWorld(2) as world:
        res = world.run(rank, cfg)
    rows = mdl.ep_routing(cfg, idxs)
    inv = np.float32(1) / np.float32(0.05)
    for d in range(2):
        for le in range(2):
            want = rows[d][le]
            if want:
                q, s = mdl.group_cast(np.stack([xs[src][t] for src, t in want]))
                v = (mdl.fp8_value(q) * np.repeat(s, 128, axis=1)).astype(np.float32)
                assert (res[d][0][le, : len(want)] == mdl.fp8_sat((v * inv).astype(np.float32))).all()


# ---- buffers and handles ---------------------------------------------------------------------
def test_callers_buffers_are_written_in_place_and_reused():
    cfg = epmoe.EpConfig(num_ranks=2, max_tokens=4, hidden=128, num_experts=2, top_k=1, wire="fp8",
                         combine_mode="reduce_at_owner", timeout_ms=5000)
    xs, idxs, ws = make_inputs(cfg, [4, 3], seed=7)
    lay = epmoe.layout_query(cfg)

    def rank(g):
        r = g.rank
        bufs = {"recv_x": np.zeros((1, 8, 128), np.uint8), "recv_scales": np.zeros(lay.recv_scales_bytes, np.uint8),
                "masked_m": np.zeros(1, np.int32)}
        out = np.zeros((len(idxs[r]), 128), np.uint16)
        d1 = g.dispatch(xs[r], idxs[r], ws[r], buffers=bufs, src_info=False)
        assert d1.recv_x is bufs["recv_x"] and d1.recv_scales is bufs["recv_scales"] and d1.src_info is None
        y = expert_fn(cfg, d1.recv_x, d1.recv_scales.view(np.float32).reshape(1, 1, 8), d1.masked_m)
        assert g.combine(d1, y, out=out) is out
        first = out.copy()
        d2 = g.dispatch(xs[r], idxs[r], ws[r], buffers=d1)  # d1 is done: reuse its memory
        assert d2.recv_x is bufs["recv_x"] and d2.masked_m is bufs["masked_m"]
        assert (g.combine(d2, y) == first).all()
        return True

    with epmoe.CpuWorld(2) as world:
        assert world.run(rank, cfg) == [True, True]


def test_two_live_dispatches_and_stale_handles():
    cfg = epmoe.EpConfig(max_tokens=4, hidden=128, num_experts=4, top_k=2, wire="bf16",
                         combine_mode="reduce_at_owner", timeout_ms=2000)
    xs, idxs, ws = make_inputs(cfg, [4], seed=8)
    with epmoe.CpuWorld(1) as world:
        g = world.create_group(0, cfg)
        a = g.dispatch_send(xs[0], idxs[0], ws[0])
        b = g.dispatch_send(xs[0], idxs[0], ws[0])  # two in flight (micro-batch overlap)
        with pytest.raises(epmoe.InvalidArgument, match="still in flight"):
            g.dispatch_send(xs[0], idxs[0], ws[0])
        with pytest.raises(epmoe.InvalidArgument, match="has not been received"):
            g.combine(a, np.zeros((4, 4, 128), np.uint16))
        g.dispatch_recv(a)
        g.dispatch_recv(b)
        y = np.zeros((4, 4, 128), np.uint16)
        g.combine(a, y)
        with pytest.raises(epmoe.InvalidArgument, match="already combined"):
            g.combine(a, y)
        g.combine(b, y)
        c = g.dispatch(xs[0], idxs[0], ws[0])
        g.dispatch(xs[0], idxs[0], ws[0])
        g.dispatch(xs[0], idxs[0], ws[0])
        with pytest.raises(epmoe.InvalidArgument, match="two most recent"):
            g.combine(c, y)  # stale: two newer dispatches since
        g.close()
        assert g.closed
        with pytest.raises(epmoe.InvalidArgument, match="closed"):
            g.dispatch(xs[0], idxs[0], ws[0])


# ---- errors ----------------------------------------------------------------------------------
def test_bad_topk_id_raises_the_library_message_and_the_peer_times_out():
    cfg = epmoe.EpConfig(num_ranks=2, max_tokens=4, hidden=128, num_experts=4, top_k=2, timeout_ms=300)
    xs, idxs, ws = make_inputs(cfg, [4, 4], seed=3)
    idxs[0][1, 1] = 4  # == E
    with epmoe.CpuWorld(2) as world:
        with pytest.raises(epmoe.InvalidArgument, match=r"topk_idx\[1\]\[1\] = 4 is outside \[-1, 4\)") as info:
            world.run(lambda g: g.dispatch(xs[g.rank], idxs[g.rank], ws[g.rank]), cfg)
    assert info.value.status == 1 and "epmoe_dispatch" in info.value.message


def test_single_rank_errors():
    cfg = epmoe.EpConfig(max_tokens=4, hidden=128, num_experts=4, top_k=2, timeout_ms=1000)
    xs, idxs, ws = make_inputs(cfg, [4], seed=3)
    with epmoe.CpuWorld(1) as world, world.create_group(0, cfg) as g:
        big = np.zeros((5, 128), np.uint16)
        with pytest.raises(epmoe.InvalidArgument, match="num_tokens = 5 exceeds max_tokens = 4"):
            g.dispatch(big, np.zeros((5, 2), np.int32), np.ones((5, 2), np.float32))
        with pytest.raises(epmoe.InvalidArgument, match="outside"):
            g.dispatch(xs[0], np.full((4, 2), -2, np.int32), ws[0])
        with pytest.raises(epmoe.NullPointer, match="REDUCE_AT_EXPERT needs topk_weights"):
            g.dispatch(xs[0], idxs[0])
        with pytest.raises(ValueError, match="hidden size is 128"):
            g.dispatch(np.zeros((4, 256), np.uint16), idxs[0], ws[0])
        with pytest.raises(ValueError, match=r"expected \[4, 2\]"):
            g.dispatch(xs[0], np.zeros((4, 3), np.int32), ws[0])
        with pytest.raises(TypeError, match="int32 or int64"):
            g.dispatch(xs[0], idxs[0].astype(np.int16), ws[0])
        with pytest.raises(TypeError, match="uint16 or bfloat16"):
            g.dispatch(xs[0].astype(np.float32), idxs[0], ws[0])
        with pytest.raises(epmoe.DLPackError, match="contiguous"):
            g.dispatch(np.asfortranarray(xs[0]), idxs[0], ws[0])
        d = g.dispatch(xs[0], idxs[0], ws[0])  # the group still works after refused calls
        with pytest.raises(ValueError, match="expert_out"):
            g.combine(d, np.zeros((1, 4, 128), np.uint16))
        with pytest.raises(epmoe.InvalidArgument, match="cannot mask itself out"):
            g.set_active_ranks([0])
        g.combine(d, np.zeros((4, 4, 128), np.uint16))


def test_config_errors_carry_the_library_message():
    with pytest.raises(epmoe.InvalidArgument, match="hidden = 100 must be a positive multiple of 128"):
        epmoe.layout_query(hidden=100)
    with pytest.raises(epmoe.InvalidArgument, match="num_experts = 255 must be a multiple of num_ranks = 2"):
        epmoe.layout_query(num_ranks=2, num_experts=255)
    with pytest.raises(epmoe.InvalidArgument, match="UE8M0 scales need round_scale"):
        epmoe.layout_query(scale_fmt="ue8m0_row")
    with pytest.raises(ValueError, match="wire 'fp16'"):
        epmoe.layout_query(wire="fp16")
    with pytest.raises(epmoe.InvalidArgument, match="num_ranks"):
        epmoe.CpuWorld(0)
    lay = epmoe.layout_query()  # DeepSeek-R1 EP1 defaults
    assert lay.recv_x_bytes == 256 * 128 * 7168 and lay.out_bytes == 128 * 7168 * 2


def test_transport_choice_reaches_the_library(monkeypatch):
    """config.transport is passed to the library: the all-to-all's slabs are sized differently
    from the device API's window (exact sizes: tests/test_launch.c); a name it does not know is
    refused here, a code it does not know by the library; under "auto" the environment decides."""
    monkeypatch.delenv("EPMOE_EP_TRANSPORT", raising=False)
    cfg = epmoe.EpConfig(num_ranks=2)
    auto, dev, a2a = (epmoe.layout_query(cfg, transport=t) for t in ("auto", "device", "alltoall"))
    assert auto.window_bytes == dev.window_bytes != a2a.window_bytes
    assert a2a.recv_x_bytes == dev.recv_x_bytes and a2a.msg_bytes == dev.msg_bytes
    monkeypatch.setenv("EPMOE_EP_TRANSPORT", "alltoall")
    assert epmoe.layout_query(cfg).window_bytes == a2a.window_bytes
    assert epmoe.layout_query(cfg, transport="device").window_bytes == dev.window_bytes  # explicit beats the env
    gin, emu = (epmoe.layout_query(cfg, transport=t) for t in ("gin", "gin-emulated"))
    assert gin.window_bytes == emu.window_bytes > dev.window_bytes  # the window plus its outbox
    with pytest.raises(ValueError, match="transport 'nvlink'"):
        epmoe.layout_query(cfg, transport="nvlink")
    with pytest.raises(epmoe.InvalidArgument, match="not an epmoe_transport"):
        epmoe.layout_query(cfg, transport=99)


def test_mismatched_configs_across_ranks_are_refused_on_both():
    errs = [None, None]
    with epmoe.CpuWorld(2) as world:
        def create(r):
            try:
                world.create_group(r, max_tokens=4 + 4 * r, hidden=128, num_experts=4, top_k=2,
                                   timeout_ms=2000).close()
            except epmoe.Error as e:
                errs[r] = e
        th = [threading.Thread(target=create, args=(r,)) for r in range(2)]
        [t.start() for t in th]
        [t.join() for t in th]
    assert all(isinstance(e, epmoe.InvalidArgument) for e in errs), errs


def test_a_rank_that_never_comes_gives_timeout():
    cfg = epmoe.EpConfig(num_ranks=2, max_tokens=4, hidden=128, num_experts=2, top_k=1, wire="bf16",
                         timeout_ms=200)
    xs, idxs, ws = make_inputs(cfg, [4, 4], seed=1)
    idxs[0][:] = 1  # rank 0's tokens all go to rank 1, which never dispatches

    def rank(g):
        if g.rank == 0:
            g.dispatch(xs[0], idxs[0], ws[0])
            g.combine(g.dispatch(xs[0], idxs[0], ws[0]), np.zeros((1, 8, 128), np.uint16))

    with epmoe.CpuWorld(2) as world:
        with pytest.raises(epmoe.Timeout, match="after 200 ms") as info:
            world.run(rank, cfg)
    assert isinstance(info.value, TimeoutError)


def test_python_defaults_mirror_the_header():
    header = os.path.join(os.path.dirname(__file__), "..", "..", "include", "epmoe.h")
    if not os.path.exists(header):
        pytest.skip("no include/epmoe.h next to the package")
    with open(header) as f:
        text = f.read()
    init = re.search(r"#define EPMOE_EP_CONFIG_INIT\s*\\?\s*\{([^}]*)\}", text).group(1)
    fields = [f.strip() for f in init.replace("\\", " ").split(",")]
    c = epmoe.EpConfig()._c()
    assert fields[0] == "sizeof(epmoe_ep_config)"
    values = {"EPMOE_WIRE_FP8": 1, "EPMOE_WIRE_BF16": 0, "EPMOE_SCALE_F32_ROW": 0, "EPMOE_SCALE_F32_MMAJOR": 1,
              "EPMOE_SCALE_UE8M0_ROW": 2, "EPMOE_SCALE_UE8M0_MMAJOR": 3, "EPMOE_COMBINE_REDUCE_AT_OWNER": 0,
              "EPMOE_COMBINE_REDUCE_AT_EXPERT": 1, "EPMOE_TRANSPORT_AUTO": 0}
    names = [n for n, _ in type(c)._fields_][1:]
    assert len(names) == len(fields) - 1, "the ctypes struct mirrors every field of epmoe_ep_config"
    for name, f in zip(names, fields[1:]):
        assert getattr(c, name) == (values[f] if f in values else int(f)), name


def _groups(world, cfg):
    """Every rank's group of a CpuWorld, created collectively from one thread per rank."""
    groups = [None] * cfg.num_ranks

    def make(r):
        groups[r] = world.create_group(r, cfg)

    ts = [threading.Thread(target=make, args=(r,)) for r in range(cfg.num_ranks)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return groups


@pytest.mark.parametrize("what", ["group", "layer"])
def test_close_from_another_thread_waits_for_the_call_inside(what):
    """close() on one thread while another's dispatch (or layer forward) waits in the library for a
    peer that never comes: close waits for it to time out, then frees (it had freed the memory under
    the call: a use-after-free, segfaults)."""
    import time
    from epmoe import w4a8

    cfg = epmoe.EpConfig(num_ranks=2, max_tokens=4, hidden=128, num_experts=2, top_k=1, wire="fp8",
                         combine_mode="reduce_at_owner", timeout_ms=800)
    xs, idxs, ws = make_inputs(cfg, [4, 4], seed=11)
    with epmoe.CpuWorld(2) as world:
        g0, g1 = _groups(world, cfg)
        if what == "layer":
            w13 = w4a8.repack(np.zeros((1, 256, 64), np.int8), np.full((1, 256, 1), 0.01, np.float32))
            w2 = w4a8.repack(np.zeros((1, 128, 64), np.int8), np.full((1, 128, 1), 0.01, np.float32))
            obj = g0.layer(weights=(w13, w2), intermediate=128)
            call = lambda: obj.forward(xs[0], idxs[0], ws[0])  # noqa: E731
        else:
            obj, call = g0, lambda: g0.dispatch(xs[0], idxs[0], ws[0])  # noqa: E731
        got = {}

        def run():
            try:
                call()
                got["st"] = "returned"
            except epmoe.Error as e:
                got["st"] = type(e).__name__

        t = threading.Thread(target=run)
        t.start()
        time.sleep(0.3)  # the call is inside, waiting for rank 1
        t0 = time.monotonic()
        obj.close()
        waited = time.monotonic() - t0
        t.join()
        assert got["st"] == "Timeout" and obj.closed
        assert waited > 0.2, "close returned while the call was still inside the library"
        with pytest.raises(epmoe.InvalidArgument, match="closed"):
            call()
        g0.close()  # timed out: it leaves without the collective teardown
        with pytest.raises(epmoe.Timeout):
            g1.close()  # so rank 1's teardown waits timeout_ms for it, and says so
        assert g1.closed


def test_references_name_their_bad_arguments():
    cfg = epmoe.EpConfig(num_ranks=1, max_tokens=4, hidden=128, num_experts=2, top_k=1, wire="bf16")
    xs, idxs, ws = make_inputs(cfg, [4], seed=12)
    with pytest.raises(TypeError, match="config must be an EpConfig, got NoneType"):
        epmoe.dispatch_ref(None, xs, idxs)
    with pytest.raises(TypeError, match="config must be an EpConfig"):
        epmoe.combine_ref(None, [None], idxs, ws)
    with pytest.raises(TypeError, match="xs: needs a sequence"):
        epmoe.dispatch_ref(cfg, None, idxs)
    with pytest.raises(TypeError, match="config must be an EpConfig"):
        epmoe.layer_ref(None, [None], xs, idxs, ws)
    with pytest.raises(TypeError, match="weights: needs a sequence"):
        epmoe.layer_ref(cfg, None, xs, idxs, ws)
    with pytest.raises(TypeError, match="num_ranks: expected an integer"):
        epmoe.CpuWorld(2.9)
