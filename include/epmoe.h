/*
** epmoe.h — the one public header of epmoe, a C library for the expert-parallel
** Mixture-of-Experts layer (FP8 dispatch, W4A8 expert MLP, combine) on Hopper GPUs.
**
** Plain C11 (compiles with -std=c11 -pedantic and as C++). Every fallible call returns
** an epmoe_status; epmoe_last_error() gives the detailed message of the calling thread's
** last failure. GPU entry points (suffix _cuda) take a CUDA stream, never synchronize and
** never allocate; CPU references (suffix _ref) are scalar, the specification and the
** test oracle of the matching kernel, and produce the same bytes.
*/
#ifndef EPMOE_H
#define EPMOE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- version: the single source of truth (the Makefile parses these lines) ---------- */
#define EPMOE_VERSION_MAJOR 0
#define EPMOE_VERSION_MINOR 4
#define EPMOE_VERSION_PATCH 0
#define EPMOE_VERSION_CODE (EPMOE_VERSION_MAJOR * 10000 + EPMOE_VERSION_MINOR * 100 + EPMOE_VERSION_PATCH)

#if defined(_WIN32)
#define EPMOE_API
#else
#define EPMOE_API __attribute__((visibility("default")))
#endif

/* Same type as cudaStream_t (the runtime declares `typedef struct CUstream_st *cudaStream_t`),
** so callers pass their stream directly while this header needs no CUDA headers. NULL is the
** legacy default stream. */
struct CUstream_st;
typedef struct CUstream_st *epmoe_stream_t;

/* ---- status ---------------------------------------------------------------------------- */
typedef enum epmoe_status {
    EPMOE_OK = 0,
    EPMOE_ERR_INVALID_ARG = 1,  /* a shape, count or option is out of its documented range */
    EPMOE_ERR_NULL_POINTER = 2, /* a required pointer is NULL */
    EPMOE_ERR_MISALIGNED = 3,   /* a pointer lacks the documented alignment */
    EPMOE_ERR_UNSUPPORTED = 4,  /* not available in this build or on this device */
    EPMOE_ERR_OUT_OF_MEMORY = 5,
    EPMOE_ERR_CUDA = 6,         /* a CUDA runtime call failed; see epmoe_last_error() */
    EPMOE_ERR_NCCL = 7,         /* an NCCL call failed; see epmoe_last_error() */
    EPMOE_ERR_TIMEOUT = 8,      /* a peer did not answer in time */
    EPMOE_ERR_INTERNAL = 9      /* a bug in epmoe: please report it with the message */
} epmoe_status;

/* A fixed string naming the status, with a hint. Never NULL. */
EPMOE_API const char *epmoe_status_str(epmoe_status s);
/* The detailed message of the calling thread's last failed call ("" if none). */
EPMOE_API const char *epmoe_last_error(void);
/* EPMOE_VERSION_CODE of the library actually loaded. */
EPMOE_API int epmoe_version(void);
EPMOE_API const char *epmoe_version_string(void);
/* Number of CUDA devices usable by this build (0 without CUDA or without a GPU). */
EPMOE_API int epmoe_cuda_device_count(void);

/* ---- formats ----------------------------------------------------------------------------
** FP8 e4m3fn (OCP): bias 7, max ±448, no infinities, NaN = 0x7F/0xFF. Encoding rounds to
** nearest even and saturates: finite |x| ≥ 448 and ±inf give ±448, NaN gives 0x7F. This is
** what `cvt.rn.satfinite.e4m3x2.f32` does on Hopper, and the GPU kernels use that instruction.
** bf16: round to nearest even; NaN stays NaN (quiet, sign and top payload bits kept; the wgmma
** GEMMs' bf16 outputs round in hardware, where a NaN's sign and payload are not kept). */
#define EPMOE_FP8_E4M3_MAX 448.0f
#define EPMOE_GROUP 128 /* channels per activation scale group (DeepSeek's 1x128) */

EPMOE_API uint8_t epmoe_fp8_e4m3_from_float(float x);
EPMOE_API float epmoe_fp8_e4m3_to_float(uint8_t v);
EPMOE_API uint16_t epmoe_bf16_from_float(float x);
EPMOE_API float epmoe_bf16_to_float(uint16_t v);
/* Row conversions (CPU): n elements each; x and y must hold n elements (they return no status, so
** like memcpy they do not check their pointers). */
EPMOE_API void epmoe_fp8_e4m3_from_float_row(const float *x, uint8_t *y, size_t n);
EPMOE_API void epmoe_fp8_e4m3_to_float_row(const uint8_t *x, float *y, size_t n);
EPMOE_API void epmoe_bf16_from_float_row(const float *x, uint16_t *y, size_t n);
EPMOE_API void epmoe_bf16_to_float_row(const uint16_t *x, float *y, size_t n);

/* UE8M0: an unsigned 8-bit power-of-two scale 2^(b-127); 0xFF is NaN. Encoding takes the
** exponent field of a float that is a power of two (what DeepEP stores). */
EPMOE_API uint8_t epmoe_ue8m0_from_float(float pow2_scale);
EPMOE_API float epmoe_ue8m0_to_float(uint8_t b);

/* int4 as shipped by W4AFP8 checkpoints: int8 [.., K/2], signed two's-complement nibbles,
** element 2j in the low nibble of byte j and element 2j+1 in the high nibble.
** pack: n values in [-8, 7] (n even) -> n/2 bytes; unpack: n/2 bytes -> n values. The two buffers
** must not overlap (EPMOE_ERR_INVALID_ARG), except pack in place (packed == vals): byte j is written
** after values 2j and 2j + 1 are read. */
EPMOE_API epmoe_status epmoe_int4_pack(const int8_t *vals, int64_t n, uint8_t *packed);
EPMOE_API epmoe_status epmoe_int4_unpack(const uint8_t *packed, int64_t n, int8_t *vals);

/* Where the per-128-group activation scales of an [M, K] FP8 tensor live (G = K/128 groups).
**   F32_ROW    float [M, G]: (t, g) at t*G + g
**   F32_MMAJOR float [G, M]: (t, g) at t + g*M   (DeepEP's "column-major for TMA" layout)
**   UE8M0_ROW    bytes [M, P*4], P = ceil(G/4): (t, g) at byte t*P*4 + g
**   UE8M0_MMAJOR int32 words [P, M], 4 groups per word: (t, g) at byte (g/4)*M*4 + t*4 + g%4
** UE8M0 padding bytes (groups G..P*4-1) are written as 0. For a batch [E, M, K] each of the E
** slabs holds one such block, contiguous, of epmoe_scale_bytes(fmt, M, K) bytes. */
typedef enum epmoe_scale_fmt {
    EPMOE_SCALE_F32_ROW = 0,
    EPMOE_SCALE_F32_MMAJOR = 1,
    EPMOE_SCALE_UE8M0_ROW = 2,
    EPMOE_SCALE_UE8M0_MMAJOR = 3
} epmoe_scale_fmt;

/* Bytes of one [M, K] slab's scales in `fmt`; 0 for an invalid fmt, M < 0, K % 128 != 0 or M * K
** past 2^46 (the quantization ops' bound). */
EPMOE_API size_t epmoe_scale_bytes(epmoe_scale_fmt fmt, int64_t M, int64_t K);
/* Byte offset of scale (t, g) inside one slab (the one layout function of scale buffers); SIZE_MAX
** where epmoe_scale_bytes is 0, or for t outside [0, M) or g outside [0, K/128) (UE8M0: up to its
** padding, 4 * ceil(K/512)). */
EPMOE_API size_t epmoe_scale_offset(epmoe_scale_fmt fmt, int64_t M, int64_t K, int64_t t, int64_t g);

/* ---- quantization ops -------------------------------------------------------------------
** Shapes are given as sizes; tensors are dense row-major unless a scale layout says otherwise.
** bf16 tensors are uint16_t bit patterns, fp8 tensors uint8_t. Device pointers for _cuda,
** host pointers for _ref. Alignment (_cuda): bf16/fp8 data 16 bytes, f32 scales 4, UE8M0 4; on the
** host the references require the alignment of each pointer's element type (4 for int32 and f32)
** (EPMOE_ERR_MISALIGNED otherwise, as on the GPU).
** M = 0 (or E = 0) is valid and does nothing; pointers may then be NULL.
**
** Non-finite inputs (documented, identical on CPU and GPU): NaN elements are ignored by the
** group amax and encode as NaN; an infinite element makes its group's scale +inf (UE8M0 0xFF),
** so the group's finite elements encode as 0 and the infinite ones as NaN — the whole group
** dequantizes to NaN. Per-tensor scales are read where they live (on the GPU for _cuda) and
** are not validated: a zero scale sends every nonzero value to ±448 and 0 to NaN, on both. */

/* Per-token-group cast (DeepEP's LL cast): bf16 x[M, K] -> fp8 q[M, K] + scales.
** Per group of 128 channels: amax = max(|x|, 1e-4); scale_inv = amax * (1/448) is stored;
** q = satfinite(x * (448 / amax)). With round_scale (required for UE8M0 formats), scale_inv is
** rounded up to a power of two 2^ceil(log2(amax/448)) and q = satfinite(x * 2^-e). */
EPMOE_API epmoe_status epmoe_cast_group_fp8_ref(const uint16_t *x, int64_t M, int64_t K, uint8_t *q,
                                                void *scales, epmoe_scale_fmt fmt, int round_scale);
EPMOE_API epmoe_status epmoe_cast_group_fp8_cuda(const uint16_t *x, int64_t M, int64_t K, uint8_t *q,
                                                 void *scales, epmoe_scale_fmt fmt, int round_scale,
                                                 epmoe_stream_t stream);

/* Per-tensor cast: bf16 x[n] -> fp8 q[n] = satfinite(x * (1 / *scale)), the reciprocal taken
** once in fp32. `scale` points to one float (device memory for _cuda: a static checkpoint
** input scale, readable inside a CUDA graph). */
EPMOE_API epmoe_status epmoe_cast_tensor_fp8_ref(const uint16_t *x, int64_t n, const float *scale, uint8_t *q);
EPMOE_API epmoe_status epmoe_cast_tensor_fp8_cuda(const uint16_t *x, int64_t n, const float *scale, uint8_t *q,
                                                  epmoe_stream_t stream);

/* Group -> per-tensor requant (the op of SGLang PR #22316): for each expert e < E and row
** t < min(masked_m[e], M): y[e, t, k] = satfinite((fp8(q[e, t, k]) * s[e](t, k/128)) * (1 / *out_scale)).
** q, y: [E, M, K] fp8; scales: E slabs in `fmt`; masked_m: int32 [E] (device memory for
** _cuda, read on the GPU, no host sync; negative counts as 0, above M as M). Rows at or past
** masked_m[e] are never written. y may not alias q. The _cuda kernel takes E <= 8192, E * M < 2^31
** and K < 2^31 (EPMOE_ERR_UNSUPPORTED beyond; the reference has only the 2^46 bound). */
EPMOE_API epmoe_status epmoe_requant_fp8_ref(const uint8_t *q, const void *scales, epmoe_scale_fmt fmt,
                                             const int32_t *masked_m, int64_t E, int64_t M, int64_t K,
                                             const float *out_scale, uint8_t *y);
EPMOE_API epmoe_status epmoe_requant_fp8_cuda(const uint8_t *q, const void *scales, epmoe_scale_fmt fmt,
                                              const int32_t *masked_m, int64_t E, int64_t M, int64_t K,
                                              const float *out_scale, uint8_t *y, epmoe_stream_t stream);

/* Dequant: y[e, t, k] = fp8(q[e, t, k]) * s[e](t, k/128), in fp32, stored as fp32 or bf16.
** Same shapes, masking and GPU limits as requant; masked_m may be NULL (every row). */
typedef enum epmoe_dtype { EPMOE_F32 = 0, EPMOE_BF16 = 1, EPMOE_FP8_E4M3 = 2 } epmoe_dtype;
EPMOE_API epmoe_status epmoe_dequant_fp8_ref(const uint8_t *q, const void *scales, epmoe_scale_fmt fmt,
                                             const int32_t *masked_m, int64_t E, int64_t M, int64_t K,
                                             epmoe_dtype out_dtype, void *y);
EPMOE_API epmoe_status epmoe_dequant_fp8_cuda(const uint8_t *q, const void *scales, epmoe_scale_fmt fmt,
                                              const int32_t *masked_m, int64_t E, int64_t M, int64_t K,
                                              epmoe_dtype out_dtype, void *y, epmoe_stream_t stream);


/* ---- W4A8 expert GEMM and MLP: int4 weights x fp8 activations -> bf16 (Hopper, sm_90a) -----
** Weights arrive in the W4AFP8 checkpoint layout (int8 [E, N, K/2] of signed int4, even k in the
** low nibble; scales [E, N, K/128], fp32 or bf16, group 128) and are repacked once, on the host,
** into the layout the kernel reads: every thread's tensor-core fragment contiguous, each weight a
** sign-magnitude nibble that becomes an exact fp8 e4m3 value in 3 integer ops per 8 weights.
** The repack picks the encoding: SYM7 when no weight is -8 (checkpoints quantized with amax/7),
** FULL (two more ops per 8 weights, all of -8..7) otherwise. Scales become bf16 [E, K/128, N] and
** carry a factor 512 (the kernel's weight bytes are v * 2^-9): build them with the repack. */
typedef enum epmoe_w4_encoding {
    EPMOE_W4_AUTO = -1, /* repack input only: SYM7 if possible, else FULL */
    EPMOE_W4_SYM7 = 0,  /* int4 in -7..7 */
    EPMOE_W4_FULL = 1   /* int4 in -8..7 */
} epmoe_w4_encoding;

/* One repacked weight matrix [E, N, K]: N and K multiples of 128. Pointers on the device for
** _cuda, on the host for _ref. */
typedef struct epmoe_w4a8_weights {
    int64_t E, N, K;
    int encoding;          /* EPMOE_W4_SYM7 or EPMOE_W4_FULL, as returned by the repack (trusted: the
                              other one of the two gives wrong results, not an error) */
    const void *qweight;   /* epmoe_w4a8_repack_size() qweight_bytes, 16-byte aligned (_cuda: so is every
                              alignment asked of these weights and args below; the references ask
                              only each pointer's element alignment, and 16 bytes of a workspace) */
    const uint16_t *scales; /* bf16 bits [E, K/128, N] = bf16(checkpoint scale * 512), round to nearest
                               even, 16-byte aligned. Exact for bf16 checkpoints (512 is a power of two);
                               an fp32 one moves by at most 2^-8 relative (bf16's unit roundoff; output
                               NMSE ~3e-6, against ~7e-4 from the fp8 activations), the cast to bf16
                               SGLang and TRT-LLM make at load */
} epmoe_w4a8_weights;

EPMOE_API epmoe_status epmoe_w4a8_repack_size(int64_t E, int64_t N, int64_t K, size_t *qweight_bytes,
                                              size_t *scale_bytes);
/* Host to host. ckpt_w int8 [E, N, K/2]; ckpt_scales [E, N, K/group] of scale_dtype (EPMOE_F32 or
** EPMOE_BF16); group must be 128 (another positive group: EPMOE_ERR_UNSUPPORTED). *encoding: in,
** EPMOE_W4_AUTO or the encoding wanted (SYM7 with a -8 present is an error); out, the encoding
** used. scales gets bf16(ckpt scale * 512), rounded to nearest even: bit-exact from bf16 scales,
** within 2^-8 relative from fp32 ones.
** Non-finite or negative scales are rejected, and so are those too large for the bf16 (scale * 512
** rounding to inf: scale >= (2 - 2^-8) * 2^118, about 6.6e35). */
EPMOE_API epmoe_status epmoe_w4a8_repack(const int8_t *ckpt_w, const void *ckpt_scales, epmoe_dtype scale_dtype,
                                         int64_t group, int64_t E, int64_t N, int64_t K, void *qweight,
                                         uint16_t *scales, int *encoding);
/* The checkpoint values back from a repacked matrix (tests, tools): int4 w[e, n, k] and its
** scale s[e, n, k/128] as repacked, bf16(s * 512) / 512 (the checkpoint's own for bf16 scales). */
EPMOE_API epmoe_status epmoe_w4a8_unpack(const epmoe_w4a8_weights *w, int64_t e, int64_t n, int64_t k, int *value,
                                         float *scale);

/* Masked grouped GEMM: for every expert e and row m < masked_m[e] (read on the device: no host
** sync, capturable in a CUDA graph; experts with no rows cost almost nothing),
**   out[e, m, n] = sum_g sa(e, m, g) * sw[e, n, g] * sum_{k in group g} fp8(a[e, m, k]) * w[e, n, k]
** Activation scales, one of:
**   (a) a_scales != NULL: per-token 1x128 group scales, E slabs of a_scale_fmt (what dispatch
**       delivers; no requant pass); each group's fp32 partial sum is scaled, then accumulated;
**   (b) a_scales == NULL: one per-tensor scale, *a_tensor_scale (fp32 on the device).
** Rows m >= masked_m[e] of out are not written.
** Non-finite inputs are not checked; they propagate as IEEE arithmetic does, alike on CPU and GPU:
** an fp8 NaN code (0x7F, 0xFF) in a row, a UE8M0 scale of 0xFF or a NaN/Inf activation scale make
** that token's outputs NaN or +-Inf (those of every weight row). Weight scales are checked finite at
** repack. */
typedef struct epmoe_w4a8_gemm_args {
    epmoe_w4a8_weights w;
    const uint8_t *a;            /* fp8 [E, M, K], 16-byte aligned; the GPU reads whole token tiles
                                    of it, rows past masked_m included (all E * M * K bytes must be
                                    readable; their values never reach the output) */
    int64_t M;                   /* rows per expert slab (M_max), >= 0 (0: nothing to do) */
    const int32_t *masked_m;     /* [E]: rows computed per expert (clamped to [0, M]) */
    const void *a_scales;        /* mode (a) */
    epmoe_scale_fmt a_scale_fmt; /* mode (a) */
    const float *a_tensor_scale; /* mode (b) */
    uint16_t *out;               /* bf16: (e, m, n) at out[e * out_expert_stride + m * out_row_stride + n] */
    int64_t out_row_stride;      /* elements, >= N */
    int64_t out_expert_stride;   /* elements, >= (M - 1) * out_row_stride + N (experts must not overlap) */
    int64_t expected_m;          /* hint: typical rows per expert (0: derive from M); picks the tile.
                                    Results are deterministic for a given hint and device; another
                                    tile (or SM count) may round the last bit differently */
    void *workspace;             /* _cuda: epmoe_w4a8_gemm_workspace() bytes on the same device, 256-byte
                                 ** aligned, zeroed once after allocation (it keeps a launch counter and
                                 ** flags between calls; nothing else may write it). One GEMM at a time per
                                 ** workspace: GEMMs that may overlap on the GPU (other streams, parallel
                                 ** graph branches) need their own, or they can hang or mix results. */
    size_t workspace_bytes;
} epmoe_w4a8_gemm_args;
/* Workspace of the GPU GEMM on the current device (stream-K partial tiles); 0 without CUDA. */
EPMOE_API size_t epmoe_w4a8_gemm_workspace(void);
/* Limits of every GEMM and MLP entry (EPMOE_ERR_INVALID_ARG beyond them): E <= 4096 experts; M, N and
** K each at most 2^24. An output (and an MLP's workspace) that overlaps the activations, their scales,
** masked_m, the weights (data and scales), the per-tensor scales of mode (b) or (MLP) the workspace
** (resp. the output) is refused too.
** GPU limits (EPMOE_ERR_INVALID_ARG beyond them, the references have none): E <= 2048 experts (each
** CTA keeps 2E + 1 ints in shared memory), E * M < 2^31 activation rows and fewer than 2^31 work
** items (E x token tiles x N / 128). The same hold for epmoe_w4a8_mlp_cuda, and for
** epmoe_expert_gemm_cuda and epmoe_expert_mlp_cuda with FP8_BLOCK or BF16 weights, which also need
** E * N < 2^31 weight rows (their INT4 weights run another kernel, without these limits). */
EPMOE_API epmoe_status epmoe_w4a8_gemm_cuda(const epmoe_w4a8_gemm_args *args, epmoe_stream_t stream);
/* fp64 accumulation over the dequantized operands, rounded once to bf16 (the tests' oracle). Runs
** on up to EPMOE_CPU_THREADS threads (environment; default the online CPUs, at most 64), output rows
** split among them: each element is computed alone, in one order, so the bits do not depend on the
** count. The same holds for epmoe_expert_gemm_ref and the MLP references built on the two. */
EPMOE_API epmoe_status epmoe_w4a8_gemm_ref(const epmoe_w4a8_gemm_args *args);

/* Expert MLP: out = W2 · fp8q(silu(gate) * up), [gate | up] = W13 · a, per expert, masked rows.
** w13: N = 2I (rows [0, I) gate, [I, 2I) up), K = H; w2: N = H, K = I. GEMM1 writes bf16 into the
** workspace; silu(gate)·up is computed in fp32, rounded to bf16 and quantized to fp8 — in mode (a) with fresh
** per-token 1x128 group scales (epmoe_cast_group_fp8 rules), in mode (b) with the static
** per-tensor scale *a2_tensor_scale (epmoe_cast_tensor_fp8 rules); GEMM2 writes out. */
typedef struct epmoe_w4a8_mlp_args {
    epmoe_w4a8_weights w13, w2;
    const uint8_t *a;             /* as in epmoe_w4a8_gemm_args: all of [E, M, H] readable */
    int64_t M;
    const int32_t *masked_m;
    const void *a_scales;         /* mode (a) */
    epmoe_scale_fmt a_scale_fmt;  /* mode (a) */
    const float *a_tensor_scale;  /* mode (b): GEMM1 input scale */
    const float *a2_tensor_scale; /* mode (b): GEMM2 input scale */
    void *workspace;              /* epmoe_w4a8_mlp_workspace() bytes, 256-byte aligned, zeroed once; it holds
                                     the GEMMs' workspace: one MLP at a time per workspace (see above) */
    size_t workspace_bytes;
    uint16_t *out;
    int64_t out_row_stride, out_expert_stride;
    int64_t expected_m;
} epmoe_w4a8_mlp_args;
/* 0 for negative or out-of-range sizes, or H or I not a multiple of 128. */
EPMOE_API size_t epmoe_w4a8_mlp_workspace(int64_t E, int64_t M, int64_t H, int64_t I);
EPMOE_API epmoe_status epmoe_w4a8_mlp_cuda(const epmoe_w4a8_mlp_args *args, epmoe_stream_t stream);
EPMOE_API epmoe_status epmoe_w4a8_mlp_ref(const epmoe_w4a8_mlp_args *args);

/* ---- expert GEMM and MLP of the bf16, w8a8-fp8-block and w4a16 schemes (Hopper, sm_90a) ----
** Weights are read in their checkpoint layout, as they are (no repack):
**   BF16       data bf16 [E, N, K]; no scales
**   FP8_BLOCK  data fp8 e4m3 [E, N, K]; scales fp32 [E, N/128, K/128], one per 128x128 block
**              (DeepSeek's weight_scale_inv); activations fp8 with 1x128 scales
**   INT4       data int8 [E, N, K/2]: signed int4, even k in the low nibble (the format of
**              epmoe_int4_pack); scales fp32 [E, N, K/group], group 32 or 128; symmetric
**              (no zero points: Kimi-K2's and compressed-tensors' pack-quantized int4)
** BF16 and INT4 weights take bf16 activations; FP8_BLOCK takes fp8 activations with per-token
** 1x128 group scales in any epmoe_scale_fmt (what dispatch delivers). N and K: positive
** multiples of 128. Pointers on the device for _cuda, on the host for _ref; data 16-byte
** aligned, scales 4-byte aligned (_cuda; the references ask each pointer's element alignment only,
** and 16 bytes of a workspace). */
typedef enum epmoe_weight_format {
    EPMOE_WEIGHT_BF16 = 0,
    EPMOE_WEIGHT_FP8_BLOCK = 1,
    EPMOE_WEIGHT_INT4 = 2
} epmoe_weight_format;

typedef struct epmoe_expert_weights {
    epmoe_weight_format format;
    int64_t E, N, K;
    int64_t group;        /* INT4: 32 or 128 (along K); ignored otherwise */
    const void *data;
    const float *scales;  /* FP8_BLOCK and INT4; NULL for BF16 */
} epmoe_expert_weights;

/* Masked grouped GEMM: for every expert e and row m < masked_m[e] (read on the device: no host
** sync, capturable in a CUDA graph; experts with no rows cost almost nothing),
**   BF16       out[e, m, n] = sum_k a[e, m, k] * w[e, n, k]
**   FP8_BLOCK  out[e, m, n] = sum_g sa(e, m, g) * sw[e, n/128, g] * sum_{k in g} a[e, m, k] * w[e, n, k]
**   INT4       out[e, m, n] = sum_g sw[e, n, g] * sum_{k in g} a[e, m, k] * w[e, n, k]
** The GPU accumulates each group's partial sum in fp32 and scales it before adding it up; the
** reference accumulates in fp64; both round once to bf16. FP8_BLOCK runs on Hopper's fp8 wgmma
** (as DeepGEMM does): its tensor-core sum over a group keeps ~14 bits of alignment (DeepSeek-V3
** §3.3) before the fp32 promotion, so its error is that of the W4A8 GEMM, not of an fp32 sum.
** Rows m >= masked_m[e] of out are not written. */
typedef struct epmoe_expert_gemm_args {
    epmoe_expert_weights w;
    const void *a;               /* [E, M, K]: bf16 (BF16, INT4 weights) or fp8 (FP8_BLOCK), 16-byte aligned */
    int64_t M;                   /* rows per expert slab (M_max), >= 0 (0: nothing to do) */
    const int32_t *masked_m;     /* [E]: rows computed per expert (clamped to [0, M]) */
    const void *a_scales;        /* FP8_BLOCK: E slabs of a_scale_fmt; else NULL */
    epmoe_scale_fmt a_scale_fmt;
    uint16_t *out;               /* bf16: (e, m, n) at out[e * out_expert_stride + m * out_row_stride + n];
                                    16-byte aligned for _cuda */
    int64_t out_row_stride;      /* elements, >= N, a multiple of 8 */
    int64_t out_expert_stride;   /* elements, >= (M - 1) * out_row_stride + N, a multiple of 8 */
    int64_t expected_m;          /* hint: typical rows per expert (0: M); picks the token tile, and for
                                    BF16 the kernel (mma.sync to 32, wgmma beyond): as in
                                    epmoe_w4a8_gemm_args, another tile may round the last bit
                                    differently, within the same bound */
} epmoe_expert_gemm_args;
EPMOE_API epmoe_status epmoe_expert_gemm_cuda(const epmoe_expert_gemm_args *args, epmoe_stream_t stream);
/* As epmoe_w4a8_gemm_ref: fp64 over the dequantized operands, on up to EPMOE_CPU_THREADS threads. */
EPMOE_API epmoe_status epmoe_expert_gemm_ref(const epmoe_expert_gemm_args *args);

/* Expert MLP: out = W2 · act(silu(gate) * up), [gate | up] = W13 · a, per expert, masked rows.
** w13: N = 2I (rows [0, I) gate, [I, 2I) up), K = H; w2: N = H, K = I; both of one format.
** GEMM1 writes bf16 into the workspace; silu(gate)·up is computed in fp32 and rounded to bf16
** (the rules of epmoe_w4a8_mlp); FP8_BLOCK then casts it to fp8 with fresh 1x128 group scales
** (epmoe_cast_group_fp8 rules, F32_ROW, no rounding of scales), BF16 and INT4 keep it in bf16;
** GEMM2 writes out. */
typedef struct epmoe_expert_mlp_args {
    epmoe_expert_weights w13, w2;
    const void *a;                /* as epmoe_expert_gemm_args.a, K = H */
    int64_t M;
    const int32_t *masked_m;
    const void *a_scales;         /* FP8_BLOCK */
    epmoe_scale_fmt a_scale_fmt;  /* FP8_BLOCK */
    void *workspace;              /* epmoe_expert_mlp_workspace() bytes, 256-byte aligned */
    size_t workspace_bytes;
    uint16_t *out;
    int64_t out_row_stride, out_expert_stride;
    int64_t expected_m;           /* as in epmoe_expert_gemm_args */
} epmoe_expert_mlp_args;
EPMOE_API size_t epmoe_expert_mlp_workspace(epmoe_weight_format format, int64_t E, int64_t M, int64_t H, int64_t I);
EPMOE_API epmoe_status epmoe_expert_mlp_cuda(const epmoe_expert_mlp_args *args, epmoe_stream_t stream);
EPMOE_API epmoe_status epmoe_expert_mlp_ref(const epmoe_expert_mlp_args *args);

/* ---- expert-parallel dispatch and combine ------------------------------------------------
** One epmoe_ep per rank. Experts are split evenly: rank r owns experts [r*L, (r+1)*L), L = E/R.
**
** dispatch: every rank sends its tokens x[T, H] (bf16) to the ranks owning their top-k experts.
** Each rank receives, per local expert le, rows [0, masked_m[le]) of recv_x[le, R*N, H] in a
** fixed order — by source rank, then token index, then top-k position — so the result is
** deterministic (DeepEP's order depends on atomics). FP8 wire: the sender casts each token once
** (epmoe_cast_group_fp8 rules), the receiver gets fp8 rows plus per-128-group scales in
** `scale_fmt` (one slab of M = R*N rows per local expert), or, with a per-tensor requant scale
** set, fp8 rows at that scale and no group scales. BF16 wire: rows are the bf16 input, bit-exact.
** Rows past masked_m[le] are not written. A token that names one expert in several top-k slots
** reaches it once (so an expert never receives more than R*N rows); each of those slots gets
** that expert's output row at combine.
**
** combine: each rank gets back out[t] = sum over valid top-k slots j of w[t, j] * y(t, j), where
** y(t, j) is the expert output row that dispatch delivered for (t, j); fp32 accumulation, bf16
** out; tokens with no valid slot get zeros. Two modes (epmoe_combine_mode):
**   REDUCE_AT_OWNER   every expert row travels back; the owner sums in top-k order (bit-exact
**                     against a sequential fp32 sum; weights are given to combine).
**   REDUCE_AT_EXPERT  each expert rank sums its share of a token first (weights given to
**                     dispatch) and sends one bf16 row per (token, rank): up to k/R' times fewer
**                     bytes, one extra bf16 rounding per share (bounded in the tests).
** dedup = 1 (default) sends each token once per destination rank and fans it out to its local
** experts on the receiver; dedup = 0 sends one message per (token, expert), as DeepEP does.
**
** Ordering: calls are collective, in the same order on every rank, on one stream per ep; receives
** follow dispatch order. Each dispatch returns a handle; combine takes it. GPU calls may be
** captured in a CUDA graph: call numbers are counted on the device, so every replay is a new
** dispatch/combine (capture whole dispatch + combine pairs). The two most recent dispatches may be live at once (micro-batch
** overlap); an older handle is rejected. Send and receive halves may be issued separately.
** A peer that does not answer within timeout_ms gives EPMOE_ERR_TIMEOUT; the ep is then
** failed until it is destroyed: every later call fails fast with that status (EPMOE_ERR_NCCL or
** _CUDA when the transport failed the group instead). Ranks can be masked out (failed
** ranks): their experts count as -1 and nothing is sent to or awaited from them. */
typedef struct epmoe_ep epmoe_ep;
typedef struct epmoe_cpu_world epmoe_cpu_world;
struct ncclComm; /* same type as ncclComm_t */

typedef enum epmoe_wire { EPMOE_WIRE_BF16 = 0, EPMOE_WIRE_FP8 = 1 } epmoe_wire;
typedef enum epmoe_combine_mode { EPMOE_COMBINE_REDUCE_AT_OWNER = 0, EPMOE_COMBINE_REDUCE_AT_EXPERT = 1 } epmoe_combine_mode;
typedef enum epmoe_backend {
    EPMOE_BACKEND_CPU = 0,      /* ranks are threads of one process; host memory */
    EPMOE_BACKEND_NCCL_LSA = 1, /* NCCL device API, NVLink load/store within a node */
    EPMOE_BACKEND_NCCL_A2A = 2, /* fallback: padded NCCL send/recv of fixed-size slabs */
    EPMOE_BACKEND_NCCL_GIN_EMULATED = 3, /* the put/signal protocol of GIN, emulated over NVLink */
    EPMOE_BACKEND_NCCL_GIN = 4           /* NCCL device API, GPU-initiated puts and signals over the NIC */
} epmoe_backend;

/* How an NCCL ep moves bytes (chosen at creation; every rank ends up on the same one):
**   AUTO      the device API when every rank can use it, else the padded all-to-all. Under AUTO
**             the environment variable EPMOE_EP_TRANSPORT = auto | device | alltoall |
**             gin-emulated | gin decides.
**   DEVICE    the device API only (EPMOE_BACKEND_NCCL_LSA); EPMOE_ERR_UNSUPPORTED where it is
**             unavailable (libnccl not the version epmoe was built with, no symmetric memory,
**             ranks on several nodes).
**   ALLTOALL  the fallback (EPMOE_BACKEND_NCCL_A2A): the send half packs the same messages as the
**             device API into one fixed-size slab per destination, counts in the slab's header,
**             and exchanges the slabs with grouped ncclSend/ncclRecv on the caller's stream; the
**             receive half unpacks them. Same results byte for byte (the same kernels pack and
**             unpack), no host synchronization, any NCCL 2.7+ runtime. It moves the padded slabs,
**             so it is slower. Differences: NCCL's exchange waits for every active peer's send
**             half; a watchdog thread of the ep turns an exchange still pending timeout_ms after
**             the stream reached it into EPMOE_ERR_TIMEOUT (from epmoe_ep_poll and every later
**             call of the ep) and, when the ep owns its
**             communicator (the launch helpers), aborts it, which releases the stream; a caller's
**             communicator is left to the caller to abort (NCCL's kernels wait until then);
**             exchanges inside a captured graph are not watched. A captured CUDA graph (NCCL
**             captures send/recv) replays with the buffers and the active set it was captured
**             with, so replay whole dispatch + combine pairs while no other dispatch is live. */
typedef enum epmoe_transport {
    EPMOE_TRANSPORT_AUTO = 0,
    EPMOE_TRANSPORT_DEVICE = 1,
    EPMOE_TRANSPORT_ALLTOALL = 2,
    /* GIN_EMULATED (EPMOE_BACKEND_NCCL_GIN_EMULATED; env value gin-emulated): the protocol of
    ** the GIN (multi-node) transport on one node: every message, count block and combine row
    ** is built in an outbox after the window and then put to the place the device API stores
    ** it, then flagged; flags count calls, as GIN's signals do. Same results; it runs GIN's
    ** protocol (not the NIC) on one node and is slower than DEVICE. Never chosen by AUTO. */
    EPMOE_TRANSPORT_GIN_EMULATED = 3,
    /* GIN (EPMOE_BACKEND_NCCL_GIN; env value gin): the same protocol over the NIC with NCCL's
    ** GPU-initiated networking, for ranks on several nodes. Needs an IB/RoCE NIC that NCCL's GIN
    ** supports; EPMOE_ERR_UNSUPPORTED otherwise. Compiled and untested (no NIC on the machines
    ** this library is tested on); not yet chosen by AUTO. */
    EPMOE_TRANSPORT_GIN = 4
} epmoe_transport;

typedef struct epmoe_ep_config {
    size_t size;        /* sizeof(epmoe_ep_config): lets the library check the caller's ABI */
    int num_ranks;      /* R */
    int rank;
    int max_tokens;     /* N: tokens per rank per dispatch, 1..65536; the same on every rank */
    int hidden;         /* H: a positive multiple of 128 up to 65536; R * N * H at most 2^46 */
    int num_experts;    /* E: a multiple of R, at most 32767 */
    int top_k;          /* 1..EPMOE_MAX_TOPK */
    epmoe_wire wire;
    epmoe_scale_fmt scale_fmt; /* FP8 wire: layout of the received group scales */
    int round_scale;    /* FP8 wire: power-of-two scales (required by UE8M0 formats) */
    int dedup;          /* 1: one message per (token, destination rank) */
    epmoe_combine_mode combine_mode; /* REDUCE_AT_EXPERT sums a token's share per rank: needs dedup = 1 */
    int timeout_ms;     /* how long to wait for a peer before EPMOE_ERR_TIMEOUT; at least 1 */
    epmoe_transport transport; /* NCCL eps only (the CPU backend ignores it). A config of the
                                  size before this field existed (offsetof(epmoe_ep_config,
                                  transport)) is still accepted and means AUTO */
} epmoe_ep_config;

#define EPMOE_MAX_TOPK 16
#define EPMOE_EP_CONFIG_INIT                                                                                        \
    {sizeof(epmoe_ep_config), 1, 0, 128, 7168, 256, 8, EPMOE_WIRE_FP8, EPMOE_SCALE_F32_MMAJOR, 0, 1,                 \
     EPMOE_COMBINE_REDUCE_AT_EXPERT, 10000, EPMOE_TRANSPORT_AUTO}

/* Sizes of everything an ep uses, from the config alone (call before creating anything). */
typedef struct epmoe_ep_layout {
    size_t recv_x_bytes;        /* caller's dispatch output: [L, R*N, H] fp8 or bf16 */
    size_t recv_scales_bytes;   /* caller's dispatch output: L slabs of scale_fmt (FP8 wire) */
    size_t masked_m_bytes;      /* [L] int32 */
    size_t src_info_bytes;      /* [L, R*N] int32 (optional output) */
    size_t expert_out_bytes;    /* combine input: [L, R*N, H] bf16 */
    size_t out_bytes;           /* combine output: [N, H] bf16 */
    size_t msg_bytes;           /* one dispatch message: header + payload (+ scales) */
    size_t window_bytes;        /* the library's communication buffer per rank: the symmetric
                                   window (device API, both parities; GIN and GIN_EMULATED: with
                                   the outbox after it), or the fallback's padded send and
                                   receive slabs when the transport resolves to ALLTOALL
                                   (cfg->transport, then EPMOE_EP_TRANSPORT, as at creation) */
    size_t state_bytes;         /* the library's private per-rank state */
} epmoe_ep_layout;
EPMOE_API epmoe_status epmoe_ep_layout_query(const epmoe_ep_config *cfg, epmoe_ep_layout *out);

/* CPU backend: a world of num_ranks (1 to 1024) ranks in this process; each rank's thread then calls
** epmoe_ep_create_cpu with its rank (collective: all ranks must call it). A world holds any number
** of groups, as a communicator does: creating and destroying them is collective, in the same
** order on every rank. Each group's windows stay allocated until the world is freed. Destroying
** the world with groups still open is allowed: it is freed when the last of them is destroyed. */
EPMOE_API epmoe_status epmoe_cpu_world_create(int num_ranks, epmoe_cpu_world **world);
EPMOE_API void epmoe_cpu_world_destroy(epmoe_cpu_world *world);
EPMOE_API epmoe_status epmoe_ep_create_cpu(epmoe_cpu_world *world, const epmoe_ep_config *cfg, epmoe_ep **ep);
/* NCCL backend on the caller's communicator (one GPU per rank; collective); cfg->transport
** picks the device API or the padded all-to-all (epmoe_transport). The ep does not own comm.
** Creation waits for every rank of comm without a bound: a caller's communicator is already up;
** the launch helpers bound their own communicator's creation (epmoe_ep_create_nccl_rank). */
EPMOE_API epmoe_status epmoe_ep_create_nccl(struct ncclComm *comm, const epmoe_ep_config *cfg, epmoe_ep **ep);

/* ---- launching: one process per GPU (or one process driving every GPU, for tests) --------
** The helpers below create the NCCL communicator themselves; the ep owns it, and
** epmoe_ep_destroy destroys it (ncclCommAbort when the group failed). */
#define EPMOE_NCCL_UNIQUE_ID_BYTES 128
/* A fresh NCCL unique id (ncclGetUniqueId; needs no GPU): one rank makes it, all ranks use it. */
EPMOE_API epmoe_status epmoe_nccl_unique_id(void *out);
/* Rank `rank` of `size` on CUDA device `device`, which becomes current on the calling thread:
** ncclCommInitRank with the 128-byte unique id, then epmoe_ep_create_nccl (both collective).
** cfg->rank and cfg->num_ranks are replaced by rank and size. With NCCL 2.18 or later the
** communicator's creation waits at most max(timeout_ms, 120 s) for the other ranks (processes
** start slowly), then gives EPMOE_ERR_TIMEOUT: it runs on a non-blocking communicator, and the
** ep uses a blocking one split off it (NCCL_COMM_BLOCKING=1 in the environment removes the
** bound). The ep's setup after it, which every rank that joined goes on to at once, is not
** bounded; timeout_ms bounds the calls after creation. */
EPMOE_API epmoe_status epmoe_ep_create_nccl_rank(const epmoe_ep_config *cfg, int rank, int size, const void *unique_id,
                                                 int device, epmoe_ep **ep);
/* This process's place in a launch, from the first of these sets that is present: torchrun's
** RANK / WORLD_SIZE / LOCAL_RANK; Open MPI's OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK; MPICH's
** PMI_RANK / PMI_SIZE / MPI_LOCALRANKID. A missing local rank is the rank (one node). None set:
** rank 0 of 1. A rank without its size, a non-number or rank >= size: EPMOE_ERR_INVALID_ARG
** naming the variable. (Not Slurm's variables: a batch script's single process has them too.) */
EPMOE_API epmoe_status epmoe_launch_env(int *rank, int *size, int *local_rank);
/* The ep of this process in a launch (collective): epmoe_launch_env gives rank, size and the
** device (the local rank), then epmoe_ep_create_nccl_rank. The unique id travels through a file,
** since C has no TCP store: rank 0 writes it to $EPMOE_BOOTSTRAP_FILE (atomically; it fails if
** the file exists, e.g. left by a crashed run) and deletes it once the communicator is up; the
** other ranks poll for it (up to max(timeout_ms, 120 s), as long as the communicator's creation
** then waits for them; see epmoe_ep_create_nccl_rank). The path must be visible to every rank
** (a shared filesystem across nodes) and fresh for each job; tools/epmoe-launch sets it. The
** i-th call in a process uses "<path>.<i>" for i > 0, so a job may create several groups.
** Without EPMOE_BOOTSTRAP_FILE, NCCL_COMM_ID=<host>:<port> (NCCL's own rendezvous, the same id
** on every rank) works too; a single rank needs neither. */
EPMOE_API epmoe_status epmoe_ep_create_nccl_env(const epmoe_ep_config *cfg, epmoe_ep **ep);
/* One process driving num_gpus GPUs (tests, single-node tools): eps[i] becomes rank i of
** num_gpus on device devices[i] (devices NULL: device i). Creation runs one thread per GPU; call
** and destroy each ep from its own thread too (a rank's calls may wait for its peers' calls).
** On failure no ep is returned (those created are destroyed). */
EPMOE_API epmoe_status epmoe_ep_create_nccl_local(const epmoe_ep_config *cfg, int num_gpus, const int *devices,
                                                  epmoe_ep **eps);

/* Collective teardown; a failed ep (timeout) tears down without waiting for dead peers. The ep is
** freed either way; EPMOE_ERR_TIMEOUT when the teardown of a group with every rank active found a
** peer missing (it waited timeout_ms), EPMOE_OK otherwise (a masked rank's absence is expected). */
EPMOE_API epmoe_status epmoe_ep_destroy(epmoe_ep *ep);
/* (epmoe_backend)-1 for NULL. */
EPMOE_API epmoe_backend epmoe_ep_backend(const epmoe_ep *ep);
/* Mark ranks inactive (active[r] = 0) from the next dispatch on; must be the same on every live
** rank, and no call may be in flight (the GPU backend copies the set to the device; a send half
** whose receive half has not been called is refused, EPMOE_ERR_INVALID_ARG). Masking is
** final: a masked rank cannot be made active again in this group (EPMOE_ERR_UNSUPPORTED). */
EPMOE_API epmoe_status epmoe_ep_set_active_ranks(epmoe_ep *ep, const int *active);
/* Errors the GPU kernels record without a host sync surface here once the stream has run the
** failing kernel. A peer that timed out (EPMOE_ERR_TIMEOUT) or an error the communicator reports
** (EPMOE_ERR_NCCL) fails the group: every later call reports the same status. An expert id
** outside [-1, E) (EPMOE_ERR_INVALID_ARG, reported here once, with the token) does not: its
** slots went out as -1 and every rank's calls completed, as they must (a call that stopped for
** it would leave the peers waiting). The CPU backend checks ids on the
** host instead: its dispatch rejects them before sending anything. EPMOE_OK otherwise. */
EPMOE_API epmoe_status epmoe_ep_poll(epmoe_ep *ep);

/* Pointers in the dispatch and combine args are aligned to their element (4 bytes for int32 and
** fp32 arrays and scale words, 8 for int64 ids, 2 for bf16 rows); on the GPU backends x, recv_x,
** expert_out and out to 16 bytes and recv_scales to 4 in every layout. EPMOE_ERR_MISALIGNED
** otherwise, before anything is sent. A NaN or Inf in topk_weights (or in a row) is not checked: it
** makes that token's combined row NaN or +-Inf. */
typedef struct epmoe_dispatch_args {
    const uint16_t *x;          /* bf16 [T, H] */
    const void *topk_idx;       /* [T, k] int32 or int64; -1 = no expert */
    int topk_idx_bits;          /* 32 or 64 */
    const float *topk_weights;  /* fp32 [T, k]: required for REDUCE_AT_EXPERT, else may be NULL */
    int num_tokens;             /* T, 0 <= T <= N */
    void *recv_x;               /* out: [L, R*N, H] fp8 or bf16 */
    void *recv_scales;          /* out: FP8 wire with group scales: L slabs of scale_fmt */
    int32_t *masked_m;          /* out: [L] rows received per local expert */
    int32_t *recv_src_info;     /* out, optional: [L, R*N] source rank * N + token index */
    const float *requant_scale; /* optional, FP8 wire: rows come out at this per-tensor scale */
} epmoe_dispatch_args;

typedef enum epmoe_phase { EPMOE_PHASE_BOTH = 3, EPMOE_PHASE_SEND = 1, EPMOE_PHASE_RECV = 2 } epmoe_phase;

/* Dispatch; *handle identifies it for combine. PHASE_SEND then PHASE_RECV (same args) splits it,
** for other work between the halves; with nothing between them, call PHASE_BOTH: its receive then
** starts while its send still runs (device API transport: ~1 us less a dispatch and a combine). */
EPMOE_API epmoe_status epmoe_dispatch(epmoe_ep *ep, const epmoe_dispatch_args *args, epmoe_phase phase,
                                      uint32_t *handle, epmoe_stream_t stream);

typedef struct epmoe_combine_args {
    const uint16_t *expert_out; /* bf16 [L, R*N, H], rows as dispatch delivered them */
    const float *topk_weights;  /* fp32 [T, k] of this rank's tokens: REDUCE_AT_OWNER (else NULL) */
    uint16_t *out;              /* out: bf16 [T, H] */
} epmoe_combine_args;
/* Combine of dispatch `handle` (one of the two most recently received), phases as for dispatch:
** PHASE_BOTH checks both halves' arguments before it sends anything. */
EPMOE_API epmoe_status epmoe_combine(epmoe_ep *ep, uint32_t handle, const epmoe_combine_args *args, epmoe_phase phase,
                                     epmoe_stream_t stream);

/* Single-process reference of dispatch + combine over all ranks (the tests' oracle).
** x[r], topk_idx[r] (int32), weights[r], T[r] per rank r; outputs per rank as in the args. Checked
** as the backends check: 0 <= T[r] <= N, ids in [-1, E) and the arrays of the active ranks present
** (recv_scales on the FP8 wire), else an error before anything is written. */
EPMOE_API epmoe_status epmoe_ep_dispatch_ref(const epmoe_ep_config *cfg, const uint16_t *const *x,
                                             const int32_t *const *topk_idx, const int *num_tokens, const int *active,
                                             void *const *recv_x, void *const *recv_scales, int32_t *const *masked_m,
                                             int32_t *const *recv_src_info);
/* out[r][t] = sum_j w[r][t,j] * expert_out[owner][le][row(r,t,j)] in fp32, top-k order. */
EPMOE_API epmoe_status epmoe_ep_combine_ref(const epmoe_ep_config *cfg, const uint16_t *const *expert_out,
                                            const int32_t *const *topk_idx, const float *const *topk_weights,
                                            const int *num_tokens, const int *active, uint16_t *const *out);

/* ---- the MoE layer: dispatch -> expert MLP -> combine in one call ------------------------
** A layer lives on one EP group (one per rank) and owns its buffers. The scheme decides what the
** experts compute and which dispatch wire they can consume; the group's wire must be one of them
** (there is no process-wide switch: an FP8 layer and a BF16 layer each use their own group):
**   w4afp8  int4 g128 weights x fp8 activations (the W4A8 MLP): FP8 wire with 1x128 scales (the
**           default; per-tensor compat mode requantizes at receive, inside dispatch) or BF16 wire
**           (the layer casts to fp8 + 1x128 scales after receive)
**   w8a8_fp8_block  fp8 128x128 block-scaled weights x fp8 1x128 activations: FP8 wire (default)
**           or BF16 wire (cast after receive)
**   bf16    bf16 weights and activations: BF16 wire only
**   w4a16   int4 g32/g128 weights x bf16 activations: BF16 wire only
** forward: no host synchronization; capturable in a CUDA graph (NCCL device-API groups). */
typedef struct epmoe_layer epmoe_layer;
typedef enum epmoe_scheme {
    EPMOE_SCHEME_BF16 = 0,
    EPMOE_SCHEME_W8A8_FP8_BLOCK = 1,
    EPMOE_SCHEME_W4AFP8 = 2,
    EPMOE_SCHEME_W4A16 = 3
} epmoe_scheme;

typedef struct epmoe_layer_config {
    size_t size;             /* sizeof(epmoe_layer_config) */
    epmoe_scheme scheme;
    int64_t intermediate;    /* I: a positive multiple of 128 */
    int per_tensor_act;      /* w4afp8: 0 = 1x128 activation scales (default), 1 = static per-tensor
                                scales a1/a2 (SGLang's compat path; FP8 wire requantized at receive);
                                the other schemes: 0 */
    int64_t expected_m;      /* rows per local expert the GEMM tiles are chosen for;
                                0 = epmoe_expected_rows(N, R, k, E) */
} epmoe_layer_config;
#define EPMOE_LAYER_CONFIG_INIT {sizeof(epmoe_layer_config), EPMOE_SCHEME_W4AFP8, 2048, 0, 0}

/* The local experts' weights, where the group's memory is (device for NCCL groups, host for the
** CPU backend); the layer keeps the pointers, not copies. */
typedef struct epmoe_layer_weights {
    epmoe_w4a8_weights w13;  /* w4afp8: [L, 2I, H], repacked */
    epmoe_w4a8_weights w2;   /* w4afp8: [L, H, I], repacked */
    const float *a1_scale;   /* w4afp8 with per_tensor_act: fp32 scalars */
    const float *a2_scale;
    epmoe_expert_weights e13; /* bf16 (BF16), w8a8_fp8_block (FP8_BLOCK), w4a16 (INT4): [L, 2I, H] */
    epmoe_expert_weights e2;  /* the same format: [L, H, I] */
} epmoe_layer_weights;

/* The expected_m hint for experts fed by dispatch: the mean rows per expert under uniform routing,
** m = tokens_per_rank * ranks * top_k / experts, plus 2.5 sqrt(m) for the spread (Poisson: at m = 8
** an expert gets more than 16 rows with probability 0.4%); at least 1. A tile of the mean alone
** (m = 8: T = 8) reads the weights of every expert above it twice. A mean past 2^40 rows counts as
** 2^40 (a hint: every tile choice saturates long before); 1 for a non-positive argument. */
EPMOE_API int64_t epmoe_expected_rows(int64_t tokens_per_rank, int ranks, int top_k, int experts);

/* The wire a scheme dispatches by default, and whether it can consume `wire` at all; for a value
** outside epmoe_scheme, (epmoe_wire)-1 and 0. */
EPMOE_API epmoe_wire epmoe_scheme_default_wire(epmoe_scheme scheme);
EPMOE_API int epmoe_scheme_accepts_wire(epmoe_scheme scheme, epmoe_wire wire);
/* Create on a group (not collective; allocates the buffers: epmoe_layer_bytes() reports them).
** NCCL groups: call with the group's device current; the buffers are zeroed and the device
** synchronized before this returns. The layer must outlive every CUDA graph that captured a forward.
** A group whose received rows per expert (R * max_tokens) or whose intermediate size exceed the
** expert MLP's limits (2^24) gets EPMOE_ERR_UNSUPPORTED. */
EPMOE_API epmoe_status epmoe_layer_create(epmoe_ep *ep, const epmoe_layer_config *cfg, const epmoe_layer_weights *w,
                                          epmoe_layer **layer);
EPMOE_API size_t epmoe_layer_bytes(const epmoe_layer *layer);
EPMOE_API void epmoe_layer_destroy(epmoe_layer *layer);
/* out[T, H] bf16 = sum_j topk_weights[t, j] * MLP_{topk_idx[t, j]}(x[t]) over this rank's tokens
** (collective over the group, like dispatch and combine). */
EPMOE_API epmoe_status epmoe_layer_forward(epmoe_layer *layer, const uint16_t *x, const void *topk_idx,
                                           int topk_idx_bits, const float *topk_weights, int num_tokens,
                                           uint16_t *out, epmoe_stream_t stream);
/* The forward in three phases, so other work on the stream overlaps the waits for the peers
** (DeepEP-style: the shared expert between SEND and EXPERTS, the next attention before RECV):
**   EPMOE_LAYER_SEND     dispatch's send half: this rank's tokens leave for the experts' ranks
**   EPMOE_LAYER_EXPERTS  dispatch's receive half, the expert MLP, combine's send half
**   EPMOE_LAYER_RECV     combine's receive half: out is written
** Phases may be OR-ed (EPMOE_LAYER_ALL is epmoe_layer_forward); a forward's phases come in this
** order, each call with the same arguments (x, topk_idx, topk_weights, num_tokens and out are read
** by the phases that use them). *handle is set by SEND and names the forward in its later phases.
** Two forwards may be in flight (micro-batches: SEND of the second before RECV of the first, e.g.
** S0 S1 X0 X1 R0 R1), phases of different forwards in forward order, as epmoe_dispatch and
** epmoe_combine require. Once SEND has succeeded, call the remaining phases: peers wait for them.
** If the expert MLP fails, EXPERTS still sends combine (and RECV, when in the same call, still
** receives), then returns the error: call RECV anyway; the outputs of this rank's experts, in
** every rank's out, are then undefined. */
typedef enum epmoe_layer_phase {
    EPMOE_LAYER_SEND = 1,
    EPMOE_LAYER_EXPERTS = 2,
    EPMOE_LAYER_RECV = 4,
    EPMOE_LAYER_ALL = 7
} epmoe_layer_phase;
EPMOE_API epmoe_status epmoe_layer_forward_phase(epmoe_layer *layer, const uint16_t *x, const void *topk_idx,
                                                 int topk_idx_bits, const float *topk_weights, int num_tokens,
                                                 uint16_t *out, int phases, uint32_t *handle, epmoe_stream_t stream);
/* Single-process reference of the layer over all ranks (host memory): dispatch_ref, the MLP
** reference per local expert, combine in fp32 in top-k order. w[r]: rank r's local experts. Up to
** 64 ranks (EPMOE_ERR_UNSUPPORTED beyond). */
EPMOE_API epmoe_status epmoe_layer_ref(const epmoe_ep_config *ep_cfg, const epmoe_layer_config *cfg,
                                       const epmoe_layer_weights *w, const uint16_t *const *x,
                                       const int32_t *const *topk_idx, const float *const *topk_weights,
                                       const int *num_tokens, uint16_t *const *out);

#ifdef __cplusplus
}
#endif
#endif /* EPMOE_H */
