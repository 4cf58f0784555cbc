/*
** w4a8_layout.h — the repacked int4 weight layout of the W4A8 GEMM, for C (repack, unpack,
** reference) and CUDA (the kernel). One layout function, one nibble encoding, one conversion:
** the kernel converts with w4_word_to_fp8 below and the reference decodes with the same
** function, so the two cannot drift apart.
**
** Why this layout. The kernel computes out^T = W · A^T with wgmma: the weights are the A operand
** (64 rows per warpgroup, from registers) and tokens are N. In the m64nNk32 fp8 A fragment,
** thread `lane` of warp w holds rows r = 16w + lane/4 and r + 8, and k = 4(lane%4) + 0..3 and
** +16, as four 32-bit registers a0 (r, k), a1 (r+8, k), a2 (r, k+16), a3 (r+8, k+16). The repack
** stores, per (expert, 128-row tile, 128-k group), each thread's four k32 steps as 32 contiguous
** bytes split in two 16-byte halves [half][256 threads][16 B]: one conflict-free 16-byte shared
** load per half. A word (4 bytes) yields two registers: lo (a0 or a2) and hi (a1 or a3).
**
** Why this encoding. Each register byte must become an e4m3 value v * 2^-9 (the fp8 subnormals
** 0..7 and 8 = 2^-6 are exact integers times 2^-9; the 2^9 is folded into the scales). Store
** per byte b of a word: bits 0-2 |lo_b|, bit 7 sign of lo_b, bits 4-6 |hi_b|, and the sign of hi_b
** in bit 3 of byte (b+1)%4. Then lo = q & 0x87878787 and hi = rotr(q, 4) & 0x87878787 are the
** fp8 bytes directly: 3 integer ops per 8 weights (SYM7, values -7..7). FULL covers -8 too: a
** negative value v is stored with magnitude -v-1 and one is added to every negative byte
** (0x80 | m, m + 1 <= 8 never carries out of the byte; 0x88 is -8 * 2^-9).
*/
#ifndef EPMOE_W4A8_LAYOUT_H
#define EPMOE_W4A8_LAYOUT_H

#include <stdint.h>

#ifdef __CUDACC__
#define W4_HD static __host__ __device__ __forceinline__
#else
#define W4_HD static inline
#endif

#define W4_TILE_N 128    /* weight rows per CTA tile (two warpgroups of 64) */
#define W4_GROUP 128     /* k per scale group (a step of the GPU kernel takes one or two: kGroups) */
#define W4_TILE_BYTES (W4_TILE_N * W4_GROUP / 2) /* one (tile, group): 8 KB */
#define W4_SCALE_FOLD 512.0f /* 2^9: register bytes hold v * 2^-9 */

/* Nibble word -> four fp8 bytes: hi = 0 gives the lo register, hi = 1 the hi register. */
W4_HD uint32_t w4_word_to_fp8(uint32_t q, int hi, int full) {
    uint32_t x = (hi ? ((q >> 4) | (q << 28)) : q) & 0x87878787u;
    if (full) x += (x >> 7) & 0x01010101u;
    return x;
}

/* Where the nibble of weight (n, k) of expert e lives: byte offset and which of the two value
** slots (lo or hi register) of that word, value index b in 0..3. */
typedef struct w4_pos {
    int64_t word;  /* byte offset of the 32-bit word */
    int hi;        /* 0: lo register (a0/a2), 1: hi register (a1/a3) */
    int b;         /* byte of the register */
} w4_pos;

W4_HD w4_pos w4_locate(int64_t N, int64_t K, int64_t e, int64_t n, int64_t k) {
    const int64_t NT = N / W4_TILE_N, G = K / W4_GROUP;
    const int64_t nt = n / W4_TILE_N, g = k / W4_GROUP;
    const int r = (int)(n % W4_TILE_N), kk = (int)(k % W4_GROUP);
    const int wg = r / 64, warp = (r % 64) / 16, row16 = r % 16;
    const int s = kk / 32, second = (kk % 32) / 16, kq = kk % 16;
    const int lane = (row16 % 8) * 4 + kq / 4;
    const int tid = wg * 128 + warp * 32 + lane;
    const int half = s / 2, word = 2 * (s % 2) + second;
    w4_pos p;
    p.word = (((e * NT + nt) * G + g) * 2 + half) * (int64_t)(256 * 16) + tid * 16 + word * 4;
    p.hi = row16 / 8;
    p.b = kq % 4;
    return p;
}

/* Put value v (int4) into slot (hi, b) of word q. Bits of other slots are kept. */
W4_HD uint32_t w4_word_set(uint32_t q, int hi, int b, int v, int full) {
    const uint32_t neg = v < 0;
    const uint32_t mag = (uint32_t)(neg ? (full ? -v - 1 : -v) : v) & 7u;
    if (!hi) {
        q &= ~(0x87u << (8 * b));
        q |= (mag | (neg << 7)) << (8 * b);
    } else {
        const int sb = 8 * ((b + 1) % 4) + 3;
        q &= ~((0x70u << (8 * b)) | (1u << sb));
        q |= (mag << (8 * b + 4)) | (neg << sb);
    }
    return q;
}

/* The int4 value in slot (hi, b), read back through the kernel's conversion. */
W4_HD int w4_word_get(uint32_t q, int hi, int b, int full) {
    const uint32_t byte = (w4_word_to_fp8(q, hi, full) >> (8 * b)) & 0xFFu;
    const int mag = (int)(byte & 0x7Fu); /* 0..8: the e4m3 value in units of 2^-9 */
    return (byte & 0x80u) ? -mag : mag;
}

/* Scales: bf16 bits [E, G, N] with 2^9 folded in (epmoe_w4a8_repack rounds to nearest even);
** (e, n, g) at this element index. */
W4_HD int64_t w4_scale_index(int64_t N, int64_t K, int64_t e, int64_t n, int64_t g) {
    return (e * (K / W4_GROUP) + g) * N + n;
}

#endif /* EPMOE_W4A8_LAYOUT_H */
