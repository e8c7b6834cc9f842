/* Decode attention for x86 CPUs over the engine's paged KV cache, read in place: no gather, no dequantized copy.
 * Built and loaded by pipeline/kernels/cpu_attn.py (its docstring has the layout and the math; `attn_cpu_ref`
 * there is the PyTorch reference of this file).
 *
 *   q     (B, nh, hd) fp32, row b at q + b * q_stride      this step's queries (rotary applied)
 *   cache (num_blocks, bs, 2, nkv, hdc)                    codes: fp32 | bf16 | int8 | int4 (uint8, two a byte,
 *                                                          low nibble = even channel, stored code + 8; hdc = hd/2)
 *   bt    (B, max_blocks) int32, ctx (B,) int32             block tables and context lengths (this token included)
 *   scale, zp                                              static: (2, nkv) fp32 (K then V, one a head);
 *                                                          dynamic: (num_blocks * bs, 2, nkv) fp32 (one a cache
 *                                                          row and head); NULL for a 16-bit cache (s = 1, z = 0)
 *   out   (B, nh * hd) fp32                                out[b, h] = softmax_j(sm * q_h . k_j) @ v_j
 *
 * The dequantization is folded into the attention: with k_j = s_k c_k + z_k and v_j = s_v c_v + z_v,
 *     score_j = sm * (s_k (q . c_k) + z_k sum(q)),   out = sum_j p_j (s_v c_v + z_v) / sum_j p_j,
 * one pass over the keys with an online softmax (a running max per head, rescaled once a chunk of CH keys), fp32
 * sums. A (sequence, KV head) pair is one task: each K / V row is loaded and converted to fp32 once (a chunk's rows
 * into an L1 buffer) and used by the nh / nkv query heads of its group (GQA, query head h reads KV head
 * h / (nh / nkv)); a head's query row and its output accumulator stay in registers over a chunk, and VL keys' dot
 * products are summed by one transpose-and-add tree. Tasks are split across `threads` threads (csrc/pool.h;
 * default 1: the decode step's thread). hd % 16 == 0, hd <= 256; the AVX512 build is cpu_build's "avx512_vnni" (it needs AVX512F/BW only).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "pool.h"

#define CH 32        /* keys a chunk: scores of a chunk, then one rescale, then its V rows */
#define HD_MAX 256

enum { DT_F32 = 0, DT_BF16 = 1, DT_I8 = 2, DT_I4 = 3 };
enum { KV_NONE = 0, KV_STATIC = 1, KV_DYNAMIC = 2 };

/* One vector type per ISA (VL fp32 lanes) and the few ops the kernel uses; the kernel below is written once. */
#if defined(__AVX512F__) && defined(__AVX512BW__)
#ifndef KERNEL_ISA   /* linear_cpu.c, included first, names the build */
#define KERNEL_ISA "avx512_vnni"
#endif
#define VL 16
typedef __m512 vf;
#define PS(op) _mm512_##op##_ps
static inline float v_hsum(vf a) { return _mm512_reduce_add_ps(a); }
/* v_hsum_rows' first levels: 16 rows of 16 floats (d, row-major) -> b[i], 128-bit lane k = 4 partial sums of
 * row 4k + i (rows loaded in the order that leaves sum j in lane j at the end). */
static inline void rows_to_lanes(const float *d, vf b[4]) {
    __m512 v[16], a[8];
    for (int j = 0; j < 16; j++) v[j] = _mm512_loadu_ps(d + 16 * ((j & 3) * 4 + (j >> 2)));
    for (int i = 0; i < 8; i++)
        a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; i++)
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
}
static inline vf v_round(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vf v_pow2(vf y, vf n) { return _mm512_scalef_ps(y, n); }                 /* y * 2^n */
static inline vf v_bf16(const uint16_t *p) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
static inline vf v_i8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
static inline vf v_i4(const uint8_t *p) {              /* 8 bytes -> 16 channels: lo0, hi0, lo1, hi1, ... */
    __m128i b = _mm_loadl_epi64((const __m128i *)p), m = _mm_set1_epi8(0x0F);
    __m128i c = _mm_unpacklo_epi8(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 4), m));
    return _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(c), _mm512_set1_epi32(8)));
}
#elif defined(__AVX2__) && defined(__FMA__)
#ifndef KERNEL_ISA   /* linear_cpu.c, included first, names the build */
#define KERNEL_ISA "avx2"
#endif
#define VL 8
typedef __m256 vf;
#define PS(op) _mm256_##op##_ps
static inline float v_hsum(vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}
/* 8 rows of 8 floats -> b[i], 128-bit lane k = 4 partial sums of row 4k + i (as the AVX512 levels). */
static inline void rows_to_lanes(const float *d, vf b[4]) {
    __m256 v[8];
    for (int j = 0; j < 8; j++) v[j] = _mm256_loadu_ps(d + 8 * ((j & 1) * 4 + (j >> 1)));
    for (int i = 0; i < 4; i++)
        b[i] = _mm256_add_ps(_mm256_permute2f128_ps(v[2 * i], v[2 * i + 1], 0x20),
                             _mm256_permute2f128_ps(v[2 * i], v[2 * i + 1], 0x31));
}
static inline vf v_round(vf a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vf v_pow2(vf y, vf n) {                  /* y * 2^n, n integral in [-126, 127] */
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
static inline vf v_bf16(const uint16_t *p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
static inline vf v_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline vf v_i4(const uint8_t *p) {              /* 4 bytes -> 8 channels */
    int32_t w;
    memcpy(&w, p, 4);
    __m128i b = _mm_cvtsi32_si128(w), m = _mm_set1_epi8(0x0F);
    __m128i c = _mm_unpacklo_epi8(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 4), m));
    return _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(c), _mm256_set1_epi32(8)));
}
#else
#error "attn_cpu.c needs AVX2 + FMA or AVX512"
#endif

/* The plain fp32 ops, the same name in both ISAs but for the prefix. */
static inline vf v_load(const float *p) { return PS(loadu)(p); }
static inline void v_store(float *p, vf a) { PS(storeu)(p, a); }
static inline vf v_set1(float a) { return PS(set1)(a); }
static inline vf v_zero(void) { return PS(setzero)(); }
static inline vf v_add(vf a, vf b) { return PS(add)(a, b); }
static inline vf v_sub(vf a, vf b) { return PS(sub)(a, b); }
static inline vf v_mul(vf a, vf b) { return PS(mul)(a, b); }
static inline vf v_fma(vf a, vf b, vf c) { return PS(fmadd)(a, b, c); }
static inline vf v_max(vf a, vf b) { return PS(max)(a, b); }

/* VL rows of VL floats (d, row-major) -> lane j = the sum of row j: a transpose-and-add tree instead of VL
 * horizontal sums; the last level sums within 128-bit lanes: lane k, element i = the total of b[i]'s lane k. */
static inline vf v_hsum_rows(const float *d) {
    vf b[4];
    rows_to_lanes(d, b);
    vf c0 = PS(add)(PS(unpacklo)(b[0], b[1]), PS(unpackhi)(b[0], b[1]));
    vf c1 = PS(add)(PS(unpacklo)(b[2], b[3]), PS(unpackhi)(b[2], b[3]));
    return PS(add)(PS(shuffle)(c0, c1, 0x44), PS(shuffle)(c0, c1, 0xEE));
}

const char *attn_cpu_isa(void) { return KERNEL_ISA; }

/* exp(x) for x <= 0 (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial; ~1 ulp); x below
 * -87.3 gives ~1e-38, not 0 (the callers zero what must be 0). */
static inline vf v_exp(vf x) {
    x = v_max(x, v_set1(-87.3f));
    vf n = v_round(v_mul(x, v_set1(1.44269504088896341f)));
    vf r = v_sub(v_sub(x, v_mul(n, v_set1(0.693359375f))), v_mul(n, v_set1(-2.12194440e-4f)));
    vf p = v_set1(1.9875691500e-4f);
    p = v_fma(p, r, v_set1(1.3981999507e-3f));
    p = v_fma(p, r, v_set1(8.3334519073e-3f));
    p = v_fma(p, r, v_set1(4.1665795894e-2f));
    p = v_fma(p, r, v_set1(1.6666665459e-1f));
    p = v_fma(p, r, v_set1(5.0000001201e-1f));
    vf y = v_add(v_fma(v_mul(p, r), r, r), v_set1(1.f));
    return v_pow2(y, n);
}

/* hd codes at p (element offset `off` into the cache) -> fp32 dst. */
static inline void load_row(const void *cache, size_t off, int dtype, int hd, float *dst) {
    switch (dtype) {
        case DT_F32: memcpy(dst, (const float *)cache + off, sizeof(float) * hd); break;
        case DT_BF16:
            for (int i = 0; i < hd; i += VL) v_store(dst + i, v_bf16((const uint16_t *)cache + off + i));
            break;
        case DT_I8: for (int i = 0; i < hd; i += VL) v_store(dst + i, v_i8((const int8_t *)cache + off + i)); break;
        default: for (int i = 0; i < hd; i += VL) v_store(dst + i, v_i4((const uint8_t *)cache + off + i / 2)); break;
    }
}

/* One (sequence, KV head) task: the G = nh / nkv query heads of group g. Inlined with a constant hd for 64 and
 * 128 (attend_any): the loops over a row unroll, and a query's or an accumulator's row stays in registers. */
static inline __attribute__((always_inline)) void attend_group(const float *q, const void *cache, const int32_t *bt,
        int n, const float *scale, const float *zp, float *out, int nkv, int hd, int bs, int G, int g, int dtype,
        int mode, float sm) {
    int hdc = dtype == DT_I4 ? hd / 2 : hd;
    float rows[CH * hd], sv[CH], zv[CH], pw[VL];     /* a chunk's K rows, then its V rows, fp32 */
    float acc[G][hd], sc[G][CH], qs[G], m[G], l[G], za[G];
    float sk[CH] = {0}, zk[CH] = {0}, dots[VL][VL];     /* sk, zk past a chunk: finite, unused */
    size_t off[CH], row[CH];
    for (int h = 0; h < G; h++) {
        vf s = v_zero();
        for (int i = 0; i < hd; i += VL) s = v_add(s, v_load(q + (size_t)h * hd + i));
        qs[h] = v_hsum(s);
        m[h] = -INFINITY;
        l[h] = za[h] = 0.f;
        memset(acc[h], 0, sizeof(float) * hd);
    }
    for (int j0 = 0; j0 < n; j0 += CH) {
        int c = n - j0 < CH ? n - j0 : CH;
        int blk = j0 / bs, o = j0 % bs;        /* key j0 + j is row o of block bt[blk] */
        for (int j = 0; j < c; j++, o++) {     /* the chunk's cache rows: K's code offset, and the row's params */
            if (o == bs) blk++, o = 0;
            size_t r = row[j] = (size_t)bt[blk] * bs + o;
            off[j] = (r * 2 * nkv + g) * hdc;
            sk[j] = 1.f, zk[j] = 0.f;
            if (mode == KV_STATIC) sk[j] = scale[g], zk[j] = zp[g];
            else if (mode == KV_DYNAMIC) sk[j] = scale[r * 2 * nkv + g], zk[j] = zp[r * 2 * nkv + g];
        }
        if (j0 + CH < n) {   /* the next chunk's K and V rows on their way to L1 meanwhile (1.37x at 8 x 1000) */
            int cn = n - j0 - CH < CH ? n - j0 - CH : CH, b2 = (j0 + CH) / bs, o2 = (j0 + CH) % bs;
            size_t esz = dtype == DT_F32 ? 4 : dtype == DT_BF16 ? 2 : 1, bytes = (size_t)hdc * esz;
            for (int j = 0; j < cn; j++, o2++) {
                if (o2 == bs) b2++, o2 = 0;
                const char *kp = (const char *)cache + (((size_t)bt[b2] * bs + o2) * 2 * nkv + g) * hdc * esz;
                for (size_t by = 0; by < bytes; by += 64) {
                    _mm_prefetch(kp + by, _MM_HINT_T0);
                    _mm_prefetch(kp + (size_t)nkv * hdc * esz + by, _MM_HINT_T0);
                }
            }
        }
        int cp = (c + VL - 1) / VL * VL;       /* scores: each K row converted once into rows (zeros to cp) */
        for (int j = 0; j < c; j++) load_row(cache, off[j], dtype, hd, rows + (size_t)j * hd);
        memset(rows + (size_t)c * hd, 0, sizeof(float) * (cp - c) * hd);
        for (int h = 0; h < G; h++) {          /* and dotted with the G queries, a query in registers */
            vf qv[HD_MAX / VL];
            for (int i = 0; i < hd / VL; i++) qv[i] = v_load(q + (size_t)h * hd + i * VL);
            for (int j = 0; j < cp; j += VL) {
                for (int k = 0; k < VL; k++) {
                    const float *kr = rows + (size_t)(j + k) * hd;
                    vf d = v_mul(qv[0], v_load(kr));
                    for (int i = 1; i < hd / VL; i++) d = v_fma(qv[i], v_load(kr + i * VL), d);
                    v_store(dots[k], d);
                }                              /* lanes past c: scores of zero rows, never read */
                v_store(sc[h] + j, v_mul(v_set1(sm), v_add(v_mul(v_load(sk + j), v_hsum_rows(dots[0])),
                                                           v_mul(v_load(zk + j), v_set1(qs[h])))));
            }
        }
        for (int h = 0; h < G; h++) {          /* online softmax: new max, rescale, p = exp(score - max) */
            float cm = sc[h][0];
            for (int j = 1; j < c; j++) cm = sc[h][j] > cm ? sc[h][j] : cm;
            if (cm > m[h]) {
                float a = expf(m[h] - cm);
                vf va = v_set1(a);
                for (int i = 0; i < hd; i += VL) v_store(acc[h] + i, v_mul(v_load(acc[h] + i), va));
                l[h] *= a, za[h] *= a, m[h] = cm;
            }
            vf mx = v_set1(m[h]), ls = v_zero();
            int j = 0;
            for (; j + VL <= c; j += VL) {
                vf p = v_exp(v_sub(v_load(sc[h] + j), mx));
                v_store(sc[h] + j, p);
                ls = v_add(ls, p);
            }
            if (j < c) {                       /* the tail: padded with -inf, whose ~1e-38 are dropped */
                float t[VL];
                for (int i = 0; i < VL; i++) t[i] = j + i < c ? sc[h][j + i] : -INFINITY;
                v_store(t, v_exp(v_sub(v_load(t), mx)));
                for (int i = 0; j < c; i++, j++) sc[h][j] = t[i], l[h] += t[i];
            }
            l[h] += v_hsum(ls);
        }
        for (int j = 0; j < c; j++) {          /* values: each V row converted once into rows */
            size_t r = row[j];
            sv[j] = 1.f, zv[j] = 0.f;
            if (mode == KV_STATIC) sv[j] = scale[nkv + g], zv[j] = zp[nkv + g];
            else if (mode == KV_DYNAMIC) sv[j] = scale[(r * 2 + 1) * nkv + g], zv[j] = zp[(r * 2 + 1) * nkv + g];
            load_row(cache, off[j] + (size_t)nkv * hdc, dtype, hd, rows + (size_t)j * hd);
        }
        for (int j = c; j < cp; j++) sv[j] = zv[j] = 0.f;
        for (int h = 0; h < G; h++) {          /* and accumulated for the G heads, a head's row in registers */
            vf a[HD_MAX / VL], b[HD_MAX / VL], zs = v_zero();   /* two sets: even and odd keys (FMA latency) */
            for (int i = 0; i < hd / VL; i++) a[i] = v_load(acc[h] + i * VL), b[i] = v_zero();
            for (int j = c; j < cp; j++) sc[h][j] = 0.f;
            for (int j = 0; j < cp; j += VL) {
                vf p = v_load(sc[h] + j);
                zs = v_fma(p, v_load(zv + j), zs);
                v_store(pw, v_mul(p, v_load(sv + j)));
                for (int k = 0; k < VL && j + k < c; k += 2) {
                    const float *r0 = rows + (size_t)(j + k) * hd;
                    vf w0 = v_set1(pw[k]), w1 = v_set1(pw[k + 1]);     /* row c's weight is 0: a zero row */
                    for (int i = 0; i < hd / VL; i++) {
                        a[i] = v_fma(w0, v_load(r0 + i * VL), a[i]);
                        b[i] = v_fma(w1, v_load(r0 + hd + i * VL), b[i]);
                    }
                }
            }
            for (int i = 0; i < hd / VL; i++) v_store(acc[h] + i * VL, v_add(a[i], b[i]));
            za[h] += v_hsum(zs);
        }
    }
    for (int h = 0; h < G; h++) {
        vf il = v_set1(1.f / l[h]), z = v_set1(za[h]);
        for (int i = 0; i < hd; i += VL) v_store(out + (size_t)h * hd + i, v_mul(v_add(v_load(acc[h] + i), z), il));
    }
}

static void attend_any(const float *q, const void *cache, const int32_t *bt, int n, const float *scale,
                       const float *zp, float *out, int nkv, int hd, int bs, int G, int g, int dtype, int mode,
                       float sm) {
    switch (hd) {
        case 64: attend_group(q, cache, bt, n, scale, zp, out, nkv, 64, bs, G, g, dtype, mode, sm); break;
        case 128: attend_group(q, cache, bt, n, scale, zp, out, nkv, 128, bs, G, g, dtype, mode, sm); break;
        default: attend_group(q, cache, bt, n, scale, zp, out, nkv, hd, bs, G, g, dtype, mode, sm); break;
    }
}

/* A decode step's arguments, the same for every layer (cpu_attn.py `_Step` mirrors it). */
typedef struct {
    const int32_t *bt, *ctx;      /* (B, max_blocks), (B,) */
    int max_blocks, num_blocks, B, nh, nkv, hd, bs, dtype, mode, threads;
    float sm;                     /* softmax scale */
} attn_step;

/* Returns 0, -1 for a shape the kernel does not take (hd % 16, hd > 256, nh % nkv), or -2 (nothing computed) for a
 * context longer than its block table or a block id outside the cache. */
int attn_cpu_check(const attn_step *st) {
    if (st->hd % 16 || st->hd > HD_MAX || st->nkv <= 0 || st->nh % st->nkv) return -1;
    for (int b = 0; b < st->B; b++) {
        int n = st->ctx[b], nb = (n + st->bs - 1) / st->bs;
        if (n > st->max_blocks * st->bs) return -2;
        for (int i = 0; i < nb; i++)
            if (st->bt[(size_t)b * st->max_blocks + i] < 0 || st->bt[(size_t)b * st->max_blocks + i] >= st->num_blocks)
                return -2;
    }
    return 0;
}

typedef struct {                  /* one call's arguments, for pool_run's chunks */
    const float *q, *scale, *zp;
    long q_stride;
    const void *cache;
    float *out;
    const attn_step *st;
} attn_job;

/* Task t = (sequence t / nkv, KV head t % nkv). */
static void attn_task(void *arg, int t) {
    const attn_job *j = (const attn_job *)arg;
    const attn_step *st = j->st;
    int nh = st->nh, nkv = st->nkv, hd = st->hd, G = nh / nkv, b = t / nkv, g = t % nkv;
    float *o = j->out + ((size_t)b * nh + (size_t)g * G) * hd;
    if (st->ctx[b] <= 0) {
        memset(o, 0, sizeof(float) * G * hd);
        return;
    }
    attend_any(j->q + (size_t)b * j->q_stride + (size_t)g * G * hd, j->cache, st->bt + (size_t)b * st->max_blocks,
               st->ctx[b], j->scale, j->zp, o, nkv, hd, st->bs, G, g, st->dtype, st->mode, st->sm);
}

/* out (B, nh * hd) = decode attention of q (row b at q + b * q_stride) over each sequence's ctx[b] rows of one
 * layer's cache; the (sequence, KV head) tasks on st->threads threads (pool.h). The step's arguments must have
 * passed attn_cpu_check. */
void attn_cpu_decode(const float *q, long q_stride, const void *cache, const float *scale, const float *zp,
                     float *out, const attn_step *st) {
    attn_job job = {q, scale, zp, q_stride, cache, out, st};
    pool_run(attn_task, &job, st->B * st->nkv, st->threads);
}
