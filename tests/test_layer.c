/*
** test_layer.c — the MoE layer on the CPU backend (ranks as threads) against the single-process
** layer reference: R = 1, 2, 3; FP8 wire with 1x128 scales, the per-tensor compat mode (requant
** inside dispatch), the BF16 wire with the cast after receive; both combine modes; -1 slots, zero
** tokens, T = N; schemes and wires that do not fit; bad arguments.
*/
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>

#include "layer_common.h"

typedef struct {
    layer_case *c;
    epmoe_cpu_world *world;
    int rank;
    uint16_t *out;
    epmoe_status st;
    char err[256];
} rank_job;

static void *run_rank(void *arg) {
    rank_job *j = arg;
    epmoe_ep_config ec = j->c->ec;
    ec.rank = j->rank;
    epmoe_ep *ep = NULL;
    epmoe_layer *layer = NULL;
    j->st = epmoe_ep_create_cpu(j->world, &ec, &ep);
    if (j->st == EPMOE_OK) j->st = epmoe_layer_create(ep, &j->c->lc, &j->c->hw[j->rank], &layer);
    /* two forwards: the second reuses the buffers (stale rows from the first must not leak in) */
    for (int it = 0; it < 2 && j->st == EPMOE_OK; it++)
        j->st = epmoe_layer_forward(layer, j->c->x[j->rank], j->c->topk[j->rank], 32, j->c->tw[j->rank], j->c->T[j->rank],
                                    j->out, NULL);
    if (j->st != EPMOE_OK) snprintf(j->err, sizeof j->err, "%s", epmoe_last_error());
    epmoe_layer_destroy(layer);
    if (ep) epmoe_ep_destroy(ep);
    return NULL;
}

static void run_case(layer_case *c, const char *name) {
    layer_case_make(c);
    const int R = c->ec.num_ranks;
    epmoe_cpu_world *world;
    CHECK_STATUS(epmoe_cpu_world_create(R, &world), EPMOE_OK);
    rank_job jobs[LAYER_MAX_R];
    pthread_t th[LAYER_MAX_R];
    for (int q = 0; q < R; q++) {
        jobs[q] = (rank_job){c, world, q, malloc((size_t)c->ec.max_tokens * c->ec.hidden * 2 + 2), EPMOE_OK, ""};
        pthread_create(&th[q], NULL, run_rank, &jobs[q]);
    }
    for (int q = 0; q < R; q++) pthread_join(th[q], NULL);
    const double bound = c->ec.combine_mode == EPMOE_COMBINE_REDUCE_AT_OWNER ? 0.0 : LAYER_PARTIAL_L2;
    for (int q = 0; q < R; q++) {
        CHECK(jobs[q].st == EPMOE_OK, "%s rank %d: %s", name, q, jobs[q].err);
        if (jobs[q].st == EPMOE_OK) layer_check(c, q, jobs[q].out, bound, name);
        free(jobs[q].out);
    }
    printf("  %-44s checked against the layer reference\n", name);
    epmoe_cpu_world_destroy(world);
    layer_case_free(c);
}

static layer_case base(int R, epmoe_wire wire, epmoe_combine_mode mode, int per_tensor) {
    layer_case c;
    memset(&c, 0, sizeof c);
    const epmoe_ep_config ec = {sizeof(epmoe_ep_config), R, 0, 9, 256, 4 * R, 3, wire, EPMOE_SCALE_F32_MMAJOR, 0, 1,
                                mode, 10000, EPMOE_TRANSPORT_AUTO};
    const epmoe_layer_config lc = {sizeof(epmoe_layer_config), EPMOE_SCHEME_W4AFP8, 128, per_tensor, 0};
    c.ec = ec, c.lc = lc;
    for (int q = 0; q < R; q++) c.T[q] = q == 1 ? 0 : (q == 2 ? 9 : 7); /* zero tokens, T = N */
    c.seed = 0x1a7e5 + (uint64_t)R * 31 + (uint64_t)wire * 7 + (uint64_t)mode * 3 + (uint64_t)per_tensor;
    return c;
}

static void test_matrix(void) {
    char name[96];
    for (int R = 1; R <= 3; R++)
        for (int wire = 0; wire < 2; wire++)
            for (int mode = 0; mode < 2; mode++)
                for (int pt = 0; pt < 2; pt++) {
                    layer_case c = base(R, (epmoe_wire)wire, (epmoe_combine_mode)mode, pt);
                    snprintf(name, sizeof name, "R=%d %s wire, reduce at %s, %s", R, wire ? "FP8" : "BF16",
                             mode ? "expert" : "owner", pt ? "per-tensor" : "1x128 scales");
                    run_case(&c, name);
                }
}

static void test_schemes_and_args(void) {
    CHECK(epmoe_scheme_default_wire(EPMOE_SCHEME_W4AFP8) == EPMOE_WIRE_FP8, "w4afp8 dispatches FP8");
    CHECK(epmoe_scheme_default_wire(EPMOE_SCHEME_BF16) == EPMOE_WIRE_BF16, "bf16 dispatches BF16");
    CHECK(epmoe_scheme_default_wire(EPMOE_SCHEME_W4A16) == EPMOE_WIRE_BF16, "w4a16 dispatches BF16");
    CHECK(!epmoe_scheme_accepts_wire(EPMOE_SCHEME_BF16, EPMOE_WIRE_FP8), "bf16 experts must not see the FP8 wire");
    CHECK(!epmoe_scheme_accepts_wire(EPMOE_SCHEME_W4A16, EPMOE_WIRE_FP8), "w4a16 experts must not see the FP8 wire");
    CHECK(epmoe_scheme_accepts_wire(EPMOE_SCHEME_W4AFP8, EPMOE_WIRE_BF16), "w4afp8 can cast after a BF16 wire");

    layer_case c = base(1, EPMOE_WIRE_FP8, EPMOE_COMBINE_REDUCE_AT_EXPERT, 0);
    layer_case_make(&c);
    epmoe_cpu_world *world;
    CHECK_STATUS(epmoe_cpu_world_create(1, &world), EPMOE_OK);
    epmoe_ep *ep;
    CHECK_STATUS(epmoe_ep_create_cpu(world, &c.ec, &ep), EPMOE_OK);
    epmoe_layer *layer = NULL;
    epmoe_layer_config lc = c.lc;
    lc.scheme = EPMOE_SCHEME_BF16;
    CHECK_STATUS(epmoe_layer_create(ep, &lc, &c.hw[0], &layer), EPMOE_ERR_UNSUPPORTED);
    lc.scheme = (epmoe_scheme)7;
    CHECK_STATUS(epmoe_layer_create(ep, &lc, &c.hw[0], &layer), EPMOE_ERR_INVALID_ARG);
    lc = c.lc;
    lc.intermediate = 256; /* the weights are for I = 128 */
    CHECK_STATUS(epmoe_layer_create(ep, &lc, &c.hw[0], &layer), EPMOE_ERR_INVALID_ARG);
    lc = c.lc;
    lc.size = 8;
    CHECK_STATUS(epmoe_layer_create(ep, &lc, &c.hw[0], &layer), EPMOE_ERR_INVALID_ARG);
    lc = c.lc;
    lc.per_tensor_act = 1;
    epmoe_layer_weights w = c.hw[0];
    w.a1_scale = NULL;
    CHECK_STATUS(epmoe_layer_create(ep, &lc, &w, &layer), EPMOE_ERR_NULL_POINTER);
    w = c.hw[0];
    w.w13.encoding = 9; /* would fail only inside the forward, after the collective dispatch */
    CHECK_STATUS(epmoe_layer_create(ep, &c.lc, &w, &layer), EPMOE_ERR_INVALID_ARG);
    w = c.hw[0];
    w.w2.qweight = NULL;
    CHECK_STATUS(epmoe_layer_create(ep, &c.lc, &w, &layer), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_layer_create(NULL, &c.lc, &c.hw[0], &layer), EPMOE_ERR_NULL_POINTER);
    CHECK(layer == NULL, "a failed create leaves *layer NULL");
    CHECK_STATUS(epmoe_layer_create(ep, &c.lc, &c.hw[0], &layer), EPMOE_OK);
    CHECK(epmoe_layer_bytes(layer) > 0, "the layer reports its buffers");
    uint16_t out[9 * 256];
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
    layer_case_free(&c);
}

int main(void) {
    test_schemes_and_args();
    test_matrix();
    return test_report("test_layer");
}
