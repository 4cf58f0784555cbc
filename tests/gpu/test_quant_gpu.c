/*
** test_quant_gpu.c — the CUDA quantization kernels against their CPU references, byte for
** byte: every scale format, round_scale, awkward shapes, masked_m patterns, NaN/Inf inputs,
** the DeepSeek-R1 EP8 decode shapes; outputs are poisoned first and the bytes that must stay
** untouched (rows past masked_m, guard bytes past each buffer) are checked untouched. Inputs are
** fresh random each run (the seed is printed; EPMOE_SEED=n repeats a run). Also: requant in a
** CUDA graph replayed after masked_m changes on the device (no host sync, no re-capture).
** Runs under compute-sanitizer memcheck (EPMOE_TEST_QUICK=1 skips the largest shapes).
*/
#include "cuda_check.h"
#include <time.h>

#include "../test.h"

#define GUARD 256 /* poisoned bytes after every device buffer */
#define POISON 0xAB


static cudaStream_t stream;
static int quick;

static void *dev_poisoned(size_t bytes) {
    void *p;
    CUDA_OK(cudaMalloc(&p, bytes + GUARD));
    CUDA_OK(cudaMemset(p, POISON, bytes + GUARD));
    CUDA_OK(cudaDeviceSynchronize()); /* the kernels run on a non-blocking stream: order the memset first */
    return p;
}

static void *dev_copy(const void *h, size_t bytes) {
    void *p = dev_poisoned(bytes);
    CUDA_OK(cudaMemcpy(p, h, bytes, cudaMemcpyHostToDevice));
    return p;
}

/* Copy bytes+GUARD back; the guard must still be poison; compare the rest with want. */
static long compare_dev(const void *d, const void *want, size_t bytes, const char *what) {
    uint8_t *h = malloc(bytes + GUARD);
    CUDA_OK(cudaMemcpy(h, d, bytes + GUARD, cudaMemcpyDeviceToHost));
    long bad = 0, guard = 0;
    size_t first = SIZE_MAX;
    for (size_t i = 0; i < bytes; i++)
        if (h[i] != ((const uint8_t *)want)[i]) {
            if (!bad) first = i;
            bad++;
        }
    for (size_t i = bytes; i < bytes + GUARD; i++) guard += h[i] != POISON;
    CHECK(bad == 0, "%s: %ld of %zu bytes differ from the reference, first at %zu (gpu 0x%02x ref 0x%02x)", what, bad,
          bytes, first, first < bytes ? h[first] : 0, first < bytes ? ((const uint8_t *)want)[first] : 0);
    CHECK(guard == 0, "%s: %ld guard bytes written past the end", what, guard);
    free(h);
    return bad + guard;
}

/* Same as compare_dev, but fp32/bf16 NaNs compare equal whatever their payload. */
static long compare_dev_float(const void *d, const void *want, size_t n, int bf16, const char *what) {
    size_t w = bf16 ? 2 : 4, bytes = n * w;
    uint8_t *h = malloc(bytes + GUARD);
    CUDA_OK(cudaMemcpy(h, d, bytes + GUARD, cudaMemcpyDeviceToHost));
    long bad = 0, guard = 0;
    for (size_t i = 0; i < n; i++) {
        float a, b;
        if (bf16) {
            uint16_t ua, ub;
            memcpy(&ua, h + i * 2, 2);
            memcpy(&ub, (const uint8_t *)want + i * 2, 2);
            a = epmoe_bf16_to_float(ua), b = epmoe_bf16_to_float(ub);
            bad += !(isnan(a) && isnan(b)) && ua != ub;
        } else {
            memcpy(&a, h + i * 4, 4);
            memcpy(&b, (const uint8_t *)want + i * 4, 4);
            uint32_t ua, ub;
            memcpy(&ua, &a, 4), memcpy(&ub, &b, 4);
            bad += !(isnan(a) && isnan(b)) && ua != ub;
        }
    }
    for (size_t i = bytes; i < bytes + GUARD; i++) guard += h[i] != POISON;
    CHECK(bad == 0 && guard == 0, "%s: %ld values differ, %ld guard bytes written", what, bad, guard);
    free(h);
    return bad + guard;
}

/* Activations with per-token spread, outlier channels and, if asked, NaN/Inf sprinkled in. */
static void fill(test_rng *r, uint16_t *x, int64_t n, int64_t K, int nonfinite) {
    double tok = 1.0;
    for (int64_t i = 0; i < n; i++) {
        if (i % K == 0) tok = exp(2.0 * rng_normal(r));
        double v = rng_normal(r) * tok * (i % 97 == 5 ? 100.0 : 1.0);
        x[i] = epmoe_bf16_from_float((float)v);
        if (nonfinite && rng_u64(r) % 5000 == 0) {
            static const uint16_t specials[] = {0x7FC0, 0xFFC1, 0x7F80, 0xFF80, 0x0001, 0x8000};
            x[i] = specials[rng_u64(r) % 6];
        }
    }
}

static void test_cast_group(test_rng *r) {
    const int64_t Ms[] = {0, 1, 3, 127, 129, 1024}, Ks[] = {128, 384, 640, 7168};
    long cases = 0;
    for (size_t a = 0; a < sizeof Ms / sizeof *Ms; a++)
        for (size_t b = 0; b < sizeof Ks / sizeof *Ks; b++)
            for (int fmt = 0; fmt < 4; fmt++)
                for (int round = 0; round < 2; round++) {
                    if (fmt >= 2 && !round) continue;
                    const int64_t M = Ms[a], K = Ks[b];
                    if (quick && M * K > 200000) continue;
                    const size_t n = (size_t)(M * K), sb = epmoe_scale_bytes((epmoe_scale_fmt)fmt, M, K);
                    uint16_t *x = malloc(n * 2 + 2);
                    uint8_t *q = malloc(n + 1), *s = malloc(sb + 1);
                    fill(r, x, (int64_t)n, K, (a + b) % 2);
                    memset(q, POISON, n + 1), memset(s, POISON, sb + 1);
                    CHECK_STATUS(epmoe_cast_group_fp8_ref(x, M, K, q, s, (epmoe_scale_fmt)fmt, round), EPMOE_OK);
                    void *dx = dev_copy(x, n * 2), *dq = dev_poisoned(n), *ds = dev_poisoned(sb);
                    CHECK_STATUS(epmoe_cast_group_fp8_cuda(M ? dx : NULL, M, K, M ? dq : NULL, M ? ds : NULL,
                                                           (epmoe_scale_fmt)fmt, round, stream),
                                 EPMOE_OK);
                    CUDA_OK(cudaStreamSynchronize(stream));
                    char what[96];
                    snprintf(what, sizeof what, "cast_group M=%lld K=%lld fmt=%d round=%d q", (long long)M, (long long)K, fmt, round);
                    compare_dev(dq, q, n, what);
                    what[strlen(what) - 1] = 's';
                    compare_dev(ds, s, sb, what);
                    CUDA_OK(cudaFree(dx)); CUDA_OK(cudaFree(dq)); CUDA_OK(cudaFree(ds));
                    free(x), free(q), free(s);
                    cases++;
                }
    printf("  cast_group: %ld cases\n", cases);
}

static void test_cast_tensor(test_rng *r) {
    const int64_t ns[] = {1, 3, 7, 8, 9, 127, 129, 7168 * 3 + 5, 1 << 22};
    for (size_t i = 0; i < sizeof ns / sizeof *ns; i++) {
        const int64_t n = ns[i];
        uint16_t *x = malloc((size_t)n * 2);
        uint8_t *q = malloc((size_t)n);
        const float scale = (float)(0.01 + rng_uniform(r));
        fill(r, x, n, 128, 1);
        CHECK_STATUS(epmoe_cast_tensor_fp8_ref(x, n, &scale, q), EPMOE_OK);
        void *dx = dev_copy(x, (size_t)n * 2), *dq = dev_poisoned((size_t)n), *dsc = dev_copy(&scale, 4);
        CHECK_STATUS(epmoe_cast_tensor_fp8_cuda(dx, n, dsc, dq, stream), EPMOE_OK);
        CUDA_OK(cudaStreamSynchronize(stream));
        char what[64];
        snprintf(what, sizeof what, "cast_tensor n=%lld", (long long)n);
        compare_dev(dq, q, (size_t)n, what);
        CUDA_OK(cudaFree(dx)); CUDA_OK(cudaFree(dq)); CUDA_OK(cudaFree(dsc));
        free(x), free(q);
    }
}

/* One masked rescale case: requant and dequant (f32, bf16) on GPU vs reference. Reference
** outputs start as the same poison, so "rows past masked_m untouched" is part of the compare. */
static void rescale_case(test_rng *r, int64_t E, int64_t M, int64_t K, int fmt, const int32_t *masked, const char *name) {
    const size_t n = (size_t)(E * M * K), slab = epmoe_scale_bytes((epmoe_scale_fmt)fmt, M, K);
    uint16_t *x = malloc((size_t)(M * K) * 2 + 2);
    uint8_t *q = malloc(n + 1), *s = malloc(E * slab + 1), *y = malloc(n + 1);
    float *yf = malloc(n * 4 + 4);
    uint16_t *yb = malloc(n * 2 + 2);
    for (int64_t e = 0; e < E; e++) {
        fill(r, x, M * K, K, e == 1);
        epmoe_cast_group_fp8_ref(x, M, K, q + e * M * K, s + e * slab, (epmoe_scale_fmt)fmt, fmt >= 2);
    }
    const float out_scale = (float)(0.005 + 0.05 * rng_uniform(r));
    memset(y, POISON, n), memset(yf, POISON, n * 4), memset(yb, POISON, n * 2);
    CHECK_STATUS(epmoe_requant_fp8_ref(q, s, (epmoe_scale_fmt)fmt, masked, E, M, K, &out_scale, y), EPMOE_OK);
    CHECK_STATUS(epmoe_dequant_fp8_ref(q, s, (epmoe_scale_fmt)fmt, masked, E, M, K, EPMOE_F32, yf), EPMOE_OK);
    CHECK_STATUS(epmoe_dequant_fp8_ref(q, s, (epmoe_scale_fmt)fmt, masked, E, M, K, EPMOE_BF16, yb), EPMOE_OK);
    void *dq = dev_copy(q, n), *ds = dev_copy(s, E * slab), *dm = dev_copy(masked, (size_t)E * 4);
    void *dsc = dev_copy(&out_scale, 4), *dy = dev_poisoned(n), *dyf = dev_poisoned(n * 4), *dyb = dev_poisoned(n * 2);
    CHECK_STATUS(epmoe_requant_fp8_cuda(dq, ds, (epmoe_scale_fmt)fmt, dm, E, M, K, dsc, dy, stream), EPMOE_OK);
    CHECK_STATUS(epmoe_dequant_fp8_cuda(dq, ds, (epmoe_scale_fmt)fmt, dm, E, M, K, EPMOE_F32, dyf, stream), EPMOE_OK);
    CHECK_STATUS(epmoe_dequant_fp8_cuda(dq, ds, (epmoe_scale_fmt)fmt, dm, E, M, K, EPMOE_BF16, dyb, stream), EPMOE_OK);
    CUDA_OK(cudaStreamSynchronize(stream));
    char what[128];
    snprintf(what, sizeof what, "%s E=%lld M=%lld K=%lld fmt=%d requant", name, (long long)E, (long long)M, (long long)K, fmt);
    compare_dev(dy, y, n, what);
    snprintf(what, sizeof what, "%s fmt=%d dequant f32", name, fmt);
    compare_dev_float(dyf, yf, n, 0, what);
    snprintf(what, sizeof what, "%s fmt=%d dequant bf16", name, fmt);
    compare_dev_float(dyb, yb, n, 1, what);
    CUDA_OK(cudaFree(dq)); CUDA_OK(cudaFree(ds)); CUDA_OK(cudaFree(dm)); CUDA_OK(cudaFree(dsc));
    CUDA_OK(cudaFree(dy)); CUDA_OK(cudaFree(dyf)); CUDA_OK(cudaFree(dyb));
    free(x), free(q), free(s), free(y), free(yf), free(yb);
}

static void test_rescale(test_rng *r) {
    const int64_t Ks[] = {128, 384, 7168};
    for (int fmt = 0; fmt < 4; fmt++)
        for (size_t kb = 0; kb < 3; kb++) {
            const int64_t K = Ks[kb], M = K == 7168 ? 129 : 131, E = 6;
            int32_t zeros[6] = {0}, ones[6] = {1, 1, 1, 1, 1, 1}, threes[6] = {3, 3, 3, 3, 3, 3};
            int32_t mixed[6] = {0, 1, 127, (int32_t)M, 5000, -7}, full[6];
            for (int e = 0; e < 6; e++) full[e] = (int32_t)M;
            rescale_case(r, E, M, K, fmt, zeros, "all0");
            rescale_case(r, E, M, K, fmt, ones, "all1");
            rescale_case(r, E, M, K, fmt, threes, "all3");
            rescale_case(r, E, M, K, fmt, mixed, "mixed");
            rescale_case(r, E, M, K, fmt, full, "full");
        }
    /* many experts: the block scan crosses several rounds of 256 */
    int32_t *many = malloc(600 * 4);
    for (int e = 0; e < 600; e++) many[e] = (int32_t)(rng_u64(r) % 4);
    rescale_case(r, 600, 3, 128, 1, many, "600experts");
    free(many);
    if (quick) return;
    /* DeepSeek-R1 EP8 decode: 32 local experts, M = 8 ranks x 128 tokens, ~32 rows each. */
    int32_t ds[32], full32[32];
    for (int e = 0; e < 32; e++) ds[e] = (int32_t)(16 + rng_u64(r) % 33), full32[e] = 1024;
    rescale_case(r, 32, 1024, 7168, 1, ds, "ds_r1_ep8_decode");
    rescale_case(r, 32, 1024, 7168, 0, full32, "full_32x1024");
}

/* Requant captured once in a CUDA graph; masked_m changes on the device between replays. */
static void test_graph_replay(test_rng *r) {
    const int64_t E = 4, M = 64, K = 384;
    const size_t n = (size_t)(E * M * K), slab = epmoe_scale_bytes(EPMOE_SCALE_F32_MMAJOR, M, K);
    uint16_t *x = malloc((size_t)(M * K) * 2);
    uint8_t *q = malloc(n), *s = malloc(E * slab), *y = malloc(n);
    for (int64_t e = 0; e < E; e++) {
        fill(r, x, M * K, K, 0);
        epmoe_cast_group_fp8_ref(x, M, K, q + e * M * K, s + e * slab, EPMOE_SCALE_F32_MMAJOR, 0);
    }
    const float out_scale = 0.03f;
    int32_t masked[4] = {1, 2, 3, 4};
    void *dq = dev_copy(q, n), *ds = dev_copy(s, E * slab), *dm = dev_copy(masked, sizeof masked);
    void *dsc = dev_copy(&out_scale, 4), *dy = dev_poisoned(n);
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    epmoe_status st = epmoe_requant_fp8_cuda(dq, ds, EPMOE_SCALE_F32_MMAJOR, dm, E, M, K, dsc, dy, stream);
    CUDA_OK(cudaStreamEndCapture(stream, &graph));
    CHECK(st == EPMOE_OK, "requant under capture: %s", epmoe_last_error());
    CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
    for (int rep = 0; rep < 100; rep++) {
        for (int e = 0; e < 4; e++) masked[e] = (int32_t)(rng_u64(r) % (M + 1));
        CUDA_OK(cudaMemcpyAsync(dm, masked, sizeof masked, cudaMemcpyHostToDevice, stream));
        CUDA_OK(cudaMemsetAsync(dy, POISON, n, stream));
        CUDA_OK(cudaGraphLaunch(exec, stream));
        CUDA_OK(cudaStreamSynchronize(stream));
        memset(y, POISON, n);
        epmoe_requant_fp8_ref(q, s, EPMOE_SCALE_F32_MMAJOR, masked, E, M, K, &out_scale, y);
        if (compare_dev(dy, y, n, "graph replay")) break;
    }
    CUDA_OK(cudaGraphExecDestroy(exec)); CUDA_OK(cudaGraphDestroy(graph));
    CUDA_OK(cudaFree(dq)); CUDA_OK(cudaFree(ds)); CUDA_OK(cudaFree(dm)); CUDA_OK(cudaFree(dsc)); CUDA_OK(cudaFree(dy));
    free(x), free(q), free(s), free(y);
}

int main(void) {
    int ndev = epmoe_cuda_device_count();
    if (ndev == 0) {
        printf("test_quant_gpu: no CUDA device; this suite needs an H200 (make test-gpu on the GPU machine)\n");
        return 1;
    }
    quick = getenv("EPMOE_TEST_QUICK") && atoi(getenv("EPMOE_TEST_QUICK"));
    uint64_t seed = getenv("EPMOE_SEED") ? strtoull(getenv("EPMOE_SEED"), NULL, 0) : (uint64_t)time(NULL);
    printf("test_quant_gpu: seed %llu (EPMOE_SEED to repeat), %d device(s)%s\n", (unsigned long long)seed, ndev,
           quick ? ", quick" : "");
    test_rng r = {seed * 2654435761u + 1};
    CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    test_cast_group(&r);
    test_cast_tensor(&r);
    test_rescale(&r);
    test_graph_replay(&r);
    CUDA_OK(cudaStreamDestroy(stream));
    return test_report("test_quant_gpu");
}
