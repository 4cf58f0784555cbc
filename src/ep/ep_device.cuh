/*
** ep_device.cuh — what the EP kernels share: the kernel parameter block, peer addressing over
** the NCCL symmetric window (LSA: NVLink loads/stores into a peer's memory), the release/acquire
** flags, timed waits, the block-completion counter, and the launchers ep_nccl.cu calls.
**
** Protocol (ep_layout.h): payload stores are plain, weakly ordered stores into the peer's
** window; the last block of a kernel to finish publishes each flag with st.release.sys after a
** system fence, and a receiver reads it with ld.acquire.sys. Every wait gives up after the
** configured timeout, records the first error in host-mapped memory and lets the kernel exit.
*/
#pragma once

#include <nccl.h>
#include <nccl_device.h>

#include "../cuda/common.cuh"
#include "ep_internal.h"

namespace epk {

constexpr int kThreads = 256;
constexpr int kBatch = 4;             /* 16-byte loads a thread keeps in flight before using them */
constexpr int kMaxPlanEntries = 8192; /* N * k per rank: the plan lives in shared memory */

/* Device-side state of one parity (one live dispatch). */
struct CallState {
    int16_t *topk;  /* [N, k] ids as sent (-1: none or owner inactive) */
    int32_t *begin; /* [L, R] */
    int32_t *n_msgs; /* [R] */
    uint8_t *hdrs;  /* [R, slots, header_bytes] */
};

struct Params {
    ep_dims d;
    ep_window w;
    ncclWindow_t win;
    const int *active;        /* [R] device copy of the active set at dispatch */
    CallState st[2];
    unsigned *counters;       /* [4]: block-completion tickets of the four kernels */
    unsigned *seqs;           /* [2]: dispatches sent, dispatches received (device-side, graph-safe) */
    int *error;               /* host-mapped: 0, or (code << 24 | peer << 8 | kernel) */
    unsigned long long timeout_ns;
    int round_scale, scale_fmt;
};

/* Error codes in *error (kept in step with epmoe_status where they map). */
constexpr int kErrTimeout = EPMOE_ERR_TIMEOUT, kErrBadExpert = EPMOE_ERR_INVALID_ARG;

__device__ __forceinline__ uint8_t *peer_base(const Params &p, int r) {
    return static_cast<uint8_t *>(ncclGetPeerPointer(p.win, 0, r));
}
__device__ __forceinline__ uint8_t *my_base(const Params &p) { return static_cast<uint8_t *>(ncclGetLocalPointer(p.win, 0)); }

__device__ __forceinline__ void st_release(uint64_t *f, uint64_t v) {
    asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(f), "l"(v) : "memory");
}
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

/* Spin until *f >= want; false on timeout (the error is recorded) or when another wait failed. */
__device__ __forceinline__ bool wait_at_least(const Params &p, const uint64_t *f, uint64_t want, int peer, int kernel) {
    const unsigned long long t0 = now_ns();
    for (unsigned spin = 1; ld_acquire(f) < want; spin++) {
        if (now_ns() - t0 > p.timeout_ns) {
            set_error(p, kErrTimeout, peer, kernel);
            return false;
        }
        /* another wait already failed? (host-mapped memory: a PCIe read, so only now and then) */
        if (!(spin & 4095) && *(volatile int *)p.error) return false;
    }
    return true;
}

/* Called by all threads of a block after its share of the work: true in exactly one block, the
** last to finish, once every other block's stores are visible system-wide. Resets the ticket. */
__device__ __forceinline__ bool last_block_done(unsigned *ticket) {
    __shared__ bool last;
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence_system();
        last = atomicAdd(ticket, 1u) == gridDim.x - 1;
        if (last) {
            __threadfence_system();
            *ticket = 0; /* the next launch on this stream starts from zero */
        }
    }
    __syncthreads();
    return last;
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
