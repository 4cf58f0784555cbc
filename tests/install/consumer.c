/*
** consumer.c — a program built against an installed epmoe (tests/test_install.sh), the way a user
** builds one: `#include <epmoe.h>` and the flags pkg-config or CMake's find_package give. It checks
** that the header and the library it loaded are the same release and that a call computes:
** one row of bf16 ones through the per-token-group cast gives fp8 448 (0x7E) and scale 1/448.
** Exit 0 when all holds; its output names what did not.
*/
#include <epmoe.h>
#include <stdio.h>

int main(void) {
    int fail = 0;
    if (epmoe_version() != EPMOE_VERSION_CODE) {
        printf("header %d, library %d\n", EPMOE_VERSION_CODE, epmoe_version());
        fail = 1;
    }
    uint16_t x[EPMOE_GROUP];
    uint8_t q[EPMOE_GROUP];
    float sc[64] = {0}; /* scales: epmoe_scale_bytes(F32_MMAJOR, 1, 128) bytes, at most this */
    for (int k = 0; k < EPMOE_GROUP; k++) x[k] = 0x3F80; /* bf16 1.0 */
    if (epmoe_scale_bytes(EPMOE_SCALE_F32_MMAJOR, 1, EPMOE_GROUP) > sizeof sc) return printf("scale bytes\n"), 1;
    const epmoe_status st = epmoe_cast_group_fp8_ref(x, 1, EPMOE_GROUP, q, sc, EPMOE_SCALE_F32_MMAJOR, 0);
    if (st != EPMOE_OK) {
        printf("cast_group: %s: %s\n", epmoe_status_str(st), epmoe_last_error());
        return 1;
    }
    for (int k = 0; k < EPMOE_GROUP; k++) fail |= q[k] != 0x7E;
    if (sc[0] != 1.0f / 448.0f) printf("scale %.9g, want 1/448\n", (double)sc[0]), fail = 1;
    /* a bad argument is a status, not a crash */
    if (epmoe_cast_group_fp8_ref(NULL, 1, EPMOE_GROUP, q, sc, EPMOE_SCALE_F32_MMAJOR, 0) != EPMOE_ERR_NULL_POINTER)
        printf("NULL x: no EPMOE_ERR_NULL_POINTER\n"), fail = 1;
    printf("%s: epmoe %s, cast %s\n", fail ? "FAIL" : "ok", epmoe_version_string(), fail ? "wrong" : "right");
    return fail;
}
