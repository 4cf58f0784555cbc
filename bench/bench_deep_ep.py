"""epmoe.deep_ep.Buffer's cost over the C entry points (run with torchrun, one process per GPU):
    python3 -m torch.distributed.run --standalone --nproc_per_node=1 bench/bench_deep_ep.py
DeepSeek-R1 decode (128 tokens a rank, H 7168, 256 experts, top-8, FP8 dispatch, BF16 combine) through
the DeepEP-style calls (reduce at owner as DeepEP; then reduce at expert, weights at dispatch) and through
EpGroup directly (the ctypes layer under them, reduce at owner; then the same with every tensor through
DLPack's exchange, the shortcuts for torch CUDA tensors turned off; then the two C entry points alone on
prepared arguments, the floor under the Python), each:
- host: Python time per dispatch + combine pair, the GPU kept busy behind a sleep kernel (median of 200);
- GPU: CUDA events around the pair with its launches queued behind a 1 ms sleep (median of 200);
- graph: the pair captured once in a CUDA graph and replayed (median of 200 replays, events around each).
The slower rank's medians are printed, one line each. EPMOE_BENCH_PROFILE=n also prints rank 0's
cProfile of n EpGroup pairs (the functions with the most time of their own, then by cumulative time):
where the host time goes."""
import contextlib
import cProfile
import ctypes
import os
import pstats
import statistics
import time

import torch
import torch.distributed as dist

import epmoe
from epmoe import deep_ep

N, H, E, K, ITERS, WARM = 128, 7168, 256, 8, 200, 30


def median_of(xs):
    t = torch.tensor([statistics.median(xs)], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def measure(step):
    """(host us, GPU us, graph us) of step(), a dispatch + combine pair."""
    for _ in range(WARM):
        step()
    torch.cuda.synchronize()
    host, gpu = [], []
    for _ in range(ITERS):
        dist.barrier()
        torch.cuda._sleep(2000000)  # ~1 ms at H200 clocks: the launches queue behind it
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        a.record()
        step()
        b.record()
        host.append((time.perf_counter() - t0) * 1e6)
        b.synchronize()
        gpu.append(a.elapsed_time(b) * 1e3)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    for _ in range(WARM):
        g.replay()
    torch.cuda.synchronize()
    rep = []
    for _ in range(ITERS):
        dist.barrier()
        torch.cuda._sleep(2000000)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        rep.append(a.elapsed_time(b) * 1e3)
    return median_of(host), median_of(gpu), median_of(rep)


@contextlib.contextmanager
def exchange_only(on):
    """Turn off the shortcuts that describe torch CUDA tensors without DLPack's exchange (inputs on
    torch's current stream, new outputs), for their cost side by side in one process."""
    view, cur = epmoe.dlpack._torch_cuda_view, epmoe._util.current_raw_stream
    if on:
        epmoe.dlpack._torch_cuda_view = lambda obj, stream: None
        epmoe._util.current_raw_stream = lambda torch, device: -1  # never the call's stream
    try:
        yield
    finally:
        epmoe.dlpack._torch_cuda_view, epmoe._util.current_raw_stream = view, cur


def main():
    dist.init_process_group("nccl")
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(dev)
    R, me = dist.get_world_size(), dist.get_rank()
    gen = torch.Generator(device=dev).manual_seed(me)
    x = torch.randn(N, H, device=dev, generator=gen).bfloat16()
    idx = torch.rand(N, E, device=dev, generator=gen).topk(K, dim=1).indices  # k distinct experts, int64
    w = torch.rand(N, K, device=dev, generator=gen)
    y = torch.randn(E // R, R * N, H, device=dev, generator=gen).bfloat16()  # the experts' outputs

    buf = deep_ep.Buffer(dist.group.WORLD, 0, deep_ep.Buffer.get_low_latency_rdma_size_hint(N, H, R, E),
                         low_latency_mode=True, num_qps_per_rank=E // R)

    def compat():
        _, _, h, _, _ = buf.low_latency_dispatch(x, idx, N, E, use_fp8=True)
        buf.low_latency_combine(y, idx, w, h)

    buf_x = deep_ep.Buffer(dist.group.WORLD, low_latency_mode=True, combine_mode="reduce_at_expert")

    def compat_x():  # epmoe's faster combine: weights at dispatch, each expert rank sums first
        _, _, h, _, _ = buf_x.low_latency_dispatch(x, idx, N, E, use_fp8=True, topk_weights=w)
        buf_x.low_latency_combine(y, idx, w, h)

    rows = [("deep_ep.Buffer", compat), ("  at expert", compat_x)]
    cfg = epmoe.EpConfig(max_tokens=N, hidden=H, num_experts=E, top_k=K, combine_mode="reduce_at_owner")
    g = epmoe.nccl.create_group(cfg)

    def direct():
        d = g.dispatch(x, idx)
        g.combine(d, y, w)

    n_prof = int(os.environ.get("EPMOE_BENCH_PROFILE", "0"))
    if n_prof and me == 0:
        for _ in range(WARM):
            direct()
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(n_prof):
            direct()
        prof.disable()
        torch.cuda.synchronize()
        st = pstats.Stats(prof)
        st.sort_stats("tottime").print_stats(30)
        st.sort_stats("cumulative").print_stats(25)
    rows.append(("EpGroup", direct))
    rows.append(("  via DLPack", direct))  # the same, every tensor through DLPack's exchange (no shortcut)
    # the C entry points alone through ctypes, on one dispatch's prepared arguments and buffers: the
    # floor of the host time, what the library's own host code and its launches take
    d0 = g.dispatch(x, idx)
    g.combine(d0, y, w)
    ca, h, s0 = d0._combine[0], ctypes.c_uint32(0), torch.cuda.current_stream().cuda_stream

    def c_only():
        epmoe.check(epmoe.lib.epmoe_dispatch(g._ep, ctypes.byref(d0._args), epmoe.ep.PHASE_BOTH, ctypes.byref(h), s0))
        epmoe.check(epmoe.lib.epmoe_combine(g._ep, h.value, ctypes.byref(ca), epmoe.ep.PHASE_BOTH, s0))

    rows.append(("  C calls only", c_only))
    for name, step in rows:
        with exchange_only(name == "  via DLPack"):
            host, gpu, graph = measure(step)
        if me == 0:
            print(f"bench_deep_ep R={R} {name:15s} dispatch+combine: host {host:7.1f} us | GPU {gpu:6.1f} us | "
                  f"graph {graph:6.1f} us", flush=True)
    g.close()
    buf_x.destroy()
    buf.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
