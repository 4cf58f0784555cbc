/*
** ep_common.h — what the CPU and GPU EP tests share: scenarios (shapes, routing styles, rounds),
** self-describing inputs, per-rank host buffers, and the check of every rank's outputs against
** the single-process reference (epmoe_ep_dispatch_ref / epmoe_ep_combine_ref).
*/
#ifndef EPMOE_TEST_EP_COMMON_H
#define EPMOE_TEST_EP_COMMON_H

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

static size_t recv_elem_size(const epmoe_ep_config *c) { return c->wire == EPMOE_WIRE_FP8 ? 1 : 2; }

/* Host buffers of every rank and round, inputs filled and outputs poisoned. */
static void io_alloc(const scenario *sc, const epmoe_ep_layout *lay, rank_io *io, int R) {
    const int N = sc->cfg.max_tokens, H = sc->cfg.hidden, k = sc->cfg.top_k;
    for (int r = 0; r < R; r++) {
        io[r].sc = sc, io[r].rank = r;
        for (int round = 0; round < sc->rounds; round++) {
            io[r].x[round] = malloc((size_t)N * H * 2 + 2);
            io[r].topk[round] = malloc((size_t)N * k * 4 + 4);
            io[r].topk64[round] = malloc((size_t)N * k * 8 + 8);
            io[r].w[round] = malloc((size_t)N * k * 4 + 4);
            io[r].recv_x[round] = malloc(lay->recv_x_bytes);
            io[r].recv_s[round] = malloc(lay->recv_scales_bytes + 1);
            io[r].masked[round] = malloc(lay->masked_m_bytes);
            io[r].src_info[round] = malloc(lay->src_info_bytes);
            io[r].expert_out[round] = calloc(1, lay->expert_out_bytes);
            io[r].out[round] = malloc(lay->out_bytes + 2);
            make_tokens(sc, round, r, io[r].x[round]);
            make_routing(sc, round, r, io[r].topk[round], io[r].w[round]);
            for (int64_t i = 0; i < (int64_t)N * k; i++) io[r].topk64[round][i] = io[r].topk[round][i];
            memset(io[r].recv_x[round], 0xAB, lay->recv_x_bytes); /* poison */
            memset(io[r].recv_s[round], 0xAB, lay->recv_scales_bytes + 1);
            memset(io[r].src_info[round], 0xAB, lay->src_info_bytes);
            memset(io[r].out[round], 0xAB, lay->out_bytes + 2);
        }
    }
}

static void io_free(const scenario *sc, rank_io *io, int R) {
    for (int r = 0; r < R; r++)
        for (int round = 0; round < sc->rounds; round++) {
            free(io[r].x[round]), free(io[r].topk[round]), free(io[r].topk64[round]), free(io[r].w[round]);
            free(io[r].recv_x[round]), free(io[r].recv_s[round]), free(io[r].masked[round]), free(io[r].src_info[round]);
            free(io[r].expert_out[round]), free(io[r].out[round]);
        }
}

/* Expert outputs derived from the received rows, so every row is distinct and traceable. */
static void make_expert_out(const epmoe_ep_config *cfg, rank_io *io, int round) {
    const int64_t M = (int64_t)cfg->num_ranks * cfg->max_tokens, H = cfg->hidden, L = cfg->num_experts / cfg->num_ranks;
    for (int64_t le = 0; le < L; le++)
        for (int64_t row = 0; row < io->masked[round][le]; row++)
            for (int64_t h = 0; h < H; h++) {
                int64_t i = (le * M + row) * H + h;
                float v = cfg->wire == EPMOE_WIRE_FP8 ? epmoe_fp8_e4m3_to_float(io->recv_x[round][i])
                                                      : epmoe_bf16_to_float(((uint16_t *)io->recv_x[round])[i]);
                io->expert_out[round][i] = epmoe_bf16_from_float(v * (float)(1 + le % 3) + (float)(h % 5) * 0.125f);
            }
}

/* Every rank's outputs of every round against the reference. */
static void check_scenario(const scenario *sc, const epmoe_ep_layout *lay_, rank_io *io, const char *name) {
    const epmoe_ep_config *c = &sc->cfg;
    const epmoe_ep_layout lay = *lay_;
    const int R = c->num_ranks, N = c->max_tokens, H = c->hidden, E = c->num_experts, k = c->top_k, L = E / R;
    const int64_t M = (int64_t)R * N;
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
                const size_t rb = (size_t)H * recv_elem_size(c);
                const uint8_t *got = (uint8_t *)io[d].recv_x[round] + (size_t)le * M * rb, *want = (uint8_t *)rx[d] + (size_t)le * M * rb;
                if (sc->requant) { /* expected: the reference's group-scaled rows requantized */
                    uint8_t *rq = malloc((size_t)M * H); /* y is [E, M, K] for the op, though it writes only m rows */
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
}

static scenario base(int R, int N, int H, int E, int k, epmoe_wire wire) {
    scenario sc;
    memset(&sc, 0, sizeof sc);
    epmoe_ep_config c = EPMOE_EP_CONFIG_INIT;
    c.num_ranks = R, c.max_tokens = N, c.hidden = H, c.num_experts = E, c.top_k = k, c.wire = wire;
    c.timeout_ms = 5000; /* a protocol bug shows as a timeout within seconds, not a hang */
    sc.cfg = c;
    sc.rounds = 3;
    sc.silent_rank = -1;
    sc.seed = 1;
    for (int round = 0; round < 8; round++)
        for (int r = 0; r < 8; r++) sc.T[round][r] = (round + r) % 3 == 0 ? N : (round * 5 + r * 3) % (N + 1);
    sc.T[1][R - 1] = 0; /* a rank with no tokens */
    return sc;
}

#endif
