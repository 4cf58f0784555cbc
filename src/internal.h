/*
** internal.h — what every epmoe source file shares and no caller sees: error reporting,
** the check macros and argument validation shared by the CPU references and the CUDA entries
** (so both reject the same inputs with the same status and message).
*/
#ifndef EPMOE_INTERNAL_H
#define EPMOE_INTERNAL_H

#include "epmoe.h"

#ifdef __cplusplus
extern "C" {
#endif

#define EPMOE_HIDDEN __attribute__((visibility("hidden")))

/* Record a detailed message for epmoe_last_error() and return s. printf-style. */
EPMOE_HIDDEN epmoe_status epmoe__fail(epmoe_status s, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

#define EPMOE_CHECK(call)                                                                          \
    do {                                                                                           \
        epmoe_status st_ = (call);                                                                 \
        if (st_ != EPMOE_OK) return st_;                                                           \
    } while (0)

/* Argument checks. `fn` names the public entry for the message; `device` adds the alignment
** rules of the GPU kernels (16-byte vectors). Return EPMOE_OK or the failing status. */
EPMOE_HIDDEN epmoe_status epmoe__check_cast_group(const char *fn, const void *x, int64_t M, int64_t K,
                                                  const void *q, const void *scales, int fmt, int round_scale,
                                                  int device);
EPMOE_HIDDEN epmoe_status epmoe__check_cast_tensor(const char *fn, const void *x, int64_t n, const float *scale,
                                                   const void *q, int device);
/* requant (requant = 1: out is fp8, masked_m and out_scale required) and dequant
** (requant = 0: out_dtype f32 or bf16, masked_m optional, out_scale unused). */
EPMOE_HIDDEN epmoe_status epmoe__check_rescale(const char *fn, int requant, const void *q, const void *scales, int fmt,
                                               const int32_t *masked_m, int64_t E, int64_t M, int64_t K,
                                               const float *out_scale, int out_dtype, const void *y, int device);

/* What the GEMM checks of w4a8.c and experts.c share (defined in w4a8.c). Per expert, N, K and
** M are at most EPMOE__MAX_DIM (far above any model: products stay in int64), E at most
** EPMOE__MAX_EXPERTS. need: p non-NULL and `align`-byte aligned. check_dims: a weight matrix
** [E, N, K], N and K positive multiples of 128. check_out: a bf16 output [E, M, N] at the given
** strides (bounded, row_stride >= N, experts not overlapping), out 2-byte aligned unless E or
** M is 0. silu_mul_row: silu(gate) * up of one row of an MLP's gate_up ([gate | up], I each) in
** fp32, rounded to bf16: the one expression of every MLP reference. */
#define EPMOE__MAX_DIM (INT64_C(1) << 24)
#define EPMOE__MAX_EXPERTS 4096
/* The quantization ops' bound on a tensor's elements (quant_args.c) and so on a scale layout's
** M * K (format.c): every index then fits comfortably in int64 arithmetic, byte offsets included. */
#define EPMOE__MAX_ELEMS (INT64_C(1) << 46)
EPMOE_HIDDEN epmoe_status epmoe__need(const char *fn, const void *p, const char *name, unsigned align);
/* need_apart: [a, a + an) and [b, b + bn) share no byte. out_span: the bytes a bf16 output [E, M, N]
** at checked strides spans (0 if E or M is 0). */
EPMOE_HIDDEN epmoe_status epmoe__need_apart(const char *fn, const void *a, size_t an, const char *a_name, const void *b,
                                            size_t bn, const char *b_name);
EPMOE_HIDDEN size_t epmoe__out_span(int64_t E, int64_t M, int64_t N, int64_t row_stride, int64_t expert_stride);
/* acts_apart: an output (or workspace) [o, o + on) apart from a GEMM's inputs: the activations (an
** bytes), masked_m [E] and the activation scales (sn bytes; 0 if none). Nothing to check if on is 0. */
EPMOE_HIDDEN epmoe_status epmoe__acts_apart(const char *fn, const void *o, size_t on, const char *o_name, const void *a,
                                            size_t an, const int32_t *masked_m, int64_t E, const void *a_scales, size_t sn);
/* weights_apart: an output (or workspace) [o, o + on) apart from a weight matrix w_name: its data (field
** data_field, dn bytes) and its scales (sn; 0 if none). Nothing to check if on is 0. */
EPMOE_HIDDEN epmoe_status epmoe__weights_apart(const char *fn, const void *o, size_t on, const char *o_name, const char *w_name,
                                               const char *data_field, const void *data, size_t dn, const void *scales,
                                               size_t sn);
/* w4a8_workspace_apart: the GPU GEMM's own workspace (its first ws bytes: launch counter, flags,
** stream-K partials, which the kernel writes) apart from everything else the call reads or writes. */
EPMOE_HIDDEN epmoe_status epmoe__w4a8_workspace_apart(const char *fn, const epmoe_w4a8_gemm_args *g, size_t ws);
EPMOE_HIDDEN epmoe_status epmoe__check_dims(const char *fn, const char *what, int64_t E, int64_t N, int64_t K);
EPMOE_HIDDEN epmoe_status epmoe__check_out(const char *fn, int64_t E, int64_t M, int64_t N, const uint16_t *out,
                                           int64_t row_stride, int64_t expert_stride);
EPMOE_HIDDEN void epmoe__silu_mul_row(const uint16_t *gate_up, int64_t I, uint16_t *y);
/* The wgmma GEMM's 32-bit limits (w4a8.c): work items at tiles of min_tile tokens and more, TMA
** rows of the activations and, with tma_weights, of the weights. GPU entries only. */
EPMOE_HIDDEN epmoe_status epmoe__check_wgmma_limits(const char *fn, int64_t E, int64_t M, int64_t N, int min_tile,
                                                    int tma_weights);
static inline size_t epmoe__align256(size_t x) { return (x + 255u) & ~(size_t)255u; }

/* W4A8 GEMM and MLP argument checks (w4a8.c) and the MLP workspace layout: byte offsets of
** gate_up (bf16 [E, M, 2I]), inter (fp8 [E, M, I]), inter_scales (f32 row-major [E, M, I/128])
** and the GEMMs' workspace; returns the total size. */
EPMOE_HIDDEN epmoe_status epmoe__check_w4a8_gemm(const char *fn, const epmoe_w4a8_gemm_args *g, int device);
EPMOE_HIDDEN epmoe_status epmoe__check_w4a8_weights(const char *fn, const char *what, const epmoe_w4a8_weights *w,
                                                    int device);
EPMOE_HIDDEN epmoe_status epmoe__check_w4a8_mlp(const char *fn, const epmoe_w4a8_mlp_args *m, int device);
EPMOE_HIDDEN size_t epmoe__mlp_layout(int64_t E, int64_t M, int64_t H, int64_t I, size_t *gate_up, size_t *inter,
                                      size_t *inter_scales, size_t *gemm);

/* Expert GEMM and MLP of the bf16 / fp8-block / int4 formats (experts.c): argument checks and
** the MLP workspace layout: byte offsets of gate_up (bf16 [E, M, 2I]), inter (bf16 [E, M, I], or
** fp8 [E, M, I] for FP8_BLOCK) and inter_scales (FP8_BLOCK: f32 row-major [E, M, I/128]; else
** size 0), each 256-byte aligned; returns the total size. */
EPMOE_HIDDEN epmoe_status epmoe__check_expert_weights(const char *fn, const char *what, const epmoe_expert_weights *w,
                                                      int device);
EPMOE_HIDDEN epmoe_status epmoe__check_expert_gemm(const char *fn, const epmoe_expert_gemm_args *g, int device);
EPMOE_HIDDEN epmoe_status epmoe__check_expert_mlp(const char *fn, const epmoe_expert_mlp_args *m, int device);
EPMOE_HIDDEN size_t epmoe__expert_mlp_layout(int format, int64_t E, int64_t M, int64_t H, int64_t I, size_t *gate_up,
                                             size_t *inter, size_t *inter_scales);

/* epmoe_cast_group_fp8_cuda over E slabs of Ms rows, skipping rows >= masked_m[e] of slab e (the
** layer's cast after a BF16-wire receive; row-major scale formats only; cast_group.cu, CPU
** builds: UNSUPPORTED). */
EPMOE_HIDDEN epmoe_status epmoe__cast_group_fp8_masked_cuda(const uint16_t *x, const int32_t *masked_m, int64_t E,
                                                            int64_t Ms, int64_t K, uint8_t *q, void *scales,
                                                            epmoe_scale_fmt fmt, int round_scale, epmoe_stream_t stream);

/* Zeroed device memory on the current device, and its release (device.cu; CPU builds: UNSUPPORTED). */
EPMOE_HIDDEN epmoe_status epmoe__dev_alloc(const char *fn, size_t bytes, void **p);
EPMOE_HIDDEN void epmoe__dev_free(void *p);
EPMOE_HIDDEN epmoe_status epmoe__dev_sync(const char *fn);

/* Rows of expert e that an op touches: min(max(masked_m[e], 0), M). */
static inline int64_t epmoe__valid_rows(const int32_t *masked_m, int64_t e, int64_t M) {
    if (!masked_m) return M;
    int64_t r = masked_m[e];
    return r < 0 ? 0 : (r > M ? M : r);
}

#ifdef __cplusplus
}
#endif
#endif /* EPMOE_INTERNAL_H */
