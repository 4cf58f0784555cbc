"""One rank of the NCCL EP check (run by test_torch.py through torchrun, one process per GPU):
epmoe.nccl.create_group on the torch.distributed world, then dispatch + combine with torch tensors
on the GPU, checked against the numpy model over the global routing table — every rank makes
every rank's inputs from the same seed, so each can compute the whole reference alone."""
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

import epmoe
import models as mdl


def inputs(cfg, Ts, seed):
    rng = np.random.default_rng(seed)
    xs, idxs, ws = [], [], []
    for T in Ts:
        x = (rng.standard_normal((T, cfg.hidden)) * np.exp(rng.standard_normal((T, 1)))).astype(np.float32)
        xs.append(mdl.bf16_bits(x))
        idx = rng.integers(0, cfg.num_experts, size=(T, cfg.top_k))
        idx[rng.random(idx.shape) < 0.2] = -1
        idxs.append(idx.astype(np.int32))
        ws.append((0.25 + rng.random((T, cfg.top_k))).astype(np.float32))
    return xs, idxs, ws


def model_expert_out(cfg, rows, xs, d):
    """What rank d's fake experts output, from the model's received rows: y = v * (1 + le % 3)."""
    L, M, H = cfg.local_experts, cfg.rows, cfg.hidden
    y = np.zeros((L, M, H), np.uint16)
    for le in range(L):
        if not rows[d][le]:
            continue
        x = np.stack([xs[s][t] for s, t in rows[d][le]])
        if cfg.fp8:
            q, sc = mdl.group_cast(x, cfg.round_scale)
            v = mdl.fp8_value(q) * np.repeat(sc, 128, axis=1)
        else:
            v = mdl.bf16_value(x)
        y[le, : len(v)] = mdl.bf16_bits(v * (1 + le % 3))
    return y


def check(g, cfg, seed, dev, split=False):
    R, me = cfg.num_ranks, g.rank
    Ts = [cfg.max_tokens if r % 2 == 0 else cfg.max_tokens // 2 for r in range(R)]
    xs, idxs, ws = inputs(cfg, Ts, seed)
    rows = mdl.ep_routing(cfg, idxs)
    x = torch.from_numpy(xs[me]).view(torch.bfloat16).to(dev)
    idx, w = torch.from_numpy(idxs[me]).to(dev), torch.from_numpy(ws[me]).to(dev)
    if split:  # the halves, each on torch's current stream (the receive halves take no tensors)
        d = g.dispatch_recv(g.dispatch_send(x, idx, w))
    else:
        d = g.dispatch(x, idx, w)
    assert isinstance(d.recv_x, torch.Tensor) and d.recv_x.device == dev
    torch.cuda.synchronize()
    masked = d.masked_m.cpu().numpy()
    assert masked.tolist() == [len(rows[me][le]) for le in range(cfg.local_experts)], masked
    recv = d.recv_x.view(torch.uint8 if cfg.fp8 else torch.int16).cpu().numpy()
    src = d.src_info.cpu().numpy()
    for le, want in enumerate(rows[me]):
        m = len(want)
        assert src[le, :m].tolist() == [s * cfg.max_tokens + t for s, t in want]
        if m:
            xr = np.stack([xs[s][t] for s, t in want])
            exp = mdl.group_cast(xr, cfg.round_scale)[0] if cfg.fp8 else xr.view(np.int16)
            assert (recv[le, :m] == exp).all(), f"rows of local expert {le}"
    eos = [model_expert_out(cfg, rows, xs, r) for r in range(R)]
    y = torch.from_numpy(eos[me].view(np.int16)).view(torch.bfloat16).to(dev)
    if split:
        g.combine_send(d, y)
        out = g.combine_recv(d)
    else:
        out = g.combine(d, y)
    torch.cuda.synchronize()
    want = mdl.combine_owner(cfg, rows, idxs, ws, eos)[me]
    got = out.view(torch.int16).cpu().numpy().view(np.uint16)
    assert (got == want).all(), f"combine: {np.count_nonzero(got != want)} of {got.size} differ"


def run_job(name, body):
    """One torchrun process: the NCCL process group on this rank's GPU, body(dev) (it may return
    words for the last line), a barrier, and the line test_torch.py counts."""
    dist.init_process_group("nccl")
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(dev)
    extra = body(dev) or ""
    dist.barrier()
    print(f"{name}: ok (rank {dist.get_rank()} of {dist.get_world_size()}{extra})", flush=True)
    dist.destroy_process_group()


def job(dev):
    R = dist.get_world_size()
    for i, wire in enumerate(("bf16", "fp8")):
        cfg = epmoe.EpConfig(num_ranks=R, max_tokens=16, hidden=512, num_experts=4 * R, top_k=3, wire=wire,
                             scale_fmt="f32_mmajor", combine_mode="reduce_at_owner", timeout_ms=20000)
        g = epmoe.nccl.create_group(cfg)
        assert g.backend == "nccl_lsa" and g.rank == dist.get_rank(), g
        for rnd in range(3):  # several rounds: call numbers and window parities advance
            check(g, g.config, seed=100 * i + rnd, dev=dev)
        side = torch.cuda.Stream(dev)
        with torch.cuda.stream(side):  # split halves on a stream of the caller's
            check(g, g.config, seed=100 * i + 50, dev=dev, split=True)
        g.close()
    return f", nccl {epmoe.nccl.nccl_version()}"


if __name__ == "__main__":
    sys.exit(run_job("nccl_ep_job", job))
