/*
** ep_combine.cu — combine on the GPU: the send kernel returns expert outputs to the tokens'
** ranks (REDUCE_AT_EXPERT: one weighted partial sum per (token, rank); REDUCE_AT_OWNER: every
** row), the receive kernel sums them in a fixed order. Spec: ep_cpu.c's combine; fp32 math in
** the same operation order (multiply, then add, each rounded), bf16 out. Under the padded
** all-to-all the send kernel fills slabs that NCCL then moves (ep_device.cuh, out_comb_row).
*/
#include "ep_device.cuh"

namespace epk {
namespace {

__device__ __forceinline__ void acc8_add(float (&acc)[8], uint4 v, float w) {
    const uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        acc[2 * i] = __fadd_rn(acc[2 * i], __fmul_rn(w, bf16_lo(u[i])));
        acc[2 * i + 1] = __fadd_rn(acc[2 * i + 1], __fmul_rn(w, bf16_hi(u[i])));
    }
}

__device__ __forceinline__ void acc8_add_plain(float (&acc)[8], uint4 v) {
    const uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        acc[2 * i] = __fadd_rn(acc[2 * i], bf16_lo(u[i]));
        acc[2 * i + 1] = __fadd_rn(acc[2 * i + 1], bf16_hi(u[i]));
    }
}

__device__ __forceinline__ uint4 pack8(const float (&acc)[8]) {
    return make_uint4(bf16x2_from_float(acc[0], acc[1]), bf16x2_from_float(acc[2], acc[3]),
                      bf16x2_from_float(acc[4], acc[5]), bf16x2_from_float(acc[6], acc[7]));
}

/* o[c] = bf16(sum over q < n, in order, of w(q) * row(q)[c]) (kWeighted; else plain sums), for
** the block's 16-byte chunks c < chunks: kBatch chunks a thread and two rows' loads in flight
** before their first use, so n rows take ceil(n / 2) round trips. (A loop over chunks with every
** row's load of one chunk in flight waited a round trip per kThreads chunks: 4 at H = 7168, the
** most of a token's time; bench_ep trace, 2026-11-30.) Each output element sees the same fp32
** operations in the same order as one chunk at a time: the bits are the same. */
template <bool kWeighted, class Row, class Weight>
__device__ __forceinline__ void sum_rows(uint4 *o, int chunks, int n, Row row, Weight w) {
    for (int c0 = threadIdx.x; c0 < chunks; c0 += kThreads * kBatch) {
        float acc[kBatch][8];
#pragma unroll
        for (int b = 0; b < kBatch; b++)
#pragma unroll
            for (int i = 0; i < 8; i++) acc[b][i] = 0.0f;
        for (int q = 0; q < n; q += 2) {
            const bool two = q + 1 < n;
            const uint4 *r0 = row(q), *r1 = two ? row(q + 1) : r0;
            uint4 v0[kBatch], v1[kBatch];
#pragma unroll
            for (int b = 0; b < kBatch; b++)
                if (c0 + b * kThreads < chunks) {
                    v0[b] = r0[c0 + b * kThreads];
                    if (two) v1[b] = r1[c0 + b * kThreads];
                }
            const float w0 = kWeighted ? w(q) : 1.0f, w1 = kWeighted && two ? w(q + 1) : 1.0f;
#pragma unroll
            for (int b = 0; b < kBatch; b++)
                if (c0 + b * kThreads < chunks) {
                    if (kWeighted) acc8_add(acc[b], v0[b], w0);
                    else acc8_add_plain(acc[b], v0[b]);
                    if (two) {
                        if (kWeighted) acc8_add(acc[b], v1[b], w1);
                        else acc8_add_plain(acc[b], v1[b]);
                    }
                }
        }
#pragma unroll
        for (int b = 0; b < kBatch; b++)
            if (c0 + b * kThreads < chunks) o[c0 + b * kThreads] = pack8(acc[b]);
    }
}

template <int kGin, int kMaxK, bool kAtExpert>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) combine_send_kernel(Params p, const uint16_t *__restrict__ y, uint32_t rel) {
    const ep_dims &d = p.d;
    /* the dispatch being combined: LSA, `rel` calls before the latest received one (device count) */
    const uint32_t seq = call_seq(p, &p.seqs[1], 0u - rel);
    const int par = seq & 1, R = d.R, H = d.H, me = d.rank;
    const int64_t M = (int64_t)R * d.N;
    const CallState &st = p.st[par];
    __shared__ int pre[kMaxGpuRanks + 1], cnt[kMaxGpuRanks];
    __shared__ __align__(16) uint8_t hdr[256];
    EP_TRACE(trace_point(p, 2, 0));
    EP_TRACE(trace_max(p, 2, kTraceMaxStart));
    if (!p.a2a) let_dependents_launch(); /* the receive kernel may launch now (see ep_device.cuh) */
    /* messages to blocks in two rounds (ep_device.cuh): the first-round header loads while the
    ** counts do */
    const int src0 = (int)blockIdx.x % R, i0 = (int)blockIdx.x / R;
    auto kept = [&](int src, int i) { return st.hdrs + ((int64_t)src * d.slots + i) * d.header_bytes; };
    if (i0 < d.slots) {
        for (int c = threadIdx.x; c < d.header_bytes / 16; c += kThreads) cp_async16(hdr + 16 * c, kept(src0, i0) + 16 * c, 16);
        cp_async_commit();
    }
    for (int r = threadIdx.x; r < R; r += kThreads) {
        const int c = p.active[r] ? st.n_msgs[r] : 0;
        cnt[r] = c, pre[r + 1] = c - first_round(c, r, R);
    }
    __syncthreads();
    scan_ranks(pre, R);
    cp_async_wait<0>();
    __syncthreads();
    EP_TRACE(trace_point(p, 2, 1));
    const uint4 *yv = reinterpret_cast<const uint4 *>(y);
    for (int m = i0 < cnt[src0] ? -1 : (int)blockIdx.x; m < pre[R]; m = next_round_msg(m)) {
        int src = src0, i = i0;
        if (m >= 0) {
            later_round_msg(pre, cnt, R, m, &src, &i);
            for (int c = threadIdx.x; c < d.header_bytes / 16; c += kThreads)
                reinterpret_cast<uint4 *>(hdr)[c] = reinterpret_cast<const uint4 *>(kept(src, i))[c];
            __syncthreads();
        }
        const ep_header h = *reinterpret_cast<const ep_header *>(hdr);
        const ep_entry *ent = reinterpret_cast<const ep_entry *>(hdr + sizeof(ep_header));
        const int ne = h.n_entries;
        if (ne == 0) { /* a slot the dispatch left empty (ep_layout.h) */
            __syncthreads(); /* hdr is reused */
            continue;
        }
        int64_t src_row[kMaxK]; /* first 16-byte chunk of each entry's expert output row */
#pragma unroll
        for (int n = 0; n < kMaxK; n++)
            src_row[n] = n < ne ? ((int64_t)ent[n].le * M + ent[n].row) * (H / 8) : 0; /* (rows made absolute at receive) */
        if (kAtExpert) {
            /* top-k order; a repeated expert counts twice */
            sum_rows<true>(reinterpret_cast<uint4 *>(out_comb_row<kGin>(p, par, src, h.token)), H / 8, ne,
                           [&](int n) { return yv + ((int64_t)ent[n].le * M + ent[n].row) * (H / 8); }, [&](int n) { return ent[n].w; });
        } else {
            /* the token's k rows at its owner, one per top-k slot, are consecutive in both layouts */
            uint4 *o = reinterpret_cast<uint4 *>(out_comb_row<kGin>(p, par, src, (int64_t)h.token * d.k));
            for (int c = threadIdx.x; c < H / 8; c += kThreads) {
                uint4 v[kMaxK];
#pragma unroll
                for (int n = 0; n < kMaxK; n++)
                    if (n < ne) v[n] = __ldg(yv + src_row[n] + c);
#pragma unroll
                for (int n = 0; n < kMaxK; n++)
                    if (n < ne) o[(int64_t)ent[n].j * (H / 8) + c] = v[n];
            }
        }
        if (via_outbox<kGin>(p, src)) { /* put the rows where LSA would have stored them */
            __syncthreads();
            const int rows = kAtExpert ? 1 : ne;
            for (int n = 0; n < rows; n++) {
                const int64_t row = kAtExpert ? (int64_t)h.token : (int64_t)h.token * d.k + ent[n].j;
                const int64_t at = kAtExpert ? (int64_t)me * d.N + row : row; /* in src's window */
                if (kGin == 2) { /* a thread per row posts it */
                    if ((int)threadIdx.x == n)
                        gin_put(p, src, ep_comb_row(my_base(p), &d, &p.w, par, at), out_comb_row<kGin>(p, par, src, row), (size_t)H * 2);
                } else {
                    put_block(peer_comb_row(p, par, src, row), out_comb_row<kGin>(p, par, src, row), (int64_t)H * 2);
                }
            }
        }
        __syncthreads(); /* hdr is reused */
        EP_TRACE(if (m == -1) trace_point(p, 2, 2));
    }
    EP_TRACE(trace_max(p, 2, kTraceMaxWorkEnd));
    if (!p.a2a && last_block_done<true, kGin == 2>(&p.counters[2])) { /* a2a: the exchange follows on the stream */
        EP_TRACE(if (threadIdx.x == 0) trace_set(p, 2, kTraceLastTicket));
        for (int r = threadIdx.x; r < R; r += kThreads)
            if (p.active[r])
                publish<kGin>(p, r, kGin == 2 ? nullptr : ep_comb_flag(peer_base(p, r), &p.w, par, me), sig_comb(p, par, me), seq);
        EP_TRACE(if (threadIdx.x == 0) trace_set(p, 2, kTraceLastExit));
    }
}

template <int kGin, int kMaxK, bool kAtExpert>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) combine_recv_kernel(Params p, const float *__restrict__ weights,
                                                                uint16_t *__restrict__ out, int T, uint32_t rel) {
    const ep_dims &d = p.d;
    receive_entry(p); /* launched under the send: the prior grid's writes first, unless joined (ep_device.cuh) */
    const uint32_t seq = call_seq(p, &p.seqs[1], 0u - rel);
    const int par = seq & 1, R = d.R, H = d.H, k = d.k, L = d.L;
    __shared__ int bail;
    __shared__ int16_t tk[EPMOE_MAX_TOPK]; /* the current token's ids as sent, and (REDUCE_AT_OWNER) weights */
    __shared__ float wk[EPMOE_MAX_TOPK];
    EP_TRACE(trace_point(p, 3, 0));
    EP_TRACE(trace_max(p, 3, kTraceMaxStart));
    if (threadIdx.x == 0) bail = 0;
    const int16_t *topk = p.st[par].topk;
    /* the block's first token: its ids (and weights) load while the flags are awaited */
    auto load_token = [&](int t) {
        if ((int)threadIdx.x < k) {
            tk[threadIdx.x] = topk[(int64_t)t * k + threadIdx.x];
            if (!kAtExpert) wk[threadIdx.x] = __ldg(weights + (int64_t)t * k + threadIdx.x);
        }
    };
    __shared__ const uint4 *parts[EPMOE_MAX_TOPK]; /* the rows to sum, in the fixed order */
    __shared__ float wts[EPMOE_MAX_TOPK];
    __shared__ int nparts;
    /* thread 0: the current token's rows to sum (they depend on its ids and the layout only) */
    auto plan_token = [&](int t) {
        const int16_t *tok = tk;
        int np = 0;
        if (kAtExpert) {
            for (int j = 0; j < k; j++) { /* ranks in ascending order, one partial per rank hit */
                if (tok[j] < 0) continue;
                const uint4 *row = reinterpret_cast<const uint4 *>(in_comb_row(p, par, tok[j] / L, t));
                bool seen = false;
                for (int q = 0; q < np; q++) seen |= parts[q] == row;
                if (seen) continue;
                /* insertion by address keeps rank order: both layouts store ranks in ascending order */
                int at = np++;
                while (at > 0 && parts[at - 1] > row) parts[at] = parts[at - 1], at--;
                parts[at] = row;
                wts[at] = 1.0f;
            }
        } else {
            for (int j = 0; j < k; j++)
                if (tok[j] >= 0) {
                    parts[np] = reinterpret_cast<const uint4 *>(in_comb_row(p, par, tok[j] / L, (int64_t)t * k + j));
                    wts[np++] = wk[j];
                }
        }
        nparts = np;
    };
    auto sum_token = [&](int t) {
        uint4 *o = reinterpret_cast<uint4 *>(out + (int64_t)t * H);
        auto part = [&](int q) { return parts[q]; };
        auto weight = [&](int q) { return wts[q]; };
        if (kAtExpert) sum_rows<false>(o, H / 8, nparts, part, weight);
        else sum_rows<true>(o, H / 8, nparts, part, weight);
    };
    if ((int)blockIdx.x < T) {
        load_token((int)blockIdx.x);
        __syncthreads();
        if (threadIdx.x == 0) plan_token((int)blockIdx.x);
    }
    __syncthreads();
    /* The first token's sum, once before the flags, on whatever the rows hold (a data race on
    ** reads only; the values are overwritten below by the same threads at the same addresses):
    ** the code, the rows' address translations and the output's lines are then warm when the
    ** flags land. Without it the first sum took 4.5 us after the flags (bench_ep trace). */
    if (!p.a2a && (int)blockIdx.x < T) sum_token((int)blockIdx.x);
    EP_TRACE(trace_point(p, 3, 3));
    /* put/signal flags count combines, and a dispatch need not be combined: count the combines
    ** received on this parity on the device (the last block moves it on below) */
    const uint64_t combined = kGin ? *reinterpret_cast<const volatile unsigned *>(&p.seqs[2 + par]) : 0;
    if (!p.a2a)
        for (int r = threadIdx.x; r < R; r += kThreads)
            if (p.active[r] &&
                !await<kGin>(p, ep_comb_flag(my_base(p), &p.w, par, r), sig_comb(p, par, r), seq, combined + 1, r, 4))
                bail = 1;
    __syncthreads();
    EP_TRACE(trace_point(p, 3, 1));
    if (bail) return;
    for (int t = blockIdx.x; t < T; t += gridDim.x) {
        if (t != (int)blockIdx.x) { /* (the first token's plan is made) */
            load_token(t);
            __syncthreads();
            if (threadIdx.x == 0) plan_token(t);
            __syncthreads();
        }
        sum_token(t);
        __syncthreads(); /* parts[] is rewritten for the next token */
        EP_TRACE(if (t == (int)blockIdx.x) trace_point(p, 3, 2));
    }
    EP_TRACE(trace_max(p, 3, kTraceMaxWorkEnd));
    if (kGin && last_block_done<kGin == 2, kGin == 2>(&p.counters[3]) && threadIdx.x == 0) p.seqs[2 + par] = (unsigned)combined + 1u;
}

} // namespace

/* One instantiation per transport (kGin = Params::gin), per width of a token's register arrays
** (kMaxK) and per reduce mode (kAtExpert), chosen here. kMaxK sizes those arrays for top-k <= 8
** (DeepSeek-R1, Kimi-K2) or for EPMOE_MAX_TOPK: at 128 registers (two blocks per SM) the 16-wide
** arrays spill (send 196 B, receive 88 B, before the reduce mode was a template); the 8-wide ones
** do not. The reduce mode as a template, as dispatch's message mode: each kernel then carries only
** its own path (8-wide, device API: send 126 -> 96 registers reducing at expert and 83 at owner,
** receive 108 -> 93 and 104; ptxas, 2026-11-30). */
template <int kGin, bool kAtExpert> auto combine_send_for(int k) {
    return k <= 8 ? combine_send_kernel<kGin, 8, kAtExpert> : combine_send_kernel<kGin, EPMOE_MAX_TOPK, kAtExpert>;
}
template <int kGin, bool kAtExpert> auto combine_recv_for(int k) {
    return k <= 8 ? combine_recv_kernel<kGin, 8, kAtExpert> : combine_recv_kernel<kGin, EPMOE_MAX_TOPK, kAtExpert>;
}
template <bool kAtExpert> auto combine_send_of(int gin, int k) {
    return gin == 2 ? combine_send_for<2, kAtExpert>(k) : gin == 1 ? combine_send_for<1, kAtExpert>(k) : combine_send_for<0, kAtExpert>(k);
}
template <bool kAtExpert> auto combine_recv_of(int gin, int k) {
    return gin == 2 ? combine_recv_for<2, kAtExpert>(k) : gin == 1 ? combine_recv_for<1, kAtExpert>(k) : combine_recv_for<0, kAtExpert>(k);
}

epmoe_status launch_combine_send(const Params &p, const epmoe_combine_args &a, uint32_t rel, int sms, cudaStream_t s) {
    const int k = p.d.k;
    auto kernel = p.d.reduce_at_expert ? combine_send_of<true>(p.gin, k) : combine_send_of<false>(p.gin, k);
    kernel<<<kBlocksPerSm * sms, kThreads, 0, s>>>(p, a.expert_out, rel);
    return epmoe__launched("epmoe_combine (send)");
}

epmoe_status launch_combine_recv(const Params &p, const epmoe_combine_args &a, uint32_t rel, int T, int sms,
                                 cudaStream_t s) {
    const int k = p.d.k;
    auto kernel = p.d.reduce_at_expert ? combine_recv_of<true>(p.gin, k) : combine_recv_of<false>(p.gin, k);
    return launch_dependent("epmoe_combine (receive)", kernel, grid_for(T, sms), kThreads, 0, s, !p.a2a, p, a.topk_weights,
                            a.out, T, rel);
}

} // namespace epk
