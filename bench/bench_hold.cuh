/* bench_hold.cuh — holding a stream while the host enqueues timed work behind it, so CUDA events
** time the GPU's work and not the host's launch cost (an idle GPU would wait for the host, and
** that wait would be timed). bench_ep and bench_w4a8 launch it before each timed iteration. */
#pragma once

/* Spins one thread for ns nanoseconds of the GPU's global timer. */
static __global__ void bench_hold(unsigned long long ns) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); while (t - t0 < ns);
}
