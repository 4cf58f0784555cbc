/* bench_check.h — the benchmarks' error checks: a failed CUDA or epmoe call ends the run. */
#pragma once
#include <cuda_runtime_api.h>
#include <stdio.h>
#include <stdlib.h>

#include "epmoe.h"

#define CU(call)                                                                                                       \
    do {                                                                                                               \
        cudaError_t e_ = (call);                                                                                       \
        if (e_ != cudaSuccess) {                                                                                       \
            printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__);                           \
            exit(2);                                                                                                   \
        }                                                                                                              \
    } while (0)
#define EP(call)                                                                                                       \
    do {                                                                                                               \
        epmoe_status s_ = (call);                                                                                      \
        if (s_ != EPMOE_OK) {                                                                                          \
            printf("epmoe error %s at %s:%d: %s\n", epmoe_status_str(s_), __FILE__, __LINE__, epmoe_last_error());    \
            exit(2);                                                                                                   \
        }                                                                                                              \
    } while (0)
