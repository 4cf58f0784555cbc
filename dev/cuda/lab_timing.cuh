/*
** lab_timing.cuh — what the kernel labs under dev/cuda share: the benchmarks' CUDA check (a lab is
** a program, not the library: a failed call ends it) and a "cold" timer (256 MB memset before every repeat so the data is
** not in the 50 MB L2; CUDA events; median).
*/
#pragma once

#include <algorithm>
#include <vector>

#include "../../bench/bench_check.h" /* CU(): a failed CUDA call ends the run */

static float lab_median(std::vector<float> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

/* Median µs of `reps` launches after `warm`, each after a 256 MB memset of `flush`. */
template <class F> static float lab_time_cold(F launch, void *flush, int warm, int reps) {
    cudaEvent_t a, b;
    CU(cudaEventCreate(&a));
    CU(cudaEventCreate(&b));
    std::vector<float> ts;
    for (int i = 0; i < warm + reps; i++) {
        CU(cudaMemsetAsync(flush, i, 256 << 20));
        CU(cudaEventRecord(a));
        launch();
        CU(cudaEventRecord(b));
        CU(cudaEventSynchronize(b));
        float ms;
        CU(cudaEventElapsedTime(&ms, a, b));
        if (i >= warm) ts.push_back(ms * 1000.0f);
    }
    CU(cudaGetLastError());
    cudaEventDestroy(a), cudaEventDestroy(b);
    return lab_median(ts);
}
