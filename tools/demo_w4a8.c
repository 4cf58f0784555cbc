/*
** demo_w4a8.c — the expert-MLP part of `epmoe demo`: DeepSeek-R1 expert shapes (H 7168, I 2048),
** int4 weights quantized like a W4AFP8 checkpoint (amax/7 per 128 channels) and repacked, fp8
** activations with 1x128 scales as dispatch delivers them, W4A8 MLP on the GPU (timed) or the CPU
** reference. The printed error is the GPU's against the fp64 reference on the first rows.
*/
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "epmoe.h"
#include "tool_util.h"
#if EPMOE_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

int demo_w4a8(int use_gpu);

static uint64_t rng = 0x2545F4914F6CDD1Dull;

/* A weight matrix [E, N, K] quantized the way W4AFP8 checkpoints are, then repacked. */
static int make_weights(int64_t E, int64_t N, int64_t K, epmoe_w4a8_weights *w) {
    const int64_t G = K / 128;
    int8_t *ck = malloc((size_t)(E * N * K / 2));
    float *cs = malloc((size_t)(E * N * G) * 4);
    size_t qb, sb;
    epmoe_w4a8_repack_size(E, N, K, &qb, &sb);
    void *q = malloc(qb);
    uint16_t *s = malloc(sb); /* bf16 */
    if (!ck || !cs || !q || !s) return 1;
    tool_quantize_w4(&rng, E * N, K, ck, cs);
    int enc = EPMOE_W4_AUTO;
    const epmoe_status st = epmoe_w4a8_repack(ck, cs, EPMOE_F32, 128, E, N, K, q, s, &enc);
    free(ck), free(cs);
    if (st != EPMOE_OK) return fprintf(stderr, "epmoe demo: repack: %s\n", epmoe_last_error()), 1;
    const epmoe_w4a8_weights out = {E, N, K, enc, q, s};
    *w = out;
    return 0;
}

int demo_w4a8(int use_gpu) {
    const int64_t H = 7168, I = 2048, E = use_gpu ? 8 : 1, M = 32, CHECK_ROWS = 2;
    epmoe_w4a8_weights w13, w2;
    if (make_weights(E, 2 * I, H, &w13) || make_weights(E, H, I, &w2)) return 1;
    uint16_t *x = malloc((size_t)(E * M * H) * 2);
    uint8_t *a = malloc((size_t)(E * M * H));
    const size_t slab = epmoe_scale_bytes(EPMOE_SCALE_F32_MMAJOR, M, H);
    uint8_t *sa = malloc(slab * (size_t)E);
    for (int64_t i = 0; i < E * M * H; i++) x[i] = epmoe_bf16_from_float((float)tool_nrand(&rng));
    for (int64_t e = 0; e < E; e++)
        epmoe_cast_group_fp8_ref(x + e * M * H, M, H, a + e * M * H, sa + slab * (size_t)e, EPMOE_SCALE_F32_MMAJOR, 0);
    /* the reference on the first rows of expert 0 (fp64 over the dequantized operands) */
    int32_t *masked_ref = calloc((size_t)E, 4), *masked = malloc((size_t)E * 4);
    masked_ref[0] = (int32_t)CHECK_ROWS;
    for (int64_t e = 0; e < E; e++) masked[e] = (int32_t)M;
    const size_t wsb = epmoe_w4a8_mlp_workspace(E, M, H, I);
    void *ws = aligned_alloc(256, (wsb + 255) / 256 * 256);
    uint16_t *ref = malloc((size_t)(E * M * H) * 2);
    epmoe_w4a8_mlp_args m = {w13, w2, a, M, masked_ref, sa, EPMOE_SCALE_F32_MMAJOR, NULL, NULL, ws, wsb, ref, H, M * H, M};
    double t0 = tool_wall_us();
    if (epmoe_w4a8_mlp_ref(&m) != EPMOE_OK) return fprintf(stderr, "epmoe demo: %s\n", epmoe_last_error()), 1;
    const double ref_us = tool_wall_us() - t0;
    const double wmb = (double)E * (double)(2 * I * H + H * I) * (0.5 + 2.0 / 128) / 1e6; /* int4 + bf16 scales */
    if (!use_gpu) { /* the kernel needs a GPU: the reference alone, on the rows it can do quickly */
        printf("epmoe demo: W4A8 expert MLP, DeepSeek-R1 shapes (H %lld, I %lld), 1x128 activation scales: the CPU "
               "reference on %lld rows of 1 expert (%.1f MB of int4 weights): %.0f ms\n",
               (long long)H, (long long)I, (long long)CHECK_ROWS, wmb, ref_us / 1e3);
        return 0;
    }
    printf("epmoe demo: W4A8 expert MLP, DeepSeek-R1 shapes (H %lld, I %lld), %lld experts x %lld rows, 1x128 "
           "activation scales, %.1f MB of int4 weights\n",
           (long long)H, (long long)I, (long long)E, (long long)M, wmb);
#if EPMOE_HAVE_CUDA
    const double wbytes = wmb * 1e6;
    uint16_t *got = malloc((size_t)(E * M * H) * 2);
    void *d13q, *d2q, *dws, *da, *dsa, *dout;
    uint16_t *d13s, *d2s;
    int32_t *dm, *dmr;
    size_t q13, s13, q2, s2;
    epmoe_w4a8_repack_size(E, 2 * I, H, &q13, &s13);
    epmoe_w4a8_repack_size(E, H, I, &q2, &s2);
    const size_t dwsb = epmoe_w4a8_mlp_workspace(E, M, H, I);
    if (cudaMalloc(&d13q, q13) || cudaMalloc((void **)&d13s, s13) || cudaMalloc(&d2q, q2) || cudaMalloc((void **)&d2s, s2) ||
        cudaMalloc(&dws, dwsb) || cudaMalloc(&da, (size_t)(E * M * H)) || cudaMalloc(&dsa, slab * E) ||
        cudaMalloc(&dout, (size_t)(E * M * H) * 2) || cudaMalloc((void **)&dm, E * 4) || cudaMalloc((void **)&dmr, E * 4))
        return fprintf(stderr, "epmoe demo: cudaMalloc failed\n"), 1;
    cudaMemcpy(d13q, w13.qweight, q13, cudaMemcpyHostToDevice);
    cudaMemcpy(d13s, w13.scales, s13, cudaMemcpyHostToDevice);
    cudaMemcpy(d2q, w2.qweight, q2, cudaMemcpyHostToDevice);
    cudaMemcpy(d2s, w2.scales, s2, cudaMemcpyHostToDevice);
    cudaMemcpy(da, a, (size_t)(E * M * H), cudaMemcpyHostToDevice);
    cudaMemcpy(dsa, sa, slab * E, cudaMemcpyHostToDevice);
    cudaMemcpy(dm, masked, E * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(dmr, masked_ref, E * 4, cudaMemcpyHostToDevice);
    cudaMemset(dws, 0, dwsb);
    epmoe_w4a8_mlp_args d = {{E, 2 * I, H, w13.encoding, d13q, d13s}, {E, H, I, w2.encoding, d2q, d2s}, da, M, dm, dsa,
                             EPMOE_SCALE_F32_MMAJOR, NULL, NULL, dws, dwsb, dout, H, M * H, M};
    cudaEvent_t ev0, ev1;
    cudaEventCreate(&ev0), cudaEventCreate(&ev1);
    float best = 1e30f;
    for (int it = 0; it < 20; it++) {
        cudaEventRecord(ev0, 0);
        if (epmoe_w4a8_mlp_cuda(&d, 0) != EPMOE_OK) return fprintf(stderr, "epmoe demo: %s\n", epmoe_last_error()), 1;
        cudaEventRecord(ev1, 0);
        cudaEventSynchronize(ev1);
        float ms;
        cudaEventElapsedTime(&ms, ev0, ev1);
        if (it >= 3 && ms < best) best = ms;
    }
    d.masked_m = dmr; /* the rows the reference computed */
    if (epmoe_w4a8_mlp_cuda(&d, 0) != EPMOE_OK || cudaDeviceSynchronize() != cudaSuccess)
        return fprintf(stderr, "epmoe demo: %s\n", epmoe_last_error()), 1;
    cudaMemcpy(got, dout, (size_t)(CHECK_ROWS * H) * 2, cudaMemcpyDeviceToHost);
    double num = 0, den = 0;
    for (int64_t i = 0; i < CHECK_ROWS * H; i++) {
        const double g = epmoe_bf16_to_float(got[i]), r = epmoe_bf16_to_float(ref[i]);
        num += (g - r) * (g - r), den += r * r;
    }
    printf("  GPU: %.1f us (best of 17) = %.0f GB/s over the int4 weights; rel. L2 vs the fp64 reference %.2e "
           "(%lld rows)\n",
           best * 1e3, wbytes / (best * 1e-3) / 1e9, sqrt(num / (den > 0 ? den : 1)), (long long)CHECK_ROWS);
    cudaFree(d13q), cudaFree(d13s), cudaFree(d2q), cudaFree(d2s), cudaFree(dws), cudaFree(da), cudaFree(dsa);
    cudaFree(dout), cudaFree(dm), cudaFree(dmr);
#endif
    return 0;
}
