/*
** lab_timing.cuh — what the kernel labs under dev/cuda share: the benchmarks' CUDA check (a lab is
** a program, not the library: a failed call ends it) and a "cold" timer (256 MB memset before every repeat so the data is
** not in the 50 MB L2; CUDA events; median).
*/
#pragma once

#include <algorithm>
#include <cstdio>
#include <vector>

#include "../../bench/bench_check.h" /* CU(): a failed CUDA call ends the run */

static float lab_median(std::vector<float> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

/* µs of one launch() between two events on the default stream. */
template <class F> static float lab_event_us(F launch, cudaEvent_t a, cudaEvent_t b) {
    CU(cudaEventRecord(a));
    launch();
    CU(cudaEventRecord(b));
    CU(cudaEventSynchronize(b));
    float ms;
    CU(cudaEventElapsedTime(&ms, a, b));
    return ms * 1000.0f;
}

/* Median µs of `reps` launches after `warm`, each after a 256 MB memset of `flush`. */
template <class F> static float lab_time_cold(F launch, void *flush, int warm, int reps) {
    cudaEvent_t a, b;
    CU(cudaEventCreate(&a));
    CU(cudaEventCreate(&b));
    std::vector<float> ts;
    for (int i = 0; i < warm + reps; i++) {
        CU(cudaMemsetAsync(flush, i, 256 << 20));
        const float us = lab_event_us(launch, a, b);
        if (i >= warm) ts.push_back(us);
    }
    CU(cudaGetLastError());
    cudaEventDestroy(a), cudaEventDestroy(b);
    return lab_median(ts);
}

/* Median us of `reps` launches (after one warm-up; nothing flushed: for kernels that time on-chip
** work) and the SM clock the kernel ran at: launch() must add each CTA's clock64 span to stamps[0]
** and its %globaltimer span (ns) to stamps[1]. Returns the median; *ghz gets the mean clock. */
template <class F> static float lab_time_clocked(F launch, unsigned long long *stamps, int reps, double *ghz) {
    launch();
    CU(cudaDeviceSynchronize());
    cudaEvent_t a, b;
    CU(cudaEventCreate(&a));
    CU(cudaEventCreate(&b));
    std::vector<float> ts;
    *ghz = 0;
    for (int i = 0; i < reps; i++) {
        CU(cudaMemset(stamps, 0, 2 * sizeof *stamps));
        ts.push_back(lab_event_us(launch, a, b));
        unsigned long long h[2];
        CU(cudaMemcpy(h, stamps, sizeof h, cudaMemcpyDeviceToHost));
        *ghz += (double)h[0] / (double)h[1] / reps;
    }
    cudaEventDestroy(a), cudaEventDestroy(b);
    return lab_median(ts);
}

/* The device's SM count, its name printed first with the lab's title. */
static int lab_sms(const char *title) {
    int dev = 0, sms = 0;
    CU(cudaGetDevice(&dev));
    CU(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    cudaDeviceProp prop;
    CU(cudaGetDeviceProperties(&prop, dev));
    printf("%s, %d SMs; %s\n", prop.name, sms, title);
    return sms;
}
