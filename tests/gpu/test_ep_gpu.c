/*
** test_ep_gpu.c — dispatch and combine on the GPUs (NCCL device API, one thread per GPU, one
** process) against the single-process reference, with the same scenarios and checks as the
** CPU backend's test (tests/ep_common.h): every output byte compared, rows past masked_m and
** tokens past T checked untouched, REDUCE_AT_EXPERT within its error model. Also: a peer that
** never dispatches (timeout recorded and reported by epmoe_ep_poll), an expert id out of range,
** a masked rank. R = 1 and R = number of GPUs (2 on nvidia-h200-x2).
*/
#define _POSIX_C_SOURCE 200809L
#include "cuda_check.h"
#include <nccl.h>
#include <pthread.h>
#include <time.h>

#include "../ep_common.h"


typedef struct {
    rank_io *io;
    ncclUniqueId id;
    epmoe_ep_layout lay;
    int bad_expert; /* plant an out-of-range id on rank 0, round 0 */
    epmoe_status poll;
} gpu_job;

static void *dev_copy(const void *h, size_t n) {
    void *d;
    CUDA_OK(cudaMalloc(&d, n + 16));
    if (h) CUDA_OK(cudaMemcpy(d, h, n, cudaMemcpyHostToDevice));
    return d;
}

static void *run_rank_gpu(void *arg) {
    gpu_job *job = arg;
    rank_io *io = job->io;
    const scenario *sc = io->sc;
    epmoe_ep_config cfg = sc->cfg;
    cfg.rank = io->rank;
    const epmoe_ep_layout lay = job->lay;
    const int N = cfg.max_tokens, H = cfg.hidden, k = cfg.top_k;
    CUDA_OK(cudaSetDevice(io->rank));
    ncclComm_t comm;
    if (ncclCommInitRank(&comm, cfg.num_ranks, job->id, io->rank) != ncclSuccess) {
        io->st_create = EPMOE_ERR_NCCL;
        return NULL;
    }
    epmoe_ep *ep = NULL;
    io->st_create = epmoe_ep_create_nccl(comm, &cfg, &ep);
    if (io->st_create != EPMOE_OK) {
        snprintf(io->err, sizeof io->err, "%s", epmoe_last_error());
        ncclCommDestroy(comm);
        return NULL;
    }
    if (sc->active) epmoe_ep_set_active_ranks(ep, sc->active);
    cudaStream_t st;
    CUDA_OK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    if (io->rank == sc->silent_rank) { /* joined, never dispatches; the others must not hang */
        struct timespec ts = {1, 0};
        nanosleep(&ts, NULL);
        job->poll = epmoe_ep_poll(ep);
        if (!sc->active) ep = NULL; /* a failed group's peer: leave without the collective teardown */
    } else {
        float requant_scale = 0.05f;
        void *d_rq = dev_copy(&requant_scale, 4);
        void *dx[8], *dtopk[8], *dw[8], *drx[8], *drs[8], *dm[8], *dsi[8], *deo[8], *dout[8];
        uint32_t handles[8];
        for (int round = 0; round < sc->rounds; round++) {
            if (job->bad_expert && io->rank == 0 && round == 0) io->topk[0][1] = cfg.num_experts + 5;
            dx[round] = dev_copy(io->x[round], (size_t)N * H * 2);
            dtopk[round] = sc->idx64 ? dev_copy(io->topk64[round], (size_t)N * k * 8) : dev_copy(io->topk[round], (size_t)N * k * 4);
            dw[round] = dev_copy(io->w[round], (size_t)N * k * 4);
            drx[round] = dev_copy(io->recv_x[round], lay.recv_x_bytes); /* poisoned on the host */
            drs[round] = dev_copy(io->recv_s[round], lay.recv_scales_bytes);
            dm[round] = dev_copy(NULL, lay.masked_m_bytes);
            dsi[round] = dev_copy(io->src_info[round], lay.src_info_bytes);
            deo[round] = dev_copy(NULL, lay.expert_out_bytes);
            dout[round] = dev_copy(io->out[round], lay.out_bytes);
            epmoe_dispatch_args a = {dx[round], dtopk[round], sc->idx64 ? 64 : 32, dw[round], sc->T[round][io->rank],
                                     drx[round], drs[round], dm[round], dsi[round], sc->requant ? d_rq : NULL};
            if (sc->split) {
                io->st_dispatch = epmoe_dispatch(ep, &a, EPMOE_PHASE_SEND, &handles[round], st);
                if (!io->st_dispatch) io->st_dispatch = epmoe_dispatch(ep, &a, EPMOE_PHASE_RECV, &handles[round], st);
            } else {
                io->st_dispatch = epmoe_dispatch(ep, &a, EPMOE_PHASE_BOTH, &handles[round], st);
            }
            if (io->st_dispatch) break;
            CUDA_OK(cudaStreamSynchronize(st));
            CUDA_OK(cudaMemcpy(io->recv_x[round], drx[round], lay.recv_x_bytes, cudaMemcpyDeviceToHost));
            CUDA_OK(cudaMemcpy(io->recv_s[round], drs[round], lay.recv_scales_bytes, cudaMemcpyDeviceToHost));
            CUDA_OK(cudaMemcpy(io->masked[round], dm[round], lay.masked_m_bytes, cudaMemcpyDeviceToHost));
            CUDA_OK(cudaMemcpy(io->src_info[round], dsi[round], lay.src_info_bytes, cudaMemcpyDeviceToHost));
            make_expert_out(&cfg, io, round);
            CUDA_OK(cudaMemcpy(deo[round], io->expert_out[round], lay.expert_out_bytes, cudaMemcpyHostToDevice));
            const int c = sc->split ? round - 1 : round; /* split: two dispatches live at once */
            if (c >= 0) {
                epmoe_combine_args ca = {deo[c], dw[c], dout[c]};
                io->st_combine = epmoe_combine(ep, handles[c], &ca, EPMOE_PHASE_BOTH, st);
                CUDA_OK(cudaStreamSynchronize(st));
                CUDA_OK(cudaMemcpy(io->out[c], dout[c], lay.out_bytes, cudaMemcpyDeviceToHost));
            }
            if (io->st_combine) break;
        }
        if (sc->split && !io->st_dispatch && !io->st_combine) {
            const int c = sc->rounds - 1;
            epmoe_combine_args ca = {deo[c], dw[c], dout[c]};
            io->st_combine = epmoe_combine(ep, handles[c], &ca, EPMOE_PHASE_BOTH, st);
            CUDA_OK(cudaStreamSynchronize(st));
            CUDA_OK(cudaMemcpy(io->out[c], dout[c], lay.out_bytes, cudaMemcpyDeviceToHost));
        }
        CUDA_OK(cudaStreamSynchronize(st));
        job->poll = epmoe_ep_poll(ep);
        if (io->st_dispatch || io->st_combine) snprintf(io->err, sizeof io->err, "%s", epmoe_last_error());
        CUDA_OK(cudaFree(d_rq));
    }
    if (ep) epmoe_ep_destroy(ep);
    CUDA_OK(cudaStreamDestroy(st));
    if (ep || sc->active) ncclCommDestroy(comm);
    return NULL;
}

static int ngpu;

static void run_gpu(const scenario *sc, const char *name, int bad_expert, epmoe_status want_poll0) {
    const int R = sc->cfg.num_ranks;
    epmoe_ep_layout lay;
    CHECK_STATUS(epmoe_ep_layout_query(&sc->cfg, &lay), EPMOE_OK);
    rank_io io[8];
    gpu_job jobs[8];
    memset(io, 0, sizeof io);
    io_alloc(sc, &lay, io, R);
    ncclUniqueId id;
    ncclGetUniqueId(&id);
    pthread_t th[8];
    for (int r = 0; r < R; r++) {
        jobs[r].io = &io[r], jobs[r].id = id, jobs[r].lay = lay, jobs[r].bad_expert = bad_expert, jobs[r].poll = EPMOE_OK;
        pthread_create(&th[r], NULL, run_rank_gpu, &jobs[r]);
    }
    for (int r = 0; r < R; r++) pthread_join(th[r], NULL);
    for (int r = 0; r < R; r++) CHECK(io[r].st_create == EPMOE_OK, "%s rank %d: create failed: %s", name, r, io[r].err);
    /* an asynchronous error is reported once: by the next call, or by epmoe_ep_poll */
    const epmoe_status seen0 = jobs[0].poll ? jobs[0].poll : io[0].st_combine ? io[0].st_combine : io[0].st_dispatch;
    CHECK(seen0 == want_poll0, "%s: rank 0 reported %d, want %d", name, seen0, want_poll0);
    if (want_poll0 == EPMOE_OK && !bad_expert) check_scenario(sc, &lay, io, name);
    else printf("  %-44s rank 0 reported: %s\n", name, epmoe_status_str(seen0));
    io_free(sc, io, R);
}

int main(void) {
    if (cudaGetDeviceCount(&ngpu) != cudaSuccess || ngpu < 1) {
        printf("test_ep_gpu: no CUDA device\n");
        return 1;
    }
    int v;
    ncclGetVersion(&v);
    printf("test_ep_gpu: %d GPU(s), NCCL runtime %d\n", ngpu, v);
    const int Rmax = ngpu < 8 ? ngpu : 8;
    char name[128];
    for (int R = 1; R <= Rmax; R += (Rmax > 1 ? Rmax - 1 : 1)) {
        for (int wire = 0; wire < 2; wire++)
            for (int mode = 0; mode < 3; mode++) {
                scenario sc = base(R, 13, 384, 4 * R, 4, (epmoe_wire)wire);
                sc.cfg.dedup = mode != 2;
                sc.cfg.combine_mode = mode == 0 ? EPMOE_COMBINE_REDUCE_AT_EXPERT : EPMOE_COMBINE_REDUCE_AT_OWNER;
                sc.cfg.scale_fmt = (epmoe_scale_fmt)(mode % 2);
                sc.seed = (uint64_t)(R * 10 + wire * 3 + mode + 100);
                sc.route = mode == 1 ? ROUTE_DUPLICATES : ROUTE_RANDOM;
                sc.split = mode == 1;
                sc.idx64 = mode == 2;
                snprintf(name, sizeof name, "gpu R=%d %s %s", R, wire ? "fp8" : "bf16",
                         mode == 0 ? "dedup/expert" : mode == 1 ? "dedup/owner+split+dups" : "per-expert/owner+int64");
                run_gpu(&sc, name, 0, EPMOE_OK);
            }
        scenario sc = base(R, 8, 256, 6 * R, 3, EPMOE_WIRE_FP8);
        sc.route = ROUTE_ONE_EXPERT;
        snprintf(name, sizeof name, "gpu R=%d fp8 all tokens to one expert", R);
        run_gpu(&sc, name, 0, EPMOE_OK);
        sc = base(R, 16, 640, 4 * R, 2, EPMOE_WIRE_FP8);
        sc.cfg.scale_fmt = EPMOE_SCALE_UE8M0_MMAJOR, sc.cfg.round_scale = 1;
        snprintf(name, sizeof name, "gpu R=%d fp8 UE8M0 M-major", R);
        run_gpu(&sc, name, 0, EPMOE_OK);
        sc = base(R, 16, 256, 4 * R, 2, EPMOE_WIRE_FP8);
        sc.requant = 1;
        snprintf(name, sizeof name, "gpu R=%d fp8 requant at receive", R);
        run_gpu(&sc, name, 0, EPMOE_OK);
        sc = base(R, 5, 128, 8, 2, EPMOE_WIRE_BF16);
        sc.rounds = 6;
        snprintf(name, sizeof name, "gpu R=%d bf16 six rounds", R);
        run_gpu(&sc, name, 0, EPMOE_OK);
        sc = base(R, 128, 7168, 256, 8, EPMOE_WIRE_FP8);
        sc.rounds = 2;
        snprintf(name, sizeof name, "gpu R=%d fp8 DeepSeek-R1 shape", R);
        run_gpu(&sc, name, 0, EPMOE_OK);
    }
    scenario sc = base(1, 8, 128, 4, 2, EPMOE_WIRE_BF16);
    sc.rounds = 1;
    run_gpu(&sc, "gpu R=1 expert id out of range", 1, EPMOE_ERR_INVALID_ARG);
    if (ngpu >= 2) {
        static const int active[2] = {1, 0};
        sc = base(2, 9, 256, 4, 3, EPMOE_WIRE_BF16);
        sc.active = active;
        sc.silent_rank = 1;
        run_gpu(&sc, "gpu R=2 bf16 rank 1 masked out", 0, EPMOE_OK);
        sc = base(2, 4, 128, 2, 1, EPMOE_WIRE_BF16);
        sc.cfg.timeout_ms = 200;
        sc.rounds = 1;
        sc.silent_rank = 1;
        run_gpu(&sc, "gpu R=2 peer never dispatches", 0, EPMOE_ERR_TIMEOUT);
    }
    return test_report("test_ep_gpu");
}
