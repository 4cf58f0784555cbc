/*
** par.h — the tests' one parallel loop. The fp64 oracles are independent per output element and
** took most of a big case's time (test_w4a8_gpu: 159 s on one core, 27 s on the GPU machine's 16),
** so the checks compute them on every core (EPMOE_TEST_THREADS, default the online CPUs) a block of
** rows at a time and then compare serially, in order: the same numbers, messages and counts whatever
** the thread count.
*/
#ifndef EPMOE_TEST_PAR_H
#define EPMOE_TEST_PAR_H

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

static void *par_run(void *p) {
    const par_job *j = (const par_job *)p;
    j->fn(j->ctx, j->begin, j->end);
    return NULL;
}

static inline int par_threads(void) {
    const char *s = getenv("EPMOE_TEST_THREADS");
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

/* Rows of an N-wide output in one oracle block: ~2M elements (32 MB of values and magnitudes). */
static inline int64_t par_block_rows(int64_t N) { return N < 1 ? 1 : N >= (1 << 21) ? 1 : (1 << 21) / N; }

#endif
