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
