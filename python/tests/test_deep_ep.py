"""epmoe.deep_ep.Buffer (DeepEP's low-latency API) on the CPU world, one thread per rank: its outputs
in DeepEP's shapes and strides against the numpy model and the library's references (bytes exact,
combine bit-exact under reduce_at_owner, within the error model under reduce_at_expert), DeepEP's
own dispatch checks on recv_count, layout_range and src_info, the receive hooks, zero-copy combine,
the statistics tensor, rank masks, the memory hint against DeepEP's, and each unsupported or bad
argument raising."""
import threading

import numpy as np
import pytest

import epmoe
import models as mdl
from epmoe import deep_ep
from test_ep import check_against_model, expert_fn, make_inputs


def run_ranks(R, fn):
    """fn(world, rank) in one thread per rank of a CpuWorld(R); the per-rank results, or the first
    rank's exception."""
    res, errs = [None] * R, []
    with epmoe.CpuWorld(R) as world:
        def main(r):
            try:
                res[r] = fn(world, r)
            except BaseException as e:  # noqa: B902 - raised below
                errs.append((r, e))
        ts = [threading.Thread(target=main, args=(r,), daemon=True) for r in range(R)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        assert not any(t.is_alive() for t in ts), "a rank hangs"
    if errs:
        raise sorted(errs, key=lambda e: e[0])[0][1]
    return res


def cfg_of(R, N, H, E, k, fp8, *, ue8m0=False, mode="reduce_at_owner"):
    """The EpConfig a Buffer makes for these calls (for the model and the references)."""
    return epmoe.EpConfig(num_ranks=R, max_tokens=N, hidden=H, num_experts=E, top_k=k, wire="fp8" if fp8 else "bf16",
                          scale_fmt="ue8m0_mmajor" if ue8m0 else "f32_mmajor", round_scale=ue8m0, combine_mode=mode)


def deepep_checks(cfg, got, rows):
    """DeepEP's test_low_latency dispatch checks, on one rank's outputs in DeepEP's form."""
    N, R = cfg.max_tokens, cfg.num_ranks
    count, lr, tok = got["count"], got["layout_range"], got["handle_src_info"]
    assert lr.dtype == np.int64 and lr.shape == (cfg.local_experts, R)
    assert (count == (lr & 0xFFFFFFFF).sum(1)).all()
    assert tok.shape == (cfg.local_experts, R * N) and tok.dtype == np.int32
    for le in range(cfg.local_experts):
        assert count[le] == len(rows[le])
        for r in range(R):  # rows [begin, begin + count) of expert le came from rank r: its tokens' indices
            b, c = int(lr[le, r] >> 32), int(lr[le, r] & 0xFFFFFFFF)
            assert tok[le, b:b + c].tolist() == [t for s, t in rows[le] if s == r]


def dispatch_combine(world, r, xs, idxs, ws, *, N, E, fp8, ue8m0=False, hook=False, zero_copy=False, mode=None,
                     rounds=2):
    """One rank: `rounds` dispatch + fake-expert + combine calls through a Buffer."""
    kw = {} if mode is None else {"combine_mode": mode}
    with deep_ep.Buffer(world=world, rank=r, low_latency_mode=True, **kw) as buf:
        L = E // world.num_ranks
        stats = np.zeros(L, np.int32)
        seen = []
        for _ in range(rounds):
            extra = {"topk_weights": ws[r]} if mode == "reduce_at_expert" else {}
            recv, count, handle, event, hk = buf.low_latency_dispatch(
                xs[r], idxs[r].astype(np.int64), N, E, cumulative_local_expert_recv_stats=stats, use_fp8=fp8,
                round_scale=ue8m0, use_ue8m0=ue8m0, return_recv_hook=hook, **extra)
            assert (hk is not None) == hook
            if hook:
                hk()
            event.current_stream_wait()
            x, scales = recv if fp8 else (recv, None)
            M, H = world.num_ranks * N, xs[r].shape[1]
            assert x.shape == (L, M, H) and x.dtype == (np.uint8 if fp8 else np.uint16)
            if fp8:  # DeepEP's M-major strides: (M * G, 1, M) words
                G = H // 128 if not ue8m0 else H // 512
                assert scales.shape == (L, M, G) and scales.dtype == (np.int32 if ue8m0 else np.float32)
                assert scales.strides == (M * G * 4, 4, M * 4)
            src, n, e = handle[0], handle[2], handle[4]
            assert len(handle) == 5 and (n, handle[3], e) == (N, H, E) and src is handle.src_info
            assert handle[2:] == (N, H, E) and handle[-1] == E
            cfg = buf._group(N, H, E, idxs[r].shape[1], fp8, ue8m0, ue8m0).config
            ours = None if scales is None else scales.swapaxes(1, 2)  # back to epmoe's [G, M] slabs
            y = expert_fn(cfg, x, ours, count)
            if zero_copy:  # two buffers, taken in turn by the dispatches (DeepEP's double buffering)
                zc = buf.get_next_low_latency_combine_buffer(handle)
                assert zc.shape == (L, M, H) and zc is buf.get_next_low_latency_combine_buffer(handle)
                assert all(zc is not z for z in seen)
                seen.append(zc)
                zc[...] = y
            out = np.full((len(idxs[r]), H), 0xFFFF, np.uint16)  # poisoned: every element is written
            got, event, hk = buf.low_latency_combine(np.zeros_like(y) if zero_copy else y, idxs[r], ws[r], handle,
                                                     zero_copy=zero_copy, return_recv_hook=hook, out=out)
            assert got is out and (hk is not None) == hook
            if hook:
                hk()
        return dict(recv_x=x, recv_scales=ours, masked_m=count.copy(), src_info=handle.dispatch.src_info, expert_out=y,
                    out=out.copy(), count=count.copy(), stats=stats, layout_range=handle.layout_range,
                    handle_src_info=src.copy())


@pytest.mark.parametrize("R", [1, 2, 3])
@pytest.mark.parametrize("fp8", [True, False])
@pytest.mark.parametrize("hook", [False, True])
def test_matches_the_model_in_deepeps_layouts(R, fp8, hook):
    N, H, E, k = 6, 256, 4 * R, 3
    cfg = cfg_of(R, N, H, E, k, fp8)
    Ts = [N, 0, 4][:R] if R > 1 else [N]  # T = N, a rank with no tokens, an ordinary one
    xs, idxs, ws = make_inputs(cfg, Ts, seed=100 + R * 4 + 2 * fp8 + hook, dup=R == 2)
    res = run_ranks(R, lambda w, r: dispatch_combine(w, r, xs, idxs, ws, N=N, E=E, fp8=fp8, hook=hook))
    check_against_model(cfg, xs, idxs, ws, res)
    rows = mdl.ep_routing(cfg, idxs)
    for r in range(R):
        deepep_checks(cfg, res[r], rows[r])
        assert (res[r]["stats"] == 2 * res[r]["count"]).all()  # two dispatches counted
    if fp8:  # scale (t, g) of expert le at [le, t, g], as DeepEP hands it out
        for d in range(R):
            for le in range(cfg.local_experts):
                want = rows[d][le]
                if want:
                    s = mdl.group_cast(np.stack([xs[src][t] for src, t in want]))[1]
                    view = res[d]["recv_scales"].swapaxes(1, 2)
                    assert (view[le, :len(want)] == s).all()


def test_ue8m0_words_and_zero_copy_combine():
    R, N, H, E, k = 2, 5, 1024, 4, 2
    cfg = cfg_of(R, N, H, E, k, True, ue8m0=True)
    xs, idxs, ws = make_inputs(cfg, [5, 3], seed=7)
    res = run_ranks(R, lambda w, r: dispatch_combine(w, r, xs, idxs, ws, N=N, E=E, fp8=True, ue8m0=True,
                                                     zero_copy=True))
    check_against_model(cfg, xs, idxs, ws, res)
    rows = mdl.ep_routing(cfg, idxs)
    for d in range(R):
        for le in range(cfg.local_experts):
            want = rows[d][le]
            if not want:
                continue
            s = mdl.group_cast(np.stack([xs[src][t] for src, t in want]), True)[1]
            words = res[d]["recv_scales"].swapaxes(1, 2)[le, :len(want)].astype(np.int64)  # [m, H/512]
            exps = np.stack([(words >> (8 * b)) & 0xFF for b in range(4)], -1).reshape(len(want), -1)
            assert (exps == mdl.ue8m0(s)).all()  # byte b of word p: group 4p + b


def test_reduce_at_expert_takes_the_weights_at_dispatch():
    R, N, H, E, k = 2, 6, 256, 6, 3
    cfg = cfg_of(R, N, H, E, k, True, mode="reduce_at_expert")
    xs, idxs, ws = make_inputs(cfg, [6, 5], seed=11)
    res = run_ranks(R, lambda w, r: dispatch_combine(w, r, xs, idxs, ws, N=N, E=E, fp8=True, mode="reduce_at_expert"))
    check_against_model(cfg, xs, idxs, ws, res)

    def wrong(world, r):
        with deep_ep.Buffer(world=world, rank=r, low_latency_mode=True, combine_mode="reduce_at_expert") as buf:
            with pytest.raises(ValueError, match="takes topk_weights here"):
                buf.low_latency_dispatch(xs[r], idxs[r], N, E)
            recv, count, h, _, _ = buf.low_latency_dispatch(xs[r], idxs[r], N, E, topk_weights=ws[r])
            y = np.zeros((E // R, R * N, H), np.uint16)
            with pytest.raises(ValueError, match="same topk_weights"):
                buf.low_latency_combine(y, idxs[r], ws[r].copy(), h)
            buf.low_latency_combine(y, idxs[r], ws[r], h)  # the ranks' calls stay paired
    run_ranks(R, wrong)


def test_masked_rank_and_the_mask_queries():
    R, N, H, E, k = 3, 5, 128, 6, 3
    cfg = cfg_of(R, N, H, E, k, False)
    xs, idxs, ws = make_inputs(cfg, [5, 4, 5], seed=13)
    active = [1, 1, 0]

    def rank(world, r):
        with deep_ep.Buffer(world=world, rank=r, low_latency_mode=True, timeout_ms=5000) as buf:
            buf.low_latency_dispatch(xs[r], idxs[r], N, E, use_fp8=False)  # all three make the group
            st = np.zeros(R, np.int32)
            buf.low_latency_query_mask_buffer(st)
            assert st.tolist() == [0, 0, 0]
            with pytest.raises(ValueError, match=r"mask_status is \(2,\), expected \(3,\)"):
                buf.low_latency_query_mask_buffer(np.zeros(R - 1, np.int32))
            if not active[r]:
                return None  # it "fails": the others mask it out
            buf.low_latency_update_mask_buffer(2, True)
            buf.low_latency_query_mask_buffer(st)
            assert st.tolist() == [0, 0, 1]
            recv, count, h, _, _ = buf.low_latency_dispatch(xs[r], idxs[r], N, E, use_fp8=False)
            y = expert_fn(cfg, recv, None, count)
            out = buf.low_latency_combine(y, idxs[r], ws[r], h)[0]
            with pytest.raises(epmoe.Unsupported, match="cannot rejoin"):
                buf.low_latency_clean_mask_buffer()
            buf.low_latency_query_mask_buffer(st)
            assert st.tolist() == [0, 0, 1]  # unchanged by the refused update
            return dict(recv_x=recv, recv_scales=None, masked_m=count, src_info=h.dispatch.src_info, expert_out=y,
                        out=out)

    res = run_ranks(R, rank)
    check_against_model(cfg, xs, idxs, ws, res, active)


def test_memory_hint_is_far_below_deepeps():
    """The issue's target: less buffer memory than DeepEP for the same configuration. DeepEP's LL
    buffer (shared/reference/deepep.md 1.5): 2 send + 2 receive regions and the signals."""
    N, H, E = 128, 7168, 256
    disp_msg, comb_slot = 16 + max(2 * H, H + H // 128 * 4), H // 128 * 4 + 2 * H
    send, recv = max(N * disp_msg, E * N * comb_slot), max(E * N * disp_msg, E * N * comb_slot)
    deepep = 2 * send + 2 * recv + 2 * ((E * 4 + 127) // 128 * 128)
    assert deepep == 1908410368  # the reference's number for E = 256, N = 128, H = 7168
    for R in (2, 8):
        ours = deep_ep.Buffer.get_low_latency_rdma_size_hint(N, H, R, E)
        owner_bf16 = epmoe.layout_query(num_ranks=R, max_tokens=N, hidden=H, num_experts=E, top_k=8, wire="bf16",
                                        combine_mode="reduce_at_owner").library_bytes  # a default Buffer's largest
        assert ours == owner_bf16 and 0 < ours < deepep / 20, (R, ours)
    cfg = cfg_of(2, 4, 128, 4, 2, True)  # and it is what a Buffer holds: one group of each wire, reduce at owner
    xs, idxs, _ = make_inputs(cfg, [4, 3], seed=31)

    def rank(world, r):
        with deep_ep.Buffer(world=world, rank=r, low_latency_mode=True) as buf:
            held = []
            for fp8 in (True, False):
                buf.low_latency_dispatch(xs[r], idxs[r].astype(np.int64), 4, 4, use_fp8=fp8)
                held.append(buf.library_bytes)
            hint = deep_ep.Buffer.get_low_latency_rdma_size_hint(4, 128, 2, 4, top_k=2)
            return held[0], held[1] - held[0], hint
    for fp8_bytes, bf16_bytes, hint in run_ranks(2, rank):
        assert hint == max(fp8_bytes, bf16_bytes) == bf16_bytes, (fp8_bytes, bf16_bytes, hint)


def test_unsupported_and_bad_arguments_raise():
    with pytest.raises(epmoe.Unsupported, match="low-latency mode"):
        deep_ep.Buffer(world=None, rank=0)
    with pytest.raises(epmoe.Unsupported, match="enable_shrink"):
        deep_ep.Buffer(low_latency_mode=True, enable_shrink=True)
    with pytest.raises(ValueError, match="combine_mode"):
        deep_ep.Buffer(world=epmoe.CpuWorld(1), rank=0, low_latency_mode=True, combine_mode="sideways")
    N, H, E = 4, 128, 2
    cfg = cfg_of(1, N, H, E, 2, True)
    xs, idxs, ws = make_inputs(cfg, [4], seed=3)

    def rank(world, r):
        with pytest.raises(ValueError, match="rank must be"):
            deep_ep.Buffer(world=world, rank=5, low_latency_mode=True)
        other = deep_ep.Buffer(world=world, rank=r, low_latency_mode=True)
        with deep_ep.Buffer(world=world, rank=r, low_latency_mode=True) as buf:
            x, i = xs[r], idxs[r]
            with pytest.raises(epmoe.Unsupported, match="dispatch_wait_recv_cost_stats"):
                buf.low_latency_dispatch(x, i, N, E, dispatch_wait_recv_cost_stats=np.zeros(1, np.int64))
            with pytest.raises(ValueError, match="exclude each other"):
                buf.low_latency_dispatch(x, i, N, E, async_finish=True, return_recv_hook=True)
            with pytest.raises(ValueError, match="use_ue8m0 needs round_scale"):
                buf.low_latency_dispatch(x, i, N, E, use_ue8m0=True)
            with pytest.raises(epmoe.InvalidArgument):  # T > N: the library's check
                buf.low_latency_dispatch(np.zeros((N + 1, H), np.uint16), np.zeros((N + 1, 2), np.int64), N, E)
            recv, count, h, ev, hook = buf.low_latency_dispatch(x, i, N, E, async_finish=True)
            with ev:  # DeepEP's EventOverlap is also a context manager
                pass
            y = np.zeros((E, N, H), np.uint16)
            with pytest.raises(epmoe.Unsupported, match="LogFMT"):
                buf.low_latency_combine(y, i, ws[r], h, use_logfmt=True)
            with pytest.raises(epmoe.Unsupported, match="combine_wait_recv_cost_stats"):
                buf.low_latency_combine(y, i, ws[r], h, combine_wait_recv_cost_stats=np.zeros(1, np.int64))
            with pytest.raises(epmoe.InvalidArgument, match="not one of this Buffer"):
                other.low_latency_combine(y, i, ws[r], h)
            with pytest.raises(ValueError, match="topk_idx is"):
                buf.low_latency_combine(y, i[:2], ws[r], h)
            with pytest.raises(epmoe.InvalidArgument, match="get_next_low_latency_combine_buffer"):
                buf.low_latency_combine(y, i, ws[r], h, zero_copy=True)
            out, _, _ = buf.low_latency_combine(y, i, ws[r], h)
            assert (out == 0).all()  # zero expert outputs sum to zeros
            buf.clean_low_latency_buffer(N, H, E)
        other.destroy()
        with pytest.raises(epmoe.InvalidArgument, match="closed|destroyed"):
            buf.low_latency_dispatch(x, i, N, E)
    run_ranks(1, rank)


def test_arguments_in_deepeps_positions():
    """DeepEP 2.x's legacy Buffer (shared/reference/deepep.md 1.1): (group, num_nvl_bytes,
    num_rdma_bytes, low_latency_mode, num_qps_per_rank, allow_nvlink_for_low_latency_mode, allow_mnnvl,
    explicitly_destroy, enable_shrink, comm); V1's use_fabric by keyword."""
    with pytest.raises(epmoe.Unsupported, match="enable_shrink"):  # the 9th positional argument
        deep_ep.Buffer(None, 0, 0, True, 24, True, False, False, True)
    with pytest.raises(epmoe.Unsupported, match="use_fabric"):
        deep_ep.Buffer(world=None, low_latency_mode=True, use_fabric=True)
    with pytest.raises(TypeError):  # no 11th positional
        deep_ep.Buffer(None, 0, 0, True, 24, True, False, False, False, None, True)

    def rank(world, r):
        with deep_ep.Buffer(None, 0, 1 << 20, True, 4, True, False, True, world=world, rank=r) as buf:
            return buf.explicitly_destroy, buf.low_latency_mode, buf.num_rdma_bytes, buf.group
    assert run_ranks(1, rank) == [(True, True, 1 << 20, None)]


def test_the_names_engines_read_while_choosing_a_mode():
    """SGLang imports `Buffer, Config` (an ImportError there reads as "DeepEP is not installed"), sizes
    its buffers with Buffer.get_dispatch_config / get_combine_config and Config's hints, and reads
    Buffer.num_sms; others call set_num_sms at import and wait on events. Normal mode raises
    epmoe.Unsupported, never AttributeError."""
    from epmoe.deep_ep import Buffer, Config, EventHandle, EventOverlap  # noqa: F401 - the imports are the test
    assert Buffer.is_sm90_compiled() is epmoe.cuda_available()
    before = Buffer.num_sms
    try:
        Buffer.set_num_sms(24)
        assert Buffer.num_sms == 24
        with pytest.raises(ValueError, match="even"):
            Buffer.set_num_sms(23)
        for cfg in (Buffer.get_dispatch_config(8), Buffer.get_combine_config(8)):
            assert isinstance(cfg, Config) and cfg.num_sms == 24
            assert cfg.get_nvl_buffer_size_hint(7168 * 2, 8) == 0 and cfg.get_rdma_buffer_size_hint(7168 * 2, 8) == 0
    finally:
        Buffer.set_num_sms(before)
    try:  # DeepEP's topk_idx dtype; torch is not needed for the rest
        import torch
        assert deep_ep.topk_idx_t is torch.int64
    except ImportError:  # then the name is absent, not an error
        assert not hasattr(deep_ep, "topk_idx_t")
    with pytest.raises(AttributeError):
        deep_ep.no_such_name  # noqa: B018

    seen = []
    ev = EventOverlap(EventHandle(), extra_tensors=(np.zeros(1),))
    ev.register_hook_after_wait(lambda: seen.append(1))
    with ev(release_handle=True) as same:  # DeepEP's form: the event is let go when the block ends
        assert same is ev and ev.event is not None and seen == []
    assert seen == [1] and ev.event is None
    ev.current_stream_wait()
    assert seen == [1]  # a hook runs once
    with ev:
        pass
    ev.current_stream_wait(release_handle=True)
    with Buffer.capture() as cap:
        assert isinstance(cap, EventOverlap)

    N, H, E, k = 4, 128, 2, 2
    xs, idxs, _ = make_inputs(cfg_of(1, N, H, E, k, True), [N], seed=7)

    def rank(world, r):
        with Buffer(world=world, rank=r, low_latency_mode=True) as buf:
            for name in ("get_dispatch_layout", "dispatch", "combine", "internode_dispatch", "internode_combine"):
                with pytest.raises(epmoe.Unsupported, match="normal"):
                    getattr(buf, name)(xs[r], idxs[r])
            with pytest.raises(epmoe.Unsupported, match="get_local_buffer_tensor"):
                buf.get_local_buffer_tensor(np.uint8)
            _, _, h, _, hook = buf.low_latency_dispatch(xs[r], idxs[r], N, E, return_recv_hook=True)
            with pytest.raises(epmoe.InvalidArgument, match="receive hook first"):
                h.src_info  # noqa: B018
            hook()
            m = h.dispatch.masked_m
            for le in range(E):  # the token's index on its source rank, as DeepEP's
                assert (h[0][le, :m[le]] == h.dispatch.src_info[le, :m[le]] % N).all()
                assert (h[0][le, :m[le]] < N).all()
            return True
    assert run_ranks(1, rank) == [True]


def test_install_as_deep_ep():
    """`import deep_ep` and find_spec("deep_ep") (vLLM's check) find this module after install()."""
    import importlib
    import importlib.util
    import sys
    saved = sys.modules.pop("deep_ep", None)
    try:
        assert deep_ep.install() is deep_ep
        assert deep_ep.install() is deep_ep  # twice is fine
        import deep_ep as d  # noqa: F401 - what engines write
        assert d is deep_ep and importlib.util.find_spec("deep_ep") is not None
        assert importlib.import_module("deep_ep").Buffer is deep_ep.Buffer
        sys.modules["deep_ep"] = object()  # a real DeepEP already loaded: refused
        with pytest.raises(epmoe.InvalidArgument, match="already imported"):
            deep_ep.install()
    finally:
        sys.modules.pop("deep_ep", None)
        if saved is not None:
            sys.modules["deep_ep"] = saved


def test_bad_dispatch_arguments_raise_before_any_group_is_made():
    """Making an EP group is collective: a call whose arguments are wrong (shapes read off them would
    make a group for a configuration nobody asked for) or whose statistics tensor is not DeepEP's
    int32 [L] must raise first. Then the right call works, on the one group it needs."""
    N, H, E, k = 4, 128, 2, 2
    cfg = cfg_of(1, N, H, E, k, True)
    xs, idxs, _ = make_inputs(cfg, [4], seed=17)
    x, i = xs[0], idxs[0].astype(np.int64)

    def rank(world, r):
        with deep_ep.Buffer(world=world, rank=r, low_latency_mode=True) as buf:
            frozen = np.zeros(E, np.int32)
            frozen.flags.writeable = False
            bad = [(TypeError, r"x: dtype int64 is not accepted", dict(x=x.tolist())),
                   (TypeError, r"x: dtype float32", dict(x=x.astype(np.float32))),
                   (ValueError, r"x: expected 2 dimensions", dict(x=x[0])),
                   (ValueError, r"topk_idx: expected 2 dimensions", dict(topk_idx=i[:, 0].copy())),
                   (TypeError, r"topk_idx: dtype float32", dict(topk_idx=i.astype(np.float32))),
                   (ValueError, r"topk_idx is \(3, 2\), x has 4 tokens", dict(topk_idx=i[:3])),
                   (TypeError, r"num_max_dispatch_tokens_per_rank: expected an integer", dict(N=4.7)),
                   (ValueError, r"num_max_dispatch_tokens_per_rank = 4294967300 is outside", dict(N=2 ** 32 + 4)),
                   (epmoe.InvalidArgument, r"x has 4 tokens, more than num_max_dispatch_tokens_per_rank = 3",
                    dict(N=3)),
                   (epmoe.InvalidArgument, r"num_experts = 0 must be a positive multiple", dict(E=0)),
                   (TypeError, r"cumulative_local_expert_recv_stats: dtype float64",
                    dict(stats=np.zeros(E))),
                   (ValueError, r"cumulative_local_expert_recv_stats: expected shape \(2,\), got \(3,\)",
                    dict(stats=np.zeros(3, np.int32))),
                   (ValueError, r"cumulative_local_expert_recv_stats: expected shape \(2,\), got \(1, 2\)",
                    dict(stats=np.zeros((1, 2), np.int32))),
                   (epmoe.DLPackError, r"cumulative_local_expert_recv_stats: the tensor is read-only",
                    dict(stats=frozen))]
            for exc, msg, kw in bad:
                a = dict(x=x, topk_idx=i, N=N, E=E, stats=None)
                a.update(kw)
                with pytest.raises(exc, match=msg):
                    buf.low_latency_dispatch(a["x"], a["topk_idx"], a["N"], a["E"],
                                             cumulative_local_expert_recv_stats=a["stats"])
                assert buf._groups == {} and buf.library_bytes == 0, (msg, list(buf._groups))
            stats = np.zeros(E, np.int32)
            for _ in range(2):
                _, count, h, _, _ = buf.low_latency_dispatch(x, i, N, E, cumulative_local_expert_recv_stats=stats)
                y = np.zeros((E, N, H), np.uint16)
                with pytest.raises(ValueError, match=r"topk_idx is \(4,\)"):  # a list's shape, not AttributeError
                    buf.low_latency_combine(y, i[:, 0].tolist(), np.ones((4, k), np.float32), h)
                buf.low_latency_combine(y, i, np.ones((4, k), np.float32), h)
            assert len(buf._groups) == 1 and (stats == 2 * count).all() and count.sum() > 0
    run_ranks(1, rank)


def test_both_wires_on_one_cpu_world():
    """A Buffer makes a group per configuration, and on the CPU backend each is a group of the same
    world (creation collective, in the same order on every rank): FP8 then BF16 then FP8 again, each
    against the model."""
    R, N, H, E, k = 2, 4, 128, 4, 2
    cfgs = {fp8: cfg_of(R, N, H, E, k, fp8) for fp8 in (True, False)}
    xs, idxs, ws = make_inputs(cfgs[True], [4, 3], seed=23)

    def rank(world, r):
        outs = []
        with deep_ep.Buffer(world=world, rank=r, low_latency_mode=True) as buf:
            for fp8 in (True, False, True):
                recv, count, h, _, _ = buf.low_latency_dispatch(xs[r], idxs[r].astype(np.int64), N, E, use_fp8=fp8)
                x, s = recv if fp8 else (recv, None)
                cfg = buf._group(N, H, E, k, fp8, False, False).config
                y = expert_fn(cfg, x, None if s is None else s.swapaxes(1, 2), count)
                out, _, _ = buf.low_latency_combine(y, idxs[r], ws[r], h)
                outs.append(dict(recv_x=x, recv_scales=None if s is None else s.swapaxes(1, 2), masked_m=count.copy(),
                                 src_info=h.dispatch.src_info, expert_out=y,
                                 out=out.copy()))
            assert len(buf._groups) == 2
        return outs
    res = run_ranks(R, rank)
    for i, fp8 in enumerate((True, False, True)):
        check_against_model(cfgs[fp8], xs, idxs, ws, [res[r][i] for r in range(R)])
