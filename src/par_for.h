/*
** par_for.h — the one parallel loop of the CPU references (experts.c, w4a8.c) and of the tests'
** fp64 oracles (tests/w4a8_common.h, tests/experts_common.h). Both compute each output element
** alone, in a fixed order, so handing ranges of elements to threads changes no bit: the results do
** not depend on EPMOE_CPU_THREADS (the threads a loop may use; default the online CPUs, at most 64).
** Why: the references are the CPU backend's expert compute and the GPU tests' truth, and on one
** core the oracle took most of a big test (test_w4a8_gpu: 159 s on one core, 27 s on the GPU
** machine's 16). Header-only (static inline), so the tests use it without the library's internals.
*/
#ifndef EPMOE_PAR_FOR_H
#define EPMOE_PAR_FOR_H

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>

#define PAR_MAX_THREADS 64

typedef void (*par_body)(void *ctx, int64_t begin, int64_t end);
typedef struct par_job {
    par_body fn;
    void *ctx;
    int64_t begin, end;
} par_job;

static inline void *par_run(void *p) {
    const par_job *j = (const par_job *)p;
    j->fn(j->ctx, j->begin, j->end);
    return NULL;
}

static inline int par_threads(void) {
    const char *s = getenv("EPMOE_CPU_THREADS");
    const long n = s && *s ? strtol(s, NULL, 10) : sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : n > PAR_MAX_THREADS ? PAR_MAX_THREADS : (int)n;
}

/* fn(ctx, begin, end) over [0, n) in contiguous ranges of at least `grain` items, one a thread (the
** caller's thread takes the first). A thread that cannot be started runs its range on the caller's. */
static inline void par_for(int64_t n, int64_t grain, par_body fn, void *ctx) {
    int64_t T = par_threads();
    const int64_t most = grain < 1 ? n : (n + grain - 1) / grain;
    if (T > most) T = most;
    if (T <= 1) {
        if (n > 0) fn(ctx, 0, n);
        return;
    }
    pthread_t th[PAR_MAX_THREADS];
    par_job jobs[PAR_MAX_THREADS];
    int started[PAR_MAX_THREADS];
    for (int64_t t = 0; t < T; t++) jobs[t] = (par_job){fn, ctx, n * t / T, n * (t + 1) / T};
    for (int64_t t = 1; t < T; t++) started[t] = pthread_create(&th[t], NULL, par_run, &jobs[t]) == 0;
    par_run(&jobs[0]);
    for (int64_t t = 1; t < T; t++) {
        if (started[t]) pthread_join(th[t], NULL);
        else par_run(&jobs[t]);
    }
}

/* A range's scratch memory: malloc(bytes), or NULL with *failed set (atomically: ranges run at once;
** the caller reads it after par_for returns). */
static inline void *par_scratch(size_t bytes, int *failed) {
    void *p = malloc(bytes);
    if (!p) __atomic_store_n(failed, 1, __ATOMIC_RELAXED);
    return p;
}

/* Rows of an N-wide output in one oracle block: ~2M elements (32 MB of values and magnitudes). */
static inline int64_t par_block_rows(int64_t N) { return N < 1 ? 1 : N >= (1 << 21) ? 1 : (1 << 21) / N; }

#endif
