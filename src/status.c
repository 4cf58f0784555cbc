/* status.c — status strings, the per-thread last-error message and the version. */
#include <stdarg.h>
#include <stdio.h>

#include "internal.h"

static _Thread_local char last_error[512];

epmoe_status epmoe__fail(epmoe_status s, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
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
