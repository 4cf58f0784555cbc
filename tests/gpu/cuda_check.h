/* cuda_check.h — the GPU tests' one CUDA error check: a failed runtime call ends the test run. */
#ifndef EPMOE_CUDA_CHECK_H
#define EPMOE_CUDA_CHECK_H
#include <cuda_runtime_api.h>
#include <stdio.h>
#include <stdlib.h>

#define CUDA_OK(call)                                                                                                  \
    do {                                                                                                               \
        cudaError_t e_ = (call);                                                                                       \
        if (e_ != cudaSuccess) {                                                                                       \
            printf("CUDA error %s at %s:%d: %s\n", cudaGetErrorString(e_), __FILE__, __LINE__, #call);               \
            exit(2);                                                                                                   \
        }                                                                                                              \
    } while (0)
#endif
