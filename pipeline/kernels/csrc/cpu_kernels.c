/* All our CPU kernels in one library (cpu_build.load("cpu_kernels")), so that they share one thread pool
 * (pool.h): a pool per library left two sets of workers spinning against each other on a small CPU. */
#include "linear_cpu.c"
#include "attn_cpu.c"

const char *cpu_kernels_isa(void) { return KERNEL_ISA; }

/* silu(gate) * up for gate_up (M, 2K) fp32 (K % VL == 0) into a (M, K). sigmoid(x) from e = exp(-|x|) (v_exp,
 * ~1 ulp): 1 / (1 + e) for x >= 0, e / (1 + e) below, so that no 1 - sigmoid(|x|) loses the small values of large
 * negative gates to cancellation. */
static void swiglu_rows(const float *gu, int M, int K, float *a) {
    for (int m = 0; m < M; m++) {
        const float *g = gu + (size_t)m * 2 * K, *u = g + K;
        float *o = a + (size_t)m * K;
        for (int i = 0; i < K; i += VL) {
            vf x = v_load(g + i), nx = v_sub(v_zero(), x), one = v_set1(1.f);
            vf e = v_exp(PS(min)(x, nx));                                            /* exp(-|x|) */
#if defined(__AVX512F__) && defined(__AVX512BW__)
            vf num = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, v_zero(), _CMP_LT_OQ), one, e);
#else
            vf num = _mm256_blendv_ps(one, e, _mm256_cmp_ps(x, v_zero(), _CMP_LT_OQ));
#endif
            vf s = PS(div)(num, v_add(one, e));                                      /* sigmoid(x) */
            v_store(o + i, v_mul(v_mul(x, s), v_load(u + i)));
        }
    }
}

/* y (M, N) = (silu(gate) * up) @ W.T for gate_up (M, 2K): a SwiGLU MLP's down projection in one call. */
int int4_cpu_swiglu_linear(const float *gu, const uint8_t *w, const float *ws, const float *wm, float *y, int M, int N,
                           int K, int group, int terms, int threads) {
    float *a = (float *)malloc(sizeof(float) * (size_t)M * K);
    if (!a) return -1;
    swiglu_rows(gu, M, K, a);
    int rc = int4_cpu_linear(a, w, ws, wm, y, M, N, K, group, terms, threads);
    free(a);
    return rc;
}
/* silu(gate) * up for gate_up (M, 2K) bf16 into out (M, K) bf16 (the prefill path's, between two oneDNN bf16
 * linears): widened exactly, computed in fp32 as swiglu_rows, rounded once. Returns 0, or -1 when out of memory. */
int swiglu_bf16_cpu(const uint16_t *gu, int M, int K, uint16_t *out) {
    float *f = (float *)malloc(sizeof(float) * 3 * (size_t)K);
    if (!f) return -1;
    for (int m = 0; m < M; m++) {
        const uint16_t *g = gu + (size_t)m * 2 * K;
        for (int i = 0; i < 2 * K; i += 8) _mm256_storeu_ps(f + i, bf16_load8(g + i));      /* K % 16 == 0 */
        swiglu_rows(f, 1, K, f + 2 * K);
        for (int i = 0; i < K; i += 8) bf16_store8(out + (size_t)m * K + i, _mm256_loadu_ps(f + 2 * K + i));
    }
    free(f);
    return 0;
}

#include "decoder_cpu.c"
