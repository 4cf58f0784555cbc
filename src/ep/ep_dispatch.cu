/*
** ep_dispatch.cu — dispatch on the GPU: the send kernel (plan, cast once, store each message
** into the destination rank's window, publish counts and flags) and the receive kernel (wait,
** prefix sums, fan each message out into the masked layout, acknowledge). Spec: the CPU
** backend (ep_cpu.c) and the reference (ep_ref.c); same message format and row order.
*/
#include "ep_device.cuh"

namespace epk {
namespace {

/* ---- the plan: row and message slot of every (token, slot), computed in shared memory ----
** Rows of an expert come in (token, slot) order and message slots of a destination in token
** order, so each is a stable counting rank: warps take contiguous ranges of entries, rank them
** within the range with __match_any_sync, and add the counts of the earlier warps. Every block
** computes the same plan, so no block waits for another. */
struct Plan {
    int16_t *idx, *row, *slot, *dst; /* [T*k] */
    uint8_t *first, *opener;         /* [T*k]: the slot naming the same expert first; the slot opening the message */
    int *count;                      /* [E + R]: rows per expert, then messages per destination */
    int *warp_count;                 /* [W, E + R] scratch */
};

/* The plan's arrays in the kernel's shared memory (sized by send_plan_smem). */
__device__ __forceinline__ Plan plan_in(uint8_t *smem, const ep_dims &d) {
    Plan pl;
    pl.count = reinterpret_cast<int *>(smem);
    pl.warp_count = pl.count + d.E + d.R;
    pl.idx = reinterpret_cast<int16_t *>(pl.warp_count + (kSendThreads / 32) * (d.E + d.R));
    pl.row = pl.idx + d.N * d.k;
    pl.slot = pl.row + d.N * d.k;
    pl.dst = pl.slot + d.N * d.k;
    pl.first = reinterpret_cast<uint8_t *>(pl.dst + d.N * d.k);
    pl.opener = pl.first + d.N * d.k;
    return pl;
}

__device__ void make_plan(const Params &p, const void *topk, int bits, int T, Plan pl) {
    const ep_dims &d = p.d;
    const int k = d.k, n = T * k, keys = d.E + d.R, W = kSendThreads / 32;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int i = threadIdx.x; i < n; i += kSendThreads) {
        int64_t e = bits == 64 ? static_cast<const int64_t *>(topk)[i] : static_cast<const int32_t *>(topk)[i];
        if (e < -1 || e >= d.E) {
            set_error(p, kErrBadExpert, (int)(i / k), 0);
            e = -1;
        }
        pl.idx[i] = (int16_t)(e >= 0 && p.active[e / d.L] ? e : -1);
    }
    for (int i = threadIdx.x; i < W * keys; i += kSendThreads) pl.warp_count[i] = 0;
    __syncthreads();
    for (int t = threadIdx.x; t < T; t += kSendThreads) { /* per token, once: destinations, repeats, openers */
        const int16_t *tok = pl.idx + t * k;
        for (int j = 0; j < k; j++) {
            const int i = t * k + j;
            pl.dst[i] = (int16_t)(tok[j] >= 0 ? tok[j] / d.L : -1);
            int f = j, o = j;
            for (int jj = j - 1; jj >= 0; jj--) {
                if (tok[jj] == tok[j]) f = jj;
                if (tok[jj] >= 0 && (d.dedup ? pl.dst[t * k + jj] == pl.dst[i] : tok[jj] == tok[j])) o = jj;
            }
            pl.first[i] = (uint8_t)f, pl.opener[i] = (uint8_t)o;
        }
    }
    __syncthreads();
    const int span = ((n + W - 1) / W + 31) / 32 * 32;
    int *mine = pl.warp_count + warp * keys;
    for (int base = warp * span; base < min(n, (warp + 1) * span); base += 32) {
        const int i = base + lane;
        int ka = -1, kb = -1;
        if (i < n && pl.idx[i] >= 0) {
            const int j = i % k;
            if (pl.first[i] == j) ka = pl.idx[i];
            if (pl.opener[i] == j) kb = d.E + pl.dst[i];
        }
        const unsigned lt = (1u << lane) - 1u;
        const unsigned ma = __match_any_sync(0xFFFFFFFFu, ka), mb = __match_any_sync(0xFFFFFFFFu, kb);
        const int base_a = ka >= 0 ? mine[ka] : 0, base_b = kb >= 0 ? mine[kb] : 0;
        if (ka >= 0) pl.row[i] = (int16_t)(base_a + __popc(ma & lt));
        if (kb >= 0) pl.slot[i] = (int16_t)(base_b + __popc(mb & lt));
        __syncwarp();
        if (ka >= 0 && !(ma & lt)) mine[ka] = base_a + __popc(ma); /* the group's lowest lane */
        if (kb >= 0 && !(mb & lt)) mine[kb] = base_b + __popc(mb);
        __syncwarp();
    }
    __syncthreads();
    for (int key = threadIdx.x; key < keys; key += kSendThreads) { /* exclusive scan over warps */
        int acc = 0;
        for (int w = 0; w < W; w++) {
            const int c = pl.warp_count[w * keys + key];
            pl.warp_count[w * keys + key] = acc;
            acc += c;
        }
        pl.count[key] = acc;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += kSendThreads) {
        if (pl.idx[i] < 0) continue;
        const int j = i % k, w = i / span;
        if (pl.first[i] == j) pl.row[i] = (int16_t)(pl.row[i] + pl.warp_count[w * keys + pl.idx[i]]);
        if (pl.opener[i] == j) pl.slot[i] = (int16_t)(pl.slot[i] + pl.warp_count[w * keys + d.E + pl.dst[i]]);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += kSendThreads) { /* repeated slots share their first slot's values */
        if (pl.idx[i] < 0) continue;
        const int t0 = i - i % k;
        if (pl.first[i] != i % k) pl.row[i] = pl.row[t0 + pl.first[i]];
        if (pl.opener[i] != i % k) pl.slot[i] = pl.slot[t0 + pl.opener[i]];
    }
    __syncthreads();
}

struct MsgRef {
    uint8_t *at; /* the message in the destination's window (put/signal: in the outbox) */
    int dst, opener, slot;
};

template <int kGin>
__global__ void __launch_bounds__(kSendThreads, kBlocksPerSm) dispatch_send_kernel(Params p, const uint16_t *__restrict__ x,
                                                                 const void *topk, int bits, const float *weights, int T) {
    const ep_dims &d = p.d;
    /* LSA: the call's number lives on the device (graph replays advance it): every block reads
    ** it here, and only the last block to finish, after all have started, moves it on. */
    const uint32_t seq = call_seq(p, &p.seqs[0], 1);
    const int k = d.k, me = d.rank, par = seq & 1, L = d.L;
    extern __shared__ __align__(16) uint8_t smem[];
    const Plan pl = plan_in(smem, d);
    __shared__ MsgRef msgs[EPMOE_MAX_TOPK];
    __shared__ int n_msgs, bail;
    EP_TRACE(trace_point(p, 0, 0));
    EP_TRACE(trace_max(p, 0, kTraceMaxStart));

    if (threadIdx.x == 0) {
        bail = 0;
        if (!p.a2a && seq > 2) /* the receivers are done with the slots this parity carried last time */
            for (int r = 0; r < d.R && !bail; r++)
                if (p.active[r] && !await<kGin>(p, ep_ack(my_base(p), &p.w, r), sig_ack(p, r), seq - 2, seq - 2, r, 1))
                    bail = 1; /* (acks count receives: seq - 2 of them once the call two back is read) */
        EP_TRACE(trace_point(p, 0, 1));
    }
    make_plan(p, topk, bits, T, pl);
    EP_TRACE(trace_point(p, 0, 2));
    if (bail) return;
    if (blockIdx.x == 0)
        for (int i = threadIdx.x; i < T * k; i += kSendThreads) p.st[par].topk[i] = pl.idx[i];

    const int chunks = d.H / 8; /* 16-byte chunks of the bf16 row */
    for (int t = blockIdx.x; t < T; t += gridDim.x) {
        const int16_t *tok = pl.idx + t * k;
        if (threadIdx.x == 0) {
            int m = 0;
            for (int j = 0; j < k; j++) {
                if (tok[j] < 0 || pl.opener[t * k + j] != j) continue;
                const int dst = pl.dst[t * k + j];
                msgs[m].dst = dst, msgs[m].opener = j, msgs[m].slot = pl.slot[t * k + j];
                msgs[m].at = out_msg<kGin>(p, par, dst, msgs[m].slot);
                m++;
            }
            n_msgs = m;
        }
        __syncthreads();
        EP_TRACE(if (t == blockIdx.x) trace_point(p, 0, 3));
        const int nm = n_msgs;
        if (threadIdx.x < nm) { /* one thread writes each message's header */
            const MsgRef mr = msgs[threadIdx.x];
            ep_header h = {t, 0};
            ep_entry *ent = reinterpret_cast<ep_entry *>(mr.at + sizeof(ep_header));
            for (int j = mr.opener; j < k; j++) {
                if (tok[j] < 0 || (d.dedup ? pl.dst[t * k + j] != mr.dst : tok[j] != tok[mr.opener])) continue;
                ep_entry e = {(int16_t)(tok[j] - mr.dst * L), (int16_t)j, pl.row[t * k + j],
                              weights ? weights[(int64_t)t * k + j] : 0.0f};
                ent[h.n_entries++] = e;
            }
            *reinterpret_cast<ep_header *>(mr.at) = h;
        }
        if (nm) {
            const uint4 *xt = reinterpret_cast<const uint4 *>(x + (int64_t)t * d.H);
            const int lane = threadIdx.x & 31;
            const unsigned half_mask = 0xFFFFu << (lane & 16);
            for (int c0 = threadIdx.x; c0 < chunks; c0 += kSendThreads * kBatch) {
                uint4 v[kBatch]; /* every load of the row in flight before the first use */
#pragma unroll
                for (int b = 0; b < kBatch; b++)
                    if (c0 + b * kSendThreads < chunks) v[b] = __ldg(xt + c0 + b * kSendThreads);
#pragma unroll
                for (int b = 0; b < kBatch; b++) {
                    const int c = c0 + b * kSendThreads; /* a half-warp owns a 128-group: uniform test */
                    if (c >= chunks) continue;
                    if (!d.fp8) {
                        for (int m = 0; m < nm; m++) *reinterpret_cast<uint4 *>(msgs[m].at + d.header_bytes + c * 16) = v[b];
                        continue;
                    }
                    float scale_inv;
                    const uint2 q = cast_chunk8(v[b], p.round_scale, half_mask, &scale_inv);
                    for (int m = 0; m < nm; m++) {
                        *reinterpret_cast<uint2 *>(msgs[m].at + d.header_bytes + c * 8) = q;
                        if ((lane & 15) == 0)
                            *reinterpret_cast<float *>(msgs[m].at + d.header_bytes + d.H + (c / 16) * 4) = scale_inv;
                    }
                }
            }
        }
        if (kGin) { /* put each remote message where LSA would have stored it */
            __syncthreads();
            for (int m = 0; m < nm; m++) {
                if (!via_outbox<kGin>(p, msgs[m].dst)) continue;
                if (kGin == 2) { /* a thread per message posts it */
                    if ((int)threadIdx.x == m)
                        gin_put(p, msgs[m].dst, ep_msg(my_base(p), &d, &p.w, par, me, msgs[m].slot), msgs[m].at, d.msg_bytes);
                } else {
                    put_block(ep_msg(peer_base(p, msgs[m].dst), &d, &p.w, par, me, msgs[m].slot), msgs[m].at, d.msg_bytes);
                }
            }
        }
        __syncthreads(); /* msgs[] is rewritten for the next token */
        EP_TRACE(if (t == blockIdx.x) trace_point(p, 0, 4));
    }
    EP_TRACE(trace_max(p, 0, kTraceMaxWorkEnd));
    if (last_block_done(&p.counters[0])) {
        EP_TRACE(if (threadIdx.x == 0) trace_set(p, 0, kTraceLastTicket));
        if (threadIdx.x == 0 && !p.a2a) p.seqs[0] = seq;
        /* the count blocks: every thread stores some (one thread storing 2 + L words per
        ** destination, over NVLink, took microseconds), then one thread per destination puts
        ** and publishes them */
        const int per = 2 + L;
        for (int i = threadIdx.x; i < d.R * per; i += kSendThreads) {
            const int r = i / per, f = i - r * per;
            if (f != 1 && p.active[r]) out_meta<kGin>(p, par, r)[f] = (uint32_t)pl.count[f ? r * L + f - 2 : d.E + r];
        }
        __syncthreads();
        for (int r = threadIdx.x; r < d.R; r += kSendThreads) {
            if (!p.active[r]) continue;
            uint32_t *meta = out_meta<kGin>(p, par, r);
            if (via_outbox<kGin>(p, r) && kGin == 2) { /* the count block's put, by this thread, before its signal */
                gin_put(p, r, ep_meta(my_base(p), &p.w, par, me), meta, sizeof(uint32_t) * (size_t)per);
            } else if (via_outbox<kGin>(p, r)) {
                uint32_t *remote = ep_meta(peer_base(p, r), &p.w, par, me);
                for (int i = 0; i < per; i++) remote[i] = meta[i];
            }
            if (!p.a2a)
                publish<kGin>(p, r, kGin == 2 ? nullptr : ep_disp_flag(peer_base(p, r), &d, &p.w, par, me), sig_disp(p, par, me), seq);
        }
        EP_TRACE(if (threadIdx.x == 0) trace_set(p, 0, kTraceLastExit));
    }
}

template <int kGin>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) dispatch_recv_kernel(Params p, epmoe_dispatch_args a) {
    const ep_dims &d = p.d;
    const uint32_t seq = call_seq(p, &p.seqs[1], 1); /* as in the send kernel */
    const int par = seq & 1, R = d.R, L = d.L, H = d.H, G = H / FMT_GROUP, me = d.rank;
    const int64_t M = (int64_t)R * d.N;
    extern __shared__ __align__(16) uint8_t smem[];
    int *begin = reinterpret_cast<int *>(smem); /* [L, R] */
    int *pre = begin + L * R;                   /* [R + 1] message prefix over sources */
    /* the distinct rows of the current message (a slot repeating an expert shares its row):
    ** flat index le * M + row, and le and row apart (no 64-bit division for the scales) */
    __shared__ int64_t rows[EPMOE_MAX_TOPK];
    __shared__ int row_le[EPMOE_MAX_TOPK], row_in[EPMOE_MAX_TOPK], n_rows;
    __shared__ int bail;
    EP_TRACE(trace_point(p, 1, 0));
    EP_TRACE(trace_max(p, 1, kTraceMaxStart));
    if (threadIdx.x == 0) bail = 0;
    __syncthreads();
    if (!p.a2a) /* a2a: the exchange before this kernel on the stream has delivered everything */
        for (int r = threadIdx.x; r < R; r += kThreads)
            if (p.active[r] &&
                !await<kGin>(p, ep_disp_flag(my_base(p), &d, &p.w, par, r), sig_disp(p, par, r), seq, calls_of_parity(seq), r, 2))
                bail = 1;
    __syncthreads();
    EP_TRACE(trace_point(p, 1, 1));
    if (bail) return;
    if (threadIdx.x == 0) {
        pre[0] = 0;
        for (int r = 0; r < R; r++) pre[r + 1] = pre[r] + (p.active[r] ? (int)in_meta(p, par, r)[0] : 0);
    }
    for (int le = threadIdx.x; le < L; le += kThreads) {
        int acc = 0;
        for (int r = 0; r < R; r++) {
            begin[le * R + r] = acc;
            if (p.active[r]) acc += (int)in_meta(p, par, r)[2 + le];
        }
        if (blockIdx.x == 0) a.masked_m[le] = acc;
    }
    __syncthreads();
    EP_TRACE(trace_point(p, 1, 2));
    if (blockIdx.x == 0) {
        for (int i = threadIdx.x; i < L * R; i += kThreads) p.st[par].begin[i] = begin[i];
        for (int r = threadIdx.x; r < R; r += kThreads) p.st[par].n_msgs[r] = pre[r + 1] - pre[r];
    }
    const float inv = a.requant_scale ? 1.0f / __ldg(a.requant_scale) : 1.0f;
    const int fmt = p.scale_fmt;
    for (int m = blockIdx.x; m < pre[R]; m += gridDim.x) {
        int src = 0;
        while (pre[src + 1] <= m) src++;
        const int i = m - pre[src];
        const uint8_t *msg = in_msg(p, par, src, i);
        uint8_t *keep = p.st[par].hdrs + ((int64_t)src * d.slots + i) * d.header_bytes;
        for (int c = threadIdx.x; c < d.header_bytes / 16; c += kThreads)
            reinterpret_cast<uint4 *>(keep)[c] = reinterpret_cast<const uint4 *>(msg)[c];
        if (threadIdx.x < 32) { /* warp 0: a lane per entry, its row once per distinct (le, row) */
            const int lane = threadIdx.x;
            const ep_header h = *reinterpret_cast<const ep_header *>(msg);
            const bool valid = lane < h.n_entries && lane < EPMOE_MAX_TOPK; /* (rows[] holds EPMOE_MAX_TOPK) */
            ep_entry e = {0, 0, 0, 0.0f};
            if (valid) e = reinterpret_cast<const ep_entry *>(msg + sizeof(ep_header))[lane];
            const unsigned long long key = valid ? ((unsigned long long)(uint16_t)e.le << 32) | (uint32_t)e.row
                                                 : ~0ull - (unsigned long long)lane;
            const unsigned same = __match_any_sync(0xFFFFFFFFu, key);
            const bool first = valid && __ffs(same) - 1 == lane;
            const unsigned firsts = __ballot_sync(0xFFFFFFFFu, first);
            if (first) {
                const int q = __popc(firsts & ((1u << lane) - 1u)), r = begin[e.le * R + src] + e.row;
                rows[q] = (int64_t)e.le * M + r, row_le[q] = e.le, row_in[q] = r;
                if (a.recv_src_info) a.recv_src_info[(int64_t)e.le * M + r] = src * d.N + h.token;
            }
            if (lane == 0) n_rows = __popc(firsts);
        }
        __syncthreads();
        EP_TRACE(if (m == (int)blockIdx.x) trace_point(p, 1, 3));
        const int nrows = n_rows;
        const uint8_t *payload = msg + d.header_bytes;
        const int vec = d.fp8 ? H / 16 : H / 8; /* 16-byte chunks of the payload */
        const float *sc = reinterpret_cast<const float *>(payload + H);
        for (int c0 = threadIdx.x; c0 < vec; c0 += kThreads * kBatch) {
            uint4 v[kBatch]; /* read once, written to every row */
#pragma unroll
            for (int b = 0; b < kBatch; b++)
                if (c0 + b * kThreads < vec) v[b] = reinterpret_cast<const uint4 *>(payload)[c0 + b * kThreads];
#pragma unroll
            for (int b = 0; b < kBatch; b++) {
                const int c = c0 + b * kThreads;
                if (c >= vec) continue;
                if (d.fp8 && a.requant_scale) { /* (q * s) * (1 / scale), as epmoe_requant_fp8 */
                    const float s = sc[c / 8];
                    v[b] = make_uint4(requant_word(v[b].x, s, inv), requant_word(v[b].y, s, inv),
                                      requant_word(v[b].z, s, inv), requant_word(v[b].w, s, inv));
                }
                for (int n = 0; n < nrows; n++) static_cast<uint4 *>(a.recv_x)[rows[n] * vec + c] = v[b];
            }
        }
        if (d.fp8 && !a.requant_scale) {
            const int64_t slab = fmt_scale_slab_bytes(fmt, M, G);
            const int padded = fmt_scale_is_ue8m0(fmt) ? (G + 3) / 4 * 4 : G;
            for (int g = threadIdx.x; g < padded; g += kThreads) {
                const float s = g < G ? sc[g] : 0.0f;
                for (int n = 0; n < nrows; n++) {
                    uint8_t *o = static_cast<uint8_t *>(a.recv_scales) + row_le[n] * slab + fmt_scale_offset(fmt, M, G, row_in[n], g);
                    if (!fmt_scale_is_ue8m0(fmt)) *reinterpret_cast<float *>(o) = s;
                    else *o = g < G ? fmt_ue8m0_from_float(s) : 0;
                }
            }
        }
        __syncthreads(); /* rows[] is rewritten for the next message */
        EP_TRACE(if (m == (int)blockIdx.x) trace_point(p, 1, 4));
    }
    EP_TRACE(trace_max(p, 1, kTraceMaxWorkEnd));
    if (!p.a2a && last_block_done(&p.counters[1])) { /* a2a: the stream orders slab reuse */
        EP_TRACE(if (threadIdx.x == 0) trace_set(p, 1, kTraceLastTicket));
        if (threadIdx.x == 0) p.seqs[1] = seq;
        for (int r = threadIdx.x; r < R; r += kThreads)
            if (p.active[r]) publish<kGin>(p, r, kGin == 2 ? nullptr : ep_ack(peer_base(p, r), &p.w, me), sig_ack(p, me), seq);
        EP_TRACE(if (threadIdx.x == 0) trace_set(p, 1, kTraceLastExit));
    }
}

} // namespace

/* One instantiation per transport: kGin = Params::gin (0 device API or all-to-all, 1 emulated
** put/signal, 2 GIN), chosen here. */
template <int kGin> epmoe_status send_with(const Params &p, const epmoe_dispatch_args &a, int sms, cudaStream_t s) {
    const size_t smem = send_plan_smem(p.d.E, p.d.R, p.d.N, p.d.k);
    if (smem > 48 * 1024) {
        const cudaError_t e = grow_smem_attr<dispatch_send_kernel<kGin>>(smem);
        if (e != cudaSuccess)
            return epmoe__fail(EPMOE_ERR_CUDA, "epmoe_dispatch (send): the plan's %zu bytes of shared memory: %s", smem,
                               cudaGetErrorString(e));
    }
    dispatch_send_kernel<kGin><<<grid_for(a.num_tokens, sms), kSendThreads, smem, s>>>(p, a.x, a.topk_idx, a.topk_idx_bits,
                                                                                      a.topk_weights, a.num_tokens);
    return epmoe__launched("epmoe_dispatch (send)");
}

template <int kGin> epmoe_status recv_with(const Params &p, const epmoe_dispatch_args &a, int sms, cudaStream_t s) {
    const size_t smem = (size_t)ep_align(4 * ((int64_t)p.d.L * p.d.R + p.d.R + 1), 16);
    if (smem > 48 * 1024) {
        const cudaError_t e = grow_smem_attr<dispatch_recv_kernel<kGin>>(smem);
        if (e != cudaSuccess)
            return epmoe__fail(EPMOE_ERR_CUDA, "epmoe_dispatch (receive): %zu bytes of shared memory: %s", smem,
                               cudaGetErrorString(e));
    }
    dispatch_recv_kernel<kGin><<<kBlocksPerSm * sms, kThreads, smem, s>>>(p, a);
    return epmoe__launched("epmoe_dispatch (receive)");
}

epmoe_status launch_dispatch_send(const Params &p, const epmoe_dispatch_args &a, int sms, cudaStream_t s) {
    return p.gin == 2 ? send_with<2>(p, a, sms, s) : p.gin == 1 ? send_with<1>(p, a, sms, s) : send_with<0>(p, a, sms, s);
}

epmoe_status launch_dispatch_recv(const Params &p, const epmoe_dispatch_args &a, int sms, cudaStream_t s) {
    return p.gin == 2 ? recv_with<2>(p, a, sms, s) : p.gin == 1 ? recv_with<1>(p, a, sms, s) : recv_with<0>(p, a, sms, s);
}

} // namespace epk
