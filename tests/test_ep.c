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

#include "test.h"

/* REDUCE_AT_EXPERT rounds each rank's partial sum p_d to bf16, then rounds the sum of those;
** the reference rounds its fp32 sum once. With u = 2^-8 the bf16 unit roundoff (8 significant
** bits): |out - ref| <= u * (sum_d |p_d| + |out| + |ref|) + fp32 reassociation of the terms. */
#define BF16_U 0.00390625
#define F32_REASSOC 1e-6

enum { ROUTE_RANDOM, ROUTE_ONE_EXPERT, ROUTE_DUPLICATES };

typedef struct {
    epmoe_ep_config cfg;
    int rounds, split, idx64, route, requant;
    int T[8][8];          /* [round][rank] */
    const int *active;    /* NULL = all */
    int silent_rank;      /* this rank never dispatches (timeout test); -1 = none */
    uint64_t seed;
} scenario;

typedef struct {
    const scenario *sc;
    int rank;
    epmoe_cpu_world *world;
    /* per round: inputs and outputs of this rank */
    uint16_t *x[8];
    int32_t *topk[8];
    int64_t *topk64[8];
    float *w[8];
    uint8_t *recv_x[8], *recv_s[8];
    int32_t *masked[8], *src_info[8];
    uint16_t *expert_out[8], *out[8];
    epmoe_status st_create, st_dispatch, st_combine;
    char err[256];
} rank_io;

static size_t recv_elem(const epmoe_ep_config *c) { return c->wire == EPMOE_WIRE_FP8 ? 1 : 2; }

/* Self-describing token: group g of token t on rank r is constant (exact FP8 round trip) and
** encodes (r, t, g); the last group carries the token index. */
static void make_tokens(const scenario *sc, int round, int r, uint16_t *x) {
    const int H = sc->cfg.hidden, T = sc->T[round][r];
    for (int t = 0; t < T; t++)
        for (int h = 0; h < H; h++) {
            int g = h / 128;
            float v = (h >= H - 128) ? (float)(t + 1) : (float)((r + 1) * 16 + (g % 7) - 3) * (t % 2 ? 1.0f : -0.5f);
            x[(int64_t)t * H + h] = epmoe_bf16_from_float(v);
        }
}

static void make_routing(const scenario *sc, int round, int r, int32_t *idx, float *w) {
    test_rng rng = {sc->seed * 1000003u + (uint64_t)round * 7919u + (uint64_t)r + 1};
    const int T = sc->T[round][r], k = sc->cfg.top_k, E = sc->cfg.num_experts;
    for (int t = 0; t < T; t++)
        for (int j = 0; j < k; j++) {
            int64_t i = (int64_t)t * k + j;
            int e = (int)(rng_u64(&rng) % (uint64_t)E);
            if (sc->route == ROUTE_ONE_EXPERT) e = E - 1;
            if (sc->route == ROUTE_DUPLICATES && j % 2) e = idx[i - 1]; /* same expert twice */
            if (rng_u64(&rng) % 6 == 0) e = -1;
            if (t % 11 == 5) e = -1; /* some tokens go nowhere */
            idx[i] = e;
            w[i] = (float)(0.25 + rng_uniform(&rng));
        }
}

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
        /* expert outputs: derived from the received rows, so every row is distinct */
        const int64_t M = (int64_t)cfg.num_ranks * cfg.max_tokens, H = cfg.hidden, L = cfg.num_experts / cfg.num_ranks;
        for (int64_t le = 0; le < L; le++)
            for (int64_t row = 0; row < io->masked[round][le]; row++)
                for (int64_t h = 0; h < H; h++) {
                    int64_t i = (le * M + row) * H + h;
                    float v = cfg.wire == EPMOE_WIRE_FP8 ? epmoe_fp8_e4m3_to_float(io->recv_x[round][i])
                                                         : epmoe_bf16_to_float(((uint16_t *)io->recv_x[round])[i]);
                    io->expert_out[round][i] = epmoe_bf16_from_float(v * (float)(1 + le % 3) + (float)(h % 5) * 0.125f);
                }
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
    const epmoe_ep_config *c = &sc->cfg;
    const int R = c->num_ranks, N = c->max_tokens, H = c->hidden, E = c->num_experts, k = c->top_k, L = E / R;
    const int64_t M = (int64_t)R * N;
    epmoe_ep_layout lay;
    CHECK_STATUS(epmoe_ep_layout_query(c, &lay), EPMOE_OK);
    epmoe_cpu_world *world;
    CHECK_STATUS(epmoe_cpu_world_create(R, &world), EPMOE_OK);
    rank_io io[8];
    memset(io, 0, sizeof io);
    for (int r = 0; r < R; r++) {
        io[r].sc = sc, io[r].rank = r, io[r].world = world;
        for (int round = 0; round < sc->rounds; round++) {
            io[r].x[round] = malloc((size_t)N * H * 2 + 2);
            io[r].topk[round] = malloc((size_t)N * k * 4 + 4);
            io[r].topk64[round] = malloc((size_t)N * k * 8 + 8);
            io[r].w[round] = malloc((size_t)N * k * 4 + 4);
            io[r].recv_x[round] = malloc(lay.recv_x_bytes);
            io[r].recv_s[round] = malloc(lay.recv_scales_bytes + 1);
            io[r].masked[round] = malloc(lay.masked_m_bytes);
            io[r].src_info[round] = malloc(lay.src_info_bytes);
            io[r].expert_out[round] = calloc(1, lay.expert_out_bytes);
            io[r].out[round] = malloc(lay.out_bytes + 2);
            make_tokens(sc, round, r, io[r].x[round]);
            make_routing(sc, round, r, io[r].topk[round], io[r].w[round]);
            for (int64_t i = 0; i < (int64_t)N * k; i++) io[r].topk64[round][i] = io[r].topk[round][i];
            memset(io[r].recv_x[round], 0xAB, lay.recv_x_bytes); /* poison */
            memset(io[r].recv_s[round], 0xAB, lay.recv_scales_bytes + 1);
            memset(io[r].src_info[round], 0xAB, lay.src_info_bytes);
            memset(io[r].out[round], 0xAB, lay.out_bytes + 2);
        }
    }
    pthread_t th[8];
    for (int r = 0; r < R; r++) pthread_create(&th[r], NULL, run_rank, &io[r]);
    for (int r = 0; r < R; r++) pthread_join(th[r], NULL);

    long bad_status = 0, bad_m = 0, bad_rows = 0, bad_untouched = 0, bad_s = 0, bad_src = 0, bad_out = 0, bad_prov = 0;
    double worst_ratio = 0;
    for (int r = 0; r < R; r++) {
        if (r == sc->silent_rank || (sc->active && !sc->active[r])) continue;
        if (io[r].st_create || io[r].st_dispatch || io[r].st_combine) {
            bad_status++;
            printf("  %s rank %d: status %d/%d/%d: %s\n", name, r, io[r].st_create, io[r].st_dispatch, io[r].st_combine, io[r].err);
        }
    }
    for (int round = 0; round < sc->rounds && !bad_status; round++) {
        const uint16_t *xs[8];
        const int32_t *ts[8];
        const float *ws[8];
        void *rx[8], *rs[8];
        int32_t *rm[8], *ri[8];
        const uint16_t *eo[8];
        uint16_t *ro[8];
        int Ts[8];
        for (int r = 0; r < R; r++) {
            xs[r] = io[r].x[round], ts[r] = io[r].topk[round], ws[r] = io[r].w[round], Ts[r] = sc->T[round][r];
            rx[r] = malloc(lay.recv_x_bytes), rs[r] = malloc(lay.recv_scales_bytes + 1);
            rm[r] = malloc(lay.masked_m_bytes), ri[r] = malloc(lay.src_info_bytes), ro[r] = malloc(lay.out_bytes + 2);
            eo[r] = io[r].expert_out[round];
            memset(rx[r], 0xAB, lay.recv_x_bytes), memset(rs[r], 0xAB, lay.recv_scales_bytes + 1);
            memset(ri[r], 0xAB, lay.src_info_bytes);
        }
        CHECK_STATUS(epmoe_ep_dispatch_ref(c, xs, ts, Ts, sc->active, rx, rs, rm, ri), EPMOE_OK);
        CHECK_STATUS(epmoe_ep_combine_ref(c, eo, ts, ws, Ts, sc->active, ro), EPMOE_OK);
        for (int d = 0; d < R; d++) {
            if (sc->active && !sc->active[d]) continue;
            for (int le = 0; le < L; le++) {
                bad_m += io[d].masked[round][le] != rm[d][le];
                const int64_t m = rm[d][le];
                const size_t rb = (size_t)H * recv_elem(c);
                const uint8_t *got = (uint8_t *)io[d].recv_x[round] + (size_t)le * M * rb, *want = (uint8_t *)rx[d] + (size_t)le * M * rb;
                if (sc->requant) { /* expected: the reference's group-scaled rows requantized */
                    uint8_t *rq = malloc((size_t)m * H + 1);
                    const size_t slab = epmoe_scale_bytes(c->scale_fmt, M, H);
                    int32_t mm = (int32_t)m;
                    float osc = 0.05f;
                    epmoe_requant_fp8_ref(want, (uint8_t *)rs[d] + le * slab, c->scale_fmt, &mm, 1, M, H, &osc, rq);
                    bad_rows += m && memcmp(got, rq, (size_t)m * H) != 0;
                    free(rq);
                } else {
                    bad_rows += m && memcmp(got, want, (size_t)m * rb) != 0;
                }
                for (size_t b = (size_t)m * rb; b < (size_t)M * rb; b++) bad_untouched += got[b] != 0xAB;
                for (int64_t row = 0; row < m; row++) {
                    const int32_t si = io[d].src_info[round][le * M + row];
                    bad_src += si != ri[d][le * M + row];
                    /* provenance: the row's last group carries its token, its rank sits in group 0 */
                    const int src = si / N, t = si % N;
                    if (c->wire == EPMOE_WIRE_BF16)
                        bad_prov += memcmp(got + row * rb, io[src].x[round] + (int64_t)t * H, rb) != 0;
                }
                if (c->wire == EPMOE_WIRE_FP8 && !sc->requant) {
                    const size_t slab = epmoe_scale_bytes(c->scale_fmt, M, H);
                    for (int64_t row = 0; row < m; row++)
                        for (int g = 0; g < H / 128; g++) {
                            size_t o = (size_t)le * slab + epmoe_scale_offset(c->scale_fmt, M, H, row, g);
                            size_t w = c->scale_fmt >= EPMOE_SCALE_UE8M0_ROW ? 1 : 4;
                            bad_s += memcmp(io[d].recv_s[round] + o, (uint8_t *)rs[d] + o, w) != 0;
                        }
                }
            }
        }
        for (int r = 0; r < R; r++) {
            if (r == sc->silent_rank || (sc->active && !sc->active[r])) continue;
            for (int t = 0; t < Ts[r]; t++) {
                /* row of (r, t, j), found through the reference's src_info: one row per (token,
                ** expert), shared by every slot naming that expert */
                int64_t rowj[EPMOE_MAX_TOPK];
                for (int j = 0; j < k; j++) {
                    const int32_t e = ts[r][(int64_t)t * k + j];
                    rowj[j] = -1;
                    if (e < 0 || (sc->active && !sc->active[e / L])) continue;
                    for (int64_t q = 0; q < rm[e / L][e % L] && rowj[j] < 0; q++)
                        if (ri[e / L][(e % L) * M + q] == r * N + t) rowj[j] = q;
                }
                for (int h = 0; h < H; h++) {
                    float got = epmoe_bf16_to_float(io[r].out[round][(int64_t)t * H + h]);
                    float want = epmoe_bf16_to_float(ro[r][(int64_t)t * H + h]);
                    if (c->combine_mode == EPMOE_COMBINE_REDUCE_AT_OWNER) {
                        bad_out += !same_float(got, want);
                        continue;
                    }
                    /* the exact per-rank partial sums bound the extra rounding of REDUCE_AT_EXPERT */
                    double pd[8] = {0}, sum_abs_part = 0, sum_abs_terms = 0;
                    for (int j = 0; j < k; j++) {
                        if (rowj[j] < 0) continue;
                        const int32_t e = ts[r][(int64_t)t * k + j];
                        double term = (double)io[r].w[round][(int64_t)t * k + j] *
                                      epmoe_bf16_to_float(eo[e / L][((int64_t)(e % L) * M + rowj[j]) * H + h]);
                        pd[e / L] += term;
                        sum_abs_terms += fabs(term);
                    }
                    for (int d = 0; d < R; d++) sum_abs_part += fabs(pd[d]);
                    double bound = BF16_U * (sum_abs_part + fabs(got) + fabs(want)) + F32_REASSOC * sum_abs_terms + 1e-30;
                    double ratio = fabs((double)got - want) / bound;
                    if (ratio > worst_ratio) worst_ratio = ratio;
                    bad_out += !(ratio <= 1.0);
                }
            }
            for (int t = Ts[r]; t < N; t++) bad_untouched += io[r].out[round][(int64_t)t * H] != 0xABAB;
        }
        for (int r = 0; r < R; r++) free(rx[r]), free(rs[r]), free(rm[r]), free(ri[r]), free(ro[r]);
    }
    CHECK(bad_status == 0, "%s: calls failed", name);
    CHECK(bad_m == 0 && bad_rows == 0 && bad_s == 0 && bad_src == 0 && bad_prov == 0,
          "%s: masked_m %ld, rows %ld, scales %ld, src_info %ld, provenance %ld wrong", name, bad_m, bad_rows, bad_s, bad_src, bad_prov);
    CHECK(bad_untouched == 0, "%s: %ld bytes past masked_m / past T were written", name, bad_untouched);
    CHECK(bad_out == 0, "%s: %ld combine outputs wrong (worst %.2f of the bound)", name, bad_out, worst_ratio);
    if (c->combine_mode == EPMOE_COMBINE_REDUCE_AT_EXPERT && worst_ratio > 0)
        printf("  %-44s REDUCE_AT_EXPERT worst error %.3f of its bound\n", name, worst_ratio);
    for (int r = 0; r < R; r++)
        for (int round = 0; round < sc->rounds; round++) {
            free(io[r].x[round]), free(io[r].topk[round]), free(io[r].topk64[round]), free(io[r].w[round]);
            free(io[r].recv_x[round]), free(io[r].recv_s[round]), free(io[r].masked[round]), free(io[r].src_info[round]);
            free(io[r].expert_out[round]), free(io[r].out[round]);
        }
    epmoe_cpu_world_destroy(world);
}

static scenario base(int R, int N, int H, int E, int k, epmoe_wire wire) {
    scenario sc;
    memset(&sc, 0, sizeof sc);
    epmoe_ep_config c = EPMOE_EP_CONFIG_INIT;
    c.num_ranks = R, c.max_tokens = N, c.hidden = H, c.num_experts = E, c.top_k = k, c.wire = wire;
    c.timeout_ms = 20000;
    sc.cfg = c;
    sc.rounds = 3;
    sc.silent_rank = -1;
    sc.seed = 1;
    for (int round = 0; round < 8; round++)
        for (int r = 0; r < 8; r++) sc.T[round][r] = (round + r) % 3 == 0 ? N : (round * 5 + r * 3) % (N + 1);
    sc.T[1][R - 1] = 0; /* a rank with no tokens */
    return sc;
}

static void test_matrix(void) {
    const int Rs[] = {1, 2, 3, 4};
    char name[128];
    for (int ri = 0; ri < 4; ri++) {
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
} create_job;
static void *create_one(void *arg) {
    create_job *j = arg;
    epmoe_ep *ep;
    j->st = epmoe_ep_create_cpu(j->w, &j->cfg, &ep);
    if (j->st == EPMOE_OK) epmoe_ep_destroy(ep);
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

    /* per-call arguments on a 1-rank group */
    epmoe_cpu_world *w;
    epmoe_cpu_world_create(1, &w);
    c.max_tokens = 4, c.hidden = 128, c.num_experts = 4, c.top_k = 2;
    epmoe_ep *ep;
    CHECK_STATUS(epmoe_ep_create_cpu(w, &c, &ep), EPMOE_OK);
    uint16_t x[5 * 128] = {0};
    int32_t idx[10] = {0, 1, 2, 3, 0, 1, 2, 3, 0, 1};
    float wt[10] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
    uint8_t recv[4 * 4 * 128], sc[4 * 4 * 4];
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
    uint16_t eo[4 * 4 * 128] = {0}, out[4 * 128];
    epmoe_combine_args ca = {eo, wt, out};
    CHECK_STATUS(epmoe_combine(ep, 1, &ca, EPMOE_PHASE_BOTH, NULL), EPMOE_ERR_INVALID_ARG); /* no dispatch yet */
    CHECK_STATUS(epmoe_dispatch(ep, &a, EPMOE_PHASE_SEND, &h, NULL), EPMOE_OK);
    uint32_t h2;
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
    CHECK_STATUS(epmoe_combine(ep, h2, &cb, EPMOE_PHASE_BOTH, NULL), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_combine(ep, h2, &ca, EPMOE_PHASE_RECV, NULL), EPMOE_OK); /* the send half above went through */
    CHECK_STATUS(epmoe_dispatch(ep, &a, EPMOE_PHASE_BOTH, &h, NULL), EPMOE_OK);
    CHECK_STATUS(epmoe_dispatch(ep, &a, EPMOE_PHASE_BOTH, &h2, NULL), EPMOE_OK);
    CHECK_STATUS(epmoe_dispatch(ep, &a, EPMOE_PHASE_BOTH, &h3, NULL), EPMOE_OK);
    CHECK_STATUS(epmoe_combine(ep, h, &ca, EPMOE_PHASE_BOTH, NULL), EPMOE_ERR_INVALID_ARG); /* stale handle */
    int act[1] = {0};
    CHECK_STATUS(epmoe_ep_set_active_ranks(ep, act), EPMOE_ERR_INVALID_ARG);
    CHECK_STATUS(epmoe_ep_destroy(ep), EPMOE_OK);
    CHECK_STATUS(epmoe_ep_create_nccl(NULL, &c, &ep), EPMOE_HAVE_NCCL ? EPMOE_ERR_NULL_POINTER : EPMOE_ERR_UNSUPPORTED);
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
    CHECK_STATUS(epmoe_cpu_world_create(0, &w), EPMOE_ERR_INVALID_ARG);
}

int main(void) {
    test_bad_args();
    test_matrix();
    test_special_routes();
    test_masked_rank();
    test_timeout();
    return test_report("test_ep");
}
