/*
** cast_tensor.cu — per-tensor FP8 cast: bf16 x[n] -> fp8 q[n] = satfinite(x * (1 / *scale)).
** Spec: epmoe_cast_tensor_fp8_ref. Each thread converts 8 values (16 bytes in, 8 out); the
** last n % 8 values go through the same math one at a time.
*/
#include "common.cuh"

namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) cast_tensor_kernel(const uint4 *__restrict__ x, int64_t n,
                                                              const float *__restrict__ scale, uint2 *__restrict__ q) {
    const float inv = 1.0f / __ldg(scale); /* IEEE division, once, as the ref */
    const int64_t n8 = n / 8;
    const int64_t stride = (int64_t)gridDim.x * kThreads;
    for (int64_t c = (int64_t)blockIdx.x * kThreads + threadIdx.x; c < n8; c += stride) {
        const uint4 v = __ldcs(x + c);
        uint2 out;
        out.x = fp8x2_from_float(__fmul_rn(bf16_lo(v.x), inv), __fmul_rn(bf16_hi(v.x), inv)) |
                (fp8x2_from_float(__fmul_rn(bf16_lo(v.y), inv), __fmul_rn(bf16_hi(v.y), inv)) << 16);
        out.y = fp8x2_from_float(__fmul_rn(bf16_lo(v.z), inv), __fmul_rn(bf16_hi(v.z), inv)) |
                (fp8x2_from_float(__fmul_rn(bf16_lo(v.w), inv), __fmul_rn(bf16_hi(v.w), inv)) << 16);
        __stcs(q + c, out);
    }
    if (blockIdx.x == 0 && threadIdx.x < (unsigned)(n - n8 * 8)) { /* tail: fewer than 8 values */
        const int64_t i = n8 * 8 + threadIdx.x;
        const uint16_t *xs = reinterpret_cast<const uint16_t *>(x);
        reinterpret_cast<uint8_t *>(q)[i] = (uint8_t)fp8x2_from_float(__fmul_rn(fmt_bf16_to_float(xs[i]), inv), 0.0f);
    }
}

} // namespace

extern "C" epmoe_status epmoe_cast_tensor_fp8_cuda(const uint16_t *x, int64_t n, const float *scale, uint8_t *q,
                                                   epmoe_stream_t stream) {
    static const char fn[] = "epmoe_cast_tensor_fp8_cuda";
    EPMOE_CHECK(epmoe__check_cast_tensor(fn, x, n, scale, q, 1));
    if (n == 0) return EPMOE_OK;
    int sms;
    EPMOE_CHECK(epmoe__need_device(fn, &sms));
    const int64_t want = (n / 8 + kThreads - 1) / kThreads, cap = (int64_t)sms * 16;
    const unsigned blocks = (unsigned)(want < 1 ? 1 : want < cap ? want : cap);
    cast_tensor_kernel<<<blocks, kThreads, 0, stream>>>(reinterpret_cast<const uint4 *>(x), n, scale,
                                                        reinterpret_cast<uint2 *>(q));
    return epmoe__launched(fn);
}
