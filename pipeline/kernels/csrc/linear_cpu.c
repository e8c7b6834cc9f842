/* W4A16 linear for x86 CPUs: int4 weights x int8-quantized activations, integer dot products (AVX512-VNNI
 * `vpdpbusd`, or AVX2 `vpmaddubsw` + `vpmaddwd`), fp32 out. Built and loaded by pipeline/kernels/cpu_linear.py
 * (its docstring has the layout and the math; `int4_cpu_ref` there is the PyTorch reference of this file).
 *
 *   x  (M, K) fp32                   activations; each row quantized per block of 64 in two int8 terms:
 *                                    x ~= d * (q1 + q2 / 256), d = max|x| / 127, q1 = round(x / d),
 *                                    q2 = round((x - d * q1) * 256 / d) (~15 bits: the product's rounding is that
 *                                    of a bf16 input, not of an int8 one); dsum = the x's sum per weight group
 *   w  (N/16, K/8, 16, 4) uint8      16 output rows interleaved: for rows n0..n0+15 and codes k0..k0+7, row r's 4
 *                                    bytes are code[k0 + i] | code[k0 + 4 + i] << 4, i = 0..3 (one 512-bit load =
 *                                    8 codes of 16 rows; a 32-bit lane = one row, so no horizontal sums)
 *   ws (N/16, G, 16), wm (...) fp32  per weight group: scale s and s * zero, G = K / group
 *   y  (M, N) fp32                   y[m, n] = sum_b s[n, g(b)] * d[m, b] * (256 q_w.q1 + q_w.q2)_b / 256
 *                                                - sum_g wm[n, g] * dsum[m, g]
 *
 * Per 8 codes of 16 columns: one load, two nibble masks, four `vpdpbusd` an activation row (the 256 q1 + q2 sum
 * fits int32 per 64-block). A tile of 16 output columns is computed for up to 4 activation rows at a time (each weight byte unpacked once per
 * 4 rows); tiles are split across `threads` threads (pool.h). K % 64 == 0, group % 64 == 0, N % 16 == 0.
 * Built with AMX (cpu_build's "avx512_amx"), calls of >= amx_rows rows take the same integer dots through the tile
 * unit, 8 rows x 16 columns x 64 codes an instruction (see "AMX" below): the same bits, ~1.7x faster at 8 rows.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pool.h"

#define QB 64   /* activation block and weight byte block: 64 codes */
#define MT 4    /* activation rows per pass over a weight tile */
#define NT 16   /* output columns per tile */

static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* One row's 64-block -> q (128 int8: q1 then q2) and its scale d; returns sum(q1) * 256 + sum(q2). Rounding to
 * the nearest, ties to even (torch.round's); products and differences rounded one at a time (no FMA contraction:
 * built with -ffp-contract=off), as the reference computes them. */
#if defined(__AVX512F__) && defined(__AVX512BW__)
static int quant_block(const float *x, int8_t *q, float *d_out, int terms) {
    __m512 v[4], amax = _mm512_setzero_ps();
    for (int i = 0; i < 4; i++) {
        v[i] = _mm512_loadu_ps(x + 16 * i);
        amax = _mm512_max_ps(amax, _mm512_abs_ps(v[i]));
    }
    float d = _mm512_reduce_max_ps(amax) / 127.f, id = d > 0.f ? 1.f / d : 0.f;
    __m512 vd = _mm512_set1_ps(d), vid = _mm512_set1_ps(id), vid2 = _mm512_set1_ps(id * 256.f);
    __m512i sum = _mm512_setzero_si512();
    for (int i = 0; i < 4; i++) {
        __m512i c1 = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], vid));   /* |c1| <= 127 */
        __m512 r = _mm512_sub_ps(v[i], _mm512_mul_ps(_mm512_cvtepi32_ps(c1), vd));
        __m512i c2 = _mm512_cvtps_epi32(_mm512_mul_ps(r, vid2));
        c2 = _mm512_max_epi32(_mm512_min_epi32(c2, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
        if (terms == 1) c2 = _mm512_setzero_si512();
        _mm_storeu_si128((__m128i *)(q + 16 * i), _mm512_cvtsepi32_epi8(c1));
        _mm_storeu_si128((__m128i *)(q + QB + 16 * i), _mm512_cvtsepi32_epi8(c2));
        sum = _mm512_add_epi32(sum, _mm512_add_epi32(_mm512_slli_epi32(c1, 8), c2));
    }
    *d_out = d;
    return _mm512_reduce_add_epi32(sum);
}
#else
static int quant_block(const float *x, int8_t *q, float *d_out, int terms) {
    float amax = 0.f;
    for (int i = 0; i < QB; i++) {
        float a = x[i] < 0.f ? -x[i] : x[i];
        amax = a > amax ? a : amax;
    }
    float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f, id2 = id * 256.f;
    int sum = 0;
    for (int i = 0; i < QB; i++) {
        int c1 = (int)nearbyintf(x[i] * id);
        float r = x[i] - (float)c1 * d;
        int c2 = (int)nearbyintf(r * id2);
        c2 = terms == 1 ? 0 : (c2 > 127 ? 127 : (c2 < -127 ? -127 : c2));
        q[i] = (int8_t)c1;
        q[QB + i] = (int8_t)c2;
        sum += c1 * 256 + c2;
    }
    *d_out = d;
    return sum;
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define KERNEL_ISA "avx512_vnni"
/* One tile (16 columns) for mt activation rows: y[i * N + 0..15]. */
static inline __attribute__((always_inline)) void tile_dot(const uint8_t *w, const float *ws, const float *wm,
        const int8_t *xq, const float *xd, const float *dsum, int KB, int gb, int K, int G, float *y, int N,
        const int mt, const int terms) {
    const __m512i mask = _mm512_set1_epi8(0x0F);
    __m512 facc[MT];
    for (int i = 0; i < mt; i++) facc[i] = _mm512_setzero_ps();
    for (int g = 0, b = 0; g < G; g++) {
        __m512 s = _mm512_loadu_ps(ws + (size_t)g * NT);
        for (int e = b + gb; b < e; b++) {
            __m512i a1[MT], a2[MT];                    /* q_w . q1 and q_w . q2 */
            for (int i = 0; i < mt; i++) a1[i] = a2[i] = _mm512_setzero_si512();
            const uint8_t *wb = w + (size_t)b * 8 * 64;
            const int8_t *xb = xq + (size_t)b * 2 * QB;
            for (int c = 0; c < 8; c++) {
                __m512i raw = _mm512_loadu_si512((const void *)(wb + c * 64));
                __m512i lo = _mm512_and_si512(raw, mask), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), mask);
                for (int i = 0; i < mt; i++) {
                    const int32_t *xi = (const int32_t *)(xb + (size_t)i * 2 * K + c * 8);
                    a1[i] = _mm512_dpbusd_epi32(a1[i], lo, _mm512_set1_epi32(xi[0]));
                    a1[i] = _mm512_dpbusd_epi32(a1[i], hi, _mm512_set1_epi32(xi[1]));
                    if (terms == 2) {
                        a2[i] = _mm512_dpbusd_epi32(a2[i], lo, _mm512_set1_epi32(xi[QB / 4]));
                        a2[i] = _mm512_dpbusd_epi32(a2[i], hi, _mm512_set1_epi32(xi[QB / 4 + 1]));
                    }
                }
            }
            for (int i = 0; i < mt; i++)                /* |256 a1 + a2| <= 257 * 64 * 15 * 128 < 2^31 */
                facc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(a1[i], 8), a2[i])),
                                          _mm512_mul_ps(s, _mm512_set1_ps(xd[(size_t)i * KB + b] * (1.f / 256.f))), facc[i]);
        }
    }
    for (int i = 0; i < mt; i++) {
        __m512 z = _mm512_setzero_ps();
        for (int g = 0; g < G; g++)
            z = _mm512_fmadd_ps(_mm512_loadu_ps(wm + (size_t)g * NT), _mm512_set1_ps(dsum[(size_t)i * G + g]), z);
        _mm512_storeu_ps(y + (size_t)i * N, _mm512_sub_ps(facc[i], z));
    }
}

/* int8 weights (the lm_head), 16 columns: w (K/4, 16, 4) int8 for this tile, row scales ws (16). x as above. vpdpbusd
 * takes u8 x s8: the weights are flipped to u8 (w + 128) and 128 * sum(x) is taken back out. */
static inline __attribute__((always_inline)) void tile_dot8(const int8_t *w, const float *ws, const int8_t *xq,
        const float *xd, const float *xsum, int KB, int K, float *y, int N, const int mt) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512 facc[MT];
    for (int i = 0; i < mt; i++) facc[i] = _mm512_setzero_ps();
    for (int b = 0; b < KB; b++) {
        __m512i a1[MT], a2[MT];
        for (int i = 0; i < mt; i++) a1[i] = a2[i] = _mm512_setzero_si512();
        const int8_t *wb = w + (size_t)b * 16 * 64;
        const int8_t *xb = xq + (size_t)b * 2 * QB;
        for (int c = 0; c < 16; c++) {
            __m512i u = _mm512_xor_si512(_mm512_loadu_si512((const void *)(wb + c * 64)), flip);
            for (int i = 0; i < mt; i++) {
                const int32_t *xi = (const int32_t *)(xb + (size_t)i * 2 * K);
                a1[i] = _mm512_dpbusd_epi32(a1[i], u, _mm512_set1_epi32(xi[c]));
                a2[i] = _mm512_dpbusd_epi32(a2[i], u, _mm512_set1_epi32(xi[QB / 4 + c]));
            }
        }
        for (int i = 0; i < mt; i++)                    /* |256 a1 + a2| <= 257 * 64 * 255 * 127 < 2^31 */
            facc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(a1[i], 8), a2[i])),
                                      _mm512_set1_ps(xd[(size_t)i * KB + b] * (1.f / 256.f)), facc[i]);
    }
    __m512 s = _mm512_loadu_ps(ws);
    for (int i = 0; i < mt; i++)
        _mm512_storeu_ps(y + (size_t)i * N,
                         _mm512_mul_ps(s, _mm512_sub_ps(facc[i], _mm512_set1_ps(128.f * xsum[i]))));
}

#if defined(__AMX_INT8__) && defined(__AMX_TILE__)
#undef KERNEL_ISA
#define KERNEL_ISA "avx512_amx"
#define LINEAR_AMX 1
/* AMX (Sapphire Rapids and later): the same integer dot products as tile_dot / tile_dot8, 16 x 16 x 64 at a time
 * by `tdpbsud` (s8 activations x u8 weights) in the tile unit. Per 16-column tile and 64-block b:
 *   B (16 rows x 64 bytes) = the tile's codes of block b unpacked to one byte each: row r = codes 4r..4r+3 of the
 *       16 columns, which is exactly the low (r even) or high (r odd) nibbles of the tile's 512-bit load r / 2;
 *       the int8 lm_head's codes are already in that layout (flipped to u8 as tile_dot8 does).
 *   A (2 mt rows x 64 bytes) = q1 and q2 of each of mt <= 8 activation rows, interleaved: the activations are
 *       quantized block-major for this path, (K/64, M, 2, 64), so that one strided load takes them.
 *   C = A . B: row 2i = q1_i . q_w, row 2i + 1 = q2_i . q_w (int32, exact), then the epilogue of tile_dot in the
 *       same order and the same float operations: the AMX path gives the VNNI path's bits.
 * The OS must grant the tile state (arch_prctl ARCH_REQ_XCOMP_PERM): cpu_amx_enable() asks once; the library
 * loader (cpu_build.py) uses this build only where it returns 1. Tiles 0-2 and 3-5 (C, A, B) serve the even and odd
 * blocks of chunks of min(M, 8) rows, 6-7 (C, A) the last chunk's M % 8 rows when M > 8; each chunk of work (pool.h)
 * configures them and releases them. */
#include <sys/syscall.h>
#include <unistd.h>

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) amx_cfg;

static int amx_state = 0;          /* 1 once the OS granted the tile state */
static int amx_rows = 4;           /* rows (M) from which the linears take the AMX path (cpu_build.amx_rows) */

int cpu_amx_enable(void) {
    if (!amx_state) amx_state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return amx_state;
}

void cpu_amx_set_rows(int rows) { amx_rows = rows; }

static inline void amx_config(int M) {
    amx_cfg c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    int first = M < 8 ? 2 * M : 16, tail = M > 8 && M % 8 ? 2 * (M % 8) : 16;
    c.rows[0] = c.rows[1] = c.rows[3] = c.rows[4] = (uint8_t)first;   /* C, A of chunks of min(M, 8) rows, x2 */
    c.rows[2] = c.rows[5] = 16;                                      /* B: 16 K-quads of 16 columns, x2 */
    c.rows[6] = c.rows[7] = (uint8_t)tail;                           /* C, A of the last chunk when M > 8 */
    for (int i = 0; i < 8; i++) c.colsb[i] = 64;
    _tile_loadconfig(&c);
}

/* A thread's scratch: the tile's unpacked codes (K/64 blocks of 1 KB) and two C tiles' buffers; grown as needed. */
static __thread uint8_t *amx_buf;
static __thread size_t amx_cap;

static uint8_t *amx_scratch(size_t bytes) {
    if (bytes > amx_cap) {
        free(amx_buf);
        amx_cap = (bytes + 4095) & ~(size_t)4095;
        amx_buf = (uint8_t *)aligned_alloc(64, amx_cap);
        if (!amx_buf) amx_cap = 0;
    }
    return amx_buf;
}

/* C = A . B for block b into cbuf. Even and odd blocks use their own tiles (0-2, 3-5) and C buffers, so that one
 * block's product overlaps the last one's store and epilogue; the last chunk of M > 8 rows uses 6-7 (and B in 2). */
#define AMX_DOT(C_, A_, B_, a, bt, cbuf)                                                                       \
    do {                                                                                                       \
        _tile_zero(C_);                                                                                        \
        _tile_loadd(A_, a, 64);                                                                                \
        _tile_loadd(B_, bt, 64);                                                                               \
        _tile_dpbsud(C_, A_, B_);                                                                              \
        _tile_stored(C_, cbuf, 64);                                                                            \
    } while (0)
#define AMX_BLOCK(tail, b, a, bt, cbuf)                                                                        \
    do {                                                                                                       \
        if (tail) AMX_DOT(6, 7, 2, a, bt, cbuf);                                                               \
        else if ((b) & 1) AMX_DOT(3, 4, 5, a, bt, cbuf);                                                       \
        else AMX_DOT(0, 1, 2, a, bt, cbuf);                                                                    \
    } while (0)

/* ROWS(mt) with mt a constant 1..8 (so that the epilogue's accumulators stay in registers) */
#define AMX_CHUNK_ROWS(n)                                                                                      \
    switch (n) {                                                                                               \
        case 1: ROWS(1); break; case 2: ROWS(2); break; case 3: ROWS(3); break; case 4: ROWS(4); break;       \
        case 5: ROWS(5); break; case 6: ROWS(6); break; case 7: ROWS(7); break; default: ROWS(8);             \
    }

/* Row i of a stored C tile as tile_dot combines its terms: 256 (q1 . q_w) + q2 . q_w, as fp32. */
static inline __m512 amx_dots(const int32_t *cb, int i) {
    __m512i a1 = _mm512_load_si512((const void *)(cb + 32 * i));
    __m512i a2 = _mm512_load_si512((const void *)(cb + 32 * i + 16));
    return _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(a1, 8), a2));
}

/* tile_dot's epilogue over AMX products: rows m0..m0+mt-1 of a 16-column tile whose unpacked codes are in bt. */
static inline __attribute__((always_inline)) void amx_rows4(const uint8_t *bt, int32_t *cbuf, const int8_t *xq,
        const float *xd, const float *dsum, const float *ws, const float *wm, int M, int m0, int KB, int gb, int G,
        float *y, int N, const uint8_t *pf, const int mt) {
    __m512 facc[8];
    for (int i = 0; i < mt; i++) facc[i] = _mm512_setzero_ps();
    const int tail = M > 8 && mt < 8;
    /* block b + 1's product is issued before block b's epilogue reads its C buffer: the tile unit works while the
     * vector units convert (3% faster than one block at a time at 8 rows) */
    AMX_BLOCK(tail, 0, xq + (size_t)m0 * 2 * QB, bt, cbuf);
    __m512 s = _mm512_setzero_ps();
    for (int b = 0; b < KB; b++) {
        if (b % gb == 0) s = _mm512_loadu_ps(ws + (size_t)(b / gb) * NT);
        if (pf)                                         /* the next tile's 512 bytes of block b, into L1 */
            for (int k = 0; k < 8; k++) _mm_prefetch((const char *)pf + (size_t)b * 512 + k * 64, _MM_HINT_T0);
        if (b + 1 < KB)
            AMX_BLOCK(tail, b + 1, xq + ((size_t)(b + 1) * M + m0) * 2 * QB, bt + (size_t)(b + 1) * 1024,
                      cbuf + ((b + 1) & 1) * 256);
        const int32_t *cb = cbuf + (b & 1) * 256;
        for (int i = 0; i < mt; i++)
            facc[i] = _mm512_fmadd_ps(amx_dots(cb, i),
                                      _mm512_mul_ps(s, _mm512_set1_ps(xd[(size_t)(m0 + i) * KB + b] * (1.f / 256.f))),
                                      facc[i]);
    }
    for (int i = 0; i < mt; i++) {
        __m512 z = _mm512_setzero_ps();
        for (int g = 0; g < G; g++)
            z = _mm512_fmadd_ps(_mm512_loadu_ps(wm + (size_t)g * NT), _mm512_set1_ps(dsum[(size_t)(m0 + i) * G + g]),
                                z);
        _mm512_storeu_ps(y + (size_t)(m0 + i) * N, _mm512_sub_ps(facc[i], z));
    }
}

/* tile_dot8's epilogue over AMX products (int8 weights, flipped to u8 in bt). */
static inline __attribute__((always_inline)) void amx_rows8(const uint8_t *bt, int32_t *cbuf, const int8_t *xq,
        const float *xd, const float *xsum, const float *ws, int M, int m0, int KB, float *y, int N, const int8_t *pf,
        const int mt) {
    __m512 facc[8];
    for (int i = 0; i < mt; i++) facc[i] = _mm512_setzero_ps();
    for (int b = 0; b < KB; b++) {
        const int8_t *a = xq + ((size_t)b * M + m0) * 2 * QB;
        int32_t *cb = cbuf + (b & 1) * 256;
        if (pf)                                         /* the next tile's 1,024 bytes of block b */
            for (int k = 0; k < 16; k++) _mm_prefetch((const char *)pf + (size_t)b * 1024 + k * 64, _MM_HINT_T0);
        AMX_BLOCK(M > 8 && mt < 8, b, a, bt + (size_t)b * 1024, cb);
        for (int i = 0; i < mt; i++)
            facc[i] = _mm512_fmadd_ps(amx_dots(cb, i), _mm512_set1_ps(xd[(size_t)(m0 + i) * KB + b] * (1.f / 256.f)),
                                      facc[i]);
    }
    __m512 s = _mm512_loadu_ps(ws);
    for (int i = 0; i < mt; i++)
        _mm512_storeu_ps(y + (size_t)(m0 + i) * N,
                         _mm512_mul_ps(s, _mm512_sub_ps(facc[i], _mm512_set1_ps(128.f * xsum[m0 + i]))));
}
#endif
#elif defined(__AVX2__) && defined(__FMA__)
#define KERNEL_ISA "avx2"
/* As the AVX512 tile, as two halves of 8 columns (the 32-byte halves of each 64-byte load). */
static inline __attribute__((always_inline)) void tile_dot(const uint8_t *w, const float *ws, const float *wm,
        const int8_t *xq, const float *xd, const float *dsum, int KB, int gb, int K, int G, float *y, int N,
        const int mt, const int terms) {
    const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    for (int h = 0; h < 2; h++) {
        __m256 facc[MT];
        for (int i = 0; i < mt; i++) facc[i] = _mm256_setzero_ps();
        for (int g = 0, b = 0; g < G; g++) {
            __m256 s = _mm256_loadu_ps(ws + (size_t)g * NT + 8 * h);
            for (int e = b + gb; b < e; b++) {
                __m256i a1[MT], a2[MT];
                for (int i = 0; i < mt; i++) a1[i] = a2[i] = _mm256_setzero_si256();
                const uint8_t *wb = w + (size_t)b * 8 * 64 + 32 * h;
                const int8_t *xb = xq + (size_t)b * 2 * QB;
                for (int c = 0; c < 8; c++) {
                    __m256i raw = _mm256_loadu_si256((const __m256i *)(wb + c * 64));
                    __m256i lo = _mm256_and_si256(raw, mask), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
                    for (int i = 0; i < mt; i++) {
                        const int32_t *xi = (const int32_t *)(xb + (size_t)i * 2 * K + c * 8);
                        /* |each 16-bit sum| <= 4 * 15 * 128 */
                        __m256i p1 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(xi[0])),
                                                      _mm256_maddubs_epi16(hi, _mm256_set1_epi32(xi[1])));
                        a1[i] = _mm256_add_epi32(a1[i], _mm256_madd_epi16(p1, ones));
                        if (terms == 2) {
                            __m256i p2 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(xi[QB / 4])),
                                                          _mm256_maddubs_epi16(hi, _mm256_set1_epi32(xi[QB / 4 + 1])));
                            a2[i] = _mm256_add_epi32(a2[i], _mm256_madd_epi16(p2, ones));
                        }
                    }
                }
                for (int i = 0; i < mt; i++)
                    facc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_slli_epi32(a1[i], 8), a2[i])),
                                              _mm256_mul_ps(s, _mm256_set1_ps(xd[(size_t)i * KB + b] * (1.f / 256.f))), facc[i]);
            }
        }
        for (int i = 0; i < mt; i++) {
            __m256 z = _mm256_setzero_ps();
            for (int g = 0; g < G; g++)
                z = _mm256_fmadd_ps(_mm256_loadu_ps(wm + (size_t)g * NT + 8 * h),
                                    _mm256_set1_ps(dsum[(size_t)i * G + g]), z);
            _mm256_storeu_ps(y + (size_t)i * N + 8 * h, _mm256_sub_ps(facc[i], z));
        }
    }
}

/* int8 weights, as the AVX512 tile; vpmaddubsw takes u8 x s8: |w| times x with w's sign (every code in [-127, 127]
 * but w = -128, whose |w| = 128 as u8: pair sums <= 2 * 128 * 127 fit int16). */
static inline __attribute__((always_inline)) void tile_dot8(const int8_t *w, const float *ws, const int8_t *xq,
        const float *xd, const float *xsum, int KB, int K, float *y, int N, const int mt) {
    const __m256i ones = _mm256_set1_epi16(1);
    (void)xsum;
    for (int h = 0; h < 2; h++) {
        __m256 facc[MT];
        for (int i = 0; i < mt; i++) facc[i] = _mm256_setzero_ps();
        for (int b = 0; b < KB; b++) {
            __m256i a1[MT], a2[MT];
            for (int i = 0; i < mt; i++) a1[i] = a2[i] = _mm256_setzero_si256();
            const int8_t *wb = w + (size_t)b * 16 * 64 + 32 * h;
            const int8_t *xb = xq + (size_t)b * 2 * QB;
            for (int c = 0; c < 16; c++) {
                __m256i wv = _mm256_loadu_si256((const __m256i *)(wb + c * 64)), aw = _mm256_abs_epi8(wv);
                for (int i = 0; i < mt; i++) {
                    const int32_t *xi = (const int32_t *)(xb + (size_t)i * 2 * K);
                    __m256i p1 = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(_mm256_set1_epi32(xi[c]), wv));
                    __m256i p2 = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(_mm256_set1_epi32(xi[QB / 4 + c]), wv));
                    a1[i] = _mm256_add_epi32(a1[i], _mm256_madd_epi16(p1, ones));
                    a2[i] = _mm256_add_epi32(a2[i], _mm256_madd_epi16(p2, ones));
                }
            }
            for (int i = 0; i < mt; i++)
                facc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_slli_epi32(a1[i], 8), a2[i])),
                                          _mm256_set1_ps(xd[(size_t)i * KB + b] * (1.f / 256.f)), facc[i]);
        }
        __m256 s = _mm256_loadu_ps(ws + 8 * h);
        for (int i = 0; i < mt; i++) _mm256_storeu_ps(y + (size_t)i * N + 8 * h, _mm256_mul_ps(s, facc[i]));
    }
}
#else
#error "linear_cpu.c needs AVX2 + FMA or AVX512-VNNI"
#endif

const char *linear_cpu_isa(void) { return KERNEL_ISA; }

/* x (M, K) -> xq (M, K/64, 2, 64) int8 (each block's q1 then q2; block-major (K/64, M, 2, 64) for the AMX path),
 * xd (M, K/64) block scales, dsum (M, K/group). */
static void quant_rows(const float *x, int M, int K, int group, int8_t *xq, float *xd, float *dsum, int terms,
                       int block_major) {
    int KB = K / QB, G = K / group, gb = group / QB;
    for (int m = 0; m < M; m++) {
        for (int g = 0; g < G; g++) {
            float t = 0.f;
            for (int j = 0; j < gb; j++) {
                size_t b = (size_t)g * gb + j, at = block_major ? (b * M + m) * 2 * QB : ((size_t)m * K + b * QB) * 2;
                int sq = quant_block(x + (size_t)m * K + b * QB, xq + at, xd + (size_t)m * KB + b, terms);
                t += xd[(size_t)m * KB + b] * ((float)sq * (1.f / 256.f));
            }
            dsum[(size_t)m * G + g] = t;
        }
    }
}

typedef struct {
    const uint8_t *w;
    const float *ws, *wm, *xd, *dsum;
    const int8_t *xq;
    float *y;
    int M, N, K, G, gb, tiles, per_chunk, terms;
    atomic_int failed;            /* a chunk found no scratch memory (AMX path) */
} int4_job;

static void int4_chunk(void *p, int chunk) {
    const int4_job *j = (const int4_job *)p;
    int KB = j->K / QB, K = j->K, G = j->G, gb = j->gb, M = j->M, N = j->N;
    int t0 = chunk * j->per_chunk, t1 = t0 + j->per_chunk < j->tiles ? t0 + j->per_chunk : j->tiles;
    for (int t = t0; t < t1; t++) {
        const uint8_t *wt = j->w + (size_t)t * K * NT / 2;
        const float *wst = j->ws + (size_t)t * G * NT, *wmt = j->wm + (size_t)t * G * NT;
        for (int m0 = 0; m0 < M; m0 += MT) {
            const int8_t *xm = j->xq + (size_t)m0 * K * 2;
            const float *xdm = j->xd + (size_t)m0 * KB, *dm = j->dsum + (size_t)m0 * G;
            float *ym = j->y + (size_t)m0 * N + (size_t)t * NT;
            int mt = M - m0 < MT ? M - m0 : MT;
#define TILE(MT_, T_) tile_dot(wt, wst, wmt, xm, xdm, dm, KB, gb, K, G, ym, N, MT_, T_)
            if (j->terms == 2) {
                switch (mt) { case 1: TILE(1, 2); break; case 2: TILE(2, 2); break; case 3: TILE(3, 2); break;
                              default: TILE(4, 2); }
            } else {
                switch (mt) { case 1: TILE(1, 1); break; case 2: TILE(2, 1); break; case 3: TILE(3, 1); break;
                              default: TILE(4, 1); }
            }
#undef TILE
        }
    }
}

#ifdef LINEAR_AMX
static int use_amx(int M) { return amx_state && M >= amx_rows; }

/* int4_chunk on the tile unit: each tile's codes unpacked once into the thread's scratch, then its rows by 8. */
static void int4_chunk_amx(void *p, int chunk) {
    const int4_job *j = (const int4_job *)p;
    int KB = j->K / QB, K = j->K, G = j->G, gb = j->gb, M = j->M, N = j->N;
    int t0 = chunk * j->per_chunk, t1 = t0 + j->per_chunk < j->tiles ? t0 + j->per_chunk : j->tiles;
    uint8_t *bt = amx_scratch((size_t)KB * 1024 + 2048);
    if (!bt) { atomic_store(&((int4_job *)p)->failed, 1); return; }
    int32_t *cbuf = (int32_t *)(bt + (size_t)KB * 1024);
    const __m512i mask = _mm512_set1_epi8(0x0F);
    amx_config(M);
    for (int t = t0; t < t1; t++) {
        const uint8_t *wt = j->w + (size_t)t * K * NT / 2;
        for (int c = 0; c < KB * 8; c++) {              /* load c -> B rows 2c (low nibbles), 2c + 1 (high) */
            __m512i raw = _mm512_loadu_si512((const void *)(wt + (size_t)c * 64));
            _mm512_store_si512((void *)(bt + (size_t)c * 128), _mm512_and_si512(raw, mask));
            _mm512_store_si512((void *)(bt + (size_t)c * 128 + 64), _mm512_and_si512(_mm512_srli_epi16(raw, 4), mask));
        }
        const float *wst = j->ws + (size_t)t * G * NT, *wmt = j->wm + (size_t)t * G * NT;
        float *yt = j->y + (size_t)t * NT;
        for (int m0 = 0; m0 < M; m0 += 8) {
            const uint8_t *pf = m0 == 0 && t + 1 < t1 ? wt + (size_t)K * NT / 2 : NULL;   /* the next tile */
#define ROWS(MT_) amx_rows4(bt, cbuf, j->xq, j->xd, j->dsum, wst, wmt, M, m0, KB, gb, G, yt, N, pf, MT_)
            AMX_CHUNK_ROWS(M - m0 < 8 ? M - m0 : 8);
#undef ROWS
        }
    }
    _tile_release();
}
#else
static int use_amx(int M) { (void)M; return 0; }
#define int4_chunk_amx int4_chunk
#endif

/* y (M, N) = x (M, K) @ W.T over `threads` threads (the pool); terms: the activation's int8 terms (2, or 1: q2 = 0,
 * half the integer work, llama.cpp's Q8 precision). Returns 0, or -1 when out of scratch memory. */
int int4_cpu_linear(const float *x, const uint8_t *w, const float *ws, const float *wm, float *y, int M, int N,
                    int K, int group, int terms, int threads) {
    int KB = K / QB, G = K / group;
    int8_t *xq = (int8_t *)malloc((size_t)M * K * 2);
    float *xd = (float *)malloc(sizeof(float) * ((size_t)M * KB + (size_t)M * G));
    if (!xq || !xd) { free(xq); free(xd); return -1; }
    float *dsum = xd + (size_t)M * KB;
    int amx = use_amx(M);
    quant_rows(x, M, K, group, xq, xd, dsum, terms, amx);
    int tiles = N / NT, per_chunk = tiles / (threads * 6) > 1 ? tiles / (threads * 6) : 1;   /* ~6 chunks a thread */
    int4_job job = {w, ws, wm, xd, dsum, xq, y, M, N, K, G, group / QB, tiles, per_chunk, terms};
    pool_run(amx ? int4_chunk_amx : int4_chunk, &job, (tiles + per_chunk - 1) / per_chunk, threads);
    free(xq);
    free(xd);
    return atomic_load(&job.failed) ? -1 : 0;
}

typedef struct {
    const int8_t *w, *xq;
    const float *ws, *xd, *xsum;
    float *y;
    int M, N, K, tiles, per_chunk;
    atomic_int failed;
} int8_job;

static void int8_chunk(void *p, int chunk) {
    const int8_job *j = (const int8_job *)p;
    int KB = j->K / QB, K = j->K, M = j->M, N = j->N;
    int t0 = chunk * j->per_chunk, t1 = t0 + j->per_chunk < j->tiles ? t0 + j->per_chunk : j->tiles;
    for (int t = t0; t < t1; t++) {
        const int8_t *wt = j->w + (size_t)t * K * NT;
        for (int m0 = 0; m0 < M; m0 += MT) {
            const int8_t *xm = j->xq + (size_t)m0 * K * 2;
            const float *xdm = j->xd + (size_t)m0 * KB, *xs = j->xsum + m0, *wst = j->ws + (size_t)t * NT;
            float *ym = j->y + (size_t)m0 * N + (size_t)t * NT;
            switch (M - m0 < MT ? M - m0 : MT) {
                case 1: tile_dot8(wt, wst, xm, xdm, xs, KB, K, ym, N, 1); break;
                case 2: tile_dot8(wt, wst, xm, xdm, xs, KB, K, ym, N, 2); break;
                case 3: tile_dot8(wt, wst, xm, xdm, xs, KB, K, ym, N, 3); break;
                default: tile_dot8(wt, wst, xm, xdm, xs, KB, K, ym, N, 4); break;
            }
        }
    }
}

#ifdef LINEAR_AMX
/* int8_chunk on the tile unit: each tile's codes flipped to u8 once into the thread's scratch, its rows by 8. */
static void int8_chunk_amx(void *p, int chunk) {
    const int8_job *j = (const int8_job *)p;
    int KB = j->K / QB, K = j->K, M = j->M, N = j->N;
    int t0 = chunk * j->per_chunk, t1 = t0 + j->per_chunk < j->tiles ? t0 + j->per_chunk : j->tiles;
    uint8_t *bt = amx_scratch((size_t)KB * 1024 + 2048);
    if (!bt) { atomic_store(&((int8_job *)p)->failed, 1); return; }
    int32_t *cbuf = (int32_t *)(bt + (size_t)KB * 1024);
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    amx_config(M);
    for (int t = t0; t < t1; t++) {
        const int8_t *wt = j->w + (size_t)t * K * NT;
        for (int c = 0; c < KB * 16; c++)
            _mm512_store_si512((void *)(bt + (size_t)c * 64),
                               _mm512_xor_si512(_mm512_loadu_si512((const void *)(wt + (size_t)c * 64)), flip));
        const float *wst = j->ws + (size_t)t * NT;
        float *yt = j->y + (size_t)t * NT;
        for (int m0 = 0; m0 < M; m0 += 8) {
            const int8_t *pf = m0 == 0 && t + 1 < t1 ? wt + (size_t)K * NT : NULL;
#define ROWS(MT_) amx_rows8(bt, cbuf, j->xq, j->xd, j->xsum, wst, M, m0, KB, yt, N, pf, MT_)
            AMX_CHUNK_ROWS(M - m0 < 8 ? M - m0 : 8);
#undef ROWS
        }
    }
    _tile_release();
}
#else
#define int8_chunk_amx int8_chunk
#endif

/* y (M, N) = x (M, K) @ (W * ws[:, None]).T for int8 W (N/16, K/4, 16, 4) and per-row scales ws (N,). */
int int8_cpu_linear(const float *x, const int8_t *w, const float *ws, float *y, int M, int N, int K, int threads) {
    int KB = K / QB;
    int8_t *xq = (int8_t *)malloc((size_t)M * K * 2);
    float *xd = (float *)malloc(sizeof(float) * ((size_t)M * KB + (size_t)M));
    if (!xq || !xd) { free(xq); free(xd); return -1; }
    float *xsum = xd + (size_t)M * KB;
    int amx = use_amx(M);
    quant_rows(x, M, K, K, xq, xd, xsum, 2, amx);
    int tiles = N / NT, per_chunk = tiles / (threads * 6) > 1 ? tiles / (threads * 6) : 1;
    int8_job job = {w, xq, ws, xd, xsum, y, M, N, K, tiles, per_chunk};
    pool_run(amx ? int8_chunk_amx : int8_chunk, &job, (tiles + per_chunk - 1) / per_chunk, threads);
    free(xq);
    free(xd);
    return atomic_load(&job.failed) ? -1 : 0;
}

/* fp32 -> bf16 bits as torch rounds them (c10::BFloat16: to nearest even; any NaN -> 0x7FC0). */
static inline uint16_t bf16_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline float bf16_float(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* 8 bf16 -> 8 fp32 (exact), and 8 fp32 -> 8 bf16 as bf16_bits rounds them (to nearest even; NaN -> 0x7FC0). */
static inline __m256 bf16_load8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline void bf16_store8(uint16_t *p, __m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);   /* r0..r7 as 16-bit, in order */
    _mm_storeu_si128((__m128i *)p, _mm256_castsi256_si128(packed));
}

/* RMSNorm with the residual add in place: for each of T rows, res += add (when add is not NULL), then
 * out = res / sqrt(mean(res^2) + eps) * w (fp32; the sum of squares in 8 partial sums). add_bf16 / out_bf16: add
 * is bf16 (widened exactly, as torch's fp32 + bf16 promotes it) / out is written as bf16 (rounded as torch rounds). */
void rmsnorm2_cpu(float *res, const void *add, int add_bf16, const float *w, void *out, int out_bf16, int T, int D,
                  float eps) {
    for (int t = 0; t < T; t++) {
        float *r = res + (size_t)t * D;
        const float *a = add && !add_bf16 ? (const float *)add + (size_t)t * D : NULL;
        const uint16_t *ab = add && add_bf16 ? (const uint16_t *)add + (size_t)t * D : NULL;
        __m256 ss = _mm256_setzero_ps();
        int i = 0;
        for (; i + 8 <= D; i += 8) {
            __m256 v = _mm256_loadu_ps(r + i);
            if (a) v = _mm256_add_ps(v, _mm256_loadu_ps(a + i));
            if (ab) v = _mm256_add_ps(v, bf16_load8(ab + i));
            if (a || ab) _mm256_storeu_ps(r + i, v);
            ss = _mm256_add_ps(ss, _mm256_mul_ps(v, v));
        }
        float s = hsum256(ss);
        for (; i < D; i++) {
            if (a) r[i] += a[i];
            if (ab) r[i] += bf16_float(ab[i]);
            s += r[i] * r[i];
        }
        float inv = 1.f / sqrtf(s / (float)D + eps);
        __m256 vi = _mm256_set1_ps(inv);
        if (out_bf16) {
            uint16_t *o = (uint16_t *)out + (size_t)t * D;
            for (i = 0; i + 8 <= D; i += 8)
                bf16_store8(o + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(r + i), vi), _mm256_loadu_ps(w + i)));
            for (; i < D; i++) o[i] = bf16_bits(r[i] * inv * w[i]);
        } else {
            float *o = (float *)out + (size_t)t * D;
            for (i = 0; i + 8 <= D; i += 8)
                _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(r + i), vi), _mm256_loadu_ps(w + i)));
            for (; i < D; i++) o[i] = r[i] * inv * w[i];
        }
    }
}

/* rmsnorm2_cpu with fp32 add and out (the decode step's). */
void rmsnorm_cpu(float *res, const float *add, const float *w, float *out, int T, int D, float eps) {
    rmsnorm2_cpu(res, add, 0, w, out, 0, T, D, eps);
}

/* KV cache kinds of rope_kv_cpu */
enum { KV_INT8 = 0, KV_INT4 = 1, KV_BF16 = 2, KV_F32 = 3 };

/* Rotary on q and k and the KV write of a step, in place:
 *   qkv (T, nh + 2 nkv, hd) fp32: q heads, k heads, v heads; cos, sin (T, hd): x = x * cos + rotate(x) * sin,
 *   rotate(x)[i] = x[i + hd/2] (i < hd/2) or x[i - hd/2] (the runner's sin table carries rotate_half's sign);
 *   k and v rows of token t -> cache row slots[t] of rows (num_rows, 2, nkv, hd') by `kind`:
 *     KV_INT8  int8 codes round((x - zp) / scale) clamped to [lo, hi] (scale, zp (2, nkv): static)
 *     KV_INT4  the same codes in [lo, hi] = [-8, 7], stored + 8, two a byte (low nibble = even channel; hd' = hd/2)
 *     KV_BF16  x rounded to bf16 (scale, zp unused), KV_F32 x as is.
 * Each product and sum rounded as torch's ops round them (kvcache.py's codes, Tensor.to(bfloat16)). */
void rope_kv_cpu(float *qkv, const float *cos, const float *sin, int T, int nh, int nkv, int hd, void *rows,
                 const int64_t *slots, const float *scale, const float *zp, int lo, int hi, int kind) {
    int half = hd / 2, H = nh + 2 * nkv;
    float tmp[1024];
    for (int t = 0; t < T; t++) {
        const float *c = cos + (size_t)t * hd, *s = sin + (size_t)t * hd;
        for (int h = 0; h < nh + nkv; h++) {
            float *x = qkv + ((size_t)t * H + h) * hd;
            memcpy(tmp, x, sizeof(float) * hd);
            for (int i = 0; i < half; i++) x[i] = tmp[i] * c[i] + tmp[i + half] * s[i];
            for (int i = half; i < hd; i++) x[i] = tmp[i] * c[i] + tmp[i - half] * s[i];
        }
        size_t row = (size_t)slots[t] * 2 * nkv * hd;              /* values of one cache row */
        for (int j = 0; j < 2 * nkv; j++) {
            const float *x = qkv + ((size_t)t * H + nh + j) * hd;
            size_t o = row + (size_t)j * hd;
            if (kind == KV_F32) {
                memcpy((float *)rows + o, x, sizeof(float) * hd);
            } else if (kind == KV_BF16) {
                int i = 0;
                for (; i + 8 <= hd; i += 8) bf16_store8((uint16_t *)rows + o + i, _mm256_loadu_ps(x + i));
                for (; i < hd; i++) ((uint16_t *)rows)[o + i] = bf16_bits(x[i]);
            } else {
                float sc = scale[j], z = zp[j];
                for (int i = 0; i < hd; i++) {
                    float v = nearbyintf((x[i] - z) / sc);
                    tmp[i] = v < (float)lo ? (float)lo : (v > (float)hi ? (float)hi : v);
                }
                if (kind == KV_INT8)
                    for (int i = 0; i < hd; i++) ((int8_t *)rows)[o + i] = (int8_t)tmp[i];
                else
                    for (int i = 0; i < hd; i += 2)
                        ((uint8_t *)rows)[(o + i) / 2] = (uint8_t)((int)tmp[i] + 8) | (uint8_t)(((int)tmp[i + 1] + 8) << 4);
            }
        }
    }
}
