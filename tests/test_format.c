/*
** test_format.c — the number formats of format.h against independent oracles:
**   fp8 e4m3fn encoder over all 2^32 float bit patterns (par_for; EPMOE_TEST_QUICK=1 strides
**   through them instead, for the sanitizer builds), the decoder over all 256 codes, bf16,
**   UE8M0, int4 packing, group scales and the scale layouts.
*/
#include "../src/format.h"
#include "par_for.h"
#include "test.h"

/* ---- independent fp8 oracle: nearest of the 127 finite non-negative values, ties to even code */
static double fp8_value[127]; /* codes 0x00..0x7E, ascending */

static void oracle_init(void) {
    for (int c = 0; c < 127; c++) {
        int e = (c >> 3) & 15, m = c & 7;
        fp8_value[c] = e == 0 ? ldexp(m, -9) : ldexp(8 + m, e - 10);
    }
}

static uint8_t oracle_fp8(uint32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof f);
    if (isnan(f)) return 0x7F;
    uint8_t sign = (bits >> 31) ? 0x80 : 0;
    double a = fabs((double)f);
    if (a >= 448.0) return sign | 0x7E;
    int lo = 0, hi = 126; /* largest i with value[i] <= a */
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (fp8_value[mid] <= a) lo = mid;
        else hi = mid - 1;
    }
    int c = lo;
    if (lo < 126) {
        double d_lo = a - fp8_value[lo], d_hi = fp8_value[lo + 1] - a;
        if (d_hi < d_lo || (d_hi == d_lo && (lo & 1))) c = lo + 1;
    }
    return sign | (uint8_t)c;
}

/* The sweep over patterns i * step, i in [begin, end): par_for's body; ranges add their counts and
** lower the first mismatch atomically (they run at once). */
typedef struct {
    uint64_t step, mismatches, first_bad;
} fp8_sweep_ctx;

static void fp8_sweep(void *p, int64_t begin, int64_t end) {
    fp8_sweep_ctx *c = p;
    uint64_t bad = 0, first = UINT64_MAX;
    for (int64_t i = begin; i < end; i++) {
        const uint32_t u = (uint32_t)((uint64_t)i * c->step);
        float f;
        memcpy(&f, &u, sizeof f);
        if (fmt_fp8_from_float(f) != oracle_fp8(u)) {
            if (!bad) first = u;
            bad++;
        }
    }
    __atomic_fetch_add(&c->mismatches, bad, __ATOMIC_RELAXED);
    uint64_t cur = __atomic_load_n(&c->first_bad, __ATOMIC_RELAXED);
    while (first < cur && !__atomic_compare_exchange_n(&c->first_bad, &cur, first, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
}

static void test_fp8_encoder_all_floats(int quick) {
    /* 4099 is prime: the sample walks every exponent and mantissa pattern */
    fp8_sweep_ctx c = {quick ? 4099 : 1, 0, UINT64_MAX};
    const int64_t n = (int64_t)(((UINT64_C(1) << 32) + c.step - 1) / c.step);
    par_for(n, 1 << 20, fp8_sweep, &c);
    const uint64_t bad = c.mismatches, first = c.first_bad;
    CHECK(bad == 0, "%llu of the float patterns encode differently from the oracle; first 0x%08llx",
          (unsigned long long)bad, (unsigned long long)first);
    printf("  fp8 encoder vs oracle: %s float patterns, %llu mismatches\n", quick ? "2^32/4099" : "all 2^32",
           (unsigned long long)bad);
}

static void test_fp8_specials(void) {
    /* Hand-computed codes: 1.0 = e7 m0; 448 = 0x7E; 1.125 = e7 m1; 2^-9 = smallest subnormal. */
    const struct { float f; uint8_t want; } cases[] = {
        {0.0f, 0x00}, {-0.0f, 0x80}, {1.0f, 0x38}, {-1.0f, 0xB8}, {1.125f, 0x39}, {448.0f, 0x7E}, {-448.0f, 0xFE},
        {449.0f, 0x7E}, {1e30f, 0x7E}, {INFINITY, 0x7E}, {-INFINITY, 0xFE}, {NAN, 0x7F}, {-NAN, 0x7F},
        {0.001953125f, 0x01}, {0.0009765625f, 0x00}, {0.0009765626f, 0x01}, {0.0029296875f, 0x02},
        {0.015625f, 0x08}, {240.0f, 0x77}, {232.0f, 0x76}, {1.0625f, 0x38}, {1.1875f, 0x3A}, {224.0f, 0x76},
        {1e-45f, 0x00}, {-1e-45f, 0x80},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        CHECK(fmt_fp8_from_float(cases[i].f) == cases[i].want, "encode(%g) = 0x%02x, want 0x%02x", cases[i].f,
              fmt_fp8_from_float(cases[i].f), cases[i].want);
    CHECK(epmoe_fp8_e4m3_from_float(1.0f) == 0x38, "exported encoder");
}

static void test_fp8_decoder(void) {
    for (int c = 0; c < 256; c++) {
        float f = fmt_fp8_to_float((uint8_t)c);
        int mag = c & 0x7F;
        if (mag == 0x7F) {
            CHECK(isnan(f), "decode(0x%02x) = %g, want NaN", c, f);
            continue;
        }
        double want = (c & 0x80 ? -1 : 1) * fp8_value[mag];
        CHECK((double)f == want && !!signbit(f) == !!(c & 0x80), "decode(0x%02x) = %g, want %g", c, f, want);
        CHECK(fmt_fp8_from_float(f) == (uint8_t)c, "encode(decode(0x%02x)) = 0x%02x", c, fmt_fp8_from_float(f));
        CHECK(epmoe_fp8_e4m3_to_float((uint8_t)c) == f || (mag == 0), "exported decoder");
    }
}

static void test_bf16(int quick) {
    /* Oracle: the nearer of the two bf16 neighbours of f, in double; ties to even. */
    uint64_t bad = 0, step = quick ? 65537 : 257;
    for (uint64_t b = 0; b < (UINT64_C(1) << 32); b += step) {
        uint32_t u = (uint32_t)b;
        float f;
        memcpy(&f, &u, sizeof f);
        uint16_t got = fmt_bf16_from_float(f);
        if (isnan(f)) {
            float g = fmt_bf16_to_float(got);
            bad += !isnan(g) || (got >> 15) != (u >> 31);
            continue;
        }
        uint32_t lo = u & 0xFFFF0000u, hi = lo + 0x10000u; /* truncation and the next bf16 away from 0 */
        float flo, fhi;
        memcpy(&flo, &lo, sizeof flo);
        memcpy(&fhi, &hi, sizeof fhi);
        /* Past the largest finite bf16 the next value is inf; RNE treats it as 2^128. */
        double dhi = isinf(fhi) ? copysign(ldexp(1.0, 128), f) : (double)fhi;
        double dl = fabs((double)f - flo), dh = isinf(flo) ? INFINITY : fabs(dhi - f);
        uint16_t want = (uint16_t)((dh < dl || (dh == dl && ((lo >> 16) & 1))) ? hi >> 16 : lo >> 16);
        bad += got != want;
    }
    CHECK(bad == 0, "%llu bf16 encodings differ from the oracle", (unsigned long long)bad);
    CHECK(fmt_bf16_from_float(1.0f) == 0x3F80, "bf16(1)");
    CHECK(fmt_bf16_from_float(1.00390625f) == 0x3F80, "bf16 tie to even (down)");
    CHECK(fmt_bf16_from_float(1.01171875f) == 0x3F82, "bf16 tie to even (up)");
    CHECK(fmt_bf16_from_float(3.4e38f) == 0x7F80, "bf16 overflow to inf");
    CHECK(epmoe_bf16_to_float(0x3F80) == 1.0f && epmoe_bf16_from_float(-2.0f) == 0xC000, "exported bf16");
}

static void test_ue8m0(void) {
    for (int e = -126; e <= 127; e++) {
        float p = ldexpf(1.0f, e);
        uint8_t b = fmt_ue8m0_from_float(p);
        CHECK(b == e + 127 && fmt_ue8m0_to_float(b) == p, "ue8m0 2^%d -> %u", e, b);
    }
    CHECK(isnan(fmt_ue8m0_to_float(0xFF)), "0xFF is NaN");
    CHECK(fmt_ue8m0_to_float(0) == ldexpf(1.0f, -127), "0x00 is 2^-127");
    CHECK(epmoe_ue8m0_from_float(0.25f) == 125 && epmoe_ue8m0_to_float(125) == 0.25f, "exported ue8m0");
}

static void test_group_scales(void) {
    float mul, inv;
    fmt_group_scales(448.0f, 0, &mul, &inv);
    CHECK(mul == 1.0f && inv == 1.0f, "amax 448: mul %g inv %g", mul, inv);
    fmt_group_scales(2.0f, 0, &mul, &inv);
    CHECK(mul == 224.0f && inv == 2.0f * (1.0f / 448.0f), "amax 2: mul %g inv %g", mul, inv);
    fmt_group_scales(100.0f, 1, &mul, &inv); /* 100/448 = 0.223 -> 2^-2 */
    CHECK(mul == 4.0f && inv == 0.25f, "round amax 100: mul %g inv %g", mul, inv);
    fmt_group_scales(112.0f, 1, &mul, &inv); /* 112/448 = 2^-2 exactly: no rounding up */
    CHECK(mul == 4.0f && inv == 0.25f, "round amax 112: mul %g inv %g", mul, inv);
    fmt_group_scales(1e-4f, 1, &mul, &inv);
    CHECK(inv >= 1e-4f / 448.0f && inv < 2e-4f / 448.0f && mul * inv == 1.0f, "round floor: inv %g", inv);
    fmt_group_scales(INFINITY, 0, &mul, &inv);
    CHECK(mul == 0.0f && isinf(inv), "inf amax: mul %g inv %g", mul, inv);
    fmt_group_scales(INFINITY, 1, &mul, &inv);
    CHECK(mul == 0.0f && isinf(inv) && fmt_ue8m0_from_float(inv) == 0xFF, "inf amax rounded");
}

static void test_int4(void) {
    int8_t v[4] = {-8, 7, 1, -1}, back[4];
    uint8_t p[2];
    CHECK_STATUS(epmoe_int4_pack(v, 4, p), EPMOE_OK);
    CHECK(p[0] == 0x78 && p[1] == 0xF1, "pack: 0x%02x 0x%02x, want 0x78 0xF1", p[0], p[1]);
    CHECK_STATUS(epmoe_int4_unpack(p, 4, back), EPMOE_OK);
    CHECK(memcmp(v, back, 4) == 0, "unpack round trip");
    for (int b = 0; b < 256; b++) { /* every byte: unpack then pack is the identity */
        uint8_t byte = (uint8_t)b, again;
        int8_t two[2];
        epmoe_int4_unpack(&byte, 2, two);
        CHECK(two[0] >= -8 && two[0] <= 7 && two[1] >= -8 && two[1] <= 7, "range");
        CHECK(two[0] == (((b & 15) ^ 8) - 8) && two[1] == (((b >> 4) ^ 8) - 8), "nibble values of 0x%02x", b);
        epmoe_int4_pack(two, 2, &again);
        CHECK(again == byte, "byte 0x%02x", b);
    }
    int8_t bad[2] = {8, 0};
    CHECK_STATUS(epmoe_int4_pack(bad, 2, p), EPMOE_ERR_INVALID_ARG);
    bad[0] = -9;
    CHECK_STATUS(epmoe_int4_pack(bad, 2, p), EPMOE_ERR_INVALID_ARG);
    CHECK_STATUS(epmoe_int4_pack(v, 3, p), EPMOE_ERR_INVALID_ARG);
    CHECK_STATUS(epmoe_int4_pack(v, -2, p), EPMOE_ERR_INVALID_ARG);
    CHECK_STATUS(epmoe_int4_pack(NULL, 2, p), EPMOE_ERR_NULL_POINTER);
    /* in place would read bytes it already wrote: refused */
    uint8_t both[4] = {0x21, 0x43, 0, 0};
    CHECK_STATUS(epmoe_int4_unpack(both, 4, (int8_t *)both), EPMOE_ERR_INVALID_ARG);
    CHECK(strstr(epmoe_last_error(), "overlaps") != NULL && both[0] == 0x21, "unpack in place: %s", epmoe_last_error());
    CHECK_STATUS(epmoe_int4_pack((const int8_t *)both, 4, both + 1), EPMOE_ERR_INVALID_ARG);
    int8_t inplace[4] = {1, 2, -3, 4}; /* pack in place is defined: byte j after values 2j, 2j + 1 */
    CHECK_STATUS(epmoe_int4_pack(inplace, 4, (uint8_t *)inplace), EPMOE_OK);
    CHECK((uint8_t)inplace[0] == 0x21 && (uint8_t)inplace[1] == 0x4D, "pack in place: 0x%02x 0x%02x",
          (uint8_t)inplace[0], (uint8_t)inplace[1]);
    CHECK_STATUS(epmoe_int4_unpack(both, 2, (int8_t *)both + 2), EPMOE_OK); /* adjacent, not overlapping */
    CHECK_STATUS(epmoe_int4_unpack(p, 2, NULL), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_int4_unpack(NULL, 2, back), EPMOE_ERR_NULL_POINTER);
    CHECK_STATUS(epmoe_int4_unpack(p, 3, back), EPMOE_ERR_INVALID_ARG); /* odd n: half a byte */
    CHECK(strstr(epmoe_last_error(), "even") != NULL, "message: %s", epmoe_last_error());
    CHECK_STATUS(epmoe_int4_pack(NULL, 0, NULL), EPMOE_OK);
}

static void test_scale_layouts(void) {
    /* M = 3 tokens, K = 640 (G = 5 groups, P = 2 words). Hand-computed positions. */
    const int64_t M = 3, K = 640;
    CHECK(epmoe_scale_bytes(EPMOE_SCALE_F32_ROW, M, K) == 60, "f32 row bytes");
    CHECK(epmoe_scale_bytes(EPMOE_SCALE_F32_MMAJOR, M, K) == 60, "f32 mmajor bytes");
    CHECK(epmoe_scale_bytes(EPMOE_SCALE_UE8M0_ROW, M, K) == 24, "ue8m0 row bytes");
    CHECK(epmoe_scale_bytes(EPMOE_SCALE_UE8M0_MMAJOR, M, K) == 24, "ue8m0 mmajor bytes");
    CHECK(epmoe_scale_offset(EPMOE_SCALE_F32_ROW, M, K, 2, 3) == (2 * 5 + 3) * 4, "f32 row (2,3)");
    CHECK(epmoe_scale_offset(EPMOE_SCALE_F32_MMAJOR, M, K, 2, 3) == (2 + 3 * 3) * 4, "f32 mmajor (2,3)");
    CHECK(epmoe_scale_offset(EPMOE_SCALE_UE8M0_ROW, M, K, 2, 4) == 2 * 8 + 4, "ue8m0 row (2,4)");
    CHECK(epmoe_scale_offset(EPMOE_SCALE_UE8M0_MMAJOR, M, K, 2, 4) == 1 * 3 * 4 + 2 * 4 + 0, "ue8m0 mmajor (2,4)");
    CHECK(epmoe_scale_offset(EPMOE_SCALE_UE8M0_MMAJOR, M, K, 1, 2) == 1 * 4 + 2, "ue8m0 mmajor (1,2)");
    CHECK(epmoe_scale_bytes((epmoe_scale_fmt)7, M, K) == 0 && epmoe_scale_bytes(EPMOE_SCALE_F32_ROW, M, 100) == 0,
          "invalid layout queries give 0");
    /* sizes whose byte counts would wrap: 0, not a small number (M * K past 2^46) */
    CHECK(epmoe_scale_bytes(EPMOE_SCALE_F32_ROW, (INT64_C(1) << 62) + 1, 128) == 0, "huge M, row");
    CHECK(epmoe_scale_bytes(EPMOE_SCALE_F32_MMAJOR, (INT64_C(1) << 61) + 3, 256) == 0, "huge M, m-major");
    CHECK(epmoe_scale_bytes(EPMOE_SCALE_UE8M0_ROW, (INT64_C(1) << 39) + 1, 128) == 0, "M * K = 2^46 + 128: past the bound");
    CHECK(epmoe_scale_bytes(EPMOE_SCALE_F32_ROW, INT64_C(1) << 39, 128) == (size_t)4 << 39, "M * K = 2^46: at the bound");
    /* (t, g) outside the slab: SIZE_MAX, not an offset into someone else's bytes */
    CHECK(epmoe_scale_offset(EPMOE_SCALE_F32_ROW, M, K, 3, 0) == SIZE_MAX, "t = M");
    CHECK(epmoe_scale_offset(EPMOE_SCALE_F32_ROW, M, K, -1, 0) == SIZE_MAX, "t < 0");
    CHECK(epmoe_scale_offset(EPMOE_SCALE_F32_MMAJOR, M, K, 0, 5) == SIZE_MAX, "g = G");
    CHECK(epmoe_scale_offset(EPMOE_SCALE_F32_MMAJOR, M, K, 0, -1) == SIZE_MAX, "g < 0");
    CHECK(epmoe_scale_offset((epmoe_scale_fmt)7, M, K, 0, 0) == SIZE_MAX, "invalid fmt");
    CHECK(epmoe_scale_offset(EPMOE_SCALE_UE8M0_ROW, M, K, 2, 7) == 2 * 8 + 7, "UE8M0 padding byte (2,7)");
    CHECK(epmoe_scale_offset(EPMOE_SCALE_UE8M0_ROW, M, K, 2, 8) == SIZE_MAX, "past UE8M0's padding");
    /* Every (t, g) of every format maps to a distinct byte range inside the slab. */
    for (int fmt = 0; fmt < 4; fmt++) {
        size_t bytes = epmoe_scale_bytes((epmoe_scale_fmt)fmt, M, K), w = fmt >= 2 ? 1 : 4;
        unsigned char seen[64] = {0};
        for (int64_t t = 0; t < M; t++)
            for (int64_t g = 0; g < K / 128; g++) {
                size_t o = epmoe_scale_offset((epmoe_scale_fmt)fmt, M, K, t, g);
                CHECK(o != SIZE_MAX && o + w <= bytes, "fmt %d (%lld,%lld) inside", fmt, (long long)t, (long long)g);
                for (size_t i = 0; i < w && o + i < sizeof seen; i++) seen[o + i]++;
            }
        for (size_t i = 0; i < bytes; i++) CHECK(seen[i] <= 1, "fmt %d byte %zu used twice", fmt, i);
    }
}

static void test_version(void) {
    CHECK(epmoe_version() == EPMOE_VERSION_CODE, "version %d", epmoe_version());
    char want[32];
    snprintf(want, sizeof want, "%d.%d.%d", EPMOE_VERSION_MAJOR, EPMOE_VERSION_MINOR, EPMOE_VERSION_PATCH);
    CHECK(strcmp(epmoe_version_string(), want) == 0, "version string %s", epmoe_version_string());
    for (int s = 0; s <= EPMOE_ERR_INTERNAL; s++) CHECK(epmoe_status_str((epmoe_status)s)[0] != 0, "status %d", s);
    CHECK(strcmp(epmoe_status_str((epmoe_status)99), "unknown status") == 0, "unknown status");
}

int main(void) {
    int quick = getenv("EPMOE_TEST_QUICK") && atoi(getenv("EPMOE_TEST_QUICK"));
    oracle_init();
    test_fp8_specials();
    test_fp8_decoder();
    test_fp8_encoder_all_floats(quick);
    test_bf16(quick);
    test_ue8m0();
    test_group_scales();
    test_int4();
    test_scale_layouts();
    test_version();
    return test_report("test_format");
}
