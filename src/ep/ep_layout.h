/*
** ep_layout.h — the shapes of expert-parallel dispatch/combine, defined once for the CPU
** backend, the CUDA kernels and the reference: the dispatch message and the per-rank symmetric
** window. ep_window_layout() is the one layout function; the size query is the same call.
**
** Dispatch message (one per (token, destination rank) with dedup, else per (token, expert)):
**   header  int32 token, int32 n_entries, uint32 seq (the dispatch call's), uint32 0,
**           then n_entries x {int16 le, int16 j, int32 row, float w}
**           (le: local expert on the destination, j: top-k slot, row: index among the rows this
**           source sends to expert le, w: the top-k weight), padded to 16 bytes
**   payload bf16 [H]  |  fp8 [H] + fp32 scale_inv [H/128]   (the sender's per-128-group cast)
**
** Window of one rank, for each parity p of the dispatch sequence number (two calls in flight):
**   disp_msgs [p][src R][slot S] msg       S = N with dedup, N * min(k, L) without
**   disp_meta [p][src R] { uint64 n_slots, uint64 pairs[L] } then uint64 seq flag
**                                          (each count an ep_count_word: tagged with its call)
**   comb_rows [p][...] bf16 [H]            REDUCE_AT_EXPERT: [dst rank R][token N]
**                                          REDUCE_AT_OWNER:  [token N][slot k]
**   comb_flag [p][src R] uint64 seq
** and, outside the parities, ack [src R] uint64: the receiver writes into the sender's window
** the last dispatch seq it has finished reading, and a sender waits for ack >= seq - 2 before
** it reuses a parity's slots in that receiver (so a slow receiver is never overwritten).
** Flags carry the sequence number of the call they complete, so nothing is ever reset: a
** receiver waits for flag == seq (graph replays keep their own counters in device memory).
** The fallback transport's slabs (ep_a2a below) carry the same messages and counts.
** A receiver scans slots [0, n_slots) of each source and takes the messages whose header carries
** the call's seq (a slot the call left empty still holds an older call's message). With dedup,
** token t's message goes to slot t (n_slots = T): a sender can store the payload before it has
** counted the batch. Without dedup (up to min(k, L) messages per token and rank) they are packed
** in token order (n_slots = messages), so no slot is empty.
** (The fallback's kernels run on the host's seq, which a graph replay repeats: there the sender
** also empties a token's slot at each active rank it sends nothing, by n_entries = 0.)
*/
#ifndef EPMOE_EP_LAYOUT_H
#define EPMOE_EP_LAYOUT_H

#include <stddef.h>
#include <stdint.h>

#include "../format.h"

/* One definition for the CPU backend, the reference and the kernels. */
#ifdef __CUDACC__
#define EP_HD static __host__ __device__ __forceinline__
#define EP_STATIC_ASSERT static_assert
#else
#define EP_HD static inline
#define EP_STATIC_ASSERT _Static_assert
#endif

typedef struct ep_entry {
    int16_t le; /* local expert on the destination rank */
    int16_t j;  /* top-k slot */
    int32_t row; /* row among those this source sends to expert le */
    float w;    /* top-k weight */
} ep_entry;

typedef struct ep_header {
    int32_t token;
    int32_t n_entries;
    uint32_t seq; /* the dispatch call that sent it */
    uint32_t pad;
} ep_header;

EP_STATIC_ASSERT(sizeof(ep_entry) == 12, "ep_entry layout");
EP_STATIC_ASSERT(sizeof(ep_header) == 16, "ep_header layout");

typedef struct ep_dims {
    int R, rank, N, H, E, L, k;
    int fp8, dedup, reduce_at_expert;
    int64_t slots;        /* messages per (parity, source) */
    int64_t header_bytes; /* padded to 16 */
    int64_t payload_bytes;
    int64_t msg_bytes;
} ep_dims;

typedef struct ep_window {
    int64_t disp_msgs, disp_meta, comb_rows, comb_flag; /* offsets of parity 0 */
    int64_t ack;                                        /* after both parities */
    int64_t meta_stride;                                /* bytes per source in disp_meta */
    int64_t comb_rows_count;                            /* rows per parity in comb_rows */
    int64_t parity_bytes;                               /* parity 1 = parity 0 + this */
    int64_t total;
} ep_window;

EP_HD int64_t ep_align(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

EP_HD void ep_dims_init(ep_dims *d, int R, int rank, int N, int H, int E, int k, int fp8, int dedup,
                                int reduce_at_expert) {
    d->R = R, d->rank = rank, d->N = N, d->H = H, d->E = E, d->L = E / R, d->k = k;
    d->fp8 = fp8, d->dedup = dedup, d->reduce_at_expert = reduce_at_expert;
    d->slots = dedup ? N : (int64_t)N * (k < d->L ? k : d->L);
    d->header_bytes = ep_align((int64_t)sizeof(ep_header) + (int64_t)k * (int64_t)sizeof(ep_entry), 16);
    d->payload_bytes = fp8 ? (int64_t)H + (int64_t)(H / FMT_GROUP) * 4 : (int64_t)H * 2;
    d->msg_bytes = ep_align(d->header_bytes + d->payload_bytes, 16);
}

/* The one layout function of the window (offsets are for parity 0). */
EP_HD void ep_window_layout(const ep_dims *d, ep_window *w) {
    int64_t o = 0;
    w->disp_msgs = o;
    o += (int64_t)d->R * d->slots * d->msg_bytes;
    w->disp_meta = o;
    w->meta_stride = ep_align(8 + 8 * (int64_t)d->L + 8, 128); /* counts, then the flag, own line */
    o += (int64_t)d->R * w->meta_stride;
    w->comb_rows = o;
    w->comb_rows_count = d->reduce_at_expert ? (int64_t)d->R * d->N : (int64_t)d->N * d->k;
    o += ep_align(w->comb_rows_count * d->H * 2, 128);
    w->comb_flag = o;
    o += ep_align((int64_t)d->R * 128, 128); /* one 128-byte line per source flag */
    w->parity_bytes = ep_align(o, 4096);
    w->ack = 2 * w->parity_bytes;
    w->total = w->ack + ep_align((int64_t)d->R * 128, 4096);
}

/* Addresses inside one window (base = that rank's window). */
EP_HD uint8_t *ep_msg(uint8_t *base, const ep_dims *d, const ep_window *w, int p, int src, int64_t slot) {
    return base + p * w->parity_bytes + w->disp_msgs + ((int64_t)src * d->slots + slot) * d->msg_bytes;
}
EP_HD uint64_t *ep_meta(uint8_t *base, const ep_window *w, int p, int src) {
    return (uint64_t *)(base + p * w->parity_bytes + w->disp_meta + (int64_t)src * w->meta_stride);
}
/* the dispatch flag sits after the counts in the same meta block */
EP_HD uint64_t *ep_disp_flag(uint8_t *base, const ep_dims *d, const ep_window *w, int p, int src) {
    return ep_meta(base, w, p, src) + 1 + d->L;
}
/* A count-block word: the dispatch's seq above the count, stored as one 8-byte word. A receiver
** can take the counts before the call's flag, each word once it carries its call's seq: the sender
** then stores them without a release of their own, under its payload. The whole seq, not a few of
** its bits, so no older call's word can ever pass for this call's (masking is final, see
** epmoe_ep_set_active_ranks, so this is defence, not a protocol step). */
EP_HD uint64_t ep_count_word(int64_t count, uint32_t seq) { return (uint64_t)seq << 32 | (uint32_t)count; }
EP_HD int32_t ep_count_of(uint64_t w) { return (int32_t)(uint32_t)w; }
EP_HD int ep_count_is(uint64_t w, uint32_t seq) { return (uint32_t)(w >> 32) == seq; }
EP_HD uint16_t *ep_comb_row(uint8_t *base, const ep_dims *d, const ep_window *w, int p, int64_t row) {
    return (uint16_t *)(base + p * w->parity_bytes + w->comb_rows + row * d->H * 2);
}
EP_HD uint64_t *ep_comb_flag(uint8_t *base, const ep_window *w, int p, int src) {
    return (uint64_t *)(base + p * w->parity_bytes + w->comb_flag + (int64_t)src * 128);
}

/* ---- the put/signal transport (GIN, and its NVLink emulation) ------------------------------
** A sender cannot store into a remote window over a NIC: it builds each message, count block and
** combine row in an outbox appended to its own window, then puts the bytes to the place the LSA
** path stores them in the destination's window (same offsets, so receivers read exactly what LSA
** delivers) and then publishes the flag. The outbox mirrors one destination's view per
** destination, in two parities like the window:
**   msgs  [p][dst R][slots] msg_bytes      meta [p][dst R] meta_stride
**   comb  [p][dst R][rows per source] bf16 rows of H (REDUCE_AT_EXPERT: N per source, the
**         token's row; REDUCE_AT_OWNER: N * k, a token's k slots) */
typedef struct ep_outbox {
    int64_t base;                 /* = the window's total: the outbox follows the LSA window */
    int64_t msgs, meta, comb;     /* offsets of parity 0, from the window's base */
    int64_t comb_rows;            /* rows per destination */
    int64_t parity_bytes, total;  /* total: the whole window, outbox included */
} ep_outbox;

EP_HD void ep_outbox_layout(const ep_dims *d, const ep_window *w, ep_outbox *o) {
    o->base = w->total;
    int64_t at = o->base;
    o->msgs = at;
    at += (int64_t)d->R * d->slots * d->msg_bytes;
    o->meta = at;
    at += (int64_t)d->R * w->meta_stride;
    o->comb = at;
    o->comb_rows = d->reduce_at_expert ? (int64_t)d->N : (int64_t)d->N * d->k;
    at += ep_align((int64_t)d->R * o->comb_rows * d->H * 2, 128);
    o->parity_bytes = ep_align(at - o->base, 4096);
    o->total = o->base + 2 * o->parity_bytes;
}
EP_HD uint8_t *ep_out_msg(uint8_t *base, const ep_dims *d, const ep_outbox *o, int p, int dst, int64_t slot) {
    return base + p * o->parity_bytes + o->msgs + ((int64_t)dst * d->slots + slot) * d->msg_bytes;
}
EP_HD uint64_t *ep_out_meta(uint8_t *base, const ep_window *w, const ep_outbox *o, int p, int dst) {
    return (uint64_t *)(base + p * o->parity_bytes + o->meta + (int64_t)dst * w->meta_stride);
}
EP_HD uint16_t *ep_out_comb_row(uint8_t *base, const ep_dims *d, const ep_outbox *o, int p, int dst, int64_t row) {
    return (uint16_t *)(base + p * o->parity_bytes + o->comb + ((int64_t)dst * o->comb_rows + row) * d->H * 2);
}

/* The first top-k slot of a token naming the same expert as slot j (j if none): an expert
** named twice receives the token once, and every slot naming it gets that one output row. */
EP_HD int ep_first_slot(const int32_t *idx, int j) {
    for (int jj = 0; jj < j; jj++)
        if (idx[jj] == idx[j]) return jj;
    return j;
}

EP_HD uint64_t *ep_ack(uint8_t *base, const ep_window *w, int src) {
    return (uint64_t *)(base + w->ack + (int64_t)src * 128);
}

/* ---- the fallback transport: a padded all-to-all (EPMOE_BACKEND_NCCL_A2A) -----------------
** The same messages and count block as the window, gathered per destination instead and moved
** by NCCL send/recv of fixed-size slabs, each padded to the most one source can send, so no
** count has to reach the host before the exchange:
**   dispatch slab  { uint64 n_slots, uint64 pairs[L] } padded to 128, then msg [S]
**   combine slab   bf16 rows [N] (REDUCE_AT_EXPERT: row = token) or
**                  [N * k] (REDUCE_AT_OWNER: row = token * k + slot)
** One device buffer per rank: disp_out [dst R] slab, disp_in [p][src R] slab, comb_out [dst R]
** slab, comb_in [p][src R] slab. A rank writes its share for itself straight into its own inbox
** (its outbox slab stays unused). The outboxes have one parity: the exchange that drains one
** runs before the next pack on the ep's stream. The inboxes have two, as the window: a dispatch
** is received (and combined) after the next one may have been sent. */
typedef struct ep_a2a {
    int64_t meta_bytes;           /* count block at the head of a dispatch slab */
    int64_t disp_slab, comb_slab; /* bytes per peer */
    int64_t disp_out, disp_in, comb_out, comb_in;
    int64_t total;
} ep_a2a;

EP_HD void ep_a2a_layout(const ep_dims *d, ep_a2a *a) {
    const int64_t R = d->R, comb_rows = d->reduce_at_expert ? (int64_t)d->N : (int64_t)d->N * d->k;
    a->meta_bytes = ep_align(8 + 8 * (int64_t)d->L, 128);
    a->disp_slab = ep_align(a->meta_bytes + d->slots * d->msg_bytes, 128);
    a->comb_slab = ep_align(comb_rows * d->H * 2, 128);
    int64_t o = 0;
    a->disp_out = o;
    o += R * a->disp_slab;
    a->disp_in = o;
    o += 2 * R * a->disp_slab;
    a->comb_out = o;
    o += R * a->comb_slab;
    a->comb_in = o;
    o += 2 * R * a->comb_slab;
    a->total = o;
}

/* The slab of `peer` in the outbox (in = 0; p unused) or in parity p's inbox (in = 1). */
EP_HD uint8_t *ep_a2a_disp_slab(uint8_t *box, const ep_dims *d, const ep_a2a *a, int in, int p, int peer) {
    return box + (in ? a->disp_in + ((int64_t)p * d->R + peer) * a->disp_slab : a->disp_out + (int64_t)peer * a->disp_slab);
}
EP_HD uint8_t *ep_a2a_comb_slab(uint8_t *box, const ep_dims *d, const ep_a2a *a, int in, int p, int peer) {
    return box + (in ? a->comb_in + ((int64_t)p * d->R + peer) * a->comb_slab : a->comb_out + (int64_t)peer * a->comb_slab);
}
/* Inside a dispatch slab: the count block is its head (same fields as ep_meta), then the messages. */
EP_HD uint8_t *ep_a2a_msg(uint8_t *slab, const ep_dims *d, const ep_a2a *a, int64_t slot) {
    return slab + a->meta_bytes + slot * d->msg_bytes;
}
EP_HD uint16_t *ep_a2a_comb_row(uint8_t *slab, const ep_dims *d, int64_t row) {
    return (uint16_t *)(slab + row * d->H * 2);
}

#endif
