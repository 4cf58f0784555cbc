/*
** ep_ref.c — single-process reference of dispatch and combine over all ranks: the
** specification of the row order and of the combine sum, written as plain loops over the
** global routing table (independent of the message protocol of the backends).
*/
#include <stdlib.h>
#include <string.h>

#include "ep_internal.h"

static int owner_active(const int *active, int r) { return !active || active[r]; }

/* What both references read of every rank: 0 <= T[r] <= N (every rank's, the combine recomputes
** the rows of all), and for an active rank with tokens its topk_idx, its per-token array (x or
** out: `rows`) and ids in [-1, E), as the backends require (epmoe_dispatch). */
static epmoe_status check_ranks(const char *fn, const epmoe_ep_config *cfg, const int32_t *const *topk_idx,
                                const void *const *rows, const int *num_tokens, const int *active) {
    const int R = cfg->num_ranks, N = cfg->max_tokens, E = cfg->num_experts, k = cfg->top_k;
    for (int r = 0; r < R; r++) {
        const int T = num_tokens[r];
        if (T < 0 || T > N) return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: num_tokens[%d] = %d is outside [0, max_tokens = %d]", fn, r, T, N);
        if (!owner_active(active, r) || T == 0) continue;
        if (!topk_idx[r] || !rows[r]) return epmoe__fail(EPMOE_ERR_NULL_POINTER, "%s: rank %d has tokens and a NULL array", fn, r);
        for (int64_t i = 0; i < (int64_t)T * k; i++)
            if (topk_idx[r][i] < -1 || topk_idx[r][i] >= E)
                return epmoe__fail(EPMOE_ERR_INVALID_ARG, "%s: topk_idx[%d][%lld] = %d is outside [-1, %d)", fn, r, (long long)i,
                                   (int)topk_idx[r][i], E);
    }
    return EPMOE_OK;
}

epmoe_status epmoe_ep_dispatch_ref(const epmoe_ep_config *cfg, const uint16_t *const *x, const int32_t *const *topk_idx,
                                   const int *num_tokens, const int *active, void *const *recv_x,
                                   void *const *recv_scales, int32_t *const *masked_m, int32_t *const *recv_src_info) {
    static const char fn[] = "epmoe_ep_dispatch_ref";
    EPMOE_CHECK(epmoe__ep_check_config(fn, cfg));
    if (!x || !topk_idx || !num_tokens || !recv_x || !masked_m) return epmoe__fail(EPMOE_ERR_NULL_POINTER, "%s: NULL array", fn);
    const int R = cfg->num_ranks, N = cfg->max_tokens, H = cfg->hidden, E = cfg->num_experts, k = cfg->top_k, L = E / R;
    const int fp8 = cfg->wire == EPMOE_WIRE_FP8, fmt = cfg->scale_fmt;
    EPMOE_CHECK(check_ranks(fn, cfg, topk_idx, (const void *const *)x, num_tokens, active));
    for (int d = 0; d < R; d++)
        if (owner_active(active, d) && (!recv_x[d] || !masked_m[d] || (fp8 && (!recv_scales || !recv_scales[d]))))
            return epmoe__fail(EPMOE_ERR_NULL_POINTER, "%s: rank %d's recv_x, masked_m or (FP8 wire) recv_scales is NULL", fn, d);
    const int64_t M = (int64_t)R * N, G = H / FMT_GROUP;
    uint8_t *q = malloc((size_t)H);
    float *s = malloc(sizeof(float) * (size_t)G);
    if (!q || !s) {
        free(q), free(s);
        return epmoe__fail(EPMOE_ERR_OUT_OF_MEMORY, "%s: out of memory", fn);
    }
    for (int d = 0; d < R; d++) {
        if (!owner_active(active, d)) continue;
        for (int le = 0; le < L; le++) {
            const int e = d * L + le;
            int32_t row = 0;
            for (int src = 0; src < R; src++) { /* the order: source rank, token, top-k slot */
                if (!owner_active(active, src)) continue;
                for (int t = 0; t < num_tokens[src]; t++)
                    for (int j = 0; j < k; j++) {
                        /* the first slot naming e: a token reaches an expert once */
                        if (topk_idx[src][(int64_t)t * k + j] != e || ep_first_slot(topk_idx[src] + (int64_t)t * k, j) < j)
                            continue;
                        const uint16_t *xt = x[src] + (int64_t)t * H;
                        const int64_t at = ((int64_t)le * M + row) * H;
                        if (!fp8) {
                            memcpy((uint16_t *)recv_x[d] + at, xt, (size_t)H * 2);
                        } else {
                            epmoe_cast_group_fp8_ref(xt, 1, H, q, s, EPMOE_SCALE_F32_ROW, cfg->round_scale);
                            memcpy((uint8_t *)recv_x[d] + at, q, (size_t)H);
                            uint8_t *slab = (uint8_t *)recv_scales[d] + le * fmt_scale_slab_bytes(fmt, M, G);
                            for (int64_t g = 0; g < G; g++) {
                                uint8_t *p = slab + fmt_scale_offset(fmt, M, G, row, g);
                                if (fmt_scale_is_ue8m0(fmt)) *p = fmt_ue8m0_from_float(s[g]);
                                else memcpy(p, &s[g], 4);
                            }
                            for (int64_t g = G; fmt_scale_is_ue8m0(fmt) && g % 4; g++) slab[fmt_scale_offset(fmt, M, G, row, g)] = 0;
                        }
                        if (recv_src_info && recv_src_info[d]) recv_src_info[d][(int64_t)le * M + row] = src * N + t;
                        row++;
                    }
            }
            masked_m[d][le] = row;
        }
    }
    free(q), free(s);
    return EPMOE_OK;
}

epmoe_status epmoe_ep_combine_ref(const epmoe_ep_config *cfg, const uint16_t *const *expert_out,
                                  const int32_t *const *topk_idx, const float *const *topk_weights, const int *num_tokens,
                                  const int *active, uint16_t *const *out) {
    static const char fn[] = "epmoe_ep_combine_ref";
    EPMOE_CHECK(epmoe__ep_check_config(fn, cfg));
    if (!expert_out || !topk_idx || !topk_weights || !num_tokens || !out)
        return epmoe__fail(EPMOE_ERR_NULL_POINTER, "%s: NULL array", fn);
    EPMOE_CHECK(check_ranks(fn, cfg, topk_idx, (const void *const *)out, num_tokens, active));
    const int R = cfg->num_ranks, N = cfg->max_tokens, H = cfg->hidden, E = cfg->num_experts, k = cfg->top_k, L = E / R;
    for (int r = 0; r < R; r++)
        if (owner_active(active, r) && (!expert_out[r] || (num_tokens[r] > 0 && !topk_weights[r])))
            return epmoe__fail(EPMOE_ERR_NULL_POINTER, "%s: rank %d's expert_out or topk_weights is NULL", fn, r);
    const int64_t M = (int64_t)R * N;
    /* row[src][t*k+j]: where dispatch put (src, t, j), recomputed from the order above */
    int32_t **row = calloc((size_t)R, sizeof *row);
    int32_t *next = calloc((size_t)E, sizeof *next);
    float *acc = malloc(sizeof(float) * (size_t)H);
    epmoe_status st = row && next && acc ? EPMOE_OK : epmoe__fail(EPMOE_ERR_OUT_OF_MEMORY, "%s: out of memory", fn);
    for (int src = 0; st == EPMOE_OK && src < R; src++)
        if (!(row[src] = malloc(sizeof(int32_t) * ((size_t)num_tokens[src] * k + 1))))
            st = epmoe__fail(EPMOE_ERR_OUT_OF_MEMORY, "%s: out of memory", fn);
    for (int src = 0; st == EPMOE_OK && src < R; src++)
        for (int64_t i = 0; i < (int64_t)num_tokens[src] * k; i++) {
            if (!owner_active(active, src)) { /* its ids are not read (check_ranks did not look at them) */
                row[src][i] = -1;
                continue;
            }
            const int32_t e = topk_idx[src][i];
            const int j = (int)(i % k), f = ep_first_slot(topk_idx[src] + (i - j), j);
            row[src][i] = e < 0 || !owner_active(active, e / L) ? -1 : f < j ? row[src][i - j + f] : next[e]++;
        }
    for (int src = 0; st == EPMOE_OK && src < R; src++) {
        if (!owner_active(active, src)) continue;
        for (int t = 0; t < num_tokens[src]; t++) {
            for (int x = 0; x < H; x++) acc[x] = 0.0f;
            for (int j = 0; j < k; j++) {
                const int64_t i = (int64_t)t * k + j;
                if (row[src][i] < 0) continue;
                const int32_t e = topk_idx[src][i];
                const uint16_t *y = expert_out[e / L] + ((int64_t)(e % L) * M + row[src][i]) * H;
                for (int x = 0; x < H; x++) {
                    float v = topk_weights[src][i] * fmt_bf16_to_float(y[x]);
                    acc[x] = acc[x] + v;
                }
            }
            for (int x = 0; x < H; x++) out[src][(int64_t)t * H + x] = fmt_bf16_from_float(acc[x]);
        }
    }
    if (row)
        for (int src = 0; src < R; src++) free(row[src]);
    free(row), free(next), free(acc);
    return st;
}
