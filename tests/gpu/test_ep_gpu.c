/*
** test_ep_gpu.c — dispatch and combine on the GPUs over NCCL against the single-process
** reference, with the same scenarios and checks as the CPU backend's test (tests/ep_common.h):
** every output byte compared, rows past masked_m and tokens past T checked untouched,
** REDUCE_AT_EXPERT within its error model. Also: a peer that never dispatches (timeout recorded
** and reported by epmoe_ep_poll), an expert id out of range, a masked rank, CUDA-graph replay.
**
**   test_ep_gpu [--transport device|alltoall|gin-emulated]   one process, a thread per GPU, R = 1 and R = number
**       of GPUs (2 on nvidia-h200-x2); the whole matrix over the NCCL device API (default) or the
**       padded all-to-all fallback (each rank then made by epmoe_ep_create_nccl_rank)
**   test_ep_gpu --local [--transport ...]       one process over every GPU via epmoe_ep_create_nccl_local
**   tools/epmoe-launch -n 2 test_ep_gpu --launched [--transport ...]
**       one rank per process via epmoe_ep_create_nccl_env; each process checks its own rank
** With --local and --launched the transport defaults to auto; --expect lsa|a2a checks which one
** creation chose, --expect auto that AUTO chose right for this machine (one NVLink node): the
** device API when libnccl is the version of the headers, else the fallback.
*/
#define _POSIX_C_SOURCE 200809L
#include "cuda_check.h"
#include <nccl.h>
#include <pthread.h>
#include <time.h>
#include <unistd.h>

#include "../ep_common.h"
#include "ep/ep_internal.h" /* epmoe__ep_create_nccl_rank_wait: the helper with a short init wait */

static epmoe_transport g_transport = EPMOE_TRANSPORT_DEVICE;

static const char *transport_name(epmoe_transport t) {
    return t == EPMOE_TRANSPORT_ALLTOALL       ? "alltoall"
           : t == EPMOE_TRANSPORT_GIN_EMULATED ? "gin-emulated"
           : t == EPMOE_TRANSPORT_GIN          ? "gin"
           : t                                 ? "device"
                                               : "auto";
}
static int g_expect = -1; /* the epmoe_backend creation must choose; -1: any; -2: AUTO's right choice */

typedef struct {
    rank_io *io;
    ncclUniqueId id;
    epmoe_ep_layout lay;
    int bad_expert; /* plant an out-of-range id on rank 0, round 0 */
    epmoe_status poll, poll_again; /* epmoe_ep_poll after the rounds, and once more */
    epmoe_backend backend;
    epmoe_ep *ep;   /* made by a launch helper before the rank's thread starts (--local, --launched) */
    int device;     /* ...and the GPU it lives on */
} gpu_job;

/* Device copy of n host bytes (h = NULL: uninitialized), complete when this returns. A plain
** cudaMemcpy from pageable memory may return before its DMA lands (CUDA's API synchronization
** rules), and it runs on the legacy default stream, which the tests' cudaStreamNonBlocking
** streams do not wait for: a kernel launched right after could read the old bytes. */
static void *dev_copy(const void *h, size_t n) {
    void *d;
    CUDA_OK(cudaMalloc(&d, n + 16));
    if (h) {
        CUDA_OK(cudaMemcpy(d, h, n, cudaMemcpyHostToDevice));
        CUDA_OK(cudaStreamSynchronize(cudaStreamLegacy));
    }
    return d;
}

/* Every round of the scenario on this rank's ep: dispatch (split halves when the scenario says
** so), identity-ish experts on the host (make_expert_out), combine; outputs copied back. */
static void run_rounds(epmoe_ep *ep, gpu_job *job, cudaStream_t st) {
    rank_io *io = job->io;
    const scenario *sc = io->sc;
    epmoe_ep_config cfg = sc->cfg;
    cfg.rank = io->rank;
    const epmoe_ep_layout lay = job->lay;
    const int N = cfg.max_tokens, H = cfg.hidden, k = cfg.top_k;
    float requant_scale = 0.05f;
    void *d_rq = dev_copy(&requant_scale, 4);
    void *dx[8], *dtopk[8], *dw[8], *drx[8], *drs[8], *dm[8], *dsi[8], *deo[8], *dout[8];
    int nalloc = 0;
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
        nalloc = round + 1;
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
        /* on the ep's stream, so combine reads it after it landed (see dev_copy) */
        CUDA_OK(cudaMemcpyAsync(deo[round], io->expert_out[round], lay.expert_out_bytes, cudaMemcpyHostToDevice, st));
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
    job->poll_again = epmoe_ep_poll(ep);
    if (io->st_dispatch || io->st_combine) snprintf(io->err, sizeof io->err, "%s", epmoe_last_error());
    CUDA_OK(cudaFree(d_rq));
    for (int r = 0; r < nalloc; r++) {
        void *bufs[] = {dx[r], dtopk[r], dw[r], drx[r], drs[r], dm[r], dsi[r], deo[r], dout[r]};
        for (size_t b = 0; b < sizeof bufs / sizeof bufs[0]; b++) CUDA_OK(cudaFree(bufs[b]));
    }
}

static void *run_rank_gpu(void *arg) {
    gpu_job *job = arg;
    rank_io *io = job->io;
    const scenario *sc = io->sc;
    epmoe_ep_config cfg = sc->cfg;
    cfg.rank = io->rank;
    ncclComm_t comm = NULL;
    epmoe_ep *ep = NULL;
    if (g_transport == EPMOE_TRANSPORT_ALLTOALL) { /* the launch helper: the ep owns its communicator */
        io->st_create = epmoe_ep_create_nccl_rank(&cfg, io->rank, cfg.num_ranks, &job->id, io->rank, &ep);
    } else {
        CUDA_OK(cudaSetDevice(io->rank));
        if (ncclCommInitRank(&comm, cfg.num_ranks, job->id, io->rank) != ncclSuccess) {
            io->st_create = EPMOE_ERR_NCCL;
            return NULL;
        }
        io->st_create = epmoe_ep_create_nccl(comm, &cfg, &ep);
    }
    if (io->st_create != EPMOE_OK) {
        snprintf(io->err, sizeof io->err, "%s", epmoe_last_error());
        if (comm) ncclCommDestroy(comm);
        return NULL;
    }
    job->backend = epmoe_ep_backend(ep);
    if (sc->active) epmoe_ep_set_active_ranks(ep, sc->active);
    cudaStream_t st;
    CUDA_OK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    if (io->rank == sc->silent_rank) { /* joined, never dispatches; the others must not hang */
        struct timespec ts = {1, 0};
        nanosleep(&ts, NULL);
        job->poll = epmoe_ep_poll(ep);
        if (!sc->active) ep = NULL; /* a failed group's peer: leave without the collective teardown */
    } else {
        run_rounds(ep, job, st);
    }
    if (ep) epmoe_ep_destroy(ep);
    CUDA_OK(cudaStreamDestroy(st));
    if (comm && (ep || sc->active)) ncclCommDestroy(comm);
    return NULL;
}

static int ngpu;

/* ---- CUDA-graph replay: dispatch + identity expert + combine captured once, replayed 100 times
** with new tokens and routing each time (written into the same device buffers); every replay's
** outputs are checked against the reference. The call numbers live on the device, so each replay
** is a new dispatch to the protocol. */
enum { GRAPH_REPS = 100 };
typedef struct {
    int rank, R;
    ncclUniqueId id;
    epmoe_ep_config cfg;
    long bad_m, bad_rows, bad_out, reps;
    epmoe_status st;
    epmoe_backend backend;
} graph_job;

/* Inputs of every rank for one replay (each thread builds all of them to compute the reference). */
static void graph_inputs(const epmoe_ep_config *c, int rep, int r, uint16_t *x, int32_t *idx, float *w) {
    test_rng g = {(uint64_t)rep * 7777u + (uint64_t)r * 13u + 5u};
    for (int64_t i = 0; i < (int64_t)c->max_tokens * c->hidden; i++) x[i] = epmoe_bf16_from_float((float)rng_normal(&g));
    for (int64_t i = 0; i < (int64_t)c->max_tokens * c->top_k; i++) {
        idx[i] = rng_u64(&g) % 5 == 0 ? -1 : (int32_t)(rng_u64(&g) % (uint64_t)c->num_experts);
        w[i] = (float)rng_uniform(&g);
    }
}

static void *graph_rank(void *arg) {
    graph_job *j = arg;
    epmoe_ep_config cfg = j->cfg;
    cfg.rank = j->rank;
    const int R = j->R, N = cfg.max_tokens, H = cfg.hidden, k = cfg.top_k, L = cfg.num_experts / R;
    const int64_t M = (int64_t)R * N;
    CUDA_OK(cudaSetDevice(j->rank));
    ncclComm_t comm;
    if (ncclCommInitRank(&comm, R, j->id, j->rank) != ncclSuccess) return j->st = EPMOE_ERR_NCCL, NULL;
    epmoe_ep *ep;
    if ((j->st = epmoe_ep_create_nccl(comm, &cfg, &ep)) != EPMOE_OK) return NULL;
    j->backend = epmoe_ep_backend(ep);
    epmoe_ep_layout lay;
    epmoe_ep_layout_query(&cfg, &lay);
    void *dx = dev_copy(NULL, (size_t)N * H * 2), *di = dev_copy(NULL, (size_t)N * k * 4), *dw = dev_copy(NULL, (size_t)N * k * 4);
    void *drx = dev_copy(NULL, lay.recv_x_bytes), *drs = dev_copy(NULL, lay.recv_scales_bytes), *dm = dev_copy(NULL, lay.masked_m_bytes);
    void *deo = dev_copy(NULL, lay.expert_out_bytes), *dout = dev_copy(NULL, lay.out_bytes);
    cudaStream_t st;
    CUDA_OK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    epmoe_dispatch_args a = {dx, di, 32, dw, N, drx, drs, dm, NULL, NULL};
    epmoe_combine_args ca = {deo, dw, dout};
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    uint32_t h;
    if (j->backend == EPMOE_BACKEND_NCCL_A2A) {
        /* one eager pair first (every id -1, nothing routed): NCCL connects its peers at the
        ** first send/recv, a blocking host step better kept out of the capture */
        CUDA_OK(cudaMemsetAsync(dx, 0, (size_t)N * H * 2, st)); /* on st: a legacy-stream memset is not ordered with it */
        CUDA_OK(cudaMemsetAsync(di, 0xFF, (size_t)N * k * 4, st));
        epmoe_status w1 = epmoe_dispatch(ep, &a, EPMOE_PHASE_BOTH, &h, st);
        epmoe_status w2 = w1 ? w1 : epmoe_combine(ep, h, &ca, EPMOE_PHASE_BOTH, st);
        CUDA_OK(cudaStreamSynchronize(st));
        if (w1 || w2) return j->st = w1 ? w1 : w2, NULL;
    }
    CUDA_OK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
    epmoe_status s1 = epmoe_dispatch(ep, &a, EPMOE_PHASE_BOTH, &h, st);
    epmoe_status s2 = epmoe_dequant_fp8_cuda(drx, drs, cfg.scale_fmt, dm, L, M, H, EPMOE_BF16, deo, st);
    epmoe_status s3 = epmoe_combine(ep, h, &ca, EPMOE_PHASE_BOTH, st);
    CUDA_OK(cudaStreamEndCapture(st, &graph));
    if (s1 || s2 || s3) return j->st = s1 ? s1 : s2 ? s2 : s3, NULL;
    CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
    /* host copies of every rank's inputs, and the reference */
    uint16_t *x[8], *eo[8], *ro[8];
    int32_t *idx[8], *rm[8];
    float *w[8];
    void *rx[8], *rs[8];
    int T[8];
    for (int r = 0; r < R; r++) {
        x[r] = malloc((size_t)N * H * 2), idx[r] = malloc((size_t)N * k * 4), w[r] = malloc((size_t)N * k * 4);
        rx[r] = malloc(lay.recv_x_bytes), rs[r] = malloc(lay.recv_scales_bytes), rm[r] = malloc(lay.masked_m_bytes);
        eo[r] = malloc(lay.expert_out_bytes), ro[r] = malloc(lay.out_bytes), T[r] = N;
    }
    uint8_t *got_x = malloc(lay.recv_x_bytes);
    int32_t *got_m = malloc(lay.masked_m_bytes);
    uint16_t *got_out = malloc(lay.out_bytes);
    for (int rep = 0; rep < GRAPH_REPS; rep++) {
        for (int r = 0; r < R; r++) graph_inputs(&cfg, rep, r, x[r], idx[r], w[r]);
        CUDA_OK(cudaMemcpy(dx, x[j->rank], (size_t)N * H * 2, cudaMemcpyHostToDevice));
        CUDA_OK(cudaMemcpy(di, idx[j->rank], (size_t)N * k * 4, cudaMemcpyHostToDevice));
        CUDA_OK(cudaMemcpy(dw, w[j->rank], (size_t)N * k * 4, cudaMemcpyHostToDevice));
        CUDA_OK(cudaMemset(dout, 0xAB, lay.out_bytes));
        CUDA_OK(cudaDeviceSynchronize());
        CUDA_OK(cudaGraphLaunch(exec, st));
        CUDA_OK(cudaStreamSynchronize(st));
        CUDA_OK(cudaMemcpy(got_x, drx, lay.recv_x_bytes, cudaMemcpyDeviceToHost));
        CUDA_OK(cudaMemcpy(got_m, dm, lay.masked_m_bytes, cudaMemcpyDeviceToHost));
        CUDA_OK(cudaMemcpy(got_out, dout, lay.out_bytes, cudaMemcpyDeviceToHost));
        epmoe_ep_dispatch_ref(&cfg, (const uint16_t *const *)x, (const int32_t *const *)idx, T, NULL, rx, rs, rm, NULL);
        for (int r = 0; r < R; r++) /* the identity expert of the graph, on the reference's rows */
            epmoe_dequant_fp8_ref(rx[r], rs[r], cfg.scale_fmt, rm[r], L, M, H, EPMOE_BF16, eo[r]);
        epmoe_ep_combine_ref(&cfg, (const uint16_t *const *)eo, (const int32_t *const *)idx, (const float *const *)w, T, NULL, ro);
        const int me = j->rank;
        for (int le = 0; le < L; le++) {
            j->bad_m += got_m[le] != rm[me][le];
            j->bad_rows += memcmp(got_x + (size_t)le * M * H, (uint8_t *)rx[me] + (size_t)le * M * H, (size_t)rm[me][le] * H) != 0;
        }
        j->bad_out += memcmp(got_out, ro[me], lay.out_bytes) != 0; /* reduce-at-owner: bit-exact */
        j->reps++;
    }
    j->st = epmoe_ep_poll(ep);
    for (int r = 0; r < R; r++) free(x[r]), free(idx[r]), free(w[r]), free(rx[r]), free(rs[r]), free(rm[r]), free(eo[r]), free(ro[r]);
    free(got_x), free(got_m), free(got_out);
    cudaGraphExecDestroy(exec), cudaGraphDestroy(graph);
    epmoe_ep_destroy(ep);
    ncclCommDestroy(comm);
    return NULL;
}

static void test_graph_replay(int R) {
    graph_job jobs[8];
    ncclUniqueId id;
    ncclGetUniqueId(&id);
    epmoe_ep_config c = EPMOE_EP_CONFIG_INIT;
    c.num_ranks = R, c.max_tokens = 16, c.hidden = 256, c.num_experts = 4 * R, c.top_k = 4, c.timeout_ms = 5000;
    c.combine_mode = EPMOE_COMBINE_REDUCE_AT_OWNER;
    c.transport = g_transport;
    pthread_t th[8];
    for (int r = 0; r < R; r++) {
        memset(&jobs[r], 0, sizeof jobs[r]);
        jobs[r].rank = r, jobs[r].R = R, jobs[r].id = id, jobs[r].cfg = c;
        pthread_create(&th[r], NULL, graph_rank, &jobs[r]);
    }
    for (int r = 0; r < R; r++) pthread_join(th[r], NULL);
    for (int r = 0; r < R; r++) {
        CHECK(jobs[r].st == EPMOE_OK && jobs[r].reps == GRAPH_REPS && !jobs[r].bad_m && !jobs[r].bad_rows && !jobs[r].bad_out,
              "graph replay R=%d rank %d: status %d, %ld replays, wrong masked_m %ld, rows %ld, combine %ld", R, r,
              jobs[r].st, jobs[r].reps, jobs[r].bad_m, jobs[r].bad_rows, jobs[r].bad_out);
        CHECK(jobs[r].st != EPMOE_OK || g_expect < 0 || (int)jobs[r].backend == g_expect, "graph replay R=%d rank %d: "
              "backend %d, want %d", R, r, jobs[r].backend, g_expect);
    }
    printf("  graph replay R=%d: %d replays of dispatch + expert + combine checked\n", R, GRAPH_REPS);
}

static void run_gpu(const scenario *sc_in, const char *name, int bad_expert, epmoe_status want_poll0) {
    scenario scx = *sc_in;
    scx.cfg.transport = g_transport;
    const scenario *sc = &scx;
    const int R = sc->cfg.num_ranks;
    epmoe_ep_layout lay;
    CHECK_STATUS(epmoe_ep_layout_query(&sc->cfg, &lay), EPMOE_OK);
    rank_io io[8];
    gpu_job jobs[8];
    memset(io, 0, sizeof io), memset(jobs, 0, sizeof jobs);
    io_alloc(sc, &lay, io, R);
    ncclUniqueId id;
    ncclGetUniqueId(&id);
    pthread_t th[8];
    for (int r = 0; r < R; r++) {
        jobs[r].io = &io[r], jobs[r].id = id, jobs[r].lay = lay, jobs[r].bad_expert = bad_expert, jobs[r].poll = EPMOE_OK;
        pthread_create(&th[r], NULL, run_rank_gpu, &jobs[r]);
    }
    for (int r = 0; r < R; r++) pthread_join(th[r], NULL);
    for (int r = 0; r < R; r++) {
        CHECK(io[r].st_create == EPMOE_OK, "%s rank %d: create failed: %s", name, r, io[r].err);
        CHECK(io[r].st_create != EPMOE_OK || g_expect < 0 || (int)jobs[r].backend == g_expect, "%s rank %d: backend %d, "
              "want %d", name, r, jobs[r].backend, g_expect);
    }
    /* an asynchronous error is reported once: by the next call, or by epmoe_ep_poll */
    const epmoe_status seen0 = jobs[0].poll ? jobs[0].poll : io[0].st_combine ? io[0].st_combine : io[0].st_dispatch;
    CHECK(seen0 == want_poll0, "%s: rank 0 reported %d, want %d", name, seen0, want_poll0);
    if (bad_expert) {
        /* a bad id is not a failure of the group: every rank's calls complete, its slot goes out
        ** as -1, and only rank 0's epmoe_ep_poll reports it, once */
        for (int r = 0; r < R; r++)
            CHECK(io[r].st_dispatch == EPMOE_OK && io[r].st_combine == EPMOE_OK && jobs[r].poll_again == EPMOE_OK &&
                      (r == 0 || jobs[r].poll == EPMOE_OK),
                  "%s: rank %d: dispatch %d, combine %d, poll %d then %d", name, r, io[r].st_dispatch, io[r].st_combine,
                  jobs[r].poll, jobs[r].poll_again);
        io[0].topk[0][1] = -1; /* what was sent: the results must be those of that routing */
        check_scenario(sc, &lay, io, name);
    } else if (want_poll0 == EPMOE_OK) {
        check_scenario(sc, &lay, io, name);
    }
    if (want_poll0 != EPMOE_OK) printf("  %-44s rank 0 reported: %s\n", name, epmoe_status_str(seen0));
    io_free(sc, io, R);
}

/* The launch helpers' communicator gives up on a rank that never joins (NCCL 2.18 and later):
** rank 0 of 2 alone must return EPMOE_ERR_TIMEOUT after about its wait, write no ep, and leave
** the process working (the graph replays run after it). The public helpers wait at least 120 s
** (slow-starting processes); the internal entry takes the wait, so this takes 1.5 s. A hang is
** ended by the alarm (the process dies: a failure, not a stuck suite). */
static void test_create_timeout(void) {
    int v = 0;
    ncclGetVersion(&v);
    if (v < 21800) {
        printf("  creation timeout: not tested (NCCL %d: no non-blocking init and split)\n", v);
        return;
    }
    uint8_t id[EPMOE_NCCL_UNIQUE_ID_BYTES];
    CHECK_STATUS(epmoe_nccl_unique_id(id), EPMOE_OK);
    epmoe_ep_config cfg = base(2, 8, 128, 4, 2, EPMOE_WIRE_BF16).cfg;
    cfg.transport = g_transport;
    epmoe_ep *ep = NULL;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    alarm(60);
    const epmoe_status st = epmoe__ep_create_nccl_rank_wait(&cfg, 0, 2, id, 0, 1500, &ep);
    alarm(0);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    const double ms = (double)(t1.tv_sec - t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e6;
    CHECK(st == EPMOE_ERR_TIMEOUT, "rank 0 of 2 alone: %s (%s), want EPMOE_ERR_TIMEOUT", epmoe_status_str(st),
          epmoe_last_error());
    CHECK(ep == NULL, "a failed creation wrote an ep");
    CHECK(ms >= 1400 && ms < 20000, "rank 0 of 2 alone gave up after %.0f ms (wait 1500 ms)", ms);
    CHECK(strstr(epmoe_last_error(), "waited 1500 ms") != NULL, "the message says how long it waited: %s",
          epmoe_last_error());
    printf("  creation, rank 0 of 2 alone: %s after %.0f ms\n", epmoe_status_str(st), ms);
}

/* ---- through the launch helpers: --local (one process, every GPU) and --launched (one rank
** per process). A few scenarios of different shapes, each on a new group. */
static int scenario_count(void) { return 3; }
static scenario helper_scenario(int i, int R, char *name, size_t n) {
    scenario sc;
    if (i == 0) { /* fp8, split halves with two live dispatches, duplicate experts */
        sc = base(R, 13, 384, 4 * R, 4, EPMOE_WIRE_FP8);
        sc.cfg.combine_mode = EPMOE_COMBINE_REDUCE_AT_OWNER, sc.route = ROUTE_DUPLICATES, sc.split = 1;
    } else if (i == 1) { /* bf16, one message per expert, int64 ids, parities wrapping */
        sc = base(R, 5, 128, 8 * R, 2, EPMOE_WIRE_BF16);
        sc.cfg.dedup = 0, sc.cfg.combine_mode = EPMOE_COMBINE_REDUCE_AT_OWNER, sc.idx64 = 1, sc.rounds = 6;
    } else { /* DeepSeek-R1 */
        sc = base(R, 128, 7168, 256, 8, EPMOE_WIRE_FP8);
        sc.rounds = 2;
    }
    sc.cfg.transport = g_transport;
    sc.seed = (uint64_t)(200 + i);
    snprintf(name, n, "%s R=%d %s", transport_name(g_transport), R,
             i == 0 ? "fp8 dedup/owner+split+dups" : i == 1 ? "bf16 per-expert/owner+int64, 6 rounds" : "fp8 DeepSeek-R1 shape");
    return sc;
}

/* A process that ran only rank `me` checks it with check_scenario by giving the other ranks
** the reference's outputs (every rank's inputs come from the seed, so the whole reference can
** be computed here); the other ranks' expert outputs then follow from those rows, exactly as
** the other processes computed them when they are right. */
static void fill_others_from_reference(const scenario *sc, const epmoe_ep_layout *lay, rank_io *io, int me) {
    const epmoe_ep_config *c = &sc->cfg;
    const int R = c->num_ranks;
    void *scratch_x = malloc(lay->recv_x_bytes), *scratch_s = malloc(lay->recv_scales_bytes + 1);
    int32_t *scratch_m = malloc(lay->masked_m_bytes), *scratch_i = malloc(lay->src_info_bytes);
    uint16_t *ro[8];
    for (int round = 0; round < sc->rounds; round++) {
        const uint16_t *xs[8], *eo[8];
        const int32_t *ts[8];
        const float *ws[8];
        void *rx[8], *rs[8];
        int32_t *rm[8], *ri[8];
        int Ts[8];
        for (int r = 0; r < R; r++) {
            xs[r] = io[r].x[round], ts[r] = io[r].topk[round], ws[r] = io[r].w[round], Ts[r] = sc->T[round][r];
            rx[r] = r == me ? scratch_x : io[r].recv_x[round], rs[r] = r == me ? scratch_s : io[r].recv_s[round];
            rm[r] = r == me ? scratch_m : io[r].masked[round], ri[r] = r == me ? scratch_i : io[r].src_info[round];
        }
        CHECK_STATUS(epmoe_ep_dispatch_ref(c, xs, ts, Ts, NULL, rx, rs, rm, ri), EPMOE_OK);
        for (int r = 0; r < R; r++) {
            if (r != me) make_expert_out(c, &io[r], round);
            eo[r] = io[r].expert_out[round];
            ro[r] = malloc(lay->out_bytes + 2);
        }
        CHECK_STATUS(epmoe_ep_combine_ref(c, eo, ts, ws, Ts, NULL, ro), EPMOE_OK);
        for (int r = 0; r < R; r++) {
            if (r != me) memcpy(io[r].out[round], ro[r], (size_t)Ts[r] * c->hidden * 2);
            free(ro[r]);
        }
    }
    free(scratch_x), free(scratch_s), free(scratch_m), free(scratch_i);
}

static void *local_rank(void *arg) { /* the ep exists; this thread drives and destroys it */
    gpu_job *job = arg;
    CUDA_OK(cudaSetDevice(job->device));
    cudaStream_t st;
    CUDA_OK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    job->backend = epmoe_ep_backend(job->ep);
    run_rounds(job->ep, job, st);
    epmoe_ep_destroy(job->ep);
    CUDA_OK(cudaStreamDestroy(st));
    return NULL;
}

static int main_helpers(int launched) {
    int rank = 0, R = ngpu < 8 ? ngpu : 8, local = 0;
    if (launched && epmoe_launch_env(&rank, &R, &local) != EPMOE_OK) {
        printf("test_ep_gpu --launched: %s\n", epmoe_last_error());
        return 1;
    }
    if (R > 8) R = 8; /* the scenarios' arrays */
    printf("test_ep_gpu %s: rank %d of %d, GPU %d\n", launched ? "--launched" : "--local", rank, R, launched ? local : -1);
    char name[160];
    for (int i = 0; i < scenario_count(); i++) {
        scenario sc = helper_scenario(i, R, name, sizeof name);
        epmoe_ep_layout lay;
        CHECK_STATUS(epmoe_ep_layout_query(&sc.cfg, &lay), EPMOE_OK);
        rank_io io[8];
        gpu_job jobs[8];
        memset(io, 0, sizeof io), memset(jobs, 0, sizeof jobs);
        io_alloc(&sc, &lay, io, R);
        for (int r = 0; r < R; r++) jobs[r].io = &io[r], jobs[r].lay = lay, jobs[r].device = launched ? local : r;
        epmoe_ep *eps[8] = {0};
        epmoe_status st = launched ? epmoe_ep_create_nccl_env(&sc.cfg, &eps[rank]) : epmoe_ep_create_nccl_local(&sc.cfg, R, NULL, eps);
        CHECK(st == EPMOE_OK, "%s: create: %s", name, epmoe_last_error());
        if (st != EPMOE_OK) {
            io_free(&sc, io, R);
            break;
        }
        if (launched) {
            jobs[rank].ep = eps[rank];
            local_rank(&jobs[rank]);
            fill_others_from_reference(&sc, &lay, io, rank);
        } else {
            pthread_t th[8];
            for (int r = 0; r < R; r++) jobs[r].ep = eps[r], pthread_create(&th[r], NULL, local_rank, &jobs[r]);
            for (int r = 0; r < R; r++) pthread_join(th[r], NULL);
        }
        const int first = launched ? rank : 0, last = launched ? rank : R - 1;
        for (int r = first; r <= last; r++) {
            CHECK(g_expect < 0 || (int)jobs[r].backend == g_expect, "%s rank %d: backend %d, want %d", name, r, jobs[r].backend,
                  g_expect);
            CHECK(jobs[r].poll == EPMOE_OK, "%s rank %d: poll %d", name, r, jobs[r].poll);
        }
        printf("  %-52s on %s\n", name, jobs[first].backend == EPMOE_BACKEND_NCCL_A2A             ? "the all-to-all fallback"
                                         : jobs[first].backend == EPMOE_BACKEND_NCCL_GIN_EMULATED ? "GIN's protocol, emulated"
                                         : jobs[first].backend == EPMOE_BACKEND_NCCL_GIN          ? "GIN"
                                                                                                  : "the device API (LSA)");
        check_scenario(&sc, &lay, io, name);
        io_free(&sc, io, R);
    }
    return test_report(launched ? "test_ep_gpu --launched" : "test_ep_gpu --local");
}

static int usage(void) {
    printf("usage: test_ep_gpu [--transport auto|device|alltoall|gin-emulated|gin] [--local | --launched] [--expect lsa|a2a|auto]\n");
    return 2;
}

int main(int argc, char **argv) {
    int run_mode = 0; /* 0: a thread per GPU, the whole matrix; 1: --local; 2: --launched */
    int transport_given = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--local")) run_mode = 1;
        else if (!strcmp(argv[i], "--launched")) run_mode = 2;
        else if (!strcmp(argv[i], "--transport") && i + 1 < argc) {
            const char *t = argv[++i];
            transport_given = 1;
            if (!strcmp(t, "auto")) g_transport = EPMOE_TRANSPORT_AUTO;
            else if (!strcmp(t, "device")) g_transport = EPMOE_TRANSPORT_DEVICE;
            else if (!strcmp(t, "alltoall")) g_transport = EPMOE_TRANSPORT_ALLTOALL;
            else if (!strcmp(t, "gin-emulated")) g_transport = EPMOE_TRANSPORT_GIN_EMULATED;
            else if (!strcmp(t, "gin")) g_transport = EPMOE_TRANSPORT_GIN; /* needs a NIC */
            else return usage();
        } else if (!strcmp(argv[i], "--expect") && i + 1 < argc) {
            const char *b = argv[++i];
            if (!strcmp(b, "lsa")) g_expect = EPMOE_BACKEND_NCCL_LSA;
            else if (!strcmp(b, "a2a")) g_expect = EPMOE_BACKEND_NCCL_A2A;
            else if (!strcmp(b, "auto")) g_expect = -2;
            else return usage();
        } else {
            return usage();
        }
    }
    if (run_mode && !transport_given) g_transport = EPMOE_TRANSPORT_AUTO; /* the helpers' default: creation chooses */
    if (!run_mode && g_transport == EPMOE_TRANSPORT_AUTO) return usage(); /* the matrix tests one named transport */
    if (!run_mode && g_expect < 0)
        g_expect = g_transport == EPMOE_TRANSPORT_ALLTOALL       ? EPMOE_BACKEND_NCCL_A2A
                   : g_transport == EPMOE_TRANSPORT_GIN_EMULATED ? EPMOE_BACKEND_NCCL_GIN_EMULATED
                   : g_transport == EPMOE_TRANSPORT_GIN          ? EPMOE_BACKEND_NCCL_GIN
                                                                 : EPMOE_BACKEND_NCCL_LSA;
    if (cudaGetDeviceCount(&ngpu) != cudaSuccess || ngpu < 1) {
        printf("test_ep_gpu: no CUDA device\n");
        return 1;
    }
    int v;
    ncclGetVersion(&v);
    printf("test_ep_gpu: %d GPU(s), NCCL runtime %d (headers %d), transport %s\n", ngpu, v, NCCL_VERSION_CODE,
           transport_name(g_transport));
    if (g_expect == -2) g_expect = v == NCCL_VERSION_CODE ? EPMOE_BACKEND_NCCL_LSA : EPMOE_BACKEND_NCCL_A2A;
    if (run_mode) return main_helpers(run_mode == 2);
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
        /* top-k above 8 takes the combine kernels' 16-wide variant (k <= 8 the 8-wide one) */
        for (int wide = 0; wide < 2; wide++) {
            sc = base(R, 11, 256, 20 * R, wide ? EPMOE_MAX_TOPK : 9, wide ? EPMOE_WIRE_BF16 : EPMOE_WIRE_FP8);
            sc.cfg.combine_mode = wide ? EPMOE_COMBINE_REDUCE_AT_OWNER : EPMOE_COMBINE_REDUCE_AT_EXPERT;
            sc.route = wide ? ROUTE_DUPLICATES : ROUTE_RANDOM;
            snprintf(name, sizeof name, "gpu R=%d top-%d %s", R, sc.cfg.top_k, wide ? "bf16 owner+dups" : "fp8 expert");
            run_gpu(&sc, name, 0, EPMOE_OK);
        }
        /* more tokens than send blocks (2 per SM: a block counts rows for several tokens) and than
        ** one counting chunk of 512 (threads count several earlier tokens each); rounds of 600,
        ** 0 and in between */
        for (int dedup = 0; dedup < 2; dedup++) {
            sc = base(R, 600, 128, 16 * R, 8, dedup ? EPMOE_WIRE_FP8 : EPMOE_WIRE_BF16);
            sc.cfg.dedup = dedup;
            sc.cfg.combine_mode = dedup ? EPMOE_COMBINE_REDUCE_AT_EXPERT : EPMOE_COMBINE_REDUCE_AT_OWNER;
            sc.route = dedup ? ROUTE_RANDOM : ROUTE_DUPLICATES;
            sc.rounds = 2;
            snprintf(name, sizeof name, "gpu R=%d %s 600 tokens", R, dedup ? "fp8 dedup/expert" : "bf16 per-expert/owner+dups");
            run_gpu(&sc, name, 0, EPMOE_OK);
        }
        sc = base(R, 128, 7168, 256, 8, EPMOE_WIRE_FP8);
        sc.rounds = 2;
        snprintf(name, sizeof name, "gpu R=%d fp8 DeepSeek-R1 shape", R);
        run_gpu(&sc, name, 0, EPMOE_OK);
    }
    scenario sc = base(1, 8, 128, 4, 2, EPMOE_WIRE_BF16);
    sc.rounds = 2;
    run_gpu(&sc, "gpu R=1 expert id out of range", 1, EPMOE_ERR_INVALID_ARG);
    if (ngpu >= 2) { /* a bad id on rank 0 in round 0: reported there, and the protocol goes on */
        sc = base(2, 8, 128, 4, 2, EPMOE_WIRE_BF16);
        sc.rounds = 3;
        run_gpu(&sc, "gpu R=2 expert id out of range", 1, EPMOE_ERR_INVALID_ARG);
    }
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
        /* device API: the kernels' timed waits; all-to-all: the watchdog aborts the ep's communicator */
        run_gpu(&sc, "gpu R=2 peer never dispatches", 0, EPMOE_ERR_TIMEOUT);
    }
    test_create_timeout();
    test_graph_replay(1); /* after the timeout: the process and the GPU still work */
    if (ngpu >= 2) test_graph_replay(2);
    return test_report("test_ep_gpu");
}
