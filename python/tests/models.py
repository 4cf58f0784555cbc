"""Independent numpy models of the formats and of EP dispatch/combine, written from the spec in
include/epmoe.h and docs (ml_dtypes for the fp8 and bf16 roundings), never from the library."""
import ml_dtypes
import numpy as np

F8 = ml_dtypes.float8_e4m3fn
BF = ml_dtypes.bfloat16
INV448 = np.float32(1.0) / np.float32(448.0)  # the fp32 constant 1.0f / 448


def bf16_bits(f):
    return np.asarray(f, dtype=np.float32).astype(BF).view(np.uint16)


def bf16_value(bits):
    return np.asarray(bits, dtype=np.uint16).view(BF).astype(np.float32)


def fp8_sat(f):
    """satfinite e4m3fn: round to nearest even, finite values beyond +-448 clamp to +-448."""
    f = np.asarray(f, dtype=np.float32)
    return np.clip(f, -448.0, 448.0).astype(np.float32).astype(F8).view(np.uint8)


def fp8_value(q):
    return np.asarray(q, dtype=np.uint8).view(F8).astype(np.float32)


def group_cast(x_bits, round_scale=False):
    """bf16 bits [M, K] -> (fp8 bytes [M, K], scale_inv float32 [M, K/128]) by the DeepEP LL rules."""
    x = bf16_value(x_bits)
    M, K = x.shape
    g = x.reshape(M, K // 128, 128)
    amax = np.maximum(np.abs(g).max(-1), np.float32(1e-4)).astype(np.float32)
    if round_scale:
        u = (amax * INV448).astype(np.float32).view(np.uint32)
        e = ((u >> 23) & 0xFF).astype(np.int64) - 127 + ((u & 0x7FFFFF) != 0)
        scale_inv = np.ldexp(np.float32(1.0), e).astype(np.float32)
        mul = np.ldexp(np.float32(1.0), -e).astype(np.float32)
    else:
        scale_inv = (amax * INV448).astype(np.float32)
        mul = (np.float32(448.0) / amax).astype(np.float32)
    q = fp8_sat((g * mul[..., None]).astype(np.float32)).reshape(M, K)
    return q, scale_inv


def ue8m0(scale_inv):
    """The exponent byte of power-of-two scales."""
    return ((np.asarray(scale_inv, np.float32).view(np.uint32) >> 23) & 0xFF).astype(np.uint8)


def scales_to_layout(scale_inv, fmt):
    """scale_inv [M, G] as the bytes of one slab in format fmt (see epmoe_scale_fmt in epmoe.h)."""
    M, G = scale_inv.shape
    P = (G + 3) // 4
    if fmt == 0:
        return scale_inv.astype(np.float32).reshape(-1).view(np.uint8)
    if fmt == 1:
        return np.ascontiguousarray(scale_inv.T.astype(np.float32)).reshape(-1).view(np.uint8)
    b = np.zeros((M, 4 * P), np.uint8)
    b[:, :G] = ue8m0(scale_inv)
    if fmt == 2:
        return b.reshape(-1)
    # M-major int32 words: byte (g/4)*M*4 + t*4 + g%4
    return np.ascontiguousarray(b.reshape(M, P, 4).transpose(1, 0, 2)).reshape(-1)


def scales_from_layout(buf, fmt, M, G):
    """The inverse of scales_to_layout: float32 [M, G]."""
    b = np.ascontiguousarray(buf).reshape(-1).view(np.uint8)
    P = (G + 3) // 4
    if fmt == 0:
        return b[: M * G * 4].view(np.float32).reshape(M, G)
    if fmt == 1:
        return b[: M * G * 4].view(np.float32).reshape(G, M).T
    if fmt == 2:
        e = b[: M * 4 * P].reshape(M, 4 * P)[:, :G]
    else:
        e = b[: P * M * 4].reshape(P, M, 4).transpose(1, 0, 2).reshape(M, 4 * P)[:, :G]
    with np.errstate(over="ignore"):  # rows past masked_m hold whatever was there: any exponent
        return np.ldexp(np.float32(1.0), e.astype(np.int64) - 127).astype(np.float32)


# ---- EP ------------------------------------------------------------------------------------------
def ep_routing(cfg, idxs, active=None):
    """The global routing table: rows[d][le] = [(src, t), ...] in the order an expert receives them
    (by source rank, then token), each token at most once per expert."""
    R, L = cfg.num_ranks, cfg.local_experts
    act = [True] * R if active is None else [bool(a) for a in active]
    rows = [[[] for _ in range(L)] for _ in range(R)]
    for src in range(R):
        if not act[src]:
            continue
        for t, experts in enumerate(np.asarray(idxs[src]).tolist()):
            seen = set()
            for e in experts:
                if e < 0 or not act[e // L] or e in seen:
                    continue
                seen.add(e)
                rows[e // L][e % L].append((src, t))
    return rows


def row_of(rows, cfg, src, t, e):
    """Row index of (src, t) in expert e's slab."""
    L = cfg.local_experts
    return rows[e // L][e % L].index((src, t))


def combine_owner(cfg, rows, idxs, ws, expert_outs, active=None):
    """REDUCE_AT_OWNER: out[r][t] = sum_j w[t, j] * y(t, j), sequential fp32 in top-k order, one
    bf16 rounding. Returns bf16 bits [T, H] per rank."""
    R, L, H = cfg.num_ranks, cfg.local_experts, cfg.hidden
    act = [True] * R if active is None else [bool(a) for a in active]
    outs = []
    for r in range(R):
        if not act[r]:
            outs.append(None)
            continue
        idx, w = np.asarray(idxs[r]), np.asarray(ws[r], np.float32)
        acc = np.zeros((idx.shape[0], H), np.float32)
        for t in range(idx.shape[0]):
            for j in range(idx.shape[1]):
                e = int(idx[t, j])
                if e < 0 or not act[e // L]:
                    continue
                y = bf16_value(expert_outs[e // L][e % L, row_of(rows, cfg, r, t, e)])
                acc[t] = (acc[t] + (w[t, j] * y).astype(np.float32)).astype(np.float32)
        outs.append(bf16_bits(acc))
    return outs


def combine_expert_bound(cfg, rows, idxs, ws, expert_outs, r, active=None):
    """For REDUCE_AT_EXPERT (partial sums per expert rank, each rounded to bf16, then summed): the
    exact value and the error bound of ep_common.h: u * (sum_d |p_d| + |got| + |want|) +
    1e-6 * sum |terms|, u = 2^-8. Returns (exact float64 [T, H], sum_d |p_d|, sum |terms|)."""
    R, L, H = cfg.num_ranks, cfg.local_experts, cfg.hidden
    act = [True] * R if active is None else [bool(a) for a in active]
    idx, w = np.asarray(idxs[r]), np.asarray(ws[r], np.float32)
    T = idx.shape[0]
    parts = np.zeros((R, T, H))
    terms = np.zeros((T, H))
    for t in range(T):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            if e < 0 or not act[e // L]:
                continue
            term = np.float64(w[t, j]) * bf16_value(expert_outs[e // L][e % L, row_of(rows, cfg, r, t, e)])
            parts[e // L, t] += term
            terms[t] += np.abs(term)
    return parts.sum(0), np.abs(parts).sum(0), terms


# ---- W4A8 ----------------------------------------------------------------------------------------
# From the header's words: the W4AFP8 checkpoint stores signed two's-complement int4, element 2j in
# the low nibble of byte j; the repack stores each group scale as bf16(s * 512), round to nearest
# even; the GEMM sums fp8(a) * w per 128-channel group in fp64, scales each group's sum by sa * sw,
# accumulates in fp64, and the float result is rounded to bf16.
def w4_scales(ckpt_scales):
    """Checkpoint group scales (float32, or bf16 as uint16 bits) as the repack stores them, in
    checkpoint units: bf16(s * 512) / 512, float64."""
    s = np.asarray(ckpt_scales)
    s = bf16_value(s) if s.dtype == np.uint16 else s.astype(np.float32)
    return bf16_value(bf16_bits(s * np.float32(512))).astype(np.float64) / 512


def int4_values(ckpt_w):
    """int8 [..., K/2] checkpoint bytes -> int8 [..., K] values in [-8, 7]."""
    b = np.asarray(ckpt_w).view(np.uint8)
    nib = np.stack([b & 0xF, b >> 4], axis=-1).reshape(b.shape[:-1] + (2 * b.shape[-1],)).astype(np.int8)
    return np.where(nib >= 8, nib - 16, nib).astype(np.int8)


def int4_ckpt(values):
    """The inverse: values in [-8, 7], [..., K] -> int8 [..., K/2] checkpoint bytes."""
    u = np.asarray(values, np.int8).view(np.uint8) & 0xF
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8).view(np.int8)


def w4a8_gemm(values, wscales, a, sa, masked_m):
    """fp64 model of the masked grouped GEMM. values int8 [E, N, K]; wscales [E, N, G], the
    checkpoint's (layout and dtype; rounded by w4_scales as the repack does); a fp8 bytes [E, M, K];
    sa float [E, M, G] (one scale per row and group; a per-tensor scale broadcast). Returns (float64
    [E, M, N] with NaN at rows past masked_m, the float64 magnitude sum_g |sa sw| sum_k |a w|)."""
    E, N, K = values.shape
    M, G = a.shape[1], K // 128
    wscales = w4_scales(wscales)
    acc = np.full((E, M, N), np.nan)
    mag = np.zeros((E, M, N))
    for e in range(E):
        rows = int(min(max(masked_m[e], 0), M))
        av = fp8_value(a[e, :rows]).astype(np.float64).reshape(rows, G, 128)
        wv = values[e].astype(np.float64).reshape(N, G, 128)
        # every product and every 128-term sum is exact in fp64 (fp8 x int4 needs < 30 bits)
        part = np.einsum("mgk,ngk->mgn", av, wv)
        apart = np.einsum("mgk,ngk->mgn", np.abs(av), np.abs(wv))
        tot = np.zeros((rows, N))
        for g in range(G):  # in group order, as the specification accumulates
            s = np.float64(1) * sa[e, :rows, g][:, None] * wscales[e, :, g][None, :]
            tot += s * part[:, g]
            mag[e, :rows] += np.abs(s) * apart[:, g]
        acc[e, :rows] = tot
    return acc, mag


def silu_mul(gate_up_bits, I):
    """silu(gate) * up in fp32 from bf16 [.., 2I] (gate first), rounded to bf16 bits. exp in fp64
    rounded to fp32: a correctly rounded expf, as glibc's is."""
    gu = bf16_value(gate_up_bits)
    gate, up = gu[..., :I], gu[..., I:]
    ex = np.exp(-gate.astype(np.float64)).astype(np.float32)
    s = (gate / (np.float32(1.0) + ex)).astype(np.float32)
    return bf16_bits((s * up).astype(np.float32))


def mlp_intermediates(gate_up, masked_m, I):
    """GEMM1's output of an MLP (fp64 [E, M, 2I], NaN past masked_m) to the intermediate's rows:
    (expert, rows, silu(gate) * up as bf16 bits [rows, I]) for each expert with rows, the fp64 sums
    rounded to fp32 and then to bf16 on the way, as the library's GEMM1 writes them."""
    M = gate_up.shape[1]
    for e in range(gate_up.shape[0]):
        rows = int(min(max(masked_m[e], 0), M))
        if rows:
            with np.errstate(over="ignore"):
                yield e, rows, silu_mul(bf16_bits(gate_up[e, :rows].astype(np.float32)), I)
