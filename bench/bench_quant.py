"""Benchmark of the quantization kernels on the GPU, side by side in one process with the anchors:
the Triton requant kernel of SGLang PR #22316, a torch eager per-token-group cast, and the
device-to-device copy ceiling. Every time is triton.testing.do_bench's median over CUDA events
(warm-up 50 ms, 300 ms of repeats, L2 flushed before each repeat). Outputs of ours and of the
anchor are compared byte for byte on the valid rows before timing.

Run on the GPU machine: EPMOE_LIB=build/libepmoe.so python3 bench/bench_quant.py
Writes $OUT/bench_quant.json (or ./bench_quant.json) and prints a table last.
"""
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "baselines"))
import epmoe  # noqa: E402
from sglang_requant_triton import sglang_requant  # noqa: E402

K = 7168


def bench(fn):
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median") * 1e3  # µs


def stream():
    return torch.cuda.current_stream().cuda_stream


def copy_ceiling():
    a = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = bench(lambda: b.copy_(a))
    return dict(case="d2d_copy_2GiB", us=t, GBps=2 * a.numel() / (t * 1e-6) / 1e9)


def decode_counts(E, tok_per_rank, ranks, nexp, gen):
    counts = torch.zeros(nexp, dtype=torch.int64)
    for _ in range(ranks * tok_per_rank):
        counts[torch.randperm(nexp, generator=gen)[:8]] += 1
    return [int(c) for c in counts[:E]]


def make_group_fp8(E, M, K, col):
    xb = torch.randn(E, M, K, device="cuda") * torch.exp(torch.randn(E, M, 1, device="cuda"))
    g = xb.view(E, M, K // 128, 128)
    amax = g.abs().amax(-1).clamp(min=1e-4)
    sc = amax / 448.0
    x = (g / sc.unsqueeze(-1)).view(E, M, K).to(torch.float8_e4m3fn).contiguous()
    x_scale = sc.transpose(1, 2).contiguous().transpose(1, 2) if col else sc.contiguous()
    return x, x_scale, float((amax.max() / 448.0).item())


def requant_case(name, E, M, masked, col, ceiling):
    x, x_scale, osc = make_group_fp8(E, M, K, col)
    fmt = epmoe.SCALE_F32_MMAJOR if col else epmoe.SCALE_F32_ROW
    masked_m = torch.tensor(masked, dtype=torch.int32, device="cuda")
    out_scale = torch.tensor([osc], dtype=torch.float32, device="cuda")
    ours = torch.full((E, M, K), 0x55, dtype=torch.uint8, device="cuda")
    theirs = torch.full((E, M, K), 0x55, dtype=torch.uint8, device="cuda")

    def run_ours():
        epmoe.check(epmoe.lib.epmoe_requant_fp8_cuda(x.data_ptr(), x_scale.data_ptr(), fmt, masked_m.data_ptr(),
                                                     E, M, K, out_scale.data_ptr(), ours.data_ptr(), stream()))

    def run_theirs():
        sglang_requant(x, x_scale, masked_m, out_scale, theirs.view(torch.float8_e4m3fn))

    run_ours(), run_theirs()
    torch.cuda.synchronize()
    diff = sum(int((ours[e, :n] != theirs[e, :n]).sum().item()) for e, n in enumerate(masked) if n)
    # how far apart differing bytes are, in fp8 codes (1 = adjacent values: a rounding difference)
    code_dist = max([int((ours[e, :n].int() - theirs[e, :n].int()).abs().max().item()) for e, n in enumerate(masked)
                     if n] or [0])
    untouched = all(bool((ours[e, n:] == 0x55).all().item()) for e, n in enumerate(masked))
    t_ours, t_theirs = bench(run_ours), bench(run_theirs)
    rows = sum(min(n, M) for n in masked)
    nbytes = rows * K * 2 + rows * (K // 128) * 4 + E * 4
    t_copy = copy_same_bytes(nbytes)
    return dict(op="requant", case=name, scales="mmajor" if col else "row", E=E, M=M, K=K, rows=rows,
                bytes=nbytes, us=t_ours, GBps=nbytes / (t_ours * 1e-6) / 1e9, triton_us=t_theirs,
                triton_GBps=nbytes / (t_theirs * 1e-6) / 1e9, speedup=t_theirs / t_ours,
                ceiling_ratio=nbytes / (t_ours * 1e-6) / 1e9 / ceiling, copy_same_bytes_us=t_copy,
                byte_diff_vs_triton=diff, max_code_distance_vs_triton=code_dist,
                rows_past_masked_untouched=untouched)


def torch_group_cast(x):
    """DeepEP's per_token_cast_to_fp8 in torch. The 448 is a tensor: `448.0 / t` would run as
    `t.reciprocal() * 448`, a different rounding from the kernel's 448.f / amax."""
    M, Kx = x.shape
    g = x.float().view(M, Kx // 128, 128)
    amax = g.abs().amax(-1).clamp(min=1e-4)
    q = (g * (torch.full_like(amax, 448.0) / amax).unsqueeze(-1)).view(M, Kx).to(torch.float8_e4m3fn)
    return q, amax * (1.0 / 448.0)


_copy_bufs = {}


def copy_same_bytes(nbytes):
    """Time of a device copy reading and writing nbytes/2 each: the floor at this size, flushed
    like everything else (small copies cannot reach the large-copy ceiling)."""
    half = int(nbytes // 2) // 16 * 16
    if "a" not in _copy_bufs or _copy_bufs["a"].numel() < half:
        _copy_bufs["a"] = torch.empty(max(half, 1 << 20), dtype=torch.uint8, device="cuda")
        _copy_bufs["b"] = torch.empty_like(_copy_bufs["a"])
    a, b = _copy_bufs["a"][:half], _copy_bufs["b"][:half]
    return bench(lambda: b.copy_(a))


def cast_case(name, M, fmt, ceiling):
    x = (torch.randn(M, K, device="cuda") * torch.exp(torch.randn(M, 1, device="cuda"))).to(torch.bfloat16)
    q = torch.empty(M, K, dtype=torch.uint8, device="cuda")
    s = torch.empty(epmoe.lib.epmoe_scale_bytes(fmt, M, K), dtype=torch.uint8, device="cuda")
    rnd = 1 if fmt >= epmoe.SCALE_UE8M0_ROW else 0

    def run_ours():
        epmoe.check(epmoe.lib.epmoe_cast_group_fp8_cuda(x.data_ptr(), M, K, q.data_ptr(), s.data_ptr(), fmt, rnd,
                                                        stream()))

    run_ours()
    torch.cuda.synchronize()
    tq, _ = torch_group_cast(x)
    diff = -1 if rnd else int((tq.view(torch.uint8) != q).sum().item())
    t_ours, t_torch = bench(run_ours), bench(lambda: torch_group_cast(x))
    nbytes = M * K * 3 + M * (K // 128) * 4
    t_copy = copy_same_bytes(nbytes)
    return dict(op="cast_group", case=name, scales=["f32_row", "f32_mmajor", "ue8m0_row", "ue8m0_mmajor"][fmt], M=M,
                K=K, bytes=nbytes, us=t_ours, GBps=nbytes / (t_ours * 1e-6) / 1e9, torch_us=t_torch,
                speedup=t_torch / t_ours, ceiling_ratio=nbytes / (t_ours * 1e-6) / 1e9 / ceiling,
                copy_same_bytes_us=t_copy,
                byte_diff_vs_torch=diff)


def main():
    torch.manual_seed(0)
    res = [copy_ceiling()]
    ceiling = res[0]["GBps"]
    gen = torch.Generator().manual_seed(1)
    for (E, M, tok, ranks, nexp, name) in [(32, 1024, 128, 8, 256, "ds_r1_ep8_decode_128tok"),
                                           (32, 2048, 256, 8, 256, "ds_r1_ep8_decode_256tok"),
                                           (16, 2048, 128, 16, 256, "ds_r1_ep16_decode_128tok"),
                                           (48, 1024, 128, 8, 384, "kimi_k2_ep8_decode_128tok")]:
        masked = decode_counts(E, tok, ranks, nexp, gen)
        for col in (False, True):
            res.append(requant_case(name, E, M, masked, col, ceiling))
    for col in (False, True):
        res.append(requant_case("full_32x1024", 32, 1024, [1024] * 32, col, ceiling))
    res.append(requant_case("full_8x4096", 8, 4096, [4096] * 8, False, ceiling))
    for M, name in [(128, "one_rank_decode_128tok"), (1024, "ep8_recv_1024rows"), (32768, "32x1024_rows")]:
        for fmt in (epmoe.SCALE_F32_ROW, epmoe.SCALE_F32_MMAJOR, epmoe.SCALE_UE8M0_MMAJOR):
            res.append(cast_case(name, M, fmt, ceiling))
    out = os.path.join(os.environ.get("OUT", "."), "bench_quant.json")
    with open(out, "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(), results=res), f, indent=1)
    print(f"GPU: {torch.cuda.get_device_name()}  copy ceiling {ceiling:.0f} GB/s (read+write, 2 GiB)")
    print("anchor = SGLang's Triton requant / torch eager cast; copy = device copy of the same bytes, same method")
    print(f"{'op':10} {'case':26} {'scales':12} {'rows':>6} {'us':>8} {'GB/s':>6} {'%ceil':>6} {'copy us':>8} "
          f"{'anchor us':>9} {'x':>5} {'diff':>5}")
    for r in res[1:]:
        anchor = r.get("triton_us", r.get("torch_us"))
        diff = r.get("byte_diff_vs_triton", r.get("byte_diff_vs_torch"))
        rows = r.get("rows", r.get("M"))
        print(f"{r['op']:10} {r['case']:26} {r['scales']:12} {rows:6d} {r['us']:8.2f} {r['GBps']:6.0f} "
              f"{100 * r['ceiling_ratio']:5.1f}% {r['copy_same_bytes_us']:8.2f} {anchor:9.2f} {r['speedup']:5.2f} "
              f"{diff:5d}")
    # Triton's kernel may round an element to the adjacent code (1/s and products differ by an ulp
    # from IEEE fp32); anything further apart, a torch-cast difference or a touched row is a failure.
    bad = [r for r in res[1:] if r.get("max_code_distance_vs_triton", 0) > 1 or r.get("byte_diff_vs_torch", 0) > 0
           or r.get("rows_past_masked_untouched") is False]
    if bad:
        print(f"MISMATCH in {len(bad)} cases")
        sys.exit(1)


if __name__ == "__main__":
    main()
