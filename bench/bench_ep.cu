/*
** bench_ep.c — dispatch and combine on the GPUs of one node (one thread per GPU; NCCL device
** API, and the padded all-to-all fallback in the cases marked "a2a"), side by side in the same run with NCCL's own all-to-all moving DeepEP-style payloads
** (the anchor of shared/baselines/nccl_alltoall.py). Each iteration starts from an NCCL
** all-reduce of one float on the same stream (aligns the ranks, as DeepEP's bench does), then
** CUDA events around dispatch and around combine; medians over 200 iterations after 30 warm-ups
** (a second pass with events between the halves too gives the send halves' times). A third
** times dispatch + combine captured once in a CUDA graph and replayed, as an engine that captures
** its decode step runs them.
** Bandwidth is DeepEP's logical GB/s: valid (token, expert) selections x bytes per selection
** (FP8: H + H/128*4 + 16; BF16: 2H + 16; combine: 2H), over the measured time.
** The stream is first held by a 200 us spin kernel while the host enqueues the iteration, so
** the events time the GPU's work, not the host's launch overhead (as DeepEP's sleep + barrier).
** Run on the GPU machine: ./build/bench/bench_ep  (prints a table; --json FILE writes it too)
*/
#define _POSIX_C_SOURCE 200809L
#include <cuda_runtime_api.h>
#include <nccl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "epmoe.h"
#include "bench_check.h"
#include "bench_hold.cuh"

#define NC(call)                                                                                                       \
    do {                                                                                                               \
        ncclResult_t r_ = (call);                                                                                      \
        if (r_ != ncclSuccess) {                                                                                       \
            printf("NCCL error %s at %s:%d\n", ncclGetErrorString(r_), __FILE__, __LINE__);                           \
            exit(2);                                                                                                   \
        }                                                                                                              \
    } while (0)

enum { WARMUP = 30, ITERS = 200 };

typedef struct {
    const char *name;
    int tokens, experts;
    epmoe_wire wire;
    int dedup;
    epmoe_combine_mode mode;
    epmoe_transport transport; /* named, never AUTO: a case must not measure a silent fallback */
} bench_case;

typedef struct {
    int rank, R;
    ncclUniqueId id;
    const bench_case *bc;
    double disp_us, comb_us, a2a_us, disp_send_us, comb_send_us, graph_us;
    long selections, link_msgs;
    size_t window_bytes;
} job;

static int cmp_f(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

#ifdef EPMOE_EP_TRACE
/* dev/bench_ep_trace (make dev-trace): medians of the kernels' time stamps (src/ep/ep_device.cuh,
** "dev only"), rank 0, in us after the dispatch send's block 0 entered; block 0's phases also in
** its own clock (kcycles after its entry). */
extern "C" unsigned long long *epmoe__ep_trace(epmoe_ep *ep);
static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}
enum { TR_SLOTS = 24, TR_ALL = 4 * TR_SLOTS };
static void trace_report(const char *name, unsigned long long (*tr)[TR_ALL]) {
    static const char *kname[4] = {"dispatch send", "dispatch recv", "combine send", "combine recv"};
    static const char *slot[20] = {"entry", "pt1", "pt2", "pt3", "pt4", "pt5", "pt6", "pt7", 0, 0, 0, 0, 0, 0, 0, 0,
                                   "latest block entry", "latest work end", "last block ticket", "last block exit"};
    double *v = (double *)malloc(sizeof(double) * ITERS);
    printf("trace %s (rank 0, medians of %d): us after dispatch send's entry [block 0 kcycles after its entry]\n", name, ITERS);
    for (int kk = 0; kk < 4; kk++) {
        printf("  %-14s", kname[kk]);
        for (int sl = 0; sl < 20; sl++) {
            if (!slot[sl]) continue;
            int n = 0;
            for (int it = 0; it < ITERS; it++)
                if (tr[it][kk * TR_SLOTS + sl]) v[n++] = (double)(long long)(tr[it][kk * TR_SLOTS + sl] - tr[it][0]) * 1e-3;
            if (!n) continue;
            qsort(v, (size_t)n, sizeof(double), cmp_d);
            printf(" %s %.2f", slot[sl], v[n / 2]);
            if (sl >= 1 && sl < 8) {
                int m = 0;
                for (int it = 0; it < ITERS; it++)
                    if (tr[it][kk * TR_SLOTS + sl]) v[m++] = (double)(tr[it][kk * TR_SLOTS + 8 + sl] - tr[it][kk * TR_SLOTS + 8]) * 1e-3;
                qsort(v, (size_t)m, sizeof(double), cmp_d);
                printf(" [%.1f]", v[m / 2]);
            }
            printf(";");
        }
        printf("\n");
    }
    free(v);
}
#endif

static uint64_t rng_state;
static uint64_t rnd(void) {
    rng_state ^= rng_state << 13, rng_state ^= rng_state >> 7, rng_state ^= rng_state << 17;
    return rng_state;
}

static void *run(void *arg) {
    job *j = (job *)arg;
    const bench_case *bc = j->bc;
    CU(cudaSetDevice(j->rank));
    ncclComm_t comm;
    NC(ncclCommInitRank(&comm, j->R, j->id, j->rank));
    epmoe_ep_config cfg = EPMOE_EP_CONFIG_INIT;
    cfg.num_ranks = j->R, cfg.rank = j->rank, cfg.max_tokens = bc->tokens, cfg.hidden = 7168;
    cfg.num_experts = bc->experts, cfg.top_k = 8, cfg.wire = bc->wire, cfg.dedup = bc->dedup, cfg.combine_mode = bc->mode;
    cfg.transport = bc->transport;
    epmoe_ep_layout lay;
    EP(epmoe_ep_layout_query(&cfg, &lay));
    j->window_bytes = lay.window_bytes + lay.state_bytes;
    epmoe_ep *ep;
    EP(epmoe_ep_create_nccl(comm, &cfg, &ep));
    const int T = bc->tokens, H = cfg.hidden, k = cfg.top_k, E = bc->experts, L = E / j->R;
    uint16_t *x = (uint16_t *)malloc((size_t)T * H * 2);
    int32_t *idx = (int32_t *)malloc((size_t)T * k * 4);
    float *w = (float *)malloc((size_t)T * k * 4);
    rng_state = 0x9E3779B97F4A7C15ull * (uint64_t)(j->rank + 1);
    for (size_t i = 0; i < (size_t)T * H; i++) x[i] = epmoe_bf16_from_float((float)((int)(rnd() % 2001) - 1000) * 1e-3f);
    j->selections = 0, j->link_msgs = 0;
    for (int t = 0; t < T; t++) { /* k distinct experts, uniform (random routing, as DeepEP's bench) */
        int ranks_hit[64] = {0};
        for (int q = 0; q < k; q++) {
            int e, dup;
            do {
                e = (int)(rnd() % (uint64_t)E);
                dup = 0;
                for (int p = 0; p < q; p++) dup |= idx[t * k + p] == e;
            } while (dup);
            idx[t * k + q] = e;
            w[t * k + q] = 0.125f;
            j->selections++;
            if (!ranks_hit[e / L]++) j->link_msgs += (e / L) != j->rank;
        }
    }
    void *dx, *didx, *dw, *rx, *rs, *dm, *eo, *out, *red;
    CU(cudaMalloc(&dx, (size_t)T * H * 2));
    CU(cudaMalloc(&didx, (size_t)T * k * 4));
    CU(cudaMalloc(&dw, (size_t)T * k * 4));
    CU(cudaMalloc(&rx, lay.recv_x_bytes));
    CU(cudaMalloc(&rs, lay.recv_scales_bytes + 16));
    CU(cudaMalloc(&dm, lay.masked_m_bytes));
    CU(cudaMalloc(&eo, lay.expert_out_bytes));
    CU(cudaMalloc(&out, lay.out_bytes));
    CU(cudaMalloc(&red, 4));
    CU(cudaMemcpy(dx, x, (size_t)T * H * 2, cudaMemcpyHostToDevice));
    CU(cudaMemcpy(didx, idx, (size_t)T * k * 4, cudaMemcpyHostToDevice));
    CU(cudaMemcpy(dw, w, (size_t)T * k * 4, cudaMemcpyHostToDevice));
    CU(cudaMemset(eo, 0x3C, lay.expert_out_bytes));
    cudaStream_t st;
    CU(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    cudaEvent_t ev[5];
    for (int i = 0; i < 5; i++) CU(cudaEventCreate(&ev[i]));
    epmoe_dispatch_args a = {(const uint16_t *)dx, didx, 32, (const float *)dw, T, rx, rs, (int32_t *)dm, NULL, NULL};
    epmoe_combine_args ca = {(const uint16_t *)eo, (const float *)dw, (uint16_t *)out};
    float *td = (float *)malloc(sizeof(float) * ITERS), *tc = (float *)malloc(sizeof(float) * ITERS);
    float *ta = (float *)malloc(sizeof(float) * ITERS), *tds = (float *)malloc(sizeof(float) * ITERS);
    float *tcs = (float *)malloc(sizeof(float) * ITERS);
#ifdef EPMOE_EP_TRACE
    unsigned long long(*tr)[TR_ALL] = (unsigned long long(*)[TR_ALL])calloc(ITERS, sizeof *tr);
    unsigned long long *dtr = epmoe__ep_trace(ep);
#endif
    /* Two passes: the first times dispatch and combine, each one call (PHASE_BOTH), with events
    ** only around each (the headline: an event between two kernels delays the second by ~3 us on
    ** H200, measured 2026-11-30); the second calls the halves separately, with events between
    ** them too, for the send halves' times. The trace build stamps the first pass. */
    for (int pass = 0; pass < 2; pass++)
    for (int it = 0; it < WARMUP + ITERS; it++) {
        uint32_t h;
#ifdef EPMOE_EP_TRACE
        if (pass == 0) CU(cudaMemsetAsync(dtr, 0, sizeof tr[0], st));
#endif
        bench_hold<<<1, 1, 0, st>>>(200000);
        NC(ncclAllReduce(red, red, 1, ncclFloat, ncclSum, comm, st));
        CU(cudaEventRecord(ev[0], st));
        if (pass == 0) { /* one call each, as an engine that does not split them */
            EP(epmoe_dispatch(ep, &a, EPMOE_PHASE_BOTH, &h, st));
            CU(cudaEventRecord(ev[2], st));
            EP(epmoe_combine(ep, h, &ca, EPMOE_PHASE_BOTH, st));
        } else { /* the halves as separate calls, with an event between them */
            EP(epmoe_dispatch(ep, &a, EPMOE_PHASE_SEND, &h, st));
            CU(cudaEventRecord(ev[1], st));
            EP(epmoe_dispatch(ep, &a, EPMOE_PHASE_RECV, &h, st));
            CU(cudaEventRecord(ev[2], st));
            EP(epmoe_combine(ep, h, &ca, EPMOE_PHASE_SEND, st));
            CU(cudaEventRecord(ev[3], st));
            EP(epmoe_combine(ep, h, &ca, EPMOE_PHASE_RECV, st));
        }
        CU(cudaEventRecord(ev[4], st));
        CU(cudaEventSynchronize(ev[4]));
        if (it < WARMUP) continue;
        if (pass == 0) {
            CU(cudaEventElapsedTime(&td[it - WARMUP], ev[0], ev[2]));
            CU(cudaEventElapsedTime(&tc[it - WARMUP], ev[2], ev[4]));
#ifdef EPMOE_EP_TRACE
            CU(cudaMemcpy(tr[it - WARMUP], dtr, sizeof tr[0], cudaMemcpyDeviceToHost));
#endif
        } else {
            CU(cudaEventElapsedTime(&tds[it - WARMUP], ev[0], ev[1]));
            CU(cudaEventElapsedTime(&tcs[it - WARMUP], ev[2], ev[3]));
        }
    }
    /* dispatch + combine (each PHASE_BOTH) captured once in a CUDA graph, the replay timed as the
    ** calls above: the four kernels without the host's launches between them. The calls above stay
    ** the headline: DeepEP's bench times calls. */
    float *tg = (float *)malloc(sizeof(float) * ITERS);
    {
        cudaGraph_t g;
        cudaGraphExec_t ge;
        uint32_t hg;
        CU(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
        EP(epmoe_dispatch(ep, &a, EPMOE_PHASE_BOTH, &hg, st));
        EP(epmoe_combine(ep, hg, &ca, EPMOE_PHASE_BOTH, st));
        CU(cudaStreamEndCapture(st, &g));
        CU(cudaGraphInstantiate(&ge, g, 0));
        for (int it = 0; it < WARMUP + ITERS; it++) {
            bench_hold<<<1, 1, 0, st>>>(200000);
            NC(ncclAllReduce(red, red, 1, ncclFloat, ncclSum, comm, st));
            CU(cudaEventRecord(ev[0], st));
            CU(cudaGraphLaunch(ge, st));
            CU(cudaEventRecord(ev[1], st));
            CU(cudaEventSynchronize(ev[1]));
            if (it >= WARMUP) CU(cudaEventElapsedTime(&tg[it - WARMUP], ev[0], ev[1]));
        }
        CU(cudaGraphExecDestroy(ge));
        CU(cudaGraphDestroy(g));
    }
    EP(epmoe_ep_poll(ep));
    /* anchor: NCCL all-to-all of the same selections, padded equally per peer (as the torch baseline) */
    const size_t per_tok = bc->wire == EPMOE_WIRE_FP8 ? (size_t)H + H / 128 * 4 : (size_t)H * 2;
    const size_t per_peer = (size_t)T * k / (size_t)j->R * per_tok;
    void *sb, *rb;
    CU(cudaMalloc(&sb, per_peer * j->R));
    CU(cudaMalloc(&rb, per_peer * j->R));
    for (int it = 0; it < WARMUP + ITERS; it++) {
        bench_hold<<<1, 1, 0, st>>>(200000);
        NC(ncclAllReduce(red, red, 1, ncclFloat, ncclSum, comm, st));
        CU(cudaEventRecord(ev[0], st));
        NC(ncclGroupStart());
        for (int p = 0; p < j->R; p++) {
            NC(ncclSend((char *)sb + per_peer * p, per_peer, ncclUint8, p, comm, st));
            NC(ncclRecv((char *)rb + per_peer * p, per_peer, ncclUint8, p, comm, st));
        }
        NC(ncclGroupEnd());
        CU(cudaEventRecord(ev[1], st));
        CU(cudaEventSynchronize(ev[1]));
        if (it >= WARMUP) CU(cudaEventElapsedTime(&ta[it - WARMUP], ev[0], ev[1]));
    }
    qsort(td, ITERS, sizeof(float), cmp_f);
    qsort(tc, ITERS, sizeof(float), cmp_f);
    qsort(ta, ITERS, sizeof(float), cmp_f);
    qsort(tds, ITERS, sizeof(float), cmp_f);
    qsort(tcs, ITERS, sizeof(float), cmp_f);
    qsort(tg, ITERS, sizeof(float), cmp_f);
    j->disp_us = td[ITERS / 2] * 1e3, j->comb_us = tc[ITERS / 2] * 1e3, j->a2a_us = ta[ITERS / 2] * 1e3;
    j->disp_send_us = tds[ITERS / 2] * 1e3, j->comb_send_us = tcs[ITERS / 2] * 1e3, j->graph_us = tg[ITERS / 2] * 1e3;
    free(tds), free(tcs), free(tg);
#ifdef EPMOE_EP_TRACE
    if (j->rank == 0) {
        char nm[96];
        snprintf(nm, sizeof nm, "R=%d %s %d tok", j->R, bc->name, bc->tokens);
        trace_report(nm, tr);
    }
    free(tr);
#endif
    EP(epmoe_ep_destroy(ep));
    ncclCommDestroy(comm);
    cudaFree(dx), cudaFree(didx), cudaFree(dw), cudaFree(rx), cudaFree(rs), cudaFree(dm), cudaFree(eo), cudaFree(out);
    cudaFree(red), cudaFree(sb), cudaFree(rb);
    free(x), free(idx), free(w), free(td), free(tc), free(ta);
    return NULL;
}

int main(int argc, char **argv) {
    int ngpu = 0;
    CU(cudaGetDeviceCount(&ngpu));
    const char *json = argc > 2 && !strcmp(argv[1], "--json") ? argv[2] : NULL;
    FILE *jf = json ? fopen(json, "w") : NULL;
    const bench_case cases[] = {
        {"fp8 dedup reduce-at-expert", 128, 256, EPMOE_WIRE_FP8, 1, EPMOE_COMBINE_REDUCE_AT_EXPERT, EPMOE_TRANSPORT_DEVICE},
        {"bf16 dedup reduce-at-expert", 128, 256, EPMOE_WIRE_BF16, 1, EPMOE_COMBINE_REDUCE_AT_EXPERT, EPMOE_TRANSPORT_DEVICE},
        {"fp8 per-expert reduce-at-owner", 128, 256, EPMOE_WIRE_FP8, 0, EPMOE_COMBINE_REDUCE_AT_OWNER, EPMOE_TRANSPORT_DEVICE},
        {"fp8 dedup reduce-at-owner", 128, 256, EPMOE_WIRE_FP8, 1, EPMOE_COMBINE_REDUCE_AT_OWNER, EPMOE_TRANSPORT_DEVICE},
        {"fp8 dedup reduce-at-expert", 256, 256, EPMOE_WIRE_FP8, 1, EPMOE_COMBINE_REDUCE_AT_EXPERT, EPMOE_TRANSPORT_DEVICE},
        {"bf16 dedup reduce-at-expert", 256, 256, EPMOE_WIRE_BF16, 1, EPMOE_COMBINE_REDUCE_AT_EXPERT, EPMOE_TRANSPORT_DEVICE},
        {"fp8 dedup reduce-at-expert", 128, 384, EPMOE_WIRE_FP8, 1, EPMOE_COMBINE_REDUCE_AT_EXPERT, EPMOE_TRANSPORT_DEVICE},
        {"a2a fp8 dedup reduce-at-expert", 128, 256, EPMOE_WIRE_FP8, 1, EPMOE_COMBINE_REDUCE_AT_EXPERT, EPMOE_TRANSPORT_ALLTOALL},
        {"a2a bf16 dedup reduce-at-expert", 128, 256, EPMOE_WIRE_BF16, 1, EPMOE_COMBINE_REDUCE_AT_EXPERT, EPMOE_TRANSPORT_ALLTOALL},
        /* GIN's put/signal protocol over NVLink: what staging through the outbox costs */
        {"gin-emu fp8 dedup reduce-at-expert", 128, 256, EPMOE_WIRE_FP8, 1, EPMOE_COMBINE_REDUCE_AT_EXPERT, EPMOE_TRANSPORT_GIN_EMULATED},
    };
    int v;
    ncclGetVersion(&v);
    printf("bench_ep: %d GPU(s), NCCL %d, H 7168, top-8; medians of %d iterations\n", ngpu, v, ITERS);
    printf("%-3s %-32s %5s %4s %10s %8s %8s %10s %8s %8s %10s %6s %9s %10s\n", "R", "case", "tok", "E", "dispatch", "(send)",
           "GB/s", "combine", "(send)", "GB/s", "nccl a2a", "msgs", "buffer MB", "graph d+c");
    if (jf) fprintf(jf, "[\n");
    int first = 1;
    /* EPMOE_BENCH_R=1 EPMOE_BENCH_CASES=1: one rank, the first case (for a profiler, which serializes kernels) */
    const int only_r = getenv("EPMOE_BENCH_R") ? atoi(getenv("EPMOE_BENCH_R")) : 0;
    const size_t ncases = getenv("EPMOE_BENCH_CASES") ? (size_t)atoi(getenv("EPMOE_BENCH_CASES")) : sizeof cases / sizeof cases[0];
    for (int R = only_r ? only_r : ngpu; R >= 1; R = only_r || R == 1 ? 0 : 1) {
        for (size_t c = 0; c < ncases; c++) {
            ncclUniqueId id;
            NC(ncclGetUniqueId(&id));
            job jobs[8];
            pthread_t th[8];
            for (int r = 0; r < R; r++) {
                memset(&jobs[r], 0, sizeof jobs[r]);
                jobs[r].rank = r, jobs[r].R = R, jobs[r].id = id, jobs[r].bc = &cases[c];
                pthread_create(&th[r], NULL, run, &jobs[r]);
            }
            for (int r = 0; r < R; r++) pthread_join(th[r], NULL);
            double d = 0, cm = 0, a2a = 0, gr = 0;
            long sel = 0, msgs = 0;
            for (int r = 0; r < R; r++) { /* the slowest rank is the collective's time */
                if (jobs[r].disp_us > d) d = jobs[r].disp_us;
                if (jobs[r].comb_us > cm) cm = jobs[r].comb_us;
                if (jobs[r].a2a_us > a2a) a2a = jobs[r].a2a_us;
                if (jobs[r].graph_us > gr) gr = jobs[r].graph_us;
                sel += jobs[r].selections, msgs += jobs[r].link_msgs;
            }
            const int H = 7168;
            const double dbytes = (double)sel / R * (cases[c].wire == EPMOE_WIRE_FP8 ? H + H / 128 * 4 + 16 : 2 * H + 16);
            const double cbytes = (double)sel / R * 2 * H;
            printf("%-3d %-32s %5d %4d %8.2fus %8.2f %8.1f %8.2fus %8.2f %8.1f %8.2fus %6ld %9.1f %8.2fus\n", R, cases[c].name,
                   cases[c].tokens, cases[c].experts, d, jobs[0].disp_send_us, dbytes / d / 1e3, cm, jobs[0].comb_send_us,
                   cbytes / cm / 1e3, a2a, msgs / R, jobs[0].window_bytes / 1e6, gr);
            if (jf)
                fprintf(jf, "%s {\"R\": %d, \"case\": \"%s\", \"transport\": \"%s\", \"tokens\": %d, \"experts\": %d, \"dispatch_us\": %.3f, "
                            "\"dispatch_GBps\": %.2f, \"combine_us\": %.3f, \"combine_GBps\": %.2f, \"nccl_a2a_us\": %.3f, "
                            "\"link_msgs_per_rank\": %ld, \"buffer_bytes\": %zu, \"dispatch_send_us\": %.3f, "
                            "\"combine_send_us\": %.3f, \"graph_dispatch_combine_us\": %.3f}\n",
                        first ? "" : ",", R, cases[c].name,
                        cases[c].transport == EPMOE_TRANSPORT_ALLTOALL       ? "alltoall"
                        : cases[c].transport == EPMOE_TRANSPORT_GIN_EMULATED ? "gin-emulated"
                                                                             : "device", cases[c].tokens, cases[c].experts, d, dbytes / d / 1e3, cm,
                        cbytes / cm / 1e3, a2a, msgs / R, jobs[0].window_bytes, jobs[0].disp_send_us, jobs[0].comb_send_us, gr);
            first = 0;
        }
    }
    if (jf) fprintf(jf, "]\n"), fclose(jf);
    return 0;
}
