/*
** test_ep.c — dispatch and combine on the CPU backend (ranks are threads) against the
** single-process reference, DeepEP-style: self-describing payloads (every row carries its
** source rank and token), received counts, rows, scales and source info exactly equal to the
** reference over the global routing table; combine bit-exact (REDUCE_AT_OWNER) or within the
** error model of the per-rank partial sums (REDUCE_AT_EXPERT). Awkward routing: -1 slots,
** duplicate experts in a token, tokens with no expert, T = 0 and T = N, experts that receive
** nothing, all tokens to one expert. Plus: several rounds (parities, acks), split halves with
** two live handles, int64 ids, masked ranks, a peer that never comes (timeout), bad arguments,
** mismatched configs. R = 1, 2, 3, 4.
*/
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <time.h>

#include "ep_common.h"

static epmoe_status combine_one(epmoe_ep *ep, rank_io *io, uint32_t h, int round, int split) {
    epmoe_combine_args ca = {io->expert_out[round], io->w[round], io->out[round]};
    if (!split) return epmoe_combine(ep, h, &ca, EPMOE_PHASE_BOTH, NULL);
    epmoe_status st = epmoe_combine(ep, h, &ca, EPMOE_PHASE_SEND, NULL);
    return st != EPMOE_OK ? st : epmoe_combine(ep, h, &ca, EPMOE_PHASE_RECV, NULL);
}

static void *run_rank(void *arg) {
    rank_io *io = arg;
    const scenario *sc = io->sc;
    epmoe_ep_config cfg = sc->cfg;
    cfg.rank = io->rank;
    if (io->rank == sc->silent_rank) { /* joins the group, then never dispatches */
        epmoe_ep *ep;
        io->st_create = epmoe_ep_create_cpu(io->world, &cfg, &ep);
        struct timespec ts = {0, 400 * 1000000L};
        nanosleep(&ts, NULL);
        if (io->st_create == EPMOE_OK) epmoe_ep_destroy(ep);
        return NULL;
    }
    epmoe_ep *ep = NULL;
    io->st_create = epmoe_ep_create_cpu(io->world, &cfg, &ep);
    if (io->st_create != EPMOE_OK) {
        snprintf(io->err, sizeof io->err, "%s", epmoe_last_error());
        return NULL;
    }
    if (sc->active) epmoe_ep_set_active_ranks(ep, sc->active);
    float requant_scale = 0.05f;
    uint32_t handles[8];
    for (int round = 0; round < sc->rounds; round++) {
        epmoe_dispatch_args a = {0};
        a.x = io->x[round];
        a.topk_idx = sc->idx64 ? (const void *)io->topk64[round] : (const void *)io->topk[round];
        a.topk_idx_bits = sc->idx64 ? 64 : 32;
        a.topk_weights = io->w[round];
        a.num_tokens = sc->T[round][io->rank];
        a.recv_x = io->recv_x[round];
        a.recv_scales = io->recv_s[round];
        a.masked_m = io->masked[round];
        a.recv_src_info = io->src_info[round];
        a.requant_scale = sc->requant ? &requant_scale : NULL;
        if (sc->split) {
            io->st_dispatch = epmoe_dispatch(ep, &a, EPMOE_PHASE_SEND, &handles[round], NULL);
            if (io->st_dispatch == EPMOE_OK) io->st_dispatch = epmoe_dispatch(ep, &a, EPMOE_PHASE_RECV, &handles[round], NULL);
        } else {
            io->st_dispatch = epmoe_dispatch(ep, &a, EPMOE_PHASE_BOTH, &handles[round], NULL);
        }
        if (io->st_dispatch != EPMOE_OK) break;
        make_expert_out(&cfg, io, round);
        /* with split halves, two dispatches are live: round's, and round-1's, combined now */
        const int cr = sc->split ? round - 1 : round;
        if (cr >= 0) io->st_combine = combine_one(ep, io, handles[cr], cr, sc->split);
        if (io->st_combine != EPMOE_OK) break;
    }
    if (sc->split && io->st_dispatch == EPMOE_OK && io->st_combine == EPMOE_OK)
        io->st_combine = combine_one(ep, io, handles[sc->rounds - 1], sc->rounds - 1, 1);
    if (io->st_dispatch != EPMOE_OK || io->st_combine != EPMOE_OK) snprintf(io->err, sizeof io->err, "%s", epmoe_last_error());
    epmoe_ep_destroy(ep);
    return NULL;
}

/* Runs a scenario on R threads and checks every rank's outputs against the reference. */
static void run_scenario(const scenario *sc, const char *name) {
    const int R = sc->cfg.num_ranks;
    epmoe_ep_layout lay;
    CHECK_STATUS(epmoe_ep_layout_query(&sc->cfg, &lay), EPMOE_OK);
    epmoe_cpu_world *world;
    CHECK_STATUS(epmoe_cpu_world_create(R, &world), EPMOE_OK);
    rank_io io[8];
    memset(io, 0, sizeof io);
    io_alloc(sc, &lay, io, R);
    for (int r = 0; r < R; r++) io[r].world = world;
    pthread_t th[8];
    for (int r = 0; r < R; r++) pthread_create(&th[r], NULL, run_rank, &io[r]);
    for (int r = 0; r < R; r++) pthread_join(th[r], NULL);
    check_scenario(sc, &lay, io, name);
    io_free(sc, io, R);
    epmoe_cpu_world_destroy(world);
}

static void test_matrix(void) {
    const int Rs[] = {1, 2, 3, 4, 8}; /* 8: DeepSeek-R1 EP8 rank count (issue #6), on the CPU backend */
    char name[128];
    for (int ri = 0; ri < 5; ri++) {
        const int R = Rs[ri];
        for (int wire = 0; wire < 2; wire++)
            for (int mode = 0; mode < 3; mode++) { /* 0: dedup+expert, 1: dedup+owner, 2: per-expert+owner */
                scenario sc = base(R, 13, 384, 4 * R, 4, (epmoe_wire)wire);
                sc.cfg.dedup = mode != 2;
                sc.cfg.combine_mode = mode == 0 ? EPMOE_COMBINE_REDUCE_AT_EXPERT : EPMOE_COMBINE_REDUCE_AT_OWNER;
                sc.cfg.scale_fmt = (epmoe_scale_fmt)(mode % 2); /* row and M-major */
                sc.seed = (uint64_t)(R * 10 + wire * 3 + mode);
                sc.route = mode == 1 ? ROUTE_DUPLICATES : ROUTE_RANDOM;
                sc.split = mode == 1;
                sc.idx64 = mode == 2;
                snprintf(name, sizeof name, "R=%d %s %s%s", R, wire ? "fp8" : "bf16",
                         mode == 0 ? "dedup/reduce-at-expert" : mode == 1 ? "dedup/reduce-at-owner+split+dups"
                                                                          : "per-expert/owner+int64",
                         "");
                run_scenario(&sc, name);
            }
    }
}

static void test_special_routes(void) {
    scenario sc = base(3, 8, 256, 6, 3, EPMOE_WIRE_FP8);
    sc.route = ROUTE_ONE_EXPERT; /* everything to the last expert; the others receive nothing */
    run_scenario(&sc, "R=3 fp8 all tokens to one expert");
    sc = base(2, 16, 640, 4, 2, EPMOE_WIRE_FP8); /* G = 5: UE8M0 padding */
    sc.cfg.scale_fmt = EPMOE_SCALE_UE8M0_MMAJOR, sc.cfg.round_scale = 1;
    run_scenario(&sc, "R=2 fp8 UE8M0 M-major (padding groups)");
    sc = base(2, 16, 256, 4, 2, EPMOE_WIRE_FP8);
    sc.requant = 1;
    run_scenario(&sc, "R=2 fp8 with requant at receive");
    sc = base(4, 5, 128, 8, 2, EPMOE_WIRE_BF16);
    sc.rounds = 6; /* parities wrap several times: the ack path */
    run_scenario(&sc, "R=4 bf16 six rounds");
    sc = base(2, 128, 7168, 256, 8, EPMOE_WIRE_FP8); /* DeepSeek-R1 shape, EP2 */
    sc.rounds = 2;
    run_scenario(&sc, "R=2 fp8 DeepSeek-R1 shape (N 128, H 7168, E 256, k 8)");
}

static void test_masked_rank(void) {
    static const int active[3] = {1, 1, 0};
    scenario sc = base(3, 9, 256, 6, 3, EPMOE_WIRE_BF16);
    sc.active = active;
    sc.silent_rank = 2; /* the masked rank is gone; the others must not wait for it */
    run_scenario(&sc, "R=3 bf16 rank 2 masked out");
}

/* A peer that never dispatches: the others get EPMOE_ERR_TIMEOUT, then fail fast, then tear down. */
static void test_timeout(void) {
    scenario sc = base(2, 4, 128, 2, 1, EPMOE_WIRE_BF16);
    sc.cfg.timeout_ms = 150;
    sc.rounds = 1;
    sc.silent_rank = 1;
    epmoe_cpu_world *world;
    epmoe_cpu_world_create(2, &world);
    rank_io io[2];
    memset(io, 0, sizeof io);
    uint16_t x[4 * 128] = {0};
    int32_t idx[4] = {0, 1, 0, 1};
    float w[4] = {1, 1, 1, 1};
    for (int r = 0; r < 2; r++) io[r].sc = &sc, io[r].rank = r, io[r].world = world;
    pthread_t th;
    pthread_create(&th, NULL, run_rank, &io[1]);
    epmoe_ep_config cfg = sc.cfg;
    cfg.rank = 0;
    epmoe_ep *ep;
    CHECK_STATUS(epmoe_ep_create_cpu(world, &cfg, &ep), EPMOE_OK);
    uint8_t recv[2 * 4 * 128 * 2];
    int32_t masked[1];
    epmoe_dispatch_args a = {x, idx, 32, w, 4, recv, NULL, masked, NULL, NULL};
    uint32_t h;
    double t0 = 0;
    {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        t0 = ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
    }
    CHECK_STATUS(epmoe_dispatch(ep, &a, EPMOE_PHASE_BOTH, &h, NULL), EPMOE_ERR_TIMEOUT);
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    double waited = ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6 - t0;
    CHECK(waited >= 140 && waited < 5000, "timed out after %.0f ms (timeout 150)", waited);
    CHECK(strstr(epmoe_last_error(), "rank 1") != NULL, "message names the silent peer: %s", epmoe_last_error());
    CHECK_STATUS(epmoe_dispatch(ep, &a, EPMOE_PHASE_BOTH, &h, NULL), EPMOE_ERR_TIMEOUT); /* fails fast */
    CHECK_STATUS(epmoe_ep_destroy(ep), EPMOE_OK);
    pthread_join(th, NULL);
    epmoe_cpu_world_destroy(world);
}

/* Creation with mismatched max_tokens: both ranks refuse, nobody hangs. */
typedef struct {
    epmoe_cpu_world *w;
    epmoe_ep_config cfg;
    epmoe_status st;
    epmoe_status mask_st, rejoin_st; /* rejoin: each rank masks the other, then tries to unmask it */
    int rejoin;
    char err[256]; /* create_dup: the thread's last error */
} create_job;
static void *create_one(void *arg) {
    create_job *j = arg;
    epmoe_ep *ep;
    j->st = epmoe_ep_create_cpu(j->w, &j->cfg, &ep);
    if (j->st == EPMOE_OK && j->rejoin) {
        int act[2] = {1, 1};
        act[1 - j->cfg.rank] = 0;
        j->mask_st = epmoe_ep_set_active_ranks(ep, act);
        act[1 - j->cfg.rank] = 1;
        j->rejoin_st = epmoe_ep_set_active_ranks(ep, act);
    }
    if (j->st == EPMOE_OK) epmoe_ep_destroy(ep);
    return NULL;
}

/* create_one, keeping the thread's error message (epmoe_last_error() is per thread) */
static void *create_dup(void *arg) {
    create_job *j = arg;
    create_one(j);
    snprintf(j->err, sizeof j->err, "%s", epmoe_last_error());
    return NULL;
}

static void test_bad_args(void) {
    epmoe_ep_config c = EPMOE_EP_CONFIG_INIT;
    epmoe_ep_layout lay;
    CHECK_STATUS(epmoe_ep_layout_query(&c, &lay), EPMOE_OK);
    /* DeepSeek-R1 EP1: buffers scale with N*R*L, not with E*N*H like DeepEP's 1.9 GB */
    CHECK(lay.window_bytes < (size_t)64 << 20, "window %zu bytes", lay.window_bytes);
    epmoe_ep_config b = c;
    b.size = 8;
    CHECK_STATUS(epmoe_ep_layout_query(&b, &lay), EPMOE_ERR_INVALID_ARG);
    b = c, b.num_experts = 255, b.num_ranks = 2;
    CHECK_STATUS(epmoe_ep_layout_query(&b, &lay), EPMOE_ERR_INVALID_ARG);
    b = c, b.hidden = 100;
    CHECK_STATUS(epmoe_ep_layout_query(&b, &lay), EPMOE_ERR_INVALID_ARG);
    b = c, b.top_k = 0;
    CHECK_STATUS(epmoe_ep_layout_query(&b, &lay), EPMOE_ERR_INVALID_ARG);
    b = c, b.dedup = 0; /* reduce-at-expert needs dedup */
    CHECK_STATUS(epmoe_ep_layout_query(&b, &lay), EPMOE_ERR_INVALID_ARG);
    b = c, b.scale_fmt = EPMOE_SCALE_UE8M0_ROW, b.round_scale = 0;
    CHECK_STATUS(epmoe_ep_layout_query(&b, &lay), EPMOE_ERR_INVALID_ARG);
    b = c, b.rank = 1;
    CHECK_STATUS(epmoe_ep_layout_query(&b, &lay), EPMOE_ERR_INVALID_ARG);
    CHECK_STATUS(epmoe_ep_layout_query(NULL, &lay), EPMOE_ERR_NULL_POINTER);
    b = c, b.num_ranks = b.num_experts = 32767, b.max_tokens = b.hidden = 65536; /* R*N*H: 2^47 elements an expert */
    CHECK_STATUS(epmoe_ep_layout_query(&b, &lay), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "num_ranks * max_tokens * hidden") != NULL, "message: %s", epmoe_last_error());
    CHECK_STATUS(epmoe_ep_layout_query(&c, NULL), EPMOE_ERR_NULL_POINTER);
    b = c, b.transport = (epmoe_transport)5;
    CHECK_STATUS(epmoe_ep_layout_query(&b, &lay), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "transport") != NULL, "message: %s", epmoe_last_error());
    b = c, b.transport = (epmoe_transport)-1;
    CHECK_STATUS(epmoe_ep_layout_query(&b, &lay), EPMOE_ERR_INVALID_ARG);
    b = c, b.wire = (epmoe_wire)2;
    CHECK_STATUS(epmoe_ep_layout_query(&b, &lay), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "wire") != NULL, "message: %s", epmoe_last_error());
    b = c, b.combine_mode = (epmoe_combine_mode)2;
    CHECK_STATUS(epmoe_ep_layout_query(&b, &lay), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "combine_mode") != NULL, "message: %s", epmoe_last_error());
    b = c, b.timeout_ms = 0;
    CHECK_STATUS(epmoe_ep_layout_query(&b, &lay), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "timeout_ms") != NULL, "message: %s", epmoe_last_error());
    b = c, b.max_tokens = 0;
    CHECK_STATUS(epmoe_ep_layout_query(&b, &lay), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "max_tokens") != NULL, "message: %s", epmoe_last_error());
    b = c, b.max_tokens = 65537;
    CHECK_STATUS(epmoe_ep_layout_query(&b, &lay), EPMOE_ERR_INVALID_ARG);

    /* per-call arguments on a 1-rank group */
    epmoe_cpu_world *w;
    epmoe_cpu_world_create(1, &w);
    /* a valid config whose window (~2^47 bytes) cannot be allocated: a clean OUT_OF_MEMORY (the
    ** message read the freed ep once; under ASan, with allocator_may_return_null=1 from make test-asan) */
    b = c, b.max_tokens = b.hidden = 65536, b.num_experts = 32767, b.top_k = 16, b.dedup = 0;
    b.combine_mode = EPMOE_COMBINE_REDUCE_AT_OWNER;
    CHECK_STATUS(epmoe_ep_layout_query(&b, &lay), EPMOE_OK);
    epmoe_ep *huge = NULL;
    CHECK_STATUS(epmoe_ep_create_cpu(w, &b, &huge), EPMOE_ERR_OUT_OF_MEMORY);
    CHECK(strstr(epmoe_last_error(), "window") != NULL && huge == NULL, "message: %s", epmoe_last_error());
    c.max_tokens = 4, c.hidden = 128, c.num_experts = 4, c.top_k = 2;
    epmoe_ep *ep;
    CHECK_STATUS(epmoe_ep_create_cpu(NULL, &c, &ep), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_ep_create_cpu(w, NULL, &ep), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_ep_create_cpu(w, &c, NULL), EPMOE_ERR_NULL_POINTER);
    b = c, b.num_ranks = 2; /* a valid config, for another world */
    CHECK_STATUS(epmoe_ep_create_cpu(w, &b, &ep), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "the world has 1 ranks") != NULL, "message: %s", epmoe_last_error());
    CHECK_STATUS(epmoe_ep_create_cpu(w, &c, &ep), EPMOE_OK);
    CHECK_STATUS(epmoe_ep_poll(NULL), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_ep_poll(ep), EPMOE_OK); /* the CPU backend records nothing asynchronously */
    uint16_t x[5 * 128] = {0};
    int32_t idx[10] = {0, 1, 2, 3, 0, 1, 2, 3, 0, 1};
    float wt[10] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
    _Alignas(16) uint8_t recv[4 * 4 * 128], sc[4 * 4 * 4];
    int32_t masked[4];
    uint32_t h = 0;
    epmoe_dispatch_args a = {x, idx, 32, wt, 4, recv, sc, masked, NULL, NULL};
    epmoe_dispatch_args bad = a;
    bad.num_tokens = 5;
    CHECK_STATUS(epmoe_dispatch(ep, &bad, EPMOE_PHASE_BOTH, &h, NULL), EPMOE_ERR_INVALID_ARG); /* T > N */
    bad = a, bad.topk_idx_bits = 16;
    CHECK_STATUS(epmoe_dispatch(ep, &bad, EPMOE_PHASE_BOTH, &h, NULL), EPMOE_ERR_INVALID_ARG);
    bad = a, bad.topk_weights = NULL;
    CHECK_STATUS(epmoe_dispatch(ep, &bad, EPMOE_PHASE_BOTH, &h, NULL), EPMOE_ERR_NULL_POINTER);
    bad = a, bad.recv_scales = NULL;
    CHECK_STATUS(epmoe_dispatch(ep, &bad, EPMOE_PHASE_BOTH, &h, NULL), EPMOE_ERR_NULL_POINTER);
    bad = a, bad.x = NULL;
    CHECK_STATUS(epmoe_dispatch(ep, &bad, EPMOE_PHASE_BOTH, &h, NULL), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_dispatch(ep, &a, (epmoe_phase)0, &h, NULL), EPMOE_ERR_INVALID_ARG);
    idx[3] = 4; /* == E */
    CHECK_STATUS(epmoe_dispatch(ep, &a, EPMOE_PHASE_BOTH, &h, NULL), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "topk_idx[1][1] = 4") != NULL, "message: %s", epmoe_last_error());
    idx[3] = -2;
    CHECK_STATUS(epmoe_dispatch(ep, &a, EPMOE_PHASE_BOTH, &h, NULL), EPMOE_ERR_INVALID_ARG);
    idx[3] = 3;
    /* misaligned arrays (their element's alignment on the CPU backend): refused before anything is
    ** sent, and the ep stays usable (the calls below) */
    _Alignas(16) uint8_t raw[64] = {0};
    bad = a, bad.topk_weights = (const float *)(void *)(raw + 1);
    CHECK_STATUS(epmoe_dispatch(ep, &bad, EPMOE_PHASE_BOTH, &h, NULL), EPMOE_ERR_MISALIGNED);
    CHECK(strstr(epmoe_last_error(), "topk_weights") != NULL, "message: %s", epmoe_last_error());
    bad = a, bad.topk_idx = raw + 2;
    CHECK_STATUS(epmoe_dispatch(ep, &bad, EPMOE_PHASE_BOTH, &h, NULL), EPMOE_ERR_MISALIGNED);
    bad = a, bad.x = (const uint16_t *)(void *)(raw + 1);
    CHECK_STATUS(epmoe_dispatch(ep, &bad, EPMOE_PHASE_BOTH, &h, NULL), EPMOE_ERR_MISALIGNED);
    bad = a, bad.masked_m = (int32_t *)(void *)(raw + 2);
    CHECK_STATUS(epmoe_dispatch(ep, &bad, EPMOE_PHASE_BOTH, &h, NULL), EPMOE_ERR_MISALIGNED);
    bad = a, bad.recv_src_info = (int32_t *)(void *)(raw + 1);
    CHECK_STATUS(epmoe_dispatch(ep, &bad, EPMOE_PHASE_BOTH, &h, NULL), EPMOE_ERR_MISALIGNED);
    bad = a, bad.recv_scales = raw + 3;
    CHECK_STATUS(epmoe_dispatch(ep, &bad, EPMOE_PHASE_BOTH, &h, NULL), EPMOE_ERR_MISALIGNED);
    /* the receive buffers apart from each other and from the tokens: refused before anything is sent */
    bad = a, bad.masked_m = (int32_t *)(void *)(recv + 256);
    CHECK_STATUS(epmoe_dispatch(ep, &bad, EPMOE_PHASE_BOTH, &h, NULL), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "recv_x overlaps masked_m") != NULL, "message: %s", epmoe_last_error());
    bad = a, bad.recv_scales = recv + 64;
    CHECK_STATUS(epmoe_dispatch(ep, &bad, EPMOE_PHASE_BOTH, &h, NULL), EPMOE_ERR_INVALID_ARG);
    bad = a, bad.x = (const uint16_t *)(void *)recv;
    CHECK_STATUS(epmoe_dispatch(ep, &bad, EPMOE_PHASE_BOTH, &h, NULL), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "recv_x overlaps x") != NULL, "message: %s", epmoe_last_error());
    bad = a, bad.recv_src_info = masked;
    CHECK_STATUS(epmoe_dispatch(ep, &bad, EPMOE_PHASE_BOTH, &h, NULL), EPMOE_ERR_INVALID_ARG);
    bad = a, bad.requant_scale = (const float *)(void *)(raw + 1);
    CHECK_STATUS(epmoe_dispatch(ep, &bad, EPMOE_PHASE_BOTH, &h, NULL), EPMOE_ERR_MISALIGNED);
    CHECK(strstr(epmoe_last_error(), "requant_scale") != NULL, "message: %s", epmoe_last_error());
    /* NULL ep, args, handle, and the receive half's outputs */
    CHECK_STATUS(epmoe_dispatch(NULL, &a, EPMOE_PHASE_BOTH, &h, NULL), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_dispatch(ep, NULL, EPMOE_PHASE_BOTH, &h, NULL), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_dispatch(ep, &a, EPMOE_PHASE_BOTH, NULL, NULL), EPMOE_ERR_NULL_POINTER);
    bad = a, bad.recv_x = NULL;
    CHECK_STATUS(epmoe_dispatch(ep, &bad, EPMOE_PHASE_BOTH, &h, NULL), EPMOE_ERR_NULL_POINTER);
    bad = a, bad.masked_m = NULL;
    CHECK_STATUS(epmoe_dispatch(ep, &bad, EPMOE_PHASE_BOTH, &h, NULL), EPMOE_ERR_NULL_POINTER);
    /* 64-bit ids are checked as 64-bit values: 2^32 + 1 is not expert 1, INT64_MIN is not -1 */
    int64_t idx64[10] = {0, 1, 2, 3, 0, 1, 2, 3, 0, 1};
    bad = a, bad.topk_idx = idx64, bad.topk_idx_bits = 64;
    idx64[3] = (INT64_C(1) << 32) + 1;
    CHECK_STATUS(epmoe_dispatch(ep, &bad, EPMOE_PHASE_BOTH, &h, NULL), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "topk_idx[1][1] = 4294967297") != NULL, "message: %s", epmoe_last_error());
    idx64[3] = (INT64_C(1) << 32);
    CHECK_STATUS(epmoe_dispatch(ep, &bad, EPMOE_PHASE_BOTH, &h, NULL), EPMOE_ERR_INVALID_ARG);
    idx64[3] = INT64_MIN;
    CHECK_STATUS(epmoe_dispatch(ep, &bad, EPMOE_PHASE_BOTH, &h, NULL), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "topk_idx[1][1] = -9223372036854775808") != NULL, "message: %s", epmoe_last_error());
    uint16_t eo[4 * 4 * 128] = {0}, out[4 * 128];
    epmoe_combine_args ca = {eo, wt, out};
    CHECK_STATUS(epmoe_combine(NULL, 1, &ca, EPMOE_PHASE_BOTH, NULL), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_combine(ep, 1, NULL, EPMOE_PHASE_BOTH, NULL), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_combine(ep, 0, &ca, EPMOE_PHASE_BOTH, NULL), EPMOE_ERR_INVALID_ARG); /* never a handle */
    CHECK_STATUS(epmoe_combine(ep, 1, &ca, (epmoe_phase)0, NULL), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "phase 0") != NULL, "message: %s", epmoe_last_error());
    CHECK_STATUS(epmoe_combine(ep, 1, &ca, (epmoe_phase)4, NULL), EPMOE_ERR_INVALID_ARG);
    CHECK_STATUS(epmoe_combine(ep, 1, &ca, (epmoe_phase)-1, NULL), EPMOE_ERR_INVALID_ARG);
    CHECK_STATUS(epmoe_combine(ep, 1, &ca, EPMOE_PHASE_BOTH, NULL), EPMOE_ERR_INVALID_ARG); /* no dispatch yet */
    CHECK_STATUS(epmoe_dispatch(ep, &a, EPMOE_PHASE_SEND, &h, NULL), EPMOE_OK);
    uint32_t h2;
    /* a whole dispatch before h is received: refused before its send (else the next SEND would be a third) */
    CHECK_STATUS(epmoe_dispatch(ep, &a, EPMOE_PHASE_BOTH, &h2, NULL), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "nothing was sent") != NULL, "message: %s", epmoe_last_error());
    CHECK_STATUS(epmoe_dispatch(ep, &a, EPMOE_PHASE_SEND, &h2, NULL), EPMOE_OK); /* two in flight */
    uint32_t h3;
    CHECK_STATUS(epmoe_dispatch(ep, &a, EPMOE_PHASE_SEND, &h3, NULL), EPMOE_ERR_INVALID_ARG); /* a third */
    CHECK_STATUS(epmoe_combine(ep, h, &ca, EPMOE_PHASE_BOTH, NULL), EPMOE_ERR_INVALID_ARG);   /* not received */
    CHECK_STATUS(epmoe_dispatch(ep, &a, EPMOE_PHASE_RECV, &h, NULL), EPMOE_OK);
    CHECK_STATUS(epmoe_dispatch(ep, &a, EPMOE_PHASE_RECV, &h2, NULL), EPMOE_OK);
    CHECK_STATUS(epmoe_combine(ep, h, &ca, EPMOE_PHASE_RECV, NULL), EPMOE_ERR_INVALID_ARG); /* recv before send */
    CHECK_STATUS(epmoe_combine(ep, h, &ca, EPMOE_PHASE_BOTH, NULL), EPMOE_OK);
    CHECK_STATUS(epmoe_combine(ep, h, &ca, EPMOE_PHASE_BOTH, NULL), EPMOE_ERR_INVALID_ARG); /* twice */
    epmoe_combine_args cb = ca;
    cb.out = NULL;
    /* both halves' arguments are checked before anything is sent: nothing awaits a receive then */
    CHECK_STATUS(epmoe_combine(ep, h2, &cb, EPMOE_PHASE_BOTH, NULL), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_combine(ep, h2, &ca, EPMOE_PHASE_RECV, NULL), EPMOE_ERR_INVALID_ARG);
    CHECK_STATUS(epmoe_combine(ep, h2, &ca, EPMOE_PHASE_BOTH, NULL), EPMOE_OK);
    CHECK_STATUS(epmoe_dispatch(ep, &a, EPMOE_PHASE_BOTH, &h, NULL), EPMOE_OK);
    CHECK_STATUS(epmoe_dispatch(ep, &a, EPMOE_PHASE_BOTH, &h2, NULL), EPMOE_OK);
    CHECK_STATUS(epmoe_dispatch(ep, &a, EPMOE_PHASE_BOTH, &h3, NULL), EPMOE_OK);
    CHECK_STATUS(epmoe_combine(ep, h, &ca, EPMOE_PHASE_BOTH, NULL), EPMOE_ERR_INVALID_ARG); /* stale handle */
    /* a dispatch the backend rejects (an id out of range, found while sending) takes nothing from
    ** the slot it would have used: h2, in that slot, still combines, to what h3 (the same inputs) gives */
    for (int i = 0; i < 10; i++) eo[i * 37 % (4 * 4 * 128)] = epmoe_bf16_from_float((float)(i + 1));
    epmoe_combine_args cx = ca;
    cx.out = (uint16_t[4 * 128]){0};
    /* id 7 (token 3, slot 1) = E, found while sending. Had the rejected call written h2's ids on the
    ** way, token 0 would have none left ({-1, -1}) and its combined row would be zero in h2's combine */
    int32_t idx2[10] = {-1, -1, 1, 0, 3, 2, 1, 4, 0, 0};
    bad = a, bad.topk_idx = idx2;
    CHECK_STATUS(epmoe_dispatch(ep, &bad, EPMOE_PHASE_BOTH, &h, NULL), EPMOE_ERR_INVALID_ARG);
    bad = a, bad.x = (const uint16_t *)(void *)(raw + 1); /* found before */
    CHECK_STATUS(epmoe_dispatch(ep, &bad, EPMOE_PHASE_BOTH, &h, NULL), EPMOE_ERR_MISALIGNED);
    CHECK_STATUS(epmoe_combine(ep, h2, &ca, EPMOE_PHASE_BOTH, NULL), EPMOE_OK);
    CHECK_STATUS(epmoe_combine(ep, h3, &cx, EPMOE_PHASE_BOTH, NULL), EPMOE_OK);
    CHECK(memcmp(ca.out, cx.out, sizeof out) == 0, "h2 after a rejected dispatch combines as h3 does");
    CHECK(epmoe_bf16_to_float(cx.out[0]) != 0.0f, "the comparison saw data (h3's token 0)");
    CHECK_STATUS(epmoe_dispatch(ep, &a, EPMOE_PHASE_BOTH, &h, NULL), EPMOE_OK);
    cx.out = (uint16_t *)(void *)(raw + 1);
    CHECK_STATUS(epmoe_combine(ep, h, &cx, EPMOE_PHASE_BOTH, NULL), EPMOE_ERR_MISALIGNED);
    cx.out = out, cx.topk_weights = (const float *)(void *)(raw + 2);
    CHECK_STATUS(epmoe_combine(ep, h, &cx, EPMOE_PHASE_BOTH, NULL), EPMOE_ERR_MISALIGNED);
    cx.expert_out = (const uint16_t *)(void *)(raw + 1), cx.topk_weights = wt;
    CHECK_STATUS(epmoe_combine(ep, h, &cx, EPMOE_PHASE_BOTH, NULL), EPMOE_ERR_MISALIGNED);
    CHECK_STATUS(epmoe_combine(ep, h, &ca, EPMOE_PHASE_BOTH, NULL), EPMOE_OK); /* nothing was sent by those */
    CHECK(epmoe_ep_backend(ep) == EPMOE_BACKEND_CPU && epmoe_ep_backend(NULL) == (epmoe_backend)-1, "epmoe_ep_backend");
    int act[1] = {0};
    CHECK_STATUS(epmoe_ep_set_active_ranks(ep, act), EPMOE_ERR_INVALID_ARG);
    act[0] = 1;
    CHECK_STATUS(epmoe_ep_set_active_ranks(ep, act), EPMOE_OK); /* no change */
    /* not while a call is half done: a sent dispatch or combine awaiting its receive */
    CHECK_STATUS(epmoe_dispatch(ep, &a, EPMOE_PHASE_SEND, &h, NULL), EPMOE_OK);
    CHECK_STATUS(epmoe_ep_set_active_ranks(ep, act), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "in flight") != NULL, "message: %s", epmoe_last_error());
    CHECK_STATUS(epmoe_dispatch(ep, &a, EPMOE_PHASE_RECV, &h, NULL), EPMOE_OK);
    CHECK_STATUS(epmoe_combine(ep, h, &ca, EPMOE_PHASE_SEND, NULL), EPMOE_OK);
    CHECK_STATUS(epmoe_ep_set_active_ranks(ep, act), EPMOE_ERR_INVALID_ARG);
    CHECK_STATUS(epmoe_combine(ep, h, &ca, EPMOE_PHASE_RECV, NULL), EPMOE_OK);
    CHECK_STATUS(epmoe_ep_set_active_ranks(ep, act), EPMOE_OK);
    CHECK_STATUS(epmoe_ep_destroy(ep), EPMOE_OK);
    { /* a per-tensor requant scale is a receive option of the FP8 wire: refused on a BF16-wire group */
        epmoe_ep_config cb16 = c;
        cb16.wire = EPMOE_WIRE_BF16;
        epmoe_ep *bf = NULL;
        CHECK_STATUS(epmoe_ep_create_cpu(w, &cb16, &bf), EPMOE_OK);
        static uint16_t recv16[4 * 4 * 128];
        const float rq = 0.05f;
        epmoe_dispatch_args a16 = {x, idx, 32, wt, 4, recv16, NULL, masked, NULL, &rq};
        CHECK_STATUS(epmoe_dispatch(bf, &a16, EPMOE_PHASE_BOTH, &h, NULL), EPMOE_ERR_INVALID_ARG);
        CHECK(strstr(epmoe_last_error(), "requant_scale needs the FP8 wire") != NULL, "message: %s", epmoe_last_error());
        a16.requant_scale = (const float *)(void *)(raw + 1);
        CHECK_STATUS(epmoe_dispatch(bf, &a16, EPMOE_PHASE_BOTH, &h, NULL), EPMOE_ERR_INVALID_ARG);
        CHECK_STATUS(epmoe_ep_destroy(bf), EPMOE_OK);
    }
    CHECK_STATUS(epmoe_ep_create_nccl(NULL, &c, &ep), EPMOE_ERR_NULL_POINTER);
    if (!EPMOE_HAVE_NCCL) { /* the stub: the real one's argument checks, then UNSUPPORTED (never touches comm) */
        struct ncclComm *fake = (struct ncclComm *)(void *)raw;
        CHECK_STATUS(epmoe_ep_create_nccl(fake, &c, NULL), EPMOE_ERR_NULL_POINTER);
        epmoe_ep_config bc = c;
        bc.top_k = 0;
        CHECK_STATUS(epmoe_ep_create_nccl(fake, &bc, &ep), EPMOE_ERR_INVALID_ARG);
        CHECK_STATUS(epmoe_ep_create_nccl(fake, &c, &ep), EPMOE_ERR_UNSUPPORTED);
    }
    epmoe_cpu_world_destroy(w);

    /* mismatched configs across ranks */
    epmoe_cpu_world_create(2, &w);
    create_job j[2];
    for (int r = 0; r < 2; r++) {
        j[r].w = w, j[r].cfg = c, j[r].cfg.num_ranks = 2, j[r].cfg.rank = r, j[r].cfg.num_experts = 4;
        j[r].cfg.timeout_ms = 2000;
    }
    j[1].cfg.max_tokens = 8;
    pthread_t th[2];
    for (int r = 0; r < 2; r++) pthread_create(&th[r], NULL, create_one, &j[r]);
    for (int r = 0; r < 2; r++) pthread_join(th[r], NULL);
    CHECK(j[0].st == EPMOE_ERR_INVALID_ARG && j[1].st == EPMOE_ERR_INVALID_ARG, "mismatched N: %d %d", j[0].st, j[1].st);
    epmoe_cpu_world_destroy(w);

    /* two threads that both pass rank 0: refused, and the message says so */
    epmoe_cpu_world_create(2, &w);
    for (int r = 0; r < 2; r++) {
        memset(&j[r], 0, sizeof j[r]);
        j[r].w = w, j[r].cfg = c, j[r].cfg.num_ranks = 2, j[r].cfg.rank = 0, j[r].cfg.num_experts = 4;
        j[r].cfg.timeout_ms = 2000;
    }
    for (int r = 0; r < 2; r++) pthread_create(&th[r], NULL, create_dup, &j[r]);
    for (int r = 0; r < 2; r++) pthread_join(th[r], NULL);
    for (int r = 0; r < 2; r++)
        CHECK(j[r].st == EPMOE_ERR_INVALID_ARG && strstr(j[r].err, "rank 1 never joined") != NULL,
              "rank 0 twice, thread %d: %d, %s", r, j[r].st, j[r].err);
    epmoe_cpu_world_destroy(w);

    /* masking is final: a masked rank cannot be made active again (its acks stopped) */
    epmoe_cpu_world_create(2, &w);
    for (int r = 0; r < 2; r++) {
        memset(&j[r], 0, sizeof j[r]);
        j[r].w = w, j[r].cfg = c, j[r].cfg.num_ranks = 2, j[r].cfg.rank = r, j[r].cfg.num_experts = 4;
        j[r].cfg.timeout_ms = 2000, j[r].rejoin = 1;
    }
    for (int r = 0; r < 2; r++) pthread_create(&th[r], NULL, create_one, &j[r]);
    for (int r = 0; r < 2; r++) pthread_join(th[r], NULL);
    for (int r = 0; r < 2; r++)
        CHECK(j[r].st == EPMOE_OK && j[r].mask_st == EPMOE_OK && j[r].rejoin_st == EPMOE_ERR_UNSUPPORTED,
              "rank %d: create %d, mask %d, rejoin %d (want 0, 0, unsupported)", r, j[r].st, j[r].mask_st, j[r].rejoin_st);
    epmoe_cpu_world_destroy(w);
    CHECK_STATUS(epmoe_cpu_world_create(0, &w), EPMOE_ERR_INVALID_ARG);
    CHECK_STATUS(epmoe_cpu_world_create(1, NULL), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_cpu_world_create(1025, &w), EPMOE_ERR_INVALID_ARG); /* at most 1024 threads-as-ranks */
    CHECK(strstr(epmoe_last_error(), "1024") != NULL, "message: %s", epmoe_last_error());
}

/* The references check what the backends check, before writing anything. */
static void test_ref_args(void) {
    epmoe_ep_config c = EPMOE_EP_CONFIG_INIT;
    c.max_tokens = 4, c.hidden = 128, c.num_experts = 4, c.top_k = 2; /* one rank, FP8 wire */
    uint16_t x[4 * 128] = {0}, eo[4 * 4 * 128] = {0}, out[4 * 128];
    int32_t idx[8] = {0, 1, 2, 3, 0, 1, 2, 3}, masked[4], info[4 * 4];
    float wt[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    uint8_t recv[4 * 4 * 128], sc[4 * 4 * 4];
    const uint16_t *xs[1] = {x}, *eos[1] = {eo};
    const int32_t *ids[1] = {idx};
    const float *wts[1] = {wt};
    void *rx[1] = {recv}, *rs[1] = {sc};
    int32_t *mm[1] = {masked}, *si[1] = {info};
    uint16_t *outs[1] = {out};
    int T[1] = {4};
    CHECK_STATUS(epmoe_ep_dispatch_ref(&c, xs, ids, T, NULL, rx, rs, mm, si), EPMOE_OK);
    CHECK_STATUS(epmoe_ep_combine_ref(&c, eos, ids, wts, T, NULL, outs), EPMOE_OK);
    T[0] = 5; /* > max_tokens */
    CHECK_STATUS(epmoe_ep_dispatch_ref(&c, xs, ids, T, NULL, rx, rs, mm, si), EPMOE_ERR_INVALID_ARG);
    CHECK_STATUS(epmoe_ep_combine_ref(&c, eos, ids, wts, T, NULL, outs), EPMOE_ERR_INVALID_ARG);
    T[0] = -1;
    CHECK_STATUS(epmoe_ep_dispatch_ref(&c, xs, ids, T, NULL, rx, rs, mm, si), EPMOE_ERR_INVALID_ARG);
    CHECK_STATUS(epmoe_ep_combine_ref(&c, eos, ids, wts, T, NULL, outs), EPMOE_ERR_INVALID_ARG);
    T[0] = 4, idx[5] = 4; /* == E */
    CHECK_STATUS(epmoe_ep_dispatch_ref(&c, xs, ids, T, NULL, rx, rs, mm, si), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "topk_idx[0][5] = 4") != NULL, "message: %s", epmoe_last_error());
    CHECK_STATUS(epmoe_ep_combine_ref(&c, eos, ids, wts, T, NULL, outs), EPMOE_ERR_INVALID_ARG);
    idx[5] = -2;
    CHECK_STATUS(epmoe_ep_combine_ref(&c, eos, ids, wts, T, NULL, outs), EPMOE_ERR_INVALID_ARG);
    idx[5] = 1;
    CHECK_STATUS(epmoe_ep_dispatch_ref(&c, xs, ids, T, NULL, rx, NULL, mm, si), EPMOE_ERR_NULL_POINTER); /* FP8: scales */
    rs[0] = NULL;
    CHECK_STATUS(epmoe_ep_dispatch_ref(&c, xs, ids, T, NULL, rx, rs, mm, si), EPMOE_ERR_NULL_POINTER);
    rs[0] = sc, xs[0] = NULL;
    CHECK_STATUS(epmoe_ep_dispatch_ref(&c, xs, ids, T, NULL, rx, rs, mm, si), EPMOE_ERR_NULL_POINTER);
    T[0] = 0; /* no tokens: no rows needed */
    CHECK_STATUS(epmoe_ep_dispatch_ref(&c, xs, ids, T, NULL, rx, rs, mm, si), EPMOE_OK);
    CHECK(masked[0] == 0 && masked[3] == 0, "no tokens, no rows");
    T[0] = 4, xs[0] = x, wts[0] = NULL;
    CHECK_STATUS(epmoe_ep_combine_ref(&c, eos, ids, wts, T, NULL, outs), EPMOE_ERR_NULL_POINTER);
    wts[0] = wt;
    /* NULL config, and NULL outer arrays (the per-rank pointer arrays themselves) */
    CHECK_STATUS(epmoe_ep_dispatch_ref(NULL, xs, ids, T, NULL, rx, rs, mm, si), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_ep_combine_ref(NULL, eos, ids, wts, T, NULL, outs), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_ep_dispatch_ref(&c, NULL, ids, T, NULL, rx, rs, mm, si), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_ep_dispatch_ref(&c, xs, NULL, T, NULL, rx, rs, mm, si), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_ep_dispatch_ref(&c, xs, ids, NULL, NULL, rx, rs, mm, si), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_ep_dispatch_ref(&c, xs, ids, T, NULL, NULL, rs, mm, si), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_ep_dispatch_ref(&c, xs, ids, T, NULL, rx, rs, NULL, si), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_ep_combine_ref(&c, NULL, ids, wts, T, NULL, outs), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_ep_combine_ref(&c, eos, NULL, wts, T, NULL, outs), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_ep_combine_ref(&c, eos, ids, NULL, T, NULL, outs), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_ep_combine_ref(&c, eos, ids, wts, NULL, NULL, outs), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_ep_combine_ref(&c, eos, ids, wts, T, NULL, NULL), EPMOE_ERR_NULL_POINTER);
    /* the valid call still works after all that */
    CHECK_STATUS(epmoe_ep_dispatch_ref(&c, xs, ids, T, NULL, rx, rs, mm, si), EPMOE_OK);
    CHECK_STATUS(epmoe_ep_combine_ref(&c, eos, ids, wts, T, NULL, outs), EPMOE_OK);
}

/* A healthy group whose peer never comes to the teardown: destroy waits timeout_ms, frees the ep
** and says EPMOE_ERR_TIMEOUT (it used to say OK). */
typedef struct {
    epmoe_cpu_world *w;
    epmoe_ep_config cfg;
    epmoe_ep *ep;
    epmoe_status st;
} keep_job;
static void *create_keep(void *arg) {
    keep_job *j = arg;
    j->st = epmoe_ep_create_cpu(j->w, &j->cfg, &j->ep);
    return NULL;
}
static void test_destroy_timeout(void) {
    epmoe_cpu_world *w;
    CHECK_STATUS(epmoe_cpu_world_create(2, &w), EPMOE_OK);
    keep_job j[2];
    pthread_t th[2];
    for (int r = 0; r < 2; r++) {
        epmoe_ep_config c = EPMOE_EP_CONFIG_INIT;
        c.num_ranks = 2, c.rank = r, c.max_tokens = 4, c.hidden = 128, c.num_experts = 4, c.top_k = 2, c.timeout_ms = 150;
        j[r].w = w, j[r].cfg = c, j[r].ep = NULL;
        pthread_create(&th[r], NULL, create_keep, &j[r]);
    }
    for (int r = 0; r < 2; r++) pthread_join(th[r], NULL);
    CHECK(j[0].st == EPMOE_OK && j[1].st == EPMOE_OK, "create: %d %d", j[0].st, j[1].st);
    if (j[0].st == EPMOE_OK) {
        CHECK_STATUS(epmoe_ep_destroy(j[0].ep), EPMOE_ERR_TIMEOUT); /* rank 1 is not tearing down */
        CHECK(strstr(epmoe_last_error(), "epmoe_ep_destroy") != NULL, "message: %s", epmoe_last_error());
    }
    if (j[1].st == EPMOE_OK) CHECK_STATUS(epmoe_ep_destroy(j[1].ep), EPMOE_ERR_TIMEOUT); /* rank 0 has left */
    epmoe_cpu_world_destroy(w);

    /* the same with rank 1 masked out by rank 0 (a failed rank): its absence is expected, so rank 0's
    ** teardown waits timeout_ms and says OK; rank 1, which masked nobody, still reports it */
    CHECK_STATUS(epmoe_cpu_world_create(2, &w), EPMOE_OK);
    for (int r = 0; r < 2; r++) {
        j[r].w = w, j[r].ep = NULL;
        pthread_create(&th[r], NULL, create_keep, &j[r]);
    }
    for (int r = 0; r < 2; r++) pthread_join(th[r], NULL);
    CHECK(j[0].st == EPMOE_OK && j[1].st == EPMOE_OK, "create: %d %d", j[0].st, j[1].st);
    if (j[0].st == EPMOE_OK) {
        const int act[2] = {1, 0};
        CHECK_STATUS(epmoe_ep_set_active_ranks(j[0].ep, act), EPMOE_OK);
        CHECK_STATUS(epmoe_ep_destroy(j[0].ep), EPMOE_OK);
    }
    if (j[1].st == EPMOE_OK) CHECK_STATUS(epmoe_ep_destroy(j[1].ep), EPMOE_ERR_TIMEOUT);
    epmoe_cpu_world_destroy(w);
}

/* One world, two groups on every rank (a BF16 wire at H = 128 and at H = 256), used in turn, with the
** world destroyed before the groups: each group's rows land in its own windows, and the world lives on
** until its last group is destroyed (ASan: no use after free, no leak). Identity experts with weights
** 0.5 + 0.5 give every token back exactly. */
typedef struct {
    epmoe_cpu_world *w;
    int rank, ok;
    char err[256];
} groups_job;
enum { GJ_R = 2, GJ_N = 2, GJ_E = 4, GJ_K = 2 };
static int gj_round(epmoe_ep *ep, int H, int rank, int salt) {
    uint16_t x[GJ_N * 256], out[GJ_N * 256], recv[GJ_E / GJ_R * GJ_R * GJ_N * 256];
    int32_t idx[GJ_N * GJ_K], masked[GJ_E / GJ_R];
    float wts[GJ_N * GJ_K];
    for (int t = 0; t < GJ_N; t++) {
        for (int h = 0; h < H; h++) x[t * H + h] = epmoe_bf16_from_float((float)(rank * 1000 + t * 100 + h % 50 + salt));
        idx[t * GJ_K] = (rank + t) % GJ_E, idx[t * GJ_K + 1] = (rank + t + 1) % GJ_E; /* both ranks' experts */
        wts[t * GJ_K] = wts[t * GJ_K + 1] = 0.5f;
    }
    epmoe_dispatch_args a = {x, idx, 32, wts, GJ_N, recv, NULL, masked, NULL, NULL};
    uint32_t hd;
    epmoe_combine_args c = {recv, wts, out};
    if (epmoe_dispatch(ep, &a, EPMOE_PHASE_BOTH, &hd, NULL) != EPMOE_OK || epmoe_combine(ep, hd, &c, EPMOE_PHASE_BOTH, NULL) != EPMOE_OK)
        return 0;
    return memcmp(out, x, sizeof(uint16_t) * GJ_N * (size_t)H) == 0;
}
static void *groups_rank(void *arg) {
    groups_job *j = arg;
    epmoe_ep *ep[2] = {NULL, NULL};
    for (int g = 0; g < 2; g++) {
        epmoe_ep_config c = EPMOE_EP_CONFIG_INIT;
        c.num_ranks = GJ_R, c.rank = j->rank, c.max_tokens = GJ_N, c.hidden = 128 * (g + 1), c.num_experts = GJ_E,
        c.top_k = GJ_K, c.wire = EPMOE_WIRE_BF16, c.combine_mode = EPMOE_COMBINE_REDUCE_AT_OWNER, c.timeout_ms = 5000;
        if (epmoe_ep_create_cpu(j->w, &c, &ep[g]) != EPMOE_OK) {
            snprintf(j->err, sizeof j->err, "create %d: %s", g, epmoe_last_error());
            return NULL;
        }
    }
    j->ok = gj_round(ep[0], 128, j->rank, 1) && gj_round(ep[1], 256, j->rank, 2);
    if (j->rank == 0) epmoe_cpu_world_destroy(j->w); /* groups still open on both ranks */
    j->ok = j->ok && gj_round(ep[0], 128, j->rank, 3) && gj_round(ep[1], 256, j->rank, 4);
    if (!j->ok) snprintf(j->err, sizeof j->err, "%s", epmoe_last_error());
    for (int g = 0; g < 2; g++) j->ok &= epmoe_ep_destroy(ep[g]) == EPMOE_OK;
    return NULL;
}
static void test_world_groups(void) {
    epmoe_cpu_world *w;
    CHECK_STATUS(epmoe_cpu_world_create(GJ_R, &w), EPMOE_OK);
    groups_job j[GJ_R];
    pthread_t th[GJ_R];
    for (int r = 0; r < GJ_R; r++) {
        j[r] = (groups_job){w, r, 0, ""};
        pthread_create(&th[r], NULL, groups_rank, &j[r]);
    }
    for (int r = 0; r < GJ_R; r++) pthread_join(th[r], NULL);
    for (int r = 0; r < GJ_R; r++) CHECK(j[r].ok, "rank %d: two groups on one world: %s", r, j[r].err);
}

int main(void) {
    test_bad_args();
    test_ref_args();
    test_destroy_timeout();
    test_world_groups();
    test_matrix();
    test_special_routes();
    test_masked_rank();
    test_timeout();
    return test_report("test_ep");
}
