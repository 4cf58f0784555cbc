/*
** ep_dispatch.cu — dispatch on the GPU: the send kernel (plan, cast once, store each message
** into the destination rank's window, publish counts and flags) and the receive kernel (wait,
** prefix sums, fan each message out into the masked layout, acknowledge). Spec: the CPU
** backend (ep_cpu.c) and the reference (ep_ref.c); same message format and row order.
*/
#include "ep_device.cuh"

namespace epk {
namespace {

/* ---- rows and message slots, counted by each block for its own token --------------------
** Rows of an expert come in (token, slot) order (the reference's order, ep_ref.c). So the row of
** token t at expert e is the number of earlier tokens naming e. A block keeps these counts as
** running histograms in shared memory (atomics, Q threads per counted token): its first pass
** counts the whole batch (the count blocks) and the tokens before its first token, each later
** pass only the tokens since its previous one. No block waits for another and no plan of the
** whole batch is ranked: that plan (seven dependent phases) took 7.3 us of a 40 us dispatch
** (bench_ep's trace, 2026-11-30).
** With dedup a message's slot needs no count: token t's goes to slot t (ep_layout.h), so the
** payload goes out before the counting and only the header, which holds the rows, waits for it
** (counted slots kept the payload ~2 us behind the counting). Without dedup a token has up to
** min(k, L) messages per rank, and slot t * min(k, L) + i left half the slots empty for the
** receivers to scan (R = 2: per-expert dispatch +6 us), so there the slots are counted and
** packed: the earlier tokens' messages to r, plus the token's own earlier ones. */

/* ids of the first counted tile each thread loads before the send kernel's first barrier: 2 cover
** 128 tokens x top-8 at 512 threads; the rest load after it, as every later tile's do */
constexpr int kEarlyIds = 2;

struct MsgRef {
    uint8_t *at; /* the message in the destination's window (put/signal: in the outbox) */
    int dst, opener, slot;
};

/* An id from the caller (int32 or int64); -2 for one out of [-1, E). */
__device__ __forceinline__ int raw_id(const void *topk, int bits, int64_t i, int E) {
    const int64_t e = bits == 64 ? __ldg(static_cast<const int64_t *>(topk) + i) : (int64_t)__ldg(static_cast<const int32_t *>(topk) + i);
    return e < -1 || e >= E ? -2 : (int)e;
}
/* e / L for 0 <= e < 2^24 by a float reciprocal and one correction: an integer division is ~40
** instructions, and the counting below needs a destination per id of every earlier token (and
** the token of each id it stages). */
__device__ __forceinline__ int owner_of(int e, int L, float inv_L) {
    int q = __float2int_rz(__int2float_rn(e) * inv_L);
    q -= q * L > e;
    q += (q + 1) * L <= e;
    return q;
}
/* The id as sent: -1 for none, for a bad id (reported: `token`) and for an inactive owner;
** `dst` its rank (-1 with it). */
__device__ __forceinline__ int sent_id(const Params &p, int e, const int *act, int token, float inv_L, int *dst) {
    *dst = -1;
    if (e == -2) {
        set_error(p, kErrBadExpert, token, 0);
        return -1;
    }
    if (e < 0) return -1;
    const int r = owner_of(e, p.d.L, inv_L);
    if (!act[r]) return -1;
    *dst = r;
    return e;
}

/* Warp 0, before the block's first store into a receiver's window: the receivers have read the
** slots this parity carried two calls ago (acks count receives: seq - 2 of them by then).
** `probed`: this lane's earlier look at its acks found them all in. */
template <int kGin> __device__ __forceinline__ bool acks_in(const Params &p, uint32_t seq, const int *act, bool probed) {
    if (p.a2a || seq <= 2) return true;
    bool ok = true;
    if (kGin == 2 || !__all_sync(0xFFFFFFFFu, probed)) {
        for (int r = threadIdx.x; r < p.d.R; r += 32)
            if (act[r] && !await<kGin>(p, ep_ack(my_base(p), &p.w, r), sig_ack(p, r), seq - 2, seq - 2, r, 1)) ok = false;
    } /* else the probe's loads acquired the receivers' reads (the block's barrier then orders
      ** every thread's stores after them) */
    return __all_sync(0xFFFFFFFFu, ok);
}

/* The count blocks, one per destination: [0] the slots to scan (dedup: T, a token's slot each;
** else the messages), [1 + le] rows per local expert, from the batch's counts, as tagged words
** (ep_count_word); every thread of the block stores some (one thread storing a destination's
** 1 + L words over NVLink took microseconds). Under put/signal they go to the outbox, put after
** the ticket. */
template <int kGin>
__device__ __forceinline__ void store_counts(const Params &p, int par, uint32_t seq, const int *count, const int *act, int T) {
    const int per = 1 + p.d.L, L = p.d.L, E = p.d.E;
    for (int i = threadIdx.x; i < p.d.R * per; i += blockDim.x) {
        const int r = i / per, f = i - r * per;
        if (act[r]) /* one 8-byte store, volatile: the receive polls the word while it lands */
            *reinterpret_cast<volatile uint64_t *>(out_meta<kGin>(p, par, r) + f) = ep_count_word(f ? count[r * L + f - 1] : p.d.dedup ? T : count[E + r], seq);
    }
}

template <int kGin, int kMaxK, bool kDedup>
__global__ void __launch_bounds__(kSendThreads, kBlocksPerSm) dispatch_send_kernel(Params p, const uint16_t *__restrict__ x,
                                                                 const void *topk, int bits, const float *weights, int T) {
    const ep_dims &d = p.d;
    /* LSA: the call's number lives on the device (graph replays advance it): every block reads
    ** it here, and only the last block to finish, after all have started, moves it on. */
    const uint32_t seq = call_seq(p, &p.seqs[0], 1);
    const int k = d.k, me = d.rank, par = seq & 1, L = d.L, E = d.E, R = d.R;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const float inv_L = 1.0f / (float)L, inv_k = 1.0f / (float)k;
    /* count [E + R]: the batch's rows per expert and (without dedup) messages per destination
    ** (the count blocks); before [E + R]: the same over the tokens before the block's current
    ** one; act [R] */
    extern __shared__ __align__(16) int count[];
    int *before = count + E + R, *act = before + E + R;
    uint4 *row = reinterpret_cast<uint4 *>(count + send_row_at(E, R)); /* the token's bf16 row (see send_smem) */
    int *ids = reinterpret_cast<int *>(row + d.H / 8);                    /* a tile of counted ids */
    __shared__ int tok_e[kMaxK], tok_dst[kMaxK], tok_open[kMaxK], tok_row[kMaxK];
    __shared__ float wts[kMaxK];
    __shared__ MsgRef msgs[kMaxK];
    __shared__ int n_msgs, bail;
    EP_TRACE(trace_point(p, 0, 0));
    EP_TRACE(trace_max(p, 0, kTraceMaxStart));
    if (!p.a2a) let_dependents_launch(); /* the receive kernel may launch now (see ep_device.cuh) */

    /* the receivers are done with the slots this parity carried two calls ago: their acks are
    ** loaded now (lane r: rank r's, R <= 32) and compared only before the first store into a
    ** window, waited for there if still needed. Comparing here stalled warp 0 on the call's number
    ** and then the acks, two round trips in front of the counting (bench_ep trace). */
    uint64_t ack_seen = 0;
    if (!p.a2a && kGin != 2 && warp == 0 && lane < R && R <= 32) /* an acquire: no fence later (acks_in) */
        ack_seen = ld_acquire(ep_ack(my_base(p), &p.w, lane));
    auto probed = [&]() { return R <= 32 && (lane >= R || !act[lane] || ack_seen >= seq - 2); };
    for (int i = threadIdx.x; i < 2 * (E + R); i += kSendThreads) count[i] = 0;
    for (int r = threadIdx.x; r < R; r += kSendThreads) act[r] = __ldg(p.active + r);
    if (threadIdx.x == 0) bail = 0;
    EP_TRACE(trace_point(p, 0, 2));

    /* the counting below: Q threads per counted token (a power of two up to k, as many as the block
    ** has threads for the batch), thread q taking the token's slots q, q + Q, ...; a warp holds one
    ** q. One thread per token left 12 of 16 warps idle at 128 tokens and the other 4 unhidden. */
    int Q = 1;
    while (2 * Q <= k && 2 * Q <= kMaxK && (int64_t)T * 2 * Q <= kSendThreads) Q *= 2;
    const int chunk = kSendThreads / Q, q = (int)threadIdx.x / chunk;
    const int chunks = d.H / 8; /* 16-byte chunks of the bf16 row */
    for (int t = blockIdx.x, pass = 0; t < T; t += gridDim.x, pass++) {
        /* warp 0, lane j: slot j of the token, the slot opening its message, its weight */
        /* tokens counted now: the first pass all (the count blocks), counting those before t into
        ** before[]; later passes the tokens since the block's previous one */
        const int from = pass == 0 ? 0 : t - (int)gridDim.x, upto = pass == 0 ? T : t;
        /* the token's row, on its way to shared memory while the block counts: its load no longer
        ** waits behind the counting (each thread copies the chunks it later casts, so no barrier) */
        const uint4 *xt = reinterpret_cast<const uint4 *>(x + (int64_t)t * d.H);
        for (int c = threadIdx.x; c < chunks; c += kSendThreads) cp_async16(row + c, xt + c, 16);
        cp_async_commit();
        int raw = -1;
        float w = 0.0f;
        if (warp == 0 && lane < k) {
            raw = raw_id(topk, bits, (int64_t)t * k + lane, E);
            if (weights) w = __ldg(weights + (int64_t)t * k + lane);
        }
        /* the first counted tile's ids, loaded with the token's own: their round trip is over by
        ** the time the payload is out (pass 0 counts tokens [0, min(chunk, T)) first) */
        int first_ids[kEarlyIds];
        if (pass == 0) {
            const int n0 = min(chunk, T) * k;
#pragma unroll
            for (int q2 = 0; q2 < kEarlyIds; q2++) {
                const int i = (int)threadIdx.x + q2 * kSendThreads;
                first_ids[q2] = i < n0 ? raw_id(topk, bits, i, E) : -1;
            }
        }
        __syncthreads(); /* act[], the zeroed counts; the previous token's readers of before[] and msgs[] */
        EP_TRACE(if (pass == 0) trace_point(p, 0, 5));
        /* warp 0, lane j: slot j's expert and rank; lane m of the token's messages places message m
        ** at slot `base` (+ the token's own earlier messages to that rank, without dedup) */
        int dst = -1, nth = 0;
        bool opener = false;
        auto place = [&](int base) {
            const unsigned openers = __ballot_sync(0xFFFFFFFFu, opener);
            if (opener) {
                MsgRef &mr = msgs[__popc(openers & ((1u << lane) - 1u))];
                mr.dst = dst, mr.opener = lane, mr.slot = base + nth;
                mr.at = out_msg<kGin>(p, par, dst, mr.slot);
            }
        };
        if (warp == 0) {
            const int e = lane < k ? sent_id(p, raw, act, t, inv_L, &dst) : -1;
            int open = -1; /* the first slot of the same destination (dedup) or expert */
            for (int jj = 0; jj < kMaxK; jj++) {
                const int ej = __shfl_sync(0xFFFFFFFFu, e, jj), dj = __shfl_sync(0xFFFFFFFFu, dst, jj);
                if (open < 0 && jj <= lane && e >= 0 && ej >= 0 && (kDedup ? dj == dst : ej == e)) open = jj;
                const int oj = __shfl_sync(0xFFFFFFFFu, open, jj);
                nth += !kDedup && jj < lane && ej >= 0 && oj == jj && dj == dst;
            }
            if (lane < kMaxK) tok_e[lane] = e, tok_dst[lane] = dst, tok_open[lane] = open, wts[lane] = w;
            opener = e >= 0 && open == lane;
            const unsigned openers = __ballot_sync(0xFFFFFFFFu, opener);
            if (lane == 0) n_msgs = __popc(openers);
            if (kDedup) place(t);
            __syncwarp();
            if (kDedup && p.a2a) { /* the exchange moves every slot, and a graph replay repeats the host's
                                    ** seq: the token's slot at an active rank it sends nothing is emptied */
                for (int r = lane; r < R; r += 32) {
                    bool sent = false;
                    for (int j = 0; j < k; j++) sent |= tok_dst[j] == r;
                    if (act[r] && !sent) reinterpret_cast<ep_header *>(out_msg<kGin>(p, par, r, t))->n_entries = 0;
                }
            }
            if (pass == 0 && !acks_in<kGin>(p, seq, act, probed())) bail = 1; /* before the first store into a window */
        }
        __syncthreads();
        if (bail) {
            cp_async_wait<0>(); /* no copy outlives the block */
            return;
        }
        EP_TRACE(if (pass == 0) trace_point(p, 0, 3));
        const int nm = n_msgs;
        auto store_payload = [&]() { /* the token's row (cast), into every message */
            const unsigned half_mask = 0xFFFFu << (lane & 16);
            for (int c0 = threadIdx.x; c0 < chunks; c0 += kSendThreads * kBatch) {
                uint4 v[kBatch]; /* every load of the row in flight before the first use */
#pragma unroll
                for (int b = 0; b < kBatch; b++)
                    if (c0 + b * kSendThreads < chunks) v[b] = row[c0 + b * kSendThreads];
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
        };
        if (kDedup) { /* the payload before the counting: its stores drain while the block counts */
            cp_async_wait<0>(); /* each thread casts the chunks it copied */
            if (nm) store_payload();
        }
        EP_TRACE(if (pass == 0) trace_point(p, 0, 7));
        for (int base = from; base < upto; base += chunk) {
            /* the tile's ids as sent with their ranks, e | rank << 16 (E, R <= 32767) or -1, staged
            ** in shared memory: each read once, coalesced (the Q threads of a token each loaded
            ** all k ids, 32 bytes apart across a warp: 4x the requests, each touching 32 sectors).
            ** Rows of the tile are ks = k | 1 ints apart: an odd stride, so the reads of a warp's 32
            ** tokens below hit 32 different banks (k apart: 8-way conflicts at k = 8). */
            const int n = min(chunk, upto - base), ks = k | 1;
            if (base != from) __syncthreads(); /* the previous tile's readers */
            auto stage = [&](int i, int raw_e) {
                const int tok = owner_of(i, k, inv_k), j = i - tok * k;
                int dst;
                const int e = sent_id(p, raw_e, act, base + tok, inv_L, &dst);
                const int v = e >= 0 ? e | dst << 16 : -1;
                ids[tok * ks + j] = v;
                if (pass == 0 && blockIdx.x == 0) p.st[par].topk[(int64_t)base * k + i] = (int16_t)(v >= 0 ? v & 0xFFFF : -1);
            };
            int i0 = threadIdx.x;
            if (pass == 0 && base == from) { /* its first ids were loaded early (first_ids) */
#pragma unroll
                for (int q2 = 0; q2 < kEarlyIds; q2++, i0 += kSendThreads)
                    if (i0 < n * k) stage(i0, first_ids[q2]);
            }
            for (int i = i0; i < n * k; i += kSendThreads) stage(i, raw_id(topk, bits, (int64_t)base * k + i, E));
            __syncthreads();
            const int u = base + ((int)threadIdx.x & (chunk - 1));
            int ed[kMaxK]; /* token u's */
#pragma unroll
            for (int j = 0; j < kMaxK; j++) ed[j] = u < upto && j < k ? ids[(u - base) * ks + j] : -1;
            const bool early = u < t; /* before the block's token */
#pragma unroll
            for (int j = 0; j < kMaxK; j++) { /* this thread's slots of token u */
                if ((j & (Q - 1)) != q) continue;
                bool f = ed[j] >= 0; /* the slot names its expert first (without dedup: opens a message) */
#pragma unroll
                for (int jj = 0; jj < j; jj++) f &= ed[jj] != ed[j];
                if (f && pass == 0) atomicAdd(&count[ed[j] & 0xFFFF], 1);
                if (f && early) atomicAdd(&before[ed[j] & 0xFFFF], 1);
                if (kDedup) continue;
                /* messages: destinations collide a lot, so one atomic per warp group */
                const int key = f ? (ed[j] >> 16) * 2 + early : -1;
                const unsigned grp = __match_any_sync(0xFFFFFFFFu, key);
                if (key >= 0 && lane == __ffs(grp) - 1) {
                    if (pass == 0) atomicAdd(&count[E + (key >> 1)], __popc(grp));
                    if (key & 1) atomicAdd(&before[E + (key >> 1)], __popc(grp));
                }
            }
        }
        EP_TRACE(if (pass == 0) trace_point(p, 0, 6));
        __syncthreads();
        EP_TRACE(if (pass == 0) trace_point(p, 0, 1));
        if (!kDedup) { /* the slots are counted now: placed, then the payload goes out while warp 0
                        ** writes the headers (a barrier between headers and payload cost R = 2
                        ** per-expert dispatch ~2 us) */
            if (warp == 0) place(dst >= 0 ? before[E + dst] : 0);
            __syncthreads();
        }
        if (warp == 0) { /* the headers, a lane each, once the token's rows are counted */
            if (lane < kMaxK) tok_row[lane] = tok_e[lane] >= 0 ? before[tok_e[lane]] : 0;
            __syncwarp();
            if (lane < nm) {
                const MsgRef mr = msgs[lane];
                ep_header h = {t, 0, seq, 0};
                ep_entry *ent = reinterpret_cast<ep_entry *>(mr.at + sizeof(ep_header));
                for (int j = mr.opener; j < k; j++) {
                    const int ej = tok_e[j];
                    if (ej < 0 || (kDedup ? tok_dst[j] != mr.dst : ej != tok_e[mr.opener])) continue;
                    ep_entry en = {(int16_t)(ej - mr.dst * L), (int16_t)j, tok_row[j], wts[j]};
                    ent[h.n_entries++] = en;
                }
                *reinterpret_cast<ep_header *>(mr.at) = h;
            }
        }
        cp_async_wait<0>(); /* the row (with dedup long landed; without, it loaded while the block counted) */
        if (!kDedup && nm) store_payload();
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
        /* block 0 stores the count blocks after its first token, not the last block after its
        ** ticket: the receivers' offsets then need not wait for the flags (device API; the ticket
        ** orders them before the puts and flags as it orders every block's payload) */
        if (pass == 0 && blockIdx.x == 0) store_counts<kGin>(p, par, seq, count, act, T);
        EP_TRACE(if (t == blockIdx.x) trace_point(p, 0, 4));
    }
    if (T == 0) { /* the count blocks are stores too (and act[] is read across warps: a barrier first) */
        __syncthreads();
        if (warp == 0 && !acks_in<kGin>(p, seq, act, probed())) bail = 1;
        __syncthreads();
        if (bail) return;
    }
    EP_TRACE(trace_max(p, 0, kTraceMaxWorkEnd));
    if (last_block_done<true, kGin == 2>(&p.counters[0])) {
        EP_TRACE(if (threadIdx.x == 0) trace_set(p, 0, kTraceLastTicket));
        if (threadIdx.x == 0 && !p.a2a) {
            p.seqs[0] = seq;
            __threadfence(); /* before the flags (plain stores, publish): a joined receive acquires them
                             ** and may end before this grid does */
        }
        __syncthreads();
        /* the count blocks (block 0 stored them unless there were no tokens), then one thread per
        ** destination puts (put/signal) and publishes them */
        const int per = 1 + L;
        if (T == 0) {
            store_counts<kGin>(p, par, seq, count, act, T);
            __syncthreads();
        }
        for (int r = threadIdx.x; r < d.R; r += kSendThreads) {
            if (!act[r]) continue;
            uint64_t *meta = out_meta<kGin>(p, par, r);
            if (via_outbox<kGin>(p, r) && kGin == 2) { /* the count block's put, by this thread, before its signal */
                gin_put(p, r, ep_meta(my_base(p), &p.w, par, me), meta, sizeof(uint64_t) * (size_t)per);
            } else if (via_outbox<kGin>(p, r)) {
                uint64_t *remote = ep_meta(peer_base(p, r), &p.w, par, me);
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
    receive_entry(p); /* launched under the send: the prior grid's writes first, unless joined (ep_device.cuh) */
    const uint32_t seq = call_seq(p, &p.seqs[1], 1); /* as in the send kernel */
    const int par = seq & 1, R = d.R, L = d.L, H = d.H, G = H / FMT_GROUP, me = d.rank;
    const int64_t M = (int64_t)R * d.N;
    extern __shared__ __align__(16) uint8_t smem[];
    int *begin = reinterpret_cast<int *>(smem); /* [L, R] */
    int *pre = begin + L * R;                   /* [R + 1] prefix over sources of the slots after the first round */
    int *cnt = pre + R + 1;                     /* [R] slots to scan per source (n_slots) */
    uint8_t *msg0 = smem + recv_msg_at(L, R);   /* the block's first message, loaded early (below) */
    /* the distinct rows of the current message (a slot repeating an expert shares its row):
    ** flat index le * M + row, and le and row apart (no 64-bit division for the scales) */
    __shared__ int64_t rows[EPMOE_MAX_TOPK];
    __shared__ int row_le[EPMOE_MAX_TOPK], row_in[EPMOE_MAX_TOPK], n_rows;
    __shared__ int bail;
    EP_TRACE(trace_point(p, 1, 0));
    EP_TRACE(trace_max(p, 1, kTraceMaxStart));
    if (threadIdx.x == 0) bail = 0;
    __syncthreads();
    /* Device API: every count word carries its call's tag (ep_count_word) and the sender stores
    ** them under its payload, so the offsets below are worked out while the messages are still on
    ** their way, and only the messages wait for the flags. Put/signal puts the counts with the
    ** messages and a2a moves them with the slabs: there the flags (or the stream) come first. */
    const bool early = kGin == 0 && !p.a2a;
    const int src0 = (int)blockIdx.x % R, i0 = (int)blockIdx.x / R;
    auto await_flags = [&]() {
        if (!p.a2a) /* a2a: the exchange before this kernel on the stream has delivered everything */
            for (int r = threadIdx.x; r < R; r += kThreads)
                if (p.active[r] &&
                    !await<kGin>(p, ep_disp_flag(my_base(p), &d, &p.w, par, r), sig_disp(p, par, r), seq, calls_of_parity(seq), r, 2))
                    bail = 1;
        __syncthreads();
        EP_TRACE(trace_point(p, 1, early ? 5 : 1));
        if (bail) return false;
        /* Messages go to blocks in two rounds (first_round, ep_device.cuh): block b loads message
        ** b / R of source b % R now, before it knows whether that source sent it (a slot past the
        ** source's count holds an old call's bytes, loaded and never used): without early counts,
        ** while it reads them (two dependent round trips less). */
        if (i0 < d.slots) {
            const uint4 *m0 = reinterpret_cast<const uint4 *>(in_msg(p, par, src0, i0));
            for (int c = threadIdx.x; c < d.msg_bytes / 16; c += kThreads) cp_async16(reinterpret_cast<uint4 *>(msg0) + c, m0 + c, 16);
            cp_async_commit();
        }
        return true;
    };
    if (!early && !await_flags()) return;
    /* every source's counts read at once (a loop over sources per thread waited R round trips),
    ** then prefixes in shared memory: messages over sources, rows of each expert over sources */
    for (int i = threadIdx.x; i < R * (L + 1); i += kThreads) {
        const int r = i / (L + 1), f = i - r * (L + 1); /* f = 0: slots to scan; 1 + le: rows of le */
        int c = 0;
        if (p.active[r]) {
            const uint64_t *at = in_meta(p, par, r) + f;
            uint64_t w = 0;
            if (early) { /* until the word is this call's (its flag's release covers no count) */
                if (!wait_for(p, [&] { return (uint64_t)ep_count_is(w = ld_volatile(at), seq); }, 1, r, 2)) bail = 1;
            } else {
                w = *at;
            }
            c = ep_count_of(w);
        }
        if (f) {
            begin[(f - 1) * R + r] = c;
        } else {
            cnt[r] = c;
            pre[r + 1] = c - first_round(c, r, R); /* less the first round's */
        }
    }
    __syncthreads();
    if (bail) return;
    EP_TRACE(if (early) trace_point(p, 1, 1));
    scan_ranks(pre, R);
    for (int le = threadIdx.x; le < L; le += kThreads) {
        int acc = 0;
        for (int r = 0; r < R; r++) {
            const int c = begin[le * R + r];
            begin[le * R + r] = acc;
            acc += c;
        }
        if (blockIdx.x == 0) a.masked_m[le] = acc;
    }
    __syncthreads();
    EP_TRACE(trace_point(p, 1, 2));
    if (early && !await_flags()) return;
    if (blockIdx.x == 0)
        for (int r = threadIdx.x; r < R; r += kThreads) p.st[par].n_msgs[r] = cnt[r];
    const float inv = a.requant_scale ? 1.0f / __ldg(a.requant_scale) : 1.0f;
    const int fmt = p.scale_fmt;
    cp_async_wait<0>();
    __syncthreads(); /* the first message in shared memory */
    EP_TRACE(trace_point(p, 1, 6));
    /* m = -1: the first round's slot (if its source has it scanned); then the rest */
    for (int m = i0 < cnt[src0] ? -1 : (int)blockIdx.x; m < pre[R]; m = next_round_msg(m)) {
        int src = src0, i = i0;
        if (m >= 0) later_round_msg(pre, cnt, R, m, &src, &i);
        const uint8_t *msg = m < 0 ? msg0 : in_msg(p, par, src, i);
        /* the header kept for combine, each entry with its row in the masked layout (combine's send
        ** then needs no offsets: one dependent load less) */
        uint8_t *keep = p.st[par].hdrs + ((int64_t)src * d.slots + i) * d.header_bytes;
        if (threadIdx.x < 32) { /* warp 0: a lane per entry, its row once per distinct (le, row) */
            const int lane = threadIdx.x;
            ep_header h = *reinterpret_cast<const ep_header *>(msg);
            if (h.seq != seq) h.n_entries = 0; /* a slot this call left empty (an older call's message) */
            const bool valid = lane < h.n_entries && lane < EPMOE_MAX_TOPK; /* (rows[] holds EPMOE_MAX_TOPK) */
            ep_entry e = {0, 0, 0, 0.0f};
            if (valid) e = reinterpret_cast<const ep_entry *>(msg + sizeof(ep_header))[lane];
            const unsigned long long key = valid ? ((unsigned long long)(uint16_t)e.le << 32) | (uint32_t)e.row
                                                 : ~0ull - (unsigned long long)lane;
            const unsigned same = __match_any_sync(0xFFFFFFFFu, key);
            const bool first = valid && __ffs(same) - 1 == lane;
            const unsigned firsts = __ballot_sync(0xFFFFFFFFu, first);
            const int r = valid ? begin[e.le * R + src] + e.row : 0;
            if (first) {
                const int q = __popc(firsts & ((1u << lane) - 1u));
                rows[q] = (int64_t)e.le * M + r, row_le[q] = e.le, row_in[q] = r;
                if (a.recv_src_info) a.recv_src_info[(int64_t)e.le * M + r] = src * d.N + h.token;
            }
            if (valid) {
                e.row = r;
                reinterpret_cast<ep_entry *>(keep + sizeof(ep_header))[lane] = e;
            }
            if (lane == 0) *reinterpret_cast<ep_header *>(keep) = h;
            if (lane == 0) n_rows = __popc(firsts);
        }
        __syncthreads();
        EP_TRACE(if (m == -1) trace_point(p, 1, 3));
        const int nrows = n_rows;
        const uint8_t *payload = msg + d.header_bytes;
        const int vec = d.fp8 ? H / 16 : H / 8; /* 16-byte chunks of the payload */
        const float *sc = reinterpret_cast<const float *>(payload + H);
        for (int c0 = nrows ? (int)threadIdx.x : vec; c0 < vec; c0 += kThreads * kBatch) { /* (an empty slot: nothing) */
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
        EP_TRACE(if (m == -1) trace_point(p, 1, 4));
    }
    EP_TRACE(trace_max(p, 1, kTraceMaxWorkEnd));
    if (!p.a2a && last_block_done<kGin == 2, kGin == 2>(&p.counters[1])) { /* a2a: the stream orders slab reuse */
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
template <int kGin, int kMaxK, bool kDedup> epmoe_status send_with(const Params &p, const epmoe_dispatch_args &a, int sms, cudaStream_t s) {
    const size_t smem = send_smem(p.d.E, p.d.R, p.d.H, p.d.k);
    if (smem > 48 * 1024) {
        const cudaError_t e = grow_smem_attr<dispatch_send_kernel<kGin, kMaxK, kDedup>>(smem);
        if (e != cudaSuccess)
            return epmoe__fail(EPMOE_ERR_CUDA, "epmoe_dispatch (send): the counts' %zu bytes of shared memory: %s", smem,
                               cudaGetErrorString(e));
    }
    dispatch_send_kernel<kGin, kMaxK, kDedup><<<grid_for(a.num_tokens, sms), kSendThreads, smem, s>>>(
        p, a.x, a.topk_idx, a.topk_idx_bits, a.topk_weights, a.num_tokens);
    return epmoe__launched("epmoe_dispatch (send)");
}

template <int kGin> epmoe_status recv_with(const Params &p, const epmoe_dispatch_args &a, int sms, cudaStream_t s) {
    const size_t smem = recv_smem(p.d);
    if (smem > 48 * 1024) {
        const cudaError_t e = grow_smem_attr<dispatch_recv_kernel<kGin>>(smem);
        if (e != cudaSuccess)
            return epmoe__fail(EPMOE_ERR_CUDA, "epmoe_dispatch (receive): %zu bytes of shared memory: %s", smem,
                               cudaGetErrorString(e));
    }
    return launch_dependent("epmoe_dispatch (receive)", dispatch_recv_kernel<kGin>, kBlocksPerSm * sms, kThreads, smem, s,
                            !p.a2a, p, a);
}

template <int kMaxK, bool kDedup> epmoe_status send_per_gin(const Params &p, const epmoe_dispatch_args &a, int sms, cudaStream_t s) {
    return p.gin == 2   ? send_with<2, kMaxK, kDedup>(p, a, sms, s)
           : p.gin == 1 ? send_with<1, kMaxK, kDedup>(p, a, sms, s)
                        : send_with<0, kMaxK, kDedup>(p, a, sms, s);
}

epmoe_status launch_dispatch_send(const Params &p, const epmoe_dispatch_args &a, int sms, cudaStream_t s) {
    /* kMaxK: the width of a token's register arrays, 8 for top-k <= 8 (as combine's); kDedup: the
    ** message mode, whose slots and payload order differ. With the mode read at run time the
    ** kernel carried both paths in its 64 registers and spilled 20-24 bytes (ptxas); specialized,
    ** the device API's kernels spill nothing, and dispatch took 1.2 us less at R = 2 (FP8, 128
    ** tokens) and 3.4 us less with per-expert messages at R = 1 (bench_ep, 2 x H200, 2026-11-30).
    ** The wire (FP8 or BF16) stays a run-time value: specialized too, BF16 dispatch lost 0.6-1.5 us. */
    if (p.d.k <= 8) return p.d.dedup ? send_per_gin<8, true>(p, a, sms, s) : send_per_gin<8, false>(p, a, sms, s);
    return p.d.dedup ? send_per_gin<EPMOE_MAX_TOPK, true>(p, a, sms, s) : send_per_gin<EPMOE_MAX_TOPK, false>(p, a, sms, s);
}

epmoe_status launch_dispatch_recv(const Params &p, const epmoe_dispatch_args &a, int sms, cudaStream_t s) {
    return p.gin == 2 ? recv_with<2>(p, a, sms, s) : p.gin == 1 ? recv_with<1>(p, a, sms, s) : recv_with<0>(p, a, sms, s);
}

} // namespace epk
