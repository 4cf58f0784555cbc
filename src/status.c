/* status.c — status strings, the per-thread last-error message and the version. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"

static _Thread_local char last_error[512];

/* The CUDA runtime's words for "no driver" mislead on a machine without a GPU: the statically
** linked runtime reports "driver version is insufficient" when no NVIDIA driver is loaded at all,
** and the entries that first touch the device (a kernel entry's device probe, cudaSetDevice of an
** NCCL group) pass cudaGetErrorString on. Every message goes through epmoe__fail, so they are said
** plainly here, once for all call sites; the status stays the one the caller returns. */
static const struct {
    const char *cuda, *plain;
} plain_cuda[] = {
    {"CUDA driver version is insufficient for CUDA runtime version",
     "no CUDA GPU/driver available (no NVIDIA driver is loaded, or it is older than the CUDA runtime "
     "this libepmoe was built with)"},
    {"CUDA driver is a stub library",
     "no CUDA GPU/driver available (the libcuda found is the CUDA toolkit's stub, not an NVIDIA driver)"},
};

static void say_plainly(char *msg, size_t cap) {
    for (size_t i = 0; i < sizeof plain_cuda / sizeof plain_cuda[0]; i++) {
        char *at = strstr(msg, plain_cuda[i].cuda);
        if (!at) continue;
        char tail[sizeof last_error];
        snprintf(tail, sizeof tail, "%s", at + strlen(plain_cuda[i].cuda));
        snprintf(at, cap - (size_t)(at - msg), "%s%s", plain_cuda[i].plain, tail);
    }
}

epmoe_status epmoe__fail(epmoe_status s, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    say_plainly(last_error, sizeof last_error);
    return s;
}

const char *epmoe_last_error(void) { return last_error; }

const char *epmoe_status_str(epmoe_status s) {
    switch (s) {
    case EPMOE_OK: return "success";
    case EPMOE_ERR_INVALID_ARG: return "invalid argument (epmoe_last_error() has details)";
    case EPMOE_ERR_NULL_POINTER: return "null pointer (epmoe_last_error() names it)";
    case EPMOE_ERR_MISALIGNED: return "misaligned pointer (epmoe_last_error() names it and the alignment)";
    case EPMOE_ERR_UNSUPPORTED: return "unsupported in this build or on this device";
    case EPMOE_ERR_OUT_OF_MEMORY: return "out of memory";
    case EPMOE_ERR_CUDA: return "CUDA error (epmoe_last_error() has the CUDA message)";
    case EPMOE_ERR_NCCL: return "NCCL error (epmoe_last_error() has the NCCL message)";
    case EPMOE_ERR_TIMEOUT: return "timeout: a peer did not answer";
    case EPMOE_ERR_INTERNAL: return "internal error: please report with epmoe_last_error()";
    }
    return "unknown status";
}

#define EPMOE_STR2(x) #x
#define EPMOE_STR(x) EPMOE_STR2(x)

int epmoe_version(void) { return EPMOE_VERSION_CODE; }

const char *epmoe_version_string(void) {
    return EPMOE_STR(EPMOE_VERSION_MAJOR) "." EPMOE_STR(EPMOE_VERSION_MINOR) "." EPMOE_STR(EPMOE_VERSION_PATCH);
}
