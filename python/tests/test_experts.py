"""epmoe.experts.gemm and .mlp on the host (the library's references through the package): the GEMM
of every weight format against a numpy fp64 model of its specification (include/epmoe.h: per-group
partial sums scaled and added in group order, rounded once to bf16), rows past masked_m untouched;
the MLP against its steps composed in numpy (silu in fp32, bf16 via ml_dtypes, the fp8 cast of the
intermediate by the models' own group cast); DeepEP's scale tensors; errors as the right exceptions."""
import numpy as np
import pytest

import epmoe
import models as mdl
from epmoe import experts
from test_layer import dequant, expert_weights
from test_w4a8 import POISON, check_gemm, make_acts

# (format, int4 group); fp8_block in several activation-scale layouts below
FORMATS = [("bf16", 0), ("int4", 32), ("int4", 128), ("fp8_block", 0)]


def make_inputs(rng, fmt, E, M, K, scale_fmt=epmoe.SCALE_F32_ROW):
    """Activations for weights of `fmt`: (a, scale slabs or None, scales float [E, M, K/128] or None,
    a as float64 values)."""
    if fmt == "fp8_block":
        a, slabs, sa = make_acts(rng, E, M, K, scale_fmt)
        return a, slabs, sa, mdl.fp8_value(a).astype(np.float64)
    x = rng.standard_normal((E, M, K)) * np.exp2(rng.uniform(-2, 2, (E, M, 1)))
    a = mdl.bf16_bits(x)
    return a, None, None, mdl.bf16_value(a).astype(np.float64)


def gemm_model(w, av, sa, masked):
    """fp64 [E, M, N] of the specification, NaN past masked_m: the sum over each run of weights that
    shares a scale (K for bf16, the group for int4, 128 for fp8_block), scaled by sa * sw, added in
    group order. Sums inside a group are exact in fp64 for int4 and fp8; bf16's are not, but their
    rounding error (~2^-45 relative) never moves a bf16 result unless it sits on a rounding tie."""
    E, N, K = w.shape
    M = av.shape[1]
    ks = K if w.format_name == "bf16" else (w.group if w.format_name == "int4" else 128)
    if w.format_name == "bf16":
        vals, sw = mdl.bf16_value(w.data).astype(np.float64), np.ones((E, N, 1))
    elif w.format_name == "int4":
        vals, sw = mdl.int4_values(w.data).astype(np.float64), w.scales.astype(np.float64)
    else:
        vals, sw = mdl.fp8_value(w.data).astype(np.float64), np.repeat(w.scales.astype(np.float64), 128, axis=1)
    out = np.full((E, M, N), np.nan)
    G = K // ks
    for e in range(E):
        rows = int(min(max(masked[e], 0), M))
        part = np.einsum("mgk,ngk->mgn", av[e, :rows].reshape(rows, G, ks), vals[e].reshape(N, G, ks))
        acc = np.zeros((rows, N))
        for g in range(G):
            s = sw[e, :, g][None, :] * (sa[e, :rows, g][:, None] if sa is not None else 1.0)
            acc += s * part[:, g]
        out[e, :rows] = acc
    return out


@pytest.mark.parametrize("fmt,group", FORMATS)
@pytest.mark.parametrize("E,N,K,M,masked", [(3, 128, 256, 5, [5, 0, 2]), (2, 384, 640, 4, [-2, 9]), (1, 128, 128, 1, [1])])
def test_gemm_ref_matches_fp64_model(fmt, group, E, N, K, M, masked):
    rng = np.random.default_rng(7 + N + K + group)
    w = expert_weights(rng, fmt, E, N, K, group or 128)
    a, slabs, sa, av = make_inputs(rng, fmt, E, M, K)
    masked = np.array(masked, np.int32)
    out = np.full((E, M, N), POISON, np.uint16)
    assert experts.gemm(w, a, masked, slabs, out=out) is out
    want = gemm_model(w, av, sa, masked)
    check_gemm(out, want, masked)
    valid = want[~np.isnan(want)]
    assert valid.size and np.isfinite(valid).all() and np.abs(valid).max() > 0  # the check saw real numbers


@pytest.mark.parametrize("scale_fmt", [epmoe.SCALE_F32_MMAJOR, epmoe.SCALE_UE8M0_ROW, epmoe.SCALE_UE8M0_MMAJOR])
def test_fp8_block_gemm_takes_every_scale_layout(scale_fmt):
    rng = np.random.default_rng(30 + scale_fmt)
    E, N, K, M = 2, 256, 640, 3  # K = 5 groups: UE8M0 words padded
    w = expert_weights(rng, "fp8_block", E, N, K, 128)
    a, slabs, sa, av = make_inputs(rng, "fp8_block", E, M, K, scale_fmt)
    masked = np.array([3, 2], np.int32)
    out = np.full((E, M, N), POISON, np.uint16)
    experts.gemm(w, a, masked, slabs, scale_fmt, out=out)
    check_gemm(out, gemm_model(w, av, sa, masked), masked)


def test_gemm_defaults_and_one_expert():
    rng = np.random.default_rng(5)
    E, N, K, M = 2, 128, 256, 3
    w = expert_weights(rng, "int4", E, N, K, 32)
    a, _, _, av = make_inputs(rng, "int4", E, M, K)
    full = experts.gemm(w, a)  # masked_m omitted: every row, into a new output
    assert full.dtype == np.uint16 and full.shape == (E, M, N)
    check_gemm(full, gemm_model(w, av, None, [M] * E), [M] * E)
    one = epmoe.ExpertWeights("int4", w.data[:1], w.scales[:1])
    assert (experts.gemm(one, a[0]) == full[0]).all()  # [M, K] activations for a single expert


def mlp_model(w13, w2, av, sa, masked):
    """The MLP composed in numpy: GEMM1 (model, bf16), silu(gate) * up in fp32 rounded to bf16, for
    fp8_block the models' group cast of it (F32_ROW, no scale rounding), GEMM2 (model)."""
    E, M, _ = av.shape
    I = w2.K
    fp8 = w13.format_name == "fp8_block"
    gate_up = gemm_model(w13, av, sa, masked)
    inter = np.zeros((E, M, I))
    isa = np.zeros((E, M, I // 128)) if fp8 else None
    for e, rows, y in mdl.mlp_intermediates(gate_up, masked, I):
        if fp8:
            q, s = mdl.group_cast(y)
            inter[e, :rows], isa[e, :rows] = mdl.fp8_value(q), s
        else:
            inter[e, :rows] = mdl.bf16_value(y)
    return gemm_model(w2, inter, isa, masked)


def mlp_case(seed, fmt, group, E, M, H, I, scale_fmt):
    """Host weights w13 [E, 2I, H] and w2 [E, H, I] of one format, and make_inputs' activations."""
    rng = np.random.default_rng(seed)
    w13 = expert_weights(rng, fmt, E, 2 * I, H, group or 128)
    w2 = expert_weights(rng, fmt, E, H, I, group or 128)
    return (w13, w2) + make_inputs(rng, fmt, E, M, H, scale_fmt)


@pytest.mark.parametrize("fmt,group", FORMATS)
def test_mlp_ref_equals_its_steps(fmt, group):
    E, M, H, I = 3, 4, 256, 384
    w13, w2, a, slabs, sa, av = mlp_case(70 + group + len(fmt), fmt, group, E, M, H, I, epmoe.SCALE_F32_MMAJOR)
    masked = np.array([4, 0, 1], np.int32)
    out = np.full((E, M, H), POISON, np.uint16)
    assert experts.mlp(w13, w2, a, masked, slabs, epmoe.SCALE_F32_MMAJOR, out=out) is out
    want = mlp_model(w13, w2, av, sa, masked)
    check_gemm(out, want, masked)
    assert np.abs(want[~np.isnan(want)]).max() > 0
    # the same against the dequantized weights in plain fp64 (no rounding of the intermediate):
    # within the roundings on the way (test_layer's argument), so the model above is the MLP
    x = av[0, :4] * (np.repeat(sa[0, :4], 128, axis=1) if sa is not None else 1.0)
    g, u = np.split(x @ dequant(w13)[0].T, 2, axis=1)
    exact = (g / (1 + np.exp(-g)) * u) @ dequant(w2)[0].T
    got = mdl.bf16_value(out[0]).astype(np.float64)
    rel = np.sqrt(((got - exact) ** 2).sum() / (exact ** 2).sum())
    bound = 4 * 2.0 ** -8 + (2 * 2.0 ** -4 if fmt == "fp8_block" else 0)
    assert rel <= bound, f"relative L2 {rel:.3e} against the fp64 MLP (bound {bound:.3e})"


def test_deepeps_scale_tensors_pass_as_they_are():
    """DeepEP's low-latency scales ([E, M, G] in strides (G*M, 1, M)) with fp8_block weights: the
    same results as the M-major slabs themselves."""
    rng = np.random.default_rng(90)
    E, M, H, I = 2, 5, 640, 128  # UE8M0: two words a row (5 groups), so DeepEP's view is not contiguous
    w13 = expert_weights(rng, "fp8_block", E, 2 * I, H, 128)
    w2 = expert_weights(rng, "fp8_block", E, H, I, 128)
    for fmt in (epmoe.SCALE_F32_MMAJOR, epmoe.SCALE_UE8M0_MMAJOR):
        a, slabs, _, _ = make_inputs(rng, "fp8_block", E, M, H, fmt)
        G = H // 128 if fmt == epmoe.SCALE_F32_MMAJOR else (H // 128 + 3) // 4
        words = slabs.view(np.float32 if fmt == epmoe.SCALE_F32_MMAJOR else np.int32).reshape(E, G, M)
        deepep = words.swapaxes(1, 2)
        assert not deepep.flags.c_contiguous  # the view itself, not slabs that happen to be contiguous
        masked = np.array([5, 3], np.int32)
        assert (experts.gemm(w13, a, masked, deepep, fmt) == experts.gemm(w13, a, masked, slabs, fmt)).all()
        assert (experts.mlp(w13, w2, a, masked, deepep, fmt) == experts.mlp(w13, w2, a, masked, slabs, fmt)).all()


def test_workspace_bytes_and_a_given_workspace():
    rng = np.random.default_rng(3)
    E, M, H, I = 2, 3, 256, 128
    w13 = expert_weights(rng, "bf16", E, 2 * I, H, 128)
    w2 = expert_weights(rng, "bf16", E, H, I, 128)
    a, _, _, _ = make_inputs(rng, "bf16", E, M, H)
    n = experts.mlp_workspace_bytes("bf16", E, M, H, I)
    assert n >= E * M * (2 * I + I) * 2  # gate_up and the intermediate, bf16
    assert experts.mlp_workspace_bytes("fp8_block", E, M, H, I) >= E * M * (2 * I * 2 + I + I // 128 * 4)
    assert experts.mlp_workspace_bytes("bf16", E, M, H, 100) == 0  # I not a multiple of 128
    ws = np.zeros(n + 256, np.uint8)
    off = (-ws.ctypes.data) % 256
    want = experts.mlp(w13, w2, a)
    assert (experts.mlp(w13, w2, a, workspace=ws[off:off + n]) == want).all()
    with pytest.raises(epmoe.InvalidArgument, match="workspace_bytes"):
        experts.mlp(w13, w2, a, workspace=ws[off:off + n - 256])
    ro = ws[off:off + n]
    ro.flags.writeable = False
    with pytest.raises(epmoe.DLPackError, match="read-only"):
        experts.mlp(w13, w2, a, workspace=ro)


def test_errors():
    rng = np.random.default_rng(4)
    E, M, H, I = 2, 3, 256, 128
    b13, b2 = expert_weights(rng, "bf16", E, 2 * I, H, 128), expert_weights(rng, "bf16", E, H, I, 128)
    f13 = expert_weights(rng, "fp8_block", E, 2 * I, H, 128)
    i2 = expert_weights(rng, "int4", E, H, I, 32)
    a, _, _, _ = make_inputs(rng, "bf16", E, M, H)
    q, slabs, _, _ = make_inputs(rng, "fp8_block", E, M, H)
    with pytest.raises(TypeError, match="ExpertWeights"):
        experts.gemm((b13.data,), a)
    with pytest.raises(TypeError, match="dtype"):  # fp8 activations for bf16 weights
        experts.gemm(b13, q)
    with pytest.raises(TypeError, match="dtype"):  # bf16 activations for fp8 weights
        experts.gemm(f13, a, a_scales=slabs)
    with pytest.raises(ValueError, match="no scales"):
        experts.gemm(b13, a, a_scales=slabs)
    with pytest.raises(ValueError, match="1x128 scales"):
        experts.gemm(f13, q)
    with pytest.raises(ValueError, match="a_scales"):
        experts.gemm(f13, q, a_scales=slabs[:8])
    with pytest.raises(ValueError, match="does not fit"):
        experts.gemm(b13, np.ascontiguousarray(a[:, :, :128]))
    with pytest.raises(ValueError, match="masked_m"):
        experts.gemm(b13, a, np.array([1, 2, 3], np.int32))
    with pytest.raises(ValueError, match="shape"):
        experts.gemm(b13, a, out=np.zeros((E, M, 128), np.uint16))
    with pytest.raises(epmoe.InvalidArgument, match="one format"):  # bf16 w13 with int4 w2
        experts.mlp(b13, i2, a)
    with pytest.raises(epmoe.InvalidArgument, match="must be \\[E, 2I, H\\]"):  # swapped
        experts.mlp(b2, b13, np.ascontiguousarray(a[:, :, :128]))
    with pytest.raises(ValueError, match="format"):
        experts.mlp_workspace_bytes("fp4", 1, 1, 128, 128)
    with pytest.raises(ValueError, match="format"):
        epmoe.ExpertWeights(1.0, b13.data)
    with pytest.raises(epmoe.InvalidArgument, match="overlap"):  # out over the activations
        experts.gemm(epmoe.ExpertWeights("bf16", b13.data[:, :H]), a, out=a)
    over_w = b13.data.reshape(-1)[:E * M * 2 * I].reshape(E, M, 2 * I)  # out in the weights' own memory
    with pytest.raises(epmoe.InvalidArgument, match="out overlaps w.data"):
        experts.gemm(b13, a, out=over_w)
