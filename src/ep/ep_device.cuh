/*
** ep_device.cuh — what the EP kernels share: the kernel parameter block, where messages go and
** come from under each transport, the release/acquire flags, timed waits, the block-completion
** counter, and the launchers ep_nccl.cu calls.
**
** Protocol (ep_layout.h), device API (LSA): payload stores are plain, weakly ordered stores into
** the peer's window; every block fences at system scope, and the last block of a kernel to finish
** then stores each flag (publish), which a receiver reads with ld.acquire.sys. Every wait
** gives up after the configured timeout, records the first error in host-mapped memory and lets
** the kernel exit. Padded all-to-all (a2a): the same kernels store into the rank's own slabs;
** NCCL send/recv issued on the same stream moves them, so stream order replaces the flags.
*/
#pragma once

#include <nccl.h>
#include <nccl_device.h>

#include "../cuda/common.cuh"
#include "ep_internal.h"

namespace epk {

constexpr int kThreads = 256;
/* Dispatch's and combine's kernels are latency-bound chains (a token's plan and cast, a message's
** header then its rows), not bandwidth-bound: two blocks per SM (launch bounds cap registers at
** 128) run two chains side by side, so 256 tokens or messages take one round on 132 SMs, not
** two. 2 x H200, 2026-11-30: 256 tokens/rank dispatch 68.8 -> 63.3 us, combine 60.6 -> 48.3 us;
** 128 tokens 47.2 -> 46.0 and 36.8 -> 34.3 us; at R = 1, 128 tokens, combine 29.7 -> 32.3 us. */
constexpr int kBlocksPerSm = 2;
/* The dispatch send kernel's block: its counting (ep_dispatch.cu) splits a token's slots over up
** to EPMOE_MAX_TOPK threads and needs whole warps of one split, so a power of two of at least
** 32 * EPMOE_MAX_TOPK threads; more threads shorten the counting before the first store. */
#ifndef EPMOE_SEND_THREADS
#define EPMOE_SEND_THREADS 512
#endif
constexpr int kSendThreads = EPMOE_SEND_THREADS;
static_assert((kSendThreads & (kSendThreads - 1)) == 0 && kSendThreads >= 32 * EPMOE_MAX_TOPK && kSendThreads <= 1024 &&
                  kSendThreads * kBlocksPerSm <= 2048,
              "send blocks: a power of two of at least 32 * EPMOE_MAX_TOPK threads, at most 1024, kBlocksPerSm per SM");
/* The send kernel's dynamic shared memory: rows per expert and messages per destination [E + R]
** of the batch, the same [E + R] over the tokens before the current one, the active set [R]
** (ints), then the current token's bf16 row [H] at a 16-byte boundary, then a tile of the ids
** being counted [kSendThreads tokens at most, k | 1] (ints). */
__host__ __device__ inline int64_t send_row_at(int64_t E, int64_t R) { return (2 * E + 3 * R + 3) / 4 * 4; } /* ints */
inline size_t send_smem(int64_t E, int64_t R, int64_t H, int64_t k) {
    return sizeof(int) * (size_t)send_row_at(E, R) + 2 * (size_t)H + sizeof(int) * (size_t)kSendThreads * (size_t)(k | 1);
}
/* The dispatch receive kernel's dynamic shared memory: begin [L, R], the prefix over sources
** [R + 1] and the counts [R] (ints), then the block's first message at a 16-byte boundary. */
__host__ __device__ inline int64_t recv_msg_at(int64_t L, int64_t R) { return (4 * (L * R + 2 * R + 1) + 15) / 16 * 16; } /* bytes */
inline size_t recv_smem(const ep_dims &d) { return (size_t)(recv_msg_at(d.L, d.R) + d.msg_bytes); }
/* blocks for `work` independent items (tokens or messages) */
inline int grid_for(int work, int sms) {
    const int most = kBlocksPerSm * sms;
    return work < 1 ? 1 : work < most ? work : most;
}
constexpr int kMaxGpuRanks = 1024; /* ranks of a GPU group: combine's prefix over ranks is static shared memory */
constexpr int kBatch = 4;             /* 16-byte loads a thread keeps in flight before using them */

/* Device-side state of one parity (one live dispatch). */
struct CallState {
    int16_t *topk;   /* [N, k] ids as sent (-1: none or owner inactive) */
    int32_t *n_msgs; /* [R] slots received per source (n_slots; empty ones kept without entries) */
    uint8_t *hdrs;   /* [R, slots, header_bytes] received headers, each entry's row made absolute (its
                     ** row in the masked layout) */
};

struct Params {
    ep_dims d;
    ep_window w;
    ncclWindow_t win;         /* LSA only */
    int a2a;                  /* 1: the padded all-to-all transport; no window, flags or acks */
    int gin;                  /* put/signal through the outbox: 1 emulated over NVLink, 2 GIN (NIC) */
    ncclDevComm dc;           /* gin 2: the device communicator with its GIN signals */
    ep_outbox o;              /* gin: the outbox after the window */
    uint8_t *box;             /* a2a: the slab buffer (ep_a2a layout) */
    ep_a2a x;
    uint32_t host_seq;        /* a2a: the call's number, from the host (each launch sets it) */
    int joined;               /* a receive kernel right after its own send kernel (phase BOTH): on
                              ** the device API it starts without waiting for that grid (receive_entry) */
    const int *active;        /* [R] device copy of the active set at dispatch */
    CallState st[2];
    unsigned *counters;       /* [4]: block-completion tickets of the four kernels */
    unsigned *seqs;           /* [4]: dispatches sent, dispatches received (device-side, graph-safe);
                              ** put/signal: combines received per parity */
    int *error;               /* host-mapped: 0, or (code << 24 | peer << 8 | kernel) */
    unsigned long long timeout_ns;
    int round_scale, scale_fmt;
#ifdef EPMOE_EP_TRACE
    unsigned long long *trace; /* dev: [4 kernels][kTraceSlots] time stamps (ep_trace below) */
#endif
};

/* Error codes in *error (kept in step with epmoe_status where they map). */
constexpr int kErrTimeout = EPMOE_ERR_TIMEOUT, kErrBadExpert = EPMOE_ERR_INVALID_ARG;

__device__ __forceinline__ uint8_t *my_base(const Params &p) { return static_cast<uint8_t *>(ncclGetLocalPointer(p.win, 0)); }
__device__ __forceinline__ uint8_t *peer_base(const Params &p, int r) {
    if (p.gin == 2 && r == p.d.rank) return my_base(p); /* GIN: only its own window is load/store */
    return static_cast<uint8_t *>(ncclGetPeerPointer(p.win, 0, r));
}

/* The call's number: a2a passes the host's (buffers of a captured graph are fixed at capture,
** so its kernels must use the same parity); LSA counts on the device (graph replays advance
** it): `counter` holds the last call done, `ahead` is 1 for the call starting now, or minus
** how many receives ago combine's dispatch was. */
__device__ __forceinline__ uint32_t call_seq(const Params &p, const unsigned *counter, uint32_t ahead) {
    return p.a2a ? p.host_seq : *reinterpret_cast<const volatile unsigned *>(counter) + ahead;
}

/* ---- where messages go and come from: the one place the transports differ --------------
** LSA: a sender stores into the destination's window, in its own slots there; a2a: into its
** outbox slab for the destination (its inbox for itself), moved by the exchange. A receiver
** reads its window or its inbox at the same per-source positions. Combine rows: `row` is the
** token (REDUCE_AT_EXPERT) or token * k + slot (REDUCE_AT_OWNER). */
/* put/signal: a remote destination is reached through the outbox, then put (own rank: stored
** straight into the window, as LSA). kGin is the kernels' compile-time copy of Params::gin, so
** the device API's kernels carry none of this (one instantiation per transport). */
template <int kGin> __device__ __forceinline__ bool via_outbox(const Params &p, int dst) { return kGin && dst != p.d.rank; }
__device__ __forceinline__ uint8_t *send_slab(const Params &p, int par, int dst) {
    return ep_a2a_disp_slab(p.box, &p.d, &p.x, dst == p.d.rank, par, dst);
}
template <int kGin> __device__ __forceinline__ uint8_t *out_msg(const Params &p, int par, int dst, int64_t slot) {
    if (via_outbox<kGin>(p, dst)) return ep_out_msg(my_base(p), &p.d, &p.o, par, dst, slot);
    if (!p.a2a) return ep_msg(peer_base(p, dst), &p.d, &p.w, par, p.d.rank, slot);
    return ep_a2a_msg(send_slab(p, par, dst), &p.d, &p.x, slot);
}
template <int kGin> __device__ __forceinline__ uint64_t *out_meta(const Params &p, int par, int dst) {
    if (via_outbox<kGin>(p, dst)) return ep_out_meta(my_base(p), &p.w, &p.o, par, dst);
    if (!p.a2a) return ep_meta(peer_base(p, dst), &p.w, par, p.d.rank);
    return reinterpret_cast<uint64_t *>(send_slab(p, par, dst));
}
__device__ __forceinline__ const uint8_t *in_msg(const Params &p, int par, int src, int64_t i) {
    if (!p.a2a) return ep_msg(my_base(p), &p.d, &p.w, par, src, i);
    return ep_a2a_msg(ep_a2a_disp_slab(p.box, &p.d, &p.x, 1, par, src), &p.d, &p.x, i);
}
__device__ __forceinline__ const uint64_t *in_meta(const Params &p, int par, int src) {
    if (!p.a2a) return ep_meta(my_base(p), &p.w, par, src);
    return reinterpret_cast<const uint64_t *>(ep_a2a_disp_slab(p.box, &p.d, &p.x, 1, par, src));
}
/* where a combine row lands in dst's window (LSA layout) */
__device__ __forceinline__ uint16_t *peer_comb_row(const Params &p, int par, int dst, int64_t row) {
    return ep_comb_row(peer_base(p, dst), &p.d, &p.w, par, p.d.reduce_at_expert ? (int64_t)p.d.rank * p.d.N + row : row);
}
template <int kGin> __device__ __forceinline__ uint16_t *out_comb_row(const Params &p, int par, int dst, int64_t row) {
    if (via_outbox<kGin>(p, dst)) return ep_out_comb_row(my_base(p), &p.d, &p.o, par, dst, row);
    if (!p.a2a)
        return ep_comb_row(peer_base(p, dst), &p.d, &p.w, par, p.d.reduce_at_expert ? (int64_t)p.d.rank * p.d.N + row : row);
    return ep_a2a_comb_row(ep_a2a_comb_slab(p.box, &p.d, &p.x, dst == p.d.rank, par, dst), &p.d, row);
}
__device__ __forceinline__ const uint16_t *in_comb_row(const Params &p, int par, int src, int64_t row) {
    if (!p.a2a) return ep_comb_row(my_base(p), &p.d, &p.w, par, p.d.reduce_at_expert ? (int64_t)src * p.d.N + row : row);
    return ep_a2a_comb_row(ep_a2a_comb_slab(p.box, &p.d, &p.x, 1, par, src), &p.d, row);
}

/* The put of the put/signal protocol, emulated: the block copies `bytes` (a multiple of 16) of
** its outbox to `remote` in the destination's window over NVLink. Call it after a barrier that
** follows the outbox stores. A GIN build puts the same bytes with ncclGin::put. */
__device__ __forceinline__ void put_block(void *remote, const void *local, int64_t bytes) {
    for (int64_t c = threadIdx.x; c < bytes / 16; c += blockDim.x)
        static_cast<uint4 *>(remote)[c] = static_cast<const uint4 *>(local)[c];
}

__device__ __forceinline__ uint64_t ld_volatile(const uint64_t *f) { return *reinterpret_cast<const volatile uint64_t *>(f); }
__device__ __forceinline__ uint64_t ld_acquire(const uint64_t *f) {
    uint64_t v;
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(f) : "memory");
    return v;
}
__device__ __forceinline__ unsigned long long now_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

__device__ __forceinline__ void set_error(const Params &p, int code, int peer, int kernel) {
    atomicCAS(p.error, 0, (code << 24) | ((peer & 0xFFFF) << 8) | kernel);
}

/* Spins until load() >= want; false on timeout (recorded for `peer`; kernel: which kernel waited)
** or when another wait timed out. */
template <class Load>
__device__ __forceinline__ bool wait_for(const Params &p, Load load, uint64_t want, int peer, int kernel) {
    const unsigned long long t0 = now_ns();
    for (unsigned spin = 1; load() < want; spin++) {
        if (now_ns() - t0 > p.timeout_ns) {
            set_error(p, kErrTimeout, peer, kernel);
            return false;
        }
        /* another wait already timed out? (host-mapped memory: a PCIe read, so only now and then;
        ** other errors, such as a bad expert id, leave the protocol running) */
        if (!(spin & 4095) && *(volatile int *)p.error >> 24 == kErrTimeout) return false;
    }
    return true;
}
__device__ __forceinline__ bool wait_at_least(const Params &p, const uint64_t *f, uint64_t want, int peer, int kernel) {
    return wait_for(p, [f] { return ld_acquire(f); }, want, peer, kernel);
}

/* ---- GIN (gin 2): puts and signals through the NIC, one thread each, context 0 (a signal is
** visible only after the earlier puts on its context to that peer have settled). Signals
** count calls, so a wait compares with the number of calls of that parity so far: call seq
** is the ((seq + 1) / 2)-th of its parity. Ids: dispatch [2][R], combine [2][R], ack [R]. */
__device__ __forceinline__ ncclGinSignal_t sig_disp(const Params &p, int par, int src) { return (ncclGinSignal_t)(par * p.d.R + src); }
__device__ __forceinline__ ncclGinSignal_t sig_comb(const Params &p, int par, int src) {
    return (ncclGinSignal_t)(2 * p.d.R + par * p.d.R + src);
}
__device__ __forceinline__ ncclGinSignal_t sig_ack(const Params &p, int src) { return (ncclGinSignal_t)(4 * p.d.R + src); }
constexpr int kGinSignalsPerRank = 5; /* signals per rank of the group */
__device__ __forceinline__ uint64_t calls_of_parity(uint32_t seq) { return (seq + 1u) / 2u; }

/* `bytes` at `local` in this rank's window to the same offset as `remote_at` has in ours, in dst's */
__device__ __forceinline__ void gin_put(const Params &p, int dst, const void *remote_at, const void *local, size_t bytes) {
    uint8_t *base = my_base(p);
    ncclGin gin(p.dc, 0);
    gin.put(ncclTeamWorld(p.dc), dst, p.win, (size_t)(static_cast<const uint8_t *>(remote_at) - base), p.win,
            (size_t)(static_cast<const uint8_t *>(local) - base), bytes);
    /* the NIC reads the outbox after the call returns: wait until it has, so a later call may
    ** rewrite it (first version: correct before fast; a counter per parity would overlap it) */
    gin.flush(ncclCoopThread{});
}
__device__ __forceinline__ void gin_signal(const Params &p, int dst, ncclGinSignal_t sig) {
    ncclGin gin(p.dc, 0);
    gin.signal(ncclTeamWorld(p.dc), dst, ncclGin_SignalAdd{sig, 1});
}
__device__ __forceinline__ bool gin_wait(const Params &p, ncclGinSignal_t sig, uint64_t want, int peer, int kernel) {
    ncclGin gin(p.dc, 0);
    return wait_for(p, [&] { return gin.readSignal(sig); }, want, peer, kernel);
}

/* ---- flags, one rule per transport ----
** Device API (kGin 0): a flag holds the call number (a plain store of seq after the fences, see
** publish; wait >= seq).
** Put/signal (kGin 1, 2): a flag counts calls, as GIN's signals do (kGin 2: the signal itself;
** kGin 1: the same count in the flag word, added with red.release.sys), so the emulation runs
** the counting GIN relies on. `remote` is the flag in the peer's window (unused by GIN). */
__device__ __forceinline__ void red_add_release(uint64_t *f, uint64_t v) {
    asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(f), "l"(v) : "memory");
}
/* Device API: a plain (volatile) system-scope store, not st.release: it is called by the last
** block after its ticket (last_block_done), and what it publishes is already done. A send
** kernel's blocks each fenced at system scope before their tickets, so their stores into the
** peer's window were visible to it before the flag is stored (the classic pattern: data,
** __threadfence_system, flag); an ack covers the receive's reads of the sender's slots, and those
** returned their values (stored into the masked layout) before each block's fence and ticket.
** The release's own system fence cost ~1.6 us at the end of each kernel (bench_ep trace, 2 x
** H200, 2026-11-30). The receiver still acquires (ld.acquire.sys) before it reads the payload. */
template <int kGin>
__device__ __forceinline__ void publish(const Params &p, int r, uint64_t *remote, ncclGinSignal_t sig, uint64_t seq) {
    if (kGin == 2) gin_signal(p, r, sig);
    else if (kGin == 1) red_add_release(remote, 1);
    else *reinterpret_cast<volatile uint64_t *>(remote) = seq;
}
/* waits for a flag in this rank's window (or GIN signal) to reach `seq` (kGin 0) or `count` */
template <int kGin>
__device__ __forceinline__ bool await(const Params &p, const uint64_t *local, ncclGinSignal_t sig, uint64_t seq,
                                      uint64_t count, int peer, int kernel) {
    if (kGin == 2) return gin_wait(p, sig, count, peer, kernel);
    return wait_at_least(p, local, kGin ? count : seq, peer, kernel);
}

/* Called by all threads of a block after its share of the work: true in exactly one block, the
** last to finish, once every other block's work happens before what that block does next.
** Resets the ticket. kSysStores: the blocks stored into peers' windows, and the last block
** publishes flags that must cover those stores, so each block fences at system scope before its
** ticket; otherwise (receive kernels: their stores are read by later kernels on the stream, and
** the acks only need the window reads done) a GPU-scope fence orders the block's work before
** the ticket. Either way the last block acquires at GPU scope (the ticket is a GPU-local atomic)
** and then publishes: on the device API a plain store (publish says why that suffices), under
** the put/signal emulation red.release.sys (cumulative: it covers what the other blocks did
** before their tickets). GIN (kGin 2) keeps system-scope fences both sides: its signal is a NIC
** operation, not a release store. */
template <bool kSysStores, bool kSysAcquire>
__device__ __forceinline__ bool last_block_done(unsigned *ticket) {
    __shared__ bool last;
    __syncthreads();
    if (threadIdx.x == 0) {
        if (kSysStores) __threadfence_system();
        else __threadfence();
        last = atomicAdd(ticket, 1u) == gridDim.x - 1;
        if (last) {
            if (kSysAcquire) __threadfence_system();
            else __threadfence();
            *ticket = 0; /* the next launch on this stream starts from zero */
        }
    }
    __syncthreads();
    return last;
}

/* ---- dev only (-DEPMOE_EP_TRACE, `make dev-trace`): where a kernel's time goes ------------
** Per kernel: block 0's globaltimer and clock64 at points 0..7 (0 = entry), the latest block
** entry and the latest end of a block's share of the work (atomicMax), and the last block's
** stamps after its ticket and at exit. Costs nothing when not compiled in. */
enum { kTraceSlots = 24, kTraceMaxStart = 16, kTraceMaxWorkEnd = 17, kTraceLastTicket = 18, kTraceLastExit = 19 };
#ifdef EPMOE_EP_TRACE
__device__ __forceinline__ unsigned long long trace_now() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
__device__ __forceinline__ void trace_point(const Params &p, int kernel, int pt) { /* block 0, one thread */
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        p.trace[kernel * kTraceSlots + pt] = trace_now();
        p.trace[kernel * kTraceSlots + 8 + pt] = (unsigned long long)clock64();
    }
}
__device__ __forceinline__ void trace_max(const Params &p, int kernel, int slot) { /* one thread per block */
    if (threadIdx.x == 0) atomicMax(&p.trace[kernel * kTraceSlots + slot], trace_now());
}
__device__ __forceinline__ void trace_set(const Params &p, int kernel, int slot) { /* the calling thread */
    p.trace[kernel * kTraceSlots + slot] = trace_now();
}
#define EP_TRACE(call) call
#else
#define EP_TRACE(call) ((void)0)
#endif

/* pre[1..R] holds a count per rank: warp 0 turns it into the inclusive prefix (pre[0] = 0), 32
** ranks per step with shuffles. Called by every thread between barriers that order pre's writes
** and its readers. (One thread summing R counts read from global memory took R round trips.) */
__device__ __forceinline__ void scan_ranks(int *pre, int R) {
    if (threadIdx.x >= 32) return;
    const int lane = threadIdx.x;
    int carry = 0;
    for (int base = 0; base < R; base += 32) {
        int v = base + lane < R ? pre[base + lane + 1] : 0;
#pragma unroll
        for (int o = 1; o < 32; o *= 2) {
            const int n = __shfl_up_sync(0xFFFFFFFFu, v, o);
            if (lane >= o) v += n;
        }
        if (base + lane < R) pre[base + lane + 1] = carry + v;
        carry += __shfl_sync(0xFFFFFFFFu, v, 31);
    }
    if (lane == 0) pre[0] = 0;
}

/* ---- messages to blocks in two rounds (dispatch receive, combine send) -----------------------
** The first round is fixed before any count is known: block b takes message b / R of source
** b % R (if that source has it), so a block can load its first message while the counts are
** still on their way. The messages past each source's first round are then spread evenly over all
** blocks by a prefix over sources (pre[r + 1] - pre[r] = cnt[r] - first_round(cnt[r], r, R)). */
__device__ __forceinline__ int first_round(int cnt, int src, int R) { /* messages of src in the first round */
    const int grid = (int)gridDim.x;
    return min(cnt, src < grid ? (grid - src + R - 1) / R : 0);
}
/* the block's iterations: m = -1 is its first-round message, m >= 0 the later ones */
__device__ __forceinline__ int next_round_msg(int m) { return m < 0 ? (int)blockIdx.x : m + (int)gridDim.x; }
__device__ __forceinline__ void later_round_msg(const int *pre, const int *cnt, int R, int m, int *src, int *i) {
    int s = 0;
    while (pre[s + 1] <= m) s++;
    *src = s, *i = m - pre[s] + first_round(cnt[s], s, R);
}

/* ---- the halves overlap at their seam (programmatic dependent launch, sm_90) -------------
** A send kernel lets its dependents launch as soon as all its blocks run; a receive kernel is
** launched as such a dependent, so its launch (block scheduling, parameters) happens under the
** send's tail (2.7 us from the send's last block to the receive's first, measured with bench_ep's
** trace). Unless joined to its own send (receive_entry), the receive then waits for the prior
** grid (griddepcontrol.wait) before anything else: the kernel before it need not be our send (a
** receive after a receive, or a caller's kernel in a split forward, which may itself let
** dependents launch early), and it reads state such kernels write (the call counters in p.seqs,
** the buffers it then overwrites). The fallback's receive
** follows an NCCL exchange: it is launched normally (and the wait is then a no-op). */
__device__ __forceinline__ void let_dependents_launch() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void wait_for_prior_grid() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
/* A receive kernel's first step. Split halves: wait for the prior grid (above). Joined to its own
** send (phase BOTH, Params::joined) it need not: that send was launched normally, so everything
** before it on the stream had finished, and all its blocks are running by the time this kernel
** starts (they let dependents launch first thing), so this kernel's waiting blocks cannot keep
** it from finishing. The send's own messages, counts and flags are acquired through the flags, as
** a peer's are. The receive then waits for its flags while the send still runs, instead of after
** the send grid's completion and memory flush. Device API only: put/signal keeps the wait (GIN's
** own-rank data is plain stores ordered only by the ticket's fences before a NIC signal, which
** cannot be tested here; and its emulation's dispatch measured 36.5 -> 43.1 us joined). */
__device__ __forceinline__ void receive_entry(const Params &p) {
    if (!p.joined || p.gin) wait_for_prior_grid();
}

/* Launches a receive kernel as a dependent of the kernel before it (overlap: not after an
** NCCL exchange); `what` names it in the failure's message. */
template <typename... Params_, typename... Args>
epmoe_status launch_dependent(const char *what, void (*kernel)(Params_...), int grid, int block, size_t smem, cudaStream_t s,
                              bool overlap, Args... args) {
    cudaLaunchAttribute at;
    at.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at.val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3((unsigned)grid), cfg.blockDim = dim3((unsigned)block), cfg.dynamicSmemBytes = smem, cfg.stream = s;
    cfg.attrs = &at, cfg.numAttrs = overlap ? 1 : 0;
    const cudaError_t e = cudaLaunchKernelEx(&cfg, kernel, args...);
    if (e != cudaSuccess) {
        cudaGetLastError(); /* not left for the next launch's check */
        return epmoe__fail(EPMOE_ERR_CUDA, "%s: launch failed: %s", what, cudaGetErrorString(e));
    }
    return epmoe__launched(what);
}

/* Launchers (ep_dispatch.cu, ep_combine.cu): kernels on the caller's stream, no host sync. */
/* Call numbers are counted on the device, so a captured CUDA graph advances them on every replay;
** combine names its dispatch by `rel`, how many receives ago it was (0 = the latest). */
epmoe_status launch_dispatch_send(const Params &p, const epmoe_dispatch_args &a, int sms, cudaStream_t s);
epmoe_status launch_dispatch_recv(const Params &p, const epmoe_dispatch_args &a, int sms, cudaStream_t s);
epmoe_status launch_combine_send(const Params &p, const epmoe_combine_args &a, uint32_t rel, int sms, cudaStream_t s);
epmoe_status launch_combine_recv(const Params &p, const epmoe_combine_args &a, uint32_t rel, int T, int sms,
                                 cudaStream_t s);

} // namespace epk
