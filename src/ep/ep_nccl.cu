/*
** ep_nccl.cu — the NCCL backends of dispatch/combine, host side: an EP group on a communicator
** and the launch helpers that create one. The transports share the kernels (ep_dispatch.cu,
** ep_combine.cu), the device state and this file:
**   device API (EPMOE_BACKEND_NCCL_LSA): a symmetric window (ncclMemAlloc +
**     ncclCommWindowRegister) and a device communicator, which proves every rank is reachable
**     by NVLink load/store; kernels store straight into peers' windows.
**   put/signal (EPMOE_BACKEND_NCCL_GIN, and EPMOE_BACKEND_NCCL_GIN_EMULATED over NVLink): the
**     same window with an outbox after it; kernels build what goes to other ranks there and
**     put it to where LSA would store it, then signal (ep_layout.h, ep_outbox).
**   padded all-to-all (EPMOE_BACKEND_NCCL_A2A), the fallback: kernels pack fixed-size slabs in
**     one cudaMalloc buffer and grouped ncclSend/ncclRecv on the caller's stream move them.
** AUTO picks the device API on one NVLink domain, else the fallback (not GIN yet). The
** environment and file parts of launching are ep_launch.c.
**
** NCCL's send/recv wait for their peer forever, so the fallback has a watchdog thread (as
** PyTorch's ProcessGroupNCCL does): each exchange records an event; one still pending after
** timeout_ms records EPMOE_ERR_TIMEOUT for epmoe_ep_poll and, if the ep owns the communicator
** (the launch helpers), aborts it, which releases NCCL's waiting kernels and so the stream.
*/
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <algorithm>
#include <atomic>
#include <mutex>
#include <thread>

#include "ep_device.cuh"

static_assert(sizeof(ncclUniqueId) == EPMOE_NCCL_UNIQUE_ID_BYTES, "NCCL unique id size");

namespace {

struct Watchdog;

struct NcclImpl {
    Watchdog *watch;  /* a2a: the exchange watchdog (NULL without a timeout) */
    ncclComm_t comm;
    int device;
    bool a2a;
    void *win_buf;    /* device API: the symmetric window */
    ncclWindow_t win;
    ncclDevComm dc;
    void *box;        /* a2a: the slabs */
    epk::Params params;
    void *state;      /* device: per-parity call state, the active set, the tickets */
    int *error_host;  /* host-mapped: the first error a kernel hit */
    int sms;
};

#ifdef EPMOE_EP_TRACE
constexpr size_t kTraceBytes = 4 * epk::kTraceSlots * sizeof(unsigned long long);
#else
constexpr size_t kTraceBytes = 0;
#endif

constexpr int kKernelExchange = 5; /* the "kernel" a timed-out exchange reports in *error */

/* The fallback's watchdog: the last few exchanges' start and end events, checked every
** millisecond by its own thread on the ep's device; an exchange's clock starts when its start
** event completes (the stream reached it), not when it was enqueued. It fires at most once.
** Two locks: `mu` guards the slots only and is never held across an NCCL call, so a caller
** blocked inside NCCL cannot stop the watchdog; `comm_mu` keeps exchange() and the abort apart,
** but the abort goes ahead without it after 200 ms (a caller stuck inside NCCL holds it, and
** NCCL's abort is what frees that caller). */
struct Watchdog {
    static constexpr int kSlots = 8;
    struct Slot {
        cudaEvent_t start, end;
        std::chrono::steady_clock::time_point deadline;
        bool live, started, claimed; /* claimed: between begin() and end() */
    };
    int device;
    std::chrono::milliseconds timeout;
    std::mutex mu;
    std::timed_mutex comm_mu;
    std::condition_variable cv;
    bool stop = false;
    std::atomic<bool> fired{false}, aborted{false}; /* read by the ep's thread too */
    Slot slot[kSlots] = {};
    int next = 0;
    ncclComm_t abort_comm = nullptr; /* under mu: the ep's own communicator, once the launch helper owns it */
    std::thread th;

    void run(int *error_host) {
        cudaSetDevice(device);
        /* its event queries must not invalidate another thread's stream capture (global mode) */
        cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
        cudaThreadExchangeStreamCaptureMode(&mode);
        std::unique_lock<std::mutex> lk(mu);
        while (!stop && !fired) {
            cv.wait_for(lk, std::chrono::milliseconds(1));
            const auto now = std::chrono::steady_clock::now();
            for (Slot &sl : slot) {
                if (!sl.live) continue;
                if (!sl.started) {
                    if (cudaEventQuery(sl.start) == cudaErrorNotReady) continue;
                    sl.started = true, sl.deadline = now + timeout;
                }
                const cudaError_t q = cudaEventQuery(sl.end);
                if (q != cudaErrorNotReady) sl.live = false; /* done (or a CUDA error the stream reports) */
                else if (now > sl.deadline) fired = true;
            }
        }
        if (!fired) return;
        ncclComm_t comm = abort_comm;
        abort_comm = nullptr;
        lk.unlock();
        /* the timeout replaces any earlier error (the ep's thread clears only the one it read);
        ** peer unknown (NCCL does not say which one is missing): 0xFFFF */
        const int timeout_word = (EPMOE_ERR_TIMEOUT << 24) | (0xFFFF << 8) | kKernelExchange;
        int seen = __atomic_load_n(error_host, __ATOMIC_SEQ_CST);
        while ((seen >> 24) != EPMOE_ERR_TIMEOUT &&
               !__atomic_compare_exchange_n(error_host, &seen, timeout_word, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
        }
        /* NCCL wants one thread on a communicator at a time: the abort waits for exchange()
        ** to leave NCCL. A caller stuck inside NCCL for 200 ms (its host queue full behind the
        ** hung kernel) is the one case where it aborts alongside: as PyTorch's watchdog does,
        ** relying on the abort to release that caller, at the risk NCCL's rule names. */
        if (comm) {
            const bool locked = comm_mu.try_lock_for(std::chrono::milliseconds(200));
            ncclCommAbort(comm);
            aborted = true;
            if (locked) comm_mu.unlock();
        }
    }
    /* Around an exchange on s: begin() before it is enqueued (-1 while s is being captured: a
    ** graph's replays run without the watchdog), end() after. Events are recorded outside mu.
    ** A live slot is never reused: with every slot live, the exchange goes unwatched (-1), which
    ** loses nothing as long as the exchanges share a stream (an older watched one is ahead of it
    ** and cannot finish either). */
    int begin(cudaStream_t s) {
        cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
        if (cudaStreamIsCapturing(s, &cs) != cudaSuccess || cs != cudaStreamCaptureStatusNone) return -1;
        int i = -1;
        {
            std::lock_guard<std::mutex> lk(mu);
            for (int n = 0; n < kSlots && i < 0; n++, next = (next + 1) % kSlots)
                if (!slot[next].live && !slot[next].claimed) i = next;
            if (i < 0) return -1;
            slot[i].claimed = true;
        }
        if (cudaEventRecord(slot[i].start, s) == cudaSuccess) return i;
        std::lock_guard<std::mutex> lk(mu);
        slot[i].claimed = false;
        return -1;
    }
    /* false when the end event could not be recorded (the exchange is enqueued but unwatched) */
    bool end(int i, cudaStream_t s) {
        if (i < 0) return true;
        const bool ok = cudaEventRecord(slot[i].end, s) == cudaSuccess;
        std::lock_guard<std::mutex> lk(mu);
        slot[i].claimed = false, slot[i].started = false, slot[i].live = ok;
        return ok;
    }
    /* a claimed slot whose exchange was never enqueued */
    void release(int i) {
        if (i < 0) return;
        std::lock_guard<std::mutex> lk(mu);
        slot[i].claimed = false;
    }
    void shutdown() {
        {
            std::lock_guard<std::mutex> lk(mu);
            stop = true;
        }
        cv.notify_all();
        if (th.joinable()) th.join();
        for (Slot &sl : slot) cudaEventDestroy(sl.start), cudaEventDestroy(sl.end);
    }
};

Watchdog *watchdog_start(int device, int timeout_ms, int *error_host) {
    Watchdog *w = nullptr;
    int made = 0;
    try { /* no exception may cross the C interface: without a watchdog the exchange waits as NCCL does */
        w = new Watchdog();
        w->device = device, w->timeout = std::chrono::milliseconds(timeout_ms);
        for (; made < Watchdog::kSlots; made++) {
            Watchdog::Slot &sl = w->slot[made];
            if (cudaEventCreateWithFlags(&sl.start, cudaEventDisableTiming) != cudaSuccess) break;
            if (cudaEventCreateWithFlags(&sl.end, cudaEventDisableTiming) != cudaSuccess) {
                cudaEventDestroy(sl.start);
                break;
            }
        }
        if (made == Watchdog::kSlots) {
            w->th = std::thread([w, error_host] { w->run(error_host); });
            return w;
        }
    } catch (...) {
    }
    if (w) {
        while (made--) cudaEventDestroy(w->slot[made].start), cudaEventDestroy(w->slot[made].end);
        delete w;
    }
    return nullptr;
}

/* ncclGetLastError arrived in NCCL 2.13; the fallback may run on an older libnccl. */
const char *nccl_detail(ncclComm_t comm) {
    int v = 0;
    ncclGetVersion(&v);
    return v >= 21300 ? ncclGetLastError(comm) : "no detail before NCCL 2.13";
}

#define NCCL_TRY(call, what)                                                                                           \
    do {                                                                                                               \
        ncclResult_t r_ = (call);                                                                                      \
        if (r_ != ncclSuccess) {                                                                                       \
            st = epmoe__fail(EPMOE_ERR_NCCL, "epmoe_ep_create_nccl: %s failed: %s (%s)", what, ncclGetErrorString(r_), \
                             nccl_detail(comm));                                                                       \
            goto fail;                                                                                                 \
        }                                                                                                              \
    } while (0)

#define CUDA_TRY(call, what)                                                                                           \
    do {                                                                                                               \
        cudaError_t e_ = (call);                                                                                       \
        if (e_ != cudaSuccess) {                                                                                       \
            st = epmoe__fail(EPMOE_ERR_CUDA, "epmoe_ep_create_nccl: %s failed: %s", what, cudaGetErrorString(e_));     \
            goto fail;                                                                                                 \
        }                                                                                                              \
    } while (0)

NcclImpl *impl_of(epmoe_ep *ep) { return static_cast<NcclImpl *>(ep->impl); }

/* Errors recorded by kernels: a timeout fails the group and every later call; a bad expert id
** only through epmoe_ep_poll (`with_bad_ids`). Its slots went out as -1 and every rank's calls
** completed: a call that returned early for it would leave the peers waiting for this rank. */
epmoe_status async_error(epmoe_ep *ep, bool with_bad_ids) {
    NcclImpl *im = impl_of(ep);
    const int e = *(volatile int *)im->error_host;
    if (!e) return EPMOE_OK;
    const int code = e >> 24, peer = (e >> 8) & 0xFFFF, kernel = e & 0xFF;
    if (code != EPMOE_ERR_TIMEOUT && !with_bad_ids) return EPMOE_OK;
    static const char *kernels[] = {"dispatch send (ids)", "dispatch send", "dispatch receive", "combine send",
                                    "combine receive", "the all-to-all exchange"};
    const char *kn = kernel <= kKernelExchange ? kernels[kernel] : "?";
    if (code == EPMOE_ERR_TIMEOUT) {
        ep->failed = EPMOE_ERR_TIMEOUT;
        if (peer == 0xFFFF)
            return epmoe__fail(EPMOE_ERR_TIMEOUT, "rank %d: %s waited %d ms for a peer; the group is failed%s", ep->cfg.rank,
                               kn, ep->cfg.timeout_ms, ep->owned_comm || (im->watch && im->watch->aborted)
                                                           ? " (its communicator was aborted)"
                                                           : " (abort the communicator: NCCL still waits)");
        return epmoe__fail(EPMOE_ERR_TIMEOUT, "rank %d: %s waited %d ms for rank %d; the group is failed", ep->cfg.rank, kn,
                           ep->cfg.timeout_ms, peer);
    }
    /* reported once (the bad ids were sent as -1); a timeout the watchdog wrote since stays */
    int seen = e;
    __atomic_compare_exchange_n(im->error_host, &seen, 0, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return epmoe__fail(EPMOE_ERR_INVALID_ARG, "rank %d: an earlier dispatch had an expert id outside [-1, %d) at token %d; "
                       "those slots were dropped", ep->cfg.rank, ep->cfg.num_experts, peer);
}

/* The watchdog fired: the timeout, even before its word reaches error_host. */
epmoe_status timed_out(epmoe_ep *ep) {
    ep->failed = EPMOE_ERR_TIMEOUT;
    const epmoe_status st = async_error(ep, false);
    if (st == EPMOE_ERR_TIMEOUT) return st;
    return epmoe__fail(EPMOE_ERR_TIMEOUT, "rank %d: the all-to-all exchange waited %d ms for a peer; the group is failed",
                       ep->cfg.rank, ep->cfg.timeout_ms);
}

/* Besides the watchdog's timeout, NCCL reports what it detects (a peer's process died, a
** network error) through the communicator: asked only while no abort can run alongside. */
epmoe_status poll_errors(epmoe_ep *ep) {
    EPMOE_CHECK(async_error(ep, true));
    NcclImpl *im = impl_of(ep);
    if (!im->a2a) return EPMOE_OK;
    std::unique_lock<std::timed_mutex> lk;
    if (im->watch) {
        lk = std::unique_lock<std::timed_mutex>(im->watch->comm_mu, std::try_to_lock);
        if (im->watch->fired || im->watch->aborted) return timed_out(ep);
        if (!lk.owns_lock()) return EPMOE_OK; /* an exchange is inside NCCL: ask next time */
    }
    ncclResult_t r = ncclSuccess;
    if (ncclCommGetAsyncError(im->comm, &r) == ncclSuccess && r != ncclSuccess && r != ncclInProgress) {
        ep->failed = EPMOE_ERR_NCCL;
        return epmoe__fail(EPMOE_ERR_NCCL, "rank %d: the communicator reports %s (%s); the group is failed", ep->cfg.rank,
                           ncclGetErrorString(r), nccl_detail(im->comm));
    }
    return EPMOE_OK;
}

/* The kernels' parameters for one call: the fallback passes the call's number from the host. */
epk::Params params_for(const NcclImpl *im, const ep_call *c) {
    epk::Params p = im->params;
    p.host_seq = c->seq;
    p.joined = c->joined;
    return p;
}

/* The padded all-to-all: slab r of `out` goes to rank r, whose slab `me` of `in` receives it
** (a rank's own slab is already in its inbox: the kernel wrote it there). Fixed sizes, so
** nothing waits for a count on the host; inactive ranks are skipped, so a failed rank does not
** stall the others. A failure leaves the group in an unknown state: the ep is failed. */
epmoe_status exchange(epmoe_ep *ep, const char *fn, uint8_t *out, uint8_t *in, int64_t slab, const int *active,
                      cudaStream_t s) {
    NcclImpl *im = impl_of(ep);
    const int R = ep->d.R, me = ep->d.rank;
    const size_t bytes = (size_t)slab;
    int peers = 0;
    for (int peer = 0; peer < R; peer++) peers += peer != me && active[peer];
    if (!peers) return EPMOE_OK; /* one rank (or every other one masked out): nothing to move */
    std::unique_lock<std::timed_mutex> lk; /* with a watchdog: never alongside its abort */
    int slot = -1;
    if (im->watch) {
        lk = std::unique_lock<std::timed_mutex>(im->watch->comm_mu);
        if (im->watch->fired || im->watch->aborted) return timed_out(ep);
        slot = im->watch->begin(s);
    }
    ncclResult_t r = ncclGroupStart();
    if (r != ncclSuccess) goto fail;
    for (int peer = 0; peer < R && r == ncclSuccess; peer++) {
        if (peer == me || !active[peer]) continue;
        r = ncclSend(out + (size_t)peer * bytes, bytes, ncclUint8, peer, im->comm, s);
        if (r == ncclSuccess) r = ncclRecv(in + (size_t)peer * bytes, bytes, ncclUint8, peer, im->comm, s);
    }
    {
        const ncclResult_t e = ncclGroupEnd(); /* always closed, even after a failed call inside */
        if (r == ncclSuccess) r = e;
    }
    if (r == ncclSuccess) {
        if (!im->watch || im->watch->end(slot, s)) return EPMOE_OK;
        ep->failed = EPMOE_ERR_CUDA;
        return epmoe__fail(EPMOE_ERR_CUDA, "%s: rank %d: the exchange is enqueued but its watchdog event could not be "
                           "recorded (%s); the group is failed", fn, ep->cfg.rank, cudaGetErrorString(cudaGetLastError()));
    }
fail:
    if (im->watch) im->watch->release(slot); /* nothing was enqueued to watch */
    if (im->watch && im->watch->fired) return timed_out(ep); /* an abort ended the call; the comm is gone */
    ep->failed = EPMOE_ERR_NCCL;
    return epmoe__fail(EPMOE_ERR_NCCL, "%s: rank %d: the slab exchange failed: %s (%s); the group is failed", fn, ep->cfg.rank,
                       ncclGetErrorString(r), nccl_detail(im->comm));
}

/* The four halves below: ep.c has checked every pointer's alignment before anything is sent. */
epmoe_status nccl_dispatch_send(epmoe_ep *ep, const epmoe_dispatch_args *a, ep_call *c, epmoe_stream_t s) {
    EPMOE_CHECK(async_error(ep, false));
    NcclImpl *im = impl_of(ep);
    const epk::Params p = params_for(im, c);
    EPMOE_CHECK(epk::launch_dispatch_send(p, *a, im->sms, s));
    if (!im->a2a) return EPMOE_OK;
    uint8_t *box = static_cast<uint8_t *>(im->box);
    const int par = (int)(c->seq & 1);
    return exchange(ep, "epmoe_dispatch (send)", ep_a2a_disp_slab(box, &ep->d, &p.x, 0, 0, 0),
                    ep_a2a_disp_slab(box, &ep->d, &p.x, 1, par, 0), p.x.disp_slab, c->active, s);
}

epmoe_status nccl_dispatch_recv(epmoe_ep *ep, const epmoe_dispatch_args *a, ep_call *c, epmoe_stream_t s) {
    EPMOE_CHECK(async_error(ep, false));
    NcclImpl *im = impl_of(ep);
    return epk::launch_dispatch_recv(params_for(im, c), *a, im->sms, s);
}

epmoe_status nccl_combine_send(epmoe_ep *ep, const epmoe_combine_args *a, ep_call *c, epmoe_stream_t s) {
    EPMOE_CHECK(async_error(ep, false));
    NcclImpl *im = impl_of(ep);
    const epk::Params p = params_for(im, c);
    EPMOE_CHECK(epk::launch_combine_send(p, *a, ep->recv_seq - c->seq, im->sms, s));
    if (!im->a2a) return EPMOE_OK;
    uint8_t *box = static_cast<uint8_t *>(im->box);
    const int par = (int)(c->seq & 1);
    return exchange(ep, "epmoe_combine (send)", ep_a2a_comb_slab(box, &ep->d, &p.x, 0, 0, 0),
                    ep_a2a_comb_slab(box, &ep->d, &p.x, 1, par, 0), p.x.comb_slab, c->active, s);
}

epmoe_status nccl_combine_recv(epmoe_ep *ep, const epmoe_combine_args *a, ep_call *c, epmoe_stream_t s) {
    EPMOE_CHECK(async_error(ep, false));
    NcclImpl *im = impl_of(ep);
    return epk::launch_combine_recv(params_for(im, c), *a, ep->recv_seq - c->seq, c->T, im->sms, s);
}

void nccl_destroy(epmoe_ep *ep) {
    NcclImpl *im = impl_of(ep);
    if (!im) return;
    int prev = -1;
    cudaGetDevice(&prev);
    cudaSetDevice(im->device); /* the ep's GPU, whichever thread tears it down */
    if (im->watch) { /* stopped first; a communicator it aborted is gone */
        im->watch->shutdown();
        if (im->watch->fired) ep->failed = EPMOE_ERR_TIMEOUT; /* NCCL's kernel may still wait: no device sync below */
        if (im->watch->aborted) ep->owned_comm = nullptr;
    }
    const bool aborted = im->watch && im->watch->aborted;
    delete im->watch;
    im->watch = nullptr;
    /* A failed all-to-all may have an NCCL kernel waiting for a dead peer forever: abort the
    ** communicator first if it is ours; if it is the caller's, leak the slabs (cudaFree would
    ** wait for that kernel) and leave the abort to the caller. */
    bool stuck = false;
    if (ep->failed && im->a2a && !aborted) {
        if (ep->owned_comm) ncclCommAbort(ep->owned_comm), ep->owned_comm = nullptr;
        else stuck = true;
    }
    if (!stuck) {
        cudaDeviceSynchronize(); /* no kernel of ours may still touch the window or the slabs */
        if (!ep->failed && !im->a2a) { /* collective: a failed group leaks its window instead of hanging */
            ncclDevCommDestroy(im->comm, &im->dc);
            ncclCommWindowDeregister(im->comm, im->win);
            ncclMemFree(im->win_buf);
        }
        if (im->box) cudaFree(im->box);
        cudaFree(im->state);
        cudaFreeHost(im->error_host);
    }
    delete im;
    ep->impl = nullptr;
    if (prev >= 0) cudaSetDevice(prev);
}

epmoe_status nccl_set_active(epmoe_ep *ep) {
    NcclImpl *im = impl_of(ep);
    cudaError_t e = cudaMemcpy(const_cast<int *>(im->params.active), ep->active, sizeof(int) * (size_t)ep->d.R,
                               cudaMemcpyHostToDevice);
    return e == cudaSuccess ? EPMOE_OK : epmoe__fail(EPMOE_ERR_CUDA, "epmoe_ep_set_active_ranks: %s", cudaGetErrorString(e));
}

const ep_backend_ops nccl_ops = {nccl_dispatch_send, nccl_dispatch_recv, nccl_combine_send, nccl_combine_recv,
                                 nccl_destroy, poll_errors, nccl_set_active};

/* What each rank tells the others at creation, so that all of them choose the same transport. */
struct Hello {
    epmoe_ep_config cfg;
    int transport;  /* the rank's resolved epmoe_transport */
    int device_ok;  /* its libnccl matches the headers and its window could be allocated */
    int version;    /* its libnccl */
};

} // namespace

extern "C" epmoe_status epmoe_ep_create_nccl(struct ncclComm *comm, const epmoe_ep_config *cfg_in, epmoe_ep **out) {
    static const char fn[] = "epmoe_ep_create_nccl";
    if (!comm || !out) return epmoe__fail(EPMOE_ERR_NULL_POINTER, "%s: comm and ep must not be NULL", fn);
    EPMOE_CHECK(epmoe__ep_check_config(fn, cfg_in));
    epmoe_ep_config cfg_copy;
    epmoe__ep_config_copy(cfg_in, &cfg_copy);
    const epmoe_ep_config *cfg = &cfg_copy;
    epmoe_transport want;
    EPMOE_CHECK(epmoe__ep_transport(fn, cfg, &want));
    int nranks = 0, rank = 0, version = 0;
    if (ncclCommCount(comm, &nranks) != ncclSuccess || ncclCommUserRank(comm, &rank) != ncclSuccess)
        return epmoe__fail(EPMOE_ERR_NCCL, "%s: the communicator does not answer ncclCommCount/UserRank", fn);
    if (nranks != cfg->num_ranks || rank != cfg->rank)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: config says rank %d of %d, the communicator rank %d of %d", fn,
                           cfg->rank, cfg->num_ranks, rank, nranks);
    ncclGetVersion(&version);
    if (cfg->num_ranks > epk::kMaxGpuRanks)
        return epmoe__fail(EPMOE_ERR_UNSUPPORTED, "%s: %d ranks; the GPU backend supports at most %d", fn, cfg->num_ranks,
                           epk::kMaxGpuRanks);
    /* the send kernel's counts and the receive's offsets, which both transports use, live in
    ** shared memory, with a token's row and a message */
    ep_dims dims;
    ep_dims_init(&dims, cfg->num_ranks, cfg->rank, cfg->max_tokens, cfg->hidden, cfg->num_experts, cfg->top_k,
                 cfg->wire == EPMOE_WIRE_FP8, cfg->dedup, cfg->combine_mode == EPMOE_COMBINE_REDUCE_AT_EXPERT);
    const size_t smem_need = std::max(epk::send_smem(cfg->num_experts, cfg->num_ranks, cfg->hidden, cfg->top_k), epk::recv_smem(dims));
    {
        /* the device's opt-in limit per block, less the kernel's static shared memory (< 1 KB) */
        int cur = 0, optin = 0;
        if (cudaGetDevice(&cur) != cudaSuccess || cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, cur) != cudaSuccess)
            return epmoe__fail(EPMOE_ERR_CUDA, "%s: cannot query the device's shared memory", fn);
        if (smem_need + 1024 > (size_t)optin)
            return epmoe__fail(EPMOE_ERR_UNSUPPORTED, "%s: dispatch needs %zu bytes of shared memory per block for %d experts, "
                               "%d ranks and hidden %d; this GPU allows %d", fn, smem_need + 1024, cfg->num_experts,
                               cfg->num_ranks, cfg->hidden, optin);
    }

    epmoe_status st = EPMOE_OK;
    epmoe_ep *ep = nullptr;
    NcclImpl *im = nullptr;
    Hello *all = nullptr;
    void *dhello = nullptr;
    cudaStream_t stream = nullptr;
    bool registered = false, devcomm = false, use_device = false, any_device = false, any_a2a = false;
    bool any_gin = false, all_gin = true;
    const char *tname = "device"; /* the transport named in errors */
    int64_t win_bytes = 0;
    int dev = 0, not_ok = -1;
    EPMOE_CHECK(epmoe__ep_alloc(cfg, EPMOE_BACKEND_NCCL_LSA, &ep));
    im = new NcclImpl();
    std::memset(im, 0, sizeof *im);
    im->comm = comm;
    ep->impl = im;
    {
        CUDA_TRY(cudaGetDevice(&dev), "cudaGetDevice");
        im->device = dev;
        /* The device API's calls exist only in a libnccl that matches our headers (an older one
        ** lacks them, and its structs differ): never call them otherwise. */
        Hello me;
        std::memset(&me, 0, sizeof me);
        me.cfg = *cfg, me.transport = want, me.version = version;
        /* put/signal (GIN's protocol, emulated): the window carries the outbox after it */
        ep_outbox_layout(&ep->d, &ep->w, &im->params.o);
        win_bytes = want == EPMOE_TRANSPORT_GIN_EMULATED || want == EPMOE_TRANSPORT_GIN ? im->params.o.total : ep->w.total;
        if (want != EPMOE_TRANSPORT_ALLTOALL && version == NCCL_VERSION_CODE)
            me.device_ok = ncclMemAlloc(&im->win_buf, (size_t)win_bytes) == ncclSuccess;
        if (!me.device_ok) im->win_buf = nullptr;

        /* Every rank must agree on the shape and on the transport: gather it all once, here. */
        all = new Hello[nranks];
        CUDA_TRY(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
        CUDA_TRY(cudaMalloc(&dhello, sizeof(Hello) * (size_t)(nranks + 1)), "cudaMalloc");
        /* on `stream`, before the gather that reads it: a plain cudaMemcpy from pageable memory may
        ** return before its DMA lands, on the legacy stream, which a non-blocking stream does not wait for */
        CUDA_TRY(cudaMemcpyAsync(dhello, &me, sizeof me, cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync");
        NCCL_TRY(ncclAllGather(dhello, static_cast<Hello *>(dhello) + 1, sizeof me, ncclUint8, comm, stream), "ncclAllGather");
        CUDA_TRY(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
        CUDA_TRY(cudaMemcpy(all, static_cast<Hello *>(dhello) + 1, sizeof me * (size_t)nranks, cudaMemcpyDeviceToHost),
                 "cudaMemcpy");
        for (int r = 0; r < nranks; r++) {
            if (!epmoe__ep_same_shape(&all[r].cfg, cfg)) {
                st = epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: rank %d's config differs from rank %d's (max_tokens %d vs %d, "
                                 "hidden %d vs %d, experts %d vs %d, top_k %d vs %d, or the wire/mode fields)", fn, r, rank,
                                 all[r].cfg.max_tokens, cfg->max_tokens, all[r].cfg.hidden, cfg->hidden,
                                 all[r].cfg.num_experts, cfg->num_experts, all[r].cfg.top_k, cfg->top_k);
                goto fail;
            }
            any_device |= all[r].transport == EPMOE_TRANSPORT_DEVICE;
            any_a2a |= all[r].transport == EPMOE_TRANSPORT_ALLTOALL;
            any_gin |= all[r].transport == EPMOE_TRANSPORT_GIN_EMULATED || all[r].transport == EPMOE_TRANSPORT_GIN;
            all_gin &= all[r].transport == want && (want == EPMOE_TRANSPORT_GIN_EMULATED || want == EPMOE_TRANSPORT_GIN);
            if (!all[r].device_ok && not_ok < 0) not_ok = r;
        }
        /* The same data on every rank, so the same decision everywhere. */
        if (any_gin && !all_gin) { /* the window sizes differ: all or none */
            st = epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: some ranks ask for transport \"gin\" or \"gin-emulated\", "
                             "others for another one (config.transport or EPMOE_EP_TRANSPORT)", fn);
            goto fail;
        }
        any_device |= any_gin; /* like DEVICE: never falls back */
        tname = !any_gin ? "device" : want == EPMOE_TRANSPORT_GIN ? "gin" : "gin-emulated";
        if (any_device && any_a2a) {
            st = epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: some ranks ask for transport \"device\", others for \"alltoall\" "
                             "(config.transport or EPMOE_EP_TRANSPORT)", fn);
            goto fail;
        }
        use_device = !any_a2a && not_ok < 0;
        if (!use_device && any_device) {
            const Hello &h = all[not_ok];
            if (h.version != NCCL_VERSION_CODE)
                st = epmoe__fail(EPMOE_ERR_UNSUPPORTED, "%s: transport \"%s\": rank %d's NCCL runtime is %d, but the device "
                                 "API needs the version epmoe was built with (%d); put that libnccl first on LD_LIBRARY_PATH, "
                                 "or use transport \"auto\" for the all-to-all fallback", fn, tname, not_ok, h.version, NCCL_VERSION_CODE);
            else
                st = epmoe__fail(EPMOE_ERR_UNSUPPORTED, "%s: transport \"%s\": rank %d could not allocate its %lld-byte "
                                 "window with ncclMemAlloc (cuMem)", fn, tname, not_ok, (long long)win_bytes);
            goto fail;
        }
        if (use_device) {
            /* Collective steps: each fails on every rank alike (it depends on what all ranks
            ** found out together), so all ranks still agree when AUTO falls back below. */
            const char *why = nullptr;
            ncclDevCommRequirements req;
            std::memset(&req, 0, sizeof req);
            const bool nic = want == EPMOE_TRANSPORT_GIN; /* every rank asked for it (all_gin) */
            if (nic) { /* GIN's signals; without a NIC NCCL then refuses the devcomm */
                req.ginContextCount = 1;
                req.ginSignalCount = epk::kGinSignalsPerRank * nranks;
            }
            CUDA_TRY(cudaMemset(im->win_buf, 0, (size_t)win_bytes), "cudaMemset");
            if (ncclCommWindowRegister(comm, im->win_buf, (size_t)win_bytes, &im->win, NCCL_WIN_COLL_SYMMETRIC) != ncclSuccess) {
                why = "ncclCommWindowRegister failed";
            } else {
                registered = true;
                if (ncclDevCommCreate(comm, &req, &im->dc) != ncclSuccess) {
                    why = nic ? "ncclDevCommCreate with GIN signals failed: GIN needs an IB/RoCE NIC that NCCL's GIN supports "
                                "(NCCL_GIN_ENABLE, NCCL_GIN_TYPE)"
                              : "ncclDevCommCreate failed: symmetric memory needs CUDA P2P between all GPUs and "
                                "NCCL_CUMEM_ENABLE/NCCL_WIN_ENABLE";
                } else {
                    devcomm = true;
                    if (nic && im->dc.ginContextCount < 1)
                        why = "the device communicator has no GIN context";
                    else if (!nic && im->dc.lsaSize != nranks)
                        why = "not every rank is reachable by NVLink load/store; ranks on other nodes need transport "
                              "\"gin\" (AUTO does not choose it yet)";
                }
            }
            if (why && any_device) {
                st = epmoe__fail(EPMOE_ERR_UNSUPPORTED, "%s: transport \"%s\": %s (lsaSize %d of %d ranks; %s)", fn, tname, why,
                                 devcomm ? im->dc.lsaSize : 0, nranks, nccl_detail(comm));
                goto fail;
            }
            if (why) { /* AUTO: undo in reverse order, then the fallback */
                if (devcomm) ncclDevCommDestroy(comm, &im->dc);
                if (registered) ncclCommWindowDeregister(comm, im->win);
                devcomm = registered = use_device = false;
            }
        }
        if (!use_device) {
            if (im->win_buf) ncclMemFree(im->win_buf);
            im->win_buf = nullptr;
            ep_a2a_layout(&ep->d, &im->params.x);
            CUDA_TRY(cudaMalloc(&im->box, (size_t)im->params.x.total), "cudaMalloc (all-to-all slabs)");
            CUDA_TRY(cudaMemset(im->box, 0, (size_t)im->params.x.total), "cudaMemset");
            im->a2a = true;
            ep->backend = EPMOE_BACKEND_NCCL_A2A;
            /* NCCL connects to a peer on the first send/recv with it (every p2p channel, whatever
            ** the size), a blocking host step that needs the peer. Done here, while every rank is
            ** in this collective call, an exchange with a silent peer later only enqueues, and
            ** the watchdog sees it. Into the gathered bytes, already copied out. */
            uint8_t *hb = static_cast<uint8_t *>(dhello);
            NCCL_TRY(ncclGroupStart(), "ncclGroupStart");
            ncclResult_t r = ncclSuccess;
            for (int peer = 0; peer < nranks && r == ncclSuccess; peer++) {
                if (peer == rank) continue;
                r = ncclSend(hb, 1, ncclUint8, peer, comm, stream);
                if (r == ncclSuccess) r = ncclRecv(hb + sizeof(Hello) + peer, 1, ncclUint8, peer, comm, stream);
            }
            const ncclResult_t e = ncclGroupEnd(); /* always closed, even after a failed call inside */
            NCCL_TRY(r != ncclSuccess ? r : e, "connecting the peers (send/recv)");
            CUDA_TRY(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
        }

        /* device state: per parity topk [N,k] int16, n_msgs [R], headers; active [R]; tickets [4] */
        const ep_dims &d = ep->d;
        const size_t topk_b = ep_align(2 * (int64_t)d.N * d.k, 256);
        const size_t nm_b = ep_align(4 * (int64_t)d.R, 256), hdr_b = ep_align(d.R * d.slots * d.header_bytes, 256);
        const size_t per = topk_b + nm_b + hdr_b, total = 2 * per + ep_align(4 * (int64_t)d.R, 256) + 256 + kTraceBytes;
        CUDA_TRY(cudaMalloc(&im->state, total), "cudaMalloc (state)");
        CUDA_TRY(cudaMemset(im->state, 0, total), "cudaMemset (state)");
        uint8_t *base = static_cast<uint8_t *>(im->state);
        for (int par = 0; par < 2; par++) {
            uint8_t *b = base + par * per;
            im->params.st[par].topk = reinterpret_cast<int16_t *>(b);
            im->params.st[par].n_msgs = reinterpret_cast<int32_t *>(b + topk_b);
            im->params.st[par].hdrs = b + topk_b + nm_b;
        }
        int *active = reinterpret_cast<int *>(base + 2 * per);
        im->params.active = active;
        im->params.counters = reinterpret_cast<unsigned *>(base + 2 * per + ep_align(4 * (int64_t)d.R, 256));
        im->params.seqs = im->params.counters + 4;
#ifdef EPMOE_EP_TRACE
        im->params.trace = reinterpret_cast<unsigned long long *>(base + total - kTraceBytes);
#endif
        CUDA_TRY(cudaMemcpy(active, ep->active, sizeof(int) * (size_t)d.R, cudaMemcpyHostToDevice), "cudaMemcpy");
        CUDA_TRY(cudaHostAlloc(&im->error_host, sizeof(int), cudaHostAllocMapped), "cudaHostAlloc");
        *im->error_host = 0;
        CUDA_TRY(cudaHostGetDevicePointer(&im->params.error, im->error_host, 0), "cudaHostGetDevicePointer");
        im->params.d = d;
        im->params.w = ep->w;
        im->params.win = use_device ? im->win : nullptr;
        im->params.gin = !use_device || !all_gin ? 0 : want == EPMOE_TRANSPORT_GIN ? 2 : 1;
        im->params.dc = im->dc;
        if (im->params.gin) ep->backend = im->params.gin == 2 ? EPMOE_BACKEND_NCCL_GIN : EPMOE_BACKEND_NCCL_GIN_EMULATED;
        im->params.a2a = im->a2a;
        im->params.box = static_cast<uint8_t *>(im->box);
        im->params.timeout_ns = (unsigned long long)cfg->timeout_ms * 1000000ull;
        im->params.round_scale = cfg->round_scale;
        im->params.scale_fmt = cfg->scale_fmt;
        CUDA_TRY(cudaDeviceGetAttribute(&im->sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
        CUDA_TRY(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
        if (im->a2a && cfg->timeout_ms > 0) {
            im->watch = watchdog_start(dev, cfg->timeout_ms, im->error_host);
            if (!im->watch) { /* without it a silent peer would hang the caller: not a working ep */
                st = epmoe__fail(EPMOE_ERR_OUT_OF_MEMORY, "%s: cannot start the all-to-all's watchdog thread (events or "
                                 "thread creation failed)", fn);
                goto fail;
            }
        }
    }
    ep->ops = &nccl_ops;
    cudaFree(dhello);
    cudaStreamDestroy(stream);
    delete[] all;
    *out = ep;
    return EPMOE_OK;
fail:
    if (devcomm) ncclDevCommDestroy(comm, &im->dc);
    if (registered) ncclCommWindowDeregister(comm, im->win);
    if (im->win_buf) ncclMemFree(im->win_buf);
    if (im->box) cudaFree(im->box);
    if (im->state) cudaFree(im->state);
    if (im->error_host) cudaFreeHost(im->error_host);
    if (dhello) cudaFree(dhello);
    if (stream) cudaStreamDestroy(stream);
    delete[] all;
    delete im;
    ep->impl = nullptr;
    epmoe__ep_free(ep);
    return st;
}

/* ---- launch helpers: the ep owns the communicator they create ------------------------------ */

extern "C" epmoe_status epmoe_nccl_unique_id(void *out) {
    if (!out) return epmoe__fail(EPMOE_ERR_NULL_POINTER, "epmoe_nccl_unique_id: out is NULL");
    ncclUniqueId id;
    const ncclResult_t r = ncclGetUniqueId(&id);
    if (r != ncclSuccess)
        return epmoe__fail(EPMOE_ERR_NCCL, "epmoe_nccl_unique_id: ncclGetUniqueId failed: %s", ncclGetErrorString(r));
    std::memcpy(out, &id, sizeof id);
    return EPMOE_OK;
}

/* A non-blocking communicator's pending work (its init, a split off it, its finalize): the
** result, or ncclInProgress once timeout_ms have passed. */
ncclResult_t nccl_wait(ncclComm_t comm, int timeout_ms) {
    const double end = epmoe__now_ms() + timeout_ms;
    ncclResult_t r = ncclInternalError;
    while (ncclCommGetAsyncError(comm, &r) == ncclSuccess && r == ncclInProgress) {
        if (epmoe__now_ms() > end) return ncclInProgress;
        std::this_thread::sleep_for(std::chrono::microseconds(500));
    }
    return r;
}

/* The launch helpers' communicator. NCCL's init waits for every rank without a bound, so with NCCL
** 2.18 or later it runs on a non-blocking communicator, which can be polled and aborted; the ep
** then gets a blocking child split off it (the same ranks), so nothing after creation differs from
** a caller's blocking communicator (on a non-blocking one every NCCL call would have to be polled,
** and every group end starts a thread in NCCL). A rank that never joins gives EPMOE_ERR_TIMEOUT
** after wait_ms. NCCL_COMM_BLOCKING=1 in the environment makes the first one blocking too: then
** nothing is bounded. */
epmoe_status owned_comm(const char *fn, int rank, int size, const ncclUniqueId &id, int wait_ms, ncclComm_t *out) {
    int v = 0;
    ncclGetVersion(&v);
    ncclResult_t r;
    if (v < 21800) { /* no split with a config before 2.18: the unbounded init */
        r = ncclCommInitRank(out, size, id, rank);
        if (r != ncclSuccess)
            return epmoe__fail(EPMOE_ERR_NCCL, "%s: rank %d of %d: ncclCommInitRank failed: %s", fn, rank, size,
                               ncclGetErrorString(r));
        return EPMOE_OK;
    }
    ncclConfig_t nonblocking = NCCL_CONFIG_INITIALIZER, blocking = NCCL_CONFIG_INITIALIZER;
    nonblocking.blocking = 0, blocking.blocking = 1;
    ncclComm_t parent = nullptr, child = nullptr;
    const char *step = "ncclCommInitRankConfig";
    r = ncclCommInitRankConfig(&parent, size, id, rank, &nonblocking); /* sets parent at once */
    if (r == ncclSuccess || r == ncclInProgress) r = nccl_wait(parent, wait_ms);
    if (r == ncclSuccess) {
        step = "ncclCommSplit";
        r = ncclCommSplit(parent, 0, rank, &child, &blocking); /* runs in the parent's non-blocking group */
        if (r == ncclSuccess || r == ncclInProgress) r = nccl_wait(parent, wait_ms);
        if (r == ncclSuccess && !child) r = ncclInternalError;
    }
    if (r != ncclSuccess) {
        /* the abort stops a pending init or split (the child's init watches the parent's abort) */
        if (parent) ncclCommAbort(parent);
        if (child) ncclCommAbort(child); /* a split that failed still hands out its communicator */
        if (r == ncclInProgress)
            return epmoe__fail(EPMOE_ERR_TIMEOUT, "%s: rank %d of %d: creating the communicator (%s) waited %d ms for the "
                               "other ranks", fn, rank, size, step, wait_ms);
        return epmoe__fail(EPMOE_ERR_NCCL, "%s: rank %d of %d: %s failed: %s", fn, rank, size, step, ncclGetErrorString(r));
    }
    /* the parent's part is done: finalize it (collective in NCCL's flush, bounded here), then free */
    r = ncclCommFinalize(parent);
    if (r == ncclSuccess || r == ncclInProgress) r = nccl_wait(parent, wait_ms);
    if (r == ncclSuccess) ncclCommDestroy(parent);
    else ncclCommAbort(parent);
    *out = child;
    return EPMOE_OK;
}

extern "C" epmoe_status epmoe__ep_create_nccl_rank_wait(const epmoe_ep_config *cfg_in, int rank, int size,
                                                      const void *unique_id, int device, int wait_ms, epmoe_ep **out) {
    static const char fn[] = "epmoe_ep_create_nccl_rank";
    epmoe_ep_config cfg;
    EPMOE_CHECK(epmoe__ep_rank_args(fn, cfg_in, rank, size, unique_id, out, &cfg));
    cudaError_t e = cudaSetDevice(device);
    if (e != cudaSuccess)
        return epmoe__fail(EPMOE_ERR_CUDA, "%s: rank %d: cudaSetDevice(%d) failed: %s", fn, rank, device, epmoe__cuda_str(e));
    ncclUniqueId id;
    std::memcpy(&id, unique_id, sizeof id);
    ncclComm_t comm;
    EPMOE_CHECK(owned_comm(fn, rank, size, id, wait_ms, &comm));
    const epmoe_status st = epmoe_ep_create_nccl(comm, &cfg, out);
    if (st != EPMOE_OK) {
        ncclCommAbort(comm); /* the peers may be gone or failing too: never wait for them */
        return st;
    }
    (*out)->owned_comm = comm;
    if (Watchdog *w = impl_of(*out)->watch) { /* now the ep's: the watchdog may abort it */
        std::lock_guard<std::mutex> lk(w->mu);
        w->abort_comm = comm;
    }
    return EPMOE_OK;
}

extern "C" void epmoe__ep_release_comm(epmoe_ep *ep) {
    if (ep->failed) ncclCommAbort(ep->owned_comm); /* a dead peer would never finish a clean teardown */
    else ncclCommDestroy(ep->owned_comm);
    ep->owned_comm = nullptr;
}

#ifdef EPMOE_EP_TRACE
/* dev/bench_ep_trace: the device array of time stamps ([4][kTraceSlots], ep_device.cuh) */
extern "C" unsigned long long *epmoe__ep_trace(epmoe_ep *ep) { return impl_of(ep)->params.trace; }
#endif
