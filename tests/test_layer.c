/*
** test_layer.c — the MoE layer on the CPU backend (ranks as threads) against the single-process
** layer reference (bit-exact under REDUCE_AT_OWNER) and against the fp64 model of layer_common.h,
** for every scheme at R = 1, 2, 3: w4afp8 (FP8 wire with 1x128 scales, the per-tensor compat mode
** with the requant inside dispatch, BF16 wire with the cast after receive), w8a8_fp8_block (FP8
** wire in each scale layout, BF16 wire with the cast after receive), bf16, w4a16 (int4 groups 32
** and 128); both combine modes; -1 slots, 0, 1, 3 and N tokens, an expert with no rows. The
** SGLang PR #22316 regression: an FP8-wire layer run interleaved with a bf16 and a w4a16 layer in
** one process leaves their outputs bit-exact. The phased forward with two micro-batches in
** flight. Schemes, wires and weights that do not fit; bad arguments.
*/
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>

#include "layer_common.h"

#define MAX_CASES 3

/* One rank's thread: its ep and layer in each case's group, then two rounds of forwards, the
** layers interleaved (the second round reuses the buffers: rows from the first must not leak in). */
typedef struct {
    layer_case **cases;
    int n;
    epmoe_cpu_world **worlds;
    int rank;
    uint16_t *out[MAX_CASES];
    epmoe_status st;
    char err[256];
} rank_job;

static void *run_rank(void *arg) {
    rank_job *j = arg;
    epmoe_ep *ep[MAX_CASES] = {0};
    epmoe_layer *layer[MAX_CASES] = {0};
    j->st = EPMOE_OK;
    for (int i = 0; i < j->n && j->st == EPMOE_OK; i++) {
        epmoe_ep_config ec = j->cases[i]->ec;
        ec.rank = j->rank;
        j->st = epmoe_ep_create_cpu(j->worlds[i], &ec, &ep[i]);
        if (j->st == EPMOE_OK) j->st = epmoe_layer_create(ep[i], &j->cases[i]->lc, &j->cases[i]->hw[j->rank], &layer[i]);
    }
    for (int it = 0; it < 2; it++)
        for (int i = 0; i < j->n && j->st == EPMOE_OK; i++) {
            const layer_case *c = j->cases[i];
            j->st = epmoe_layer_forward(layer[i], c->x[j->rank], c->topk[j->rank], 32, c->tw[j->rank], c->T[j->rank],
                                        j->out[i], NULL);
        }
    if (j->st != EPMOE_OK) snprintf(j->err, sizeof j->err, "%s", epmoe_last_error());
    for (int i = 0; i < j->n; i++) {
        epmoe_layer_destroy(layer[i]);
        if (ep[i]) epmoe_ep_destroy(ep[i]);
    }
    return NULL;
}

/* Roundings to fp8 on a token's way through the layer (see layer_common.h). */
static int fp8_roundings(const layer_case *c) {
    if (epmoe_scheme_default_wire(c->lc.scheme) != EPMOE_WIRE_FP8) return 0;
    return c->lc.per_tensor_act && c->ec.wire == EPMOE_WIRE_FP8 ? 3 : 2;
}

/* Run n cases of the same R side by side (each on its own group) and check every rank's output
** against the reference and the fp64 model. The cases are made here and freed. */
static void run_cases(layer_case **cases, int n, const char *const *names) {
    const int R = cases[0]->ec.num_ranks;
    epmoe_cpu_world *worlds[MAX_CASES];
    for (int i = 0; i < n; i++) {
        layer_case_make(cases[i]);
        CHECK_STATUS(epmoe_cpu_world_create(R, &worlds[i]), EPMOE_OK);
    }
    rank_job jobs[LAYER_MAX_R];
    pthread_t th[LAYER_MAX_R];
    for (int q = 0; q < R; q++) {
        jobs[q] = (rank_job){cases, n, worlds, q, {NULL}, EPMOE_OK, ""};
        for (int i = 0; i < n; i++) jobs[q].out[i] = malloc((size_t)cases[i]->ec.max_tokens * cases[i]->ec.hidden * 2 + 2);
        pthread_create(&th[q], NULL, run_rank, &jobs[q]);
    }
    for (int q = 0; q < R; q++) pthread_join(th[q], NULL);
    for (int i = 0; i < n; i++) {
        const layer_case *c = cases[i];
        const int partial = c->ec.combine_mode == EPMOE_COMBINE_REDUCE_AT_EXPERT;
        const double model_bound = LAYER_MODEL_L2(fp8_roundings(c), partial);
        double worst = 0;
        for (int q = 0; q < R; q++) {
            CHECK(jobs[q].st == EPMOE_OK, "%s rank %d: %s", names[i], q, jobs[q].err);
            if (jobs[q].st != EPMOE_OK) continue;
            layer_check(c, q, jobs[q].out[i], partial ? LAYER_PARTIAL_L2 : 0.0, names[i]);
            const double rel = layer_check_model(c, q, jobs[q].out[i], model_bound, names[i]);
            if (rel > worst) worst = rel;
        }
        printf("  %-56s reference: %s; fp64 model: rel. L2 %.2e (%3.0f%% of %.2e)\n", names[i],
               partial ? "within 2^-8" : "exact", worst, 100 * worst / model_bound, model_bound);
    }
    for (int q = 0; q < R; q++)
        for (int i = 0; i < n; i++) free(jobs[q].out[i]);
    for (int i = 0; i < n; i++) {
        epmoe_cpu_world_destroy(worlds[i]);
        layer_case_free(cases[i]);
    }
}

static void run_case(layer_case *c, const char *name) { run_cases(&c, 1, &name); }

/* N = 9 tokens per rank, H = 256, 4 experts per rank, top-3, I = 128. T: 7, 0, 9 (w4afp8) or
** 3, 0 and 9, or 9, 1 and 3 (the other schemes); those route nowhere near the last expert, so it
** receives no rows. */
static layer_case base(int R, epmoe_scheme scheme, epmoe_wire wire, epmoe_combine_mode mode, int per_tensor) {
    layer_case c;
    memset(&c, 0, sizeof c);
    const epmoe_ep_config ec = {sizeof(epmoe_ep_config), R, 0, 9, 256, 4 * R, 3, wire, EPMOE_SCALE_F32_MMAJOR, 0, 1,
                                mode, 10000, EPMOE_TRANSPORT_AUTO};
    const epmoe_layer_config lc = {sizeof(epmoe_layer_config), scheme, 128, per_tensor, 0};
    c.ec = ec, c.lc = lc;
    static const int small_T[4] = {1, 3, 0, 9};
    for (int q = 0; q < R; q++) {
        if (scheme == EPMOE_SCHEME_W4AFP8) c.T[q] = q == 1 ? 0 : (q == 2 ? 9 : 7);
        else c.T[q] = small_T[(R + q) % 4];
    }
    if (scheme != EPMOE_SCHEME_W4AFP8) c.num_routed = 4 * R - 1;
    c.seed = 0x1a7e5 + (uint64_t)R * 31 + (uint64_t)wire * 7 + (uint64_t)mode * 3 + (uint64_t)per_tensor +
             (uint64_t)scheme * 101;
    return c;
}

static void test_matrix(void) {
    static const struct {
        epmoe_scheme scheme;
        epmoe_wire wire;
        int per_tensor;
        int64_t group;
        const char *name;
    } kinds[] = {
        {EPMOE_SCHEME_W4AFP8, EPMOE_WIRE_FP8, 0, 0, "w4afp8, FP8 wire, 1x128 scales"},
        {EPMOE_SCHEME_W4AFP8, EPMOE_WIRE_FP8, 1, 0, "w4afp8, FP8 wire, per-tensor"},
        {EPMOE_SCHEME_W4AFP8, EPMOE_WIRE_BF16, 0, 0, "w4afp8, BF16 wire, 1x128 scales"},
        {EPMOE_SCHEME_W4AFP8, EPMOE_WIRE_BF16, 1, 0, "w4afp8, BF16 wire, per-tensor"},
        {EPMOE_SCHEME_W8A8_FP8_BLOCK, EPMOE_WIRE_FP8, 0, 0, "fp8_block, FP8 wire"},
        {EPMOE_SCHEME_W8A8_FP8_BLOCK, EPMOE_WIRE_BF16, 0, 0, "fp8_block, BF16 wire"},
        {EPMOE_SCHEME_BF16, EPMOE_WIRE_BF16, 0, 0, "bf16"},
        {EPMOE_SCHEME_W4A16, EPMOE_WIRE_BF16, 0, 32, "w4a16 g32"},
        {EPMOE_SCHEME_W4A16, EPMOE_WIRE_BF16, 0, 128, "w4a16 g128"},
    };
    static const char *fmt_names[] = {" f32-row", " f32-mmajor", " ue8m0-row", " ue8m0-mmajor"};
    char name[128];
    for (int R = 1; R <= 3; R++)
        for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++)
            for (int mode = 0; mode < 2; mode++) {
                layer_case c = base(R, kinds[i].scheme, kinds[i].wire, (epmoe_combine_mode)mode, kinds[i].per_tensor);
                c.group = kinds[i].group;
                const char *fmt = "";
                if (kinds[i].scheme == EPMOE_SCHEME_W8A8_FP8_BLOCK && kinds[i].wire == EPMOE_WIRE_FP8) {
                    /* every scale layout dispatch can deliver, across R and mode */
                    c.ec.scale_fmt = (epmoe_scale_fmt)((R + mode) % 4);
                    c.ec.round_scale = c.ec.scale_fmt >= EPMOE_SCALE_UE8M0_ROW;
                    fmt = fmt_names[c.ec.scale_fmt];
                }
                snprintf(name, sizeof name, "R=%d %s%s, reduce at %s", R, kinds[i].name, fmt, mode ? "expert" : "owner");
                run_case(&c, name);
            }
}

/* SGLang PR #22316: forcing the FP8 wire on every model quantized what bf16 and w4a16 experts read.
** Here an FP8-wire layer and a bf16 and a w4a16 layer (their own BF16-wire groups) run
** interleaved in one process: each stays bit-exact to its own reference. And the test has teeth:
** the bf16 layer's tokens through an fp8 cast would change its output. */
static void test_pr22316(void) {
    for (int s = 0; s < 2; s++) {
        const epmoe_scheme fp8 = s ? EPMOE_SCHEME_W8A8_FP8_BLOCK : EPMOE_SCHEME_W4AFP8;
        layer_case a = base(2, fp8, EPMOE_WIRE_FP8, EPMOE_COMBINE_REDUCE_AT_OWNER, 0),
                   b = base(2, EPMOE_SCHEME_BF16, EPMOE_WIRE_BF16, EPMOE_COMBINE_REDUCE_AT_OWNER, 0),
                   c = base(2, EPMOE_SCHEME_W4A16, EPMOE_WIRE_BF16, EPMOE_COMBINE_REDUCE_AT_OWNER, 0);
        c.group = 32;
        a.seed ^= 0x5eed, b.seed ^= 0x5eed, c.seed ^= 0x5eed;
        a.T[0] = b.T[0] = c.T[0] = 5;
        layer_case *cases[] = {&a, &b, &c};
        const char *names[] = {s ? "PR 22316: fp8_block (FP8 wire) next to bf16, w4a16"
                                 : "PR 22316: w4afp8 (FP8 wire) next to bf16, w4a16",
                               "PR 22316: bf16 (BF16 wire) next to an FP8 layer",
                               "PR 22316: w4a16 (BF16 wire) next to an FP8 layer"};
        if (s == 0) { /* the bug, emulated on the reference: bf16 tokens through the FP8 wire's cast */
            layer_case_make(&b);
            const int H = b.ec.hidden;
            long differ = 0, n = 0;
            uint16_t *xq[2], *out[2];
            for (int q = 0; q < 2; q++) {
                const int T = b.T[q];
                uint8_t *fq = malloc((size_t)T * H + 1);
                float *sc = malloc((size_t)T * (H / 128) * 4 + 4);
                int32_t rows = T;
                xq[q] = malloc((size_t)T * H * 2 + 2), out[q] = malloc((size_t)T * H * 2 + 2);
                CHECK_STATUS(epmoe_cast_group_fp8_ref(b.x[q], T, H, fq, sc, EPMOE_SCALE_F32_ROW, 0), EPMOE_OK);
                CHECK_STATUS(epmoe_dequant_fp8_ref(fq, sc, EPMOE_SCALE_F32_ROW, &rows, 1, T, H, EPMOE_BF16, xq[q]),
                             EPMOE_OK);
                free(fq), free(sc);
            }
            const uint16_t *xs[2] = {xq[0], xq[1]};
            const int32_t *ids[2] = {b.topk[0], b.topk[1]};
            const float *ws[2] = {b.tw[0], b.tw[1]};
            CHECK_STATUS(epmoe_layer_ref(&b.ec, &b.lc, b.hw, xs, ids, ws, b.T, out), EPMOE_OK);
            for (int q = 0; q < 2; q++) {
                for (int64_t i = 0; i < (int64_t)b.T[q] * H; i++) differ += out[q][i] != b.ref[q][i], n++;
                free(xq[q]), free(out[q]);
            }
            CHECK(differ * 2 > n, "an fp8 wire changes only %ld of %ld bf16-layer outputs: the check would be blind",
                  differ, n);
            layer_case_free(&b);
        }
        run_cases(cases, 3, names);
    }
}

static void test_schemes_and_args(void) {
    CHECK(epmoe_scheme_default_wire(EPMOE_SCHEME_W4AFP8) == EPMOE_WIRE_FP8, "w4afp8 dispatches FP8");
    CHECK(epmoe_scheme_default_wire(EPMOE_SCHEME_W8A8_FP8_BLOCK) == EPMOE_WIRE_FP8, "fp8_block dispatches FP8");
    CHECK(epmoe_scheme_default_wire(EPMOE_SCHEME_BF16) == EPMOE_WIRE_BF16, "bf16 dispatches BF16");
    CHECK(epmoe_scheme_default_wire(EPMOE_SCHEME_W4A16) == EPMOE_WIRE_BF16, "w4a16 dispatches BF16");
    CHECK(!epmoe_scheme_accepts_wire(EPMOE_SCHEME_BF16, EPMOE_WIRE_FP8), "bf16 experts must not see the FP8 wire");
    CHECK(!epmoe_scheme_accepts_wire(EPMOE_SCHEME_W4A16, EPMOE_WIRE_FP8), "w4a16 experts must not see the FP8 wire");
    CHECK(epmoe_scheme_accepts_wire(EPMOE_SCHEME_W4AFP8, EPMOE_WIRE_BF16), "w4afp8 can cast after a BF16 wire");
    CHECK(epmoe_scheme_accepts_wire(EPMOE_SCHEME_W8A8_FP8_BLOCK, EPMOE_WIRE_BF16), "fp8_block can cast after a BF16 wire");
    CHECK(epmoe_scheme_default_wire((epmoe_scheme)99) == (epmoe_wire)-1 && !epmoe_scheme_accepts_wire((epmoe_scheme)99, EPMOE_WIRE_BF16) &&
              !epmoe_scheme_accepts_wire((epmoe_scheme)-1, EPMOE_WIRE_FP8),
          "an unknown scheme has no wire");
    /* the default tile hint: mean m = N R k / E plus ceil(2.5 sqrt(m)), at least 1 */
    const struct { int64_t n; int r, k, e; int64_t want; } rows[] = {
        {128, 2, 8, 256, 16},  /* m = 8: 8 + 8 (the DeepSeek-R1 decode layer: T = 16) */
        {256, 2, 8, 256, 26},  /* m = 16: 16 + 10 */
        {32, 1, 8, 256, 4},    /* m = 1: 1 + 3 */
        {1, 1, 1, 256, 1},     /* m = 0 */
        {4096, 8, 8, 256, 1024 + 80}, /* m = 1024: 2.5 * 32 exactly */
        {0, 2, 8, 256, 1},     {128, 0, 8, 256, 1}, {128, 2, -1, 256, 1}, {128, 2, 8, 0, 1},
        /* products past 2^40 count as 2^40: 2^40 + 2.5 * 2^20 (these used to loop or wrap) */
        {INT64_C(1) << 58, 1, 1, 1, (INT64_C(1) << 40) + 2621440},
        {INT64_C(1) << 62, 1, 1, 1, (INT64_C(1) << 40) + 2621440},
        {INT64_MAX, 2, 2, 1, (INT64_C(1) << 40) + 2621440},
        {INT64_C(1) << 40, 2147483647, 2147483647, 2147483647, (INT64_C(1) << 40) + 2621440}, /* m ~ 2^71: capped */
        {INT64_C(1) << 40, 2147483647, 1, 2147483647, (INT64_C(1) << 40) + 2621440}, /* m = 2^40 exactly */
        {(INT64_C(1) << 40) - 1, 3, 1, 3, (INT64_C(1) << 40) - 1 + 2621440}, /* just under the cap: exact */
    };
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        const int64_t got = epmoe_expected_rows(rows[i].n, rows[i].r, rows[i].k, rows[i].e);
        CHECK(got == rows[i].want, "epmoe_expected_rows(%lld, %d, %d, %d) = %lld, want %lld", (long long)rows[i].n, rows[i].r,
              rows[i].k, rows[i].e, (long long)got, (long long)rows[i].want);
    }

    layer_case c = base(1, EPMOE_SCHEME_W4AFP8, EPMOE_WIRE_FP8, EPMOE_COMBINE_REDUCE_AT_EXPERT, 0);
    layer_case_make(&c);
    epmoe_cpu_world *world;
    CHECK_STATUS(epmoe_cpu_world_create(1, &world), EPMOE_OK);
    epmoe_ep *ep;
    CHECK_STATUS(epmoe_ep_create_cpu(world, &c.ec, &ep), EPMOE_OK);
    epmoe_layer *layer = NULL;
    epmoe_layer_config lc = c.lc;
    lc.scheme = (epmoe_scheme)7;
    CHECK_STATUS(epmoe_layer_create(ep, &lc, &c.hw[0], &layer), EPMOE_ERR_INVALID_ARG);
    lc = c.lc;
    lc.intermediate = 256; /* the weights are for I = 128 */
    CHECK_STATUS(epmoe_layer_create(ep, &lc, &c.hw[0], &layer), EPMOE_ERR_INVALID_ARG);
    lc.intermediate = INT64_MAX - 127; /* a multiple of 128 whose 2 * I overflows (UBSan) */
    CHECK_STATUS(epmoe_layer_create(ep, &lc, &c.hw[0], &layer), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "at most") != NULL, "message: %s", epmoe_last_error());
    lc = c.lc;
    lc.size = 8;
    CHECK_STATUS(epmoe_layer_create(ep, &lc, &c.hw[0], &layer), EPMOE_ERR_INVALID_ARG);
    lc = c.lc;
    lc.per_tensor_act = 1;
    epmoe_layer_weights w = c.hw[0];
    w.a1_scale = NULL;
    CHECK_STATUS(epmoe_layer_create(ep, &lc, &w, &layer), EPMOE_ERR_NULL_POINTER);
    /* misaligned static scales: found here, not by every forward after its collective dispatch */
    _Alignas(4) uint8_t sbytes[8] = {0};
    w.a1_scale = (const float *)(void *)(sbytes + 1);
    CHECK_STATUS(epmoe_layer_create(ep, &lc, &w, &layer), EPMOE_ERR_MISALIGNED);
    CHECK(strstr(epmoe_last_error(), "a1_scale") != NULL, "message: %s", epmoe_last_error());
    w = c.hw[0], w.a2_scale = (const float *)(void *)(sbytes + 2);
    CHECK_STATUS(epmoe_layer_create(ep, &lc, &w, &layer), EPMOE_ERR_MISALIGNED);
    CHECK(strstr(epmoe_last_error(), "a2_scale") != NULL, "message: %s", epmoe_last_error());
    w = c.hw[0];
    w.w13.encoding = 9; /* would fail only inside the forward, after the collective dispatch */
    CHECK_STATUS(epmoe_layer_create(ep, &c.lc, &w, &layer), EPMOE_ERR_INVALID_ARG);
    w = c.hw[0];
    w.w2.qweight = NULL;
    CHECK_STATUS(epmoe_layer_create(ep, &c.lc, &w, &layer), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_layer_create(NULL, &c.lc, &c.hw[0], &layer), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_layer_create(ep, NULL, &c.hw[0], &layer), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_layer_create(ep, &c.lc, NULL, &layer), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_layer_create(ep, &c.lc, &c.hw[0], NULL), EPMOE_ERR_NULL_POINTER);
    lc = c.lc;
    lc.expected_m = -1;
    CHECK_STATUS(epmoe_layer_create(ep, &lc, &c.hw[0], &layer), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "expected_m") != NULL, "message: %s", epmoe_last_error());
    CHECK(layer == NULL, "a failed create leaves *layer NULL");

    /* bf16 and w4a16 experts on an FP8-wire group: refused, whatever their weights */
    layer_case b = base(1, EPMOE_SCHEME_BF16, EPMOE_WIRE_BF16, EPMOE_COMBINE_REDUCE_AT_EXPERT, 0),
               i4 = base(1, EPMOE_SCHEME_W4A16, EPMOE_WIRE_BF16, EPMOE_COMBINE_REDUCE_AT_EXPERT, 0),
               f8 = base(1, EPMOE_SCHEME_W8A8_FP8_BLOCK, EPMOE_WIRE_BF16, EPMOE_COMBINE_REDUCE_AT_EXPERT, 0);
    i4.group = 32;
    layer_case_make(&b), layer_case_make(&i4), layer_case_make(&f8);
    CHECK_STATUS(epmoe_layer_create(ep, &b.lc, &b.hw[0], &layer), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "cannot consume") != NULL, "bf16 on FP8: %s", epmoe_last_error());
    CHECK_STATUS(epmoe_layer_create(ep, &i4.lc, &i4.hw[0], &layer), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "cannot consume") != NULL, "w4a16 on FP8: %s", epmoe_last_error());
    CHECK_STATUS(epmoe_layer_create(ep, &f8.lc, &f8.hw[0], &layer), EPMOE_OK); /* fp8_block reads the FP8 wire */
    epmoe_layer_destroy(layer);
    layer = NULL;

    /* on a BF16-wire group: weights of the wrong format or shape, per_tensor_act, int4 groups */
    epmoe_cpu_world *wb;
    epmoe_ep *eb;
    CHECK_STATUS(epmoe_cpu_world_create(1, &wb), EPMOE_OK);
    CHECK_STATUS(epmoe_ep_create_cpu(wb, &b.ec, &eb), EPMOE_OK);
    lc = b.lc;
    CHECK_STATUS(epmoe_layer_create(eb, &lc, &i4.hw[0], &layer), EPMOE_ERR_INVALID_ARG); /* bf16 given INT4 */
    CHECK(strstr(epmoe_last_error(), "takes EPMOE_WEIGHT_BF16 weights; e13 has EPMOE_WEIGHT_INT4") != NULL,
          "wrong format, named: %s", epmoe_last_error());
    CHECK_STATUS(epmoe_layer_create(eb, &lc, &c.hw[0], &layer), EPMOE_ERR_INVALID_ARG); /* bf16 given only W4A8 weights */
    w = b.hw[0];
    w.e2 = f8.hw[0].e2; /* e13 bf16, e2 fp8 */
    CHECK_STATUS(epmoe_layer_create(eb, &lc, &w, &layer), EPMOE_ERR_INVALID_ARG);
    lc.scheme = EPMOE_SCHEME_W8A8_FP8_BLOCK; /* fp8_block given bf16 weights */
    CHECK_STATUS(epmoe_layer_create(eb, &lc, &b.hw[0], &layer), EPMOE_ERR_INVALID_ARG);
    lc.scheme = EPMOE_SCHEME_W4AFP8; /* w4afp8 given bf16 weights (its w13/w2 are empty) */
    CHECK_STATUS(epmoe_layer_create(eb, &lc, &b.hw[0], &layer), EPMOE_ERR_INVALID_ARG);
    const epmoe_scheme no_pt[] = {EPMOE_SCHEME_BF16, EPMOE_SCHEME_W4A16, EPMOE_SCHEME_W8A8_FP8_BLOCK};
    const layer_case *fits[] = {&b, &i4, &f8};
    for (int i = 0; i < 3; i++) {
        lc = b.lc, lc.scheme = no_pt[i], lc.per_tensor_act = 1;
        CHECK_STATUS(epmoe_layer_create(eb, &lc, &fits[i]->hw[0], &layer), EPMOE_ERR_INVALID_ARG);
        CHECK(strstr(epmoe_last_error(), "per_tensor_act") != NULL, "per_tensor_act on %d: %s", i, epmoe_last_error());
    }
    w = i4.hw[0];
    w.e2.group = 128; /* e13 g32, e2 g128 */
    CHECK_STATUS(epmoe_layer_create(eb, &i4.lc, &w, &layer), EPMOE_ERR_INVALID_ARG);
    w = i4.hw[0];
    w.e13.group = w.e2.group = 64;
    CHECK_STATUS(epmoe_layer_create(eb, &i4.lc, &w, &layer), EPMOE_ERR_INVALID_ARG);
    w = i4.hw[0];
    w.e13.data = NULL;
    CHECK_STATUS(epmoe_layer_create(eb, &i4.lc, &w, &layer), EPMOE_ERR_NULL_POINTER);
    w = f8.hw[0];
    w.e2.scales = NULL;
    CHECK_STATUS(epmoe_layer_create(eb, &f8.lc, &w, &layer), EPMOE_ERR_NULL_POINTER);
    w = b.hw[0];
    w.e2.K = 256; /* I from e2 disagrees with the config */
    CHECK_STATUS(epmoe_layer_create(eb, &b.lc, &w, &layer), EPMOE_ERR_INVALID_ARG);
    CHECK(layer == NULL, "a failed create leaves *layer NULL");
    /* each scheme that fits the BF16 wire is built, with its buffers */
    const layer_case *all[] = {&b, &i4, &f8};
    for (int i = 0; i < 3; i++) {
        CHECK_STATUS(epmoe_layer_create(eb, &all[i]->lc, &all[i]->hw[0], &layer), EPMOE_OK);
        CHECK(epmoe_layer_bytes(layer) > 0, "the layer reports its buffers");
        epmoe_layer_destroy(layer);
        layer = NULL;
    }
    epmoe_ep_destroy(eb);
    epmoe_cpu_world_destroy(wb);
    layer_case_free(&b), layer_case_free(&i4), layer_case_free(&f8);

    CHECK_STATUS(epmoe_layer_create(ep, &c.lc, &c.hw[0], &layer), EPMOE_OK);
    CHECK(epmoe_layer_bytes(layer) > 0, "the layer reports its buffers");
    uint16_t out[9 * 256];
    { /* the phased forward's own checks, all before anything is sent */
        uint32_t h = 0;
        const uint16_t *x0 = c.x[0];
        const int32_t *i0 = c.topk[0];
        const float *w0 = c.tw[0];
        /* EXPERTS or RECV of a forward whose SEND never ran */
        CHECK_STATUS(epmoe_layer_forward_phase(layer, x0, i0, 32, w0, 3, out, EPMOE_LAYER_EXPERTS, &h, NULL),
                     EPMOE_ERR_INVALID_ARG);
        CHECK_STATUS(epmoe_layer_forward_phase(layer, x0, i0, 32, w0, 3, out, EPMOE_LAYER_RECV, &h, NULL),
                     EPMOE_ERR_INVALID_ARG);
        CHECK(strstr(epmoe_last_error(), "SEND had") == NULL, "no SEND to compare with: %s", epmoe_last_error());
        CHECK_STATUS(epmoe_layer_forward_phase(layer, x0, i0, 32, w0, 0, out, EPMOE_LAYER_RECV, &h, NULL),
                     EPMOE_ERR_INVALID_ARG);
        CHECK_STATUS(epmoe_layer_forward_phase(layer, x0, i0, 32, w0, 3, out, EPMOE_LAYER_EXPERTS | EPMOE_LAYER_RECV, &h,
                                               NULL),
                     EPMOE_ERR_INVALID_ARG);
        CHECK_STATUS(epmoe_layer_forward_phase(NULL, x0, i0, 32, w0, 3, out, EPMOE_LAYER_ALL, &h, NULL),
                     EPMOE_ERR_NULL_POINTER);
        CHECK_STATUS(epmoe_layer_forward_phase(layer, x0, i0, 32, w0, 3, out, EPMOE_LAYER_ALL, NULL, NULL),
                     EPMOE_ERR_NULL_POINTER);
        const int bad_phases[3] = {0, 8, -1};
        for (int i = 0; i < 3; i++) {
            CHECK_STATUS(epmoe_layer_forward_phase(layer, x0, i0, 32, w0, 3, out, bad_phases[i], &h, NULL),
                         EPMOE_ERR_INVALID_ARG);
            CHECK(strstr(epmoe_last_error(), "phases") != NULL, "phases %d: %s", bad_phases[i], epmoe_last_error());
        }
        CHECK_STATUS(epmoe_layer_forward_phase(layer, x0, i0, 32, w0, -1, out, EPMOE_LAYER_ALL, &h, NULL),
                     EPMOE_ERR_INVALID_ARG);
        CHECK_STATUS(epmoe_layer_forward_phase(layer, x0, i0, 16, w0, 3, out, EPMOE_LAYER_ALL, &h, NULL),
                     EPMOE_ERR_INVALID_ARG);
        CHECK_STATUS(epmoe_layer_forward_phase(layer, (const uint16_t *)(const void *)((const char *)x0 + 1), i0, 32, w0,
                                               3, out, EPMOE_LAYER_ALL, &h, NULL),
                     EPMOE_ERR_MISALIGNED);
        CHECK(strstr(epmoe_last_error(), "x =") != NULL, "message: %s", epmoe_last_error());
        CHECK_STATUS(epmoe_layer_forward_phase(layer, x0, i0, 32, w0, 3, (uint16_t *)(void *)((char *)out + 1),
                                               EPMOE_LAYER_ALL, &h, NULL),
                     EPMOE_ERR_MISALIGNED);
        CHECK(strstr(epmoe_last_error(), "out =") != NULL, "message: %s", epmoe_last_error());
    }
    CHECK_STATUS(epmoe_layer_forward(layer, c.x[0], c.topk[0], 32, NULL, 3, out, NULL), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_layer_forward(layer, c.x[0], c.topk[0], 32, c.tw[0], 3, NULL, NULL), EPMOE_ERR_NULL_POINTER);
    /* those were refused before the dispatch: the group still works, also with an empty batch */
    CHECK_STATUS(epmoe_layer_forward(layer, c.x[0], c.topk[0], 32, c.tw[0], 3, out, NULL), EPMOE_OK);
    CHECK_STATUS(epmoe_layer_forward(layer, NULL, NULL, 32, NULL, 0, NULL, NULL), EPMOE_OK);
    CHECK_STATUS(epmoe_layer_forward(layer, c.x[0], c.topk[0], 32, c.tw[0], 10, out, NULL), EPMOE_ERR_INVALID_ARG);
    int32_t bad[3] = {0, 99, 1}; /* expert id out of range */
    CHECK_STATUS(epmoe_layer_forward(layer, c.x[0], bad, 32, c.tw[0], 1, out, NULL), EPMOE_ERR_INVALID_ARG);
    epmoe_layer_destroy(layer);
    epmoe_layer_destroy(NULL);
    epmoe_ep_destroy(ep);
    epmoe_cpu_world_destroy(world);

    /* the reference: NULL arguments, and what the layer and the group would refuse */
    {
        const uint16_t *xs[1] = {c.x[0]};
        const int32_t *ids[1] = {c.topk[0]};
        const float *ws[1] = {c.tw[0]};
        uint16_t *outs[1] = {out};
        CHECK_STATUS(epmoe_layer_ref(&c.ec, &c.lc, c.hw, xs, ids, ws, c.T, outs), EPMOE_OK);
        CHECK_STATUS(epmoe_layer_ref(NULL, &c.lc, c.hw, xs, ids, ws, c.T, outs), EPMOE_ERR_NULL_POINTER);
        CHECK_STATUS(epmoe_layer_ref(&c.ec, NULL, c.hw, xs, ids, ws, c.T, outs), EPMOE_ERR_NULL_POINTER);
        CHECK_STATUS(epmoe_layer_ref(&c.ec, &c.lc, NULL, xs, ids, ws, c.T, outs), EPMOE_ERR_NULL_POINTER);
        CHECK_STATUS(epmoe_layer_ref(&c.ec, &c.lc, c.hw, NULL, ids, ws, c.T, outs), EPMOE_ERR_NULL_POINTER);
        CHECK_STATUS(epmoe_layer_ref(&c.ec, &c.lc, c.hw, xs, NULL, ws, c.T, outs), EPMOE_ERR_NULL_POINTER);
        CHECK_STATUS(epmoe_layer_ref(&c.ec, &c.lc, c.hw, xs, ids, NULL, c.T, outs), EPMOE_ERR_NULL_POINTER);
        CHECK_STATUS(epmoe_layer_ref(&c.ec, &c.lc, c.hw, xs, ids, ws, NULL, outs), EPMOE_ERR_NULL_POINTER);
        CHECK_STATUS(epmoe_layer_ref(&c.ec, &c.lc, c.hw, xs, ids, ws, c.T, NULL), EPMOE_ERR_NULL_POINTER);
        epmoe_ep_config ec = c.ec;
        ec.hidden = 100; /* not a multiple of 128 */
        CHECK_STATUS(epmoe_layer_ref(&ec, &c.lc, c.hw, xs, ids, ws, c.T, outs), EPMOE_ERR_INVALID_ARG);
        ec = c.ec, ec.num_experts = 8; /* the weights hold 4 local experts */
        CHECK_STATUS(epmoe_layer_ref(&ec, &c.lc, c.hw, xs, ids, ws, c.T, outs), EPMOE_ERR_INVALID_ARG);
        ec = c.ec, ec.size = 8; /* a config of another ABI */
        CHECK_STATUS(epmoe_layer_ref(&ec, &c.lc, c.hw, xs, ids, ws, c.T, outs), EPMOE_ERR_INVALID_ARG);
        ec = c.ec, ec.num_ranks = 65, ec.num_experts = 65 * 4; /* past the reference's 64 ranks: before it reads w[64] */
        CHECK_STATUS(epmoe_layer_ref(&ec, &c.lc, c.hw, xs, ids, ws, c.T, outs), EPMOE_ERR_UNSUPPORTED);
        lc = c.lc, lc.intermediate = 256; /* the weights are for I = 128 */
        CHECK_STATUS(epmoe_layer_ref(&c.ec, &lc, c.hw, xs, ids, ws, c.T, outs), EPMOE_ERR_INVALID_ARG);
        lc = c.lc, lc.expected_m = -1;
        CHECK_STATUS(epmoe_layer_ref(&c.ec, &lc, c.hw, xs, ids, ws, c.T, outs), EPMOE_ERR_INVALID_ARG);
        int T[1] = {c.ec.max_tokens + 1};
        CHECK_STATUS(epmoe_layer_ref(&c.ec, &c.lc, c.hw, xs, ids, ws, T, outs), EPMOE_ERR_INVALID_ARG);
        T[0] = -1;
        CHECK_STATUS(epmoe_layer_ref(&c.ec, &c.lc, c.hw, xs, ids, ws, T, outs), EPMOE_ERR_INVALID_ARG);
        const int32_t bad_ids[3] = {0, 4, 1}; /* 4 == E */
        const int32_t *bids[1] = {bad_ids};
        T[0] = 1;
        CHECK_STATUS(epmoe_layer_ref(&c.ec, &c.lc, c.hw, xs, bids, ws, T, outs), EPMOE_ERR_INVALID_ARG);
    }
    layer_case_free(&c);
}

/* ---- the phased forward: two micro-batches in flight on one layer ---------------------------
** Each rank runs SEND(a) SEND(b) EXPERTS(a) EXPERTS(b) RECV(a) RECV(b), where b is a's batch with
** the tokens in reverse order (a token's output does not depend on the others in its batch), then
** a third forward as SEND|EXPERTS + RECV. Every output must equal the reference (bit-exact under
** REDUCE_AT_OWNER). A RECV before its EXPERTS, and phase sets that skip one, are refused. */
typedef struct {
    layer_case *c;
    epmoe_cpu_world *world;
    int rank;
    uint16_t *out[3];
    epmoe_status st, refused[3]; /* refused: the out-of-order calls and a RECV with another num_tokens */
    char err[256];
} phase_job;

static void *phase_rank(void *arg) {
    phase_job *j = arg;
    layer_case *c = j->c;
    const int q = j->rank, T = c->T[q], H = c->ec.hidden, k = c->ec.top_k;
    epmoe_ep_config ec = c->ec;
    ec.rank = q;
    epmoe_ep *ep = NULL;
    epmoe_layer *y = NULL;
    uint16_t *xr = malloc((size_t)(T ? T : 1) * H * 2);
    int32_t *ir = malloc((size_t)(T ? T : 1) * k * 4);
    float *wr = malloc((size_t)(T ? T : 1) * k * 4);
    for (int t = 0; t < T; t++) {
        memcpy(xr + (size_t)t * H, c->x[q] + (size_t)(T - 1 - t) * H, (size_t)H * 2);
        memcpy(ir + (size_t)t * k, c->topk[q] + (size_t)(T - 1 - t) * k, (size_t)k * 4);
        memcpy(wr + (size_t)t * k, c->tw[q] + (size_t)(T - 1 - t) * k, (size_t)k * 4);
    }
    j->st = epmoe_ep_create_cpu(j->world, &ec, &ep);
    if (j->st == EPMOE_OK) j->st = epmoe_layer_create(ep, &c->lc, &c->hw[q], &y);
    uint32_t ha = 0, hb = 0, hc = 0;
    const uint16_t *xs[2] = {c->x[q], xr};
    const int32_t *is[2] = {c->topk[q], ir};
    const float *ws[2] = {c->tw[q], wr};
    uint32_t *hs[2] = {&ha, &hb};
    static const int order[6][2] = {{0, EPMOE_LAYER_SEND}, {1, EPMOE_LAYER_SEND}, {0, EPMOE_LAYER_EXPERTS},
                                    {1, EPMOE_LAYER_EXPERTS}, {0, EPMOE_LAYER_RECV}, {1, EPMOE_LAYER_RECV}};
    for (int i = 0; i < 6 && j->st == EPMOE_OK; i++) {
        const int b = order[i][0];
        if (i == 2) { /* refused before anything moves: a's combine has not been sent */
            j->refused[0] = epmoe_layer_forward_phase(y, xs[b], is[b], 32, ws[b], T, j->out[b], EPMOE_LAYER_RECV, hs[b], NULL);
            j->refused[1] = epmoe_layer_forward_phase(y, xs[b], is[b], 32, ws[b], T, j->out[b],
                                                      EPMOE_LAYER_SEND | EPMOE_LAYER_RECV, hs[b], NULL);
        }
        j->st = epmoe_layer_forward_phase(y, xs[b], is[b], 32, ws[b], T, j->out[b], order[i][1], hs[b], NULL);
    }
    if (j->st == EPMOE_OK)
        j->st = epmoe_layer_forward_phase(y, c->x[q], c->topk[q], 32, c->tw[q], T, j->out[2],
                                          EPMOE_LAYER_SEND | EPMOE_LAYER_EXPERTS, &hc, NULL);
    /* RECV writes SEND's T rows: another num_tokens (an out sized for it) is refused before anything */
    if (j->st == EPMOE_OK)
        j->refused[2] = epmoe_layer_forward_phase(y, c->x[q], c->topk[q], 32, c->tw[q], T + 1, j->out[2],
                                                  EPMOE_LAYER_RECV, &hc, NULL);
    if (j->st == EPMOE_OK)
        j->st = epmoe_layer_forward_phase(y, c->x[q], c->topk[q], 32, c->tw[q], T, j->out[2], EPMOE_LAYER_RECV, &hc, NULL);
    if (j->st != EPMOE_OK) snprintf(j->err, sizeof j->err, "%s", epmoe_last_error());
    /* b's rows back in a's order */
    uint16_t *tmp = malloc((size_t)(T ? T : 1) * H * 2);
    for (int t = 0; t < T; t++) memcpy(tmp + (size_t)t * H, j->out[1] + (size_t)(T - 1 - t) * H, (size_t)H * 2);
    memcpy(j->out[1], tmp, (size_t)T * H * 2);
    free(tmp), free(xr), free(ir), free(wr);
    epmoe_layer_destroy(y);
    if (ep) epmoe_ep_destroy(ep);
    return NULL;
}

static void test_phases(void) {
    const struct { int R; epmoe_scheme scheme; epmoe_wire wire; epmoe_combine_mode mode; } cs[] = {
        {2, EPMOE_SCHEME_W4AFP8, EPMOE_WIRE_FP8, EPMOE_COMBINE_REDUCE_AT_OWNER},
        {3, EPMOE_SCHEME_W4A16, EPMOE_WIRE_BF16, EPMOE_COMBINE_REDUCE_AT_OWNER},
        {2, EPMOE_SCHEME_W8A8_FP8_BLOCK, EPMOE_WIRE_FP8, EPMOE_COMBINE_REDUCE_AT_EXPERT}};
    for (size_t i = 0; i < sizeof cs / sizeof cs[0]; i++) {
        layer_case c = base(cs[i].R, cs[i].scheme, cs[i].wire, cs[i].mode, 0);
        layer_case_make(&c);
        const int R = c.ec.num_ranks;
        epmoe_cpu_world *world;
        CHECK_STATUS(epmoe_cpu_world_create(R, &world), EPMOE_OK);
        phase_job jobs[LAYER_MAX_R];
        pthread_t th[LAYER_MAX_R];
        for (int q = 0; q < R; q++) {
            jobs[q] = (phase_job){&c, world, q, {NULL}, EPMOE_OK, {EPMOE_OK, EPMOE_OK}, ""};
            for (int b = 0; b < 3; b++) jobs[q].out[b] = malloc((size_t)c.ec.max_tokens * c.ec.hidden * 2 + 2);
            pthread_create(&th[q], NULL, phase_rank, &jobs[q]);
        }
        for (int q = 0; q < R; q++) pthread_join(th[q], NULL);
        char name[96];
        const double tol = cs[i].mode == EPMOE_COMBINE_REDUCE_AT_EXPERT ? LAYER_PARTIAL_L2 : 0.0;
        for (int q = 0; q < R; q++) {
            CHECK(jobs[q].st == EPMOE_OK, "phased forward R=%d rank %d: %s", R, q, jobs[q].err);
            CHECK(jobs[q].refused[0] == EPMOE_ERR_INVALID_ARG && jobs[q].refused[1] == EPMOE_ERR_INVALID_ARG &&
                      jobs[q].refused[2] == EPMOE_ERR_INVALID_ARG,
                  "phased forward R=%d rank %d: RECV before EXPERTS gave %d, SEND|RECV gave %d, RECV with T + 1 gave %d "
                  "(want INVALID_ARG)", R, q, jobs[q].refused[0], jobs[q].refused[1], jobs[q].refused[2]);
            for (int b = 0; b < 3 && jobs[q].st == EPMOE_OK; b++) {
                snprintf(name, sizeof name, "phased forward R=%d %s, forward %c", R,
                         cs[i].scheme == EPMOE_SCHEME_W4AFP8 ? "w4afp8" : cs[i].scheme == EPMOE_SCHEME_W4A16 ? "w4a16"
                                                                                                          : "fp8_block",
                         "abc"[b]);
                layer_check(&c, q, jobs[q].out[b], tol, name);
            }
            for (int b = 0; b < 3; b++) free(jobs[q].out[b]);
        }
        printf("  %-56s S(a) S(b) X(a) X(b) R(a) R(b), then S|X R: %s\n", name, tol ? "within 2^-8" : "exact");
        epmoe_cpu_world_destroy(world);
        layer_case_free(&c);
    }
}

int main(void) {
    test_schemes_and_args();
    test_matrix();
    test_pr22316();
    test_phases();
    return test_report("test_layer");
}
