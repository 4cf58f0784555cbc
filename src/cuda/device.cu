/* device.cu — what the library can tell about the CUDA devices of this process. */
#include "common.cuh"

extern "C" int epmoe_cuda_device_count(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError(); /* no driver or no device: not an error of the caller's stream */
        return 0;
    }
    return n;
}

/* Device buffers of the layer (layer.c is C and sees no CUDA header): zeroed on allocation. */
extern "C" epmoe_status epmoe__dev_alloc(const char *fn, size_t bytes, void **p) {
    *p = nullptr;
    cudaError_t err = cudaMalloc(p, bytes ? bytes : 16);
    if (err == cudaSuccess) err = cudaMemset(*p, 0, bytes ? bytes : 16);
    if (err != cudaSuccess) {
        if (*p) cudaFree(*p), *p = nullptr;
        return epmoe__fail(err == cudaErrorMemoryAllocation ? EPMOE_ERR_OUT_OF_MEMORY : EPMOE_ERR_CUDA,
                           "%s: cudaMalloc of %zu bytes: %s", fn, bytes, cudaGetErrorString(err));
    }
    return EPMOE_OK;
}

extern "C" void epmoe__dev_free(void *p) {
    if (p) cudaFree(p);
}

extern "C" epmoe_status epmoe__dev_sync(const char *fn) {
    const cudaError_t err = cudaDeviceSynchronize();
    return err == cudaSuccess ? EPMOE_OK : epmoe__fail(EPMOE_ERR_CUDA, "%s: %s", fn, cudaGetErrorString(err));
}
