/*
** epmoe — the command-line face of the library.
**   epmoe demo [--tokens N] [--cpu]   the main jobs on the best backend available (GPU if present):
**       DeepSeek-R1's EP receive batch through the FP8 cast and SGLang's per-tensor requant; the
**       W4A8 expert MLP (demo_w4a8.c); one dispatch + combine over FP8 and BF16 wire (demo_ep.c)
**   epmoe check / epmoe bench         the MoE layer of any scheme: error against fp64, and timings
**                                     (cli_layer.c)
**   epmoe version
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

int demo_ep(int use_gpu);   /* demo_ep.c */
int demo_w4a8(int use_gpu); /* demo_w4a8.c */
int cmd_check(int argc, char **argv); /* cli_layer.c */
int cmd_bench(int argc, char **argv);
int cli_layer_gpus(int force_cpu);    /* the layer's backend: GPUs over NCCL (count) or 0, the CPU */

static int usage(FILE *f) {
    fprintf(f, "usage: epmoe <command> [options]\n"
               "  demo [--tokens N] [--cpu]  what `make demo` runs, on the GPUs if present (else, or with --cpu, the\n"
               "                             CPU backend): quantize a DeepSeek-R1 EP receive batch (N rows, default\n"
               "                             1024), the W4A8 MLP, dispatch + combine, then the MoE layer stage by\n"
               "                             stage on FP8 vs BF16 wire (DeepSeek-R1 on GPUs; the tiny model on CPU)\n"
               "  check [--model M] [--scheme S] [--group 32|128] [--experts E] [--tokens N] [--wire fp8|bf16|both]\n"
               "        [--cpu] [--json F]\n"
               "                             the MoE layer's error against an fp64 model of the dequantized\n"
               "                             weights (4 experts a rank unless --experts), on gaussian and outlier\n"
               "                             tokens: w4afp8 FP8 vs BF16 wire x 1x128 vs per-tensor activation\n"
               "                             scales; w8a8_fp8_block FP8 vs BF16 wire (1x128 scales); bf16 and\n"
               "                             w4a16 their BF16 wire\n"
               "  bench [--model M] [--scheme S] [--group 32|128] [--experts E] [--tokens N] [--wire fp8|bf16|both]\n"
               "        [--iters N] [--cpu] [--json F]\n"
               "                             the layer and each stage alone (dispatch, expert MLP, combine):\n"
               "                             median us, GB/s, TFLOP/s on the node's GPUs (else the CPU backend:\n"
               "                             median us only; default there --model tiny --tokens 16 --iters 3)\n"
               "  version                    print the library version\n"
               "  --json F writes the results to the file F as JSON.\n"
               "  M: deepseek-r1 (default on GPUs), kimi-k2, tiny (H 512, I 256, 16 experts, top-4: quick on a\n"
               "  CPU; the default on the CPU backend);\n"
               "  S: w4afp8 (default), w8a8_fp8_block, bf16, w4a16 (int4 group --group, default 32; BF16 wire\n"
               "  only, as bf16)\n");
    return f == stdout ? 0 : 2;
}


#define FAIL_IF(st)                                                                                                    \
    do {                                                                                                               \
        epmoe_status s_ = (st);                                                                                        \
        if (s_ != EPMOE_OK) {                                                                                          \
            fprintf(stderr, "epmoe: %s: %s\n", epmoe_status_str(s_), epmoe_last_error());                           \
            return 1;                                                                                                  \
        }                                                                                                              \
    } while (0)

/* NMSE of a dequantized tensor against the bf16 input, in float64. */
static double nmse(const uint16_t *x, const float *y, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double v = epmoe_bf16_to_float(x[i]), d = y[i] - v;
        num += d * d, den += v * v;
    }
    return num / den;
}

typedef struct {
    double cast_us, requant_us;
    const char *backend;
} demo_times;

#if EPMOE_HAVE_CUDA
#define CU(call)                                                                                                       \
    do {                                                                                                               \
        cudaError_t e_ = (call);                                                                                       \
        if (e_ != cudaSuccess) {                                                                                       \
            fprintf(stderr, "epmoe: CUDA: %s (%s)\n", cudaGetErrorString(e_), #call);                                 \
            return 1;                                                                                                  \
        }                                                                                                              \
    } while (0)

/* The same two ops on the GPU, timed with CUDA events (median of 50 after 10 warm-ups); the
** GPU results replace the CPU ones so the error printed is that of the GPU output. */
static int demo_gpu(const uint16_t *x, int64_t M, int64_t K, uint8_t *q, float *s, uint8_t *y, const float *out_scale,
                    demo_times *t) {
    const size_t n = (size_t)(M * K), sb = epmoe_scale_bytes(EPMOE_SCALE_F32_ROW, M, K);
    void *dx, *dq, *ds, *dy, *dsc, *dm;
    int32_t masked = (int32_t)M;
    CU(cudaMalloc(&dx, n * 2));
    CU(cudaMalloc(&dq, n));
    CU(cudaMalloc(&dy, n));
    CU(cudaMalloc(&ds, sb));
    CU(cudaMalloc(&dsc, 4));
    CU(cudaMalloc(&dm, 4));
    CU(cudaMemcpy(dx, x, n * 2, cudaMemcpyHostToDevice));
    CU(cudaMemcpy(dsc, out_scale, 4, cudaMemcpyHostToDevice));
    CU(cudaMemcpy(dm, &masked, 4, cudaMemcpyHostToDevice));
    cudaEvent_t a, b;
    CU(cudaEventCreate(&a));
    CU(cudaEventCreate(&b));
    double ts[2][50];
    for (int it = 0; it < 60; it++) {
        float ms;
        CU(cudaEventRecord(a, 0));
        FAIL_IF(epmoe_cast_group_fp8_cuda(dx, M, K, dq, ds, EPMOE_SCALE_F32_ROW, 0, NULL));
        CU(cudaEventRecord(b, 0));
        CU(cudaEventSynchronize(b));
        CU(cudaEventElapsedTime(&ms, a, b));
        if (it >= 10) ts[0][it - 10] = ms * 1e3;
        CU(cudaEventRecord(a, 0));
        FAIL_IF(epmoe_requant_fp8_cuda(dq, ds, EPMOE_SCALE_F32_ROW, dm, 1, M, K, dsc, dy, NULL));
        CU(cudaEventRecord(b, 0));
        CU(cudaEventSynchronize(b));
        CU(cudaEventElapsedTime(&ms, a, b));
        if (it >= 10) ts[1][it - 10] = ms * 1e3;
    }
    qsort(ts[0], 50, sizeof(double), tool_cmp_double);
    qsort(ts[1], 50, sizeof(double), tool_cmp_double);
    t->cast_us = ts[0][25], t->requant_us = ts[1][25];
    CU(cudaMemcpy(q, dq, n, cudaMemcpyDeviceToHost));
    CU(cudaMemcpy(s, ds, sb, cudaMemcpyDeviceToHost));
    CU(cudaMemcpy(y, dy, n, cudaMemcpyDeviceToHost));
    struct cudaDeviceProp prop;
    static char name[300];
    CU(cudaGetDeviceProperties(&prop, 0));
    snprintf(name, sizeof name, "CUDA (%s)", prop.name);
    t->backend = name;
    cudaFree(dx), cudaFree(dq), cudaFree(dy), cudaFree(ds), cudaFree(dsc), cudaFree(dm);
    cudaEventDestroy(a), cudaEventDestroy(b);
    return 0;
}
#endif

static int demo(int argc, char **argv) {
    int64_t M = 1024, K = 7168;
    int force_cpu = 0;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--cpu")) force_cpu = 1;
        else if (!strcmp(argv[i], "--tokens") && i + 1 < argc) {
            char *end;
            M = strtoll(argv[++i], &end, 10);
            if (*end || M < 1 || M > 1 << 20) {
                fprintf(stderr, "epmoe demo: --tokens takes an integer in [1, 1048576], got '%s'\n", argv[i]);
                return 2;
            }
        } else {
            fprintf(stderr, "epmoe demo: unknown option '%s'\n", argv[i]);
            return usage(stderr);
        }
    }
    const size_t n = (size_t)(M * K);
    uint16_t *x = malloc(n * 2);
    uint8_t *q = malloc(n), *y = malloc(n);
    float *s = malloc((size_t)(M * K / 128) * 4), *deq = malloc(n * 4);
    if (!x || !q || !y || !s || !deq) {
        fprintf(stderr, "epmoe demo: out of memory\n");
        return 1;
    }
    /* Activations with per-token spread and a few outlier channels, as in real hidden states. */
    uint64_t r = 0x9E3779B97F4A7C15ull;
    for (int64_t t = 0; t < M; t++) {
        double tok = 0.5 + (double)(t % 7);
        for (int64_t k = 0; k < K; k++) {
            double u = 0;
            for (int j = 0; j < 4; j++) { /* Irwin-Hall: close enough to gaussian */
                r ^= r << 13, r ^= r >> 7, r ^= r << 17;
                u += (double)(r >> 11) / 9007199254740992.0;
            }
            x[t * K + k] = epmoe_bf16_from_float((float)((u - 2.0) * 1.7 * tok * (k % 1000 == 7 ? 50.0 : 1.0)));
        }
    }
    /* Per-tensor scale: the batch amax / 448, what a static checkpoint scale approximates at best. */
    float amax = 0;
    for (size_t i = 0; i < n; i++) amax = fmaxf(amax, fabsf(epmoe_bf16_to_float(x[i])));
    const float out_scale = amax / 448.0f;
    int32_t masked = (int32_t)M;
    demo_times t = {0, 0, "CPU (scalar reference)"};
    double t0 = tool_wall_us();
    FAIL_IF(epmoe_cast_group_fp8_ref(x, M, K, q, s, EPMOE_SCALE_F32_ROW, 0));
    double t1 = tool_wall_us();
    FAIL_IF(epmoe_requant_fp8_ref(q, s, EPMOE_SCALE_F32_ROW, &masked, 1, M, K, &out_scale, y));
    t.cast_us = t1 - t0, t.requant_us = tool_wall_us() - t1;
#if EPMOE_HAVE_CUDA
    if (!force_cpu && epmoe_cuda_device_count() > 0 && demo_gpu(x, M, K, q, s, y, &out_scale, &t)) return 1;
#else
#endif
    FAIL_IF(epmoe_dequant_fp8_ref(q, s, EPMOE_SCALE_F32_ROW, NULL, 1, M, K, EPMOE_F32, deq));
    const double e_group = nmse(x, deq, n);
    for (size_t i = 0; i < n; i++) deq[i] = epmoe_fp8_e4m3_to_float(y[i]) * out_scale;
    const double e_tensor = nmse(x, deq, n);
    const double in_mb = (double)n * 2 / 1e6, out_mb = (double)n / 1e6 + (double)(M * K / 128) * 4 / 1e6;
    printf("epmoe %s demo: DeepSeek-R1 EP receive batch, %lld rows x H %lld, backend %s\n", epmoe_version_string(),
           (long long)M, (long long)K, t.backend);
    if (strncmp(t.backend, "CPU", 3) == 0) /* what runs where, and why */
        printf("  (the CPU backend: %s)\n", force_cpu ? "--cpu" : !EPMOE_HAVE_CUDA ? "a build without CUDA (CUDA=0 or no nvcc)"
                                                                              : "no usable CUDA GPU found");
    printf("  %-36s %9s %9s %10s %12s\n", "step", "MB in", "MB out", "time us", "NMSE vs x");
    printf("  %-36s %9.2f %9.2f %10.1f %12.3e\n", "cast bf16 -> fp8 + 1x128 scales", in_mb, out_mb, t.cast_us, e_group);
    printf("  %-36s %9.2f %9.2f %10.1f %12.3e\n", "requant 1x128 -> per-tensor (#22316)", out_mb, (double)n / 1e6,
           t.requant_us, e_tensor);
    printf("  FP8 wire: %.2f of the bf16 bytes; the per-tensor requant multiplies the error by %.1f\n", out_mb / in_mb,
           e_tensor / e_group);
    free(x), free(q), free(y), free(s), free(deq);
    const int gpu = !force_cpu && EPMOE_HAVE_CUDA && epmoe_cuda_device_count() > 0;
    if (demo_w4a8(gpu)) return 1;
    /* EP on the GPUs needs GPUs and the NCCL backend: the layer commands' decision (cli_layer.c);
    ** demo_ep runs the CPU backend otherwise */
    int ep_gpu = cli_layer_gpus(force_cpu) > 0;
    if (demo_ep(ep_gpu) != 0) {
        if (force_cpu) return 1;
        fprintf(stderr, "epmoe demo: the GPU EP backend is not usable here; running EP on the CPU backend instead\n");
        if (demo_ep(0)) return 1;
        ep_gpu = 0;
    }
    /* the whole layer, stage by stage, FP8 vs BF16 wire: `epmoe bench` with its defaults for the
    ** backend (GPUs: DeepSeek-R1, 128 tokens per rank; the CPU backend: the tiny model, whose
    ** scalar references run in seconds), with fewer iterations on GPUs */
    char *gpu_args[] = {"--iters", "20"};
    char *cpu_args[] = {"--cpu"};
    printf("\n");
    fflush(stdout);
    return ep_gpu ? cmd_bench(2, gpu_args) : cmd_bench(1, cpu_args);
}

int main(int argc, char **argv) {
    if (argc < 2) return usage(stderr);
    for (int i = 2; i < argc; i++) /* `epmoe check --help`: the one usage text covers every command */
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) return usage(stdout);
    if (!strcmp(argv[1], "demo")) return demo(argc - 2, argv + 2);
    if (!strcmp(argv[1], "check")) return cmd_check(argc - 2, argv + 2);
    if (!strcmp(argv[1], "bench")) return cmd_bench(argc - 2, argv + 2);
    if (!strcmp(argv[1], "version")) {
        printf("epmoe %s (CUDA devices: %d)\n", epmoe_version_string(), epmoe_cuda_device_count());
        return 0;
    }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) return usage(stdout);
    fprintf(stderr, "epmoe: unknown command '%s'\n", argv[1]);
    return usage(stderr);
}
