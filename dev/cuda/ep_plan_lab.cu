/*
** ep_plan_lab.cu — kernel lab for dispatch's plan (make_plan in src/ep/ep_dispatch.cu): the row
** of every (token, slot) in its expert, the message slot of every (token, destination rank), the
** counts. Every block of the send kernel computes it in shared memory before it sends anything,
** so its latency is on the critical path of every dispatch. Nsight Compute on 1 x H200
** (2026-11-30, 128 tokens x top-8, E 256) put about half of the send kernel's stall samples in
** the plan's phases and barriers; the send kernel took 26 us at R = 1 for ~1 MB of payload.
**   v0  the library's plan (make_plan, compiled from ep_dispatch.cu itself)
**   v1  bit masks: a bit per token in [E + R][ceil(N/32)] words (atomicOr is order-free, so the
**       result stays deterministic), per-key prefix counts over the words, then each entry's
**       rank = prefix + popc of the lower bits of its word; first/opener by scanning its own
**       token's earlier slots. Depth: 3 barriers, no serial per-token loop over k^2 pairs, no
**       per-warp ranking rounds. dedup = 1 only (one message per token and destination).
** Check: v1's dst/row/slot/first/opener of every valid entry and the counts equal v0's, on random
** routings with repeated experts, -1 slots, a masked-out rank, T = 0, 1, 3, N.
** Time: a kernel of min(T, 132) blocks of 256 threads (as the send kernel) that only computes the
** plan; 20 launches captured in a CUDA graph, time per launch, median of 15 replays; an empty
** kernel of the same grid gives the launch floor.
** Build: make dev-labs; run: ./build/dev/ep_plan_lab
*/
#include "../../src/ep/ep_dispatch.cu"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define CK(x)                                                                                                          \
    do {                                                                                                               \
        cudaError_t e_ = (x);                                                                                          \
        if (e_ != cudaSuccess) {                                                                                       \
            std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__);                     \
            std::exit(2);                                                                                              \
        }                                                                                                              \
    } while (0)

namespace epk {
namespace {

struct PlanOut { /* block 0's plan, copied out for the check */
    int16_t *idx, *row, *slot, *dst;
    uint8_t *first, *opener;
    int *count;
};

__device__ void copy_out(const Plan &pl, int n, int keys, PlanOut o) {
    for (int i = threadIdx.x; i < n; i += kThreads) {
        o.idx[i] = pl.idx[i], o.row[i] = pl.row[i], o.slot[i] = pl.slot[i], o.dst[i] = pl.dst[i];
        o.first[i] = pl.first[i], o.opener[i] = pl.opener[i];
    }
    for (int i = threadIdx.x; i < keys; i += kThreads) o.count[i] = pl.count[i];
}

size_t v0_smem(const ep_dims &d) { /* as launch_dispatch_send */
    const int keys = d.E + d.R;
    return sizeof(int) * (size_t)(keys + (kThreads / 32) * keys) + 10 * (size_t)d.N * d.k;
}

__global__ void __launch_bounds__(kThreads, 1) plan_v0(Params p, const int32_t *topk, int T, PlanOut o, int copy) {
    const ep_dims &d = p.d;
    extern __shared__ __align__(16) uint8_t smem[];
    Plan pl;
    pl.count = reinterpret_cast<int *>(smem);
    pl.warp_count = pl.count + d.E + d.R;
    pl.idx = reinterpret_cast<int16_t *>(pl.warp_count + (kThreads / 32) * (d.E + d.R));
    pl.row = pl.idx + d.N * d.k;
    pl.slot = pl.row + d.N * d.k;
    pl.dst = pl.slot + d.N * d.k;
    pl.first = reinterpret_cast<uint8_t *>(pl.dst + d.N * d.k);
    pl.opener = pl.first + d.N * d.k;
    make_plan(p, topk, 32, T, pl);
    if (copy && blockIdx.x == 0) copy_out(pl, T * d.k, d.E + d.R, o);
}

/* v1's shared memory: masks and prefixes [keys][W], counts [keys], then the Plan arrays. */
size_t v1_smem(const ep_dims &d) {
    const int keys = d.E + d.R, W = (d.N + 31) / 32;
    return sizeof(uint32_t) * (size_t)keys * W * 2 + sizeof(int) * (size_t)keys + 10 * (size_t)d.N * d.k;
}

__device__ void make_plan_v1(const Params &p, const int32_t *topk, int T, uint32_t *mask, int *pre, Plan pl) {
    const ep_dims &d = p.d;
    const int k = d.k, n = T * k, W = (d.N + 31) / 32, keys = d.E + d.R;
    for (int i = threadIdx.x; i < keys * W; i += kThreads) mask[i] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += kThreads) {
        int e = __ldg(topk + i);
        if (e < -1 || e >= d.E) {
            set_error(p, kErrBadExpert, i / k, 0);
            e = -1;
        }
        if (e >= 0 && !p.active[e / d.L]) e = -1;
        pl.idx[i] = (int16_t)e;
        if (e >= 0) { /* one bit per (key, token): repeated experts and destinations count once */
            const int t = i / k;
            const uint32_t bit = 1u << (t & 31);
            atomicOr(mask + e * W + (t >> 5), bit);
            atomicOr(mask + (d.E + e / d.L) * W + (t >> 5), bit);
        }
    }
    __syncthreads();
    for (int key = threadIdx.x; key < keys; key += kThreads) {
        int acc = 0;
        for (int w = 0; w < W; w++) {
            pre[key * W + w] = acc;
            acc += __popc(mask[key * W + w]);
        }
        pl.count[key] = acc;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += kThreads) {
        const int t = i / k, j = i - t * k, e = pl.idx[i];
        if (e < 0) {
            pl.dst[i] = -1;
            continue;
        }
        const int dst = e / d.L;
        int f = j, o = j;
        for (int jj = j - 1; jj >= 0; jj--) {
            const int e2 = pl.idx[t * k + jj];
            if (e2 == e) f = jj;
            if (e2 >= 0 && e2 / d.L == dst) o = jj;
        }
        const int w = t >> 5;
        const uint32_t lt = (1u << (t & 31)) - 1u;
        pl.dst[i] = (int16_t)dst, pl.first[i] = (uint8_t)f, pl.opener[i] = (uint8_t)o;
        pl.row[i] = (int16_t)(pre[e * W + w] + __popc(mask[e * W + w] & lt));
        pl.slot[i] = (int16_t)(pre[(d.E + dst) * W + w] + __popc(mask[(d.E + dst) * W + w] & lt));
    }
    __syncthreads();
}

__global__ void __launch_bounds__(kThreads, 1) plan_v1(Params p, const int32_t *topk, int T, PlanOut o, int copy) {
    const ep_dims &d = p.d;
    const int keys = d.E + d.R, W = (d.N + 31) / 32;
    extern __shared__ __align__(16) uint8_t smem[];
    uint32_t *mask = reinterpret_cast<uint32_t *>(smem);
    int *pre = reinterpret_cast<int *>(mask + keys * W);
    Plan pl;
    pl.count = pre + keys * W;
    pl.warp_count = nullptr;
    pl.idx = reinterpret_cast<int16_t *>(pl.count + keys);
    pl.row = pl.idx + d.N * d.k;
    pl.slot = pl.row + d.N * d.k;
    pl.dst = pl.slot + d.N * d.k;
    pl.first = reinterpret_cast<uint8_t *>(pl.dst + d.N * d.k);
    pl.opener = pl.first + d.N * d.k;
    make_plan_v1(p, topk, T, mask, pre, pl);
    if (copy && blockIdx.x == 0) copy_out(pl, T * d.k, keys, o);
}

__global__ void empty_kernel() {}

} // namespace
} // namespace epk

using namespace epk;

struct Case {
    int R, N, E, k, T, dups, masked_rank;
};

static unsigned long long rng = 0x9E3779B97F4A7C15ull;
static unsigned rnd() {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (unsigned)(rng >> 16);
}

static PlanOut alloc_out(int n, int keys) {
    PlanOut o;
    CK(cudaMalloc(&o.idx, (size_t)n * 2 + 2));
    CK(cudaMalloc(&o.row, (size_t)n * 2 + 2));
    CK(cudaMalloc(&o.slot, (size_t)n * 2 + 2));
    CK(cudaMalloc(&o.dst, (size_t)n * 2 + 2));
    CK(cudaMalloc(&o.first, (size_t)n + 1));
    CK(cudaMalloc(&o.opener, (size_t)n + 1));
    CK(cudaMalloc(&o.count, (size_t)keys * 4));
    return o;
}

static void free_out(PlanOut &o) {
    cudaFree(o.idx), cudaFree(o.row), cudaFree(o.slot), cudaFree(o.dst), cudaFree(o.first), cudaFree(o.opener);
    cudaFree(o.count);
}

template <typename T> static std::vector<T> host(const T *d, int n) {
    std::vector<T> h((size_t)(n > 0 ? n : 1));
    if (n > 0) CK(cudaMemcpy(h.data(), d, sizeof(T) * (size_t)n, cudaMemcpyDeviceToHost));
    return h;
}

template <typename K> static double time_graph(K launch, cudaStream_t s) {
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    for (int i = 0; i < 20; i++) launch();
    CK(cudaStreamEndCapture(s, &g));
    CK(cudaGraphInstantiate(&ge, g, 0));
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    std::vector<float> t;
    for (int rep = 0; rep < 17; rep++) {
        CK(cudaEventRecord(a, s));
        CK(cudaGraphLaunch(ge, s));
        CK(cudaEventRecord(b, s));
        CK(cudaEventSynchronize(b));
        float ms;
        CK(cudaEventElapsedTime(&ms, a, b));
        if (rep >= 2) t.push_back(ms * 1000.0f / 20);
    }
    std::sort(t.begin(), t.end());
    cudaGraphExecDestroy(ge), cudaGraphDestroy(g), cudaEventDestroy(a), cudaEventDestroy(b);
    return t[t.size() / 2];
}

int main() {
    const Case cases[] = {
        {1, 128, 256, 8, 128, 0, -1}, {2, 128, 256, 8, 128, 1, -1}, {2, 128, 256, 8, 128, 1, 1},
        {8, 128, 256, 8, 128, 1, -1}, {2, 256, 256, 8, 256, 0, -1}, {2, 128, 384, 8, 128, 0, -1},
        {2, 128, 256, 8, 0, 0, -1},   {2, 128, 256, 8, 1, 1, -1},   {3, 100, 96, 6, 3, 1, -1},
        {2, 1024, 256, 8, 1024, 0, -1}};
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    int sms = 0;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    int *error;
    CK(cudaMalloc(&error, 4));
    CK(cudaMemset(error, 0, 4));
    int bad = 0;
    std::printf("ep_plan_lab: dispatch's plan per block (us per launch of min(T, %d) blocks x %d threads)\n", sms, kThreads);
    std::printf("%-3s %-5s %-4s %-3s %-5s %-5s %-6s %9s %9s %9s  %s\n", "R", "N", "E", "k", "T", "dups", "masked", "empty",
                "v0", "v1", "check");
    for (const Case &c : cases) {
        Params p;
        std::memset(&p, 0, sizeof p);
        ep_dims_init(&p.d, c.R, 0, c.N, 7168, c.E, c.k, 1, 1, 1);
        std::vector<int> act((size_t)c.R, 1);
        if (c.masked_rank >= 0) act[(size_t)c.masked_rank] = 0;
        int *dact;
        CK(cudaMalloc(&dact, sizeof(int) * (size_t)c.R));
        CK(cudaMemcpy(dact, act.data(), sizeof(int) * (size_t)c.R, cudaMemcpyHostToDevice));
        p.active = dact, p.error = error;
        const int n = c.T * c.k, keys = c.E + c.R;
        std::vector<int32_t> topk((size_t)(n > 0 ? n : 1));
        for (int t = 0; t < c.T; t++)
            for (int j = 0; j < c.k; j++) {
                int e = (int)(rnd() % (unsigned)c.E);
                if (c.dups && j > 0 && rnd() % 4 == 0) e = topk[(size_t)(t * c.k + j - 1)]; /* a repeated expert */
                if (rnd() % 7 == 0) e = -1;
                topk[(size_t)(t * c.k + j)] = e;
            }
        int32_t *dtopk;
        CK(cudaMalloc(&dtopk, sizeof(int32_t) * topk.size()));
        CK(cudaMemcpy(dtopk, topk.data(), sizeof(int32_t) * topk.size(), cudaMemcpyHostToDevice));
        PlanOut o0 = alloc_out(n, keys), o1 = alloc_out(n, keys);
        const size_t s0 = v0_smem(p.d), s1 = v1_smem(p.d);
        CK(cudaFuncSetAttribute(plan_v0, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)s0));
        CK(cudaFuncSetAttribute(plan_v1, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)s1));
        const int blocks = c.T < 1 ? 1 : (c.T < sms ? c.T : sms);
        plan_v0<<<blocks, kThreads, s0, s>>>(p, dtopk, c.T, o0, 1);
        plan_v1<<<blocks, kThreads, s1, s>>>(p, dtopk, c.T, o1, 1);
        CK(cudaStreamSynchronize(s));
        CK(cudaGetLastError());
        /* every valid entry must agree; invalid entries only in dst (-1) */
        const auto i0 = host(o0.idx, n), i1 = host(o1.idx, n), r0 = host(o0.row, n), r1 = host(o1.row, n);
        const auto l0 = host(o0.slot, n), l1 = host(o1.slot, n), d0 = host(o0.dst, n), d1 = host(o1.dst, n);
        const auto f0 = host(o0.first, n), f1 = host(o1.first, n), q0 = host(o0.opener, n), q1 = host(o1.opener, n);
        const auto c0 = host(o0.count, keys), c1 = host(o1.count, keys);
        long diff = 0;
        for (int i = 0; i < n; i++) {
            diff += i0[(size_t)i] != i1[(size_t)i] || d0[(size_t)i] != d1[(size_t)i];
            if (i0[(size_t)i] >= 0)
                diff += r0[(size_t)i] != r1[(size_t)i] || l0[(size_t)i] != l1[(size_t)i] || f0[(size_t)i] != f1[(size_t)i] ||
                        q0[(size_t)i] != q1[(size_t)i];
        }
        for (int i = 0; i < keys; i++) diff += c0[(size_t)i] != c1[(size_t)i];
        bad += diff != 0;
        const double te = time_graph([&] { empty_kernel<<<blocks, kThreads, 0, s>>>(); }, s);
        const double t0 = time_graph([&] { plan_v0<<<blocks, kThreads, s0, s>>>(p, dtopk, c.T, o0, 0); }, s);
        const double t1 = time_graph([&] { plan_v1<<<blocks, kThreads, s1, s>>>(p, dtopk, c.T, o1, 0); }, s);
        std::printf("%-3d %-5d %-4d %-3d %-5d %-5d %-6d %9.2f %9.2f %9.2f  %s\n", c.R, c.N, c.E, c.k, c.T, c.dups,
                    c.masked_rank, te, t0, t1, diff ? "DIFFERS" : "same");
        free_out(o0), free_out(o1);
        cudaFree(dtopk), cudaFree(dact);
    }
    cudaFree(error);
    std::printf("ep_plan_lab: %s\n", bad ? "v1 DIFFERS from v0" : "v1 equals v0 on every case");
    return bad ? 1 : 0;
}
