/*
** cast_group.cu — per-token-group FP8 cast (DeepEP's LL cast): bf16 [M, K] -> fp8 [M, K]
** + one scale per 128 channels, in any epmoe_scale_fmt. Spec: epmoe_cast_group_fp8_ref.
**
** A half-warp owns a group: each lane loads 16 bytes (8 bf16), the 16 lanes reduce the amax
** with shuffles, and lane 0 of the half-warp stores the scale. Memory-bound: 3 bytes per element.
** The masked form (the layer's cast after a BF16-wire receive) sees M rows as E slabs of Ms rows
** and skips the rows past masked_m of their slab: at decode most received rows are padding.
*/
#include "common.cuh"

namespace {

constexpr int kThreads = 256;

template <int kFmt, bool kRound>
__global__ void __launch_bounds__(kThreads) cast_group_kernel(const uint4 *__restrict__ x, int64_t M, int64_t G,
                                                             uint2 *__restrict__ q, uint8_t *__restrict__ scales,
                                                             const int32_t *__restrict__ masked_m, int64_t Ms) {
    const int64_t n_chunks = M * G * 16; /* 16 chunks of 8 values per group */
    const int lane = threadIdx.x & 31;
    const unsigned half_mask = 0xFFFFu << (lane & 16);
    /* kThreads and the stride are multiples of 16, so a half-warp always iterates together. */
    for (int64_t c = (int64_t)blockIdx.x * kThreads + threadIdx.x; c < n_chunks; c += (int64_t)gridDim.x * kThreads) {
        if (masked_m) { /* uniform in a half-warp: its 16 chunks are one group of one row */
            const int64_t row = c / (G * 16), e = row / Ms;
            if (row - e * Ms >= __ldg(masked_m + e)) continue;
        }
        float scale_inv;
        const uint2 out = cast_chunk8(__ldcs(x + c), kRound, half_mask, &scale_inv);
        __stcs(q + c, out);
        if ((lane & 15) == 0) {
            const int64_t gi = c >> 4, t = gi / G, g = gi - t * G;
            uint8_t *p = scales + fmt_scale_offset(kFmt, M, G, t, g);
            if (fmt_scale_is_ue8m0(kFmt)) {
                p[0] = fmt_ue8m0_from_float(scale_inv);
                if (g == G - 1) /* zero the padding bytes of the last word */
                    for (int64_t pad = G; pad % 4; pad++) scales[fmt_scale_offset(kFmt, M, G, t, pad)] = 0;
            } else {
                *reinterpret_cast<float *>(p) = scale_inv;
            }
        }
    }
}

template <int kFmt, bool kRound>
void launch(const uint16_t *x, int64_t M, int64_t G, uint8_t *q, void *scales, const int32_t *masked_m, int64_t Ms,
            int sms, cudaStream_t stream) {
    const int64_t n_chunks = M * G * 16;
    const int64_t want = (n_chunks + kThreads - 1) / kThreads, cap = (int64_t)sms * 16;
    const unsigned blocks = (unsigned)(want < cap ? want : cap);
    cast_group_kernel<kFmt, kRound><<<blocks, kThreads, 0, stream>>>(reinterpret_cast<const uint4 *>(x), M, G,
                                                                     reinterpret_cast<uint2 *>(q),
                                                                     static_cast<uint8_t *>(scales), masked_m, Ms);
}

epmoe_status cast(const char *fn, const uint16_t *x, int64_t M, int64_t K, uint8_t *q, void *scales, epmoe_scale_fmt fmt,
                  int round_scale, const int32_t *masked_m, int64_t Ms, cudaStream_t stream) {
    if (M == 0) return EPMOE_OK;
    int sms;
    EPMOE_CHECK(epmoe__need_device(fn, &sms));
    const int64_t G = K / FMT_GROUP;
    /* The one place the variant is chosen. UE8M0 implies round_scale (checked above). */
    switch (fmt) {
    case EPMOE_SCALE_F32_ROW:
        round_scale ? launch<0, true>(x, M, G, q, scales, masked_m, Ms, sms, stream)
                    : launch<0, false>(x, M, G, q, scales, masked_m, Ms, sms, stream);
        break;
    case EPMOE_SCALE_F32_MMAJOR:
        round_scale ? launch<1, true>(x, M, G, q, scales, masked_m, Ms, sms, stream)
                    : launch<1, false>(x, M, G, q, scales, masked_m, Ms, sms, stream);
        break;
    case EPMOE_SCALE_UE8M0_ROW: launch<2, true>(x, M, G, q, scales, masked_m, Ms, sms, stream); break;
    case EPMOE_SCALE_UE8M0_MMAJOR: launch<3, true>(x, M, G, q, scales, masked_m, Ms, sms, stream); break;
    }
    return epmoe__launched(fn);
}

} // namespace

extern "C" epmoe_status epmoe_cast_group_fp8_cuda(const uint16_t *x, int64_t M, int64_t K, uint8_t *q, void *scales,
                                                  epmoe_scale_fmt fmt, int round_scale, epmoe_stream_t stream) {
    static const char fn[] = "epmoe_cast_group_fp8_cuda";
    EPMOE_CHECK(epmoe__check_cast_group(fn, x, M, K, q, scales, fmt, round_scale, 1));
    return cast(fn, x, M, K, q, scales, fmt, round_scale, NULL, 1, reinterpret_cast<cudaStream_t>(stream));
}

/* The layer's cast after a BF16-wire receive: rows past masked_m[e] of each Ms-row slab skipped. */
epmoe_status epmoe__cast_group_fp8_masked_cuda(const uint16_t *x, const int32_t *masked_m, int64_t E,
                                                         int64_t Ms, int64_t K, uint8_t *q, void *scales,
                                                         epmoe_scale_fmt fmt, int round_scale, epmoe_stream_t stream) {
    static const char fn[] = "epmoe_layer_forward (cast after receive)";
    EPMOE_CHECK(epmoe__check_cast_group(fn, x, E * Ms, K, q, scales, fmt, round_scale, 1));
    if (!masked_m) return epmoe__fail(EPMOE_ERR_NULL_POINTER, "%s: masked_m is NULL", fn);
    /* one [E * Ms, K] matrix: row-major scales are E slabs already, M-major ones would not be */
    if (fmt != EPMOE_SCALE_F32_ROW && fmt != EPMOE_SCALE_UE8M0_ROW)
        return epmoe__fail(EPMOE_ERR_UNSUPPORTED, "%s: scale format %d: only the row-major formats", fn, (int)fmt);
    return cast(fn, x, E * Ms, K, q, scales, fmt, round_scale, masked_m, Ms, reinterpret_cast<cudaStream_t>(stream));
}
