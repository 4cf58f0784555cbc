/*
** test.h — the whole test framework: CHECK/CHECK_EQ record a failure (and print the first
** few) without stopping, test_report() prints the total and gives the exit code. Tolerances are
** named constants in each test file, next to the error model that justifies them.
*/
#ifndef EPMOE_TEST_H
#define EPMOE_TEST_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "epmoe.h"

static long test_checks, test_failures;

#define CHECK(cond, ...)                                                                                               \
    do {                                                                                                               \
        test_checks++;                                                                                                 \
        if (!(cond)) {                                                                                                 \
            if (++test_failures <= 20) {                                                                               \
                printf("  FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);                                               \
                printf(__VA_ARGS__);                                                                                   \
                printf("\n");                                                                                          \
            }                                                                                                          \
        }                                                                                                              \
    } while (0)

/* A call's status must be exactly `want` (and a failing call must leave a message). */
#define CHECK_STATUS(call, want)                                                                                       \
    do {                                                                                                               \
        epmoe_status got_ = (call);                                                                                    \
        CHECK(got_ == (want), "%s returned %d (%s), want %d; last error: %s", #call, (int)got_,                        \
              epmoe_status_str(got_), (int)(want), epmoe_last_error());                                                \
        if ((want) != EPMOE_OK) CHECK(epmoe_last_error()[0] != 0, "no message for a failed call");                    \
    } while (0)

static inline int test_report(const char *name) {
    printf("%s: %ld checks, %ld failures\n", name, test_checks, test_failures);
    return test_failures ? 1 : 0;
}

/* Deterministic per-test random numbers (xorshift64*); seeds are printed so a failure repeats. */
typedef struct { uint64_t s; } test_rng;
static inline uint64_t rng_u64(test_rng *r) {
    r->s ^= r->s >> 12;
    r->s ^= r->s << 25;
    r->s ^= r->s >> 27;
    return r->s * 0x2545F4914F6CDD1DULL;
}
static inline double rng_uniform(test_rng *r) { return (double)(rng_u64(r) >> 11) * (1.0 / 9007199254740992.0); }
static inline double rng_normal(test_rng *r) {
    double u = rng_uniform(r), v = rng_uniform(r);
    return sqrt(-2.0 * log(u + 1e-300)) * cos(6.283185307179586 * v);
}

/* Same value, NaN matching NaN (payloads are unspecified). */
static inline int same_float(float a, float b) { return (isnan(a) && isnan(b)) || memcmp(&a, &b, sizeof a) == 0; }

#endif
