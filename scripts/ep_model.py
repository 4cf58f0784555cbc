#!/usr/bin/env python3
"""
ep_model.py — a performance model of EP dispatch and combine at R = 2 … 256 ranks: NVLink inside
a node (up to 8 GPUs), 400 Gb/s RDMA (NCCL GIN) between nodes, with and without per-rank
deduplication. Parameters come from measurements on the H200s here (docs/EP_MODEL.md names each
one and its source); the formulas are in docs/EP_MODEL.md and next to the code below.

    python3 scripts/ep_model.py                 # predicted table, DeepSeek-R1 decode shape
    python3 scripts/ep_model.py --json          # the same as JSON (parameters and sources too)
    python3 scripts/ep_model.py --check         # against our R = 1/2 bench rows and DeepEP's tables
    python3 scripts/ep_model.py --plot docs/ep_model.svg   # needs matplotlib

Pure Python 3.11 standard library; matplotlib only for --plot.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from statistics import NormalDist

RANKS = (2, 4, 8, 16, 32, 64, 128, 256)


# ---------------------------------------------------------------------------------------------
# Shapes, schemes, fabric
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    tokens: int = 128  # T: tokens per rank (DeepSeek-R1 low-latency decode)
    hidden: int = 7168  # H
    topk: int = 8  # k distinct experts per token
    experts: int = 256  # E
    group: int = 128  # channels per FP8 scale (one fp32 per 128-group)


@dataclass(frozen=True)
class Scheme:
    name: str
    dedup: bool  # dispatch: one message per (token, destination rank), not per (token, expert)
    reduce_at_expert: bool  # combine: one partial sum per (token, rank), not one row per (token, expert)
    header: str  # "epmoe": 16 B + 12 B per top-k entry, padded to 16; "deepep": 16 B


EPMOE = Scheme("epmoe dedup", dedup=True, reduce_at_expert=True, header="epmoe")
PER_EXPERT = Scheme("per-expert", dedup=False, reduce_at_expert=False, header="epmoe")
DEDUP_AT_OWNER = Scheme("dedup, reduce at owner", dedup=True, reduce_at_expert=False, header="epmoe")
DEEPEP = Scheme("DeepEP LL", dedup=False, reduce_at_expert=False, header="deepep")


@dataclass(frozen=True)
class Fabric:
    gpus_per_node: int = 8  # NVLink domain (HGX board); ranks beyond it are reached over RDMA
    nvl_gbps: float = 367.0  # per-GPU NVLink egress by SM stores, asymptote (see PARAM_SOURCES)
    nvl_one_way_us: float = 1.25  # half the measured LSA flag round trip of 2.5 us
    rdma_gbps: float = 50.0  # 400 Gb/s per GPU (one NIC per GPU), nominal
    rdma_one_way_us: float = 8.35  # half the GIN (GDAKI) round trip of 16.7 us


@dataclass(frozen=True)
class Cost:
    """Non-wire time of one op (two kernels, send + receive): fixed + per token + per message sent
    + per dispatch message walked (combine's send kernel visits every message its dispatch
    received, to find the rows; dispatch's own walk is in per_msg, since it sends what it walks)."""

    fixed_us: float
    per_token_us: float
    per_msg_us: float
    per_walked_msg_us: float = 0.0


# Measured on the H200s here. Each value names where it comes from; --json carries these too.
LAUNCH_PROBE = {
    # Events around n empty <<<132, 256>>> kernels on one stream, behind a 200 us spin kernel
    # (bench_ep's timing method), median of 200, H200, 2026-11-30. Probe source: docs/EP_MODEL.md.
    "event_floor_us": 1.3,  # two events, nothing between them
    "one_kernel_us": 2.88,
    "two_kernels_us": 4.19,  # the launch floor of an op made of a send and a receive kernel
    "marginal_kernel_us": 1.48,  # per extra kernel, from 64 kernels in 94.7 us
}

NVL_PROBE = {
    # shared/baselines/nvlink_lsa_probe.cu (DESIGN.md "Performance anchors"): SM stores into the
    # peer's window over NVLink, 2 x H200 (NV18): GB/s at a size.
    "store_gbps_4MiB": 293.0,
    "store_gbps_16MiB": 348.0,
    "store_gbps_128MiB": 364.0,
    "flag_round_trip_us": 2.5,
}


def nvl_asymptote(probe=NVL_PROBE):
    """t(bytes) = t0 + bytes / B through the 4 MiB and 128 MiB points: B is the store rate once
    the stream of stores is under way. Inside our kernels t0 (the probe's launch and ramp) is part
    of the fitted fixed cost, so the wire term uses B alone. Returns (B in GB/s, t0 in us)."""
    b1, b2 = 4 * 2**20, 128 * 2**20
    t1, t2 = b1 / probe["store_gbps_4MiB"] / 1e3, b2 / probe["store_gbps_128MiB"] / 1e3  # us
    gbps = (b2 - b1) / (t2 - t1) / 1e3
    return gbps, t1 - b1 / gbps / 1e3


# The kernels as of commit e1e386a keep some bookkeeping on one thread per block, looping over
# all R peers; at R <= 2 it is invisible, at R = 256 it is not. Each pattern was copied into a
# probe kernel (<<<132, 256>>>, one H200, 2026-11-30; source in docs/EP_MODEL.md) and timed
# alone, median of 100 (us, the empty kernel included):
PEER_PROBE = {
    "R": (2, 4, 8, 16, 32, 64, 128, 256),
    "empty": (2.91, 2.94, 2.94, 2.94, 2.94, 2.91, 2.94, 2.94),
    # dispatch send, thread 0: for each peer, wait_at_least(ack >= seq - 2) (ld.acquire.sys + timer)
    "ack_wait": (4.13, 4.96, 6.62, 9.82, 16.06, 29.02, 55.10, 107.33),
    # dispatch receive and combine send, thread 0: message prefix over the R sources
    "prefix": (3.94, 3.78, 3.94, 4.45, 5.44, 7.65, 11.71, 20.26),
    # dispatch receive: begin[L, R], one thread per local expert looping over R (L = 1 at R = 256)
    "begin": (3.94, 3.78, 4.10, 4.61, 5.63, 7.81, 12.19, 20.96),
    # per-message loop with (msgloop_search) and without (msgloop) the linear search for the
    # message's source, `while (pre[src + 1] <= m) src++`, over round(128 * ranks/token) messages
    "messages": (255, 463, 678, 835, 930, 983, 1010, 1024),
    "msgloop": (3.42, 3.62, 4.10, 4.96, 6.62, 9.66, 15.90, 28.35),
    "msgloop_search": (3.58, 3.94, 4.96, 6.78, 10.34, 17.25, 31.20, 59.14),
}
SMS = 132  # H200 SMs = blocks of every EP kernel (bench_ep launches one block per SM)


def search_steps(msgs, R, blocks=SMS):
    """Linear-search steps on the busiest block: ceil(msgs / blocks) messages, each scanning past
    (R - 1) / 2 sources on average."""
    return math.ceil(msgs / blocks) * (R - 1) / 2


def _slope(xs, ys):
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


@functools.lru_cache(maxsize=None)
def peer_slopes():
    """Least-squares slopes of the probe: us per peer for the serial loops, us per search step."""
    pr = PEER_PROBE
    out = {name: _slope(pr["R"], pr[name]) for name in ("ack_wait", "prefix", "begin")}
    steps = [search_steps(m, R) for m, R in zip(pr["messages"], pr["R"])]
    out["search_step"] = _slope(steps, [a - b for a, b in zip(pr["msgloop_search"], pr["msgloop"])])
    return out


PARAM_SOURCES = {
    "nvl_gbps": "asymptote through nvlink_lsa_probe's SM-store points 293 GB/s @ 4 MiB and 364 GB/s "
    "@ 128 MiB (DESIGN.md); predicts 345 GB/s @ 16 MiB (measured 348)",
    "nvl_one_way_us": "half the LSA flag round trip 2.5 us (nvlink_lsa_probe, DESIGN.md)",
    "rdma_gbps": "nominal 400 Gb/s per GPU (issue #6); not measurable on one node",
    "rdma_one_way_us": "half the 16.7 us GDAKI round trip of the GIN paper (arXiv 2511.15076, "
    "reference/deepep.md section 3); not measured here",
    "gpus_per_node": "HGX H100/H200/H800 board: 8 GPUs on NVSwitch",
    "launch": "launch probe on one H200 (docs/EP_MODEL.md): two empty kernels 4.19 us between events",
    "cost": "solved from three (dispatch) and four (combine) bench_ep rows (docs/PERFORMANCE.md, "
    "2 x H200, 2026-11-29)",
    "peer": "per-peer serial loops of the kernels at e1e386a, probe on one H200 (docs/EP_MODEL.md)",
}


# ---------------------------------------------------------------------------------------------
# Routing statistics (uniform top-k over E experts, experts split evenly over R ranks)
# ---------------------------------------------------------------------------------------------
def p_hit(R, E, k):
    """P(a token has at least one of its k experts on a given rank) = 1 - C(E-L, k) / C(E, k)."""
    L = E // R
    return 1.0 - math.comb(E - L, k) / math.comb(E, k)


def distinct_ranks(R, E, k):
    """Expected distinct destination ranks per token (own rank included): R * p_hit."""
    return R * p_hit(R, E, k)


def rdma_msgs_per_token(R, E, k, G):
    """Messages one token sends over RDMA (to other nodes), three ways: per (token, expert), per
    (token, rank) (our dedup), and per (token, node) (not built: one RDMA message per node, spread
    over NVLink there, as DeepEP's normal mode and PR #500 do) - the next step for R >= 16."""
    G = min(R, G)
    nodes, L = R // G, E // R
    per_node = 1.0 - math.comb(E - G * L, k) / math.comb(E, k)
    return {"per_expert": k * (R - G) / R, "per_rank": (R - G) * p_hit(R, E, k),
            "per_node": (nodes - 1) * per_node}


@functools.lru_cache(maxsize=None)
def expected_max_normal(n):
    """E[max of n iid N(0,1)] = integral of x d(Phi(x)^n), by midpoints on [-9, 9]. The slowest
    rank decides the op (every rank waits for its own inbox), so the wire term takes the expected
    largest per-rank load, not the mean."""
    if n <= 1:
        return 0.0
    nd, steps, lo, hi = NormalDist(), 6000, -9.0, 9.0
    h = (hi - lo) / steps
    acc, prev = 0.0, nd.cdf(lo) ** n
    for i in range(steps):
        cur = nd.cdf(lo + (i + 1) * h) ** n
        acc += (lo + (i + 0.5) * h) * (cur - prev)
        prev = cur
    return acc


def per_token_counts(R, shape, per_rank):
    """Mean and variance of the number of messages one source token sends to one given rank:
    Bernoulli(p_hit) when messages are per rank, hypergeometric (k draws, L of E) when they are
    per expert (k distinct experts, so no repeats)."""
    E, k, L = shape.experts, shape.topk, shape.experts // R
    if per_rank:
        p = p_hit(R, E, k)
        return p, p * (1 - p)
    q = L / E
    return k * q, k * q * (1 - q) * (E - k) / (E - 1)


def msg_bytes(shape, scheme, op, wire):
    """Bytes on the link per message. Dispatch FP8: header + H + H/128 fp32 scales; BF16: header +
    2H. Combine: a bf16 row (2H); its completion is a per-source flag, not a per-row header."""
    H = shape.hidden
    if op == "combine":
        return 2 * H
    if scheme.header == "deepep":
        header = 16
    else:  # ep_layout.h: int32 token, int32 n_entries, uint32 seq, uint32 pad, then k x 12-byte entries, padded to 16
        header = -(-(16 + 12 * shape.topk) // 16) * 16
    payload = H + H // shape.group * 4 if wire == "fp8" else 2 * H
    return -(-(header + payload) // 16) * 16 if scheme.header == "epmoe" else header + payload


def traffic(R, shape, scheme, fabric, op, wire="fp8"):
    """Messages and bytes per rank and per call, split by where they go: self (no link), NVLink
    peers (same node), RDMA peers (other nodes). 'max' is the expected busiest rank."""
    per_rank = scheme.dedup if op == "dispatch" else scheme.reduce_at_expert
    mu, var = per_token_counts(R, shape, per_rank)
    T, G = shape.tokens, min(R, fabric.gpus_per_node)
    z = expected_max_normal(R)
    mb = msg_bytes(shape, scheme, op, wire)
    out = {"msg_bytes": mb, "msgs_per_token": R * mu, "msgs": T * R * mu}
    for name, peers in (("self", 1), ("nvl", G - 1), ("rdma", R - G)):
        n_src = peers * T  # source tokens that can send to one rank over this fabric
        mean = n_src * mu
        out[name] = {
            "msgs": mean,
            "bytes": mean * mb,
            "bytes_max": (mean + z * math.sqrt(n_src * var)) * mb if peers else 0.0,
        }
    return out


# ---------------------------------------------------------------------------------------------
# Time
# ---------------------------------------------------------------------------------------------
def wire_us(tr, fabric):
    """NVLink stores (SMs) and RDMA puts (NIC) run at once, so the slower of the two counts."""
    nvl = tr["nvl"]["bytes_max"] / fabric.nvl_gbps / 1e3
    rdma = tr["rdma"]["bytes_max"] / fabric.rdma_gbps / 1e3 if tr["rdma"]["msgs"] else 0.0
    return max(nvl, rdma)


def signal_us(R, fabric):
    """One one-way flag latency after the last data: the slowest fabric used; none at R = 1."""
    if R <= 1:
        return 0.0
    return fabric.rdma_one_way_us if R > fabric.gpus_per_node else fabric.nvl_one_way_us


def peer_us(R, op, msgs_in):
    """The serial per-peer loops as coded at e1e386a (PEER_PROBE): dispatch send waits for R acks
    one after another; dispatch receive builds the source prefix and then begin[le, :] on the same
    thread; both walks (dispatch receive, combine send) search each message's source linearly.
    msgs_in: messages the walking kernel visits. Zero cost if that bookkeeping is made parallel."""
    sl = peer_slopes()
    walk = sl["search_step"] * search_steps(msgs_in, R)
    if op == "dispatch":
        return (sl["ack_wait"] + sl["prefix"] + sl["begin"]) * R + walk
    return sl["prefix"] * R + walk


def op_time(R, shape, scheme, fabric, cost, op, wire="fp8", serial_peers=True):
    """t = fixed + per_token * T + per_msg * M (+ per_walked * M_dispatch) + per-peer loops + wire
    + signal, all added (no overlap assumed). serial_peers=False: the same kernels with the
    per-peer loops parallel (a block-wide scan, one thread per ack), the design's cost."""
    tr = traffic(R, shape, scheme, fabric, op, wire)
    walked = traffic(R, shape, scheme, fabric, "dispatch", wire)["msgs"] if op == "combine" else tr["msgs"]
    parts = {
        "fixed": cost.fixed_us,
        "tokens": cost.per_token_us * shape.tokens,
        "msgs": cost.per_msg_us * tr["msgs"] + cost.per_walked_msg_us * (walked if op == "combine" else 0.0),
        "peers": peer_us(R, op, walked) if serial_peers else 0.0,
        "wire": wire_us(tr, fabric),
        "signal": signal_us(R, fabric),
    }
    return sum(parts.values()), parts, tr


# ---------------------------------------------------------------------------------------------
# Measurements here (docs/PERFORMANCE.md, bench/bench_ep.cu, 2 x H200 NV18, 2026-11-29)
# ---------------------------------------------------------------------------------------------
SCHEMES = {"dedup-expert": EPMOE, "per-expert-owner": PER_EXPERT, "dedup-owner": DEDUP_AT_OWNER}
BENCH_ROWS = [
    # R, scheme, wire, tokens, experts, dispatch us, combine us
    (2, "dedup-expert", "fp8", 128, 256, 47.2, 35.2),
    (2, "dedup-expert", "bf16", 128, 256, 49.3, 37.0),
    (2, "per-expert-owner", "fp8", 128, 256, 66.1, 65.1),
    (2, "dedup-owner", "fp8", 128, 256, 48.3, 52.1),
    (2, "dedup-expert", "fp8", 256, 256, 66.9, 58.7),
    (2, "dedup-expert", "bf16", 256, 256, 67.6, 59.0),
    (2, "dedup-expert", "fp8", 128, 384, 48.5, 35.8),
    (1, "dedup-expert", "fp8", 128, 256, 41.8, 28.1),
    (1, "dedup-expert", "bf16", 128, 256, 41.4, 29.1),
]
# Rows that fix the unknowns of each op; every other row is a held-out check. One row varies
# only tokens (R=2 at 256), one has no link (R=1), one varies only the message count:
#   dispatch: 3 unknowns; the per-(token, expert) row has 4x the messages of the dedup row.
#   combine: 4 unknowns; dedup-owner sends 4x the rows at the same walk, per-expert-owner walks 4x
#   the dispatch messages at the same rows (13 us slower than dedup-owner: the walk costs).
# The headline R=2 128-token dedup row is deliberately not among them.
FIT_ROWS = {
    "dispatch": [(1, "dedup-expert", "fp8", 128, 256), (2, "dedup-expert", "fp8", 256, 256),
                 (2, "per-expert-owner", "fp8", 128, 256)],
    "combine": [(1, "dedup-expert", "fp8", 128, 256), (2, "dedup-expert", "fp8", 256, 256),
                (2, "dedup-owner", "fp8", 128, 256), (2, "per-expert-owner", "fp8", 128, 256)],
}

# DeepEP V1 low-latency, measured on the same 2 x H200 (DESIGN.md): FP8 dispatch, BF16 combine.
DEEPEP_H200_R2 = {"dispatch": 28.6, "combine": 43.5}

# DeepEP published (reference/deepep.md section 4): H800 + one CX7 400 Gb/s per GPU, 128 tokens,
# H 7168, top-8, FP8 dispatch / BF16 combine; Jun 2025 = NVLink inside the node.
DEEPEP_PUBLISHED = {  # R: (dispatch us, combine us)
    8: (77, 114), 16: (118, 195), 32: (155, 273), 64: (173, 314), 128: (192, 369), 256: (194, 360),
}
# DeepEP PR #521 (reference/deepep.md section 3): H100, 8 x 400 Gb IB per node, pure RDMA (no
# NVLink even inside the node), NCCL GIN backend.
DEEPEP_GIN_PURE_RDMA = {8: (160.8, 302.8), 16: (178.6, 320.8), 32: (190.1, 333.2), 64: (218.9, 351.1)}
# DeepEP PR #173 (reference/deepep.md section 3), by its author: H20 with NVLink on. The H20 has
# the H100/H200's 900 GB/s NVLink; its NIC is not stated (assumed one 400 Gb/s per GPU).
DEEPEP_H20 = {8: (37, 59), 16: (119, 199), 32: (157, 280), 64: (176, 318)}
# H800 SXM NVLink: 400 GB/s bidirectional against 900 GB/s on H100/H200 (NVIDIA datasheets).
H800_NVL_SCALE = 400 / 900


def _solve(A, y):
    """Gaussian elimination with partial pivoting (n x n, n <= 4)."""
    n = len(y)
    M = [list(map(float, A[i])) + [float(y[i])] for i in range(n)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(M[r][c]))
        M[c], M[p] = M[p], M[c]
        for r in range(n):
            if r != c:
                f = M[r][c] / M[c][c]
                M[r] = [a - f * b for a, b in zip(M[r], M[c])]
    return [M[i][n] / M[i][i] for i in range(n)]


def _row(key):
    for r in BENCH_ROWS:
        if r[:5] == key:
            return r
    raise KeyError(key)


def fit_costs(fabric=Fabric()):
    """Per op: measured - wire - signal - per-peer loops = fixed + per_token * T + per_msg * M
    (+ per_walked * M_dispatch for combine); as many rows as unknowns, solved exactly (so anyone
    can redo it by hand)."""
    costs = {}
    for op, keys in FIT_ROWS.items():
        A, y = [], []
        for key in keys:
            R, sch, wire, T, E, d_us, c_us = _row(key)
            shape = Shape(tokens=T, experts=E)
            zero = Cost(0.0, 0.0, 0.0, 0.0)
            rest, parts, tr = op_time(R, shape, SCHEMES[sch], fabric, zero, op, wire)
            row = [1.0, T, tr["msgs"]]
            if op == "combine":
                row.append(traffic(R, shape, SCHEMES[sch], fabric, "dispatch", wire)["msgs"])
            A.append(row)
            y.append((d_us if op == "dispatch" else c_us) - rest)
        costs[op] = Cost(*_solve(A, y))
    return costs


def deepep_costs(fabric=Fabric(), shape=Shape()):
    """DeepEP's non-wire time from its own run here at R = 2. It sends one message per (token,
    expert) at every R, so its message count per rank does not change with R: one constant."""
    out = {}
    for op, meas in DEEPEP_H200_R2.items():
        tr = traffic(2, shape, DEEPEP, fabric, op, "fp8")
        out[op] = Cost(meas - wire_us(tr, fabric) - signal_us(2, fabric), 0.0, 0.0, 0.0)
    return out


# ---------------------------------------------------------------------------------------------
# Table, check, plot
# ---------------------------------------------------------------------------------------------
def predict(ranks=RANKS, shape=Shape(), fabric=Fabric(), wire="fp8", costs=None):
    """Per R: routing statistics, and per scheme and op the bytes per rank and the time, as coded
    ("us") and with the per-peer loops parallel ("us_parallel")."""
    costs = costs or fit_costs()
    rows = []
    for R in ranks:
        row = {"R": R, "nodes": -(-R // fabric.gpus_per_node), "local_experts": shape.experts // R,
               "distinct_ranks": distinct_ranks(R, shape.experts, shape.topk)}
        row["dedup_ratio"] = row["distinct_ranks"] / shape.topk
        row["rdma_msgs_per_token"] = rdma_msgs_per_token(R, shape.experts, shape.topk, fabric.gpus_per_node)
        for scheme, tag in ((EPMOE, "dedup"), (PER_EXPERT, "per_expert")):
            for op in ("dispatch", "combine"):
                t, parts, tr = op_time(R, shape, scheme, fabric, costs[op], op, wire)
                row[f"{op}_{tag}"] = {
                    "us": t,
                    "us_parallel": t - parts["peers"],
                    "parts_us": parts,
                    "msgs_per_rank": tr["msgs"],
                    "msg_bytes": tr["msg_bytes"],
                    "nvl_bytes_per_rank": tr["nvl"]["bytes"],
                    "rdma_bytes_per_rank": tr["rdma"]["bytes"],
                    "link_bytes_per_rank": tr["nvl"]["bytes"] + tr["rdma"]["bytes"],
                    "busiest_rank_link_bytes": tr["nvl"]["bytes_max"] + tr["rdma"]["bytes_max"],
                }
        rows.append(row)
    return rows


def check(fabric=Fabric()):
    """Every bench row (fit rows marked) and DeepEP's published tables against the model."""
    costs = fit_costs(fabric)
    fit_keys = {(op, k) for op, ks in FIT_ROWS.items() for k in ks}
    ours = []
    for R, sch, wire, T, E, d_us, c_us in BENCH_ROWS:
        shape = Shape(tokens=T, experts=E)
        for op, meas in (("dispatch", d_us), ("combine", c_us)):
            pred = op_time(R, shape, SCHEMES[sch], fabric, costs[op], op, wire)[0]
            ours.append({"R": R, "scheme": sch, "wire": wire, "tokens": T, "experts": E, "op": op,
                         "measured_us": meas, "predicted_us": pred, "ratio": meas / pred,
                         "fit": (op, (R, sch, wire, T, E)) in fit_keys})
    dcost = deepep_costs(fabric)
    h800 = replace(fabric, nvl_gbps=fabric.nvl_gbps * H800_NVL_SCALE)
    pure_rdma = replace(fabric, gpus_per_node=1)
    deepep = []
    for table, fab, data in (("published H800+CX7 (Jun 2025)", h800, DEEPEP_PUBLISHED),
                             ("PR #173 H20, NVLink on", fabric, DEEPEP_H20),
                             ("PR #521 H100 pure RDMA, GIN", pure_rdma, DEEPEP_GIN_PURE_RDMA)):
        for R, (d_us, c_us) in data.items():
            for op, meas in (("dispatch", d_us), ("combine", c_us)):
                # DeepEP's bookkeeping is parallel (a warp group per expert): no per-peer loops
                pred = op_time(R, Shape(), DEEPEP, fab, dcost[op], op, "fp8", serial_peers=False)[0]
                deepep.append({"table": table, "R": R, "op": op, "measured_us": meas,
                               "predicted_us": pred, "ratio": meas / pred})
    return {"costs": {k: asdict(v) for k, v in costs.items()},
            "deepep_costs": {k: asdict(v) for k, v in dcost.items()}, "ours": ours, "deepep": deepep}


def summarize(entries):
    r = [e["ratio"] for e in entries]
    geo = math.exp(sum(math.log(x) for x in r) / len(r))
    worst = max(r, key=lambda x: abs(math.log(x)))
    return geo, worst


def print_table(rows, shape, wire):
    MB = 1e6
    print(f"EP model: T={shape.tokens} tokens/rank, H={shape.hidden}, top-{shape.topk}, E={shape.experts}, "
          f"{wire.upper()} dispatch / BF16 combine; NVLink <= 8 GPUs/node, 400 Gb/s RDMA between nodes")
    print("dedup = one message per (token, destination rank) and reduce at the expert's rank; per-exp = one per "
          "(token, expert), reduce at the owner\n")
    print("bytes per rank per call, sent over links (own rank excluded; received is the same on average), MB")
    hdr = (f"{'R':>4} {'nodes':>5} {'ranks/tok':>9} {'D/k':>5} | {'dispatch dedup':>14} {'per-exp':>8} "
           f"{'of it RDMA':>11} | {'combine dedup':>13} {'per-exp':>8} {'of it RDMA':>11}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        dd, dp, cd, cp = r["dispatch_dedup"], r["dispatch_per_expert"], r["combine_dedup"], r["combine_per_expert"]
        drd = f"{dd['rdma_bytes_per_rank'] / MB:.2f}/{dp['rdma_bytes_per_rank'] / MB:.2f}"
        crd = f"{cd['rdma_bytes_per_rank'] / MB:.2f}/{cp['rdma_bytes_per_rank'] / MB:.2f}"
        print(f"{r['R']:>4} {r['nodes']:>5} {r['distinct_ranks']:>9.3f} {r['dedup_ratio']:>5.3f} | "
              f"{dd['link_bytes_per_rank'] / MB:>14.2f} {dp['link_bytes_per_rank'] / MB:>8.2f} {drd:>11} | "
              f"{cd['link_bytes_per_rank'] / MB:>13.2f} {cp['link_bytes_per_rank'] / MB:>8.2f} {crd:>11}")
    print("\ntime per call, us: as coded at e1e386a / with the per-peer loops parallel")
    hdr = (f"{'R':>4} | {'dispatch dedup':>15} {'per-exp':>15} | {'combine dedup':>15} {'per-exp':>15} | "
           f"{'dedup wire+signal (disp / comb)':>31}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        cells = [f"{r[k]['us']:6.1f} / {r[k]['us_parallel']:6.1f}" for k in
                 ("dispatch_dedup", "dispatch_per_expert", "combine_dedup", "combine_per_expert")]
        ws = [r[k]["parts_us"]["wire"] + r[k]["parts_us"]["signal"] for k in ("dispatch_dedup", "combine_dedup")]
        print(f"{r['R']:>4} | {cells[0]:>15} {cells[1]:>15} | {cells[2]:>15} {cells[3]:>15} | "
              f"{ws[0]:>14.1f} / {ws[1]:<14.1f}")


def print_check(res):
    c = res["costs"]
    print("fitted non-wire cost per op (fixed + per token x T + per message x M + per walked dispatch message):")
    for op, v in c.items():
        print(f"  {op:8s} fixed {v['fixed_us']:6.2f} us  per token {v['per_token_us']:.4f}  per msg "
              f"{v['per_msg_us']:.4f}  per walked msg {v['per_walked_msg_us']:.4f}")
    sl = peer_slopes()
    print(f"  per-peer loops (probe): ack wait {sl['ack_wait']:.3f} us/peer, prefix {sl['prefix']:.3f}, "
          f"begin {sl['begin']:.3f}, linear search {sl['search_step'] * 1e3:.1f} ns/step")
    for op, v in res["deepep_costs"].items():
        print(f"  DeepEP {op:8s} non-wire {v['fixed_us']:6.2f} us (its R=2 run here minus modelled wire and flag)")
    print("\nour bench rows (2 x H200, docs/PERFORMANCE.md); * = used to fit, others held out")
    print(f"{'R':>2} {'scheme':18s} {'wire':4s} {'tok':>4} {'E':>4} {'op':8s} {'meas us':>8} {'pred us':>8} {'meas/pred':>9}")
    for e in res["ours"]:
        print(f"{e['R']:>2} {e['scheme']:18s} {e['wire']:4s} {e['tokens']:>4} {e['experts']:>4} {e['op']:8s} "
              f"{e['measured_us']:>8.1f} {e['predicted_us']:>8.1f} {e['ratio']:>9.3f}{' *' if e['fit'] else ''}")
    held = [e for e in res["ours"] if not e["fit"]]
    geo, worst = summarize(held)
    print(f"held-out rows: geometric mean meas/pred {geo:.3f}, worst {worst:.3f}")
    print("\nDeepEP (model: per-expert messages, 16 B header, reduce at owner, its non-wire time from "
          "its R=2 run here)")
    tables = list(dict.fromkeys(e["table"] for e in res["deepep"]))  # in the order checked
    for t in tables:
        ent = [e for e in res["deepep"] if e["table"] == t]
        print(f"  {t}")
        print(f"  {'R':>4} {'disp meas':>9} {'pred':>7} {'ratio':>6} | {'comb meas':>9} {'pred':>7} {'ratio':>6}")
        for R in sorted({e["R"] for e in ent}):
            d = next(e for e in ent if e["R"] == R and e["op"] == "dispatch")
            m = next(e for e in ent if e["R"] == R and e["op"] == "combine")
            print(f"  {R:>4} {d['measured_us']:>9.1f} {d['predicted_us']:>7.1f} {d['ratio']:>6.2f} | "
                  f"{m['measured_us']:>9.1f} {m['predicted_us']:>7.1f} {m['ratio']:>6.2f}")
        geo, worst = summarize(ent)
        print(f"  geometric mean meas/pred {geo:.3f}, worst {worst:.3f}")


def plot(path, rows, res, shape):
    try:
        import matplotlib
    except ImportError:
        print("--plot needs matplotlib, which is not importable here (pip install matplotlib); "
              "the table, --json and --check need only the standard library", file=sys.stderr)
        return 2
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text: a small SVG
    matplotlib.rcParams["svg.hashsalt"] = "ep_model"  # fixed element ids: regenerating gives the same file
    R = [r["R"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.8))
    for ax, op in zip(axes[:2], ("dispatch", "combine")):
        ax.plot(R, [r[f"{op}_dedup"]["us_parallel"] for r in rows], "o-", color="tab:blue",
                label="model: per-rank dedup")
        ax.plot(R, [r[f"{op}_per_expert"]["us_parallel"] for r in rows], "s--", color="tab:orange",
                label="model: per-(token, expert)")
        ax.plot(R, [r[f"{op}_dedup"]["us"] for r in rows], "o:", color="tab:blue", alpha=0.5, ms=3,
                label="model: dedup, per-peer loops as coded")
        dp = [e for e in res["deepep"] if e["op"] == op and e["table"].startswith("published")]
        ax.plot([e["R"] for e in dp], [e["predicted_us"] for e in dp], ":", color="gray",
                label="model: DeepEP on H800 + CX7")
        ax.plot([e["R"] for e in dp], [e["measured_us"] for e in dp], "x", color="k", ms=8,
                label="DeepEP published (H800 + CX7)")
        ours = [e for e in res["ours"] if e["op"] == op and e["tokens"] == 128 and e["experts"] == 256
                and e["wire"] == "fp8" and e["R"] == 2 and e["scheme"] in ("dedup-expert", "per-expert-owner")]
        ax.plot([e["R"] for e in ours], [e["measured_us"] for e in ours], "D", color="tab:red", ms=6,
                label="measured here, 2 x H200")
        ax.axvspan(1.5, 8.5, color="tab:green", alpha=0.06)
        ax.text(2.1, 0.97, "NVLink", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
        ax.text(11, 0.97, "RDMA between nodes", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(R, [str(x) for x in R])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("EP ranks R")
        ax.set_ylabel("µs")
        ax.set_title(f"{op} ({'FP8' if op == 'dispatch' else 'BF16'}), {shape.tokens} tok/rank")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    ax = axes[2]
    for op, c in (("dispatch", "tab:purple"), ("combine", "tab:green")):
        ax.plot(R, [r[f"{op}_dedup"]["link_bytes_per_rank"] / 1e6 for r in rows], "o-", color=c,
                label=f"{op}, dedup")
        ax.plot(R, [r[f"{op}_per_expert"]["link_bytes_per_rank"] / 1e6 for r in rows], "s--", color=c,
                label=f"{op}, per-(token, expert)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(R, [str(x) for x in R])
    ax.set_xlabel("EP ranks R")
    ax.set_ylabel("MB sent over links per rank per call")
    ax.set_title("bytes per rank (NVLink + RDMA)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout(rect=(0, 0.12, 1, 1))  # room for the shared legend
    fig.savefig(path, metadata={"Date": None})  # no timestamp: regenerating gives the same file
    print(f"wrote {path}")
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--check", action="store_true", help="compare with our bench rows and DeepEP's tables")
    ap.add_argument("--plot", metavar="FILE.svg", help="write the predicted curves (needs matplotlib)")
    ap.add_argument("--tokens", type=int, default=Shape.tokens)
    ap.add_argument("--experts", type=int, default=Shape.experts)
    ap.add_argument("--topk", type=int, default=Shape.topk)
    ap.add_argument("--hidden", type=int, default=Shape.hidden)
    ap.add_argument("--wire", choices=("fp8", "bf16"), default="fp8", help="dispatch wire format")
    ap.add_argument("--gpus-per-node", type=int, default=Fabric.gpus_per_node)
    ap.add_argument("--rdma-gbps", type=float, default=Fabric.rdma_gbps)
    args = ap.parse_args(argv)

    shape = Shape(tokens=args.tokens, hidden=args.hidden, topk=args.topk, experts=args.experts)
    fabric = Fabric(gpus_per_node=args.gpus_per_node, rdma_gbps=args.rdma_gbps)
    ranks = [R for R in RANKS if shape.experts % R == 0]
    costs = fit_costs()  # always from the bench rows and the default (measured) fabric
    rows = predict(ranks, shape, fabric, args.wire, costs)
    res = check() if (args.check or args.plot) else None

    if args.json:
        out = {"shape": asdict(shape), "wire": args.wire, "fabric": asdict(fabric),
               "costs": {k: asdict(v) for k, v in costs.items()}, "launch_probe": LAUNCH_PROBE,
               "nvl_probe": NVL_PROBE, "sources": PARAM_SOURCES, "rows": rows}
        if args.check:
            out["check"] = res
        json.dump(out, sys.stdout, indent=1)
        print()
    else:
        print_table(rows, shape, args.wire)
        if args.check:
            print()
            print_check(res)
    if args.plot:
        return plot(args.plot, rows, res, shape)
    return 0


if __name__ == "__main__":
    sys.exit(main())
