/*
** cuda_none.c — the GPU entry points of a build without CUDA (no nvcc at build time): each
** fails with EPMOE_ERR_UNSUPPORTED after the same argument checks as the real ones.
*/
#include "internal.h"
#include "ep/ep_internal.h"

#if !EPMOE_HAVE_CUDA

static epmoe_status no_cuda(const char *fn) {
    return epmoe__fail(EPMOE_ERR_UNSUPPORTED, "%s: this libepmoe was built without CUDA (rebuild with nvcc on PATH)", fn);
}

int epmoe_cuda_device_count(void) { return 0; }

epmoe_status epmoe_cast_group_fp8_cuda(const uint16_t *x, int64_t M, int64_t K, uint8_t *q, void *scales,
                                       epmoe_scale_fmt fmt, int round_scale, epmoe_stream_t stream) {
    (void)stream;
    EPMOE_CHECK(epmoe__check_cast_group(__func__, x, M, K, q, scales, fmt, round_scale, 1));
    return no_cuda(__func__);
}

epmoe_status epmoe_cast_tensor_fp8_cuda(const uint16_t *x, int64_t n, const float *scale, uint8_t *q,
                                        epmoe_stream_t stream) {
    (void)stream;
    EPMOE_CHECK(epmoe__check_cast_tensor(__func__, x, n, scale, q, 1));
    return no_cuda(__func__);
}

epmoe_status epmoe__cast_group_fp8_masked_cuda(const uint16_t *x, const int32_t *masked_m, int64_t E, int64_t Ms,
                                               int64_t K, uint8_t *q, void *scales, epmoe_scale_fmt fmt,
                                               int round_scale, epmoe_stream_t stream) {
    (void)masked_m, (void)stream;
    EPMOE_CHECK(epmoe__check_cast_group(__func__, x, E * Ms, K, q, scales, fmt, round_scale, 1));
    return no_cuda(__func__);
}

epmoe_status epmoe_requant_fp8_cuda(const uint8_t *q, const void *scales, epmoe_scale_fmt fmt, const int32_t *masked_m,
                                    int64_t E, int64_t M, int64_t K, const float *out_scale, uint8_t *y,
                                    epmoe_stream_t stream) {
    (void)stream;
    EPMOE_CHECK(epmoe__check_rescale(__func__, 1, q, scales, fmt, masked_m, E, M, K, out_scale, EPMOE_FP8_E4M3, y, 1));
    return no_cuda(__func__);
}

epmoe_status epmoe_dequant_fp8_cuda(const uint8_t *q, const void *scales, epmoe_scale_fmt fmt, const int32_t *masked_m,
                                    int64_t E, int64_t M, int64_t K, epmoe_dtype out_dtype, void *y,
                                    epmoe_stream_t stream) {
    (void)stream;
    EPMOE_CHECK(epmoe__check_rescale(__func__, 0, q, scales, fmt, masked_m, E, M, K, NULL, out_dtype, y, 1));
    return no_cuda(__func__);
}

size_t epmoe_w4a8_gemm_workspace(void) { return 0; }

epmoe_status epmoe__dev_alloc(const char *fn, size_t bytes, void **p) {
    (void)bytes;
    *p = NULL;
    return no_cuda(fn);
}

void epmoe__dev_free(void *p) { (void)p; }

epmoe_status epmoe__dev_sync(const char *fn) { return no_cuda(fn); }

epmoe_status epmoe_w4a8_gemm_cuda(const epmoe_w4a8_gemm_args *args, epmoe_stream_t stream) {
    (void)stream;
    EPMOE_CHECK(epmoe__check_w4a8_gemm(__func__, args, 1));
    return no_cuda(__func__);
}

epmoe_status epmoe_w4a8_mlp_cuda(const epmoe_w4a8_mlp_args *args, epmoe_stream_t stream) {
    (void)stream;
    EPMOE_CHECK(epmoe__check_w4a8_mlp(__func__, args, 1));
    return no_cuda(__func__);
}

epmoe_status epmoe_expert_gemm_cuda(const epmoe_expert_gemm_args *args, epmoe_stream_t stream) {
    (void)stream;
    EPMOE_CHECK(epmoe__check_expert_gemm(__func__, args, 1));
    return no_cuda(__func__);
}

epmoe_status epmoe_expert_mlp_cuda(const epmoe_expert_mlp_args *args, epmoe_stream_t stream) {
    (void)stream;
    EPMOE_CHECK(epmoe__check_expert_mlp(__func__, args, 1));
    return no_cuda(__func__);
}

#endif

#if !EPMOE_HAVE_NCCL
static epmoe_status no_nccl(const char *fn) {
    return epmoe__fail(EPMOE_ERR_UNSUPPORTED, "%s: this libepmoe was built without the NCCL backend", fn);
}

epmoe_status epmoe_ep_create_nccl(struct ncclComm *comm, const epmoe_ep_config *cfg, epmoe_ep **ep) {
    if (!comm || !ep) return epmoe__fail(EPMOE_ERR_NULL_POINTER, "%s: comm and ep must not be NULL", __func__);
    EPMOE_CHECK(epmoe__ep_check_config(__func__, cfg));
    return no_nccl(__func__);
}

epmoe_status epmoe_nccl_unique_id(void *out) {
    if (!out) return epmoe__fail(EPMOE_ERR_NULL_POINTER, "epmoe_nccl_unique_id: out is NULL");
    return no_nccl(__func__);
}

epmoe_status epmoe__ep_create_nccl_rank_wait(const epmoe_ep_config *cfg_in, int rank, int size, const void *unique_id,
                                             int device, int wait_ms, epmoe_ep **ep) {
    static const char fn[] = "epmoe_ep_create_nccl_rank";
    epmoe_ep_config cfg;
    (void)device, (void)wait_ms;
    EPMOE_CHECK(epmoe__ep_rank_args(fn, cfg_in, rank, size, unique_id, ep, &cfg));
    return no_nccl(fn);
}

void epmoe__ep_release_comm(epmoe_ep *ep) { (void)ep; } /* never reached: only NCCL eps own a comm */
#endif
