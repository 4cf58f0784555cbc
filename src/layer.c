/*
** layer.c — the MoE layer: dispatch -> expert MLP -> combine over one EP group, and its
** single-process reference. The scheme decides the expert computation and the dispatch wires it
** can consume (checked against the group's wire at creation, never switched process-wide).
*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ep/ep_internal.h"
#include "internal.h"

struct epmoe_layer {
    epmoe_ep *ep;
    epmoe_layer_config cfg;
    epmoe_layer_weights w;
    int gpu;
    int64_t L, M, H, I;
    void *recv_x, *recv_scales, *q, *q_scales, *expert_out, *ws;
    int32_t *masked_m;
    size_t ws_bytes, bytes;
};

static int scheme_known(epmoe_scheme s) { return (unsigned)s <= (unsigned)EPMOE_SCHEME_W4A16; }

epmoe_wire epmoe_scheme_default_wire(epmoe_scheme scheme) {
    if (!scheme_known(scheme)) return (epmoe_wire)-1;
    return scheme == EPMOE_SCHEME_W4AFP8 || scheme == EPMOE_SCHEME_W8A8_FP8_BLOCK ? EPMOE_WIRE_FP8 : EPMOE_WIRE_BF16;
}

/* fp8 schemes quantize after receive when the wire is BF16; bf16-activation schemes must never
** see an FP8 wire (it would quantize what their experts read in bf16: SGLang PR #22316's bug). */
int epmoe_scheme_accepts_wire(epmoe_scheme scheme, epmoe_wire wire) {
    if (!scheme_known(scheme)) return 0;
    if (wire == EPMOE_WIRE_BF16) return 1;
    return wire == EPMOE_WIRE_FP8 && epmoe_scheme_default_wire(scheme) == EPMOE_WIRE_FP8;
}

static const char *scheme_name(int s) {
    static const char *names[] = {"bf16", "w8a8_fp8_block", "w4afp8", "w4a16"};
    return s >= 0 && s < 4 ? names[s] : "?";
}

static const char *format_name(int f) { /* epmoe_weight_format */
    static const char *names[] = {"EPMOE_WEIGHT_BF16", "EPMOE_WEIGHT_FP8_BLOCK", "EPMOE_WEIGHT_INT4"};
    return f >= 0 && f < 3 ? names[f] : "an unknown format";
}

/* The expert weight format of each scheme; -1: the repacked W4A8 weights (w13, w2). */
static int scheme_format(int s) {
    static const int formats[] = {[EPMOE_SCHEME_BF16] = EPMOE_WEIGHT_BF16,
                                  [EPMOE_SCHEME_W8A8_FP8_BLOCK] = EPMOE_WEIGHT_FP8_BLOCK,
                                  [EPMOE_SCHEME_W4AFP8] = -1,
                                  [EPMOE_SCHEME_W4A16] = EPMOE_WEIGHT_INT4};
    return formats[s];
}

/* fp8-activation schemes on the BF16 wire cast the received rows themselves (1x128, F32_ROW). */
static int casts_after_receive(const epmoe_ep_config *ec, const epmoe_layer_config *cfg) {
    return ec->wire == EPMOE_WIRE_BF16 && epmoe_scheme_default_wire(cfg->scheme) == EPMOE_WIRE_FP8;
}

/* The local experts' weights the scheme reads: shapes against the group and config, then the
** format's own checks. */
static epmoe_status check_weights(const char *fn, const epmoe_ep_config *ec, const epmoe_layer_config *cfg,
                                  const epmoe_layer_weights *w, int device) {
    const int64_t L = ec->num_experts / ec->num_ranks, H = ec->hidden, I = cfg->intermediate;
    typedef struct { int64_t E, N, K; } dims;
    const int fmt = scheme_format(cfg->scheme), w4 = fmt < 0;
    const dims a = w4 ? (dims){w->w13.E, w->w13.N, w->w13.K} : (dims){w->e13.E, w->e13.N, w->e13.K};
    const dims b = w4 ? (dims){w->w2.E, w->w2.N, w->w2.K} : (dims){w->e2.E, w->e2.N, w->e2.K};
    if (a.E != L || a.N != 2 * I || a.K != H || b.E != L || b.N != H || b.K != I)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG,
                           "%s: weights %s [%lld, %lld, %lld], %s [%lld, %lld, %lld]; the group and config need "
                           "[%lld, %lld, %lld] and [%lld, %lld, %lld]",
                           fn, w4 ? "w13" : "e13", (long long)a.E, (long long)a.N, (long long)a.K, w4 ? "w2" : "e2",
                           (long long)b.E, (long long)b.N, (long long)b.K, (long long)L, (long long)(2 * I),
                           (long long)H, (long long)L, (long long)H, (long long)I);
    if (w4) {
        EPMOE_CHECK(epmoe__check_w4a8_weights(fn, "w13", &w->w13, device));
        return epmoe__check_w4a8_weights(fn, "w2", &w->w2, device);
    }
    if ((int)w->e13.format != fmt || (int)w->e2.format != fmt)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: scheme %s takes %s weights; e13 has %s and e2 %s", fn,
                           scheme_name(cfg->scheme), format_name(fmt), format_name((int)w->e13.format),
                           format_name((int)w->e2.format));
    EPMOE_CHECK(epmoe__check_expert_weights(fn, "e13", &w->e13, device));
    EPMOE_CHECK(epmoe__check_expert_weights(fn, "e2", &w->e2, device));
    if (fmt == EPMOE_WEIGHT_INT4 && w->e13.group != w->e2.group)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: e13 group %lld and e2 group %lld must be the same", fn,
                           (long long)w->e13.group, (long long)w->e2.group);
    return EPMOE_OK;
}

/* Everything the forward would find wrong after the collective dispatch is found here, before it. */
static epmoe_status check_layer(const char *fn, const epmoe_ep_config *ec, const epmoe_layer_config *cfg,
                                const epmoe_layer_weights *w, int device) {
    if (!cfg || !w) return epmoe__fail(EPMOE_ERR_NULL_POINTER, "%s: cfg or weights is NULL", fn);
    if (cfg->size != sizeof(epmoe_layer_config))
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: cfg->size = %zu, this library's epmoe_layer_config has %zu bytes",
                           fn, cfg->size, sizeof(epmoe_layer_config));
    if (cfg->scheme < EPMOE_SCHEME_BF16 || cfg->scheme > EPMOE_SCHEME_W4A16)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: scheme %d is not an epmoe_scheme", fn, cfg->scheme);
    if (!epmoe_scheme_accepts_wire(cfg->scheme, ec->wire))
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: scheme %s cannot consume the group's %s wire", fn,
                           scheme_name(cfg->scheme), ec->wire == EPMOE_WIRE_FP8 ? "FP8" : "BF16");
    if (cfg->per_tensor_act && cfg->scheme != EPMOE_SCHEME_W4AFP8)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: per_tensor_act is w4afp8's compat mode; scheme %s has no static "
                           "per-tensor activation scales", fn, scheme_name(cfg->scheme));
    if (cfg->intermediate <= 0 || cfg->intermediate % 128 || cfg->intermediate > EPMOE__MAX_DIM)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: intermediate = %lld must be a positive multiple of 128, at most %lld",
                           fn, (long long)cfg->intermediate, (long long)EPMOE__MAX_DIM);
    if (cfg->expected_m < 0) return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: expected_m must be >= 0", fn);
    EPMOE_CHECK(check_weights(fn, ec, cfg, w, device));
    if (cfg->per_tensor_act) {
        if (!w->a1_scale || !w->a2_scale)
            return epmoe__fail(EPMOE_ERR_NULL_POINTER, "%s: per_tensor_act needs a1_scale and a2_scale", fn);
        EPMOE_CHECK(epmoe__need(fn, w->a1_scale, "a1_scale", 4));
        EPMOE_CHECK(epmoe__need(fn, w->a2_scale, "a2_scale", 4));
    }
    return EPMOE_OK;
}

static const int64_t kRowsCap = INT64_C(1) << 40;

int64_t epmoe_expected_rows(int64_t tokens_per_rank, int ranks, int top_k, int experts) {
    if (tokens_per_rank <= 0 || ranks <= 0 || top_k <= 0 || experts <= 0) return 1;
    /* the mean exactly (the product < 2^125 in 128 bits), capped at 2^40 rows (a hint: any value past
    ** the largest tile picks the same), so the bisection below stays within int64 */
    const unsigned __int128 q = (unsigned __int128)tokens_per_rank * (unsigned)ranks * (unsigned)top_k / (unsigned)experts;
    const int64_t m = q > (unsigned __int128)kRowsCap ? kRowsCap : (int64_t)q;
    /* ceil(2.5 sqrt(m)) = the least s with 4 s^2 >= 25 m, in integers (no libm), by bisection */
    int64_t lo = 0, hi = 1;
    while (4 * hi * hi < 25 * m) hi *= 2;
    while (hi - lo > 1) {
        const int64_t mid = (lo + hi) / 2;
        if (4 * mid * mid >= 25 * m) hi = mid;
        else lo = mid;
    }
    const int64_t s = m > 0 ? hi : 0;
    return m + s > 0 ? m + s : 1;
}

static int64_t expected_rows(const epmoe_ep_config *ec, const epmoe_layer_config *cfg) {
    if (cfg->expected_m > 0) return cfg->expected_m;
    return epmoe_expected_rows(ec->max_tokens, ec->num_ranks, ec->top_k, ec->num_experts);
}

/* The buffers of one rank: recv (x, scales, masked_m), the post-receive cast (BF16 wire), the
** expert output and the MLP workspace. One layout for the layer and the reference. */
typedef struct layer_sizes {
    size_t recv_x, recv_scales, masked_m, q, q_scales, expert_out, ws;
} layer_sizes;

static epmoe_status sizes_of(const epmoe_ep_config *ec, const epmoe_layer_config *cfg, layer_sizes *z) {
    epmoe_ep_layout lay;
    EPMOE_CHECK(epmoe_ep_layout_query(ec, &lay));
    const int64_t L = ec->num_experts / ec->num_ranks, M = (int64_t)ec->num_ranks * ec->max_tokens, H = ec->hidden;
    z->recv_x = lay.recv_x_bytes;
    z->recv_scales = lay.recv_scales_bytes;
    z->masked_m = lay.masked_m_bytes;
    const int cast = casts_after_receive(ec, cfg), fmt = scheme_format(cfg->scheme);
    z->q = cast ? (size_t)(L * M * H) : 0;
    z->q_scales = cast ? epmoe_scale_bytes(EPMOE_SCALE_F32_ROW, L * M, H) : 0;
    z->expert_out = lay.expert_out_bytes;
    z->ws = fmt < 0 ? epmoe_w4a8_mlp_workspace(L, M, H, cfg->intermediate)
                    : epmoe_expert_mlp_workspace((epmoe_weight_format)fmt, L, M, H, cfg->intermediate);
    /* the MLP's own limits (rows per expert slab, dimensions), found here rather than by a
    ** forward after its collective dispatch */
    if (M > EPMOE__MAX_DIM || !z->ws)
        return epmoe__fail(EPMOE_ERR_UNSUPPORTED, "layer: %lld received rows per expert (R * max_tokens) or I = %lld exceed "
                           "the expert MLP's limits (rows and dimensions up to %lld)", (long long)M,
                           (long long)cfg->intermediate, (long long)EPMOE__MAX_DIM);
    return EPMOE_OK;
}

/* The expert step on one rank's received rows: the activations as the scheme reads them (fp8
** schemes on the BF16 wire cast after receive), then its MLP. */
static epmoe_status experts(const epmoe_ep_config *ec, const epmoe_layer_config *cfg, const epmoe_layer_weights *w,
                            int gpu, void *recv_x, void *recv_scales, const int32_t *masked_m, void *q, void *q_scales,
                            void *ws, size_t ws_bytes, uint16_t *expert_out, epmoe_stream_t stream) {
    const int64_t L = ec->num_experts / ec->num_ranks, M = (int64_t)ec->num_ranks * ec->max_tokens, H = ec->hidden;
    const int fp8 = epmoe_scheme_default_wire(cfg->scheme) == EPMOE_WIRE_FP8, fmt = scheme_format(cfg->scheme);
    const void *a = recv_x, *a_scales = fp8 && !cfg->per_tensor_act ? recv_scales : NULL;
    epmoe_scale_fmt a_fmt = ec->scale_fmt;
    if (casts_after_receive(ec, cfg)) {
        a = q, a_fmt = EPMOE_SCALE_F32_ROW;
        if (cfg->per_tensor_act)
            EPMOE_CHECK(gpu ? epmoe_cast_tensor_fp8_cuda(recv_x, L * M * H, w->a1_scale, q, stream)
                            : epmoe_cast_tensor_fp8_ref(recv_x, L * M * H, w->a1_scale, q));
        else {
            /* the GPU skips the padding rows past masked_m (most of them at decode); the reference
            ** casts them all: the MLP never reads them */
            EPMOE_CHECK(gpu ? epmoe__cast_group_fp8_masked_cuda(recv_x, masked_m, L, M, H, q, q_scales,
                                                                EPMOE_SCALE_F32_ROW, 0, stream)
                            : epmoe_cast_group_fp8_ref(recv_x, L * M, H, q, q_scales, EPMOE_SCALE_F32_ROW, 0));
            a_scales = q_scales;
        }
    }
    if (fmt < 0) {
        const epmoe_w4a8_mlp_args m = {w->w13, w->w2, a, M, masked_m, a_scales, a_fmt,
                                       cfg->per_tensor_act ? w->a1_scale : NULL, cfg->per_tensor_act ? w->a2_scale : NULL,
                                       ws, ws_bytes, expert_out, H, M * H, expected_rows(ec, cfg)};
        return gpu ? epmoe_w4a8_mlp_cuda(&m, stream) : epmoe_w4a8_mlp_ref(&m);
    }
    const epmoe_expert_mlp_args m = {.w13 = w->e13, .w2 = w->e2, .a = a, .M = M, .masked_m = masked_m,
                                     .a_scales = a_scales, .a_scale_fmt = a_fmt, .workspace = ws,
                                     .workspace_bytes = ws_bytes, .out = expert_out, .out_row_stride = H,
                                     .out_expert_stride = M * H, .expected_m = expected_rows(ec, cfg)};
    return gpu ? epmoe_expert_mlp_cuda(&m, stream) : epmoe_expert_mlp_ref(&m);
}

static void layer_free_buffers(epmoe_layer *y) {
    void *bufs[] = {y->recv_x, y->recv_scales, y->masked_m, y->q, y->q_scales, y->expert_out, y->ws};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) {
        if (y->gpu) epmoe__dev_free(bufs[i]);
        else free(bufs[i]);
    }
}

epmoe_status epmoe_layer_create(epmoe_ep *ep, const epmoe_layer_config *cfg, const epmoe_layer_weights *w,
                                epmoe_layer **out) {
    static const char fn[] = "epmoe_layer_create";
    if (!ep || !out) return epmoe__fail(EPMOE_ERR_NULL_POINTER, "%s: ep or layer is NULL", fn);
    *out = NULL;
    EPMOE_CHECK(check_layer(fn, &ep->cfg, cfg, w, ep->backend != EPMOE_BACKEND_CPU));
    layer_sizes z;
    EPMOE_CHECK(sizes_of(&ep->cfg, cfg, &z));
    epmoe_layer *y = calloc(1, sizeof *y);
    if (!y) return epmoe__fail(EPMOE_ERR_OUT_OF_MEMORY, "%s: no memory", fn);
    y->ep = ep, y->cfg = *cfg, y->w = *w;
    y->gpu = ep->backend != EPMOE_BACKEND_CPU;
    y->L = ep->cfg.num_experts / ep->cfg.num_ranks, y->M = (int64_t)ep->cfg.num_ranks * ep->cfg.max_tokens;
    y->H = ep->cfg.hidden, y->I = cfg->intermediate;
    y->ws_bytes = z.ws;
    const size_t sizes[] = {z.recv_x, z.recv_scales, z.masked_m, z.q, z.q_scales, z.expert_out, z.ws};
    void **slots[] = {&y->recv_x, &y->recv_scales, (void **)&y->masked_m, &y->q, &y->q_scales, &y->expert_out, &y->ws};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        epmoe_status st = EPMOE_OK;
        if (y->gpu) st = epmoe__dev_alloc(fn, sizes[i], slots[i]); /* zeroed: the MLP workspace needs it */
        else if (!(*slots[i] = calloc(1, sizes[i] ? (sizes[i] + 255) / 256 * 256 : 256)))
            st = epmoe__fail(EPMOE_ERR_OUT_OF_MEMORY, "%s: no memory for %zu bytes", fn, sizes[i]);
        if (st != EPMOE_OK) {
            layer_free_buffers(y);
            free(y);
            return st;
        }
        y->bytes += sizes[i];
    }
    /* the buffers were zeroed on the legacy stream: done before any forward on the caller's */
    if (y->gpu) {
        const epmoe_status st = epmoe__dev_sync(fn);
        if (st != EPMOE_OK) {
            layer_free_buffers(y);
            free(y);
            return st;
        }
    }
    *out = y;
    return EPMOE_OK;
}

size_t epmoe_layer_bytes(const epmoe_layer *layer) { return layer ? layer->bytes : 0; }

void epmoe_layer_destroy(epmoe_layer *layer) {
    if (!layer) return;
    layer_free_buffers(layer);
    free(layer);
}

epmoe_status epmoe_layer_forward_phase(epmoe_layer *y, const uint16_t *x, const void *topk_idx, int topk_idx_bits,
                                       const float *topk_weights, int num_tokens, uint16_t *out, int phases,
                                       uint32_t *handle, epmoe_stream_t stream) {
    static const char fn[] = "epmoe_layer_forward";
    if (!y || !handle) return epmoe__fail(EPMOE_ERR_NULL_POINTER, "%s: layer or handle is NULL", fn);
    if (phases < 1 || phases > EPMOE_LAYER_ALL || phases == (EPMOE_LAYER_SEND | EPMOE_LAYER_RECV))
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: phases = %d is not SEND, EXPERTS, RECV or a run of them", fn, phases);
    const epmoe_ep_config *ec = &y->ep->cfg;
    const int owner = ec->combine_mode == EPMOE_COMBINE_REDUCE_AT_OWNER;
    /* checked before the collective dispatch: a failure after it would leave the peers waiting */
    if (num_tokens > 0 && !topk_weights && ((phases & EPMOE_LAYER_SEND) || (owner && (phases & EPMOE_LAYER_RECV))))
        return epmoe__fail(EPMOE_ERR_NULL_POINTER, "%s: topk_weights is NULL", fn);
    if ((phases & EPMOE_LAYER_RECV) && !(phases & EPMOE_LAYER_SEND)) {
        /* RECV writes the rows SEND dispatched: another count here would mean an out of another size */
        const ep_call *c = &y->ep->calls[*handle & 1u];
        if (*handle && c->seq == *handle && c->T != num_tokens)
            return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: RECV of forward %u with num_tokens = %d, but its SEND had %d "
                               "(each phase takes the same arguments)", fn, *handle, num_tokens, c->T);
    }
    if (num_tokens > 0 && (phases & EPMOE_LAYER_RECV)) {
        if (!out) return epmoe__fail(EPMOE_ERR_NULL_POINTER, "%s: out is NULL", fn);
        if ((uintptr_t)out & (y->gpu ? 15u : 1u))
            return epmoe__fail(EPMOE_ERR_MISALIGNED, "%s: out = %p is not %d-byte aligned", fn, (void *)out, y->gpu ? 16 : 2);
    }
    const int requant = ec->wire == EPMOE_WIRE_FP8 && y->cfg.per_tensor_act;
    /* Per-tensor compat on the FP8 wire: dispatch itself requantizes at receive (no extra pass). */
    const epmoe_dispatch_args d = {x, topk_idx, topk_idx_bits, topk_weights, num_tokens, y->recv_x,
                                   requant ? NULL : y->recv_scales, y->masked_m, NULL,
                                   requant ? y->w.a1_scale : NULL};
    const epmoe_combine_args c = {y->expert_out, owner ? topk_weights : NULL, out};
    /* A dispatch's or combine's halves that run back to back go in one call (PHASE_BOTH): its
    ** receive then starts under its send (ep_device.cuh, receive_entry) */
    const int joined_dispatch = (phases & EPMOE_LAYER_SEND) && (phases & EPMOE_LAYER_EXPERTS);
    const int joined_combine = (phases & EPMOE_LAYER_EXPERTS) && (phases & EPMOE_LAYER_RECV);
    if (phases & EPMOE_LAYER_SEND)
        EPMOE_CHECK(epmoe_dispatch(y->ep, &d, joined_dispatch ? EPMOE_PHASE_BOTH : EPMOE_PHASE_SEND, handle, stream));
    epmoe_status ex = EPMOE_OK;
    char why[256] = "";
    if (phases & EPMOE_LAYER_EXPERTS) {
        if (!joined_dispatch) EPMOE_CHECK(epmoe_dispatch(y->ep, &d, EPMOE_PHASE_RECV, handle, stream));
        ex = experts(ec, &y->cfg, &y->w, y->gpu, y->recv_x, y->recv_scales, y->masked_m, y->q, y->q_scales, y->ws,
                     y->ws_bytes, y->expert_out, stream);
        if (ex != EPMOE_OK) snprintf(why, sizeof why, "%s", epmoe_last_error()); /* copied: epmoe__fail reuses it */
        /* combine runs even if the experts failed: the peers are waiting for this rank's share */
        EPMOE_CHECK(epmoe_combine(y->ep, *handle, &c, joined_combine ? EPMOE_PHASE_BOTH : EPMOE_PHASE_SEND, stream));
    }
    /* and its receive too (when asked for), so the forward ends and the group stays usable */
    if ((phases & EPMOE_LAYER_RECV) && !joined_combine)
        EPMOE_CHECK(epmoe_combine(y->ep, *handle, &c, EPMOE_PHASE_RECV, stream));
    if (ex != EPMOE_OK)
        return epmoe__fail(ex, "%s: the expert MLP failed; the forward still ran to its end so no peer waits, but the "
                           "outputs of this rank's experts are undefined: %s", fn, why);
    return EPMOE_OK;
}

epmoe_status epmoe_layer_forward(epmoe_layer *y, const uint16_t *x, const void *topk_idx, int topk_idx_bits,
                                 const float *topk_weights, int num_tokens, uint16_t *out, epmoe_stream_t stream) {
    uint32_t h = 0;
    return epmoe_layer_forward_phase(y, x, topk_idx, topk_idx_bits, topk_weights, num_tokens, out, EPMOE_LAYER_ALL, &h,
                                     stream);
}

epmoe_status epmoe_layer_ref(const epmoe_ep_config *ec, const epmoe_layer_config *cfg, const epmoe_layer_weights *w,
                             const uint16_t *const *x, const int32_t *const *topk_idx, const float *const *topk_weights,
                             const int *num_tokens, uint16_t *const *out) {
    static const char fn[] = "epmoe_layer_ref";
    if (!ec || !w || !x || !topk_idx || !topk_weights || !num_tokens || !out)
        return epmoe__fail(EPMOE_ERR_NULL_POINTER, "%s: a required argument is NULL", fn);
    EPMOE_CHECK(epmoe__ep_check_config(fn, ec));
    const int R = ec->num_ranks;
    if (R > 64) return epmoe__fail(EPMOE_ERR_UNSUPPORTED, "%s: the reference handles up to 64 ranks", fn); /* its arrays below */
    for (int r = 0; r < R; r++) EPMOE_CHECK(check_layer(fn, ec, cfg, &w[r], 0));
    layer_sizes z;
    EPMOE_CHECK(sizes_of(ec, cfg, &z));
    const int64_t L = ec->num_experts / R, M = (int64_t)R * ec->max_tokens, H = ec->hidden;
    void **bufs = calloc((size_t)R * 7, sizeof(void *));
    epmoe_status st = bufs ? EPMOE_OK : epmoe__fail(EPMOE_ERR_OUT_OF_MEMORY, "%s: no memory", fn);
    const size_t sizes[] = {z.recv_x, z.recv_scales, z.masked_m, z.q, z.q_scales, z.expert_out, z.ws};
    for (int i = 0; st == EPMOE_OK && i < R * 7; i++)
        if (!(bufs[i] = calloc(1, (sizes[i % 7] + 255) / 256 * 256)))
            st = epmoe__fail(EPMOE_ERR_OUT_OF_MEMORY, "%s: no memory for %zu bytes", fn, sizes[i % 7]);
    if (st == EPMOE_OK) {
        void *recv_x[64], *recv_scales[64];
        int32_t *masked[64];
        uint16_t *eout[64];
        for (int r = 0; st == EPMOE_OK && r < R; r++) {
            void **b = bufs + r * 7;
            recv_x[r] = b[0], recv_scales[r] = b[1], masked[r] = b[2], eout[r] = b[5];
        }
        if (st == EPMOE_OK)
            st = epmoe_ep_dispatch_ref(ec, x, topk_idx, num_tokens, NULL, recv_x, recv_scales, masked, NULL);
        for (int r = 0; st == EPMOE_OK && r < R; r++) {
            void **b = bufs + r * 7;
            if (ec->wire == EPMOE_WIRE_FP8 && cfg->per_tensor_act) { /* what dispatch's requant produces */
                uint8_t *t = calloc((size_t)(L * M * H), 1);
                st = t ? epmoe_requant_fp8_ref(recv_x[r], recv_scales[r], ec->scale_fmt, masked[r], L, M, H,
                                               w[r].a1_scale, t)
                       : epmoe__fail(EPMOE_ERR_OUT_OF_MEMORY, "%s: no memory", fn);
                if (st == EPMOE_OK) memcpy(recv_x[r], t, (size_t)(L * M * H)); /* rows past masked_m: zeros */
                free(t);
            }
            if (st == EPMOE_OK)
                st = experts(ec, cfg, &w[r], 0, recv_x[r], recv_scales[r], masked[r], b[3], b[4], b[6], z.ws, eout[r],
                             NULL);
        }
        if (st == EPMOE_OK)
            st = epmoe_ep_combine_ref(ec, (const uint16_t *const *)eout, topk_idx, topk_weights, num_tokens, NULL, out);
    }
    if (bufs) {
        for (int i = 0; i < R * 7; i++) free(bufs[i]);
        free(bufs);
    }
    return st;
}
