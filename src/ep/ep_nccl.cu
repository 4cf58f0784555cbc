/*
** ep_nccl.cu — the NCCL backend of dispatch/combine: an EP group on the caller's communicator.
** Host side only: the symmetric window (ncclMemAlloc + ncclCommWindowRegister), the device
** communicator (which proves every rank is reachable by NVLink load/store), the device state
** and the launches. The kernels are in ep_dispatch.cu and ep_combine.cu.
**
** Within a node every peer is an LSA peer: messages are stored straight into its window. Ranks
** on other nodes need GIN (put + signal), which this build does not have yet: creation then
** fails with EPMOE_ERR_UNSUPPORTED rather than running a slower path silently.
*/
#include <cstring>

#include "ep_device.cuh"

namespace {

struct NcclImpl {
    ncclComm_t comm;
    void *win_buf;
    ncclWindow_t win;
    ncclDevComm dc;
    epk::Params params;
    void *state;      /* device: per-parity call state, the active set, the tickets */
    int *error_host;  /* host-mapped: the first error a kernel hit */
    int sms;
};

#define NCCL_TRY(call, what)                                                                                           \
    do {                                                                                                               \
        ncclResult_t r_ = (call);                                                                                      \
        if (r_ != ncclSuccess) {                                                                                       \
            st = epmoe__fail(EPMOE_ERR_NCCL, "epmoe_ep_create_nccl: %s failed: %s (%s)", what, ncclGetErrorString(r_), \
                             ncclGetLastError(comm));                                                                  \
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

/* Errors recorded by kernels surface at the next call (and through epmoe_ep_poll). */
epmoe_status async_error(epmoe_ep *ep) {
    NcclImpl *im = impl_of(ep);
    const int e = *(volatile int *)im->error_host;
    if (!e) return EPMOE_OK;
    const int code = e >> 24, peer = (e >> 8) & 0xFFFF, kernel = e & 0xFF;
    static const char *kernels[] = {"dispatch send (plan)", "dispatch send", "dispatch receive", "combine send", "combine receive"};
    const char *kn = kernel < 5 ? kernels[kernel] : "?";
    if (code == EPMOE_ERR_TIMEOUT) {
        ep->failed = 1;
        return epmoe__fail(EPMOE_ERR_TIMEOUT, "rank %d: %s waited %d ms for rank %d; the group is failed", ep->cfg.rank, kn,
                           ep->cfg.timeout_ms, peer);
    }
    *(volatile int *)im->error_host = 0; /* reported once; the bad ids were sent as -1 */
    return epmoe__fail(EPMOE_ERR_INVALID_ARG, "rank %d: an earlier dispatch had an expert id outside [-1, %d) at token %d; "
                       "those slots were dropped", ep->cfg.rank, ep->cfg.num_experts, peer);
}

epmoe_status aligned(const char *fn, const void *p, unsigned a, const char *name) {
    if ((uintptr_t)p % a) return epmoe__fail(EPMOE_ERR_MISALIGNED, "%s: %s = %p is not %u-byte aligned", fn, name, p, a);
    return EPMOE_OK;
}

epmoe_status nccl_dispatch_send(epmoe_ep *ep, const epmoe_dispatch_args *a, ep_call *c, epmoe_stream_t s) {
    EPMOE_CHECK(async_error(ep));
    if (a->num_tokens) {
        EPMOE_CHECK(aligned("epmoe_dispatch", a->x, 16, "x"));
        EPMOE_CHECK(aligned("epmoe_dispatch", a->topk_idx, (unsigned)a->topk_idx_bits / 8, "topk_idx"));
    }
    NcclImpl *im = impl_of(ep);
    (void)c;
    return epk::launch_dispatch_send(im->params, *a, im->sms, s);
}

epmoe_status nccl_dispatch_recv(epmoe_ep *ep, const epmoe_dispatch_args *a, ep_call *c, epmoe_stream_t s) {
    EPMOE_CHECK(async_error(ep));
    EPMOE_CHECK(aligned("epmoe_dispatch", a->recv_x, 16, "recv_x"));
    EPMOE_CHECK(aligned("epmoe_dispatch", a->masked_m, 4, "masked_m"));
    if (a->recv_scales) EPMOE_CHECK(aligned("epmoe_dispatch", a->recv_scales, 4, "recv_scales"));
    NcclImpl *im = impl_of(ep);
    (void)c;
    return epk::launch_dispatch_recv(im->params, *a, im->sms, s);
}

epmoe_status nccl_combine_send(epmoe_ep *ep, const epmoe_combine_args *a, ep_call *c, epmoe_stream_t s) {
    EPMOE_CHECK(async_error(ep));
    EPMOE_CHECK(aligned("epmoe_combine", a->expert_out, 16, "expert_out"));
    NcclImpl *im = impl_of(ep);
    return epk::launch_combine_send(im->params, *a, ep->recv_seq - c->seq, im->sms, s);
}

epmoe_status nccl_combine_recv(epmoe_ep *ep, const epmoe_combine_args *a, ep_call *c, epmoe_stream_t s) {
    EPMOE_CHECK(async_error(ep));
    if (c->T) EPMOE_CHECK(aligned("epmoe_combine", a->out, 16, "out"));
    NcclImpl *im = impl_of(ep);
    return epk::launch_combine_recv(im->params, *a, ep->recv_seq - c->seq, c->T, im->sms, s);
}

void nccl_destroy(epmoe_ep *ep) {
    NcclImpl *im = impl_of(ep);
    if (!im) return;
    cudaDeviceSynchronize(); /* no kernel of ours may still touch the window */
    if (!ep->failed) {       /* collective: a failed group leaks its window instead of hanging */
        ncclDevCommDestroy(im->comm, &im->dc);
        ncclCommWindowDeregister(im->comm, im->win);
        ncclMemFree(im->win_buf);
    }
    cudaFree(im->state);
    cudaFreeHost(im->error_host);
    delete im;
    ep->impl = nullptr;
}

epmoe_status nccl_set_active(epmoe_ep *ep) {
    NcclImpl *im = impl_of(ep);
    cudaError_t e = cudaMemcpy(const_cast<int *>(im->params.active), ep->active, sizeof(int) * (size_t)ep->d.R,
                               cudaMemcpyHostToDevice);
    return e == cudaSuccess ? EPMOE_OK : epmoe__fail(EPMOE_ERR_CUDA, "epmoe_ep_set_active_ranks: %s", cudaGetErrorString(e));
}

const ep_backend_ops nccl_ops = {nccl_dispatch_send, nccl_dispatch_recv, nccl_combine_send, nccl_combine_recv,
                                 nccl_destroy, async_error, nccl_set_active};

} // namespace

extern "C" epmoe_status epmoe_ep_create_nccl(struct ncclComm *comm, const epmoe_ep_config *cfg, epmoe_ep **out) {
    static const char fn[] = "epmoe_ep_create_nccl";
    if (!comm || !out) return epmoe__fail(EPMOE_ERR_NULL_POINTER, "%s: comm and ep must not be NULL", fn);
    EPMOE_CHECK(epmoe__ep_check_config(fn, cfg));
    int nranks = 0, rank = 0, version = 0;
    if (ncclCommCount(comm, &nranks) != ncclSuccess || ncclCommUserRank(comm, &rank) != ncclSuccess)
        return epmoe__fail(EPMOE_ERR_NCCL, "%s: the communicator does not answer ncclCommCount/UserRank", fn);
    if (nranks != cfg->num_ranks || rank != cfg->rank)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: config says rank %d of %d, the communicator rank %d of %d", fn,
                           cfg->rank, cfg->num_ranks, rank, nranks);
    ncclGetVersion(&version);
    if (version != NCCL_VERSION_CODE)
        return epmoe__fail(EPMOE_ERR_UNSUPPORTED, "%s: NCCL's device API needs the runtime (%d) to match the headers "
                           "epmoe was built with (%d); put that libnccl first on LD_LIBRARY_PATH", fn, version, NCCL_VERSION_CODE);
    const int keys = cfg->num_experts + cfg->num_ranks;
    const size_t send_smem = sizeof(int) * (size_t)keys * (1 + epk::kThreads / 32) + 10 * (size_t)cfg->max_tokens * cfg->top_k;
    if ((int64_t)cfg->max_tokens * cfg->top_k > epk::kMaxPlanEntries || send_smem > 200 * 1024)
        return epmoe__fail(EPMOE_ERR_UNSUPPORTED, "%s: max_tokens * top_k = %d exceeds the GPU plan's %d entries (or too many "
                           "experts)", fn, cfg->max_tokens * cfg->top_k, epk::kMaxPlanEntries);

    epmoe_status st = EPMOE_OK;
    epmoe_ep *ep = nullptr;
    NcclImpl *im = nullptr;
    epmoe_ep_config *all = nullptr;
    void *dcfg = nullptr;
    cudaStream_t stream = nullptr;
    bool registered = false, devcomm = false;
    EPMOE_CHECK(epmoe__ep_alloc(cfg, EPMOE_BACKEND_NCCL_LSA, &ep));
    im = new NcclImpl();
    std::memset(im, 0, sizeof *im);
    im->comm = comm;
    ep->impl = im;
    {
        /* Every rank must agree on the shape: gather the configs once, here. */
        all = new epmoe_ep_config[nranks];
        CUDA_TRY(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
        CUDA_TRY(cudaMalloc(&dcfg, sizeof(epmoe_ep_config) * (size_t)(nranks + 1)), "cudaMalloc");
        CUDA_TRY(cudaMemcpy(dcfg, cfg, sizeof *cfg, cudaMemcpyHostToDevice), "cudaMemcpy");
        NCCL_TRY(ncclAllGather(dcfg, static_cast<epmoe_ep_config *>(dcfg) + 1, sizeof *cfg, ncclUint8, comm, stream), "ncclAllGather");
        CUDA_TRY(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
        CUDA_TRY(cudaMemcpy(all, static_cast<epmoe_ep_config *>(dcfg) + 1, sizeof *cfg * (size_t)nranks, cudaMemcpyDeviceToHost),
                 "cudaMemcpy");
        for (int r = 0; r < nranks; r++)
            if (!epmoe__ep_same_shape(&all[r], cfg)) {
                st = epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: rank %d's config differs from rank %d's (max_tokens %d vs %d, "
                                 "hidden %d vs %d, experts %d vs %d, top_k %d vs %d, or the wire/mode fields)", fn, r, rank,
                                 all[r].max_tokens, cfg->max_tokens, all[r].hidden, cfg->hidden, all[r].num_experts,
                                 cfg->num_experts, all[r].top_k, cfg->top_k);
                goto fail;
            }

        NCCL_TRY(ncclMemAlloc(&im->win_buf, (size_t)ep->w.total), "ncclMemAlloc");
        CUDA_TRY(cudaMemset(im->win_buf, 0, (size_t)ep->w.total), "cudaMemset");
        NCCL_TRY(ncclCommWindowRegister(comm, im->win_buf, (size_t)ep->w.total, &im->win, NCCL_WIN_COLL_SYMMETRIC),
                 "ncclCommWindowRegister");
        registered = true;
        ncclDevCommRequirements req;
        std::memset(&req, 0, sizeof req);
        if (ncclDevCommCreate(comm, &req, &im->dc) != ncclSuccess) {
            st = epmoe__fail(EPMOE_ERR_UNSUPPORTED, "%s: NCCL's device API is unavailable here (%s): symmetric memory needs "
                             "CUDA P2P between all GPUs and NCCL_CUMEM_ENABLE/NCCL_WIN_ENABLE", fn, ncclGetLastError(comm));
            goto fail;
        }
        devcomm = true;
        if (im->dc.lsaSize != nranks) {
            st = epmoe__fail(EPMOE_ERR_UNSUPPORTED, "%s: only %d of %d ranks are reachable by NVLink load/store; ranks on "
                             "other nodes need the GIN transport, which this build does not have", fn, im->dc.lsaSize, nranks);
            goto fail;
        }

        /* device state: per parity topk [N,k] int16, begin [L,R], n_msgs [R], headers; active [R]; tickets [4] */
        const ep_dims &d = ep->d;
        const size_t topk_b = ep_align(2 * (int64_t)d.N * d.k, 256), begin_b = ep_align(4 * (int64_t)d.L * d.R, 256);
        const size_t nm_b = ep_align(4 * (int64_t)d.R, 256), hdr_b = ep_align(d.R * d.slots * d.header_bytes, 256);
        const size_t per = topk_b + begin_b + nm_b + hdr_b, total = 2 * per + ep_align(4 * (int64_t)d.R, 256) + 256;
        CUDA_TRY(cudaMalloc(&im->state, total), "cudaMalloc (state)");
        CUDA_TRY(cudaMemset(im->state, 0, total), "cudaMemset (state)");
        uint8_t *base = static_cast<uint8_t *>(im->state);
        for (int par = 0; par < 2; par++) {
            uint8_t *b = base + par * per;
            im->params.st[par].topk = reinterpret_cast<int16_t *>(b);
            im->params.st[par].begin = reinterpret_cast<int32_t *>(b + topk_b);
            im->params.st[par].n_msgs = reinterpret_cast<int32_t *>(b + topk_b + begin_b);
            im->params.st[par].hdrs = b + topk_b + begin_b + nm_b;
        }
        int *active = reinterpret_cast<int *>(base + 2 * per);
        im->params.active = active;
        im->params.counters = reinterpret_cast<unsigned *>(base + 2 * per + ep_align(4 * (int64_t)d.R, 256));
        im->params.seqs = im->params.counters + 4;
        CUDA_TRY(cudaMemcpy(active, ep->active, sizeof(int) * (size_t)d.R, cudaMemcpyHostToDevice), "cudaMemcpy");
        CUDA_TRY(cudaHostAlloc(&im->error_host, sizeof(int), cudaHostAllocMapped), "cudaHostAlloc");
        *im->error_host = 0;
        CUDA_TRY(cudaHostGetDevicePointer(&im->params.error, im->error_host, 0), "cudaHostGetDevicePointer");
        im->params.d = d;
        im->params.w = ep->w;
        im->params.win = im->win;
        im->params.timeout_ns = (unsigned long long)cfg->timeout_ms * 1000000ull;
        im->params.round_scale = cfg->round_scale;
        im->params.scale_fmt = cfg->scale_fmt;
        int dev = 0;
        CUDA_TRY(cudaGetDevice(&dev), "cudaGetDevice");
        CUDA_TRY(cudaDeviceGetAttribute(&im->sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
        CUDA_TRY(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    }
    ep->ops = &nccl_ops;
    cudaFree(dcfg);
    cudaStreamDestroy(stream);
    delete[] all;
    *out = ep;
    return EPMOE_OK;
fail:
    if (devcomm) ncclDevCommDestroy(comm, &im->dc);
    if (registered) ncclCommWindowDeregister(comm, im->win);
    if (im->win_buf) ncclMemFree(im->win_buf);
    if (im->state) cudaFree(im->state);
    if (im->error_host) cudaFreeHost(im->error_host);
    if (dcfg) cudaFree(dcfg);
    if (stream) cudaStreamDestroy(stream);
    delete[] all;
    delete im;
    ep->impl = nullptr;
    epmoe__ep_free(ep);
    return st;
}
