/*
** ep.c — the EP front end: configuration checks, the layout query, call sequencing (handles,
** send/receive halves, the two live calls) and argument checks common to every backend.
*/
#define _POSIX_C_SOURCE 200809L
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ep_internal.h"

double epmoe__now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

/* The config before `transport` was added: callers built against that header pass this size. */
#define EP_CONFIG_SIZE_V0 offsetof(epmoe_ep_config, transport)

/* The config pointer and its size: what must hold before any other field is read. */
static epmoe_status check_config_size(const char *fn, const epmoe_ep_config *c) {
    if (!c) return epmoe__fail(EPMOE_ERR_NULL_POINTER, "%s: config is NULL", fn);
    if (c->size != sizeof(epmoe_ep_config) && c->size != EP_CONFIG_SIZE_V0)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: config.size = %zu, this library expects %zu (or %zu) (header/library "
                           "mismatch; initialize with EPMOE_EP_CONFIG_INIT)", fn, c->size, sizeof(epmoe_ep_config),
                           (size_t)EP_CONFIG_SIZE_V0);
    return EPMOE_OK;
}

epmoe_status epmoe__ep_check_config(const char *fn, const epmoe_ep_config *c) {
    EPMOE_CHECK(check_config_size(fn, c));
    /* fields past the caller's size are never read: they are not in its struct */
    if (c->size == sizeof(epmoe_ep_config) && (unsigned)c->transport > EPMOE_TRANSPORT_GIN)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: transport %d is not an epmoe_transport", fn, (int)c->transport);
    if (c->num_ranks < 1 || c->rank < 0 || c->rank >= c->num_ranks)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: rank %d of %d ranks", fn, c->rank, c->num_ranks);
    if (c->max_tokens < 1 || c->max_tokens > (1 << 16))
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: max_tokens = %d must be in [1, 65536]", fn, c->max_tokens);
    if (c->hidden <= 0 || c->hidden % FMT_GROUP || c->hidden > (1 << 16))
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: hidden = %d must be a positive multiple of 128 up to 65536", fn, c->hidden);
    if (c->num_experts < c->num_ranks || c->num_experts % c->num_ranks || c->num_experts > 32767)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: num_experts = %d must be a multiple of num_ranks = %d (at most 32767)",
                           fn, c->num_experts, c->num_ranks);
    /* one expert's receive slab [R*N, H] is a matrix of the format functions (and its scale slab) */
    if ((int64_t)c->num_ranks * c->max_tokens > EPMOE__MAX_ELEMS / c->hidden)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: num_ranks * max_tokens * hidden = %d * %d * %d is above %lld elements "
                           "an expert", fn, c->num_ranks, c->max_tokens, c->hidden, (long long)EPMOE__MAX_ELEMS);
    if (c->top_k < 1 || c->top_k > EPMOE_MAX_TOPK)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: top_k = %d must be in [1, %d]", fn, c->top_k, EPMOE_MAX_TOPK);
    if (c->wire != EPMOE_WIRE_BF16 && c->wire != EPMOE_WIRE_FP8)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: wire %d is not an epmoe_wire", fn, (int)c->wire);
    if (c->wire == EPMOE_WIRE_FP8) {
        if ((unsigned)c->scale_fmt > EPMOE_SCALE_UE8M0_MMAJOR)
            return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: scale_fmt %d is not an epmoe_scale_fmt", fn, (int)c->scale_fmt);
        if (fmt_scale_is_ue8m0(c->scale_fmt) && !c->round_scale)
            return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: UE8M0 scales need round_scale = 1", fn);
    }
    if (c->combine_mode != EPMOE_COMBINE_REDUCE_AT_OWNER && c->combine_mode != EPMOE_COMBINE_REDUCE_AT_EXPERT)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: combine_mode %d is not an epmoe_combine_mode", fn, (int)c->combine_mode);
    if (c->combine_mode == EPMOE_COMBINE_REDUCE_AT_EXPERT && !c->dedup)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: REDUCE_AT_EXPERT sums a token's share per rank and needs dedup = 1", fn);
    if (c->timeout_ms < 1) return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: timeout_ms = %d must be >= 1", fn, c->timeout_ms);
    return EPMOE_OK;
}

void epmoe__ep_config_copy(const epmoe_ep_config *in, epmoe_ep_config *out) {
    memset(out, 0, sizeof *out); /* missing fields: 0 is their default (transport AUTO) */
    memcpy(out, in, in->size < sizeof *out ? in->size : sizeof *out);
    out->size = sizeof *out;
}

epmoe_status epmoe__ep_config_as(const char *fn, const epmoe_ep_config *in, int rank, int size, epmoe_ep_config *out) {
    EPMOE_CHECK(check_config_size(fn, in));
    epmoe__ep_config_copy(in, out);
    out->rank = rank, out->num_ranks = size;
    return epmoe__ep_check_config(fn, out);
}

/* Read at every creation rather than cached once: creation is rare, and tests change it. */
epmoe_status epmoe__ep_transport(const char *fn, const epmoe_ep_config *c, epmoe_transport *out) {
    *out = c->size == sizeof(epmoe_ep_config) ? c->transport : EPMOE_TRANSPORT_AUTO;
    if (*out != EPMOE_TRANSPORT_AUTO) return EPMOE_OK;
    const char *v = getenv("EPMOE_EP_TRANSPORT");
    if (!v || !*v || !strcmp(v, "auto")) return EPMOE_OK;
    if (!strcmp(v, "device")) *out = EPMOE_TRANSPORT_DEVICE;
    else if (!strcmp(v, "alltoall")) *out = EPMOE_TRANSPORT_ALLTOALL;
    else if (!strcmp(v, "gin-emulated")) *out = EPMOE_TRANSPORT_GIN_EMULATED;
    else if (!strcmp(v, "gin")) *out = EPMOE_TRANSPORT_GIN;
    else
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: EPMOE_EP_TRANSPORT=%s: expected auto, device, alltoall, gin-emulated "
                           "or gin", fn, v);
    return EPMOE_OK;
}

int epmoe__ep_same_shape(const epmoe_ep_config *a, const epmoe_ep_config *b) {
    return a->num_ranks == b->num_ranks && a->max_tokens == b->max_tokens && a->hidden == b->hidden &&
           a->num_experts == b->num_experts && a->top_k == b->top_k && a->wire == b->wire &&
           a->scale_fmt == b->scale_fmt && a->round_scale == b->round_scale && a->dedup == b->dedup &&
           a->combine_mode == b->combine_mode;
}

static void dims_of(const epmoe_ep_config *c, ep_dims *d) {
    ep_dims_init(d, c->num_ranks, c->rank, c->max_tokens, c->hidden, c->num_experts, c->top_k, c->wire == EPMOE_WIRE_FP8,
                 c->dedup != 0, c->combine_mode == EPMOE_COMBINE_REDUCE_AT_EXPERT);
}

epmoe_status epmoe_ep_layout_query(const epmoe_ep_config *cfg, epmoe_ep_layout *out) {
    EPMOE_CHECK(epmoe__ep_check_config("epmoe_ep_layout_query", cfg));
    if (!out) return epmoe__fail(EPMOE_ERR_NULL_POINTER, "epmoe_ep_layout_query: out is NULL");
    epmoe_transport tr;
    EPMOE_CHECK(epmoe__ep_transport("epmoe_ep_layout_query", cfg, &tr));
    ep_dims d;
    ep_window w;
    ep_a2a a2a;
    ep_outbox ob;
    dims_of(cfg, &d);
    ep_window_layout(&d, &w);
    ep_a2a_layout(&d, &a2a);
    ep_outbox_layout(&d, &w, &ob);
    const size_t rows = (size_t)d.L * (size_t)d.R * (size_t)d.N;
    out->recv_x_bytes = rows * (size_t)d.H * (d.fp8 ? 1u : 2u);
    out->recv_scales_bytes = d.fp8 ? (size_t)d.L * epmoe_scale_bytes(cfg->scale_fmt, (int64_t)d.R * d.N, d.H) : 0;
    out->masked_m_bytes = (size_t)d.L * 4;
    out->src_info_bytes = rows * 4;
    out->expert_out_bytes = rows * (size_t)d.H * 2;
    out->out_bytes = (size_t)d.N * (size_t)d.H * 2;
    out->msg_bytes = (size_t)d.msg_bytes;
    const int put_signal = tr == EPMOE_TRANSPORT_GIN_EMULATED || tr == EPMOE_TRANSPORT_GIN;
    out->window_bytes = (size_t)(tr == EPMOE_TRANSPORT_ALLTOALL ? a2a.total : put_signal ? ob.total : w.total);
    /* per call: topk [N, k], begin [L, R], n_msgs [R]; plus the staging of one payload */
    out->state_bytes = 2 * ((size_t)d.N * d.k * 4 + (size_t)d.L * d.R * 4 + (size_t)d.R * 4 +
                            (size_t)(d.R * d.slots * d.header_bytes)) + (size_t)d.payload_bytes;
    return EPMOE_OK;
}

epmoe_status epmoe__ep_alloc(const epmoe_ep_config *cfg, epmoe_backend b, epmoe_ep **out) {
    epmoe_ep *ep = calloc(1, sizeof *ep);
    if (!ep) return epmoe__fail(EPMOE_ERR_OUT_OF_MEMORY, "epmoe_ep: out of memory");
    epmoe__ep_config_copy(cfg, &ep->cfg);
    ep->backend = b;
    dims_of(cfg, &ep->d);
    ep_window_layout(&ep->d, &ep->w);
    ep->active = malloc(sizeof(int) * (size_t)cfg->num_ranks);
    ep->spare_active = malloc(sizeof(int) * (size_t)cfg->num_ranks);
    for (int i = 0; i < 2; i++) {
        ep->calls[i].topk = malloc(sizeof(int32_t) * (size_t)ep->d.N * (size_t)ep->d.k);
        ep->calls[i].begin = malloc(sizeof(int32_t) * (size_t)ep->d.L * (size_t)ep->d.R);
        ep->calls[i].n_msgs = malloc(sizeof(int32_t) * (size_t)ep->d.R);
        ep->calls[i].hdrs = malloc((size_t)(ep->d.R * ep->d.slots * ep->d.header_bytes));
        ep->calls[i].active = malloc(sizeof(int) * (size_t)ep->d.R);
    }
    if (!ep->active || !ep->spare_active || !ep->calls[0].topk || !ep->calls[1].topk || !ep->calls[0].begin || !ep->calls[1].begin ||
        !ep->calls[0].n_msgs || !ep->calls[1].n_msgs || !ep->calls[0].hdrs || !ep->calls[1].hdrs ||
        !ep->calls[0].active || !ep->calls[1].active) {
        epmoe__ep_free(ep);
        return epmoe__fail(EPMOE_ERR_OUT_OF_MEMORY, "epmoe_ep: out of memory");
    }
    for (int r = 0; r < cfg->num_ranks; r++) ep->active[r] = 1;
    *out = ep;
    return EPMOE_OK;
}

void epmoe__ep_free(epmoe_ep *ep) {
    if (!ep) return;
    for (int i = 0; i < 2; i++)
        free(ep->calls[i].topk), free(ep->calls[i].begin), free(ep->calls[i].n_msgs), free(ep->calls[i].hdrs),
            free(ep->calls[i].active);
    free(ep->active), free(ep->spare_active);
    free(ep);
}

epmoe_status epmoe_ep_destroy(epmoe_ep *ep) {
    if (!ep) return EPMOE_OK;
    /* a healthy group whose teardown found a peer missing (the backend marks it failed, with the
    ** message) reports it; a group that had failed before tears down quietly */
    const epmoe_status failed_before = ep->failed;
    if (ep->ops && ep->ops->destroy) ep->ops->destroy(ep);
    const epmoe_status st = ep->failed && !failed_before
                                ? ep->backend == EPMOE_BACKEND_CPU /* its barrier said which rank waited */
                                      ? EPMOE_ERR_TIMEOUT
                                      : epmoe__fail(EPMOE_ERR_TIMEOUT, "epmoe_ep_destroy: rank %d: a peer did not answer at "
                                                    "teardown (the ep is freed)", ep->cfg.rank)
                                : EPMOE_OK;
    if (ep->owned_comm) epmoe__ep_release_comm(ep); /* after the backend: its teardown uses the comm */
    epmoe__ep_free(ep);
    return st;
}

epmoe_backend epmoe_ep_backend(const epmoe_ep *ep) { return ep ? ep->backend : (epmoe_backend)-1; }

epmoe_status epmoe_ep_set_active_ranks(epmoe_ep *ep, const int *active) {
    if (!ep || !active) return epmoe__fail(EPMOE_ERR_NULL_POINTER, "epmoe_ep_set_active_ranks: NULL argument");
    if (!active[ep->cfg.rank])
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "epmoe_ep_set_active_ranks: rank %d cannot mask itself out", ep->cfg.rank);
    /* what the host can see of "no call in flight": a send half whose receive half has not been called */
    for (int i = 0; i < 2; i++) {
        const ep_call *c = &ep->calls[i];
        if (c->seq && ((c->sent && !c->received) || (c->comb_sent && !c->comb_received)))
            return epmoe__fail(EPMOE_ERR_INVALID_ARG, "epmoe_ep_set_active_ranks: dispatch %u is still in flight (a send "
                               "half without its receive half)", c->seq);
    }
    /* Acknowledgements go to active ranks only (both backends), so after a call without it a masked
    ** rank and its peers disagree on which buffer slots are free: a rejoin would wait for acks that
    ** never come (EPMOE_ERR_TIMEOUT). Refused here instead. */
    for (int r = 0; r < ep->cfg.num_ranks; r++)
        if (!ep->active[r] && active[r])
            return epmoe__fail(EPMOE_ERR_UNSUPPORTED,
                               "epmoe_ep_set_active_ranks: rank %d was masked out and cannot rejoin this group (create a new one)", r);
    for (int r = 0; r < ep->cfg.num_ranks; r++) ep->active[r] = active[r] != 0;
    return ep->ops && ep->ops->set_active ? ep->ops->set_active(ep) : EPMOE_OK;
}

/* What failed a group, for the message of every later call (which returns the same status). */
static const char *failure(const epmoe_ep *ep) {
    return ep->failed == EPMOE_ERR_TIMEOUT ? "a peer timed out" : "the transport failed";
}

epmoe_status epmoe_ep_poll(epmoe_ep *ep) {
    if (!ep) return epmoe__fail(EPMOE_ERR_NULL_POINTER, "epmoe_ep_poll: ep is NULL");
    if (ep->failed)
        return epmoe__fail(ep->failed, "epmoe_ep_poll: the group failed earlier (%s)", failure(ep));
    return ep->ops && ep->ops->poll ? ep->ops->poll(ep) : EPMOE_OK;
}

/* What every data-path call checks first: a live ep and a valid phase. */
static epmoe_status usable(const char *fn, epmoe_ep *ep, epmoe_phase phase) {
    if (!ep) return epmoe__fail(EPMOE_ERR_NULL_POINTER, "%s: ep is NULL", fn);
    if (ep->failed)
        return epmoe__fail(ep->failed, "%s: this ep failed earlier (%s); destroy it and create a new group", fn, failure(ep));
    if (phase != EPMOE_PHASE_BOTH && phase != EPMOE_PHASE_SEND && phase != EPMOE_PHASE_RECV)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: phase %d is not an epmoe_phase", fn, (int)phase);
    return EPMOE_OK;
}

/* A pointer's alignment: its element type's on every backend, 16 bytes for the row arrays the GPU
** backends move in 16-byte chunks. Checked with the other arguments, before anything is sent (a
** half sent without its other half would leave the peers waiting). */
static epmoe_status check_align(const char *fn, const void *p, unsigned bytes, const char *what) {
    if (p && (uintptr_t)p % bytes)
        return epmoe__fail(EPMOE_ERR_MISALIGNED, "%s: %s = %p is not %u-byte aligned", fn, what, p, bytes);
    return EPMOE_OK;
}
static unsigned row_align(const epmoe_ep *ep, unsigned elem) { return ep->backend == EPMOE_BACKEND_CPU ? elem : 16; }

static epmoe_status check_dispatch_args(const char *fn, const epmoe_ep *ep, const epmoe_dispatch_args *a, int send, int recv) {
    if (!a) return epmoe__fail(EPMOE_ERR_NULL_POINTER, "%s: args is NULL", fn);
    const epmoe_ep_config *c = &ep->cfg;
    if (send) {
        if (a->num_tokens < 0 || a->num_tokens > c->max_tokens)
            return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: num_tokens = %d exceeds max_tokens = %d (or is negative)", fn,
                               a->num_tokens, c->max_tokens);
        if (a->topk_idx_bits != 32 && a->topk_idx_bits != 64)
            return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: topk_idx_bits = %d must be 32 or 64", fn, a->topk_idx_bits);
        if (a->num_tokens && (!a->x || !a->topk_idx))
            return epmoe__fail(EPMOE_ERR_NULL_POINTER, "%s: x and topk_idx are required when num_tokens > 0", fn);
        if (a->num_tokens && c->combine_mode == EPMOE_COMBINE_REDUCE_AT_EXPERT && !a->topk_weights)
            return epmoe__fail(EPMOE_ERR_NULL_POINTER, "%s: REDUCE_AT_EXPERT needs topk_weights at dispatch", fn);
        if (a->num_tokens) {
            EPMOE_CHECK(check_align(fn, a->x, row_align(ep, 2), "x"));
            EPMOE_CHECK(check_align(fn, a->topk_idx, (unsigned)a->topk_idx_bits / 8, "topk_idx"));
            EPMOE_CHECK(check_align(fn, a->topk_weights, 4, "topk_weights"));
        }
    }
    if (recv) {
        if (!a->recv_x || !a->masked_m)
            return epmoe__fail(EPMOE_ERR_NULL_POINTER, "%s: recv_x and masked_m are required", fn);
        if (c->wire == EPMOE_WIRE_FP8 && !a->requant_scale && !a->recv_scales)
            return epmoe__fail(EPMOE_ERR_NULL_POINTER, "%s: FP8 wire needs recv_scales (or a requant_scale)", fn);
        if (c->wire == EPMOE_WIRE_BF16 && a->requant_scale)
            return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: requant_scale needs the FP8 wire", fn);
        EPMOE_CHECK(check_align(fn, a->recv_x, row_align(ep, c->wire == EPMOE_WIRE_FP8 ? 1 : 2), "recv_x"));
        /* UE8M0_ROW is a byte layout on the CPU; the GPU backends store whole words */
        EPMOE_CHECK(check_align(fn, a->recv_scales,
                                ep->backend == EPMOE_BACKEND_CPU && c->scale_fmt == EPMOE_SCALE_UE8M0_ROW ? 1 : 4, "recv_scales"));
        EPMOE_CHECK(check_align(fn, a->masked_m, 4, "masked_m"));
        EPMOE_CHECK(check_align(fn, a->recv_src_info, 4, "recv_src_info"));
        EPMOE_CHECK(check_align(fn, a->requant_scale, 4, "requant_scale"));
        /* the receive half writes all four: no byte of one may be another's (or the tokens' it reads) */
        const ep_dims *d = &ep->d;
        const size_t rows = (size_t)d->L * (size_t)d->R * (size_t)d->N;
        const struct { const void *p; size_t n; const char *name; } o[4] = {
            {a->recv_x, rows * (size_t)d->H * (d->fp8 ? 1u : 2u), "recv_x"},
            {a->recv_scales, d->fp8 && !a->requant_scale ? (size_t)d->L * epmoe_scale_bytes(c->scale_fmt, (int64_t)d->R * d->N, d->H) : 0,
             "recv_scales"},
            {a->masked_m, (size_t)d->L * 4, "masked_m"},
            {a->recv_src_info, a->recv_src_info ? rows * 4 : 0, "recv_src_info"}};
        for (int i = 0; i < 4; i++) {
            for (int j = i + 1; j < 4; j++) EPMOE_CHECK(epmoe__need_apart(fn, o[i].p, o[i].n, o[i].name, o[j].p, o[j].n, o[j].name));
            if (send) EPMOE_CHECK(epmoe__need_apart(fn, o[i].p, o[i].n, o[i].name, a->x, (size_t)a->num_tokens * (size_t)d->H * 2, "x"));
        }
    }
    return EPMOE_OK;
}

epmoe_status epmoe_dispatch(epmoe_ep *ep, const epmoe_dispatch_args *a, epmoe_phase phase, uint32_t *handle,
                            epmoe_stream_t stream) {
    static const char fn[] = "epmoe_dispatch";
    EPMOE_CHECK(usable(fn, ep, phase));
    if (!handle) return epmoe__fail(EPMOE_ERR_NULL_POINTER, "%s: handle is NULL", fn);
    const int send = phase & EPMOE_PHASE_SEND, recv = phase & EPMOE_PHASE_RECV;
    EPMOE_CHECK(check_dispatch_args(fn, ep, a, send, recv));
    if (send && recv && ep->seq != ep->recv_seq) /* checked before anything goes out: peers would wait */
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: receive dispatch %u first (receives follow dispatch order); "
                           "nothing was sent", fn, ep->recv_seq + 1);
    ep_call *c;
    if (send) {
        c = &ep->calls[(ep->seq + 1) & 1];
        if (c->seq && ((c->sent && !c->received) || (c->comb_sent && !c->comb_received)))
            return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: dispatch %u is still in flight (a half without its other "
                               "half); a third call would overwrite its buffers", fn, c->seq);
        const ep_call old = *c; /* the slot's dispatch two back, restored if the backend rejects this one */
        memset(c, 0, offsetof(ep_call, topk));
        c->seq = ++ep->seq;
        c->T = a->num_tokens;
        int *const mine = ep->spare_active;
        ep->spare_active = c->active, c->active = mine;
        memcpy(c->active, ep->active, sizeof(int) * (size_t)ep->d.R);
        epmoe_status st = ep->ops->dispatch_send(ep, a, c, stream);
        if (st != EPMOE_OK) {
            if (!ep->failed) { /* rejected before anything was sent: the call never happened */
                ep->spare_active = mine;
                *c = old;
                ep->seq--;
            }
            return st;
        }
        c->sent = 1;
        *handle = c->seq;
    } else {
        c = &ep->calls[*handle & 1];
        if (c->seq != *handle || !c->sent || c->received)
            return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: handle %u is not a sent, unreceived dispatch", fn, *handle);
    }
    if (recv) {
        if (c->seq != ep->recv_seq + 1) /* the GPU counts receives: they come in dispatch order */
            return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: receive dispatch %u first (receives follow dispatch order)",
                               fn, ep->recv_seq + 1);
        c->joined = send != 0;
        epmoe_status st = ep->ops->dispatch_recv(ep, a, c, stream);
        if (st != EPMOE_OK) return st;
        c->received = 1;
        ep->recv_seq = c->seq;
    }
    return EPMOE_OK;
}

epmoe_status epmoe_combine(epmoe_ep *ep, uint32_t handle, const epmoe_combine_args *a, epmoe_phase phase,
                           epmoe_stream_t stream) {
    static const char fn[] = "epmoe_combine";
    EPMOE_CHECK(usable(fn, ep, phase));
    if (!a) return epmoe__fail(EPMOE_ERR_NULL_POINTER, "%s: args is NULL", fn);
    ep_call *c = &ep->calls[handle & 1];
    if (!handle || c->seq != handle || !c->received)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: handle %u is not one of the two most recent received dispatches "
                           "(latest is %u)", fn, handle, ep->seq);
    const int send = phase & EPMOE_PHASE_SEND, recv = phase & EPMOE_PHASE_RECV;
    if (send) {
        if (c->comb_sent) return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: dispatch %u was already combined", fn, handle);
        if (!a->expert_out) return epmoe__fail(EPMOE_ERR_NULL_POINTER, "%s: expert_out is NULL", fn);
        EPMOE_CHECK(check_align(fn, a->expert_out, row_align(ep, 2), "expert_out"));
    } else if (!c->comb_sent || c->comb_received) {
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: handle %u has no combine send awaiting its receive", fn, handle);
    }
    if (recv) { /* checked before anything is sent */
        if (c->T && !a->out) return epmoe__fail(EPMOE_ERR_NULL_POINTER, "%s: out is NULL", fn);
        if (c->T && ep->cfg.combine_mode == EPMOE_COMBINE_REDUCE_AT_OWNER && !a->topk_weights)
            return epmoe__fail(EPMOE_ERR_NULL_POINTER, "%s: REDUCE_AT_OWNER needs topk_weights at combine", fn);
        if (c->T) {
            EPMOE_CHECK(check_align(fn, a->out, row_align(ep, 2), "out"));
            EPMOE_CHECK(check_align(fn, a->topk_weights, 4, "topk_weights"));
        }
    }
    c->joined = send && recv;
    if (send) {
        EPMOE_CHECK(ep->ops->combine_send(ep, a, c, stream));
        c->comb_sent = 1;
    }
    if (recv) {
        EPMOE_CHECK(ep->ops->combine_recv(ep, a, c, stream));
        c->comb_received = 1;
    }
    return EPMOE_OK;
}
