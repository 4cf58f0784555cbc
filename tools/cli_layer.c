/*
** cli_layer.c — `epmoe check` and `epmoe bench`: the MoE layer on the best backend (the node's
** GPUs over NCCL, one thread per GPU; else the CPU backend with ranks as threads), any scheme
** (--scheme w4afp8 (default) | w8a8_fp8_block | bf16 | w4a16 [--group 32|128]).
**   check: the layer's error against an fp64 model (the checkpoint's weights dequantized exactly,
**          unquantized activations and intermediate), on gaussian tokens and on tokens with 8
**          outlier channels x200. Weights drawn on the host in the scheme's checkpoint form:
**          w4afp8 int4 amax/7 per 128 (repacked); w8a8_fp8_block e4m3 with amax/448 per 128x128
**          block; bf16; w4a16 int4 amax/7 per group. Rows: w4afp8 FP8 vs BF16 wire x 1x128 vs
**          per-tensor activation scales; w8a8_fp8_block FP8 vs BF16 wire (1x128 scales); bf16
**          and w4a16 the BF16 wire (their only one). --json adds "scheme".
**   bench: the layer forward and each stage alone (dispatch, expert MLP, combine): median us,
**          GB/s over the weights the MLP reads and TFLOP/s (GPUs); FP8 and/or BF16 wire; --json F.
** Flags left out take the backend's defaults (backend_defaults): on the CPU backend the tiny model.
*/
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "epmoe.h"
#include "tool_util.h"
#if EPMOE_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

int cmd_check(int argc, char **argv);
int cmd_bench(int argc, char **argv);
int cli_layer_gpus(int force_cpu);

typedef struct model {
    const char *name;
    int H, I, E, k;
} model;
static const model MODELS[] = {{"deepseek-r1", 7168, 2048, 256, 8}, {"kimi-k2", 7168, 2048, 384, 8}, {"tiny", 512, 256, 16, 4}};

typedef struct opts {
    const model *m;
    int tokens, experts, cpu, iters, wires; /* wires: bit 0 FP8, bit 1 BF16 */
    const char *json;
    epmoe_scheme scheme;
    int group, group_set;                   /* w4a16: int4 group along K (--group given) */
} opts;

static const char *SCHEME[] = {"bf16", "w8a8_fp8_block", "w4afp8", "w4a16"};

static int parse(const char *cmd, int argc, char **argv, opts *o) {
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        char *end = NULL;
        if (!strcmp(a, "--cpu")) o->cpu = 1;
        else if (!strcmp(a, "--model") && v) {
            o->m = NULL;
            for (size_t j = 0; j < sizeof MODELS / sizeof MODELS[0]; j++)
                if (!strcmp(v, MODELS[j].name)) o->m = &MODELS[j];
            if (!o->m) return fprintf(stderr, "epmoe %s: unknown model '%s' (deepseek-r1, kimi-k2, tiny)\n", cmd, v), 2;
            i++;
        } else if ((!strcmp(a, "--tokens") || !strcmp(a, "--experts") || !strcmp(a, "--iters")) && v) {
            const long n = strtol(v, &end, 10);
            if (*end || n < 1 || n > 4096) return fprintf(stderr, "epmoe %s: %s takes an integer in [1, 4096], got '%s'\n", cmd, a, v), 2;
            if (!strcmp(a, "--tokens")) o->tokens = (int)n;
            else if (!strcmp(a, "--experts")) o->experts = (int)n;
            else o->iters = (int)n;
            i++;
        } else if (!strcmp(a, "--wire") && v) {
            o->wires = !strcmp(v, "fp8") ? 1 : !strcmp(v, "bf16") ? 2 : !strcmp(v, "both") ? 3 : 0;
            if (!o->wires) return fprintf(stderr, "epmoe %s: --wire takes fp8, bf16 or both, got '%s'\n", cmd, v), 2;
            i++;
        } else if (!strcmp(a, "--scheme") && v) {
            int f = -1;
            for (int j = 0; j < 4; j++)
                if (!strcmp(v, SCHEME[j])) f = j;
            if (f < 0) return fprintf(stderr, "epmoe %s: unknown scheme '%s' (w4afp8, w8a8_fp8_block, bf16, w4a16)\n", cmd, v), 2;
            o->scheme = (epmoe_scheme)f;
            i++;
        } else if (!strcmp(a, "--group") && v) {
            const long g = strtol(v, &end, 10);
            if (*end || (g != 32 && g != 128)) return fprintf(stderr, "epmoe %s: --group takes 32 or 128, got '%s'\n", cmd, v), 2;
            o->group = (int)g, o->group_set = 1;
            i++;
        } else if (!strcmp(a, "--json") && v) o->json = argv[++i];
        else return fprintf(stderr, "epmoe %s: unknown or incomplete option '%s' (see epmoe --help)\n", cmd, a), 2;
    }
    if (o->group_set && o->scheme != EPMOE_SCHEME_W4A16)
        return fprintf(stderr, "epmoe %s: --group is the w4a16 scheme's int4 group (add --scheme w4a16)\n", cmd), 2;
    return 0;
}

/* ---- ranks: a group per wire, one thread per rank -------------------------------------- */

typedef struct rank_ctx rank_ctx;
typedef void (*rank_fn)(rank_ctx *r);
struct rank_ctx {
    int rank, R, gpu;
    epmoe_ep_config ec;
    epmoe_cpu_world *world;
    epmoe_ep *ep;
    rank_fn fn;
    void *job;          /* the command's per-rank data */
    epmoe_status st;
    char err[256];
};

static void *rank_main(void *arg) {
    rank_ctx *r = arg;
#if EPMOE_HAVE_CUDA
    if (r->gpu) cudaSetDevice(r->rank);
#endif
    if (!r->gpu) {
        epmoe_ep_config c = r->ec;
        c.rank = r->rank;
        r->st = epmoe_ep_create_cpu(r->world, &c, &r->ep);
        if (r->st != EPMOE_OK) snprintf(r->err, sizeof r->err, "%s", epmoe_last_error());
    }
    if (r->st == EPMOE_OK) r->fn(r);
    if (r->ep) epmoe_ep_destroy(r->ep);
    r->ep = NULL;
    return NULL;
}

/* Make the group (GPUs: in one call; CPU: each rank thread) and run fn on every rank. */
static int run_ranks(rank_ctx *rs, int R, int gpu, epmoe_ep_config ec, rank_fn fn, void **jobs) {
    epmoe_ep *eps[8] = {0};
    epmoe_cpu_world *world = NULL;
    ec.num_ranks = R;
    if (gpu && epmoe_ep_create_nccl_local(&ec, R, NULL, eps) != EPMOE_OK)
        return fprintf(stderr, "epmoe: creating the GPU group: %s\n", epmoe_last_error()), 1;
    if (!gpu && epmoe_cpu_world_create(R, &world) != EPMOE_OK)
        return fprintf(stderr, "epmoe: %s\n", epmoe_last_error()), 1;
    pthread_t th[8];
    for (int q = 0; q < R; q++) {
        rank_ctx c = {q, R, gpu, ec, world, eps[q], fn, jobs[q], EPMOE_OK, ""};
        rs[q] = c;
        pthread_create(&th[q], NULL, rank_main, &rs[q]);
    }
    int bad = 0;
    for (int q = 0; q < R; q++) pthread_join(th[q], NULL);
    for (int q = 0; q < R; q++)
        if (rs[q].st != EPMOE_OK) bad = 1, fprintf(stderr, "epmoe: rank %d: %s\n", q, rs[q].err);
    if (world) epmoe_cpu_world_destroy(world);
    return bad;
}

/* The backend of the layer commands, decided here once for check, bench and `epmoe demo`
** (epmoe.c): the node's GPUs over NCCL when this build has CUDA and the NCCL backend, a GPU is
** visible and --cpu was not given; else the CPU backend (ranks as threads, scalar references).
** Returns the number of GPUs to use (0: the CPU backend). */
int cli_layer_gpus(int force_cpu) {
    int n = 0;
    (void)force_cpu; /* (a build without NCCL has only the CPU backend) */
#if EPMOE_HAVE_CUDA && EPMOE_HAVE_NCCL
    if (!force_cpu) n = epmoe_cuda_device_count();
#endif
    return n > 0 ? n : 0;
}

static int pick_ranks(const opts *o, int *gpu) {
    const int n = cli_layer_gpus(o->cpu);
    *gpu = n > 0;
    if (!n) return 2;
    return n >= 8 ? 8 : (n >= 4 ? 4 : (n >= 2 ? 2 : 1));
}

/* What the flags left unset, by backend: the full DeepSeek-R1 layer on GPUs; on the CPU backend,
** whose scalar references take minutes over full-size experts, the tiny model and (bench) few
** tokens and iterations, a run of seconds (what `epmoe demo` shows there). Given flags win. */
static void backend_defaults(opts *o, int gpu, int tokens_gpu, int tokens_cpu, int iters_gpu, int iters_cpu) {
    if (!o->m) o->m = gpu ? &MODELS[0] : &MODELS[2];
    if (!o->tokens) o->tokens = gpu ? tokens_gpu : tokens_cpu;
    if (!o->iters) o->iters = gpu ? iters_gpu : iters_cpu;
}

static uint64_t rng_state = 0x2545F4914F6CDD1Dull;
static double urand(void) { return tool_urand(&rng_state); }
static double nrand(void) { return tool_nrand(&rng_state); }

/* Device or host copies of a rank's weights, as the layer wants them. */
static int upload(int gpu, const void *h, size_t n, void **out) {
    (void)gpu;
#if EPMOE_HAVE_CUDA
    if (gpu) {
        if (cudaMalloc(out, n ? n : 16) != cudaSuccess) return 1;
        return cudaMemcpy(*out, h, n, cudaMemcpyHostToDevice) != cudaSuccess;
    }
#endif
    *out = malloc(n ? n : 16);
    if (*out) memcpy(*out, h, n);
    return *out == NULL;
}
static void release(int gpu, void *p) {
    (void)gpu;
#if EPMOE_HAVE_CUDA
    if (gpu) {
        cudaFree(p);
        return;
    }
#endif
    free(p);
}

/* The expert weight format of a scheme other than w4afp8, and its checkpoint sizes. */
static epmoe_weight_format scheme_format(epmoe_scheme s) {
    return s == EPMOE_SCHEME_BF16 ? EPMOE_WEIGHT_BF16 : s == EPMOE_SCHEME_W4A16 ? EPMOE_WEIGHT_INT4 : EPMOE_WEIGHT_FP8_BLOCK;
}
static void xw_sizes(epmoe_weight_format f, int64_t group, int64_t E, int64_t N, int64_t K, size_t *data, size_t *scales) {
    *data = (size_t)(E * N * K) * (f == EPMOE_WEIGHT_BF16 ? 2 : 1) / (f == EPMOE_WEIGHT_INT4 ? 2 : 1);
    *scales = f == EPMOE_WEIGHT_BF16 ? 0 : (size_t)(f == EPMOE_WEIGHT_INT4 ? E * N * (K / group) : E * (N / 128) * (K / 128)) * 4;
}

/* ---- check ----------------------------------------------------------------------------- */

/* One weight matrix [L, N, K] of a rank in checkpoint form, on the host (what the fp64 model
** reads): bf16; fp8 e4m3 with fp32 128x128 block scales [L, N/128, K/128]; int4 (two per byte,
** even k low) with fp32 group scales [L, N, K/group]. W4AFP8's checkpoint is INT4 with group 128. */
typedef struct ckpt_mat {
    epmoe_weight_format fmt;
    int64_t N, K, group;
    void *data;
    float *scales;
} ckpt_mat;

typedef struct ckpt { /* one rank's experts */
    ckpt_mat w13, w2;
    epmoe_layer_weights lw; /* as the layer takes them (w4afp8: repacked), where the group's memory is */
} ckpt;

typedef struct check_job {
    const opts *o;
    ckpt *ck;
    const uint16_t *x;
    const int32_t *idx;
    const float *tw;
    uint16_t *out;
    int per_tensor;
    const float *a1, *a2; /* host values; copied where needed */
} check_job;

/* Weights [rows, K] (rows a multiple of 128) drawn gaussian with the variance of tool_quantize_w4's
** (uniform in +-0.02) and stored in checkpoint form f: bf16 of the values; e4m3 of value / scale with
** scale = amax / 448 per 128x128 block; int4 with scale = amax / 7 per group along K
** (tool_quantize_int4_group). v: 128 * K floats of scratch. */
static void make_weights(epmoe_weight_format f, int64_t group, int64_t rows, int64_t K, void *data, float *scales,
                         float *v) {
    for (int64_t r0 = 0; r0 < rows; r0 += 128) {
        for (int64_t i = 0; i < 128 * K; i++) v[i] = (float)(nrand() * 0.011547005383792516); /* 0.02 / sqrt(3) */
        for (int64_t b = 0; f == EPMOE_WEIGHT_FP8_BLOCK && b < K / 128; b++) {
            float amax = 1e-12f;
            for (int64_t r = 0; r < 128; r++)
                for (int64_t i = 0; i < 128; i++) amax = fmaxf(amax, fabsf(v[r * K + b * 128 + i]));
            const float sc = amax / 448.0f;
            scales[r0 / 128 * (K / 128) + b] = sc;
            for (int64_t r = 0; r < 128; r++)
                for (int64_t i = b * 128; i < b * 128 + 128; i++)
                    ((uint8_t *)data)[(r0 + r) * K + i] = epmoe_fp8_e4m3_from_float(v[r * K + i] / sc);
        }
        for (int64_t r = 0; f != EPMOE_WEIGHT_FP8_BLOCK && r < 128; r++) {
            const int64_t row = r0 + r;
            if (f == EPMOE_WEIGHT_BF16)
                for (int64_t i = 0; i < K; i++) ((uint16_t *)data)[row * K + i] = epmoe_bf16_from_float(v[r * K + i]);
            else
                for (int64_t g = 0; g < K / group; g++)
                    tool_quantize_int4_group(v + r * K + g * group, group, (int8_t *)data + (row * K + g * group) / 2,
                                             &scales[row * (K / group) + g]);
        }
    }
}

/* Row `row` of [L * N, K] dequantized exactly (value times its scale, in fp64): one per format. */
static void deq_bf16(const ckpt_mat *w, int64_t row, double *out) {
    for (int64_t k = 0; k < w->K; k++) out[k] = epmoe_bf16_to_float(((const uint16_t *)w->data)[row * w->K + k]);
}
static void deq_fp8_block(const ckpt_mat *w, int64_t row, double *out) {
    const float *s = w->scales + row / 128 * (w->K / 128);
    for (int64_t k = 0; k < w->K; k++)
        out[k] = (double)epmoe_fp8_e4m3_to_float(((const uint8_t *)w->data)[row * w->K + k]) * s[k / 128];
}
static double nib(const int8_t *w, int64_t i) { /* int4 i of a packed array (even index: low nibble) */
    const uint8_t b = (uint8_t)w[i / 2];
    const int v = (i & 1) ? b >> 4 : b & 0xF;
    return v >= 8 ? v - 16 : v;
}
static void deq_int4(const ckpt_mat *w, int64_t row, double *out) {
    const float *s = w->scales + row * (w->K / w->group);
    for (int64_t k = 0; k < w->K; k++) out[k] = nib(w->data, row * w->K + k) * s[k / w->group];
}

/* Local expert le of w as fp64 [N, K]. */
static void dequant_expert(const ckpt_mat *w, int64_t le, double *out) {
    void (*const deq[])(const ckpt_mat *, int64_t, double *) = {[EPMOE_WEIGHT_BF16] = deq_bf16,
                                                                [EPMOE_WEIGHT_FP8_BLOCK] = deq_fp8_block,
                                                                [EPMOE_WEIGHT_INT4] = deq_int4};
    for (int64_t n = 0; n < w->N; n++) deq[w->fmt](w, le * w->N + n, out + n * w->K);
}

/* Rank weights in the scheme's checkpoint form (w4afp8: tool_quantize_w4, then repacked), and the
** layer's view of them uploaded where the group's memory is. */
static int make_ckpt(int gpu, const opts *o, int L, int H, int I, ckpt *c) {
    const epmoe_scheme sc = o->scheme;
    const epmoe_weight_format f = sc == EPMOE_SCHEME_W4AFP8 ? EPMOE_WEIGHT_INT4 : scheme_format(sc);
    const int64_t g = sc == EPMOE_SCHEME_W4A16 ? o->group : 128;
    size_t q13, s13, q2, s2;
    xw_sizes(f, g, L, 2 * I, H, &q13, &s13);
    xw_sizes(f, g, L, H, I, &q2, &s2);
    const ckpt_mat m13 = {f, 2 * I, H, g, malloc(q13), malloc(s13 + 4)}, m2 = {f, H, I, g, malloc(q2), malloc(s2 + 4)};
    c->w13 = m13, c->w2 = m2;
    if (!m13.data || !m13.scales || !m2.data || !m2.scales) return fprintf(stderr, "epmoe check: out of memory\n"), 1;
    if (sc != EPMOE_SCHEME_W4AFP8) {
        float *v = malloc((size_t)128 * (H > I ? H : I) * 4);
        if (!v) return fprintf(stderr, "epmoe check: out of memory\n"), 1;
        make_weights(f, g, (int64_t)L * 2 * I, H, m13.data, m13.scales, v);
        make_weights(f, g, (int64_t)L * H, I, m2.data, m2.scales, v);
        free(v);
        void *d13 = NULL, *ds13 = NULL, *d2 = NULL, *ds2 = NULL;
        if (upload(gpu, m13.data, q13, &d13) || upload(gpu, m2.data, q2, &d2) ||
            (f != EPMOE_WEIGHT_BF16 && (upload(gpu, m13.scales, s13, &ds13) || upload(gpu, m2.scales, s2, &ds2))))
            return fprintf(stderr, "epmoe check: out of memory for the weights\n"), 1;
        const epmoe_expert_weights e13 = {f, L, 2 * I, H, g, d13, ds13}, e2 = {f, L, H, I, g, d2, ds2};
        memset(&c->lw, 0, sizeof c->lw);
        c->lw.e13 = e13, c->lw.e2 = e2;
        return 0;
    }
    tool_quantize_w4(&rng_state, (int64_t)L * 2 * I, H, m13.data, m13.scales);
    tool_quantize_w4(&rng_state, (int64_t)L * H, I, m2.data, m2.scales);
    size_t rq13, rs13, rq2, rs2;
    epmoe_w4a8_repack_size(L, 2 * I, H, &rq13, &rs13);
    epmoe_w4a8_repack_size(L, H, I, &rq2, &rs2);
    void *hq13 = malloc(rq13), *hq2 = malloc(rq2);
    uint16_t *hs13 = malloc(rs13), *hs2 = malloc(rs2); /* bf16 */
    int e13 = EPMOE_W4_AUTO, e2 = EPMOE_W4_AUTO;
    if (epmoe_w4a8_repack(m13.data, m13.scales, EPMOE_F32, 128, L, 2 * I, H, hq13, hs13, &e13) ||
        epmoe_w4a8_repack(m2.data, m2.scales, EPMOE_F32, 128, L, H, I, hq2, hs2, &e2))
        return fprintf(stderr, "epmoe check: repack: %s\n", epmoe_last_error()), 1;
    void *d13, *ds13, *d2, *ds2;
    if (upload(gpu, hq13, rq13, &d13) || upload(gpu, hs13, rs13, &ds13) || upload(gpu, hq2, rq2, &d2) ||
        upload(gpu, hs2, rs2, &ds2))
        return fprintf(stderr, "epmoe check: out of memory for the weights\n"), 1;
    free(hq13), free(hq2), free(hs13), free(hs2);
    const epmoe_layer_weights lw = {.w13 = {L, 2 * I, H, e13, d13, ds13}, .w2 = {L, H, I, e2, d2, ds2}};
    c->lw = lw;
    return 0;
}

static void free_ckpt(int gpu, ckpt *c) {
    const void *p[] = {c->lw.w13.qweight, c->lw.w13.scales, c->lw.w2.qweight, c->lw.w2.scales,
                       c->lw.e13.data,    c->lw.e13.scales, c->lw.e2.data,    c->lw.e2.scales};
    for (size_t i = 0; i < sizeof p / sizeof p[0]; i++)
        if (p[i]) release(gpu, (void *)p[i]);
    free(c->w13.data), free(c->w13.scales), free(c->w2.data), free(c->w2.scales);
}

static void check_rank(rank_ctx *r) {
    check_job *j = r->job;
    const int H = r->ec.hidden, T = r->ec.max_tokens, k = r->ec.top_k;
    epmoe_layer_config lc = EPMOE_LAYER_CONFIG_INIT;
    lc.scheme = j->o->scheme, lc.intermediate = j->o->m->I, lc.per_tensor_act = j->per_tensor;
    epmoe_layer_weights lw = j->ck[r->rank].lw;
    void *a1 = NULL, *a2 = NULL, *x = NULL, *idx = NULL, *tw = NULL, *out = NULL;
    int fail = upload(r->gpu, j->a1, 4, &a1) || upload(r->gpu, j->a2, 4, &a2) ||
               upload(r->gpu, j->x + (size_t)r->rank * T * H, (size_t)T * H * 2, &x) ||
               upload(r->gpu, j->idx + (size_t)r->rank * T * k, (size_t)T * k * 4, &idx) ||
               upload(r->gpu, j->tw + (size_t)r->rank * T * k, (size_t)T * k * 4, &tw) ||
               upload(r->gpu, j->out, (size_t)T * H * 2, &out);
    epmoe_layer *layer = NULL;
    lw.a1_scale = a1, lw.a2_scale = a2;
    r->st = fail ? EPMOE_ERR_OUT_OF_MEMORY : epmoe_layer_create(r->ep, &lc, &lw, &layer);
    if (r->st == EPMOE_OK) r->st = epmoe_layer_forward(layer, x, idx, 32, tw, T, out, NULL);
#if EPMOE_HAVE_CUDA
    if (r->gpu && r->st == EPMOE_OK) {
        r->st = cudaDeviceSynchronize() == cudaSuccess ? epmoe_ep_poll(r->ep) : EPMOE_ERR_CUDA;
        cudaMemcpy(j->out + (size_t)r->rank * T * H, out, (size_t)T * H * 2, cudaMemcpyDeviceToHost);
    }
#endif
    if (!r->gpu && r->st == EPMOE_OK) memcpy(j->out + (size_t)r->rank * T * H, out, (size_t)T * H * 2);
    if (r->st != EPMOE_OK) snprintf(r->err, sizeof r->err, "%s", epmoe_last_error());
    epmoe_layer_destroy(layer);
    release(r->gpu, a1), release(r->gpu, a2), release(r->gpu, x), release(r->gpu, idx), release(r->gpu, tw);
    release(r->gpu, out);
}

int cmd_check(int argc, char **argv) {
    opts o = {NULL, 0, 0, 0, 0, 0, NULL, EPMOE_SCHEME_W4AFP8, 32, 0};
    if (parse("check", argc, argv, &o)) return 2;
    /* the rows: wire x activation scales; only w4afp8 has static per-tensor scales, and the bf16
    ** and w4a16 schemes read bf16 activations (BF16 wire, no scales) */
    const int w4afp8 = o.scheme == EPMOE_SCHEME_W4AFP8, fp8_ok = epmoe_scheme_accepts_wire(o.scheme, EPMOE_WIRE_FP8);
    if (!o.wires) o.wires = fp8_ok ? 3 : 2;
    if ((o.wires & 1) && !fp8_ok)
        return fprintf(stderr, "epmoe check: the %s scheme reads bf16 activations: BF16 wire only\n", SCHEME[o.scheme]), 2;
    char sname[32];
    snprintf(sname, sizeof sname, o.scheme == EPMOE_SCHEME_W4A16 ? "%s g%d" : "%s", SCHEME[o.scheme], o.group);
    int gpu;
    const int R = pick_ranks(&o, &gpu);
    backend_defaults(&o, gpu, 8, 8, 0, 0);
    if (!gpu && o.m != &MODELS[2] && !o.experts)
        fprintf(stderr, "epmoe check: CPU backend: the fp64 reference of full-size experts is slow; try --model tiny\n");
    const int E = o.experts ? o.experts : 4 * R, H = o.m->H, I = o.m->I, T = o.tokens, k = o.m->k < E ? o.m->k : E;
    if (E % R) return fprintf(stderr, "epmoe check: --experts %d is not a multiple of the %d ranks\n", E, R), 2;
    if (T > 128) return fprintf(stderr, "epmoe check: --tokens must be <= 128 here\n"), 2;
    const int L = E / R;
    printf("epmoe check: %s layer shapes (H %d, I %d), %d experts, top-%d, %d tokens/rank, %d ranks on %s\n", o.m->name,
           H, I, E, k, T, R, gpu ? "GPUs over NCCL" : "the CPU backend");
    if (w4afp8) printf("  quantizing and repacking the weights (W4AFP8 checkpoint rules: int4, amax/7 per 128)...\n");
    else if (o.scheme == EPMOE_SCHEME_BF16) printf("  scheme bf16: gaussian weights rounded to bf16...\n");
    else if (o.scheme == EPMOE_SCHEME_W8A8_FP8_BLOCK)
        printf("  scheme w8a8_fp8_block: quantizing gaussian weights (e4m3, amax/448 per 128x128 block)...\n");
    else printf("  scheme %s: quantizing gaussian weights (int4, amax/7 per %d along K)...\n", sname, o.group);
    fflush(stdout);
    ckpt ck[8];
    for (int q = 0; q < R; q++) {
#if EPMOE_HAVE_CUDA
        if (gpu) cudaSetDevice(q); /* rank q's weights live on rank q's GPU */
#endif
        if (make_ckpt(gpu, &o, L, H, I, &ck[q])) return 1;
    }
    uint16_t *x = malloc((size_t)R * T * H * 2), *out = malloc((size_t)R * T * H * 2);
    int32_t *idx = malloc((size_t)R * T * k * 4);
    float *tw = malloc((size_t)R * T * k * 4);
    double *truth = malloc((size_t)R * T * H * 8), *hbuf = malloc((size_t)2 * I * 8), *w13f = malloc((size_t)2 * I * H * 8);
    double *w2f = malloc((size_t)H * I * 8), *y = malloc((size_t)I * 8);
    if (!x || !out || !idx || !tw || !truth || !hbuf || !w13f || !w2f || !y) return fprintf(stderr, "epmoe check: out of memory\n"), 1;
    FILE *jf = o.json ? fopen(o.json, "w") : NULL;
    if (o.json && !jf) return fprintf(stderr, "epmoe check: cannot write %s\n", o.json), 1;
    if (jf)
        fprintf(jf, "{\"model\": \"%s\", \"scheme\": \"%s\", \"experts\": %d, \"tokens\": %d, \"ranks\": %d, \"results\": [",
                o.m->name, sname, E, T, R);
    printf("  %-10s %-5s %-14s %12s\n", "tokens", "wire", "act. scales", "NMSE vs fp64");
    int first = 1;
    for (int kind = 0; kind < 2; kind++) {
        /* tokens with per-token spread; kind 1: 8 outlier channels x200 */
        for (size_t i = 0; i < (size_t)R * T; i++) {
            const double spread = pow(2.0, 2.0 * urand() - 1.0);
            for (int h = 0; h < H; h++) {
                double v = nrand() * spread;
                if (kind && (h * 7919) % H < 8) v *= 200.0;
                x[i * H + h] = epmoe_bf16_from_float((float)v);
            }
            for (int a = 0; a < k; a++) {
                int e, dup;
                do {
                    e = (int)(urand() * E), dup = 0;
                    for (int b = 0; b < a; b++) dup |= idx[i * k + b] == e;
                } while (dup);
                idx[i * k + a] = e, tw[i * k + a] = (float)(0.5 + urand()) / (float)k;
            }
        }
        /* fp64 model, expert by expert (weights decoded once each, from the checkpoint: w4afp8's
        ** fp32 scales, which the repack rounds to bf16, ~3e-6 of NMSE); a2 = batch max of the
        ** intermediate / 448 and a1 = batch amax / 448: ideal static per-tensor scales */
        memset(truth, 0, (size_t)R * T * H * 8);
        double amax1 = 0, amax2 = 0;
        for (size_t i = 0; i < (size_t)R * T * H; i++) amax1 = fmax(amax1, fabs(epmoe_bf16_to_float(x[i])));
        for (int e = 0; e < E; e++) {
            const ckpt *c = &ck[e / L];
            const int le = e % L;
            int used = 0;
            for (size_t i = 0; i < (size_t)R * T * k; i++) used |= idx[i] == e;
            if (!used) continue;
            dequant_expert(&c->w13, le, w13f);
            dequant_expert(&c->w2, le, w2f);
            for (size_t i = 0; i < (size_t)R * T; i++)
                for (int a = 0; a < k; a++) {
                    if (idx[i * k + a] != e) continue;
                    for (int n = 0; n < 2 * I; n++) {
                        double acc = 0;
                        for (int kk = 0; kk < H; kk++) acc += w13f[(size_t)n * H + kk] * epmoe_bf16_to_float(x[i * H + kk]);
                        hbuf[n] = acc;
                    }
                    for (int n = 0; n < I; n++) y[n] = hbuf[n] / (1.0 + exp(-hbuf[n])) * hbuf[I + n], amax2 = fmax(amax2, fabs(y[n]));
                    for (int n = 0; n < H; n++) {
                        double acc = 0;
                        for (int kk = 0; kk < I; kk++) acc += w2f[(size_t)n * I + kk] * y[kk];
                        truth[i * H + n] += tw[i * k + a] * acc;
                    }
                }
            if (isatty(STDOUT_FILENO)) printf("\r  fp64 model: expert %d of %d", e + 1, E), fflush(stdout);
        }
        if (isatty(STDOUT_FILENO)) printf("\r%60s\r", "");
        const float a1 = (float)(amax1 / 448.0), a2 = (float)(amax2 / 448.0);
        for (int wire = 0; wire < 2; wire++) {
            if (!(o.wires & (1 << wire))) continue;
            epmoe_ep_config ec = EPMOE_EP_CONFIG_INIT;
            ec.max_tokens = T, ec.hidden = H, ec.num_experts = E, ec.top_k = k;
            ec.wire = wire ? EPMOE_WIRE_BF16 : EPMOE_WIRE_FP8;
            for (int pt = 0; pt < 1 + w4afp8; pt++) {
                check_job jobs[8];
                void *jp[8];
                for (int q = 0; q < R; q++) {
                    check_job j = {&o, ck, x, idx, tw, out, pt, &a1, &a2};
                    jobs[q] = j, jp[q] = &jobs[q];
                }
                rank_ctx rs[8];
                if (run_ranks(rs, R, gpu, ec, check_rank, jp)) return 1;
                double num = 0, den = 0;
                for (size_t i = 0; i < (size_t)R * T * H; i++) {
                    const double d = epmoe_bf16_to_float(out[i]) - truth[i];
                    num += d * d, den += truth[i] * truth[i];
                }
                const double nmse = num / (den > 0 ? den : 1);
                printf("  %-10s %-5s %-14s %12.3e\n", kind ? "outliers" : "gaussian", wire ? "BF16" : "FP8",
                       pt ? "per-tensor" : fp8_ok ? "1x128 group" : "none (bf16)", nmse);
                if (jf)
                    fprintf(jf, "%s\n  {\"tokens\": \"%s\", \"wire\": \"%s\", \"act_scales\": \"%s\", \"nmse\": %.4e}",
                            first ? "" : ",", kind ? "outliers" : "gaussian", wire ? "bf16" : "fp8",
                            pt ? "per_tensor" : fp8_ok ? "group" : "none", nmse);
                first = 0;
            }
        }
    }
    if (jf) fprintf(jf, "\n]}\n"), fclose(jf);
    if (w4afp8)
        printf("  (per-tensor scales: the batch amax / 448 of the layer input and of the intermediate, the best a\n"
               "   static calibration can give; the fp64 model uses the checkpoint's fp32 weight scales, so the\n"
               "   repack's bf16 rounding of them, ~3e-6, is in the NMSE; it is over every output element of every rank)\n");
    else printf("  (the fp64 model uses the dequantized weights exactly; the NMSE is over every output element of\n"
                "   every rank)\n");
    for (int q = 0; q < R; q++) free_ckpt(gpu, &ck[q]);
    free(x), free(out), free(idx), free(tw), free(truth), free(hbuf), free(w13f), free(w2f), free(y);
    return 0;
}

/* ---- bench ----------------------------------------------------------------------------- */

enum { STAGES = 4 };
static const char *STAGE[STAGES] = {"layer", "dispatch", "expert MLP", "combine"};

typedef struct bench_job {
    const opts *o;
    pthread_barrier_t *bar;
    double us[STAGES]; /* this rank's medians */
    long rows;         /* rows its MLP computed (sum of masked_m) */
    int active;        /* local experts with rows: the weights the MLP reads */
} bench_job;

static void bench_rank(rank_ctx *r) {
    bench_job *j = r->job;
    const epmoe_ep_config *ec = &r->ec;
    const int64_t H = ec->hidden, I = j->o->m->I, L = ec->num_experts / r->R, M = (int64_t)r->R * ec->max_tokens;
    const int k = ec->top_k, T = j->o->tokens, gpu = r->gpu;
    /* weights: a fixed byte pattern (every SYM7 code is a weight, every byte <= 0x37 a finite bf16
    ** half or e4m3; speed does not depend on the values), scales 1e-3 */
    const epmoe_scheme sc = j->o->scheme;
    const epmoe_weight_format fmt = scheme_format(sc);
    const int64_t group = sc == EPMOE_SCHEME_W4A16 ? j->o->group : 128;
    size_t q13, s13, q2, s2;
    if (sc == EPMOE_SCHEME_W4AFP8) {
        epmoe_w4a8_repack_size(L, 2 * I, H, &q13, &s13);
        epmoe_w4a8_repack_size(L, H, I, &q2, &s2);
    } else {
        xw_sizes(fmt, group, L, 2 * I, H, &q13, &s13);
        xw_sizes(fmt, group, L, H, I, &q2, &s2);
    }
    const size_t smax = s13 > s2 ? s13 : s2;
    uint8_t *hq = malloc(q13 > q2 ? q13 : q2);
    void *hs = malloc(smax + 4);
    for (size_t i = 0; i < (q13 > q2 ? q13 : q2); i++) hq[i] = (uint8_t)(i * 2654435761u >> 24) & 0x37;
    if (sc == EPMOE_SCHEME_W4AFP8) /* the repack's bf16 */
        for (size_t i = 0; i < smax / 2; i++) ((uint16_t *)hs)[i] = epmoe_bf16_from_float(1e-3f);
    else
        for (size_t i = 0; i < smax / 4; i++) ((float *)hs)[i] = 1e-3f;
    void *d13 = NULL, *ds13 = NULL, *d2 = NULL, *ds2 = NULL;
    if (upload(gpu, hq, q13, &d13) || upload(gpu, hs, s13, &ds13) || upload(gpu, hq, q2, &d2) || upload(gpu, hs, s2, &ds2)) {
        r->st = EPMOE_ERR_OUT_OF_MEMORY;
        snprintf(r->err, sizeof r->err, "out of memory for the weights");
        return;
    }
    free(hq), free(hs);
    epmoe_layer_weights w = {.w13 = {L, 2 * I, H, EPMOE_W4_SYM7, d13, ds13}, .w2 = {L, H, I, EPMOE_W4_SYM7, d2, ds2}};
    if (sc != EPMOE_SCHEME_W4AFP8) {
        const epmoe_expert_weights e13 = {fmt, L, 2 * I, H, group, d13, ds13}, e2 = {fmt, L, H, I, group, d2, ds2};
        memset(&w, 0, sizeof w);
        w.e13 = e13, w.e2 = e2;
    }
    /* inputs: tokens, k distinct uniformly routed experts */
    uint16_t *hx = malloc((size_t)T * H * 2);
    int32_t *hidx = malloc((size_t)T * k * 4);
    float *htw = malloc((size_t)T * k * 4);
    uint64_t s = 0x9E3779B97F4A7C15ull + (uint64_t)r->rank;
    for (int64_t i = 0; i < T * H; i++) s ^= s << 13, s ^= s >> 7, s ^= s << 17, hx[i] = epmoe_bf16_from_float((float)((s >> 40) % 200) * 0.01f - 1);
    for (int t = 0; t < T; t++)
        for (int a = 0; a < k; a++) {
            int e, dup;
            do {
                s ^= s << 13, s ^= s >> 7, s ^= s << 17;
                e = (int)(s % (uint64_t)ec->num_experts), dup = 0;
                for (int b = 0; b < a; b++) dup |= hidx[t * k + b] == e;
            } while (dup);
            hidx[t * k + a] = e, htw[t * k + a] = 1.0f / (float)k;
        }
    epmoe_ep_layout lay;
    epmoe_ep_layout_query(ec, &lay);
    const size_t wsb = sc == EPMOE_SCHEME_W4AFP8 ? epmoe_w4a8_mlp_workspace(L, M, H, I)
                                                 : epmoe_expert_mlp_workspace(fmt, L, M, H, I);
    const int cast = ec->wire == EPMOE_WIRE_BF16 && (sc == EPMOE_SCHEME_W4AFP8 || sc == EPMOE_SCHEME_W8A8_FP8_BLOCK);
    void *x = NULL, *idx = NULL, *tw = NULL, *out = NULL, *recv_x = NULL, *recv_s = NULL, *masked = NULL, *eout = NULL,
         *ws = NULL, *q = NULL, *qs = NULL;
    void *zero_ws = calloc(1, wsb);
    int fail = upload(gpu, hx, (size_t)T * H * 2, &x) || upload(gpu, hidx, (size_t)T * k * 4, &idx) ||
               upload(gpu, htw, (size_t)T * k * 4, &tw) || upload(gpu, zero_ws, wsb, &ws);
    free(zero_ws);
    void *zeros = calloc(1, lay.expert_out_bytes > lay.recv_x_bytes ? lay.expert_out_bytes : lay.recv_x_bytes);
    fail |= !zeros || upload(gpu, zeros, lay.recv_x_bytes, &recv_x) || upload(gpu, zeros, lay.recv_scales_bytes, &recv_s) ||
            upload(gpu, zeros, lay.masked_m_bytes, &masked) || upload(gpu, zeros, lay.expert_out_bytes, &eout) ||
            upload(gpu, zeros, lay.out_bytes, &out);
    if (cast)
        fail |= upload(gpu, zeros, (size_t)(L * M * H), &q) ||
                upload(gpu, zeros, epmoe_scale_bytes(EPMOE_SCALE_F32_ROW, L * M, H), &qs);
    free(zeros);
    free(hx), free(hidx), free(htw);
    epmoe_layer_config lc = EPMOE_LAYER_CONFIG_INIT;
    lc.intermediate = I, lc.scheme = sc;
    epmoe_layer *layer = NULL;
    r->st = fail ? EPMOE_ERR_OUT_OF_MEMORY : epmoe_layer_create(r->ep, &lc, &w, &layer);
    const epmoe_dispatch_args d = {x, idx, 32, tw, T, recv_x, recv_s, masked, NULL, NULL};
    epmoe_w4a8_mlp_args m = {w.w13, w.w2, cast ? q : recv_x, M, masked, cast ? qs : recv_s,
                             cast ? EPMOE_SCALE_F32_ROW : ec->scale_fmt, NULL, NULL, ws, wsb, eout, H, M * H, 0};
    m.expected_m = epmoe_expected_rows(T, r->R, k, ec->num_experts); /* as the layer picks its tiles */
    const epmoe_expert_mlp_args xm = {w.e13, w.e2, m.a, M, masked, fmt == EPMOE_WEIGHT_FP8_BLOCK ? m.a_scales : NULL,
                                      m.a_scale_fmt, ws, wsb, eout, H, M * H, m.expected_m};
    const epmoe_combine_args c = {eout, NULL, out};
    const int iters = j->o->iters, warm = 5;
    double *t[STAGES];
    for (int st = 0; st < STAGES; st++) t[st] = malloc(sizeof(double) * (size_t)iters);
#if EPMOE_HAVE_CUDA
    cudaEvent_t e0, e1;
    if (gpu) cudaEventCreate(&e0), cudaEventCreate(&e1);
#endif
    for (int it = 0; it < warm + iters && r->st == EPMOE_OK; it++)
        for (int st = 0; st < STAGES && r->st == EPMOE_OK; st++) {
            uint32_t h = 0;
            if (st >= 2) r->st = epmoe_dispatch(r->ep, &d, EPMOE_PHASE_BOTH, &h, NULL); /* untimed setup */
            if (r->st == EPMOE_OK && st == 2 && cast)
                r->st = gpu ? epmoe_cast_group_fp8_cuda(recv_x, L * M, H, q, qs, EPMOE_SCALE_F32_ROW, 0, NULL)
                            : epmoe_cast_group_fp8_ref(recv_x, L * M, H, q, qs, EPMOE_SCALE_F32_ROW, 0);
#if EPMOE_HAVE_CUDA
            if (gpu) cudaDeviceSynchronize();
#endif
            pthread_barrier_wait(j->bar);
            double t0 = tool_wall_us();
#if EPMOE_HAVE_CUDA
            if (gpu) cudaEventRecord(e0, NULL);
#endif
            if (r->st == EPMOE_OK) switch (st) {
                case 0: r->st = epmoe_layer_forward(layer, x, idx, 32, tw, T, out, NULL); break;
                case 1: r->st = epmoe_dispatch(r->ep, &d, EPMOE_PHASE_BOTH, &h, NULL); break;
                case 2:
                    if (sc == EPMOE_SCHEME_W4AFP8) r->st = gpu ? epmoe_w4a8_mlp_cuda(&m, NULL) : epmoe_w4a8_mlp_ref(&m);
                    else r->st = gpu ? epmoe_expert_mlp_cuda(&xm, NULL) : epmoe_expert_mlp_ref(&xm);
                    break;
                case 3: r->st = epmoe_combine(r->ep, h, &c, EPMOE_PHASE_BOTH, NULL); break;
                }
            double us = tool_wall_us() - t0;
#if EPMOE_HAVE_CUDA
            if (gpu) {
                float ms = 0;
                cudaEventRecord(e1, NULL);
                cudaEventSynchronize(e1);
                cudaEventElapsedTime(&ms, e0, e1);
                us = ms * 1000.0;
            }
#endif
            if (r->st == EPMOE_OK && (st == 1 || st == 2)) r->st = epmoe_combine(r->ep, h, &c, EPMOE_PHASE_BOTH, NULL);
            if (it >= warm) t[st][it - warm] = us;
        }
    if (r->st == EPMOE_OK && gpu) r->st = epmoe_ep_poll(r->ep);
    if (r->st != EPMOE_OK) snprintf(r->err, sizeof r->err, "%s", epmoe_last_error());
    for (int st = 0; st < STAGES; st++) {
        qsort(t[st], (size_t)iters, sizeof(double), tool_cmp_double);
        j->us[st] = t[st][iters / 2];
        free(t[st]);
    }
    int32_t *hm = malloc((size_t)L * 4);
#if EPMOE_HAVE_CUDA
    if (gpu) cudaMemcpy(hm, masked, (size_t)L * 4, cudaMemcpyDeviceToHost);
#endif
    if (!gpu) memcpy(hm, masked, (size_t)L * 4);
    j->rows = 0;
    j->active = 0;
    for (int64_t e = 0; e < L; e++) j->rows += hm[e], j->active += hm[e] > 0;
    free(hm);
    epmoe_layer_destroy(layer);
    void *bufs[] = {d13, ds13, d2, ds2, x, idx, tw, out, recv_x, recv_s, masked, eout, ws, q, qs};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) release(gpu, bufs[i]);
}

int cmd_bench(int argc, char **argv) {
    opts o = {NULL, 0, 0, 0, 0, 0, NULL, EPMOE_SCHEME_W4AFP8, 32, 0};
    if (parse("bench", argc, argv, &o)) return 2;
    const int fp8_ok = epmoe_scheme_accepts_wire(o.scheme, EPMOE_WIRE_FP8);
    if (!o.wires) o.wires = fp8_ok ? 3 : 2;
    if ((o.wires & 1) && !fp8_ok)
        return fprintf(stderr, "epmoe bench: the %s scheme reads bf16 activations: BF16 wire only\n", SCHEME[o.scheme]), 2;
    int gpu;
    const int R = pick_ranks(&o, &gpu);
    backend_defaults(&o, gpu, 128, 16, 30, 3);
    const int E = o.experts ? o.experts : o.m->E, H = o.m->H, I = o.m->I, k = o.m->k < E ? o.m->k : E;
    if (E % R) return fprintf(stderr, "epmoe bench: %d experts are not a multiple of the %d ranks\n", E, R), 2;
    if (o.tokens > 1024) return fprintf(stderr, "epmoe bench: --tokens must be <= 1024\n"), 2;
    if (!gpu && o.m != &MODELS[2])
        fprintf(stderr, "epmoe bench: no GPU: the CPU backend runs the scalar references (slow; try --model tiny)\n");
    char sname[32];
    snprintf(sname, sizeof sname, o.scheme == EPMOE_SCHEME_W4A16 ? "%s g%d" : "%s", SCHEME[o.scheme], o.group);
    printf("epmoe bench: %s MoE layer (H %d, I %d, %d experts, top-%d), %s, %d tokens/rank, %d ranks on %s\n",
           o.m->name, H, I, E, k, sname, o.tokens, R, gpu ? "GPUs over NCCL" : "the CPU backend");
    printf("  %-5s %-11s %11s %10s %10s\n", "wire", "stage", "median us", "GB/s", "TFLOP/s");
    FILE *jf = o.json ? fopen(o.json, "w") : NULL;
    if (o.json && !jf) return fprintf(stderr, "epmoe bench: cannot write %s\n", o.json), 1;
    if (jf)
        fprintf(jf, "{\"model\": \"%s\", \"scheme\": \"%s\", \"experts\": %d, \"tokens\": %d, \"ranks\": %d, \"gpu\": %d, "
                    "\"results\": [", o.m->name, sname, E, o.tokens, R, gpu);
    int first = 1;
    for (int wire = 0; wire < 2; wire++) {
        if (!(o.wires & (1 << wire))) continue;
        epmoe_ep_config ec = EPMOE_EP_CONFIG_INIT;
        ec.max_tokens = o.tokens, ec.hidden = H, ec.num_experts = E, ec.top_k = k;
        ec.wire = wire ? EPMOE_WIRE_BF16 : EPMOE_WIRE_FP8;
        pthread_barrier_t bar;
        pthread_barrier_init(&bar, NULL, (unsigned)R);
        bench_job jobs[8];
        void *jp[8];
        for (int q = 0; q < R; q++) {
            memset(&jobs[q], 0, sizeof jobs[q]);
            jobs[q].o = &o, jobs[q].bar = &bar, jp[q] = &jobs[q];
        }
        rank_ctx rs[8];
        const int bad = run_ranks(rs, R, gpu, ec, bench_rank, jp);
        pthread_barrier_destroy(&bar);
        if (bad) return 1;
        /* the slower rank's median; the MLP's bytes are the weights of experts with rows */
        const double bpw = o.scheme == EPMOE_SCHEME_W4AFP8 ? 0.5 + 2.0 / 128 /* int4 + bf16 scales, as shipped */
                           : o.scheme == EPMOE_SCHEME_BF16          ? 2.0
                           : o.scheme == EPMOE_SCHEME_W4A16         ? 0.5 + 4.0 / o.group
                                                                    : 1.0 + 4.0 / (128 * 128);
        const double wbytes_expert = (double)(2 * I * H + H * I) * bpw;
        for (int st = 0; st < STAGES; st++) {
            double us = 0;
            long rows = 0;
            int active = 0;
            for (int q = 0; q < R; q++) {
                us = us > jobs[q].us[st] ? us : jobs[q].us[st];
                if (jobs[q].us[st] >= us) rows = jobs[q].rows, active = jobs[q].active; /* the slower rank's */
            }
            /* GB/s and TFLOP/s: the expert MLP's on GPUs only. The other stages read no weights, and
            ** on the CPU backend the MLP is the scalar reference, whose rates (a few MB/s) say
            ** nothing about the kernels: "-" in the table, null in the JSON. */
            char gbs[32] = "-", tf[32] = "-", jgbs[32] = "null", jtf[32] = "null";
            if (st == 2 && gpu) {
                const double g = wbytes_expert * active / us / 1e3; /* experts without rows cost no bytes */
                const double t = 2.0 * (double)rows * (double)(2 * I * H + H * I) / us / 1e6;
                snprintf(gbs, sizeof gbs, "%.0f", g), snprintf(tf, sizeof tf, "%.1f", t);
                snprintf(jgbs, sizeof jgbs, "%.1f", g), snprintf(jtf, sizeof jtf, "%.2f", t);
            }
            printf("  %-5s %-11s %11.1f %10s %10s\n", wire ? "BF16" : "FP8", STAGE[st], us, gbs, tf);
            if (jf)
                fprintf(jf, "%s\n  {\"wire\": \"%s\", \"stage\": \"%s\", \"us\": %.2f, \"gbs\": %s, \"tflops\": %s}",
                        first ? "" : ",", wire ? "bf16" : "fp8", STAGE[st], us, jgbs, jtf);
            first = 0;
        }
        double sum = 0, layer_us = 0;
        for (int q = 0; q < R; q++) layer_us = layer_us > jobs[q].us[0] ? layer_us : jobs[q].us[0];
        for (int st = 1; st < STAGES; st++) {
            double us = 0;
            for (int q = 0; q < R; q++) us = us > jobs[q].us[st] ? us : jobs[q].us[st];
            sum += us;
        }
        const int casts = wire && (o.scheme == EPMOE_SCHEME_W4AFP8 || o.scheme == EPMOE_SCHEME_W8A8_FP8_BLOCK);
        printf("  %-5s layer / sum of the stages alone: %.1f / %.1f = %.3f%s\n", wire ? "BF16" : "FP8", layer_us, sum,
               layer_us / sum, casts ? " (the layer also casts after receive)" : "");
    }
    if (jf) fprintf(jf, "\n]}\n"), fclose(jf);
    return 0;
}
