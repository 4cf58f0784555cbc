"""torch tensors through the package: zero-copy DLPack both ways (torch.bfloat16 and float8 included),
the quant ops' GPU kernels against their CPU references, and EP over NCCL (a torchrun job, one
process per GPU). Skipped where torch, a GPU, or a CUDA/NCCL build is missing."""
import os
import subprocess
import sys

import numpy as np
import pytest

import epmoe

torch = pytest.importorskip("torch")
HERE = os.path.dirname(os.path.abspath(__file__))
gpu = pytest.mark.skipif(not (torch.cuda.is_available() and epmoe.cuda_available()),
                         reason="needs a GPU, torch with CUDA and a CUDA build of libepmoe")


# ---- host tensors ---------------------------------------------------------------------------------
def test_torch_cpu_tensors_pass_without_copies():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    e = epmoe.from_dlpack(t)
    assert e.data_ptr == t.data_ptr() and e.shape == (3, 4) and e.dtype.name == "float32"
    back = torch.from_dlpack(e)  # an unchanged view exports through torch itself
    assert back.data_ptr() == t.data_ptr()
    b = torch.zeros(8, dtype=torch.bfloat16)
    eb = epmoe.from_dlpack(b)
    assert eb.dtype.name == "bfloat16" and eb.data_ptr == b.data_ptr()
    u = np.arange(8, dtype=np.uint16)
    tb = torch.from_dlpack(epmoe.from_dlpack(u).view("bfloat16"))  # numpy bits -> torch.bfloat16
    assert tb.dtype == torch.bfloat16 and tb.data_ptr() == u.ctypes.data


def test_torch_bf16_input_and_out_tensors():
    x = torch.randn(4, 256).to(torch.bfloat16)
    q, s = epmoe.cast_group_fp8(x)  # host input: numpy results, bit patterns
    q2, s2 = epmoe.cast_group_fp8(x.view(torch.int16).numpy().view(np.uint16))
    assert (q == q2).all() and (s == s2).all()
    out = torch.empty(4, 256, dtype=torch.float8_e4m3fn)
    sc = torch.empty(4, 2, dtype=torch.float32)
    r = epmoe.cast_group_fp8(x, out=out, scales=sc)
    assert r[0] is out and r[1] is sc
    assert (out.view(torch.uint8).numpy() == q).all() and (sc.numpy() == s).all()


def test_torch_noncontiguous_is_refused():
    with pytest.raises(epmoe.DLPackError, match="contiguous"):
        epmoe.bf16_to_float(torch.zeros(8, 8, dtype=torch.bfloat16).t())


@gpu
def test_cuda_tensors_on_the_current_stream_skip_the_dlpack_exchange():
    """dlpack._torch_cuda_view: the same description as the exchange gives, taken only where the
    exchange would order nothing (torch's current stream); elsewhere the exchange runs."""
    x = torch.arange(24, dtype=torch.float32, device="cuda:0").reshape(2, 3, 4)[:, 1:]  # strided view
    cur = torch.cuda.current_stream(0).cuda_stream
    fast = epmoe.from_dlpack(x, stream=cur)
    assert fast._owner is x  # no capsule consumed
    side = torch.cuda.Stream(0)
    slow = epmoe.from_dlpack(x, stream=side.cuda_stream)
    assert isinstance(slow._owner, epmoe.dlpack._Imported)
    for t in (fast, slow):
        assert (t.data_ptr, t.shape, t.strides, t.dtype.name, t.device) == \
            (x.data_ptr(), (2, 2, 4), (12, 4, 1), "float32", (epmoe.dlpack.CUDA, 0))
    assert torch.from_dlpack(fast).data_ptr() == x.data_ptr()  # exports again through torch
    for t in (torch.zeros(3, device="cuda:0", requires_grad=True), torch.zeros(3, dtype=torch.complex64, device="cuda:0").conj()):
        assert epmoe.dlpack._torch_cuda_view(t, cur) is None
    q = torch.zeros(4, device="cuda:0").to(torch.float8_e4m3fn)
    assert epmoe.from_dlpack(q, stream=cur).dtype.name == "float8_e4m3fn"


# ---- GPU kernels vs references ------------------------------------------------------------------
@gpu
@pytest.mark.parametrize("fmt", [0, 1, 2, 3])
def test_cuda_quant_ops_match_the_references(fmt):
    dev = "cuda:0"
    M, K, E = 37, 1024, 3
    rs = fmt >= 2
    x = (torch.randn(E * M, K) * torch.randn(E * M, 1).exp()).to(torch.bfloat16)
    xg = x.to(dev)
    q, s = epmoe.cast_group_fp8(xg, fmt, rs)
    assert isinstance(q, torch.Tensor) and q.device.type == "cuda" and q.dtype == torch.float8_e4m3fn
    qr, sr = epmoe.cast_group_fp8(x, fmt, rs)
    torch.cuda.synchronize()
    assert (q.view(torch.uint8).cpu().numpy() == qr).all()
    assert (s.cpu().numpy().view(np.uint8) == sr.view(np.uint8)).all()

    qt = epmoe.cast_tensor_fp8(xg, 0.03)
    assert (qt.view(torch.uint8).cpu().numpy() == epmoe.cast_tensor_fp8(x, 0.03)).all()

    # batched [E, M, K] with E slabs of scales, masked rows
    qb, sb = [], []
    for e in range(E):
        a, b = epmoe.cast_group_fp8(x[e * M:(e + 1) * M], fmt, rs)
        qb.append(a)
        sb.append(b.reshape(-1).view(np.uint8))
    qh, sh = np.stack(qb), np.concatenate(sb)
    mm = np.array([M, 5, 0], np.int32)
    qd, sd, md = (torch.from_numpy(qh).to(dev), torch.from_numpy(sh).to(dev), torch.from_numpy(mm).to(dev))
    y = epmoe.dequant_fp8(qd.view(torch.float8_e4m3fn), sd, fmt, md)
    assert (y.cpu().numpy() == epmoe.dequant_fp8(qh, sh, fmt, mm)).all()
    out_scale = torch.tensor([0.05], device=dev)
    r = epmoe.requant_fp8(qd, sd, fmt, md, out_scale)
    assert (r.view(torch.uint8).cpu().numpy() == epmoe.requant_fp8(qh, sh, fmt, mm, 0.05)).all()


@gpu
def test_cuda_outputs_in_place_on_the_current_stream():
    dev = torch.device("cuda:0")
    x = torch.randn(64, 512, device=dev).to(torch.bfloat16)
    q = torch.empty(64, 512, dtype=torch.uint8, device=dev)
    s = torch.empty(64 * 4, dtype=torch.float32, device=dev)
    stream = torch.cuda.Stream(dev)
    with torch.cuda.stream(stream):
        q2, s2 = epmoe.cast_group_fp8(x, out=q, scales=s)
    assert q2 is q and s2 is s
    stream.synchronize()
    qr, sr = epmoe.cast_group_fp8(x.cpu())
    assert (q.cpu().numpy() == qr).all() and (s.cpu().numpy().reshape(64, 4) == sr).all()
    with pytest.raises(epmoe.DLPackError, match="is on cpu, the inputs on cuda:0"):
        epmoe.cast_group_fp8(x, out=torch.empty(64, 512, dtype=torch.uint8))


# ---- EP over NCCL (one process per GPU) -----------------------------------------------------------
@gpu
@pytest.mark.parametrize("job", ["nccl_ep_job", "deep_ep_job"])  # EpGroup; deep_ep.Buffer on it
def test_ep_over_nccl_with_torchrun(job):
    if not epmoe.nccl.has_nccl_backend():
        pytest.skip("libepmoe built without the NCCL EP backend")
    n = min(torch.cuda.device_count(), 2)
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", PYTHONPATH=os.pathsep.join([os.path.join(HERE, ".."), HERE]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           os.path.join(HERE, f"{job}.py")]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert p.stdout.count(f"{job}: ok") == n, p.stdout[-4000:]


def test_nccl_without_distributed_says_so():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group exists")
    with pytest.raises(epmoe.Unsupported, match="init_process_group|NCCL EP backend"):
        epmoe.nccl.create_group(epmoe.EpConfig())

