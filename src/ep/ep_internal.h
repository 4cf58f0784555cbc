/*
** ep_internal.h — the epmoe_ep object shared by the EP front end (ep.c) and its backends
** (ep_cpu.c, ep_nccl.cu). The front end validates and sequences calls; a backend moves bytes.
*/
#ifndef EPMOE_EP_INTERNAL_H
#define EPMOE_EP_INTERNAL_H

#include "../internal.h"
#include "ep_layout.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Host-side record of one dispatch (two live at once, indexed by the parity of its seq). */
typedef struct ep_call {
    uint32_t seq;         /* the dispatch's handle; 0 = none */
    int sent, received;   /* dispatch halves done */
    int comb_sent, comb_received;
    int T;
    int joined;           /* the receive half being launched follows its send half in the same call
                          ** (phase BOTH): nothing else ran between them on the stream */
    int32_t *topk;        /* [N, k] ids as sent: -1 where none or the owner is inactive */
    int32_t *begin;       /* [L, R] first row of (local expert, source) in the masked layout */
    int32_t *n_msgs;      /* [R] slots received from each source (n_slots; empty ones kept without entries) */
    uint8_t *hdrs;        /* [R, slots] received message headers, kept for combine */
    int *active;          /* [R] the active ranks when the dispatch was sent */
} ep_call;

typedef struct ep_backend_ops {
    epmoe_status (*dispatch_send)(epmoe_ep *ep, const epmoe_dispatch_args *a, ep_call *c, epmoe_stream_t s);
    epmoe_status (*dispatch_recv)(epmoe_ep *ep, const epmoe_dispatch_args *a, ep_call *c, epmoe_stream_t s);
    epmoe_status (*combine_send)(epmoe_ep *ep, const epmoe_combine_args *a, ep_call *c, epmoe_stream_t s);
    epmoe_status (*combine_recv)(epmoe_ep *ep, const epmoe_combine_args *a, ep_call *c, epmoe_stream_t s);
    void (*destroy)(epmoe_ep *ep);
    epmoe_status (*poll)(epmoe_ep *ep);       /* errors recorded asynchronously (may be NULL) */
    epmoe_status (*set_active)(epmoe_ep *ep); /* push ep->active to the backend (may be NULL) */
} ep_backend_ops;

struct epmoe_ep {
    epmoe_ep_config cfg;
    ep_dims d;
    ep_window w;
    epmoe_backend backend;
    const ep_backend_ops *ops;
    uint32_t seq;      /* dispatches started */
    uint32_t recv_seq; /* dispatches received (in order) */
    epmoe_status failed; /* EPMOE_OK, or why the group failed (a peer timed out: EPMOE_ERR_TIMEOUT; the
                            transport: _NCCL, _CUDA): every later call fails fast with it */
    int *active;      /* [R] */
    ep_call calls[2];
    struct ncclComm *owned_comm; /* made by a launch helper: destroyed with the ep */
    void *impl;       /* backend-private */
    int *spare_active; /* [R]: a send takes it as its slot's active set and gives the slot's back if
                       ** the backend rejects the call, so the dispatch two back stays combinable */
};

/* Validation of a config (also used by the layout query). Accepts the size of this header's
** config and the earlier one without `transport`. */
EPMOE_HIDDEN epmoe_status epmoe__ep_check_config(const char *fn, const epmoe_ep_config *cfg);
/* A checked config as this library's struct: the caller's `size` bytes, the rest defaulted. */
EPMOE_HIDDEN void epmoe__ep_config_copy(const epmoe_ep_config *in, epmoe_ep_config *out);
/* The creation helpers' config: the caller's, with rank and num_ranks replaced by rank and size
** (the caller's own two are never read, as epmoe.h says), then checked whole. */
EPMOE_HIDDEN epmoe_status epmoe__ep_config_as(const char *fn, const epmoe_ep_config *in, int rank, int size,
                                              epmoe_ep_config *out);
/* The transport a creation uses: cfg->transport, or under AUTO $EPMOE_EP_TRANSPORT. */
EPMOE_HIDDEN epmoe_status epmoe__ep_transport(const char *fn, const epmoe_ep_config *cfg, epmoe_transport *out);
/* The checks of epmoe_ep_create_nccl_rank, before anything touches NCCL or CUDA (ep_launch.c):
** *cfg becomes the caller's config with rank and num_ranks replaced by rank and size. */
EPMOE_HIDDEN epmoe_status epmoe__ep_rank_args(const char *fn, const epmoe_ep_config *in, int rank, int size,
                                              const void *unique_id, epmoe_ep **ep, epmoe_ep_config *cfg);
/* epmoe_ep_create_nccl_rank, its communicator's creation waiting at most wait_ms for the other
** ranks (ep_nccl.cu; without NCCL, cuda_none.c's EPMOE_ERR_UNSUPPORTED after the argument checks). */
EPMOE_HIDDEN epmoe_status epmoe__ep_create_nccl_rank_wait(const epmoe_ep_config *cfg, int rank, int size,
                                                          const void *unique_id, int device, int wait_ms, epmoe_ep **ep);
/* Destroy (a failed group: abort) the communicator the ep owns (ep_nccl.cu). */
EPMOE_HIDDEN void epmoe__ep_release_comm(epmoe_ep *ep);
/* The unique-id file of epmoe_ep_create_nccl_env (ep_launch.c): publish writes it atomically
** and refuses an existing file; fetch polls for it and checks that it is for `size` ranks. */
EPMOE_HIDDEN epmoe_status epmoe__bootstrap_publish(const char *path, const void *id, int size);
EPMOE_HIDDEN epmoe_status epmoe__bootstrap_fetch(const char *path, void *id, int size, int timeout_ms);
/* Allocate and initialize the backend-independent parts; the backend fills ops/impl. */
EPMOE_HIDDEN epmoe_status epmoe__ep_alloc(const epmoe_ep_config *cfg, epmoe_backend b, epmoe_ep **out);
EPMOE_HIDDEN void epmoe__ep_free(epmoe_ep *ep);
/* Two configs describe the same collective shape (everything but the rank). */
EPMOE_HIDDEN int epmoe__ep_same_shape(const epmoe_ep_config *a, const epmoe_ep_config *b);
/* Read expert id (t, j) of a topk_idx array of 32- or 64-bit integers. */
static inline int64_t ep_topk_at(const void *idx, int bits, int64_t i) {
    return bits == 64 ? ((const int64_t *)idx)[i] : ((const int32_t *)idx)[i];
}
/* Deadline helpers (monotonic clock, milliseconds). */
EPMOE_HIDDEN double epmoe__now_ms(void);

#ifdef __cplusplus
}
#endif
#endif
