/*
** ep_cpu.c — the CPU backend of dispatch/combine: ranks are threads of one process, each
** rank's window is host memory that peers write into directly, and flags are C11 atomics
** with release/acquire ordering — the same protocol as the GPU's NVLink stores and
** st.release/ld.acquire flags (ep_layout.h), so this backend is its executable model in CI.
*/
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ep_internal.h"

/* The windows and configs of one group of the world: rank r's k-th group is slot k. Owned by the
** world and freed with it, so a failed rank's peers never write freed memory. */
typedef struct cpu_slot {
    uint8_t **windows;     /* [R] */
    epmoe_ep_config *cfgs; /* [R]: what each rank asked for, compared at creation */
} cpu_slot;

/* Groups are created and destroyed collectively, in the same order on every rank (as on an NCCL
** communicator), so rank r's k-th creation meets its peers' k-th in slot k. The world counts its live
** groups: destroyed with groups still open, it is freed by the last group's destroy. */
struct epmoe_cpu_world {
    int R;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int arrived;
    unsigned generation;
    cpu_slot **slots; /* [nslots]: a slot never moves (peers read it without the lock) */
    int nslots;
    int *created;     /* [R]: groups each rank has created */
    int live;         /* groups created and not yet destroyed */
    int destroyed;    /* epmoe_cpu_world_destroy was called */
};

typedef struct cpu_impl {
    epmoe_cpu_world *world;
    cpu_slot *slot;   /* this group's windows */
    uint8_t *payload; /* one message payload (the token cast once) */
    int32_t *pairs;   /* [E] rows sent per expert in this call */
    int32_t *msgs;    /* [R] messages sent per destination in this call (without dedup) */
    float *acc;       /* [H] */
} cpu_impl;

epmoe_status epmoe_cpu_world_create(int num_ranks, epmoe_cpu_world **world) {
    if (!world) return epmoe__fail(EPMOE_ERR_NULL_POINTER, "epmoe_cpu_world_create: world is NULL");
    if (num_ranks < 1 || num_ranks > 1024)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "epmoe_cpu_world_create: num_ranks = %d must be in [1, 1024]", num_ranks);
    epmoe_cpu_world *w = calloc(1, sizeof *w);
    if (!w || !(w->created = calloc((size_t)num_ranks, sizeof *w->created))) {
        free(w);
        return epmoe__fail(EPMOE_ERR_OUT_OF_MEMORY, "epmoe_cpu_world_create: out of memory");
    }
    w->R = num_ranks;
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    *world = w;
    return EPMOE_OK;
}

static void world_free(epmoe_cpu_world *w) {
    for (int k = 0; k < w->nslots; k++) {
        for (int r = 0; r < w->R; r++) free(w->slots[k]->windows[r]);
        free(w->slots[k]->windows), free(w->slots[k]->cfgs), free(w->slots[k]);
    }
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->cv);
    free(w->slots), free(w->created), free(w);
}

void epmoe_cpu_world_destroy(epmoe_cpu_world *w) {
    if (!w) return;
    pthread_mutex_lock(&w->mu);
    w->destroyed = 1;
    const int now = w->live == 0;
    pthread_mutex_unlock(&w->mu);
    if (now) world_free(w);
}

/* Rank r's next slot, made by whichever rank gets there first (under w->mu). NULL: out of memory. */
static cpu_slot *next_slot(epmoe_cpu_world *w, int r) {
    const int k = w->created[r];
    if (k == w->nslots) {
        cpu_slot **grown = realloc(w->slots, sizeof *grown * (size_t)(k + 1));
        if (!grown) return NULL;
        w->slots = grown;
        cpu_slot *s = calloc(1, sizeof *s);
        if (s && (!(s->windows = calloc((size_t)w->R, sizeof *s->windows)) || !(s->cfgs = calloc((size_t)w->R, sizeof *s->cfgs)))) {
            free(s->windows), free(s);
            s = NULL;
        }
        if (!s) return NULL;
        w->slots[w->nslots++] = s;
    }
    w->created[r]++;
    return w->slots[k];
}

/* A barrier of all ranks that gives up after timeout_ms (a rank that never comes). */
static epmoe_status world_barrier(epmoe_cpu_world *w, int rank, int timeout_ms, const char *what) {
    struct timespec dl;
    clock_gettime(CLOCK_REALTIME, &dl);
    dl.tv_sec += timeout_ms / 1000;
    dl.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (dl.tv_nsec >= 1000000000L) dl.tv_sec++, dl.tv_nsec -= 1000000000L;
    pthread_mutex_lock(&w->mu);
    unsigned gen = w->generation;
    if (++w->arrived == w->R) {
        w->arrived = 0;
        w->generation++;
        pthread_cond_broadcast(&w->cv);
        pthread_mutex_unlock(&w->mu);
        return EPMOE_OK;
    }
    while (gen == w->generation)
        if (pthread_cond_timedwait(&w->cv, &w->mu, &dl) == ETIMEDOUT && gen == w->generation) {
            w->arrived--;
            pthread_mutex_unlock(&w->mu);
            return epmoe__fail(EPMOE_ERR_TIMEOUT, "%s: rank %d waited %d ms for the other ranks", what, rank, timeout_ms);
        }
    pthread_mutex_unlock(&w->mu);
    return EPMOE_OK;
}

static uint8_t *win(epmoe_ep *ep, int r) { return ((cpu_impl *)ep->impl)->slot->windows[r]; }

/* Spin until *flag >= want (acquire), or fail the ep after its timeout. */
static epmoe_status wait_flag(epmoe_ep *ep, uint64_t *flag, uint64_t want, const char *what, int peer) {
    _Atomic uint64_t *f = (_Atomic uint64_t *)flag;
    double deadline = 0;
    for (unsigned spins = 0; atomic_load_explicit(f, memory_order_acquire) < want; spins++) {
        if (spins < 64) continue;
        if (deadline == 0) deadline = epmoe__now_ms() + ep->cfg.timeout_ms;
        if (epmoe__now_ms() > deadline) {
            ep->failed = EPMOE_ERR_TIMEOUT;
            return epmoe__fail(EPMOE_ERR_TIMEOUT, "rank %d: no %s %llu from rank %d after %d ms", ep->cfg.rank, what,
                               (unsigned long long)want, peer, ep->cfg.timeout_ms);
        }
        sched_yield();
    }
    return EPMOE_OK;
}

static void publish(uint64_t *flag, uint64_t v) {
    atomic_store_explicit((_Atomic uint64_t *)flag, v, memory_order_release);
}

static epmoe_status cpu_dispatch_send(epmoe_ep *ep, const epmoe_dispatch_args *a, ep_call *c, epmoe_stream_t s) {
    (void)s;
    const ep_dims *d = &ep->d;
    cpu_impl *im = ep->impl;
    const int me = d->rank, T = a->num_tokens, k = d->k, p = (int)(c->seq & 1);
    for (int64_t i = 0; i < (int64_t)T * k; i++) { /* all checked before the slot is written (a rejected call never happened) */
        const int64_t e = ep_topk_at(a->topk_idx, a->topk_idx_bits, i);
        if (e < -1 || e >= d->E)
            return epmoe__fail(EPMOE_ERR_INVALID_ARG, "epmoe_dispatch: topk_idx[%lld][%lld] = %lld is outside [-1, %d)",
                               (long long)(i / k), (long long)(i % k), (long long)e, d->E);
    }
    for (int64_t i = 0; i < (int64_t)T * k; i++) {
        const int64_t e = ep_topk_at(a->topk_idx, a->topk_idx_bits, i);
        c->topk[i] = (int32_t)(e >= 0 && c->active[e / d->L] ? e : -1);
    }
    if (c->seq > 2) /* the receivers must be done with the slots this parity last carried */
        for (int r = 0; r < d->R; r++)
            if (c->active[r]) EPMOE_CHECK(wait_flag(ep, ep_ack(win(ep, me), &ep->w, r), c->seq - 2, "receive ack of dispatch", r));
    memset(im->pairs, 0, sizeof(int32_t) * (size_t)d->E);
    memset(im->msgs, 0, sizeof(int32_t) * (size_t)d->R);
    for (int t = 0; t < T; t++) {
        const int32_t *idx = c->topk + (int64_t)t * k;
        int32_t rows[EPMOE_MAX_TOPK];
        int any = 0;
        for (int j = 0; j < k; j++) { /* rows in (token, slot) order: the deterministic order */
            const int f = ep_first_slot(idx, j);
            rows[j] = idx[j] < 0 ? -1 : f < j ? rows[f] : im->pairs[idx[j]]++;
            any |= idx[j] >= 0;
        }
        if (!any) continue;
        const uint16_t *xt = a->x + (int64_t)t * d->H;
        if (d->fp8) epmoe_cast_group_fp8_ref(xt, 1, d->H, im->payload, im->payload + d->H, EPMOE_SCALE_F32_ROW, ep->cfg.round_scale);
        else memcpy(im->payload, xt, (size_t)d->H * 2);
        /* dedup: one message per destination (ascending) with all its slots, at slot t (as on the
        ** GPU, ep_layout.h: the receiver scans the slots of tokens that sent it nothing and skips
        ** them by their seq); without dedup one per distinct expert, holding every slot that names
        ** it, packed */
        for (int dst = 0; dst < d->R; dst++)
            for (int j0 = 0; j0 < k; j0++) {
                if (idx[j0] < 0 || idx[j0] / d->L != dst || ep_first_slot(idx, j0) < j0) continue;
                uint8_t *m = ep_msg(win(ep, dst), d, &ep->w, p, me, d->dedup ? t : im->msgs[dst]++);
                ep_header h = {t, 0, c->seq, 0};
                ep_entry *ent = (ep_entry *)(m + sizeof(ep_header));
                for (int j = j0; j < k; j++) {
                    if (idx[j] < 0 || idx[j] / d->L != dst || (!d->dedup && idx[j] != idx[j0])) continue;
                    ep_entry e = {(int16_t)(idx[j] - dst * d->L), (int16_t)j, rows[j],
                                  a->topk_weights ? a->topk_weights[(int64_t)t * k + j] : 0.0f};
                    ent[h.n_entries++] = e;
                }
                memcpy(m, &h, sizeof h);
                memcpy(m + d->header_bytes, im->payload, (size_t)d->payload_bytes);
                if (d->dedup) break;
            }
    }
    for (int dst = 0; dst < d->R; dst++) {
        if (!c->active[dst]) continue;
        uint64_t *meta = ep_meta(win(ep, dst), &ep->w, p, me);
        meta[0] = ep_count_word(d->dedup ? T : im->msgs[dst], c->seq); /* the slots to scan */
        for (int le = 0; le < d->L; le++) meta[1 + le] = ep_count_word(im->pairs[dst * d->L + le], c->seq);
        publish(ep_disp_flag(win(ep, dst), d, &ep->w, p, me), c->seq);
    }
    return EPMOE_OK;
}

/* One received row into the caller's masked layout: payload -> recv_x[le][row] (+ scales). */
static void place_row(const epmoe_ep *ep, const epmoe_dispatch_args *a, const uint8_t *payload, int le, int64_t row) {
    const ep_dims *d = &ep->d;
    const int64_t M = (int64_t)d->R * d->N, G = d->H / FMT_GROUP, at = ((int64_t)le * M + row) * d->H;
    if (!d->fp8) {
        memcpy((uint16_t *)a->recv_x + at, payload, (size_t)d->H * 2);
        return;
    }
    const uint8_t *q = payload;
    uint8_t *y = (uint8_t *)a->recv_x + at;
    if (a->requant_scale) {
        const float inv = 1.0f / *a->requant_scale;
        for (int64_t g = 0; g < G; g++) {
            float sg;
            memcpy(&sg, payload + d->H + g * 4, 4);
            for (int i = 0; i < FMT_GROUP; i++) y[g * FMT_GROUP + i] = fmt_requant(q[g * FMT_GROUP + i], sg, inv);
        }
        return;
    }
    memcpy(y, q, (size_t)d->H);
    const int fmt = ep->cfg.scale_fmt;
    uint8_t *slab = (uint8_t *)a->recv_scales + (int64_t)le * fmt_scale_slab_bytes(fmt, M, G);
    for (int64_t g = 0; g < G; g++) {
        uint8_t *dst = slab + fmt_scale_offset(fmt, M, G, row, g);
        if (fmt_scale_is_ue8m0(fmt)) {
            float sg;
            memcpy(&sg, payload + d->H + g * 4, 4);
            *dst = fmt_ue8m0_from_float(sg);
        } else {
            memcpy(dst, payload + d->H + g * 4, 4);
        }
    }
    for (int64_t g = G; fmt_scale_is_ue8m0(fmt) && g % 4; g++) slab[fmt_scale_offset(fmt, M, G, row, g)] = 0;
}

static epmoe_status cpu_dispatch_recv(epmoe_ep *ep, const epmoe_dispatch_args *a, ep_call *c, epmoe_stream_t s) {
    (void)s;
    const ep_dims *d = &ep->d;
    const int me = d->rank, p = (int)(c->seq & 1), R = d->R, L = d->L;
    uint8_t *mine = win(ep, me);
    for (int src = 0; src < R; src++)
        if (c->active[src]) EPMOE_CHECK(wait_flag(ep, ep_disp_flag(mine, d, &ep->w, p, src), c->seq, "dispatch", src));
    for (int le = 0; le < L; le++) {
        int32_t acc = 0;
        for (int src = 0; src < R; src++) {
            c->begin[le * R + src] = acc;
            if (c->active[src]) acc += ep_count_of(ep_meta(mine, &ep->w, p, src)[1 + le]);
        }
        a->masked_m[le] = acc;
    }
    for (int src = 0; src < R; src++) {
        c->n_msgs[src] = c->active[src] ? ep_count_of(ep_meta(mine, &ep->w, p, src)[0]) : 0; /* slots to scan */
        for (int i = 0; i < c->n_msgs[src]; i++) {
            const uint8_t *m = ep_msg(mine, d, &ep->w, p, src, i);
            uint8_t *keep = c->hdrs + ((int64_t)src * d->slots + i) * d->header_bytes;
            memcpy(keep, m, (size_t)d->header_bytes);
            ep_header h;
            memcpy(&h, m, sizeof h);
            if (h.seq != c->seq) { /* an empty slot (an older call's message): kept as one without entries */
                h.n_entries = 0;
                memcpy(keep, &h, sizeof h);
                continue;
            }
            for (int n = 0; n < h.n_entries; n++) {
                ep_entry e, prev;
                memcpy(&e, m + sizeof h + n * sizeof e, sizeof e);
                int dup = 0; /* a slot repeating an expert: its row is already placed */
                for (int n2 = 0; n2 < n && !dup; n2++) {
                    memcpy(&prev, m + sizeof h + n2 * sizeof prev, sizeof prev);
                    dup = prev.le == e.le && prev.row == e.row;
                }
                if (dup) continue;
                const int64_t row = c->begin[e.le * R + src] + e.row;
                place_row(ep, a, m + d->header_bytes, e.le, row);
                if (a->recv_src_info) a->recv_src_info[(int64_t)e.le * R * d->N + row] = src * d->N + h.token;
            }
        }
    }
    for (int src = 0; src < R; src++) /* done with every source's slots of this parity */
        if (c->active[src]) publish(ep_ack(win(ep, src), &ep->w, me), c->seq);
    return EPMOE_OK;
}

static epmoe_status cpu_combine_send(epmoe_ep *ep, const epmoe_combine_args *a, ep_call *c, epmoe_stream_t s) {
    (void)s;
    const ep_dims *d = &ep->d;
    cpu_impl *im = ep->impl;
    const int me = d->rank, p = (int)(c->seq & 1), R = d->R, H = d->H;
    const int64_t M = (int64_t)R * d->N;
    for (int src = 0; src < R; src++) {
        if (!c->active[src]) continue;
        uint8_t *dst_win = win(ep, src);
        for (int i = 0; i < c->n_msgs[src]; i++) {
            const uint8_t *hp = c->hdrs + ((int64_t)src * d->slots + i) * d->header_bytes;
            ep_header h;
            memcpy(&h, hp, sizeof h);
            if (h.n_entries == 0) continue; /* an empty slot */
            if (d->reduce_at_expert)
                for (int x = 0; x < H; x++) im->acc[x] = 0.0f;
            for (int n = 0; n < h.n_entries; n++) {
                ep_entry e;
                memcpy(&e, hp + sizeof h + n * sizeof e, sizeof e);
                const uint16_t *y = a->expert_out + ((int64_t)e.le * M + c->begin[e.le * R + src] + e.row) * H;
                if (!d->reduce_at_expert) {
                    memcpy(ep_comb_row(dst_win, d, &ep->w, p, (int64_t)h.token * d->k + e.j), y, (size_t)H * 2);
                    continue;
                }
                for (int x = 0; x < H; x++) { /* multiply, then add: two roundings, as on the GPU */
                    float v = e.w * fmt_bf16_to_float(y[x]);
                    im->acc[x] = im->acc[x] + v;
                }
            }
            if (d->reduce_at_expert) {
                uint16_t *o = ep_comb_row(dst_win, d, &ep->w, p, (int64_t)me * d->N + h.token);
                for (int x = 0; x < H; x++) o[x] = fmt_bf16_from_float(im->acc[x]);
            }
        }
        publish(ep_comb_flag(dst_win, &ep->w, p, me), c->seq);
    }
    return EPMOE_OK;
}

static epmoe_status cpu_combine_recv(epmoe_ep *ep, const epmoe_combine_args *a, ep_call *c, epmoe_stream_t s) {
    (void)s;
    const ep_dims *d = &ep->d;
    cpu_impl *im = ep->impl;
    const int me = d->rank, p = (int)(c->seq & 1), R = d->R, H = d->H, k = d->k;
    uint8_t *mine = win(ep, me);
    for (int r = 0; r < R; r++)
        if (c->active[r]) EPMOE_CHECK(wait_flag(ep, ep_comb_flag(mine, &ep->w, p, r), c->seq, "combine", r));
    for (int t = 0; t < c->T; t++) {
        const int32_t *idx = c->topk + (int64_t)t * k;
        for (int x = 0; x < H; x++) im->acc[x] = 0.0f;
        if (d->reduce_at_expert) {
            for (int r = 0; r < R; r++) { /* one partial per rank that holds any of the token's experts */
                int hit = 0;
                for (int j = 0; j < k; j++) hit |= idx[j] >= 0 && idx[j] / d->L == r;
                if (!hit) continue;
                const uint16_t *row = ep_comb_row(mine, d, &ep->w, p, (int64_t)r * d->N + t);
                for (int x = 0; x < H; x++) im->acc[x] = im->acc[x] + fmt_bf16_to_float(row[x]);
            }
        } else {
            for (int j = 0; j < k; j++) {
                if (idx[j] < 0) continue;
                const float w = a->topk_weights[(int64_t)t * k + j];
                const uint16_t *row = ep_comb_row(mine, d, &ep->w, p, (int64_t)t * k + j);
                for (int x = 0; x < H; x++) {
                    float v = w * fmt_bf16_to_float(row[x]);
                    im->acc[x] = im->acc[x] + v;
                }
            }
        }
        for (int x = 0; x < H; x++) a->out[(int64_t)t * H + x] = fmt_bf16_from_float(im->acc[x]);
    }
    return EPMOE_OK;
}

static void cpu_destroy(epmoe_ep *ep) {
    cpu_impl *im = ep->impl;
    if (!im) return;
    /* A healthy group leaves together, so no peer is still writing; a failed one does not wait. */
    /* The barrier counts every rank, masked ones too: with a rank masked out (a failed one) its absence
    ** is expected, so only a group with every rank active reports a missing peer (epmoe_ep_destroy). */
    int all_active = 1;
    for (int r = 0; r < ep->d.R; r++) all_active &= ep->active[r] != 0;
    if (!ep->failed && world_barrier(im->world, ep->cfg.rank, ep->cfg.timeout_ms, "epmoe_ep_destroy") != EPMOE_OK &&
        all_active)
        ep->failed = EPMOE_ERR_TIMEOUT;
    epmoe_cpu_world *w = im->world;
    free(im->payload), free(im->pairs), free(im->msgs), free(im->acc), free(im);
    ep->impl = NULL;
    pthread_mutex_lock(&w->mu);
    const int last = --w->live == 0 && w->destroyed;
    pthread_mutex_unlock(&w->mu);
    if (last) world_free(w);
}

static const ep_backend_ops cpu_ops = {cpu_dispatch_send, cpu_dispatch_recv, cpu_combine_send, cpu_combine_recv,
                                       cpu_destroy, NULL, NULL};

epmoe_status epmoe_ep_create_cpu(epmoe_cpu_world *w, const epmoe_ep_config *cfg, epmoe_ep **out) {
    static const char fn[] = "epmoe_ep_create_cpu";
    if (!w || !out) return epmoe__fail(EPMOE_ERR_NULL_POINTER, "%s: world and ep must not be NULL", fn);
    EPMOE_CHECK(epmoe__ep_check_config(fn, cfg));
    if (cfg->num_ranks != w->R)
        return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: config.num_ranks = %d but the world has %d ranks", fn, cfg->num_ranks, w->R);
    epmoe_ep *ep;
    EPMOE_CHECK(epmoe__ep_alloc(cfg, EPMOE_BACKEND_CPU, &ep));
    cpu_impl *im = calloc(1, sizeof *im);
    const size_t total = (size_t)ep->w.total; /* read before any free below */
    uint8_t *window = aligned_alloc(4096, (total + 4095) / 4096 * 4096); /* C11: a multiple of the alignment */
    if (im) {
        im->world = w;
        im->payload = malloc((size_t)ep->d.payload_bytes);
        im->pairs = malloc(sizeof(int32_t) * (size_t)ep->d.E);
        im->msgs = malloc(sizeof(int32_t) * (size_t)ep->d.R);
        im->acc = malloc(sizeof(float) * (size_t)ep->d.H);
    }
    if (!im || !window || !im->payload || !im->pairs || !im->msgs || !im->acc) {
        if (im) free(im->payload), free(im->pairs), free(im->msgs), free(im->acc), free(im);
        free(window);
        epmoe__ep_free(ep);
        return epmoe__fail(EPMOE_ERR_OUT_OF_MEMORY, "%s: out of memory for a %zu-byte window", fn, total);
    }
    memset(window, 0, total);
    pthread_mutex_lock(&w->mu);
    cpu_slot *slot = w->destroyed ? NULL : next_slot(w, cfg->rank);
    if (slot) slot->windows[cfg->rank] = window, epmoe__ep_config_copy(cfg, &slot->cfgs[cfg->rank]), w->live++;
    const int destroyed = w->destroyed;
    pthread_mutex_unlock(&w->mu);
    if (!slot) {
        free(im->payload), free(im->pairs), free(im->msgs), free(im->acc), free(im);
        free(window);
        epmoe__ep_free(ep);
        return destroyed ? epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: the world was destroyed", fn)
                         : epmoe__fail(EPMOE_ERR_OUT_OF_MEMORY, "%s: out of memory", fn);
    }
    im->slot = slot;
    ep->impl = im;
    ep->ops = &cpu_ops;
    epmoe_status st = world_barrier(w, cfg->rank, cfg->timeout_ms, fn);
    for (int r = 0; st == EPMOE_OK && r < w->R; r++) /* every rank sees every config after the barrier */
        if (!slot->windows[r]) /* the barrier counted someone else: a rank claimed twice */
            st = epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: rank %d never joined this group (did two threads pass the same "
                             "config.rank?)", fn, r);
        else if (!epmoe__ep_same_shape(&slot->cfgs[r], cfg))
            st = epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: rank %d's config differs from rank %d's (max_tokens %d vs %d, "
                             "hidden %d vs %d, experts %d vs %d, top_k %d vs %d, or the wire/mode fields)", fn, r, cfg->rank,
                             slot->cfgs[r].max_tokens, cfg->max_tokens, slot->cfgs[r].hidden, cfg->hidden,
                             slot->cfgs[r].num_experts, cfg->num_experts, slot->cfgs[r].top_k, cfg->top_k);
    if (st != EPMOE_OK) {
        ep->failed = st; /* no teardown barrier: the group never formed */
        epmoe_ep_destroy(ep);
        return st;
    }
    *out = ep;
    return EPMOE_OK;
}
